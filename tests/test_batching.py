"""logitstore.toolkit.batching: the one token-budget batcher of dump, train, stream and eval."""

import subprocess
import sys

import numpy as np
import pytest

from logitstore.toolkit.batching import by_length, packed_batches, padded_batches


def test_padded_batches_by_hand():
    lengths = [5, 3, 9, 2, 4]
    # Input order: [5, 3] pads to 10 <= 12; adding 9 would pad to 27.
    assert padded_batches(lengths, 12) == [[0, 1], [2], [3, 4]]
    assert padded_batches(lengths, 12, order=by_length(lengths)) == [[3, 1, 4], [0], [2]]
    assert padded_batches(lengths, 12, order=[4, 3], max_size=1) == [[4], [3]]
    assert padded_batches([], 12) == []


@pytest.mark.parametrize("seed", range(5))
def test_padded_batches_keep_order_budget_and_are_greedy(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 60, 300)
    lengths[7] = 500  # longer than the budget: a batch of its own
    order = rng.permutation(len(lengths))
    for max_size in (None, 4):
        batches = padded_batches(lengths, 200, order=order, max_size=max_size)
        assert [i for b in batches for i in b] == order.tolist()  # every index once, in order
        for b, nxt in zip(batches, batches[1:] + [None]):
            size = len(b) * max(lengths[i] for i in b)
            assert size <= 200 or len(b) == 1
            assert max_size is None or len(b) <= max_size
            if nxt is not None:  # closed only because the next sample did not fit
                grown = b + nxt[:1]
                assert len(grown) * max(lengths[i] for i in grown) > 200 or len(b) == max_size
        assert [7] in batches


def test_by_length_is_stable():
    lengths = [3, 1, 3, 2, 1]
    assert by_length(lengths).tolist() == [1, 4, 3, 0, 2]


def test_packed_batches_by_hand():
    lengths = [6, 5, 4, 3, 9, 2]
    # Rows of 10 tokens, 2 rows per batch, first fit: 6 | 5 (6+5 > 10: a second row) |
    # 4 joins row 0 (10) | 3 joins row 1 (8) | 9 fits no row and both exist: a new batch |
    # 2 does not fit beside 9: a second row.
    assert packed_batches(lengths, 10, 2) == [[[0, 2], [1, 3]], [[4], [5]]]
    assert packed_batches([12, 3], 10, 2) == [[[0]], [[1]]]  # too long: alone, over budget
    assert packed_batches([3, 12, 3], 10, 2) == [[[0]], [[1]], [[2]]]


@pytest.mark.parametrize("seed", range(5))
def test_packed_rows_respect_row_tokens_and_row_count(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 40, 200)
    order = rng.permutation(len(lengths))
    batches = packed_batches(lengths, 64, 3, order=order)
    flat = [i for b in batches for row in b for i in row]
    assert sorted(flat) == list(range(len(lengths)))
    for b in batches:
        assert 1 <= len(b) <= 3
        assert all(sum(lengths[i] for i in row) <= 64 for row in b)
        for row in b:  # within a row, samples keep the given order
            positions = [order.tolist().index(i) for i in row]
            assert positions == sorted(positions)
    assert max(len(row) for b in batches for row in b) > 1  # it does pack


def test_bad_budgets_are_refused():
    with pytest.raises(ValueError, match="budget"):
        padded_batches([1, 2], 0)
    with pytest.raises(ValueError, match="max_size"):
        padded_batches([1, 2], 10, max_size=0)
    with pytest.raises(ValueError, match="row_tokens"):
        packed_batches([1, 2], 0, 1)


def test_module_imports_neither_torch_nor_transformers():
    code = ("import sys, logitstore.toolkit.batching; "
            "print(sorted({'torch', 'transformers'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
