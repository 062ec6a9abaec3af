"""`student-train` (also `python -m student_train`): distil a student from a store.

    student-train --store store/ --student llama3.2-1b --out run/
    student-train --config configs/med42-to-llama3.2-1b.yaml --store s3://b/med42 --out run/
    accelerate launch --num_processes 4 -m student_train --config ... --out run/

Every flag is a key of the preset's `train:` section (student_train/config.py, FIELDS): the
flags below are generated from that table, and a flag given overrides the preset. Values are
read as text and validated by the config, so all problems are reported together.
"""

from __future__ import annotations

import logging
import os
import sys

import click

from logitstore.errors import LogitStoreError
from student_train.config import FIELDS, resolve_config

_CHOICES = {  # shown in --help; the config checks them
    "target": "[auto|topk|sampled]", "topk_mode": "[tail|renormalised]",
    "loss": "[kl|rkl|jsd|skl|srkl|tvd]", "temperature_schedule": "[constant|linear|exp]",
    "objective": "[blend|distillm-med]", "verify_store": "[full|none]",
}
_METAVARS = {"int": "N", "optional_int": "N", "float": "X", "optional_float": "X",
             "weights": "NAME:W,..."}


def _add_field_options(command):
    for name, field in reversed(list(FIELDS.items())):
        if not field.flag:
            continue
        flag = "--" + name.replace("_", "-")
        help_text = field.help or ""
        if field.kind != "bool":
            help_text += f" [default: {field.default}]" if field.default not in (None, [], {}) \
                else ""
        if field.kind == "bool":
            command = click.option(f"{flag}/--no-{flag[2:]}", name, default=None,
                                   help=help_text)(command)
        elif field.kind == "list_str":
            command = click.option(flag, name, multiple=True, default=None,
                                   help=f"{help_text} (repeat or comma-separate)")(command)
        else:
            metavar = _CHOICES.get(name) or _METAVARS.get(field.kind, "TEXT")
            command = click.option(flag, name, type=str, default=None, metavar=metavar,
                                   help=help_text.strip())(command)
    return command


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


@click.command(name="student-train", context_settings={"help_option_names": ["-h", "--help"],
                                                        "max_content_width": 100})
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="YAML preset; its `train:` section is read, flags override it")
@_add_field_options
def main(config_file: str | None, **flags) -> None:
    """Train a student from a store of teacher signals (or from --data, hard labels only)."""
    _setup_logging()
    overrides = {k: (list(v) if isinstance(v, tuple) else v) for k, v in flags.items()}
    try:
        cfg = resolve_config(config_file, overrides)
        from student_train.train import train

        metrics = train(cfg)
    except LogitStoreError as exc:  # ConfigError, hf.ModelLoadError, store errors: all of them
        click.echo(f"{_rank_prefix()}student-train: error: {exc}", err=True)
        sys.exit(2)
    if metrics and os.environ.get("RANK", "0") == "0":
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                          if isinstance(v, float) and not k.endswith("target_tokens"))
        click.echo(f"done: {cfg.out}/final" + (f" ({shown})" if shown else ""))
