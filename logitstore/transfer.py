"""Copy a committed store between two fsspec URLs, verified on arrival."""

from __future__ import annotations

from typing import Callable

from logitstore.commit import (committed_part_manifest, parse_manifest, part_manifest_path,
                               read_commit, require_committed, sealed_json)
from logitstore.errors import ChecksumError, LogitStoreError
from logitstore.format import MANIFEST
from logitstore.fs import StoreFS, sha256_hex
from logitstore.verify import part_disagreement


def copy_store(src: str, dst: str, *, src_options: dict | None = None,
               dst_options: dict | None = None, overwrite: bool = False,
               progress: Callable[[str, int], None] | None = None) -> dict:
    """Copy the files the source manifest lists, then the manifest last; returns the manifest.

    Each data file is checked against its recorded sha256 when read from the source and
    again when read back from the destination, so a damaged source or a bad transfer fails
    loudly and names the file. The part manifests the store manifest lists are copied too
    (so the copy can be resumed or appended to): byte for byte when unchanged since the
    commit; one that a running writer has moved on since (more segments, a new signal) is
    cut back to the committed state of its part and sealed again, as those segments and
    files are not copied. Uncommitted files at the source are not copied.
    """
    source, target = StoreFS(src, src_options), StoreFS(dst, dst_options)
    require_committed(source)
    try:
        raw_manifest, manifest, index = read_commit(source)
    except FileNotFoundError as err:
        raise ChecksumError(f"{err.filename or 'the sample index'} is missing: the source store "
                            f"is damaged (run `logitstore verify {src}`)") from None
    if target.exists(MANIFEST) and not overwrite:
        raise LogitStoreError(f"{dst} already holds a store; pass --overwrite to replace it")
    # Uncommit the old store first: its files are about to be replaced under its manifest.
    target.delete(MANIFEST)
    files = dict(manifest["files"])
    files[manifest["index"]["path"]] = manifest["index"]
    for rel, meta in sorted(files.items()):
        # Segment files are immutable once committed; only the index of a superseded
        # commit is ever deleted by a running writer, and it was read first.
        data = index if rel == manifest["index"]["path"] else source.read_bytes(rel)
        if sha256_hex(data) != meta["sha256"]:
            raise ChecksumError(f"checksum mismatch in source file {source.path(rel)}; the source "
                                f"store is damaged (run `logitstore verify {src}`)", path=rel)
        _write_checked(target, rel, data)
        if progress:
            progress(rel, len(data))
    for rel, recorded in sorted((manifest.get("part_manifests") or {}).items()):
        data = _committed_part_bytes(source, src, rel, recorded, manifest)
        _write_checked(target, rel, data)
        if progress:
            progress(rel, len(data))
    # The manifest read at the start, not the source's current one: a writer may have
    # committed more segments since, which were not copied.
    target.write_bytes(MANIFEST, raw_manifest)
    return manifest


def _committed_part_bytes(source: StoreFS, src: str, rel: str, recorded: dict,
                          manifest: dict) -> bytes:
    """The bytes of the part manifest at `rel` as the commit `manifest` recorded it: the
    source's file when unchanged, else (a writer moved the part on) the source's file cut
    back to the committed state and sealed again. ChecksumError naming it when damaged."""
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


def _write_checked(target: StoreFS, rel: str, data: bytes) -> None:
    target.write_bytes(rel, data)
    if sha256_hex(target.read_bytes(rel)) != sha256_hex(data):
        raise ChecksumError(f"{target.path(rel)} differs from the source after copying; "
                            f"retry the copy", path=rel)
