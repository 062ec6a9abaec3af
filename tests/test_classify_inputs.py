"""The per-sample input cache of student-train --task classify (student_train/classify_inputs.py):
cached batches equal batches preprocessed together, a split over the budget is not cached, and a
run with the cache trains exactly as one without."""

from __future__ import annotations

import torch
from test_classify_train import _student_tensors, setup, train  # noqa: F401 (fixture)

from logitstore.classifier_reader import ClassifierReader
from student_train.classify_data import load_split, make_batch
from student_train.classify_inputs import InputCache
from student_train.classify_student import load_classify_student

BATCHES = ([0, 5, 9, 63], [5, 1, 2, 40, 41], [9, 0], [7])  # overlaps: later rows come from the cache


def _split_and_student(setup):  # noqa: F811
    store, root, student_yaml = setup
    reader = ClassifierReader(store)
    student = load_classify_student(str(student_yaml), reader.heads, 0)
    return load_split(reader, "train", root), student


def _inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items()
            if k in ("pixel_values", "input_ids", "attention_mask", "token_type_ids")}


def test_cached_batches_equal_batches_preprocessed_together(setup):  # noqa: F811
    split, student = _split_and_student(setup)
    split.inputs = InputCache(64, len(split))
    padded = False
    for _ in range(2):  # the second pass reads every row from the cache
        for rows in BATCHES:
            index = torch.tensor(rows)
            cached = _inputs(make_batch(split, index, student))
            split_inputs, split.inputs = split.inputs, None
            direct = _inputs(make_batch(split, index, student))
            split.inputs = split_inputs
            assert cached.keys() == direct.keys() and "pixel_values" in cached
            for name in direct:
                assert cached[name].shape == direct[name].shape, name
                assert torch.equal(cached[name], direct[name]), name
            padded |= bool((direct["attention_mask"] == 0).any())
    assert padded  # texts of different token counts: the cache's padding is exercised
    assert len(split.inputs._kept) == len({r for rows in BATCHES for r in rows})


def test_a_split_over_the_budget_is_preprocessed_per_batch(setup):  # noqa: F811
    split, student = _split_and_student(setup)
    warnings = []
    # 32x32x3 float32 pixels alone are 12 kB a sample: 6,400 samples need ~77 MB > 1 MB
    split.inputs = InputCache(1, len(split) * 100, log=warnings.append)
    batch = _inputs(make_batch(split, torch.tensor(BATCHES[0]), student))
    assert not split.inputs.enabled and not split.inputs._kept
    assert len(warnings) == 1 and "input_cache_mb=1" in warnings[0]
    split.inputs = None
    direct = _inputs(make_batch(split, torch.tensor(BATCHES[0]), student))
    assert all(torch.equal(batch[k], direct[k]) for k in direct)


def test_training_with_and_without_the_cache_is_identical(setup, tmp_path):  # noqa: F811
    args = ("--ce-weight", "1", "--kl-weight", "0.5", "--mse-weight", "1", "--max-steps", "6",
            "--eval-every", "3", "--save-every", "0")
    with_cache, without = tmp_path / "cached", tmp_path / "plain"
    for out, budget in ((with_cache, "64"), (without, "0")):
        result = train(setup, out, *args, "--input-cache-mb", budget)
        assert result.exit_code == 0, result.output
    a, b = _student_tensors(with_cache / "final"), _student_tensors(without / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)



def test_kept_bytes_never_pass_the_budget():
    # 2 samples estimated from the first (0.4 MB each) fit 1 MB; the second is larger
    # (a longer text) and would pass it: it is used but not kept; a small third is kept.
    sizes = {0: 100_000, 1: 200_000, 2: 10}  # float32 elements
    one = lambda rows: {"pixel_values": torch.full((1, sizes[rows[0]]), float(rows[0]))}  # noqa: E731
    cache = InputCache(1, 2)
    for row in (0, 1, 2, 1):
        batch = cache.batch([row], one, None)["pixel_values"]
        assert batch.shape == (1, sizes[row]) and bool((batch == row).all())
    assert sorted(cache._kept) == [0, 2] and cache._kept_bytes == 4 * (100_000 + 10)
