"""Add a new teacher signal to a committed store, over the same tokens.

    appender = SignalAppender("store/", "qwen2-1.5b", spec)
    for job in appender.pending():           # segments that do not have the signal yet
        data = [...]                         # one SignalData per sample of job.sample_ids
        appender.write(job, data)
    appender.close()

The new arrays are new files inside existing segment directories (nothing already there is
rewritten). A segment lists the signal once its files are written and its part manifest
is replaced; the store manifest shows the signal only when every segment of every part
has it, so readers never see a half-added signal. Killed and rerun, it resumes with the
segments still pending.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from logitstore.commit import (commit_store, load_json, now_iso, read_part_manifests,
                               sealed_json)
from logitstore.errors import LogitStoreError, ManifestMissingError, SchemaMismatchError
from logitstore.format import (MANIFEST, PART_MANIFEST, PARTS_DIR, SEGMENT_INDEX, SignalSpec,
                               StoreSettings)
from logitstore.fs import StoreFS, sha256_hex
from logitstore.parquet_io import table_from_bytes
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
        if not self.fs.exists(MANIFEST):
            raise ManifestMissingError(f"{url} has no committed store to add signal {name!r} to")
        self.name, self.spec = name, spec
        self.commit_each_segment = commit_store
        self._parts = {p["part"]: p for p in read_part_manifests(self.fs)
                       if parts is None or p["part"] in parts}
        store = StoreSettings.from_json(load_json(self.fs, MANIFEST)["settings"])
        self.settings = replace(store, signals={**store.signals, name: spec})
        self.settings.validate()
        if name in store.signals:
            raise SchemaMismatchError(f"signal {name!r} is already in {url}; choose another "
                                      f"--signal name or --overwrite the store")
        for part in self._parts.values():
            earlier = StoreSettings.from_json(part["settings"]).signals.get(name)
            if earlier is not None and earlier != spec:
                raise SchemaMismatchError(f"part {part['part']!r} already holds signal {name!r} "
                                          f"with other settings ({earlier}); rerun with the "
                                          f"same settings to resume")

    def pending(self) -> list[SegmentJob]:
        """Segments that still lack the signal, in store order."""
        jobs = []
        for part_name in sorted(self._parts):
            for seg in self._parts[part_name]["segments"]:
                if self.name in seg.get("signals", []):
                    continue
                rel = f"{PARTS_DIR}/{part_name}/{seg['name']}/{SEGMENT_INDEX}"
                table = table_from_bytes(self.fs.read_bytes(rel), columns=["sample_id", "length"])
                jobs.append(SegmentJob(part_name, seg["name"],
                                       table.column("sample_id").to_pylist(),
                                       table.column("length").to_pylist()))
        return jobs

    def write(self, job: SegmentJob, data: list[SignalData]) -> None:
        if len(data) != len(job.sample_ids):
            raise SchemaMismatchError(f"{job.part}/{job.segment}: {len(data)} signal entries for "
                                      f"{len(job.sample_ids)} samples")
        only = replace(self.settings, signals={self.name: self.spec})
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
        part = self._parts[job.part]
        seg = next(s for s in part["segments"] if s["name"] == job.segment)
        seg["files"].update(listed)
        seg["signals"] = sorted(set(seg.get("signals", [])) | {self.name})
        if entries is not None:
            seg.setdefault("sampled_entries", {})[self.name] = entries[0]
            seg.setdefault("sampled_multi", {})[self.name] = entries[1]
        if all(self.name in s["signals"] for s in part["segments"]):
            # The part's settings gain the signal only when all its segments hold it.
            settings = StoreSettings.from_json(part["settings"])
            part["settings"] = replace(settings, signals={**settings.signals,
                                                          self.name: self.spec}).to_json()
        part["updated"] = now_iso()
        self.fs.write_bytes(f"{PARTS_DIR}/{job.part}/{PART_MANIFEST}", sealed_json(part))
        if self.commit_each_segment:
            self._commit_if_consistent()

    def _commit_if_consistent(self) -> None:
        # Parts that already gained the signal and parts still without it disagree on
        # settings; commit only when all agree, so readers never see a half-added signal.
        parts = read_part_manifests(self.fs)
        if len({str(StoreSettings.from_json(p["settings"]).signals.keys()) for p in parts}) == 1:
            commit_store(self.fs)

    def close(self) -> None:
        if any(self.name not in s.get("signals", []) for p in self._parts.values()
               for s in p["segments"]):
            raise LogitStoreError(f"signal {self.name!r} is still missing from some segments; "
                                  f"rerun to finish adding it")
        if self.commit_each_segment:
            commit_store(self.fs)
