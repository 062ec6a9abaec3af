"""`student-train sweep`: an Optuna study over student-train settings, every trial from one store.

    student-train sweep --store S --student STUDENT --eval-fraction 0.1 --eval-every 200 \\
        --space space.yaml --trials 40 --jobs 2 --out sweep/
    student-train sweep ... --metric eval_macro_f1 --direction maximize   # (classifiers)

Each trial is a separate process running the real student-train on the trial's resolved
config (DIR/trials/NNN/config.yaml, run in DIR/trials/NNN/run, output in .../log.txt):
the base config (`--config` preset <- the other student-train flags) with the trial's point
of the space (sweep_space.py; the space's keys override the base). The teacher is never
loaded: every trial reads the same store. Up to --jobs trials run at once.

The study (storage --study-db, default sqlite in DIR; name --study-name) uses a seeded TPE
sampler and median pruning on --metric: the sweep tails each run's metrics.jsonl, reports every
evaluation (trial.report) and ends a trial Optuna prunes (SIGINT: student-train exits
cleanly). Rerunning the same command continues the study until --trials trials are done
(complete, pruned, or failed by their own error); a trial whose process died with a killed
sweep is marked failed (`stale`) and its point re-run. Resuming with another space, base
config (settings that change no result, such as cache_dir, aside), metric or direction is
refused. A RUNNING trial counts as stale when its sweep process (recorded with the trial) is
gone from this host; one started on another host sharing the study DB is left alone. When
the first trials all fail, the sweep stops and says why. Output in DIR: best.yaml,
trials.csv, trials.png (sweep_report.py), the study.

For the integrator: `run_sweep(SweepSettings(...), trial_command=...)` is the whole sweep
without the command line; `trial_command` replaces `python -m student_train --config` (the
trial's config.yaml path is appended), e.g. to run another tool's trainer. The metric is any
key of the runs' eval records (`eval_X` means `eval/X`).
"""

from __future__ import annotations

import os
import shlex
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from logitstore.errors import ConfigError, LogitStoreError
from logitstore.toolkit.options import config_differences
from student_train.config import FIELDS, resolve_config, save_config
from student_train.sweep_report import ERROR, RERUN_OF, STALE, trial_note, write_reports
from student_train.sweep_space import SWEEP_CONTROLLED, SearchSpace, read_space
from student_train.sweep_trial import (TRIAL_COMMAND, TrialProcess, is_number, metric_key,
                                       owner_alive, owner_id)

PROG = "student-train sweep"
OWNER = "owner"  # user attribute: the sweep process that runs a trial (sweep_trial.owner_id)
BASE_FIELDS = {k: f for k, f in FIELDS.items() if k not in SWEEP_CONTROLLED}
ABORT_AFTER_FAILURES = 3  # the first trials all failed: the base config is likely wrong


@dataclass(frozen=True)
class SweepSettings:
    """One sweep: where, over what, how many, and the base config of its trials."""

    out: Path
    space: Path
    trials: int
    study_db: str | None = None  # default sqlite:///DIR/study.db
    study_name: str = "sweep"
    jobs: int = 1
    metric: str = "eval_loss"
    direction: str = "minimize"
    preset: str | None = None  # --config of the base
    base: dict[str, Any] = field(default_factory=dict)  # student-train flags of the base
    sampler_seed: int = 0
    pruner: str = "median"  # median | none
    pruner_startup_trials: int = 5  # trials finished before any is pruned
    pruner_warmup_steps: int = 0  # steps of a trial before it may be pruned
    poll_s: float = 0.5

    @property
    def storage_url(self) -> str:
        return self.study_db or f"sqlite:///{(Path(self.out) / 'study.db').resolve()}"

    def command(self) -> str:
        """The sweep's command line (shown in best.yaml's header)."""
        parts = ["student-train", "sweep", "--space", str(self.space), "--trials",
                 str(self.trials), "--out", str(self.out), "--metric", self.metric,
                 "--direction", self.direction]
        if self.preset:
            parts += ["--config", str(self.preset)]
        for key, value in self.base.items():
            values = value if isinstance(value, (list, tuple)) else [value]
            for item in values:
                parts += [f"--{key.replace('_', '-')}", str(item)]
        return shlex.join(parts)


# ----------------------------------------------------------------------------- checks


def check_sweep(settings: SweepSettings) -> tuple[SearchSpace, dict[str, Any]]:
    """(the space, the base config as a dict): every problem of the space and the base config
    in one ConfigError, then the inputs every trial reads (store, eval store or data: they
    exist and are readable, student-train's checks that load no model), before any trial."""
    space, problems = read_space(settings.space)
    base = {}
    try:
        cfg = resolve_config(settings.preset, {**settings.base, "out": str(
            Path(settings.out) / "trials" / "NNN" / "run")})
        base = {k: v for k, v in cfg.as_dict().items() if k not in SWEEP_CONTROLLED}
        if metric_key(settings.metric).startswith("eval/") and not (
                cfg.eval_fraction or cfg.eval_split or cfg.eval_store):
            problems.append(f"metric {settings.metric} is measured on an eval set: give the "
                            f"base config one (--eval-fraction 0.1, --eval-split or "
                            f"--eval-store), and --eval-every N so that trials can be pruned "
                            f"before they end")
    except ConfigError as exc:
        problems += [f"base config: {p}" for p in exc.problems]
    if settings.direction not in ("minimize", "maximize"):
        problems.append(f"direction must be minimize or maximize, got {settings.direction!r}")
    if problems:
        raise ConfigError(problems)
    if cfg.task == "classify":  # a classifier store (student_train/classify_train.py)
        from student_train.classify_train import open_classifier_store

        open_classifier_store(cfg.store)  # a wrong --store fails here, once
        return space, base
    from student_train.sources import check_inputs

    check_inputs(cfg)  # a wrong --store fails here, once, not in every trial
    return space, base


def _check_same_study(study, settings: SweepSettings, recorded: dict[str, Any]) -> None:
    """A resumed study must continue with what it started with."""
    differences = []
    for key, now in recorded.items():
        before = study.user_attrs.get(key)
        if key == "sweep_base" and before is not None:  # settings without effect may change
            differences += [f"base config: {d}" for d in
                            config_differences(before, now, FIELDS, saved_as="study")]
        elif before is not None and before != now:
            differences.append(f"{key}: the study has {before!r}, now {now!r}")
    if differences:
        raise ConfigError([f"resume study {settings.study_name!r} ({settings.storage_url}): "
                           f"{d}" for d in differences] +
                          ["a study continues with the settings it started with: rerun with "
                           "them, or start another study (--out, --study-db or --study-name)"])


# ----------------------------------------------------------------------------- the study


def open_study(settings: SweepSettings, space: SearchSpace, base: dict[str, Any]):
    """(study, its storage): created or loaded; another space, base config or metric
    refused; stale trials retired."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    pruner = optuna.pruners.MedianPruner(
        n_startup_trials=settings.pruner_startup_trials,
        n_warmup_steps=settings.pruner_warmup_steps) if settings.pruner == "median" \
        else optuna.pruners.NopPruner()
    storage = _open_storage(settings.storage_url)
    study = optuna.create_study(storage=storage, study_name=settings.study_name,
                                direction=settings.direction, load_if_exists=True,
                                pruner=pruner)
    if study.direction.name.lower() != settings.direction:
        raise ConfigError([f"resume study {settings.study_name!r}: it "
                           f"{study.direction.name.lower()}s, now --direction "
                           f"{settings.direction}; use the same direction or another study"])
    recorded = {"sweep_space": space.as_dict(), "sweep_base": base,
                "sweep_metric": metric_key(settings.metric)}
    if not study.trials:
        trial_dirs = out / "trials"
        if trial_dirs.is_dir() and any(trial_dirs.iterdir()):
            raise ConfigError([f"{trial_dirs} holds the trials of another study, but study "
                               f"{settings.study_name!r} in {settings.storage_url} has none: "
                               f"give its --study-db/--study-name to continue it, or a new "
                               f"--out"])
    _check_same_study(study, settings, recorded)
    for key, value in recorded.items():
        study.set_user_attr(key, value)
    # Seeded per resume, so that a resumed study does not redraw its first random points.
    study.sampler = optuna.samplers.TPESampler(seed=settings.sampler_seed + len(study.trials),
                                               constant_liar=settings.jobs > 1)
    retire_stale_trials(study, storage)
    return study, storage


def _open_storage(url: str):
    """The study's storage; SQLite waits for its lock rather than failing at once."""
    import optuna

    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)


def mark_stale(study, storage, number: int, params: dict[str, Any]) -> None:
    """A trial whose process is gone: failed, flagged stale, its point queued to run again."""
    from optuna.trial import TrialState

    trial_id = storage.get_trial_id_from_study_id_trial_number(
        storage.get_study_id_from_name(study.study_name), number)
    storage.set_trial_user_attr(trial_id, STALE, True)
    study.enqueue_trial(params, user_attrs={RERUN_OF: number})
    study.tell(number, state=TrialState.FAIL, skip_if_finished=True)


def retire_stale_trials(study, storage) -> list[int]:
    """RUNNING trials whose sweep process is gone (killed): stale, re-queued. Their numbers."""
    from optuna.trial import TrialState

    stale = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
             if not owner_alive(str(t.user_attrs.get(OWNER, "")))]
    for trial in stale:
        mark_stale(study, storage, trial.number, trial.params)
        click.echo(f"trial {trial.number}: its sweep was killed; marked stale, its point "
                   f"queued to run again", err=True)
    return [t.number for t in stale]


def count_done(study) -> int:
    """Trials that count towards --trials: complete, pruned, failed by their own error."""
    from optuna.trial import TrialState

    done = (TrialState.COMPLETE, TrialState.PRUNED)
    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.state in done or (t.state == TrialState.FAIL and not t.user_attrs.get(STALE)))


def _abort_if_all_failed(study) -> None:
    from optuna.trial import TrialState

    finished = [t for t in study.get_trials(deepcopy=False)
                if t.state.is_finished() and not t.user_attrs.get(STALE)]
    if len(finished) >= ABORT_AFTER_FAILURES and \
            all(t.state == TrialState.FAIL for t in finished):
        first = finished[0]
        raise LogitStoreError(
            f"the first {len(finished)} trials all failed, so the sweep stops; trial "
            f"{first.number}: {trial_note(first)}. Fix the base config or the space (try the "
            f"trial's config alone: student-train --config {first.user_attrs.get('dir', '')}"
            f"/config.yaml), then rerun the same command to continue")


# ----------------------------------------------------------------------------- running


class SweepRun:
    """The sweep's loop: up to `jobs` trial processes, watched until --trials are done."""

    def __init__(self, settings: SweepSettings, space: SearchSpace, study, storage,
                 trial_command: tuple[str, ...] | list[str] = TRIAL_COMMAND):
        self.settings, self.space, self.study, self.storage = settings, space, study, storage
        self.command = tuple(trial_command)
        self.running: dict[int, tuple[Any, TrialProcess]] = {}  # number -> (trial, process)
        self.env = _trial_environment(settings.jobs)

    def run(self) -> None:
        settings = self.settings
        while True:
            for number in list(self.running):
                self._watch(number)
            _abort_if_all_failed(self.study)
            while len(self.running) < settings.jobs and \
                    count_done(self.study) + len(self.running) < settings.trials:
                self._launch()
            if not self.running:
                return
            time.sleep(settings.poll_s)

    def _launch(self) -> None:
        """Ask for a trial, write its config, start its process (a config the space makes
        invalid fails the trial at once, with the reason)."""
        from optuna.trial import TrialState

        trial = self.study.ask()
        trial_dir = Path(self.settings.out) / "trials" / f"{trial.number:03d}"
        trial.set_user_attr(OWNER, owner_id())
        trial.set_user_attr("dir", str(trial_dir))
        params = self.space.suggest(trial)
        try:
            cfg = resolve_config(self.settings.preset, {
                **self.settings.base, **params, "out": str(trial_dir / "run")})
        except ConfigError as exc:
            trial.set_user_attr(ERROR, f"config: {'; '.join(exc.problems)}")
            self.study.tell(trial, state=TrialState.FAIL)
            click.echo(f"trial {trial.number}: failed, its config is invalid: "
                       f"{'; '.join(exc.problems)}", err=True)
            return
        if trial_dir.exists():  # left by a trial of this number that never started
            shutil.rmtree(trial_dir)
        trial_dir.mkdir(parents=True)
        save_config(cfg, trial_dir / "config.yaml")
        process = TrialProcess(trial_dir, self.command, self.settings.metric, env=self.env)
        self.running[trial.number] = (trial, process)
        click.echo(f"trial {trial.number}: started ({_shown(params)})", err=True)

    def _watch(self, number: int) -> None:
        """Report the trial's new evaluations, prune it, or finish it when its process ended."""
        from optuna.trial import TrialState

        trial, process = self.running[number]
        code = process.poll()  # before reading: the values of an ended process are all there
        for step, value in process.new_values():
            if not is_number(value):
                continue  # a NaN/inf evaluation: the final value decides
            trial.report(value, step)
            if code is None and trial.should_prune():
                process.stop()
                self._finish(number, TrialState.PRUNED, None,
                             f"pruned at step {step} ({self.settings.metric} {value:.4g})")
                return
        if code is None:
            return
        if code != 0:
            trial.set_user_attr(ERROR, process.failure(code))
            self._finish(number, TrialState.FAIL, None, f"failed ({process.failure(code)})")
            return
        value = process.final_value()
        if not is_number(value):
            reason = process.missing_metric() if value is None else \
                f"{self.settings.metric} is {value} (the run diverged)"
            trial.set_user_attr(ERROR, reason)
            self._finish(number, TrialState.FAIL, None, f"failed: {reason}")
            return
        self._finish(number, TrialState.COMPLETE, value,
                     f"complete, {self.settings.metric} {value:.6g}")

    def _finish(self, number: int, state, value: float | None, what: str) -> None:
        trial, process = self.running.pop(number)
        self.study.tell(trial, value, state=state)
        click.echo(f"trial {number}: {what}", err=True)

    def stop_all(self) -> None:
        """Interrupted: end every running trial; each is stale and queued to run again."""
        for number, (trial, process) in list(self.running.items()):
            process.stop()
            mark_stale(self.study, self.storage, number, trial.params)
        self.running.clear()


def _shown(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in params.items())


def _trial_environment(jobs: int) -> dict[str, str]:
    """The trials' environment: with several at once, the CPU threads shared between them
    (unless OMP_NUM_THREADS is set), so that parallel trials do not oversubscribe the cores."""
    env = dict(os.environ)
    if jobs > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    return env


def run_sweep(settings: SweepSettings, *,
              trial_command: tuple[str, ...] | list[str] = TRIAL_COMMAND):
    """Check, open (or resume) the study, run trials until --trials are done, write the
    reports (also when interrupted). Returns the best trial (None if none completed)."""
    space, base = check_sweep(settings)
    study, storage = open_study(settings, space, base)
    sweep = SweepRun(settings, space, study, storage, trial_command)

    def report():
        return write_reports(study, Path(settings.out), space.as_dict(), settings.metric,
                             settings.direction, settings.command())
    try:
        sweep.run()
    except BaseException:
        sweep.stop_all()
        try:
            report()  # what the study has so far
        except Exception as exc:  # never hide why the sweep stopped
            click.echo(f"{PROG}: the reports could not be written: {exc}", err=True)
        raise
    return report()
