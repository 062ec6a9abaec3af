"""Verify the records, heads and consolidated state of a store of format 2.0.

`verify_store` (logitstore/verify.py) checks every data file of the committed state and
its structure; this module checks the rest: each consolidated segment's record (and the
addition records of signals added later) against the sha256 the catalog records and as
one hash chain per part, the store manifest's counts and dataset fingerprint against the
consolidated state, and each listed part's head (sealed, not behind the committed state).
A part whose head moved past the store manifest (a writer running, or one that crashed,
after the last consolidation) must still chain its newer records to the committed ones,
and every file those records list must exist.
"""

from __future__ import annotations

import json
from typing import Any

from logitstore.commit import dataset_fingerprint
from logitstore.errors import ChecksumError
from logitstore.fs import StoreFS, sha256_hex
from logitstore.parquet_io import table_from_bytes
from logitstore.records import (Sealed, addition_path, head_path, read_sealed, record_path,
                                walk_records)
from logitstore.snapshot import Snapshot


def check_records(fs: StoreFS, snap: Snapshot) -> list[str]:
    """Problems (each naming its file) with the records, heads and counts of `snap`."""
    catalog = json.loads(snap.catalog_raw)["parts"] if snap.catalog_raw else {}
    problems = _consolidated_counts(fs, snap, catalog)
    for entry in snap.root["parts"]:
        segments = catalog.get(entry["name"], [])
        problems += _consolidated_records(fs, entry, segments)
        problems += _head_problems(fs, snap, entry)
    return problems


def _consolidated_records(fs: StoreFS, entry: dict[str, Any],
                          segments: list[dict[str, Any]]) -> list[str]:
    """Each record (and addition record) of the consolidated segments of one part: present,
    the bytes the catalog recorded, naming the record before it."""
    problems, previous = [], None
    part = entry["name"]
    for seg in segments:
        rel = record_path(part, seg["name"])
        raw = fs.read_bytes_if_present(rel)
        if raw is None:
            problems.append(f"{fs.path(rel)}: missing (the record of a committed segment)")
        elif sha256_hex(raw) != seg["record"]:
            problems.append(f"{fs.path(rel)}: sha256 {sha256_hex(raw)}, the catalog records "
                            f"{seg['record']} (damaged)")
        elif json.loads(raw).get("previous") != previous:
            problems.append(f"{fs.path(rel)}: names {json.loads(raw).get('previous')} as the "
                            f"previous record, expected {previous} (the hash chain is broken)")
        previous = seg["record"]
        for signal, sha in sorted(seg.get("additions", {}).items()):
            added = addition_path(part, seg["name"], signal)
            raw = fs.read_bytes_if_present(added)
            if raw is None or sha256_hex(raw) != sha:
                state = "missing" if raw is None else f"sha256 {sha256_hex(raw)}, expected {sha}"
                problems.append(f"{fs.path(added)}: {state} (the record of a signal added to a "
                                f"committed segment)")
    if entry["last_record"] != previous:
        problems.append(f"{fs.path(record_path(part, segments[-1]['name']) if segments else '')}"
                        f": the store manifest names {entry['last_record']} as the last "
                        f"consolidated record of part {part!r}, the catalog {previous}")
    return problems


def _head_problems(fs: StoreFS, snap: Snapshot, entry: dict[str, Any]) -> list[str]:
    """The head of a listed part: sealed, at or past the committed state, complete when
    that is; records past the committed state chained to it, their files present."""
    part = entry["name"]
    try:
        head = snap.heads.get(part) or read_sealed(fs, head_path(part), f"the head of part "
                                                                        f"{part!r}")
    except ChecksumError as err:  # MissingFileError included: names the file
        return [str(err)]
    doc = head.doc
    if doc.get("part") != part or not isinstance(doc.get("segments"), int) or \
            doc["segments"] < entry["segments"]:
        return [f"{fs.path(head.rel)}: names part {doc.get('part')!r} with "
                f"{doc.get('segments')} segments; {entry['segments']} are consolidated"]
    if entry["complete"] and not doc.get("complete"):
        return [f"{fs.path(head.rel)}: says the part is not complete; the store manifest "
                f"says it is"]
    if part in snap.heads:
        return []  # followed: the snapshot walked its newer records, their files are checked
    return _past_the_commit(fs, entry, head)


def _past_the_commit(fs: StoreFS, entry: dict[str, Any], head: Sealed) -> list[str]:
    """Records a writer committed to its part after the last consolidation: chained to the
    consolidated ones, and their files present (a copy without them could not be resumed
    or consolidated). Their bytes are checked once a consolidation lists them."""
    try:
        records = walk_records(fs, entry["name"], entry["segments"], entry["last_record"],
                               head.doc["segments"], head.doc["last_record"])
    except ChecksumError as err:
        return [str(err)]
    for record in records:
        for listed in sorted(record.doc.get("files") or {}):
            if not fs.exists(listed):
                return [f"{fs.path(record.rel)}: lists {listed}, which is missing (resuming or "
                        f"committing this part would fail)"]
    return []


def _consolidated_counts(fs: StoreFS, snap: Snapshot, catalog: dict[str, list]) -> list[str]:
    """The store manifest's counts and fingerprint against the consolidated state."""
    root = snap.root
    segments = [s for entry in root["parts"] for s in catalog.get(entry["name"], [])]
    entries: dict[str, int] = {}
    for seg in segments:
        for sig, n in seg.get("sampled_entries", {}).items():
            entries[sig] = entries.get(sig, 0) + n
    expected = {"samples": sum(s["samples"] for s in segments),
                "tokens": sum(s["tokens"] for s in segments),
                "target_tokens": sum(s["target_tokens"] for s in segments),
                "parts": len(root["parts"]), "segments": len(segments),
                "sampled_entries": entries}
    problems = [f"{fs.path('manifest.json')}: counts {key} {root['counts'].get(key)!r}, the "
                f"consolidated state holds {value!r}" for key, value in expected.items()
                if root["counts"].get(key) != value]
    if snap.index_raw is not None:
        index = table_from_bytes(snap.index_raw, columns=["sample_id", "digest"])
        ids = index.column("sample_id").to_pylist()
        found = dataset_fingerprint(ids, index.column("digest").to_pylist())
    else:
        found = dataset_fingerprint([], [])
    if found != root["dataset_fingerprint"]:
        problems.append(f"{fs.path('manifest.json')}: dataset fingerprint does not match the "
                        f"consolidated index")
    return problems
