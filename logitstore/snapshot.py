"""The committed state of a store, as one consistent snapshot, also beside running writers.

Format 2.0 (FORMAT.md section 7): the store manifest names the parts and the consolidated
state (one sample index and one catalog of every consolidated segment, files included).
A part whose entry says `follow_head` may have committed segments since: its head is read
and the records after the consolidated ones are walked, and their segment indexes read.
Formats 1.0 and 1.1: the store manifest lists everything itself (`legacy_snapshot`).

Either way the result carries `view`: the committed state in the shape of a 1.1 store
manifest (`settings`, `counts`, `dataset_fingerprint`, `parts` with their `segments`,
`files`, `index`, `extra`, ...), which `StoreReader.manifest`, `commit_store`, `info` and
`verify` use, whatever the format on disk. In a view with segments past the consolidated
state, `index` is `{"path": None, "size": bytes of every index read, "sha256": an id of the
committed state}`: the id changes with every commit.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from logitstore.commit import dataset_fingerprint, parse_manifest
from logitstore.errors import ChecksumError, SchemaMismatchError
from logitstore.format import LEGACY_VERSIONS, MANIFEST, PARTS_DIR, SEGMENT_INDEX
from logitstore.fs import StoreFS, sha256_hex
from logitstore.parquet_io import table_from_bytes
from logitstore.records import (Sealed, head_path, missing, read_sealed, segment_entry,
                                walk_records)

# Columns every sample index has (the segment indexes lack the last three).
BASE_COLUMNS = {"sample_id": pa.string(), "source": pa.string(), "split": pa.string(),
                "segment_offset": pa.int64(), "length": pa.int64(), "digest": pa.string()}


@dataclass
class Snapshot:
    root_raw: bytes  # the store manifest's bytes as read
    root: dict[str, Any]  # the store manifest
    view: dict[str, Any]  # the committed state (module docstring)
    index: pa.Table  # its sample index, in store order
    legacy: bool  # format 1.0 or 1.1
    catalog_raw: bytes | None = None  # 2.0: the consolidated catalog and index as read
    index_raw: bytes | None = None
    heads: dict[str, Sealed] = field(default_factory=dict)  # heads of the followed parts
    tail_records: list[Sealed] = field(default_factory=list)  # records past the catalog
    tail_indexes: dict[str, bytes] = field(default_factory=dict)  # their segment indexes


def is_legacy(manifest: dict[str, Any]) -> bool:
    return str(manifest.get("format_version")) in LEGACY_VERSIONS


def read_snapshot(fs: StoreFS, attempts: int = 100) -> Snapshot:
    """The committed state of the store at `fs` (which holds a store manifest).

    A consolidation landing between the reads of the manifest and of the files it names
    replaces the manifest, then deletes the index and catalog the manifest before the old
    one named (two consolidations delete the old one's): the newer manifest is read then. MissingFileError when a file the current manifest names is absent."""
    for attempt in range(attempts):
        raw = fs.read_bytes(MANIFEST)
        root = parse_manifest(fs, MANIFEST, raw)
        names = ("index",) if is_legacy(root) else ("index", "catalog")
        try:
            blobs = [_read_listed(fs, root, name) for name in names]
            break
        except FileNotFoundError as err:
            if attempt == attempts - 1 or fs.read_bytes(MANIFEST) == raw:
                raise missing(fs, err.filename, f"the {err.strerror} the store manifest "
                                                f"names") from None
    if is_legacy(root):
        return Snapshot(raw, root, root, table_from_bytes(blobs[0]), legacy=True,
                        index_raw=blobs[0])
    catalog = json.loads(blobs[1]) if blobs[1] is not None else {"parts": {}}
    consolidated = table_from_bytes(blobs[0]) if blobs[0] is not None else None
    snap = Snapshot(raw, root, {}, consolidated, False, blobs[1], blobs[0])
    _resolve_tails(fs, snap, catalog)
    return snap


def _read_listed(fs: StoreFS, root: dict[str, Any], name: str) -> bytes | None:
    """The bytes of the file the manifest names under `name` ("index" or "catalog"),
    checked against its sha256; None when it names none (nothing consolidated yet)."""
    meta = root.get(name)
    if meta is None:
        return None
    try:
        data = fs.read_bytes(meta["path"])
    except FileNotFoundError:
        raise FileNotFoundError(2, f"consolidated {name}", meta["path"]) from None
    found = sha256_hex(data)
    if found != meta["sha256"]:
        raise ChecksumError(f"checksum mismatch in {fs.path(meta['path'])}: the consolidated "
                            f"{name} is damaged (expected sha256 {meta['sha256']}, found "
                            f"{found})", path=meta["path"])
    return data


def _resolve_tails(fs: StoreFS, snap: Snapshot, catalog: dict[str, Any]) -> None:
    """Fill `snap.view` and `snap.index`: the consolidated state plus, for every followed
    part, the segments its head has committed since."""
    root = snap.root
    parts, tails, tables, row = [], {}, [], 0
    for entry in root["parts"]:
        name, segments = entry["name"], list(catalog["parts"].get(entry["name"], []))
        if len(segments) != entry["segments"]:
            raise ChecksumError(f"{fs.path(MANIFEST)} says part {name!r} has {entry['segments']} "
                                f"consolidated segments, its catalog lists {len(segments)}; the "
                                f"store is damaged", path=MANIFEST)
        rows = sum(s["samples"] for s in segments)
        if rows:
            tables.append(snap.index.slice(row, rows))
        row += rows
        complete = entry["complete"]
        if entry.get("follow_head"):
            head = read_sealed(fs, head_path(name), f"the head of part {name!r}")
            snap.heads[name] = head
            complete = complete or bool(head.doc.get("complete"))
            tail = tail_segments(fs, name, entry, head)
            for record, seg in tail:
                snap.tail_records.append(record)
                data = read_segment_index(fs, name, seg)
                snap.tail_indexes[f"{PARTS_DIR}/{name}/{seg['name']}/{SEGMENT_INDEX}"] = data
                tables.append(with_place(table_from_bytes(data), name, seg["name"], 0))
            segments += [seg for _, seg in tail]
            tails[name] = head if tail else None
        parts.append({"name": name, "complete": complete, "segments": segments})
    if snap.index is not None and row != snap.index.num_rows:
        raise ChecksumError(f"{fs.path(root['index']['path'])} holds {snap.index.num_rows} rows, "
                            f"the catalog {row} samples; the store is damaged",
                            path=root["index"]["path"])
    grown = any(tails.values())
    snap.index = concat_index(tables, recount=grown or snap.index is None)
    snap.view = view_of(root, parts, snap.index, None if grown else root.get("index"),
                        snap, [h for h in tails.values() if h is not None])


def tail_segments(fs: StoreFS, part: str, entry: dict[str, Any],
                  head: Sealed) -> list[tuple[Sealed, dict[str, Any]]]:
    """(record, segment entry) of each segment of `part` that its head has committed past
    the `entry["segments"]` consolidated ones (whose last record is `entry["last_record"]`)."""
    doc = head.doc
    if doc.get("part") != part or doc.get("segments", -1) < entry["segments"]:
        raise ChecksumError(f"{fs.path(head.rel)} names part {doc.get('part')!r} with "
                            f"{doc.get('segments')} segments; the store manifest has "
                            f"consolidated {entry['segments']} segments of part {part!r}; the "
                            f"store is damaged", path=head.rel)
    records = walk_records(fs, part, entry["segments"], entry["last_record"], doc["segments"],
                           doc["last_record"])
    signals = list(doc["settings"]["signals"])
    return [(r, segment_entry(fs, part, r, signals)) for r in records]


def read_segment_index(fs: StoreFS, part: str, seg: dict[str, Any]) -> bytes:
    """The bytes of a segment's index.parquet, checked against its entry's files."""
    rel = f"{PARTS_DIR}/{part}/{seg['name']}/{SEGMENT_INDEX}"
    try:
        data = fs.read_bytes(rel, seg["files"].get(rel, {}).get("size"))
    except FileNotFoundError:
        raise missing(fs, rel, f"the sample index of committed segment {seg['name']} of "
                               f"part {part!r}") from None
    expected = seg["files"][rel]["sha256"]
    if sha256_hex(data) != expected:
        raise ChecksumError(f"checksum mismatch in {fs.path(rel)}: expected sha256 {expected}, "
                            f"found {sha256_hex(data)}", path=rel)
    return data


def with_place(table: pa.Table, part: str, segment: str, offset: int) -> pa.Table:
    """A segment index's rows with the store index's `part`, `segment`, `offset` columns."""
    n = table.num_rows
    table = table.append_column("part", pa.array([part] * n, pa.string()))
    table = table.append_column("segment", pa.array([segment] * n, pa.string()))
    offsets = offset + table.column("segment_offset").to_numpy()
    return table.append_column("offset", pa.array(offsets, pa.int64()))


def concat_index(tables: list[pa.Table], recount: bool = True) -> pa.Table:
    """Store index rows in the order given; with `recount`, `offset` recomputed as the
    running sum of `length` (the flat token axis of the whole store)."""
    if not tables:
        schema = pa.schema(list(BASE_COLUMNS.items()) + [
            ("part", pa.string()), ("segment", pa.string()), ("offset", pa.int64())])
        return schema.empty_table()
    table = pa.concat_tables(tables, promote_options="permissive")
    if recount:
        lengths = table.column("length").to_numpy()
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        table = table.set_column(table.column_names.index("offset"), "offset",
                                 pa.array(starts, pa.int64()))
    return table


def view_of(root: dict[str, Any], parts: list[dict[str, Any]], index: pa.Table,
            index_meta: dict[str, Any] | None, snap: Snapshot | None = None,
            heads: list[Sealed] = ()) -> dict[str, Any]:
    """The committed state as a 1.1-shaped manifest (module docstring). `index_meta`: the
    consolidated index when the state is exactly the consolidated one, else None."""
    files: dict[str, dict] = {}
    entries: dict[str, int] = {}
    for part in parts:
        for seg in part["segments"]:
            files.update(seg["files"])
            for sig, n in seg.get("sampled_entries", {}).items():
                entries[sig] = entries.get(sig, 0) + n
    # 2.1: the tokenizer's files, listed by the settings, are files of the store like any
    # other (checked by verify, copied by cp, refused by readers when missing).
    files.update((root.get("settings") or {}).get("tokenizer_files") or {})
    for tokenization in ((root.get("settings") or {}).get("tokenizations") or {}).values():
        files.update(tokenization.get("tokenizer_files") or {})  # 2.2: tokenizer/<name>/...
    ids = index.column("sample_id").to_pylist()
    view = {k: v for k, v in root.items() if k not in ("catalog",)}
    view["parts"] = [{"name": p["name"], "complete": p["complete"],
                      "segments": [{k: v for k, v in s.items() if k != "files"}
                                   for s in p["segments"]]} for p in parts]
    view["files"] = files
    view["counts"] = {"samples": len(ids), "tokens": int(index.column("length").to_numpy().sum()),
                      "target_tokens": sum(s["target_tokens"] for p in parts
                                           for s in p["segments"]),
                      "parts": len(parts), "segments": sum(len(p["segments"]) for p in parts),
                      "sampled_entries": entries}
    if index_meta is not None:
        view["index"] = dict(index_meta)
        return view
    view["dataset_fingerprint"] = dataset_fingerprint(ids, index.column("digest").to_pylist())
    state = hashlib.sha256(json.dumps(root.get("index")).encode())
    size = (root.get("index") or {}).get("size", 0)
    for head in heads:
        state.update(head.sha.encode())
        view["committed"] = max(view.get("committed", ""), head.doc.get("updated", ""))
    if snap is not None:
        size += sum(len(b) for b in snap.tail_indexes.values())
    view["index"] = {"path": None, "size": size, "sha256": state.hexdigest()}
    return view


def check_unique_ids(fs: StoreFS, index: pa.Table) -> None:
    """SchemaMismatchError naming a few ids that appear more than once."""
    ids = index.column("sample_id").to_pylist()
    if len(set(ids)) == len(ids):
        return
    seen, dups = set(), []
    for sid in ids:
        if sid in seen:
            dups.append(sid)
        seen.add(sid)
    raise SchemaMismatchError(f"sample ids appear in more than one place in {fs.url}: "
                              f"{dups[:5]} ({len(dups)} in all); each part must hold "
                              f"different samples")


def committed_state(url: str | StoreFS, storage_options: dict | None = None) -> dict[str, Any]:
    """The committed state of a store as a view (module docstring): what a 1.1 store
    manifest held (`counts`, `files`, `index`, `settings`, `extra`, ...)."""
    fs = url if isinstance(url, StoreFS) else StoreFS(url, storage_options)
    return read_snapshot(fs).view
