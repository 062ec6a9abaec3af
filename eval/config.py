"""distill-eval configuration: one table (`FIELDS`) for YAML presets and command-line flags.

    cfg = resolve_config("configs/med42-to-llama3.2-1b.yaml", {"model": "run/final", ...})

Each setting is declared once in `FIELDS` (logitstore.toolkit.options): its flag
(`--batch-size`), its key in a preset's `eval:` section (`batch_size:`) and its attribute
of `EvalConfig` all come from that entry. Resolution order, later wins: the defaults, the
preset's `eval:` section, the flags given; every problem is raised at once as one
`ConfigError`. Checks that need files, task definitions or models are done by
eval/runner.py (`check_config`) before any model loads.

`task` picks what is evaluated: `causal-lm` (the default: language models on lm-eval tasks,
perplexity and efficiency, eval/runner.py) or `classify` (image and/or text classifiers on
labelled records or a classifier store's split, eval/classify_runner.py). Each task reads its
own settings (`task_fields`): one of the other task's given in the preset or as a flag is
refused in one paragraph, as teacher-dump does.

`EvalConfig.as_dict()` (the settings of its task) is saved as report/config.yaml and
report.json's `config`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from logitstore.errors import ConfigError
from logitstore.toolkit.hf import DTYPE_CHOICES
from logitstore.toolkit.options import (Field, at_least, config_class, make_config,
                                        other_task_problems, positive, resolve_fields)

SECTION = "eval"
QUANTIZE_CHOICES = ("auto", "4bit", "8bit", "none")
NETWORK_MODES = ("auto", "online", "offline")
TASKS = ("causal-lm", "classify")
_ROLE_QUANTIZE = "Overrides quantize for the {}."

FIELDS: dict[str, Field] = {
    "task": Field("str", "causal-lm", choices=TASKS,
                  help="causal-lm: language models (lm-eval tasks, perplexity, efficiency); "
                       "classify: image and/or text classifiers (accuracy, macro-F1, ECE, NLL "
                       "per head). A setting of the other task only is refused."),
    # what to compare
    "model": Field("optional_str", None, help="Student: alias (logitstore/toolkit/models.yaml),"
                                              " local directory or hub id."),
    "teacher": Field("optional_str", None, help="Teacher (same forms as --model)."),
    "baseline": Field("optional_str", None,
                      help="Baseline, e.g. the student before distillation."),
    "tasks": Field("list_str", ["medical"], help="medical, local, task names, task YAML/JSONL "
                                                "paths (a YAML list in a preset)."),
    "out": Field("optional_str", None, help="Report directory (created)."),
    # how models are loaded
    "quantize": Field("str", "auto", choices=QUANTIZE_CHOICES,
                      help="bitsandbytes quantization of every model (auto: the alias's "
                           "setting on CUDA, none on CPU)."),
    "teacher_quantize": Field("optional_str", None, choices=QUANTIZE_CHOICES,
                              help=_ROLE_QUANTIZE.format("teacher")),
    "student_quantize": Field("optional_str", None, choices=QUANTIZE_CHOICES,
                              help=_ROLE_QUANTIZE.format("student")),
    "baseline_quantize": Field("optional_str", None, choices=QUANTIZE_CHOICES,
                               help=_ROLE_QUANTIZE.format("baseline")),
    "dtype": Field("str", "auto", choices=DTYPE_CHOICES),
    "device": Field("str", "auto", help="auto, cpu, cuda, cuda:1..."),
    "trust_remote_code": Field("bool", False, help="Run model repositories' own code (only for "
                                                   "models you trust)."),
    # tasks
    "limit": Field("optional_float", None, positive,
                   help="At most this many documents per task (< 1: a fraction of each task)."),
    "num_fewshot": Field("optional_int", None, at_least(0),
                         help="Few-shot examples (default: each task's own)."),
    "batch_size": Field("int", 8, at_least(1)),
    "max_new_tokens": Field("int", 64, at_least(1),
                            help="Generation tasks: greedy answers of at most this many tokens."),
    "apply_chat_template": Field("bool", False, help="Render task prompts with each model's "
                                                     "chat template (instruct models)."),
    "network": Field("str", "auto", choices=NETWORK_MODES,
                     help="Hub access for task data (auto: offline when HF_HUB_OFFLINE/"
                          "HF_DATASETS_OFFLINE say so or the hub is unreachable)."),
    "task_timeout": Field("float", 300.0, positive,
                          help="Seconds to wait for one hub task's data before skipping it."),
    # perplexity
    "ppl_data": Field("optional_str", None,
                      help="Held-out text for perplexity/next-token accuracy: .jsonl (text, or "
                           "prompt+reference) or plain text (paragraphs)."),
    "ppl_store": Field("optional_str", None,
                       help="Store URL: perplexity on its eval split (its loss mask)."),
    "ppl_split": Field("str", "auto", help="Store split for --ppl-store (auto: eval, "
                                           "validation, valid, val, dev, test)."),
    "ppl_max_length": Field("int", 512, at_least(2),
                            help="Tokens per perplexity sequence (longer ones are cut)."),
    "ppl_limit": Field("optional_int", None, at_least(1),
                       help="At most this many perplexity sequences per source."),
    # efficiency
    "efficiency": Field("bool", True, help="Measure size, peak memory and speed."),
    "efficiency_prompts": Field("optional_str", None,
                                help="JSONL with `prompt` for the speed benchmark (default: "
                                     "the shipped medgen_mini prompts)."),
    "efficiency_samples": Field("int", 8, at_least(1), help="Prompts in the speed benchmark."),
    "efficiency_repeats": Field("int", 3, at_least(1),
                                help="Timed repetitions over the prompts."),
    "efficiency_new_tokens": Field("int", 32, at_least(1),
                                   help="Tokens generated per prompt in the speed benchmark."),
    "warmup": Field("int", 1, at_least(0), help="Discarded warm-up runs before timing."),
    "progress": Field("bool", True, help="Progress bars (lm-eval's and datasets' too)."),
    # --task classify only (eval/classify_runner.py)
    "data": Field("list_str", [], help="classify: labelled records, JSONL files or imagefolder "
                                       "directories (or use --store)."),
    "store": Field("optional_str", None, help="classify: a classifier store whose --split "
                                              "samples (labels, images, texts) are scored."),
    "split": Field("str", "auto", help="classify: the store split for --store (auto: test, "
                                       "val, validation, eval, dev, the first present)."),
    "head_name": Field("str", "label", help="classify: the one head of a single-tower "
                                            "classifier (ViT/BERT *ForImageClassification...)."),
    "bootstrap": Field("int", 200, at_least(0),
                       help="classify: bootstrap resamples for the macro-F1/ECE standard errors "
                            "(0: none)."),
    "ece_bins": Field("int", 15, at_least(1), help="classify: equal-width confidence bins of "
                                                   "the ECE."),
    "seed": Field("int", 0, help="classify: seed of the bootstrap resamples."),
}

# Which settings each task reads; a setting of the other task given is refused (it would
# silently do nothing) and `as_dict` (config.yaml) holds the task's settings only.
CLASSIFY_ONLY = ("data", "store", "split", "head_name", "bootstrap", "ece_bins", "seed")
SHARED = ("task", "model", "teacher", "baseline", "out", "dtype", "device", "trust_remote_code",
          "batch_size", "progress")


def task_fields(task: str) -> tuple[str, ...]:
    """The settings `task` reads, in FIELDS order."""
    if task == "classify":
        return tuple(k for k in FIELDS if k in SHARED or k in CLASSIFY_ONLY)
    return tuple(k for k in FIELDS if k not in CLASSIFY_ONLY)


def _roles(self) -> dict[str, str]:
    """{role: model} of the roles given, in report order."""
    named = {"teacher": self.teacher, "student": self.model, "baseline": self.baseline}
    return {role: name for role, name in named.items() if name}


def _quantize_for(self, role: str) -> str | None:
    value = getattr(self, f"{role}_quantize") or self.quantize
    return None if value == "auto" else value


def _task_as_dict(self) -> dict[str, Any]:
    """JSON/YAML-able form of the settings of this config's task (tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v
            for k in task_fields(self.task) for v in [getattr(self, k)]}


EvalConfig = config_class(
    "EvalConfig", FIELDS, module=__name__, methods={"roles": _roles,
                                                    "quantize_for": _quantize_for,
                                                    "as_dict": _task_as_dict},
    doc="A resolved distill-eval config: one attribute per FIELDS entry; `roles()` and "
        "`quantize_for(role)` say which models run and how they load.")


def resolve_config(preset: str | Path | None = None,
                   overrides: dict[str, Any] | None = None) -> EvalConfig:
    """defaults <- preset `eval:` section <- overrides (None values = not given); validated.

    `preset` is a YAML path or a bundled preset's name.
    """
    resolved, origin, problems = resolve_fields(FIELDS, SECTION, preset, overrides)
    problems += other_task_problems(resolved["task"], origin, FIELDS, task_fields, TASKS)
    if resolved["task"] == "classify":
        problems += _classify_problems(resolved)
    if not resolved["model"]:
        problems.append("model is required: the student (--model or eval.model in the config "
                        "file)")
    if not resolved["out"]:
        problems.append("out is required: the report directory (--out or eval.out in the "
                        "config file)")
    if problems:
        raise ConfigError(problems)
    limit = resolved["limit"]
    if limit is not None and float(limit).is_integer():
        resolved["limit"] = int(limit)  # lm-eval: int = a count, float < 1 = a share
    return make_config(EvalConfig, resolved)


def _classify_problems(v: dict[str, Any]) -> list[str]:
    """--task classify: exactly one source of labelled samples, --data or --store."""
    if bool(v["data"]) == bool(v["store"]):
        return [f"--task classify scores labelled samples from --data (JSONL files or "
                f"imagefolder directories) or --store (a classifier store and its --split), "
                f"exactly one of them; found {'both' if v['data'] else 'neither'}"]
    return []
