"""bench/xtok_targets.py: its summary of label probabilities per teacher, kind and gap."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from xtok_targets import report, summary  # noqa: E402


def test_summary_of_no_positions_has_no_mean():
    assert summary(np.zeros(0)) == {"positions": 0, "mean_p_label": None,
                                    "share_p_below_1e-4": None}
    assert summary(np.array([0.0, 0.5, 1.0]))["share_p_below_1e-4"] == 1 / 3


def test_positions_are_counted_by_the_teacher_that_gives_the_target_and_its_kind():
    # 6 positions: A covers 0-2 (plain, chained, plain), position 3 is A's unchained pair
    # (covered without the skip), 4-5 are A's other gaps; B covers 1, 3, 4
    c = {"A": np.array([1, 1, 1, 0, 0, 0], bool), "A_kept": np.array([1, 1, 1, 1, 0, 0], bool),
         "B": np.array([0, 1, 0, 1, 1, 0], bool),
         "kind_A": np.array([0, 1, 0, 0, 0, 0]), "kind_B": np.array([0, 2, 0, 0, 1, 0]),
         "p_A": np.array([0.5, 0.1, 0.0, 0.0, 0.0, 0.0]),
         "p_B": np.array([0.0, 0.9, 0.0, 0.2, 0.7, 0.0])}
    c.update({"first_A": np.array([0.9, 0.2, 0.9, 0.9, 0.9, 0.9]),
              "continuation_A": np.array([1.0, 0.5, 1.0, 1.0, 1.0, 1.0])})
    out = report(c, np.array([0.25, 0.75]))
    assert out["by_kind"]["A chained"]["median_first"] == 0.2  # its one chained position
    assert out["by_kind"]["A chained"]["median_continuation"] == 0.5
    assert "median_first" not in out["by_kind"]["B chained"]  # no factors given for B
    assert out["by_kind"]["A plain"] == {"positions": 2, "mean_p_label": 0.25,
                                         "share_p_below_1e-4": 0.5}
    assert out["by_kind"]["A chained"]["positions"] == 1
    assert out["by_kind"]["B inside"]["mean_p_label"] == 0.9
    assert out["by_kind"]["B chained"]["mean_p_label"] == 0.7
    gaps = out["where_one_is_missing"]
    assert gaps["A unchained (skipped), B gives one"]["mean_p_label"] == 0.2
    assert gaps["A's other gaps, B gives one"]["mean_p_label"] == 0.7
    assert gaps["B's gaps, A gives one"] == {"positions": 2, "mean_p_label": 0.25,
                                             "share_p_below_1e-4": 0.5, "of": "A"}
    assert out["teacher_A_own_tokens"]["mean_p_label"] == 0.5
