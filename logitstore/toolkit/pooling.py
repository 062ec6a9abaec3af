"""Pooling of per-token hidden states and attention maps into fixed-size per-sample signals.

Shared by teacher-dump (which stores the pooled teacher signals) and student-train (which
pools the student the same way before comparing), so both sides use identical math. The
definitions are those of FORMAT.md section 2 (`hidden.pooling`) and section 4 ("Pooled
attention").

This module imports torch: the store core (`logitstore/__init__.py`, format, writer,
reader) must never import it.

Padding: a sample's real tokens are where `attention_mask` is True and must be one
contiguous run, which covers both right padding (real tokens first) and left padding
(real tokens last). Padded positions never contribute.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor
HIDDEN_POOLINGS = ("mean", "mean-all", "last")


def pool_hidden(hidden: Tensor, loss_mask: Tensor, attention_mask: Tensor,
                kind: str = "mean") -> Tensor:
    """One vector per sample: hidden [B, S, d], loss_mask [B, S], attention_mask [B, S] -> [B, d].

    mean:     mean over the target tokens (loss_mask & attention_mask); a sample without
              any target token falls back to the mean over all its real tokens
    mean-all: mean over the real tokens (attention_mask)
    last:     the last real token (largest position with attention_mask True)
    A sample with no real token pools to zeros. The result is float32 whatever the input.
    """
    if kind not in HIDDEN_POOLINGS:
        raise ValueError(f"hidden pooling must be one of {HIDDEN_POOLINGS}, found {kind!r}")
    if (hidden.dim() != 3 or loss_mask.shape != hidden.shape[:2]
            or attention_mask.shape != loss_mask.shape):
        raise ValueError(f"expected hidden [B, S, d] with loss_mask and attention_mask [B, S], "
                         f"found {tuple(hidden.shape)}, {tuple(loss_mask.shape)}, "
                         f"{tuple(attention_mask.shape)}")
    h = hidden.float()
    real = attention_mask.bool()
    if kind == "last":
        positions = torch.arange(h.shape[1], device=h.device)
        last = (positions * real).argmax(-1)  # [B]; 0 for a sample without real tokens
        picked = h[torch.arange(h.shape[0], device=h.device), last]  # [B, d]
        return picked * real.any(-1, keepdim=True)
    select = real
    if kind == "mean":
        target = loss_mask.bool() & real
        select = torch.where(target.any(-1, keepdim=True), target, real)
    weight = select.float()[..., None]  # [B, S, 1]
    return (h * weight).sum(1) / weight.sum(1).clamp_min(1.0)


def _real_span(attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """(first real position [B], number of real tokens [B]); the real run must be contiguous."""
    real = attention_mask.bool()
    lengths = real.sum(-1)  # [B]
    first = real.int().argmax(-1)  # [B]; 0 when a sample has no real token
    positions = torch.arange(real.shape[1], device=real.device)
    run = (positions >= first[:, None]) & (positions < (first + lengths)[:, None])
    if not torch.equal(run, real):
        raise ValueError("attention_mask must mark one contiguous run of real tokens per sample "
                         "(left or right padding)")
    return first, lengths


def _bin_matrix(first: Tensor, lengths: Tensor, seq_len: int, grid: int) -> Tensor:
    """[B, G, S]: row g averages the tokens of bin g of each sample's real span.

    Bins of a span of length L starting at `first` are positions first + [floor(g*L/G),
    ceil((g+1)*L/G)), as in adaptive_avg_pool; averaging a rectangle is separable, so
    P A P^T equals adaptive_avg_pool2d(A[span, span], G).
    """
    g = torch.arange(grid, device=lengths.device)
    L = lengths.long()[:, None]  # [B, 1]
    start = (g * L) // grid  # [B, G]
    end = ((g + 1) * L + grid - 1) // grid  # ceil
    s = torch.arange(seq_len, device=lengths.device) - first.long()[:, None, None]  # [B, 1, S]
    inside = (s >= start[..., None]) & (s < end[..., None])  # [B, G, S]
    return inside.float() / (end - start).clamp_min(1)[..., None].float()


def pool_attention(attn: Tensor, lengths: Tensor | None, grid: int, *,
                   attention_mask: Tensor | None = None) -> Tensor:
    """Average-pool each sample's real L x L attention block to a grid x grid map.

    attn [B, H, S, S] (rows: queries), lengths [B] -> [B, H, G, G] float32. Per sample b this
    is adaptive_avg_pool2d(attn[b, :, span, span], G): cell (i, j) is the mean attention
    from query bin i to key bin j, bins being contiguous token ranges (they overlap when
    L < G). Length 0 -> zeros.

    Without `attention_mask` the real tokens are positions 0..lengths[b]-1 (right padding).
    With it (any padding side) the real span is read from the mask and `lengths` may be
    None; when both are given they must agree.
    """
    if attn.dim() != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"attn must be [B, H, S, S], found {tuple(attn.shape)}")
    if not (isinstance(grid, int) and grid >= 1):
        raise ValueError(f"grid must be an int >= 1, found {grid!r}")
    batch, seq_len = attn.shape[0], attn.shape[-1]
    if attention_mask is not None:
        if attention_mask.shape != (batch, seq_len):
            raise ValueError(f"attention_mask must be [B, S]={(batch, seq_len)}, found "
                             f"{tuple(attention_mask.shape)}")
        first, from_mask = _real_span(attention_mask.to(attn.device))
        if lengths is not None and not torch.equal(lengths.to(from_mask), from_mask):
            raise ValueError(f"lengths {lengths.tolist()} disagree with attention_mask "
                             f"({from_mask.tolist()} real tokens)")
        lengths = from_mask
    else:
        if lengths is None:
            raise ValueError("pass lengths [B] or attention_mask [B, S]")
        if lengths.shape != (batch,):
            raise ValueError(f"lengths must be [B]={(batch,)}, found {tuple(lengths.shape)}")
        lengths = lengths.to(attn.device)
        if bool(((lengths < 0) | (lengths > seq_len)).any()):
            raise ValueError(f"lengths must be in [0, S={seq_len}], found {lengths.tolist()}")
        first = torch.zeros_like(lengths)
    P = _bin_matrix(first, lengths, seq_len, grid)[:, None]  # [B, 1, G, S]
    return P @ attn.float() @ P.transpose(-1, -2)  # [B, H, G, G]
