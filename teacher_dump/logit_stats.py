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

Why a kernel of its own: the capture used to make five passes over the fp32 [P x V] block
(log_softmax, group maxima, exp, cumsum, a masked sum), each reading and most writing
P x V x 4 bytes; on a CPU that memory traffic cost a third of a small teacher's forward.
These statistics need one read and write only [P, G]. Eager PyTorch cannot fuse a max and
a sum of exps over the same group, so `kernel="compiled"` runs them through
`torch.compile` (Inductor: one C++/OpenMP loop on the CPU, ~7x faster than eager at
V = 32k); `kernel="eager"` is the same arithmetic op by op. The two agree to fp32
rounding (~1e-7 relative), not bit for bit: a store's draws are reproducible for one
kernel (FORMAT.md section 6).
"""

from __future__ import annotations

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


def _full_groups(x: Tensor, inv_t: float) -> tuple[Tensor, Tensor, Tensor]:
    """x [P, G * GROUP] -> maxima, sums, sums at 1/T (the last equals sums when inv_t == 1)."""
    blocks = x.unflatten(-1, (-1, GROUP))  # [P, G, GROUP]
    maxima = blocks.amax(-1)
    shifted = blocks - maxima.unsqueeze(-1)
    return maxima, shifted.exp().sum(-1), (shifted * inv_t).exp().sum(-1)


def _full_groups_t1(x: Tensor) -> tuple[Tensor, Tensor]:
    blocks = x.unflatten(-1, (-1, GROUP))
    maxima = blocks.amax(-1)
    return maxima, (blocks - maxima.unsqueeze(-1)).exp().sum(-1)


_compiled: dict[str, object] = {}


def _compiled_fn(name: str):
    """torch.compile'd `_full_groups*`, built on first use (dynamic shapes: one compilation
    serves every chunk size and vocabulary)."""
    if name not in _compiled:
        fn = {"t1": _full_groups_t1, "t": _full_groups}[name]
        _compiled[name] = torch.compile(fn, dynamic=True)
    return _compiled[name]


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
        probe = torch.randn(3, 2 * GROUP)
        with torch.inference_mode():
            got = _compiled_fn("t1")(probe)
        want = _full_groups_t1(probe)
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
    rows, vocab = x.shape
    full = vocab // GROUP * GROUP
    with_t = temperature != 1.0
    parts: list[tuple[Tensor, ...]] = []
    if full:
        head = x[:, :full]
        if kernel == "compiled":
            fn = _compiled_fn("t" if with_t else "t1")
            parts.append(fn(head, 1.0 / temperature) if with_t else fn(head))
        else:
            parts.append(_full_groups(head, 1.0 / temperature) if with_t else _full_groups_t1(head))
    if full < vocab:  # the short last group, eager: at most GROUP - 1 columns
        rest = x[:, full:]
        maxima = rest.amax(-1, keepdim=True)
        shifted = rest - maxima
        last = (maxima, shifted.exp().sum(-1, keepdim=True))
        parts.append(last + ((shifted * (1.0 / temperature)).exp().sum(-1, keepdim=True),)
                     if with_t else last)
    maxima, *sums = [torch.cat(p, -1) if len(parts) > 1 else p[0] for p in zip(*parts)]
    # A group of -inf logits only (ids a model masks out) has max -inf and NaN sums: weight 0.
    finite = torch.isfinite(maxima)
    sums = [torch.where(finite, s, 0.0) for s in sums]
    return GroupStats(maxima, sums[0], sums[1] if with_t else None)
