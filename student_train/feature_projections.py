"""Learned projections from the student's feature widths to the teacher's, one per named part.

Seed 002 builds its feature projections lazily inside the loss's first forward, so they exist
only after the optimizer was built: they never train and are not in its checkpoints. Here the
widths are still read from real tensors, but in an explicit step taken BEFORE the optimizer:

    projections = LazyProjections(["image_cls", "text_cls"])
    projections.materialize(student_features, teacher_features)   # one batch: {part: [B, D]}
    optimizer = AdamW([*student.parameters(), *projections.parameters()])
    projected = projections(student_features)                      # {part: [B, D_teacher]}

Each part gets an nn.Linear(D_student, D_teacher) (bias included, torch's default init, so the
initial weights follow torch's seed), registered as a submodule: it trains, moves with .to(),
and is saved in the state_dict under `layers.<part>.weight` / `.bias`.

Direction: student -> teacher (FitNets' regressor), not the seed's teacher -> student. The
teacher's stored features are the fixed target; a trainable map applied to the target could
shrink both sides towards 0 and make the MSE small without the student learning anything.

Resume: a fresh LazyProjections either materializes on a batch and then loads the state_dict
(the usual order: build, materialize, build the optimizer, load the checkpoint), or loads the
state_dict directly, which creates the layers from the saved shapes on the saved tensors'
device (then move the module with .to() and build the optimizer after that load). Using the
module before either raises a ValueError naming `materialize`. Materializing again with the
same widths does nothing; different widths raise (the optimizer would no longer hold the
layers).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

Tensor = torch.Tensor
PREFIX = "layers."


def _parameter_dtype(feature: Tensor) -> torch.dtype:
    # fp32 parameters for half/bf16 features (autocast handles the matmul); fp64 stays fp64.
    return torch.float64 if feature.dtype == torch.float64 else torch.float32


class LazyProjections(nn.Module):
    """{part: nn.Linear(D_student, D_teacher)}, widths taken from one batch by `materialize`."""

    def __init__(self, parts: Sequence[str]):
        super().__init__()
        parts = list(parts)
        if not parts or len(set(parts)) != len(parts):
            raise ValueError(f"LazyProjections needs at least one feature part, each named once, "
                             f"found {parts!r}")
        bad = [p for p in parts if not isinstance(p, str) or not p or "." in p]
        if bad:
            raise ValueError(f"feature part names must be non-empty strings without '.', found "
                             f"{bad!r} (they become state_dict keys)")
        self.parts = parts
        self.layers = nn.ModuleDict()

    @property
    def materialized(self) -> bool:
        return set(self.layers) == set(self.parts)

    def widths(self) -> dict[str, tuple[int, int]]:
        """{part: (student width, teacher width)} of the materialized layers."""
        return {p: (layer.in_features, layer.out_features) for p, layer in self.layers.items()}

    def materialize(self, student_features: Mapping[str, Tensor],
                    teacher_features: Mapping[str, Tensor]) -> None:
        """Create every part's layer from one batch's features ({part: [B, D]} on each side).

        Layers go on the student features' device. Call before building the optimizer.
        """
        for side, features in (("student", student_features), ("teacher", teacher_features)):
            missing = [p for p in self.parts if p not in features]
            if missing:
                raise ValueError(f"materialize: the {side} features lack parts {missing} "
                                 f"(found {sorted(features)}); name only parts both sides have")
            wrong = {p: tuple(features[p].shape) for p in self.parts if features[p].dim() != 2}
            if wrong:
                raise ValueError(f"materialize: {side} features must be [B, D] per part, found "
                                 f"{wrong}")
        wanted = {p: (int(student_features[p].shape[1]), int(teacher_features[p].shape[1]))
                  for p in self.parts}
        if self.materialized:
            if wanted != self.widths():
                raise ValueError(f"materialize: the projections already exist with widths "
                                 f"{self.widths()} (student, teacher) but this batch has "
                                 f"{wanted}; the optimizer holds the old layers, so build a new "
                                 f"LazyProjections for other widths")
            return
        for part, (d_student, d_teacher) in wanted.items():
            feature = student_features[part]
            self.layers[part] = nn.Linear(d_student, d_teacher, device=feature.device,
                                          dtype=_parameter_dtype(feature))

    def forward(self, student_features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """{part: [B, D_student]} -> {part: [B, D_teacher]} for every part of this module."""
        if not self.materialized:
            raise ValueError("LazyProjections used before materialize: expected "
                             "materialize(student_features, teacher_features) on one batch (or "
                             "load_state_dict of a saved one) before the first forward and "
                             "before building the optimizer, found no layers")
        out = {}
        for part, layer in self.layers.items():
            feature = student_features.get(part)
            if feature is None or feature.dim() != 2 or feature.shape[1] != layer.in_features:
                found = None if feature is None else tuple(feature.shape)
                raise ValueError(f"LazyProjections: part {part!r} expects student features "
                                 f"[B, {layer.in_features}], found {found}")
            out[part] = layer(feature.to(layer.weight.dtype))
        return out

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A fresh module has no layers yet: create them from the saved shapes so that
        # load_state_dict works before materialize (resume without a batch at hand).
        if not self.materialized:
            for part in self.parts:
                weight = state_dict.get(f"{prefix}{PREFIX}{part}.weight")
                if weight is not None and part not in self.layers:
                    has_bias = f"{prefix}{PREFIX}{part}.bias" in state_dict
                    self.layers[part] = nn.Linear(weight.shape[1], weight.shape[0],
                                                  bias=has_bias, dtype=weight.dtype,
                                                  device=weight.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
