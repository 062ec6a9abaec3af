"""A resume ignores differences in cross-tokenizer switches that act on neither the saved run
nor the resumed one (student_train.cross_config.cross_fields_in_effect), and still refuses
those that act."""

from __future__ import annotations

import pytest
import yaml

from logitstore.errors import ConfigError
from student_train.config import resolve_config
from student_train.cross_config import CROSS_FIELDS
from student_train.train import _check_resume

BASE = {"store": "s", "student": "m"}
ADDED_LATER = ("inside_token_targets", "inside_other_bin", "chained_token_targets",
               "skip_dummy_prefix_pairs", "skip_unchained_pairs")  # absent = False


def _save(out, dropped=(), **settings):
    saved = resolve_config(None, {**BASE, "out": str(out), **settings}).as_dict()
    for key in dropped:
        saved.pop(key)
    (out / "config.yaml").write_text(yaml.safe_dump({"train": saved}, sort_keys=False))
    return out / "checkpoints" / "step-00000002"


def _resume(out, ckpt, across, **settings):
    _check_resume(resolve_config(None, {**BASE, "out": str(out), **settings}), out, ckpt,
                  lambda: across)


def test_a_same_tokenizer_run_saved_before_the_cross_switches_resumes(tmp_path):
    ckpt = _save(tmp_path, dropped=ADDED_LATER)
    _resume(tmp_path, ckpt, across=False)  # none of them acts on a same-tokenizer run
    with pytest.raises(ConfigError) as err:  # on a cross run each one does
        _resume(tmp_path, ckpt, across=True)
    for key in ADDED_LATER:
        assert f"resume: {key}: run has False, now True" in str(err.value)


def test_switches_under_a_parent_that_is_off_are_no_difference(tmp_path):
    ckpt = _save(tmp_path, chained_token_targets=False, skip_unchained_pairs=False,
                 inside_token_targets=False, inside_other_bin=False)
    _resume(tmp_path, ckpt, across=True, chained_token_targets=False,
            inside_token_targets=False)  # the children's defaults (True) act on neither run
    with pytest.raises(ConfigError) as err:  # the parent on: both children act now
        _resume(tmp_path, ckpt, across=True, inside_token_targets=False)
    message = str(err.value)
    assert "resume: chained_token_targets: run has False, now True" in message
    assert "resume: skip_unchained_pairs: run has False, now True" in message
    assert "inside_other_bin" not in message


def test_uld_ignores_the_map_switches_but_not_the_loss(tmp_path):
    ckpt = _save(tmp_path, cross_loss="uld", min_mapped_share=0.5)
    _resume(tmp_path, ckpt, across=True, cross_loss="uld", min_mapped_share=0.9,
            chained_token_targets=False)
    with pytest.raises(ConfigError, match=r"resume: cross_loss: run has 'uld', now 'pkl'"):
        _resume(tmp_path, ckpt, across=True, cross_loss="pkl")
    _resume(tmp_path, ckpt, across=False, cross_loss="pkl")  # a same-tokenizer run: none acts


def test_whether_the_run_is_across_tokenizers_is_asked_only_for_cross_differences(tmp_path):
    ckpt = _save(tmp_path)

    def never():
        raise AssertionError("asked without a cross-tokenizer difference")

    _check_resume(resolve_config(None, {**BASE, "out": str(tmp_path)}), tmp_path, ckpt, never)
    with pytest.raises(ConfigError, match="resume: lr"):
        _check_resume(resolve_config(None, {**BASE, "out": str(tmp_path), "lr": 1.0}),
                      tmp_path, ckpt, never)
    assert set(ADDED_LATER) < set(CROSS_FIELDS)
