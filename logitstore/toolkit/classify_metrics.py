"""Classifier metrics per head, with standard errors and paired differences (numpy only).

Shared by student-train (eval records, early stopping on `mean_macro_f1`) and distill-eval
(the same metrics for teacher, student and baseline, and whether a difference is resolved).

Interface
---------
    head_metrics(scores [N, C], labels [N], *, kind="logits", ece_bins=15, bootstrap=200,
                 seed=0) -> HeadMetrics
    classifier_metrics({head: scores}, {head: labels}, **same options) -> ClassifierMetrics
        .heads {head: HeadMetrics}, .mean_macro_f1, .mean_macro_f1_se
    mean_macro_f1({head: HeadMetrics}) -> float | None           the early-stopping metric
    paired_difference(scores_a, scores_b, labels, **same options) -> {metric: Difference | None}
    paired_differences({head: scores_a}, {head: scores_b}, {head: labels}, **same options)
        -> PairedComparison(.heads {head: {metric: Difference | None}}, .mean_macro_f1)
    Difference(metric, value = a - b, stderr, n).resolved / .better ("a", "b" or None)
    Every result has .to_dict(): JSON-ready, never NaN or inf (missing = None).

`scores` are logits (kind="logits"; -inf allowed, e.g. masked classes) or probabilities
(kind="probabilities"; rows must sum to 1 within 1e-3 and are renormalised). Labels -100 and
-1 are unlabelled: skipped by every metric and counted in `unlabelled`.

Conventions
-----------
* Prediction: the arg-max class (ties: the lowest index); confidence: its probability.
* accuracy: correct / labelled. SE: the binomial sqrt(p (1 - p) / (n - 1)), which is the
  sd/sqrt(n) of per-sample correctness that eval/uncertainty.py uses.
* macro-F1: scikit-learn's f1_score(average="macro", zero_division=0) with labels=None,
  i.e. the mean F1 over the classes present in the labels OR the predictions; a class
  absent from both is left out (its per-class F1 is None), a class in the labels but never
  predicted (or predicted but never a label) counts with F1 = 0.
* ECE: equal-width confidence bins over [0, 1] (default 15), right-closed (lo, hi] as in
  Guo et al. 2017: sum over bins of |sum(correct - confidence)| / n.
* NLL: mean -log p(label) in nats, p floored at PROBABILITY_FLOOR so that one impossible
  prediction (a -inf logit on the label) stays finite; such samples are counted in
  `nll_floored`. SE: sd/sqrt(n).
* confusion[true][predicted], labelled samples only.
* macro-F1 and ECE SEs: the sd (n - 1) of the metric over `bootstrap` resamples of the
  samples, drawn with numpy's default_rng(seed) (deterministic for a seed). For several
  heads, `mean_macro_f1_se` resamples the rows (all heads together, as they share rows).
* Paired differences (a - b on the same samples): accuracy and NLL through the per-sample
  differences (sd(d)/sqrt(n)); macro-F1, ECE and mean macro-F1 through a bootstrap that
  resamples the same rows for both models, so shared difficulty cancels. `resolved` =
  |difference| > RESOLVED_AT standard errors, as in eval/uncertainty.py.
* Fewer than 2 labelled samples: SEs are None; no labelled sample: every metric is None and
  `reason` says why.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

UNLABELLED = (-100, -1)
KINDS = ("logits", "probabilities")
DEFAULT_ECE_BINS = 15
DEFAULT_BOOTSTRAP = 200
RESOLVED_AT = 2.0  # |difference| > 2 standard errors (about 95 %, two-sided), as eval/
PROBABILITY_FLOOR = 1e-12  # NLL is capped at -log(1e-12) ~ 27.6 nats per sample
METRICS = ("accuracy", "macro_f1", "ece", "nll")
HIGHER_IS_BETTER = {"accuracy": True, "macro_f1": True, "ece": False, "nll": False,
                    "mean_macro_f1": True}
_PROBABILITY_SUM_TOLERANCE = 1e-3
_MAX_DRAWS_PER_CHUNK = 1 << 22  # bootstrap indices held at once: 32 MiB of int64


@dataclass(frozen=True)
class HeadMetrics:
    """One head's metrics over its labelled samples (None: not computable, see `reason`)."""
    num_classes: int
    labelled: int
    unlabelled: int
    accuracy: float | None = None
    accuracy_se: float | None = None
    macro_f1: float | None = None
    macro_f1_se: float | None = None
    ece: float | None = None
    ece_se: float | None = None
    nll: float | None = None
    nll_se: float | None = None
    nll_floored: int = 0
    per_class_f1: list = field(default_factory=list)  # [C], None: class absent
    confusion: list = field(default_factory=list)  # [C][C] ints, rows = true class
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ClassifierMetrics:
    heads: dict[str, HeadMetrics]
    mean_macro_f1: float | None
    mean_macro_f1_se: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"heads": {name: m.to_dict() for name, m in self.heads.items()},
                "mean_macro_f1": self.mean_macro_f1, "mean_macro_f1_se": self.mean_macro_f1_se}


@dataclass(frozen=True)
class Difference:
    """metric(a) - metric(b) over the same `n` samples, with its paired standard error."""
    metric: str
    value: float
    stderr: float | None
    n: int
    paired: bool = True

    @property
    def resolved(self) -> bool:
        return self.stderr is not None and self.value != 0 and \
            abs(self.value) > RESOLVED_AT * self.stderr

    @property
    def better(self) -> str | None:
        """"a" or "b", whichever the metric favours; None for a tie."""
        if self.value == 0:
            return None
        return "a" if (self.value > 0) == HIGHER_IS_BETTER[self.metric] else "b"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "resolved": self.resolved, "better": self.better}


@dataclass(frozen=True)
class PairedComparison:
    heads: dict[str, dict[str, Difference | None]]
    mean_macro_f1: Difference | None

    def to_dict(self) -> dict[str, Any]:
        return {"heads": {name: {k: d.to_dict() if d else None for k, d in diffs.items()}
                          for name, diffs in self.heads.items()},
                "mean_macro_f1": self.mean_macro_f1.to_dict() if self.mean_macro_f1 else None}


@dataclass(frozen=True)
class _Rows:
    """One head's per-row quantities; rows with labelled False take part in nothing."""
    labelled: np.ndarray  # [N] bool
    target: np.ndarray  # [N] int64 (0 where unlabelled)
    predicted: np.ndarray  # [N] int64
    confidence: np.ndarray  # [N] float64, probability of the predicted class
    nll: np.ndarray  # [N] float64, floored, 0 where unlabelled
    num_classes: int

    def subset(self, keep: np.ndarray) -> "_Rows":
        return _Rows(self.labelled[keep], self.target[keep], self.predicted[keep],
                     self.confidence[keep], self.nll[keep], self.num_classes)

    @property
    def correct(self) -> np.ndarray:  # [N] float64
        return (self.labelled & (self.predicted == self.target)).astype(np.float64)


def _check_options(kind: str, ece_bins: int, bootstrap: int) -> None:
    if kind not in KINDS:
        raise ValueError(f"scores kind must be one of {KINDS}, found {kind!r}")
    if not isinstance(ece_bins, int) or ece_bins < 1:
        raise ValueError(f"ece_bins must be an integer >= 1, found {ece_bins!r}")
    if not isinstance(bootstrap, int) or bootstrap < 0:
        raise ValueError(f"bootstrap must be an integer >= 0 (0: no bootstrap SEs), "
                         f"found {bootstrap!r}")


def _labels(labels: Any, n_rows: int, num_classes: int, head: str) -> tuple[np.ndarray, np.ndarray]:
    """(labelled [N] bool, target [N] int64) from labels [N], checked."""
    raw = np.asarray(labels)
    if raw.shape != (n_rows,):
        raise ValueError(f"head {head!r}: expected labels of shape ({n_rows},) to match the "
                         f"scores' rows, found {raw.shape}")
    if raw.dtype.kind not in "iu" and n_rows:
        if raw.dtype.kind not in "fb" or not np.all(np.isfinite(raw)) \
                or not np.all(raw == np.round(raw)):
            raise ValueError(f"head {head!r}: expected integer labels, found dtype {raw.dtype} "
                             f"with non-integer values; pass class indices")
    values = raw.astype(np.int64)
    labelled = ~np.isin(values, UNLABELLED)
    bad = labelled & ((values < 0) | (values >= num_classes))
    if bad.any():
        raise ValueError(f"head {head!r}: labels must be in [0, {num_classes}) or one of "
                         f"{UNLABELLED} (unlabelled), found {int(values[bad][0])} at row "
                         f"{int(np.flatnonzero(bad)[0])} ({int(bad.sum())} such rows); fix "
                         f"the labels or the head's class count")
    return labelled, np.where(labelled, values, 0)


def _log_probabilities(scores: np.ndarray, kind: str, head: str) -> np.ndarray:
    """log p [N, C] from logits or probabilities, after checking that they are valid."""
    if np.isnan(scores).any() or np.isposinf(scores).any():
        raise ValueError(f"head {head!r}: scores contain NaN or +inf "
                         f"({int(np.isnan(scores).sum())} NaN); expected finite {kind} "
                         f"(-inf logits allowed)")
    if kind == "logits":
        row_max = scores.max(axis=1, keepdims=True)  # [N, 1]
        if np.isneginf(row_max).any():
            raise ValueError(f"head {head!r}: row {int(np.flatnonzero(np.isneginf(row_max))[0])}"
                             f" has every logit -inf; expected at least one finite logit")
        shifted = scores - row_max
        return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    sums = scores.sum(axis=1)
    if (scores < 0).any() or np.abs(sums - 1).max(initial=0) > _PROBABILITY_SUM_TOLERANCE:
        raise ValueError(f"head {head!r}: expected probabilities >= 0 whose rows sum to 1 "
                         f"(within {_PROBABILITY_SUM_TOLERANCE}), found a minimum of "
                         f"{scores.min():.3g} and row sums in [{sums.min():.6g}, "
                         f"{sums.max():.6g}]; pass kind='logits' for logits")
    with np.errstate(divide="ignore"):
        return np.log(scores / sums[:, None])


def _prepare(scores: Any, labels: Any, kind: str, head: str = "head") -> _Rows:
    """Per-row predictions, confidences and NLLs of one head; raises on invalid input."""
    array = np.asarray(scores, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] < 1:
        raise ValueError(f"head {head!r}: expected scores of shape [N, C] with C >= 1, "
                         f"found {array.shape}")
    n_rows, num_classes = array.shape
    labelled, target = _labels(labels, n_rows, num_classes, head)
    log_p = _log_probabilities(array, kind, head)  # [N, C]
    predicted = log_p.argmax(axis=1) if n_rows else np.zeros(0, np.int64)
    confidence = np.exp(log_p[np.arange(n_rows), predicted])
    label_log_p = log_p[np.arange(n_rows), target]
    nll = np.where(labelled, -np.maximum(label_log_p, math.log(PROBABILITY_FLOOR)), 0.0)
    return _Rows(labelled, target, predicted.astype(np.int64), confidence, nll, num_classes)


def _class_counts(rows: _Rows, draws: np.ndarray) -> tuple[np.ndarray, ...]:
    """(true positives, label counts, prediction counts), each [b, C], of the resamples
    draws [b, N] (row indices); unlabelled rows fall into an extra, dropped class slot."""
    size = rows.num_classes + 1
    offset = np.arange(draws.shape[0])[:, None] * size  # [b, 1]
    dump = rows.num_classes

    def count(per_row: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        keys = (per_row[draws] + offset).ravel()
        w = None if weights is None else weights[draws].ravel()
        return np.bincount(keys, w, minlength=draws.shape[0] * size).reshape(-1, size)[:, :dump]

    target = np.where(rows.labelled, rows.target, dump)
    predicted = np.where(rows.labelled, rows.predicted, dump)
    return count(target, rows.correct), count(target), count(predicted)


def _f1_from_counts(tp: np.ndarray, support: np.ndarray, predicted: np.ndarray):
    """(per-class F1 [..., C], NaN for classes in neither labels nor predictions;
    macro-F1 [...] over the present classes, NaN if none)."""
    denominator = support + predicted  # = 2 tp + fp + fn
    present = denominator > 0
    per_class = np.where(present, 2 * tp / np.maximum(denominator, 1), np.nan)
    count = present.sum(axis=-1)
    total = np.where(present, per_class, 0).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return per_class, np.where(count > 0, total / count, np.nan)


def _bin_index(confidence: np.ndarray, bins: int) -> np.ndarray:
    """Bin k holds confidences in (k/bins, (k+1)/bins]; [N] int64."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    return np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)


def _ece(rows: _Rows, draws: np.ndarray, bins: int) -> np.ndarray:
    """ECE [b] of the resamples draws [b, N]; NaN where a resample has no labelled row."""
    gap = np.where(rows.labelled, rows.correct - rows.confidence, 0.0)  # [N]
    offset = np.arange(draws.shape[0])[:, None] * bins
    keys = (_bin_index(rows.confidence, bins)[draws] + offset).ravel()
    per_bin = np.bincount(keys, gap[draws].ravel(), minlength=draws.shape[0] * bins)
    labelled = rows.labelled[draws].sum(axis=1)  # [b]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(labelled > 0, np.abs(per_bin.reshape(-1, bins)).sum(axis=1)
                        / labelled, np.nan)


def _draws(n_rows: int, bootstrap: int, seed: int) -> Iterator[np.ndarray]:
    """Bootstrap resamples of n_rows rows, [b, n_rows] index chunks, `bootstrap` in all."""
    rng = np.random.default_rng(seed)
    per_chunk = max(1, _MAX_DRAWS_PER_CHUNK // max(n_rows, 1))
    done = 0
    while done < bootstrap:
        b = min(per_chunk, bootstrap - done)
        yield rng.integers(0, n_rows, size=(b, n_rows))
        done += b


def _resampled(heads: Sequence[_Rows], bootstrap: int, seed: int,
               bins: int) -> tuple[np.ndarray, np.ndarray]:
    """(macro-F1 [H, B], ECE [H, B]) of every head on the same resamples of their shared rows."""
    f1_chunks, ece_chunks = [], []
    for draws in _draws(len(heads[0].labelled), bootstrap, seed):
        f1_chunks.append([_f1_from_counts(*_class_counts(rows, draws))[1] for rows in heads])
        ece_chunks.append([_ece(rows, draws, bins) for rows in heads])
    if not f1_chunks:
        empty = np.zeros((len(heads), 0))
        return empty, empty
    return np.concatenate(f1_chunks, axis=1), np.concatenate(ece_chunks, axis=1)


def _spread(values: np.ndarray) -> float | None:
    """Bootstrap SE: sd (n - 1) of the finite values; None with fewer than 2."""
    finite = values[np.isfinite(values)]
    return float(np.std(finite, ddof=1)) if finite.size >= 2 else None


def _mean_se(values: np.ndarray) -> float | None:
    return float(np.std(values, ddof=1) / math.sqrt(values.size)) if values.size >= 2 else None


def _nan_mean(values: np.ndarray) -> np.ndarray:
    """Mean over axis 0 of the finite values [H, B] -> [B], NaN where none is finite."""
    finite = np.isfinite(values)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(finite, values, 0).sum(axis=0) / finite.sum(axis=0)


def _point(rows: _Rows, bins: int) -> dict[str, Any]:
    """Point metrics of the labelled rows of one head (at least one)."""
    kept = rows.subset(rows.labelled)
    n, classes = len(kept.labelled), rows.num_classes
    confusion = np.bincount(kept.target * classes + kept.predicted,
                            minlength=classes * classes).reshape(classes, classes)
    per_class, macro = _f1_from_counts(np.diag(confusion), confusion.sum(axis=1),
                                       confusion.sum(axis=0))
    accuracy = float(kept.correct.mean())
    return {
        "accuracy": accuracy,
        "accuracy_se": math.sqrt(accuracy * (1 - accuracy) / (n - 1)) if n >= 2 else None,
        "macro_f1": float(macro), "ece": float(_ece(kept, np.arange(n)[None], bins)[0]),
        "nll": float(kept.nll.mean()), "nll_se": _mean_se(kept.nll),
        "nll_floored": int((kept.nll >= -math.log(PROBABILITY_FLOOR)).sum()),
        "per_class_f1": [None if math.isnan(f) else float(f) for f in per_class],
        "confusion": confusion.tolist()}


def _head_metrics(rows: _Rows, bins: int, bootstrap: int, seed: int) -> HeadMetrics:
    n_rows, n = len(rows.labelled), int(rows.labelled.sum())
    base = {"num_classes": rows.num_classes, "labelled": n, "unlabelled": n_rows - n}
    if n == 0:
        why = "no sample" if n_rows == 0 else f"all {n_rows} samples are unlabelled"
        return HeadMetrics(**base, per_class_f1=[None] * rows.num_classes,
                           confusion=[[0] * rows.num_classes for _ in range(rows.num_classes)],
                           reason=f"no labelled sample ({why})")
    f1_draws, ece_draws = _resampled([rows.subset(rows.labelled)], bootstrap if n >= 2 else 0,
                                     seed, bins)
    return HeadMetrics(**base, **_point(rows, bins), macro_f1_se=_spread(f1_draws[0]),
                       ece_se=_spread(ece_draws[0]))


def head_metrics(scores: Any, labels: Any, *, kind: str = "logits",
                 ece_bins: int = DEFAULT_ECE_BINS, bootstrap: int = DEFAULT_BOOTSTRAP,
                 seed: int = 0) -> HeadMetrics:
    """Metrics of one head: scores [N, C] (logits or probabilities), labels [N]."""
    _check_options(kind, ece_bins, bootstrap)
    return _head_metrics(_prepare(scores, labels, kind), ece_bins, bootstrap, seed)


def mean_macro_f1(heads: Mapping[str, HeadMetrics]) -> float | None:
    """Mean macro-F1 over the heads that have one (early stopping); None if none has."""
    values = [m.macro_f1 for m in heads.values() if m.macro_f1 is not None]
    return math.fsum(values) / len(values) if values else None


def _prepare_heads(scores: Mapping[str, Any], labels: Mapping[str, Any],
                   kind: str) -> dict[str, _Rows]:
    """Every head's rows; the heads must match and share their row count."""
    if set(scores) != set(labels) or not scores:
        raise ValueError(f"expected the same, non-empty set of heads in scores and labels, "
                         f"found {sorted(scores)} and {sorted(labels)}")
    rows = {name: _prepare(scores[name], labels[name], kind, name) for name in scores}
    counts = {name: len(r.labelled) for name, r in rows.items()}
    if len(set(counts.values())) > 1:
        raise ValueError(f"expected every head to score the same rows, found row counts "
                         f"{counts}")
    return rows


def classifier_metrics(scores: Mapping[str, Any], labels: Mapping[str, Any], *,
                       kind: str = "logits", ece_bins: int = DEFAULT_ECE_BINS,
                       bootstrap: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> ClassifierMetrics:
    """Metrics of every head ({head: scores [N, C_head]}, {head: labels [N]}) and their
    mean macro-F1, whose SE resamples the N rows for all heads together."""
    _check_options(kind, ece_bins, bootstrap)
    rows = _prepare_heads(scores, labels, kind)
    heads = {name: _head_metrics(r, ece_bins, bootstrap, seed) for name, r in rows.items()}
    mean = mean_macro_f1(heads)
    n_rows = len(next(iter(rows.values())).labelled)
    mean_se = None
    if mean is not None and n_rows >= 2:
        f1_draws, _ = _resampled(list(rows.values()), bootstrap, seed, ece_bins)
        mean_se = _spread(_nan_mean(f1_draws))
    return ClassifierMetrics(heads, mean, mean_se)


def _paired_head(a: _Rows, b: _Rows, bins: int, bootstrap: int,
                 seed: int, head: str) -> dict[str, Difference | None]:
    if a.num_classes != b.num_classes:
        raise ValueError(f"head {head!r}: the two models must score the same classes, found "
                         f"{a.num_classes} and {b.num_classes}")
    n = int(a.labelled.sum())
    if n == 0:
        return {metric: None for metric in METRICS}
    a, b = a.subset(a.labelled), b.subset(b.labelled)
    point_a, point_b = _point(a, bins), _point(b, bins)
    f1_draws, ece_draws = _resampled([a, b], bootstrap if n >= 2 else 0, seed, bins)
    stderr = {"accuracy": _mean_se(a.correct - b.correct), "nll": _mean_se(a.nll - b.nll),
              "macro_f1": _spread(f1_draws[0] - f1_draws[1]),
              "ece": _spread(ece_draws[0] - ece_draws[1])}
    return {metric: Difference(metric, point_a[metric] - point_b[metric], stderr[metric], n)
            for metric in METRICS}


def paired_difference(scores_a: Any, scores_b: Any, labels: Any, *, kind: str = "logits",
                      ece_bins: int = DEFAULT_ECE_BINS, bootstrap: int = DEFAULT_BOOTSTRAP,
                      seed: int = 0) -> dict[str, Difference | None]:
    """{metric: a - b} for two models' scores [N, C] of one head on the same labels [N];
    None per metric when there is no labelled sample."""
    _check_options(kind, ece_bins, bootstrap)
    a, b = _prepare(scores_a, labels, kind, "a"), _prepare(scores_b, labels, kind, "b")
    return _paired_head(a, b, ece_bins, bootstrap, seed, "head")


def paired_differences(scores_a: Mapping[str, Any], scores_b: Mapping[str, Any],
                       labels: Mapping[str, Any], *, kind: str = "logits",
                       ece_bins: int = DEFAULT_ECE_BINS, bootstrap: int = DEFAULT_BOOTSTRAP,
                       seed: int = 0) -> PairedComparison:
    """Per-head differences a - b and the difference of the mean macro-F1, whose SE
    resamples the shared rows for both models and every head together."""
    _check_options(kind, ece_bins, bootstrap)
    if set(scores_a) != set(scores_b):
        raise ValueError(f"expected both models to have the same heads, found "
                         f"{sorted(scores_a)} and {sorted(scores_b)}")
    rows_a = _prepare_heads(scores_a, labels, kind)
    rows_b = _prepare_heads(scores_b, labels, kind)
    heads = {name: _paired_head(rows_a[name], rows_b[name], ece_bins, bootstrap, seed, name)
             for name in rows_a}
    if not any(d["macro_f1"] for d in heads.values()):  # no head has a labelled sample
        return PairedComparison(heads, None)
    point = {side: mean_macro_f1({name: _head_metrics(r, ece_bins, 0, seed)
                                  for name, r in rows.items()})
             for side, rows in (("a", rows_a), ("b", rows_b))}
    n_rows, names = len(next(iter(rows_a.values())).labelled), list(rows_a)
    f1_draws, _ = _resampled([rows_a[k] for k in names] + [rows_b[k] for k in names],
                             bootstrap if n_rows >= 2 else 0, seed, ece_bins)
    diffs = _nan_mean(f1_draws[:len(names)]) - _nan_mean(f1_draws[len(names):])
    return PairedComparison(heads, Difference("mean_macro_f1", point["a"] - point["b"],
                                              _spread(diffs), n_rows))
