"""The quality gate: next-token log-probs of an export against its source model.

Both models are `InferenceModel`s from `load_inference_model`, so the gate checks exactly
what serving runs. On held-out sequences (`held_out_sequences`), at every scored position
(targets, see logitstore.toolkit.heldout) the two models' log-softmax over the full
vocabulary are compared:

    max_abs_logprob_diff   max over positions and vocabulary of |log p_export - log p_source|
    mean_abs_logprob_diff  mean of the same over positions x vocabulary
    source_perplexity      exp(mean NLL of the next token) under the source model
    export_perplexity      the same under the export
    perplexity_ratio       export_perplexity / source_perplexity
    top1_agreement         share of positions where both models' argmax is the same token

The gate passes when perplexity_ratio <= the threshold (--max-ppl-ratio).

Held-out data: --check-data (a text/JSONL file, or a store URL or directory: its eval
split), else the eval split of the store the student-train run trained on (when MODEL is a
run that records one, the store is readable and was written with this tokenizer), else the
bundled medgen_mini texts.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from logitstore.errors import ConfigError, LogitStoreError
from logitstore.toolkit.batching import by_length, padded_batches
from logitstore.toolkit.heldout import (BUNDLED_TEXTS, StoreTokenizerMismatch, TokenSequence,
                                        read_texts, sequences_from_store, sequences_from_texts)
from logitstore.toolkit.inference import left_pad

log = logging.getLogger(__name__)

# Floats per logits array of one batch ([B, T, V]): bounds memory for 128k vocabularies.
_BATCH_FLOATS = 2 ** 25


class QualityGateFailed(LogitStoreError):
    """The export's perplexity exceeds the source's by more than the threshold."""


def is_store(location: str) -> bool:
    """True for a store URL (scheme://...) or a local directory (a store); False for a file."""
    return "://" in location or Path(location).expanduser().is_dir()


def check_data_problem(location: str | None) -> str | None:
    """What is wrong with --check-data before anything is loaded (None: fine or not set)."""
    if location is None or "://" in location:
        return None
    path = Path(location).expanduser()
    if not path.exists():
        return (f"check_data {location}: no such file or directory; pass a .jsonl file (text, "
                "or prompt + reference per record), a text file, or a store URL/directory")
    return None


def held_out_sequences(check_data: str | None, run_store: tuple[str, str] | None, tokenizer,
                       *, length: int, limit: int) -> tuple[dict[str, Any], list[TokenSequence]]:
    """(description of the data for export.json, at most `limit` sequences of at most
    `length` tokens); LogitStoreError when given data is unusable or empty."""
    if check_data is not None and is_store(check_data):
        described, sequences = _read_store(check_data, "auto", tokenizer, length, limit)
    elif check_data is not None:
        described, sequences = _read_file(check_data, tokenizer, length, limit)
    else:
        described, sequences = None, []
        if run_store is not None:
            try:  # the run's store was given to student-train, not here: a fallback is fine
                described, sequences = _read_store(*run_store, tokenizer, length, limit)
            except (LogitStoreError, OSError) as exc:  # gone, cross-tokenizer, no eval split
                log.info("quality gate: not using the run's store %s (%s); using the bundled "
                         "texts", run_store[0], " ".join(str(exc).split())[:200])
        if described is None:
            described, sequences = _read_file(str(BUNDLED_TEXTS), tokenizer, length, limit)
            described["kind"] = "bundled"
    if not sequences:
        raise LogitStoreError(
            f"the quality gate's held-out data {described['path']} gives no sequence with a "
            "scored token (each needs >= 2 tokens); pass --check-data with longer texts")
    described.update(sequences=len(sequences), max_tokens_per_sequence=length)
    return described, sequences


def _read_store(location: str, split: str, tokenizer, length: int,
                limit: int) -> tuple[dict[str, Any], list[TokenSequence]]:
    try:
        used, sequences = sequences_from_store(
            location, tokenizer, split=split, max_length=length, limit=limit,
            hint="pass a store with an eval split, or held-out text (a .jsonl or text file)")
    except StoreTokenizerMismatch as exc:
        raise LogitStoreError(f"--check-data: {exc}; pass held-out text (a .jsonl or text "
                              "file) instead, it is tokenized with the model's own "
                              "tokenizer") from None
    except ConfigError as exc:  # no such split
        raise LogitStoreError(f"--check-data {location}: {'; '.join(exc.problems)}") from None
    return {"kind": "store", "path": location, "split": used}, sequences


def _read_file(location: str, tokenizer, length: int,
               limit: int) -> tuple[dict[str, Any], list[TokenSequence]]:
    texts = read_texts(location, what="check_data")
    sequences = sequences_from_texts(texts, tokenizer, length)[:limit]
    return {"kind": "file", "path": str(Path(location).expanduser().resolve())}, sequences


def compare(source, export, sequences: Sequence[TokenSequence], *,
            threshold: float) -> dict[str, Any]:
    """The gate's figures (module docstring) for two InferenceModels on `sequences`, plus
    "threshold" and "passed"."""
    # The model's vocabulary, which may be padded well past the tokenizer's (a 400-token
    # tokenizer on a 32k-row head): sizing batches by len(tokenizer) could ask for GBs.
    one = np.ones((1, 1), dtype=np.int64)
    vocab = source.logits(one * source.pad_token_id, one).shape[-1]
    lengths = [len(s.ids) for s in sequences]
    budget = max(max(lengths), _BATCH_FLOATS // vocab)
    totals = {"nll_source": 0.0, "nll_export": 0.0, "abs_sum": 0.0, "abs_max": 0.0,
              "agree": 0, "tokens": 0, "entries": 0}
    for batch in padded_batches(lengths, budget, order=by_length(lengths)):
        rows = [sequences[i] for i in batch]
        ids, mask = left_pad([s.ids.tolist() for s in rows], source.pad_token_id)  # [B, T]
        logp_source = _scored_logprobs(source.logits(ids, mask), rows)  # [N, V]
        logp_export = _scored_logprobs(export.logits(ids, mask), rows)  # [N, V]
        if logp_source.shape != logp_export.shape:
            raise LogitStoreError(
                f"the export's logits have shape {logp_export.shape[1:]} per position, the "
                f"source's {logp_source.shape[1:]}: the export is not of this model; "
                "export again from the same MODEL")
        targets = np.concatenate([s.ids[1:][s.targets[1:]] for s in rows])  # [N]
        picked = np.arange(len(targets))
        difference = np.abs(logp_export - logp_source)  # [N, V]
        totals["nll_source"] -= float(logp_source[picked, targets].sum())
        totals["nll_export"] -= float(logp_export[picked, targets].sum())
        totals["abs_sum"] += float(difference.sum())
        totals["abs_max"] = max(totals["abs_max"], float(difference.max(initial=0.0)))
        totals["agree"] += int((logp_source.argmax(1) == logp_export.argmax(1)).sum())
        totals["tokens"] += len(targets)
        totals["entries"] += difference.size
    return _figures(totals, threshold)


def _scored_logprobs(logits: np.ndarray, rows: Sequence[TokenSequence]) -> np.ndarray:
    """Log-softmax (float64) [N, V] of the positions that predict a scored token, in row
    order; `logits` [B, T, V] of left-padded rows (row i's last len(ids) positions)."""
    width = logits.shape[1]
    picked = []
    for row, seq in enumerate(rows):
        start = width - len(seq.ids)
        # Position start + t predicts token t + 1: keep those whose token is a target.
        predicts = np.nonzero(seq.targets[1:])[0]
        picked.append(logits[row, start + predicts])
    values = np.concatenate(picked).astype(np.float64)  # [N, V]
    peak = values.max(axis=1, keepdims=True)
    return values - (peak + np.log(np.exp(values - peak).sum(axis=1, keepdims=True)))


def _figures(totals: dict[str, float], threshold: float) -> dict[str, Any]:
    tokens = totals["tokens"]
    nll_source, nll_export = totals["nll_source"] / tokens, totals["nll_export"] / tokens
    ratio = math.exp(nll_export - nll_source)
    finite = all(math.isfinite(v) for v in (nll_source, nll_export, totals["abs_sum"]))
    return {
        "tokens": int(tokens),
        "max_abs_logprob_diff": totals["abs_max"],
        "mean_abs_logprob_diff": totals["abs_sum"] / max(totals["entries"], 1),
        "source_perplexity": math.exp(min(nll_source, 700.0)),
        "export_perplexity": math.exp(min(nll_export, 700.0)),
        "perplexity_ratio": ratio,
        "top1_agreement": totals["agree"] / tokens,
        "threshold": threshold,
        # NaN logits make every comparison false: a NaN export must fail, not pass.
        "passed": bool(finite and ratio <= threshold),
    }


def failure_message(quality: dict[str, Any], out_dir: Path, quantize: str, *,
                    kept: bool = True) -> str:
    """One paragraph: why the gate failed, where the files are (`kept` in out_dir; else
    removed, and the previous export in out_dir left as it was), what to do."""
    data = quality.get("data", {})
    hint = ("export with --quantize none (fp32), or accept the loss with a higher "
            "--max-ppl-ratio" if quantize == "int8" else
            "an fp32 export should match its source almost exactly, so this points to an "
            "exporter problem: try --format torch, or rerun with -v and report it")
    where = (f"The files are kept in {out_dir} for inspection (export.json \"quality\" has "
             f"\"passed\": false)." if kept else
             f"The previous export in {out_dir} is left as it was and the failed one was "
             "removed (export to a new directory to inspect its files).")
    return (
        f"quality gate failed: the export's perplexity is {quality['perplexity_ratio']:.6g} "
        f"times the source model's (ratio {quality['perplexity_ratio']:.6g} > threshold "
        f"{quality['threshold']:.6g}; perplexity {quality['export_perplexity']:.6g} against "
        f"{quality['source_perplexity']:.6g} on {quality['tokens']} tokens of "
        f"{data.get('path', 'the held-out data')}; largest log-prob difference "
        f"{quality['max_abs_logprob_diff']:.4g}, mean {quality['mean_abs_logprob_diff']:.4g}). "
        f"{where} To fix: {hint}.")
