"""bench/fidelity_metrics.py: calibration error, the goals' gaps and verdicts (no models)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from fidelity_metrics import (VARIANTS, expected_calibration_error, render,  # noqa: E402
                              summarise)


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


def _run(nll: dict[str, float]) -> dict:
    row = {"ppl": 1.0, "accuracy": 0.5, "ece": 0.01, "kl_from_teacher": 0.1}
    heldout = {k: {"nll": v, **row} for k, v in {"teacher": 2.0, **nll}.items()}
    return {"heldout": heldout, "step_s": {v: 0.1 for v in VARIANTS},
            "load_s_per_batch": {v: 0.001 for v in VARIANTS[1:4]}}


def _store(sampled_bytes: float) -> dict:
    signals = {name: {"bytes_per_token": b} for name, b in
               (("topk8", 9.0), ("topk64", 70.0), ("sampled50", sampled_bytes))}
    return {"signals": signals, "counts": {"samples": 1, "tokens": 10},
            "input_ids_bytes_per_token": 1.5}


GOOD = {"ce": 3.0, "topk8": 2.9, "topk64": 2.85, "sampled50": 2.8, "online": 2.79}


def test_goals_follow_the_figures():
    met = summarise([_run(GOOD)], _store(20.0))
    assert all(g["met"] for g in met["goals"].values())
    assert met["gaps"]["sampled50_vs_online"]["mean"] == pytest.approx((2.8 - 2.79) / 2.79)

    worse = summarise([_run({**GOOD, "sampled50": 2.86, "topk8": 3.01})], _store(30.0))
    verdicts = {k: g["met"] for k, g in worse["goals"].items()}
    assert verdicts == {"sampled_within_0.5pct_of_online": False,
                        "sampled_better_than_topk64": False, "every_kd_better_than_ce": False,
                        "sampled_bytes_per_token": False}


def test_seeds_give_mean_std_and_noise_ratio():
    runs = [_run(GOOD), _run({k: v + 0.01 for k, v in GOOD.items()})]
    summary = summarise(runs, _store(20.0))
    nll = summary["metrics"]["ce"]["nll"]
    assert nll["mean"] == pytest.approx(3.005) and nll["std"] > 0
    assert summary["gaps"]["online_vs_ce"]["mean_over_std"] is not None
    text = render(summary, _store(20.0), {"path": "t", "params": 1e6},
                  {"steps": 1, "epochs": 1, "batches_per_epoch": 1, "seeds": 2,
                   "heldout_tokens": 5})
    assert "±" in text and "MISSED" not in text


def test_a_teacher_worse_than_the_ce_student_is_flagged():
    good = summarise([_run(GOOD)], _store(20.0))  # teacher NLL 2.0 < CE 3.0
    assert good["regime"]["teacher_better_than_ce"]
    weak = summarise([_run({k: v - 1.5 for k, v in GOOD.items()})], _store(20.0))  # CE 1.5
    assert not weak["regime"]["teacher_better_than_ce"]
    budget = {"steps": 1, "epochs": 1, "batches_per_epoch": 1, "seeds": 1, "heldout_tokens": 5}
    teacher = {"path": "t", "params": 1e6}
    assert "WARNING" in render(weak, _store(20.0), teacher, budget)
    assert "WARNING" not in render(good, _store(20.0), teacher, budget)
