"""Compact, lossless-for-ids encodings of top-k and sampled teacher targets (numpy).

Ids: sorted ascending within a position (for sampled targets: within each of the two runs,
ids drawn several times, then ids drawn once), then delta-coded (first id of a run
absolute), so most values are small and shuffle + zstd packs them tightly. The order of
entries within a position therefore carries no meaning in the store.

Log-probs (all <= 0):
- "q8":  q = round(-logprob / step) clipped to 0..255, stored as uint8; decoded as -q*step.
         Error <= step/2 for logprob >= -255*step; smaller values decode to -255*step.
         Sampled targets use a coarser step for ids drawn once (see SampledSpec).
- "f16": float16 (relative error <= 2**-11); "f32": exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from logitstore.errors import SchemaMismatchError


def encode_logprobs(logprobs: np.ndarray, encoding: str, step) -> np.ndarray:
    """step: a float, or an array broadcasting against logprobs (per-entry steps)."""
    if encoding == "q8":
        q = np.rint(-np.asarray(logprobs, dtype=np.float64) / step)
        return np.clip(q, 0, 255).astype(np.uint8)
    if encoding == "f16":
        return np.asarray(logprobs, dtype=np.float16)
    if encoding == "f32":
        return np.asarray(logprobs, dtype=np.float32)
    raise SchemaMismatchError(f"unknown logprob encoding {encoding!r}; expected q8, f16 or f32")


def decode_logprobs(stored: np.ndarray, encoding: str, step) -> np.ndarray:
    if encoding == "q8":
        return (stored.astype(np.float32) * -np.asarray(step, dtype=np.float32)).astype(np.float32)
    return stored.astype(np.float32)


def encode_topk_ids(ids: np.ndarray, logprobs: np.ndarray, dtype: str):
    """[L, k] ids (any order) -> ([L, k] deltas of the sorted ids, logprobs in that order)."""
    order = np.argsort(ids, axis=1, kind="stable")
    sorted_ids = np.take_along_axis(np.asarray(ids, dtype=np.int64), order, axis=1)
    sorted_lp = np.take_along_axis(np.asarray(logprobs), order, axis=1)
    deltas = np.diff(sorted_ids, axis=1, prepend=0)
    if deltas.shape[1] > 1 and deltas[:, 1:].size and deltas[:, 1:].min() <= 0:
        row = int(np.nonzero((deltas[:, 1:] <= 0).any(axis=1))[0][0])
        raise SchemaMismatchError(f"top-k ids repeat within position {row}: {ids[row].tolist()}; "
                                  f"expected k distinct ids per position")
    return deltas.astype(dtype), sorted_lp


def decode_topk_ids(deltas: np.ndarray) -> np.ndarray:
    """[L, k] deltas -> [L, k] int32 ids (ascending within each position)."""
    return np.cumsum(deltas, axis=1, dtype=np.int64).astype(np.int32)


@dataclass
class EncodedSampled:
    """Sampled targets as stored: per position, ids drawn more than once come first, then
    ids drawn once; each run sorted ascending and delta-coded (its first id absolute).
    Counts are stored for the first run only: the others are 1 by construction."""

    nuniq: np.ndarray  # [L] distinct ids per position
    nmulti: np.ndarray  # [L] of which drawn more than once
    id_deltas: np.ndarray  # [E]
    multi_counts: np.ndarray  # [sum(nmulti)]
    logprobs: np.ndarray | None  # [E] in stored order; None when none were given
    single: np.ndarray  # [E] bool, entry drawn once (stored order)


def encode_sampled(offsets: np.ndarray, ids: np.ndarray, counts: np.ndarray,
                   logprobs: np.ndarray | None, dtype: str) -> EncodedSampled:
    ids = np.asarray(ids, dtype=np.int64)
    counts = np.asarray(counts, dtype=np.int64)
    nuniq = np.diff(offsets)
    position = np.repeat(np.arange(len(nuniq)), nuniq)  # [E] position of each entry
    single = counts == 1
    order = np.lexsort((ids, single, position))  # by position, multi before single, then id
    ids, counts, single = ids[order], counts[order], single[order]
    nmulti = np.bincount(position[~single], minlength=len(nuniq))
    starts = _run_starts(offsets, nmulti)
    deltas = np.diff(ids, prepend=0)
    deltas[starts] = ids[starts]
    inner = np.ones(len(ids), dtype=bool)
    inner[starts] = False
    if inner.any() and deltas[inner].min() <= 0:
        bad = int(position[order][inner][np.argmax(deltas[inner] <= 0)])
        raise SchemaMismatchError(f"sampled ids repeat within position {bad}; expected unique "
                                  f"ids with their counts")
    return EncodedSampled(nuniq, nmulti, deltas.astype(dtype), counts[~single],
                          None if logprobs is None else np.asarray(logprobs)[order], single)


def decode_sampled(nuniq: np.ndarray, nmulti: np.ndarray, id_deltas: np.ndarray,
                   multi_counts: np.ndarray):
    """-> (offsets [L+1], ids [E] int32, counts [E] int64) in stored order."""
    offsets = np.concatenate([[0], np.cumsum(nuniq, dtype=np.int64)])
    starts = _run_starts(offsets, nmulti)
    if len(id_deltas) == 0:
        return offsets, np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int64)
    running = np.cumsum(id_deltas, dtype=np.int64)  # [E] across runs
    marks = np.zeros(len(id_deltas), dtype=np.int64)
    marks[starts] = 1
    run_of = np.cumsum(marks) - 1  # [E] run of each entry
    before = np.where(starts > 0, running[np.maximum(starts - 1, 0)], 0)
    ids = (running - before[run_of]).astype(np.int32)
    counts = np.ones(len(id_deltas), dtype=np.int64)
    position = np.repeat(np.arange(len(nuniq)), nuniq)
    is_multi = np.arange(len(id_deltas)) - offsets[:-1][position] < nmulti[position]
    counts[is_multi] = multi_counts
    return offsets, ids, counts


def _run_starts(offsets: np.ndarray, nmulti: np.ndarray) -> np.ndarray:
    """Entry index where each non-empty run (multi, then single, per position) begins."""
    first = offsets[:-1]
    second = first + nmulti
    starts = np.concatenate([first[nmulti > 0], second[second < offsets[1:]]])
    return np.sort(starts)
