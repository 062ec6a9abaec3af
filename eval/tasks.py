"""Task resolution and the lm-eval bridge of distill-eval.

`--tasks` (comma-separated or repeated; a YAML list or a comma-separated string in a
preset) lists:

- `medical`: the MultiMedQA set (MEDICAL_TASKS), lm-eval's own task definitions;
- `local`: every task definition shipped in logitstore/toolkit/tasks/ (bundled medical
  MCQ and prompt/reference sets);
- the name of a shipped definition (`medmcq_mini`, `medgen_mini`) or of any lm-eval task;
- a path to a task YAML (lm-eval's format) or to a JSONL: records with
  `question/choices/answer` run as the shipped multiple-choice definition, records with
  `prompt/reference` as the shipped generation definition.

Local data paths in a YAML (`dataset_kwargs.data_files`, a local `dataset_path`) are
taken relative to the YAML's folder and made absolute before lm-eval sees them, so the
shipped tasks work wherever the package is installed and a user's YAML works from any
working directory.

Hub tasks need their data from the Hugging Face hub or its cache. `network()` decides
once whether the hub is reachable; when it is not, the libraries are put in offline mode
so a missing dataset fails in milliseconds instead of minutes of retries, and
`load_tasks` records such a task as skipped, with the reason, while the others run.
Loading one task's data is also time-boxed (`timeout_s`).

Every task runs through `lm_eval.simple_evaluate` with the already-loaded model wrapped in
`HFLM(pretrained=model, ...)` (quantised models work), an export in eval/export_lm.py's ExportLM. Generation tasks are
scored by eval/generation.py from lm-eval's logged answers. Each document's own scores
(lm-eval's per-document metrics, ROUGE per answer) are kept too, by document id, for the
report's paired standard errors (eval/report.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from logitstore.errors import ConfigError
from logitstore.toolkit.eval_tasks import BUNDLED_TASKS_DIR
from logitstore.toolkit.hub_probe import env_flag_set, hub_endpoint, probe_hub

log = logging.getLogger(__name__)

# The bundled definitions are toolkit package data: `logitstore decontaminate` reads them too.
SHIPPED_DIR = BUNDLED_TASKS_DIR
# MultiMedQA as used for Med-PaLM and most medical LLM papers: the lm-eval task name and
# the folder under lm_eval/tasks/ that defines it (indexing only these folders takes
# milliseconds; the full lm-eval index takes about a minute).
MEDICAL_TASKS = {
    "mmlu_anatomy": "mmlu/default",
    "mmlu_clinical_knowledge": "mmlu/default",
    "mmlu_college_medicine": "mmlu/default",
    "mmlu_medical_genetics": "mmlu/default",
    "mmlu_professional_medicine": "mmlu/default",
    "mmlu_college_biology": "mmlu/default",
    "mmlu_nutrition": "mmlu/default",
    "mmlu_virology": "mmlu/default",
    "medmcqa": "medmcqa",
    "pubmedqa": "pubmedqa",
    "medqa_4options": "medqa",
}
MCQ_TEMPLATE = "medmcq_mini"  # shipped definitions that user JSONL files run with
GENERATION_TEMPLATE = "medgen_mini"
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


@dataclass(frozen=True)
class TaskRequest:
    name: str  # the task's name in the report (lm-eval's task name)
    kind: str  # "hub" (lm-eval's own definition) | "yaml" | "jsonl"
    source: str  # lm-eval task name, or absolute path of the YAML / JSONL


# ----------------------------------------------------------------------------- resolution


def shipped_tasks() -> dict[str, Path]:
    return {p.stem: p for p in sorted(SHIPPED_DIR.glob("*.yaml"))}


def resolve_tasks(tasks: str | Sequence[str]) -> list[TaskRequest]:
    """TaskRequests of the `tasks` setting (entries, each may be comma-separated: "a,b" and
    ["a", "b"] are the same); ConfigError naming every bad entry."""
    shipped = shipped_tasks()
    requests: list[TaskRequest] = []
    problems: list[str] = []
    entries = [tasks] if isinstance(tasks, str) else list(tasks)
    for item in (part.strip() for entry in entries for part in str(entry).split(",")):
        if not item:
            continue
        if item == "medical":
            requests += [TaskRequest(n, "hub", n) for n in MEDICAL_TASKS]
        elif item == "local":
            requests += [TaskRequest(n, "yaml", str(p)) for n, p in shipped.items()]
        elif item in shipped:
            requests.append(TaskRequest(item, "yaml", str(shipped[item])))
        elif _looks_like_path(item):
            try:
                requests.append(_file_request(Path(item).expanduser()))
            except ConfigError as exc:
                problems += exc.problems
        else:
            requests.append(TaskRequest(item, "hub", item))
    names = [r.name for r in requests]
    problems += [f"task {n!r} is listed twice in --tasks" for n in sorted(set(names))
                 if names.count(n) > 1]
    if not requests and not problems:
        problems.append("--tasks is empty: give task names, `medical`, `local` or file paths")
    if problems:
        raise ConfigError(problems)
    return requests


def _looks_like_path(item: str) -> bool:
    return item.endswith((".yaml", ".yml", ".jsonl")) or os.sep in item or Path(item).exists()


def _file_request(path: Path) -> TaskRequest:
    if not path.is_file():
        raise ConfigError([f"task file {path} does not exist"])
    path = path.resolve()
    if path.suffix in (".yaml", ".yml"):
        return TaskRequest(_read_yaml(path).get("task") or path.stem, "yaml", str(path))
    if path.suffix == ".jsonl":
        _jsonl_template(path)  # fail now, before any model is loaded
        return TaskRequest(path.stem, "jsonl", str(path))
    raise ConfigError([f"task file {path}: expected .yaml, .yml or .jsonl"])


def _read_yaml(path: Path) -> dict[str, Any]:
    """A task YAML as lm-eval reads it: `include` merged, `!function` resolved relative to
    the file (lm-eval's own loader; plain YAML if that private helper ever moves)."""
    try:
        from lm_eval.tasks._yaml_loader import load_yaml
    except ImportError:  # pragma: no cover - depends on lm-eval internals
        import yaml

        def load_yaml(p):
            return yaml.safe_load(Path(p).read_text(encoding="utf-8"))
    try:
        cfg = load_yaml(path)
    except Exception as exc:  # yaml errors, missing include, bad !function
        raise ConfigError([f"task file {path}: {type(exc).__name__}: "
                           f"{' '.join(str(exc).split())[:300]}"]) from exc
    if not isinstance(cfg, dict) or not ("task" in cfg or "group" in cfg):
        raise ConfigError([f"task file {path}: not an lm-eval task definition (no `task:` key)"])
    return cfg


def _jsonl_template(path: Path) -> str:
    """Which shipped definition a JSONL runs with, from the keys of its first record."""
    try:
        with path.open(encoding="utf-8") as fh:
            first = next((line for line in fh if line.strip()), None)
        record = json.loads(first) if first else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError([f"task file {path}: cannot read its first record ({exc})"]) from exc
    keys = set(record) if isinstance(record, dict) else set()
    if {"question", "choices", "answer"} <= keys:
        return MCQ_TEMPLATE
    if {"prompt", "reference"} <= keys:
        return GENERATION_TEMPLATE
    raise ConfigError([f"task file {path}: records need question/choices/answer (multiple "
                       f"choice) or prompt/reference (generation); the first has "
                       f"{sorted(keys) or 'no keys'}"])


def task_config(request: TaskRequest) -> dict[str, Any]:
    """The lm-eval config dict of a yaml/jsonl request, local paths made absolute."""
    if request.kind == "jsonl":
        path = Path(request.source)
        cfg = _read_yaml(shipped_tasks()[_jsonl_template(path)])
        cfg["task"] = request.name
        cfg["dataset_kwargs"] = {"data_files": {"test": str(path)}}
        return cfg
    path = Path(request.source)
    cfg = _read_yaml(path)
    base = path.parent
    kwargs = dict(cfg.get("dataset_kwargs") or {})
    if "data_files" in kwargs:
        kwargs["data_files"] = _absolute(kwargs["data_files"], base)
        cfg["dataset_kwargs"] = kwargs
    local = base / str(cfg.get("dataset_path", ""))
    if cfg.get("dataset_path") and not Path(cfg["dataset_path"]).is_absolute() and local.exists():
        cfg["dataset_path"] = str(local.resolve())
    return cfg


def _absolute(files: Any, base: Path) -> Any:
    if isinstance(files, dict):
        return {k: _absolute(v, base) for k, v in files.items()}
    if isinstance(files, (list, tuple)):
        return [_absolute(v, base) for v in files]
    text = str(files)
    if "://" in text or Path(text).expanduser().is_absolute():
        return text
    return str((base / text).resolve())


# ----------------------------------------------------------------------------- network


@dataclass(frozen=True)
class NetworkState:
    offline: bool
    reason: str  # why, for the report and skip messages


@contextlib.contextmanager
def network(mode: str = "auto", probe_timeout_s: float = 3.0) -> Iterator[NetworkState]:
    """Offline or online Hugging Face access for the duration of the block.

    offline: HF_HUB_OFFLINE/HF_DATASETS_OFFLINE set (and patched into huggingface_hub /
    datasets when they are already imported: they read the variables once, at import).
    online: left as is. auto: the user's HF_*_OFFLINE variables when set, else offline
    exactly when the hub endpoint cannot be reached within probe_timeout_s.
    Environment and patched constants are restored on exit.
    """
    if mode not in ("auto", "online", "offline"):
        raise ConfigError([f"network mode must be auto, online or offline, got {mode!r}"])
    user = {v: os.environ[v] for v in _OFFLINE_VARS if v in os.environ}
    if mode == "offline":
        state = NetworkState(True, "--network offline")
    elif mode == "online":
        state = NetworkState(False, "--network online")
    elif user:
        offline = any(env_flag_set(v) for v in user.values())
        state = NetworkState(offline, ", ".join(f"{k}={v}" for k, v in user.items()))
    else:
        why = probe_hub(probe_timeout_s)
        state = NetworkState(why is not None,
                             f"hub {why}" if why else f"{hub_endpoint()} reachable")
    if not state.offline:
        yield state
        return
    saved_env = {v: os.environ.get(v) for v in _OFFLINE_VARS}
    saved_consts = []
    for module, names in (("huggingface_hub.constants", ("HF_HUB_OFFLINE",)),
                          ("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))):
        mod = sys.modules.get(module)
        for name in names if mod is not None else ():
            if hasattr(mod, name):
                saved_consts.append((mod, name, getattr(mod, name)))
                setattr(mod, name, True)
    os.environ.update(dict.fromkeys(_OFFLINE_VARS, "1"))
    try:
        yield state
    finally:
        for var, value in saved_env.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value
        for mod, name, value in saved_consts:
            setattr(mod, name, value)


# ----------------------------------------------------------------------------- loading


@dataclass
class LoadedTasks:
    tasks: dict[str, Any] = field(default_factory=dict)  # name -> lm-eval Task
    info: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> report entry
    skipped: dict[str, str] = field(default_factory=dict)  # name -> reason


def call_with_timeout(fn: Callable[[], Any], timeout_s: float | None) -> Any:
    """fn() in a daemon thread; TimeoutError after timeout_s (the thread is abandoned:
    a stuck download cannot be interrupted, but it no longer holds up the run)."""
    if not timeout_s:
        return fn()
    box: dict[str, Any] = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True, name="task-load")
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"gave up after {timeout_s:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def task_manager(requests: list[TaskRequest]):
    """An lm-eval TaskManager indexing only what the requests need."""
    from lm_eval.tasks import TaskManager

    hub = [r.source for r in requests if r.kind == "hub"]
    if any(name not in MEDICAL_TASKS for name in hub):
        log.info("indexing every lm-eval task definition (about a minute)")
        return TaskManager()
    root = Path(sys.modules["lm_eval.tasks"].__file__).parent
    folders = sorted({str(root / MEDICAL_TASKS[name]) for name in hub})
    return TaskManager(include_defaults=False, include_path=folders or None)


def load_tasks(requests: list[TaskRequest], *, net: NetworkState,
               timeout_s: float | None = 300.0) -> tuple[LoadedTasks, Any]:
    """(LoadedTasks, TaskManager). Hub tasks whose data cannot be had are skipped with the
    reason; a broken local task (yaml/jsonl) or an unknown task name is a ConfigError."""
    manager = task_manager(requests)
    unknown = [r.name for r in requests if r.kind == "hub" and r.source not in manager.all_tasks]
    if unknown:
        raise ConfigError([f"unknown task {n!r}: not `medical`, `local`, a shipped task "
                           f"({', '.join(shipped_tasks())}), an lm-eval task or a file"
                           for n in unknown])
    out = LoadedTasks()
    for request in requests:
        spec = request.source if request.kind == "hub" else task_config(request)
        try:
            loaded = call_with_timeout(lambda spec=spec: manager.load([spec]),
                                       timeout_s if request.kind == "hub" else None)
        except Exception as exc:
            reason = _skip_reason(request, exc, net)
            if request.kind != "hub":
                raise ConfigError([f"task {request.name} ({request.source}): {reason}"]) from exc
            log.warning("skipping %s: %s", request.name, reason)
            out.skipped[request.name] = reason
            continue
        for name, task in loaded["tasks"].items():
            out.tasks[name] = task
            out.info[name] = {"status": "ok", "source": request.source, "kind": request.kind,
                              "output_type": task.get_config("output_type"),
                              "dataset": task.get_config("dataset_path")}
    for name, reason in out.skipped.items():
        out.info[name] = {"status": "skipped", "reason": reason}
    return out, manager


def _skip_reason(request: TaskRequest, exc: BaseException, net: NetworkState) -> str:
    cause = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    if request.kind != "hub":
        return cause
    if isinstance(exc, TimeoutError):
        return f"loading its data timed out ({cause}); raise --task-timeout or pre-cache it"
    where = ("the hub is offline (" + net.reason + "), so only the local datasets cache was "
             "searched" if net.offline else "the hub was tried (" + net.reason + ")")
    return (f"its dataset could not be loaded: {cause}; {where}. To run it, load it once on a "
            f"machine with internet (e.g. `lm_eval --tasks {request.source} --limit 1 ...` or "
            "datasets.load_dataset) and copy the Hugging Face cache (HF_HOME) here")


# ----------------------------------------------------------------------------- evaluation


@dataclass
class RoleScores:
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # task -> metric -> v
    stderr: dict[str, dict[str, float]] = field(default_factory=dict)
    samples: dict[str, int] = field(default_factory=dict)  # task -> documents evaluated
    # task -> metric -> document id -> that document's score (see item_scores)
    items: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    num_fewshot: dict[str, int] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # task -> reason it failed


def evaluate_tasks(model, tokenizer, loaded: LoadedTasks, manager, *, num_fewshot: int | None,
                   limit: int | float | None, batch_size: int, max_new_tokens: int,
                   apply_chat_template: bool = False) -> RoleScores:
    """Run every loaded task on one model, one task at a time (a failing task does not
    take the others down); generation tasks get ROUGE/BLEU from their logged answers."""
    import lm_eval

    from eval.export_lm import lm_eval_model
    from eval.generation import generation_scores, pairs_from_lm_eval_samples

    lm = lm_eval_model(model, tokenizer, batch_size)
    out = RoleScores()
    for name, task in loaded.tasks.items():
        try:
            result = lm_eval.simple_evaluate(
                model=lm, tasks=[task], task_manager=manager, num_fewshot=num_fewshot,
                limit=limit, batch_size=batch_size, log_samples=True, bootstrap_iters=100,
                gen_kwargs={"max_gen_toks": max_new_tokens, "do_sample": False},
                apply_chat_template=apply_chat_template)
        except Exception as exc:  # a task/model combination lm-eval cannot run
            out.errors[name] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            log.warning("task %s failed: %s", name, out.errors[name])
            continue
        values, errors = _metrics(result["results"].get(name, {}))
        samples = result.get("samples", {}).get(name, [])
        if task.get_config("output_type") == "generate_until":
            values.update(generation_scores(*pairs_from_lm_eval_samples(samples)))
        out.metrics[name], out.stderr[name] = values, errors
        out.items[name] = item_scores(
            samples, generated=task.get_config("output_type") == "generate_until")
        out.samples[name] = len(samples)
        out.num_fewshot[name] = int(result.get("n-shot", {}).get(name) or 0)
    return out


def item_scores(samples: list[dict[str, Any]], *,
                generated: bool = False) -> dict[str, dict[str, float]]:
    """metric -> {document id: score} from lm-eval's logged samples: every finite number
    among a sample's `metrics` (named as in `_metrics`: "acc", other filters "acc[filter]"),
    and with `generated` (a generate_until task) ROUGE-1/2/L of that answer against its reference (their
    mean over documents is the task's ROUGE). Corpus BLEU has no per-document score."""
    from eval.generation import pairs_from_lm_eval_samples, rouge_scores

    out: dict[str, dict[str, float]] = {}
    for sample in samples:
        doc = str(sample.get("doc_id"))
        filt = sample.get("filter", "none")
        for metric in sample.get("metrics") or ():
            value = sample.get(metric)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    not math.isfinite(value) or metric.startswith("bypass"):
                continue
            out.setdefault(metric if filt == "none" else f"{metric}[{filt}]", {})[doc] = \
                float(value)
        if not generated:
            continue
        predictions, references = pairs_from_lm_eval_samples([sample])
        if predictions:
            for metric, value in rouge_scores(predictions, references).items():
                out.setdefault(metric, {})[doc] = value
    return out


def _metrics(raw: dict[str, Any]) -> tuple[dict[str, float], dict[str, float]]:
    """lm-eval's "acc,none" keys -> "acc" (other filters: "metric[filter]"); numbers only,
    `bypass` (no metric) dropped, "_stderr" values split off."""
    values, errors = {}, {}
    for key, value in raw.items():
        metric, _, filt = key.partition(",")
        if not filt or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue  # "alias", "name", "sample_len", "N/A" stderr
        if not math.isfinite(value) or metric.startswith("bypass"):
            continue
        target = errors if metric.endswith("_stderr") else values
        metric = metric.removesuffix("_stderr")
        target[metric if filt == "none" else f"{metric}[{filt}]"] = float(value)
    return values, errors
