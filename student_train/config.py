"""student-train configuration: one mechanism for YAML presets and command-line flags.

    cfg = resolve_config("configs/med42-to-llama3.2-1b.yaml", {"store": "s3://b/med42", ...})

Resolution order, later wins: the defaults in `FIELDS`, the preset's `train:` section, the
flags the user passed (None = not passed). Every value goes through the same coercion and
checks whatever its origin, and every problem is collected and raised at once as one
`ConfigError`. A preset may hold other sections (`dump:`, `eval:`) for the other tools; only
`train:` is read here. Each setting is declared once in `FIELDS` (logitstore.toolkit.options):
the CLI's flags, the preset keys and `TrainConfig`'s attributes come from it, so a YAML key and
its flag are the same setting: `lora_targets:` in YAML is `--lora-targets` on the command line.
A resume compares the saved config with the new one with `options.config_differences` on the
fields that are not `resumable` (those that change the training math).

Checks that need the store or the student (signal names, captured kinds, stored layers) are
done by train.py once those are open, and reported the same way.

`save_config` writes the resolved config as `run/config.yaml`, itself a valid preset.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from logitstore.errors import ConfigError
from logitstore.toolkit.options import (Field, at_least, between, config_class, load_section,
                                        make_config, positive, resolve_fields)
from logitstore.toolkit.record_formats import (DATA_FORMAT_METAVAR, data_format_problem,
                                               normalize_format_name)
from student_train.classify_class_weights import parse_class_weights
from student_train.cross_config import CROSS_FIELDS
from student_train.sharding import config_problems as sharding_problems

SECTION = "train"
TARGETS = ("auto", "topk", "sampled")  # auto: top-k where captured, else sampled
TOPK_MODES = ("tail", "renormalised")
KD_LOSSES = ("kl", "rkl", "jsd", "skl", "srkl", "tvd")
SIGNAL_MIXTURES = ("weights", "confidence", "priority")  # objective: _mixture_scale
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
# student_train/optimizers.py builds them; their state: 8, ~2, ~2 B/param, factored.
OPTIMIZERS = ("adamw", "adamw-8bit", "paged-adamw-8bit", "adafactor")
TASKS = ("causal-lm", "classify")
# Settings of the causal-LM loop that --task classify refuses when set (it has no use for them).
CLASSIFY_REFUSES = ("data", "eval_store", "eval_fraction", "lora_r", "qlora", "fsdp", "packing",
                    "plan", "curriculum", "signals", "hidden_weight", "attention_weight")


_at_least, _between, _positive = at_least, between, positive


def _memory_size(value: str | None) -> str | None:
    """The problem with a --gpu-memory size (None: fine or not set)."""
    from student_train.memory_plan import memory_size_problem

    return None if value is None else memory_size_problem(value)


FIELDS: dict[str, Field] = {
    # what to train, from what
    "task": Field("str", "causal-lm", choices=TASKS,
                  help="causal-lm: a language model from a causal-lm store (or --data); "
                       "classify: an image+text classifier from a classifier store "
                       "(student_train/classify_train.py)."),
    "store": Field("optional_str", None, help="Store URL of the teacher signals (or --data)."),
    "data": Field("list_str", [], help="Raw data for hard-label training, no teacher (or "
                                       "--store)."),
    "student": Field("optional_str", None, help="Student: alias (logitstore/toolkit/models.yaml)"
                                                ", local directory or hub id."),
    "revision": Field("optional_str", None, help="Hub branch, tag or commit of the student."),
    "trust_remote_code": Field("bool", False, help="Run the model repository's own code (only "
                                                   "for models you trust)."),
    "out": Field("optional_str", None, resumable=True, help="Run directory."),
    "signals": Field("weights", {}, help="Signals and weights, e.g. med42:0.6,qwen:0.4 "
                     "(default: every signal of the store, equal weights)."),
    "eval_store": Field("optional_str", None, help="Evaluate on this store instead of a "
                                                   "hold-out."),
    "train_split": Field("optional_str", None, help="Train on this split of the store only."),
    "eval_split": Field("optional_str", None,
                        help="Evaluate on this split (of eval_store, else of the store)."),
    "cache_dir": Field("optional_str", None, resumable=True,
                       help="Local read cache of the store, and of the vocabulary maps of a "
                            "student of another tokenizer (default for those: "
                            "$LOGITSTORE_CACHE/vocab_maps, else "
                            "$XDG_CACHE_HOME/logitstore/vocab_maps)."),
    "verify_store": Field("str", "full", choices=VERIFY, resumable=True,
                          help="full: check every checksum before training."),
    # --data only
    "data_format": Field("str", "auto", data_format_problem, metavar=DATA_FORMAT_METAVAR,
                         help="--data: record format (auto: detected per source)."),
    "max_length": Field("optional_int", 2048, _at_least(2),
                        help="--data: tokens per sample (longer ones are cut)."),
    "include_prompt": Field("bool", False, help="--data: prompt tokens are targets too."),
    "read_window_tokens": Field("int", 1 << 20, _at_least(1),
                                help="--data: data larger than this many tokens is streamed, "
                                     "each epoch shuffled and batched one window of this many "
                                     "tokens at a time (memory holds one window); smaller "
                                     "data is kept in memory and shuffled whole."),
    # objective
    "target": Field("str", "auto", choices=TARGETS,
                    help="Per-token teacher target (auto: top-k where captured, else sampled)."),
    "topk_mode": Field("str", "tail", choices=TOPK_MODES,
                       help="Top-k target: the stored tail mass as one extra class, or the "
                            "top-k renormalised."),
    "loss": Field("str", "kl", choices=KD_LOSSES, help="Divergence."),
    "jsd_beta": Field("float", 0.5, _between(0, 1), help="Mixture weight of the jsd loss."),
    "skew_alpha": Field("float", 0.1, _between(0, 1, high_open=True),
                        help="Skew of the skl/srkl losses."),
    **CROSS_FIELDS,  # a student whose tokenizer is not the store's (cross_config.py)
    "mix_signals_per_position": Field("bool", True, absent=False,  # runs saved before: off
                                      help="Several signals of other tokenizers: a position's "
                                           "KD is the weighted mean over the signals that "
                                           "give it a target (false: each signal's mean over "
                                           "its own positions, weighted)."),
    "signal_mixture": Field("str", "weights", choices=SIGNAL_MIXTURES,
                            absent="weights",  # runs saved before: the weights alone
                            help="KD signals mixed per position: weights = by weight; "
                                 "confidence = weight x the probability its target gives the "
                                 "next token (T = 1); priority = the first signal (--signals "
                                 "order, else the store's) with a target there: others fill "
                                 "its gaps (same tokenizer: the first alone)."),
    "objective": Field("str", "blend", choices=OBJECTIVES,
                       help="blend: alpha*KD + (1-alpha)*CE over tokens; distillm-med: the "
                            "blend per specialty, weighted by specialty_weights."),
    "alpha": Field("float", 0.5, _between(0, 1), help="Weight of KD against CE."),
    "alpha_on": Field("str", "kd", choices=ALPHA_ON, help="The term alpha multiplies."),
    "temperature": Field("float", 1.0, _positive),
    "temperature_end": Field("optional_float", None, _positive, help="Default: temperature."),
    "temperature_schedule": Field("str", "constant", choices=TEMPERATURE_SCHEDULES,
                                  metavar="[constant|linear|exp]"),
    "label_smoothing": Field("float", 0.0, _between(0, 1)),
    "hidden_weight": Field("float", 0.0, _at_least(0), help="Weight of the hidden-state loss."),
    "hidden_loss": Field("str", "cosine", choices=HIDDEN_LOSSES),
    "attention_weight": Field("float", 0.0, _at_least(0),
                              help="Weight of the attention-map loss."),
    "attention_loss": Field("str", "mse", choices=ATTENTION_LOSSES),
    "layer_map": Field("optional_str", None, help="student:teacher block pairs, e.g. 1:3,2:7 "
                       "(default: last student block to the last stored teacher layer)."),
    "specialty_weights": Field("weights", {}, help="Weights of the specialty tags, e.g. "
                                                   "cardiology:1.2,radiology:1."),
    "specialty_key": Field("str", "specialty", help="Tag holding a sample's specialty."),
    "curriculum": Field("optional_str", None, help="Order samples by this tag, e.g. "
                                                   "difficulty."),
    # optimisation
    "max_steps": Field("optional_int", None, _at_least(1)),
    "epochs": Field("float", 1.0, _positive),
    "batch_tokens": Field("int", 16384, _at_least(1), help="Tokens per micro-batch and process."),
    "grad_accum": Field("int", 1, _at_least(1)),
    "packing": Field("bool", False),
    "shuffle": Field("bool", True, help="--no-shuffle: store order (sequential reads)."),
    "lr": Field("float", 2e-5, _positive),
    "lr_schedule": Field("str", "cosine", choices=LR_SCHEDULES),
    "warmup_ratio": Field("float", 0.03, _between(0, 1, high_open=True)),
    "weight_decay": Field("float", 0.0, _at_least(0)),
    "optimizer": Field("str", "adamw", choices=OPTIMIZERS,
                       help="adamw: fp32 moments (8 B/param); adamw-8bit, paged-adamw-8bit:"
                            " bitsandbytes 8-bit moments (~2 B/param; paged: spilled to "
                            "host memory under pressure, CUDA only); adafactor: factored "
                            "second moment, ignores adam_*."),
    "adam_beta1": Field("float", 0.9, _between(0, 1, high_open=True)),
    "adam_beta2": Field("float", 0.999, _between(0, 1, high_open=True)),
    "adam_epsilon": Field("float", 1e-8, _positive),
    "max_grad_norm": Field("float", 1.0, _at_least(0), help="0 = no clipping."),
    "seed": Field("int", 0, _at_least(0)),
    "gradient_checkpointing": Field("bool", False, resumable=True,
                                    help="Recompute each layer's activations in backward "
                                         "(same results, less memory, ~30 % slower)."),
    "fsdp": Field("bool", False,
                  help="Shard weights, gradients and optimizer state over the processes "
                       "(FSDP2 through accelerate; launch with accelerate launch "
                       "--num_processes N)."),
    "mixed_precision": Field("str", "auto", choices=MIXED_PRECISION,
                             help="auto: bf16 on CUDA with bf16, else fp16 on CUDA, fp32 on "
                                  "CPU."),
    "student_dtype": Field("str", "float32", choices=STUDENT_DTYPES),
    "lm_head_chunk": Field("int", 1024, _at_least(1), resumable=True,
                           help="Positions per chunk of the lm_head + loss."),
    # LoRA / QLoRA
    "lora_r": Field("int", 0, _at_least(0), help="0 = full fine-tuning."),
    "lora_alpha": Field("optional_float", None, _positive, help="Default: 2 * lora_r."),
    "lora_dropout": Field("float", 0.05, _between(0, 1, high_open=True)),
    "lora_targets": Field("list_str", [], help="Module names (default: detected)."),
    "qlora": Field("bool", False, help="4-bit base model (needs --lora-r)."),
    # memory plan (student_train/memory_plan.py)
    "gpu_memory": Field("optional_str", None, _memory_size, resumable=True,
                        help="Memory of one device, e.g. 24GiB: training refuses, before "
                             "loading weights, a config the memory plan says cannot fit."),
    "plan": Field("bool", False, resumable=True,
                  help="Print the memory plan per device and exit (1 if it does not fit "
                       "--gpu-memory); loads no weights, needs no --out."),
    "num_processes": Field("optional_int", None, _at_least(1), resumable=True,
                           help="Processes the plan spreads over (default: the world size)."),
    # evaluation, checkpoints, logging
    "eval_every": Field("int", 500, _at_least(0), resumable=True, help="0 = only at the end."),
    "eval_on_start": Field("bool", False, resumable=True,
                           help="Evaluate the untrained student first (a baseline)."),
    "eval_fraction": Field("float", 0.0, _between(0, 1, high_open=True)),
    "patience": Field("int", 0, _at_least(0), resumable=True,
                      help="Stop after this many evals without improvement (0 = never)."),
    "save_every": Field("int", 1000, _at_least(0), resumable=True, help="0 = no checkpoints."),
    "keep_checkpoints": Field("int", 3, _at_least(1), resumable=True),
    "log_every": Field("int", 10, _at_least(1), resumable=True),
    # --task classify only (student_train/classify_train.py)
    "data_root": Field("optional_str", None,
                       help="classify: directory the store's relative image paths are read "
                            "from (default: the data_root the store records, else the current "
                            "directory)."),
    "batch_size": Field("int", 32, _at_least(1), help="classify: samples per batch."),
    "input_cache_mb": Field("int", 2048, _at_least(0), resumable=True,
                            help="classify: memory for the student's preprocessed inputs of "
                                 "each split (train and eval each), kept per sample from its "
                                 "first batch on so later epochs skip image decoding and "
                                 "tokenising; a split that "
                                 "would not fit is preprocessed per batch; 0 = never kept "
                                 "(student_train/classify_inputs.py)."),
    "ce_weight": Field("float", 1.0, _at_least(0),
                       help="classify: weight of the cross-entropy on the labels, per head."),
    "class_weights": Field("custom", {}, parse=parse_class_weights,
                           metavar="HEAD=balanced|W:W:...,...",
                           help="classify: class weights of a head's cross-entropy: balanced "
                                "(n / (C * n_c) over the train split's labels; 0 for a class "
                                "without any) or one weight >= 0 per class, e.g. "
                                "modality=balanced,location=1:1:2 (YAML: {location: [1, 1, 2]})"
                                "; heads not named are unweighted "
                                "(student_train/classify_class_weights.py)."),
    "kl_weight": Field("float", 0.0, _at_least(0),
                       help="classify: weight of the KL to the teacher's logits at "
                            "--temperature, per head."),
    "mse_weight": Field("float", 0.0, _at_least(0),
                        help="classify: weight of the feature MSE (feature_parts)."),
    "cos_weight": Field("float", 0.0, _at_least(0),
                        help="classify: weight of the feature cosine distance (feature_parts)."),
    "crd_weight": Field("float", 0.0, _at_least(0),
                        help="classify: weight of contrastive representation distillation."),
    "feature_parts": Field("list_str", [], help="classify: the stored feature parts the MSE "
                                                "and cosine terms match (default: image_cls, "
                                                "text_cls where both sides have them)."),
    "crd_part": Field("str", "fused", help="classify: the feature part CRD contrasts."),
    "crd_k": Field("int", 4096, _at_least(1),
                   help="classify: CRD negatives per sample (at most training samples - 1)."),
    "crd_embed_dim": Field("int", 128, _at_least(1), help="classify: CRD embedding width."),
    "crd_fill_bank": Field("bool", True,
                           help="classify: fill CRD's teacher memory bank from every stored "
                                "training feature before the first step (else random rows "
                                "that the momentum updates fill)."),
    "resume": Field("optional_str", None, resumable=True, bare_value="latest",
                    metavar="[DIR|latest]",
                    help="Resume from this checkpoint directory, or the run's latest "
                         "(--resume alone: latest)."),
}


def _distill(self) -> bool:
    return self.store is not None


TrainConfig = config_class(
    "TrainConfig", FIELDS, module=__name__, methods={"distill": property(_distill)},
    doc="A resolved student-train config: one attribute per FIELDS entry; `distill` is "
        "True when it trains from a store (else from --data).")


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
    resolved["data_format"] = normalize_format_name(resolved["data_format"])
    if resolved["temperature_schedule"] == "exp":
        resolved["temperature_schedule"] = "exponential"  # losses.TEMPERATURE_SCHEDULES' name
    if resolved["temperature_end"] is None:
        resolved["temperature_end"] = resolved["temperature"]
    return make_config(TrainConfig, resolved)


def _cross_field_problems(v: dict[str, Any]) -> list[str]:
    from student_train.alignment import parse_layer_map

    if v["task"] == "classify":
        return _classify_problems(v)
    out = []
    if bool(v["store"]) == bool(v["data"]):
        out.append("give exactly one of store (--store: distil from teacher signals) and data "
                   "(--data: hard labels only)")
    if not v["student"]:
        out.append("student is required (--student or train.student in the config file)")
    if not v["out"] and not v["plan"]:
        out.append("out is required: the run directory (--out or train.out in the config file)")
    if v["data"]:
        for key in ("signals", "hidden_weight", "attention_weight", "eval_store", "eval_split",
                    "train_split", "curriculum", "packing"):
            if v[key]:
                out.append(f"{key} needs a store (--store); --data trains on hard labels from "
                           f"raw data, unpacked")
    out += _optimizer_problems(v)
    out += sharding_problems(v)
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
                   "(e.g. --specialty-weights cardiology:1.2,radiology:1.0)")
    if v["class_weights"]:
        out.append("class_weights is a setting of --task classify (the CE of a classifier's "
                   "heads): remove it, or add --task classify")
    if v["signal_mixture"] != "weights":
        out += _mixture_problems(v)
    if v["signals"] and sum(v["signals"].values()) <= 0:
        out.append(f"signals: the weights must have a positive sum, got {v['signals']}")
    return out


def _mixture_problems(v: dict[str, Any]) -> list[str]:
    why = (f"signal_mixture {v['signal_mixture']} chooses the weight of each position's KD "
           f"signals: ")
    out = []
    if v["data"]:
        out.append(why + "--data trains on hard labels, with no signal to weigh; use --store "
                   "or --signal-mixture weights")
    if not v["mix_signals_per_position"]:
        out.append(why + "it needs mix_signals_per_position true, found false; drop "
                   "--no-mix-signals-per-position or use --signal-mixture weights")
    if v["signal_mixture"] == "confidence" and v["cross_loss"] == "uld":
        out.append(why + "confidence needs cross_loss pkl (ULD has no target over the student's "
                   "vocabulary; cross_loss is read only for a student of another tokenizer), "
                   "found uld; use --cross-loss pkl or --signal-mixture weights")
    return out


def _classify_problems(v: dict[str, Any]) -> list[str]:
    """--task classify: a classifier store, a student and a run directory; none of the
    causal-LM loop's settings it does not use (an early stop on an eval split that the store
    may hold is checked once the store is open, by classify_train.py)."""
    out = []
    if not v["store"]:
        out.append("task classify trains from a classifier store: give --store (a store written "
                   "by teacher-dump --task classify)")
    if not v["student"]:
        out.append("student is required: a student config (YAML/JSON of "
                   "ImageTextClassifierConfig fields) or a saved classifier directory")
    if not v["out"]:
        out.append("out is required: the run directory (--out or train.out in the config file)")
    for key in CLASSIFY_REFUSES:
        if v[key]:
            out.append(f"{key} is a setting of the causal-LM loop that --task classify does not "
                       f"use: remove it")
    if v["grad_accum"] != 1:
        out.append("grad_accum is not used by --task classify: raise batch_size instead")
    if v["temperature_schedule"] != "constant":
        out.append("--task classify keeps the temperature constant: remove temperature_schedule")
    if v["optimizer"] != "adamw":
        out.append(f"--task classify trains with adamw, found optimizer {v['optimizer']}")
    if not any(v[f"{t}_weight"] for t in ("ce", "kl", "mse", "cos", "crd")):
        out.append("every classify loss weight is 0: set at least one of ce_weight, kl_weight, "
                   "mse_weight, cos_weight, crd_weight above 0")
    if v["class_weights"] and not v["ce_weight"]:
        out.append(f"class_weights weight the cross-entropy, which ce_weight 0 switches off: "
                   f"set ce_weight above 0, or remove class_weights {v['class_weights']}")
    return out


def _optimizer_problems(v: dict[str, Any]) -> list[str]:
    """bitsandbytes present for the 8-bit optimizers; only AdamW steps FSDP's sharded
    parameters (DTensors: bitsandbytes' kernels and Adafactor's factored statistics take
    plain tensors, and a factored statistic of one shard is not that of the whole matrix)."""
    import importlib.util

    out = []
    if v["optimizer"] in ("adamw-8bit", "paged-adamw-8bit") \
            and importlib.util.find_spec("bitsandbytes") is None:
        from student_train.optimizers import BITSANDBYTES_MISSING

        out.append(BITSANDBYTES_MISSING.format(name=v["optimizer"], error="not installed"))
    if v.get("fsdp") and v["optimizer"] != "adamw":
        out.append(f"optimizer {v['optimizer']} cannot step the sharded parameters of fsdp "
                   f"(DTensors: bitsandbytes' kernels and Adafactor's row/column statistics "
                   f"need whole plain tensors): use --optimizer adamw with --fsdp, or "
                   f"--optimizer {v['optimizer']} without --fsdp (with --lora-r or --qlora "
                   f"to fit a small GPU)")
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
