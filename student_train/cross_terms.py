"""The per-position loss values of a student trained across tokenizers (objective.py's hook).

A foreign-tokenizer batch (cross_batch.py) has, per top-k signal, `kd_mask` [B, S]: the student
positions with a teacher target. The KD column of such a signal is 0 elsewhere (a skipped
position adds nothing; objective.denominators counts only the masked-in positions for its
mean). The vocabulary-mapped ("pkl") targets are ordinary SparseTargets and go through
`fused_head_loss` with CE as usual; its expected gradient is masked the same way, so the
backward still takes the gradients the forward built. ULD columns are computed apart
(`cross_tokenizer.uld_values`, checkpointed chunks) at the masked-in positions only.
"""

from __future__ import annotations

import torch

from student_train.cross_tokenizer import uld_values
from student_train.fused_head_loss import fused_head_loss

Tensor = torch.Tensor


def cross_kd_masks(kd_plans, signals: dict, pick) -> Tensor | None:
    """[n, n_kd] bool: which picked positions each KD signal trains (True throughout for a
    signal without `kd_mask`); None when no signal has one (same-tokenizer batches)."""
    if not any("kd_mask" in signals[p.name] for p in kd_plans):
        return None
    cols = [pick(signals[p.name]["kd_mask"]).bool() if "kd_mask" in signals[p.name] else None
            for p in kd_plans]
    some = next(c for c in cols if c is not None)
    return torch.stack([torch.ones_like(some) if c is None else c for c in cols], 1)


def cross_head_values(kd_plans, signals: dict, pick, hidden: Tensor, head, terms,
                      expected: Tensor | None, kd_masks: Tensor | None, temperature: float,
                      chunk_size: int) -> Tensor:
    """[n, n_kd + 1] loss values (KD per plan, then CE) at the picked positions, KD columns
    zero where their mask is False (module docstring)."""
    n, n_kd = hidden.shape[0], len(kd_plans)
    masks = kd_masks if kd_masks is not None else \
        torch.ones(n, n_kd, dtype=torch.bool, device=hidden.device)
    full = torch.cat([masks, torch.ones(n, 1, dtype=torch.bool, device=hidden.device)], 1)
    fused_cols = [i for i, p in enumerate(kd_plans) if p.cross_loss != "uld"] + [n_kd]
    fused_expected = None if expected is None else (expected * full)[:, fused_cols]
    fused = fused_head_loss(hidden, head.weight, terms, bias=head.bias,
                            expected_grad=fused_expected, chunk_size=chunk_size)
    columns: list[Tensor | None] = [None] * (n_kd + 1)
    for j, c in enumerate(fused_cols):
        columns[c] = fused[:, j]
    for i, plan in enumerate(kd_plans):
        if plan.cross_loss != "uld":
            continue
        rows = masks[:, i].nonzero().squeeze(-1)
        signal = signals[plan.name]
        values = uld_values(hidden.index_select(0, rows), head.weight, head.bias,
                            pick(signal["topk_ids"]).long().index_select(0, rows),
                            pick(signal["topk_logprobs"]).float().index_select(0, rows),
                            temperature, chunk_size)
        columns[i] = fused.new_zeros(n).index_put((rows,), values.to(fused.dtype))
    values = torch.stack(columns, 1)
    return torch.where(full, values, torch.zeros_like(values))
