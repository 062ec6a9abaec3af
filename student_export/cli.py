"""`student-export` (also `python -m student_export`): a trained student, ready to deploy.

    student-export runs/student --out exports/student-int8 --format onnx --quantize int8
    student-export runs/student/final --out exports/student-torch --format torch
    student-export llama3.2-1b --out exports/base --check-data heldout.jsonl

MODEL is a student-train run directory (its final/ is exported), a model directory, an
alias (logitstore/toolkit/models.yaml) or a hub id. The export directory holds export.json
(format, settings, the source's weights sha256 and the quality gate's figures), the
tokenizer, config.json, generation_config.json, export_config.yaml (every option as
resolved, itself a valid --config) and the weights: model.onnx (+ model.onnx.data) or
model.safetensors. `logitstore.toolkit.inference.load_inference_model(DIR)` loads it;
`distill-serve DIR` serves it.

The quality gate compares the export's next-token log-probs with the source model's on
held-out text (student_export/quality_gate.py); the export fails when its perplexity is more
than --max-ppl-ratio times the source's (default 1.02 for int8, 1.001 for none).

Every option is a key of a preset's `export:` section too (student_export/config.py's FIELDS);
a flag given overrides `--config`.

The export is written into a staging directory (OUT.tmp-XXXXXXXX beside a missing OUT,
OUT/.tmp-XXXXXXXX inside an existing one, which is never renamed: a mount point works) and
swapped in once it is complete, so a failed or interrupted export, --overwrite or not, leaves
a previous export as it was (student_export/staging.py).

Exit status (logitstore/exit_codes.py): 0 on success; 1 with a one-paragraph reason for a
wrong option, model, output directory or held-out data (nothing written), or a failed
quality gate (into a new or empty OUT the files are kept, export.json says "passed": false;
over a previous export they are removed and the previous one kept); 2 for a usage error
(unknown flag); 130 when interrupted (OUT untouched).
"""

from __future__ import annotations

import logging

import click

from logitstore import exit_codes
from logitstore.toolkit.options import tool_command, verbose_option
from student_export.config import FIELDS, SECTION

PROG = "student-export"
# Libraries whose INFO/WARNING chatter (progress of loading, torchao's optional CUDA
# kernels that cannot load on a CPU machine, exporter internals) hides our own log.
_NOISY = ("transformers", "torchao", "torch", "onnxscript", "onnx_ir", "onnxruntime",
          "huggingface_hub", "httpx", "urllib3", "filelock")


@tool_command(PROG, FIELDS, SECTION, preset_example="tiny-cpu")
@verbose_option(" (libraries included; an unexpected error shows its traceback)")
@click.argument("model", required=False)
def student_export(config_path: str | None, verbose: bool, model: str | None, **flags) -> None:
    """Export a trained student (ONNX or PyTorch, fp32 or int8) and check its quality."""
    _setup_logging(verbose)
    from student_export.config import resolve_config
    from student_export.export import input_problems, run_export

    with exit_codes.errors_reported(PROG, verbose=verbose):  # a failed gate is one too
        cfg = resolve_config(config_path, {**flags, "model": model}, check=input_problems)
        manifest, out = run_export(cfg)
    click.echo(_summary(manifest, out))


def _summary(manifest: dict, out) -> str:
    quality = manifest["quality"]
    return (f"exported {manifest['source']['path']} to {out} ({manifest['format']}, "
            f"quantize {manifest['quantize']}, max_length {manifest['max_length']})\n"
            f"quality gate passed: perplexity ratio {quality['perplexity_ratio']:.6g} <= "
            f"{quality['threshold']:.6g} (perplexity {quality['export_perplexity']:.5g} vs "
            f"{quality['source_perplexity']:.5g}, max |log-prob difference| "
            f"{quality['max_abs_logprob_diff']:.3g}, top-1 agreement "
            f"{quality['top1_agreement']:.3f}, {quality['tokens']} tokens)")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if verbose:
        return
    for noisy in _NOISY:
        logging.getLogger(noisy).setLevel(logging.ERROR)
    # onnxruntime's quantizer logs on the root logger itself (a line per node, and a
    # "consider pre-processing" warning), past the levels above; our modules never do.
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _NotFromRootLogger) for f in handler.filters):
            handler.addFilter(_NotFromRootLogger())
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


class _NotFromRootLogger(logging.Filter):
    """Drops records logged on the root logger itself (`logging.info(...)` in a library)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name != "root"


def main(argv: list[str] | None = None) -> None:
    student_export.main(args=argv, prog_name=PROG)
