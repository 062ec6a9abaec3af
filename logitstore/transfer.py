"""Copy a committed store between two fsspec URLs, verified on arrival."""

from __future__ import annotations

import json
import posixpath
from typing import Callable

from logitstore.commit import (committed_part_manifest, parse_manifest, part_manifest_path,
                               require_committed, sealed_json)
from logitstore.errors import ChecksumError, LogitStoreError
from logitstore.format import INDEX_DIR, MANIFEST, PARTS_DIR
from logitstore.fs import StoreFS, sha256_hex
from logitstore.records import addition_path, head_path, read_sealed, record_path
from logitstore.snapshot import Snapshot, read_snapshot
from logitstore.verify import part_disagreement

Progress = Callable[[str, int], None]


def copy_store(src: str, dst: str, *, src_options: dict | None = None,
               dst_options: dict | None = None, overwrite: bool = False,
               progress: Progress | None = None) -> dict:
    """Copy one committed state of the source, then its store manifest last; returns the
    committed state (logitstore/snapshot.py's view).

    Each file is checked against its recorded sha256 when read from the source and again
    when read back from the destination, so a damaged source or a bad transfer fails
    loudly and names the file. Format 2.0: the data files, segment records, the
    consolidated index and catalog and each part's head, as of one snapshot: a part that a
    running writer moved past that snapshot gets a head cut back to it (sealed again), as
    the newer segments are not copied. Formats 1.0/1.1: the part manifests the store
    manifest lists, cut back the same way. Uncommitted files at the source are not copied.
    `overwrite`: a store at `dst` is deleted first, all of it (never the source itself).
    """
    source, target = StoreFS(src, src_options), StoreFS(dst, dst_options)
    require_committed(source)
    snap = read_snapshot(source)  # ChecksumError (MissingFileError) naming a damaged file
    if target.exists(MANIFEST) and not overwrite:
        raise LogitStoreError(f"{dst} already holds a store; pass --overwrite to replace it")
    if overwrite:
        _erase_old_store(source, target, src, dst)
    else:  # uncommit what is there first: its files are about to be replaced
        target.delete(MANIFEST)
    copy = _Copier(source, target, src, progress)
    for rel, meta in sorted(snap.view["files"].items()):
        copy.checked(rel, meta["sha256"])
    if snap.legacy:
        copy.write(snap.root["index"]["path"], snap.index_raw)
        for rel, recorded in sorted((snap.root.get("part_manifests") or {}).items()):
            copy.write(rel, _committed_part_bytes(source, src, rel, recorded, snap.root))
    else:
        _copy_records_and_heads(copy, snap)
    # The manifest read at the start, not the source's current one: a writer may have
    # committed more segments since, which were not copied.
    target.write_bytes(MANIFEST, snap.root_raw)
    return snap.view


def _erase_old_store(source: StoreFS, target: StoreFS, src: str, dst: str) -> None:
    """Delete the store at `target` (manifest first, then its index and every part), as
    `StoreWriter(overwrite=True)` does: a part the new store lacks would otherwise stay,
    and a later `logitstore commit` of the copy would consolidate it."""
    if (source.fs.protocol, posixpath.normpath(source.root)) == \
            (target.fs.protocol, posixpath.normpath(target.root)):
        raise LogitStoreError(f"{dst} is the source store {src}: --overwrite would delete "
                              f"the store being copied; copy it somewhere else")
    for rel in (MANIFEST, INDEX_DIR, PARTS_DIR):
        target.delete(rel, recursive=True)


class _Copier:
    def __init__(self, source: StoreFS, target: StoreFS, src: str, progress: Progress | None):
        self.source, self.target, self.src, self.progress = source, target, src, progress

    def checked(self, rel: str, sha256: str) -> None:
        """Copy `rel`, whose bytes must hash to `sha256` at the source."""
        try:
            data = self.source.read_bytes(rel)
        except FileNotFoundError:
            raise ChecksumError(f"{self.source.path(rel)} is missing: the source store is "
                                f"damaged (run `logitstore verify {self.src}`)", path=rel) from None
        if sha256_hex(data) != sha256:
            raise ChecksumError(f"checksum mismatch in source file {self.source.path(rel)}; the "
                                f"source store is damaged (run `logitstore verify {self.src}`)",
                                path=rel)
        self.write(rel, data)

    def write(self, rel: str, data: bytes) -> None:
        self.target.write_bytes(rel, data)
        if sha256_hex(self.target.read_bytes(rel)) != sha256_hex(data):
            raise ChecksumError(f"{self.target.path(rel)} differs from the source after "
                                f"copying; retry the copy", path=rel)
        if self.progress:
            self.progress(rel, len(data))


def _copy_records_and_heads(copy: _Copier, snap: Snapshot) -> None:
    """Format 2.0: the records of every copied segment, the consolidated index and catalog,
    then the heads (each naming exactly the copied segments of its part)."""
    catalog = json.loads(snap.catalog_raw)["parts"] if snap.catalog_raw else {}
    for part, segments in sorted(catalog.items()):
        for seg in segments:
            copy.checked(record_path(part, seg["name"]), seg["record"])
            for signal, sha in sorted(seg.get("additions", {}).items()):
                copy.checked(addition_path(part, seg["name"], signal), sha)
    for record in snap.tail_records:
        copy.write(record.rel, record.raw)
    for name in ("index", "catalog"):
        if snap.root.get(name):
            copy.write(snap.root[name]["path"], snap.index_raw if name == "index"
                       else snap.catalog_raw)
    for entry in snap.root["parts"]:
        name = entry["name"]
        if name in snap.heads:  # followed: the head the snapshot was resolved from
            head = snap.heads[name]
            if head.doc["settings"] == snap.root["settings"]:
                copy.write(head.rel, head.raw)
            else:  # it names a signal added since the consolidation, whose files and
                # addition records are not copied: the copy's head must not claim it
                copy.write(head.rel, sealed_json({**head.doc, "settings": snap.root["settings"]}))
            continue
        head = read_sealed(copy.source, head_path(name), f"the head of part {name!r}")
        segments = catalog.get(name, [])
        pinned = {"segments": entry["segments"], "last_record": entry["last_record"],
                  "complete": entry["complete"]}
        if not isinstance(head.doc.get("segments"), int) or \
                head.doc["segments"] < entry["segments"]:
            raise ChecksumError(f"{copy.source.path(head.rel)} names fewer segments than the "
                                f"{entry['segments']} committed; the source store is damaged "
                                f"(run `logitstore verify {copy.src}`)", path=head.rel)
        if all(head.doc.get(k) == v for k, v in pinned.items()):
            copy.write(head.rel, head.raw)
        else:  # the part moved on since the consolidation: cut back to it
            copy.write(head.rel, sealed_json({
                **head.doc, **pinned, "settings": snap.root["settings"],
                "samples": sum(s["samples"] for s in segments),
                "tokens": sum(s["tokens"] for s in segments)}))


def _committed_part_bytes(source: StoreFS, src: str, rel: str, recorded: dict,
                          manifest: dict) -> bytes:
    """Format 1.0/1.1: the bytes of the part manifest at `rel` as the commit `manifest`
    recorded it: the source's file when unchanged, else (a writer moved the part on) the
    source's file cut back to the committed state and sealed again. ChecksumError naming it
    when damaged."""
    try:
        data = source.read_bytes(rel)
    except FileNotFoundError:
        raise ChecksumError(f"{source.path(rel)} is missing: the source store is damaged "
                            f"(run `logitstore verify {src}`)", path=rel) from None
    if len(data) == recorded["size"] and sha256_hex(data) == recorded["sha256"]:
        return data  # the very file the commit was made from
    doc = parse_manifest(source, rel, data)  # ChecksumError naming it when damaged
    part = next((p for p in manifest["parts"] if part_manifest_path(p["name"]) == rel), None)
    problem = part_disagreement(doc, part, manifest["files"]) if part else \
        "is listed but its part is not in the store manifest"
    if problem:
        raise ChecksumError(f"{source.path(rel)}: {problem}; the source store is damaged "
                            f"(run `logitstore verify {src}`)", path=rel)
    return sealed_json(committed_part_manifest(manifest, doc))
