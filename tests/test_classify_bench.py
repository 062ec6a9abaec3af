"""bench/classify_bench.py: the goals' verdicts on made-up figures, and the whole harness
(data, teacher, `teacher-dump --task classify`, verify, `student-train sweep`, five students,
online trial, JSON + markdown + plot) at its --quick size."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

from classify_report import kd_goal, method_rows, spread, time_goal  # noqa: E402


def test_kd_goal_is_met_only_when_the_whole_gain_interval_clears_the_spread():
    ce = [0.60, 0.61, 0.62]
    assert spread(ce) == pytest.approx(0.01)
    met = kd_goal(ce, [0.70, 0.71, 0.72])          # +0.10 every seed, spread 0.01
    assert met["verdict"] == "met" and met["reason"] is None
    assert met["gain"]["mean"] == pytest.approx(0.10)
    below = kd_goal(ce, [0.600, 0.612, 0.621])      # a gain well inside the spread
    assert below["verdict"] == "not met" and "below" in below["reason"]
    worse = kd_goal(ce, [0.55, 0.56, 0.57])         # full KD worse than CE only
    assert worse["verdict"] == "not met"
    noisy = kd_goal(ce, [0.60, 0.66, 0.65])         # interval from below to above the spread
    assert noisy["verdict"] == "not resolved" and "holds" in noisy["reason"]
    one = kd_goal([0.6], [0.9])
    assert one["verdict"] == "not resolved" and one["spread"] is None
    assert "one seed" in one["reason"]


def test_time_goal_compares_the_ratio_interval_with_one_half():
    assert time_goal([1.0, 1.1, 0.9], [4.0, 4.0, 4.0])["verdict"] == "met"
    assert time_goal([3.0, 3.1, 2.9], [4.0, 4.0, 4.0])["verdict"] == "not met"
    assert time_goal([1.0, 3.0, 2.0], [4.0, 4.0, 4.0])["verdict"] == "not resolved"
    single = time_goal([1.0], [4.0])
    assert single["verdict"] == "not resolved" and single["ratio"]["mean"] == 0.25


def _run(macro: dict[str, float], seconds: float = 1.0) -> dict:
    return {"seconds": seconds, "test": {"mean_macro_f1": sum(macro.values()) / len(macro),
                                         "heads": {h: {"macro_f1": v} for h, v in macro.items()}}}


def test_method_rows_pair_each_seed_with_ce_only():
    students = {"ce": [_run({"a": 0.5, "b": 0.3}), _run({"a": 0.6, "b": 0.2})],
                "kl": [_run({"a": 0.7, "b": 0.3}), _run({"a": 0.7, "b": 0.4})]}
    rows = method_rows(students, ["a", "b"])
    assert "vs_ce" not in rows["ce"]
    assert rows["kl"]["vs_ce"]["heads"]["a"]["values"] == pytest.approx([0.2, 0.1])
    assert rows["kl"]["vs_ce"]["heads"]["b"]["values"] == pytest.approx([0.0, 0.2])
    assert rows["kl"]["vs_ce"]["mean_macro_f1"]["values"] == pytest.approx([0.1, 0.15])
    with pytest.raises(ValueError, match="same non-zero number of seeds"):
        method_rows({"ce": students["ce"], "kl": students["kl"][:1]}, ["a"])


@pytest.mark.slow  # ~40 s idle: data, teacher, dump, a 3-trial sweep, 5 students, online trial
def test_quick_run_writes_the_report(tmp_path):
    from classify_bench import main

    result = main(["--quick", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "classify.json").read_text(encoding="utf-8"))
    assert saved["summary"] == json.loads(json.dumps(result["summary"]))
    assert set(saved["students"]) == {"ce", "kl", "kl_mse", "kl_mse_crd", "sweep_best"}
    heads = {"modality", "location"}
    for runs in saved["students"].values():
        assert len(runs) == 1 and runs[0]["seed"] == 0
        assert set(runs[0]["test"]["heads"]) == heads
        assert 0 <= runs[0]["test"]["mean_macro_f1"] <= 1
    assert set(saved["teacher"]["val"]["heads"]) == heads
    assert saved["dump"]["verify"] == "ok" and saved["sweep"]["trials"] == 3
    assert len(saved["sweep"]["trial_seconds"]) == 3
    assert set(saved["sweep"]["best"]) == {"kl_weight", "mse_weight", "crd_weight",
                                           "temperature", "lr"}
    assert [len(saved["timing"][k]) for k in ("store", "online")] == [1, 1]
    assert saved["summary"]["kd_goal"]["verdict"] == "not resolved"  # one seed
    markdown = (tmp_path / "classify.md").read_text(encoding="utf-8")
    assert "CE only" in markdown and "+KL+MSE+CRD" in markdown and "[–: one seed]" in markdown
    assert (tmp_path / "classify.png").stat().st_size > 1000
    again = main(["--from-json", str(tmp_path / "classify.json"), "--out", str(tmp_path / "r")])
    assert again["summary"] == saved["summary"]
