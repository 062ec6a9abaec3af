"""The store stream's plan: which store rows each shard reads, in which order and batches.

Pure functions over integers and numpy arrays (no reader, no torch, no I/O), so that every
decision of `student_train.stream.StoreStream` can be tested on made-up stores. The stream
gathers the metadata once (`StoreRows`: lengths, segments, selected rows, curriculum levels)
and executes the `EpochPlan` these functions make for (settings, epoch, worker).

An epoch, for one shard (shard = rank * num_workers + worker, of world_size * num_workers):
1. `shard_rows`: the segments holding selected rows, permuted by (seed, epoch) when shuffled,
   each segment's rows in store order; then the shard's share: whole segments given greedily
   to the least-loaded shard ("segments"), or every K-th row ("rows"); `partition_mode`
   picks one for "auto".
2. `shard_order`: curriculum levels ascending (stable), then a shuffle buffer within each
   level (`buffer_shuffle`), seeded by (seed, epoch, rank, worker).
3. `batch_layout`: the token-budget batcher (`logitstore.toolkit.batching`), padded or packed.
4. `read_groups`: which rows one segment read provides, and for which batch.
Resuming (`resume_counts`) needs only (epoch, batches consumed per worker): the plan is a
pure function of the settings, so it is made again and the consumed batches are skipped.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from logitstore.toolkit.batching import packed_batches, padded_batches

ORDERS = ("shuffle", "sequential", "curriculum")
PARTITIONS = ("auto", "segments", "rows")
MIN_SEGMENTS_PER_SHARD = 4  # "auto" partitions whole segments from this many per shard

# A batch's layout: rows of store rows (one store row per row when padding).
Layout = list[list[int]]


def check(ok: bool, message: str) -> None:
    """The stream's argument errors are ValueErrors (sources.py reports them as config
    problems)."""
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True)
class PlanSettings:
    """Everything besides the store that decides a plan (checked when made)."""

    seed: int = 0
    order: str = "shuffle"  # one of ORDERS
    shuffle: bool = True  # False: store order whatever `order` says, except curriculum levels
    shuffle_buffer: int = 2048
    batch_tokens: int = 4096
    max_batch_size: int | None = None
    packing: bool = False
    pack_length: int | None = None  # packing: tokens per row (default: batch_tokens)
    partition: str = "auto"  # one of PARTITIONS
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        check(self.order in ORDERS, f"order must be one of {ORDERS}, found {self.order!r}")
        check(self.partition in PARTITIONS,
              f"partition must be one of {PARTITIONS}, found {self.partition!r}")
        check(self.batch_tokens >= 1 and self.shuffle_buffer >= 1,
              f"batch_tokens and shuffle_buffer must be >= 1, found {self.batch_tokens}, "
              f"{self.shuffle_buffer}")
        check(self.max_batch_size is None or self.max_batch_size >= 1,
              f"max_batch_size must be None or >= 1, found {self.max_batch_size}")
        check(self.pack_length is None or 1 <= self.pack_length <= self.batch_tokens,
              f"pack_length must be in [1, batch_tokens={self.batch_tokens}], found "
              f"{self.pack_length}")
        check(self.world_size >= 1 and 0 <= self.rank < self.world_size,
              f"need 0 <= rank < world_size, found rank={self.rank}, "
              f"world_size={self.world_size}")

    @property
    def shuffled(self) -> bool:
        return self.shuffle and self.order != "sequential"

    @property
    def curriculum(self) -> bool:
        return self.order == "curriculum"


@dataclass(frozen=True)
class StoreRows:
    """What planning knows of a store: per store row, its length, segment and curriculum
    level, and which rows are selected. Picklable: DataLoader workers get a copy."""

    length: np.ndarray  # [n] int64 tokens
    segment: np.ndarray  # [n] int64 segment holding the row
    n_segments: int
    selected: np.ndarray  # [m] int64 store rows, ascending
    level: np.ndarray  # [n] int64 curriculum level, 0 when not curriculum

    @classmethod
    def of(cls, segment_samples: list[int], length: np.ndarray, selected: np.ndarray,
           level: np.ndarray | None = None) -> "StoreRows":
        """From the samples per segment (store order) and the per-row arrays."""
        n = int(sum(segment_samples))
        segment = np.repeat(np.arange(len(segment_samples)), segment_samples).astype(np.int64)
        return cls(np.asarray(length, np.int64), segment, len(segment_samples),
                   np.asarray(selected, np.int64),
                   np.zeros(n, np.int64) if level is None else np.asarray(level, np.int64))

    def digest(self) -> str:
        """sha256 of the selection and its levels: a saved state must plan the same rows."""
        data = self.selected.tobytes() + self.level[self.selected].tobytes()
        return hashlib.sha256(data).hexdigest()


@dataclass
class EpochPlan:
    """One shard's epoch: its batches, and the rows each segment read provides."""

    batches: list[Layout]
    # (segment, level) -> [(store row, batch number)]
    reads: dict[tuple[int, int], list[tuple[int, int]]] = field(default_factory=dict)


# -- selection -------------------------------------------------------------------------------

def select_rows(n: int, *, in_split: np.ndarray | None = None, rows: Any = None,
                accept: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """Store rows (ascending) in the split (`in_split`: [n] bool), among `rows` (if given)
    and accepted by `accept` (candidate rows -> [len] bool, asked once, about the rows the
    other two criteria kept)."""
    keep = np.ones(n, bool) if in_split is None else np.asarray(in_split, bool).copy()
    if rows is not None:
        rows = np.asarray(rows, np.int64)
        check(rows.size == 0 or (rows.min() >= 0 and rows.max() < n),
              f"rows must be store rows in [0, {n})")
        chosen = np.zeros(n, bool)
        chosen[rows] = True
        keep &= chosen
    if accept is not None:
        candidates = np.flatnonzero(keep)
        keep[candidates] = np.asarray(accept(candidates), bool)
    return np.flatnonzero(keep)


def curriculum_levels(values: list) -> np.ndarray:
    """Level of each value: the rank of its value among the distinct ones, None last."""
    distinct = sorted({v for v in values if v is not None})
    level = {v: i for i, v in enumerate(distinct)}
    return np.array([len(distinct) if v is None else level[v] for v in values], np.int64)


# -- partition -------------------------------------------------------------------------------

def partition_mode(partition: str, n_segments: int, shards: int) -> str:
    """"segments" or "rows": "auto" reads whole segments once there are enough per shard."""
    if partition != "auto":
        return partition
    return "segments" if n_segments >= MIN_SEGMENTS_PER_SHARD * shards else "rows"


def shard_rows(store: StoreRows, settings: PlanSettings, epoch: int, shards: int,
               shard: int) -> np.ndarray:
    """Store rows of one shard, segment by segment in epoch order (module docstring, 1)."""
    segs = store.segment[store.selected]
    eligible = np.unique(segs)
    if settings.shuffled:
        eligible = np.random.default_rng([settings.seed, epoch, 1]).permutation(eligible)
    seg_rank = np.zeros(store.n_segments, np.int64)
    seg_rank[eligible] = np.arange(len(eligible))
    ordered = store.selected[np.argsort(seg_rank[segs], kind="stable")]
    if shards == 1:
        return ordered
    if partition_mode(settings.partition, len(eligible), shards) == "rows":
        return ordered[shard::shards]
    tokens = np.bincount(segs, weights=store.length[store.selected], minlength=store.n_segments)
    load = np.zeros(shards)
    mine = np.zeros(store.n_segments, bool)
    for s in eligible:  # greedy: the least-loaded shard takes the next segment
        target = int(np.argmin(load))
        load[target] += tokens[s]
        mine[s] = target == shard
    return ordered[mine[store.segment[ordered]]]


# -- order within a shard --------------------------------------------------------------------

def buffer_shuffle(seq: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Order of a streaming shuffle buffer: fill `size`, then emit a random slot and refill it."""
    items = np.asarray(seq, np.int64).tolist()
    buf, out = items[:size], []
    picks = rng.integers(0, len(buf), max(0, len(items) - size)).tolist() if buf else []
    for item, j in zip(items[size:], picks):
        out.append(buf[j])
        buf[j] = item
    out.extend(buf[i] for i in rng.permutation(len(buf)).tolist())  # drain in random order
    return np.asarray(out, np.int64)


def shard_order(seq: np.ndarray, level: np.ndarray, settings: PlanSettings, epoch: int,
                worker: int) -> np.ndarray:
    """The shard's rows in stream order (module docstring, 2)."""
    if settings.curriculum:
        seq = seq[np.argsort(level[seq], kind="stable")]
    if not settings.shuffled or seq.size == 0:
        return seq
    rng = np.random.default_rng([settings.seed, epoch, settings.rank, worker, 2])
    cuts = np.flatnonzero(np.diff(level[seq])) + 1
    return np.concatenate([buffer_shuffle(part, settings.shuffle_buffer, rng)
                           for part in np.split(seq, cuts)])


# -- batches ---------------------------------------------------------------------------------

def batch_layout(seq: np.ndarray, length: np.ndarray, settings: PlanSettings) -> list[Layout]:
    """`seq` cut into batches by the token budget: one row per sample (padding), or rows of
    `pack_length` tokens, at most batch_tokens // pack_length of them (packing)."""
    if not settings.packing:
        return [[[r] for r in batch] for batch in
                padded_batches(length, settings.batch_tokens, order=seq,
                               max_size=settings.max_batch_size)]
    row_tokens = settings.pack_length or settings.batch_tokens
    max_rows = max(1, settings.batch_tokens // row_tokens)
    if settings.max_batch_size:
        max_rows = min(max_rows, settings.max_batch_size)
    return packed_batches(length, row_tokens, max_rows, order=seq)


def read_groups(batches: list[Layout], store: StoreRows) -> dict[tuple[int, int],
                                                                   list[tuple[int, int]]]:
    """(segment, level) -> [(row, batch number)]: the rows one read of a segment provides.
    In curriculum order a segment is read once per level it holds."""
    reads: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for b, layout in enumerate(batches):
        for row in layout:
            for r in row:
                key = (int(store.segment[r]), int(store.level[r]))
                reads.setdefault(key, []).append((r, b))
    return reads


def plan_epoch(store: StoreRows, settings: PlanSettings, epoch: int, num_workers: int,
               worker: int) -> EpochPlan:
    """The plan of worker `worker` (of `num_workers`) of this rank for `epoch`."""
    shards = settings.world_size * num_workers
    seq = shard_rows(store, settings, epoch, shards, settings.rank * num_workers + worker)
    seq = shard_order(seq, store.level, settings, epoch, worker)
    batches = batch_layout(seq, store.length, settings)
    return EpochPlan(batches, read_groups(batches, store))


# -- resume ----------------------------------------------------------------------------------

def resume_counts(saved: dict[str, Any] | None, epoch: int, rank: int,
                  num_workers: int) -> tuple[list[int], int]:
    """(batches already consumed per worker, worker rotation) for an iteration of `epoch`
    starting now, from a saved stream state not yet resumed (None: start at batch 0).

    Batch i of an epoch comes from worker i % num_workers (DataLoader's round-robin), so the
    rotation makes the worker that was next yield first. Another rank's state is valid for
    ranks stepping in lockstep (DDP): its batch count gives every worker's.
    """
    if saved is None or saved["epoch"] != epoch or saved["batches"] == 0:
        return [0] * num_workers, 0
    if saved["num_workers"] != num_workers:
        raise ValueError(f"the saved stream state was taken with {saved['num_workers']} "
                         f"DataLoader worker(s) (0 and 1 count as 1), this run has "
                         f"{num_workers}: resume with the same number of workers")
    if saved["rank"] == rank:
        counts = list(saved["worker_batches"])
    else:
        counts = [len(range(w, saved["batches"], num_workers)) for w in range(num_workers)]
    return counts, saved["batches"] % num_workers


def plan_config(settings: PlanSettings, store: StoreRows) -> dict[str, Any]:
    """What a saved state must agree on to be resumed (compared key by key)."""
    return {"seed": settings.seed, "order": settings.order, "shuffled": settings.shuffled,
            "shuffle_buffer": settings.shuffle_buffer, "batch_tokens": settings.batch_tokens,
            "max_batch_size": settings.max_batch_size, "packing": settings.packing,
            "pack_length": settings.pack_length, "partition": settings.partition,
            "world_size": settings.world_size, "rows_sha256": store.digest()}
