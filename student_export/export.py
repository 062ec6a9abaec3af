"""student-export's steps: check, export into a staging directory, gate, swap into place.

    manifest, out_dir = run_export(cfg)

1. `check_inputs`: every problem of the config and the local paths (MODEL, --out,
   --check-data, --max-length against the model's config.json, an architecture the ONNX
   exporter handles) at once, as one ConfigError, before anything is loaded or written;
2. MODEL resolved to a local directory (student_export/source.py), the held-out data read
   and tokenized (student_export/quality_gate.py), so bad data fails before the export;
3. the export, written into a staging directory (student_export/staging.py: beside a
   missing --out, inside an existing one, which is never renamed, so it may be a mount point):
   export.json (status "exporting"), export_config.yaml, tokenizer, config.json,
   generation_config.json and the weights: model.onnx (+ model.onnx.data) from
   student_export/onnx_graph.py, int8 through onnxruntime's dynamic quantization; or
   model.safetensors, int8 through logitstore.toolkit.torch_int8;
4. the quality gate on the source and the staged export, both opened with
   `load_inference_model`; export.json gets the figures and status "complete" or "failed
   quality gate";
5. a complete export is swapped into --out (a previous export there, which --overwrite
   allowed, is deleted only then). A failed gate raises QualityGateFailed: into a new or
   empty --out the failed export is still moved, for inspection; over a previous export it
   is removed and the previous one stays as it was. Any other failure or an interrupt
   removes the staging directory and leaves --out untouched; only when a failed swap could
   not be undone either (SwapRestoreFailed) is the staging directory kept, as its message
   says.
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from logitstore.errors import ConfigError
from logitstore.toolkit.inference import EXPORT_MANIFEST, load_inference_model
from student_export import manifest as manifests
from student_export.config import CONFIG_FILE, save_config
from student_export.quality_gate import (QualityGateFailed, check_data_problem, compare,
                                         failure_message, held_out_sequences)
from student_export.source import Source, local_problem, resolve_source, run_eval_store
from student_export.staging import (SwapRestoreFailed, discard, is_leftover, new_staging_dir,
                                    publish, swap_target)

log = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH_CAP = 2048  # CPU serving: longer contexts only when asked for
_FP32_TMP = ".onnx-fp32.tmp"  # the fp32 graph, quantized into the export then removed


def input_problems(cfg) -> list[str]:
    """Every problem of MODEL, --out, --check-data and --max-length that the file system
    shows (nothing loaded, nothing written); settings not given (None) are skipped."""
    problems = [check_data_problem(cfg.check_data)]
    if cfg.model:
        problems.append(local_problem(cfg.model))
    if cfg.out:
        problems += _out_problems(cfg)
    config = _local_config(cfg.model) if cfg.model else None
    if config is not None:
        problems += _model_problems(cfg, config)
    return [p for p in problems if p]


def check_inputs(cfg) -> None:
    """ConfigError listing every problem `input_problems` finds."""
    problems = input_problems(cfg)
    if problems:
        raise ConfigError(problems)


def _out_problems(cfg) -> list[str]:
    out = Path(cfg.out).expanduser()
    if out.exists() and not out.is_dir():
        return [f"out {cfg.out} is a file; --out takes a directory (created if missing)"]
    model = Path(cfg.model or "").expanduser()
    if cfg.model and model.exists() and out.exists() and (out.resolve() == model.resolve()
                                            or out.resolve() in model.resolve().parents):
        return [f"out {cfg.out} holds the model being exported ({cfg.model}); write the "
                "export to another directory"]
    if not out.is_dir() or not any(out.iterdir()):
        return []
    if not (out / EXPORT_MANIFEST).is_file():
        leftovers = sorted(p.name for p in out.iterdir() if is_leftover(p.name))
        hint = (f" (it holds {', '.join(leftovers)}, left by an export that was killed: "
                "delete them)" if leftovers else "")
        return [f"out {cfg.out} is not empty and holds no {EXPORT_MANIFEST}, so it is not a "
                f"previous export{hint}; it is left alone even with --overwrite: choose a new "
                "or empty directory"]
    if not cfg.overwrite:
        return [f"out {cfg.out} already holds an export ({EXPORT_MANIFEST}); pass --overwrite "
                "to replace it, or choose another directory"]
    return _overwrite_problems(cfg, out)


def _overwrite_problems(cfg, out: Path) -> list[str]:
    """Why --overwrite must not replace `out` (a directory holding export.json), which
    deletes it: an export never has subdirectories (but the fp32 staging directory an
    export of an earlier version left when it crashed), and the held-out data the new
    export reads must not be inside what is deleted. Staging directories a killed export
    left (staging.is_leftover) are not foreign: the swap deletes them with the export."""
    foreign = sorted(p.name for p in out.iterdir()
                     if p.is_dir() and p.name != _FP32_TMP and not is_leftover(p.name))
    if foreign:
        return [f"out {cfg.out} holds {EXPORT_MANIFEST} but also the directories "
                f"{', '.join(foreign)}, which no export writes; --overwrite deletes the whole "
                "directory, so it refuses: move them out, or choose another directory"]
    data = Path(cfg.check_data).expanduser() if cfg.check_data else None
    if data is not None and data.exists() and out.resolve() in data.resolve().parents:
        return [f"check_data {cfg.check_data} is inside out {cfg.out}, which --overwrite "
                "deletes once the new export replaces it; move the held-out data elsewhere"]
    return []


def _local_config(model: str) -> dict[str, Any] | None:
    """config.json of MODEL when it is a usable local directory (a run: its final/)."""
    if local_problem(model) is not None:
        return None
    path = Path(model).expanduser()
    for candidate in (path / "config.json", path / "final" / "config.json"):
        if candidate.is_file():
            try:
                found = json.loads(candidate.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError):
                return None  # resolve_source reports it
            return found if isinstance(found, dict) else None
    return None


def _model_problems(cfg, config: dict[str, Any]) -> list[str]:
    problems = []
    positions = config.get("max_position_embeddings")
    if cfg.max_length is not None and isinstance(positions, int) and cfg.max_length > positions:
        problems.append(f"max_length {cfg.max_length} is over the model's "
                        f"max_position_embeddings {positions}; pass --max-length {positions} "
                        "or less")
    if cfg.format == "onnx":
        from student_export.onnx_graph import SUPPORTED_MODEL_TYPES

        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            problems.append(f"format onnx supports the model types "
                            f"{', '.join(SUPPORTED_MODEL_TYPES)}, the model is "
                            f"{model_type!r}; pass --format torch")
    return problems


def resolve_max_length(cfg, source: Source) -> int:
    """--max-length, else the model's positions capped at DEFAULT_MAX_LENGTH_CAP."""
    problems = _model_problems(cfg, source.config)  # again: a hub model is known only now
    if problems:
        raise ConfigError(problems)
    if cfg.max_length is not None:
        return cfg.max_length
    return min(source.max_position_embeddings or DEFAULT_MAX_LENGTH_CAP,
               DEFAULT_MAX_LENGTH_CAP)


def run_export(cfg) -> tuple[dict[str, Any], Path]:
    """Export MODEL as cfg says and gate it (module docstring); (export.json, directory)."""
    check_inputs(cfg)
    source = resolve_source(cfg.model)
    max_length = resolve_max_length(cfg, source)
    log.info("source: %s (%s)", source.path, source.model_type)
    from logitstore.toolkit.hf import load_tokenizer

    tokenizer = load_tokenizer(str(source.path))
    data, sequences = held_out_sequences(
        cfg.check_data, None if cfg.check_data else run_eval_store(source.run_dir), tokenizer,
        length=min(cfg.check_length, max_length), limit=cfg.check_limit)
    log.info("quality gate data: %s %s (%d sequences)", data["kind"], data["path"],
             len(sequences))
    out = swap_target(Path(cfg.out).expanduser())
    replacing = (out / EXPORT_MANIFEST).is_file()  # check_inputs allowed it: --overwrite
    staging = new_staging_dir(out)
    try:
        manifest = _export_into(staging, cfg, source, tokenizer, max_length, data, sequences)
        passed = manifest["quality"]["passed"]
        if passed or not replacing:  # a failed export replaces nothing, but is kept if new
            _publish(staging, out, replacing)
    except SwapRestoreFailed:
        raise  # staging holds the only complete copy of the new export: kept
    except BaseException:
        discard(staging)
        raise
    if not passed:
        if replacing:
            discard(staging)
        raise QualityGateFailed(failure_message(manifest["quality"], out, cfg.quantize,
                                                kept=not replacing))
    return manifest, out


def _export_into(staging: Path, cfg, source: Source, tokenizer, max_length: int,
                 data: dict[str, Any], sequences) -> dict[str, Any]:
    """Write the export into `staging` and run the gate on it; its export.json (written)."""
    manifest = manifests.new_manifest(cfg, source, max_length=max_length)
    manifests.write_manifest(staging, manifest)
    save_config(cfg, staging / CONFIG_FILE)
    started = time.perf_counter()
    manifest["source"]["sha256"], manifest["source"]["weights"] = source.weights_sha256()
    section = _write_model(cfg, source, staging, tokenizer, max_length)
    manifest[cfg.format] = section
    manifest["files"] = manifests.file_digests(staging)
    manifest["status"] = "checking"
    manifests.write_manifest(staging, manifest)
    log.info("exported to %s in %.1f s; running the quality gate", staging,
             time.perf_counter() - started)
    quality = run_gate(source, staging, sequences, threshold=cfg.ppl_threshold(),
                       threads=cfg.threads)
    quality["data"] = data
    manifest["quality"] = quality
    manifest["status"] = "complete" if quality["passed"] else "failed quality gate"
    manifests.write_manifest(staging, manifest)
    return manifest


def _publish(staging: Path, out: Path, replacing: bool) -> None:
    """Swap `staging` in: over the previous export only when `out` held one at the check
    (publish re-checks it still does); into a missing or empty `out` otherwise, so files
    that appeared there meanwhile are refused, never deleted."""
    if replacing:
        previous = manifests.read_manifest(out) or {}
        log.info("--overwrite: replacing the export in %s (created %s)", out,
                 previous.get("created", "?"))
    publish(staging, out, replace=replacing)


def _write_model(cfg, source: Source, out: Path, tokenizer, max_length: int) -> dict[str, Any]:
    """Tokenizer, config, generation config and weights into `out`; the manifest section."""
    tokenizer.save_pretrained(out)
    if cfg.format == "torch" and cfg.quantize == "int8":
        from logitstore.toolkit.torch_int8 import save_int8

        log.info("quantizing to int8 with torchao")
        return {"weights": "model.safetensors", "quantization": save_int8(source.path, out)}
    from logitstore.toolkit.hf import load_causal_lm

    model, _ = load_causal_lm(str(source.path), quantize="none", dtype="float32", device="cpu")
    try:
        if cfg.format == "torch":
            model.save_pretrained(out, safe_serialization=True)
            return {"weights": "model.safetensors", "dtype": "float32"}
        model.config.save_pretrained(out)
        model.generation_config.save_pretrained(out)
        return _write_onnx(cfg, model, out, max_length)
    finally:
        del model
        gc.collect()


def _write_onnx(cfg, model, out: Path, max_length: int) -> dict[str, Any]:
    from student_export.onnx_graph import ONNX_FILE, export_onnx, quantize_onnx_int8

    log.info("exporting the ONNX graph (torch.onnx, dynamo)")
    if cfg.quantize == "none":
        return export_onnx(model, out, max_length=max_length, opset=cfg.opset)
    staging = out / _FP32_TMP
    section = export_onnx(model, staging, max_length=max_length, opset=cfg.opset)
    log.info("quantizing the graph to int8 (onnxruntime dynamic quantization)")
    section["quantization"] = quantize_onnx_int8(staging / ONNX_FILE, out / ONNX_FILE)
    shutil.rmtree(staging)
    data = sorted(p.name for p in out.iterdir() if p.name.startswith(ONNX_FILE + "."))
    section["data_file"] = data[0] if data else None
    return section


def run_gate(source: Source, out: Path, sequences, *, threshold: float,
             threads: int | None) -> dict[str, Any]:
    """The quality gate's figures: source and export opened as serving opens them."""
    started = time.perf_counter()
    reference = load_inference_model(str(source.path), threads=threads)
    try:
        candidate = load_inference_model(str(out), threads=threads)
        try:
            quality = compare(reference, candidate, sequences, threshold=threshold)
            quality["export_kind"] = candidate.kind
        finally:
            candidate.close()
    finally:
        reference.close()
    log.info("quality gate: perplexity ratio %.6g (threshold %.6g), max |log-prob "
             "difference| %.4g, %.1f s", quality["perplexity_ratio"], threshold,
             quality["max_abs_logprob_diff"], time.perf_counter() - started)
    return quality
