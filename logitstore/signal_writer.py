"""Add a new teacher signal to a committed store, over the same tokens.

    appender = SignalAppender("store/", "qwen2-1.5b", spec)
    for job in appender.pending():           # segments that do not have the signal yet
        data = [...]                         # one SignalData per sample of job.sample_ids
        appender.write(job, data)
    appender.close()

The new arrays are new files inside existing segment directories (nothing already there is
rewritten). A segment holds the signal once its files and then its addition record
(`parts/<part>/records/<segment>+<signal>.json`, logitstore/records.py) are written; a
part's head gains the signal in its settings once every segment of the part holds it; the
store manifest shows the signal only when a consolidation finds it in every part's head,
so readers never see a half-added signal. Killed and rerun, it resumes with the segments
still pending. Each segment costs its files and one record; the heads are rewritten once
per part, the store consolidated once at the end.

A teacher with another tokenizer (format 2.2) adds its signal on its own tokenization of the
stored text: `SignalSpec(tokenization="medgemma")`, with `tokenization=TokenizationSpec(...)`
and its tokenizer's files when the store does not hold that tokenization yet; then each
`write` also takes the segment's samples as that tokenizer cut them (`tokenized`), whose
arrays go into the same addition record as the signal's. A store without text is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from logitstore import __version__
from logitstore.classifier_sample import require_kind
from logitstore.commit import commit_store, now_iso, sealed_json
from logitstore.consolidate import previous_manifest
from logitstore.errors import LogitStoreError, ManifestMissingError, SchemaMismatchError
from logitstore.format import (CAUSAL_LM, FORMAT_VERSION, PARTS_DIR, RECORDS_DIR, SEGMENT_INDEX,
                               SignalSpec, StoreSettings, TokenizationSpec, tokenization_array)
from logitstore.fs import StoreFS, sha256_hex
from logitstore.parquet_io import table_from_bytes
from logitstore.records import (ADDITION_FORMAT, addition_path, head_path, read_head,
                                read_heads, segment_entry, walk_records)
from logitstore.sample import Sample, SignalData
from logitstore.segment import encode_signal, validate_sample
from logitstore.text_spans import TEXT_SAMPLE_BYTES
from logitstore.tokenized import SAMPLE_TOKENS, Tokenized, encode_tokenized, tokenized_problem
from logitstore.writer import write_tokenizer_files


@dataclass
class SegmentJob:
    part: str
    segment: str
    sample_ids: list[str]
    lengths: list[int]
    # 2.2, a signal on an extra tokenization: each sample's text bytes, and its tokens on
    # that tokenization when the store holds it already (None: this appender adds it)
    text_bytes: list[int] | None = None
    tokenized_lengths: list[int] | None = None


class SignalAppender:
    def __init__(self, url: str, name: str, spec: SignalSpec, *,
                 storage_options: dict | None = None, parts: list[str] | None = None,
                 commit_store: bool = True, tokenization: TokenizationSpec | None = None,
                 tokenizer_files: dict[str, bytes] | None = None):
        self.fs = StoreFS(url, storage_options)
        manifest = previous_manifest(self.fs)  # refuses a store of format 1.0/1.1
        if manifest is None:
            raise ManifestMissingError(f"{url} has no committed store to add signal {name!r} to")
        self.name, self.spec = name, spec
        self.commit_each_segment = commit_store
        heads = {part: head.doc for part, head in read_heads(self.fs).items()
                 if parts is None or part in parts}
        store = StoreSettings.from_json(manifest["settings"])
        require_kind(store, CAUSAL_LM, f"adding a per-token signal ({name!r})", url)
        self.new_tokenization = _new_tokenization(url, store, name, spec, tokenization)
        self.settings = replace(store, signals={**store.signals, name: spec},
                                tokenizations={**store.tokenizations, **(
                                    {spec.tokenization: tokenization}
                                    if self.new_tokenization else {})})
        self.settings.validate()
        if name in store.signals:
            raise SchemaMismatchError(f"signal {name!r} is already in {url}; choose another "
                                      f"--signal name or --overwrite the store")
        running = sorted(part for part, head in heads.items() if not head["complete"])
        if running:
            # A writer may still append segments to such a part: they would lack the signal,
            # and the part's head would be replaced under both writers.
            raise LogitStoreError(
                f"parts {running} of {url} are still being written (their head says "
                f"complete: false), so signal {name!r} cannot be added to them: let their "
                f"writers finish (or rerun the dump that wrote them to complete them), "
                f"then add the signal")
        for part, head in heads.items():
            earlier = StoreSettings.from_json(head["settings"]).signals.get(name)
            if earlier is not None and earlier != spec:
                raise SchemaMismatchError(f"part {part!r} already holds signal {name!r} "
                                          f"with other settings ({earlier}); rerun with the "
                                          f"same settings to resume")
        # {part: [(segment entry, holds the signal already)]}, in segment order
        self._segments = {part: self._committed_segments(part, head)
                          for part, head in sorted(heads.items())}
        if self.new_tokenization:  # before any record names its signal
            write_tokenizer_files(self.fs, self.settings, tokenizer_files or {})

    def _committed_segments(self, part: str, head: dict[str, Any]) -> list[list]:
        records = walk_records(self.fs, part, 0, None, head["segments"], head["last_record"])
        present = set(self.fs.listdir(f"{PARTS_DIR}/{part}/{RECORDS_DIR}"))
        out = []
        for record in records:
            entry = segment_entry(self.fs, part, record, [])
            done = self.name in entry["signals"] or \
                addition_path(part, entry["name"], self.name).rsplit("/", 1)[-1] in present
            out.append([entry, done])
        return out

    def pending(self) -> list[SegmentJob]:
        """Segments that still lack the signal, in store order."""
        jobs = []
        for part, segments in self._segments.items():
            for entry, done in segments:
                if done:
                    continue
                rel = f"{PARTS_DIR}/{part}/{entry['name']}/{SEGMENT_INDEX}"
                table = table_from_bytes(self.fs.read_bytes(rel), columns=["sample_id", "length"])
                job = SegmentJob(part, entry["name"], table.column("sample_id").to_pylist(),
                                 table.column("length").to_pylist())
                if self.spec.tokenization is not None:
                    self._read_tokenization_lengths(job)
                jobs.append(job)
        return jobs

    def _read_tokenization_lengths(self, job: SegmentJob) -> None:
        """A job's text bytes per sample and, for a tokenization the store holds, its
        tokens per sample (2.2)."""
        import zarr

        seg_dir = f"{PARTS_DIR}/{job.part}/{job.segment}"
        store = self.fs.zarr_store()

        def read(rel: str) -> list[int]:
            return zarr.open_array(store, path=f"{seg_dir}/{rel}", mode="r",
                                   zarr_format=3)[...].astype(int).tolist()

        job.text_bytes = read(TEXT_SAMPLE_BYTES)
        if not self.new_tokenization:
            job.tokenized_lengths = read(tokenization_array(self.spec.tokenization,
                                                            SAMPLE_TOKENS))

    def write(self, job: SegmentJob, data: list[SignalData],
              tokenized: list[Tokenized] | None = None) -> None:
        """Store the signal of one pending segment: one SignalData per sample and, when this
        appender adds the signal's tokenization, each sample as it cuts the text."""
        if len(data) != len(job.sample_ids):
            raise SchemaMismatchError(f"{job.part}/{job.segment}: {len(data)} signal entries for "
                                      f"{len(job.sample_ids)} samples")
        lengths = self._positions(job, tokenized)
        # Only the signal is checked: the segment's text and spans are already stored.
        only = replace(self.settings, signals={self.name: replace(self.spec, tokenization=None)},
                       text=False, tokenizations={},
                       vocab_size=self.settings.signal_vocab_size(self.name))
        for sid, length, d in zip(job.sample_ids, lengths, data):
            # Token ids are not needed to validate the signal's shapes: zeros stand in.
            validate_sample(Sample(sid, np.zeros(length, dtype=np.int64),
                                   np.zeros(length, dtype=bool), signals={self.name: d}), only)
        arrays = None
        if self.new_tokenization:
            arrays = encode_tokenized(tokenized, self.settings.tokenizations[
                self.spec.tokenization].token_dtype)
        files, entries = encode_signal(self.name, self.spec, data, self.settings, arrays)
        seg_dir = f"{PARTS_DIR}/{job.part}/{job.segment}"
        listed = {}
        for rel, blob in sorted(files.items()):
            self.fs.write_bytes(f"{seg_dir}/{rel}", blob)
            listed[f"{seg_dir}/{rel}"] = {"size": len(blob), "sha256": sha256_hex(blob)}
        slot = next(s for s in self._segments[job.part] if s[0]["name"] == job.segment)
        record = {"format": ADDITION_FORMAT, "format_version": FORMAT_VERSION,
                  "tool_version": __version__, "part": job.part, "segment": job.segment,
                  "signal": self.name, "record": slot[0]["record"], "files": listed,
                  "sampled_entries": {}, "sampled_multi": {}, "committed": now_iso()}
        if entries is not None:
            record["sampled_entries"][self.name], record["sampled_multi"][self.name] = entries
        self.fs.write_bytes(addition_path(job.part, job.segment, self.name), sealed_json(record))
        slot[1] = True
        self._finish_parts()
        if self.commit_each_segment:
            self._commit_if_consistent()

    def _positions(self, job: SegmentJob, tokenized: list[Tokenized] | None) -> list[int]:
        """Positions of each sample on the signal's axis; checks `tokenized` (given exactly
        when this appender adds the signal's tokenization) against the samples' text."""
        if not self.new_tokenization:
            if tokenized is not None:
                raise SchemaMismatchError(f"signal {self.name!r}: the store holds its "
                                          f"tokenization already; give no tokenized samples")
            return job.tokenized_lengths if self.spec.tokenization else job.lengths
        if tokenized is None or len(tokenized) != len(job.sample_ids):
            raise SchemaMismatchError(
                f"{job.part}/{job.segment}: signal {self.name!r} adds tokenization "
                f"{self.spec.tokenization!r}: expected each of the {len(job.sample_ids)} "
                f"samples as its tokenizer cut the text, found "
                f"{'none' if tokenized is None else len(tokenized)}")
        vocab = self.settings.tokenizations[self.spec.tokenization].vocab_size
        for sid, t, size in zip(job.sample_ids, tokenized, job.text_bytes):
            problem = tokenized_problem(t, vocab, size)
            if problem:
                raise SchemaMismatchError(f"sample {sid!r}: tokenization "
                                          f"{self.spec.tokenization!r}: {problem}")
        return [len(t) for t in tokenized]

    def _finish_parts(self) -> None:
        """Give the signal to the settings in the head of every part whose segments all
        hold it now (once per part)."""
        for part, segments in self._segments.items():
            if not all(done for _, done in segments):
                continue
            head = read_head(self.fs, part)
            settings = StoreSettings.from_json(head.doc["settings"])
            if self.name not in settings.signals:
                tokenization = self.spec.tokenization
                tokenizations = dict(settings.tokenizations)
                if tokenization is not None:
                    tokenizations[tokenization] = self.settings.tokenizations[tokenization]
                doc = {**head.doc, "updated": now_iso(), "settings": replace(
                    settings, signals={**settings.signals, self.name: self.spec},
                    tokenizations=tokenizations).to_json()}
                self.fs.write_bytes(head_path(part), sealed_json(doc))

    def _commit_if_consistent(self) -> None:
        # Commit once every part's head holds the signal (never per segment: a consolidation
        # costs O(store)), so readers never see a half-added signal.
        heads = read_heads(self.fs)
        if all(self.name in h.doc["settings"]["signals"] for h in heads.values()):
            commit_store(self.fs)

    def close(self) -> None:
        if any(not done for segments in self._segments.values() for _, done in segments):
            raise LogitStoreError(f"signal {self.name!r} is still missing from some segments; "
                                  f"rerun to finish adding it")
        self._finish_parts()
        if self.commit_each_segment:
            commit_store(self.fs)


def _new_tokenization(url: str, store: StoreSettings, name: str, spec: SignalSpec,
                      tokenization: TokenizationSpec | None) -> bool:
    """Whether adding signal `name` adds its tokenization to the store (2.2);
    LogitStoreError when it cannot be added or differs from the one stored."""
    if spec.tokenization is None:
        return False
    if not store.text:
        raise LogitStoreError(
            f"{url} keeps no sample text (written before format 2.1, or with teacher-dump "
            f"--no-text), so signal {name!r} cannot be added on tokenization "
            f"{spec.tokenization!r}: another tokenizer's tokens are cut from each sample's "
            f"stored text, expected a store whose settings say text: true. Dump the store "
            f"again with text (teacher-dump without --no-text), then add the signal")
    stored = store.tokenizations.get(spec.tokenization)
    if stored is not None:
        if tokenization is not None and tokenization != stored:
            raise SchemaMismatchError(
                f"{url} holds tokenization {spec.tokenization!r} with another tokenizer "
                f"({stored.tokenizer_name or '?'}, fingerprint {stored.tokenizer_fingerprint}) "
                f"than signal {name!r} gives ({tokenization.tokenizer_name or '?'}, fingerprint "
                f"{tokenization.tokenizer_fingerprint}); name the tokenization otherwise")
        return False
    if tokenization is None:
        raise SchemaMismatchError(f"signal {name!r} names tokenization {spec.tokenization!r}, "
                                  f"which {url} does not hold: give its TokenizationSpec")
    return True
