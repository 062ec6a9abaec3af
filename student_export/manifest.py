"""export.json: what an export directory holds, where it came from and how good it is.

    {
      "format_version": 1,
      "format": "onnx" | "torch",
      "quantize": "none" | "int8",
      "max_length": N,                  positions the export serves (prompt + new tokens)
      "status": "exporting" | "checking" | "complete" | "failed quality gate",
      "source": {"name": MODEL as given, "path": the model directory read,
                 "run_dir": the student-train run or null, "model_type",
                 "sha256": digest of the weight files (student_export/source.py),
                 "weights": {file: sha256}},
      "files": {file: sha256} of what the export wrote (export.json itself excepted),
      "onnx": {...}                     format onnx: the graph's I/O names, num_layers,
                                        num_kv_heads, head_dim, opset, file (onnx_graph.py),
                                        "quantization": onnxruntime's settings (int8)
      "torch": {...}                    format torch: weights file, "quantization":
                                        torchao's scheme (int8; logitstore.toolkit.torch_int8)
      "quality": the gate's figures, "data" (what it was measured on) and "passed"
                 (null until the gate has run; student_export/quality_gate.py),
      "settings": the resolved student-export config,
      "created": UTC time, "logitstore_version", "versions": {library: version}
    }

It is written first (status "exporting", so a staging directory a crash left is
recognisable as an unfinished export), again before the gate loads the export (the loaders
read it), and last with the gate's result. Each write replaces the file atomically.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from logitstore import __version__
from logitstore.toolkit.inference import EXPORT_FORMAT_VERSION, EXPORT_MANIFEST
from logitstore.toolkit.json_values import nonfinite_to_none

_LIBRARIES = ("torch", "transformers", "onnx", "onnxruntime", "torchao")


def new_manifest(cfg, source, *, max_length: int) -> dict[str, Any]:
    """The manifest of an export that is starting (no files, no quality yet)."""
    return {
        "format_version": EXPORT_FORMAT_VERSION,
        "format": cfg.format,
        "quantize": cfg.quantize,
        "max_length": int(max_length),
        "status": "exporting",
        "source": {"name": source.name, "path": str(source.path),
                   "run_dir": str(source.run_dir) if source.run_dir else None,
                   "model_type": source.model_type, "sha256": None, "weights": {}},
        "files": {},
        cfg.format: {},  # the format's section, filled once the weights are written
        "quality": {"passed": None},
        "settings": cfg.as_dict(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "logitstore_version": __version__,
        "versions": _versions(),
    }


def _versions() -> dict[str, str | None]:
    found = {}
    for name in _LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> Path:
    """Write out_dir/export.json atomically (a reader sees the old or the new file)."""
    path = Path(out_dir) / EXPORT_MANIFEST
    tmp = path.with_name(path.name + ".tmp")
    text = json.dumps(nonfinite_to_none(manifest), indent=2, allow_nan=False)
    tmp.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_manifest(out_dir: Path) -> dict[str, Any] | None:
    """export.json of `out_dir` as a dict, None when it is missing or unreadable."""
    try:
        found = json.loads((Path(out_dir) / EXPORT_MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def file_digests(out_dir: Path) -> dict[str, str]:
    """{relative path: sha256} of every file in the export but export.json."""
    from student_export.source import file_sha256

    out_dir = Path(out_dir)
    return {p.relative_to(out_dir).as_posix(): file_sha256(p)
            for p in sorted(out_dir.rglob("*"))
            if p.is_file() and p.name not in (EXPORT_MANIFEST, EXPORT_MANIFEST + ".tmp")}
