"""Chunked lm_head + loss == the unchunked computation, without keeping [N, V] logits around."""

from __future__ import annotations

import pytest
import torch

from chunked_loss import chunked_kd_ce, chunked_lm_loss
from student_train.losses import (
    build_sampled_target,
    build_topk_target,
    cross_entropy_per_position,
    sparse_kd_per_position,
)

B, S, D, V = 2, 7, 8, 40


def make_case(seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, S, D, generator=g, requires_grad=True)
    weight = (torch.randn(V, D, generator=g) / D**0.5).requires_grad_()
    b = (torch.randn(V, generator=g) * 0.1).requires_grad_() if bias else None
    teacher = torch.randn(B, S, V, generator=g).log_softmax(-1)
    top = teacher.topk(5, -1)
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[0, 2] = -100
    mask = torch.rand(B, S, generator=g) > 0.3
    mask[0, 0] = True
    return hidden, weight, b, top.indices, top.values, labels, mask


def grads(value, *tensors):
    return torch.autograd.grad(value, [t for t in tensors if t is not None])


@pytest.mark.parametrize("loss", ["kl", "jsd", "tvd"])
@pytest.mark.parametrize("chunk_size", [1, 3, 100])
@pytest.mark.parametrize("with_bias", [True, False])
def test_chunked_equals_unchunked_values_and_grads(loss, chunk_size, with_bias):
    hidden, weight, bias, ids, logprobs, labels, mask = make_case(bias=with_bias)
    target = build_topk_target(ids, logprobs, temperature=2.0)
    kd, ce = chunked_kd_ce(hidden, weight, bias=bias, target=target, labels=labels, loss=loss,
                           label_smoothing=0.1, mask=mask, chunk_size=chunk_size)
    logits = hidden @ weight.T + (0 if bias is None else bias)
    kd_ref = sparse_kd_per_position(logits, target, loss=loss) * mask
    ce_ref = cross_entropy_per_position(logits, labels, label_smoothing=0.1) * mask
    torch.testing.assert_close(kd, kd_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ce, ce_ref, atol=1e-5, rtol=1e-5)
    # a weighted sum so each position's gradient differs
    coef = torch.linspace(0.5, 1.5, B * S).reshape(B, S)
    got = grads(((kd + 0.3 * ce) * coef).sum(), hidden, weight, bias)
    want = grads(((kd_ref + 0.3 * ce_ref) * coef).sum(), hidden, weight, bias)
    for g_got, g_want in zip(got, want):
        torch.testing.assert_close(g_got, g_want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk_size", [2, 100])
def test_expected_grads_path_equals_unchunked(chunk_size):
    # what training does: the loss's gradient w.r.t. kd and ce handed to the forward
    hidden, weight, bias, ids, logprobs, labels, mask = make_case(seed=2)
    target = build_topk_target(ids, logprobs, temperature=1.5)
    coef_kd = torch.linspace(0.2, 1.0, B * S).reshape(B, S) * mask
    coef_ce = 0.4 * mask.float()
    kd, ce = chunked_kd_ce(hidden, weight, bias=bias, target=target, labels=labels, mask=mask,
                           chunk_size=chunk_size, expected_grads=(coef_kd, coef_ce))
    logits = hidden @ weight.T + bias
    kd_ref = sparse_kd_per_position(logits, target) * mask
    ce_ref = cross_entropy_per_position(logits, labels) * mask
    torch.testing.assert_close(kd, kd_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ce, ce_ref, atol=1e-5, rtol=1e-5)
    got = grads(((kd * coef_kd + ce * coef_ce) * 7.0).sum(), hidden, weight, bias)
    want = grads(((kd_ref * coef_kd + ce_ref * coef_ce) * 7.0).sum(), hidden, weight, bias)
    for g_got, g_want in zip(got, want):
        torch.testing.assert_close(g_got, g_want, atol=1e-5, rtol=1e-5)


def test_chunked_sampled_target_and_single_term():
    hidden, weight, bias, _, _, labels, _ = make_case(seed=1)
    g = torch.Generator().manual_seed(1)
    ids = torch.stack([torch.randperm(V, generator=g)[:4] for _ in range(B * S)]).view(B, S, 4)
    counts = torch.tensor([3, 2, 1, 0]).expand(B, S, 4)
    target = build_sampled_target(ids, counts, -torch.rand(B, S, 4, generator=g), n_draws=6,
                                  temperature=1.5)
    kd, ce = chunked_kd_ce(hidden, weight, bias=bias, target=target, chunk_size=4)
    assert ce is None
    logits = hidden @ weight.T + bias
    torch.testing.assert_close(kd, sparse_kd_per_position(logits, target), atol=1e-5, rtol=1e-5)
    _, ce_only = chunked_kd_ce(hidden, weight, bias=bias, labels=labels, chunk_size=5)
    torch.testing.assert_close(ce_only, cross_entropy_per_position(logits, labels),
                               atol=1e-5, rtol=1e-5)


def test_all_masked_gives_zeros_and_finite_grads():
    hidden, weight, bias, ids, logprobs, labels, _ = make_case()
    mask = torch.zeros(B, S, dtype=torch.bool)
    kd, ce = chunked_kd_ce(hidden, weight, bias=bias, target=build_topk_target(ids, logprobs),
                           labels=labels, mask=mask, chunk_size=4)
    assert kd.shape == ce.shape == (B, S) and (kd == 0).all() and (ce == 0).all()
    (kd.sum() + ce.sum()).backward()
    assert torch.isfinite(hidden.grad).all() and (hidden.grad == 0).all()


def saved_for_backward(fn):
    """Shapes of every tensor autograd saves while fn() builds its graph."""
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return shapes


def test_forward_saves_no_logits_sized_tensor():
    hidden, weight, bias, ids, logprobs, labels, mask = make_case()
    target = build_topk_target(ids, logprobs)

    def logits_sized(shapes):
        return [s for s in shapes if len(s) >= 2 and s[-1] == V]

    chunked = saved_for_backward(lambda: chunked_kd_ce(
        hidden, weight, bias=bias, target=target, labels=labels, mask=mask, chunk_size=3))
    assert chunked and not logits_sized(chunked)
    # control: the plain computation does save [.., V] tensors, so the check can fail
    plain = saved_for_backward(lambda: sparse_kd_per_position(hidden @ weight.T + bias, target))
    assert logits_sized(plain)


def test_generic_per_position_loss_and_errors():
    hidden, weight, _, _, _, labels, mask = make_case()

    def two_terms(logits, label_rows):
        return torch.stack([logits.logsumexp(-1), logits.max(-1).values], -1)

    out = chunked_lm_loss(hidden, weight, two_terms, (labels,), mask=mask, chunk_size=2)
    logits = hidden @ weight.T
    want = torch.stack([logits.logsumexp(-1), logits.max(-1).values], -1) * mask[..., None]
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"\[V, d\]"):
        chunked_lm_loss(hidden, weight.T, two_terms, (labels,))
    with pytest.raises(ValueError, match="start with"):
        chunked_lm_loss(hidden, weight, two_terms, (labels[:, :3],))
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_lm_loss(hidden, weight, two_terms, (labels,), chunk_size=0)
    with pytest.raises(ValueError, match="neither"):
        chunked_kd_ce(hidden, weight)


PEAK_SCRIPT = """
import resource, sys, torch
sys.path.insert(0, sys.argv[3])  # tests/, where chunked_loss lives
from chunked_loss import chunked_kd_ce
from student_train.losses import (build_topk_target, cross_entropy_per_position,
                                  sparse_kd_per_position)
torch.manual_seed(0)
kind, N, V, d, k = sys.argv[1], int(sys.argv[2]), 32000, 32, 16
h = torch.randn(1, N, d, requires_grad=True)
W = (torch.randn(V, d) / 6).requires_grad_()
ids = (torch.randint(0, V, (1, N, 1)) + torch.arange(k)) % V
target = build_topk_target(ids, torch.randn(1, N, k).log_softmax(-1) - 1.0, temperature=2.0)
labels = torch.randint(0, V, (1, N))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if kind == "chunked":
    kd, ce = chunked_kd_ce(h, W, target=target, labels=labels, chunk_size=64)
else:
    logits = h @ W.T
    kd, ce = sparse_kd_per_position(logits, target), cross_entropy_per_position(logits, labels)
(kd.mean() + ce.mean()).backward()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)
"""


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_number_of_positions():
    # Peak RSS over forward AND backward, at N = 1024 and 4096 positions: if either pass kept
    # every chunk's logits alive, the peak would grow by >= 3072 * V * 4 bytes (375 MiB).
    # glibc's adaptive mmap threshold would keep freed chunks resident; pin it so RSS tracks
    # live memory.
    import os
    import subprocess
    import sys

    def peak(kind, n):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
        tests_dir = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, kind, str(n), tests_dir],
                             capture_output=True, text=True, check=True, env=env, timeout=120)
        return int(out.stdout.strip())

    growth_if_kept = 3072 * 32000 * 4
    assert peak("chunked", 4096) - peak("chunked", 1024) < 0.1 * growth_if_kept
    assert peak("full", 4096) - peak("full", 1024) > growth_if_kept  # control
