"""The loss from the objective's token sums: divided by the global denominators, blended, weighted.

`DistillationObjective` (objective.py) returns weighted SUMS per term and group; `combine` turns
them into the loss with the denominators `objective.denominators` gives for the whole optimizer
step, and `token_sum_gradients` takes the loss's (constant) gradient w.r.t. those sums, which
the objective's fused lm_head uses to build its gradients in the forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from student_train.objective import SignalPlan

Tensor = torch.Tensor


@dataclass(frozen=True)
class Weights:
    alpha: float = 0.5
    alpha_on: str = "kd"  # alpha multiplies KD (default) or CE (seed 003's literal formula)
    hidden: float = 0.0
    attention: float = 0.0
    group_weights: tuple[float, ...] = (1.0,)  # distillm-med: specialty weights, not normalised
    # several cross-tokenizer signals: KD averaged over the positions any covers (the
    # objective's mixture scale); False: each signal's mean over its own positions
    mix_per_position: bool = True
    # positions no signal gives a KD target: CE at weight 1 there (else 1 - alpha, the blend's)
    full_ce_without_target: bool = True


def combine(sums: dict[str, Tensor], dens: dict[str, Tensor], plans: Sequence[SignalPlan],
            weights: Weights) -> tuple[Tensor, dict[str, Tensor]]:
    """(loss, parts): sums divided by (global) denominators, blended and weighted.

    Per group g: blend_g = alpha*KD_g + (1-alpha)*CE_g (token means over g; KD_g the signals'
    weighted sum); main = sum_g c_g * blend_g over groups with tokens (one group, c = 1, for the
    plain blend). Without KD signals (--data) main is the CE. Then
    loss = main + hidden * H + attention * A (sample means, signals weighted).
    """
    tokens = dens["tokens"]
    safe = torch.where(tokens > 0, tokens, torch.ones_like(tokens))
    ce_g = sums["ce"] / safe
    parts = {"ce": sums["ce"].sum() / safe.sum().clamp_min(1) if tokens.numel() > 1
             else ce_g.sum()}
    kd_plans = [p for p in plans if p.target]
    if kd_plans and any(f"kd_tokens/{p.name}" in dens for p in kd_plans):
        blend_g = _masked_kd_blend(sums, dens, kd_plans, weights, ce_g, parts)
        if "ce_free" in sums and weights.full_ce_without_target:  # CE takes the whole weight
            a = weights.alpha if weights.alpha_on == "kd" else 1 - weights.alpha
            blend_g = blend_g + a * sums["ce_free"] / safe
    elif kd_plans:
        kd_w = torch.tensor([p.kd_weight for p in kd_plans], device=tokens.device)
        kd_g = (kd_w[:, None] * sums["kd"]).sum(0) / safe
        a = weights.alpha if weights.alpha_on == "kd" else 1 - weights.alpha
        blend_g = a * kd_g + (1 - a) * ce_g
        total_tokens = tokens.sum().clamp_min(1)
        parts["kd"] = (kd_w[:, None] * sums["kd"]).sum() / total_tokens
        for p, kd in zip(kd_plans, sums["kd"]):
            parts[f"kd/{p.name}"] = kd.sum() / total_tokens
    else:
        blend_g = ce_g
    c = torch.tensor(weights.group_weights, device=tokens.device)
    loss = (c * blend_g * (tokens > 0)).sum()
    samples = dens["samples"].sum().clamp_min(1e-12)
    for kind, weight in (("hidden", weights.hidden), ("attention", weights.attention)):
        if kind in sums:
            share = torch.tensor([getattr(p, f"{kind}_weight") for p in plans
                                  if getattr(p, f"{kind}_weight") > 0], device=tokens.device)
            parts[kind] = (share * sums[kind]).sum() / samples
            loss = loss + weight * parts[kind]
    parts["loss"] = loss
    return loss, parts


def _masked_kd_blend(sums, dens, kd_plans, weights: Weights, ce_g: Tensor,
                     parts: dict[str, Tensor]) -> Tensor:
    """combine's blend per group when signals train only some positions (`kd_tokens/<name>`,
    a student with another tokenizer): one signal's KD is its mean over its own positions.
    Several signals with `weights.mix_per_position`: the sums hold each position's KD
    times the objective's mixture factor (W / the weight of the signals covering it, W the
    total weight; with signal_mixture "confidence" or "priority" W * c_s / the covering
    signals' w * c, c_s the label's probability or 1 for the first covering signal, else 0),
    divided by the positions any signal covers (`kd_tokens_any`): with the weights summing
    to 1 (plan_signals normalises them), the mean over those positions of each one's
    weighted mean over its signals. `kd/<name>` logs a signal's part of that (`kd` = their
    weighted sum), so under "confidence" or "priority" a signal's factor-scaled KD, not its
    own mean (under "priority" 0 where another signal comes first)."""
    tokens = dens["tokens"]
    kd_w = torch.tensor([p.kd_weight for p in kd_plans], device=tokens.device)
    kd_den = torch.stack([dens.get(f"kd_tokens/{p.name}", tokens) for p in kd_plans])  # [n_kd, G]
    if weights.mix_per_position and "kd_tokens_any" in dens:
        kd_den = dens["kd_tokens_any"].expand_as(kd_den)
    kd_g = (kd_w[:, None] * sums["kd"] / torch.where(kd_den > 0, kd_den, 1.0)).sum(0)
    a = weights.alpha if weights.alpha_on == "kd" else 1 - weights.alpha
    per_signal = sums["kd"].sum(1) / kd_den.sum(1).clamp_min(1)  # [n_kd]
    parts["kd"] = (kd_w * per_signal).sum()
    for p, kd in zip(kd_plans, per_signal):
        parts[f"kd/{p.name}"] = kd
    return a * kd_g + (1 - a) * ce_g


def token_sum_gradients(dens: dict[str, Tensor], plans: Sequence[SignalPlan],
                        weights: Weights) -> dict[str, Tensor]:
    """d loss / d (sums["kd"] [n_kd, G], sums["ce"] [G]) for combine(sums, dens, ...).

    combine is linear in the token sums, so this depends on the denominators and weights
    only: one value per optimizer step. Taken by autograd through combine itself, so it is the
    gradient the backward will really send (up to the trainer's scale), never a re-derivation.
    """
    tokens = dens["tokens"]
    n_kd = len([p for p in plans if p.target])
    masked = any(k.startswith("kd_tokens/") for k in dens)  # a student of another tokenizer
    with torch.enable_grad():
        sums = {"kd": torch.zeros(n_kd, tokens.numel(), device=tokens.device),
                "ce": torch.zeros(tokens.numel(), device=tokens.device)}
        if masked:
            sums["ce_free"] = torch.zeros(tokens.numel(), device=tokens.device)
        for value in sums.values():
            value.requires_grad_(True)
        loss, _ = combine(sums, dens, plans, weights)
        grads = torch.autograd.grad(loss, list(sums.values()), allow_unused=True)
    return {k: torch.zeros_like(v) if g is None else g
            for (k, v), g in zip(sums.items(), grads)}
