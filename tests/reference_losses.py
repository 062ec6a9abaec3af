"""Dense reference losses for tests and benchmarks (no production code calls these).

Written for clarity, not memory: every function takes full [..., V] logits. The tests check the
training path (student_train.fused_head_loss, reached through student_train.objective) against
them, and the benchmarks use them for the "online KD" baselines (the teacher's full logits in
memory). The divergences and the sparse targets themselves are production code
(student_train.losses); the functions here combine them the obvious way.

Benchmarks import this module by putting tests/ on sys.path, as they do for `synthetic`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from student_train.losses import (SparseTarget, at_least_fp32, cross_entropy_per_position,
                                  divergence, sparse_kd_per_position)

Tensor = torch.Tensor


def dense_kd_per_position(student_logits: Tensor, teacher_logits: Tensor, *, loss: str = "kl",
                          temperature: float = 1.0, jsd_beta: float = 0.5,
                          skew_alpha: float = 0.1) -> Tensor:
    """T^2 * divergence between softmax(teacher/T) and softmax(student/T) over the full vocab.

    student_logits, teacher_logits: [..., V]  ->  [...]
    """
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
            and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, found {temperature!r}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student and teacher logits must have the same shape, found "
                         f"{tuple(student_logits.shape)} vs {tuple(teacher_logits.shape)}")
    p = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return temperature**2 * divergence(loss, p, q, jsd_beta=jsd_beta, skew_alpha=skew_alpha)


def masked_mean(values: Tensor, mask: Tensor, sample_weights: Tensor | None = None) -> Tensor:
    """Weighted mean of values over positions where mask is True.

    values: [B, S], mask: [B, S] bool, sample_weights: [B] >= 0 or None.
    Every selected position of sample b counts sample_weights[b] times:
        sum_bs w_b m_bs v_bs / sum_bs w_b m_bs
    (reduces to the plain masked mean when w == 1; a sample with more target tokens weighs
    more, as in token-level CE). Nothing selected (or all weight 0) -> 0.0 attached to the graph.
    """
    if values.shape != mask.shape:
        raise ValueError(f"values {tuple(values.shape)} and mask {tuple(mask.shape)} must match")
    weight = mask.float()
    if sample_weights is not None:
        if sample_weights.shape != values.shape[:1]:
            raise ValueError(f"sample_weights must be [B]={tuple(values.shape[:1])}, "
                             f"found {tuple(sample_weights.shape)}")
        if bool((sample_weights < 0).any()):
            raise ValueError("sample_weights must be >= 0, found a negative weight")
        weight = weight * sample_weights.float().view(-1, *([1] * (values.dim() - 1)))
    values = torch.where(weight > 0, at_least_fp32(values),
                         torch.zeros_like(values, dtype=torch.float))
    total = weight.sum()
    # Divide by 1 when empty: the numerator is then exactly 0 and its gradient finite.
    return (values * weight).sum() / torch.where(total > 0, total, torch.ones_like(total))


def sparse_kd_loss(student_logits: Tensor, target: SparseTarget, mask: Tensor, *,
                   loss: str = "kl", sample_weights: Tensor | None = None,
                   jsd_beta: float = 0.5, skew_alpha: float = 0.1) -> Tensor:
    """masked_mean of sparse_kd_per_position. student_logits [B,S,V], mask [B,S] -> scalar."""
    per_position = sparse_kd_per_position(student_logits, target, loss=loss, jsd_beta=jsd_beta,
                                          skew_alpha=skew_alpha)
    return masked_mean(per_position, mask, sample_weights)


def cross_entropy_loss(logits: Tensor, labels: Tensor, mask: Tensor | None = None, *,
                       label_smoothing: float = 0.0, sample_weights: Tensor | None = None,
                       ignore_index: int = -100) -> Tensor:
    """Hard-label CE [B,S,V] vs [B,S] -> scalar; positions with mask False or label ignored skip."""
    keep = labels != ignore_index
    if mask is not None:
        keep = keep & mask
    per_position = cross_entropy_per_position(logits, labels, label_smoothing=label_smoothing,
                                              ignore_index=ignore_index)
    return masked_mean(per_position, keep, sample_weights)


def blend_kd_ce(kd: Tensor, ce: Tensor, alpha: float) -> Tensor:
    """alpha * KD + (1 - alpha) * CE (seeds 000 and 004: alpha weights the distillation term)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], found {alpha}")
    return alpha * kd + (1 - alpha) * ce


def combine_teacher_losses(losses: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """sum_i (w_i / sum_j w_j) * L_i: several teachers' KD losses, weights normalised to 1."""
    if len(losses) != len(weights) or not losses:
        raise ValueError(f"expected one weight per loss (>= 1), found {len(losses)} losses and "
                         f"{len(weights)} weights")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"teacher weights must be >= 0 with a positive sum, found {list(weights)}")
    total = float(sum(weights))
    return sum((w / total) * loss for w, loss in zip(weights, losses))


def specialty_sample_weights(specialties: Sequence[str], weight_of: Mapping[str, float], *,
                             default: float = 1.0) -> Tensor:
    """[B] per-sample weights from a specialty -> weight map (unknown specialties get default)."""
    weights = [float(weight_of.get(s, default)) for s in specialties]
    if any(w < 0 for w in weights):
        raise ValueError(f"specialty weights must be >= 0, found {weights}")
    return torch.tensor(weights, dtype=torch.float32)


def distillm_med_loss(kd_per_position: Tensor, ce_per_position: Tensor, mask: Tensor,
                      specialty_ids: Tensor, specialty_weights: Tensor, *, alpha: float = 0.7,
                      alpha_weights: str = "kd", attention_loss: Tensor | None = None,
                      beta: float = 0.2) -> Tensor:
    """Seed 003 (DistilLLM-Med) objective: L_total = sum_s w_s * L_KD^(s) + beta * L_att.

    The reference for student_train.loss_combine.combine with specialty groups.
    kd_per_position, ce_per_position, mask: [B, S]; specialty_ids: [B] long in
    [0, n_specialties); specialty_weights: [n_specialties] (e.g. cardiology 1.2, radiology 1.0).
    L_KD^(s) is the masked token mean, over the samples of specialty s, of the per-token blend
        alpha * KD + (1 - alpha) * CE   (alpha_weights="kd", default) or
        alpha * CE + (1 - alpha) * KD   (alpha_weights="ce").
    The seed is self-contradictory: its formula reads L_KD = a*L_CE + (1-a)*L_KL, while its
    config and troubleshooting say a = 0.7 is "higher weight on distillation"; the default
    follows the stated intent, alpha_weights="ce" gives the literal formula. As in the seed,
    the sum runs over the specialties present in the batch and w_s are NOT normalised (the
    scale grows with the number of specialties present). The seed's lambda*||W_S||^2 is left
    to the optimizer's weight decay (equal to weight_decay = 2*lambda for coupled L2,
    approximated by AdamW's decoupled decay). beta is the seed's attention weight (0.1-0.3;
    0.2 in its config).
    """
    if kd_per_position.shape != mask.shape or ce_per_position.shape != mask.shape:
        raise ValueError(f"kd, ce and mask must all be [B, S], found {tuple(kd_per_position.shape)}"
                         f", {tuple(ce_per_position.shape)}, {tuple(mask.shape)}")
    if specialty_ids.shape != mask.shape[:1] or specialty_weights.dim() != 1:
        raise ValueError(f"specialty_ids must be [B]={tuple(mask.shape[:1])} and specialty_weights "
                         f"1-D, found {tuple(specialty_ids.shape)} and "
                         f"{tuple(specialty_weights.shape)}")
    if alpha_weights not in ("kd", "ce"):
        raise ValueError(f"alpha_weights must be 'kd' or 'ce', found {alpha_weights!r}")
    blend = (blend_kd_ce(kd_per_position, ce_per_position, alpha) if alpha_weights == "kd"
             else blend_kd_ce(ce_per_position, kd_per_position, alpha))
    m = mask.float()
    blend = torch.where(mask, blend.float(), torch.zeros_like(m))
    n = specialty_weights.shape[0]
    sums = m.new_zeros(n).index_add(0, specialty_ids.long(), (blend * m).sum(-1))
    counts = m.new_zeros(n).index_add(0, specialty_ids.long(), m.sum(-1))
    per_specialty = sums / torch.where(counts > 0, counts, torch.ones_like(counts))
    total = (specialty_weights.float() * per_specialty).sum()
    if attention_loss is not None:
        total = total + beta * attention_loss
    return total
