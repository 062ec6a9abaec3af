"""The `student-train sweep` subcommand (student_train/sweep.py does the work).

    student-train sweep --store S --student STUDENT --eval-fraction 0.1 --eval-every 100 \\
        --space space.yaml --trials 30 [--jobs 2] [--study-db sqlite:///sweep.db] \\
        [--study-name NAME] [--metric eval_loss] [--direction minimize] [--config PRESET] \\
        --out DIR

Every student-train flag but --out, --resume and --plan is accepted and sets the base config
of the trials (with --config, as in student-train; the space's keys override it). Rerun the
same command to continue the study. Exit status: 0 when the study has its trials; 1 with
one paragraph per problem of the space or base config (before any trial runs), or when the
first trials all fail; 2 for a usage error; 130 when interrupted (rerun to continue).
"""

from __future__ import annotations

from pathlib import Path

import click

from logitstore import exit_codes
from logitstore.errors import LogitStoreError
from logitstore.toolkit.options import click_options
from student_train.sweep import BASE_FIELDS, PROG, SweepSettings, run_sweep


@click.command(name="sweep", cls=exit_codes.Command,
               interrupted_hint="rerun the same command to continue the study",
               context_settings={"help_option_names": ["-h", "--help"],
                                 "max_content_width": 100})
@click.option("--space", required=True, metavar="YAML",
              help="Search space: student-train setting -> distribution, e.g. `lr: {type: "
                   "float, low: 1e-4, high: 1e-2, log: true}` (student_train/sweep_space.py).")
@click.option("--trials", required=True, type=click.IntRange(min=1),
              help="Trials the study should have done (complete, pruned or failed by their "
                   "own error), counting those of earlier runs of the command.")
@click.option("--out", required=True, metavar="DIR",
              help="Sweep directory: trials/NNN/{config.yaml,run,log.txt}, best.yaml, "
                   "trials.csv, trials.png, study.db.")
@click.option("--study-db", metavar="URL", help="Optuna storage [default: sqlite:///DIR/study.db].")
@click.option("--study-name", default="sweep", show_default=True)
@click.option("--jobs", default=1, show_default=True, type=click.IntRange(min=1),
              help="Trials run at once, each its own student-train process.")
@click.option("--metric", default="eval_loss", show_default=True,
              help="Eval metric to optimise (eval_X = eval/X of the run's metrics.jsonl).")
@click.option("--direction", default="minimize", show_default=True,
              type=click.Choice(["minimize", "maximize"]))
@click.option("--sampler-seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Seed of the TPE sampler.")
@click.option("--pruner", default="median", show_default=True,
              type=click.Choice(["median", "none"]),
              help="median: end a trial whose metric is worse than the median of earlier "
                   "trials at the same step.")
@click.option("--pruner-startup-trials", default=5, show_default=True,
              type=click.IntRange(min=0), help="Trials finished before any is pruned.")
@click.option("--pruner-warmup-steps", default=0, show_default=True,
              type=click.IntRange(min=0), help="Steps of a trial before it may be pruned.")
@click.option("--config", "config_path", metavar="PATH|NAME",
              help="student-train preset of the base config (its `train:` section).")
@click_options(BASE_FIELDS)
def sweep(space, trials, out, study_db, study_name, jobs, metric, direction, sampler_seed,
          pruner, pruner_startup_trials, pruner_warmup_steps, config_path, **flags) -> None:
    """Optuna study over student-train settings; every trial a student-train run on the same
    store (the teacher is never loaded)."""
    base = {k: (list(v) if isinstance(v, tuple) else v) for k, v in flags.items()
            if v is not None and v != ()}
    settings = SweepSettings(
        out=Path(out), space=Path(space), trials=trials, study_db=study_db,
        study_name=study_name, jobs=jobs, metric=metric, direction=direction,
        preset=config_path, base=base, sampler_seed=sampler_seed, pruner=pruner,
        pruner_startup_trials=pruner_startup_trials, pruner_warmup_steps=pruner_warmup_steps)
    try:
        best = run_sweep(settings)
    except LogitStoreError as exc:  # ConfigError (space, base, resume) or all trials failed
        exit_codes.fail(PROG, str(exc))
    except OSError as exc:
        exit_codes.fail(PROG, f"{type(exc).__name__}: {exc}")
    if best is None:
        click.echo(f"done: no trial completed; see {out}/trials.csv")
    else:
        click.echo(f"done: best trial {best.number}, {metric} {best.value:.6g}: "
                   f"{out}/best.yaml (student-train --config {out}/best.yaml --out RUN)")
