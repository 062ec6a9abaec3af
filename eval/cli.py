"""`distill-eval` (also `python -m eval`): how much quality a student kept, at what cost.

    distill-eval --model STUDENT --teacher TEACHER --baseline BASE \\
                 --tasks medical,local --ppl-data heldout.jsonl --out reports/run1

Models are aliases from logitstore/toolkit/models.yaml, local directories, hub ids or
`student-export` directories (ONNX or PyTorch, fp32 or INT8: run as exported, on the CPU;
eval/export_model.py). To see the INT8 student beside the fp32 one and the teacher:
`--model EXPORT_DIR --baseline RUN/final --teacher TEACHER` (the baseline role then holds the
fp32 student; "student − baseline" is the export's loss). `--tasks`
takes `medical` (MultiMedQA via lm-eval), `local` (the sets shipped in
logitstore/toolkit/tasks/), task names, or paths to lm-eval task YAMLs / JSONL files (see
eval/tasks.py).

Writes REPORT_DIR/report.json, report.md, report.png and config.yaml (every option as
resolved). report.json:

    models[ROLE]                 what was loaded (hub id, revision, commit, dtype, quantization,
                                 tokenizer_fingerprint: null when it cannot be taken)
    tasks[TASK]                  status ok/skipped, source, output type, documents per role
    skipped[]                    {task, role (null = every role), reason}
    results[ROLE][TASK][METRIC]  ROLE: teacher/student/baseline; TASK: a task name,
                                 "ppl/<file stem>", "ppl/store" or "efficiency"; a ppl/<file>
                                 task also has bits_per_byte and bytes (eval/perplexity.py)
    stderr[ROLE][TASK][METRIC]   lm-eval's standard errors
    comparison[]                 {task, metric, higher_is_better, teacher, student, baseline,
                                  retention, gap_closed}  (see eval/report.py), and on
                                  quality rows: stderr{ROLE} (from per-item scores, else
                                  lm-eval's), student_vs_baseline and teacher_vs_baseline
                                  {difference, stderr, items, paired, resolved, better}
                                  (null where not computable); gap_closed_reason: why
                                  gap_closed is null (null when it is given); tokenizer_note:
                                  why a per-token metric is not compared between roles of
                                  different tokenizers (eval/tokenizer_units.py)
    findings[]                   sentences: which student-baseline differences are resolved
                                 (> 2 standard errors)
    uncertainty                  how the standard errors were computed (eval/uncertainty.py)
    ratios                       compression, memory and speed-up, teacher vs student
    efficiency_notes, environment, config

`--task classify` compares image and/or text classifiers instead (eval/classify_runner.py):

    distill-eval --task classify --model RUN/final --teacher TEACHER --baseline BASE \\
                 --data test.jsonl --out reports/cls        # or --store S --split test

per head accuracy, macro-F1, ECE and NLL with standard errors for each role, the mean
macro-F1, and paired differences student − baseline and student − teacher
(eval/classify_report.py documents its report.json). Settings of the other task are refused.

Every option is a key of a preset's `eval:` section too: the flags are generated from
eval/config.py's FIELDS, and a flag given overrides `--config` (a path or a bundled preset's
name, e.g. `--config med42-to-llama3.2-1b` names the teacher, the baseline and the tasks).

Exit status (logitstore/exit_codes.py): 0 on success; 1 with a one-paragraph reason (no
traceback) for a wrong option, model, task file or store; 2 for a usage error (unknown
flag); 130 when interrupted. Tasks whose data cannot be reached (no internet, not cached)
are skipped and named in the report, not an error.
"""

from __future__ import annotations

import logging

import click

from eval.config import FIELDS, SECTION
from logitstore import exit_codes
from logitstore.toolkit.options import tool_command, verbose_option

PROG = "distill-eval"


@tool_command(PROG, FIELDS, SECTION, preset_example="med42-to-llama3.2-1b")
@verbose_option(" (libraries included; an unexpected error shows its traceback)")
def distill_eval(config_path: str | None, verbose: bool, **flags) -> None:
    """Compare a distilled student with its teacher and a baseline: quality kept, cost saved."""
    _setup_logging(verbose)
    from eval.config import resolve_config

    with exit_codes.errors_reported(PROG, verbose=verbose):
        cfg = resolve_config(config_path, flags)
        if not cfg.progress:
            import os

            os.environ["TQDM_DISABLE"] = "1"  # lm-eval's and datasets' bars too
        if cfg.task == "classify":
            from eval.classify_runner import run_classify

            report, paths = run_classify(cfg)
            click.echo(_classify_summary(report, paths))
            return
        from eval.runner import run

        report, paths = run(cfg)
    click.echo(_summary(report, paths))


def _classify_summary(report: dict, paths: dict) -> str:
    data = report["data"]
    lines = [f"report: {paths['report.md']}",
             f"samples: {data['samples']} scored, {data['records_skipped']} records skipped"]
    for role, result in report["results"].items():
        value = result["mean_macro_f1"]
        lines.append(f"{role}: mean macro-F1 {'–' if value is None else f'{value:.4f}'}")
    lines += report["findings"]
    return "\n".join(lines)


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
    distill_eval.main(args=argv, prog_name=PROG)
