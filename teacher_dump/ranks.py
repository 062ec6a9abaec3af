"""Which batches of a dump this process computes, and how it meets the others.

The batch plan (`stream_batches`) is the same whatever the number of processes: every
process reads the whole data stream, in the same order, a window of `read_window_tokens`
tokens at a time; each window is sorted by (length, position in the window) and cut into
batches of at most `batch_tokens` padded tokens, and the batches are numbered 0, 1, 2...
across windows in reading order. Batch j goes to process j mod world_size. The plan depends
only on the data, its order and those two settings - never on a sort of the whole dataset
or on the number of processes - so every sample is computed exactly once across the
processes, in the same batch (same padding, same floating-point results) as in a 1-process
dump, and a resume recomputes a half-written batch whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from logitstore.toolkit.batching import by_length, padded_batches, windowed_padded_batches


@dataclass
class RankContext:
    """This process's place in the dump; `wait` is a barrier across all processes."""

    rank: int = 0
    world: int = 1
    device: str | None = None  # None: toolkit.hf's default (cuda if available, else cpu)
    wait: Callable[[], None] = lambda: None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def part(self) -> str:
        return f"rank-{self.rank:05d}"

    @classmethod
    def from_accelerate(cls) -> "RankContext":
        import datetime

        import torch
        from accelerate import PartialState
        from accelerate.utils import DistributedType, parse_flag_from_env

        # cpu=True without a GPU (accelerate otherwise ignores a CPU multi-process launch)
        # or under `accelerate launch --cpu`. A long timeout: ranks may reach the final
        # barrier hours apart on big dumps.
        use_cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
        state = PartialState(cpu=use_cpu, timeout=datetime.timedelta(hours=72))
        if state.distributed_type == DistributedType.NO:
            return cls(device="cpu" if parse_flag_from_env("ACCELERATE_USE_CPU") else None)
        device = state.device
        name = "cpu" if device.type == "cpu" else str(device)
        return cls(state.process_index, state.num_processes, name, state.wait_for_everyone)


def plan_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Sample positions sorted by (length, position), in batches of at most `batch_tokens`
    padded tokens; a sample longer than the budget gets a batch of its own. Used where the
    samples are few and already in memory (one stored segment, in add-signal mode)."""
    return padded_batches(lengths, batch_tokens, order=by_length(lengths))


def stream_batches(samples: Iterable, batch_tokens: int, window_tokens: int) -> Iterator[list]:
    """The dump's batch plan over a stream of samples (anything with `input_ids`), batch 0
    first (module docstring); reads at most one window ahead of the batches handed out."""
    return windowed_padded_batches(samples, batch_tokens, window_tokens,
                                   lambda s: len(s.input_ids))


def is_batch_of_rank(batch: int, rank: int, world: int) -> bool:
    """True when batch number `batch` of the plan is computed by `rank` of `world`."""
    return batch % world == rank


def batches_of_rank(n_batches: int, rank: int, world: int) -> list[int]:
    """Batch numbers of the plan that `rank` of `world` processes computes (j mod world)."""
    return list(range(rank, n_batches, world))
