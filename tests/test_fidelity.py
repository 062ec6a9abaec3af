"""bench/fidelity_*.py without models: calibration error, paired statistics, Pareto front,
the summary's verdicts and the report (hand-computed numbers)."""

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from fidelity import parse_configs, signal_spec  # noqa: E402
from fidelity_metrics import expected_calibration_error, summarise  # noqa: E402
from fidelity_report import plot, render  # noqa: E402
from fidelity_stats import (kept_share, paired_gap, pareto_front,  # noqa: E402
                            t_quantile_975, verdict)


def test_ece_matches_a_hand_computed_example():
    # bins of width 1/15: 0.95 and 0.99 share the last bin, 0.5 is in bin 7, 0.05 in bin 0
    confidence = torch.tensor([0.95, 0.99, 0.5, 0.05])
    correct = torch.tensor([True, False, True, False])
    # last bin: conf 0.97, acc 0.5 (2 of 4); bin 7: conf 0.5, acc 1; bin 0: conf 0.05, acc 0
    expected = (2 * abs(0.97 - 0.5) + abs(0.5 - 1.0) + abs(0.05 - 0.0)) / 4
    assert expected_calibration_error(confidence, correct) == pytest.approx(expected)


def test_ece_is_zero_when_confidence_equals_accuracy_in_every_bin():
    confidence = torch.full((10,), 0.8)  # one bin, 8 of 10 right
    correct = torch.tensor([True] * 8 + [False] * 2)
    assert expected_calibration_error(confidence, correct) == pytest.approx(0.0, abs=1e-6)
    assert expected_calibration_error(confidence, torch.ones(10, dtype=torch.bool)) == \
        pytest.approx(0.2)


def test_ece_puts_zero_in_the_first_bin_and_one_in_the_last():
    # together in a bin: |sum conf - sum acc| / n; apart each point would count on its own
    low = expected_calibration_error(torch.tensor([0.0, 0.03]), torch.tensor([True, False]))
    assert low == pytest.approx(abs(0.03 - 1.0) / 2)  # apart: (1.0 + 0.03) / 2
    high = expected_calibration_error(torch.tensor([1.0, 0.95]), torch.tensor([False, True]))
    assert high == pytest.approx(abs(1.95 - 1.0) / 2)  # apart: (1.0 + 0.05) / 2


# ----------------------------------------------------------------------------- statistics

def test_t_quantiles_match_the_table_and_its_extension():
    assert t_quantile_975(1) == pytest.approx(12.706)
    assert t_quantile_975(4) == pytest.approx(2.776)
    assert t_quantile_975(40) == pytest.approx(2.021075, abs=1e-4)  # t_{0.975, 40}
    assert t_quantile_975(120) == pytest.approx(1.979930, abs=1e-4)
    with pytest.raises(ValueError):
        t_quantile_975(0)


def test_paired_gap_unresolved_with_three_noisy_seeds():
    gap = paired_gap([1.01, 1.02, 1.03], [1.0, 1.0, 1.0])  # +1, +2, +3 %
    half = 4.303 * 0.01 / math.sqrt(3)  # t_{0.975, 2} * std / sqrt(n)
    assert gap["mean"] == pytest.approx(0.02)
    assert gap["std"] == pytest.approx(0.01)
    assert gap["half_width"] == pytest.approx(half)
    assert (gap["low"], gap["high"]) == pytest.approx((0.02 - half, 0.02 + half))
    v = verdict(gap)
    assert v == {"differs": False, "within": "unresolved", "narrow": False, "reason": None}


def test_paired_gap_resolved_within_half_a_percent():
    online = [2.0, 2.5, 3.0, 2.2, 2.4]
    method = [x * (1 + g) for x, g in zip(online, [0.001, 0.002, 0.003, 0.002, 0.002])]
    gap = paired_gap(method, online)
    half = 2.776 * math.sqrt(0.5e-6) / math.sqrt(5)  # std of the gaps: sqrt(2e-6 / 4)
    assert gap["mean"] == pytest.approx(0.002)
    assert gap["high"] == pytest.approx(0.002 + half)  # 0.00288 < 0.005
    assert verdict(gap) == {"differs": True, "within": "resolved", "narrow": True,
                            "reason": None}


def test_paired_gap_resolved_worse_than_half_a_percent():
    gap = paired_gap([1.010, 1.012, 1.011], [1.0, 1.0, 1.0])  # low end 0.0085 > 0.005
    assert gap["low"] == pytest.approx(0.011 - 4.303 * 0.001 / math.sqrt(3))
    assert verdict(gap)["within"] == "excluded"


def test_one_seed_gives_no_interval_and_says_why():
    gap = paired_gap([1.001], [1.0])
    assert gap["mean"] == pytest.approx(0.001) and gap["half_width"] is None
    assert verdict(gap) == {"differs": None, "within": "–", "narrow": None,
                            "reason": "one seed: no interval"}
    with pytest.raises(ValueError):
        paired_gap([1.0, 2.0], [1.0])


def test_kept_share_only_over_a_resolved_gain():
    online = paired_gap([0.95, 0.96, 0.97], [1.0, 1.0, 1.0])  # -5, -4, -3 %: resolved
    method = paired_gap([0.97, 0.97, 0.97], [1.0, 1.0, 1.0])  # -3 %
    share, reason = kept_share(method, online)
    assert share == pytest.approx(0.03 / 0.04) and reason is None
    noisy = paired_gap([0.99, 1.01, 1.0], [1.0, 1.0, 1.0])  # -1, +1, 0 %: not resolved
    share, reason = kept_share(method, noisy)
    assert share is None and "not resolved" in reason


def test_pareto_front_keeps_the_undominated_points():
    points = {"a": (10, 0.02), "b": (20, 0.01), "c": (30, 0.015), "d": (5, 0.03),
              "e": (10, 0.025)}
    # e: a costs the same and loses less; c: b costs less and loses less
    assert pareto_front(points) == ["d", "a", "b"]
    assert pareto_front({"x": (1, 1), "y": (1, 1)}) == ["x", "y"]  # ties dominate neither


def test_config_names_parse_to_dump_settings():
    assert signal_spec("topk16") == {"top_k": 16, "samples": 0, "logprob_encoding": "q8"}
    assert signal_spec("sampled32-f16") == {"top_k": 0, "samples": 32,
                                            "logprob_encoding": "f16"}
    assert parse_configs(["topk8+sampled16", "topk4"]) == {
        "topk8+sampled16": ["topk8", "sampled16"], "topk4": ["topk4"]}
    for bad in (["top8"], ["topk8+topk16"], ["topk0"]):
        with pytest.raises(ValueError):
            parse_configs(bad)


# ----------------------------------------------------------------------------- summary

def _run(nll: dict[str, float]) -> dict:
    row = {"ppl": 1.0, "accuracy": 0.5, "ece": 0.01, "kl_from_teacher": 0.1}
    heldout = {k: {"nll": v, **row} for k, v in nll.items()}
    methods = [k for k in nll if k != "teacher"]
    return {"heldout": heldout, "step_s": {k: 0.1 for k in methods},
            "load_s_per_batch": {k: 0.001 for k in methods if k not in ("ce", "online")}}


def _runs(per_seed_gaps: dict[str, list[float]]) -> list[dict]:
    """Seeds whose online NLL differs; each method = online * (1 + its gap of that seed)."""
    online = [3.0, 3.2, 3.1, 2.9, 3.05]
    return [_run({"teacher": 2.5, "online": o, **{m: o * (1 + g[i])
                                                  for m, g in per_seed_gaps.items()}})
            for i, o in enumerate(online)]


GAPS = {"ce": [0.05, 0.06, 0.04, 0.05, 0.05], "topk8": [0.001, 0.002, 0.003, 0.002, 0.002],
        "sampled16": [0.01, 0.02, 0.0, 0.01, 0.01]}


def test_summary_pairs_per_seed_and_finds_the_goal_and_front():
    summary = summarise(_runs(GAPS), {"topk8": 12.0, "sampled16": 20.0})
    m = summary["methods"]
    assert m["topk8"]["gap_to_online"]["mean"] == pytest.approx(0.002)
    assert m["topk8"]["verdict"]["within"] == "resolved"
    assert m["sampled16"]["verdict"]["within"] == "unresolved"
    assert m["ce"]["verdict"]["within"] == "excluded"
    assert summary["goal"]["met"] and summary["goal"]["configs"] == ["topk8"]
    assert summary["pareto_front"] == ["topk8"]  # cheaper and closer than sampled16
    # kept share: 1 - gap / ce gap, from the paired gaps to CE only
    assert m["topk8"]["kept_share"] == pytest.approx(
        m["topk8"]["gap_to_ce"]["mean"] / m["online"]["gap_to_ce"]["mean"])
    assert summary["regime"]["teacher_better_than_ce"]


def test_goal_missed_above_24_bytes_per_token():
    summary = summarise(_runs(GAPS), {"topk8": 30.0, "sampled16": 20.0})
    assert not summary["goal"]["met"]


def test_report_prints_dashes_with_reasons_and_a_plot(tmp_path):
    one = summarise(_runs(GAPS)[:1], {"topk8": 12.0, "sampled16": 20.0})
    text = render(one, ["header"])
    assert "| topk8 | 12.00 |" in text and "[–]" in text
    assert "one seed: no interval" in text
    assert "kept share –: one seed" in text
    five = render(summarise(_runs(GAPS), {"topk8": 12.0, "sampled16": 20.0}), ["h"])
    assert "yes, resolved" in five and "met by topk8" in five
    png = plot(one, tmp_path / "f.png", "title")
    assert png.read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------- corpus

def test_corpus_splits_by_module_and_is_cached(tmp_path):
    import json

    from fidelity_corpus import build_corpus

    settings = {"sources": ["pydoc-topics"], "heldout_chars": 20_000, "vocab_size": 400,
                "doc_tokens": 128, "transfer_tokens": 5_000}
    corpus = build_corpus(tmp_path, settings)
    assert corpus["built"]

    def read(part):
        return [json.loads(line) for line in corpus[part].read_text().splitlines()]

    teacher, transfer, heldout = read("teacher"), read("transfer"), read("heldout")
    assert not {d["unit"] for d in heldout} & {d["unit"] for d in teacher}  # unseen topics
    assert sum(len(d["text"]) for d in heldout) >= 20_000
    assert [d["id"] for d in transfer] == [d["id"] for d in teacher[:len(transfer)]]  # held-in
    assert sum(d["tokens"] for d in transfer[:-1]) < 5_000 <= sum(d["tokens"] for d in transfer)
    # a document over the budget is a single paragraph too long to share
    assert all(d["tokens"] <= 128 or "\n\n" not in d["text"] for d in teacher + heldout)
    again = build_corpus(tmp_path, settings)
    assert not again["built"] and again["dir"] == corpus["dir"]
    other = build_corpus(tmp_path, {**settings, "doc_tokens": 96})
    assert other["dir"] != corpus["dir"]
