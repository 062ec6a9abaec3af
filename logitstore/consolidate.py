"""Write the store manifest (format 2.0): register a part, or consolidate every part.

Neither runs per segment: a writer commits a segment through its part's record and head
(logitstore/records.py). The store manifest is written

- once when a writer that commits the store itself (`StoreWriter(commit_store=True)`)
  commits its first segment: `register_part` adds its part with `follow_head`, so readers
  follow the part's head from then on (a manifest of the size of the list of parts);
- by `commit_store` (a writer's close(), `logitstore commit`, the main process of a
  multi-process dump): the consolidation. It walks each part's records past the previous
  consolidated state, writes one sample index and one catalog of every segment (both under
  content-addressed names) and a copy of the new manifest (`index/manifest-<n>.json`, n
  the consolidation's number), then replaces the manifest atomically, then deletes every
  file of `index/` that neither the new nor the previous manifest names: one generation is
  kept. Opening a consolidated store reads the manifest, these two files and the heads of
  followed parts: O(parts) files, not O(segments).

Without compare-and-swap (S3 has none), a registration and a consolidation can overwrite
each other's manifest: both re-read the manifest after writing it and redo their change on
top of what they find (FORMAT.md section 8 says what this guarantees). The kept generation
keeps the files a registration's stale manifest names; the copy lets a registration that
replaced a newer consolidation put that consolidation back.

The consolidation reads the previous index and catalog once and only the records and
segment indexes added since, so it costs O(store) in bytes written, once per part closed.
One process consolidates at a time.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pyarrow as pa

from logitstore import __version__
from logitstore.commit import (dataset_fingerprint, dump_json, load_json, now_iso,
                               part_manifest_path, sealed_json)
from logitstore.errors import (ChecksumError, LogitStoreError, ManifestMissingError,
                               SchemaMismatchError)
from logitstore.format import (FORMAT_NAME, FORMAT_VERSION, INDEX_DIR, MANIFEST, PART_HEAD,
                               PARTS_DIR, StoreSettings, settings_differences, written_version)
from logitstore.fs import StoreFS, sha256_hex
from logitstore.parquet_io import table_from_bytes, table_to_bytes
from logitstore.records import Sealed, add_signals, missing, read_heads
from logitstore.snapshot import (_read_listed, check_unique_ids, concat_index, is_legacy,
                                 read_segment_index, tail_segments, view_of, with_place)

CATALOG_FORMAT = "logitstore-catalog"
GENERATION = "consolidation"  # manifest key: how many consolidations the store has had
_COPY = re.compile(r"manifest-(\d{9})\.json")  # index/manifest-<n>.json: consolidation n's
# Rewrites of the manifest after finding it replaced under us; each needs another process
# to write the manifest in between, so a few suffice.
_TRIES = 8


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
        "format": FORMAT_NAME, "format_version": written_version(settings.get("kind")),
        "tool_version": __version__,
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
    (creating the manifest when there is none). No-op when it is followed already.

    Compare and retry: after writing, it reads the manifest again and looks for the copy
    of a consolidation newer than that manifest; when its write replaced a consolidation
    (or one replaced its write without the part), it writes again on top of it."""
    current = previous_manifest(fs)
    for _ in range(_TRIES):
        newer = _newest_copy(fs, _generation(current))
        if newer is None and current is not None and _follows(current, part):
            return
        fs.write_bytes(MANIFEST, sealed_json(
            _with_part(newer or current, part, settings, extra)))
        current = previous_manifest(fs)


def copy_problems(fs: StoreFS) -> list[str]:
    """One line per damaged consolidation copy in `index/` (for verify: a registration
    that read a damaged copy would fail)."""
    problems = []
    for name in fs.listdir(INDEX_DIR):
        if _COPY.fullmatch(name):
            try:
                load_json(fs, f"{INDEX_DIR}/{name}")
            except ChecksumError as err:
                problems.append(str(err))
            except FileNotFoundError:
                pass  # deleted by a consolidation since the listing
    return problems


def _with_part(base: dict[str, Any] | None, part: str, settings: StoreSettings,
               extra: dict[str, Any] | None) -> dict[str, Any]:
    """The manifest `base` (None: no manifest yet) with `part` followed."""
    parts = [dict(p) for p in (base or {}).get("parts", [])]
    known = next((p for p in parts if p["name"] == part), None)
    if known is None:
        known = {"name": part, "complete": False, "segments": 0, "last_record": None}
        parts = sorted(parts + [known], key=lambda p: p["name"])
    known["follow_head"] = True
    if base is None:
        return _root(settings.to_json(), parts, None, None, extra or {}, {}, (None, None))
    manifest = {k: v for k, v in base.items() if k != "manifest_sha256"}
    manifest.update(parts=parts, committed=now_iso(),
                    counts={**base["counts"], "parts": len(parts)})
    if extra is not None:
        manifest["extra"] = extra
    return manifest


def _follows(manifest: dict[str, Any], part: str) -> bool:
    return any(p["name"] == part and p.get("follow_head") for p in manifest["parts"])


def _generation(manifest: dict[str, Any] | None) -> int:
    return int((manifest or {}).get(GENERATION, 0))


def _copy_path(generation: int) -> str:
    return f"{INDEX_DIR}/manifest-{generation:09d}.json"


def _newest_copy(fs: StoreFS, above: int) -> dict[str, Any] | None:
    """The copy of the newest consolidation numbered above `above`, None when none."""
    for _ in range(_TRIES):  # a consolidation may delete a copy between listing and reading
        numbers = [int(m.group(1)) for m in map(_COPY.fullmatch, fs.listdir(INDEX_DIR)) if m]
        newest = max((n for n in numbers if n > above), default=None)
        if newest is None:
            return None
        try:
            return load_json(fs, _copy_path(newest))
        except FileNotFoundError:
            continue
    return None


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
                 "format": CATALOG_FORMAT, "format_version": written_version(settings.kind),
                 "parts": catalog_parts}), "catalog.json"))
    extra = extra if extra is not None else (previous or {}).get("extra", {})
    manifest = _root(settings.to_json(), parts, index, (previous or {}).get("created"), extra,
                     catalog_parts, metas)
    manifest[GENERATION] = _generation(previous) + 1
    manifest = _publish(fs, manifest)
    _sweep(fs, (manifest, previous))
    view_parts = [{"name": p["name"], "complete": p["complete"],
                   "segments": catalog_parts[p["name"]]} for p in parts]
    return view_of(manifest, view_parts, index, manifest["index"])


def _publish(fs: StoreFS, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write the consolidation's copy, then `manifest` as the store manifest, keeping the
    parts that registrations made followed meanwhile; write again while a registration
    based on an older manifest replaced it. Returns the manifest as written."""
    for _ in range(_TRIES):
        manifest = _keep_followed(manifest, previous_manifest(fs))
        data = sealed_json(manifest)
        fs.write_bytes(_copy_path(manifest[GENERATION]), data)
        fs.write_bytes(MANIFEST, data)
        now = previous_manifest(fs)
        if now is not None and now.get("index") == manifest["index"]:
            return manifest  # ours, or a registration made on top of ours
    return manifest


def _keep_followed(manifest: dict[str, Any], current: dict[str, Any] | None
                   ) -> dict[str, Any]:
    """`manifest` with `follow_head` set for every part `current` follows; a part it does
    not know (registered after the consolidation listed the heads) joins with no
    consolidated segment."""
    followed = {p["name"] for p in (current or {}).get("parts", []) if p.get("follow_head")}
    parts = [{**p, "follow_head": p["follow_head"] or p["name"] in followed}
             for p in manifest["parts"]]
    parts += [{"name": name, "complete": False, "segments": 0, "last_record": None,
               "follow_head": True} for name in followed - {p["name"] for p in parts}]
    parts.sort(key=lambda p: p["name"])
    return {**manifest, "parts": parts, "counts": {**manifest["counts"], "parts": len(parts)}}


def _sweep(fs: StoreFS, kept: tuple[dict[str, Any], dict[str, Any] | None]) -> None:
    """Delete the files of `index/` that none of the `kept` manifests names: older
    generations and the leftovers of consolidations that crashed."""
    names = set()
    for manifest in filter(None, kept):
        names.add(_copy_path(_generation(manifest)))
        names.update(manifest[k]["path"] for k in ("index", "catalog") if manifest.get(k))
    for name in fs.listdir(INDEX_DIR):
        if f"{INDEX_DIR}/{name}" not in names:
            fs.delete(f"{INDEX_DIR}/{name}")


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
