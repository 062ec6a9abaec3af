"""One optimizer step and one evaluation pass of student-train (`Step`), on any accelerator.

`Step.train` takes the `grad_accum` micro-batches of one step (this process's share):
  1. sums their loss weights (target tokens, samples) over the micro-batches and processes:
     one all-reduce, before any forward;
  2. per micro-batch: forward -> loss *sums* -> divided by those global weights -> backward
     (DDP syncs gradients on the last micro-batch only; FSDP reduce-scatters after each,
     student_train/sharding.py);
  3. clips, steps the optimizer (--optimizer) and the scheduler.
Step 1 makes accumulation and data parallelism exact: the gradient is that of one batch
holding every micro-batch of every process.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from student_train.cross_batch import finish_stats
from student_train.loss_combine import Weights, combine, token_sum_gradients
from student_train.objective import DistillationObjective, denominators, sample_groups
from student_train.sources import Sources


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


class Step:
    """What every optimizer step and evaluation needs, bundled once."""

    def __init__(self, cfg, accelerator, model, sources: Sources):
        self.cfg, self.accelerator, self.model, self.sources = cfg, accelerator, model, sources
        self.n_groups = max(1, len(sources.groups))
        self.weights = Weights(alpha=cfg.alpha, alpha_on=cfg.alpha_on, hidden=cfg.hidden_weight,
                               attention=cfg.attention_weight,
                               group_weights=tuple(sources.group_weights) or (1.0,),
                               mix_per_position=cfg.mix_signals_per_position,
                               full_ce_without_target=cfg.ce_without_target == "full")
        # evaluation: the same token blend, without the pooled alignments and group weights
        self.eval_weights = dataclasses.replace(self.weights, hidden=0.0, attention=0.0,
                                                group_weights=(1.0,))

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
        # accelerate divides by grad_accum and DDP/FSDP average over processes; the global
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
            for k, v in batch.get("cross_stats", {}).items():  # foreign-tokenizer counts
                logged[k] = logged.get(k, 0.0) + torch.tensor(v, device=acc.device)
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
        grad_norm = acc.clip_grad_norm_(self.model.parameters(), max_norm)
        optimizer.step()
        if not acc.optimizer_step_was_skipped:  # fp16 overflow: the scaler skipped the step
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        # sorted: every rank reduces the same keys in the same order
        reduced = acc.reduce(dict(sorted(logged.items())), reduction="sum")
        stats = finish_stats({k: float(v) for k, v in reduced.items()})
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
            sums = {k: sums[k] + out[k].float() if k in out else sums[k] for k in sums}
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
               "ce": torch.zeros(1, device=dev),
               "ce_free": torch.zeros(1, device=dev)}  # another tokenizer's student only
        if len(module.aligners):
            out["hidden"] = torch.zeros(len(module.aligners), device=dev)
        if module.attention_plans:
            out["attention"] = torch.zeros(len(module.attention_plans), device=dev)
        return out
