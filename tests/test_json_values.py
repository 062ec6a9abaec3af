"""logitstore.toolkit.json_values.nonfinite_to_none: NaN and infinities become null at any
depth, everything else is kept, and the result passes json.dumps(allow_nan=False)."""

from __future__ import annotations

import json
import math

import numpy as np

from logitstore.toolkit.json_values import nonfinite_to_none


def test_nonfinite_floats_become_none_at_any_depth():
    value = {"ppl": math.inf, "ratio": -math.inf, "diff": math.nan, "ok": 1.5,
             "rows": [{"x": float("nan"), "y": (2, math.inf)}], "n": 3, "name": "nan",
             "flag": True, "none": None, "np": np.float64("nan"), "npok": np.float64(0.25)}
    assert nonfinite_to_none(value) == {
        "ppl": None, "ratio": None, "diff": None, "ok": 1.5,
        "rows": [{"x": None, "y": [2, None]}], "n": 3, "name": "nan", "flag": True,
        "none": None, "np": None, "npok": 0.25}
    json.dumps(nonfinite_to_none(value), allow_nan=False)


def test_finite_values_and_scalars_pass_through():
    assert nonfinite_to_none(0.0) == 0.0 and nonfinite_to_none(math.nan) is None
    assert nonfinite_to_none([]) == [] and nonfinite_to_none({}) == {}
    assert nonfinite_to_none("inf") == "inf"
