"""Streaming writer of one part of a store.

    with StoreWriter("s3://bucket/store", settings, part="rank00") as w:
        for sample in samples[w.committed_count:]:   # resume after the last committed sample
            w.add(sample)

Samples are buffered until a segment's worth of tokens is there, then the segment is
encoded and written (data files first), then its record, then the part's head is
replaced atomically: that commits the segment (logitstore/records.py). Committing a
segment writes the segment, one record and one head whatever the size of the store.
A writer that commits the store itself (`commit_store=True`, a single writer) also
registers its part in the store manifest once, at its first segment, so readers follow the
part's head, and consolidates the store when it closes (logitstore/consolidate.py). A
crash at any point leaves the last committed state readable; reopening the same part
resumes after it and deletes the files of the segment that was being written.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Iterable

from logitstore.classifier_sample import encode_classifier_segment, validate_classifier_sample
from logitstore.commit import commit_store, now_iso, part_manifest_path, sealed_json
from logitstore.consolidate import previous_manifest, register_part
from logitstore.errors import (LogitStoreError, SchemaMismatchError, SettingsMismatchError,
                               StoreKindError)
from logitstore.format import (CLASSIFIER, FORMAT_VERSION, MANIFEST, PART_HEAD, PARTS_DIR,
                               RECORDS_DIR, SEGMENT_INDEX, TOKENIZER_DIR, StoreSettings,
                               segment_name, settings_differences, written_version)
from logitstore.fs import StoreFS, sha256_hex
from logitstore.parquet_io import table_from_bytes
from logitstore.records import (head_after, head_path, new_head, new_record, read_head,
                                read_heads, record_path, seal)
from logitstore.sample import Sample
from logitstore.segment import encode_segment, validate_sample



def _validate_token_sample(sample, settings: StoreSettings) -> None:
    if not isinstance(sample, Sample):
        raise StoreKindError(f"this store is a causal-lm store: it takes tokenised samples "
                             f"(logitstore.sample.Sample), found {type(sample).__name__}; a "
                             f"ClassifierSample belongs in a store of kind classifier")
    validate_sample(sample, settings)


# per kind of store (2.3): the check of a sample, the encoder of a segment, and the size of
# a sample towards the segment's target (a classifier segment counts samples, not tokens)
_CLASSIFIER_CODEC = (validate_classifier_sample, encode_classifier_segment, lambda s: 1)
_CAUSAL_LM_CODEC = (_validate_token_sample, encode_segment, lambda s: len(s.input_ids))

log = logging.getLogger(__name__)
_SEGMENT = re.compile(r"seg-(\d{6,})")


def segment_number(name: str) -> int | None:
    """The number of a segment directory or record name (`seg-000012`, `seg-000012.json`,
    `seg-000012+signal.json`), None for any other name."""
    match = _SEGMENT.match(name)
    if match is None or name[match.end():] not in ("", ".json") and \
            not name[match.end():].startswith("+"):
        return None
    return int(match.group(1))


def tokenizer_file_entries(files: dict[str, bytes],
                           folder: str = TOKENIZER_DIR) -> dict[str, dict[str, Any]]:
    """{"<folder>/<name>": {"size", "sha256"}} of a tokenizer's files given by name: the
    `tokenizer_files` of the settings of a store that keeps them (folder `tokenizer`), or
    of an extra tokenization (2.2: `tokenizer/<tokenization>`)."""
    return {f"{folder}/{name}": {"size": len(data), "sha256": sha256_hex(data)}
            for name, data in sorted(files.items())}


def write_tokenizer_files(fs: StoreFS, settings: StoreSettings, files: dict[str, bytes]) -> None:
    """Store the tokenizer files the settings list (ROOT/tokenizer/<name>), before any
    segment commits: `files` maps each listed path to its bytes. A file already there with
    the listed bytes (another part's writer, a resumed one) is kept; LogitStoreError when
    a listed file is neither given nor there, or the bytes given are not the listed ones."""
    for rel, meta in sorted(settings.all_tokenizer_files().items()):
        data = files.get(rel)
        if data is None:
            if fs.exists(rel):
                continue  # its bytes are checked by verify, like every file of the store
            raise LogitStoreError(
                f"the store settings list the tokenizer file {rel} but it is neither in "
                f"{fs.url} nor given to the writer; pass the tokenizer's files "
                f"(tokenizer_files=...), or settings without tokenizer_files")
        if len(data) != meta["size"] or sha256_hex(data) != meta["sha256"]:
            raise LogitStoreError(
                f"the bytes given for the tokenizer file {rel} ({len(data)} bytes, sha256 "
                f"{sha256_hex(data)}) are not the ones the settings list ({meta['size']} "
                f"bytes, sha256 {meta['sha256']}); build the settings from the same files "
                f"(tokenizer_file_entries)")
        if fs.read_bytes_if_present(rel) != data:
            fs.write_bytes(rel, data)


class StoreWriter:
    """Writes one part. Several writers (one per part) may write one store at the same time.
    A classifier store's writer (settings kind `classifier`, 2.3) takes ClassifierSample
    (logitstore/classifier_sample.py) and closes a segment every `segment_samples`."""

    def __init__(self, url: str, settings: StoreSettings, *, part: str = "part-00000",
                 storage_options: dict | None = None, commit_store: bool = True,
                 overwrite: bool = False, extra: dict[str, Any] | None = None,
                 tokenizer_files: dict[str, bytes] | None = None):
        settings.validate()
        if not part or "/" in part or part.startswith("."):
            raise LogitStoreError(f"part name {part!r} must be non-empty, without '/' and not "
                                  f"start with '.'")
        self.fs = StoreFS(url, storage_options)
        self.settings = settings
        self._validate, self._encode, self._size = \
            _CLASSIFIER_CODEC if settings.kind == CLASSIFIER else _CAUSAL_LM_CODEC
        self._segment_size = settings.segment_samples if settings.kind == CLASSIFIER else \
            settings.segment_tokens
        self.part = part
        self.commit_each_segment = commit_store
        self.extra = extra
        self._prefix = f"{PARTS_DIR}/{part}"
        if overwrite:
            self._erase_store()
        store = self._check_store_settings()
        write_tokenizer_files(self.fs, settings, tokenizer_files or {})
        self._registered = any(p["name"] == part and p.get("follow_head")
                               for p in (store or {}).get("parts", []))
        self._head = self._open_part()
        self._buffer: list[Sample] = []
        self._buffer_tokens = 0
        self._buffered_ids: set[str] = set()
        self._committed: set[str] | None = None
        self.closed = False

    # -- opening / resuming -------------------------------------------------------------

    def _erase_store(self) -> None:
        for rel in (MANIFEST, "index", PARTS_DIR, TOKENIZER_DIR):
            self.fs.delete(rel, recursive=True)

    def _check_store_settings(self) -> dict[str, Any] | None:
        """Refuse to write into a store (or beside parts) created with other settings, or
        into a store of format 1.0/1.1; returns the store manifest (None: none yet)."""
        store = previous_manifest(self.fs)  # also checks its version and seal
        others = [("the store manifest", store["settings"])] if store else []
        others += [(f"part {name!r}", head.doc["settings"])
                   for name, head in read_heads(self.fs).items()]
        for where, found in others:
            diffs = settings_differences(StoreSettings.from_json(found), self.settings)
            if diffs:
                raise SettingsMismatchError(
                    f"{self.fs.url} was created with different settings ({where}): "
                    + "; ".join(diffs) + ". Write to a new store, or pass overwrite=True "
                    "(teacher-dump --overwrite) to replace it")
        return store

    def _open_part(self) -> dict[str, Any]:
        """The part's head (a new one when the part has committed nothing)."""
        head = read_head(self.fs, self.part)
        if head is None:
            if self.fs.exists(part_manifest_path(self.part)):
                raise LogitStoreError(
                    f"part {self.part!r} of {self.fs.url} was written in format 1.0 or 1.1 "
                    f"({part_manifest_path(self.part)}); this release writes format "
                    f"{FORMAT_VERSION} only: resume it with the release that wrote it")
            doc = new_head(self.part, self.settings.to_json())
        else:
            doc = head.doc
            if doc.get("complete"):
                if self.commit_each_segment:
                    # A crash inside close() can leave the store manifest behind the
                    # complete part: consolidate (idempotent) before refusing.
                    commit_store(self.fs, extra=self.extra)
                raise LogitStoreError(
                    f"part {self.part!r} of {self.fs.url} is complete; it cannot be appended to. "
                    f"Write new samples to a new part name")
            log.info("resuming part %s after %d committed samples", self.part, doc["samples"])
        self._clean_uncommitted(doc["segments"])
        return doc

    def _clean_uncommitted(self, committed: int) -> None:
        """Delete segment directories, records and temp files left by a crash past the
        `committed` segments of the head (never read anyway)."""
        for base, keep in ((self._prefix, (PART_HEAD, RECORDS_DIR)),
                           (f"{self._prefix}/{RECORDS_DIR}", ())):
            for name in self.fs.listdir(base):
                number = segment_number(name)
                if name in keep or (number is not None and number < committed):
                    continue
                log.info("removing uncommitted %s/%s", base, name)
                self.fs.delete(f"{base}/{name}", recursive=True)

    @property
    def committed_count(self) -> int:
        """Samples of this part already committed: a resumed writer continues after them."""
        return self._head["samples"]

    @property
    def committed_ids(self) -> set[str]:
        """Ids of this part's committed samples (read from its segment indexes once)."""
        if self._committed is None:
            self._committed = set()
            for number in range(self._head["segments"]):
                rel = f"{self._prefix}/{segment_name(number)}/{SEGMENT_INDEX}"
                table = table_from_bytes(self.fs.read_bytes(rel), columns=["sample_id"])
                self._committed.update(table.column("sample_id").to_pylist())
        return self._committed

    # -- writing ------------------------------------------------------------------------

    def add(self, sample: Sample) -> None:
        if self.closed:
            raise LogitStoreError(f"writer for part {self.part!r} is closed")
        self._validate(sample, self.settings)
        if sample.sample_id in self.committed_ids or sample.sample_id in self._buffered_ids:
            raise SchemaMismatchError(f"sample id {sample.sample_id!r} was already written to part "
                                      f"{self.part!r}; sample ids must be unique")
        self._buffered_ids.add(sample.sample_id)
        self._buffer.append(sample)
        self._buffer_tokens += self._size(sample)
        if self._buffer_tokens >= self._segment_size:
            self.flush()

    def add_many(self, samples: Iterable[Sample]) -> None:
        for sample in samples:
            self.add(sample)

    def flush(self) -> None:
        """Write the buffered samples as one segment and commit it."""
        if not self._buffer:
            return
        number = self._head["segments"]
        name = segment_name(number)
        seg_dir = f"{self._prefix}/{name}"
        encoded = self._encode(self._buffer, self.settings)
        files = {}
        # Index last within the segment, so a present index implies the arrays were written.
        for rel in sorted(encoded.files, key=lambda r: r == SEGMENT_INDEX):
            data = encoded.files[rel]
            full_rel = f"{seg_dir}/{rel}"
            self.fs.write_bytes(full_rel, data)
            files[full_rel] = {"size": len(data), "sha256": sha256_hex(data)}
        counts = {"samples": encoded.samples, "tokens": encoded.tokens,
                  "target_tokens": encoded.target_tokens,
                  "sampled_entries": encoded.sampled_entries,
                  "sampled_multi": encoded.sampled_multi, "signals": sorted(self.settings.signals)}
        record = new_record(self.part, number, counts, files, self._head["last_record"],
                            written_version(self.settings.kind))
        raw, sha = seal(record)
        self.fs.write_bytes(record_path(self.part, name), raw)
        self._write_head(head_after(self._head, record, sha))  # the commit
        self.committed_ids.update(self._buffered_ids)
        self._buffer, self._buffer_tokens, self._buffered_ids = [], 0, set()
        if self.commit_each_segment and not self._registered:
            register_part(self.fs, self.part, self.settings, self.extra)
            self._registered = True

    def _write_head(self, head: dict[str, Any]) -> None:
        self.fs.write_bytes(head_path(self.part), sealed_json(head))
        self._head = head

    def close(self) -> None:
        """Flush, mark the part complete and (single writer) consolidate the store."""
        if self.closed:
            return
        self.flush()
        self._write_head({**self._head, "complete": True, "updated": now_iso()})
        self.closed = True
        if self.commit_each_segment and self._head["segments"]:
            commit_store(self.fs, extra=self.extra)

    def abort(self) -> None:
        """Drop buffered samples; the committed state stays as it is."""
        self._buffer, self._buffer_tokens, self._buffered_ids = [], 0, set()
        self.closed = True

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
