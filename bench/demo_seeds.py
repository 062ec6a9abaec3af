"""Does the demo's KD student beat its baseline on every seed, or on one lucky draw?

`make demo` trains one KD student and one baseline (seed 0) from one teacher and reports
their paired differences. A single pair can mislead: on 2026-12-07's CPU the multiple-choice
gain of seed 0 was −0.011 where an earlier CPU's seed 0 gave +0.203. This benchmark reuses
a finished demo run (its teacher, store, corpus and student initialisation, unchanged) and
trains the KD student and the baseline again for several student seeds (data order,
sampling and which tenth of the transfer set is held out for the run's eval, the same for
a seed's two students; the same initial weights for both), each pair with the demo's own
commands (`student-train`, `distill-eval`; the config of the demo run's scale), then reports
per seed and over seeds the paired student − baseline differences on held-out perplexity and
on the knowledge-base multiple choice.

    .venv/bin/python bench/demo_seeds.py --demo-out demo_out --seeds 5 --out bench/results/demo_seeds.json

Each seed's runs land under `--work/seedN` and are reused when they finished
(`training_metadata.json`, written last) for the same demo run, config and seed
(`pair.json`); a student or baseline trained anew drops the seed's report. A rerun adds
seeds. The per-seed verdict is distill-eval's (resolved = |difference| > 2 paired SE over
the items); over seeds, the mean difference and its 95 % t-interval (bench/fidelity_stats).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fidelity_stats import interval  # noqa: E402
from fidelity import code_version  # noqa: E402
from machine_facts import cpu_facts  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
METRICS = (("ppl/heldout", "perplexity"), ("medmcq_kb", "acc"), ("medmcq_kb", "acc_norm"))


def tool_paths() -> dict[str, str]:
    """{tool: executable}: the console scripts beside this interpreter, else on PATH."""
    found = {}
    for tool in ("student-train", "distill-eval"):
        beside = Path(sys.executable).parent / tool
        found[tool] = str(beside) if beside.is_file() else shutil.which(tool)
    return found


def _run(cmd: list[str], log: Path) -> None:
    """Run one tool, its output to `log`; a failure stops the benchmark with the log's tail."""
    with open(log, "w") as out:
        code = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT)
    if code != 0:
        tail = log.read_text(errors="replace")[-2000:]
        raise SystemExit(f"{cmd[0]} exited {code} (log {log}):\n{tail}")


def _pair(demo: Path, config: Path, seed: int, work: Path, tools: dict[str, str]) -> dict:
    """Train the KD student and the baseline of one seed (reused when finished for the same
    inputs), evaluate both, and return distill-eval's comparison rows of METRICS."""
    run = work / f"seed{seed}"
    run.mkdir(parents=True, exist_ok=True)
    inputs = {"demo_out": str(demo), "config": str(config), "seed": seed}
    stamp = run / "pair.json"
    if stamp.is_file() and json.loads(stamp.read_text()) != inputs:
        raise SystemExit(f"{run} holds the runs of {stamp.read_text().strip()}, not of "
                         f"{json.dumps(inputs)}: give another --work (or delete {run})")
    stamp.write_text(json.dumps(inputs) + "\n")
    common = ["--config", str(config), "--student", str(demo / "init" / "student"),
              "--seed", str(seed)]
    report = run / "report" / "report.json"
    for out, source in ((run / "student", ["--store", str(demo / "store")]),
                        (run / "baseline", ["--data", str(demo / "corpus" / "distill.jsonl"),
                                            "--hidden-weight", "0", "--attention-weight", "0"])):
        if not (out / "training_metadata.json").is_file():  # written when the run finished
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(report.parent, ignore_errors=True)  # its students change
            _run([tools["student-train"], *common, *source, "--out", str(out)],
                 run / f"{out.name}.log")
    student, baseline = run / "student", run / "baseline"
    if not report.is_file():
        _run([tools["distill-eval"], "--config", str(config),
              "--model", str(student / "final"), "--baseline", str(baseline / "final"),
              "--tasks", str(demo / "corpus" / "medmcq_kb.jsonl"),
              "--ppl-data", str(demo / "corpus" / "heldout.jsonl"), "--no-efficiency",
              "--no-progress", "--out", str(run / "report")], run / "eval.log")
    rows = json.loads(report.read_text())["comparison"]
    found = {(r["task"], r["metric"]): r for r in rows}
    return {f"{task}/{metric}": {"student": found[task, metric]["student"],
                                 "baseline": found[task, metric]["baseline"],
                                 **found[task, metric]["student_vs_baseline"]}
            for task, metric in METRICS}


def summarise(per_seed: dict[int, dict]) -> dict:
    """Per metric: the paired differences over seeds, their interval, how many seeds resolve
    a student win and how many a loss."""
    out = {}
    for task, metric in METRICS:
        key = f"{task}/{metric}"
        rows = [per_seed[s][key] for s in sorted(per_seed)]
        lower_better = metric == "perplexity"
        wins = sum(r["resolved"] and (r["difference"] < 0) == lower_better for r in rows)
        losses = sum(r["resolved"] for r in rows) - wins
        out[key] = {"difference": interval([r["difference"] for r in rows]),
                    "seeds": len(rows), "resolved_wins": wins, "resolved_losses": losses,
                    "lower_is_better": lower_better}
    return out


def markdown(per_seed: dict[int, dict], summary: dict) -> str:
    lines = ["| metric | " + " | ".join(f"seed {s}: student / baseline (diff ± SE)"
                                        for s in sorted(per_seed)) + " | over seeds (95 % CI) |",
             "|---|" + "---|" * (len(per_seed) + 1)]
    for key, agg in summary.items():
        cells = []
        for s in sorted(per_seed):
            r = per_seed[s][key]
            mark = ", resolved" if r["resolved"] else ""
            cells.append(f"{r['student']:.3f} / {r['baseline']:.3f} "
                         f"({r['difference']:+.3f} ± {r['stderr']:.3f}{mark})")
        d = agg["difference"]
        ci = "–" if d["low"] is None else f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"
        lines.append(f"| {key} | " + " | ".join(cells) +
                     f" | {ci}; resolved wins {agg['resolved_wins']}/{agg['seeds']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo-out", type=Path, default=ROOT / "demo_out",
                   help="a finished `make demo` run (its teacher, store, corpus, init)")
    p.add_argument("--config", type=Path, help="the students' config (default: the demo "
                   "run's scale, demo/configs/<scale>.yaml)")
    p.add_argument("--seeds", type=int, default=3, help="student seeds 0 .. N-1")
    p.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "demo_seeds")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "demo_seeds.json")
    args = p.parse_args(argv)
    finished = args.demo_out / "summary.json"  # run_demo.py writes it after the last stage
    if not finished.is_file() or args.seeds < 1:
        p.error(f"expected a finished demo run under --demo-out (its summary.json) and "
                f"--seeds >= 1; found {'no ' + str(finished) if not finished.is_file() else 'it'}"
                f" and --seeds {args.seeds}: run `make demo` (or demo/run_demo.py --out DIR) "
                f"first")
    scale = json.loads(finished.read_text()).get("scale", "default")
    args.config = args.config or ROOT / "demo" / "configs" / f"{scale}.yaml"
    tools = tool_paths()
    missing = [str(x) for x in (args.demo_out / "store", args.demo_out / "init" / "student",
                                args.config) if not x.exists()]
    missing += [f"the {t} command" for t, path in tools.items() if path is None]
    if missing:
        p.error(f"expected the demo run's store and initial student, the config and the "
                f"logitstore tools; found missing: {', '.join(missing)} (run it with the "
                f"venv's python, e.g. .venv/bin/python bench/demo_seeds.py)")
    started = time.time()
    per_seed = {}
    for seed in range(args.seeds):
        per_seed[seed] = _pair(args.demo_out.resolve(), args.config.resolve(), seed,
                               args.work.resolve(), tools)
        print(f"seed {seed}: " + ", ".join(f"{k} {v['difference']:+.4f}"
                                          f"{' (resolved)' if v['resolved'] else ''}"
                                          for k, v in per_seed[seed].items()), flush=True)
    summary = summarise(per_seed)
    table = markdown(per_seed, summary)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": "python bench/demo_seeds.py " + " ".join(argv or sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "wall_s": round(time.time() - started, 1), "demo_out": str(args.demo_out),
        "code": code_version(), "machine": cpu_facts(),
        "per_seed": per_seed, "summary": summary, "table": table}, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
