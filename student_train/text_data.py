"""`--data` mode: raw training data (no teacher) as batches of the StoreStream contract.

The raw-data reader (files, globs, HF datasets -> tokenized samples with a loss mask) is
`logitstore.toolkit.data`, shared with teacher-dump (student_train never imports teacher_dump).

Samples are held in memory (hard-label fine-tuning sets are small next to a store); each epoch
is a seeded permutation cut greedily into micro-batches of at most `batch_tokens` padded tokens
(`logitstore.toolkit.batching.padded_batches`),
dealt round-robin to the processes, each process getting the same number of batches.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
import torch

from logitstore.errors import LogitStoreError
from logitstore.toolkit.batching import padded_batches
from student_train.losses import IGNORE


def load_text_samples(sources: Sequence[str], tokenizer, *, data_format: str = "auto",
                      max_length: int | None = None, include_prompt: bool = False) -> list:
    """Tokenized samples (sample_id, input_ids, loss_mask, ...) of `sources`."""
    from logitstore.toolkit.data import DataOptions, iter_samples

    options = DataOptions(format=data_format, max_length=max_length,
                          include_prompt=include_prompt)
    samples = [s for s in iter_samples(list(sources), tokenizer, options) if s.loss_mask.any()]
    if not samples:
        raise LogitStoreError(f"no sample with a training target in {list(sources)}")
    return samples


def holdout(samples: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, eval) by the same rule as a store's hold-out rows (`stream.is_held_out`), so a
    --data baseline and a --store student hold out the same sample ids."""
    from student_train.stream import is_held_out

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
    """In-memory samples as micro-batches, with StoreStream's iteration and state semantics:
    each iteration runs the current epoch from its start, unless a loaded state of that epoch
    is pending, which it resumes after the batches already consumed."""

    def __init__(self, samples: list, *, batch_tokens: int, seed: int, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1, pad_id: int = 0,
                 drop_uneven: bool = True):
        self.samples = samples
        self.lengths = np.array([len(s.input_ids) for s in samples], np.int64)  # [n]
        self.drop_uneven = drop_uneven  # training: equal batch counts per process
        self.batch_tokens = batch_tokens
        self.seed, self.shuffle = seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.pad_id = pad_id
        self.epoch = 0
        self._done = 0  # batches of this epoch consumed
        self._pending: int | None = None  # batches to skip on the next iteration (resume)

    def _plan(self) -> list[list[int]]:
        """This process's batches of the current epoch, as sample positions."""
        order = np.arange(len(self.samples))
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(order)
        batches = padded_batches(self.lengths, self.batch_tokens, order=order)
        mine = batches[self.rank::self.world_size]
        # Training drops the uneven tail so that no process waits for another at a step;
        # evaluation keeps every batch (each process sums its own, then they are added).
        return mine[:len(batches) // self.world_size] if self.drop_uneven else mine

    def num_batches(self) -> int:
        return len(self._plan())

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self._done, self._pending = int(epoch), 0, None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        plan = self._plan()
        self._done, self._pending = (self._pending or 0), None
        while self._done < len(plan):
            batch = collate([self.samples[i] for i in plan[self._done]], self.pad_id)
            self._done += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches": self._done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self._done = int(state["epoch"]), int(state["batches"])
        self._pending = self._done
