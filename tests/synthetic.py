"""Synthetic teacher signals with a documented, Zipf-like shape (numpy only).

Used by the tests and by `bench/store_bench.py` to measure encodings on realistic
distributions without a GPU. Per position t the logits are

    logits[t, v] = -s * log(v + 1) + sigma * z[t, v] + boost[t] * [v == y_t]

with z ~ N(0, 1), y_t drawn from the Zipf(s) unigram distribution and boost[t] ~ U(0, b).
Token ids are rank-ordered (frequent tokens get small ids), as a BPE vocabulary roughly
is. With the defaults (s=1.1, sigma=1.5, b=20) and V=32000 the mean entropy is about
2.3 nats per position, in the range of a small LM on domain text; `mean_entropy()`
reports the exact figure for any settings.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from logitstore.sample import Sample, Sampled, SignalData, TopK


@dataclass(frozen=True)
class ZipfTeacher:
    vocab_size: int = 32000
    zipf_s: float = 1.1
    sigma: float = 1.5
    boost: float = 20.0

    def logits(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """[n, V] float32 logits."""
        base = (-self.zipf_s * np.log(np.arange(1, self.vocab_size + 1))).astype(np.float32)
        out = base + np.float32(self.sigma) * rng.standard_normal((n, self.vocab_size),
                                                                  dtype=np.float32)
        unigram = np.exp(base - base.max())
        targets = rng.choice(self.vocab_size, size=n, p=unigram / unigram.sum())
        out[np.arange(n), targets] += rng.uniform(0, self.boost, size=n).astype(np.float32)
        return out


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def mean_entropy(logits: np.ndarray) -> float:
    lp = log_softmax(logits.astype(np.float64))
    return float(-(np.exp(lp) * lp).sum(axis=-1).mean())


def topk_of(logits: np.ndarray, k: int) -> TopK:
    """Top-k ids and full-vocabulary log-probs at T=1, with the exact tail."""
    lp = log_softmax(logits.astype(np.float64))
    ids = np.argpartition(-lp, k - 1, axis=-1)[:, :k]
    top = np.take_along_axis(lp, ids, axis=-1)
    tail = np.log(np.clip(1.0 - np.exp(top).sum(axis=-1), 1e-30, 1.0))
    return TopK(ids.astype(np.int64), top.astype(np.float32), tail.astype(np.float32))


def sampled_of(logits: np.ndarray, n_draws: int, temperature: float,
               rng: np.random.Generator) -> Sampled:
    """n_draws ids per position from softmax(logits / T) -> unique ids + counts + log p (T=1)."""
    lp = log_softmax(logits.astype(np.float64))
    cdf = np.cumsum(np.exp(log_softmax(logits.astype(np.float64) / temperature)), axis=-1)
    draws = np.empty((len(logits), n_draws), dtype=np.int64)
    for t in range(len(logits)):  # inverse-CDF sampling, one row at a time (bounded memory)
        draws[t] = np.minimum(np.searchsorted(cdf[t], rng.random(n_draws) * cdf[t, -1]),
                              logits.shape[1] - 1)
    ids, counts, lps = [], [], []
    for t in range(len(logits)):
        u, c = np.unique(draws[t], return_counts=True)
        ids.append(u)
        counts.append(c)
        lps.append(lp[t, u])
    return Sampled.from_lists(ids, counts, lps)


def random_sample(rng: np.random.Generator, sample_id: str, length: int, teacher: ZipfTeacher,
                  *, k: int | None = 8, n_draws: int | None = None, temperature: float = 1.0,
                  hidden: tuple[int, int] | None = None,
                  attention: tuple[int, int, int] | None = None, signal: str = "teacher",
                  tags: dict | None = None) -> Sample:
    """A sample whose teacher signal comes from the synthetic teacher."""
    logits = teacher.logits(rng, length)
    data = SignalData()
    if k:
        data.topk = topk_of(logits, k)
    if n_draws:
        data.sampled = sampled_of(logits, n_draws, temperature, rng)
    if hidden:
        data.hidden = rng.standard_normal(hidden).astype(np.float32)
    if attention:
        layers, heads, grid = attention
        att = rng.random((layers, heads, grid, grid)).astype(np.float32)
        data.attention = att / att.sum(axis=-1, keepdims=True)
    ids = rng.integers(0, teacher.vocab_size, size=length)
    return Sample(sample_id, ids, rng.random(length) < 0.8, source="synthetic",
                  tags=dict(tags or {}), signals={signal: data})
