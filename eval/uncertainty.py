"""Standard errors of the report's metrics and of the differences between two models.

Every metric the report compares is a ratio of sums over independent items (questions,
held-out sequences): R = sum(num_i) / sum(den_i). For a per-question score (accuracy,
ROUGE) den_i = 1 and R is the plain mean; for held-out NLL num_i is a sequence's NLL sum
and den_i its token count; next-token accuracy has correct predictions over tokens.
Perplexity is exp(NLL), a transform of such a ratio.

The standard error comes from the linearisation (delta method) of R over items:

    z_i = (num_i - R * den_i) / mean(den)          sum(z_i) = 0
    SE(R) = sd(z) / sqrt(n)                        sd with n - 1 degrees of freedom
    SE(g(R)) = |g'(R)| * SE(R)                     (perplexity: g = g' = exp)

For den_i = 1 this is sd(x)/sqrt(n), the binomial standard error sqrt(p(1-p)/(n-1)) of an
accuracy, and lm-eval's own `acc_stderr`. A difference between two models scored on the
same items is paired: d = g(R_a) - g(R_b) over the items both have, with
SE(d) = sd(g'(R_a) z_a,i - g'(R_b) z_b,i) / sqrt(n); each item's shared difficulty
cancels, so it is much smaller than the unpaired sqrt(SE_a^2 + SE_b^2), which is used
only where per-item scores are missing. A difference is *resolved* when
|d| > RESOLVED_AT standard errors (about a 95 % two-sided test).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

RESOLVED_AT = 2.0  # |difference| > 2 standard errors: resolved
# metric -> (g, g'): metrics reported as a transform of a ratio of sums.
TRANSFORMS: dict[str, tuple[Callable[[float], float], Callable[[float], float]]] = {
    "perplexity": (math.exp, math.exp),
}
_IDENTITY = (lambda r: r, lambda r: 1.0)

# One item's score: a number (den = 1) or [numerator, denominator].
Items = Mapping[str, Any]


@dataclass(frozen=True)
class Estimate:
    value: float
    stderr: float | None  # None: not computable (fewer than 2 items, no per-item data)
    n: int | None  # items it is computed over (None: unknown, e.g. lm-eval's stderr)
    paired: bool = False


def _pair(score: Any) -> tuple[float, float] | None:
    if isinstance(score, bool):
        return None
    if isinstance(score, (int, float)):
        return (float(score), 1.0) if math.isfinite(score) else None
    if isinstance(score, (list, tuple)) and len(score) == 2:
        num, den = (_pair(x) for x in score)
        if num is None or den is None or den[0] <= 0:
            return None
        return num[0], den[0]
    return None


def clean(items: Items | None) -> dict[str, tuple[float, float]]:
    """{item id: (num, den)}, items that are not finite numbers (or den <= 0) dropped."""
    out = {}
    for key, score in (items or {}).items():
        pair = _pair(score)
        if pair is not None:
            out[str(key)] = pair
    return out


def _influence(items: dict[str, tuple[float, float]]) -> tuple[float, dict[str, float]]:
    """(R, {id: z_i}) of the ratio of sums over `items` (see the module docstring)."""
    num = math.fsum(n for n, _ in items.values())
    den = math.fsum(d for _, d in items.values())
    ratio = num / den
    mean_den = den / len(items)
    return ratio, {k: (n - ratio * d) / mean_den for k, (n, d) in items.items()}


def _se(values: list[float]) -> float:
    n = len(values)
    mean = math.fsum(values) / n
    return math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1) / n)


def estimate(items: Items | None, metric: str = "") -> Estimate | None:
    """The metric over its items and its standard error; None without any item."""
    cleaned = clean(items)
    if not cleaned:
        return None
    g, dg = TRANSFORMS.get(metric, _IDENTITY)
    ratio, z = _influence(cleaned)
    if len(cleaned) < 2:
        return Estimate(g(ratio), None, 1)
    return Estimate(g(ratio), abs(dg(ratio)) * _se(list(z.values())), len(cleaned))


def paired_difference(a: Items | None, b: Items | None, metric: str = "") -> Estimate | None:
    """metric(a) - metric(b) over the items both have, with its paired standard error;
    None when fewer than 2 items are shared."""
    a_items, b_items = clean(a), clean(b)
    shared = sorted(a_items.keys() & b_items.keys())
    if len(shared) < 2:
        return None
    g, dg = TRANSFORMS.get(metric, _IDENTITY)
    ra, za = _influence({k: a_items[k] for k in shared})
    rb, zb = _influence({k: b_items[k] for k in shared})
    diffs = [dg(ra) * za[k] - dg(rb) * zb[k] for k in shared]
    return Estimate(g(ra) - g(rb), _se(diffs), len(shared), paired=True)


def unpaired_difference(a: float | None, se_a: float | None, b: float | None,
                        se_b: float | None) -> Estimate | None:
    """a - b with SE sqrt(se_a^2 + se_b^2) (independent errors); None if any is missing."""
    if a is None or b is None:
        return None
    stderr = math.sqrt(se_a ** 2 + se_b ** 2) if se_a is not None and se_b is not None \
        else None
    return Estimate(a - b, stderr, None)


def is_resolved(diff: Estimate | None) -> bool:
    """|difference| > RESOLVED_AT standard errors (False when there is no standard error)."""
    if diff is None or diff.stderr is None or diff.value == 0:
        return False
    return abs(diff.value) > RESOLVED_AT * diff.stderr


def sequence_items(per_sequence: list[dict[str, float]]) -> dict[str, dict[str, list[float]]]:
    """Per-item scores of a perplexity task from score_sequences(per_sequence=...):
    metric -> {sequence id: [numerator, denominator]}."""
    nll = {str(s["index"]): [s["nll"], s["tokens"]] for s in per_sequence}
    out = {"nll": nll, "perplexity": nll,
           "next_token_accuracy": {str(s["index"]): [s["correct"], s["tokens"]]
                                   for s in per_sequence}}
    if any("bytes" in s for s in per_sequence):  # bits over bytes, where known
        out["bits_per_byte"] = {str(s["index"]): [s["text_nll"] / math.log(2), s["bytes"]]
                                for s in per_sequence if "bytes" in s}
    return out
