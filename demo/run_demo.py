#!/usr/bin/env python3
"""`make demo`: the whole logitstore pipeline on the bundled medical corpus, on a CPU.

    python demo/run_demo.py --out demo_out [--scale default|tiny] [--subprocess] [-v]

Stages, each one a call of the real command-line tool (the arguments are printed, and
saved in OUT/commands.sh so any stage can be rerun by hand):

  corpus     demo/make_corpus.py -> OUT/corpus/{train,heldout,...}.jsonl, the facts in
             the scored form (transfer.jsonl, drill.jsonl) and the knowledge-base
             multiple-choice eval set OUT/corpus/medmcq_kb.jsonl
  tokenizer  byte-level BPE trained on train.jsonl with `tokenizers` -> OUT/tokenizer;
             transfer, train and drill records grouped, in that order, into documents of
             <= N tokens -> corpus/documents.jsonl,
             its first documents -> corpus/distill.jsonl (the transfer set: a held-in
             split, >= 10x smaller than the teacher's text; sizes in split_sizes.json)
  init       randomly initialised (seeded) Llama teacher and smaller student -> OUT/init/
  teacher    student-train --data documents.jsonl (hard labels) -> OUT/runs/teacher/final
  dump       teacher-dump of distill.jsonl (top-k, sampled, hidden, attention) -> OUT/store
  inspect    logitstore info + logitstore verify -> OUT/inspect/{info,verify}.txt
  student    student-train --store (KD + hidden + attention) -> OUT/runs/student/final
  baseline   student-train --data distill.jsonl, same settings, no teacher
             -> OUT/runs/baseline/final
  eval       distill-eval teacher/student/baseline on the bundled tasks, medmcq_kb and
             the held-out documents -> OUT/report/report.{md,json,png} (values with
             standard errors; which student-baseline differences are resolved)
  serve      student-export of the KD student to INT8 ONNX (quality gate included)
             -> OUT/export; distill-serve on it (a free 127.0.0.1 port), one POST
             /invocations with a knowledge-base question, the answer printed, the server
             stopped with SIGTERM -> OUT/serve/answer.json

Settings come from demo/configs/SCALE.yaml (`demo:`, `dump:` and `train:` sections) and
demo/configs/SCALE-teacher.yaml. Everything is seeded, so a run is reproducible.

Rerunning reuses finished stages: a finished stage writes OUT/.stages/NAME.json with a
key (hash of its settings, its code in this file and the keys of the stages before it);
it is skipped while that key is unchanged, and rerun from scratch (its output removed
first) otherwise, together with every later stage. `--force` reruns everything.

By default the tools run in this process (their click entry points, called with the
printed arguments: one import of torch/transformers instead of eight); `--subprocess`
runs each through its console script instead. Each stage's output goes to OUT/logs/.

This file runs the stages in order and keeps the reuse marks; demo_context.py holds the
settings, paths and the tool runner, demo_prepare.py the first three stages (Python),
demo_stages.py the tool stages and the stage table, demo_summary.py the final summary.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from demo_context import (SCALES, Context, CurrentStderr, DemoError, Runner, load_settings,
                          make_paths, settings_hash, tool_version)
from demo_prepare import python_stage_log
from demo_stages import PYTHON_STAGES, STAGES
from demo_summary import build_summary, render_summary


def run_pipeline(out: Path, scale: str = "default", *, force: bool = False,
                 use_subprocess: bool = False, verbose: bool = False,
                 only: str | None = None) -> dict[str, Any]:
    """Run (or reuse) every stage; returns the summary dict (also OUT/summary.json)."""
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    settings = load_settings(scale)
    _check_settings(settings)
    _setup_environment(settings["demo"].get("threads"))
    ctx = Context(out, settings, Runner(out, use_subprocess, verbose), make_paths(out))
    marks = out / ".stages"
    marks.mkdir(exist_ok=True)
    timings: dict[str, dict[str, Any]] = {}
    commands: list[str] = []  # every stage's, run now or reused
    upstream = settings_hash(scale, tool_version())
    rerun_rest = force
    started = time.perf_counter()
    print(f"logitstore demo, scale {scale!r} -> {out}", flush=True)
    for i, stage in enumerate(STAGES):
        key = settings_hash(upstream, stage.name, stage.inputs(ctx), stage.code())
        upstream = key
        mark = marks / f"{stage.name}.json"
        done = json.loads(mark.read_text()) if mark.is_file() else None
        header = f"[{i}/{len(STAGES) - 1}] {stage.name}: {stage.title}"
        if done and done.get("key") == key and not rerun_rest:
            print(f"{header} -- reused (finished earlier in {done['seconds']:.1f}s)", flush=True)
            timings[stage.name] = {"seconds": done["seconds"],
                                   "cpu_seconds": done.get("cpu_seconds"), "reused": True}
            commands += done.get("commands", [])
            continue
        rerun_rest = True  # everything after a stage that runs is rerun too
        print(header, flush=True)
        mark.unlink(missing_ok=True)
        for name in stage.outputs:  # a rerun starts from scratch: no stale half-written state
            path = ctx.paths[name]
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        t0, cpu0, first = time.perf_counter(), _cpu_seconds(), len(ctx.runner.commands)
        with python_stage_log(ctx, stage.name) if stage.fn in PYTHON_STAGES \
                else contextlib.nullcontext():
            stage.fn(ctx)
        seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
        ran = ctx.runner.commands[first:]
        commands += ran
        mark.write_text(json.dumps({"key": key, "seconds": seconds, "cpu_seconds": cpu,
                                    "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                    "commands": ran}))
        timings[stage.name] = {"seconds": seconds, "cpu_seconds": cpu, "reused": False}
        print(f"    done in {seconds:.1f}s (CPU time {cpu:.1f}s)", flush=True)
        if only == stage.name:
            break
    total = time.perf_counter() - started
    (out / "commands.sh").write_text(
        "#!/bin/sh\n# The demo's stages as shell commands (the tokenizer, documents and model\n"
        "# initialisation are Python inside demo/run_demo.py)\nset -e\n"
        + "\n".join(commands) + "\n", encoding="utf-8")
    summary = build_summary(ctx, timings, total)
    (out / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    text = render_summary(summary)
    (out / "SUMMARY.txt").write_text(text + "\n", encoding="utf-8")
    print(text, flush=True)
    return summary


def _check_settings(settings: dict[str, Any]) -> None:
    """The demo's own consistency rules (each tool checks its own settings)."""
    import yaml

    doc = settings["demo"]["doc_tokens"]
    teacher = yaml.safe_load(settings["teacher_preset"].read_text())["train"]
    lengths = {"dump.max_length": settings["dump"].get("max_length"),
               "train.max_length": settings["train"].get("max_length"),
               f"{settings['teacher_preset'].name} train.max_length": teacher.get("max_length")}
    wrong = [f"{k} = {v}" for k, v in lengths.items() if v != doc]
    if wrong:
        raise DemoError(f"{settings['preset']}: demo.doc_tokens = {doc}, but " + ", ".join(wrong)
                        + ": documents must fit every max_length (the store and the baseline "
                          "then hold the same token sequences)")


def _cpu_seconds() -> float:
    """CPU time of this process and of the tool processes it waited for (all threads)."""
    import resource

    own, children = (resource.getrusage(w) for w in (resource.RUSAGE_SELF,
                                                       resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _setup_environment(threads: int | None) -> None:
    """Offline (nothing here needs the network), quiet tokenizers, logging to the stage log,
    torch's threads. Before torch is imported: OpenMP reads its variables when it starts."""
    # OpenMP threads sleep instead of spinning while they wait: on a machine with other work
    # spinning threads fight for the cores and training can run 3-5x slower; when the cores
    # are free this costs a few percent.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    if threads:  # read by torch when it starts (here, or in the tools' processes)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(threads)
    root = logging.getLogger()
    if not any(getattr(h, "_demo", False) for h in root.handlers):
        handler = logging.StreamHandler(CurrentStderr())
        handler._demo = True  # type: ignore[attr-defined]
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)  # the tools' basicConfig() is then a no-op
        root.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:]))
    ap.add_argument("--out", type=Path, default=Path("demo_out"), help="output directory")
    ap.add_argument("--scale", choices=SCALES, default="default",
                    help="default: the demo (~8 CPU-minutes, < 8 min on 2 cores); tiny: "
                         "test size (< 1 min)")
    ap.add_argument("--force", action="store_true", help="rerun every stage")
    ap.add_argument("--subprocess", action="store_true",
                    help="run each tool through its console script, in its own process")
    ap.add_argument("--only", choices=[s.name for s in STAGES],
                    help="stop after this stage (debugging)")
    ap.add_argument("-v", "--verbose", action="store_true", help="show the tools' output too")
    args = ap.parse_args(argv)
    try:
        run_pipeline(args.out, args.scale, force=args.force, use_subprocess=args.subprocess,
                     verbose=args.verbose, only=args.only)
    except DemoError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("demo: interrupted; rerun the same command to continue after the last finished "
              "stage", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
