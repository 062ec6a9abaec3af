"""`logitstore decontaminate`: the command (registered on the `logitstore` group in cli.py).

The one command of `logitstore` that needs the toolkit: evaluation data (JSONL, bundled and
lm-eval tasks) and the store's tokenizer come from logitstore.toolkit.eval_texts, imported
inside the command so that importing the store core never loads it (tests/test_code_shape.py).
Matching and writing live in logitstore.decontaminate (core).
"""

from __future__ import annotations

import json
import sys

import click

from logitstore import exit_codes
from logitstore.decontaminate import DEFAULT_NGRAM


@click.command()
@click.argument("store")
@click.option("--against", "against", multiple=True, required=True, metavar="FILE|TASK",
              help="Evaluation data (repeatable): a JSONL file, a bundled task (medmcq_mini, "
                   "medgen_mini) or an lm-eval task or group name.")
@click.option("--ngram", default=DEFAULT_NGRAM, show_default=True,
              help="Words per n-gram: a sample sharing one such run of words with an "
                   "evaluation item is flagged.")
@click.option("--tokenizer", metavar="PATH",
              help="The store's tokenizer (tokenizer.json, model directory or hub id); "
                   "default: the tokenizer_name the store records. Its fingerprint must be "
                   "the store's.")
@click.option("--out", "out", metavar="CLEAN",
              help="Write a clean store here: every sample but the flagged ones, every "
                   "signal, verified. A killed run resumes when rerun.")
@click.option("--overwrite", is_flag=True, help="Replace whatever store is at CLEAN.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (with every "
                                                        "flagged sample id).")
def decontaminate(store: str, against: tuple[str, ...], ngram: int, tokenizer: str | None,
                  out: str | None, overwrite: bool, as_json: bool) -> None:
    """Find samples of STORE sharing an NGRAM-word run with evaluation data; report them per
    source with examples, and with --out write a clean store without them.

    Matching is on normalised words of the decoded text (lower case, punctuation and
    spacing ignored), 13-word n-grams by default, as in GPT-3's and Llama's
    decontamination: robust to how a passage was tokenized in context. Each field of an
    evaluation item (question, option, answer...) is matched on its own. Every input is
    checked before the store is read."""
    from logitstore.decontaminate import (EvalIndex, clean_plan, decontamination_filter,
                                          scan_store)
    from logitstore.errors import LogitStoreError
    from logitstore.reader import StoreReader
    from logitstore.toolkit.eval_texts import eval_sets, store_decoder

    if ngram < 1:
        raise LogitStoreError(f"--ngram must be at least 1 word, got {ngram}; 13 is the usual "
                              "length (8 for short evaluation items)")
    reader = StoreReader(store)
    index = EvalIndex(eval_sets(against), ngram)
    decode = store_decoder(reader.settings, tokenizer)
    filter_ = decontamination_filter(index, reader.settings.tokenizer_fingerprint)
    if out is not None:
        _check_destination(clean_plan(store, reader, filter_, None), out, overwrite)
    report = scan_store(reader, decode, index)
    click.echo(json.dumps(report.to_json(), indent=1) if as_json else
               "\n".join(report.lines()))
    if out is not None:
        _write_clean(clean_plan(store, reader, filter_, report), out, overwrite, as_json)


def _check_destination(plan, out: str, overwrite: bool) -> None:
    """Refuse, before the scan, a destination holding a store other than this job's output."""
    from logitstore.copy_samples import other_store_at
    from logitstore.errors import LogitStoreError

    other = other_store_at(out, None, plan.provenance()["job"])
    if other and not overwrite:
        raise LogitStoreError(f"refusing to write the clean store into {out}: it holds {other}, "
                              "expected nothing or an unfinished clean store of this same "
                              "decontamination (which is resumed). Choose another --out, or "
                              "pass --overwrite to replace it")


def _write_clean(plan, out: str, overwrite: bool, as_json: bool) -> None:
    from logitstore.copy_samples import execute_plan

    result = execute_plan(plan, out, overwrite=overwrite)
    for problem in result.problems:
        click.echo(f"DAMAGED {problem}", err=True)
    if result.problems:
        sys.exit(exit_codes.USER_ERROR)
    counts = result.counts
    how = ("already held this clean store: nothing written" if result.already_complete else
           f"resumed after {result.resumed_after} samples" if result.resumed_after else "wrote")
    click.echo(f"{out}: {how}; {counts['samples_out']} of {counts['samples_in']} samples "
               f"({counts['removed']} removed), every signal; verified", err=as_json)
