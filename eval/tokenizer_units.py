"""Which of distill-eval's metrics two models of different tokenizers can be compared on.

Perplexity, NLL and next-token accuracy are per token of each model's own tokenizer: a
student distilled across tokenizers, or a baseline of another family, counts other units
than the teacher, so a ratio or difference of those figures means nothing. The report
(eval/report.py) empties those comparisons for the pairs of roles whose tokenizers differ
(`models[role]["tokenizer_fingerprint"]`, recorded by eval/runner.py) and says why;
bits per byte (eval/perplexity.py) counts the same texts in bytes and compares any two.
"""

from __future__ import annotations

from typing import Any

PER_TOKEN = {"perplexity", "nll", "next_token_accuracy"}
OTHER_TOKENIZERS = ("{a} and {b} have different tokenizers, so their per-token figures count "
                    "different units: compare bits_per_byte (the same texts, in bytes)")
PAIRS = (("student", "teacher"), ("teacher", "baseline"), ("student", "baseline"))


def tokenizer_clash(metric: str, tokenizers: dict) -> tuple[set, str] | None:
    """({(role, role) pairs of different tokenizers}, the first pair's reason) for a
    PER_TOKEN metric; None when every known pair shares its tokenizer."""
    if metric not in PER_TOKEN:
        return None
    pairs = [(a, b) for a, b in PAIRS
             if tokenizers.get(a) and tokenizers.get(b) and tokenizers[a] != tokenizers[b]]
    return (set(pairs), OTHER_TOKENIZERS.format(a=pairs[0][0], b=pairs[0][1])) if pairs \
        else None


def without_cross_tokenizer_comparisons(row: dict, clash: tuple[set, str]) -> dict:
    """The row's comparisons between roles of different tokenizers, emptied, and why."""
    pairs, reason = clash
    out: dict[str, Any] = {"tokenizer_note": reason}
    if ("student", "teacher") in pairs:
        out["retention"] = None
    for role in ("student", "teacher"):
        if (role, "baseline") in pairs:
            out[f"{role}_vs_baseline"] = None
    return out
