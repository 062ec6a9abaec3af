"""Paired statistics and the Pareto front of bench/fidelity.py (pure Python, no models).

Every student of a seed starts from the same weights and sees the same batches, so the
question "how far is method M from online KD" is answered per seed, by the difference of the
two students of that seed; its mean over seeds and a 95 % Student-t interval say how well the
seeds pin it down (the seed-to-seed spread of each method alone is several times larger and
mostly shared, so unpaired mean ± std cannot resolve a 0.5 % gap).

paired_gap        per-seed relative differences (a - b) / b, their mean, 95 % t-interval
verdict           what an interval resolves against 0 and against a +0.5 % limit
t_quantile_975    the two-sided 95 % quantile of Student's t (table; no scipy needed)
pareto_front      the configurations no other one beats on both bytes and quality
kept_share        share of online KD's gain over CE that a method keeps, or None + reason
"""

from __future__ import annotations

import math
import statistics

# two-sided 95 %: t_{0.975, df} for df = 1..30 (standard table values, 3 decimals)
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
         2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
         2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
Z_975 = 1.959964
WITHIN_LIMIT = 0.005  # issue 12: "within 0.5 % of online KD" on held-out NLL


def t_quantile_975(df: int) -> float:
    """t_{0.975, df}: the table up to 30 degrees of freedom (rounded to 3 decimals), above
    it the Cornish-Fisher expansion around the normal quantile (error < 1e-4 there)."""
    if df < 1:
        raise ValueError(f"expected degrees of freedom >= 1, found {df}")
    if df <= len(T_975):
        return T_975[df - 1]
    z = Z_975
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def interval(values: list[float]) -> dict:
    """Mean, sample std, and the 95 % t-interval of the mean (None with one value)."""
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return {"n": n, "mean": mean, "std": None, "half_width": None, "low": None,
                "high": None, "values": list(values)}
    std = statistics.stdev(values)
    half = t_quantile_975(n - 1) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "half_width": half, "low": mean - half,
            "high": mean + half, "values": list(values)}


def paired_gap(a: list[float], b: list[float]) -> dict:
    """(a_s - b_s) / b_s per seed s (a relative gap, e.g. 0.004 = +0.4 %) and its interval."""
    if len(a) != len(b) or not a:
        raise ValueError(f"expected the same non-zero number of seeds for both methods, "
                         f"found {len(a)} and {len(b)}")
    return interval([(x - y) / y for x, y in zip(a, b)])


def verdict(gap: dict, limit: float = WITHIN_LIMIT) -> dict:
    """What the interval of a relative gap to the reference resolves.

    differs   True: the interval excludes 0 (the method is resolved better or worse);
              None when there is no interval (one seed)
    within    "resolved": the upper end is < +limit (within `limit` of the reference, even
              at the pessimistic end); "excluded": the lower end is > +limit (worse by more
              than `limit`, resolved); "unresolved": the interval holds +limit; "–" with one
              seed
    narrow    the half-width is < limit (the interval could resolve a `limit` gap at all)
    """
    if gap["half_width"] is None:
        return {"differs": None, "within": "–", "narrow": None,
                "reason": "one seed: no interval"}
    differs = gap["low"] > 0 or gap["high"] < 0
    within = ("resolved" if gap["high"] < limit else
              "excluded" if gap["low"] > limit else "unresolved")
    return {"differs": differs, "within": within, "narrow": gap["half_width"] < limit,
            "reason": None}


def kept_share(method: dict, online: dict) -> tuple[float | None, str | None]:
    """Share of online KD's held-out NLL gain over CE only that a method keeps:
    1 - (method - online) / (ce - online), from the paired gaps to CE only.

    method, online: paired_gap(x, ce) intervals (relative to CE only). A ratio whose
    denominator is noise means nothing: None with the reason unless online KD's gain over CE
    is resolved (its interval excludes 0 on the better side)."""
    if online["half_width"] is None:
        return None, "one seed: online KD's gain over CE only is not resolved"
    if not online["high"] < 0:
        return None, (f"online KD's gain over CE only is not resolved "
                      f"({online['mean'] * 100:+.2f} %, 95 % CI {online['low'] * 100:+.2f} .. "
                      f"{online['high'] * 100:+.2f} %)")
    return method["mean"] / online["mean"], None


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names of the points (cost, loss), lower better in both, that no other point dominates
    (another is <= in both and < in one); sorted by cost."""
    front = []
    for name, (cost, loss) in points.items():
        dominated = any(c <= cost and v <= loss and (c < cost or v < loss)
                        for other, (c, v) in points.items() if other != name)
        if not dominated:
            front.append(name)
    return sorted(front, key=lambda n: points[n])
