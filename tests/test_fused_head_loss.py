"""fused_head_loss == the reference per-position functions on full logits, values and gradients.

The reference (head_loss_terms.dense_terms) is losses.sparse_kd_per_position and
cross_entropy_per_position run through autograd on [n, V] logits. Most cases run in float64
so that a wrong analytic gradient cannot hide under fp32 rounding.
"""

from __future__ import annotations

import pytest
import torch

import student_train.fused_head_loss as fused
from student_train.fused_head_loss import fused_head_loss
from student_train.head_loss_terms import HeadLossTerms, dense_terms
from student_train.losses import KD_LOSSES, build_sampled_target, build_topk_target

N, D, V = 11, 6, 29
F64 = torch.float64


def inputs(seed=0, n=N, v=V, dtype=F64, bias=True, spread=1.5):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, D, generator=g, dtype=F64) * spread).to(dtype).requires_grad_()
    weight = (torch.randn(v, D, generator=g, dtype=F64) / D**0.5).to(dtype).requires_grad_()
    b = (torch.randn(v, generator=g, dtype=F64) * 0.3).to(dtype).requires_grad_() if bias \
        else None
    return hidden, weight, b, g


def topk_target(g, n=N, v=V, k=5, T=1.0, mode="tail", pad=True, dtype=F64):
    teacher = (torch.randn(n, v, generator=g, dtype=F64) * 2).log_softmax(-1).to(dtype)
    top = teacher.topk(k, -1)
    ids, lp = top.indices.clone(), top.values.clone()
    if pad:  # padding entries: id -1 and a -inf log-prob, and one row with no entry at all
        ids[1, -2:] = -1
        lp[2, -1] = -float("inf")
        ids[3, :] = -1
    return build_topk_target(ids[None], lp[None], temperature=T, mode=mode)


def sampled_target(g, n=N, v=V, m=6, T=1.0, tau_dump=1.0):
    ids = torch.stack([torch.randperm(v, generator=g)[:m] for _ in range(n)])
    counts = torch.zeros(n, m, dtype=torch.long)
    for r in range(n):  # 8 draws spread over the first entries; the rest is padding
        counts[r, : 1 + r % (m - 1)] = 1
        counts[r, 0] += 8 - counts[r].sum()
    lp = -torch.rand(n, m, generator=g, dtype=F64) * 3
    return build_sampled_target(ids[None], counts[None], lp[None], n_draws=8,
                                sample_temperature=tau_dump, temperature=T)


def rows(target):
    """[1, n, K] targets (what the builders take) -> [n, K] rows."""
    return HeadLossTerms(targets=(target,)).rows(0).targets[0]


def labels_of(g, n=N, v=V):
    y = torch.randint(0, v, (n,), generator=g)
    y[4] = -100
    return y


def check(terms, hidden, weight, bias, *, chunk_size=4, expected=True, factor=2.5, tol=1e-10):
    """fused vs reference: values, and grads of sum(coef * values) * factor."""
    g = torch.Generator().manual_seed(7)
    coef = torch.rand(hidden.shape[0], terms.count, generator=g, dtype=F64).to(hidden.dtype)
    got = fused_head_loss(hidden, weight, terms, bias=bias, chunk_size=chunk_size,
                          expected_grad=coef if expected else None)
    logits = hidden @ weight.T + (0 if bias is None else bias)
    want = dense_terms(logits, terms)
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    leaves = [t for t in (hidden, weight, bias) if t is not None]
    got_g = torch.autograd.grad((got * coef).sum() * factor, leaves)
    want_g = torch.autograd.grad((want * coef).sum() * factor, leaves)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


@pytest.mark.parametrize("T", [1.0, 0.7, 2.5])
@pytest.mark.parametrize("mode", ["tail", "renormalised"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("expected", [True, False])
def test_topk_kl_and_ce_match_the_reference(T, mode, smoothing, expected):
    hidden, weight, bias, g = inputs()
    terms = HeadLossTerms(targets=(rows(topk_target(g, T=T, mode=mode)),), labels=labels_of(g),
                          label_smoothing=smoothing)
    check(terms, hidden, weight, bias, expected=expected)


@pytest.mark.parametrize("T,tau_dump", [(1.0, 1.0), (2.0, 1.0), (0.8, 1.5)])
def test_sampled_kl_matches_the_reference(T, tau_dump):
    hidden, weight, bias, g = inputs(seed=1)
    terms = HeadLossTerms(targets=(rows(sampled_target(g, T=T, tau_dump=tau_dump)),),
                          labels=labels_of(g))
    check(terms, hidden, weight, bias)


@pytest.mark.parametrize("loss", sorted(set(KD_LOSSES) - {"kl"}))
@pytest.mark.parametrize("kind", ["tail", "renormalised", "sampled"])
def test_other_divergences_match_the_reference(loss, kind):
    hidden, weight, bias, g = inputs(seed=2)
    target = sampled_target(g, T=1.7) if kind == "sampled" else topk_target(g, T=1.7, mode=kind)
    terms = HeadLossTerms(targets=(rows(target),), labels=labels_of(g), loss=loss,
                          jsd_beta=0.3, skew_alpha=0.2)
    check(terms, hidden, weight, bias)


def test_several_teachers_kd_only_and_ce_only():
    hidden, weight, bias, g = inputs(seed=3)
    a, b = rows(topk_target(g, T=2.0)), rows(sampled_target(g, T=2.0))
    c = rows(topk_target(g, T=2.0, mode="renormalised", k=3))
    check(HeadLossTerms(targets=(a, b, c), labels=labels_of(g), label_smoothing=0.2),
          hidden, weight, bias, chunk_size=3)
    check(HeadLossTerms(targets=(a, b)), hidden, weight, None, chunk_size=100)
    check(HeadLossTerms(labels=labels_of(g)), hidden, weight, bias, chunk_size=1)


@pytest.mark.parametrize("mode", ["tail", "renormalised"])
def test_support_is_the_whole_vocabulary(mode):
    hidden, weight, bias, g = inputs(seed=4, v=7)
    terms = HeadLossTerms(targets=(rows(topk_target(g, v=7, k=7, T=1.3, mode=mode, pad=False)),),
                          labels=labels_of(g, v=7))
    check(terms, hidden, weight, bias)


def test_single_position_and_all_masked():
    hidden, weight, bias, g = inputs(seed=5, n=1)
    target = rows(topk_target(g, n=1, pad=False))
    check(HeadLossTerms(targets=(target,), labels=torch.tensor([3])), hidden, weight, bias)
    empty, weight, bias, g = inputs(seed=5, n=0)
    terms = HeadLossTerms(targets=(HeadLossTerms(targets=(target,)).rows(slice(0, 0)).targets),
                          labels=torch.zeros(0, dtype=torch.long))
    out = fused_head_loss(empty, weight, terms, bias=bias, expected_grad=torch.ones(0, 2, dtype=F64))
    assert out.shape == (0, 2)
    out.sum().backward()
    assert (weight.grad == 0).all() and (bias.grad == 0).all() and empty.grad.shape == (0, D)


def test_a_tail_far_below_the_top_is_redone_exactly_in_fp32(monkeypatch):
    # fp32: exp(z - max) of a tail ~90 nats down underflows; such rows take the exact path
    hidden, weight, bias, g = inputs(seed=6, dtype=torch.float32)
    target = rows(topk_target(g, T=2.0, dtype=torch.float32))
    with torch.no_grad():
        weight[target.ids[0]] += 90 * hidden[0] / hidden[0].norm() ** 2  # +90 logits, row 0
    hidden, weight = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    redone = []
    real = fused._redo_exactly
    monkeypatch.setattr(fused, "_redo_exactly",
                        lambda *a: (redone.extend(a[5].tolist()), real(*a))[1])
    check(HeadLossTerms(targets=(target,), labels=labels_of(g)), hidden, weight, bias,
          chunk_size=100, tol=2e-5)
    assert 0 in redone


def test_a_gradient_other_than_the_expected_one_is_recomputed(monkeypatch):
    hidden, weight, bias, g = inputs(seed=8)
    terms = HeadLossTerms(targets=(rows(topk_target(g)),), labels=labels_of(g))
    coef = torch.rand(N, 2, generator=g, dtype=F64)
    passes = []
    real = fused._head_pass
    monkeypatch.setattr(fused, "_head_pass",
                        lambda *a: (passes.append(a[4] is not None), real(*a))[1])
    out = fused_head_loss(hidden, weight, terms, bias=bias, expected_grad=coef)
    (out * coef).sum().mul(-3.0).backward()  # a multiple of the expected gradient
    assert passes == [True]  # gradients made in the forward: no second pass
    out = fused_head_loss(hidden, weight, terms, bias=bias, expected_grad=coef)
    got = torch.autograd.grad(out.pow(2).sum(), [hidden, weight, bias])
    assert passes == [True, True, True]  # not proportional: run again with grad_output
    want = dense_terms(hidden @ weight.T + bias, terms)
    for a, b in zip(got, torch.autograd.grad(want.pow(2).sum(), [hidden, weight, bias])):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_forward_keeps_no_logits_sized_tensor_for_backward():
    hidden, weight, bias, g = inputs(seed=9)
    terms = HeadLossTerms(targets=(rows(topk_target(g)),), labels=labels_of(g))
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(t.shape) or t,
                                                  lambda t: t):
        fused_head_loss(hidden, weight, terms, bias=bias, chunk_size=4,
                        expected_grad=torch.ones(N, 2, dtype=F64))
    assert shapes and not [s for s in shapes if len(s) >= 2 and s[0] >= 4 and s[-1] == V]


def test_autocast_bf16_matches_the_checkpointed_path():
    from chunked_loss import chunked_lm_loss

    hidden, weight, bias, g = inputs(seed=10, n=40, v=300, dtype=torch.float32)
    target = build_topk_target(*[x[None] for x in
                                 (torch.randn(40, 300, generator=g).log_softmax(-1)
                                  .topk(8, -1)[::-1])], temperature=1.5)
    terms = HeadLossTerms(targets=(rows(target),), labels=labels_of(g, n=40, v=300))
    coef = torch.rand(40, 2, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused_head_loss(hidden, weight, terms, bias=bias, chunk_size=16,
                              expected_grad=coef)
        want = chunked_lm_loss(
            hidden[None], weight,
            lambda z, t, y: dense_terms(z, HeadLossTerms(targets=(t,), labels=y)),
            (target, terms.labels[None]), bias=bias, chunk_size=16)[0]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for a, b in zip(torch.autograd.grad((got * coef).sum(), [hidden, weight, bias]),
                    torch.autograd.grad((want * coef).sum(), [hidden, weight, bias])):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-2)


def test_bad_arguments_raise():
    hidden, weight, bias, g = inputs()
    terms = HeadLossTerms(labels=labels_of(g))
    with pytest.raises(ValueError, match=r"\[n, d\]"):
        fused_head_loss(hidden[None], weight, terms)
    with pytest.raises(ValueError, match="neither"):
        fused_head_loss(hidden, weight, HeadLossTerms())
    with pytest.raises(ValueError, match="expected_grad"):
        fused_head_loss(hidden, weight, terms, expected_grad=torch.ones(N, 2))
    with pytest.raises(ValueError, match="labels"):
        fused_head_loss(hidden, weight, HeadLossTerms(labels=labels_of(g)[:3]))
