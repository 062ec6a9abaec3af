"""Token-budget batching: sample lengths -> batches of sample indices (pure Python + numpy).

The one batcher of the four places that cut samples into batches by tokens: teacher-dump's
batch plan, `student-train --data`, the store stream and eval perplexity. It only maps
lengths to indices; what an index means (a sample of a list, a store row) is the caller's.

* `padded_batches`: one sample per row, right-padded to the longest of its batch. Samples
  are taken in the given order and a batch is closed before `rows x longest` would exceed
  the budget (or before it would hold `max_size` samples).
* `packed_batches`: samples concatenated into rows of `row_tokens`, first fit, at most
  `max_rows` rows per batch, so both the tokens of a batch and `rows x row_tokens` stay
  within the budget the caller derived them from.
* `by_length`: the order (length, position) ascending, which gives the least padding.
* `windows` / `windowed_padded_batches`: the same over a stream of any size, in bounded
  memory: items are read a window (`window_tokens` tokens) at a time and each window is
  ordered (by default `by_length`) and cut by `padded_batches` on its own. Nothing is read
  past the window whose batches are being handed out, so memory holds one window, and the
  first batch comes after reading at most one window.

Either way a sample longer than the budget is never cut: it gets a batch of its own, over
budget, and the caller decides what that means (dump it alone, train on it alone).
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np

T = TypeVar("T")


def by_length(lengths: Sequence[int] | np.ndarray) -> np.ndarray:
    """Indices of `lengths` sorted by (length, index): stable, so equal lengths keep their
    input order and the result does not depend on the sort algorithm."""
    return np.argsort(np.asarray(lengths, np.int64), kind="stable")


def padded_batches(lengths: Sequence[int] | np.ndarray, budget: int,
                   order: Sequence[int] | np.ndarray | None = None,
                   max_size: int | None = None) -> list[list[int]]:
    """Indices of `order` (default: every index of `lengths`, ascending) in batches whose
    padded size `len(batch) * longest` stays <= `budget`; `max_size` caps the batch size.

    Greedy in the given order: a sample joins the open batch unless it would break the
    budget or the cap, in which case the open batch is closed first.
    """
    if budget < 1:
        raise ValueError(f"the token budget must be >= 1, found {budget}")
    if max_size is not None and max_size < 1:
        raise ValueError(f"max_size must be None or >= 1, found {max_size}")
    length = np.asarray(lengths, np.int64).tolist()
    items = range(len(length)) if order is None else np.asarray(order, np.int64).tolist()
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in items:
        n = length[i]
        if current and ((len(current) + 1) * max(longest, n) > budget
                        or len(current) == max_size):
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, n)
    if current:
        batches.append(current)
    return batches


def packed_batches(lengths: Sequence[int] | np.ndarray, row_tokens: int, max_rows: int,
                   order: Sequence[int] | np.ndarray | None = None) -> list[list[list[int]]]:
    """Indices of `order` first-fit into rows of at most `row_tokens` tokens, at most
    `max_rows` rows per batch: batch -> row -> indices, each row's samples in order.

    A sample joins the first row of the open batch it fits in; when it fits in none and
    the batch already has `max_rows` rows, the batch is closed. A sample longer than
    `row_tokens` closes the open batch and is a batch of its own.
    """
    if row_tokens < 1 or max_rows < 1:
        raise ValueError(f"row_tokens and max_rows must be >= 1, found {row_tokens}, "
                         f"{max_rows}")
    length = np.asarray(lengths, np.int64).tolist()
    items = range(len(length)) if order is None else np.asarray(order, np.int64).tolist()
    batches: list[list[list[int]]] = []
    rows: list[list[int]] = []
    fill: list[int] = []
    for i in items:
        n = length[i]
        if n > row_tokens:  # cannot share a row: alone, over budget
            if rows:
                batches.append(rows)
                rows, fill = [], []
            batches.append([[i]])
            continue
        for r, used in enumerate(fill):
            if used + n <= row_tokens:
                rows[r].append(i)
                fill[r] += n
                break
        else:
            if len(rows) == max_rows:
                batches.append(rows)
                rows, fill = [], []
            rows.append([i])
            fill.append(n)
    if rows:
        batches.append(rows)
    return batches



def windows(items: Iterable[T], window_tokens: int,
            length: Callable[[T], int]) -> Iterator[list[T]]:
    """Consecutive runs of `items`, in order: a run is closed as soon as its lengths add up
    to `window_tokens` or more (so it holds at most `window_tokens` plus one item's tokens);
    the last run holds what is left. Reads lazily: a run is yielded before the item after
    it is read."""
    if window_tokens < 1:
        raise ValueError(f"the window must hold >= 1 token, found {window_tokens}")
    current: list[T] = []
    tokens = 0
    for item in items:
        current.append(item)
        tokens += length(item)
        if tokens >= window_tokens:
            yield current
            current, tokens = [], 0
    if current:
        yield current


def windowed_padded_batches(
        items: Iterable[T], budget: int, window_tokens: int, length: Callable[[T], int],
        order: Callable[[np.ndarray], np.ndarray] = by_length,
        max_size: int | None = None) -> Iterator[list[T]]:
    """`padded_batches` over a stream: each window of `windows(items, window_tokens, length)`
    is ordered by `order(lengths of the window)` (default: by (length, position) within the
    window) and cut into batches of its own items; batches never span two windows. The
    result depends only on the items, their order and the arguments, so every process that
    reads the same stream plans the same batches."""
    for window in windows(items, window_tokens, length):
        lengths = np.fromiter((length(x) for x in window), np.int64, len(window))
        for batch in padded_batches(lengths, budget, order=order(lengths), max_size=max_size):
            yield [window[i] for i in batch]
