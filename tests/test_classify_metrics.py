"""logitstore.toolkit.classify_metrics against straightforward loop references."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from logitstore.toolkit import classify_metrics as cm


# ---- loop references --------------------------------------------------------------------

def ref_softmax(row):
    finite = [x for x in row if x != -math.inf]
    top = max(finite)
    exps = [0.0 if x == -math.inf else math.exp(x - top) for x in row]
    total = sum(exps)
    return [e / total for e in exps]


def ref_predict(row):
    probs = ref_softmax(row)
    best = 0
    for c in range(len(probs)):
        if probs[c] > probs[best]:
            best = c
    return best, probs[best], probs


def ref_metrics(logits, labels, bins=15):
    """accuracy, macro-F1 (sklearn's macro, zero_division=0), ECE, NLL, per-class F1, confusion."""
    rows = [(list(map(float, logits[i])), int(labels[i])) for i in range(len(labels))
            if int(labels[i]) not in (-100, -1)]
    classes = len(logits[0])
    confusion = [[0] * classes for _ in range(classes)]
    correct, nll, bin_gap = 0, 0.0, [0.0] * bins
    for row, label in rows:
        pred, conf, probs = ref_predict(row)
        confusion[label][pred] += 1
        correct += pred == label
        nll += -math.log(max(probs[label], cm.PROBABILITY_FLOOR))
        edges = list(np.linspace(0, 1, bins + 1))
        for k in range(bins):
            if edges[k] < conf <= edges[k + 1]:
                bin_gap[k] += (pred == label) - conf
    per_class = []
    for c in range(classes):
        tp = confusion[c][c]
        fp = sum(confusion[t][c] for t in range(classes)) - tp
        fn = sum(confusion[c]) - tp
        per_class.append(None if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn))
    present = [f for f in per_class if f is not None]
    n = len(rows)
    return {"accuracy": correct / n, "macro_f1": sum(present) / len(present),
            "ece": sum(abs(g) for g in bin_gap) / n, "nll": nll / n,
            "per_class_f1": per_class, "confusion": confusion}


def random_case(rng, n, classes, unlabelled=0.0):
    logits = rng.normal(size=(n, classes)) * 2
    labels = np.where(rng.random(n) < 0.7, logits.argmax(1), rng.integers(0, classes, n))
    labels[rng.random(n) < unlabelled] = -100
    return logits, labels


# ---- point metrics ----------------------------------------------------------------------

@pytest.mark.parametrize("n,classes", [(1, 3), (7, 2), (50, 5), (300, 12), (40, 30)])
def test_metrics_match_loop_reference(n, classes):
    rng = np.random.default_rng(n * 100 + classes)
    logits, labels = random_case(rng, n, classes, unlabelled=0.2 if n > 1 else 0.0)
    got = cm.head_metrics(logits, labels, bootstrap=20)
    want = ref_metrics(logits, labels)
    for key in ("accuracy", "macro_f1", "ece", "nll"):
        assert getattr(got, key) == pytest.approx(want[key], abs=1e-12), key
    assert got.per_class_f1 == pytest.approx(want["per_class_f1"])
    assert got.confusion == want["confusion"]
    assert got.labelled + got.unlabelled == n and got.labelled == int((labels >= 0).sum())


def test_macro_f1_matches_sklearn_when_installed():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(3)
    for n, classes in ((20, 8), (200, 5), (5, 10)):
        logits, labels = random_case(rng, n, classes)
        want = metrics.f1_score(labels, logits.argmax(1), average="macro", zero_division=0)
        assert cm.head_metrics(logits, labels, bootstrap=0).macro_f1 == pytest.approx(want)


def test_ece_bins_are_right_closed_and_configurable():
    # confidence 0.75 sits exactly on an edge of 4 bins: it belongs to (0.5, 0.75]
    probs = np.array([[0.75, 0.25], [0.75, 0.25], [0.9, 0.1]])
    got = cm.head_metrics(probs, [0, 1, 0], kind="probabilities", ece_bins=4, bootstrap=0)
    assert got.ece == pytest.approx((abs(1 + 0 - 1.5) + abs(1 - 0.9)) / 3)
    assert got.ece == pytest.approx(ref_metrics(np.log(probs), [0, 1, 0], bins=4)["ece"])
    one_bin = cm.head_metrics(probs, [0, 1, 0], kind="probabilities", ece_bins=1)
    assert one_bin.ece == pytest.approx(abs(2 - 2.4) / 3)


def test_probabilities_give_the_same_metrics_as_logits():
    rng = np.random.default_rng(4)
    logits, labels = random_case(rng, 80, 4)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    a = cm.head_metrics(logits, labels).to_dict()
    b = cm.head_metrics(probs.astype(np.float32), labels, kind="probabilities").to_dict()
    for key in ("accuracy", "macro_f1", "ece", "nll", "macro_f1_se", "ece_se"):
        assert a[key] == pytest.approx(b[key], rel=1e-5), key


# ---- edge cases -------------------------------------------------------------------------

def test_no_sample_and_all_unlabelled_give_none_with_a_reason():
    empty = cm.head_metrics(np.zeros((0, 3)), np.zeros(0, np.int64))
    unlabelled = cm.head_metrics(np.zeros((4, 3)), [-100, -1, -100, -1])
    for got, why in ((empty, "no sample"), (unlabelled, "all 4 samples are unlabelled")):
        assert why in got.reason
        assert all(getattr(got, k) is None for k in ("accuracy", "macro_f1", "ece", "nll",
                                                     "accuracy_se", "macro_f1_se", "ece_se"))
        assert got.confusion == [[0] * 3] * 3 and got.per_class_f1 == [None] * 3
        json.dumps(got.to_dict(), allow_nan=False)
    assert unlabelled.unlabelled == 4 and unlabelled.labelled == 0


def test_one_sample_has_metrics_but_no_standard_errors():
    got = cm.head_metrics([[2.0, 0.0, 1.0]], [0])
    assert (got.accuracy, got.macro_f1) == (1.0, 1.0)
    assert got.accuracy_se is None and got.macro_f1_se is None and got.ece_se is None
    assert got.nll_se is None and got.reason is None


def test_single_class_head_and_single_label_class():
    one = cm.head_metrics(np.random.default_rng(0).normal(size=(10, 1)), [0] * 10)
    assert (one.accuracy, one.macro_f1, one.ece, one.nll) == (1.0, 1.0, 0.0, 0.0)
    assert one.accuracy_se == 0.0 and one.macro_f1_se == 0.0
    # every label is class 1, predictions 1, 1, 0, 2: F1 over classes {0, 1, 2}, 0 and 2 at 0
    logits = np.eye(3)[[1, 1, 0, 2]] * 5
    got = cm.head_metrics(logits, [1, 1, 1, 1])
    assert got.per_class_f1 == [0.0, pytest.approx(2 * 2 / (2 * 2 + 2)), 0.0]
    assert got.macro_f1 == pytest.approx((2 * 2 / 6) / 3)


def test_class_never_predicted_counts_as_zero_absent_class_is_left_out():
    logits = np.eye(4)[[0, 0, 1, 1]] * 3  # class 2 is a label never predicted; 3 is absent
    got = cm.head_metrics(logits, [0, 2, 1, 1])
    assert got.per_class_f1 == [pytest.approx(2 / 3), 1.0, 0.0, None]
    assert got.macro_f1 == pytest.approx((2 / 3 + 1 + 0) / 3)


def test_minus_inf_logits_masked_classes_and_impossible_labels():
    logits = np.array([[1.0, -np.inf, 0.0], [-np.inf, 2.0, -np.inf], [0.5, 0.1, -np.inf]])
    got = cm.head_metrics(logits, [0, 1, 2])  # the last label has probability 0
    want = ref_metrics(logits, [0, 1, 2])
    assert got.accuracy == pytest.approx(want["accuracy"]) and got.ece == pytest.approx(want["ece"])
    assert got.nll == pytest.approx(want["nll"]) and math.isfinite(got.nll)
    assert got.nll_floored == 1
    json.dumps(got.to_dict(), allow_nan=False)


@pytest.mark.parametrize("scores,labels,kind,message", [
    ([[np.nan, 1.0]], [0], "logits", "NaN"),
    ([[np.inf, 1.0]], [0], "logits", "+inf"),
    ([[-np.inf, -np.inf]], [0], "logits", "every logit -inf"),
    ([[0.2, 0.2]], [0], "probabilities", "sum to 1"),
    ([[1.0, 0.0]], [2], "logits", "labels must be in [0, 2)"),
    ([[1.0, 0.0]], [-5], "logits", "labels must be in [0, 2)"),
    ([[1.0, 0.0]], [0.5], "logits", "integer labels"),
    ([[1.0, 0.0]], [0, 1], "logits", "labels of shape (1,)"),
    ([1.0, 0.0], [0, 1], "logits", "scores of shape [N, C]"),
    ([[1.0, 0.0]], [0], "probs", "kind must be one of"),
])
def test_invalid_inputs_are_refused(scores, labels, kind, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        cm.head_metrics(np.asarray(scores), labels, kind=kind)


# ---- standard errors --------------------------------------------------------------------

def test_bootstrap_matches_a_loop_reference_and_is_deterministic():
    rng = np.random.default_rng(5)
    logits, labels = random_case(rng, 60, 4)
    got = cm.head_metrics(logits, labels, bootstrap=50, seed=11)
    draws = np.random.default_rng(11).integers(0, 60, size=(50, 60))
    f1s, eces = [], []
    for draw in draws:
        ref = ref_metrics(logits[draw], labels[draw])
        f1s.append(ref["macro_f1"])
        eces.append(ref["ece"])
    assert got.macro_f1_se == pytest.approx(np.std(f1s, ddof=1))
    assert got.ece_se == pytest.approx(np.std(eces, ddof=1))
    assert cm.head_metrics(logits, labels, bootstrap=50, seed=11) == got
    other = cm.head_metrics(logits, labels, bootstrap=50, seed=12)
    assert other.macro_f1_se != got.macro_f1_se and other.macro_f1 == got.macro_f1


def test_chunked_bootstrap_equals_one_chunk(monkeypatch):
    logits, labels = random_case(np.random.default_rng(6), 100, 3)
    whole = cm.head_metrics(logits, labels, bootstrap=30, seed=2)
    monkeypatch.setattr(cm, "_MAX_DRAWS_PER_CHUNK", 700)  # 7 resamples per chunk
    assert cm.head_metrics(logits, labels, bootstrap=30, seed=2) == whole


def test_standard_errors_are_plausible():
    logits, labels = random_case(np.random.default_rng(7), 400, 5)
    got = cm.head_metrics(logits, labels)
    p = got.accuracy
    assert got.accuracy_se == pytest.approx(math.sqrt(p * (1 - p) / 399))
    nll = [-math.log(ref_predict(r)[2][y]) for r, y in zip(logits, labels)]
    assert got.nll_se == pytest.approx(np.std(nll, ddof=1) / 20)
    # a bootstrap SE of a proportion-like metric is of the order of the binomial one
    assert 0.3 * got.accuracy_se < got.macro_f1_se < 3 * got.accuracy_se
    assert 0 < got.ece_se < 3 * got.accuracy_se


# ---- several heads ----------------------------------------------------------------------

def test_classifier_metrics_and_mean_macro_f1():
    rng = np.random.default_rng(8)
    a_logits, a_labels = random_case(rng, 120, 5, unlabelled=0.1)
    b_logits, b_labels = random_case(rng, 120, 12)
    got = cm.classifier_metrics({"modality": a_logits, "location": b_logits},
                                {"modality": a_labels, "location": b_labels}, seed=1)
    assert got.heads["modality"] == cm.head_metrics(a_logits, a_labels, seed=1)
    assert got.mean_macro_f1 == pytest.approx(
        (got.heads["modality"].macro_f1 + got.heads["location"].macro_f1) / 2)
    assert 0 < got.mean_macro_f1_se < max(h.macro_f1_se for h in got.heads.values())
    json.dumps(got.to_dict(), allow_nan=False)
    # a head without labels is left out of the mean; no head with labels: None
    skip = cm.classifier_metrics({"x": a_logits, "y": b_logits},
                                 {"x": a_labels, "y": np.full(120, -100)})
    assert skip.mean_macro_f1 == pytest.approx(skip.heads["x"].macro_f1)
    none = cm.classifier_metrics({"y": b_logits}, {"y": np.full(120, -1)})
    assert none.mean_macro_f1 is None and none.mean_macro_f1_se is None
    assert cm.mean_macro_f1({}) is None


def test_classifier_metrics_refuses_mismatched_heads_or_rows():
    with pytest.raises(ValueError, match="same, non-empty set of heads"):
        cm.classifier_metrics({"a": np.zeros((2, 2))}, {"b": [0, 1]})
    with pytest.raises(ValueError, match="same rows"):
        cm.classifier_metrics({"a": np.zeros((2, 2)), "b": np.zeros((3, 2))},
                              {"a": [0, 1], "b": [0, 1, 1]})


# ---- paired differences -----------------------------------------------------------------

def correlated_models(seed, n=400, classes=5):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    difficulty = rng.normal(size=(n, classes)) * 2.5  # shared per-sample difficulty
    signal = np.eye(classes)[labels] * 2
    a = difficulty + signal + 0.4 * rng.normal(size=(n, classes))
    b = difficulty + 0.8 * signal + 0.4 * rng.normal(size=(n, classes))
    return a, b, labels


def test_paired_difference_values_and_smaller_paired_error():
    a, b, labels = correlated_models(9)
    diffs = cm.paired_difference(a, b, labels, seed=3)
    ma, mb = cm.head_metrics(a, labels, seed=3), cm.head_metrics(b, labels, seed=3)
    for metric in cm.METRICS:
        d = diffs[metric]
        assert d.value == pytest.approx(getattr(ma, metric) - getattr(mb, metric))
        unpaired = math.hypot(getattr(ma, metric + "_se"), getattr(mb, metric + "_se"))
        assert d.stderr < unpaired, metric
    correct_a = (a.argmax(1) == labels).astype(float)
    correct_b = (b.argmax(1) == labels).astype(float)
    assert diffs["accuracy"].stderr == pytest.approx(
        np.std(correct_a - correct_b, ddof=1) / math.sqrt(len(labels)))
    assert diffs["macro_f1"].better == "a" and diffs["accuracy"].resolved
    record = diffs["nll"].to_dict()
    assert record["better"] == "a" and record["paired"] and record["n"] == len(labels)


def test_paired_difference_bootstrap_uses_shared_resamples():
    a, b, labels = correlated_models(10, n=50, classes=3)
    got = cm.paired_difference(a, b, labels, bootstrap=40, seed=4)["macro_f1"]
    draws = np.random.default_rng(4).integers(0, 50, size=(40, 50))
    ref = [ref_metrics(a[d], labels[d])["macro_f1"] - ref_metrics(b[d], labels[d])["macro_f1"]
           for d in draws]
    assert got.stderr == pytest.approx(np.std(ref, ddof=1))


def test_difference_resolution_and_edge_cases():
    assert cm.Difference("ece", -0.05, 0.01, 100).better == "a"
    assert cm.Difference("ece", -0.05, 0.01, 100).resolved
    assert not cm.Difference("accuracy", 0.01, 0.01, 100).resolved
    assert not cm.Difference("accuracy", 0.01, None, 1).resolved
    assert cm.Difference("accuracy", 0.0, 0.0, 9).better is None
    unlabelled = cm.paired_difference(np.zeros((3, 2)), np.ones((3, 2)), [-100] * 3)
    assert unlabelled == {metric: None for metric in cm.METRICS}
    single = cm.paired_difference([[1.0, 0.0]], [[0.0, 1.0]], [0])
    assert single["accuracy"].value == 1.0 and single["accuracy"].stderr is None
    with pytest.raises(ValueError, match="same classes"):
        cm.paired_difference(np.zeros((2, 2)), np.zeros((2, 3)), [0, 1])


def test_paired_differences_over_heads():
    a1, b1, y1 = correlated_models(11, n=300, classes=4)
    a2, b2, y2 = correlated_models(12, n=300, classes=6)
    y2[:30] = -100
    got = cm.paired_differences({"h1": a1, "h2": a2}, {"h1": b1, "h2": b2},
                                {"h1": y1, "h2": y2}, seed=5)
    assert got.heads["h1"] == cm.paired_difference(a1, b1, y1, seed=5)
    mean_a = cm.classifier_metrics({"h1": a1, "h2": a2}, {"h1": y1, "h2": y2}, seed=5)
    mean_b = cm.classifier_metrics({"h1": b1, "h2": b2}, {"h1": y1, "h2": y2}, seed=5)
    d = got.mean_macro_f1
    assert d.value == pytest.approx(mean_a.mean_macro_f1 - mean_b.mean_macro_f1)
    assert d.stderr < math.hypot(mean_a.mean_macro_f1_se, mean_b.mean_macro_f1_se)
    assert d.n == 300 and d.better == "a"
    json.dumps(got.to_dict(), allow_nan=False)
    with pytest.raises(ValueError, match="same heads"):
        cm.paired_differences({"h1": a1}, {"h2": b1}, {"h1": y1})
