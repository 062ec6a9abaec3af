"""student_train.stream_plan: the stream's decisions on made-up stores (no store, no I/O)."""

import numpy as np
import pytest

from student_train.stream_plan import (PlanSettings, StoreRows, batch_layout, buffer_shuffle,
                                       curriculum_levels, partition_mode, plan_config,
                                       plan_epoch, read_groups, resume_counts, select_rows,
                                       shard_order, shard_rows)


def made_up_store(segments=24, seed=0, curriculum=False) -> StoreRows:
    """`segments` segments of 2..6 rows, lengths 1..40, every 5th row unselected."""
    rng = np.random.default_rng(seed)
    per_segment = rng.integers(2, 7, segments).tolist()
    n = sum(per_segment)
    length = rng.integers(1, 41, n)
    selected = np.array([r for r in range(n) if r % 5 != 4])
    level = None
    if curriculum:
        level = np.zeros(n, np.int64)
        level[selected] = rng.integers(0, 3, selected.size)
    return StoreRows.of(per_segment, length, selected, level)


# -- selection ------------------------------------------------------------------------------

def test_select_rows_combines_split_rows_and_filter():
    in_split = np.array([True, True, False, True, True, True])
    asked = []

    def accept(candidates):
        asked.append(candidates.tolist())
        return candidates % 2 == 1

    assert select_rows(6).tolist() == list(range(6))
    assert select_rows(6, in_split=in_split, rows=[0, 1, 2, 5], accept=accept).tolist() == [1, 5]
    assert asked == [[0, 1, 5]]  # asked once, only about what split and rows kept
    with pytest.raises(ValueError, match=r"store rows in \[0, 6\)"):
        select_rows(6, rows=[6])


def test_curriculum_levels_rank_values_nulls_last():
    assert curriculum_levels([3, None, 1, 3, 7]).tolist() == [1, 3, 0, 1, 2]
    assert curriculum_levels(["b", "a"]).tolist() == [1, 0]


# -- partition ------------------------------------------------------------------------------

def test_partition_mode_auto_needs_four_segments_per_shard():
    assert partition_mode("auto", 16, 4) == "segments"
    assert partition_mode("auto", 15, 4) == "rows"
    assert partition_mode("rows", 100, 1) == "rows"


@pytest.mark.parametrize("partition", ["segments", "rows"])
@pytest.mark.parametrize("shards", [1, 3, 4])
def test_every_selected_row_lands_in_exactly_one_shard(partition, shards):
    store = made_up_store()
    settings = PlanSettings(partition=partition, seed=2)
    parts = [shard_rows(store, settings, 1, shards, k) for k in range(shards)]
    assert sorted(np.concatenate(parts).tolist()) == store.selected.tolist()
    if partition == "rows":
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= 1
    elif shards > 1:  # whole segments: no segment shared by two shards
        owners = [set(store.segment[p].tolist()) for p in parts]
        assert all(not owners[a] & owners[b] for a in range(shards) for b in range(a))


def test_segment_order_follows_seed_and_epoch_or_store_order():
    store = made_up_store()

    def order(epoch, **kw):
        return shard_rows(store, PlanSettings(**kw), epoch, 1, 0).tolist()

    assert order(0, seed=1) == order(0, seed=1)
    assert order(0, seed=1) != order(1, seed=1) != order(0, seed=2)
    assert order(3, order="sequential") == store.selected.tolist()
    assert order(3, shuffle=False) == store.selected.tolist()
    segments = store.segment[order(0, seed=1)]
    assert (np.diff(segments) != 0).sum() == len(np.unique(segments)) - 1  # contiguous


# -- order within a shard ----------------------------------------------------------------------

def test_buffer_shuffle_is_a_permutation_and_local_for_small_buffers():
    seq = np.arange(50)
    rng = np.random.default_rng(0)
    assert buffer_shuffle(seq, 1, rng).tolist() == seq.tolist()  # a buffer of 1 keeps order
    out = buffer_shuffle(seq, 8, np.random.default_rng(0))
    assert sorted(out.tolist()) == seq.tolist() and out.tolist() != seq.tolist()
    assert out[0] < 8  # the first sample out was among the first 8 in
    assert buffer_shuffle(np.arange(0), 8, rng).size == 0


def test_curriculum_order_goes_up_the_levels_and_shuffles_within():
    store = made_up_store(curriculum=True)
    settings = PlanSettings(order="curriculum", shuffle_buffer=4, seed=5)
    seq = store.selected
    a = shard_order(seq, store.level, settings, 0, 0)
    b = shard_order(seq, store.level, settings, 1, 0)
    assert sorted(a.tolist()) == seq.tolist()
    assert np.all(np.diff(store.level[a]) >= 0) and a.tolist() != b.tolist()
    assert store.level[a].tolist() == store.level[b].tolist()
    assert shard_order(seq, store.level, settings, 0, 1).tolist() != a.tolist()  # per worker


# -- batches, reads, whole epochs -----------------------------------------------------------

def test_batch_layout_padding_and_packing_budgets():
    store = made_up_store()
    seq = store.selected
    padded = batch_layout(seq, store.length, PlanSettings(batch_tokens=90, max_batch_size=5))
    assert [r for b in padded for row in b for r in row] == seq.tolist()
    for b in padded:
        assert all(len(row) == 1 for row in b) and len(b) <= 5
        assert len(b) * max(store.length[row[0]] for row in b) <= 90 or len(b) == 1
    packed = batch_layout(seq, store.length, PlanSettings(batch_tokens=90, packing=True,
                                                          pack_length=45))
    assert sorted(r for b in packed for row in b for r in row) == seq.tolist()
    for b in packed:
        assert len(b) <= 2 and all(store.length[row].sum() <= 45 for row in b)


@pytest.mark.parametrize("curriculum", [False, True])
def test_plans_of_all_workers_cover_the_selection_and_name_every_read(curriculum):
    store = made_up_store(curriculum=curriculum)
    kw = dict(batch_tokens=80, shuffle_buffer=6, world_size=2,
              order="curriculum" if curriculum else "shuffle")
    seen = []
    for rank in (0, 1):
        for worker in (0, 1):
            plan = plan_epoch(store, PlanSettings(rank=rank, **kw), 2, 2, worker)
            rows = [r for b in plan.batches for row in b for r in row]
            seen += rows
            assert plan.reads == read_groups(plan.batches, store)
            listed = sorted(r for members in plan.reads.values() for r, _ in members)
            assert listed == sorted(rows)
            for (segment, level), members in plan.reads.items():
                assert all(store.segment[r] == segment and store.level[r] == level
                           for r, _ in members)
                batch_of = {r: b for b, layout in enumerate(plan.batches)
                            for row in layout for r in row}
                assert all(batch_of[r] == b for r, b in members)
    assert sorted(seen) == store.selected.tolist()


# -- resume and state ------------------------------------------------------------------------

def test_resume_counts():
    saved = {"epoch": 1, "batches": 5, "worker_batches": [3, 2], "num_workers": 2, "rank": 0}
    assert resume_counts(None, 1, 0, 2) == ([0, 0], 0)
    assert resume_counts(saved, 2, 0, 2) == ([0, 0], 0)  # another epoch: from its start
    assert resume_counts(saved, 1, 0, 2) == ([3, 2], 1)  # worker 1 was next
    assert resume_counts(saved, 1, 1, 2) == ([3, 2], 1)  # another rank, in lockstep
    uneven = {**saved, "worker_batches": [4, 1]}
    assert resume_counts(uneven, 1, 0, 2) == ([4, 1], 1)  # own rank: its own counts
    assert resume_counts(uneven, 1, 1, 2) == ([3, 2], 1)
    with pytest.raises(ValueError, match="same number of workers"):
        resume_counts(saved, 1, 0, 1)


def test_plan_config_names_what_a_resume_must_share():
    store = made_up_store()
    base = plan_config(PlanSettings(), store)
    assert base == plan_config(PlanSettings(rank=0), made_up_store())
    assert plan_config(PlanSettings(batch_tokens=4097), store)["batch_tokens"] == 4097
    fewer = StoreRows.of([2] * 2, np.ones(4, np.int64), np.array([0, 1]))
    more = StoreRows.of([2] * 2, np.ones(4, np.int64), np.array([0, 1, 2]))
    assert fewer.digest() != more.digest()


@pytest.mark.parametrize("kw, words", [
    (dict(order="random"), "order must be one of"),
    (dict(partition="files"), "partition must be one of"),
    (dict(batch_tokens=0), "batch_tokens and shuffle_buffer must be >= 1"),
    (dict(max_batch_size=0), "max_batch_size must be None or >= 1"),
    (dict(batch_tokens=10, pack_length=11), "pack_length must be in"),
    (dict(rank=2, world_size=2), "need 0 <= rank < world_size"),
])
def test_bad_settings_are_refused(kw, words):
    with pytest.raises(ValueError, match=words):
        PlanSettings(**kw)
