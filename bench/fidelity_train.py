"""The students of bench/fidelity.py: every variant of one seed trained in one loop.

All variants of a seed start from the SAME initial weights (drawn from the student config
with torch.manual_seed(seed)) and train on the SAME batches in the same order (one
StoreStream holding every signal of the store), with the same optimizer
(student_train.train.make_optimizer: AdamW), lr schedule, steps and seed; each step is
student_train.step.Step.train (the real loop). What differs is the token target only:
  ce        CE only: DistillationObjective with no signal (what --data trains)
  CONFIG    KD from the store: the config's signals (one, or a top-k and a sampled one with
            equal weights: the KD term is then the mean of the two signals' KL terms),
            planned by student_train.sources.plan_signals with --target auto
  online    the teacher in memory: full-vocabulary forward KL at T = 1
            (tests/reference_losses.dense_kd_per_position) on the student's full logits
Step time = median seconds of Step.train per variant (the first step, which pays lazy
initialisation, left out); the variants run interleaved within every step, their order
rotating step by step, so the machine's load falls on all of them alike.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the dense reference losses (online KD)


def train_config(preset: Path, store: str, student: Path, out: Path, steps: int, seed: int,
                 **overrides):
    """The preset's `train:` section as student-train resolves it."""
    from student_train.config import resolve_config

    return resolve_config(preset, {"store": store, "student": str(student), "out": str(out),
                                   "max_steps": steps, "seed": seed, **overrides})


def initial_student(config_dir: Path, seed: int):
    """fp32 student with weights drawn from its config under torch.manual_seed(seed)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir)).float()


def online_module(student, teacher):
    """Online KD: the teacher's full logits [B, S, V] in memory, full-vocabulary forward KL."""
    import torch
    from torch import nn

    from reference_losses import dense_kd_per_position
    from student_train.losses import cross_entropy_per_position
    from student_train.objective import IGNORE, shifted, target_positions

    class OnlineKD(nn.Module):
        def __init__(self):
            super().__init__()
            self.student = student
            self.teacher = [teacher]  # a list, not a submodule: neither trained nor clipped

        def forward(self, batch, temperature=1.0, label_smoothing=0.0, n_groups=1):
            inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          position_ids=batch["position_ids"], use_cache=False)
            with torch.no_grad():
                t_logits = self.teacher[0](**inputs).logits  # [B, S, V]
            s_logits = self.student(**inputs).logits  # [B, S, V]
            w = shifted(batch["token_weights"].float(), 0.0) * target_positions(batch)  # [B, S]
            kd = dense_kd_per_position(s_logits, t_logits, temperature=temperature)  # [B, S]
            ce = cross_entropy_per_position(s_logits, shifted(batch["labels"], IGNORE),
                                            label_smoothing=label_smoothing)  # [B, S]
            # sums, shaped as DistillationObjective's: kd [n_kd, groups], ce [groups]
            return {"kd": (kd * w).sum().reshape(1, 1), "ce": (ce * w).sum().reshape(1)}

    return OnlineKD()


class Variant:
    """One student: its module, AdamW, schedule and Step, on the accelerator."""

    def __init__(self, name: str, cfg, student, reader_settings, teacher, accelerator):
        from transformers import get_scheduler

        from logitstore.errors import ConfigError
        from student_train.objective import DistillationObjective, LossSettings, SignalPlan
        from student_train.sources import plan_signals
        from student_train.step import Step
        from student_train.train import make_optimizer

        self.name, self.cfg = name, cfg
        settings = LossSettings.of(cfg)
        if name == "ce":
            module, plans = DistillationObjective(student, [], settings), []
        elif name == "online":
            module = online_module(student, teacher)
            plans = [SignalPlan("online-teacher", kd_weight=1.0, target="dense")]
        else:
            problems: list[str] = []
            plans, _ = plan_signals(cfg, reader_settings, student, problems)
            if problems:
                raise ConfigError(problems)
            module = DistillationObjective(student, plans, settings)
        optimizer = make_optimizer(cfg, module)
        self.scheduler = get_scheduler(cfg.lr_schedule, optimizer,
                                       num_warmup_steps=math.ceil(cfg.warmup_ratio * cfg.max_steps),
                                       num_training_steps=cfg.max_steps)
        self.model, self.optimizer = accelerator.prepare(module, optimizer)
        self.student = student
        sources = SimpleNamespace(groups=[], group_weights=[], plans=plans, group_of={})
        self.step = Step(cfg, accelerator, self.model, sources)
        self.times: list[float] = []  # seconds per Step.train, the first one included
        self.losses: list[float] = []

    def train_step(self, batch: dict) -> None:
        t0 = time.perf_counter()
        stats = self.step.train([batch], self.cfg.temperature, self.optimizer, self.scheduler)
        self.times.append(time.perf_counter() - t0)
        self.losses.append(stats["loss"])


def loader_seconds_per_batch(store: str, signals: list[str], batch_tokens: int,
                             seed: int) -> float:
    """One epoch of a StoreStream reading only `signals`, no model: seconds per batch."""
    from student_train.stream import StoreStream

    stream = StoreStream(store, signals=signals, batch_tokens=batch_tokens, seed=seed)
    t0, n = time.perf_counter(), 0
    for _ in stream:
        n += 1
    return (time.perf_counter() - t0) / max(1, n)


def make_variants(plan, seed: int, steps: int, teacher, settings, accelerator) -> list:
    """ce, every config of the sweep, online: same initial weights, same settings."""
    variants = []
    for name in ["ce", *plan.configs, "online"]:
        extra = ({"signals": {s: 1.0 for s in plan.configs[name]}, "target": "auto"}
                 if name in plan.configs else {})
        cfg = train_config(plan.preset, plan.store, plan.student_config,
                           plan.work / "run" / name, steps, seed, **extra)
        student = initial_student(plan.student_config, seed).train()
        variants.append(Variant(name, cfg, student, settings, teacher, accelerator))
    return variants


def train_students(plan, teacher, seed: int) -> dict:
    """Every variant of one seed, trained in one interleaved loop; returns them + timings.

    plan: SimpleNamespace(preset, store, student_config, work, configs {name: [signals]},
    signals [every signal of the store], epochs, steps (None: from epochs))"""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from logitstore.reader import StoreReader
    from student_train.stream import StoreStream

    probe = train_config(plan.preset, plan.store, plan.student_config, plan.work / "run", 1,
                         seed)
    stream = StoreStream(plan.store, signals=plan.signals, batch_tokens=probe.batch_tokens,
                         seed=seed, shuffle=probe.shuffle)
    per_epoch = stream.num_batches()
    steps = plan.steps or max(1, round(plan.epochs * per_epoch))
    set_seed(seed)
    variants = make_variants(plan, seed, steps, teacher, StoreReader(plan.store).settings,
                             Accelerator(mixed_precision="no"))  # fp32, as train.py on CPU
    print(f"seed {seed}: {len(variants)} students x {steps} steps ({per_epoch} batches of <= "
          f"{probe.batch_tokens} tokens per epoch), interleaved", flush=True)
    step, epoch, tokens, started = 0, 0, 0, time.perf_counter()
    while step < steps:
        stream.set_epoch(epoch)
        for batch in stream:
            if step >= steps:
                break
            shift = step % len(variants)
            for v in variants[shift:] + variants[:shift]:
                v.train_step(batch)
            tokens += int(batch["attention_mask"].sum())
            step += 1
            if step % max(1, steps // 5) == 0 or step == steps:
                print(f"  step {step}/{steps} ({time.perf_counter() - started:.0f}s) "
                      + " ".join(f"{v.name}={v.losses[-1]:.3f}" for v in variants), flush=True)
        epoch += 1
    load = {name: loader_seconds_per_batch(plan.store, signals, probe.batch_tokens, seed)
            for name, signals in plan.configs.items()}
    return {"seed": seed, "steps": steps, "batches_per_epoch": per_epoch, "tokens": tokens,
            "train_s": round(time.perf_counter() - started, 1),
            "students": {v.name: v.student.eval() for v in variants},
            "step_s": {v.name: statistics.median(v.times[1:] or v.times) for v in variants},
            "load_s_per_batch": load,
            "loss_first_last": {v.name: [v.losses[0], v.losses[-1]] for v in variants},
            "config": variants[0].cfg.as_dict()}
