"""Review of issue 13's format 2.0 and store operations: each test reproduces a bug found in
review (it failed before the fix next to it)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import numpy as np

from logitstore.commit import commit_store
from logitstore.reader import StoreReader
from logitstore.signal_writer import SignalAppender
from logitstore.transfer import copy_store
from logitstore.verify import verify_store
from logitstore.writer import StoreWriter
from store_helpers import content_differences, content_of
from test_store_add_signal import SPEC, second_signal
from test_store_roundtrip import make, settings_for


def _written_store(path) -> str:
    settings = settings_for()
    with StoreWriter(str(path), settings) as writer:  # one followed part, consolidated
        writer.add_many(make(np.random.default_rng(4), 15, settings))
    return str(path)


def _add_every_segment(appender: SignalAppender) -> None:
    for job in appender.pending():
        appender.write(job, [second_signal(i, n) for i, n in zip(job.sample_ids, job.lengths)])


def test_cp_of_a_followed_part_whose_head_holds_an_unconsolidated_signal(tmp_path):
    """The head of a followed part gained a signal (every segment holds it) that no
    consolidation has listed yet (a rank of a multi-process add-signal, or a kill before
    the appender's commit). `cp` does not copy that signal's files and records, so the
    copy's head must not claim the signal: else consolidating the copy fails on the
    addition records it lacks, although verify finds the copy clean."""
    store = _written_store(tmp_path / "store")
    snapshot = content_of(StoreReader(store))
    _add_every_segment(SignalAppender(store, "second", SPEC, commit_store=False))
    copy = str(tmp_path / "copy")
    copy_store(store, copy)
    assert verify_store(copy) == []
    commit_store(copy)  # MissingFileError (an addition record) before the fix
    assert verify_store(copy) == []
    reader = StoreReader(copy)
    assert reader.signals == ["teacher"]
    assert not content_differences(content_of(reader), snapshot)
    # The signal can be added to the copy from scratch.
    assert len(SignalAppender(copy, "second", SPEC).pending()) == len(reader.segments)


def test_add_signal_rerun_after_a_kill_before_the_head_names_the_signal(tmp_path, monkeypatch):
    """Killed after the last segment's addition record, before the part's head names the
    signal: a rerun of teacher-dump's add-signal finds no pending segment. It must still
    finish the part (head, then commit), or the signal never reaches the store."""
    from teacher_dump.batch_loops import add_signal

    store = _written_store(tmp_path / "store")
    killed = SignalAppender(store, "second", SPEC)
    monkeypatch.setattr(killed, "_finish_parts", lambda: None)  # the kill: heads not written
    monkeypatch.setattr(killed, "_commit_if_consistent", lambda: None)
    _add_every_segment(killed)
    assert StoreReader(store).signals == ["teacher"]
    work = SimpleNamespace(cfg=SimpleNamespace(out=store, signal="second"),
                           ranks=SimpleNamespace(rank=0, world=1))
    add_signal(work, SPEC, SimpleNamespace(parts={"part-00000": True}))
    assert sorted(StoreReader(store).signals) == ["second", "teacher"]
    assert verify_store(store) == []


@pytest.fixture(scope="module")
def s3():
    """test_store_remote's moto S3 server (skipped where moto or s3fs is not installed)."""
    remote = pytest.importorskip("test_store_remote")
    yield from remote.s3.__wrapped__()


def test_consolidation_on_s3_sees_a_part_created_by_another_process(s3):
    """s3fs caches directory listings per filesystem instance, without expiry. The main
    process of a multi-process dump lists `parts/` when it inspects the store; a rank then
    creates its part in another process. The consolidation must list `parts/` afresh, or
    it commits the store without that part (and the dump reports success)."""
    from logitstore.records import read_heads
    from logitstore.fs import StoreFS
    from store_helpers import make_samples
    from test_store_remote import SMALL

    url = s3.url("review-listing")
    samples = make_samples(6, 3, SMALL)
    with StoreWriter(url, SMALL, part="rank-00", storage_options=s3.options,
                     commit_store=False) as rank0:
        rank0.add_many(samples[:3])
    assert list(read_heads(StoreFS(url, s3.options))) == ["rank-00"]  # the main's listing
    other_process = {**s3.options, "skip_instance_cache": True}  # its own s3fs instance
    with StoreWriter(url, SMALL, part="rank-01", storage_options=other_process,
                     commit_store=False) as rank1:
        rank1.add_many(samples[3:])
    state = commit_store(url, storage_options=s3.options)
    assert [p["name"] for p in state["parts"]] == ["rank-00", "rank-01"]
    assert state["counts"]["samples"] == 6
