"""Several cross-tokenizer signals covering different positions: the objective's per-position
mixture (student_train/objective.py module docstring, loss_combine.combine) against a
textbook computation on full logits."""

from __future__ import annotations

import pytest
import torch
from test_cross_tokenizer_train import world  # noqa: F401  (the module-scoped fixture)
from train_helpers import backward_on_forward_grads

WEIGHTS = (1.4, 0.6)  # not summing to 1: the reference carries the total W


@pytest.mark.parametrize("mix,mixture", [(True, "weights"), (False, "weights"),
                                         (True, "confidence"), (True, "priority")])
def test_two_signals_mix_per_position_over_the_teachers_that_cover_it(world, monkeypatch, mix,
                                                                      mixture):
    """Two cross signals covering different positions: each position's KD is the weighted
    mean over the signals there, averaged over the positions any covers (objective module
    docstring; mix off: each signal's mean over its own positions, weighted; confidence: each
    weight times the probability the signal's target gives the next token; priority: the
    first signal where it covers the position, the second only where it does not); loss and
    lm_head gradient equal that textbook computation, and the fused lm_head still uses the
    gradient its forward built."""
    from transformers import AutoModelForCausalLM

    from logitstore.reader import StoreReader
    from logitstore.toolkit.vocab_map import vocab_map_for
    from student_train.cross_batch import CrossCollate
    from student_train.cross_token_losses import project_topk_target
    from student_train.cross_tokenizer import stored_teacher_tokenizer
    from student_train.losses import cross_entropy_per_position, sparse_kd_per_position
    from student_train.loss_combine import Weights, combine, token_sum_gradients
    from student_train.objective import (DistillationObjective, LossSettings, SignalPlan,
                                         denominators, shifted, target_positions)

    reader = StoreReader(str(world["store"]))
    vmap = vocab_map_for(stored_teacher_tokenizer(reader, str(world["store"])),
                         world["student_tok"], cache_dir=world["root"] / "maps")
    first = vmap.teacher_to_student_first
    names = ["teacher", "sharp"]
    collate = CrossCollate(world["student_tok"], names, {n: first for n in names}, 0.0)
    batch = collate([[s] for s in reader.read_segment(0)[:4]], [[1.0]] * 4, names,
                    packing=False)
    kd_a = batch["signals"]["teacher"]["kd_mask"]
    stripes = torch.arange(kd_a.shape[1]) % 3  # A misses every third position, B two in three
    batch["signals"]["teacher"]["kd_mask"] = kd_a & (stripes != 0)
    batch["signals"]["sharp"]["kd_mask"] = kd_a & (stripes != 1)
    if mixture == "confidence":  # random teachers never see the next token coming: make
        _sure_of_the_label(batch["signals"]["sharp"], batch, first, every=2)  # one of them
    plans = [SignalPlan(n, kd_weight=w, target="topk", cross_loss="pkl")
             for n, w in zip(names, WEIGHTS)]
    weights = Weights(alpha=0.6, mix_per_position=mix)
    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_pretrained(world["student"]).float()
    settings = LossSettings(chunk_size=7, mix_per_position=mix, signal_mixture=mixture)
    objective = DistillationObjective(student, plans, settings,
                                      vocab_maps={n: (first, vmap.exact) for n in names})
    dens = denominators(batch)
    sums = objective(batch, temperature=1.0, sum_grads=token_sum_gradients(dens, plans, weights))
    loss_value, _ = combine(sums, dens, plans, weights)
    backward_on_forward_grads(loss_value, monkeypatch)
    got = student.lm_head.weight.grad.clone()

    reference = AutoModelForCausalLM.from_pretrained(world["student"]).float()
    logits = reference(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).logits
    trained = target_positions(batch)
    labels = shifted(batch["labels"], -100)
    kl, masks, seen = [], [], []  # per signal, [B, S]: KD, trained positions it covers, c_s
    for name in names:
        signal = batch["signals"][name]
        mapped = project_topk_target(signal["topk_ids"].long(), signal["topk_logprobs"].float(),
                                     torch.from_numpy(first).long(), torch.from_numpy(vmap.exact))
        kl.append(sparse_kd_per_position(logits, mapped.target))
        masks.append((trained & signal["kd_mask"]).float())
        probability = torch.zeros(labels.shape)  # the target's probability of the label
        for i, j in zip(*torch.nonzero(trained, as_tuple=True)):
            t = mapped.target
            for k in range(t.ids.shape[-1]):
                if t.valid[i, j, k] and t.ids[i, j, k] == labels[i, j]:
                    probability[i, j] += float(t.logprobs[i, j, k].exp())
        seen.append(probability + 1e-6 if mixture == "confidence" else torch.ones(labels.shape))
    if mixture == "priority":  # the first signal's positions are its own, the rest B's
        seen = [masks[0], masks[1] * (1 - masks[0])]
    covered = sum(masks) > 0
    total = sum(WEIGHTS)  # W: the mixture scale is W / cover (1 for weights that sum to 1)
    cover = sum(w * m * c for w, m, c in zip(WEIGHTS, masks, seen))
    both = (masks[0] * masks[1]).bool()
    assert both.any() and (covered & ~both).any() and covered.sum() < trained.sum()
    if mixture == "confidence":  # where "sharp" is sure, "teacher" counts almost nothing;
        share = WEIGHTS[0] * seen[0][both] / cover[both]  # where neither is, the plain 0.7
        assert share.min() < 0.01 and share.max() == pytest.approx(0.7, abs=0.05)
    if mix:  # the weighted mean over the signals at each position, over the covered ones
        weighted = sum(w * m * c * k for w, m, c, k in zip(WEIGHTS, masks, seen, kl))
        kd = (total * weighted[covered] / cover[covered]).sum() / covered.sum()
    else:  # each signal's mean over its own positions, weighted
        kd = sum(w * (m * k).sum() / m.sum() for w, m, k in zip(WEIGHTS, masks, kl))
    ce = cross_entropy_per_position(logits[trained], labels[trained])
    free = ~covered[trained]
    expected = 0.6 * kd + (0.4 * ce.sum() + 0.6 * ce[free].sum()) / trained.sum()
    expected.backward()
    assert float(loss_value) == pytest.approx(float(expected), rel=1e-5)
    torch.testing.assert_close(got, reference.lm_head.weight.grad, rtol=1e-4, atol=1e-6)


def _sure_of_the_label(signal: dict, batch: dict, first, every: int) -> None:
    """At every `every`-th trained position give the signal's top-1 (0.95) to a teacher token
    whose mapped student token is the label, the other entries sharing 0.04."""
    import numpy as np

    from student_train.objective import shifted, target_positions

    labels = shifted(batch["labels"], -100)
    ids, logprobs = signal["topk_ids"], signal["topk_logprobs"]
    K = ids.shape[-1]
    for n, (i, j) in enumerate(zip(*torch.nonzero(target_positions(batch), as_tuple=True))):
        teacher_ids = np.flatnonzero(first == int(labels[i, j]))
        if n % every or len(teacher_ids) == 0:
            continue
        rest = [t for t in range(len(first)) if t != teacher_ids[0]][:K - 1]
        ids[i, j] = torch.tensor([int(teacher_ids[0]), *rest], dtype=ids.dtype)
        logprobs[i, j] = torch.log(torch.tensor([0.95] + [0.04 / (K - 1)] * (K - 1),
                                                dtype=logprobs.dtype))
