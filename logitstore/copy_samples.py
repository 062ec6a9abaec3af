"""The streaming copy shared by `logitstore merge`, `subset` and `add-text`.

A `CopyPlan` says which samples of which source stores go into a new store, in which order
(sources in the order given, each in its store order), with which settings and signals.
`execute_plan` writes them through one `StoreWriter` part, reading the sources one segment
at a time (`StoreReader.read_segment`; for a classifier store, format 2.3,
`ClassifierReader.read_segment`: every head's logits, the features, labels, input reference,
split and tags), so memory holds one source segment and one output segment, whatever the
size of the stores. Segments holding no selected sample are not read. A classifier store
holds no tokens: its token counts (`tokens_out`, each source's `tokens`) are 0 and progress
counts samples (`CopyPlan.progress_unit`).

Provenance goes into the new store's manifest `extra` under `"operation"`: the command, the
sources (URL, manifest sha256, `state_sha256`, dataset fingerprint, counts, their own
`extra`), the filter, the signals and the counts in / out / duplicates (and notes such as
the id file's name), and `job`: a sha256 over everything that decides the output's content
(each source's manifest sha256 and state sha256, the filter, the signals; not the URLs),
which is how a rerun recognises its own unfinished output. `state_sha256` is the id of the
committed state read (the reader's `manifest["index"]["sha256"]`: the consolidated index's
sha256, or, where parts are followed past the consolidation, a hash over it and the heads
read): a source whose followed parts moved on has the same manifest but another state.

Killed and rerun with the same arguments, the copy resumes: the writer reopens its part,
which keeps every committed segment, and the samples it already holds are skipped. As the
output order is fixed by the plan and a part resumes at a segment boundary, the finished
store has the same samples, segments and content as an uninterrupted run. A destination
holding anything else (another store, another job's output) is refused unless `overwrite`,
which replaces it; a destination that is one of the sources is always refused.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from logitstore import __version__
from logitstore.classifier_reader import ClassifierReader
from logitstore.errors import (LogitStoreError, ManifestMissingError, SettingsMismatchError,
                               StoreIOError, StoreNotFoundError)
from logitstore.format import CLASSIFIER, TOKENIZER_DIR, StoreSettings
from logitstore.fs import StoreFS, sha256_hex
from logitstore.reader import StoreReader
from logitstore.verify import verify_store
from logitstore.writer import StoreWriter

OPERATION_KEY = "operation"  # the provenance record in the new store's manifest `extra`
OUTPUT_PART = "part-00000"  # the one part a merge or subset writes


@dataclass
class SourceSelection:
    """The samples taken from one source store: global row numbers, ascending."""

    url: str
    reader: StoreReader
    rows: np.ndarray  # int64 rows of reader.index (store order)

    def segment_rows(self) -> list[tuple[int, np.ndarray]]:
        """(segment number, rows inside that segment) for every segment holding a selected
        row, in store order; the rows are positions within the segment."""
        firsts = np.array([seg.first_sample for seg in self.reader.segments], dtype=np.int64)
        owner = np.searchsorted(firsts, self.rows, side="right") - 1
        out = []
        for seg_no in np.unique(owner):
            out.append((int(seg_no), self.rows[owner == seg_no] - firsts[seg_no]))
        return out

    def sample_ids(self) -> list[str]:
        ids = self.reader.sample_ids
        return [ids[int(row)] for row in self.rows]

    def tokens(self) -> int:
        lengths = self.reader.index.column("length").to_numpy()
        return int(lengths[self.rows].sum())


@dataclass
class CopyPlan:
    """What a merge, subset or add-text writes: `sources` in output order, with the settings
    of the new store (whose signals are `signals`)."""

    command: str  # "merge", "subset" or "add-text"
    sources: list[SourceSelection]
    settings: StoreSettings
    filter: dict[str, Any]
    counts: dict[str, int]  # samples_in, samples_out, duplicates (merge), tokens_out
    per_source: list[dict[str, int]] = field(default_factory=list)  # counts of each source
    notes: dict[str, Any] = field(default_factory=dict)  # recorded, not deciding the content
    # The tokenizer files the new store keeps ({"tokenizer/<name>": bytes}; the paths the
    # settings' `tokenizer_files` list), read from a source.
    tokenizer_files: dict[str, bytes] = field(default_factory=dict)
    # add-text: each sample as it is written (its text attached); None: copied as read
    transform: Callable[[Any], Any] | None = None

    @property
    def signals(self) -> list[str]:
        return list(self.settings.signals)

    @property
    def kind(self) -> str:
        return self.settings.kind

    @property
    def progress_unit(self) -> str:
        """What each `progress(n)` of `execute_plan` counts: tokens ("tok"), or samples
        ("sample") for a classifier store, which holds no tokens."""
        return "sample" if self.kind == CLASSIFIER else "tok"

    def output_ids(self) -> list[str]:
        return [sid for source in self.sources for sid in source.sample_ids()]

    def provenance(self) -> dict[str, Any]:
        """The `extra["operation"]` record of the new store (see the module docstring)."""
        sources = []
        for i, source in enumerate(self.sources):
            manifest = source.reader.manifest
            sources.append({
                "url": source.url, "manifest_sha256": sha256_hex(source.reader.manifest_bytes),
                # pins what was read where the manifest does not: parts followed past it
                "state_sha256": manifest["index"]["sha256"],
                "dataset_fingerprint": manifest.get("dataset_fingerprint"),
                "samples": len(source.reader), "tokens": source.reader.num_tokens,
                **(self.per_source[i] if i < len(self.per_source) else {}),
                "extra": manifest.get("extra") or {}})
        decisive = {"command": self.command, "filter": self.filter, "signals": self.signals,
                    "sources": [[s["manifest_sha256"], s["state_sha256"]] for s in sources]}
        job = sha256_hex(json.dumps(decisive, sort_keys=True).encode("utf-8"))
        return {"command": self.command, "job": job, "tool_version": __version__,
                "sources": sources, "filter": self.filter, "signals": self.signals,
                "counts": dict(self.counts), **self.notes}


@dataclass
class CopyResult:
    url: str
    provenance: dict[str, Any]
    resumed_after: int  # samples already in the destination when this run started
    tokens_written: int  # by this run (0 for a classifier store)
    seconds: float
    problems: list[str]  # from verify_store of the new store; [] when clean
    samples_written: int = 0  # by this run

    @property
    def counts(self) -> dict[str, int]:
        return self.provenance["counts"]

    @property
    def already_complete(self) -> bool:
        """The destination held the finished output before this run: nothing was written."""
        return self.resumed_after == self.counts["samples_out"] and self.samples_written == 0


def stored_tokenizer_files(reader: StoreReader) -> dict[str, bytes]:
    """The source's tokenizer files as a CopyPlan takes them ({} for a store without):
    its own and (2.2) those of its extra tokenizations, `tokenizer/<tokenization>/<name>`."""
    out = {f"{TOKENIZER_DIR}/{name}": data for name, data in reader.tokenizer_files().items()}
    for tokenization in reader.tokenizations:
        out.update({f"{TOKENIZER_DIR}/{tokenization}/{name}": data
                    for name, data in reader.tokenizer_files(tokenization).items()})
    return out


def open_sources(urls: list[str], storage_options: dict | None) -> list[StoreReader]:
    return [StoreReader(url, storage_options=storage_options) for url in urls]


def execute_plan(plan: CopyPlan, dst: str, *, dst_options: dict | None = None,
                 overwrite: bool = False,
                 progress: Callable[[int], None] | None = None) -> CopyResult:
    """Write the plan's samples to `dst`, then verify it (see the module docstring).
    `progress(n)` is called after each sample handed to the writer: n = its tokens, or 1
    where the plan's `progress_unit` is "sample" (a classifier store)."""
    if plan.counts["samples_out"] == 0:
        raise LogitStoreError(f"nothing to write to {dst}: the {plan.command} selects no sample "
                              f"of {', '.join(s.url for s in plan.sources)}; a store holds at "
                              f"least one sample. Check the filter")
    _refuse_a_source_as_destination(plan, dst, dst_options)
    start = time.perf_counter()
    provenance = plan.provenance()
    output_ids = plan.output_ids()
    writer = _open_destination(plan, dst, dst_options, overwrite, provenance, output_ids)
    resumed_after = len(output_ids) if writer is None else writer.committed_count
    samples, tokens = 0, 0
    if writer is not None:
        try:
            samples, tokens = _copy_samples(plan, writer, progress)
        except BaseException:
            writer.abort()
            raise
        writer.close()
    problems = verify_store(dst, storage_options=dst_options)
    return CopyResult(dst, provenance, resumed_after, tokens, time.perf_counter() - start,
                      problems, samples_written=samples)


def _copy_samples(plan: CopyPlan, writer: StoreWriter,
                  progress: Callable[[int], None] | None) -> tuple[int, int]:
    """Stream the selected samples into `writer`, skipping those it already committed;
    returns the (samples, tokens) added."""
    committed = writer.committed_ids
    samples, tokens = 0, 0
    for source in plan.sources:
        ids = source.reader.sample_ids
        read_segment, tokens_of = _segment_source(source.reader, plan.signals)
        for seg_no, rows in source.segment_rows():
            first = source.reader.segments[seg_no].first_sample
            todo = [int(r) for r in rows if ids[first + int(r)] not in committed]
            if not todo:
                continue  # resumed past this segment: not even read
            segment = read_segment(seg_no)
            for row in todo:
                writer.add(segment[row] if plan.transform is None
                           else plan.transform(segment[row]))
                count = tokens_of(segment[row])
                samples, tokens = samples + 1, tokens + count
                if progress:
                    progress(1 if plan.progress_unit == "sample" else count)
    return samples, tokens


def _segment_source(reader: StoreReader, signals: list[str]
                    ) -> tuple[Callable[[int], list], Callable[[Any], int]]:
    """How a source's segments are read (segment number -> its samples, every signal
    kept), and each sample's tokens: a classifier sample (2.3) has none."""
    if reader.kind == CLASSIFIER:
        return ClassifierReader(reader).read_segment, lambda sample: 0
    return (lambda seg_no: reader.read_segment(seg_no, signals)), \
        lambda sample: len(sample.input_ids)


def _open_destination(plan: CopyPlan, dst: str, dst_options: dict | None, overwrite: bool,
                      provenance: dict[str, Any], output_ids: list[str]) -> StoreWriter | None:
    """The writer of the output part, resuming an unfinished run of the same job; None when
    `dst` already holds the finished output. LogitStoreError when `dst` holds something
    else and `overwrite` is false."""
    job = provenance["job"]
    other = other_store_at(dst, dst_options, job)
    if other and not overwrite:
        raise LogitStoreError(_refusal(plan, dst, other))
    erase = bool(other)
    while True:
        try:
            writer = StoreWriter(dst, plan.settings, part=OUTPUT_PART,
                                 storage_options=dst_options, overwrite=erase,
                                 extra={OPERATION_KEY: provenance},
                                 tokenizer_files=plan.tokenizer_files)
        except SettingsMismatchError as err:
            # parts without a committed store manifest, written with other settings
            found = f"an unfinished store with other settings ({err})"
        except LogitStoreError:
            if not erase and _finished_output(dst, dst_options, job, len(output_ids)):
                return None  # complete already (a rerun after success, or a kill inside
                # close() after the part was marked complete: the writer committed it)
            raise
        else:
            committed = writer.committed_ids
            if committed == set(output_ids[:len(committed)]):
                return writer
            writer.abort()
            found = f"an unfinished store of {len(committed)} other samples"
        if erase or not overwrite:
            raise LogitStoreError(_refusal(plan, dst, found))
        erase = True


def other_store_at(dst: str, dst_options: dict | None, job: str) -> str | None:
    """What `dst` holds when it is a committed store that is not this job's output (for the
    refusal), else None (nothing there, an unfinished store, or this job's output)."""
    try:
        reader = StoreReader(dst, storage_options=dst_options)
    except (StoreNotFoundError, ManifestMissingError):
        return None  # nothing committed there
    except StoreIOError:
        raise  # the storage failed: nothing is known about what is there
    except LogitStoreError as err:
        return f"a store it cannot read ({err})"
    operation = (reader.manifest.get("extra") or {}).get(OPERATION_KEY) or {}
    if operation.get("job") == job:
        return None
    made_by = (f"written by `logitstore {operation['command']}` from other sources or with "
               f"another filter" if operation.get("command") else "not written by this command")
    return f"a store of {len(reader)} samples {made_by}"


def _refuse_a_source_as_destination(plan: CopyPlan, dst: str, dst_options: dict | None) -> None:
    """LogitStoreError when `dst` is the location of a source (overwriting it would destroy
    the data being read)."""
    target = StoreFS(dst, dst_options)
    where = (target.fs.protocol, posixpath.normpath(target.root))
    for source in plan.sources:
        fs = source.reader.fs
        if (fs.fs.protocol, posixpath.normpath(fs.root)) == where:
            raise LogitStoreError(f"{dst} is also a source of the {plan.command} "
                                  f"({source.url}); write the new store somewhere else")


def _finished_output(dst: str, dst_options: dict | None, job: str, samples: int) -> bool:
    try:
        reader = StoreReader(dst, storage_options=dst_options)
    except LogitStoreError:
        return False
    operation = (reader.manifest.get("extra") or {}).get(OPERATION_KEY) or {}
    return operation.get("job") == job and len(reader) == samples


def _refusal(plan: CopyPlan, dst: str, found: str) -> str:
    return (f"refusing to write the {plan.command} into {dst}: it holds {found}, expected "
            f"nothing or an unfinished output of this same command (which is resumed). "
            f"Choose another destination, or pass --overwrite (overwrite=True) to replace "
            f"what is there")


def canonical_digest(values: list[str]) -> str:
    """sha256 over the sorted distinct `values`, one per line (ids in a filter's record)."""
    h = hashlib.sha256()
    for value in sorted(set(values)):
        h.update(value.encode("utf-8") + b"\n")
    return h.hexdigest()
