"""One distill-eval run: every role (teacher, student, baseline) through every measurement.

Order, chosen so that problems surface before hours of work:
1. check the options: models resolve, task names/files parse, data files exist;
2. decide the network mode and load every task's data once (unavailable hub tasks are
   skipped with the reason);
3. per role, one model in memory at a time: load it under the memory meter, benchmark
   its speed (peak memory = load + benchmark, comparable between roles), run the tasks,
   then perplexity; free it;
4. build the report and write report.json / report.md / report.png / config.yaml.
"""

from __future__ import annotations

import logging
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eval.config import EvalConfig
from logitstore.errors import ConfigError

log = logging.getLogger(__name__)


def check_config(cfg: EvalConfig) -> list:
    """TaskRequests of cfg.tasks; ConfigError/ModelLoadError for what is wrong, before any
    heavy import or model load."""
    from eval.tasks import resolve_tasks
    from logitstore.toolkit.hf import resolve_model

    problems = []  # the values' own checks were done by eval.config.resolve_config
    for flag, path in (("--ppl-data", cfg.ppl_data),
                       ("--efficiency-prompts", cfg.efficiency_prompts)):
        if path and not Path(path).is_file():
            problems.append(f"{flag} {path} does not exist")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        problems.append(f"--out {out} exists and is not a directory")
    try:
        requests = resolve_tasks(cfg.tasks)
    except ConfigError as exc:
        problems += exc.problems
        requests = []
    if problems:
        raise ConfigError(problems)
    from eval.export_model import check_export, export_directory

    for role, name in cfg.roles().items():
        export = export_directory(resolve_model(name))  # ModelLoadError: alias file, options
        if export is not None:
            check_export(export, role, getattr(cfg, f"{role}_quantize"))
    if cfg.ppl_store:
        _check_store(cfg.ppl_store, cfg.ppl_split)
    return requests


def _check_store(url: str, split: str) -> None:
    """The store opens and has the split (StoreNotFoundError, ConfigError... otherwise)."""
    from eval.perplexity import pick_split
    from logitstore.reader import StoreReader

    reader = StoreReader(url)
    pick_split(reader.index.column("split").to_pylist(), split)


def _efficiency_prompts(cfg: EvalConfig) -> list[str]:
    import json

    from eval.tasks import SHIPPED_DIR

    path = Path(cfg.efficiency_prompts) if cfg.efficiency_prompts else \
        SHIPPED_DIR / "medgen_mini.jsonl"
    prompts = []
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line) if line.strip() else None
        if isinstance(record, dict) and isinstance(record.get("prompt"), str):
            prompts.append(f"Question: {record['prompt']}\nAnswer:")
    if not prompts:
        raise ConfigError([f"--efficiency-prompts {path}: no record with a `prompt` string"])
    return prompts[:cfg.efficiency_samples]


def _device(device: str) -> str:
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


@dataclass
class RoleRun:
    info: dict[str, Any]  # LoadedModel fields + memory method
    results: dict[str, dict[str, Any]]  # task -> metric -> value
    stderr: dict[str, dict[str, float]]
    samples: dict[str, int]  # task -> documents evaluated
    skipped: list[dict[str, Any]]
    items: dict[str, dict[str, Any]]  # task -> metric -> per-item scores (eval/report.py)


def run(cfg: EvalConfig) -> tuple[dict[str, Any], dict[str, Path]]:
    """(report, written paths). Raises LogitStoreError subclasses for user errors."""
    requests = check_config(cfg)
    from eval.report import build_report, write_report
    from eval.tasks import load_tasks, network

    prompts = _efficiency_prompts(cfg) if cfg.efficiency else []
    texts = None
    if cfg.ppl_data:
        from eval.perplexity import read_texts

        texts = read_texts(cfg.ppl_data)
    runs: dict[str, RoleRun] = {}
    if cfg.efficiency:
        from eval.efficiency import prime_runtime

        prime_runtime()
    with network(cfg.network) as net:
        log.info("network: %s (%s)", "offline" if net.offline else "online", net.reason)
        loaded, manager = load_tasks(requests, net=net, timeout_s=cfg.task_timeout)
        for role, name in cfg.roles().items():
            log.info("[%s] %s", role, name)
            runs[role] = _run_role(cfg, role, name, loaded, manager, prompts, texts)
    for task, entry in loaded.info.items():
        if entry["status"] == "ok":
            entry["samples"] = {role: run.samples.get(task) for role, run in runs.items()}
    skipped = [{"task": t, "role": None, "reason": r} for t, r in loaded.skipped.items()]
    skipped += [skip for run in runs.values() for skip in run.skipped]
    report = build_report(
        results={role: run.results for role, run in runs.items()},
        stderr={role: run.stderr for role, run in runs.items()},
        items={role: run.items for role, run in runs.items()},
        models={role: run.info for role, run in runs.items()},
        tasks=loaded.info, skipped=skipped,
        efficiency_notes=_efficiency_notes(runs, cfg) if cfg.efficiency else {},
        config=cfg.as_dict(), environment=_environment(net))
    return report, write_report(report, cfg.out)


def _run_role(cfg, role, name, loaded, manager, prompts, texts) -> RoleRun:
    from eval.efficiency import release_memory
    from eval.tasks import evaluate_tasks
    from logitstore.toolkit.tokenizer_identity import tokenizer_fingerprint

    results: dict[str, dict] = {}
    skipped: list[dict] = []
    model, tokenizer, info, efficiency = _load_and_time(cfg, role, name, prompts)
    try:  # eval/tokenizer_units.py: per-token figures are compared within one tokenizer
        info["tokenizer_fingerprint"] = tokenizer_fingerprint(tokenizer)
    except (TypeError, ValueError, AttributeError):  # a remote-code vocabulary of bytes keys
        info["tokenizer_fingerprint"] = None  # unknown: compared as before
    if efficiency:
        results["efficiency"] = efficiency
    log.info("[%s] %d task(s)", role, len(loaded.tasks))
    scores = evaluate_tasks(model, tokenizer, loaded, manager, num_fewshot=cfg.num_fewshot,
                            limit=cfg.limit, batch_size=cfg.batch_size,
                            max_new_tokens=cfg.max_new_tokens,
                            apply_chat_template=cfg.apply_chat_template)
    results.update(scores.metrics)
    skipped += [{"task": t, "role": role, "reason": r} for t, r in scores.errors.items()]
    items = dict(scores.items)
    results.update(_perplexities(cfg, role, model, tokenizer, texts, skipped, items))
    if hasattr(model, "close"):  # an export's runtime session
        model.close()
    del model, tokenizer
    release_memory()
    return RoleRun(info, _order(results), scores.stderr, scores.samples, skipped, items)


def _load_and_time(cfg, role, name, prompts) -> tuple[Any, Any, dict, dict]:
    """(model, tokenizer, models[role] entry, efficiency results or {}): the model loaded
    under the memory meter and, with prompts, its speed benchmarked. An export directory
    loads as an InferenceModel (eval/export_model.py), anything else as a transformers model."""
    from eval.efficiency import (PeakMemory, benchmark_inference_speed, benchmark_speed,
                                 count_parameters, disk_bytes, weights_bytes, weights_dir)
    from eval.export_model import export_directory, export_sizes, load_export
    from logitstore.toolkit.hf import load_causal_lm, load_tokenizer, resolve_model

    spec = resolve_model(name)
    export = export_directory(spec)
    tokenizer = None if export else load_tokenizer(spec, trust_remote_code=cfg.trust_remote_code)
    meter = PeakMemory("cpu" if export else _device(cfg.device)).start()
    try:
        if export:
            model, info = load_export(export, name)
            tokenizer = model.tokenizer
        else:
            model, loaded_info = load_causal_lm(spec, quantize=cfg.quantize_for(role),
                                                dtype=cfg.dtype, device=cfg.device,
                                                trust_remote_code=cfg.trust_remote_code)
            info = loaded_info.as_dict()
        speed = {}
        if prompts:
            log.info("[%s] speed benchmark", role)
            timing = dict(max_new_tokens=cfg.efficiency_new_tokens, warmup=cfg.warmup,
                          repetitions=cfg.efficiency_repeats)
            speed = benchmark_inference_speed(model, prompts, **timing) if export else \
                benchmark_speed(model, tokenizer, prompts, **timing)
    finally:
        peak = meter.stop()
    if not prompts:
        return model, tokenizer, info, {}
    info["memory_method"] = meter.method
    sizes = export_sizes(export) if export else {
        "parameters": count_parameters(model), "weights_bytes": weights_bytes(model),
        "disk_bytes": disk_bytes(weights_dir(spec))}
    return model, tokenizer, info, {**sizes, "peak_memory_bytes": peak, **speed}


def _order(results: dict) -> dict:
    """Tasks first, then perplexity, efficiency last (the order of the report's table)."""
    return dict(sorted(results.items(), key=lambda kv: (kv[0] == "efficiency",
                                                        kv[0].startswith("ppl/"))))


def _perplexities(cfg, role, model, tokenizer, texts, skips, items) -> dict[str, dict]:
    """task -> perplexity metrics; each sequence's scores go to items[task] (for SEs)."""
    from eval.perplexity import (StoreTokenizerMismatch, score_sequences, sequences_from_store,
                                 sequences_from_texts)
    from eval.uncertainty import sequence_items

    out = {}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    max_length = min(cfg.ppl_max_length, _context_length(model))
    if texts is not None:
        name = f"ppl/{Path(cfg.ppl_data).stem}"
        sequences = sequences_from_texts(texts[:cfg.ppl_limit], tokenizer, max_length)
        log.info("[%s] perplexity on %s (%d sequences)", role, cfg.ppl_data, len(sequences))
        try:
            per_sequence: list[dict] = []
            out[name] = score_sequences(model, sequences, pad_id=pad, progress=cfg.progress,
                                        per_sequence=per_sequence)
            items[name] = sequence_items(per_sequence)
        except ValueError as exc:
            skips.append({"task": name, "role": role, "reason": str(exc)})
    if cfg.ppl_store:
        try:
            split, sequences = sequences_from_store(cfg.ppl_store, tokenizer, split=cfg.ppl_split,
                                                    max_length=max_length, limit=cfg.ppl_limit)
            log.info("[%s] perplexity on %s@%s (%d sequences)", role, cfg.ppl_store, split,
                     len(sequences))
            per_sequence = []
            out["ppl/store"] = score_sequences(model, sequences, pad_id=pad,
                                               progress=cfg.progress, per_sequence=per_sequence)
            items["ppl/store"] = sequence_items(per_sequence)
        except (StoreTokenizerMismatch, ValueError) as exc:
            # Another tokenizer (a baseline of another family), or no scored token within
            # max_length: this role has no store perplexity, the others still do.
            skips.append({"task": "ppl/store", "role": role, "reason": str(exc)})
    return out


def _context_length(model) -> int:
    from logitstore.toolkit.inference import InferenceModel

    if isinstance(model, InferenceModel):
        return model.max_length
    config = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def _efficiency_notes(runs: dict[str, RoleRun], cfg: EvalConfig) -> dict[str, str]:
    methods = {run.info.get("memory_method") for run in runs.values()}
    return {
        "peak memory": "; ".join(sorted(m for m in methods if m)) + " (model load + speed "
                       "benchmark)",
        "speed": (f"batch 1, greedy, {cfg.efficiency_new_tokens} new tokens (EOS suppressed), "
                  f"{cfg.efficiency_samples} prompts x {cfg.efficiency_repeats} repetitions "
                  f"after {cfg.warmup} warm-up run(s); generation tokens/s includes prefill"),
        "disk": "sum of the checkpoint's weight files as stored (before load-time "
                "quantization); for an export, its model.onnx (+ external data) or safetensors",
    }


def _environment(net) -> dict[str, Any]:
    import importlib.metadata as md

    import torch

    versions = {}
    for package in ("torch", "transformers", "lm_eval", "datasets", "rouge_score", "sacrebleu"):
        try:
            versions[package] = md.version(package.replace("_", "-"))
        except md.PackageNotFoundError:
            versions[package] = None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "network": {"offline": net.offline, "reason": net.reason},
        "versions": versions,
    }
