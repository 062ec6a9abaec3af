"""`logitstore merge`, `subset` and `add-text` (registered on the `logitstore` group in cli.py).

They stream between any fsspec URLs (credentials and endpoints the usual way, e.g.
AWS_ENDPOINT_URL for s3://), resume when rerun after a kill, verify the new store, and
record their provenance in its manifest `extra["operation"]`. They take causal-lm and
(format 2.3) classifier stores alike; the progress bar counts tokens, or samples for a
classifier store (which holds no tokens). Exit status as for every
`logitstore` command (logitstore/exit_codes.py): a refused input is one paragraph and
status 1; a new store that fails verification prints one `DAMAGED` line per problem and
exits 1.
"""

from __future__ import annotations

import sys

import click

from logitstore import exit_codes


def _report(result, what: str) -> None:
    """Print the DAMAGED lines and exit 1 when the new store failed verification, else the
    one-line summary `what` (with how the run resumed)."""
    for problem in result.problems:
        click.echo(f"DAMAGED {problem}", err=True)
    if result.problems:
        click.echo(f"{result.url}: {len(result.problems)} problem(s)", err=True)
        sys.exit(exit_codes.USER_ERROR)
    if result.already_complete:
        what += f" ({result.url} already held this output: nothing written)"
    elif result.resumed_after:
        what += f" (resumed after {result.resumed_after} samples already written)"
    click.echo(what + "; verified")


def _execute(plan, dst: str, overwrite: bool):
    """Write `plan` to `dst` with a progress bar in the plan's unit (tokens, or samples)."""
    from tqdm import tqdm

    from logitstore.copy_samples import execute_plan

    bar = tqdm(unit=plan.progress_unit, unit_scale=True, desc="copy", disable=None)
    try:
        return execute_plan(plan, dst, overwrite=overwrite, progress=bar.update)
    finally:
        bar.close()


def _tokens(plan, counts) -> str:
    """', N tokens' for a causal-lm store; nothing for a classifier store (no tokens)."""
    return "" if plan.progress_unit == "sample" else f", {counts['tokens_out']} tokens"


@click.command()
@click.argument("sources", nargs=-1, required=True)
@click.argument("dst")
@click.option("--common-signals", is_flag=True,
              help="Keep only the signals (and the text and token spans) every source "
                   "holds (else all must hold the same).")
@click.option("--overwrite", is_flag=True,
              help="Replace what DST holds (a rerun of the same merge resumes without it).")
def merge(sources: tuple[str, ...], dst: str, common_signals: bool, overwrite: bool) -> None:
    """Merge the stores SOURCES... into a new store DST.

    The sources must be of one kind and share tokenizer and settings (classifier stores:
    heads, features, encodings). Samples with the same id and tokens or labels (same
    digest) are kept once, from the first source; an id naming different tokens or labels
    in two sources is refused. Rerun after an interruption to resume.
    """
    from logitstore.copy_samples import open_sources
    from logitstore.merge import plan_merge

    plan = plan_merge(list(sources), open_sources(list(sources), None),
                      common_signals=common_signals)
    result = _execute(plan, dst, overwrite)
    counts = result.counts
    _report(result, f"merged {len(sources)} store(s) -> {dst}: {counts['samples_out']} samples "
                    f"of {counts['samples_in']} ({counts['duplicates']} duplicate(s) kept "
                    f"once){_tokens(plan, counts)}")


@click.command()
@click.argument("src")
@click.argument("dst")
@click.option("--split", help="Keep the samples of this split.")
@click.option("--where", "where", multiple=True, metavar="TAG=VALUE",
              help="Keep samples whose tag equals VALUE (read as the tag's type); repeatable, "
                   "all must hold. source and split work as tags too.")
@click.option("--ids", "ids_file", metavar="FILE",
              help="Keep the sample ids listed in FILE, one per line (path or fsspec URL).")
@click.option("--fraction", type=float,
              help="Keep this fraction (0 < F <= 1), chosen by a hash of seed and sample id.")
@click.option("--seed", type=int, help="Seed of --fraction (default 0).")
@click.option("--overwrite", is_flag=True,
              help="Replace what DST holds (a rerun of the same subset resumes without it).")
def subset(src: str, dst: str, split: str | None, where: tuple[str, ...],
           ids_file: str | None, fraction: float | None, seed: int | None,
           overwrite: bool) -> None:
    """Write the samples of SRC that the filters select (all of them, AND) to a new store
    DST, with every signal (classifier store: heads, features, labels); verified at the
    end. Rerun after an interruption to resume."""
    from logitstore.copy_samples import open_sources
    from logitstore.subset import plan_subset, read_id_file

    pairs = []
    for item in where:
        tag, sep, value = item.partition("=")
        if not sep or not tag:
            raise click.BadParameter(f"expected TAG=VALUE, found {item!r}", param_hint="--where")
        pairs.append((tag, value))
    if fraction is not None and not 0 < fraction <= 1:
        raise click.BadParameter(f"must be in (0, 1], found {fraction}", param_hint="--fraction")
    if seed is not None and fraction is None:
        raise click.BadParameter("only --fraction uses a seed; give --fraction F too",
                                 param_hint="--seed")
    ids = read_id_file(ids_file) if ids_file else None
    (reader,) = open_sources([src], None)
    plan = plan_subset(src, reader, split=split, where=pairs, ids=ids, ids_label=ids_file,
                       fraction=fraction, seed=seed or 0)
    result = _execute(plan, dst, overwrite)
    counts = result.counts
    _report(result, f"subset {src} -> {dst}: {counts['samples_out']} of "
                    f"{counts['samples_in']} samples{_tokens(plan, counts)}")


@click.command("add-text")
@click.argument("src")
@click.argument("dst")
@click.option("--tokenizer", "tokenizer_path", required=True, metavar="PATH_OR_ID",
              help="The store's own tokenizer (the teacher's model directory or hub id).")
@click.option("--overwrite", is_flag=True,
              help="Replace what DST holds (a rerun of the same copy resumes without it).")
def add_text(src: str, dst: str, tokenizer_path: str, overwrite: bool) -> None:
    """Copy SRC, a store written without sample text and token spans (before format 2.1,
    or dumped with --no-text), to a new store DST with them, recovered from the stored ids
    with the store's own tokenizer where that is exact (a byte-level one without a
    normaliser: the ids' bytes;
    another: its decoded text when it cuts that text into the same ids again;
    logitstore/toolkit/add_text.py); every id, target and signal unchanged. Students of
    other tokenizers and second teachers need them. Verified at the end; rerun after an
    interruption to resume."""
    from tqdm import tqdm

    from logitstore.copy_samples import open_sources
    from logitstore.toolkit.add_text import plan_add_text

    (reader,) = open_sources([src], None)
    with tqdm(unit="tok", unit_scale=True, desc="check", disable=None) as bar:
        plan = plan_add_text(src, reader, tokenizer_path, checked=bar.update)
    result = _execute(plan, dst, overwrite)
    counts = result.counts
    _report(result, f"add-text {src} -> {dst}: {counts['samples_out']} samples with their "
                    f"text{_tokens(plan, counts)}")
