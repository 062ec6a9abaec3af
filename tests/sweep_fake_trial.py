"""A stand-in for student-train in the sweep tests: `python sweep_fake_trial.py CONFIG.yaml`.

Reads the trial's resolved config, then logs an evaluation per step to run/metrics.jsonl
like student-train does (`{"step": s, "eval/loss": v}`), sleeping FAKE_STEP_S between steps,
writes its pid to run/pid and run/training_metadata.json with final_metrics. The metric is
(lr - 0.003)^2 * 1e5 + alpha + 1/step, except in trial 001 (the run directory
trials/001/run), whose metric is 100 at every step: far worse, for the pruning test.
Exits 130 on SIGINT, like student-train.
"""

import json
import os
import sys
import time
from pathlib import Path

import yaml

STEPS = 4


def main() -> None:
    config = yaml.safe_load(Path(sys.argv[-1]).read_text())["train"]
    run = Path(config["out"])
    run.mkdir(parents=True, exist_ok=True)
    (run / "pid").write_text(str(os.getpid()))  # to check that it does not outlive the sweep
    delay = float(os.environ.get("FAKE_STEP_S", "0.05"))
    bad = run.parent.name == "001"
    value = None
    with (run / "metrics.jsonl").open("a") as log:
        for step in range(1, STEPS + 1):
            time.sleep(delay)
            value = 100.0 if bad else (config["lr"] - 0.003) ** 2 * 1e5 + config["alpha"] + 1 / step
            log.write(json.dumps({"step": step, "eval/loss": value}) + "\n")
            log.flush()
    (run / "training_metadata.json").write_text(json.dumps({"final_metrics": {"eval/loss": value}}))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
