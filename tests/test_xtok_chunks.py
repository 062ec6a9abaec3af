"""bench/xtok_chunks.py: the chunks of two tokenizations of one text, cut where both end a
token, and the bins a student's tokens fall in."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from xtok_chunks import BINS, chunk_kinds, token_bins  # noqa: E402


def test_chunks_cut_where_both_tokenizations_end_a_token():
    # A: |abc|de|fghi|jkl|   C: |a|bc|defghi|jk|l|   both end at 3, 9, 12
    of_a, of_c, kind, sizes = chunk_kinds(np.array([3, 5, 9, 12]), np.array([1, 3, 9, 11, 12]))
    assert of_a.tolist() == [0, 1, 1, 2] and of_c.tolist() == [0, 0, 1, 2, 2]
    assert kind.tolist() == [1, 2, 1]  # C finer, C coarser, C finer
    assert sizes.tolist() == [3, 6, 3]
    # A: |ab|cd|  C: |a|bc|d|: one chunk, inner cuts apart -> crossing; equal cuts -> same
    assert chunk_kinds(np.array([2, 4]), np.array([1, 3, 4]))[2].tolist() == [3]
    assert chunk_kinds(np.array([2, 4]), np.array([2, 4]))[2].tolist() == [0, 0]


def test_a_c_students_pieces_after_the_first_of_a_finer_chunk_get_their_own_bin():
    # chunk 0 "C finer" (two pieces), chunk 1 "same", chunk 2 "C finer" (three pieces)
    bins = token_bins(np.array([1, 1, 0, 1, 1, 1]), np.array([0, 0, 1, 2, 2, 2]))
    assert [BINS[b] for b in bins] == ["C finer", "C finer, later pieces", "same", "C finer",
                                       "C finer, later pieces", "C finer, later pieces"]
