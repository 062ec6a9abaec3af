"""student-export configuration: one table (`FIELDS`) for YAML presets and command-line flags.

    cfg = resolve_config(None, {"model": "runs/student", "out": "exports/int8",
                                "format": "onnx", "quantize": "int8"})

Each setting is declared once in `FIELDS` (logitstore.toolkit.options): its flag
(`--max-length`), its key in a preset's `export:` section (`max_length:`) and its attribute
of `ExportConfig`. MODEL is the command's argument (or `export.model` in the YAML).
Resolution order, later wins: the defaults, the preset's `export:` section, the flags given;
every problem is raised at once as one `ConfigError`. Checks that need the file system
(the model directory, --out, --check-data) are done by student_export/export.py
(`input_problems`, passed as `check`) before anything is loaded.

`ExportConfig.as_dict()` is saved as the export's `export_config.yaml` and export.json's
`settings`.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

from logitstore.errors import ConfigError
from logitstore.toolkit.options import (Field, at_least, config_class, make_config,
                                        resolve_fields)

SECTION = "export"
FORMATS = ("onnx", "torch")
QUANTIZE = ("none", "int8")
# The gate's default threshold per --quantize: fp32 exports must match the source almost
# exactly (only operator order differs); int8 may cost up to 2% perplexity (issue 16).
DEFAULT_MAX_PPL_RATIO = {"none": 1.001, "int8": 1.02}
CONFIG_FILE = "export_config.yaml"

FIELDS: dict[str, Field] = {
    "model": Field("optional_str", None, yaml_only="the MODEL argument on the command line",
                   help="A student-train run directory, its final/, any Hugging Face model "
                        "directory, an alias or a hub id."),
    "out": Field("optional_str", None,
                 help="Export directory: created; an existing one must be empty (or a "
                      "previous export, with --overwrite)."),
    "format": Field("str", "onnx", choices=FORMATS,
                    help="onnx: model.onnx with a KV cache, run by onnxruntime; torch: "
                         "safetensors for PyTorch."),
    "quantize": Field("str", "none", choices=QUANTIZE,
                      help="int8: onnxruntime dynamic quantization (onnx) or torchao int8 "
                           "weights with dynamic int8 activations (torch)."),
    "max_length": Field("optional_int", None, at_least(1),
                        help="Positions the export serves, prompt + new tokens (default: "
                             "the model's max_position_embeddings, at most 2048)."),
    "opset": Field("optional_int", None, at_least(14),
                   help="ONNX opset (default: the exporter's)."),
    "check_data": Field("optional_str", None,
                        help="Held-out text for the quality gate: .jsonl (text, or prompt + "
                             "reference), a text file (paragraphs), or a store URL (its eval "
                             "split). Default: the run's store eval split if it records one, "
                             "else the bundled medgen_mini texts."),
    "check_limit": Field("int", 64, at_least(1),
                         help="At most this many held-out sequences in the quality gate."),
    "check_length": Field("int", 256, at_least(2),
                          help="Tokens per held-out sequence (longer ones are cut; never "
                               "more than --max-length)."),
    "max_ppl_ratio": Field("optional_float", None, at_least(1.0),
                           help="The gate fails when export perplexity / source perplexity "
                                "exceeds this (default: 1.02 for int8, 1.001 for none)."),
    "threads": Field("optional_int", None, at_least(1),
                     help="CPU threads for the quality gate (default: torch's and "
                          "onnxruntime's own)."),
    "overwrite": Field("bool", False,
                       help="Replace a previous export in --out (a directory holding "
                            "export.json); any other non-empty directory is refused."),
}


def _ppl_threshold(self) -> float:
    """--max-ppl-ratio, else the default of this --quantize."""
    if self.max_ppl_ratio is not None:
        return self.max_ppl_ratio
    return DEFAULT_MAX_PPL_RATIO.get(self.quantize, DEFAULT_MAX_PPL_RATIO["none"])


ExportConfig = config_class(
    "ExportConfig", FIELDS, module=__name__, methods={"ppl_threshold": _ppl_threshold},
    doc="A resolved student-export config: one attribute per FIELDS entry; "
        "`ppl_threshold()` is the quality gate's perplexity-ratio limit.")


def resolve_config(preset: str | Path | None = None,
                   overrides: dict[str, Any] | None = None, *,
                   check: Callable[[Any], list[str]] | None = None) -> ExportConfig:
    """defaults <- preset `export:` section <- overrides (None values = not given); validated.

    `preset` is a YAML path or a bundled preset's name. `check(values)` (values: the
    resolved settings as attributes) adds the problems of the file system (export.py's
    `input_problems`), so that one run reports those and the option problems together.
    """
    resolved, _, problems = resolve_fields(FIELDS, SECTION, preset, overrides)
    if not resolved["model"]:
        problems.append("MODEL is required: a student-train run directory, a model directory, "
                        "an alias or a hub id (the command's argument, or export.model in the "
                        "config file)")
    if not resolved["out"]:
        problems.append("out is required: the export directory to write (--out DIR or "
                        "export.out in the config file)")
    if check is not None:
        problems += check(SimpleNamespace(**resolved))
    if problems:
        raise ConfigError(problems)
    return make_config(ExportConfig, resolved)


def save_config(cfg: ExportConfig, path: str | Path) -> None:
    """Write the resolved config as a preset (first line names the command)."""
    import yaml

    path = Path(path)
    body = yaml.safe_dump({SECTION: cfg.as_dict()}, sort_keys=False)
    path.write_text(f"# student-export --config {path.name}  (resolved config of this "
                    f"export)\n{body}", encoding="utf-8")
