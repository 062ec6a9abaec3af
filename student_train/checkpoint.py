"""Checkpoints: run/checkpoints/step-00000100/ = accelerate state + stream state + trainer state.

accelerate's `save_state` holds the model (student + projections), optimizer, registered
scheduler, grad scaler and every process's RNG states. Next to it we keep what accelerate does
not know: each process's stream position (`stream-rank{r}.pt`) and `trainer_state.json` (step,
epoch, best eval, early-stopping count...). A checkpoint is written under a `.tmp` name and
renamed once every process has finished, so `--resume latest` never picks a half-written one.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from logitstore.errors import ConfigError

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"
_STEP_DIR = re.compile(r"step-(\d+)")


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


def save_checkpoint(accelerator, out: Path, step: int, trainer_state: dict[str, Any],
                    stream_state: Any, keep: int, protect: Path | None = None) -> Path:
    """Every process calls this. Returns the checkpoint directory."""
    final = checkpoint_dir(out, step)
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)  # left by a crash
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    torch.save(stream_state, tmp / f"stream-rank{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1), encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_checkpoints(out)[:-keep]:
            if protect is None or old.resolve() != protect.resolve():
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path) -> tuple[dict[str, Any], Any]:
    """Restore accelerate's state; returns (trainer_state, this process's stream state)."""
    stream_file = path / f"stream-rank{accelerator.process_index}.pt"
    if not stream_file.is_file():
        raise ConfigError([f"resume: {path} has no stream state for process "
                           f"{accelerator.process_index}; resume with the number of processes "
                           f"the checkpoint was written with"])
    accelerator.load_state(str(path))
    state = json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))
    # Our own file: the stream's state may hold numpy arrays, which weights_only refuses.
    return state, torch.load(stream_file, weights_only=False)
