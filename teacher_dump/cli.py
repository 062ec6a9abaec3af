"""`teacher-dump` (also `python -m teacher_dump`): run a teacher over data into a store.

The flags are generated from teacher_dump/config.py's FIELDS, the same table as the keys
of a preset's `dump:` section: `--top-k 8` is `top_k: 8`, a flag given overrides the
preset (`--config`: a path or a bundled preset's name, e.g. `--config tiny-cpu`). Only
`--config` and `-v` are not settings: `-v` changes what this invocation logs, never what is
stored. A second teacher (same tokenizer) is added to a finished store by
rerunning with its --model and a new --signal. `--task classify` dumps an image and/or
text classifier into a store of kind classifier instead (teacher_dump/classify_dump.py). Multi-process (one part per process;
without a GPU add `--multi_gpu`: accelerate's `--cpu` starts a single process):

    accelerate launch --num_processes 8 -m teacher_dump --config C.yaml --data D --out S

Exit status (logitstore/exit_codes.py): 0 on success; 1 with a one-paragraph reason (no
traceback) when the config, the model, the data or the store is wrong; 2 for a usage error
(unknown flag); 130 when interrupted (rerun the same command to resume).
"""

from __future__ import annotations

import logging

import click

from logitstore import exit_codes
from logitstore.errors import LogitStoreError
from logitstore.toolkit.options import tool_command, verbose_option
from teacher_dump.config import FIELDS, SECTION, resolve_config

PROG = "teacher-dump"
log = logging.getLogger("teacher_dump")


@tool_command(PROG, FIELDS, SECTION, interrupted_hint="rerun the same command to resume")
@verbose_option()
def teacher_dump(config_path, verbose, **flags) -> None:
    """Run a teacher over data once and store its signals for offline distillation."""
    from teacher_dump.dump import run_dump
    from teacher_dump.ranks import RankContext

    overrides = {k: (list(v) if isinstance(v, tuple) else v) for k, v in flags.items()}
    try:
        cfg = resolve_config(config_path, overrides)  # before anything heavy: fail fast
        ranks = RankContext.from_accelerate()
        _setup_logging(verbose, ranks.is_main)
        if ranks.is_main:
            click.echo(_echo_config(cfg), err=True)
        if cfg.task == "classify":
            from teacher_dump.classify_dump import run_classify_dump

            report = run_classify_dump(cfg, world=ranks.world)
        else:
            report = run_dump(cfg, ranks=ranks)
    except LogitStoreError as exc:
        exit_codes.fail(PROG, str(exc))
    except OSError as exc:  # e.g. the store location is not writable
        exit_codes.fail(PROG, f"{type(exc).__name__}: {exc}")
    except RuntimeError as exc:
        if not _is_out_of_memory(exc):
            raise
        exit_codes.fail(PROG, f"out of accelerator memory ({' '.join(str(exc).split())[:200]}). "
                        f"Lower --batch-{'samples' if cfg.task == 'classify' else 'tokens'}, "
                        "then rerun the same command with it: committed "
                        "samples are kept and the dump resumes after them (a new store can "
                        "also take a smaller --logits-chunk)")
    if report.is_main:
        click.echo(str(report))


def _is_out_of_memory(exc: BaseException) -> bool:
    import torch

    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(exc, oom)


def _echo_config(cfg) -> str:
    import yaml

    text = yaml.safe_dump({SECTION: cfg.as_dict()}, sort_keys=False, default_flow_style=None)
    return "# teacher-dump resolved config\n" + text.rstrip()


def _setup_logging(verbose: bool, is_main: bool) -> None:
    level = logging.DEBUG if verbose else (logging.INFO if is_main else logging.WARNING)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Library chatter (HTTP requests, per-file download logs) stays at WARNING.
    for noisy in ("httpx", "urllib3", "fsspec", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> None:
    teacher_dump.main(args=argv, prog_name=PROG)
