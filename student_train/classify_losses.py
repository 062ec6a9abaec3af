"""Distillation losses for classifiers (one or more named heads), on tensors only.

Everything here is a small function on tensors: no model, no store, no projection. Math runs in
fp32 or wider (half inputs are cast up, float64 stays float64). Teacher tensors are constants:
they are detached here, so a teacher tensor that happens to require grad receives none. Each
function returns a 0-d tensor (a mean over the batch) attached to the student's graph.

Per head (logits [B, C], labels [B] long):
  head_cross_entropy   CE with optional class weights, exactly torch's F.cross_entropy
                       semantics: sum_i w[y_i] * -log q_i(y_i) / sum_i w[y_i] over the samples
                       whose label is not `ignore_index` (-100). Unlike torch, a batch whose
                       labels are all ignored gives 0 (not NaN) and a zero gradient.
  head_kl              T^2 * mean_b KL(softmax(t_b / T) || softmax(s_b / T)) (Hinton et al.
                       2015; "batchmean": summed over classes, averaged over samples). The T^2
                       keeps the gradient's scale independent of T.
Over heads (dicts name -> tensor), weighted sums with per-head weights (default 1 each, the
seed's plain sum over its two heads): `cross_entropy_over_heads`, `kl_over_heads`; both return
(total, {head: unweighted value}).

Per feature part (student features already projected to the teacher's width, [B, D]):
  feature_mse          mean over B and D of (s - t)^2 (F.mse_loss "mean")
  feature_cosine       mean_b (1 - cos(s_b, t_b)); a zero vector has cosine 0 (norms are
                       clamped at 1e-8, as F.cosine_similarity does)
`feature_loss_over_parts` sums either over named parts with optional per-part weights.

The projections live in feature_projections.py, CRD in crd.py, and classify_objective.py
weights and sums all of these. Straightforward references: tests/reference_classify_losses.py.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from student_train.losses import IGNORE, at_least_fp32, divergence

Tensor = torch.Tensor
FEATURE_LOSSES = ("mse", "cos")
COSINE_EPS = 1e-8


def _check_logits_labels(logits: Tensor, labels: Tensor, what: str) -> None:
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"{what}: expected logits [B, C] and labels [B], found "
                         f"{tuple(logits.shape)} and {tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{what}: labels must be an integer tensor, found {labels.dtype}")


def _check_label_range(logits: Tensor, labels: Tensor, ignore_index: int, what: str) -> None:
    # An out-of-range label would be a device-side assert on CUDA: name it here instead.
    kept = labels[labels != ignore_index]
    if kept.numel() and (bool((kept < 0).any()) or bool((kept >= logits.shape[1]).any())):
        raise ValueError(f"{what}: labels must be in [0, {logits.shape[1]}) or {ignore_index} "
                         f"(ignored), found values from {int(kept.min())} to {int(kept.max())}; "
                         f"check the head's number of classes against the data's labels")


def _check_temperature(temperature: float) -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
            and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, found {temperature!r}")


def _safe_divide(numerator: Tensor, denominator: Tensor) -> Tensor:
    """numerator / denominator, or numerator (exactly 0 then) when the denominator is 0: an
    empty batch gives 0 with a finite, zero gradient instead of 0/0 = NaN."""
    return numerator / torch.where(denominator > 0, denominator, torch.ones_like(denominator))


def head_cross_entropy(logits: Tensor, labels: Tensor, *, class_weights: Tensor | None = None,
                       ignore_index: int = IGNORE) -> Tensor:
    """CE of one head with torch's class-weight semantics (see module docstring).

    logits: [B, C]; labels: [B] long (ignore_index = no label); class_weights: [C] >= 0 or None
    returns 0-d: sum_i w[y_i] nll_i / sum_i w[y_i] over kept samples (0 if none, or all w = 0)
    """
    _check_logits_labels(logits, labels, "head_cross_entropy")
    _check_label_range(logits, labels, ignore_index, "head_cross_entropy")
    logq = F.log_softmax(at_least_fp32(logits), -1)                      # [B, C]
    keep = labels != ignore_index                                         # [B]
    safe_labels = torch.where(keep, labels, torch.zeros_like(labels)).long()
    nll = -logq.gather(-1, safe_labels[:, None]).squeeze(-1)              # [B]
    weight = keep.to(logq.dtype)                                          # [B]
    if class_weights is not None:
        if class_weights.shape != logits.shape[1:]:
            raise ValueError(f"class_weights must be [C]={tuple(logits.shape[1:])}, found "
                             f"{tuple(class_weights.shape)}")
        if bool((class_weights < 0).any()):
            raise ValueError("class_weights must be >= 0, found a negative weight")
        weight = weight * class_weights.to(logq).gather(0, safe_labels)
    # where, not *: an ignored sample's nll is never multiplied in (no 0 * inf).
    weighted = torch.where(weight > 0, nll * weight, torch.zeros_like(nll))
    return _safe_divide(weighted.sum(), weight.sum())


def head_kl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """T^2 * mean_b KL(softmax(teacher/T) || softmax(student/T)) of one head.

    student_logits, teacher_logits: [B, C]  ->  0-d (teacher detached)
    """
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(f"head_kl: expected student and teacher logits of the same shape [B, C],"
                         f" found {tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    _check_temperature(temperature)
    T = float(temperature)
    s = at_least_fp32(student_logits)
    logp = F.log_softmax(at_least_fp32(teacher_logits.detach()).to(s.dtype) / T, -1)  # [B, C]
    logq = F.log_softmax(s / T, -1)                                                     # [B, C]
    per_sample = divergence("kl", logp, logq)  # [B]; clamps log(0) so 0 * log 0 stays 0
    return T * T * per_sample.mean()


def _weight_of(weights: Mapping[str, float] | None, name: str) -> float:
    weight = 1.0 if weights is None else weights.get(name, 1.0)
    if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
        raise ValueError(f"the weight of head/part {name!r} must be a finite number >= 0, "
                         f"found {weight!r}")
    return float(weight)


def _check_same_keys(student: Mapping, other: Mapping, what: str) -> None:
    if set(student) != set(other):
        raise ValueError(f"{what}: the student has heads/parts {sorted(student)} but the other "
                         f"side has {sorted(other)}; both must name the same ones")


def cross_entropy_over_heads(logits: Mapping[str, Tensor], labels: Mapping[str, Tensor], *,
                             class_weights: Mapping[str, Tensor] | None = None,
                             head_weights: Mapping[str, float] | None = None,
                             ignore_index: int = IGNORE) -> tuple[Tensor, dict[str, Tensor]]:
    """sum_h w_h * head_cross_entropy(logits[h], labels[h], class_weights[h]).

    returns (total 0-d, {head: unweighted 0-d CE}); class_weights may name a subset of heads.
    """
    _check_same_keys(logits, labels, "cross_entropy_over_heads")
    unknown = set(class_weights or {}) - set(logits)
    if unknown:
        raise ValueError(f"class_weights name heads {sorted(unknown)} that the model does not "
                         f"have (heads: {sorted(logits)})")
    per_head = {head: head_cross_entropy(logits[head], labels[head],
                                         class_weights=(class_weights or {}).get(head),
                                         ignore_index=ignore_index)
                for head in logits}
    total = sum(_weight_of(head_weights, h) * value for h, value in per_head.items())
    return total, per_head


def kl_over_heads(student_logits: Mapping[str, Tensor], teacher_logits: Mapping[str, Tensor], *,
                  temperature: float | Mapping[str, float] = 1.0,
                  head_weights: Mapping[str, float] | None = None
                  ) -> tuple[Tensor, dict[str, Tensor]]:
    """sum_h w_h * head_kl(student[h], teacher[h], T_h); temperature: one T or {head: T}.

    returns (total 0-d, {head: unweighted 0-d KL (already times T_h^2)})
    """
    _check_same_keys(student_logits, teacher_logits, "kl_over_heads")
    if isinstance(temperature, Mapping) and set(temperature) != set(student_logits):
        raise ValueError(f"a temperature per head must name every head {sorted(student_logits)},"
                         f" found {sorted(temperature)}")
    per_head = {}
    for head in student_logits:
        T = temperature[head] if isinstance(temperature, Mapping) else temperature
        per_head[head] = head_kl(student_logits[head], teacher_logits[head], temperature=T)
    total = sum(_weight_of(head_weights, h) * value for h, value in per_head.items())
    return total, per_head


def _check_features(student: Tensor, teacher: Tensor, what: str) -> None:
    if student.dim() != 2 or student.shape != teacher.shape:
        raise ValueError(f"{what}: expected student (projected) and teacher features of the same "
                         f"shape [B, D], found {tuple(student.shape)} and {tuple(teacher.shape)};"
                         f" project the student's features to the teacher's width first")


def feature_mse(student: Tensor, teacher: Tensor) -> Tensor:
    """mean over [B, D] of (student - teacher)^2; student [B, D] (projected), teacher [B, D]."""
    _check_features(student, teacher, "feature_mse")
    s = at_least_fp32(student)
    return (s - teacher.detach().to(s.dtype)).pow(2).mean()


def feature_cosine(student: Tensor, teacher: Tensor) -> Tensor:
    """mean_b (1 - cos(student_b, teacher_b)); [B, D] each; norms clamped at COSINE_EPS."""
    _check_features(student, teacher, "feature_cosine")
    s = at_least_fp32(student)
    t = teacher.detach().to(s.dtype)
    dot = (s * t).sum(-1)                                                              # [B]
    norms = s.norm(dim=-1).clamp_min(COSINE_EPS) * t.norm(dim=-1).clamp_min(COSINE_EPS)  # [B]
    return (1 - dot / norms).mean()


def feature_loss_over_parts(kind: str, student: Mapping[str, Tensor],
                            teacher: Mapping[str, Tensor], *,
                            part_weights: Mapping[str, float] | None = None
                            ) -> tuple[Tensor, dict[str, Tensor]]:
    """sum_p w_p * loss(student[p], teacher[p]), kind "mse" or "cos"; parts: the student's keys.

    returns (total 0-d, {part: unweighted 0-d value}); the teacher may hold more parts.
    """
    if kind not in FEATURE_LOSSES:
        raise ValueError(f"feature loss must be one of {FEATURE_LOSSES}, found {kind!r}")
    if not student:
        raise ValueError(f"feature loss {kind!r} needs at least one feature part, found none")
    missing = set(student) - set(teacher)
    if missing:
        raise ValueError(f"feature parts {sorted(missing)} have no teacher features (the teacher "
                         f"has {sorted(teacher)}); name only parts the store holds")
    loss = feature_mse if kind == "mse" else feature_cosine
    per_part = {part: loss(student[part], teacher[part]) for part in student}
    total = sum(_weight_of(part_weights, p) * value for p, value in per_part.items())
    return total, per_part
