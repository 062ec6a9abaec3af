"""Checkpoints of `student-train --task classify`, without pickle: safetensors and JSON only.

    save_classify_checkpoint(out, parts, progress, keep)   -> run/checkpoints/step-00000100/
    load_classify_checkpoint(path, parts)                  -> ClassifyProgress (parts restored)

A checkpoint directory holds:
  student.safetensors     the student's weights (safetensors.torch.save_model)
  objective.safetensors   the ClassifyObjective's state: feature projections, CRD heads, memory
                          banks and normaliser Z (so a resume continues the same CRD)
  optimizer.safetensors   AdamW's per-parameter tensors as `state.<param>.<key>`, with
  optimizer.json          its param_groups and non-tensor state
  rng.safetensors         torch's CPU RNG, the CRD negatives' generator, CUDA RNGs
  trainer_state.json      ClassifyProgress (step, data position, best eval, early stopping)
                          and the LR scheduler's state
It is written as `step-N.tmp` and renamed when complete, so `--resume latest`
(checkpoint.find_checkpoint, which looks for trainer_state.json) never picks a partial one.
Resume order: build the student, the objective, materialize it, build optimizer and scheduler
(all as a fresh run does), then load: every tensor is overwritten.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from logitstore.errors import ConfigError
from student_train.checkpoint import TRAINER_STATE, checkpoint_dir, list_checkpoints


@dataclass
class ClassifyProgress:
    """Where a classify run stands; everything of the loop a resume restores."""

    total_steps: int
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of `epoch` already trained on
    samples: int = 0
    best_macro_f1: float | None = None
    best_step: int | None = None
    best_eval: dict[str, float] | None = None
    bad_evals: int = 0
    stopped_early: bool = False
    elapsed_s: float = 0.0

    def record_eval(self, metrics: dict[str, float], patience: int) -> bool:
        """Note an evaluation; True when its mean macro-F1 is the best so far. With
        `patience`, training stops after that many evaluations in a row without one."""
        value = metrics.get("eval/macro_f1")
        if value is not None and (self.best_macro_f1 is None or value > self.best_macro_f1):
            self.best_macro_f1, self.best_step, self.bad_evals = value, self.step, 0
            self.best_eval = dict(metrics)
            return True
        self.bad_evals += 1
        self.stopped_early = bool(patience) and self.bad_evals >= patience
        return False


@dataclass
class TrainingParts:
    """The objects a checkpoint saves and restores."""

    model: torch.nn.Module
    objective: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    crd_generator: torch.Generator


def _optimizer_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors, others = {}, {}
    for param, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{param}.{key}"] = value.detach().cpu().contiguous()
            else:
                others.setdefault(str(param), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "other_state": others}


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, param, key = name.split(".", 2)
        state.setdefault(int(param), {})[key] = value
    for param, values in meta["other_state"].items():
        state.setdefault(int(param), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_tensors(generator: torch.Generator) -> dict[str, torch.Tensor]:
    tensors = {"torch_cpu": torch.get_rng_state(), "crd_generator": generator.get_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = state
    return tensors


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=1), encoding="utf-8")


def save_classify_checkpoint(out: Path, parts: TrainingParts, progress: ClassifyProgress,
                             keep: int) -> Path:
    """Write the checkpoint of `progress.step`; keep the newest `keep`. Returns its path."""
    from safetensors.torch import save_file, save_model

    final = checkpoint_dir(out, progress.step)
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)  # left by a crash
    tmp.mkdir(parents=True)
    save_model(parts.model, str(tmp / "student.safetensors"))
    save_file({k: v.detach().cpu().contiguous() for k, v in parts.objective.state_dict().items()},
              str(tmp / "objective.safetensors"))
    tensors, meta = _optimizer_files(parts.optimizer)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    _write_json(tmp / "optimizer.json", meta)
    save_file(_rng_tensors(parts.crd_generator), str(tmp / "rng.safetensors"))
    _write_json(tmp / TRAINER_STATE, {"progress": dataclasses.asdict(progress),
                                      "scheduler": parts.scheduler.state_dict()})
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in list_checkpoints(out)[:-keep]:
        shutil.rmtree(old)
    return final


def load_classify_checkpoint(path: Path, parts: TrainingParts) -> ClassifyProgress:
    """Restore every part from `path` (written by save_classify_checkpoint)."""
    from safetensors.torch import load_file, load_model

    state = json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))
    if "progress" not in state or not (path / "objective.safetensors").is_file():
        raise ConfigError([f"resume: {path} is not a checkpoint of student-train --task "
                           f"classify (no progress or objective.safetensors); resume a run with "
                           f"the task it was started with, or start a new --out"])
    device = next(parts.model.parameters()).device
    load_model(parts.model, str(path / "student.safetensors"), device=str(device))
    objective_state = load_file(str(path / "objective.safetensors"), device=str(device))
    parts.objective.load_state_dict(objective_state)
    meta = json.loads((path / "optimizer.json").read_text(encoding="utf-8"))
    tensors = load_file(str(path / "optimizer.safetensors"))  # moved by load_state_dict
    parts.optimizer.load_state_dict(_optimizer_state(tensors, meta))
    parts.scheduler.load_state_dict(state["scheduler"])
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch_cpu"])
    parts.crd_generator.set_state(rng["crd_generator"])
    cuda = [rng[k] for k in sorted(rng) if k.startswith("cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    return ClassifyProgress(**state["progress"])
