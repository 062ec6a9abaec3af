"""Classifier KD from one store: students of an image+text teacher, and what the store saves.

    python bench/classify_bench.py [--seeds 3] [--trials 20] [--samples 3000] [--out DIR]
    python bench/classify_bench.py --quick --out /tmp/cb     # smoke run, about a minute

Steps (issue 17 §5), all under --out (default bench/out/classify):
  1. data: logitstore.toolkit.synthetic_classify.generate(samples, image_size) (labels need
     both modalities; DIR/dataset.json holds the exact Bayes ceilings);
  2. teacher: a ViT + BERT ImageTextClassifier of a few million parameters trained here with
     CE on the train split (bench/classify_teacher.py); its val accuracy / macro-F1 per head;
  3. store: the real `teacher-dump --task classify` of train, val and test (a subprocess),
     then `logitstore verify`;
  4. students (a ViT-tiny + MiniLM-ish composite, classify_teacher.model_configs): CE only,
     +KL, +KL+MSE, +KL+MSE+CRD, and the best of a `student-train sweep` (the real command, a
     subprocess; space: kl/mse/crd weights, temperature, lr) retrained per seed; each method
     and seed has the same init and batches; held-out (test split) macro-F1 per head;
  5. time per trial: the full-KD store trial vs the same trial with the teacher online
     (classify_students.online_teacher), run right after it for each seed.
Outputs: DIR/classify.json, DIR/classify.md, DIR/classify.png (bench/classify_report.py:
goals, paired intervals vs CE only, "–" with the reason where a figure means nothing).
--quick: 120 samples 32x32, tiny models, 1 seed, 3 sweep trials, a few steps.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out" / "classify"
sys.path[:0] = [str(Path(__file__).resolve().parent), str(ROOT)]

FULL = dict(samples=3000, image_size=48, teacher_steps=1500, steps=600, batch_size=32,
            crd_k=256, seeds=3, trials=20)
QUICK = dict(samples=120, image_size=32, teacher_steps=12, steps=6, batch_size=16,
             crd_k=16, seeds=1, trials=3)
STUDENT_LR = 1e-3
TEACHER_LR = 5e-4


def run_tool(argv: list[str], log: Path) -> float:
    """Run a tool of this checkout (`python -c` of its click entry point); its seconds. A
    failure raises with the log's tail."""
    started = time.perf_counter()
    with log.open("w", encoding="utf-8") as handle:
        done = subprocess.run([sys.executable, *argv], cwd=ROOT, stdout=handle,
                              stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        tail = log.read_text(encoding="utf-8")[-3000:]
        raise RuntimeError(f"{shlex.join(argv)} exited {done.returncode}; log {log}:\n{tail}")
    return time.perf_counter() - started


def make_data(work: Path, settings: dict) -> dict:
    from logitstore.toolkit.synthetic_classify import generate

    data = work / "data"
    if not (data / "dataset.json").is_file():
        generate(data, samples=settings["samples"], seed=0, image_size=settings["image_size"])
    return json.loads((data / "dataset.json").read_text(encoding="utf-8"))


def make_teacher(work: Path, settings: dict, configs: dict) -> dict:
    from classify_teacher import tokenizer_dir, train_teacher

    tokenizer = tokenizer_dir(work / "data", work / "tokenizer")
    # A finished teacher of the same settings is reused: a rerun (e.g. after a student-side
    # change) does not pay its training again.
    record = work / "teacher.json"
    dataset = json.loads((work / "data" / "dataset.json").read_text(encoding="utf-8"))
    wanted = {"config": configs["teacher"], "steps": settings["teacher_steps"],
              "batch_size": settings["batch_size"], "lr": TEACHER_LR, "dataset": dataset}
    if record.is_file():
        saved = json.loads(record.read_text(encoding="utf-8"))
        if saved.get("wanted") == wanted and (work / "teacher" / "config.json").is_file():
            return saved["teacher"]
    # the record goes first, so a retraining killed half-way is never taken as finished
    record.unlink(missing_ok=True)
    for stale in ("teacher", "store"):  # the old teacher and its store
        shutil.rmtree(work / stale, ignore_errors=True)
    (work / "dump.json").unlink(missing_ok=True)
    teacher = train_teacher(work / "data", work / "teacher", configs["teacher"], tokenizer,
                            steps=settings["teacher_steps"], batch_size=settings["batch_size"],
                            lr=TEACHER_LR, seed=0)
    record.write_text(json.dumps({"wanted": wanted, "teacher": teacher}, indent=1),
                      encoding="utf-8")
    return teacher


def make_store(work: Path) -> dict:
    """`teacher-dump --task classify` of the three splits, then `logitstore verify`."""
    store = work / "store"
    if (store / "manifest.json").is_file() and (work / "dump.json").is_file():
        # this teacher's finished store (make_teacher removes the store of another teacher)
        run_tool(["-c", "from logitstore.cli import main; main()", "verify", str(store)],
                 work / "verify.log")
        return json.loads((work / "dump.json").read_text(encoding="utf-8"))
    shutil.rmtree(store, ignore_errors=True)  # a dump killed before it was recorded
    data = ",".join(str(work / "data" / f"{s}.jsonl") for s in ("train", "val", "test"))
    seconds = run_tool(["-m", "teacher_dump", "--task", "classify", "--device", "cpu",
                        "--no-progress", "--model", str(work / "teacher"), "--data", data,
                        "--out", str(store)], work / "dump.log")
    run_tool(["-c", "from logitstore.cli import main; main()", "verify", str(store)],
             work / "verify.log")
    dump = {"url": str(store), "seconds": seconds, "verify": "ok"}
    (work / "dump.json").write_text(json.dumps(dump), encoding="utf-8")
    return dump


def student_yaml(work: Path, configs: dict) -> Path:
    import yaml

    settings = {k: v for k, v in configs["student"].items() if k != "heads"}
    path = work / "student.yaml"
    path.write_text(yaml.safe_dump({**settings, "tokenizer": str(work / "tokenizer")}),
                    encoding="utf-8")
    return path


def base_config(work: Path, store: str, settings: dict) -> dict:
    """The student-train settings every student and sweep trial shares."""
    return {"store": store, "student": str(work / "student.yaml"),
            "batch_size": settings["batch_size"], "max_steps": settings["steps"],
            "lr": STUDENT_LR, "warmup_ratio": 0.05,
            # 4 evaluations per trial: the sweep's median pruner gets something to compare
            "eval_every": max(1, settings["steps"] // 4),
            "log_every": max(1, settings["steps"] // 10), "crd_k": settings["crd_k"],
            "temperature": 2.0, "eval_split": "val"}


def run_sweep(work: Path, base: dict, settings: dict, quick: bool) -> dict:
    """`student-train sweep` over the space of classify_students.sweep_space; the best
    trial's swept values and the study's seconds."""
    import yaml

    from classify_students import SWEEP_KEYS, sweep_space

    space = work / "space.yaml"
    space.write_text(yaml.safe_dump(sweep_space(quick)), encoding="utf-8")
    flags = []
    for key, value in {**base, "task": "classify", "save_every": 0}.items():
        flags += [f"--{key.replace('_', '-')}", str(value)]
    seconds = run_tool(["-m", "student_train", "sweep", "--space", str(space), "--trials",
                        str(settings["trials"]), "--out", str(work / "sweep"), "--metric",
                        "eval_macro_f1", "--direction", "maximize", *flags], work / "sweep.log")
    best = yaml.safe_load((work / "sweep" / "best.yaml").read_text(encoding="utf-8"))["train"]
    with (work / "sweep" / "trials.csv").open(encoding="utf-8") as handle:
        durations = [float(row["duration_s"]) for row in csv.DictReader(handle)
                     if row["duration_s"]]
    return {"trials": settings["trials"], "seconds": seconds, "trial_seconds": durations,
            "best": {k: float(best[k]) for k in SWEEP_KEYS}}


def run_students(work: Path, base: dict, seeds: list[int], sweep_best: dict) -> tuple:
    """Every method for every seed; the online-teacher trial right after each seed's full-KD
    store trial. Returns (students {method: [run per seed]}, timing {store, online})."""
    from classify_students import FULL_KD, METHODS, train_student

    methods = {**METHODS, "sweep_best": {"ce_weight": 1.0, **sweep_best}}
    students: dict[str, list] = {name: [] for name in methods}
    timing: dict[str, list] = {"store": [], "online": []}
    for seed in seeds:
        for name, weights in methods.items():
            run = train_student(base, weights, work / "students" / f"{name}-s{seed}", seed)
            students[name].append(run)
            print(f"seed {seed} {name}: test macro-F1 {run['test']['mean_macro_f1']:.3f} "
                  f"({run['seconds']:.1f} s)", flush=True)
            if name == FULL_KD:
                online = train_student(base, weights, work / "online" / f"s{seed}", seed,
                                       teacher_dir=work / "teacher")
                timing["store"].append({"seed": seed, "seconds": run["seconds"]})
                timing["online"].append({"seed": seed, "seconds": online["seconds"]})
                print(f"seed {seed} online trial: {online['seconds']:.1f} s", flush=True)
    return students, timing


def student_parameters(configs: dict) -> int:
    from logitstore.toolkit.classifier_models import (ImageTextClassifier,
                                                      ImageTextClassifierConfig)

    model = ImageTextClassifier(ImageTextClassifierConfig(**configs["student"]))
    return sum(p.numel() for p in model.parameters())


def write_outputs(result: dict, out: Path) -> None:
    from classify_report import plot, render

    out.mkdir(parents=True, exist_ok=True)
    (out / "classify.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    (out / "classify.md").write_text(render(result), encoding="utf-8")
    plot(result, out / "classify.png")


def run_benchmark(args, command: str) -> dict:
    from classify_report import summarise
    from classify_teacher import model_configs

    settings = {**(QUICK if args.quick else FULL), "quick": args.quick}
    for key in ("seeds", "trials", "samples", "steps", "teacher_steps"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    work = args.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    configs = model_configs(settings["image_size"], args.quick)
    dataset = make_data(work, settings)
    teacher = make_teacher(work, settings, configs)
    print(f"teacher: val mean macro-F1 {teacher['val']['mean_macro_f1']:.3f}", flush=True)
    dump = make_store(work)
    student_yaml(work, configs)
    base = base_config(work, dump["url"], settings)
    sweep = run_sweep(work, base, settings, args.quick)
    students, timing = run_students(work, base, list(range(settings["seeds"])), sweep["best"])
    result = {"command": command, "settings": settings, "machine": {
                  "platform": platform.platform(), "cpus": os.cpu_count()},
              "dataset": dataset, "configs": configs, "teacher": teacher,
              "student_parameters": student_parameters(configs), "dump": dump,
              "sweep": sweep, "students": students, "timing": timing}
    result["summary"] = summarise(result)
    write_outputs(result, args.out)
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("--quick", action="store_true", help="the smoke run (tiny everything)")
    p.add_argument("--seeds", type=int, help="student seeds (default 3; quick 1)")
    p.add_argument("--trials", type=int, help="sweep trials (default 20; quick 3)")
    p.add_argument("--samples", type=int, help="synthetic samples (default 3000; quick 120)")
    p.add_argument("--steps", type=int, help="student steps (default 600; quick 6)")
    p.add_argument("--teacher-steps", type=int, help="teacher CE steps (default 1500)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=OUT, help="results and work/ (default %(default)s)")
    p.add_argument("--from-json", type=Path, help="re-render a finished run's JSON, no training")
    args = p.parse_args(argv)
    for key in ("seeds", "trials", "samples", "steps", "teacher_steps"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            p.error(f"expected --{key.replace('_', '-')} >= 1, found {getattr(args, key)}")
    return args


def main(argv=None) -> dict:
    # OpenMP's default wait policy, as a user's run has: OMP_WAIT_POLICY=PASSIVE (sleeping
    # workers) made a 0.35M-parameter student's 600-step trial 46 s instead of 26 s (many
    # tiny parallel regions), far more than the teacher's larger ones, and so skewed the ratio.
    args = parse_args(argv)
    if args.from_json:  # the summary is recomputed: the report's code may be newer
        from classify_report import summarise

        result = json.loads(args.from_json.read_text(encoding="utf-8"))
        result["summary"] = summarise(result)
        write_outputs(result, args.out)
        return result
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    command = shlex.join(["python", "bench/classify_bench.py",
                          *(sys.argv[1:] if argv is None else argv)])
    return run_benchmark(args, command)


if __name__ == "__main__":
    main()
