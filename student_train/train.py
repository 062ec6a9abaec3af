"""student-train's loop: distil a student from a store of teacher signals (or fit --data).

One optimizer step, top to bottom:
  1. take `grad_accum` micro-batches from the stream (every process its own shard);
  2. sum their loss weights (target tokens, samples) over the micro-batches and processes:
     one all-reduce, before any forward;
  3. per micro-batch: forward -> loss *sums* -> divided by those global weights -> backward
     (DDP syncs gradients on the last micro-batch only);
  4. clip, AdamW step, scheduler step; log; maybe evaluate, checkpoint, stop early.
Step 2 makes accumulation and data parallelism exact: the gradient is that of one batch
holding every micro-batch of every process. Resuming restores model, optimizer, scheduler,
RNG and stream position, so a resumed run continues the same loss curve.

Precision: bf16 autocast on CUDA with bf16 support, fp16 (with loss scaling) on other CUDA,
fp32 on CPU; the master weights stay fp32 and every loss is computed in fp32.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from logitstore import __version__
from logitstore.errors import ConfigError
from logitstore.toolkit.hf import check_vocab_compat
from student_train.checkpoint import (checkpoint_dir, find_checkpoint, load_checkpoint,
                                      save_checkpoint)
from student_train.config import TrainConfig, resume_differences, save_config
from student_train.losses import temperature_at
from student_train.objective import (DistillationObjective, LossSettings, Weights, combine,
                                     denominators, sample_groups, token_sum_gradients)
from student_train.sources import Sources, open_sources
from student_train.student import load_student, save_final

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- setup

def make_accelerator(cfg: TrainConfig, out: Path):
    import os

    from accelerate import Accelerator
    from accelerate.utils import str_to_bool

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
    return Accelerator(mixed_precision=precision, gradient_accumulation_steps=cfg.grad_accum,
                       log_with="tensorboard", project_dir=str(out))


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    # No weight decay on biases and norm scales (1-D), as usual for transformers.
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr,
                             betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)


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


def all_processes(accelerator, flag: bool) -> bool:
    """True when `flag` holds on every process (a collective: all must call it)."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() == accelerator.num_processes)


def to_device(batch: Any, device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


class EpochBatches:
    """Micro-batches across epochs. All processes end an epoch together, when the first one
    runs out, so no process waits forever on a collective the others never reach."""

    def __init__(self, stream, accelerator, max_epochs: float, state: dict | None):
        self.stream, self.accelerator, self.max_epochs = stream, accelerator, max_epochs
        self.epoch = 0
        if state is not None:
            stream.load_state_dict(state)
            self.epoch = int(state["epoch"])
        self._it = None

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


# ----------------------------------------------------------------------------- one step

class Step:
    """What every optimizer step and evaluation needs, bundled once."""

    def __init__(self, cfg, accelerator, model, sources: Sources):
        self.cfg, self.accelerator, self.model, self.sources = cfg, accelerator, model, sources
        self.n_groups = max(1, len(sources.groups))
        self.weights = Weights(alpha=cfg.alpha, alpha_on=cfg.alpha_on, hidden=cfg.hidden_weight,
                               attention=cfg.attention_weight,
                               group_weights=tuple(sources.group_weights) or (1.0,))
        self.eval_weights = Weights(alpha=cfg.alpha, alpha_on=cfg.alpha_on)

    def add_groups(self, batch: dict) -> dict:
        if self.sources.group_of:
            other = self.n_groups - 1
            owner = torch.tensor([self.sources.group_of.get(s, other) for s in batch["sample_ids"]])
            batch["token_groups"] = sample_groups(batch, owner)
        return batch

    def global_denominators(self, window: list[dict], n_groups: int) -> dict[str, torch.Tensor]:
        dens = [denominators(b, n_groups) for b in window]
        total = {k: sum(d[k] for d in dens).to(self.accelerator.device) for k in dens[0]}
        total["real_tokens"] = torch.tensor(
            [float(sum(int(b["attention_mask"].sum()) for b in window))],
            device=self.accelerator.device)
        return self.accelerator.reduce(total, reduction="sum")

    def train(self, window: list[dict], temperature: float, optimizer, scheduler) -> dict:
        acc, cfg = self.accelerator, self.cfg
        window = [self.add_groups(b) for b in window]
        dens = self.global_denominators(window, self.n_groups)
        # accelerate divides by grad_accum and DDP averages over processes; the global
        # denominators already make the sum over micro-batches and processes the batch mean.
        scale = cfg.grad_accum * acc.num_processes
        # The loss is linear in the token sums: its gradient w.r.t. them, known now, lets the
        # objective build the lm_head gradients in its forward (objective module docstring).
        hint = {}
        if isinstance(acc.unwrap_model(self.model), DistillationObjective):
            hint["sum_grads"] = token_sum_gradients(dens, self.sources.plans, self.weights)
        logged: dict[str, torch.Tensor] = {}
        for batch in window:
            with acc.accumulate(self.model):
                sums = self.model(to_device(batch, acc.device), temperature=temperature,
                                  label_smoothing=cfg.label_smoothing, n_groups=self.n_groups,
                                  **hint)
                loss, parts = combine(sums, dens, self.sources.plans, self.weights)
                acc.backward(loss * scale)
            for k, v in parts.items():
                logged[k] = logged.get(k, 0.0) + v.detach()
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
        grad_norm = acc.clip_grad_norm_(self.model.parameters(), max_norm)
        optimizer.step()
        if not acc.optimizer_step_was_skipped:  # fp16 overflow: the scaler skipped the step
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        stats = {k: float(v) for k, v in acc.reduce(logged, reduction="sum").items()}
        stats["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        stats["tokens"] = float(dens["real_tokens"])
        return stats

    @torch.no_grad()
    def evaluate(self, stream) -> dict[str, float]:
        """Eval KD (T=1), CE (no smoothing), perplexity, eval loss = the KD/CE blend."""
        from accelerate.utils import DistributedType

        acc = self.accelerator
        # DDP: every process runs its whole shard on the plain module (no collective inside).
        # FSDP/DeepSpeed need the wrapped module in lockstep: stop at the shortest shard.
        plain = acc.distributed_type in (DistributedType.NO, DistributedType.MULTI_CPU,
                                         DistributedType.MULTI_GPU)
        module = acc.unwrap_model(self.model) if plain else self.model
        module.eval()
        sums, dens = self._zero_sums(module), None
        it = iter(stream)
        while True:
            batch = next(it, None)
            if not plain and not all_processes(acc, batch is not None):
                break
            if batch is None:
                break
            d = {k: v.to(acc.device) for k, v in denominators(batch).items()}
            dens = d if dens is None else {k: dens[k] + d[k] for k in d}
            with acc.autocast():
                out = module(to_device(batch, acc.device), temperature=1.0, label_smoothing=0.0)
            sums = {k: sums[k] + out[k].float() for k in sums}
        module.train()
        if dens is None:
            dens = {"tokens": torch.zeros(1, device=acc.device),
                    "samples": torch.zeros(1, device=acc.device)}
        sums, dens = acc.reduce(sums, reduction="sum"), acc.reduce(dens, reduction="sum")
        _, parts = combine(sums, dens, self.sources.plans, self.eval_weights)
        metrics = {f"eval/{k}": float(v) for k, v in parts.items()}
        metrics["eval/ppl"] = math.exp(min(metrics["eval/ce"], 50.0))
        metrics["eval/target_tokens"] = float(dens["tokens"].sum())
        return metrics

    def _zero_sums(self, module) -> dict[str, torch.Tensor]:
        dev = self.accelerator.device
        out = {"kd": torch.zeros(len(module.kd_plans), 1, device=dev),
               "ce": torch.zeros(1, device=dev)}
        if len(module.aligners):
            out["hidden"] = torch.zeros(len(module.aligners), device=dev)
        if module.attention_plans:
            out["attention"] = torch.zeros(len(module.attention_plans), device=dev)
        return out


# ----------------------------------------------------------------------------- the run

def _check_resume(cfg: TrainConfig, out: Path, ckpt: Path | None) -> None:
    import yaml

    saved_file = out / "config.yaml"
    if ckpt is None or not saved_file.is_file():
        return
    saved = (yaml.safe_load(saved_file.read_text(encoding="utf-8")) or {}).get("train", {})
    diffs = resume_differences(saved, cfg)
    if diffs:
        raise ConfigError([f"resume: {d}" for d in diffs] +
                          ["resuming continues the same run: use its settings, or a new --out"])


def _flat_config(cfg: TrainConfig) -> dict[str, Any]:
    """Tensorboard hparams take only scalars and strings."""
    return {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
            for k, v in cfg.as_dict().items()}


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) training as configured; returns the final metrics."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = find_checkpoint(out, cfg.resume)
    _check_resume(cfg, out, ckpt)
    accelerator = make_accelerator(cfg, out)
    main = accelerator.is_main_process
    set_seed(cfg.seed)  # same initial projections on every process (and on resume)

    tokenizer, student, student_info = load_student(cfg, accelerator.device)
    vocab_padding = check_vocab_compat(tokenizer, student)
    sources = open_sources(cfg, tokenizer, student, accelerator)
    model = DistillationObjective(
        student, sources.plans,
        LossSettings(loss=cfg.loss, topk_mode=cfg.topk_mode, jsd_beta=cfg.jsd_beta,
                     skew_alpha=cfg.skew_alpha, attention_loss=cfg.attention_loss,
                     chunk_size=cfg.lm_head_chunk),
        sources.aligners).to(accelerator.device)
    optimizer = make_optimizer(cfg, model)
    total_steps = plan_total_steps(cfg, sources.train, accelerator)
    scheduler = get_scheduler(cfg.lr_schedule, optimizer,
                              num_warmup_steps=math.ceil(cfg.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)  # stepped by us, once per optimizer step

    state: dict[str, Any] = {"step": 0, "total_steps": total_steps, "tokens": 0.0,
                             "best_eval_loss": None, "best_step": None, "bad_evals": 0,
                             "stopped_early": False, "elapsed_s": 0.0}
    stream_state = None
    if ckpt is not None:
        state, stream_state = load_checkpoint(accelerator, ckpt)
        if state["total_steps"] != total_steps:
            raise ConfigError([f"resume: the checkpoint plans {state['total_steps']} steps, "
                               f"this run {total_steps}: data or batching changed"])
        log.info("resumed from %s at step %d", ckpt, state["step"])
    if main:
        save_config(cfg, out / "config.yaml")
        accelerator.init_trackers("tensorboard", config=_flat_config(cfg))
    batches = EpochBatches(sources.train, accelerator,
                           math.inf if cfg.max_steps else math.ceil(cfg.epochs), stream_state)
    step = Step(cfg, accelerator, model, sources)

    metrics_file = (out / "metrics.jsonl").open("a", encoding="utf-8") if main else None
    progress = tqdm(total=total_steps, initial=state["step"], disable=not main,
                    desc="student-train", unit="step", dynamic_ncols=True)
    last_eval: dict[str, float] = {}
    marks = {"eval": None, "saved": state["step"] if ckpt else None}  # steps last done at
    elapsed_before, started = state["elapsed_s"], time.perf_counter()
    tokens_since, since = 0.0, time.perf_counter()

    def record(values: dict[str, Any]) -> None:
        accelerator.log(values, step=state["step"])
        if metrics_file:
            metrics_file.write(json.dumps({"step": state["step"], **values}) + "\n")
            metrics_file.flush()

    def checkpoint() -> None:
        state["elapsed_s"] = elapsed_before + time.perf_counter() - started
        best = checkpoint_dir(out, state["best_step"]) if state["best_step"] else None
        save_checkpoint(accelerator, out, state["step"], state, batches.stream.state_dict(),
                        cfg.keep_checkpoints, protect=best if cfg.patience else None)
        marks["saved"] = state["step"]

    def run_eval() -> None:
        nonlocal last_eval
        last_eval = step.evaluate(sources.eval)
        marks["eval"] = state["step"]
        record(last_eval)
        loss = last_eval["eval/loss"]
        if state["best_eval_loss"] is None or loss < state["best_eval_loss"]:
            state.update(best_eval_loss=loss, best_step=state["step"], bad_evals=0,
                         best_eval=dict(last_eval))
            if cfg.patience:  # keep the best weights, to restore them when training ends
                checkpoint()
        else:
            state["bad_evals"] += 1
            state["stopped_early"] = bool(cfg.patience) and state["bad_evals"] >= cfg.patience

    if sources.eval is not None and cfg.eval_on_start and state["step"] == 0:
        run_eval()
    while state["step"] < total_steps and not state["stopped_early"]:
        window = batches.take(cfg.grad_accum)
        if window is None:
            break  # out of data (epochs done)
        temperature = temperature_at(state["step"], total_steps, cfg.temperature,
                                     cfg.temperature_end, cfg.temperature_schedule)
        stats = step.train(window, temperature, optimizer, scheduler)
        state["step"] += 1
        state["tokens"] += stats["tokens"]
        tokens_since += stats["tokens"]
        rate = tokens_since / max(time.perf_counter() - since, 1e-9)
        progress.update(1)
        progress.set_postfix(loss=f"{stats['loss']:.4f}", tok_s=f"{rate:.0f}")
        if state["step"] % cfg.log_every == 0 or state["step"] == total_steps:
            record({**{f"train/{k}": v for k, v in stats.items()},
                    "train/lr": scheduler.get_last_lr()[0], "train/temperature": temperature,
                    "train/epoch": batches.epoch, "train/tokens_seen": state["tokens"],
                    "train/tokens_per_s": rate})
            tokens_since, since = 0.0, time.perf_counter()
        if sources.eval is not None and cfg.eval_every and state["step"] % cfg.eval_every == 0:
            run_eval()
        if cfg.save_every and state["step"] % cfg.save_every == 0 \
                and marks["saved"] != state["step"]:
            checkpoint()
    progress.close()

    if sources.eval is not None and marks["eval"] != state["step"]:
        run_eval()  # the final model is always evaluated
    if cfg.save_every and marks["saved"] != state["step"]:
        checkpoint()  # so that --resume latest after the end has nothing left to do
    final_metrics = last_eval
    if cfg.patience and state["best_step"] is not None and state["best_step"] != state["step"]:
        log.info("restoring the best evaluation (step %d)", state["best_step"])
        accelerator.load_state(str(checkpoint_dir(out, state["best_step"])))
        final_metrics = state["best_eval"]
    finish(cfg, accelerator, model, tokenizer, student_info, sources, state, final_metrics,
           vocab_padding, out)
    if metrics_file:
        metrics_file.close()
    accelerator.end_training()
    return final_metrics


def finish(cfg, accelerator, model, tokenizer, student_info, sources, state, final_metrics,
           vocab_padding, out: Path) -> None:
    """run/final (student + tokenizer), run/alignment.safetensors, training_metadata.json."""
    accelerator.wait_for_everyone()
    full_state = accelerator.get_state_dict(model)  # gathered on the main process (FSDP too)
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        student_state = None if cfg.lora_r else {
            k.removeprefix("student."): v for k, v in full_state.items()
            if k.startswith("student.")}
        save_final(unwrapped.student, tokenizer, cfg, out, state_dict=student_state)
        if len(unwrapped.aligners):
            from safetensors.torch import save_file

            save_file({f"hidden.{name}.{k}": v.detach().cpu().contiguous()
                       for name, aligner in zip(unwrapped.aligner_names, unwrapped.aligners)
                       for k, v in aligner.state_dict().items()},
                      str(out / "alignment.safetensors"))
        metadata = {
            "tool": "student-train", "tool_version": __version__,
            "student": student_info.as_dict(), "vocab_padding_rows": vocab_padding,
            "source": sources.provenance, "config": cfg.as_dict(),
            "steps": state["step"], "total_steps": state["total_steps"],
            "stopped_early": state["stopped_early"], "best_step": state["best_step"],
            "best_eval_loss": state["best_eval_loss"], "tokens_seen": state["tokens"],
            "world_size": accelerator.num_processes,
            "mixed_precision": str(accelerator.mixed_precision),
            "final_metrics": final_metrics,
        }
        tmp = out / "training_metadata.json.tmp"
        tmp.write_text(json.dumps(metadata, indent=1, default=str), encoding="utf-8")
        tmp.replace(out / "training_metadata.json")
    accelerator.wait_for_everyone()
