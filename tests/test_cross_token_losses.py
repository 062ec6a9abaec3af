"""Cross-tokenizer losses (student_train/cross_token_losses.py) vs the references written out in
tests/reference_cross_losses.py, the same-tokenizer top-k KL, and the fused lm_head path."""

from __future__ import annotations

import math

import pytest
import torch

from reference_cross_losses import (JSD_BETA, SKEW_ALPHA, dense_uld, mapped_kd_reference,
                                    shared_mass_kl, topk_uld_reference)
from student_train.cross_token_losses import (MappedTarget, mapped_kd_sum, project_topk_target,
                                              uld_per_position, uld_sum)
from student_train.fused_head_loss import fused_head_loss
from student_train.head_loss_terms import HeadLossTerms
from student_train.losses import KD_LOSSES, build_topk_target, sparse_kd_per_position

VT, VS, K = 24, 16, 6
OPTS = {"jsd_beta": JSD_BETA, "skew_alpha": SKEW_ALPHA}


def teacher_topk(n: int = 5, vocab: int = VT, k: int = K, seed: int = 0, pad_row: bool = True):
    """(teacher logits [n, vocab] fp64, ids [n, k], log-probs [n, k]); row 1's last two entries
    are padding (id -1 / log-prob -inf) when pad_row."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 2.5
    logprobs, ids = logits.log_softmax(-1).topk(k, -1)
    if pad_row and n > 1:
        ids[1, -1] = -1
        logprobs[1, -2] = -math.inf
    return logits, ids, logprobs


def student_logits(n: int = 5, vocab: int = VS, seed: int = 1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, vocab, generator=g, dtype=torch.float64) * 2).to(dtype)


def many_to_one_map(seed: int = 2):
    """teacher -> student first piece: several teacher ids per student id, some unmapped
    (-1), about half exact."""
    g = torch.Generator().manual_seed(seed)
    first = torch.randint(0, VS // 2, (VT,), generator=g, dtype=torch.int32)  # collisions
    first[torch.randperm(VT, generator=g)[:4]] = -1
    exact = torch.rand(VT, generator=g) < 0.5
    return first, exact


def known_probs(ids: torch.Tensor, logprobs: torch.Tensor) -> tuple[dict[int, float], float]:
    """One row's valid top-k as {teacher id: probability} and the tail mass."""
    known = {int(i): math.exp(float(lp)) for i, lp in zip(ids, logprobs)
             if i >= 0 and lp > -math.inf}
    return known, 1.0 - sum(known.values())


# ----------------------------------------------------------------------------- vocab-mapped KL

@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("loss", sorted(KD_LOSSES))
def test_identity_map_is_the_same_tokenizer_topk_kl_bit_for_bit(loss, temperature):
    _, ids, logprobs = teacher_topk()
    z = student_logits(vocab=VT, dtype=torch.float32)
    identity = torch.arange(VT, dtype=torch.int32)
    mapped = project_topk_target(ids, logprobs.float(), identity, torch.ones(VT, dtype=bool),
                                 temperature=temperature)
    same = build_topk_target(ids[None], logprobs.float()[None], temperature=temperature)
    assert torch.equal(mapped.target.ids, same.ids[0])
    assert torch.equal(mapped.target.logprobs, same.logprobs[0])
    assert torch.equal(mapped.target.tail_logprob, same.tail_logprob[0])
    got = sparse_kd_per_position(z, mapped.target, loss=loss, **OPTS)
    want = sparse_kd_per_position(z[None], same, loss=loss, **OPTS)[0]
    assert torch.equal(got, want)
    assert torch.equal(mapped.mapped_share, torch.ones(5))


@pytest.mark.parametrize("exact_only", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("loss", sorted(KD_LOSSES))
def test_many_to_one_map_matches_the_reference(loss, temperature, exact_only):
    _, ids, logprobs = teacher_topk()
    z = student_logits()
    first, exact = many_to_one_map()
    mapped = project_topk_target(ids, logprobs, first, exact, temperature=temperature,
                                 exact_only=exact_only)
    got = sparse_kd_per_position(z, mapped.target, loss=loss, **OPTS)
    for row in range(z.shape[0]):
        known, tail = known_probs(ids[row], logprobs[row])
        want = mapped_kd_reference(z[row], known, tail, first.tolist(), exact.tolist(),
                                   exact_only=exact_only, temperature=temperature, loss=loss)
        assert got[row].item() == pytest.approx(want, rel=1e-9, abs=1e-12)
    # the bins are distinct student ids: each student token counted once
    for row in range(z.shape[0]):
        kept = mapped.target.ids[row][mapped.target.valid[row]]
        assert len(set(kept.tolist())) == len(kept)
    assert bool((mapped.target.ids < VS).all() and (mapped.target.ids >= 0).all())


@pytest.mark.parametrize("loss", ["kl", "jsd", "tvd"])
def test_full_distribution_teacher_equals_the_dense_reference(loss):
    teacher_logits, ids, logprobs = teacher_topk(k=VT, pad_row=False)
    z = student_logits()
    first, exact = many_to_one_map()
    mapped = project_topk_target(ids, logprobs, first, exact, temperature=1.5)
    got = sparse_kd_per_position(z, mapped.target, loss=loss, **OPTS)
    for row in range(z.shape[0]):
        dense = dict(enumerate(teacher_logits[row].softmax(-1).tolist()))
        want = mapped_kd_reference(z[row], dense, 0.0, first.tolist(), temperature=1.5,
                                   loss=loss)
        assert got[row].item() == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_grouping_equals_sharing_student_mass_in_proportion_to_the_teacher():
    _, ids, logprobs = teacher_topk()
    z = student_logits()
    first, _ = many_to_one_map()
    got = sparse_kd_per_position(z, project_topk_target(ids, logprobs, first).target)
    for row in range(z.shape[0]):
        known, tail = known_probs(ids[row], logprobs[row])
        assert got[row].item() == pytest.approx(
            shared_mass_kl(z[row], known, tail, first.tolist()), rel=1e-9)


def test_mapped_share_and_unmapped_positions():
    ids = torch.tensor([[3, 1, 7], [5, 6, -1], [2, 0, 4]])
    probs = torch.tensor([[0.5, 0.3, 0.1], [0.6, 0.2, 0.1], [0.4, 0.4, 0.1]], dtype=torch.float64)
    first = torch.tensor([0, 1, -1, 2, -1, -1, -1, 3], dtype=torch.int32)
    exact = torch.tensor([True, False, True, True, True, True, True, False])
    mapped = project_topk_target(ids, probs.log(), first, exact)
    assert mapped.mapped_share.tolist() == pytest.approx([1.0, 0.0, 0.4 / 0.9])
    assert mapped.usable(0.5).tolist() == [True, False, False]
    strict = project_topk_target(ids, probs.log(), first, exact, exact_only=True)
    assert strict.mapped_share.tolist() == pytest.approx([0.5 / 0.9, 0.0, 0.4 / 0.9])
    # a position with nothing mapped: all its mass is "other" on both sides -> 0, no gradient
    z = student_logits(n=3, vocab=4).requires_grad_()
    values = sparse_kd_per_position(z, mapped.target)
    assert values[1].item() == 0.0 and bool(torch.isfinite(values).all())
    values.sum().backward()
    assert torch.equal(z.grad[1], torch.zeros(4)) and bool(torch.isfinite(z.grad).all())


def test_the_fused_lm_head_path_takes_the_mapped_target_as_it_is():
    _, ids, logprobs = teacher_topk(n=7)
    first, exact = many_to_one_map()
    mapped = project_topk_target(ids, logprobs, first, exact, temperature=2.0)
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(7, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(VS, 8, generator=g, dtype=torch.float64, requires_grad=True)
    fused = fused_head_loss(hidden, weight, HeadLossTerms(targets=(mapped.target,), loss="jsd"),
                            chunk_size=3)[:, 0]
    dense = sparse_kd_per_position(hidden @ weight.T, mapped.target, loss="jsd")
    torch.testing.assert_close(fused, dense)
    torch.testing.assert_close(torch.autograd.grad(fused.sum(), (hidden, weight)),
                               torch.autograd.grad(dense.sum(), (hidden, weight)))


# ----------------------------------------------------------------------------- ULD

@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_uld_with_the_whole_teacher_vocabulary_is_the_dense_uld(temperature):
    teacher_logits, ids, logprobs = teacher_topk(k=VT, pad_row=False)
    z = student_logits()
    got = uld_per_position(z, ids, logprobs, temperature=temperature, student_k=VS)
    for row in range(z.shape[0]):
        want = dense_uld(z[row], teacher_logits[row], temperature=temperature)
        # the top-k's tail is 1 - sum(probs): ~1e-16 of rounding, which tempering at T=2 turns
        # into ~1e-8 (the dense reference has no tail at all)
        assert got[row].item() == pytest.approx(want, rel=1e-9, abs=1e-7)


@pytest.mark.parametrize("student_k", [None, 2, 9, 100])
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_uld_on_a_stored_topk_matches_the_reference(temperature, student_k):
    teacher_logits, ids, logprobs = teacher_topk()
    z = student_logits()
    got = uld_per_position(z, ids, logprobs, temperature=temperature, student_k=student_k)
    for row in range(z.shape[0]):
        known, tail = known_probs(ids[row], logprobs[row])
        want = topk_uld_reference(z[row], list(known.values()), tail,
                                  temperature=temperature, student_k=student_k)
        assert got[row].item() == pytest.approx(want, rel=1e-9, abs=1e-12)
        if temperature == 1.0 and row != 1 and student_k is None:
            # k' = k, the tails as one bin each: a lower bound of the dense ULD
            assert got[row].item() <= dense_uld(z[row], teacher_logits[row]) + 1e-12


def test_uld_is_zero_for_the_teachers_own_distribution():
    teacher_logits, ids, logprobs = teacher_topk(vocab=VS, pad_row=False)
    values = uld_per_position(teacher_logits, ids, logprobs, temperature=2.0)
    assert values.abs().max().item() < 1e-12


# ----------------------------------------------------------------------------- sums, chunks

def _both_sums(z, ids, logprobs, weights, chunk_size, temperature=1.5):
    first, exact = many_to_one_map()
    mapped = project_topk_target(ids, logprobs, first, exact, temperature=temperature)
    return (mapped_kd_sum(z, mapped, weights, loss="skl", skew_alpha=SKEW_ALPHA,
                          chunk_size=chunk_size),
            uld_sum(z, ids, logprobs, weights, temperature=temperature, chunk_size=chunk_size))


@pytest.mark.parametrize("chunk_size", [1, 3, 1024])
def test_chunked_sums_equal_the_weighted_per_position_values(chunk_size):
    _, ids, logprobs = teacher_topk(n=7)
    weights = torch.tensor([1.0, 0.0, 2.0, 0.5, 1.0, 3.0, 1.0], dtype=torch.float64)
    z = student_logits(n=7).requires_grad_()
    kd, uld = _both_sums(z, ids, logprobs, weights, chunk_size)
    first, exact = many_to_one_map()
    mapped = project_topk_target(ids, logprobs, first, exact, temperature=1.5)
    zz = z.detach().clone().requires_grad_()
    kd_ref = (sparse_kd_per_position(zz, mapped.target, loss="skl", skew_alpha=SKEW_ALPHA)
              * weights).sum()
    uld_ref = (uld_per_position(zz, ids, logprobs, temperature=1.5) * weights).sum()
    torch.testing.assert_close(kd, kd_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(uld, uld_ref, rtol=1e-12, atol=1e-12)
    for got, want in ((kd, kd_ref), (uld, uld_ref)):
        g_got, = torch.autograd.grad(got, z)
        g_want, = torch.autograd.grad(want, zz)
        torch.testing.assert_close(g_got, g_want, rtol=1e-12, atol=1e-12)
        assert torch.equal(g_got[1], torch.zeros(VS))  # weight 0: no gradient


def test_gradients_match_finite_differences():
    _, ids, logprobs = teacher_topk(n=3)
    z = student_logits(n=3).requires_grad_()
    weights = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: torch.stack(_both_sums(x, ids, logprobs, weights,
                                                                     2)), (z,))


def test_no_positions_and_all_masked_give_zero_with_finite_gradients():
    _, ids, logprobs = teacher_topk(n=4)
    z = student_logits(n=4).requires_grad_()
    for got in _both_sums(z, ids, logprobs, torch.zeros(4, dtype=torch.float64), 2):
        assert got.item() == 0.0
        assert torch.equal(torch.autograd.grad(got, z)[0], torch.zeros(4, VS))
    empty = z[:0]
    for got in _both_sums(empty, ids[:0], logprobs[:0], None, 2):
        assert got.item() == 0.0 and got.requires_grad
        got.backward()


def test_single_position_and_bf16_logits():
    _, ids, logprobs = teacher_topk(n=1)
    z16 = student_logits(n=1, dtype=torch.bfloat16).requires_grad_()
    kd, uld = _both_sums(z16, ids, logprobs.float(), None, 4)
    assert kd.dtype == torch.float32 and uld.dtype == torch.float32
    kd32, uld32 = _both_sums(z16.detach().float(), ids, logprobs.float(), None, 4)
    assert torch.equal(kd, kd32) and torch.equal(uld, uld32)
    (kd + uld).backward()
    assert z16.grad.dtype == torch.bfloat16 and bool(torch.isfinite(z16.grad.float()).all())
    assert z16.grad.float().abs().sum().item() > 0


def test_chunks_keep_no_full_vocabulary_buffer_for_backward():
    _, ids, logprobs = teacher_topk(n=8)
    z = student_logits(n=8, dtype=torch.float32).requires_grad_()
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() != z.untyped_storage().data_ptr():
            saved.append(t.numel())  # not a view of the logits themselves
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _both_sums(z, ids, logprobs.float(), None, chunk_size=2)
    # only the chunks' inputs (views of z, the teacher rows): nothing of chunk x V is kept
    assert saved and max(saved) <= 2 * (K + 1)


# ----------------------------------------------------------------------------- bad inputs

def test_bad_inputs_say_what_was_expected():
    _, ids, logprobs = teacher_topk()
    first, exact = many_to_one_map()
    z = student_logits()
    with pytest.raises(ValueError, match="same shape"):
        project_topk_target(ids, logprobs[:, :3], first)
    with pytest.raises(ValueError, match="distinct"):
        project_topk_target(torch.tensor([[2, 2]]), torch.tensor([[-1.0, -2.0]]), first)
    with pytest.raises(ValueError, match="teacher vocabulary size 24"):
        project_topk_target(torch.tensor([[30]]), torch.tensor([[-1.0]]), first)
    with pytest.raises(ValueError, match="needs the map's `exact`"):
        project_topk_target(ids, logprobs, first, exact_only=True)
    with pytest.raises(ValueError, match="temperature"):
        project_topk_target(ids, logprobs, first, temperature=0.0)
    with pytest.raises(ValueError, match="student has 4 logits"):
        mapped_kd_sum(z[:, :4], project_topk_target(ids, logprobs, first, exact))
    mapped = project_topk_target(ids, logprobs, first, exact)
    with pytest.raises(ValueError, match="weights must be >= 0"):
        mapped_kd_sum(z, mapped, -torch.ones(5))
    with pytest.raises(ValueError, match=r"\[n, Vs\] with n = 5"):
        uld_sum(z[:3], ids, logprobs)
    with pytest.raises(ValueError, match="chunk_size"):
        uld_sum(z, ids, logprobs, chunk_size=0)
    with pytest.raises(ValueError, match="student_k"):
        uld_per_position(z, ids, logprobs, student_k=0)
    assert isinstance(mapped, MappedTarget)


def test_a_malformed_map_is_refused():
    _, ids, logprobs = teacher_topk()
    first, exact = many_to_one_map()
    with pytest.raises(ValueError, match="integer tensor"):
        project_topk_target(ids, logprobs, first.float())
    with pytest.raises(ValueError, match="exact must be a bool tensor"):
        project_topk_target(ids, logprobs, first, exact[:3])
