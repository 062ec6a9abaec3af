"""Streaming writer of one part of a store.

    with StoreWriter("s3://bucket/store", settings, part="rank00") as w:
        for sample in samples[w.committed_count:]:   # resume after the last committed sample
            w.add(sample)

Samples are buffered until a segment's worth of tokens is there, then the segment is
encoded and written (data files first), the part manifest is replaced atomically, and,
for a single writer, the store manifest is committed. A crash at any point leaves the
last committed state readable; reopening the same part resumes after it and deletes the
files of the segment that was being written.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

from logitstore import __version__
from logitstore.commit import (commit_store, load_json, now_iso, read_part_manifests,
                               sealed_json)
from logitstore.errors import LogitStoreError, SchemaMismatchError, SettingsMismatchError
from logitstore.format import (FORMAT_VERSION, MANIFEST, PART_MANIFEST, PARTS_DIR, SEGMENT_INDEX,
                               StoreSettings, segment_name, settings_differences)
from logitstore.fs import StoreFS, sha256_hex
from logitstore.parquet_io import table_from_bytes
from logitstore.sample import Sample
from logitstore.segment import encode_segment, validate_sample

log = logging.getLogger(__name__)


class StoreWriter:
    """Writes one part. Several writers (one per part) may write one store at the same time."""

    def __init__(self, url: str, settings: StoreSettings, *, part: str = "part-00000",
                 storage_options: dict | None = None, commit_store: bool = True,
                 overwrite: bool = False, extra: dict[str, Any] | None = None):
        settings.validate()
        if not part or "/" in part or part.startswith("."):
            raise LogitStoreError(f"part name {part!r} must be non-empty, without '/' and not "
                                  f"start with '.'")
        self.fs = StoreFS(url, storage_options)
        self.settings = settings
        self.part = part
        self.commit_each_segment = commit_store
        self.extra = extra
        self._prefix = f"{PARTS_DIR}/{part}"
        if overwrite:
            self._erase_store()
        self._check_store_settings()
        self._manifest = self._open_part()
        self._buffer: list[Sample] = []
        self._buffer_tokens = 0
        self._buffered_ids: set[str] = set()
        self._committed: set[str] | None = None
        self.closed = False

    # -- opening / resuming -------------------------------------------------------------

    def _erase_store(self) -> None:
        for rel in (MANIFEST, "index", PARTS_DIR):
            self.fs.delete(rel, recursive=True)

    def _check_store_settings(self) -> None:
        """Refuse to write into a store (or beside parts) created with other settings."""
        others = []
        if self.fs.exists(MANIFEST):
            store = load_json(self.fs, MANIFEST)  # also checks its version and seal
            others.append(("the store manifest", store["settings"]))
        others += [(f"part {p['part']!r}", p["settings"]) for p in read_part_manifests(self.fs)]
        for where, found in others:
            diffs = settings_differences(StoreSettings.from_json(found), self.settings)
            if diffs:
                raise SettingsMismatchError(
                    f"{self.fs.url} was created with different settings ({where}): "
                    + "; ".join(diffs) + ". Write to a new store, or pass overwrite=True "
                    "(teacher-dump --overwrite) to replace it")

    def _open_part(self) -> dict[str, Any]:
        rel = f"{self._prefix}/{PART_MANIFEST}"
        if self.fs.exists(rel):
            manifest = load_json(self.fs, rel)
            if manifest.get("complete"):
                if self.commit_each_segment:
                    # A crash inside close() can leave the store manifest one commit behind
                    # the complete part: bring it up to date (idempotent) before refusing.
                    commit_store(self.fs, extra=self.extra)
                raise LogitStoreError(
                    f"part {self.part!r} of {self.fs.url} is complete; it cannot be appended to. "
                    f"Write new samples to a new part name")
            log.info("resuming part %s after %d committed samples", self.part,
                     sum(s["samples"] for s in manifest["segments"]))
        else:
            manifest = {"format": "logitstore-part", "format_version": FORMAT_VERSION,
                        "tool_version": __version__, "part": self.part, "created": now_iso(),
                        "complete": False, "settings": self.settings.to_json(), "segments": []}
        self._clean_uncommitted(manifest)
        return manifest

    def _clean_uncommitted(self, manifest: dict[str, Any]) -> None:
        """Delete segment directories and temp files left by a crash (never read anyway)."""
        committed = {s["name"] for s in manifest["segments"]}
        for name in self.fs.listdir(self._prefix):
            if name == PART_MANIFEST:
                continue
            if name not in committed:
                log.info("removing uncommitted %s/%s", self._prefix, name)
                self.fs.delete(f"{self._prefix}/{name}", recursive=True)

    @property
    def committed_count(self) -> int:
        """Samples of this part already committed: a resumed writer continues after them."""
        return sum(s["samples"] for s in self._manifest["segments"])

    @property
    def committed_ids(self) -> set[str]:
        """Ids of this part's committed samples (read from its segment indexes once)."""
        if self._committed is None:
            self._committed = set()
            for seg in self._manifest["segments"]:
                rel = f"{self._prefix}/{seg['name']}/{SEGMENT_INDEX}"
                table = table_from_bytes(self.fs.read_bytes(rel), columns=["sample_id"])
                self._committed.update(table.column("sample_id").to_pylist())
        return self._committed

    # -- writing ------------------------------------------------------------------------

    def add(self, sample: Sample) -> None:
        if self.closed:
            raise LogitStoreError(f"writer for part {self.part!r} is closed")
        validate_sample(sample, self.settings)
        if sample.sample_id in self.committed_ids or sample.sample_id in self._buffered_ids:
            raise SchemaMismatchError(f"sample id {sample.sample_id!r} was already written to part "
                                      f"{self.part!r}; sample ids must be unique")
        self._buffered_ids.add(sample.sample_id)
        self._buffer.append(sample)
        self._buffer_tokens += len(sample.input_ids)
        if self._buffer_tokens >= self.settings.segment_tokens:
            self.flush()

    def add_many(self, samples: Iterable[Sample]) -> None:
        for sample in samples:
            self.add(sample)

    def flush(self) -> None:
        """Write the buffered samples as one segment and commit it."""
        if not self._buffer:
            return
        number = len(self._manifest["segments"])
        name = segment_name(number)
        seg_dir = f"{self._prefix}/{name}"
        encoded = encode_segment(self._buffer, self.settings)
        files = {}
        # Index last within the segment, so a present index implies the arrays were written.
        for rel in sorted(encoded.files, key=lambda r: r == SEGMENT_INDEX):
            data = encoded.files[rel]
            full_rel = f"{seg_dir}/{rel}"
            self.fs.write_bytes(full_rel, data)
            files[full_rel] = {"size": len(data), "sha256": sha256_hex(data)}
        self._manifest["segments"].append({
            "name": name, "samples": encoded.samples, "tokens": encoded.tokens,
            "target_tokens": encoded.target_tokens, "sampled_entries": encoded.sampled_entries,
            "sampled_multi": encoded.sampled_multi,
            "signals": sorted(self.settings.signals), "files": files,
        })
        self._write_part_manifest()
        self.committed_ids.update(self._buffered_ids)
        self._buffer, self._buffer_tokens, self._buffered_ids = [], 0, set()
        if self.commit_each_segment:
            commit_store(self.fs, extra=self.extra)

    def _write_part_manifest(self) -> None:
        self._manifest["updated"] = now_iso()
        self.fs.write_bytes(f"{self._prefix}/{PART_MANIFEST}", sealed_json(self._manifest))

    def close(self) -> None:
        """Flush, mark the part complete and (single writer) commit the store."""
        if self.closed:
            return
        self.flush()
        self._manifest["complete"] = True
        self._write_part_manifest()
        self.closed = True
        if self.commit_each_segment and self._manifest["segments"]:
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
