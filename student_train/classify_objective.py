"""The classifier distillation objective: weighted CE + KL + feature MSE/cosine + CRD.

    total = w_ce * CE + w_kl * KL + w_mse * MSE + w_cos * COS + w_crd * CRD

(seed 002: ce + 0.518 kl + 112.4 mse + 10 crd). Each term is the sum over heads (CE, KL) or
feature parts (MSE, COS) of classify_losses.py, or crd.CRDLoss on one named part. A term whose
weight is 0 is not computed at all, and its inputs may be absent.

Interface for student-train --task classify:

    objective = ClassifyObjective(ClassifyLossWeights(ce=1, kl=0.5, mse=100, crd=10),
                                  heads=["modality", "location"], temperature=3.0,
                                  class_weights={"location": weights_tensor_or_list},
                                  feature_parts=["image_cls", "text_cls"], crd_part="fused",
                                  crd_config=CRDConfig(k_negatives=1024), n_samples=len(train))
    objective.materialize(student_features, teacher_features)   # one batch, BEFORE the optimizer
    objective.crd.fill_teacher_bank(index, teacher_features["fused"])  # optional: exact bank
    optimizer = AdamW([*student.parameters(), *objective.parameters()])
    total, terms = objective(student_logits={head: [B, C_h]}, labels={head: [B]},
                             teacher_logits={head: [B, C_h]},
                             student_features={part: [B, D_s]}, teacher_features={part: [B, D_t]},
                             sample_index=[B] positions in the training set, generator=g)

`terms` holds detached 0-d tensors for metrics.jsonl: each computed term unweighted ("ce",
"kl", "mse", "cos", "crd"), its per-head / per-part values ("ce/modality", "mse/image_cls"), and
"total". The objective's state_dict holds the projections, the CRD heads, banks and Z; on resume
build it, materialize it on one batch, build the optimizer, then load the checkpoint.
Class weights are kept as plain tensors (configuration, not state) and moved to the logits'
device at use.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import torch
from torch import nn

from student_train.classify_losses import (cross_entropy_over_heads, feature_loss_over_parts,
                                           kl_over_heads)
from student_train.crd import CRDConfig, CRDLoss
from student_train.feature_projections import LazyProjections

Tensor = torch.Tensor


@dataclass(frozen=True)
class ClassifyLossWeights:
    """Weight of each term; 0 switches a term off (it is then not computed)."""

    ce: float = 1.0
    kl: float = 0.0
    mse: float = 0.0
    cos: float = 0.0
    crd: float = 0.0

    def __post_init__(self) -> None:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        bad = {name: v for name, v in values.items()
               if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0)}
        if bad:
            raise ValueError(f"loss weights must be finite numbers >= 0, found {bad}")
        if not any(values.values()):
            raise ValueError(f"at least one loss weight must be > 0, found {values}")

    def active(self) -> dict[str, float]:
        return {f.name: float(getattr(self, f.name)) for f in fields(self)
                if getattr(self, f.name) > 0}


class ClassifyObjective(nn.Module):
    """Weighted classifier distillation terms plus the modules they train (see module doc)."""

    def __init__(self, weights: ClassifyLossWeights, *, heads: Sequence[str],
                 temperature: float | Mapping[str, float] = 1.0,
                 head_weights: Mapping[str, float] | None = None,
                 class_weights: Mapping[str, Sequence[float] | Tensor] | None = None,
                 feature_parts: Sequence[str] = (),
                 part_weights: Mapping[str, float] | None = None,
                 crd_part: str | None = None, crd_config: CRDConfig = CRDConfig(),
                 n_samples: int | None = None):
        super().__init__()
        problems = []
        if not heads:
            problems.append("heads must name at least one classification head")
        uses_features = weights.mse > 0 or weights.cos > 0
        if uses_features and not feature_parts:
            problems.append("mse/cos weights > 0 need feature_parts (e.g. ['image_cls'])")
        unknown = sorted(set(class_weights or {}) - set(heads))
        if unknown:
            problems.append(f"class_weights name heads {unknown} that are not among {list(heads)}")
        temperatures = (list(temperature.values()) if isinstance(temperature, Mapping)
                        else [temperature])
        if not all(isinstance(t, (int, float)) and math.isfinite(t) and t > 0
                   for t in temperatures):
            problems.append(f"temperature must be a finite number > 0 (or one per head), found "
                            f"{temperature!r}")
        if weights.crd > 0 and (crd_part is None or n_samples is None):
            problems.append("a crd weight > 0 needs crd_part (the feature part CRD contrasts) "
                            "and n_samples (the size of the training set its banks index)")
        if problems:
            raise ValueError("classify objective: " + "; ".join(problems))
        self.weights = weights
        self.heads = list(heads)
        self.temperature = temperature
        self.head_weights = dict(head_weights or {})
        self.part_weights = dict(part_weights or {})
        self.class_weights = {h: torch.as_tensor(w, dtype=torch.float32)
                              for h, w in (class_weights or {}).items()}
        self.projections = LazyProjections(feature_parts) if uses_features else None
        self.crd_part, self.crd_config, self.n_samples = crd_part, crd_config, n_samples
        self.crd: CRDLoss | None = None
        if weights.crd > 0:
            crd_config.check(n_samples)  # before any batch is read

    @property
    def materialized(self) -> bool:
        return ((self.projections is None or self.projections.materialized)
                and (self.weights.crd == 0 or self.crd is not None))

    def materialize(self, student_features: Mapping[str, Tensor],
                    teacher_features: Mapping[str, Tensor],
                    generator: torch.Generator | None = None) -> None:
        """Build the projections and the CRD module from one batch's features (widths only).
        `generator` seeds the CRD banks' initial values. Call before building the optimizer."""
        if self.projections is not None:
            self.projections.materialize(student_features, teacher_features)
        if self.weights.crd > 0 and self.crd is None:
            part = self.crd_part
            if part not in student_features or part not in teacher_features:
                raise ValueError(f"CRD part {part!r} is missing from the student features "
                                 f"{sorted(student_features)} or the teacher features "
                                 f"{sorted(teacher_features)}")
            student, teacher = student_features[part], teacher_features[part]
            self.crd = CRDLoss(int(student.shape[-1]), int(teacher.shape[-1]), self.n_samples,
                               self.crd_config, generator).to(student.device)

    def _check_inputs(self, inputs: Mapping[str, object]) -> None:
        needs = {"ce": ("student_logits", "labels"), "kl": ("student_logits", "teacher_logits"),
                 "mse": ("student_features", "teacher_features"),
                 "cos": ("student_features", "teacher_features"),
                 "crd": ("student_features", "teacher_features", "sample_index")}
        missing = sorted({name for term in self.weights.active() for name in needs[term]
                          if inputs.get(name) is None})
        if missing:
            raise ValueError(f"classify objective: the active terms {sorted(self.weights.active())}"
                             f" need {missing}, found None")
        if set(inputs["student_logits"]) != set(self.heads):
            raise ValueError(f"classify objective: expected student logits for heads "
                             f"{sorted(self.heads)}, found {sorted(inputs['student_logits'])}")
        if not self.materialized:
            raise ValueError("classify objective used before materialize: expected "
                             "objective.materialize(student_features, teacher_features) on one "
                             "batch before the optimizer is built, found no projections/CRD yet")

    def forward(self, *, student_logits: Mapping[str, Tensor],
                labels: Mapping[str, Tensor] | None = None,
                teacher_logits: Mapping[str, Tensor] | None = None,
                student_features: Mapping[str, Tensor] | None = None,
                teacher_features: Mapping[str, Tensor] | None = None,
                sample_index: Tensor | None = None,
                generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """(total 0-d, {term: detached 0-d}) over the active terms; see the module docstring."""
        self._check_inputs(dict(student_logits=student_logits, labels=labels,
                                teacher_logits=teacher_logits, student_features=student_features,
                                teacher_features=teacher_features, sample_index=sample_index))
        values: dict[str, Tensor] = {}
        details: dict[str, Tensor] = {}
        active = self.weights.active()
        if "ce" in active:
            device = next(iter(student_logits.values())).device
            weights = {h: w.to(device) for h, w in self.class_weights.items()}
            values["ce"], per_head = cross_entropy_over_heads(
                student_logits, labels, class_weights=weights, head_weights=self.head_weights)
            details.update({f"ce/{h}": v for h, v in per_head.items()})
        if "kl" in active:
            values["kl"], per_head = kl_over_heads(student_logits, teacher_logits,
                                                   temperature=self.temperature,
                                                   head_weights=self.head_weights)
            details.update({f"kl/{h}": v for h, v in per_head.items()})
        if "mse" in active or "cos" in active:
            projected = self.projections(student_features)
            for kind in ("mse", "cos"):
                if kind in active:
                    values[kind], per_part = feature_loss_over_parts(
                        kind, projected, teacher_features, part_weights=self.part_weights)
                    details.update({f"{kind}/{p}": v for p, v in per_part.items()})
        if "crd" in active:
            values["crd"] = self.crd(student_features[self.crd_part],
                                     teacher_features[self.crd_part], sample_index,
                                     generator=generator)
        total = sum(active[name] * value for name, value in values.items())
        terms = {name: value.detach() for name, value in {**values, **details}.items()}
        terms["total"] = total.detach()
        return total, terms
