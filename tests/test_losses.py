"""KD losses vs straightforward dense references written out here (probabilities, loops)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from reference_cross_losses import JSD_BETA, SKEW_ALPHA, temper, textbook_divergence
from reference_losses import (
    blend_kd_ce,
    combine_teacher_losses,
    cross_entropy_loss,
    dense_kd_per_position,
    distillm_med_loss,
    masked_mean,
    sparse_kd_loss,
    specialty_sample_weights,
)
from student_train.losses import (
    KD_LOSSES,
    build_sampled_target,
    build_topk_target,
    divergence,
    sparse_kd_per_position,
    temperature_at,
)

BETA, ALPHA = JSD_BETA, SKEW_ALPHA  # non-default JSD beta / skew alpha: a swapped convention shows


# ----------------------------------------------------------------------------- references

# ref_divergence: the textbook formulas on explicit probability lists; temper: p^(1/T) normalised
ref_divergence = textbook_divergence


def softmax_list(logits: list[float], T: float = 1.0) -> list[float]:
    e = [math.exp(x / T) for x in logits]
    return [x / sum(e) for x in e]


def random_case(B=2, S=3, V=11, seed=0, spread=2.0):
    g = torch.Generator().manual_seed(seed)
    teacher_logits = torch.randn(B, S, V, generator=g, dtype=torch.float64) * spread
    student_logits = torch.randn(B, S, V, generator=g) * spread
    return teacher_logits.softmax(-1), student_logits.requires_grad_()


def run(fn, **kw):
    return fn(jsd_beta=BETA, skew_alpha=ALPHA, **kw)


# ----------------------------------------------------------------------------- divergences

@pytest.mark.parametrize("loss", sorted(KD_LOSSES))
@pytest.mark.parametrize("T", [1.0, 2.5, 0.7])
def test_dense_divergences_match_textbook_formulas(loss, T):
    teacher_probs, z = random_case(V=7)
    got = run(dense_kd_per_position, student_logits=z, teacher_logits=teacher_probs.log().float(),
              loss=loss, temperature=T)
    for b in range(2):
        for s in range(3):
            p = temper(teacher_probs[b, s].tolist(), T)
            q = softmax_list(z[b, s].tolist(), T)
            assert got[b, s].item() == pytest.approx(T * T * ref_divergence(loss, p, q), abs=1e-5)


def test_known_special_cases():
    p = torch.tensor([[0.5, 0.3, 0.2]]).log()
    q = torch.tensor([[0.2, 0.2, 0.6]]).log()
    kl = F.kl_div(q, p, log_target=True, reduction="none").sum(-1)
    assert divergence("kl", p, q).item() == pytest.approx(kl.item(), abs=1e-6)
    assert divergence("skl", p, q, skew_alpha=0.0).item() == pytest.approx(kl.item(), abs=1e-6)
    assert divergence("srkl", p, q, skew_alpha=0.0).item() == pytest.approx(
        divergence("rkl", p, q).item(), abs=1e-6)
    assert divergence("tvd", p, q).item() == pytest.approx(0.4, abs=1e-6)
    assert divergence("jsd", p, q, jsd_beta=0.5).item() == pytest.approx(
        divergence("jsd", q, p, jsd_beta=0.5).item(), abs=1e-6)  # symmetric only at 0.5


def test_bad_arguments_raise():
    p = torch.zeros(1, 3)
    with pytest.raises(ValueError, match="loss must be one of"):
        divergence("kld", p, p)
    with pytest.raises(ValueError, match="jsd_beta"):
        divergence("jsd", p, p, jsd_beta=1.0)
    with pytest.raises(ValueError, match="skew_alpha"):
        divergence("skl", p, p, skew_alpha=1.0)
    with pytest.raises(ValueError, match="same shape"):
        divergence("kl", p, torch.zeros(1, 4))
    with pytest.raises(ValueError, match="temperature"):
        dense_kd_per_position(p, p, temperature=0.0)


# ----------------------------------------------------------------------------- top-k targets

def topk_of(teacher_probs, k):
    top = teacher_probs.topk(k, -1)
    return top.indices, top.values.log().float()


def ref_topk_tail(loss, p_full, z, ids, T):
    """Collapse teacher and student to the k ids + the rest (explicit loop over the vocab),
    then temper each collapsed distribution bin-wise."""
    rest_p = sum(x for j, x in enumerate(p_full) if j not in ids)
    q_full = softmax_list(z)
    rest_q = sum(x for j, x in enumerate(q_full) if j not in ids)
    p = temper([p_full[i] for i in ids] + [rest_p], T)
    q = temper([q_full[i] for i in ids] + [rest_q], T)
    return T * T * ref_divergence(loss, p, q)


def ref_topk_renormalised(loss, p_full, z, ids, T):
    p = temper([p_full[i] for i in ids], T)
    if loss == "kl":  # student: full-vocab softmax(z / T) at the ids
        q_full = softmax_list(z, T)
        return T * T * sum(x * math.log(x / q_full[i]) for x, i in zip(p, ids))
    return T * T * ref_divergence(loss, p, softmax_list([z[i] for i in ids], T))


@pytest.mark.parametrize("loss", sorted(KD_LOSSES))
@pytest.mark.parametrize("mode,ref", [("tail", ref_topk_tail),
                                      ("renormalised", ref_topk_renormalised)])
@pytest.mark.parametrize("k,T", [(1, 1.0), (3, 1.0), (3, 2.0), (4, 0.6)])
def test_topk_matches_dense_reference(loss, mode, ref, k, T):
    teacher_probs, z = random_case(seed=k)
    ids, logprobs = topk_of(teacher_probs, k)
    target = build_topk_target(ids, logprobs, temperature=T, mode=mode)
    got = run(sparse_kd_per_position, student_logits=z, target=target, loss=loss)
    for b in range(2):
        for s in range(3):
            want = ref(loss, teacher_probs[b, s].tolist(), z[b, s].tolist(),
                       ids[b, s].tolist(), T)
            assert got[b, s].item() == pytest.approx(want, rel=1e-4, abs=1e-5)
    got.sum().backward()
    assert torch.isfinite(z.grad).all()


@pytest.mark.parametrize("loss", sorted(KD_LOSSES))
def test_tail_mode_with_full_support_is_the_dense_divergence(loss):
    teacher_probs, z = random_case(V=6)
    ids, logprobs = topk_of(teacher_probs, 6)
    target = build_topk_target(ids, logprobs, temperature=1.7)
    got = run(sparse_kd_per_position, student_logits=z, target=target, loss=loss)
    want = run(dense_kd_per_position, student_logits=z, teacher_logits=teacher_probs.log().float(),
               loss=loss, temperature=1.7)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    got.sum().backward()
    assert torch.isfinite(z.grad).all()


@pytest.mark.parametrize("T", [0.5, 1.0, 3.0])
def test_tail_mode_is_zero_when_student_equals_teacher_at_any_temperature(T):
    # The symmetric tail treatment: matching distributions give 0 at every T (a teacher-only
    # pseudo-token temperature would not).
    teacher_probs, _ = random_case(V=9)
    ids, logprobs = topk_of(teacher_probs, 3)
    z = teacher_probs.log().float()
    target = build_topk_target(ids, logprobs, temperature=T)
    for loss in KD_LOSSES:
        assert run(sparse_kd_per_position, student_logits=z, target=target,
                   loss=loss).abs().max() < 1e-5


@pytest.mark.parametrize("kind", ["tail", "renormalised", "sampled"])
def test_float64_stays_float64_and_passes_gradcheck(kind):
    # The reference the fused lm_head loss is tested against: in float64 its own gradient must
    # agree with finite differences (padding entries and label smoothing included).
    g = torch.Generator().manual_seed(3)
    teacher = torch.randn(1, 2, 7, generator=g, dtype=torch.float64).log_softmax(-1)
    if kind == "sampled":
        target = build_sampled_target(torch.tensor([[[1, 4, 6], [0, 2, 5]]]),
                                      torch.tensor([[[3, 1, 0], [2, 2, 0]]]), teacher[..., :3],
                                      n_draws=4, sample_temperature=1.5, temperature=0.8)
    else:
        top = teacher.topk(3, -1)
        ids, lp = top.indices.clone(), top.values
        ids[0, 1, 2] = -1  # padding
        target = build_topk_target(ids, lp, temperature=1.6, mode=kind)
    assert target.logprobs.dtype == torch.float64
    z = torch.randn(1, 2, 7, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[3, 5]])
    for loss in ("kl", "jsd"):
        assert sparse_kd_per_position(z, target, loss=loss).dtype == torch.float64
        assert torch.autograd.gradcheck(
            lambda x: sparse_kd_per_position(x, target, loss=loss), (z,))
    assert torch.autograd.gradcheck(
        lambda x: cross_entropy_loss(x, labels, label_smoothing=0.2), (z,))


def test_k1_tail_mode_still_teaches_but_renormalised_other_losses_do_not():
    teacher_probs, z = random_case()
    ids, logprobs = topk_of(teacher_probs, 1)
    tail = sparse_kd_per_position(z, build_topk_target(ids, logprobs), loss="jsd")
    renorm = sparse_kd_per_position(z, build_topk_target(ids, logprobs, mode="renormalised"),
                                    loss="jsd")
    assert (tail > 1e-4).all() and (renorm.abs() < 1e-7).all()


def test_topk_padding_and_quantised_overflow_are_handled():
    # -inf log-prob / negative id = padding; stored mass slightly > 1 (quantisation) = no tail.
    ids = torch.tensor([[[2, 4, -1]]])
    logprobs = torch.tensor([[[math.log(0.7), math.log(0.31), -math.inf]]])
    target = build_topk_target(ids, logprobs)
    assert target.valid.tolist() == [[[True, True, False]]]
    assert target.tail_logprob.item() < -1e29  # empty tail
    z = torch.randn(1, 1, 5, requires_grad=True)
    value = sparse_kd_per_position(z, target)
    q = z.detach().softmax(-1)[0, 0].tolist()
    p = [0.7 / 1.01, 0.31 / 1.01, 0.0]
    want = ref_divergence("kl", p, [q[2], q[4], 1 - q[2] - q[4]])  # token 0 is in the tail
    assert value.item() == pytest.approx(want, abs=1e-5)
    value.sum().backward()
    assert torch.isfinite(z.grad).all()


def test_topk_target_rejects_bad_input():
    ids = torch.tensor([[[1, 1]]])
    with pytest.raises(ValueError, match="distinct"):
        build_topk_target(ids, torch.tensor([[[-1.0, -2.0]]]))
    with pytest.raises(ValueError, match="mode"):
        build_topk_target(ids[..., :1], torch.zeros(1, 1, 1), mode="bucket")
    with pytest.raises(ValueError, match=r"\[B, S, K\]"):
        build_topk_target(ids, torch.zeros(1, 1, 3))


# ----------------------------------------------------------------------------- sampled targets

def draw(teacher_probs_row, n_draws, replicas, tau_dump, gen):
    """Replicas of n_draws ids from p at tau_dump -> padded ids/counts/logprobs [R, 1, V]."""
    V = teacher_probs_row.shape[0]
    sampling = torch.tensor(temper(teacher_probs_row.tolist(), tau_dump))
    drawn = torch.multinomial(sampling.expand(replicas, V), n_draws, replacement=True,
                              generator=gen)
    counts = torch.zeros(replicas, V).scatter_add_(1, drawn, torch.ones(replicas, n_draws))
    # Pack the drawn ids first, padding (count 0, id 0 - possibly also a drawn id) after.
    order = counts.sort(dim=-1, descending=True, stable=True).indices
    counts = counts.gather(-1, order)
    logprobs = teacher_probs_row.log().float()[order]
    ids = torch.where(counts > 0, order, 0)
    return ids[:, None], counts[:, None], logprobs[:, None]


def test_sampled_kl_is_ce_to_the_weights_minus_their_entropy():
    g = torch.Generator().manual_seed(1)
    teacher_probs, _ = random_case(B=1, S=1, V=8)
    ids, counts, logprobs = draw(teacher_probs[0, 0], 12, 3, 1.0, g)
    z = torch.randn(3, 1, 8, generator=g)
    for T in (1.0, 2.0):
        target = build_sampled_target(ids, counts, logprobs, n_draws=12, temperature=T,
                                      sample_temperature=T)
        got = sparse_kd_per_position(z, target, loss="kl")
        for r in range(3):
            q = softmax_list(z[r, 0].tolist(), T)
            want = sum((c / 12) * math.log((c / 12) / q[i])
                       for i, c in zip(ids[r, 0].tolist(), counts[r, 0].tolist()) if c > 0)
            assert got[r, 0].item() == pytest.approx(T * T * want, abs=1e-5)


def test_sampled_padding_ids_do_not_join_the_support():
    # Padding slots (count 0) carry id 0, a token that was never drawn.
    ids, counts = torch.tensor([[[3, 1, 0, 0]]]), torch.tensor([[[3, 1, 0, 0]]])
    target = build_sampled_target(ids, counts, torch.full((1, 1, 4), -1.0), n_draws=4)
    z = torch.randn(1, 1, 6)
    q = softmax_list(z[0, 0].tolist())
    want = 0.75 * math.log(0.75 / q[3]) + 0.25 * math.log(0.25 / q[1])
    assert sparse_kd_per_position(z, target).item() == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize("loss", ["rkl", "jsd", "tvd"])
def test_sampled_other_losses_compare_on_the_support(loss):
    g = torch.Generator().manual_seed(2)
    teacher_probs, _ = random_case(B=1, S=1, V=8)
    ids, counts, logprobs = draw(teacher_probs[0, 0], 10, 2, 1.0, g)
    z = torch.randn(2, 1, 8, generator=g)
    target = build_sampled_target(ids, counts, logprobs, n_draws=10)
    got = run(sparse_kd_per_position, student_logits=z, target=target, loss=loss)
    for r in range(2):
        support = [i for i, c in zip(ids[r, 0].tolist(), counts[r, 0].tolist()) if c > 0]
        w = [c / 10 for c in counts[r, 0].tolist() if c > 0]
        q = softmax_list([z[r, 0, i].item() for i in support])
        assert got[r, 0].item() == pytest.approx(ref_divergence(loss, w, q), abs=1e-5)


def test_sampled_gradient_is_unbiased_for_forward_kl():
    # Law of large numbers over many independent small draws (N=16): the mean RS-KD gradient
    # w.r.t. the student logits approaches the dense grad KL(p || q) = q - p.
    g = torch.Generator().manual_seed(3)
    teacher_probs, _ = random_case(B=1, S=1, V=10, spread=1.0)
    R, N = 4000, 16
    ids, counts, logprobs = draw(teacher_probs[0, 0], N, R, 1.0, g)
    z0 = torch.randn(10, generator=g)
    z = z0.expand(R, 1, 10).clone().requires_grad_()
    target = build_sampled_target(ids, counts, logprobs, n_draws=N)
    sparse_kd_per_position(z, target).sum().backward()
    mean_grad = z.grad.mean((0, 1))
    dense_grad = z0.softmax(-1) - teacher_probs[0, 0].float()
    assert (mean_grad - dense_grad).abs().max() < 0.01
    assert dense_grad.abs().max() > 0.05  # the tolerance is meaningful
    # the value converges too, with a single large draw
    ids, counts, logprobs = draw(teacher_probs[0, 0], 20000, 1, 1.0, g)
    value = sparse_kd_per_position(z0[None, None], build_sampled_target(
        ids, counts, logprobs, n_draws=20000))
    dense_value = dense_kd_per_position(z0, teacher_probs[0, 0].log().float())
    assert value.item() == pytest.approx(dense_value.item(), abs=0.01)


@pytest.mark.parametrize("tau_dump,tau", [(1.0, 2.0), (1.5, 1.0)])
def test_sampled_reweighting_matches_tempered_teacher(tau_dump, tau):
    g = torch.Generator().manual_seed(4)
    teacher_probs, _ = random_case(B=1, S=1, V=10, spread=1.5)
    p_row = teacher_probs[0, 0]
    R, N = 400, 256
    ids, counts, logprobs = draw(p_row, N, R, tau_dump, g)
    target = build_sampled_target(ids, counts, logprobs, n_draws=N,
                                  sample_temperature=tau_dump, temperature=tau)
    weights = torch.zeros(R, 10).scatter_add_(
        1, target.ids[:, 0], target.logprobs[:, 0].exp() * target.valid[:, 0])
    tempered = torch.tensor(temper(p_row.tolist(), tau))
    assert (weights.mean(0) - tempered).abs().max() < 0.01
    assert (tempered - torch.tensor(temper(p_row.tolist(), tau_dump))).abs().max() > 0.05
    # and so the mean gradient approaches the dense tempered KD gradient
    z0 = torch.randn(10, generator=g)
    z = z0.expand(R, 1, 10).clone().requires_grad_()
    sparse_kd_per_position(z, target).sum().backward()
    zd = z0.clone().requires_grad_()
    dense_kd_per_position(zd, p_row.log().float(), temperature=tau).backward()
    assert (z.grad.mean((0, 1)) - zd.grad).abs().max() < 0.02


def test_sampled_target_rejects_bad_input():
    ids = torch.tensor([[[0, 1]]])
    with pytest.raises(ValueError, match="n_draws=4"):
        build_sampled_target(ids, torch.tensor([[[2, 1]]]), torch.zeros(1, 1, 2), n_draws=4)
    with pytest.raises(ValueError, match="distinct"):
        build_sampled_target(torch.tensor([[[3, 3]]]), torch.tensor([[[2, 2]]]),
                             torch.zeros(1, 1, 2), n_draws=4)
    with pytest.raises(ValueError, match="n_draws"):
        build_sampled_target(ids, torch.tensor([[[2, 2]]]), torch.zeros(1, 1, 2), n_draws=0)


# ----------------------------------------------------------------------------- masks, CE

def test_masked_mean_with_sample_weights_matches_loops():
    g = torch.Generator().manual_seed(5)
    values = torch.randn(3, 4, generator=g)
    # different token counts per sample, so token- and sample-level weighting differ
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 0, 0], [1, 0, 1, 1]], dtype=torch.bool)
    weights = torch.tensor([0.5, 2.0, 1.0])
    num = sum(weights[b] * values[b, s] for b in range(3) for s in range(4) if mask[b, s])
    den = sum(weights[b] for b in range(3) for s in range(4) if mask[b, s])
    assert masked_mean(values, mask, weights).item() == pytest.approx((num / den).item(), abs=1e-6)
    plain = values[mask].mean()
    assert masked_mean(values, mask).item() == pytest.approx(plain.item(), abs=1e-6)
    with pytest.raises(ValueError, match=">= 0"):
        masked_mean(values, mask, -weights)


def test_all_masked_batch_is_zero_with_finite_grads():
    teacher_probs, z = random_case(S=1)  # single-token sequences too
    ids, logprobs = topk_of(teacher_probs, 2)
    mask = torch.zeros(2, 1, dtype=torch.bool)
    kd = sparse_kd_loss(z, build_topk_target(ids, logprobs, temperature=2.0), mask, loss="rkl")
    ce = cross_entropy_loss(z, torch.full((2, 1), -100), label_smoothing=0.1)
    total = blend_kd_ce(kd, ce, 0.5)
    assert total.item() == 0.0
    total.backward()
    assert torch.isfinite(z.grad).all() and (z.grad == 0).all()


def test_masked_kd_loss_averages_only_selected_positions():
    teacher_probs, z = random_case(B=3, S=4)
    ids, logprobs = topk_of(teacher_probs, 3)
    mask = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.bool)
    target = build_topk_target(ids, logprobs, temperature=1.5)
    per_position = sparse_kd_per_position(z, target, loss="skl")
    got = sparse_kd_loss(z, target, mask, loss="skl")
    assert got.item() == pytest.approx(per_position[mask].mean().item(), abs=1e-6)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_cross_entropy_matches_torch(eps):
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(2, 5, 9, generator=g, requires_grad=True)
    labels = torch.randint(0, 9, (2, 5), generator=g)
    labels[0, 1] = -100
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 4] = False
    ours = cross_entropy_loss(logits, labels, mask, label_smoothing=eps)
    ref_labels = labels.masked_fill(~mask, -100)
    want = F.cross_entropy(logits.reshape(-1, 9), ref_labels.reshape(-1), label_smoothing=eps)
    assert ours.item() == pytest.approx(want.item(), abs=1e-6)
    (g_ours,) = torch.autograd.grad(ours, logits)
    (g_want,) = torch.autograd.grad(want, logits)
    torch.testing.assert_close(g_ours, g_want)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10**6), k=st.integers(1, 6), T=st.floats(0.3, 5.0))
def test_every_sparse_divergence_is_nonnegative_and_finite(seed, k, T):
    teacher_probs, z = random_case(B=1, S=2, V=6, seed=seed, spread=4.0)
    ids, logprobs = topk_of(teacher_probs, k)
    for mode in ("tail", "renormalised"):
        target = build_topk_target(ids, logprobs, temperature=T, mode=mode)
        for loss in KD_LOSSES:
            value = run(sparse_kd_per_position, student_logits=z, target=target, loss=loss)
            assert torch.isfinite(value).all() and (value > -1e-5).all()


# ----------------------------------------------------------------------------- combinations

def test_blend_and_teacher_combination():
    kd, ce = torch.tensor(2.0), torch.tensor(4.0)
    assert blend_kd_ce(kd, ce, 0.7).item() == pytest.approx(0.7 * 2 + 0.3 * 4)
    combined = combine_teacher_losses([torch.tensor(1.0), torch.tensor(3.0)], [0.6, 0.2])
    assert combined.item() == pytest.approx(0.75 * 1 + 0.25 * 3)
    with pytest.raises(ValueError, match="one weight per loss"):
        combine_teacher_losses([kd], [1.0, 2.0])
    with pytest.raises(ValueError, match="alpha"):
        blend_kd_ce(kd, ce, 1.5)
    weights = specialty_sample_weights(["cardiology", "x"], {"cardiology": 1.2})
    assert weights.tolist() == pytest.approx([1.2, 1.0])


@pytest.mark.parametrize("alpha_weights", ["kd", "ce"])
def test_distillm_med_loss_matches_per_specialty_loops(alpha_weights):
    g = torch.Generator().manual_seed(7)
    kd, ce = torch.rand(4, 3, generator=g), torch.rand(4, 3, generator=g)
    mask = torch.rand(4, 3, generator=g) > 0.3
    mask[:, 0] = True
    specialty = torch.tensor([0, 2, 0, 2])  # specialty 1 absent from the batch
    w = torch.tensor([1.2, 5.0, 0.8])
    att = torch.tensor(0.5)
    got = distillm_med_loss(kd, ce, mask, specialty, w, alpha=0.7, alpha_weights=alpha_weights,
                            attention_loss=att, beta=0.2)
    a_kd = 0.7 if alpha_weights == "kd" else 0.3
    want = 0.2 * 0.5
    for s in (0, 2):
        vals = [a_kd * kd[b, t] + (1 - a_kd) * ce[b, t]
                for b in range(4) for t in range(3) if specialty[b] == s and mask[b, t]]
        want += w[s].item() * (sum(vals) / len(vals)).item()
    assert got.item() == pytest.approx(want, abs=1e-6)


# ----------------------------------------------------------------------------- temperature

def test_temperature_schedules():
    assert temperature_at(50, 100, 4.0, 1.0, "constant") == 4.0
    assert temperature_at(25, 100, 4.0, 2.0, "linear") == pytest.approx(3.5)
    assert temperature_at(0, 100, 8.0, 1.0, "exponential") == pytest.approx(8.0)
    assert temperature_at(50, 100, 8.0, 1.0, "exponential") == pytest.approx(math.sqrt(8.0))
    assert temperature_at(100, 100, 8.0, 1.0, "exponential") == pytest.approx(1.0)
    assert temperature_at(500, 100, 8.0, 1.0, "linear") == pytest.approx(1.0)  # clamped
    # tau(t) = tau0 * exp(-gamma t) with gamma = ln(tau0 / tau_end) / total
    assert temperature_at(30, 100, 8.0, 1.0, "exponential") == pytest.approx(
        8.0 * math.exp(-math.log(8.0) / 100 * 30))
    with pytest.raises(ValueError, match="schedule kind"):
        temperature_at(0, 10, 2.0, 1.0, "cosine")
    with pytest.raises(ValueError, match="t_end"):
        temperature_at(0, 10, 2.0, 0.0, "linear")
