"""JSON-safe numbers for the reports and manifests the tools write.

    json.dumps(nonfinite_to_none(report), allow_nan=False)

JSON has no NaN or infinity (Python writes them as the non-standard `NaN`/`Infinity`, which
other tools reject), yet a metric or a gate figure can be exactly that: a perplexity that
overflowed, a ratio over a zero. `nonfinite_to_none` turns them into null everywhere in a
nest of dicts, lists and tuples, so `allow_nan=False` can then guard against any it missed.
"""

from __future__ import annotations

import math
from typing import Any


def nonfinite_to_none(value: Any) -> Any:
    """`value` with every non-finite float (NaN, +inf, -inf; numpy float64 included, being a
    float) replaced by None, recursing into dicts (values), lists and tuples (both returned
    as lists); anything else is returned unchanged."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: nonfinite_to_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [nonfinite_to_none(item) for item in value]
    return value
