"""signal_mixture "confidence" for a student of the store's own tokenizer: two KD signals
(top-k and sampled) mixed per position by weight x the probability each target gives the next
token, against a textbook computation on full logits (the cross-tokenizer case:
tests/test_cross_signal_mixture.py)."""

from __future__ import annotations

import pytest
import torch
from train_helpers import backward_on_forward_grads, shared_world

WEIGHTS = (0.6, 0.4)
ALPHA = 0.7


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return shared_world(tmp_path_factory)


def _objective_loss(world, batch, plans, mixture, monkeypatch, temperature):
    from transformers import AutoModelForCausalLM

    from student_train.loss_combine import Weights, combine, token_sum_gradients
    from student_train.objective import DistillationObjective, LossSettings, denominators

    student = AutoModelForCausalLM.from_pretrained(world.student).float()
    objective = DistillationObjective(student, plans,
                                      LossSettings(chunk_size=5, signal_mixture=mixture))
    weights = Weights(alpha=ALPHA)
    dens = denominators(batch)
    sums = objective(batch, temperature=temperature,
                     sum_grads=token_sum_gradients(dens, plans, weights))
    loss, _ = combine(sums, dens, plans, weights)
    backward_on_forward_grads(loss, monkeypatch)
    return float(loss.detach()), student.lm_head.weight.grad.clone()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_confidence_mixture_weighs_each_position_by_the_targets_probability_of_the_label(
        world, monkeypatch, temperature):
    """At T = 2 the KD compares tempered targets, but the weights read the teacher's own
    (T = 1) probability of the label."""
    from transformers import AutoModelForCausalLM

    from logitstore.reader import StoreReader
    from student_train.collate import collate
    from student_train.losses import (build_sampled_target, build_topk_target,
                                      cross_entropy_per_position, sparse_kd_per_position)
    from student_train.objective import SignalPlan, shifted, target_positions

    reader = StoreReader(str(world.store))
    batch = collate([[reader.sample(i)] for i in range(3)], [[1.0]] * 3, ["teacher"],
                    packing=False)
    plans = [SignalPlan("teacher", kd_weight=WEIGHTS[0], target="topk"),
             SignalPlan("teacher", kd_weight=WEIGHTS[1], target="sampled", n_draws=16)]
    got_loss, got_grad = _objective_loss(world, batch, plans, "confidence", monkeypatch,
                                         temperature)
    plain_loss, _ = _objective_loss(world, batch, plans, "weights", monkeypatch, temperature)

    reference = AutoModelForCausalLM.from_pretrained(world.student).float()
    logits = reference(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).logits  # [B, S, V]
    signal = batch["signals"]["teacher"]

    def targets_at(t: float):
        return [build_topk_target(signal["topk_ids"].long(), signal["topk_logprobs"].float(),
                                  temperature=t),
                build_sampled_target(signal["sampled_ids"].long(), signal["sampled_counts"],
                                     signal.get("sampled_logprobs"), n_draws=16,
                                     temperature=t)]

    trained = target_positions(batch)
    labels = shifted(batch["labels"], -100)
    kd, seen = [], []
    for t, unit in zip(targets_at(temperature), targets_at(1.0)):
        kd.append(sparse_kd_per_position(logits, t)[trained])  # [n]
        probability = []  # the T = 1 target's probability of the label
        for ids, logprobs, valid, label in zip(unit.ids[trained], unit.logprobs[trained],
                                               unit.valid[trained], labels[trained]):
            probability.append(sum(float(lp.exp()) for i, lp, v in zip(ids, logprobs, valid)
                                   if v and int(i) == int(label)))
        seen.append(torch.tensor(probability) + 1e-6)
    share = WEIGHTS[0] * seen[0] / (WEIGHTS[0] * seen[0] + WEIGHTS[1] * seen[1])
    assert share.max() - share.min() > 0.1  # the weights move from position to position
    mixed = sum(w * c * k for w, c, k in zip(WEIGHTS, seen, kd)) / sum(
        w * c for w, c in zip(WEIGHTS, seen))
    ce = cross_entropy_per_position(logits[trained], labels[trained])
    expected = ALPHA * mixed.mean() + (1 - ALPHA) * ce.mean()
    expected.backward()
    assert got_loss == pytest.approx(float(expected), rel=1e-5)
    assert abs(got_loss - plain_loss) > 1e-4  # and it is not the plain weighted sum
    torch.testing.assert_close(got_grad, reference.lm_head.weight.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mixture, bad, found", [
    ("confidence", {"cross_loss": "uld"}, "found uld"),
    ("confidence", {"mix_signals_per_position": False},
     "mix_signals_per_position true, found false"),
    ("confidence", {"store": None, "data": "d.jsonl"}, "--data trains on hard labels"),
    ("priority", {"mix_signals_per_position": False}, "mix_signals_per_position true, found false"),
    ("priority", {"store": None, "data": "d.jsonl"}, "--data trains on hard labels")])
def test_mixtures_refuse_settings_they_cannot_work_with(tmp_path, mixture, bad, found):
    from logitstore.errors import ConfigError
    from student_train.config import resolve_config

    base = {"store": "s", "student": "m", "out": str(tmp_path), "signal_mixture": mixture}
    with pytest.raises(ConfigError) as err:
        resolve_config(None, {**base, **bad})
    assert found in str(err.value) and str(err.value).count(f"signal_mixture {mixture}") == 1
    assert resolve_config(None, base).signal_mixture == mixture
    if mixture == "priority":  # it needs no target over the student's vocabulary: ULD works
        assert resolve_config(None, {**base, "cross_loss": "uld"}).signal_mixture == mixture


def test_priority_for_a_student_of_the_stores_tokenizer_is_the_first_signal_alone(
        world, monkeypatch):
    """Every signal covers every position there, so the first one takes all of them."""
    from logitstore.reader import StoreReader
    from student_train.collate import collate
    from student_train.objective import SignalPlan

    reader = StoreReader(str(world.store))
    batch = collate([[reader.sample(i)] for i in range(3)], [[1.0]] * 3, ["teacher"],
                    packing=False)
    topk = SignalPlan("teacher", kd_weight=WEIGHTS[0], target="topk")
    sampled = SignalPlan("teacher", kd_weight=WEIGHTS[1], target="sampled", n_draws=16)
    got, got_grad = _objective_loss(world, batch, [topk, sampled], "priority", monkeypatch, 1.0)
    alone, alone_grad = _objective_loss(
        world, batch, [SignalPlan("teacher", kd_weight=1.0, target="topk")], "weights",
        monkeypatch, 1.0)
    mixed, _ = _objective_loss(world, batch, [topk, sampled], "weights", monkeypatch, 1.0)
    assert got == pytest.approx(alone, rel=1e-6) and abs(got - mixed) > 1e-4
    torch.testing.assert_close(got_grad, alone_grad, rtol=1e-5, atol=1e-7)


def test_resuming_a_priority_run_keeps_the_order_of_its_signals(tmp_path):
    import yaml

    from logitstore.errors import ConfigError
    from student_train.config import resolve_config
    from student_train.train import _check_resume

    base = {"store": "s", "student": "m", "out": str(tmp_path), "signal_mixture": "priority"}
    saved = resolve_config(None, {**base, "signals": {"a": 0.5, "b": 0.5}})
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"train": saved.as_dict()},
                                                          sort_keys=False))
    ckpt = tmp_path / "checkpoint-10"
    _check_resume(resolve_config(None, {**base, "signals": {"a": 0.5, "b": 0.5}}), tmp_path, ckpt)
    with pytest.raises(ConfigError, match=r"order \['a', 'b'\], now \['b', 'a'\]"):
        _check_resume(resolve_config(None, {**base, "signals": {"b": 0.5, "a": 0.5}}),
                      tmp_path, ckpt)
    weights = {**base, "signal_mixture": "weights"}  # there the order changes nothing
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(
        {"train": resolve_config(None, {**weights, "signals": {"a": 0.5, "b": 0.5}}).as_dict()},
        sort_keys=False))
    _check_resume(resolve_config(None, {**weights, "signals": {"b": 0.5, "a": 0.5}}), tmp_path,
                  ckpt)
