"""`teacher-dump` (also `python -m teacher_dump`): run a teacher over data into a store.

Every flag overrides the same key of the `dump:` section of `--config`; see
teacher_dump/config.py for the keys, their defaults and checks. A second teacher (same
tokenizer) is added to a finished store by rerunning with its --model and a new --signal.
Multi-process (one part per process; without a GPU add `--multi_gpu`: accelerate's
`--cpu` starts a single process):

    accelerate launch --num_processes 8 -m teacher_dump --config C.yaml --data D --out S

Exit status 0 on success; 1 with a one-paragraph reason (no traceback) when the config,
the model, the data or the store is wrong; 130 when interrupted (rerun to resume).
"""

from __future__ import annotations

import logging
import sys

import click

from logitstore.errors import LogitStoreError
from teacher_dump.config import DATA_FORMATS, DTYPE_CHOICES, resolve_config

log = logging.getLogger("teacher_dump")

# Values are not checked by click but by teacher_dump.config, together with the preset's,
# so that every problem of a command line and its preset is reported at once.
_FORMAT_METAVAR = "[" + "|".join(f.replace("_", "-") for f in DATA_FORMATS) + "]"


@click.command(name="teacher-dump", context_settings={"help_option_names": ["-h", "--help"],
                                                      "max_content_width": 100})
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="YAML preset; its `dump:` section sets defaults for every flag below.")
@click.option("--model", help="Teacher: alias from logitstore/toolkit/models.yaml, local directory or hub id.")
@click.option("--data", multiple=True,
              help="Data file, directory, glob or dataset name[:config][@split]; repeatable "
                   "or comma-separated.")
@click.option("--out", help="Store URL (directory, s3://..., gs://...).")
@click.option("--signal",
              help="Signal name in the store (default: from the model name). A name an "
                   "existing store lacks adds this teacher's signal over its stored tokens.")
@click.option("--top-k", metavar="K", help="Top-k log-probs per position; 0 = off.")
@click.option("--samples", metavar="N", help="Sampled draws per position; 0 = off.")
@click.option("--sample-temperature", metavar="T",
              help="Temperature of the sampled draws.")
@click.option("--hidden-layers", metavar="I,J",
              help="Pooled hidden states of these layers (indices into hidden_states[1:], "
                   "e.g. -1,-4); empty = off.")
@click.option("--hidden-pool", metavar="[mean|mean-all|last]")
@click.option("--attention-layers", metavar="I,J",
              help="Pooled attention maps of these layers (indices into attentions); "
                   "empty = off.")
@click.option("--attention-grid", metavar="G", help="Attention maps are pooled to G x G.")
@click.option("--attention-heads", metavar="[mean|all]")
@click.option("--quantize", metavar="[auto|4bit|8bit|none]",
              help="bitsandbytes quantization (auto: 4bit on CUDA, none on CPU).")
@click.option("--dtype", metavar=f"[{'|'.join(DTYPE_CHOICES)}]")
@click.option("--device", help="auto (default), cpu, cuda, cuda:1...")
@click.option("--format", "data_format", metavar=_FORMAT_METAVAR,
              help="Data record format (auto: detected per source).")
@click.option("--max-length", metavar="N", help="Tokens per sample (BOS/EOS included).")
@click.option("--batch-tokens", metavar="N", help="Padded tokens per forward pass.")
@click.option("--include-prompt/--no-include-prompt", default=None,
              help="Prompt tokens are targets too.")
@click.option("--split-long/--truncate-long", default=None,
              help="Cut samples over --max-length into windows instead of truncating them.")
@click.option("--limit", metavar="N", help="At most this many samples.")
@click.option("--seed", metavar="S", help="Seed of the sampled draws (per sample id).")
@click.option("--logprob-encoding", metavar="[q8|f16|f32]")
@click.option("--capture-kernel", metavar="[auto|compiled|eager]",
              help="Kernel of the logits' group statistics: compiled (torch.compile) is the "
                   "fastest on the CPU; auto picks it there when it works.")
@click.option("--logits-chunk", metavar="N",
              help="Positions per fp32 logits block (the LM head runs block by block).")
@click.option("--revision", help="Hub branch, tag or commit of the teacher.")
@click.option("--trust-remote-code", is_flag=True, default=None,
              help="Run the model repository's own code (only for models you trust).")
@click.option("--overwrite", is_flag=True, default=None,
              help="Replace an existing store written with a different configuration, "
                   "tokenizer or signal (a store with the same configuration is resumed).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("-v", "--verbose", is_flag=True, help="Log at DEBUG level.")
def teacher_dump(config_path, data_format, no_progress, verbose, **flags) -> None:
    """Run a teacher over data once and store its signals for offline distillation."""
    flags["format"] = data_format
    flags["data"] = list(flags["data"]) or None
    from teacher_dump.dump import run_dump
    from teacher_dump.ranks import RankContext

    try:
        cfg = resolve_config(config_path, flags)  # before anything heavy: fail fast
        ranks = RankContext.from_accelerate()
        _setup_logging(verbose, ranks.is_main)
        if ranks.is_main:
            click.echo(_echo_config(cfg), err=True)
        report = run_dump(cfg, ranks=ranks, progress=not no_progress)
    except LogitStoreError as exc:
        _fail(str(exc))
    except OSError as exc:  # e.g. the store location is not writable
        _fail(f"{type(exc).__name__}: {exc}")
    except RuntimeError as exc:
        if not _is_out_of_memory(exc):
            raise
        _fail(f"out of accelerator memory ({' '.join(str(exc).split())[:200]}). Lower "
              "--batch-tokens, then rerun the same command with it: committed samples are "
              "kept and the dump resumes after them (a new store can also take a smaller "
              "--logits-chunk)")
    except KeyboardInterrupt:
        click.echo("teacher-dump: interrupted; rerun the same command to resume", err=True)
        sys.exit(130)
    if report.is_main:
        click.echo(str(report))


def _is_out_of_memory(exc: BaseException) -> bool:
    import torch

    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(exc, oom)


def _fail(message: str) -> None:
    click.echo(f"teacher-dump: error: {message}", err=True)
    sys.exit(1)


def _echo_config(cfg) -> str:
    import yaml

    text = yaml.safe_dump({"dump": cfg.as_dict()}, sort_keys=False, default_flow_style=None)
    return "# teacher-dump resolved config\n" + text.rstrip()


def _setup_logging(verbose: bool, is_main: bool) -> None:
    level = logging.DEBUG if verbose else (logging.INFO if is_main else logging.WARNING)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Library chatter (HTTP requests, per-file download logs) stays at WARNING.
    for noisy in ("httpx", "urllib3", "fsspec", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> None:
    teacher_dump.main(args=argv, prog_name="teacher-dump")
