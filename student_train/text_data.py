"""`--data` mode: raw training data (no teacher) as batches of the StoreStream contract.

The raw-data reader (files, globs, HF datasets -> tokenized samples with a loss mask) is
`logitstore.toolkit.data`, shared with teacher-dump (student_train never imports teacher_dump).

`load_text_samples` reads the data once: data of at most `window_tokens` tokens is kept in
memory (a list); larger data becomes a `TextStream`, re-read (and re-tokenized) from its
sources at each pass, so memory holds one window whatever the size of the data. Each
epoch, `TextBatches` reads the samples a window of `window_tokens` at a time (a list: one
window, the whole of it), orders each window by a permutation drawn from the epoch's seeded
generator (windows in reading order, one draw each) and cuts it greedily into micro-batches
of at most `batch_tokens` padded tokens (`logitstore.toolkit.batching`). For data that fits
in one window this is a seeded permutation of all of it; for larger data the shuffle mixes
samples within a window only. Batches are numbered in that order and batch j goes to process
j mod world_size; training keeps only complete rounds of world_size batches, so every
process gets the same number.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from logitstore.errors import LogitStoreError
from logitstore.toolkit.batching import windowed_padded_batches
from student_train.losses import IGNORE


@dataclass(frozen=True)
class TextStream:
    """Samples too many to hold: `read()` gives a fresh iterator over them, from the
    sources, in the same order each time; `count` is how many there are."""

    read: Callable[[], Iterator]
    count: int

    def __len__(self) -> int:
        return self.count


def load_text_samples(sources: Sequence[str], tokenizer, *, data_format: str = "auto",
                      max_length: int | None = None, include_prompt: bool = False,
                      window_tokens: int | None = None) -> list | TextStream:
    """Tokenized samples (sample_id, input_ids, loss_mask, ...) of `sources` with at least
    one target: a list, unless `window_tokens` is given and they hold more tokens than that
    (then a TextStream, and only a count is kept of this first read)."""
    from logitstore.toolkit.data import DataOptions, iter_samples

    options = DataOptions(format=data_format, max_length=max_length,
                          include_prompt=include_prompt)

    def read() -> Iterator:
        return (s for s in iter_samples(list(sources), tokenizer, options) if s.loss_mask.any())

    kept: list | None = []
    count = tokens = 0
    for sample in read():
        count += 1
        if kept is not None:
            kept.append(sample)
            tokens += len(sample.input_ids)
            if window_tokens is not None and tokens > window_tokens:
                kept = None  # more than a window: streamed, nothing more is held
    if not count:
        raise LogitStoreError(f"no sample with a training target in {list(sources)}")
    return kept if kept is not None else TextStream(read, count)


def holdout(samples: list | TextStream, fraction: float, seed: int):
    """(train, eval) by the same rule as a store's hold-out rows (`stream.is_held_out`), so a
    --data baseline and a --store student hold out the same sample ids. Lists give lists;
    a TextStream gives two filtered streams, counted by one pass over it."""
    from student_train.stream import is_held_out

    if isinstance(samples, TextStream):
        held_count = sum(is_held_out(s.sample_id, fraction, seed) for s in samples.read())

        def side(held: bool) -> TextStream:
            return TextStream(lambda: (s for s in samples.read()
                                       if is_held_out(s.sample_id, fraction, seed) == held),
                              held_count if held else samples.count - held_count)
        return side(False), side(True)
    held = [is_held_out(s.sample_id, fraction, seed) for s in samples]
    return ([s for s, h in zip(samples, held) if not h],
            [s for s, h in zip(samples, held) if h])


def collate(samples: list, pad_id: int = 0) -> dict[str, Any]:
    """Right-padded batch of the stream contract, hard labels only (no signals)."""
    longest = max(len(s.input_ids) for s in samples)
    B = len(samples)
    input_ids = torch.full((B, longest), pad_id, dtype=torch.long)
    labels = torch.full((B, longest), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((B, longest), dtype=torch.long)
    for b, s in enumerate(samples):
        ids = torch.as_tensor(np.asarray(s.input_ids, dtype=np.int64))
        n = len(ids)
        input_ids[b, :n] = ids
        attention_mask[b, :n] = 1
        labels[b, :n] = torch.where(torch.as_tensor(np.asarray(s.loss_mask, dtype=bool)),
                                    ids, IGNORE)
    return {
        "input_ids": input_ids,  # [B, S]
        "attention_mask": attention_mask,  # [B, S]
        "labels": labels,  # [B, S], -100 = not a target
        "position_ids": torch.arange(longest).expand(B, longest).clone(),  # [B, S]
        "lengths": attention_mask.sum(1),  # [B]
        "token_weights": attention_mask.float(),  # [B, S]
        "sample_ids": [s.sample_id for s in samples],
        "num_target_tokens": int((labels[:, 1:] != IGNORE).sum()),
        "signals": {},
    }


class TextBatches(torch.utils.data.IterableDataset):
    """Samples (a list, or a TextStream read again at each pass) as micro-batches, with
    StoreStream's iteration and state semantics: each iteration runs the current epoch from
    its start, unless a loaded state of that epoch is pending, which it resumes after the
    batches already consumed (re-planned, skipped without being collated)."""

    def __init__(self, samples: list | TextStream, *, batch_tokens: int, seed: int,
                 shuffle: bool = True, rank: int = 0, world_size: int = 1, pad_id: int = 0,
                 drop_uneven: bool = True, window_tokens: int | None = None):
        self.samples = samples
        self.drop_uneven = drop_uneven  # training: equal batch counts per process
        self.batch_tokens = batch_tokens
        # A list is one window (a permutation of all of it); a stream needs a window.
        self.window_tokens = sys.maxsize if isinstance(samples, list) else window_tokens
        if self.window_tokens is None:
            raise ValueError("a TextStream needs window_tokens")
        self.seed, self.shuffle = seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.pad_id = pad_id
        self.epoch = 0
        self._done = 0  # batches of this epoch consumed
        self._pending: int | None = None  # batches to skip on the next iteration (resume)

    def _read(self) -> Iterable:
        return self.samples if isinstance(self.samples, list) else self.samples.read()

    def _plan(self) -> Iterator[list]:
        """This process's batches of the current epoch, as lists of samples, lazily."""
        rng = np.random.default_rng([self.seed, self.epoch])

        def order(lengths: np.ndarray) -> np.ndarray:
            positions = np.arange(len(lengths))
            return rng.permutation(positions) if self.shuffle else positions

        batches = windowed_padded_batches(self._read(), self.batch_tokens, self.window_tokens,
                                          lambda s: len(s.input_ids), order=order)
        # Training keeps complete rounds only, so that no process waits for another at a
        # step; evaluation keeps every batch (each process sums its own, then they are added).
        round_: list[list] = []
        for batch in batches:
            round_.append(batch)
            if len(round_) == self.world_size:
                yield round_[self.rank]
                round_ = []
        if not self.drop_uneven and self.rank < len(round_):
            yield round_[self.rank]

    def num_batches(self) -> int:
        """This process's batches in the current epoch (a stream: one pass over the data)."""
        return sum(1 for _ in self._plan())

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self._done, self._pending = int(epoch), 0, None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        skip, self._pending = (self._pending or 0), None
        self._done = 0
        for batch in self._plan():
            self._done += 1
            if self._done > skip:
                yield collate(batch, self.pad_id)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches": self._done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self._done = int(state["epoch"]), int(state["batches"])
        self._pending = self._done
