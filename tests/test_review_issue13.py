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
                           ranks=SimpleNamespace(rank=0, world=1), foreign=None)
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


# -- the store manifest written by registrations and consolidations at the same time --------

def _race_setup(tmp_path):
    """A consolidated store (part a), an unconsolidated part c, samples for a part b."""
    store, settings = str(tmp_path / "store"), settings_for()
    samples = make(np.random.default_rng(4), 20, settings)
    with StoreWriter(store, settings, part="a") as writer:
        writer.add_many(samples[:10])
    other = StoreWriter(store, settings, part="c", commit_store=False)
    other.add_many(samples[15:])
    other.close()
    return store, settings, samples


@pytest.mark.parametrize("consolidations", [1, 2])
def test_consolidations_between_a_registrations_read_and_write(tmp_path, monkeypatch,
                                                                consolidations):
    """Part b registers (reads the manifest, writes it back with b followed) while one or
    two consolidations land in between: the store must stay readable (the registration's
    manifest named the deleted index before the fix), show what the consolidations added
    (part c), and follow b."""
    import logitstore.consolidate as consolidate

    store, settings, samples = _race_setup(tmp_path)
    real, fired = consolidate.previous_manifest, []

    def racing(fs):
        manifest = real(fs)
        if not fired:
            fired.append(1)
            for _ in range(consolidations):
                commit_store(store)
        return manifest

    monkeypatch.setattr(consolidate, "previous_manifest", racing)
    writer = StoreWriter(store, settings, part="b")
    writer.add_many(samples[10:13])
    writer.flush()  # the registration
    monkeypatch.setattr(consolidate, "previous_manifest", real)
    assert fired and len(StoreReader(store)) == 18  # a, c and b's first segment
    writer.add_many(samples[13:15])
    writer.flush()  # b is followed: its next segment is visible before any consolidation
    assert sorted(StoreReader(store).sample_ids) == sorted(s.sample_id for s in samples)
    writer.close()
    assert verify_store(store) == []


def test_a_registration_during_a_consolidation_stays_followed(tmp_path, monkeypatch):
    """Part b registers after the consolidation listed the heads, before it writes the
    manifest: the consolidation's manifest must keep b followed (before the fix it dropped
    b, whose segments then stayed invisible until the next consolidation)."""
    import logitstore.consolidate as consolidate

    store, settings, samples = _race_setup(tmp_path)
    writer = StoreWriter(store, settings, part="b")
    real = consolidate.read_heads

    def heads_then_registration(fs):
        heads = real(fs)
        writer.add_many(samples[10:13])
        writer.flush()  # b's first segment and its registration
        return heads

    monkeypatch.setattr(consolidate, "read_heads", heads_then_registration)
    commit_store(store)
    monkeypatch.setattr(consolidate, "read_heads", real)
    assert len(StoreReader(store)) == 18
    writer.add_many(samples[13:15])
    writer.flush()
    assert len(StoreReader(store)) == 20
    writer.close()
    assert verify_store(store) == []


def test_consolidation_keeps_one_generation_and_clears_leftovers(tmp_path):
    """index/ holds the files of the current and the previous manifest only: older ones
    and the leftovers of a crashed consolidation are deleted."""
    from logitstore.consolidate import previous_manifest
    from logitstore.fs import StoreFS

    store, settings, samples = _race_setup(tmp_path)
    fs = StoreFS(store)
    (tmp_path / "store" / "index" / "0123456789abcdef0123.parquet").write_bytes(b"crashed")
    named = []
    for start in (10, 13):
        with StoreWriter(store, settings, part=f"b{start}") as writer:
            writer.add_many(samples[start:start + 3 if start == 10 else 15])
        manifest = previous_manifest(fs)
        named.append({manifest["index"]["path"], manifest["catalog"]["path"],
                      f"index/manifest-{manifest['consolidation']:09d}.json"})
    assert {f"index/{n}" for n in fs.listdir("index")} == named[0] | named[1]
    assert len(StoreReader(store)) == 20 and verify_store(store) == []


# -- signal additions, provenance, cp --overwrite -------------------------------------------

def test_signal_appender_refuses_a_part_still_being_written(tmp_path):
    from logitstore.errors import LogitStoreError

    store, settings = _written_store(tmp_path / "store"), settings_for()
    running = StoreWriter(store, settings, part="running")
    running.add_many(make(np.random.default_rng(9), 19, settings)[15:])
    running.flush()  # committed segments, head complete: false
    with pytest.raises(LogitStoreError, match=r"\['running'\].*still being written"):
        SignalAppender(store, "second", SPEC)
    running.close()
    assert len(SignalAppender(store, "second", SPEC).pending()) >= 2


def test_merge_provenance_pins_a_followed_source(tmp_path):
    """A source whose followed part committed more segments has the same manifest bytes
    but another content: the provenance must tell them apart (state_sha256, and the job)."""
    from logitstore.merge import merge_stores

    store, settings = str(tmp_path / "store"), settings_for()
    samples = make(np.random.default_rng(5), 10, settings)
    writer = StoreWriter(store, settings, part="a")
    writer.add_many(samples[:5])
    writer.flush()
    first = merge_stores([store], str(tmp_path / "one")).provenance
    manifest_before = StoreReader(store).manifest_bytes
    writer.add_many(samples[5:])
    writer.flush()
    assert StoreReader(store).manifest_bytes == manifest_before  # the head moved, not it
    second = merge_stores([store], str(tmp_path / "two")).provenance
    writer.close()
    assert first["sources"][0]["manifest_sha256"] == second["sources"][0]["manifest_sha256"]
    assert first["sources"][0]["state_sha256"] != second["sources"][0]["state_sha256"]
    assert first["job"] != second["job"]


def test_cp_overwrite_removes_the_old_stores_parts(tmp_path):
    """The old target's parts that the new store lacks must go: a later `logitstore
    commit` of the target consolidated them into the copy before the fix."""
    from logitstore.errors import LogitStoreError

    source = _written_store(tmp_path / "source")
    target, settings = str(tmp_path / "target"), settings_for()
    with StoreWriter(target, settings, part="stale") as writer:
        writer.add_many(make(np.random.default_rng(8), 5, settings))
    copy_store(source, target, overwrite=True)
    assert not (tmp_path / "target" / "parts" / "stale").exists()
    commit_store(target)
    assert not content_differences(content_of(StoreReader(target)),
                                   content_of(StoreReader(source)))
    assert verify_store(target) == []
    with pytest.raises(LogitStoreError, match="would delete the store being copied"):
        copy_store(source, source, overwrite=True)
    assert len(StoreReader(source)) == 15
