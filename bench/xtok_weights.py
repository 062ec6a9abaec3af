"""Two-teacher weights for bench/cross_tokenizer_bench.py chosen WITHOUT the held-out text.

    python bench/xtok_weights.py --store bench/out/xtok/stores/store-AB \
        --student-config bench/out/cache/xtok/student-small-C-<key> --preset bench/out/xtok/train.yaml \
        --weights 0.5,0.7,0.85,0.3 --seeds 2 --out bench/results/xtok_weights.json

For each weight w of teacher A (teacher B gets 1 - w) and each seed, one real `student-train`
run of student C on store AB (`--signals topk32:w,topk32-B:1-w --cross-loss pkl`, the bench's
preset, 2 epochs) with `--eval-fraction 0.1`: a tenth of the transfer set's samples held out
of training, the validation split. The criterion is that split's eval/ce (student C's CE per
token on its own tokens: comparable across weights, which share the student and tokenizer).
The student's initial weights are drawn per seed (torch.manual_seed(seed), from the student
config) and shared by every weight. The weight with the lowest mean eval/ce over the seeds is
`best`; the JSON keeps every run, the per-weight means and the spread between seeds, so a
choice within the seed noise shows as such. Then
`cross_tokenizer_bench.py --two-teacher-weights best,1-best` trains the two-teacher student.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def initial_student(config_dir: Path, seed: int, out: Path) -> Path:
    """Student C drawn under torch.manual_seed(seed) from `config_dir`, saved with its
    tokenizer (student-train loads weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not (out / "config.json").exists():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir))
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(config_dir).save_pretrained(out)
    return out


def final_eval_ce(run: Path) -> float:
    """The last eval/ce of a student-train run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    values = [r["eval/ce"] for r in rows if "eval/ce" in r]
    if not values:
        raise SystemExit(f"{run}: no eval/ce in metrics.jsonl (see {run}.log)")
    return values[-1]


def train(args, weight: float, seed: int, student: Path) -> dict:
    out = args.work / f"run-{weight:g}-{seed}"
    signals = f"{args.signal_a}:{weight:g},{args.signal_b}:{1 - weight:.6g}"
    command = [sys.executable, "-m", "student_train", "--config", str(args.preset),
               "--store", str(args.store), "--student", str(student), "--signals", signals,
               "--cross-loss", "pkl", "--target", "topk", "--eval-fraction", "0.1",
               "--eval-every", "0", "--epochs", "2", "--seed", str(seed),
               "--cache-dir", str(args.work / "cache"), "--out", str(out)]
    started = time.perf_counter()
    if not (out / "final" / "config.json").exists():
        with open(f"{out}.log", "w", encoding="utf-8") as log:
            subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=True)
    ce = final_eval_ce(out)
    print(f"A:{weight:g} B:{1 - weight:.6g} seed {seed}: eval/ce {ce:.4f}", flush=True)
    return {"weight_a": weight, "seed": seed, "eval_ce": ce, "signals": signals,
            "seconds": round(time.perf_counter() - started, 1),
            "command": " ".join(["python", *command[1:]])}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", type=Path, required=True, help="store AB of the bench")
    p.add_argument("--student-config", type=Path, required=True,
                   help="student C's directory (config and tokenizer) in the bench cache")
    p.add_argument("--preset", type=Path, required=True, help="the bench's train.yaml")
    p.add_argument("--weights", default="0.5,0.7,0.85,0.3", help="teacher A's weights")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--signal-a", default="topk32")
    p.add_argument("--signal-b", default="topk32-B")
    p.add_argument("--work", type=Path, default=REPO / "bench" / "out" / "xtok_weights")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    weights = [float(w) for w in args.weights.split(",")]
    if not all(0 < w < 1 for w in weights):
        p.error(f"--weights: teacher A's weights must lie in (0, 1), found {args.weights!r}")
    args.work.mkdir(parents=True, exist_ok=True)
    students = {s: initial_student(args.student_config, s, args.work / f"init-{s}")
                for s in range(args.seeds)}
    runs = [train(args, w, s, students[s]) for w in weights for s in range(args.seeds)]
    per_weight = {f"{w:g}": [r["eval_ce"] for r in runs if r["weight_a"] == w] for w in weights}
    means = {w: statistics.fmean(v) for w, v in per_weight.items()}
    best = min(means, key=means.get)
    seed_spread = statistics.fmean(max(v) - min(v) for v in per_weight.values())
    result = {"command": " ".join(["python", "bench/xtok_weights.py", *(argv or sys.argv[1:])]),
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "runs": runs,
              "mean_eval_ce": means, "best_weight_a": float(best),
              "mean_seed_spread": seed_spread,
              "within_noise": max(means.values()) - min(means.values()) < seed_spread}
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"best A:{best} (mean eval/ce {means[best]:.4f}); means {means}; seeds differ by "
          f"{seed_spread:.3f} on average" + (" (the choice is within that noise)"
                                             if result["within_noise"] else ""))
    return result


if __name__ == "__main__":
    main()
