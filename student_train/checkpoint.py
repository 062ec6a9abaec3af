"""Checkpoints: run/checkpoints/step-00000100/ = accelerate state + stream state + trainer state.

accelerate's `save_state` holds the model (student + projections), optimizer, registered
scheduler, grad scaler and every process's RNG states (with --fsdp the model and optimizer
as every process's shards, student_train/sharding.py). Next to it we keep what accelerate does
not know: each process's stream position (`stream-rank{r}.pt`) and `trainer_state.json`, the
`TrainingProgress` (step, tokens seen, best eval, early-stopping count...). A checkpoint is
written under a `.tmp` name and renamed once every process has finished, so `--resume latest`
never picks a half-written one.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from logitstore.errors import ConfigError

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"
_STEP_DIR = re.compile(r"step-(\d+)")


@dataclass
class TrainingProgress:
    """Where a run stands: everything of the loop that a resume restores (trainer_state.json)."""

    total_steps: int
    step: int = 0  # optimizer steps done
    tokens: float = 0.0  # real (non-padding) tokens trained on, all processes
    best_eval_loss: float | None = None
    best_step: int | None = None
    best_eval: dict[str, float] | None = None  # the metrics of the best evaluation
    bad_evals: int = 0  # evaluations since the best one (early stopping)
    stopped_early: bool = False
    elapsed_s: float = 0.0  # training wall time up to the last checkpoint, all runs

    def record_eval(self, metrics: dict[str, float], patience: int) -> bool:
        """Note an evaluation; True when it is the best so far. With `patience`, training
        stops after that many evaluations in a row without improvement."""
        loss = metrics["eval/loss"]
        if self.best_eval_loss is None or loss < self.best_eval_loss:
            self.best_eval_loss, self.best_step, self.bad_evals = loss, self.step, 0
            self.best_eval = dict(metrics)
            return True
        self.bad_evals += 1
        self.stopped_early = bool(patience) and self.bad_evals >= patience
        return False

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "TrainingProgress":
        """From `state_dict()` (a checkpoint of an older version may lack `best_eval`)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(state) - known)
        if unknown or "total_steps" not in state:
            raise ConfigError([f"resume: {TRAINER_STATE} has unknown keys {unknown} or no "
                               f"total_steps: it was written by another version of "
                               f"student-train; start a new run (a new --out)"])
        return cls(**state)


def checkpoint_dir(out: Path, step: int) -> Path:
    return out / CHECKPOINTS / f"step-{step:08d}"


def list_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = out / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if _STEP_DIR.fullmatch(p.name) and (p / TRAINER_STATE).is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.fullmatch(p.name).group(1)))


def find_checkpoint(out: Path, resume: str | None) -> Path | None:
    """The checkpoint `--resume` names: a directory, or 'latest' (None when there is none)."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(out)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / TRAINER_STATE).is_file():
        raise ConfigError([f"resume: {path} is not a complete checkpoint (no {TRAINER_STATE}); "
                           f"checkpoints of this run: "
                           f"{[p.name for p in list_checkpoints(out)] or 'none'}"])
    return path


def save_checkpoint(accelerator, out: Path, progress: TrainingProgress, stream_state: Any,
                    keep: int, protect: Path | None = None) -> Path:
    """Every process calls this, at step `progress.step`. Keeps the newest `keep` checkpoints
    (and `protect`). Returns the checkpoint directory."""
    final = checkpoint_dir(out, progress.step)
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)  # left by a crash
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    torch.save(stream_state, tmp / f"stream-rank{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / TRAINER_STATE).write_text(json.dumps(progress.state_dict(), indent=1),
                                         encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_checkpoints(out)[:-keep]:
            if protect is None or old.resolve() != protect.resolve():
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path) -> tuple[TrainingProgress, Any]:
    """Restore accelerate's state; returns (progress, this process's stream state)."""
    stream_file = path / f"stream-rank{accelerator.process_index}.pt"
    if not stream_file.is_file():
        raise ConfigError([f"resume: {path} has no stream state for process "
                           f"{accelerator.process_index}; resume with the number of processes "
                           f"the checkpoint was written with"])
    progress = TrainingProgress.from_state_dict(
        json.loads((path / TRAINER_STATE).read_text(encoding="utf-8")))
    accelerator.load_state(str(path))
    # Our own file: the stream's state may hold numpy arrays, which weights_only refuses.
    return progress, torch.load(stream_file, weights_only=False)
