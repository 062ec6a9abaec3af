"""student-train's loop: distil a student from a store of teacher signals (or fit --data).

`train(cfg)`, top to bottom:
  1. check the inputs that cost no model (`sources.check_inputs`: stores, data;
     `check_run_dir`: run directory, checkpoint to resume), so a wrong path fails at once;
  2. `prepare_run`: accelerator, student, batches, objective, optimizer, schedule (`Run`);
  3. `start_state`: a fresh `TrainState`, or one restored from a checkpoint;
  4. `run_steps`: take `grad_accum` micro-batches (every process its own shard), one exact
     optimizer step over them (`student_train.step.Step`), log; evaluate and checkpoint at
     their intervals; stop at total_steps, at the end of the data or early;
  5. evaluate the final model, restore the best one (early stopping), save (`finish`).
Resuming restores model, optimizer, scheduler, RNG and stream position, so a resumed run
continues the same loss curve.

Precision: bf16 autocast on CUDA with bf16 support, fp16 (with loss scaling) on other CUDA,
fp32 on CPU; the master weights stay fp32 and every loss is computed in fp32.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from logitstore import __version__
from logitstore.errors import ConfigError, LogitStoreError
from logitstore.toolkit.tokenizer_identity import check_vocab_compat
from logitstore.toolkit.options import config_differences, saved_value
from student_train.checkpoint import (TrainingProgress, checkpoint_dir, find_checkpoint,
                                      load_checkpoint, save_checkpoint)
from student_train.config import FIELDS, TrainConfig, save_config
from student_train.cross_config import CROSS_FIELDS, cross_fields_in_effect
from student_train.losses import temperature_at
from student_train.memory_plan_render import (OUT_OF_MEMORY, check_memory_plan,
                                              out_of_memory_message)
from student_train.objective import DistillationObjective, LossSettings
from student_train.optimizers import make_optimizer
from student_train.sources import Inputs, Sources, check_inputs, open_sources
from student_train.sharding import (check_sharding, fsdp_plugin, join_process_group,
                                    shard_blocks, unsharded_student)
from student_train.step import Step, all_processes
from student_train.student import load_student, save_final

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- setup

def make_accelerator(cfg: TrainConfig, out: Path):
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin, str_to_bool

    precision = cfg.mixed_precision
    if precision == "auto":
        # Decided from the environment, not from a PartialState: creating one here would fix
        # the distributed setup before the Accelerator reads ACCELERATE_USE_CPU.
        configured = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")  # `accelerate config`
        on_cpu = str_to_bool(os.environ.get("ACCELERATE_USE_CPU", "false"))
        if configured != "no":
            precision = configured
        elif torch.cuda.is_available() and not on_cpu:
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "no"
    plugins = {}
    if cfg.fsdp:
        join_process_group()  # before the Accelerator fixes the distributed setup
        plugins["fsdp_plugin"] = fsdp_plugin()
    # FSDP: reduce-scatter every micro-batch, so only sharded gradients are accumulated.
    accumulation = GradientAccumulationPlugin(num_steps=cfg.grad_accum, sync_each_batch=cfg.fsdp)
    accelerator = Accelerator(mixed_precision=precision, gradient_accumulation_plugin=accumulation,
                              log_with="tensorboard", project_dir=str(out), **plugins)
    check_sharding(accelerator, cfg.fsdp)
    return accelerator


def plan_total_steps(cfg: TrainConfig, stream, accelerator) -> int:
    """max_steps, else epochs x (micro-batches per epoch, fewest over processes) / grad_accum."""
    if cfg.max_steps:
        return cfg.max_steps
    counts = torch.tensor([stream.num_batches()], device=accelerator.device)
    per_epoch = int(accelerator.gather(counts).min())
    total = int(cfg.epochs * per_epoch // cfg.grad_accum)
    if total < 1:
        raise ConfigError([f"an epoch holds {per_epoch} micro-batch(es) per process, fewer than "
                           f"grad_accum={cfg.grad_accum} x epochs={cfg.epochs}: lower grad_accum "
                           f"or batch_tokens, or set max_steps"])
    return total


class EpochBatches:
    """Micro-batches across epochs. All processes end an epoch together, when the first one
    runs out, so no process waits forever on a collective the others never reach."""

    def __init__(self, stream, accelerator, max_epochs: float):
        self.stream, self.accelerator, self.max_epochs = stream, accelerator, max_epochs
        self.epoch = 0
        self._it = None

    def restore(self, stream_state: dict) -> None:
        """Continue where a checkpointed stream stood (its epoch, its batches consumed)."""
        self.stream.load_state_dict(stream_state)
        self.epoch, self._it = int(stream_state["epoch"]), None

    def next(self) -> dict | None:
        empty_epochs = 0
        while self.epoch < self.max_epochs and empty_epochs < 2:
            if self._it is None:
                self.stream.set_epoch(self.epoch)
                self._it, fresh = iter(self.stream), True
            else:
                fresh = False
            batch = next(self._it, None)
            if all_processes(self.accelerator, batch is not None):
                return batch
            empty_epochs = empty_epochs + 1 if fresh else 0  # a whole epoch gave nothing
            self.epoch, self._it = self.epoch + 1, None
        return None

    def take(self, n: int) -> list[dict] | None:
        window = []
        for _ in range(n):
            batch = self.next()
            if batch is None:
                return None  # a partial last window is dropped: every step has n micro-batches
            window.append(batch)
        return window


# ----------------------------------------------------------------------------- the run

def _check_resume(cfg: TrainConfig, out: Path, ckpt: Path | None,
                  across: Callable[[], bool] = lambda: True) -> None:
    """Refuses a resume whose settings differ from the run's saved ones where that changes
    the training math; differences in cross-tokenizer switches that act on neither run
    (`cross_fields_in_effect`; `across()`: whether the run is across tokenizers, asked only
    then) are no difference."""
    import yaml

    saved_file = out / "config.yaml"
    if ckpt is None or not saved_file.is_file():
        return
    saved = (yaml.safe_load(saved_file.read_text(encoding="utf-8")) or {}).get("train", {})
    diffs = config_differences(saved, cfg, FIELDS, saved_as="run")
    if any(d.split(":", 1)[0] in CROSS_FIELDS for d in diffs):
        as_saved = {k: saved_value(saved, k, FIELDS[k]) for k in CROSS_FIELDS}
        crossing = across()
        inert = set(CROSS_FIELDS) - cross_fields_in_effect(as_saved, crossing) \
            - cross_fields_in_effect(cfg.as_dict(), crossing)
        diffs = [d for d in diffs if d.split(":", 1)[0] not in inert]
    order = list(saved.get("signals") or {}), list(cfg.signals)
    if cfg.signal_mixture == "priority" and order[0] != order[1]:  # the first one leads
        diffs.append(f"signals: run has the order {order[0]}, now {order[1]} (signal_mixture "
                     f"priority gives each position to the first signal that covers it)")
    if diffs:
        raise ConfigError([f"resume: {d}" for d in diffs] +
                          ["resuming continues the same run: use its settings, or a new --out"])


def check_run_dir(cfg: TrainConfig, inputs: Inputs | None = None) -> tuple[Path, Path | None]:
    """(run directory, created and writable; the checkpoint `--resume` names, or None).
    `inputs` (check_inputs') tell a resume whether the run is across tokenizers; without
    them every cross-tokenizer switch is compared."""
    out = Path(cfg.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise LogitStoreError(
            f"out {out}: the run directory cannot be created or written "
            f"({type(exc).__name__}: {exc.strerror or exc}); give a writable directory with "
            f"--out") from exc
    ckpt = find_checkpoint(out, cfg.resume)
    _check_resume(cfg, out, ckpt, lambda: inputs is None or inputs.across_tokenizers(cfg))
    return out, ckpt


@dataclass
class Run:
    """What the loop works with, made once by `prepare_run` (on every process alike)."""

    cfg: TrainConfig
    out: Path
    accelerator: Any
    tokenizer: Any
    student_info: Any  # logitstore.toolkit.hf.LoadedModel
    vocab_padding: int
    sources: Sources
    model: Any  # the DistillationObjective, prepared by accelerate
    optimizer: torch.optim.Optimizer
    scheduler: Any  # stepped by us, once per optimizer step
    total_steps: int
    batches: EpochBatches
    step: Step


def prepare_run(cfg: TrainConfig, out: Path, inputs: Inputs) -> Run:
    """Accelerator, student, data, objective, optimizer and schedule of the run."""
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    accelerator = make_accelerator(cfg, out)
    set_seed(cfg.seed)  # same initial projections on every process (and on resume)
    tokenizer, student, student_info = load_student(cfg, accelerator.device,
                                                       inputs.student_tokenizer)
    vocab_padding = check_vocab_compat(tokenizer, student)
    sources = open_sources(cfg, inputs, tokenizer, student, accelerator)
    model = DistillationObjective(
        student, sources.plans,
        LossSettings.of(cfg),
        sources.aligners, vocab_maps=sources.vocab_maps).to(accelerator.device)
    optimizer = make_optimizer(cfg, model)
    total_steps = plan_total_steps(cfg, sources.train, accelerator)
    scheduler = get_scheduler(cfg.lr_schedule, optimizer,
                              num_warmup_steps=math.ceil(cfg.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    if cfg.fsdp:
        shard_blocks(accelerator, student)  # the transformer blocks are the FSDP units
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    batches = EpochBatches(sources.train, accelerator,
                           math.inf if cfg.max_steps else math.ceil(cfg.epochs))
    return Run(cfg, out, accelerator, tokenizer, student_info, vocab_padding, sources, model,
               optimizer, scheduler, total_steps, batches, Step(cfg, accelerator, model, sources))


class MetricsLog:
    """Metrics to the trackers (tensorboard) and, on the main process, run/metrics.jsonl."""

    def __init__(self, accelerator, path: Path | None):
        self.accelerator = accelerator
        self.file = path.open("a", encoding="utf-8") if path is not None else None

    def record(self, step: int, values: dict[str, Any]) -> None:
        self.accelerator.log(values, step=step)
        if self.file:
            self.file.write(json.dumps({"step": step, **values}) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()


@dataclass
class TrainState:
    """The loop's state: the checkpointed progress, and what this process alone keeps."""

    progress: TrainingProgress
    metrics: MetricsLog
    saved_at: int | None  # step of the last checkpoint (of this run or the one resumed)
    evaluated_at: int | None = None  # step of the last evaluation
    last_eval: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)  # training wall clock
    elapsed_before: float = 0.0  # training wall time of the runs before a resume


def start_state(run: Run, ckpt: Path | None) -> TrainState:
    """Fresh, or restored from `ckpt` (weights, optimizer, RNG, stream position)."""
    progress = TrainingProgress(total_steps=run.total_steps)
    if ckpt is not None:
        progress, stream_state = load_checkpoint(run.accelerator, ckpt)
        if progress.total_steps != run.total_steps:
            raise ConfigError([f"resume: the checkpoint plans {progress.total_steps} steps, "
                               f"this run {run.total_steps}: data or batching changed"])
        run.batches.restore(stream_state)
        log.info("resumed from %s at step %d", ckpt, progress.step)
    main = run.accelerator.is_main_process
    if main:
        save_config(run.cfg, run.out / "config.yaml")
        run.accelerator.init_trackers("tensorboard", config=_flat_config(run.cfg))
    return TrainState(progress, MetricsLog(run.accelerator,
                                           run.out / "metrics.jsonl" if main else None),
                      saved_at=progress.step if ckpt else None,
                      elapsed_before=progress.elapsed_s)


def _flat_config(cfg: TrainConfig) -> dict[str, Any]:
    """Tensorboard hparams take only scalars and strings."""
    return {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
            for k, v in cfg.as_dict().items()}


def save(run: Run, state: TrainState) -> None:
    """Checkpoint at the current step (all processes); the best one survives rotation when
    early stopping may restore it."""
    progress = state.progress
    progress.elapsed_s = state.elapsed_before + time.perf_counter() - state.started
    best = checkpoint_dir(run.out, progress.best_step) if progress.best_step else None
    save_checkpoint(run.accelerator, run.out, progress, run.batches.stream.state_dict(),
                    run.cfg.keep_checkpoints, protect=best if run.cfg.patience else None)
    state.saved_at = progress.step


def evaluate(run: Run, state: TrainState) -> None:
    """Evaluate on the eval batches, log, note the best (checkpointed with early stopping)."""
    metrics = run.step.evaluate(run.sources.eval)
    state.last_eval, state.evaluated_at = metrics, state.progress.step
    state.metrics.record(state.progress.step, metrics)
    if state.progress.record_eval(metrics, run.cfg.patience) and run.cfg.patience:
        save(run, state)  # keep the best weights, to restore them when training ends


class Throughput:
    """Tokens per second since the last reset."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.tokens, self.since = 0.0, time.perf_counter()

    def add(self, tokens: float) -> float:
        self.tokens += tokens
        return self.tokens / max(time.perf_counter() - self.since, 1e-9)


def run_steps(run: Run, state: TrainState) -> None:
    """Optimizer steps until total_steps, the end of the data or early stopping; logs,
    evaluates and checkpoints at their intervals."""
    from tqdm.auto import tqdm

    cfg, progress = run.cfg, state.progress
    bar = tqdm(total=progress.total_steps, initial=progress.step,
               disable=not run.accelerator.is_main_process, desc="student-train", unit="step",
               dynamic_ncols=True)
    speed = Throughput()
    while progress.step < progress.total_steps and not progress.stopped_early:
        window = run.batches.take(cfg.grad_accum)
        if window is None:
            break  # out of data (epochs done)
        temperature = temperature_at(progress.step, progress.total_steps, cfg.temperature,
                                     cfg.temperature_end, cfg.temperature_schedule)
        stats = run.step.train(window, temperature, run.optimizer, run.scheduler)
        progress.step += 1
        progress.tokens += stats["tokens"]
        rate = speed.add(stats["tokens"])
        bar.update(1)
        bar.set_postfix(loss=f"{stats['loss']:.4f}", tok_s=f"{rate:.0f}")
        if progress.step % cfg.log_every == 0 or progress.step == progress.total_steps:
            state.metrics.record(progress.step, {
                **{f"train/{k}": v for k, v in stats.items()},
                "train/lr": run.scheduler.get_last_lr()[0], "train/temperature": temperature,
                "train/epoch": run.batches.epoch, "train/tokens_seen": progress.tokens,
                "train/tokens_per_s": rate})
            speed.reset()
        if run.sources.eval is not None and cfg.eval_every and progress.step % cfg.eval_every == 0:
            evaluate(run, state)
        if cfg.save_every and progress.step % cfg.save_every == 0 \
                and state.saved_at != progress.step:
            save(run, state)
    bar.close()


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) training as configured; returns the final metrics.

    The inputs that cost no model (stores, data, run directory, checkpoint to resume) are
    checked first, so a wrong path fails in seconds, not after the student has loaded; with
    gpu_memory set, so is the memory plan (a config that cannot fit is refused, naming the
    change that would). An out-of-memory error while training becomes a LogitStoreError
    with the plan's suggestion; the checkpoints saved so far let --resume continue.
    """
    inputs = check_inputs(cfg)
    out, ckpt = check_run_dir(cfg, inputs)
    check_memory_plan(cfg, inputs)  # before any weight is loaded (gpu_memory, else CUDA's)
    try:
        return _train(cfg, out, inputs, ckpt)
    except OUT_OF_MEMORY as exc:  # the step's peak outgrew the device: say what would fit
        raise LogitStoreError(out_of_memory_message(cfg, exc, inputs)) from None


def _train(cfg: TrainConfig, out: Path, inputs: Inputs, ckpt: Path | None) -> dict[str, Any]:
    """train() once its inputs are checked: prepare, (resume,) step, evaluate, save."""
    run = prepare_run(cfg, out, inputs)
    state = start_state(run, ckpt)
    progress = state.progress
    if run.sources.eval is not None and cfg.eval_on_start and progress.step == 0:
        evaluate(run, state)
    run_steps(run, state)

    if run.sources.eval is not None and state.evaluated_at != progress.step:
        evaluate(run, state)  # the final model is always evaluated
    if cfg.save_every and state.saved_at != progress.step:
        save(run, state)  # so that --resume latest after the end has nothing left to do
    final_metrics = state.last_eval
    if cfg.patience and progress.best_step is not None and progress.best_step != progress.step:
        log.info("restoring the best evaluation (step %d)", progress.best_step)
        run.accelerator.load_state(str(checkpoint_dir(out, progress.best_step)))
        final_metrics = progress.best_eval
    finish(run, progress, final_metrics)
    state.metrics.close()
    run.accelerator.end_training()
    return final_metrics


def finish(run: Run, progress: TrainingProgress, final_metrics: dict[str, float]) -> None:
    """run/final (student + tokenizer), run/alignment.safetensors, training_metadata.json."""
    accelerator, cfg, out = run.accelerator, run.cfg, run.out
    accelerator.wait_for_everyone()
    full_state = accelerator.get_state_dict(run.model)  # gathered on the main process (FSDP too)
    unwrapped = accelerator.unwrap_model(run.model)
    if accelerator.is_main_process:
        student, student_state = unwrapped.student, {
            k.removeprefix("student."): v for k, v in full_state.items()
            if k.startswith("student.")}
        if cfg.fsdp:  # the trained student is sharded: save a plain copy of its full state
            student, student_state = unsharded_student(cfg, student, student_state), None
        save_final(student, run.tokenizer, cfg, out,
                   state_dict=None if cfg.lora_r else student_state)
        if len(unwrapped.aligners):
            from safetensors.torch import save_file

            # From the gathered state: with FSDP the aligners' own tensors are shards.
            save_file({f"hidden.{name}.{k.removeprefix(f'aligners.{i}.')}":
                       v.detach().cpu().contiguous()
                       for i, name in enumerate(unwrapped.aligner_names)
                       for k, v in full_state.items() if k.startswith(f"aligners.{i}.")},
                      str(out / "alignment.safetensors"))
        metadata = {
            "tool": "student-train", "tool_version": __version__,
            "student": run.student_info.as_dict(), "vocab_padding_rows": run.vocab_padding,
            "source": run.sources.provenance, "config": cfg.as_dict(),
            "steps": progress.step, "total_steps": progress.total_steps,
            "stopped_early": progress.stopped_early, "best_step": progress.best_step,
            "best_eval_loss": progress.best_eval_loss, "tokens_seen": progress.tokens,
            "world_size": accelerator.num_processes,
            "mixed_precision": str(accelerator.mixed_precision),
            "final_metrics": final_metrics,
        }
        tmp = out / "training_metadata.json.tmp"
        tmp.write_text(json.dumps(metadata, indent=1, default=str), encoding="utf-8")
        tmp.replace(out / "training_metadata.json")
    accelerator.wait_for_everyone()
