"""Class weights of `student-train --task classify`'s CE (student_train/classify_class_weights.py).

The weights are checked against straightforward references: the balanced rule counted by hand,
and the weighted CE of tests/reference_classify_losses.py (torch's weighted mean) on random
logits with unlabelled samples. The end-to-end run reuses test_classify_train's tiny store.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml
from reference_classify_losses import ref_head_cross_entropy
from test_classify_train import HEADS, setup, train  # noqa: F401  (setup: the store fixture)

from logitstore.classifier_reader import ClassifierReader
from logitstore.errors import ConfigError
from student_train.classify_class_weights import (balanced_class_weights, check_class_weights,
                                                  parse_class_weights, resolve_class_weights)
from student_train.config import resolve_config

BASE = {"task": "classify", "store": "s", "student": "x", "out": "o"}


def ref_balanced(labels, n_classes):
    """n / (C * n_c) over the labelled samples, counted one by one; 0 for an absent class."""
    kept = [y for y in labels if y >= 0]
    return [len(kept) / (n_classes * kept.count(c)) if kept.count(c) else 0.0
            for c in range(n_classes)]


@pytest.mark.parametrize("labels, n_classes", [
    ([0, 0, 0, 1, 2, 2], 3),
    ([1, -1, 1, -1, 3], 4),          # unlabelled samples ignored; classes 0, 2 absent
    ([2], 3),                         # a single sample
    ([0, 0, 0], 1),                   # one class
    ([-1, -1], 2),                    # nothing labelled: all zeros
    (list(np.random.default_rng(0).integers(-1, 5, 200)), 5),
])
def test_balanced_weights_match_counting_by_hand(labels, n_classes):
    assert balanced_class_weights(labels, n_classes) == pytest.approx(ref_balanced(labels,
                                                                                   n_classes))


def test_balanced_weights_refuse_labels_beyond_the_classes():
    with pytest.raises(ValueError, match="below the head's 2 classes"):
        balanced_class_weights([0, 2], 2)


def test_the_objective_weights_the_ce_as_the_reference_does():
    from student_train.classify_objective import ClassifyLossWeights, ClassifyObjective

    g = torch.Generator().manual_seed(0)
    heads = {"modality": 4, "location": 3}
    logits = {h: torch.randn(9, c, generator=g) for h, c in heads.items()}
    labels = {"modality": torch.tensor([0, 1, 1, 1, 2, 2, -100, 3, 3]),
              "location": torch.tensor([-100] * 9)}  # all unlabelled: CE 0
    train_labels = {"modality": np.array([0, 1, 1, 1, 2, 2, -1, 3, 3]),
                    "location": np.array([0, 1, -1])}
    weights = resolve_class_weights({"modality": "balanced", "location": [1.0, 0.0, 2.0]},
                                    train_labels, heads)
    objective = ClassifyObjective(ClassifyLossWeights(ce=1.0), heads=list(heads),
                                  class_weights=weights)
    total, terms = objective(student_logits=logits, labels=labels)
    expected = {h: ref_head_cross_entropy(logits[h].numpy(), labels[h].numpy(), weights[h])
                for h in heads}
    assert float(terms["ce/modality"]) == pytest.approx(expected["modality"], rel=1e-6)
    assert float(terms["ce/location"]) == 0.0
    assert float(total) == pytest.approx(sum(expected.values()), rel=1e-6)
    unweighted = ref_head_cross_entropy(logits["modality"].numpy(), labels["modality"].numpy())
    assert not math.isclose(expected["modality"], unweighted, rel_tol=1e-4)  # weights matter


def test_the_flag_and_yaml_forms_resolve_alike(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text(yaml.safe_dump({"train": {**BASE, "class_weights": {
        "modality": "balanced", "location": [1, 1, 2]}}}))
    from_yaml = resolve_config(preset, {}).class_weights
    from_flag = resolve_config(None, {**BASE, "class_weights":
                                      " modality=Balanced , location=1:1:2"}).class_weights
    assert from_yaml == from_flag == {"modality": "balanced", "location": [1.0, 1.0, 2.0]}
    assert resolve_config(None, BASE).class_weights == {}
    # the saved config is a preset that gives the same setting back
    from student_train.config import save_config

    save_config(resolve_config(preset, {}), tmp_path / "config.yaml")
    assert resolve_config(tmp_path / "config.yaml", {}).class_weights == from_yaml


def _problems(**settings) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        resolve_config(None, {**BASE, **settings})
    return caught.value.problems


def test_bad_values_are_all_reported_at_once():
    (problem,) = _problems(class_weights="modality=1:-1:nan,location=0:0,bad,modality=2:2,"
                                         "text=x:1")
    for part in ("head 'modality': weights must be finite numbers >= 0, found [-1.0, nan]",
                 "head 'location': every weight is 0", "entry 'bad' must look like head=",
                 "head 'modality' is given twice", "head 'text': expected balanced or numbers",
                 "expected e.g. --class-weights"):
        assert part in problem, problem
    assert "got 3" in _problems(class_weights=3)[0]
    assert "expected balanced or a list" in _problems(class_weights={"modality": 2})[0]
    assert "inf" in _problems(class_weights={"modality": [1, float("inf")]})[0]


def test_settings_that_cannot_use_them_are_refused():
    problems = _problems(class_weights="modality=balanced", ce_weight=0, kl_weight=1)
    assert any("ce_weight 0 switches off" in p for p in problems), problems
    with pytest.raises(ConfigError, match="a setting of --task classify"):
        resolve_config(None, {"store": "s", "student": "x", "out": "o",
                              "class_weights": "modality=balanced"})


def test_store_heads_and_class_counts_are_checked_together():
    with pytest.raises(ConfigError) as caught:
        check_class_weights({"modality": [1, 2], "organ": "balanced", "location": "balanced"},
                            HEADS)
    problems = caught.value.problems
    assert len(problems) == 2
    assert "head 'modality': 2 weights, but the store's head has 4 classes" in problems[0]
    assert "names head 'organ', which the store does not have" in problems[1]


def test_a_sweep_space_may_choose_among_class_weights(tmp_path):
    from student_train.sweep_space import load_space

    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"class_weights": {
        "type": "categorical", "choices": ["", "modality=balanced"]}}))
    assert load_space(space).dimensions[0].choices == ("", "modality=balanced")
    space.write_text(yaml.safe_dump({"class_weights": {
        "type": "categorical", "choices": ["modality=-1:1:1:1"]}}))
    with pytest.raises(ConfigError, match="finite numbers >= 0"):
        load_space(space)


def test_a_cli_run_trains_with_them_and_records_the_numbers(setup, tmp_path):  # noqa: F811
    store = setup[0]
    result = train(setup, tmp_path / "run", "--max-steps", "2", "--save-every", "0",
                   "--class-weights", "modality=balanced,location=1:0.5:2")
    assert result.exit_code == 0, result.output
    metadata = json.loads((tmp_path / "run" / "training_metadata.json").read_text())
    train_labels = ClassifierReader(store).arrays("train").labels["modality"]
    assert metadata["class_weights"]["modality"] == pytest.approx(
        ref_balanced(list(train_labels), HEADS["modality"]))
    assert metadata["class_weights"]["location"] == [1.0, 0.5, 2.0]
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]
    assert saved["class_weights"] == {"modality": "balanced", "location": [1.0, 0.5, 2.0]}


def test_a_wrong_count_is_refused_before_the_student_loads(setup, tmp_path):  # noqa: F811
    store, root, _ = setup
    result = train((store, root, tmp_path / "no-such-student.yaml"), tmp_path / "run",
                   "--max-steps", "1", "--class-weights", "location=1:1,organ=balanced")
    assert result.exit_code == 1
    assert "2 weights, but the store's head has 3 classes" in result.output
    assert "names head 'organ'" in result.output
    assert "no-such-student" not in result.output
