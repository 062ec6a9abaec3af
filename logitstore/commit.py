"""Commit: merge the committed state of every part into the store manifest + sample index.

Order (crash safety): segment files are already on storage and listed in part manifests;
here the merged index is written under a content-addressed name, then the store manifest
is replaced atomically. A crash before the rename leaves the previous manifest, whose
index file is untouched, so the last committed state stays readable.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from logitstore import __version__
from logitstore.errors import (ChecksumError, LogitStoreError, ManifestMissingError,
                               SchemaMismatchError)
from logitstore.format import (FORMAT_NAME, FORMAT_VERSION, INDEX_DIR, MANIFEST, PART_MANIFEST,
                               PARTS_DIR, SEGMENT_INDEX, StoreSettings, check_format_version,
                               settings_differences)
from logitstore.fs import StoreFS, sha256_hex


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def load_json(fs: StoreFS, rel: str) -> dict[str, Any]:
    return parse_json(fs, rel, fs.read_bytes(rel))


def parse_json(fs: StoreFS, rel: str, raw: bytes) -> dict[str, Any]:
    """The JSON document `raw`, read from `rel`; ChecksumError naming the file if damaged."""
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ChecksumError(f"{fs.path(rel)} is not valid JSON ({err}); the file is damaged",
                            path=rel) from None


def read_commit(fs: StoreFS, attempts: int = 100) -> tuple[bytes, dict[str, Any], bytes]:
    """(manifest bytes, manifest, index bytes) of one commit, also beside a running writer:
    a commit landing between the two reads replaces the manifest, then deletes the index
    the old one named; the newer manifest is read then. FileNotFoundError only when the
    index of the current manifest is missing."""
    for attempt in range(attempts):
        raw = fs.read_bytes(MANIFEST)
        manifest = parse_json(fs, MANIFEST, raw)
        check_format_version(manifest.get("format_version"), fs.path(MANIFEST))
        try:
            return raw, manifest, fs.read_bytes(manifest["index"]["path"])
        except FileNotFoundError:
            if attempt == attempts - 1 or load_json(fs, MANIFEST)["index"] == manifest["index"]:
                raise
    raise AssertionError("unreachable")


def dump_json(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, indent=1, sort_keys=True) + "\n").encode("utf-8")


def read_part_manifests(fs: StoreFS) -> list[dict[str, Any]]:
    """Every part that has committed at least once, in part-name order."""
    out = []
    for name in fs.listdir(PARTS_DIR):
        rel = f"{PARTS_DIR}/{name}/{PART_MANIFEST}"
        if fs.exists(rel):
            part = load_json(fs, rel)
            check_format_version(part.get("format_version"), fs.path(rel))
            out.append(part)
    return out


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
    parts = read_part_manifests(fs)
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
    sink = io.BytesIO()
    pq.write_table(index, sink, compression="zstd")
    index_bytes = sink.getvalue()
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
        "extra": extra if extra is not None else (previous or {}).get("extra", {}),
    }
    fs.write_bytes(MANIFEST, dump_json(manifest))
    if previous and previous["index"]["path"] != index_rel:
        fs.delete(previous["index"]["path"])  # no committed manifest refers to it any more
    return manifest


def _merged_index(fs: StoreFS, parts: list[dict], previous: dict | None) -> pa.Table:
    """Store index rows in part order, then segment order; global token offsets added."""
    known: dict[tuple[str, str], pa.Table] = {}
    if previous is not None and fs.exists(previous["index"]["path"]):
        # Reuse the rows of segments committed before: one read instead of one per segment.
        old = pq.read_table(io.BytesIO(fs.read_bytes(previous["index"]["path"])))
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
    return pq.read_table(io.BytesIO(data))
