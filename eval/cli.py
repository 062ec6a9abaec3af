"""`distill-eval` (also `python -m eval`): how much quality a student kept, at what cost.

    distill-eval --model STUDENT --teacher TEACHER --baseline BASE \\
                 --tasks medical,local --ppl-data heldout.jsonl --out reports/run1

Models are aliases from logitstore/toolkit/models.yaml, local directories or hub ids. `--tasks`
takes `medical` (MultiMedQA via lm-eval), `local` (the sets shipped in eval/tasks/),
task names, or paths to lm-eval task YAMLs / JSONL files (see eval/tasks.py).

Writes REPORT_DIR/report.json, report.md, report.png and config.yaml (every option as
resolved). report.json:

    models[ROLE]                 what was loaded (hub id, revision, commit, dtype, quantization)
    tasks[TASK]                  status ok/skipped, source, output type, documents per role
    skipped[]                    {task, role (null = every role), reason}
    results[ROLE][TASK][METRIC]  ROLE: teacher/student/baseline; TASK: a task name,
                                 "ppl/<file stem>", "ppl/store" or "efficiency"
    stderr[ROLE][TASK][METRIC]   lm-eval's standard errors
    comparison[]                 {task, metric, higher_is_better, teacher, student, baseline,
                                  retention, gap_closed}  (see eval/report.py)
    ratios                       compression, memory and speed-up, teacher vs student
    efficiency_notes, environment, config

Exit status 0 on success; 1 with a one-paragraph reason (no traceback) for a wrong
option, model, task file or store; 130 when interrupted. Tasks whose data cannot be
reached (no internet, not cached) are skipped and named in the report, not an error.
"""

from __future__ import annotations

import logging
import sys

import click

from logitstore.toolkit.hf import DTYPE_CHOICES

_QUANTIZE = click.Choice(["auto", "4bit", "8bit", "none"])


@click.command(name="distill-eval", context_settings={"help_option_names": ["-h", "--help"],
                                                      "max_content_width": 100})
@click.option("--model", required=True,
              help="Student: alias from logitstore/toolkit/models.yaml, local directory or hub id.")
@click.option("--teacher", help="Teacher (same forms as --model).")
@click.option("--baseline", help="Baseline, e.g. the student before distillation.")
@click.option("--tasks", default="medical", show_default=True,
              help="Comma-separated: medical, local, task names, task YAML/JSONL paths.")
@click.option("--out", required=True, help="Report directory (created).")
@click.option("--limit", type=float,
              help="At most this many documents per task (< 1: a fraction of each task).")
@click.option("--num-fewshot", type=int, help="Few-shot examples (default: each task's own).")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--max-new-tokens", type=int, default=64, show_default=True,
              help="Generation tasks: greedy answers of at most this many tokens.")
@click.option("--apply-chat-template", is_flag=True,
              help="Render task prompts with each model's chat template (instruct models).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1...")
@click.option("--quantize", type=_QUANTIZE, default="auto", show_default=True,
              help="bitsandbytes quantization of every model (auto: the alias's setting "
                   "on CUDA, none on CPU).")
@click.option("--teacher-quantize", type=_QUANTIZE, help="Overrides --quantize for the teacher.")
@click.option("--student-quantize", type=_QUANTIZE, help="Overrides --quantize for the student.")
@click.option("--baseline-quantize", type=_QUANTIZE, help="Overrides --quantize for the baseline.")
@click.option("--dtype", type=click.Choice(list(DTYPE_CHOICES)), default="auto",
              show_default=True)
@click.option("--ppl-data", type=click.Path(dir_okay=False),
              help="Held-out text for perplexity/next-token accuracy: .jsonl (text, or "
                   "prompt+reference) or plain text (paragraphs).")
@click.option("--ppl-store", help="Store URL: perplexity on its eval split (its loss mask).")
@click.option("--ppl-split", default="auto", show_default=True,
              help="Store split for --ppl-store (auto: eval, validation, valid, val, dev, test).")
@click.option("--ppl-max-length", type=int, default=512, show_default=True,
              help="Tokens per perplexity sequence (longer ones are cut).")
@click.option("--ppl-limit", type=int, help="At most this many perplexity sequences per source.")
@click.option("--efficiency/--no-efficiency", default=True, show_default=True,
              help="Measure size, peak memory and speed.")
@click.option("--efficiency-prompts", type=click.Path(dir_okay=False),
              help="JSONL with `prompt` for the speed benchmark (default: the shipped "
                   "medgen_mini prompts).")
@click.option("--efficiency-samples", type=int, default=8, show_default=True,
              help="Prompts in the speed benchmark.")
@click.option("--efficiency-repeats", type=int, default=3, show_default=True,
              help="Timed repetitions over the prompts.")
@click.option("--efficiency-new-tokens", type=int, default=32, show_default=True,
              help="Tokens generated per prompt in the speed benchmark.")
@click.option("--warmup", type=int, default=1, show_default=True,
              help="Discarded warm-up runs before timing.")
@click.option("--network", type=click.Choice(["auto", "online", "offline"]), default="auto",
              show_default=True,
              help="Hub access for task data (auto: offline when HF_HUB_OFFLINE/"
                   "HF_DATASETS_OFFLINE say so or the hub is unreachable).")
@click.option("--task-timeout", type=float, default=300.0, show_default=True,
              help="Seconds to wait for one hub task's data before skipping it.")
@click.option("--trust-remote-code", is_flag=True,
              help="Run model repositories' own code (only for models you trust).")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@click.option("-v", "--verbose", is_flag=True, help="Log at DEBUG level (libraries included).")
def distill_eval(no_progress: bool, verbose: bool, **options) -> None:
    """Compare a distilled student with its teacher and a baseline: quality kept, cost saved."""
    _setup_logging(verbose)
    if no_progress:
        import os

        os.environ["TQDM_DISABLE"] = "1"  # lm-eval's and datasets' bars too
    from logitstore.errors import LogitStoreError

    from eval.runner import EvalConfig, run

    if options["limit"] is not None and float(options["limit"]).is_integer():
        options["limit"] = int(options["limit"])  # lm-eval: int = count, float < 1 = share
    cfg = EvalConfig(**options, progress=not no_progress)
    try:
        report, paths = run(cfg)
    except LogitStoreError as exc:  # ConfigError, ModelLoadError, store errors
        _fail(str(exc))
    except OSError as exc:  # e.g. the report directory is not writable
        _fail(f"{type(exc).__name__}: {exc}")
    except KeyboardInterrupt:
        click.echo("distill-eval: interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # a bug or an unexpected library failure: still one paragraph
        if verbose:
            raise
        _fail(f"unexpected {type(exc).__name__}: {' '.join(str(exc).split())[:500]} "
              "(rerun with -v for the traceback)")
    click.echo(_summary(report, paths))


def _fail(message: str) -> None:
    click.echo(f"distill-eval: error: {message}", err=True)
    sys.exit(1)


def _summary(report: dict, paths: dict) -> str:
    lines = [f"report: {paths['report.md']}"]
    ok = [t for t, e in report["tasks"].items() if e["status"] == "ok"]
    lines.append(f"tasks run: {', '.join(ok) or 'none'}")
    for skip in report["skipped"]:
        role = f" ({skip['role']})" if skip.get("role") else ""
        lines.append(f"skipped {skip['task']}{role}: {skip['reason'][:160]}")
    for name, value in report["ratios"].items():
        if value is not None:
            lines.append(f"{name}: {value:.3g}")
    return "\n".join(lines)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if verbose:
        return
    # lm-eval/transformers/datasets chatter (per-task config dumps, "pretrained is not a
    # string" for the pre-loaded models we pass on purpose, HTTP logs) stays out.
    for noisy in ("lm_eval", "transformers", "datasets", "httpx", "urllib3", "fsspec",
                  "filelock", "huggingface_hub", "accelerate", "absl"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> None:
    distill_eval.main(args=argv, prog_name="distill-eval")
