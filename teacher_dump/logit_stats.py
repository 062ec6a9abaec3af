"""Per-group statistics of a block of logits: everything the capture needs from the full
vocabulary, in one read of it.

    stats = group_stats(x, temperature=1.0, kernel="compiled")   # x [P, V] fp32
    stats.maxima   [P, G]   max of each group of GROUP consecutive columns
    stats.sums     [P, G]   sum of exp(x - group max)                     (T = 1)
    stats.sums_t   [P, G]   sum of exp((x - group max) / T), None at T = 1

Group j covers columns [GROUP * j, min(GROUP * (j + 1), V)); the last group may be short.
From these [P, G] tensors (`teacher_dump.token_signals`) come the log-normaliser, the
groups the top-k can lie in, the probability mass of every group (the tail and the first
level of each draw); only the few groups that hold a top-k candidate or a draw are read
again, 64 columns each.

Why a kernel of its own: computed op by op (log_softmax, group maxima, exp, cumsum, a masked
sum), the capture makes five passes over the fp32 [P x V] block, each reading and most
writing P x V x 4 bytes; on a CPU that memory traffic costs a third of a small teacher's
forward.
These statistics need one read and write only [P, G]. Eager PyTorch cannot fuse a max and
a sum of exps over the same group, so `kernel="compiled"` runs them through
`torch.compile` (Inductor: one C++/OpenMP loop on the CPU, ~7x faster than eager at
V = 32k); `kernel="eager"` is the same arithmetic op by op. The two agree to fp32
rounding (~1e-7 relative), not bit for bit: a store's draws are reproducible for one
kernel (FORMAT.md section 6).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch

from logitstore.errors import ConfigError
from teacher_dump.config import CAPTURE_KERNELS

Tensor = torch.Tensor
log = logging.getLogger(__name__)

GROUP = 64  # columns per group; 64 measured fastest of 16..250 for the top-k at V = 32000


@dataclass
class GroupStats:
    maxima: Tensor  # [P, G]
    sums: Tensor  # [P, G]: sum of exp(x - maxima) over the group
    sums_t: Tensor | None  # [P, G]: sum of exp((x - maxima) / T); None when T == 1


def _groups(blocks: Tensor, inv_t: float | None) -> tuple[Tensor, ...]:
    """blocks [P, n, width] -> maxima, sums of exp(x - max), and (inv_t given) sums of
    exp((x - max) * inv_t), [P, n] each."""
    maxima = blocks.amax(-1)
    shifted = blocks - maxima.unsqueeze(-1)
    sums = shifted.exp().sum(-1)
    return (maxima, sums) if inv_t is None else (maxima, sums, (shifted * inv_t).exp().sum(-1))


@functools.cache
def _compiled_groups():
    """torch.compile'd `_groups`, built on first use (dynamic shapes: one compilation serves
    every chunk size and vocabulary; T = 1 and T != 1 are two graphs)."""
    return torch.compile(_groups, dynamic=True)


def resolve_kernel(kernel: str, device: torch.device | str) -> str:
    """`auto` -> `compiled` on the CPU when torch.compile works here (it needs a C++
    compiler), else `eager`; on accelerators `eager` (their memory bandwidth makes the
    passes a rounding error next to the forward; the compiled path is untested there).
    `compiled` that cannot compile raises ConfigError saying why."""
    if kernel not in CAPTURE_KERNELS:
        raise ValueError(f"capture kernel must be one of {', '.join(CAPTURE_KERNELS)}, "
                         f"found {kernel!r}")
    if kernel == "eager" or (kernel == "auto" and torch.device(device).type != "cpu"):
        return "eager"
    try:
        probe = torch.randn(3, 2, GROUP)
        with torch.inference_mode():
            got = _compiled_groups()(probe, None)
        want = _groups(probe, None)
        if not all(torch.allclose(a, b, rtol=1e-5) for a, b in zip(got, want)):
            raise RuntimeError("the compiled kernel disagrees with the eager one on a probe")
    except Exception as exc:  # noqa: BLE001 - any compiler failure means: use eager
        if kernel == "compiled":
            first_line = (str(exc).splitlines() or [""])[0]
            raise ConfigError([
                f"capture_kernel: 'compiled' is not usable here, torch.compile failed "
                f"({type(exc).__name__}: {first_line}); install a C++ compiler (g++) or "
                f"use --capture-kernel eager (or auto)"]) from exc
        log.warning("torch.compile is not usable here (%s): the capture runs eager, slower on "
                    "the CPU", type(exc).__name__)
        return "eager"
    return "compiled"


def group_stats(x: Tensor, temperature: float = 1.0, kernel: str = "eager") -> GroupStats:
    """x [P, V] fp32 logits -> GroupStats over groups of GROUP columns; `kernel` is
    `compiled` or `eager` (see resolve_kernel)."""
    vocab = x.shape[1]
    full = vocab // GROUP * GROUP
    inv_t = None if temperature == 1.0 else 1.0 / temperature
    parts = []
    if full:
        groups = _compiled_groups() if kernel == "compiled" else _groups
        parts.append(groups(x[:, :full].unflatten(-1, (-1, GROUP)), inv_t))
    if full < vocab:  # the short last group, eager: at most GROUP - 1 columns
        parts.append(_groups(x[:, full:].unsqueeze(1), inv_t))
    maxima, *sums = [torch.cat(p, -1) if len(parts) > 1 else p[0] for p in zip(*parts)]
    # A group of -inf logits only (ids a model masks out) has max -inf and NaN sums: weight 0.
    finite = torch.isfinite(maxima)
    sums = [torch.where(finite, s, 0.0) for s in sums]
    return GroupStats(maxima, sums[0], sums[1] if inv_t is not None else None)
