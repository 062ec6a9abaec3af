"""Write the store manifest (format 2.0): register a part, or consolidate every part.

Neither runs per segment: a writer commits a segment through its part's record and head
(logitstore/records.py). The store manifest is written

- once when a writer that commits the store itself (`StoreWriter(commit_store=True)`)
  commits its first segment: `register_part` adds its part with `follow_head`, so readers
  follow the part's head from then on (a manifest of the size of the list of parts);
- by `commit_store` (a writer's close(), `logitstore commit`, the main process of a
  multi-process dump): the consolidation. It walks each part's records past the previous
  consolidated state, writes one sample index and one catalog of every segment (both under
  content-addressed names), then replaces the manifest atomically, then deletes the index
  and catalog the previous manifest named. Opening a consolidated store reads the manifest,
  these two files and the heads of followed parts: O(parts) files, not O(segments).

The consolidation reads the previous index and catalog once and only the records and
segment indexes added since, so it costs O(store) in bytes written, once per part closed.
One process consolidates at a time.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from logitstore import __version__
from logitstore.commit import (dataset_fingerprint, dump_json, load_json, now_iso,
                               part_manifest_path, sealed_json)
from logitstore.errors import LogitStoreError, ManifestMissingError, SchemaMismatchError
from logitstore.format import (FORMAT_NAME, FORMAT_VERSION, INDEX_DIR, MANIFEST, PART_HEAD,
                               PARTS_DIR, StoreSettings, settings_differences)
from logitstore.fs import StoreFS, sha256_hex
from logitstore.parquet_io import table_from_bytes, table_to_bytes
from logitstore.records import Sealed, add_signals, missing, read_heads
from logitstore.snapshot import (_read_listed, check_unique_ids, concat_index, is_legacy,
                                 read_segment_index, tail_segments, view_of, with_place)

CATALOG_FORMAT = "logitstore-catalog"


def previous_manifest(fs: StoreFS) -> dict[str, Any] | None:
    """The store manifest of format 2.0, None when there is none; LogitStoreError for a
    store of format 1.0 or 1.1 (this release reads those, it does not write into them)."""
    if not fs.exists(MANIFEST):
        return None
    manifest = load_json(fs, MANIFEST)
    if is_legacy(manifest):
        raise LogitStoreError(
            f"{fs.url} is a store of format {manifest['format_version']}; this release reads "
            f"it but writes format {FORMAT_VERSION} only. Copy it with `logitstore cp` (or "
            f"read it) as it is, or write the new samples to a new store")
    return manifest


def _root(settings: dict, parts: list[dict], index: pa.Table | None, created: str | None,
          extra: dict, catalog_parts: dict, metas: tuple[dict | None, dict | None]
          ) -> dict[str, Any]:
    """A store manifest naming `parts`, whose consolidated state is `catalog_parts` (with
    sample index `index`) written to the files described by `metas` (index, catalog)."""
    segments = [s for p in parts for s in catalog_parts.get(p["name"], [])]
    ids = index.column("sample_id").to_pylist() if index is not None else []
    entries: dict[str, int] = {}
    for seg in segments:
        for sig, n in seg.get("sampled_entries", {}).items():
            entries[sig] = entries.get(sig, 0) + n
    tokens = int(index.column("length").to_numpy().sum()) if index is not None else 0
    return {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "tool_version": __version__,
        "created": created or now_iso(), "committed": now_iso(), "settings": settings,
        "counts": {"samples": len(ids), "tokens": tokens,
                   "target_tokens": sum(s["target_tokens"] for s in segments),
                   "parts": len(parts), "segments": len(segments), "sampled_entries": entries},
        "dataset_fingerprint": dataset_fingerprint(
            ids, index.column("digest").to_pylist() if index is not None else []),
        "index": metas[0], "catalog": metas[1], "parts": parts, "extra": extra,
    }


def register_part(fs: StoreFS, part: str, settings: StoreSettings,
                  extra: dict[str, Any] | None) -> None:
    """Make readers follow `part`'s head: add it to the store manifest with `follow_head`
    (creating the manifest when there is none). No-op when it is followed already."""
    previous = previous_manifest(fs)
    parts = [dict(p) for p in (previous or {}).get("parts", [])]
    known = next((p for p in parts if p["name"] == part), None)
    if known is not None and known.get("follow_head"):
        return
    if known is None:
        known = {"name": part, "complete": False, "segments": 0, "last_record": None}
        parts = sorted(parts + [known], key=lambda p: p["name"])
    known["follow_head"] = True
    if previous is None:
        manifest = _root(settings.to_json(), parts, None, None, extra or {}, {}, (None, None))
    else:
        manifest = {**previous, "parts": parts, "committed": now_iso(),
                    "counts": {**previous["counts"], "parts": len(parts)}}
        if extra is not None:
            manifest["extra"] = extra
    fs.write_bytes(MANIFEST, sealed_json(manifest))


def _agreed_settings(fs: StoreFS, heads: dict[str, Sealed]) -> StoreSettings:
    names = list(heads)
    settings = StoreSettings.from_json(heads[names[0]].doc["settings"])
    for name in names[1:]:
        diffs = settings_differences(settings,
                                     StoreSettings.from_json(heads[name].doc["settings"]))
        if diffs:
            raise SchemaMismatchError(f"parts {names[0]!r} and {name!r} of {fs.url} were "
                                      f"written with different settings: " + "; ".join(diffs))
    return settings


def _no_heads(fs: StoreFS) -> Exception:
    legacy = [n for n in fs.listdir(PARTS_DIR) if fs.exists(part_manifest_path(n))]
    if legacy:
        return LogitStoreError(
            f"the parts {legacy} of {fs.url} were written in format 1.0 or 1.1 (they have "
            f"{PARTS_DIR}/<part>/manifest.json, no {PART_HEAD}): commit them with the release "
            f"that wrote them; this release writes format {FORMAT_VERSION}")
    return ManifestMissingError(f"nothing to commit at {fs.url}: no part has committed a "
                                f"segment yet (expected {PARTS_DIR}/<part>/{PART_HEAD})")


def commit_store(url: str | StoreFS, *, storage_options: dict | None = None,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Consolidate every part that has a head into the store manifest; returns the
    committed state as a view (logitstore/snapshot.py). `extra`: free metadata of the tool
    (None keeps the previous manifest's)."""
    fs = url if isinstance(url, StoreFS) else StoreFS(url, storage_options)
    previous = previous_manifest(fs)
    heads = read_heads(fs)
    if not heads:
        raise _no_heads(fs)
    for entry in (previous or {}).get("parts", []):
        if entry["name"] not in heads:
            raise missing(fs, f"{PARTS_DIR}/{entry['name']}/{PART_HEAD}",
                          f"the head of part {entry['name']!r}")
    settings = _agreed_settings(fs, heads)
    catalog_old, rows_old = _consolidated(fs, previous)
    follow = {p["name"]: bool(p.get("follow_head")) for p in (previous or {}).get("parts", [])}
    catalog_parts: dict[str, list[dict]] = {}
    parts, tables = [], []
    for name, head in heads.items():
        old = catalog_old.get(name, [])
        segments = [add_signals(fs, name, seg, settings.signals) for seg in old]
        if name in rows_old:
            tables.append(rows_old[name])
        point = {"segments": len(old), "last_record": old[-1]["record"] if old else None}
        for _, seg in tail_segments(fs, name, point, head):
            segments.append(seg)
            index = table_from_bytes(read_segment_index(fs, name, seg))
            tables.append(with_place(index, name, seg["name"], 0))
        catalog_parts[name] = segments
        parts.append({"name": name, "complete": bool(head.doc["complete"]),
                      "segments": len(segments), "last_record": head.doc["last_record"],
                      "follow_head": follow.get(name, False)})
    index = concat_index(tables)
    check_unique_ids(fs, index)
    metas = (_write_content_addressed(fs, table_to_bytes(index), "parquet"),
             _write_content_addressed(fs, dump_json({
                 "format": CATALOG_FORMAT, "format_version": FORMAT_VERSION,
                 "parts": catalog_parts}), "catalog.json"))
    extra = extra if extra is not None else (previous or {}).get("extra", {})
    manifest = _root(settings.to_json(), parts, index, (previous or {}).get("created"), extra,
                     catalog_parts, metas)
    fs.write_bytes(MANIFEST, sealed_json(manifest))
    for name, meta in zip(("index", "catalog"), metas):
        old = (previous or {}).get(name)
        if old and old["path"] != meta["path"]:
            fs.delete(old["path"])  # no committed manifest refers to it any more
    view_parts = [{"name": p["name"], "complete": p["complete"],
                   "segments": catalog_parts[p["name"]]} for p in parts]
    return view_of(manifest, view_parts, index, manifest["index"])


def _consolidated(fs: StoreFS, previous: dict[str, Any] | None
                  ) -> tuple[dict[str, list[dict]], dict[str, pa.Table]]:
    """({part: catalog segments}, {part: its rows of the index}) of the previous manifest."""
    if previous is None or previous.get("catalog") is None:
        return {}, {}
    try:
        catalog = json.loads(_read_listed(fs, previous, "catalog"))["parts"]
        index = table_from_bytes(_read_listed(fs, previous, "index"))
    except FileNotFoundError as err:
        raise missing(fs, err.filename, f"the {err.strerror} the store manifest names") from None
    rows, start = {}, 0
    for entry in previous["parts"]:
        n = sum(s["samples"] for s in catalog.get(entry["name"], []))
        rows[entry["name"]] = index.slice(start, n)
        start += n
    return catalog, rows


def _write_content_addressed(fs: StoreFS, data: bytes, suffix: str) -> dict[str, Any]:
    sha = sha256_hex(data)
    rel = f"{INDEX_DIR}/{sha[:20]}.{suffix}"
    if not fs.exists(rel):
        fs.write_bytes(rel, data)
    return {"path": rel, "size": len(data), "sha256": sha}
