"""The tools with sampled signals stored without log-probs: teacher-dump
--no-sampled-logprobs (stored, recorded, resumed, added as a second signal) and
student-train on such a store (the same losses, step by step, as with the log-probs at the
sample temperature). The refusals at another temperature are rows of test_bad_inputs.py."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("torch")

from logitstore.reader import StoreReader  # noqa: E402
from logitstore.verify import verify_store  # noqa: E402
from logitstore.writer import StoreWriter  # noqa: E402
from teacher_dump.cli import teacher_dump  # noqa: E402
from tiny_hf import corpus, make_tiny_llama, make_tokenizer  # noqa: E402
from train_helpers import World, read_metrics, run_training, shared_world  # noqa: E402

FAST = ["--top-k", "0", "--samples", "8", "--device", "cpu", "--no-progress", "--limit", "5"]


def _dump(*args, expect: int = 0):
    result = CliRunner().invoke(teacher_dump, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == expect, result.output
    return result


def _sampled(url, signal):
    return {s.sample_id: s.signals[signal].sampled
            for s in StoreReader(str(url)).iter_samples(signals=[signal])}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("dump_nolp")
    tok = make_tokenizer(root / "tok")
    text = root / "text.jsonl"
    text.write_text("".join(json.dumps({"text": s}) + "\n" for s in corpus()[:8]))
    return {"llama": make_tiny_llama(root / "llama", tok),
            "llama2": make_tiny_llama(root / "llama2", tok, seed=1), "text": text}


def test_dump_without_sampled_logprobs(tiny, tmp_path):
    without, with_lps = tmp_path / "without", tmp_path / "with"
    base = ["--model", tiny["llama"], "--data", tiny["text"], *FAST]
    _dump(*base, "--out", without, "--no-sampled-logprobs")
    _dump(*base, "--out", with_lps)
    store = StoreReader(str(without))
    assert store.settings.signals["llama"].sampled.logprobs is False
    assert store.manifest["extra"]["teacher_dump_config"]["sampled_logprobs"] is False
    assert StoreReader(str(with_lps)).settings.signals["llama"].sampled.logprobs is True
    assert verify_store(str(without)) == []
    assert not [p for p in Path(without).rglob("*") if "sampled_logprobs" in str(p)]
    a, b = _sampled(without, "llama"), _sampled(with_lps, "llama")
    assert a.keys() == b.keys() and len(a) == 5
    for sid in a:  # the same draws; only the log-probs are left out
        assert a[sid].logprobs is None and b[sid].logprobs is not None
        for field in ("offsets", "ids", "counts"):
            assert np.array_equal(getattr(a[sid], field), getattr(b[sid], field)), sid
    # A resume must store the same arrays: the other setting is refused, naming the key.
    refused = _dump(*base, "--out", without, "--sampled-logprobs", expect=1)
    assert "sampled_logprobs: store has False, now True" in refused.output
    again = _dump(*base, "--out", without, "--no-sampled-logprobs")
    assert "(5 already in the store)" in again.output
    # A second teacher's signal without log-probs beside a signal with them.
    _dump("--model", tiny["llama2"], "--data", tiny["text"], *FAST, "--out", with_lps,
          "--signal", "second", "--no-sampled-logprobs")
    signals = StoreReader(str(with_lps)).settings.signals
    assert signals["llama"].sampled.logprobs and not signals["second"].sampled.logprobs
    assert verify_store(str(with_lps)) == []
    assert all(s.logprobs is None for s in _sampled(with_lps, "second").values())
    redo = _dump("--model", tiny["llama2"], "--data", tiny["text"], *FAST, "--out", with_lps,
                 "--signal", "second", "--sampled-logprobs", expect=1)
    assert "sampled_logprobs" in redo.output


# ----------------------------------------------------------------------------- training

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return shared_world(tmp_path_factory)


def _without_logprobs(world: World, root: Path) -> World:
    """The world's store written again, the same samples and layout, without log-probs."""
    reader = StoreReader(str(world.store))
    settings = reader.settings
    settings = replace(settings, signals={name: replace(spec, sampled=replace(
        spec.sampled, logprobs=False)) for name, spec in settings.signals.items()})
    with StoreWriter(str(root / "store"), settings) as writer:
        writer.add_many(reader.iter_samples())
    return replace(world, store=root / "store")


def test_training_without_logprobs_gives_the_same_losses(world, tmp_path):
    nolp = _without_logprobs(world, tmp_path)
    assert StoreReader(str(nolp.store)).manifest["dataset_fingerprint"] == \
        StoreReader(str(world.store)).manifest["dataset_fingerprint"]
    settings = dict(target="sampled", temperature=1.0, max_steps=3, log_every=1,
                    eval_fraction=0.25, eval_every=3)
    run_training(world, tmp_path / "with", **settings)
    run_training(nolp, tmp_path / "without", **settings)
    with_lps, without = read_metrics(tmp_path / "with"), read_metrics(tmp_path / "without")
    keys = ("train/loss", "train/kd", "train/ce", "eval/kd", "eval/loss")
    curve = [(m["step"], {k: m[k] for k in keys if k in m}) for m in with_lps]
    assert [step for step, _ in curve if "train/kd" in _] == [1, 2, 3]
    assert any("eval/kd" in values for _, values in curve)
    assert curve == [(m["step"], {k: m[k] for k in keys if k in m}) for m in without]


def test_sampled_target_without_logprobs_only_at_the_sample_temperature():
    import torch

    from student_train.losses import build_sampled_target

    ids = torch.tensor([[[1, 4, 6], [0, 2, 5]]])
    counts = torch.tensor([[[5, 2, 1], [8, 0, 0]]])
    logprobs = torch.tensor([[[-0.5, -1.5, -3.0], [-0.1, 0.0, 0.0]]])
    for sample_t in (1.0, 0.7):
        with_lps = build_sampled_target(ids, counts, logprobs, n_draws=8,
                                        sample_temperature=sample_t, temperature=sample_t)
        without = build_sampled_target(ids, counts, None, n_draws=8,
                                       sample_temperature=sample_t, temperature=sample_t)
        assert torch.equal(with_lps.logprobs, without.logprobs)  # bit for bit
        assert torch.equal(with_lps.valid, without.valid)
    with pytest.raises(ValueError, match="needs the teacher's log-probs"):
        build_sampled_target(ids, counts, None, n_draws=8, sample_temperature=1.0,
                             temperature=2.0)
