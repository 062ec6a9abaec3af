"""Manifests: sealed JSON, reading them, and `commit_store` (logitstore/consolidate.py).

Every manifest, head and record is written sealed: its `manifest_sha256` is the sha256 of
its own bytes with that value blanked (FORMAT.md section 5), and every read of one checks
it, so damage to any of its bytes is reported instead of being merged into the next
commit. `read_commit`, `committed_part_manifest` and the part manifests serve stores of
format 1.0 and 1.1, which this release reads and copies but does not write.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import re
from typing import Any

from logitstore.errors import ChecksumError, ManifestMissingError, StoreNotFoundError
from logitstore.format import MANIFEST, PART_MANIFEST, PARTS_DIR, check_format_version
from logitstore.fs import StoreFS, sha256_hex


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


SEAL_KEY = "manifest_sha256"  # in every manifest written by format 1.1 and later
_SEAL_BLANK = "0" * 64
_HEX64 = re.compile(r"[0-9a-f]{64}")


def require_committed(fs: StoreFS) -> None:
    """StoreNotFoundError or ManifestMissingError unless `fs` holds a committed store."""
    if fs.exists(MANIFEST):
        return
    if not fs.exists():
        raise StoreNotFoundError(f"no store at {fs.url}: the path does not exist")
    raise ManifestMissingError(
        f"{fs.url} is not a committed store: it has no {MANIFEST}. If a dump writes it, the "
        f"dump is still running or stopped before its first commit: wait for it, or rerun "
        f"the same teacher-dump command to resume it")


def load_json(fs: StoreFS, rel: str) -> dict[str, Any]:
    """The manifest (store or part) at `rel`, checked as `parse_manifest` does."""
    return parse_manifest(fs, rel, fs.read_bytes(rel))


def parse_manifest(fs: StoreFS, rel: str, raw: bytes) -> dict[str, Any]:
    """The manifest `raw`, read from `rel`: a JSON object of a known major format version
    whose seal matches its bytes. ChecksumError naming the file when it is damaged, else
    FormatVersionError for another major version.

    A sealed manifest's seal is checked before its version, so a flipped bit in
    `format_version` is reported as damage, not as another major version; an unsealed one
    is checked for its version first (only format 1.0 may lack a seal)."""
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ChecksumError(f"{fs.path(rel)} is not valid JSON ({err}); the file is damaged",
                            path=rel) from None
    if not isinstance(doc, dict):
        raise ChecksumError(f"{fs.path(rel)} holds a JSON {type(doc).__name__}, expected an "
                            f"object; the file is damaged", path=rel)
    if SEAL_KEY not in doc:
        check_format_version(doc.get("format_version"), fs.path(rel))
    problem = seal_problem(raw, doc)
    if problem:
        raise ChecksumError(f"{fs.path(rel)}: {problem}; the file is damaged", path=rel)
    check_format_version(doc.get("format_version"), fs.path(rel))
    return doc


def seal_problem(raw: bytes, doc: dict[str, Any]) -> str | None:
    """Why the manifest bytes `raw` (parsed: `doc`) fail their seal, or None when intact.

    Manifests of format 1.0 have no seal and pass; from 1.1 on the seal is required."""
    seal = doc.get(SEAL_KEY)
    if seal is None:
        version = str(doc.get("format_version"))
        return None if version == "1.0" else \
            f"no {SEAL_KEY} although format_version is {version} (1.1 and later have one)"
    if not isinstance(seal, str) or not _HEX64.fullmatch(seal):
        return f"{SEAL_KEY} is not 64 lowercase hex digits: {seal!r}"
    found = sha256_hex(raw.replace(seal.encode("ascii"), _SEAL_BLANK.encode("ascii")))
    if found != seal:
        return f"{SEAL_KEY} is {seal} but the content hashes to {found}"
    return None


def sealed_json(data: dict[str, Any]) -> bytes:
    """`data` as manifest bytes carrying their seal (any seal already in `data` replaced)."""
    body = {k: v for k, v in data.items() if k != SEAL_KEY}
    blank = dump_json({**body, SEAL_KEY: _SEAL_BLANK})
    sealed = dump_json({**body, SEAL_KEY: sha256_hex(blank)})
    assert len(sealed) == len(blank)  # the same layout: only the 64 digits differ
    return sealed


def read_commit(fs: StoreFS, attempts: int = 100) -> tuple[bytes, dict[str, Any], bytes]:
    """(manifest bytes, manifest, index bytes) of one commit, also beside a running writer:
    a commit landing between the two reads replaces the manifest, then deletes the index
    the old one named; the newer manifest is read then. FileNotFoundError only when the
    index of the current manifest is missing."""
    for attempt in range(attempts):
        raw = fs.read_bytes(MANIFEST)
        manifest = parse_manifest(fs, MANIFEST, raw)
        try:
            return raw, manifest, fs.read_bytes(manifest["index"]["path"])
        except FileNotFoundError:
            if attempt == attempts - 1 or load_json(fs, MANIFEST)["index"] == manifest["index"]:
                raise
    raise AssertionError("unreachable")


def dump_json(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, indent=1, sort_keys=True) + "\n").encode("utf-8")


def part_manifest_path(part: str) -> str:
    return f"{PARTS_DIR}/{part}/{PART_MANIFEST}"


def read_part_manifests(fs: StoreFS) -> list[dict[str, Any]]:
    """Every part that has committed at least once, in part-name order, as a 1.1 part
    manifest: `part`, `complete`, `settings` and `segments` (each with its counts and
    files). Format 2.0 parts are read from their head and records (O(part) reads)."""
    from logitstore.records import read_heads, segment_entry, walk_records

    out = []
    for name, head in read_heads(fs).items():
        doc = head.doc
        signals = list(doc["settings"]["signals"])
        records = walk_records(fs, name, 0, None, doc["segments"], doc["last_record"])
        out.append({"part": name, "complete": doc["complete"], "settings": doc["settings"],
                    "segments": [segment_entry(fs, name, r, signals) for r in records]})
    return out or [part for part, _ in _read_parts(fs)]


def _read_parts(fs: StoreFS) -> list[tuple[dict[str, Any], bytes]]:
    """(part manifest, its bytes) of every part that has committed, in part-name order."""
    out = []
    for name in fs.listdir(PARTS_DIR):
        rel = part_manifest_path(name)
        try:
            raw = fs.read_bytes(rel)
        except FileNotFoundError:
            continue  # a part directory whose writer has not committed a segment yet
        out.append((parse_manifest(fs, rel, raw), raw))
    return out


def committed_part_manifest(manifest: dict[str, Any], doc: dict[str, Any]) -> dict[str, Any]:
    """The part manifest `doc` cut back to the state of its part that the store manifest
    `manifest` committed: the committed segments with their committed files, the committed
    `complete` flag and settings (a running writer may since have added segments, or a
    signal to every segment). Unsealed; `sealed_json` seals it."""
    part = next(p for p in manifest["parts"] if p["name"] == doc["part"])
    segments = []
    for seg in part["segments"]:  # the store manifest keeps every key of a segment but files
        prefix = f"{PARTS_DIR}/{part['name']}/{seg['name']}/"
        segments.append({**seg, "files": {rel: meta for rel, meta in manifest["files"].items()
                                          if rel.startswith(prefix)}})
    return {**doc, "complete": part["complete"], "settings": manifest["settings"],
            "segments": segments}


def dataset_fingerprint(sample_ids: list[str], digests: list[str]) -> str:
    """Order-independent: sha256 over (id, digest) lines sorted by sample id."""
    h = hashlib.sha256()
    for sid, digest in sorted(zip(sample_ids, digests)):
        h.update(f"{sid}\0{digest}\n".encode("utf-8"))
    return h.hexdigest()


def commit_store(url: str | StoreFS, *, storage_options: dict | None = None,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Consolidate every part into the store manifest (logitstore/consolidate.py); returns
    the committed state in the shape of a 1.1 store manifest (logitstore/snapshot.py).

    One process commits at a time (the single writer, or the main rank after the others
    have closed their parts).
    """
    from logitstore.consolidate import commit_store as consolidate  # (it imports this module)

    return consolidate(url, storage_options=storage_options, extra=extra)
