"""Committing a segment costs the same at the 2nd and at the 200th segment (issue 13 §1).

Every file the writer writes or reads goes through StoreFS, which the test wraps: a
commit (the `add()` that closes a segment) must write the same number of files and about
the same number of bytes whatever the number of segments already in the store, and read
nothing. Every sample has the same tokens and signal (only its id differs), so every
segment's data files have the same size and any growth would come from the commit itself.
"""

from __future__ import annotations

import copy

import pytest

from store_helpers import make_samples, make_settings, make_signal

from logitstore.fs import StoreFS
from logitstore.reader import StoreReader
from logitstore.verify import verify_store
from logitstore.writer import StoreWriter

SEGMENTS = 210
SETTINGS = make_settings(segment_tokens=8, signals={"teacher": make_signal(
    k=2, n_draws=None, hidden=None, attention=None)})


def same_samples(n: int):
    """n samples of 8 tokens with identical content and ids of one length."""
    (base,) = make_samples(1, 3, SETTINGS, lengths=[8])
    out = []
    for i in range(n):
        sample = copy.copy(base)
        sample.sample_id = f"doc-{i:06d}"
        out.append(sample)
    return out


class Traffic:
    """Files written (path, bytes) and files read through StoreFS since the last `take()`."""

    def __init__(self, monkeypatch):
        self.writes: list[tuple[str, int]] = []
        self.reads: list[str] = []
        write, read = StoreFS.write_bytes, StoreFS.read_bytes

        def write_bytes(fs, rel, data):
            self.writes.append((rel, len(data)))
            return write(fs, rel, data)

        def read_bytes(fs, rel, size=None):
            self.reads.append(rel)
            return read(fs, rel, size)

        monkeypatch.setattr(StoreFS, "write_bytes", write_bytes)
        monkeypatch.setattr(StoreFS, "read_bytes", read_bytes)

    def take(self) -> tuple[list[tuple[str, int]], list[str]]:
        out = (self.writes, self.reads)
        self.writes, self.reads = [], []
        return out


@pytest.mark.parametrize("commit_store", [True, False], ids=["single-writer", "rank"])
def test_commit_cost_does_not_grow_with_the_store(tmp_path, monkeypatch, commit_store):
    store = tmp_path / "store"
    writer = StoreWriter(str(store), SETTINGS, commit_store=commit_store)
    traffic = Traffic(monkeypatch)
    commits = []  # ([(file written, bytes)], files read) of each commit
    for sample in same_samples(SEGMENTS):
        before = writer.committed_count
        writer.add(sample)  # one sample fills a segment: every add() commits one
        assert writer.committed_count == before + 1
        commits.append(traffic.take())
    files = [len(writes) for writes, _ in commits]
    sizes = [sum(n for _, n in writes) for writes, _ in commits]
    print(f"commit 1: {files[0]} files, {sizes[0]} bytes; commit 2: {files[1]} files, "
          f"{sizes[1]} bytes; commit {SEGMENTS}: {files[-1]} files, {sizes[-1]} bytes")
    # The first commit of a single writer also registers its part in the store manifest.
    registering = 1 if commit_store else 0
    assert commits[0][0][-1][0] == "manifest.json" or not commit_store
    assert files[0] == files[1] + registering
    assert set(files[1:]) == {files[1]}, "files written per commit changed"
    # Registering reads the store manifest back (a consolidation may have raced it,
    # FORMAT.md section 8); no other commit reads anything.
    assert not any(reads for _, reads in commits[registering:]), "a commit read files back"
    assert all(rel == "manifest.json" or rel.startswith("index/")
               for rel in commits[0][1]), commits[0][1]
    assert max(sizes[1:]) <= 1.3 * min(sizes[1:]), (sizes[1], sizes[-1])
    assert sizes[-1] <= 1.3 * sizes[0]
    # Of those, the commit's own files (record, head): a few bytes more for bigger counts.
    own = [sum(n for rel, n in writes if "/records/" in rel or rel.endswith("/head.json"))
           for writes, _ in commits[1:]]
    assert own[-1] - own[0] <= 16, (own[0], own[-1])

    writer.close()  # consolidates (single writer) once: O(store), not per segment
    writes, _ = traffic.take()
    if commit_store:
        assert [rel for rel, _ in writes][-1] == "manifest.json"
    monkeypatch.undo()
    if not commit_store:
        from logitstore.commit import commit_store as consolidate

        consolidate(str(store))
    reader = StoreReader(str(store))
    assert len(reader) == SEGMENTS and len(reader.segments) == SEGMENTS
    assert verify_store(str(store)) == []
