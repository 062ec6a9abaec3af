"""lm_head + loss computed in chunks of positions, so [B, S, V] fp32 logits never exist at once.

With V = 128k, B*S = 16k positions, full fp32 logits are 8 GiB (plus as much again for their
gradient and the softmax saved for backward). Like Liger's fused linear cross-entropy and
torchtune's chunked CE, we compute `logits = hidden @ W.T + b` and the per-position loss one
chunk of positions at a time. Each chunk runs under `torch.utils.checkpoint` (non-reentrant):
the forward saves only the chunk's hidden rows, the backward recomputes that chunk's logits,
uses them and frees them before the next chunk is recomputed. Peak extra memory is therefore
O(chunk_size * V) in both passes. Only positions selected by `mask` are computed at all
(prompt and padding positions cost nothing).

The matmul runs in the weight's dtype (casting a [V, d] bf16 weight to fp32 would itself be a
V*d fp32 copy; tensor-core matmuls accumulate in fp32 anyway); the logits are cast to fp32
before any softmax, as everywhere in losses.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from student_train.losses import (
    SparseTarget,
    cross_entropy_per_position,
    sparse_kd_per_position,
)

Tensor = torch.Tensor
DEFAULT_CHUNK_SIZE = 1024


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
    losses.masked_mean. Values and gradients equal the unchunked computation.
    """
    if hidden.dim() != 3 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(f"expected hidden [B, S, d] and weight [V, d], found "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be [V]={tuple(weight.shape[:1])}, found {tuple(bias.shape)}")
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be an int >= 1, found {chunk_size!r}")
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
    if rows is not None:
        values = values.new_zeros(B * S, *values.shape[1:]).index_copy(0, rows, values)
    return values.reshape(B, S, *values.shape[1:])


def chunked_kd_ce(hidden: Tensor, weight: Tensor, *, target: SparseTarget | None = None,
                  labels: Tensor | None = None, loss: str = "kl", label_smoothing: float = 0.0,
                  bias: Tensor | None = None, mask: Tensor | None = None,
                  chunk_size: int = DEFAULT_CHUNK_SIZE, jsd_beta: float = 0.5,
                  skew_alpha: float = 0.1) -> tuple[Tensor | None, Tensor | None]:
    """Per-position KD (vs a sparse teacher target) and hard-label CE from one chunked lm_head.

    hidden [B, S, d], weight [V, d], target fields [B, S, K], labels [B, S] (-100 = ignore),
    mask [B, S] -> (kd [B, S] or None, ce [B, S] or None), 0 outside mask. Combine with
    losses.masked_mean and losses.blend_kd_ce (mask the CE with labels != -100 as well).
    """
    if target is None and labels is None:
        raise ValueError("chunked_kd_ce needs a target, labels, or both; found neither")

    def kd_and_ce(logits: Tensor, target_rows: SparseTarget | None,
                  label_rows: Tensor | None) -> Tensor:
        terms = []
        if target_rows is not None:
            terms.append(sparse_kd_per_position(logits, target_rows, loss=loss,
                                                jsd_beta=jsd_beta, skew_alpha=skew_alpha))
        if label_rows is not None:
            terms.append(cross_entropy_per_position(logits, label_rows,
                                                    label_smoothing=label_smoothing))
        return torch.stack(terms, -1)  # [n, terms]

    out = chunked_lm_loss(hidden, weight, kd_and_ce, (target, labels), bias=bias, mask=mask,
                          chunk_size=chunk_size)  # [B, S, terms]
    kd = out[..., 0] if target is not None else None
    ce = out[..., -1] if labels is not None else None
    return kd, ce
