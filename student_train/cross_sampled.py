"""A sampled signal's draws as the teacher distribution a foreign-tokenizer student learns from.

The cross-tokenizer path (cross_batch, cross_inside, cross_chain, cross_token_losses) reads a
teacher position as distinct teacher ids with T=1 log-probs, the mass they leave out as a tail:
a stored top-k. A sampled signal (teacher-dump's default capture) gives the same thing as an
estimate. Its n draws at a position were taken from the teacher at the sample temperature tau;
the estimate of the teacher's T=1 distribution on the drawn ids is
    p^(t) = count(t) / n                                      at tau = 1 (unbiased: E p^ = p),
    p^(t) = count(t) w(t) / sum_u count(u) w(u),  w = p(t)^(1 - 1/tau)   at any tau,
the second with the stored T=1 log-probs (self-normalised importance weights: the same weights
losses.build_sampled_target gives a same-tokenizer student at T = 1). It sums to 1: no tail.
What that means downstream:
* a vocabulary-mapped bin adds the p^ of the teacher ids it holds, so at tau = 1 the bins are
  unbiased estimates of the teacher's bins (before any tempering: at T != 1 the target is
  tempered bin-wise, a non-linear step); a chained target (cross_chain.py) moves a product of
  estimates from different positions, drawn independently, so it is unbiased too, and a
  continuation not drawn counts as one outside the top-k (no chain); a conditioned target
  (cross_inside.py) is a ratio of estimates: consistent, not unbiased;
* thresholds read the estimate: `min_mapped_share` at an aligned position (the drawn ids
  that do not map), and the conditioned share inside a teacher token, where few draws can
  pass it on one contributing draw (a stored top-k is exact but truncated instead);
* ULD sorts the estimate's probabilities, which few draws make look sharper than the
  teacher.
Draws at tau != 1 stored without log-probs (`--no-sampled-logprobs`) give no T=1 estimate:
`draws_as_topk` refuses them and cross_tokenizer.draws_problems says so before training.
"""

from __future__ import annotations

import numpy as np

from logitstore.sample import Sampled, TopK

NO_TAIL = -1e4  # log of the mass the draws leave out: none (finite, as the uniform filler's)


def draws_as_topk(sampled: Sampled, width: int, sample_temperature: float) -> TopK:
    """The positions' draws as a top-k [L, width] (module docstring): ids padded with -1 and
    log-probs with -inf; a position without draws is all padding with its whole mass in the
    tail (it maps nothing, so the student gets no target there)."""
    per = np.diff(sampled.offsets)  # [L] distinct drawn ids per position
    L = len(per)
    if L and int(per.max()) > width:
        raise ValueError(f"a position holds {int(per.max())} distinct drawn ids, more than the "
                         f"signal's {width} draws")
    row = np.repeat(np.arange(L), per)  # [E] the position of each entry
    totals = np.bincount(row, weights=sampled.counts, minlength=L)
    wrong = totals[(totals != 0) & (totals != width)]
    if len(wrong):
        raise ValueError(f"a position's draw counts add up to {int(wrong[0])}, expected the "
                         f"signal's {width} draws (or 0)")
    ids = np.full((L, width), -1, np.int64)
    logprobs = np.full((L, width), -np.inf, np.float32)
    tail = np.where(per > 0, NO_TAIL, 0.0).astype(np.float32)
    if not len(sampled.ids):
        return TopK(ids, logprobs, tail)
    log_w = np.log(sampled.counts.astype(np.float64))
    if sample_temperature != 1.0:
        if sampled.logprobs is None:
            raise ValueError(f"draws taken at sample temperature {sample_temperature:g} without "
                             f"stored log-probs give no estimate of the teacher's T=1 "
                             f"distribution")
        log_w += sampled.logprobs.astype(np.float64) * (1.0 - 1.0 / sample_temperature)
    top = np.full(L, -np.inf)
    np.maximum.at(top, row, log_w)
    total = np.zeros(L)
    np.add.at(total, row, np.exp(log_w - top[row]))
    column = np.arange(len(row)) - sampled.offsets[row]
    ids[row, column] = sampled.ids
    logprobs[row, column] = log_w - top[row] - np.log(total[row])  # normalised per position
    return TopK(ids, logprobs, tail)
