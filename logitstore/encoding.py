"""Compact, lossless-for-ids encodings of top-k and sampled teacher targets (numpy).

Ids: sorted ascending within a position, then delta-coded (first id absolute), so most
values are small and bitshuffle + zstd packs them into a few bits. The order of entries
within a position therefore carries no meaning in the store.

Log-probs (all <= 0):
- "q8":  q = round(-logprob / step) clipped to 0..255, stored as uint8; decoded as -q*step.
         Error <= step/2 for logprob >= -255*step; smaller values decode to -255*step.
         Sampled targets use a coarser step for ids drawn once (see SampledSpec).
- "f16": float16 (relative error <= 2**-11); "f32": exact.
"""

from __future__ import annotations

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


def sampled_steps(counts: np.ndarray, spec) -> np.ndarray:
    """[E] per-entry q8 step of sampled log-probs: coarser for ids drawn once."""
    return np.where(np.asarray(counts) == 1, spec.singleton_step, spec.logprob_step)


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


def encode_sampled_ids(offsets: np.ndarray, ids: np.ndarray, *arrays: np.ndarray, dtype: str):
    """Sort ids within each position and delta-code them; reorder companion arrays alike.

    offsets [L+1], ids [E] -> (deltas [E], *companions [E] in the sorted order)
    """
    ids = np.asarray(ids, dtype=np.int64)
    lengths = np.diff(offsets)
    position = np.repeat(np.arange(len(lengths)), lengths)  # [E] position of each entry
    order = np.lexsort((ids, position))  # by position, then id
    sorted_ids = ids[order]
    deltas = np.diff(sorted_ids, prepend=0)
    starts = offsets[:-1][lengths > 0]
    deltas[starts] = sorted_ids[starts]  # the first id of each position is absolute
    inner = np.ones(len(ids), dtype=bool)
    inner[starts] = False
    if inner.any() and deltas[inner].min() <= 0:
        bad = int(position[order][inner][np.argmax(deltas[inner] <= 0)])
        raise SchemaMismatchError(f"sampled ids repeat within position {bad}; expected unique "
                                  f"ids with their counts")
    return (deltas.astype(dtype),) + tuple(np.asarray(a)[order] for a in arrays)


def decode_sampled_ids(offsets: np.ndarray, deltas: np.ndarray) -> np.ndarray:
    """Undo encode_sampled_ids: per-position cumulative sums of the deltas -> int32 ids."""
    if len(deltas) == 0:
        return np.zeros(0, dtype=np.int32)
    running = np.cumsum(deltas, dtype=np.int64)  # [E] across positions
    lengths = np.diff(offsets)
    starts = offsets[:-1]
    # Subtract, for each entry, the running sum just before its position started.
    before = np.where(starts > 0, running[np.maximum(starts - 1, 0)], 0)
    return (running - np.repeat(before, lengths)).astype(np.int32)
