"""Hidden-state pooling/alignment and attention-grid pooling/alignment vs explicit loops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from student_train.alignment import (
    HiddenStateAligner,
    attention_alignment_loss,
    parse_layer_map,
    pool_attention,
    pool_hidden,
    stored_teacher_layer,
)


def test_parse_layer_map():
    assert parse_layer_map("1:3, 2:7") == {1: 3, 2: 7}
    assert parse_layer_map("0:0") == {0: 0}
    for bad in ("1-3", "1:x", "1:2:3", "", "1:2,1:3"):
        with pytest.raises(ValueError):
            parse_layer_map(bad)


def hidden_case(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 5, 4, generator=g)
    attention_mask = torch.tensor([[1, 1, 1, 1, 0], [0, 0, 1, 1, 1], [1, 1, 0, 0, 0]]).bool()
    mask = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 0, 1, 1], [0, 0, 0, 0, 0]]).bool()
    return hidden, mask, attention_mask


def test_pool_hidden_kinds_match_loops():
    hidden, mask, am = hidden_case()
    mean = pool_hidden(hidden, mask, am, "mean")
    mean_all = pool_hidden(hidden, mask, am, "mean-all")
    last = pool_hidden(hidden, mask, am, "last")
    for b in range(3):
        real = [s for s in range(5) if am[b, s]]
        target = [s for s in real if mask[b, s]] or real  # fallback: no target token
        torch.testing.assert_close(mean[b], hidden[b, target].mean(0))
        torch.testing.assert_close(mean_all[b], hidden[b, real].mean(0))
        torch.testing.assert_close(last[b], hidden[b, real[-1]])
    empty = torch.zeros(1, 5, dtype=torch.bool)
    assert (pool_hidden(hidden[:1], empty, empty, "last") == 0).all()
    with pytest.raises(ValueError, match="pooling"):
        pool_hidden(hidden, mask, am, "max")


@pytest.mark.parametrize("loss", ["cosine", "mse"])
def test_hidden_aligner_matches_manual_computation(loss):
    hidden, mask, am = hidden_case()
    g = torch.Generator().manual_seed(1)
    student_states = [torch.randn(3, 5, 4, generator=g) for _ in range(3)]
    student_states[2] = hidden
    teacher_pools = torch.randn(3, 2, 6, generator=g)  # stored teacher layers 5 and 9
    weights = torch.tensor([1.0, 3.0, 0.5])
    aligner = HiddenStateAligner({2: 9, 1: 5}, 4, 6, loss=loss, teacher_layers=[5, 9])
    got = aligner(student_states, teacher_pools, mask, am, sample_weights=weights)
    per_layer = []
    for s, t_pos in ((2, 1), (1, 0)):
        proj = aligner.projections[str(s)]
        terms = []
        for b in range(3):
            pooled = pool_hidden(student_states[s][b:b + 1], mask[b:b + 1], am[b:b + 1])[0]
            x, y = proj(pooled), teacher_pools[b, t_pos]
            if loss == "cosine":
                terms.append(1 - (x @ y) / (x.norm() * y.norm()))
            else:
                terms.append(((x - y) ** 2).mean())
        per_layer.append(sum(w * t for w, t in zip(weights, terms)) / weights.sum())
    assert got.item() == pytest.approx(((per_layer[0] + per_layer[1]) / 2).item(), abs=1e-5)
    got.backward()
    assert aligner.projections["2"].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="not stored"):
        HiddenStateAligner({0: 7}, 4, 6, teacher_layers=[5, 9])(
            student_states, teacher_pools, mask, am)


@pytest.mark.parametrize("grid", [1, 3, 4])
def test_pool_attention_is_adaptive_avg_pool_over_each_samples_real_tokens(grid):
    g = torch.Generator().manual_seed(2)
    attn = torch.rand(4, 2, 6, 6, generator=g)
    lengths = torch.tensor([6, 5, 2, 0])  # full, uneven bins, shorter than the grid, empty
    got = pool_attention(attn, lengths, grid)
    assert got.shape == (4, 2, grid, grid)
    for b, L in enumerate(lengths.tolist()):
        want = (F.adaptive_avg_pool2d(attn[b, :, :L, :L], grid) if L > 0
                else torch.zeros(2, grid, grid))
        torch.testing.assert_close(got[b], want)
    with pytest.raises(ValueError, match="lengths"):
        pool_attention(attn, torch.tensor([7, 1, 1, 1]), grid)


@pytest.mark.parametrize("loss", ["mse", "frobenius"])
@pytest.mark.parametrize("teacher_heads", [1, 2])
def test_attention_alignment_matches_loops(loss, teacher_heads):
    g = torch.Generator().manual_seed(3)
    student = [torch.rand(3, 2, 5, 5, generator=g, requires_grad=True) for _ in range(2)]
    lengths = torch.tensor([5, 3, 0])
    teacher = torch.rand(3, 4, teacher_heads, 2, 2, generator=g)  # stored layers 0..3
    got = attention_alignment_loss(student, teacher, lengths, {0: 1, 1: 3}, loss=loss)
    per_layer = []
    for s, t in ((0, 1), (1, 3)):
        per_sample = []
        for b in range(2):  # sample 2 has no tokens: excluded
            L = lengths[b].item()
            pooled = F.adaptive_avg_pool2d(student[s][b, :, :L, :L], 2)
            if teacher_heads == 1:
                pooled = pooled.mean(0, keepdim=True)
            diff = pooled - teacher[b, t]
            per_sample.append((diff**2).mean() if loss == "mse"
                              else sum((diff[h] ** 2).sum() for h in range(teacher_heads))
                              / teacher_heads)
        per_layer.append(sum(per_sample) / 2)
    assert got.item() == pytest.approx(((per_layer[0] + per_layer[1]) / 2).item(), abs=1e-6)
    got.backward()
    assert torch.isfinite(student[0].grad).all()


def test_attention_alignment_rejects_head_mismatch():
    attn = [torch.rand(1, 4, 3, 3)]
    with pytest.raises(ValueError, match="heads"):
        attention_alignment_loss(attn, torch.rand(1, 1, 2, 2, 2), torch.tensor([3]), {0: 0})


# ----------------------------------------------------------------------------- teacher depth


def test_stored_teacher_layer_accepts_either_form_with_a_known_depth():
    assert stored_teacher_layer(-1, [1, 3], 4) == 3
    assert stored_teacher_layer(3, [1, 3], 4) == 3
    assert stored_teacher_layer(-3, [1, 3], 4) == 1
    assert stored_teacher_layer(-2, [1, 3], 4) is None  # block 2: not stored
    assert stored_teacher_layer(-1, [1, 3], None) is None  # depth unknown: exact form only
    assert stored_teacher_layer(3, [-1], 4) == -1  # a store holding Python-style indices
    assert stored_teacher_layer(3, [-1], None) is None


def test_aligners_take_teacher_layers_in_the_stored_form():
    hidden, mask, am = hidden_case()
    g = torch.Generator().manual_seed(4)
    pools = torch.randn(3, 2, 6, generator=g)  # stored blocks 1 and 3 of a 4-layer teacher
    with pytest.raises(ValueError, match="teacher layer -1 .* not stored"):
        HiddenStateAligner({0: -1}, 4, 6, teacher_layers=[1, 3])([hidden], pools, mask, am)
    torch.manual_seed(0)
    by_layer = HiddenStateAligner({0: 3}, 4, 6, teacher_layers=[1, 3])
    torch.manual_seed(0)
    by_position = HiddenStateAligner({0: 1}, 4, 6)  # layer 3 is position 1 of the axis
    assert by_layer([hidden], pools, mask, am).item() == \
        by_position([hidden], pools, mask, am).item()


def test_training_layer_map_comes_back_in_the_stored_form():
    from student_train.sources import _layer_map

    problems = []
    assert _layer_map({0: -1, 1: 1}, (1, 3), "hidden states", "t", 2, problems, 4) == {0: 3,
                                                                                      1: 1}
    assert problems == []
    _layer_map({0: -1}, (1, 3), "hidden states", "t", 2, problems, None)
    assert problems == ["layer_map: teacher layer -1 of signal 't' has no stored hidden states; "
                        "stored layers: [1, 3]"]
