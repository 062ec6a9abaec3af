"""Standard errors, paired differences and the "gap closed only beyond the noise" rule of
the distill-eval report (eval/uncertainty.py, eval/report.py), on hand-computed numbers."""

from __future__ import annotations

import json
import math

import pytest

from eval.report import build_report, comparison_rows, findings, render_markdown, write_report
from eval.tasks import item_scores
from eval.uncertainty import (Estimate, estimate, is_resolved, paired_difference,
                              sequence_items, unpaired_difference)

# ----------------------------------------------------------------------------- the math


def test_accuracy_se_is_the_binomial_one():
    # p = 3/4 over 4 questions: sd (n - 1) = 0.5, SE = 0.5 / 2 = sqrt(p(1-p)/(n-1)) = 0.25.
    got = estimate({"a": 1, "b": 1, "c": 1, "d": 0}, "acc")
    assert got.value == pytest.approx(0.75) and got.n == 4
    assert got.stderr == pytest.approx(0.25)
    assert got.stderr == pytest.approx(math.sqrt(0.75 * 0.25 / 3))


def test_ratio_se_by_the_delta_method():
    # NLL sums / tokens: R = 12 / 6 = 2, mean tokens 2, z = (0, -0.5, 0.5),
    # sd (n - 1) = 0.5, SE = 0.5 / sqrt(3).
    items = {"a": [2.0, 1], "b": [3.0, 2], "c": [7.0, 3]}
    nll = estimate(items, "nll")
    assert nll.value == pytest.approx(2.0)
    assert nll.stderr == pytest.approx(0.5 / math.sqrt(3))
    # perplexity = exp(NLL): SE multiplied by the derivative exp(2).
    ppl = estimate(items, "perplexity")
    assert ppl.value == pytest.approx(math.exp(2.0))
    assert ppl.stderr == pytest.approx(math.exp(2.0) * 0.5 / math.sqrt(3))


def test_paired_difference_cancels_shared_difficulty():
    student = {"a": 1, "b": 1, "c": 1, "d": 0}
    baseline = {"a": 0, "b": 1, "c": 0, "d": 0}
    # d_i = (1, 0, 1, 0): mean 0.5, sd (n - 1) = sqrt(1/3), SE = sqrt(1/3) / 2.
    got = paired_difference(student, baseline, "acc")
    assert got == Estimate(0.5, pytest.approx(math.sqrt(1 / 3) / 2), 4, paired=True)
    # Unpaired: sqrt(0.25^2 + 0.25^2), larger.
    unpaired = unpaired_difference(0.75, 0.25, 0.25, 0.25)
    assert unpaired.stderr == pytest.approx(math.sqrt(0.125))
    assert unpaired.stderr > got.stderr
    assert unpaired.n is None and not unpaired.paired


def test_paired_difference_uses_shared_items_only():
    got = paired_difference({"a": 1, "b": 0, "x": 1}, {"a": 0, "b": 0, "y": 0}, "acc")
    assert got.n == 2 and got.value == pytest.approx(0.5)
    assert paired_difference({"a": 1}, {"a": 0}, "acc") is None  # one shared item: no SE


def test_items_that_are_not_numbers_are_dropped():
    got = estimate({"a": 1, "b": float("nan"), "c": None, "d": True, "e": 0, "f": [1, 0]})
    assert got.n == 2 and got.value == pytest.approx(0.5)
    assert estimate({}) is None
    assert estimate({"a": 1}).stderr is None


def test_resolved_means_more_than_two_standard_errors():
    assert is_resolved(Estimate(0.21, 0.1, 10))
    assert not is_resolved(Estimate(0.2, 0.1, 10))  # exactly 2 SE is not more than 2
    assert not is_resolved(Estimate(-0.15, 0.1, 10))
    assert is_resolved(Estimate(-0.25, 0.1, 10))
    assert not is_resolved(Estimate(0.5, None, None))
    assert not is_resolved(None)


def test_sequence_items_from_score_sequences():
    per_sequence = [{"index": 0, "nll": 2.0, "correct": 1, "tokens": 1},
                    {"index": 3, "nll": 3.0, "correct": 0, "tokens": 2}]
    items = sequence_items(per_sequence)
    assert items["nll"] == items["perplexity"] == {"0": [2.0, 1], "3": [3.0, 2]}
    assert items["next_token_accuracy"] == {"0": [1, 1], "3": [0, 2]}
    assert estimate(items["next_token_accuracy"]).value == pytest.approx(1 / 3)


def test_item_scores_from_lm_eval_samples():
    samples = [{"doc_id": 0, "filter": "none", "metrics": ["acc", "acc_norm"], "acc": 1.0,
                "acc_norm": 0.0},
               {"doc_id": 1, "filter": "none", "metrics": ["acc", "acc_norm"], "acc": 0.0,
                "acc_norm": 1.0},
               {"doc_id": 1, "filter": "strict", "metrics": ["acc"], "acc": 1.0}]
    assert item_scores(samples) == {"acc": {"0": 1.0, "1": 0.0}, "acc_norm": {"0": 0.0, "1": 1.0},
                                    "acc[strict]": {"1": 1.0}}
    generated = [{"doc_id": 7, "filter": "none", "metrics": ["bypass"], "bypass": 999,
                  "filtered_resps": ["heart attack"], "target": "heart attack"}]
    got = item_scores(generated, generated=True)
    assert got["rouge1"] == {"7": pytest.approx(1.0)} and "bypass" not in got


# ----------------------------------------------------------------------------- the rule

# 10 questions. Teacher right on 8, baseline on 3, student on 6: every question the baseline
# gets right, the others do too. Paired teacher - baseline: d = 1 on 5 items, 0 on 5:
# mean 0.5, sd (n - 1) = sqrt(2.5 / 9), SE = 0.1667: 0.5 > 2 SE, resolved.
TEACHER = [1, 1, 1, 1, 1, 1, 1, 1, 0, 0]
STUDENT = [1, 1, 1, 1, 1, 1, 0, 0, 0, 0]
BASELINE = [1, 1, 1, 0, 0, 0, 0, 0, 0, 0]


def _items(**per_role):
    return {role: {"mcq": {"acc": {str(i): v for i, v in enumerate(values)}}}
            for role, values in per_role.items()}


def _results(**per_role):
    return {role: {"mcq": {"acc": sum(values) / len(values)}}
            for role, values in per_role.items()}


def _row(**per_role):
    (row,) = comparison_rows(_results(**per_role), {}, _items(**per_role))
    return row


def test_gap_closed_where_the_teacher_beats_the_baseline_beyond_noise():
    row = _row(teacher=TEACHER, student=STUDENT, baseline=BASELINE)
    gap = row["teacher_vs_baseline"]
    assert gap["difference"] == pytest.approx(0.5) and gap["paired"] and gap["items"] == 10
    assert gap["stderr"] == pytest.approx(math.sqrt(2.5 / 9) / math.sqrt(10))
    assert gap["resolved"] and gap["better"] == "teacher"
    assert row["gap_closed"] == pytest.approx((0.6 - 0.3) / (0.8 - 0.3))
    assert row["gap_closed_reason"] is None
    # Student - baseline: d = 1 on 3 items of 10: 0.3 +- sqrt(2.1 / 9) / sqrt(10) = 0.153,
    # 1.96 SE: not resolved.
    diff = row["student_vs_baseline"]
    assert diff["difference"] == pytest.approx(0.3)
    assert diff["stderr"] == pytest.approx(math.sqrt(2.1 / 9) / math.sqrt(10))
    assert not diff["resolved"] and diff["better"] == "student"
    assert row["stderr"]["teacher"] == pytest.approx(math.sqrt(0.8 * 0.2 / 9))


def test_no_gap_closed_when_the_teacher_is_worse():
    # The case: a teacher below the baseline made "gap closed" 6.36 for a student
    # that is worse than the baseline.
    row = _row(teacher=BASELINE, student=[0] * 10, baseline=TEACHER)
    assert row["gap_closed"] is None
    assert row["gap_closed_reason"].startswith("the teacher does not beat the baseline")
    assert "teacher − baseline = -0.5 ± 0.17" in row["gap_closed_reason"]


def test_no_gap_closed_when_the_teacher_leads_within_noise():
    # Teacher - baseline: d = 1 on 2 of 10 items: 0.2 +- sqrt(1.6 / 9) / sqrt(10) = 0.133.
    row = _row(teacher=[1, 1, 1, 1, 1, 0, 0, 0, 0, 0], student=STUDENT, baseline=BASELINE)
    assert row["teacher_vs_baseline"]["difference"] == pytest.approx(0.2)
    assert row["gap_closed"] is None
    assert "within 2 standard errors" in row["gap_closed_reason"]


def test_no_gap_closed_without_a_standard_error_or_a_role():
    results = {"teacher": {"gen": {"bleu": 30.0}}, "student": {"gen": {"bleu": 20.0}},
               "baseline": {"gen": {"bleu": 10.0}}}
    (row,) = comparison_rows(results, {}, {})
    assert row["gap_closed"] is None and "no standard error" in row["gap_closed_reason"]
    assert row["student_vs_baseline"]["stderr"] is None
    (row,) = comparison_rows(_results(student=STUDENT, baseline=BASELINE), {},
                             _items(student=STUDENT, baseline=BASELINE))
    assert row["gap_closed"] is None and row["gap_closed_reason"] == "no teacher score"


def test_lower_is_better_metrics_and_efficiency():
    # Teacher NLL 1.0 per token on each of 3 sequences of 2 tokens; baseline 2.0 +- spread.
    seq = lambda *nll: {str(i): [v * 2, 2] for i, v in enumerate(nll)}  # noqa: E731
    items = {"teacher": {"ppl": {"perplexity": seq(1.0, 1.1, 0.9)}},
             "student": {"ppl": {"perplexity": seq(1.5, 1.6, 1.4)}},
             "baseline": {"ppl": {"perplexity": seq(2.0, 2.2, 1.9)}}}
    results = {role: {"ppl": {"perplexity": estimate(items[role]["ppl"]["perplexity"],
                                                     "perplexity").value},
                      "efficiency": {"parameters": 10}} for role in items}
    rows = {r["task"]: r for r in comparison_rows(results, {}, items)}
    ppl = rows["ppl"]
    assert ppl["teacher_vs_baseline"]["better"] == "teacher"
    assert ppl["teacher_vs_baseline"]["difference"] < 0 and ppl["teacher_vs_baseline"]["resolved"]
    assert ppl["student_vs_baseline"]["better"] == "student"
    assert 0 < ppl["gap_closed"] < 1
    assert rows["efficiency"]["gap_closed"] is None
    assert "not a quality metric" in rows["efficiency"]["gap_closed_reason"]
    assert "stderr" not in rows["efficiency"]


def test_findings_say_what_is_resolved():
    per_role = dict(teacher=TEACHER, student=TEACHER, baseline=BASELINE)
    (sentence,) = findings(comparison_rows(_results(**per_role), {}, _items(**per_role)))
    assert sentence.startswith("mcq acc: the student is better, resolved (+0.5 ± 0.17, "
                               "paired over 10 items")
    per_role = dict(teacher=TEACHER, student=STUDENT, baseline=BASELINE)
    (sentence,) = findings(comparison_rows(_results(**per_role), {}, _items(**per_role)))
    assert "the student is ahead but not resolved" in sentence


def test_report_files_show_errors_and_reasons(tmp_path):
    per_role = dict(teacher=BASELINE, student=STUDENT, baseline=TEACHER)
    report = build_report(results=_results(**per_role), stderr={}, items=_items(**per_role),
                          models={r: {"name": r} for r in per_role}, tasks={}, skipped=[],
                          efficiency_notes={}, config={}, environment={})
    paths = write_report(report, tmp_path)
    loaded = json.loads(paths["report.json"].read_text())
    (row,) = loaded["comparison"]
    assert row["gap_closed"] is None and "does not beat" in row["gap_closed_reason"]
    assert loaded["findings"] and loaded["uncertainty"]["resolved"] == \
        "|difference| > 2 standard errors"
    md = render_markdown(report)
    assert "| mcq | acc | ↑ | 0.3 ± 0.15 | 0.6 ± 0.16 | 0.8 ± 0.13 | -0.2 ± 0.13 | 2 | – |" \
        in md
    assert "## Gap closed: where it is –, and why" in md
    assert "- mcq acc: the teacher does not beat the baseline" in md
    assert paths["report.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
