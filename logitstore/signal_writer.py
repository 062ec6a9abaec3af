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
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from logitstore import __version__
from logitstore.commit import commit_store, now_iso, sealed_json
from logitstore.consolidate import previous_manifest
from logitstore.errors import LogitStoreError, ManifestMissingError, SchemaMismatchError
from logitstore.format import (FORMAT_VERSION, PARTS_DIR, RECORDS_DIR, SEGMENT_INDEX,
                               SignalSpec, StoreSettings)
from logitstore.fs import StoreFS, sha256_hex
from logitstore.parquet_io import table_from_bytes
from logitstore.records import (ADDITION_FORMAT, addition_path, head_path, read_head,
                                read_heads, segment_entry, walk_records)
from logitstore.sample import Sample, SignalData
from logitstore.segment import encode_signal, validate_sample


@dataclass
class SegmentJob:
    part: str
    segment: str
    sample_ids: list[str]
    lengths: list[int]


class SignalAppender:
    def __init__(self, url: str, name: str, spec: SignalSpec, *,
                 storage_options: dict | None = None, parts: list[str] | None = None,
                 commit_store: bool = True):
        self.fs = StoreFS(url, storage_options)
        manifest = previous_manifest(self.fs)  # refuses a store of format 1.0/1.1
        if manifest is None:
            raise ManifestMissingError(f"{url} has no committed store to add signal {name!r} to")
        self.name, self.spec = name, spec
        self.commit_each_segment = commit_store
        heads = {part: head.doc for part, head in read_heads(self.fs).items()
                 if parts is None or part in parts}
        store = StoreSettings.from_json(manifest["settings"])
        self.settings = replace(store, signals={**store.signals, name: spec})
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
                jobs.append(SegmentJob(part, entry["name"], table.column("sample_id").to_pylist(),
                                       table.column("length").to_pylist()))
        return jobs

    def write(self, job: SegmentJob, data: list[SignalData]) -> None:
        if len(data) != len(job.sample_ids):
            raise SchemaMismatchError(f"{job.part}/{job.segment}: {len(data)} signal entries for "
                                      f"{len(job.sample_ids)} samples")
        # Only the signal is checked: the segment's text and spans are already stored.
        only = replace(self.settings, signals={self.name: self.spec}, text=False)
        for sid, length, d in zip(job.sample_ids, job.lengths, data):
            # Token ids are not needed to validate the signal's shapes: zeros stand in.
            validate_sample(Sample(sid, np.zeros(length, dtype=np.int64),
                                   np.zeros(length, dtype=bool), signals={self.name: d}), only)
        files, entries = encode_signal(self.name, self.spec, data, self.settings)
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

    def _finish_parts(self) -> None:
        """Give the signal to the settings in the head of every part whose segments all
        hold it now (once per part)."""
        for part, segments in self._segments.items():
            if not all(done for _, done in segments):
                continue
            head = read_head(self.fs, part)
            settings = StoreSettings.from_json(head.doc["settings"])
            if self.name not in settings.signals:
                doc = {**head.doc, "updated": now_iso(), "settings": replace(
                    settings, signals={**settings.signals, self.name: self.spec}).to_json()}
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
