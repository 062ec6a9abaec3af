"""Commit: merge the committed state of every part into the store manifest + sample index.

Order (crash safety): segment files are already on storage and listed in part manifests;
here the merged index is written under a content-addressed name, then the store manifest
is replaced atomically. A crash before the rename leaves the previous manifest, whose
index file is untouched, so the last committed state stays readable.

Every manifest (the store's and each part's) is written sealed: its `manifest_sha256` is
the sha256 of its own bytes with that value blanked (FORMAT.md section 5), and every read
of a manifest checks it, so damage to any of its bytes is reported instead of being
merged into the next commit. The store manifest also lists the size and sha256 of each
part manifest it was merged from.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import re
from typing import Any

import pyarrow as pa

from logitstore import __version__
from logitstore.errors import (ChecksumError, LogitStoreError, ManifestMissingError,
                               SchemaMismatchError, StoreNotFoundError)
from logitstore.format import (FORMAT_NAME, FORMAT_VERSION, INDEX_DIR, MANIFEST, PART_MANIFEST,
                               PARTS_DIR, SEGMENT_INDEX, StoreSettings, check_format_version,
                               settings_differences)
from logitstore.fs import StoreFS, sha256_hex
from logitstore.parquet_io import table_from_bytes, table_to_bytes


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
    """Every part that has committed at least once, in part-name order."""
    return [part for part, _ in _read_parts(fs)]


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
    """List every committed part in the store manifest; returns the new manifest.

    One process commits at a time (the single writer, or the main rank after the others
    have closed their parts).
    """
    fs = url if isinstance(url, StoreFS) else StoreFS(url, storage_options)
    parts_read = _read_parts(fs)
    parts = [part for part, _ in parts_read]
    if not parts:
        raise ManifestMissingError(f"nothing to commit at {fs.url}: no part has committed a "
                                   f"segment yet (expected {PARTS_DIR}/<part>/{PART_MANIFEST})")
    settings = StoreSettings.from_json(parts[0]["settings"])
    for part in parts[1:]:
        diffs = settings_differences(settings, StoreSettings.from_json(part["settings"]))
        if diffs:
            raise SchemaMismatchError(f"parts {parts[0]['part']!r} and {part['part']!r} of "
                                      f"{fs.url} were written with different settings: "
                                      + "; ".join(diffs))
    previous = load_json(fs, MANIFEST) if fs.exists(MANIFEST) else None
    index = _merged_index(fs, parts, previous)
    ids = index.column("sample_id").to_pylist()
    if len(set(ids)) != len(ids):
        seen, dups = set(), []
        for sid in ids:
            if sid in seen:
                dups.append(sid)
            seen.add(sid)
        raise SchemaMismatchError(f"sample ids appear in more than one place in {fs.url}: "
                                  f"{dups[:5]} ({len(dups)} in all); each part must hold "
                                  f"different samples")
    index_bytes = table_to_bytes(index)
    index_sha = sha256_hex(index_bytes)
    index_rel = f"{INDEX_DIR}/{index_sha[:20]}.parquet"
    if not fs.exists(index_rel):
        fs.write_bytes(index_rel, index_bytes)

    files: dict[str, dict[str, Any]] = {}
    for part in parts:
        for seg in part["segments"]:
            files.update(seg["files"])
    target = sum(seg["target_tokens"] for p in parts for seg in p["segments"])
    entries: dict[str, int] = {}
    for part in parts:
        for seg in part["segments"]:
            for sig, n in seg.get("sampled_entries", {}).items():
                entries[sig] = entries.get(sig, 0) + n
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "tool_version": __version__,
        "created": previous["created"] if previous else now_iso(),
        "committed": now_iso(),
        "settings": settings.to_json(),
        "counts": {"samples": len(ids), "tokens": int(sum(index.column("length").to_pylist())),
                   "target_tokens": target, "parts": len(parts),
                   "segments": sum(len(p["segments"]) for p in parts),
                   "sampled_entries": entries},
        "dataset_fingerprint": dataset_fingerprint(ids, index.column("digest").to_pylist()),
        "index": {"path": index_rel, "size": len(index_bytes), "sha256": index_sha},
        "parts": [{"name": p["part"], "complete": p["complete"],
                   "segments": [{k: v for k, v in s.items() if k != "files"}
                                for s in p["segments"]]}
                  for p in parts],
        "files": files,
        "part_manifests": {part_manifest_path(p["part"]): {"size": len(raw),
                                                           "sha256": sha256_hex(raw)}
                           for p, raw in parts_read},
        "extra": extra if extra is not None else (previous or {}).get("extra", {}),
    }
    fs.write_bytes(MANIFEST, sealed_json(manifest))
    if previous and previous["index"]["path"] != index_rel:
        fs.delete(previous["index"]["path"])  # no committed manifest refers to it any more
    return manifest


def _merged_index(fs: StoreFS, parts: list[dict], previous: dict | None) -> pa.Table:
    """Store index rows in part order, then segment order; global token offsets added."""
    known: dict[tuple[str, str], pa.Table] = {}
    if previous is not None and fs.exists(previous["index"]["path"]):
        # Reuse the rows of segments committed before: one read instead of one per segment.
        old = table_from_bytes(fs.read_bytes(previous["index"]["path"]))
        keys = list(zip(old.column("part").to_pylist(), old.column("segment").to_pylist()))
        starts: dict[tuple[str, str], list[int]] = {}
        for row, key in enumerate(keys):
            starts.setdefault(key, []).append(row)
        for key, rows in starts.items():
            known[key] = old.slice(rows[0], len(rows)).drop_columns(["part", "segment", "offset"])
    tables, offset = [], 0
    for part in parts:
        for seg in part["segments"]:
            key = (part["part"], seg["name"])
            table = known.get(key)
            if table is None or table.num_rows != seg["samples"]:
                table = _read_segment_index(fs, part["part"], seg)
            n = table.num_rows
            lengths = table.column("length").to_numpy()
            offsets = offset + table.column("segment_offset").to_numpy()
            table = table.append_column("part", pa.array([part["part"]] * n, pa.string()))
            table = table.append_column("segment", pa.array([seg["name"]] * n, pa.string()))
            table = table.append_column("offset", pa.array(offsets, pa.int64()))
            tables.append(table)
            offset += int(lengths.sum())
    if not tables:
        raise LogitStoreError(f"no committed segments in {fs.url}")
    return pa.concat_tables(tables, promote_options="permissive")


def _read_segment_index(fs: StoreFS, part: str, seg: dict) -> pa.Table:
    rel = f"{PARTS_DIR}/{part}/{seg['name']}/{SEGMENT_INDEX}"
    data = fs.read_bytes(rel)
    expected = seg["files"][rel]["sha256"]
    if sha256_hex(data) != expected:
        raise ChecksumError(f"checksum mismatch in {fs.path(rel)}: expected sha256 {expected}, "
                            f"found {sha256_hex(data)}", path=rel)
    return table_from_bytes(data)
