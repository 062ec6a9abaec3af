"""Chunked lm_head + loss over [B, S, d] hidden states, for tests and benchmarks.

No production code calls this module: training reaches student_train.fused_head_loss through
student_train.objective, which selects its positions itself. Two paths:

* `chunked_kd_ce`: per-position KD (vs sparse targets) and CE from [B, S, d] hidden states and
  a [B, S] mask; it flattens the selected positions and runs fused_head_loss on them. The
  tests and bench/train_bench.py use it as the memory-safe counterpart of the dense reference.
* `chunked_lm_loss`: any per-position loss function, the textbook checkpointed way, as a second
  reference for fused_head_loss (e.g. under autocast). Each chunk of positions computes
  `logits = hidden @ W.T + b` and the loss under `torch.utils.checkpoint` (non-reentrant): the
  forward saves only the chunk's hidden rows, the backward recomputes that chunk's logits, uses
  them and frees them before the next chunk. Peak extra memory is O(chunk_size * V) in both
  passes, but the lm_head matmul and every [n, V] op run twice.

Only positions selected by `mask` are computed (prompt and padding positions cost nothing).
The matmul runs in the weight's dtype (casting a [V, d] bf16 weight to fp32 would itself be a
V*d fp32 copy); the logits are cast to fp32 before any softmax, as in student_train.losses.
Benchmarks import this module by putting tests/ on sys.path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from student_train.fused_head_loss import DEFAULT_CHUNK_SIZE, check_head_inputs, fused_head_loss
from student_train.head_loss_terms import HeadLossTerms
from student_train.losses import SparseTarget

Tensor = torch.Tensor


def _map_positions(obj: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """Apply fn to every tensor (leading dims = positions) in obj: tensor, None, dataclass."""
    if obj is None or isinstance(obj, (int, float, str)):
        return obj
    if isinstance(obj, Tensor):
        return fn(obj)
    if dataclasses.is_dataclass(obj):
        return dataclasses.replace(obj, **{f.name: _map_positions(getattr(obj, f.name), fn)
                                           for f in dataclasses.fields(obj)})
    raise ValueError(f"targets must be tensors, None or dataclasses of tensors, found "
                     f"{type(obj).__name__}")


def _chunk_loss(per_position_loss: Callable[..., Tensor], hidden_rows: Tensor, weight: Tensor,
                bias: Tensor | None, *target_rows: Any) -> Tensor:
    logits = F.linear(hidden_rows.to(weight.dtype), weight, bias).float()  # [n, V]
    return per_position_loss(logits, *target_rows)  # [n] or [n, terms]


def _selected_positions(hidden: Tensor, weight: Tensor, bias: Tensor | None,
                        mask: Tensor | None, chunk_size: int, targets: Sequence[Any]):
    """Checks, then (hidden rows [n_sel, d], targets' rows, rows [n_sel] or None = all)."""
    check_head_inputs(hidden, weight, bias, chunk_size, "[B, S, d]")
    B, S, d = hidden.shape
    if mask is not None and mask.shape != (B, S):
        raise ValueError(f"mask must be [B, S]={(B, S)}, found {tuple(mask.shape)}")

    def rows_of(t: Tensor) -> Tensor:
        if t.shape[:2] != (B, S):
            raise ValueError(f"target tensors must start with [B, S]={(B, S)}, "
                             f"found {tuple(t.shape)}")
        return t.reshape(B * S, *t.shape[2:])

    flat_targets = [_map_positions(t, rows_of) for t in targets]
    flat_hidden = hidden.reshape(B * S, d)
    rows = None if mask is None else mask.reshape(-1).nonzero().squeeze(-1)  # [n_sel]
    if rows is not None:
        flat_hidden = flat_hidden.index_select(0, rows)
        flat_targets = [_map_positions(t, lambda x: x.index_select(0, rows))
                        for t in flat_targets]
    return flat_hidden, flat_targets, rows


def _all_positions(values: Tensor, rows: Tensor | None, B: int, S: int) -> Tensor:
    """[n_sel, ...] values of the selected rows -> [B, S, ...], 0 elsewhere."""
    if rows is not None:
        values = values.new_zeros(B * S, *values.shape[1:]).index_copy(0, rows, values)
    return values.reshape(B, S, *values.shape[1:])


def chunked_lm_loss(hidden: Tensor, weight: Tensor,
                    per_position_loss: Callable[..., Tensor], targets: Sequence[Any] = (), *,
                    bias: Tensor | None = None, mask: Tensor | None = None,
                    chunk_size: int = DEFAULT_CHUNK_SIZE) -> Tensor:
    """Per-position losses of `per_position_loss(hidden @ weight.T + bias, *targets)`, chunked.

    hidden: [B, S, d]; weight: [V, d]; bias: [V] or None; mask: [B, S] bool or None (all).
    targets: tensors / None / dataclasses of tensors whose leading dims are [B, S]; each call
        gets them flattened to [n, ...] for its n positions.
    per_position_loss(logits [n, V] fp32, *target_rows) -> [n] or [n, terms].
    returns [B, S] (or [B, S, terms]) fp32, 0 at positions outside mask; reduce it with
    reference_losses.masked_mean. Values and gradients equal the unchunked computation.
    """
    flat_hidden, flat_targets, rows = _selected_positions(hidden, weight, bias, mask,
                                                          chunk_size, targets)
    n_sel = flat_hidden.shape[0]
    track = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad or
                                         (bias is not None and bias.requires_grad))
    pieces = []
    # At least one (possibly empty) chunk, so an all-masked batch still yields a graph-connected
    # result of the right shape.
    for start in range(0, max(n_sel, 1), chunk_size):
        piece = slice(start, start + chunk_size)
        args = (per_position_loss, flat_hidden[piece], weight, bias,
                *[_map_positions(t, lambda x: x[piece]) for t in flat_targets])
        if track:  # keep only the inputs; recompute this chunk's logits in backward
            pieces.append(checkpoint(_chunk_loss, *args, use_reentrant=False,
                                     preserve_rng_state=False))
        else:
            pieces.append(_chunk_loss(*args))
    values = torch.cat(pieces, 0).float()  # [n_sel] or [n_sel, terms]
    return _all_positions(values, rows, *hidden.shape[:2])


def chunked_kd_ce(hidden: Tensor, weight: Tensor, *, target: SparseTarget | None = None,
                  labels: Tensor | None = None, loss: str = "kl", label_smoothing: float = 0.0,
                  bias: Tensor | None = None, mask: Tensor | None = None,
                  chunk_size: int = DEFAULT_CHUNK_SIZE, jsd_beta: float = 0.5,
                  skew_alpha: float = 0.1,
                  expected_grads: tuple[Tensor | None, Tensor | None] | None = None,
                  ) -> tuple[Tensor | None, Tensor | None]:
    """Per-position KD (vs a sparse teacher target) and hard-label CE from one chunked lm_head.

    hidden [B, S, d], weight [V, d], target fields [B, S, K], labels [B, S] (-100 = ignore),
    mask [B, S] -> (kd [B, S] or None, ce [B, S] or None), 0 outside mask. Combine with
    reference_losses.masked_mean and blend_kd_ce (mask the CE with labels != -100 as well).
    expected_grads: (d loss / d kd, d loss / d ce), [B, S] each (None: 0), the gradient the
    caller's loss will send back, up to one scalar factor; it lets the forward build the
    gradients (fused_head_loss). Without it backward recomputes; either way the result is exact.
    """
    if target is None and labels is None:
        raise ValueError("chunked_kd_ce needs a target, labels, or both; found neither")
    present = [x is not None for x in (target, labels)]
    grads = list(expected_grads) if expected_grads is not None else None
    if grads is not None:
        grads = [g if g is not None else torch.zeros(hidden.shape[:2], device=hidden.device)
                 for g, p in zip(grads, present) if p]
    flat_hidden, (flat_target, flat_labels, *flat_grads), rows = _selected_positions(
        hidden, weight, bias, mask, chunk_size, (target, labels, *(grads or [])))
    terms = HeadLossTerms(targets=() if flat_target is None else (flat_target,),
                          labels=flat_labels, loss=loss, label_smoothing=label_smoothing,
                          jsd_beta=jsd_beta, skew_alpha=skew_alpha)
    expected = torch.stack(flat_grads, -1) if flat_grads else None  # [n_sel, terms]
    out = fused_head_loss(flat_hidden, weight, terms, bias=bias, expected_grad=expected,
                          chunk_size=chunk_size)
    out = _all_positions(out, rows, *hidden.shape[:2])  # [B, S, terms]
    kd = out[..., 0] if target is not None else None
    ce = out[..., -1] if labels is not None else None
    return kd, ce
