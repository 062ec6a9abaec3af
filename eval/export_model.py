"""distill-eval roles that are student-export directories (ONNX or PyTorch, fp32 or INT8).

Any role (--model, --teacher, --baseline) may name an export directory (one with
export.json). It is loaded with `load_inference_model`, the loader distill-serve uses, so
the report measures exactly what would be served: tasks through eval/export_lm.py's ExportLM,
perplexity through `InferenceModel.logits`, speed through `InferenceModel.generate`
(eval/efficiency.py). Exports run on the CPU at the precision they were exported with:
--quantize, --dtype and --device do not apply to them.

Sizes of an export:
- `parameters`: of the architecture in its config.json (counted on the meta device, so the
  same figure as the source model's, whatever the weights' storage);
- `disk_bytes` and `weights_bytes`: the export's weight files (model.onnx and its external
  data, or the safetensors); the runtime maps them as stored, so they are the weights'
  memory too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from logitstore.errors import ConfigError
from logitstore.toolkit.inference import EXPORT_MANIFEST, model_directory, read_export_manifest

# Files of an export that hold weights (the rest: tokenizer, configs, export.json).
EXPORT_WEIGHT_SUFFIXES = (".onnx", ".data", ".onnx_data", ".safetensors", ".bin", ".pt")


def export_directory(spec) -> Path | None:
    """The export directory a resolved ModelSpec points at (it or its final/), else None."""
    if not spec.is_local:
        return None
    directory = model_directory(spec.path_or_id)
    if directory is not None and (directory / EXPORT_MANIFEST).is_file():
        return directory
    return None


def check_export(directory: Path, role: str, role_quantize: str | None) -> dict[str, Any]:
    """The export's manifest, read and checked before any model loads (LogitStoreError
    when unreadable; ConfigError when a quantization is asked for this role)."""
    manifest = read_export_manifest(directory)
    if role_quantize not in (None, "auto", "none"):
        raise ConfigError([
            f"--{role}-quantize {role_quantize}: the {role} is an export ({directory}, "
            f"quantize {manifest.get('quantize')!r} at export time), which runs as exported; "
            f"drop --{role}-quantize or export it again with student-export --quantize"])
    return manifest


def load_export(directory: Path, name: str) -> tuple[Any, dict[str, Any]]:
    """(InferenceModel, the report's `models[role]` entry) of an export directory."""
    from logitstore.toolkit.inference import load_inference_model

    manifest = read_export_manifest(directory)
    model = load_inference_model(directory)
    source = manifest.get("source") or {}
    info = {
        "name": name, "hub_id": str(directory), "is_local": True, "revision": None,
        "commit_hash": None, "dtype": "float32",
        "quantization": f"{manifest.get('quantize', 'none')} ({manifest['format']} export)",
        "device": "cpu", "attn_implementation": None, "license": None,
        "model_class": model.kind,
        "export": {"format": manifest["format"], "quantize": manifest.get("quantize"),
                   "max_length": manifest.get("max_length"), "source": source,
                   "quality": manifest.get("quality")},
    }
    return model, info


def export_sizes(directory: Path) -> dict[str, int | None]:
    """{"parameters", "weights_bytes", "disk_bytes"} of an export (module docstring)."""
    files = [f for f in directory.rglob("*") if f.is_file() and
             any(f.name.endswith(suffix) for suffix in EXPORT_WEIGHT_SUFFIXES)]
    stored = sum(f.stat().st_size for f in files) if files else None
    return {"parameters": config_parameters(directory), "weights_bytes": stored,
            "disk_bytes": stored}


def config_parameters(directory: Path) -> int | None:
    """Parameters of the causal LM its config.json describes (built on the meta device:
    no memory, no weights read); None when the config cannot be built."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from eval.efficiency import count_parameters

    try:
        config = AutoConfig.from_pretrained(directory)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError):
        return None
    return count_parameters(model)
