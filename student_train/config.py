"""student-train configuration: one mechanism for YAML presets and command-line flags.

    cfg = resolve_config("configs/med42-to-llama3.2-1b.yaml", {"store": "s3://b/med42", ...})

Resolution order, later wins: the defaults in `FIELDS`, the preset's `train:` section, the
flags the user passed (None = not passed). Every value goes through the same coercion and
checks whatever its origin, and every problem is collected and raised at once as one
`ConfigError`. A preset may hold other sections (`dump:`, `eval:`) for the other tools; only
`train:` is read here. The CLI's flags are generated from `FIELDS` (cli.py), so a YAML key and
its flag are the same setting: `lora_targets:` in YAML is `--lora-targets` on the command line.

Checks that need the store or the student (signal names, captured kinds, stored layers) are
done by train.py once those are open, and reported the same way.

`save_config` writes the resolved config as `run/config.yaml`, itself a valid preset.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from logitstore.toolkit.options import (Field, at_least, between, load_section, one_of, positive,
                               resolve_fields)
from logitstore.errors import ConfigError

SECTION = "train"
TARGETS = ("auto", "topk", "sampled")  # auto: top-k where captured, else sampled
TOPK_MODES = ("tail", "renormalised")
KD_LOSSES = ("kl", "rkl", "jsd", "skl", "srkl", "tvd")
TEMPERATURE_SCHEDULES = ("constant", "linear", "exp", "exponential")
# blend: alpha*KD + (1-alpha)*CE, token mean (specialty weights weight samples).
# distillm-med: seed 003, sum over specialties s of w_s * (token mean of the blend over s).
OBJECTIVES = ("blend", "distillm-med")
ALPHA_ON = ("kd", "ce")  # which term alpha multiplies (seed 003's literal formula: ce)
LR_SCHEDULES = ("cosine", "linear", "constant", "constant_with_warmup")
HIDDEN_LOSSES = ("cosine", "mse")
ATTENTION_LOSSES = ("mse", "frobenius")
MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
STUDENT_DTYPES = ("float32", "bfloat16", "float16")
VERIFY = ("full", "none")


_at_least, _between, _one_of, _positive = at_least, between, one_of, positive


FIELDS: dict[str, Field] = {
    # what to train, from what
    "store": Field("optional_str", None, help="store URL (teacher signals); or --data"),
    "data": Field("list_str", [], help="raw data for hard-label training (no teacher)"),
    "student": Field("optional_str", None, help="alias (logitstore/toolkit/models.yaml), directory or hub id"),
    "revision": Field("optional_str", None, help="hub branch, tag or commit of the student"),
    "trust_remote_code": Field("bool", False),
    "out": Field("optional_str", None, resumable=True, help="run directory"),
    "signals": Field("weights", {}, help="signals and weights, e.g. med42:0.6,qwen:0.4 "
                     "(default: every signal of the store, equal weights)"),
    "eval_store": Field("optional_str", None, help="evaluate on this store instead of a hold-out"),
    "train_split": Field("optional_str", None, flag=False, help="train on this split only"),
    "eval_split": Field("optional_str", None, flag=False,
                        help="evaluate on this split (of eval_store, else of the store)"),
    "cache_dir": Field("optional_str", None, resumable=True, help="local read cache of the store"),
    "verify_store": Field("str", "full", _one_of(VERIFY), resumable=True,
                          help="full: check every checksum before training"),
    # --data only
    "data_format": Field("str", "auto", flag=False),
    "max_length": Field("optional_int", 2048, _at_least(2), flag=False),
    "include_prompt": Field("bool", False, flag=False),
    # objective
    "target": Field("str", "auto", _one_of(TARGETS), help="per-token teacher target"),
    "topk_mode": Field("str", "tail", _one_of(TOPK_MODES)),
    "loss": Field("str", "kl", _one_of(KD_LOSSES), help="divergence"),
    "jsd_beta": Field("float", 0.5, _between(0, 1), flag=False),
    "skew_alpha": Field("float", 0.1, _between(0, 1, high_open=True), flag=False),
    "objective": Field("str", "blend", _one_of(OBJECTIVES)),
    "alpha": Field("float", 0.5, _between(0, 1), help="weight of KD against CE"),
    "alpha_on": Field("str", "kd", _one_of(ALPHA_ON), flag=False),
    "temperature": Field("float", 1.0, _positive),
    "temperature_end": Field("optional_float", None, _positive, help="default: --temperature"),
    "temperature_schedule": Field("str", "constant", _one_of(TEMPERATURE_SCHEDULES)),
    "label_smoothing": Field("float", 0.0, _between(0, 1)),
    "hidden_weight": Field("float", 0.0, _at_least(0)),
    "hidden_loss": Field("str", "cosine", _one_of(HIDDEN_LOSSES), flag=False),
    "attention_weight": Field("float", 0.0, _at_least(0)),
    "attention_loss": Field("str", "mse", _one_of(ATTENTION_LOSSES), flag=False),
    "layer_map": Field("optional_str", None, help="student:teacher block pairs, e.g. 1:3,2:7 "
                       "(default: last student block to the last stored teacher layer)"),
    "specialty_weights": Field("weights", {}, flag=False),
    "specialty_key": Field("str", "specialty", flag=False),
    "curriculum": Field("optional_str", None, help="order samples by this tag, e.g. difficulty"),
    # optimisation
    "max_steps": Field("optional_int", None, _at_least(1)),
    "epochs": Field("float", 1.0, _positive),
    "batch_tokens": Field("int", 16384, _at_least(1), help="tokens per micro-batch and process"),
    "grad_accum": Field("int", 1, _at_least(1)),
    "packing": Field("bool", False),
    "shuffle": Field("bool", True, flag=False, help="false: store order (sequential)"),
    "lr": Field("float", 2e-5, _positive),
    "lr_schedule": Field("str", "cosine", _one_of(LR_SCHEDULES), flag=False),
    "warmup_ratio": Field("float", 0.03, _between(0, 1, high_open=True)),
    "weight_decay": Field("float", 0.0, _at_least(0), flag=False),
    "adam_beta1": Field("float", 0.9, _between(0, 1, high_open=True), flag=False),
    "adam_beta2": Field("float", 0.999, _between(0, 1, high_open=True), flag=False),
    "adam_epsilon": Field("float", 1e-8, _positive, flag=False),
    "max_grad_norm": Field("float", 1.0, _at_least(0), flag=False, help="0 = no clipping"),
    "seed": Field("int", 0, _at_least(0)),
    "gradient_checkpointing": Field("bool", False),
    "mixed_precision": Field("str", "auto", _one_of(MIXED_PRECISION), flag=False,
                             help="auto: bf16 on CUDA with bf16, else fp16 on CUDA, fp32 on CPU"),
    "student_dtype": Field("str", "float32", _one_of(STUDENT_DTYPES), flag=False),
    "lm_head_chunk": Field("int", 1024, _at_least(1), flag=False, resumable=True,
                           help="positions per chunk of the lm_head + loss"),
    # LoRA / QLoRA
    "lora_r": Field("int", 0, _at_least(0), help="0 = full fine-tuning"),
    "lora_alpha": Field("optional_float", None, _positive, flag=False, help="default: 2 * r"),
    "lora_dropout": Field("float", 0.05, _between(0, 1, high_open=True), flag=False),
    "lora_targets": Field("list_str", [], help="module names (default: detected)"),
    "qlora": Field("bool", False, help="4-bit base model (needs --lora-r)"),
    # evaluation, checkpoints, logging
    "eval_every": Field("int", 500, _at_least(0), resumable=True, help="0 = only at the end"),
    "eval_on_start": Field("bool", False, flag=False, resumable=True,
                           help="evaluate the untrained student first (a baseline)"),
    "eval_fraction": Field("float", 0.0, _between(0, 1, high_open=True)),
    "patience": Field("int", 0, _at_least(0), resumable=True,
                      help="stop after this many evals without improvement (0 = never)"),
    "save_every": Field("int", 1000, _at_least(0), resumable=True, help="0 = no checkpoints"),
    "keep_checkpoints": Field("int", 3, _at_least(1), flag=False, resumable=True),
    "log_every": Field("int", 10, _at_least(1), flag=False, resumable=True),
    "resume": Field("optional_str", None, resumable=True, help="checkpoint dir or 'latest'"),
}


@dataclass(frozen=True)
class TrainConfig:
    store: str | None
    data: tuple[str, ...]
    student: str
    revision: str | None
    trust_remote_code: bool
    out: str
    signals: dict[str, float]
    eval_store: str | None
    train_split: str | None
    eval_split: str | None
    cache_dir: str | None
    verify_store: str
    data_format: str
    max_length: int | None
    include_prompt: bool
    target: str
    topk_mode: str
    loss: str
    jsd_beta: float
    skew_alpha: float
    objective: str
    alpha: float
    alpha_on: str
    temperature: float
    temperature_end: float
    temperature_schedule: str
    label_smoothing: float
    hidden_weight: float
    hidden_loss: str
    attention_weight: float
    attention_loss: str
    layer_map: str | None
    specialty_weights: dict[str, float]
    specialty_key: str
    curriculum: str | None
    max_steps: int | None
    epochs: float
    batch_tokens: int
    grad_accum: int
    packing: bool
    shuffle: bool
    lr: float
    lr_schedule: str
    warmup_ratio: float
    weight_decay: float
    adam_beta1: float
    adam_beta2: float
    adam_epsilon: float
    max_grad_norm: float
    seed: int
    gradient_checkpointing: bool
    mixed_precision: str
    student_dtype: str
    lm_head_chunk: int
    lora_r: int
    lora_alpha: float | None
    lora_dropout: float
    lora_targets: tuple[str, ...]
    qlora: bool
    eval_every: int
    eval_on_start: bool
    eval_fraction: float
    patience: int
    save_every: int
    keep_checkpoints: int
    log_every: int
    resume: str | None

    def as_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON form (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}

    @property
    def distill(self) -> bool:
        return self.store is not None


def load_preset(path: str | Path) -> tuple[dict[str, Any], list[str]]:
    """(the `train:` section of a YAML preset, problems); a missing section is a problem."""
    return load_section(path, SECTION, FIELDS)


# ----------------------------------------------------------------------------- resolve


def resolve_config(preset: str | Path | None = None,
                   overrides: dict[str, Any] | None = None) -> TrainConfig:
    """defaults <- preset `train:` section <- overrides (None values = not given); validated."""
    resolved, _, problems = resolve_fields(FIELDS, SECTION, preset, overrides)
    problems += _cross_field_problems(resolved)
    if problems:
        raise ConfigError(problems)
    if resolved["temperature_schedule"] == "exp":
        resolved["temperature_schedule"] = "exponential"  # losses.TEMPERATURE_SCHEDULES' name
    if resolved["temperature_end"] is None:
        resolved["temperature_end"] = resolved["temperature"]
    resolved["data"] = tuple(resolved["data"])
    resolved["lora_targets"] = tuple(resolved["lora_targets"])
    return TrainConfig(**resolved)


def _cross_field_problems(v: dict[str, Any]) -> list[str]:
    from student_train.alignment import parse_layer_map

    out = []
    if bool(v["store"]) == bool(v["data"]):
        out.append("give exactly one of store (--store: distil from teacher signals) and data "
                   "(--data: hard labels only)")
    if not v["student"]:
        out.append("student is required (--student or train.student in the config file)")
    if not v["out"]:
        out.append("out is required: the run directory (--out or train.out in the config file)")
    if v["data"]:
        for key in ("signals", "hidden_weight", "attention_weight", "eval_store", "eval_split",
                    "train_split", "curriculum", "packing"):
            if v[key]:
                out.append(f"{key} needs a store (--store); --data trains on hard labels from "
                           f"raw data, unpacked")
    if v["qlora"] and not v["lora_r"]:
        out.append("qlora trains LoRA adapters on a 4-bit base: set lora_r (e.g. --lora-r 16)")
    if v["eval_fraction"] and (v["eval_store"] or v["eval_split"]):
        out.append("eval_fraction holds out part of the training rows: do not combine it with "
                   "eval_store or eval_split")
    if v["patience"] and not (v["eval_store"] or v["eval_fraction"] or v["eval_split"]):
        out.append("patience (early stopping) needs an evaluation set: set eval_fraction, "
                   "eval_split or eval_store")
    if v["layer_map"]:
        try:
            parse_layer_map(v["layer_map"])
        except ValueError as exc:
            out.append(f"layer_map: {exc}")
    if v["objective"] == "distillm-med" and not v["specialty_weights"]:
        out.append("objective distillm-med weights specialties: set specialty_weights "
                   "(YAML, e.g. {cardiology: 1.2, radiology: 1.0})")
    if v["signals"] and sum(v["signals"].values()) <= 0:
        out.append(f"signals: the weights must have a positive sum, got {v['signals']}")
    return out


# ----------------------------------------------------------------------------- saving


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved config as a preset (first line names the command)."""
    import yaml

    path = Path(path)
    body = yaml.safe_dump({SECTION: cfg.as_dict()}, sort_keys=False)
    text = f"# student-train --config {path.name}  (resolved config of this run)\n{body}"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def resume_differences(saved: dict[str, Any], new: TrainConfig) -> list[str]:
    """Settings that change the training math and differ between a saved run and `new`."""
    now = new.as_dict()
    out = []
    for key, field in FIELDS.items():
        if field.resumable or key not in saved:
            continue
        if saved[key] != now[key]:
            out.append(f"{key}: run has {saved[key]!r}, now {now[key]!r}")
    return out
