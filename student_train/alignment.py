"""Hidden-state and attention alignment of a student to stored per-sample teacher signals.

Teacher hidden states are stored as one pooled vector per sample and layer, [B, L_t, d_t];
teacher attention as a G x G grid per sample, layer and head, [B, L_t, H_t or 1, G, G]. The
student side is pooled with the SAME functions (`pool_hidden`, `pool_attention`), which the
teacher dump can call too, so both sides are pooled by identical math.

Layer maps are {student_layer: teacher_layer}. Student layers index the student's hidden
states / attention maps as passed in (for HF `output_hidden_states=True`, index 0 is the
embedding output and i the output of block i); teacher layers are the teacher's layer numbers,
translated to positions on the stored L_t axis through `teacher_layers` (the stored layer
numbers, e.g. the store's HiddenSpec.layers; default: position == layer number), in the form
they are stored. `stored_teacher_layer` converts a user's teacher layer to that form (3 and
-1 name the same layer of a 4-layer teacher); student_train/sources.py applies it when it
builds the layer maps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from logitstore.format import canonical_layer
# The pooling math is shared with teacher-dump, which computes the stored teacher pools.
from logitstore.toolkit.pooling import HIDDEN_POOLINGS, pool_attention, pool_hidden  # noqa: F401

Tensor = torch.Tensor
HIDDEN_LOSSES = ("cosine", "mse")
ATTENTION_LOSSES = ("mse", "frobenius")


def parse_layer_map(text: str) -> dict[int, int]:
    """"1:3,2:7" -> {1: 3, 2: 7} ({student_layer: teacher_layer})."""
    mapping: dict[int, int] = {}
    for item in text.split(","):
        parts = item.strip().split(":")
        try:
            student, teacher = (int(p) for p in parts)
        except ValueError:
            raise ValueError(f"layer map entries must look like 'student:teacher' with integers, "
                             f"found {item.strip()!r} in {text!r}") from None
        if student in mapping:
            raise ValueError(f"student layer {student} is mapped twice in {text!r}")
        mapping[student] = teacher
    return mapping


def stored_teacher_layer(layer: int, stored: Sequence[int], depth: int | None) -> int | None:
    """The entry of `stored` (a signal's stored layer numbers) that teacher layer `layer`
    names, or None when it is not stored. With the teacher's `depth` known, either form
    matches (3 or -1 of a 4-layer teacher); unknown (None), only the form as stored."""
    if layer in stored:
        return layer
    if depth is None:
        return None
    block = canonical_layer(layer, depth)
    return next((s for s in stored if canonical_layer(s, depth) == block), None)


def _teacher_positions(layer_map: Mapping[int, int], teacher_layers: Sequence[int] | None,
                       n_stored: int) -> dict[int, int]:
    """{student_layer: index on the stored L_t axis}; teacher layers as stored."""
    stored = list(range(n_stored)) if teacher_layers is None else list(teacher_layers)
    if len(stored) != n_stored:
        raise ValueError(f"teacher_layers lists {len(stored)} layers but the stored axis has "
                         f"{n_stored}")
    out = {}
    for s, t in layer_map.items():
        if t not in stored:
            raise ValueError(f"teacher layer {t} (mapped from student layer {s}) is not stored; "
                             f"stored layers: {stored}")
        out[s] = stored.index(t)
    return out


def _weighted_sample_mean(values: Tensor, valid: Tensor, sample_weights: Tensor | None) -> Tensor:
    """sum_b w_b v_b x_b / sum_b w_b v_b over samples; 0.0 (graph-connected) when empty."""
    weight = valid.float()
    if sample_weights is not None:
        if sample_weights.shape != valid.shape:
            raise ValueError(f"sample_weights must be [B]={tuple(valid.shape)}, "
                             f"found {tuple(sample_weights.shape)}")
        weight = weight * sample_weights.float()
    values = torch.where(weight > 0, values, torch.zeros_like(values))
    total = weight.sum()
    return (values * weight).sum() / torch.where(total > 0, total, torch.ones_like(total))


# ----------------------------------------------------------------------------- hidden states

class HiddenStateAligner(nn.Module):
    """Learned projections d_s -> d_t per mapped layer, and the pooled-hidden alignment loss.

    loss "cosine": 1 - cos(proj(pool_s), pool_t); "mse": mean_d (proj(pool_s) - pool_t)^2.
    Per layer: weighted mean over samples with at least one real token; then mean over layers.
    """

    def __init__(self, layer_map: Mapping[int, int], d_student: int, d_teacher: int, *,
                 loss: str = "cosine", pooling: str = "mean",
                 teacher_layers: Sequence[int] | None = None):
        super().__init__()
        if loss not in HIDDEN_LOSSES:
            raise ValueError(f"hidden loss must be one of {HIDDEN_LOSSES}, found {loss!r}")
        if pooling not in HIDDEN_POOLINGS:
            raise ValueError(f"pooling must be one of {HIDDEN_POOLINGS}, found {pooling!r}")
        if not layer_map:
            raise ValueError("layer_map must map at least one student layer, found none")
        self.layer_map = dict(layer_map)
        self.loss, self.pooling = loss, pooling
        self.teacher_layers = None if teacher_layers is None else list(teacher_layers)
        self.projections = nn.ModuleDict(
            {str(s): nn.Linear(d_student, d_teacher) for s in self.layer_map})

    def forward(self, student_hidden_states: Sequence[Tensor], teacher_pools: Tensor,
                mask: Tensor, attention_mask: Tensor,
                sample_weights: Tensor | None = None) -> Tensor:
        """student_hidden_states[layer]: [B, S, d_s]; teacher_pools [B, L_t, d_t] -> scalar."""
        if teacher_pools.dim() != 3:
            raise ValueError(f"teacher_pools must be [B, L_t, d_t], found "
                             f"{tuple(teacher_pools.shape)}")
        where = _teacher_positions(self.layer_map, self.teacher_layers, teacher_pools.shape[1])
        valid = attention_mask.bool().any(-1)  # [B]
        per_layer = []
        for s, t_pos in where.items():
            if not -len(student_hidden_states) <= s < len(student_hidden_states):
                raise ValueError(f"student layer {s} not among {len(student_hidden_states)} "
                                 f"hidden states")
            pooled = pool_hidden(student_hidden_states[s], mask, attention_mask, self.pooling)
            proj = self.projections[str(s)]
            bias = None if proj.bias is None else proj.bias.float()
            student = F.linear(pooled, proj.weight.float(), bias)  # [B, d_t]
            teacher = teacher_pools[:, t_pos].float()
            if student.shape != teacher.shape:
                raise ValueError(f"projected student pool {tuple(student.shape)} does not match "
                                 f"teacher pool {tuple(teacher.shape)}")
            if self.loss == "cosine":
                per_sample = 1 - F.cosine_similarity(student, teacher, dim=-1, eps=1e-8)
            else:
                per_sample = (student - teacher).pow(2).mean(-1)
            per_layer.append(_weighted_sample_mean(per_sample, valid, sample_weights))
        return torch.stack(per_layer).mean()


# ----------------------------------------------------------------------------- attention

def attention_alignment_loss(student_attentions: Sequence[Tensor], teacher_grids: Tensor,
                             lengths: Tensor, layer_map: Mapping[int, int], *,
                             loss: str = "mse", teacher_layers: Sequence[int] | None = None,
                             sample_weights: Tensor | None = None) -> Tensor:
    """Student attention maps vs stored teacher grids.

    student_attentions[layer]: [B, H, S, S]; teacher_grids [B, L_t, H_t, G, G] with H_t == H
    (per head) or H_t == 1 (teacher head-averaged: the student's heads are averaged too).
    loss "mse":       mean over (heads, G, G) of the squared difference, per sample;
    loss "frobenius": mean over heads of the squared Frobenius norm of the G x G difference,
                      per sample - with the mean over layers below this is seed 003's
                      L_att = 1/(L*H) * sum_{l,h} ||A_T - A_S||_F^2.
    Weighted mean over samples with length > 0, then mean over mapped layers -> scalar.
    """
    if loss not in ATTENTION_LOSSES:
        raise ValueError(f"attention loss must be one of {ATTENTION_LOSSES}, found {loss!r}")
    if teacher_grids.dim() != 5 or teacher_grids.shape[-1] != teacher_grids.shape[-2]:
        raise ValueError(f"teacher_grids must be [B, L_t, H_t, G, G], found "
                         f"{tuple(teacher_grids.shape)}")
    if not layer_map:
        raise ValueError("layer_map must map at least one student layer, found none")
    grid = teacher_grids.shape[-1]
    where = _teacher_positions(layer_map, teacher_layers, teacher_grids.shape[1])
    valid = lengths > 0
    per_layer = []
    for s, t_pos in where.items():
        if not -len(student_attentions) <= s < len(student_attentions):
            raise ValueError(f"student layer {s} not among {len(student_attentions)} "
                             f"attention maps")
        student = pool_attention(student_attentions[s], lengths, grid)  # [B, H, G, G]
        teacher = teacher_grids[:, t_pos].float()  # [B, H_t, G, G]
        if teacher.shape[1] == 1:
            student = student.mean(1, keepdim=True)  # pooling is linear: mean commutes
        elif teacher.shape[1] != student.shape[1]:
            raise ValueError(f"teacher grid has {teacher.shape[1]} heads, student layer {s} has "
                             f"{student.shape[1]}; expected equal counts or a head-averaged "
                             f"(1-head) teacher")
        if student.shape[0] != teacher.shape[0]:
            raise ValueError(f"batch sizes differ: student {student.shape[0]}, teacher "
                             f"{teacher.shape[0]}")
        sq = (student - teacher).pow(2)
        per_sample = sq.mean((1, 2, 3)) if loss == "mse" else sq.sum((2, 3)).mean(1)
        per_layer.append(_weighted_sample_mean(per_sample, valid, sample_weights))
    return torch.stack(per_layer).mean()
