"""CRD (student_train/crd.py) against the loop reference of RepDistiller's memory + NCE loss in
reference_classify_losses.py: values, Z, momentum updates, negatives, gradients, state_dict."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from reference_classify_losses import ref_crd, ref_momentum_update
from student_train.crd import CRDConfig, CRDLoss, nce_loss, sample_contrast_indices

F64 = torch.float64
N = 40


def make_crd(seed=0, n=N, d_s=6, d_t=9, **config):
    torch.manual_seed(seed)
    settings = dict(embed_dim=5, k_negatives=7, temperature=0.1, momentum=0.7) | config
    return CRDLoss(d_s, d_t, n, CRDConfig(**settings),
                   generator=torch.Generator().manual_seed(seed)).double()


def batch(seed=0, size=8, d_s=6, d_t=9, n=N):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(size, d_s, generator=g, dtype=F64, requires_grad=True)
    teacher = torch.randn(size, d_t, generator=g, dtype=F64, requires_grad=True)
    index = torch.randperm(n, generator=g)[:size]
    return student, teacher, index


def test_negatives_never_include_the_positive_and_are_deterministic():
    index = torch.tensor([0, 5, 9, 3])
    first = sample_contrast_indices(index, 10, 300, torch.Generator().manual_seed(1))
    again = sample_contrast_indices(index, 10, 300, torch.Generator().manual_seed(1))
    other = sample_contrast_indices(index, 10, 300, torch.Generator().manual_seed(2))
    assert first.shape == (4, 301) and torch.equal(first[:, 0], index)
    assert torch.equal(first, again) and not torch.equal(first, other)
    for row, positive in zip(first, index):
        negatives = set(row[1:].tolist())
        assert positive.item() not in negatives
        assert negatives == set(range(10)) - {positive.item()}  # every other sample is drawn


@pytest.mark.parametrize("size", [1, 8])
def test_loss_matches_reference_over_two_steps(size):
    crd = make_crd()
    student, teacher, index = batch(size=size)
    for step in range(2):  # step 0 sets Z; step 1 uses it and the banks step 0 moved
        banks = crd.student_bank.clone(), crd.teacher_bank.clone()
        z = None if step == 0 else crd.log_z.exp().tolist()
        v_s, v_t = crd.embed(student, teacher)
        contrast = sample_contrast_indices(index, N, 7, torch.Generator().manual_seed(step))
        loss = crd(student, teacher, index, generator=torch.Generator().manual_seed(step))
        ref_loss, z_s, z_t = ref_crd(v_s.detach().numpy(), v_t.detach().numpy(),
                                     banks[0].numpy(), banks[1].numpy(), contrast.tolist(),
                                     0.1, N, *(z or (None, None)))
        assert loss.item() == pytest.approx(ref_loss, rel=1e-10)
        assert crd.log_z.tolist() == pytest.approx([math.log(z_s), math.log(z_t)], rel=1e-12)
        torch.testing.assert_close(crd.student_bank, torch.from_numpy(
            ref_momentum_update(banks[0].numpy(), index.tolist(), v_s.detach().numpy(), 0.7)))
        torch.testing.assert_close(crd.teacher_bank, torch.from_numpy(
            ref_momentum_update(banks[1].numpy(), index.tolist(), v_t.detach().numpy(), 0.7)))


def test_momentum_update_touches_only_the_batch_rows_and_not_in_eval():
    crd = make_crd(momentum=0.9)
    student, teacher, index = batch()
    before = crd.student_bank.clone()
    crd(student, teacher, index)
    others = torch.ones(N, dtype=torch.bool)
    others[index] = False
    assert torch.equal(crd.student_bank[others], before[others])
    assert not torch.equal(crd.student_bank[index], before[index])
    torch.testing.assert_close(crd.student_bank[index].norm(dim=1), torch.ones(8, dtype=F64))
    crd.eval()
    frozen = crd.student_bank.clone(), crd.teacher_bank.clone()
    crd(student, teacher, index)
    crd.train()
    crd(student, teacher, index, update_banks=False)
    assert torch.equal(crd.student_bank, frozen[0]) and torch.equal(crd.teacher_bank, frozen[1])


def test_gradients_reach_the_student_and_both_heads_not_the_teacher():
    crd = make_crd()
    student, teacher, index = batch()
    crd(student, teacher, index).backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert crd.embed_student.weight.grad.abs().sum() > 0
    assert crd.embed_teacher.weight.grad.abs().sum() > 0
    assert not crd.student_bank.requires_grad and not crd.teacher_bank.requires_grad


def test_fill_teacher_bank_writes_the_exact_teacher_embeddings():
    crd = make_crd()
    g = torch.Generator().manual_seed(3)
    all_teacher = torch.randn(N, 9, generator=g, dtype=F64)
    for start in range(0, N, 16):  # in chunks, as from the store
        chunk = torch.arange(start, min(start + 16, N))
        crd.fill_teacher_bank(chunk, all_teacher[chunk])
    expected = F.normalize(crd.embed_teacher(all_teacher), dim=1).detach()
    torch.testing.assert_close(crd.teacher_bank, expected)


def test_loss_decreases_as_student_embeddings_move_towards_the_teacher():
    # A teacher bank of well-spread unit vectors (what a trained teacher head gives), the
    # positives' rows among them; Z fixed from the first (far-away) batch, as in training.
    crd = make_crd(embed_dim=32, temperature=0.07)
    g = torch.Generator().manual_seed(4)
    crd.teacher_bank.copy_(F.normalize(torch.randn(N, 32, generator=g, dtype=F64), dim=1))
    index = torch.randperm(N, generator=g)[:8]
    v_t = crd.teacher_bank[index]                                          # [B, E] positives
    away = F.normalize(torch.randn(8, 32, generator=g, dtype=F64), dim=1)
    rows = crd.teacher_bank[sample_contrast_indices(index, N, 7, g)]        # [B, k+1, E]
    losses, log_z = [], None
    for alpha in (0.0, 0.25, 0.5, 0.75, 1.0):
        v_s = F.normalize((1 - alpha) * away + alpha * v_t, dim=1)
        scores = torch.einsum("bke,be->bk", rows, v_s)                     # [B, k+1]
        if log_z is None:
            log_z = torch.logsumexp(scores.flatten() / 0.07, 0) - math.log(scores.numel()) \
                + math.log(N)
        losses.append(nce_loss(scores, log_z, 0.07, N).item())
    # Falls steeply, then saturates (the positive term is ~0 and the negatives' scores wobble
    # as v_s turns): strictly decreasing up to halfway, and far below the start after it.
    assert losses[0] > losses[1] > losses[2], losses
    assert max(losses[2:]) < 0.25 * losses[0], losses


def test_training_the_student_head_lowers_the_loss():
    crd = make_crd(seed=2, temperature=0.1)
    student, teacher, index = batch(seed=2, size=16)
    crd.fill_teacher_bank(index, teacher.detach())
    optimizer = torch.optim.Adam(crd.embed_student.parameters(), lr=0.05)
    losses = []
    for step in range(30):
        loss = crd(student.detach(), teacher, index, generator=torch.Generator().manual_seed(0),
                   update_banks=False)
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # Only the student-vs-teacher-bank half can move here (student bank and teacher head fixed)
    assert losses[-1] < 0.75 * losses[0], losses
    assert all(a > b for a, b in zip(losses[:5], losses[1:5])), losses


def test_state_dict_round_trip_continues_exactly():
    crd = make_crd(seed=0)
    student, teacher, index = batch()
    crd(student, teacher, index, generator=torch.Generator().manual_seed(0))
    state = {k: v.clone() for k, v in crd.state_dict().items()}
    assert {"student_bank", "teacher_bank", "log_z", "embed_student.weight"} <= set(state)
    assert not torch.isnan(state["log_z"]).any()
    expected = crd(student, teacher, index, generator=torch.Generator().manual_seed(1))
    fresh = make_crd(seed=9)  # other heads and banks until the load
    assert not torch.equal(fresh.student_bank, state["student_bank"])
    fresh.load_state_dict(state)
    got = fresh(student, teacher, index, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(fresh.teacher_bank, crd.teacher_bank, rtol=0, atol=0)


def test_bank_init_is_deterministic_given_a_generator():
    a, b, c = make_crd(seed=3), make_crd(seed=3), make_crd(seed=4)
    assert torch.equal(a.student_bank, b.student_bank)
    assert not torch.equal(a.student_bank, c.student_bank)
    bound = 1 / math.sqrt(5 / 3)
    assert a.student_bank.abs().max() <= bound


def test_bad_settings_and_batches_are_refused():
    with pytest.raises(ValueError, match=r"k_negatives must be an integer in \[1, n_samples - 1"):
        make_crd(k_negatives=N)
    with pytest.raises(ValueError, match="momentum must be in"):
        make_crd(momentum=1.0)
    crd = make_crd()
    student, teacher, index = batch()
    with pytest.raises(ValueError, match="same sample index twice"):
        crd(student, teacher, torch.tensor([1, 2, 3, 4, 5, 6, 7, 1]))
    with pytest.raises(ValueError, match=r"must be in \[0, 40\)"):
        crd(student, teacher, index + N)
    with pytest.raises(ValueError, match=r"expected student features \[B, 6\]"):
        crd(teacher, student, index)
