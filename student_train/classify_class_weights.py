"""Class weights of the classifier student's cross-entropy, per head (setting `class_weights`).

    class_weights: {modality: balanced, location: [1, 1, 2, 1]}   # a preset's train: section
    --class-weights modality=balanced,location=1:1:2:1              # the command line

Each named head gets either one weight >= 0 per class (as many as the store's head has classes,
in class index order, at least one above 0), or `balanced`: w_c = n / (C * n_c), where n is the
number of the head's labelled samples in the training split, n_c those of class c and C the
head's number of classes (scikit-learn's "balanced" rule); unlabelled samples (-1) are not
counted. A class with no labelled training sample gets weight 0: no training sample carries
it, so its weight never multiplies a term (it is logged). A head without any labelled training
sample gets all zeros: its CE is 0 with or without weights. Heads not named are unweighted.
The weights enter the CE term only (F.cross_entropy's `weight=` semantics, see
classify_losses.head_cross_entropy): not the KL term, not eval/loss.

Checked in steps, each reporting every problem it finds at once:
  parse_class_weights    the setting's form and values, with every other setting
                         (student_train/config.py; ValueError -> the config's ConfigError);
  check_class_weights    the named heads and the number of weights against the store's heads,
                         as soon as the store is open, before the student loads (ConfigError);
  resolve_class_weights  {head: [C] floats} ("balanced" from the training split's labels), the
                         numbers the run trains with, saved in run/training_metadata.json.
No torch here.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from logitstore.errors import ConfigError

log = logging.getLogger(__name__)

BALANCED = "balanced"
EXAMPLE = ("expected e.g. --class-weights modality=balanced,location=1:1:2, or in YAML "
           "class_weights: {modality: balanced, location: [1, 1, 2]}")


def parse_class_weights(value: Any) -> dict[str, str | list[float]]:
    """{head: "balanced" | [weights]} from a mapping (YAML), "head=balanced,head=1:1:2" text
    (a flag) or a list of such texts; ValueError naming every problem (module docstring)."""
    if value is None:
        return {}
    problems: list[str] = []
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        value = ",".join(value)
    if isinstance(value, str):
        value, problems = _parse_text(value)
    elif not isinstance(value, Mapping):
        raise ValueError(f"got {value!r}; {EXAMPLE}")
    parsed = {}
    for head, spec in value.items():
        try:
            parsed[str(head)] = _head_weights(spec)
        except ValueError as exc:
            problems.append(f"head {head!r}: {exc}")
    if problems:
        raise ValueError("; ".join(problems) + f"; {EXAMPLE}")
    return parsed


def _parse_text(text: str) -> tuple[dict[str, str], list[str]]:
    """"head=spec,head=spec" -> ({head: spec}, problems)."""
    found: dict[str, str] = {}
    problems = []
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        head, equals, spec = (s.strip() for s in entry.partition("="))
        if not equals or not head or not spec:
            problems.append(f"entry {entry!r} must look like head=balanced or head=W:W:...")
        elif head in found:
            problems.append(f"head {head!r} is given twice")
        else:
            found[head] = spec
    return found, problems


def _head_weights(spec: Any) -> str | list[float]:
    """"balanced", or the weights of a list / "1:1:2" text, each finite and >= 0, not all 0."""
    if isinstance(spec, str) and spec.strip().lower() == BALANCED:
        return BALANCED
    items = spec.split(":") if isinstance(spec, str) else spec
    if not isinstance(items, (list, tuple)) or not items:
        raise ValueError(f"expected {BALANCED} or a list of one weight per class, got {spec!r}")
    weights, bad = [], []
    for item in items:
        try:
            if isinstance(item, bool):
                raise ValueError
            weights.append(float(item.strip() if isinstance(item, str) else item))
        except (TypeError, ValueError):
            bad.append(item)
    if bad:
        raise ValueError(f"expected {BALANCED} or numbers, found {bad} in {spec!r}")
    wrong = [w for w in weights if not (math.isfinite(w) and w >= 0)]
    if wrong:
        raise ValueError(f"weights must be finite numbers >= 0, found {wrong}")
    if not any(weights):
        raise ValueError(f"every weight is 0, which would leave the head's CE without any "
                         f"sample; give at least one weight > 0")
    return weights


def class_weight_problems(spec: Mapping[str, str | Sequence[float]],
                          heads: Mapping[str, int]) -> list[str]:
    """The named heads the store lacks and the weight lists whose length is not the head's
    number of classes, one line each."""
    problems = []
    for head, weights in spec.items():
        if head not in heads:
            problems.append(f"class_weights names head {head!r}, which the store does not have "
                            f"(its heads: {dict(heads)}); name only those")
        elif weights != BALANCED and len(weights) != heads[head]:
            problems.append(f"class_weights of head {head!r}: {len(weights)} weights, but the "
                            f"store's head has {heads[head]} classes; give one weight per "
                            f"class in class index order, or {BALANCED}")
    return problems


def check_class_weights(spec: Mapping[str, str | Sequence[float]],
                        heads: Mapping[str, int]) -> None:
    """ConfigError listing every `class_weight_problems` (nothing when there are none)."""
    problems = class_weight_problems(spec, heads)
    if problems:
        raise ConfigError(problems)


def balanced_class_weights(labels: Sequence[int], n_classes: int) -> list[float]:
    """[n_classes] w_c = n / (C * n_c) over the labels >= 0 (-1 = unlabelled); 0 where
    n_c = 0. labels: [N] ints in [-1, n_classes)."""
    import numpy as np

    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    kept = labels[labels >= 0]
    if kept.size and int(kept.max()) >= n_classes:
        raise ValueError(f"labels must be below the head's {n_classes} classes, found "
                         f"{int(kept.max())}")
    counts = np.bincount(kept, minlength=n_classes)                       # [C]
    total = float(kept.size)
    return [total / (n_classes * float(c)) if c else 0.0 for c in counts]


def resolve_class_weights(spec: Mapping[str, str | Sequence[float]],
                          train_labels: Mapping[str, Sequence[int]],
                          heads: Mapping[str, int]) -> dict[str, list[float]]:
    """{head: [C] floats} for every head `spec` names: its list, or the balanced weights of its
    training labels (`train_labels[head]`: [N], -1 = unlabelled)."""
    check_class_weights(spec, heads)
    resolved = {}
    for head, weights in spec.items():
        if weights == BALANCED:
            weights = balanced_class_weights(train_labels[head], heads[head])
            absent = [c for c, w in enumerate(weights) if w == 0]
            if absent:
                log.info("class_weights: head %s has no labelled training sample of classes "
                         "%s (weight 0)", head, absent)
        resolved[head] = [float(w) for w in weights]
    if resolved:
        log.info("class weights of the CE: %s", resolved)
    return resolved
