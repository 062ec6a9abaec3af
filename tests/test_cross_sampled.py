"""A sampled signal's draws read as the teacher distribution a foreign-tokenizer student learns
from (student_train/cross_sampled.py), against tests/reference_cross_losses.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from logitstore.sample import Sampled
from reference_cross_losses import draws_distribution_reference
from student_train.cross_sampled import NO_TAIL, draws_as_topk
from student_train.cross_token_losses import project_topk_target

N_DRAWS = 8


def random_draws(rng: np.random.Generator, positions: int, vocab: int = 30) -> Sampled:
    """Positions of N_DRAWS draws each, one without draws, one with a single id drawn 8x."""
    ids, counts, logprobs = [], [], []
    for t in range(positions):
        if t == 1:
            ids.append([]), counts.append([]), logprobs.append([])
            continue
        drawn = np.full(N_DRAWS, 7) if t == 2 else rng.integers(0, vocab, N_DRAWS)
        unique, count = np.unique(drawn, return_counts=True)
        ids.append(rng.permutation(unique).tolist())
        counts.append([int(count[unique.tolist().index(i)]) for i in ids[-1]])
        logprobs.append((-rng.exponential(2.0, len(unique))).tolist())
    return Sampled.from_lists(ids, counts, logprobs)


@pytest.mark.parametrize("tau", [1.0, 0.7, 2.0])
def test_draws_give_the_reference_estimate_per_position(tau):
    sampled = random_draws(np.random.default_rng(0), 6)
    topk = draws_as_topk(sampled, N_DRAWS, tau)
    assert topk.ids.shape == topk.logprobs.shape == (6, N_DRAWS)
    for t in range(6):
        ids, counts, logprobs = sampled.position(t)
        valid = topk.ids[t] >= 0
        assert (np.isfinite(topk.logprobs[t]) == valid).all() and valid.sum() == len(ids)
        if not len(ids):  # no draws: all padding, the whole mass in the tail
            assert topk.tail()[t] == 0.0
            continue
        got = dict(zip(topk.ids[t][valid].tolist(), np.exp(topk.logprobs[t][valid]).tolist()))
        want = draws_distribution_reference(ids, counts, logprobs, tau)
        assert got.keys() == want.keys()
        for i, p in want.items():
            assert got[i] == pytest.approx(p, rel=1e-5)
        assert topk.tail()[t] == NO_TAIL
    assert np.exp(topk.logprobs[2][topk.ids[2] == 7]) == pytest.approx(1.0)  # a single id


def test_draws_at_another_temperature_need_their_logprobs_and_fit_the_width():
    sampled = random_draws(np.random.default_rng(1), 4)
    no_logprobs = Sampled(sampled.offsets, sampled.ids, sampled.counts, None)
    draws_as_topk(no_logprobs, N_DRAWS, 1.0)  # counts / n: no log-probs needed
    with pytest.raises(ValueError, match="without stored log-probs"):
        draws_as_topk(no_logprobs, N_DRAWS, 2.0)
    with pytest.raises(ValueError, match="more than the signal's 2 draws"):
        draws_as_topk(sampled, 2, 1.0)
    with pytest.raises(ValueError, match="add up to 8, expected the signal's 9 draws"):
        draws_as_topk(sampled, 9, 1.0)
    short = Sampled.from_lists([[1, 2], [3]], [[3, 1], [3]], None)  # the second is wrong
    with pytest.raises(ValueError, match="add up to 3, expected the signal's 4 draws"):
        draws_as_topk(short, 4, 1.0)
    empty = draws_as_topk(Sampled.from_lists([[], []], [[], []], None), 4, 1.0)
    assert (empty.ids == -1).all() and (empty.tail() == 0.0).all()


def test_mapped_bins_of_the_draws_are_unbiased_at_sample_temperature_one():
    """The vocabulary-mapped bins are linear in the estimate: over many independent draw sets
    their mean is the exact teacher distribution's bins (within 4 standard errors)."""
    rng = np.random.default_rng(2)
    vocab, n, reps = 12, 16, 3000
    p = rng.dirichlet(np.full(vocab, 0.5))
    first = torch.tensor([0, 0, 1, 2, 2, 2, 3, -1, 4, 5, 5, -1])  # many-to-one, unmapped ids
    exact = project_topk_target(torch.arange(vocab)[None], torch.tensor(np.log(p))[None].float(),
                                first).target
    want = np.zeros(7)  # student ids 0..5, then "other"
    want[exact.ids[0][exact.valid[0]].numpy()] = exact.logprobs[0][exact.valid[0]].exp().numpy()
    want[6] = exact.tail_logprob[0].exp().item()
    rows = []
    for _ in range(reps):
        unique, count = np.unique(rng.choice(vocab, n, p=p), return_counts=True)
        rows.append(Sampled.from_lists([unique.tolist()], [count.tolist()], None))
    topk = [draws_as_topk(r, n, 1.0) for r in rows]
    mapped = project_topk_target(torch.from_numpy(np.concatenate([t.ids for t in topk])),
                                 torch.from_numpy(np.concatenate([t.logprobs for t in topk])),
                                 first).target
    bins = np.zeros((reps, 7))
    probs = mapped.logprobs.exp().numpy() * mapped.valid.numpy()
    for r in range(reps):
        np.add.at(bins[r], mapped.ids[r].numpy(), probs[r])
    bins[:, 6] = mapped.tail_logprob.exp().numpy()
    mean, se = bins.mean(0), bins.std(0) / np.sqrt(reps) + 1e-9
    assert (np.abs(mean - want) < 4 * se + 1e-6).all(), (mean, want, se)
    assert bins.sum(1) == pytest.approx(np.ones(reps), abs=1e-5)
