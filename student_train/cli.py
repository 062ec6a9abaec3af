"""`student-train` (also `python -m student_train`): distil a student from a store.

    student-train --store store/ --student llama3.2-1b --out run/
    student-train --config configs/med42-to-llama3.2-1b.yaml --store s3://b/med42 --out run/
    student-train --config med42-to-llama3.2-1b --store s3://b/med42 --out run/ --resume
    accelerate launch --num_processes 4 -m student_train --config ... --out run/
    student-train --plan --config med42-to-llama3.2-1b --store store/ --gpu-memory 24GiB

Every flag is a key of the preset's `train:` section: the flags are generated from
student_train/config.py's FIELDS, and a flag given overrides the preset (`--config`: a path
or a bundled preset's name). Values are read as text and validated by the config, so all
problems are reported together.

`student-train --task classify --store S --student CONFIG_OR_DIR --out run/` trains an
image+text classifier from a classifier store (student_train/classify_train.py).

`student-train sweep ...` runs an Optuna study of trainings from one store
(student_train/sweep_cli.py; `student-train sweep --help`).

`--plan` prints the memory plan per device (student_train/memory_plan.py: from the student's
config.json and the store's manifest, across tokenizers also the student's tokenizer and
the first segment's text; no weights) and exits, 1 when it does not fit
`--gpu-memory`.

Exit status (logitstore/exit_codes.py): 0 on success; 1 with a one-paragraph reason for a
wrong config, model, data or store, a config the plan says cannot fit, or running out of
memory (rerun with --resume); 2 for a usage error (unknown flag); 130 when
interrupted (rerun with --resume to continue from the last checkpoint).
"""

from __future__ import annotations

import logging
import os

import click

from logitstore import exit_codes
from logitstore.errors import LogitStoreError
from logitstore.toolkit.options import tool_command
from student_train.config import FIELDS, SECTION, resolve_config

PROG = "student-train"


def _rank_prefix() -> str:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return f"[rank {os.environ.get('RANK', '0')}] " if world > 1 else ""


def _setup_logging() -> None:
    main = os.environ.get("RANK", "0") == "0"
    logging.basicConfig(level=logging.INFO if main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_warning()
    except ImportError:
        pass


def print_plan(cfg) -> None:
    """`--plan`: the memory plan per device on stdout (no weights loaded); exit 1 with the
    smallest change that fits when it does not fit --gpu-memory."""
    from student_train.memory_plan import estimate, parse_memory_size
    from student_train.memory_plan_render import planned_processes, refusal_message

    budget = parse_memory_size(cfg.gpu_memory) if cfg.gpu_memory else None
    plan = estimate(cfg, planned_processes(cfg), budget)
    click.echo(plan.render())
    if plan.fits is False:
        exit_codes.fail(PROG, refusal_message(plan))


@tool_command(PROG, FIELDS, SECTION,
              interrupted_hint="rerun with --resume to continue from the last checkpoint")
def train_command(config_path: str | None, **flags) -> None:
    """Train a student from a store of teacher signals (or from --data, hard labels only)."""
    if click.get_current_context().invoked_subcommand is not None:
        return  # `student-train sweep ...`: the subcommand does the work
    _setup_logging()
    overrides = {k: (list(v) if isinstance(v, tuple) else v) for k, v in flags.items()}
    try:
        cfg = resolve_config(config_path, overrides)
        if cfg.plan:
            print_plan(cfg)
            return
        if cfg.task == "classify":
            from student_train.classify_train import train_classifier

            metrics = train_classifier(cfg)
        else:
            from student_train.train import train

            metrics = train(cfg)
    except LogitStoreError as exc:  # ConfigError, hf.ModelLoadError, store errors: all of them
        exit_codes.fail(PROG, str(exc), prefix=_rank_prefix())
    except OSError as exc:  # e.g. the run directory is not writable
        exit_codes.fail(PROG, f"{type(exc).__name__}: {exc}", prefix=_rank_prefix())
    if metrics and os.environ.get("RANK", "0") == "0":
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                          if isinstance(v, float) and not k.endswith("target_tokens"))
        click.echo(f"done: {cfg.out}/final" + (f" ({shown})" if shown else ""))


def _with_subcommands(command: click.Command) -> click.Group:
    """`command` as a group that runs it when no subcommand is named, so that both
    `student-train --store ...` and `student-train sweep ...` work; same flags and help."""
    from student_train.sweep_cli import sweep

    return exit_codes.Group(
        name=command.name, params=command.params, callback=command.callback, help=command.help,
        context_settings=command.context_settings, invoke_without_command=True,
        interrupted_hint=command.interrupted_hint, commands={"sweep": sweep},
        subcommand_metavar="[sweep ...]")


main = _with_subcommands(train_command)
