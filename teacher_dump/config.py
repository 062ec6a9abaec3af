"""teacher-dump configuration: one table (`FIELDS`) for YAML presets and command-line flags.

    cfg = resolve_config("configs/med42-to-llama3.2-1b.yaml", {"data": ["d.jsonl"], ...})

Each setting is declared once in `FIELDS` (logitstore.toolkit.options): its flag
(`--top-k`), its key in a preset's `dump:` section (`top_k:`) and its attribute of
`DumpConfig` (`cfg.top_k`) all come from that entry. Resolution order, later wins: the
defaults, the preset's `dump:` section, the flags the user passed (None = not passed).
Every value goes through the same coercion and checks whatever its origin, and every
problem is raised at once as one `ConfigError`. A preset file may hold other sections
(`train:`, `eval:`) for the other tools; only `dump:` is read here.

`task` picks the kind of teacher: `causal-lm` (the default) or `classify` (an image and/or
text classifier, teacher_dump/classify_dump.py). Each task reads its own settings
(`task_fields`): one of the other task's given in the preset or as a flag is refused.

`DumpConfig.as_dict()` (the settings of its task) is what teacher-dump echoes and saves
into the store manifest (`extra["teacher_dump_config"]`); a resume compares the saved one with the new one with
`options.config_differences` on the fields that are not `resumable` (those that change
what is stored).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from logitstore.errors import ConfigError
from logitstore.format import ATTENTION_HEADS, HIDDEN_POOLINGS, LOGPROB_ENCODINGS
from logitstore.toolkit.options import (Field, at_least, config_class, load_section,
                                        make_config, other_task_problems, positive,
                                        resolve_fields)
from logitstore.toolkit.record_formats import (DATA_FORMAT_METAVAR, data_format_problem,
                                               normalize_format_name)
from teacher_dump.default_data import alias_default_data

# auto: the alias's default (4bit unless it says otherwise) on CUDA, none on CPU.
QUANTIZE_CHOICES = ("auto", "4bit", "8bit", "none")
DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")
# Kernels of teacher_dump.logit_stats (auto: compiled on the CPU when torch.compile works).
CAPTURE_KERNELS = ("auto", "compiled", "eager")
STORED_FLOAT_DTYPES = ("float16", "float32")
SECTION = "dump"
# --task: a causal language model (per-token signals, the default) or an image and/or text
# classifier (per-sample head logits and pooled features, FORMAT.md 4.3; classify_dump.py).
TASKS = ("causal-lm", "classify")
CLASSIFIER_ENCODINGS = ("f16", "f32")  # logitstore.classifier_sample.ENCODING_DTYPES
_SIGNAL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


def _signal_name(v):
    if v is None or _SIGNAL_NAME.fullmatch(v):
        return None
    return f"must be letters, digits, '.', '_' or '-' (not starting with '.' or '-'), got {v!r}"


FIELDS: dict[str, Field] = {
    # what to run
    "task": Field("str", "causal-lm", choices=TASKS,
                  help="causal-lm: a language model, per-token signals; classify: an image "
                       "and/or text classifier, per-sample head logits and pooled features. "
                       "A setting of the other task only is refused (see teacher_dump/config.py)."),
    "model": Field("optional_str", None,
                   help="Teacher: alias (logitstore/toolkit/models.yaml), local directory or "
                        "hub id."),
    "revision": Field("optional_str", None, help="Hub branch, tag or commit of the teacher."),
    "trust_remote_code": Field("bool", False, help="Run the model repository's own code (only "
                                                   "for models you trust)."),
    "quantize": Field("str", "auto", choices=QUANTIZE_CHOICES,
                      help="bitsandbytes quantization (auto: the alias's setting, 4bit unless it "
                           "says otherwise, on CUDA; none on CPU)."),
    "dtype": Field("str", "auto", choices=DTYPE_CHOICES, help="Weights' dtype."),
    "device": Field("str", "auto", resumable=True,
                    help="auto (the accelerate process's device), cpu, cuda, cuda:1..."),
    "signal": Field("optional_str", None, _signal_name,
                    help="Signal name in the store (default: from the model name). A name an "
                         "existing store lacks adds this teacher's signal over its stored "
                         "tokens."),
    # data
    "data": Field("list_str", [], help="Data file, directory, glob or dataset "
                                       "name[:config][@split]."),
    "format": Field("str", "auto", data_format_problem, metavar=DATA_FORMAT_METAVAR,
                    help="Data record format (auto: detected per source)."),
    "max_length": Field("optional_int", 2048, at_least(2),
                        help="Tokens per sample (BOS/EOS included)."),
    "split_long": Field("bool", False, flag_names="--split-long/--truncate-long",
                        help="Cut samples over max_length into windows instead of truncating "
                             "them."),
    "include_prompt": Field("bool", False, help="Prompt tokens are targets too."),
    "use_chat_template": Field("bool", True, help="Render chat records with the tokenizer's "
                                                  "chat template when it has one."),
    "wrap_in_chat": Field("bool", False, help="Render records of other formats (not text) as a "
                                              "user/assistant exchange."),
    "dedup": Field("bool", True, help="Drop records whose prompt and response repeat an "
                                      "earlier record's."),
    "mcq_index_base": Field("int", 0, choices=(0, 1),
                            help="Numeric MCQ answers count from 0 or from 1."),
    "limit": Field("optional_int", None, at_least(1), help="At most this many samples."),
    # what to capture
    # Defaults from bench/fidelity.py (BENCHMARKS.md): per byte, sampled draws beat top-k at
    # every size measured; 16 draws (22.4 B/token) is the knee of the front.
    "top_k": Field("int", 0, at_least(0), help="Top-k log-probs per position; 0 = off."),
    "samples": Field("int", 16,
                     lambda v: None if 0 <= v < 2**16 else f"must be in 0..65535, got {v}",
                     help="Sampled draws per position; 0 = off."),
    "sample_temperature": Field("float", 1.0, positive, help="Temperature of the sampled draws."),
    # Not resumable: it decides which arrays a segment holds (SampledSpec.logprobs).
    "sampled_logprobs": Field("bool", True,
                              help="Store the log-probs of the sampled ids (about a third of "
                                   "a sampled signal's bytes). A student trains without them "
                                   "only at the sample temperature."),
    "seed": Field("int", 0, at_least(0), help="Seed of the sampled draws (per sample id)."),
    "hidden_layers": Field("list_int", [],
                           help="Pooled hidden states of these layers (indices into "
                                "hidden_states[1:], e.g. -1,-4); empty = off."),
    "hidden_pool": Field("str", "mean", choices=HIDDEN_POOLINGS,
                         help="How hidden states are pooled over a sample's positions."),
    "hidden_dtype": Field("str", "float16", choices=STORED_FLOAT_DTYPES,
                          help="Stored dtype of the hidden pools."),
    "attention_layers": Field("list_int", [],
                              help="Pooled attention maps of these layers (decoder block "
                                   "indices); empty = off."),
    "attention_grid": Field("int", 16, at_least(1), metavar="G",
                            help="Attention maps are pooled to G x G."),
    "attention_heads": Field("str", "mean", choices=ATTENTION_HEADS,
                             help="Attention heads averaged, or each kept."),
    "attention_dtype": Field("str", "float16", choices=STORED_FLOAT_DTYPES,
                             help="Stored dtype of the attention maps."),
    # how it is stored
    "out": Field("optional_str", None, resumable=True,
                 help="Store URL (directory, s3://..., gs://...)."),
    "logprob_encoding": Field("str", "q8", choices=LOGPROB_ENCODINGS,
                              help="Encoding of the stored log-probs."),
    "logprob_step": Field("float", 1.0 / 16, positive,
                          help="Quantization step of q8 log-probs (nats)."),
    "singleton_step": Field("float", 0.5, positive,
                            help="Quantization step of the log-probs of tokens drawn once "
                                 "(nats)."),
    # Resumable like the layout keys: an existing store keeps its own choice (store_text.py).
    "text": Field("bool", True, resumable=True,
                  help="Keep each sample's UTF-8 text, its tokens' byte spans and the "
                       "tokenizer's files in the store (for students with another tokenizer, "
                       "and `logitstore show` without --tokenizer). --no-text saves about "
                       "2 B/token and the tokenizer files; an existing store keeps its own "
                       "choice."),
    # layout only (an existing store keeps its own): how samples fall into files
    "segment_tokens": Field("int", 1 << 18, at_least(1), resumable=True,
                            help="Tokens per segment (one commit each)."),
    "chunk_tokens": Field("int", 4096, at_least(1), resumable=True,
                          help="Tokens per chunk of a segment's token arrays."),
    "chunk_samples": Field("int", 64, at_least(1), resumable=True,
                           help="Samples per chunk of a segment's per-sample arrays."),
    "overwrite": Field("bool", False, resumable=True,
                       help="Replace an existing store written with a different configuration, "
                            "tokenizer or signal (a store with the same configuration is "
                            "resumed)."),
    # performance only
    "batch_tokens": Field("int", 16384, at_least(1), resumable=True,
                          help="Padded tokens (batch size x longest sample) per forward pass."),
    # Resumable like batch_tokens: it only decides which samples share a forward pass.
    "read_window_tokens": Field("int", 1 << 20, at_least(1), resumable=True,
                                help="Data is read, sorted by length and cut into batches "
                                     "this many tokens at a time, so memory holds one window "
                                     "whatever the size of the data (larger: less padding, "
                                     "later first batch)."),
    # Not resumable: the LM head runs per chunk, and a matmul's rounding follows its shape.
    "logits_chunk": Field("int", 512, at_least(1),
                          help="Positions per fp32 [chunk x vocab] logits block of the capture "
                               "(the LM head runs block by block; bounds extra memory)."),
    "capture_kernel": Field("str", "auto", choices=CAPTURE_KERNELS, resumable=True,
                            help="Group statistics of the logits: compiled (torch.compile, "
                                 "fastest on the CPU), eager, or auto (compiled on the CPU "
                                 "when it works, else eager)."),
    "queue_batches": Field("int", 4, at_least(1), resumable=True,
                           help="Captured batches waiting for the writer thread at most."),
    # what is shown only
    "progress": Field("bool", True, resumable=True, help="Progress bar."),
    # --task classify only (teacher_dump/classify_dump.py)
    "features": Field("list_str", [],
                      help="classify: feature parts to store (e.g. image_cls,fused); empty = "
                           "every part the model outputs."),
    "split": Field("optional_str", None, _signal_name,
                   help="classify: the split of every record (default: from each data file's "
                        "name, train/val/test.jsonl, or an imagefolder directory named so)."),
    "head_name": Field("str", "label", _signal_name,
                       help="classify: the name of a single-tower classifier's one head (an "
                            "image+text classifier names its heads itself)."),
    # f32 by default: a head's logits are a few numbers per sample (f32 costs 2 bytes more
    # per class than f16), while f16 would round the KL targets (relative error 2**-11).
    "logits_encoding": Field("str", "f32", choices=CLASSIFIER_ENCODINGS,
                             help="classify: stored dtype of the heads' logits."),
    # f16 by default: the features are the bulk of a classifier store (hundreds of values
    # per part per sample) and feature losses (MSE, cosine, CRD) tolerate its rounding.
    "features_encoding": Field("str", "f16", choices=CLASSIFIER_ENCODINGS,
                               help="classify: stored dtype of the pooled features."),
    "batch_samples": Field("int", 32, at_least(1), resumable=True,
                           help="classify: samples per forward pass."),
    "segment_samples": Field("int", 4096, at_least(1), resumable=True,
                             help="classify: samples per segment (one commit each)."),
}

# Which settings each task reads. A setting of the other task given in the preset or on the
# command line is refused (it would silently do nothing); its default is ignored and not
# saved with the store (`DumpConfig.as_dict` holds the task's settings only).
CLASSIFY_ONLY = ("features", "split", "head_name", "logits_encoding", "features_encoding",
                 "batch_samples", "segment_samples")
SHARED = ("task", "model", "revision", "trust_remote_code", "dtype", "device", "data",
          "max_length", "limit", "out", "chunk_samples", "overwrite", "progress")


def task_fields(task: str) -> tuple[str, ...]:
    """The settings `task` reads, in FIELDS order."""
    if task == "classify":
        return tuple(k for k in FIELDS if k in SHARED or k in CLASSIFY_ONLY)
    return tuple(k for k in FIELDS if k not in CLASSIFY_ONLY)


def _task_as_dict(self) -> dict[str, Any]:
    """JSON/YAML-able form of the settings of this config's task (tuples as lists), as
    echoed and saved with the store."""
    return {k: list(v) if isinstance(v, tuple) else v
            for k in task_fields(self.task) for v in [getattr(self, k)]}


DumpConfig = config_class("DumpConfig", FIELDS, module=__name__,
                          doc="A resolved teacher-dump config: one attribute per FIELDS entry.",
                          methods={"as_dict": _task_as_dict})


def load_preset(path: str | Path) -> tuple[dict[str, Any], list[str]]:
    """(the `dump:` section of a YAML preset, problems); a missing section is a problem."""
    return load_section(path, SECTION, FIELDS)


def default_signal_name(model: str) -> str:
    """Signal name for a model: the alias, or the last path/hub-id component, sanitised."""
    base = str(model).rstrip("/").replace("\\", "/").rsplit("/", 1)[-1]
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", base).lstrip(".-")
    return name or "teacher"


# ----------------------------------------------------------------------------- resolve


def resolve_config(preset: str | Path | None = None,
                   overrides: dict[str, Any] | None = None) -> DumpConfig:
    """defaults <- preset `dump:` section <- overrides (None values = not given); validated.

    `preset` is a YAML path or a bundled preset's name.
    """
    resolved, origin, problems = resolve_fields(FIELDS, SECTION, preset, overrides)
    problems += other_task_problems(resolved["task"], origin, FIELDS, task_fields, TASKS)
    if resolved["task"] == "classify":
        problems += _classify_problems(resolved)
        if problems:
            raise ConfigError(problems)
        return make_config(DumpConfig, {**resolved, "data": [
            str(Path(d).expanduser().resolve()) for d in resolved["data"]]})
    if isinstance(resolved["format"], str):
        resolved["format"] = normalize_format_name(resolved["format"])
    if not resolved["data"] and isinstance(resolved["model"], str):  # e.g. --model med42
        resolved["data"] = alias_default_data(resolved["model"])
    problems += _cross_field_problems(resolved)
    if problems:
        raise ConfigError(problems)
    resolved["signal"] = resolved["signal"] or default_signal_name(resolved["model"])
    # Local paths are saved absolute, so a resume from another directory compares equal;
    # dataset names and globs stay as typed.
    resolved["data"] = [str(Path(d).expanduser().resolve()) if Path(d).expanduser().exists()
                        else d for d in resolved["data"]]
    return make_config(DumpConfig, resolved)


def _holds_committed_store(url: str) -> bool:
    """Whether `url` holds a committed store (a teacher with another tokenizer reads its
    samples from there, teacher_dump.foreign_tokens; run_dump refuses the others without
    data)."""
    from logitstore.errors import LogitStoreError
    from logitstore.format import MANIFEST
    from logitstore.fs import StoreFS

    try:
        return StoreFS(url).exists(MANIFEST)
    except (LogitStoreError, OSError, ValueError):
        return False


def _cross_field_problems(v: dict[str, Any]) -> list[str]:
    out = []
    if not v["model"]:
        out.append("model is required (--model or dump.model in the config file)")
    if not v["data"] and not (v["out"] and _holds_committed_store(v["out"])):
        out.append("data is required (--data or dump.data in the config file; an alias "
                   "may name it as default_data in the model aliases), except to add a "
                   "teacher of another tokenizer to an existing store (its samples are the "
                   "store's)")
    if not v["out"]:
        out.append("out is required: the store URL (--out or dump.out in the config file)")
    if not (v["top_k"] or v["samples"] or v["hidden_layers"] or v["attention_layers"]):
        out.append("nothing to capture: set top_k > 0, samples > 0, hidden_layers or "
                   "attention_layers")
    return out


def _classify_problems(v: dict[str, Any]) -> list[str]:
    """--task classify: model, data (local paths: files or imagefolder directories) and out."""
    out = []
    if not v["model"]:
        out.append("model is required (--model or dump.model in the config file): the "
                   "classifier's directory or hub id")
    if not v["data"]:
        out.append("data is required (--data or dump.data in the config file): JSONL files "
                   "of image+text records or imagefolder directories")
    out += [f"data {d}: no such file or directory; --task classify reads local JSONL files "
            f"of image+text records or imagefolder directories"
            for d in v["data"] if not Path(d).expanduser().exists()]
    if not v["out"]:
        out.append("out is required: the store URL (--out or dump.out in the config file)")
    if len(set(v["features"])) != len(v["features"]):
        out.append(f"features lists a part twice: {v['features']}")
    return out
