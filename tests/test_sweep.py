"""student-train sweep: the space's checks, the study loop (trials as processes, pruning,
resume after a kill, reports) with a stand-in trainer (sweep_fake_trial.py), and sweeps of
the real student-train on the tiny store of train_helpers."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from click.testing import CliRunner

from logitstore.errors import ConfigError, LogitStoreError
from student_train.cli import main
from student_train.config import FIELDS, resolve_config
import student_train.sweep_cli
from student_train.sweep import BASE_FIELDS, SweepRun, SweepSettings, run_sweep
from student_train.sweep_cli import sweep
from student_train.sweep_space import Dimension, load_space
from train_helpers import shared_world

FAKE_TRIAL = (sys.executable, str(Path(__file__).with_name("sweep_fake_trial.py")))
FAKE_SPACE = "lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}\n" \
             "alpha: {type: float, low: 0, high: 1}\n"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return shared_world(tmp_path_factory)


def fake_settings(tmp_path: Path, world, **overrides) -> SweepSettings:
    """The sweep checks the base config's store before any trial: the tiny world's."""
    space = tmp_path / "space.yaml"
    space.write_text(FAKE_SPACE)
    settings = dict(out=tmp_path / "sweep", space=space, trials=3, pruner="none", poll_s=0.05,
                    base={"store": str(world.store), "student": str(world.student),
                          "eval_fraction": 0.2})
    return SweepSettings(**{**settings, **overrides})


def states(study_dir: Path) -> list[tuple[int, str, str]]:
    with (study_dir / "trials.csv").open() as f:
        return [(int(r["number"]), r["state"], r["note"]) for r in csv.DictReader(f)]


def load_study(settings: SweepSettings):
    return optuna.load_study(study_name=settings.study_name, storage=settings.storage_url)


# ----------------------------------------------------------------------------- the space


def test_every_problem_of_the_space_and_base_is_reported_before_any_trial(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("""
temprature: {type: float, low: 1, high: 2}
lr: {type: float, low: 0, high: 1.0e-2, log: true}
alpha: {type: float, low: 0, high: 2}
batch_tokens: {type: float, low: 128, high: 512}
temperature: {type: float, low: 4, high: 1}
loss: {type: categorical, choices: []}
topk_mode: {type: categorical, choices: [tail, nope]}
out: {type: categorical, choices: [a, b]}
seed: {type: int, low: 0, hihg: 3}
""")
    out = tmp_path / "sweep"
    result = CliRunner().invoke(main, ["sweep", "--space", str(space), "--trials", "3",
                                       "--out", str(out), "--store", "s", "--student", "m"])
    assert result.exit_code == 1, result.output
    text = result.output
    for expected in ("temprature: not a student-train setting (did you mean 'temperature'?)",
                     "lr: low 0 must be > 0, got 0.0",
                     "alpha: high 2 must be in [0, 1]",
                     "batch_tokens: a float range does not fit this int setting; use `type: int`",
                     "temperature: low must be below high, got low 4.0, high 1.0",
                     "loss: categorical needs a non-empty list",
                     "topk_mode: choice 'nope' must be one of tail, renormalised",
                     "out: the sweep sets this itself",
                     "seed: an int distribution takes high, log, low, step, type; unknown: hihg",
                     "metric eval_loss is measured on an eval set"):
        assert expected in text, expected
    assert text.count("\n  - ") == 10  # one paragraph per problem
    assert not out.exists()  # nothing ran, no study was created


def test_sweep_flags_are_student_train_flags_but_out_resume_plan():
    own = {p.name for p in sweep.params} - set(BASE_FIELDS)
    assert own == {"space", "trials", "out", "study_db", "study_name", "jobs", "metric",
                   "direction", "sampler_seed", "pruner", "pruner_startup_trials",
                   "pruner_warmup_steps", "config_path"}
    assert set(FIELDS) - set(BASE_FIELDS) == {"out", "resume", "plan"}


def test_a_valid_space_draws_inside_its_bounds(tmp_path):
    space_file = tmp_path / "space.yaml"
    space_file.write_text("lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n"
                          "batch_tokens: {type: int, low: 128, high: 512, step: 128}\n"
                          "temperature: {type: float, low: 1, high: 3, step: 0.5}\n"
                          "loss: {type: categorical, choices: [kl, rkl]}\n")
    space = load_space(space_file)
    assert space.dimensions[1] == Dimension("batch_tokens", "int", 128, 512, step=128)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(30):
        point = space.suggest(study.ask())
        assert 1e-4 <= point["lr"] <= 1e-2
        assert point["batch_tokens"] in (128, 256, 384, 512)
        assert point["temperature"] in (1, 1.5, 2, 2.5, 3)
        assert point["loss"] in ("kl", "rkl")
        resolve_config(None, {"store": "s", "student": "m", "out": "o", **point})


# ----------------------------------------------------------------------------- the loop


def test_a_far_worse_trial_is_pruned_and_the_reports_are_written(tmp_path, world):
    settings = fake_settings(tmp_path, world, pruner="median", pruner_startup_trials=1)
    best = run_sweep(settings, trial_command=FAKE_TRIAL)
    # The stand-in reports 100 at every step of trial 1, far above trial 0 at step 1.
    assert [s[:2] for s in states(settings.out)] == \
        [(0, "complete"), (1, "pruned"), (2, "complete")]
    study = load_study(settings)
    assert study.trials[1].intermediate_values == {1: 100.0}  # ended at its first report
    assert best.number == study.best_trial.number
    # best.yaml is a preset that reproduces the best trial's config (given an --out).
    trial_dir = settings.out / "trials" / f"{best.number:03d}"
    header = (settings.out / "best.yaml").read_text().splitlines()[:2]
    assert header[0].startswith("# student-train --config ")
    assert f"trial {best.number}, eval_loss = {best.value:.6g} (minimize)" in header[1]
    reproduced = resolve_config(settings.out / "best.yaml", {"out": str(trial_dir / "run")})
    assert reproduced == resolve_config(trial_dir / "config.yaml")
    assert reproduced.lr == best.params["lr"] and reproduced.alpha == best.params["alpha"]
    assert (settings.out / "trials.png").read_bytes()[:4] == b"\x89PNG"


def _wait_for(path: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def _process_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        try:
            state = Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            return True
        if "\nState:\tZ" in state:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def _start_sweep_process(settings: SweepSettings, env: dict) -> subprocess.Popen:
    code = ("from pathlib import Path; from student_train.sweep import SweepSettings, run_sweep; "
            f"run_sweep(SweepSettings(out=Path({str(settings.out)!r}), space=Path("
            f"{str(settings.space)!r}), trials=3, pruner='none', poll_s=0.05, "
            f"base={settings.base!r}), trial_command={FAKE_TRIAL!r})")
    return subprocess.Popen([sys.executable, "-c", code], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_a_killed_sweep_resumes_and_reruns_the_killed_trial(tmp_path, world, monkeypatch):
    settings = fake_settings(tmp_path, world)
    sweep_process = _start_sweep_process(settings, {**os.environ, "FAKE_STEP_S": "1"})
    pid_file = settings.out / "trials" / "000" / "run" / "pid"
    try:
        _wait_for(pid_file)
        time.sleep(0.3)  # mid-trial
    finally:
        sweep_process.send_signal(signal.SIGKILL)
        sweep_process.wait()
    assert _process_gone(int(pid_file.read_text()))  # no trainer outlives its sweep

    monkeypatch.setenv("FAKE_STEP_S", "0.01")
    run_sweep(dataclasses.replace(settings, jobs=2), trial_command=FAKE_TRIAL)
    rows = states(settings.out)
    assert [r[:2] for r in rows] == [(0, "fail"), (1, "complete"), (2, "complete"),
                                     (3, "complete")]
    assert rows[0][2].startswith("stale") and "rerun of trial 0" in rows[1][2]
    study = load_study(settings)
    assert study.trials[1].params == study.trials[0].params  # the killed point, re-run
    assert study.trials[2].datetime_start < study.trials[1].datetime_complete  # --jobs 2
    run_sweep(settings, trial_command=FAKE_TRIAL)  # done already: nothing more runs
    assert len(load_study(settings).trials) == 4

    changed = fake_settings(tmp_path, world, metric="eval_ce")
    with pytest.raises(ConfigError, match="sweep_metric: the study has 'eval/loss', now "
                                          "'eval/ce'"):
        run_sweep(changed, trial_command=FAKE_TRIAL)
    base = {**settings.base, "eval_fraction": 0.3, "cache_dir": "cache"}  # cache_dir: no effect
    with pytest.raises(ConfigError) as refused:
        run_sweep(dataclasses.replace(settings, base=base), trial_command=FAKE_TRIAL)
    assert refused.value.problems[:-1] == [
        f"resume study 'sweep' ({settings.storage_url}): base config: eval_fraction: study "
        f"has 0.2, now 0.3"]


def test_an_interrupted_sweep_stops_its_trials_and_queues_them_again(tmp_path, world, monkeypatch):
    settings = fake_settings(tmp_path, world, trials=2)
    pid_file = settings.out / "trials" / "000" / "run" / "pid"
    watch = SweepRun._watch

    def watch_then_interrupt(self, number):
        watch(self, number)
        if pid_file.exists():
            raise KeyboardInterrupt  # Ctrl-C while trial 0 trains

    monkeypatch.setattr(SweepRun, "_watch", watch_then_interrupt)
    monkeypatch.setenv("FAKE_STEP_S", "1")
    with pytest.raises(KeyboardInterrupt):
        run_sweep(settings, trial_command=FAKE_TRIAL)
    assert _process_gone(int(pid_file.read_text()), timeout=0)  # stopped before raising
    trials = load_study(settings).trials
    assert [t.state.name for t in trials] == ["FAIL", "WAITING"]  # queued to run again
    assert trials[1].system_attrs["fixed_params"] == trials[0].params  # enqueue_trial's
    assert trials[0].user_attrs["stale"]
    assert states(settings.out)[0][1] == "fail"  # the reports of what it has

    def interrupted(settings):
        raise KeyboardInterrupt

    monkeypatch.setattr(student_train.sweep_cli, "run_sweep", interrupted)
    result = CliRunner().invoke(main, ["sweep", "--space", str(settings.space), "--trials", "1",
                                       "--out", str(settings.out)])
    assert result.exit_code == 130
    assert "rerun the same command to continue the study" in result.output


def test_a_missing_store_fails_before_any_trial(tmp_path, world):
    settings = fake_settings(tmp_path, world)
    settings = dataclasses.replace(settings, base={**settings.base,
                                                   "store": str(tmp_path / "nope")})
    with pytest.raises(LogitStoreError, match="nope"):
        run_sweep(settings, trial_command=FAKE_TRIAL)
    assert not (settings.out / "trials").exists()


def test_the_sweep_stops_when_its_first_trials_all_fail(tmp_path, world):
    failing = (sys.executable, "-c", "import sys; print('student-train: error: no such "
               "store'); sys.exit(1)")
    with pytest.raises(LogitStoreError, match="the first 3 trials all failed.*no such store"):
        run_sweep(fake_settings(tmp_path, world, trials=5), trial_command=failing)


# ----------------------------------------------------------------------------- real trials


def _real_sweep_args(world, out: Path, space: Path, trials: int) -> list[str]:
    return ["sweep", "--store", str(world.store), "--student", str(world.student),
            "--batch-tokens", "256", "--max-steps", "4", "--eval-fraction", "0.25",
            "--eval-every", "2", "--save-every", "0", "--verify-store", "none",
            "--warmup-ratio", "0", "--space", str(space), "--trials", str(trials),
            "--out", str(out)]


def test_a_sweep_of_the_real_student_train(world, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}\n")
    out = tmp_path / "sweep"
    result = CliRunner().invoke(main, _real_sweep_args(world, out, space, 1))
    assert result.exit_code == 0, result.output
    run = out / "trials" / "000" / "run"
    evals = [json.loads(line)["eval/loss"] for line in (run / "metrics.jsonl").open()
             if "eval/loss" in line]
    study = optuna.load_study(study_name="sweep", storage=f"sqlite:///{out / 'study.db'}")
    assert study.trials[0].intermediate_values == {2: evals[0], 4: evals[1]}
    assert study.best_value == pytest.approx(evals[-1])
    assert (run / "final" / "config.json").is_file()
    best = yaml.safe_load((out / "best.yaml").read_text())["train"]
    assert best["lr"] == study.best_params["lr"] and best["out"] is None


@pytest.mark.slow
def test_a_killed_real_sweep_resumes_to_three_complete_trials(world, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}\n"
                     "alpha: {type: float, low: 0, high: 1}\n")
    out = tmp_path / "sweep"
    args = _real_sweep_args(world, out, space, 3) + ["--pruner", "none"]
    command = [sys.executable, "-m", "student_train", *args]
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(out / "trials" / "001" / "config.yaml", timeout=120)
        time.sleep(2)  # trial 1 is training
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = states(out)
    assert [r[1] for r in rows].count("complete") == 3
    assert rows[1][1] == "fail" and rows[1][2].startswith("stale")
    assert any("rerun of trial 1" in r[2] for r in rows)
