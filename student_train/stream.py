"""Stream training batches from a logitstore store: sharded, shuffled, token-budgeted, resumable.

    stream = StoreStream(url, signals=["teacher"], split="train", batch_tokens=8192, rank=r,
                         world_size=w)
    loader = stream.loader(num_workers=2)          # or DataLoader(stream, batch_size=None, ...)
    for epoch in range(start_epoch, epochs):
        stream.set_epoch(epoch)
        for batch in loader: ...                    # batch contract: student_train/collate.py
        ckpt["data"] = stream.state_dict()          # exact position, at any step

How one epoch is planned (metadata only: the sample index, never the arrays; the planning
functions are `student_train.stream_plan`, pure and testable without a store)
1. Selection: rows matching `split`, `rows` and `sample_filter` (weights from `sample_weight`).
2. Segment order: the segments holding selected rows, permuted by (seed, epoch) ("shuffle",
   "curriculum") or in store order ("sequential"); each segment's rows in store order.
3. Partition over K = world_size * num_workers shards, shard = rank * num_workers + worker:
   - "segments" (auto when there are >= 4 segments per shard): whole segments, each given in
     epoch order to the shard with the fewest tokens so far (greedy, so shards differ by at
     most about one segment). Every shard reads only its own segments.
   - "rows" (auto otherwise): the epoch's row sequence is strided, row p -> shard p % K.
     Shards are balanced to one sample, but each shard reads every segment holding one of
     its rows (up to K times the decoding work of "segments").
   Every selected sample lands in exactly one shard, every epoch.
4. Within a shard: "shuffle" runs a shuffle buffer of `shuffle_buffer` samples with an RNG
   seeded by (seed, epoch, rank, worker); "curriculum" first sorts rows by the
   `curriculum_key` tag (ascending, nulls last) and runs the buffer within each key value,
   so the stream goes easy -> hard and equal keys are shuffled.
5. Batching by token budget (`logitstore.toolkit.batching`): padding mode closes a batch
   before B * max_len would exceed `batch_tokens`; packing mode fills rows of `pack_length`
   tokens (default `batch_tokens`, i.e. one row per batch) first-fit, at most
   `batch_tokens // pack_length` rows, so both the sum of lengths and B * S stay <=
   `batch_tokens`. `max_batch_size` caps B. A sample longer than the budget (or than
   `pack_length`) is yielded alone, over budget, never cut.
This module executes the plan: a segment is read (whole, `read_segment`) when its first
planned row is needed, and only its rows still to come are kept, so memory is bounded by the
shuffle buffer plus one segment. In curriculum order a segment is read once per key value it
holds.

Resume: the plan is a pure function of (settings, seed, epoch, rank, worker), so the state is
just (epoch, batches yielded per worker). Restoring re-plans the epoch (index only) and skips
the consumed batches without reading their data: no cost beyond planning. With DataLoader
workers the main process cannot see what the workers yielded, so every batch carries
`stream_position` and the main process must `record(batch)` it; `loader()` does that. Batch i
of an epoch always comes from worker i % num_workers (DataLoader's round-robin), so a resumed
loader rotates worker ids to start with the worker that was next: the remaining batches come
in exactly the original order, as long as no worker had run out of batches when the state was
saved (otherwise: the same batches, each worker's in order, possibly interleaved differently).
Resuming needs the same world_size and number of workers; ranks in lockstep (DDP) may all load
rank 0's state. Do not use `persistent_workers=True`: workers would keep a stale epoch.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow.compute as pc
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from logitstore.reader import StoreReader
from student_train.collate import collate
from student_train.stream_plan import (EpochPlan, PlanSettings, StoreRows, check,
                                       curriculum_levels, plan_config, plan_epoch,
                                       resume_counts, select_rows)

STATE_VERSION = 1


def is_held_out(sample_id: str, fraction: float, seed: int = 0) -> bool:
    """The one hold-out rule (store rows and --data samples alike): hash(seed, id) < fraction."""
    digest = hashlib.blake2b(f"{seed}\0{sample_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64 < fraction


def holdout_rows(reader: StoreReader, fraction: float, seed: int = 0) -> tuple[np.ndarray,
                                                                              np.ndarray]:
    """(train_rows, eval_rows): a sample is held out when hash(seed, sample_id) < fraction.

    Depends only on the id, so it is stable across runs, world sizes and store layouts.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], found {fraction}")
    held = np.array([is_held_out(sid, fraction, seed) for sid in reader.sample_ids], dtype=bool)
    return np.flatnonzero(~held), np.flatnonzero(held)


class StoreStream(IterableDataset):
    """Batches (dicts of CPU tensors, see collate.py) from a store; see the module docstring."""

    def __init__(self, url: str, *, signals: list[str] | None = None, split: str | None = None,
                 sample_filter: Callable[[dict], bool] | None = None,
                 rows: np.ndarray | None = None, seed: int = 0, shuffle: bool = True,
                 shuffle_buffer: int = 2048, batch_tokens: int = 4096,
                 max_batch_size: int | None = None, packing: bool = False, rank: int = 0,
                 world_size: int = 1, cache_dir: str | None = None,
                 storage_options: dict | None = None,
                 sample_weight: Callable[[dict], float] | None = None, order: str = "shuffle",
                 curriculum_key: str = "difficulty", pack_length: int | None = None,
                 partition: str = "auto", collate_fn: Callable | None = None):
        """collate_fn: builds a batch from (rows of samples, weights, signals, packing=);
        default `collate.collate` (a foreign-tokenizer student: cross_batch.CrossCollate)."""
        super().__init__()
        self.plan_settings = PlanSettings(
            seed=int(seed), order=order, shuffle=bool(shuffle), shuffle_buffer=int(shuffle_buffer),
            batch_tokens=int(batch_tokens), max_batch_size=max_batch_size, packing=bool(packing),
            pack_length=pack_length, partition=partition, rank=int(rank),
            world_size=int(world_size))
        self.url, self.cache_dir, self.storage_options = url, cache_dir, storage_options
        self.rank, self.packing = int(rank), bool(packing)
        self.curriculum_key = curriculum_key
        self.collate_fn = collate_fn or collate
        self._reader: StoreReader | None = None
        self._reader_pid, self._index_sha = -1, None
        reader = self.reader
        missing = [s for s in (signals or []) if s not in reader.settings.signals]
        check(not missing, f"signal(s) {missing} not in {url}; it holds {reader.signals}")
        self.signals = reader.signals if signals is None else list(signals)

        # Per store row (numpy, picklable: DataLoader workers get a copy).
        n = len(reader)
        selected = self._select(reader, split, rows, sample_filter)  # [selected], ascending
        level = np.zeros(n, np.int64)  # [n] curriculum level (0 when not curriculum)
        if order == "curriculum":
            level[selected] = self._levels(reader, selected, curriculum_key)
        self.rows = StoreRows.of([seg.samples for seg in reader.segments],
                                 reader.index.column("length").to_numpy(), selected, level)
        self._seg_first = np.array([seg.first_sample for seg in reader.segments], np.int64)
        self._weight = np.ones(n, np.float32)  # [n]
        if sample_weight is not None:
            dicts = reader.index.take(selected).to_pylist()
            w = np.array([float(sample_weight(d)) for d in dicts], np.float32)
            check(bool(np.all(np.isfinite(w) & (w >= 0))),
                  "sample_weight must return finite weights >= 0")
            self._weight[selected] = w

        self.epoch = 0
        self._counts: list[int] = []  # batches consumed per worker in this epoch
        self._pending: dict[str, Any] | None = None  # a loaded state not yet resumed

    # -- selection (reads the index; the decisions are stream_plan's) -------------------------

    def _select(self, reader: StoreReader, split, rows, sample_filter) -> np.ndarray:
        n = len(reader)
        in_split = None
        if split is not None:
            in_split = pc.fill_null(pc.equal(reader.index.column("split"), split),
                                    False).to_numpy(zero_copy_only=False)
        accept = None
        if sample_filter is not None:
            def accept(candidates: np.ndarray) -> list[bool]:
                return [bool(sample_filter(d))
                        for d in reader.index.take(candidates).to_pylist()]
        selected = select_rows(n, in_split=in_split, rows=rows, accept=accept)
        check(selected.size > 0, f"no sample of {self.url} selected (split={split!r}, "
                                 f"rows={'given' if rows is not None else None}, filter="
                                 f"{'given' if sample_filter else None}; store has {n})")
        return selected

    @staticmethod
    def _levels(reader: StoreReader, selected: np.ndarray, key: str) -> np.ndarray:
        """Curriculum level of each selected row: rank of its key value, nulls last."""
        check(key in reader.index.column_names,
              f"curriculum_key {key!r} is not a column of the sample index "
              f"({reader.index.column_names})")
        return curriculum_levels(reader.index.column(key).take(selected).to_pylist())

    # -- reader and settings (one reader per process: never share one across a fork) ------

    @property
    def reader(self) -> StoreReader:
        if self._reader is None or self._reader_pid != os.getpid():
            reader = StoreReader(self.url, storage_options=self.storage_options,
                                 cache_dir=self.cache_dir)
            # Row numbers are store positions of the commit planned on; a later commit (a
            # dump still appending) may renumber them, so a worker must see the same one.
            sha = reader.manifest["index"]["sha256"]
            if self._index_sha is not None and sha != self._index_sha:
                raise RuntimeError(f"{self.url} was committed to after this StoreStream was "
                                   f"created: create the stream again to train on the new "
                                   f"commit")
            self._reader, self._reader_pid, self._index_sha = reader, os.getpid(), sha
        return self._reader

    @property
    def settings(self):
        return self.reader.settings

    @property
    def num_samples(self) -> int:
        return int(self.rows.selected.size)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_reader"], state["_reader_pid"] = None, -1
        return state

    def num_batches(self, num_workers: int = 0) -> int:
        """Batches this rank yields in the current epoch (all its workers), from the index only."""
        nw = max(1, num_workers)
        return sum(len(plan_epoch(self.rows, self.plan_settings, self.epoch, nw, w).batches)
                   for w in range(nw))

    # -- iteration ---------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Select epoch `epoch`; keeps a loaded state of that epoch, else starts it from batch 0."""
        epoch = int(epoch)
        if self._pending is not None and self._pending["epoch"] == epoch:
            self.epoch = epoch
            return
        self.epoch, self._pending, self._counts = epoch, None, []

    def _resume_counts(self, num_workers: int) -> tuple[list[int], int]:
        """(batches already consumed per worker, worker rotation) for an iteration starting now."""
        return resume_counts(self._pending, self.epoch, self.rank, num_workers)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        num_workers, worker_id = (info.num_workers, info.id) if info else (1, 0)
        counts, rotation = self._resume_counts(num_workers)
        worker = (worker_id + rotation) % num_workers  # logical worker: shard, RNG, counts
        if info is None:  # main process: this object itself tracks what was consumed
            self._counts, self._pending = counts, None
        epoch = self.epoch
        plan = plan_epoch(self.rows, self.plan_settings, epoch, num_workers, worker)
        for i, batch in enumerate(self._execute(plan, counts[worker]), start=counts[worker]):
            batch["stream_position"] = {"epoch": epoch, "worker": worker,
                                        "num_workers": num_workers, "index": i}
            if info is None:
                self._counts[0] = i + 1
            yield batch

    def _execute(self, plan: EpochPlan, skip: int) -> Iterator[dict[str, Any]]:
        reader = self.reader
        loaded: dict[int, Any] = {}  # store row -> decoded Sample, read but not yet batched
        for b in range(skip, len(plan.batches)):
            layout = plan.batches[b]
            for row in layout:
                for r in row:
                    if r not in loaded:
                        self._load(reader, plan, r, b, loaded)
            samples = [[loaded.pop(r) for r in row] for row in layout]
            weights = [[float(self._weight[r]) for r in row] for row in layout]
            yield self.collate_fn(samples, weights, self.signals, packing=self.packing)

    def _load(self, reader: StoreReader, plan: EpochPlan, row: int, b: int,
              loaded: dict) -> None:
        """Read row's whole segment; keep its rows of the same level planned from batch b on."""
        seg = int(self.rows.segment[row])
        samples = reader.read_segment(seg, self.signals)
        first = int(self._seg_first[seg])
        for r, when in plan.reads[(seg, int(self.rows.level[row]))]:
            if when >= b:
                loaded[r] = samples[r - first]

    def loader(self, **dataloader_kwargs: Any) -> "StreamLoader":
        """A DataLoader over this stream (batch_size=None) that keeps state_dict() exact."""
        return StreamLoader(self, **dataloader_kwargs)

    # -- state -------------------------------------------------------------------------------

    def record(self, batch: dict[str, Any]) -> None:
        """Note that the trainer consumed `batch` (needed with DataLoader workers)."""
        pos = batch["stream_position"]
        nw = pos["num_workers"]
        if len(self._counts) != nw:
            self._counts = self._resume_counts(nw)[0]
        self._counts[pos["worker"]] = pos["index"] + 1
        self.epoch, self._pending = pos["epoch"], None

    def state_dict(self) -> dict[str, Any]:
        counts = list(self._counts)
        return {"version": STATE_VERSION, "epoch": self.epoch, "batches": sum(counts),
                "worker_batches": counts, "num_workers": len(counts), "rank": self.rank,
                "config": plan_config(self.plan_settings, self.rows)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check(state.get("version") == STATE_VERSION,
              f"stream state version {state.get('version')} != {STATE_VERSION}")
        mine = plan_config(self.plan_settings, self.rows)
        diff = {k: (v, mine.get(k)) for k, v in state["config"].items() if mine.get(k) != v}
        check(not diff, "the saved stream state belongs to a differently configured stream "
                        "(saved, now): " + json.dumps(diff, default=str))
        self.epoch = int(state["epoch"])
        self._counts = list(state["worker_batches"])
        self._pending = dict(state)


class StreamLoader:
    """DataLoader(stream, batch_size=None, ...) that records every batch it hands out."""

    def __init__(self, stream: StoreStream, **dataloader_kwargs: Any):
        check(not dataloader_kwargs.get("persistent_workers"),
               "persistent_workers would keep a stale epoch in the workers")
        check(dataloader_kwargs.pop("batch_size", None) is None,
               "the stream batches itself: batch_size must be None")
        self.stream, self.kwargs = stream, dataloader_kwargs

    def __iter__(self) -> Iterator[dict[str, Any]]:
        nw = self.kwargs.get("num_workers", 0)
        it = iter(DataLoader(self.stream, batch_size=None, **self.kwargs))
        if nw > 0:  # the workers took their copies (with any pending resume) at iter()
            self.stream._counts = self.stream._resume_counts(nw)[0]
            self.stream._pending = None
        for batch in it:
            self.stream.record(batch)
            yield batch
