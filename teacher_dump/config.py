"""teacher-dump configuration: one mechanism for YAML presets and command-line flags.

    resolved = resolve_config("configs/med42-to-llama3.2-1b.yaml", {"data": ["d.jsonl"], ...})

Resolution order, later wins: the defaults in `FIELDS`, the preset's `dump:` section, the
flags the user passed (None = not passed). Every value goes through the same coercion
and checks whatever its origin, and every problem is collected and raised at once as one
`ConfigError`. A preset file may hold other sections (`train:`, `eval:`...) for other
tools; only `dump:` is read here.

The resolved config is a `DumpConfig`; `as_dict()` is what teacher-dump echoes and saves
into the store manifest (`extra["teacher_dump_config"]`), and `content_differences()`
compares a saved one with a new one on the keys that change what is stored.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from logitstore.toolkit.options import Field, at_least, load_section, one_of, positive, resolve_fields
from logitstore.errors import ConfigError
from logitstore.format import ATTENTION_HEADS, HIDDEN_POOLINGS, LOGPROB_ENCODINGS

# auto: the alias's default (4bit unless it says otherwise) on CUDA, none on CPU.
QUANTIZE_CHOICES = ("auto", "4bit", "8bit", "none")
DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")
# Kernels of teacher_dump.logit_stats (auto: compiled on the CPU when torch.compile works).
CAPTURE_KERNELS = ("auto", "compiled", "eager")
STORED_FLOAT_DTYPES = ("float16", "float32")
# Data formats of logitstore.toolkit.record_formats; dashes are accepted for underscores.
DATA_FORMATS = ("auto", "chat", "medmcqa", "mcq", "instruction", "prompt_completion", "text")
SECTION = "dump"
_SIGNAL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


_at_least, _one_of, _positive = at_least, one_of, positive


def _signal_name(v):
    if v is None or _SIGNAL_NAME.fullmatch(v):
        return None
    return f"must be letters, digits, '.', '_' or '-' (not starting with '.' or '-'), got {v!r}"


FIELDS: dict[str, Field] = {
    # what to run
    "model": Field("optional_str", None,
                   help="teacher: alias (logitstore/toolkit/models.yaml), directory or hub id"),
    "revision": Field("optional_str", None, help="hub branch, tag or commit of the teacher"),
    "trust_remote_code": Field("bool", False,
                               help="run the model repo's own code (only when asked)"),
    "quantize": Field("str", "auto", _one_of(QUANTIZE_CHOICES)),
    "dtype": Field("str", "auto", _one_of(DTYPE_CHOICES)),
    "device": Field("str", "auto", resumable=True, help="auto: the accelerate process's device"),
    "signal": Field("optional_str", None, _signal_name,
                    help="signal name in the store (default: derived from the model name)"),
    # data
    "data": Field("list_str", []),
    "format": Field("str", "auto", lambda v: _one_of(DATA_FORMATS)(v.replace("-", "_"))),
    "max_length": Field("optional_int", 2048, _at_least(2),
                        help="tokens per sample, BOS/EOS included"),
    "split_long": Field("bool", False, help="cut long samples into windows instead of truncating"),
    "include_prompt": Field("bool", False),
    "use_chat_template": Field("bool", True),
    "wrap_in_chat": Field("bool", False),
    "dedup": Field("bool", True),
    "mcq_index_base": Field("int", 0, _one_of((0, 1))),
    "limit": Field("optional_int", None, _at_least(1)),
    # what to capture
    "top_k": Field("int", 32, _at_least(0), help="0 = off"),
    "samples": Field("int", 0,
                     lambda v: None if 0 <= v < 2**16 else f"must be in 0..65535, got {v}",
                     help="sampled draws per position, 0 = off"),
    "sample_temperature": Field("float", 1.0, _positive),
    "seed": Field("int", 0, _at_least(0)),
    "hidden_layers": Field("list_int", [], help="indices into output.hidden_states[1:]; [] = off"),
    "hidden_pool": Field("str", "mean", _one_of(HIDDEN_POOLINGS)),
    "hidden_dtype": Field("str", "float16", _one_of(STORED_FLOAT_DTYPES)),
    "attention_layers": Field("list_int", [], help="decoder block indices; [] = off"),
    "attention_grid": Field("int", 16, _at_least(1)),
    "attention_heads": Field("str", "mean", _one_of(ATTENTION_HEADS)),
    "attention_dtype": Field("str", "float16", _one_of(STORED_FLOAT_DTYPES)),
    # how it is stored
    "out": Field("optional_str", None, resumable=True),
    "logprob_encoding": Field("str", "q8", _one_of(LOGPROB_ENCODINGS)),
    "logprob_step": Field("float", 1.0 / 16, _positive),
    "singleton_step": Field("float", 0.5, _positive),
    # layout only (an existing store keeps its own): how samples fall into files
    "segment_tokens": Field("int", 1 << 18, _at_least(1), resumable=True),
    "chunk_tokens": Field("int", 4096, _at_least(1), resumable=True),
    "chunk_samples": Field("int", 64, _at_least(1), resumable=True),
    "overwrite": Field("bool", False, resumable=True),
    # performance only
    "batch_tokens": Field("int", 16384, _at_least(1), resumable=True,
                          help="padded tokens (batch size x longest sample) per forward pass"),
    # Not resumable: the LM head runs per chunk, and a matmul's rounding follows its shape.
    "logits_chunk": Field("int", 512, _at_least(1),
                          help="positions per fp32 [chunk x vocab] logits block of the capture "
                               "(the LM head runs chunk by chunk; bounds extra memory)"),
    "capture_kernel": Field("str", "auto", _one_of(CAPTURE_KERNELS), resumable=True,
                            help="group statistics of the logits: compiled (torch.compile, "
                                 "fastest on the CPU), eager, or auto (compiled on the CPU "
                                 "when it works, else eager)"),
    "queue_batches": Field("int", 4, _at_least(1), resumable=True,
                           help="captured batches waiting for the writer thread at most"),
}


@dataclass(frozen=True)
class DumpConfig:
    model: str
    data: tuple[str, ...]
    out: str
    signal: str
    revision: str | None
    trust_remote_code: bool
    quantize: str
    dtype: str
    device: str
    format: str
    max_length: int | None
    split_long: bool
    include_prompt: bool
    use_chat_template: bool
    wrap_in_chat: bool
    dedup: bool
    mcq_index_base: int
    limit: int | None
    top_k: int
    samples: int
    sample_temperature: float
    seed: int
    hidden_layers: tuple[int, ...]
    hidden_pool: str
    hidden_dtype: str
    attention_layers: tuple[int, ...]
    attention_grid: int
    attention_heads: str
    attention_dtype: str
    logprob_encoding: str
    logprob_step: float
    singleton_step: float
    segment_tokens: int
    chunk_tokens: int
    chunk_samples: int
    overwrite: bool
    batch_tokens: int
    logits_chunk: int
    capture_kernel: str
    queue_batches: int

    def as_dict(self) -> dict[str, Any]:
        """JSON/YAML-able form (tuples as lists), as saved into the store."""
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}


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
    """defaults <- preset `dump:` section <- overrides (None values = not given); validated."""
    resolved, _, problems = resolve_fields(FIELDS, SECTION, preset, overrides)
    if isinstance(resolved["format"], str):
        resolved["format"] = resolved["format"].replace("-", "_")
    problems += _cross_field_problems(resolved)
    if problems:
        raise ConfigError(problems)
    resolved["signal"] = resolved["signal"] or default_signal_name(resolved["model"])
    # Local paths are saved absolute, so a resume from another directory compares equal;
    # dataset names and globs stay as typed.
    resolved["data"] = tuple(str(Path(d).expanduser().resolve()) if Path(d).expanduser().exists()
                             else d for d in resolved["data"])
    resolved["hidden_layers"] = tuple(resolved["hidden_layers"])
    resolved["attention_layers"] = tuple(resolved["attention_layers"])
    return DumpConfig(**resolved)


def _cross_field_problems(v: dict[str, Any]) -> list[str]:
    out = []
    if not v["model"]:
        out.append("model is required (--model or dump.model in the config file)")
    if not v["data"]:
        out.append("data is required (--data or dump.data in the config file)")
    if not v["out"]:
        out.append("out is required: the store URL (--out or dump.out in the config file)")
    if not (v["top_k"] or v["samples"] or v["hidden_layers"] or v["attention_layers"]):
        out.append("nothing to capture: set top_k > 0, samples > 0, hidden_layers or "
                   "attention_layers")
    return out


def content_differences(saved: dict[str, Any], new: DumpConfig) -> list[str]:
    """Keys that change what is stored and differ between a saved config and `new`."""
    now = new.as_dict()
    out = []
    for key, field in FIELDS.items():
        if field.resumable or key not in saved:
            continue
        before = saved[key]
        if isinstance(before, list) or isinstance(now[key], list):
            before, after = list(before or []), list(now[key] or [])
        else:
            after = now[key]
        if before != after:
            out.append(f"{key}: store has {before!r}, now {after!r}")
    return out
