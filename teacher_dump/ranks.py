"""Which batches of a dump this process computes, and how it meets the others.

The batch plan is the same whatever the number of processes: batch j goes to process
j mod world_size, so every sample is computed in the same batch (same padding, same
floating-point results) as in a 1-process dump, and a resume recomputes a half-written
batch whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from logitstore.toolkit.batching import by_length, padded_batches


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
    padded tokens; a sample longer than the budget gets a batch of its own."""
    return padded_batches(lengths, batch_tokens, order=by_length(lengths))


def batches_of_rank(n_batches: int, rank: int, world: int) -> list[int]:
    """Batch numbers of the plan that `rank` of `world` processes computes (j mod world)."""
    return list(range(rank, n_batches, world))
