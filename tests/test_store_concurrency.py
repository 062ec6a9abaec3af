"""Concurrency: several writer processes on one store, and readers beside a running writer.

Writers are subprocesses running `tests/crash_writer.py` (a fresh interpreter each, as
separate ranks of a dump would be); the protocol lines they print (READY, COMMITTED n, DONE)
let the test synchronise with them without sleeping.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from store_helpers import (assert_same_content, content_differences, content_of, make_samples,
                           make_settings, sample_content, settings_json)

from logitstore.commit import commit_store
from logitstore.errors import ManifestMissingError
from logitstore.fs import StoreFS
from logitstore.reader import StoreReader
from logitstore.verify import verify_store
from logitstore.writer import StoreWriter

N = 30
SEED = 8
SETTINGS = make_settings(segment_tokens=64)
WRITER_SCRIPT = Path(__file__).with_name("crash_writer.py")
TIMEOUT = 120  # seconds; only reached if a writer hangs


class Writer:
    """A writer subprocess speaking crash_writer's line protocol."""

    def __init__(self, store: Path, *extra: str):
        self.proc = subprocess.Popen(
            [sys.executable, str(WRITER_SCRIPT), str(store), "--n", str(N), "--seed", str(SEED),
             "--settings", settings_json(SETTINGS), *extra],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.lines: list[str] = []

    def expect(self, prefix: str) -> str:
        line = self.proc.stdout.readline().rstrip("\n")
        self.lines.append(line)
        assert line.startswith(prefix), f"expected {prefix!r} from the writer, got {line!r}"
        return line

    def go(self) -> None:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def finish(self) -> list[str]:
        out, _ = self.proc.communicate(timeout=TIMEOUT)
        self.lines += out.splitlines()
        assert self.proc.returncode == 0, self.lines
        assert self.lines[-1].startswith("DONE"), self.lines
        return self.lines

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            stream.close()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same samples written by one writer in this process (one part)."""
    path = tmp_path_factory.mktemp("concurrency") / "single"
    with StoreWriter(str(path), SETTINGS) as writer:
        writer.add_many(make_samples(N, SEED, SETTINGS))
    reader = StoreReader(str(path))
    assert verify_store(str(path)) == [] and len(reader) == N
    return reader, content_of(reader)


def test_two_processes_write_two_parts_at_once(reference, tmp_path):
    ref_reader, ref_content = reference
    store = tmp_path / "store"
    ids = [s.sample_id for s in make_samples(N, SEED, SETTINGS)]
    writers = [Writer(store, "--part", "rank-0", "--select", "even", "--no-commit", "--wait-go"),
               Writer(store, "--part", "rank-1", "--select", "odd", "--no-commit", "--wait-go")]
    try:
        for w in writers:
            w.expect("READY committed=0")
        for w in writers:  # both are open and ready: release them together
            w.go()
        for w in writers:
            assert w.finish()[-1].startswith(f"DONE committed={N // 2} ")
    finally:
        for w in writers:
            w.kill()

    # commit_store=False: nothing is visible until the store is committed
    with pytest.raises(ManifestMissingError):
        StoreReader(str(store))
    manifest = commit_store(str(store))
    assert manifest["counts"]["parts"] == 2 and manifest["counts"]["samples"] == N
    assert all(part["complete"] for part in manifest["parts"])
    assert verify_store(str(store)) == []

    reader = StoreReader(str(store))
    assert sorted(reader.sample_ids) == sorted(ids)
    parts = reader.index.column("part").to_pylist()
    by_part = {p: [sid for sid, q in zip(reader.sample_ids, parts) if q == p] for p in set(parts)}
    assert by_part == {"rank-0": ids[0::2], "rank-1": ids[1::2]}  # each in its write order
    # same content as one writer of the same samples, compared by id; same fingerprint
    assert_same_content(reader, ref_reader)
    assert manifest["dataset_fingerprint"] == ref_reader.manifest["dataset_fingerprint"]
    for sid in (ids[0], ids[1], ids[-1]):  # random access across both parts
        assert not content_differences({sid: sample_content(reader.sample(sid))},
                                       {sid: ref_content[sid]})


def test_two_ranks_committing_at_the_same_moment_lose_nothing(reference, tmp_path):
    """Two ranks commit their segments at the same moments (released together after each
    commit), while this process consolidates the store between their commits: every
    consolidation holds exactly what each rank's head had committed, the store verifies,
    and the final store holds every sample of both, as written."""
    ref_reader, _ = reference
    store = tmp_path / "store"
    ids = [s.sample_id for s in make_samples(N, SEED, SETTINGS)]
    writers = [Writer(store, "--part", f"rank-{r}", "--select", sel, "--no-commit", "--wait-go",
                      "--lockstep", "3") for r, sel in ((0, "even"), (1, "odd"))]
    try:
        for w in writers:
            w.expect("READY committed=0")
        for w in writers:
            w.go()
        for _ in range(3):
            done = [int(w.expect("COMMITTED ").split()[1]) for w in writers]
            manifest = commit_store(str(store))  # both paused right after a commit
            parts = {p["name"]: sum(s["samples"] for s in p["segments"])
                     for p in manifest["parts"]}
            assert parts == {"rank-0": done[0], "rank-1": done[1]}
            assert verify_store(str(store)) == []
            reader = StoreReader(str(store))
            assert sorted(reader.sample_ids) == sorted(ids[0::2][:done[0]] + ids[1::2][:done[1]])
            for w in writers:  # release both together: their next commits coincide
                w.go()
        for w in writers:
            w.finish()
    finally:
        for w in writers:
            w.kill()
    manifest = commit_store(str(store))
    assert manifest["counts"]["samples"] == N and all(p["complete"] for p in manifest["parts"])
    assert verify_store(str(store)) == []
    assert_same_content(StoreReader(str(store)), ref_reader)


def check_visible(reader: StoreReader, ids: list[str], ref_content: dict) -> int:
    """Everything a reader lists is a committed prefix of the write order and reads back
    exactly as written; returns how many samples it lists."""
    n = len(reader)
    assert reader.sample_ids == ids[:n]
    assert reader.manifest["counts"]["samples"] == n
    problems = content_differences(content_of(reader), {i: ref_content[i] for i in ids[:n]})
    assert not problems, problems
    return n


def test_reader_beside_a_running_writer_sees_only_committed_data(reference, tmp_path):
    ref_reader, ref_content = reference
    ids = [s.sample_id for s in make_samples(N, SEED, SETTINGS)]
    store = tmp_path / "store"
    store.mkdir()
    # commits after every segment; pauses after each of its first 2 commits until told to go
    # on, then writes the rest slowly (20 ms per sample) while this test keeps reading
    writer = Writer(store, "--lockstep", "2", "--sleep", "0.02")
    try:
        writer.expect("READY committed=0")
        with pytest.raises(ManifestMissingError):
            StoreReader(str(store))
        paused = []
        for _ in range(2):
            committed = int(writer.expect("COMMITTED ").split()[1])
            # the writer is paused right after this commit: a reader sees exactly that
            reader = StoreReader(str(store))
            assert check_visible(reader, ids, ref_content) == committed
            assert verify_store(str(store)) == []
            paused.append(reader)
            writer.go()
        assert 0 < len(paused[0]) < len(paused[1]) < N

        # Free run until the writer ends: open readers in bursts of 10 (each open races the
        # writer's commits). Every reader's index rows are exactly the committed prefix
        # (cheap: checked for all its samples); the samples that became visible since the
        # previous check, and the last one, are decoded and compared.
        counts = [len(paused[1])]
        checked = counts[-1]
        ref_rows = ref_reader.index.select(["sample_id", "length", "digest"]).to_pylist()
        while writer.proc.poll() is None:
            for _ in range(10):
                reader = StoreReader(str(store))
                n = len(reader)
                assert n >= counts[-1], f"the committed count went back: {counts + [n]}"
                assert reader.manifest["counts"]["samples"] == n
                assert reader.index.select(["sample_id", "length", "digest"]).to_pylist() == \
                    ref_rows[:n]
                counts.append(n)
            fresh = ids[checked:n] or ids[n - 1:n]
            got = {sid: sample_content(reader.sample(sid)) for sid in fresh}
            problems = content_differences(got, {sid: ref_content[sid] for sid in fresh})
            assert not problems, problems
            checked = n
        writer.finish()
    finally:
        writer.kill()

    final = StoreReader(str(store))
    assert len(final) == N and final.sample_ids == ids
    assert verify_store(str(store)) == []
    assert_same_content(final, ref_reader)
    # readers opened earlier still read their (immutable) committed samples after later
    # commits replaced the manifest and its index
    for old in paused:
        assert check_visible(old, ids, ref_content) == len(old)
    print(f"{len(counts) - 1} readers opened while writing; counts seen: {sorted(set(counts))}")


class SegmentWriter:
    """A writer in this process that writes one segment at a time, committing the store
    after each (unless `commit_store` is False)."""

    def __init__(self, store: Path, commit_store: bool = True):
        self.samples = iter(make_samples(N, SEED, SETTINGS))
        self.writer = StoreWriter(str(store), SETTINGS, commit_store=commit_store)

    def commit_one_segment(self) -> None:
        before = self.writer.committed_count
        while self.writer.committed_count == before:
            self.writer.add(next(self.samples))


def commit_while_reading(monkeypatch, store: Path, writer: SegmentWriter) -> list[str]:
    """After one commit and consolidation, make the next read of its index first commit
    and consolidate twice (new manifests, then that index deleted): the race of
    a tool beside a running writer. Returns a list that holds the index path once the race
    has fired."""
    writer.commit_one_segment()
    commit_store(str(store))
    first_index = json.loads((store / "manifest.json").read_text())["index"]["path"]
    real_read = StoreFS.read_bytes
    fired: list[str] = []

    def read_bytes(fs, rel, size=None):
        if rel == first_index and not fired:  # about to read the index
            fired.append(rel)
            for _ in range(2):  # a consolidation keeps the previous generation's files
                writer.commit_one_segment()
                commit_store(str(store))
            assert not (store / first_index).exists()
        return real_read(fs, rel, size)

    monkeypatch.setattr(StoreFS, "read_bytes", read_bytes)
    return fired


def test_commit_between_a_readers_manifest_and_index_reads(reference, tmp_path, monkeypatch):
    """The race a reader beside a running writer can lose, made deterministic: a commit lands
    after the reader has read the manifest and before it reads the index that manifest
    names (which the commit deletes). The reader must open the newer committed state."""
    _, ref_content = reference
    ids = [s.sample_id for s in make_samples(N, SEED, SETTINGS)]
    store = tmp_path / "store"
    segments = SegmentWriter(store, commit_store=False)
    writer = segments.writer
    fired = commit_while_reading(monkeypatch, store, segments)
    reader = StoreReader(str(store))
    monkeypatch.undo()
    assert fired
    assert reader.manifest["index"]["path"] != fired[0]
    assert check_visible(reader, ids, ref_content) == writer.committed_count
    writer.abort()


@pytest.mark.parametrize("tool", ["verify", "cp"])
def test_verify_and_cp_survive_a_commit_between_manifest_and_index_reads(tmp_path, monkeypatch,
                                                                         tool):
    """The same race for `logitstore verify` and `logitstore cp`: a commit deletes the index
    they were about to read. verify must report a clean store (the newer commit), cp must
    copy one whole commit and write the manifest it read, not a newer one."""
    from logitstore.transfer import copy_store

    store = tmp_path / "store"
    segments = SegmentWriter(store, commit_store=False)
    writer = segments.writer
    fired = commit_while_reading(monkeypatch, store, segments)
    if tool == "verify":
        assert verify_store(str(store)) == []
    else:
        copy_store(str(store), str(tmp_path / "copy"))
    monkeypatch.undo()
    assert fired
    if tool == "cp":
        copy = StoreReader(str(tmp_path / "copy"))
        assert verify_store(str(tmp_path / "copy")) == []
        assert len(copy) == writer.committed_count  # the commit it read, whole
    segments.commit_one_segment()  # a third commit: the copy must not follow the source
    commit_store(str(store))
    if tool == "cp":
        assert len(StoreReader(str(tmp_path / "copy"))) < writer.committed_count
    writer.abort()


def test_cp_of_a_part_moved_past_the_commit_copies_the_committed_part(tmp_path):
    """A writer added a segment to its part after the last commit (its part manifest lists
    it; the store manifest does not). `cp` copies only the committed segments, so the copy's
    part manifest must be the committed one: the copy verifies, its part resumes from the
    committed samples, and `logitstore commit` on it lists only files that exist."""
    from click.testing import CliRunner

    from logitstore.cli import main as cli
    from logitstore.transfer import copy_store

    store, part_rel = tmp_path / "store", "parts/part-00000/head.json"
    segments = SegmentWriter(store, commit_store=False)  # as a rank: commits made by hand
    writer = segments.writer
    for _ in range(2):
        segments.commit_one_segment()
    commit_store(str(store))
    committed_ids = sorted(writer.committed_ids)
    snapshot = content_of(StoreReader(str(store)))
    copy_store(str(store), str(tmp_path / "quiet"))  # nothing moved: the very same bytes
    assert (tmp_path / "quiet" / part_rel).read_bytes() == (store / part_rel).read_bytes()

    segments.commit_one_segment()  # the part moves on; the store is not committed
    writer.abort()
    copy = tmp_path / "copy"
    copy_store(str(store), str(copy))
    assert verify_store(str(copy)) == []
    assert not content_differences(content_of(StoreReader(str(copy))), snapshot)

    resumed = StoreWriter(str(copy), SETTINGS, commit_store=False)  # resumes part-00000
    assert sorted(resumed.committed_ids) == committed_ids
    resumed.close()  # marks the part complete; the commit below lists it
    result = CliRunner().invoke(cli, ["commit", str(copy)])
    assert result.exit_code == 0, result.output
    assert verify_store(str(copy)) == []
    reader = StoreReader(str(copy))
    assert reader.manifest["parts"][0]["complete"]
    assert not content_differences(content_of(reader), snapshot)


def test_cp_of_a_half_added_signal_copies_the_committed_part(tmp_path):
    """A signal appender (no commits: a rank) wrote its signal into the first committed
    segment and listed the new files in the part manifest. The copy's part manifest must
    not list them (they are not copied), so an appender on the copy starts from scratch."""
    import numpy as np

    from logitstore.signal_writer import SignalAppender
    from logitstore.transfer import copy_store
    from test_store_add_signal import SPEC, second_signal
    from test_store_roundtrip import make, settings_for

    store, copy = tmp_path / "store", tmp_path / "copy"
    settings = settings_for()
    with StoreWriter(str(store), settings) as writer:
        writer.add_many(make(np.random.default_rng(4), 15, settings))
    snapshot = content_of(StoreReader(str(store)))
    appender = SignalAppender(str(store), "second", SPEC, commit_store=False)
    jobs = appender.pending()
    assert len(jobs) > 1
    appender.write(jobs[0], [second_signal(i, n) for i, n in zip(jobs[0].sample_ids,
                                                                 jobs[0].lengths)])
    copy_store(str(store), str(copy))
    assert verify_store(str(copy)) == []
    assert not content_differences(content_of(StoreReader(str(copy))), snapshot)
    assert [j.segment for j in SignalAppender(str(copy), "second", SPEC).pending()] == \
        [j.segment for j in jobs]
