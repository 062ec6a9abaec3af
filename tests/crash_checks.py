"""Shared by the crash tests (test_store_crash.py): the samples every writer child writes,
the reference write, and the checks of what a SIGKILL leaves: the committed state, a commit
left half done, the store finished by a resumed writer."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from store_helpers import (content_differences, content_of, make_samples, make_settings,
                           sample_content, store_files)

from logitstore.commit import commit_store, dataset_fingerprint
from logitstore.errors import LogitStoreError, ManifestMissingError
from logitstore.format import MANIFEST, TMP_MARK, segment_name
from logitstore.reader import StoreReader
from logitstore.verify import verify_store
from logitstore.writer import StoreWriter

N = 16  # samples (~330 tokens)
SEED = 5
SETTINGS = make_settings(segment_tokens=64)  # -> 5 segments of ~26 files each
PART = "part-00000"
PART_HEAD = f"parts/{PART}/head.json"


@dataclass
class Reference:
    path: Path
    reader: StoreReader
    ids: list[str]
    content: dict
    digests: dict[str, str]
    ops: list[tuple[int, str, str]]  # (number, write|delete, relative path)
    seconds: float  # time the uninterrupted child spent writing
    commits: int  # segment commits it reported from add() (close() commits the last one)
    write_seconds: float  # mean time from a segment's first file write to its commit



def check_committed(store: Path, ref: Reference, at_least: int = 0) -> int:
    """The state a kill left: readable and clean up to the last commit; returns its samples."""
    if not (store / MANIFEST).exists():
        assert at_least == 0, "a committed store lost its manifest"
        with pytest.raises(ManifestMissingError):
            StoreReader(str(store))
        with pytest.raises(ManifestMissingError):  # not a store yet, rather than damaged
            verify_store(str(store))
        return 0
    reader = StoreReader(str(store))
    assert verify_store(str(store)) == [], "uncommitted leftovers must be ignored by verify"
    n = len(reader)
    assert at_least <= n <= N, f"committed samples went from {at_least} to {n}"
    assert reader.sample_ids == ref.ids[:n], "a committed state is a prefix of the write order"
    assert reader.manifest["counts"]["samples"] == n
    assert reader.manifest["dataset_fingerprint"] == dataset_fingerprint(
        reader.sample_ids, [ref.digests[i] for i in reader.sample_ids])
    assert_reference_content(reader, ref)
    return n


def assert_reference_content(reader: StoreReader, ref: Reference) -> None:
    """Every sample the reader lists holds exactly what the uninterrupted write holds.

    The caller has run verify_store, which checks every file the manifest lists against
    its recorded sha256. So when those records equal the reference's (same paths, same
    bytes) and so do the rows of the sample index, the decoded content is the reference's
    too, and only the first and the last sample are decoded (random access) as a spot
    check; otherwise (a layout the reference does not share) every sample is decoded and
    compared.
    """
    ref_files = ref.reader.manifest["files"]
    same_files = all(ref_files.get(rel) == meta for rel, meta in reader.manifest["files"].items())
    same_rows = reader.index.to_pylist() == ref.reader.index.slice(0, len(reader)).to_pylist()
    if not (same_files and same_rows):
        problems = content_differences(content_of(reader),
                                       {i: ref.content[i] for i in reader.sample_ids})
        assert not problems, problems
    for sid in {reader.sample_ids[0], reader.sample_ids[-1]}:
        assert not content_differences({sid: sample_content(reader.sample(sid))},
                                       {sid: ref.content[sid]})


def finish(store: Path, visible: int) -> str:
    """Resume the part in this process and write the rest; returns how it resumed."""
    samples = make_samples(N, SEED, SETTINGS)
    try:
        writer = StoreWriter(str(store), SETTINGS, part=PART)
    except LogitStoreError as err:
        # The kill hit close() after the part was marked complete but before (or while) the
        # store was committed: a complete part is never appended to (FORMAT.md section 8),
        # so finishing means committing, as `logitstore commit` does.
        assert "is complete" in str(err), err
        commit_store(str(store))
        return "complete part: commit_store"
    done = writer.committed_count
    assert visible <= done <= N, (visible, done)
    assert writer.committed_ids == {s.sample_id for s in samples[:done]}
    for sample in samples[done:]:
        writer.add(sample)
    writer.close()
    return f"resumed after {done}"


def check_final(store: Path, ref: Reference) -> None:
    assert verify_store(str(store)) == []
    reader = StoreReader(str(store))
    assert reader.sample_ids == ref.ids
    assert_reference_content(reader, ref)
    assert reader.manifest["dataset_fingerprint"] == ref.reader.manifest["dataset_fingerprint"]
    counts, ref_counts = reader.manifest["counts"], ref.reader.manifest["counts"]
    assert counts == ref_counts
    # a resumed writer continues at the segment boundary it committed: same segmentation
    assert [s.samples for s in reader.segments] == [s.samples for s in ref.reader.segments]
    assert all(p["complete"] for p in reader.manifest["parts"])
    # nothing uncommitted is left inside the part once it has been reopened
    files = store_files(store)
    listed = committed_files(store, reader)
    assert {f for f in files if f.startswith("parts/")} <= listed, \
        sorted({f for f in files if f.startswith("parts/")} - listed)[:5]
    # outside parts/ a crash may leave only temp files and unreferenced index files
    for extra in files - listed:
        name = extra.rsplit("/", 1)[-1]
        assert TMP_MARK in name or extra.startswith("index/"), extra


def committed_files(store: Path, reader: StoreReader) -> set[str]:
    """Every file of the committed state: the data files, the store manifest, the part's
    head and its committed segments' records, the consolidated index and catalog and the
    consolidation's copy of the manifest (this writer consolidates once: no older ones)."""
    root = json.loads((store / MANIFEST).read_text())
    records = {f"parts/{PART}/records/{name}.json" for name in part_segments(store)}
    copies = {f"index/manifest-{root['consolidation']:09d}.json"} if root.get("consolidation") \
        else set()
    return set(reader.manifest["files"]) | records | {MANIFEST, PART_HEAD} | copies | {
        root[name]["path"] for name in ("index", "catalog") if root.get(name)}


def part_head(store: Path) -> dict:
    path = store / PART_HEAD
    return json.loads(path.read_text()) if path.exists() else {"complete": False, "segments": 0}


def part_is_complete(store: Path) -> bool:
    return part_head(store)["complete"]


def part_segments(store: Path) -> list[str]:
    """Segments the part's head has committed (maybe not yet in the store manifest)."""
    return [segment_name(n) for n in range(part_head(store)["segments"])]


def uncommitted_segments(store: Path) -> list[str]:
    """Segment directories of the part that its head does not count."""
    listed = set(part_segments(store))
    return sorted(n for n in os.listdir(store / "parts" / PART)
                  if n.startswith("seg-") and n not in listed)


def commit_in_progress(store: Path) -> str | None:
    """What a kill left half done, or None when the store is exactly a committed state: a
    file the committed state does not list (segment files, a record, a temp file, a new or
    an old index or catalog), a head the store manifest does not follow that is ahead of
    it, or a complete part the store manifest has not consolidated."""
    files = store_files(store)
    if not (store / MANIFEST).exists():
        return f"{len(files)} file(s) and no store manifest" if files else None
    manifest = json.loads((store / MANIFEST).read_text())
    if unlisted := sorted(files - committed_files(store, StoreReader(str(store)))):
        return f"{len(unlisted)} unlisted file(s), e.g. {unlisted[0]}"
    (committed,) = [p for p in manifest["parts"] if p["name"] == PART]
    if not committed.get("follow_head") and committed["segments"] != len(part_segments(store)):
        return "the part's head counts segments the store manifest does not"
    if part_is_complete(store) and not committed["complete"]:
        return "the part is complete, the store manifest has not consolidated it"
    return None


def fresh_store(tmp_path: Path, name: str) -> Path:
    store = tmp_path / name
    store.mkdir()  # exists, so a never-committed store reads as ManifestMissingError
    return store
