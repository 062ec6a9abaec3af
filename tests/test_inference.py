"""logitstore.toolkit.inference: the decoding loop every backend shares, on a tiny torch Llama.

References: transformers' own greedy `generate`, and each prompt generated alone.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from logitstore.errors import LogitStoreError
from logitstore.toolkit.inference import (GenerationSettings, InferenceInputError, TorchLM,
                                          left_pad, load_inference_model, model_directory,
                                          position_ids)
from tiny_hf import make_tiny_llama, make_tokenizer


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> TorchLM:
    root = tmp_path_factory.mktemp("inference")
    tokenizer = make_tokenizer(root / "tok")
    return load_inference_model(str(make_tiny_llama(root / "model", tokenizer)))


def _ids(lm, text: str) -> list[int]:
    return lm.tokenizer(text)["input_ids"]


PROMPTS = ["the patient has a fever", "a", "blood pressure was high at the clinic today"]


def test_left_pad_and_positions():
    ids, mask = left_pad([[5, 6, 7], [9]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 9]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert position_ids(mask, 3).tolist() == [[0, 1, 2], [0, 0, 0]]
    grown = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
    assert position_ids(grown, 1).tolist() == [[3], [1]]


def test_greedy_matches_transformers_generate(lm):
    prompt = _ids(lm, PROMPTS[0])
    ours = lm.generate([prompt], GenerationSettings(max_new_tokens=10))[0]
    theirs = lm.model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                               dtype=torch.long), max_new_tokens=10, do_sample=False,
                               eos_token_id=None, pad_token_id=lm.pad_token_id)
    assert ours.token_ids == theirs[0, len(prompt):].tolist()
    assert ours.finish_reason == "length" and ours.prompt_tokens == len(prompt)


def test_batched_rows_equal_rows_alone(lm):
    prompts = [_ids(lm, p) for p in PROMPTS]
    per_row = [GenerationSettings(max_new_tokens=n) for n in (7, 3, 0)]
    batched = lm.generate(prompts, per_row)
    alone = [lm.generate([p], s)[0] for p, s in zip(prompts, per_row)]
    assert [g.token_ids for g in batched] == [g.token_ids for g in alone]
    assert [len(g.token_ids) for g in batched] == [7, 3, 0]


def test_logits_of_padded_rows_equal_unpadded(lm):
    prompts = [_ids(lm, p) for p in PROMPTS]
    ids, mask = left_pad(prompts, lm.pad_token_id)
    batched = lm.logits(ids, mask)  # [B, L, V]
    for i, prompt in enumerate(prompts):
        alone = lm.logits(np.array([prompt]), np.ones((1, len(prompt)), np.int64))[0]
        np.testing.assert_allclose(batched[i, -len(prompt):], alone, atol=1e-4)


def test_prefill_computes_only_the_last_positions_logits(lm, monkeypatch):
    prompts = [_ids(lm, p) for p in PROMPTS]
    ids, mask = left_pad(prompts, lm.pad_token_id)
    full = lm.logits(ids, mask)  # [B, L, V]
    calls = []
    forward = lm.model.forward

    def spy(*args, **kwargs):
        calls.append(kwargs.get("logits_to_keep"))
        return forward(*args, **kwargs)

    monkeypatch.setattr(lm.model, "forward", spy)
    last, _ = lm.prefill(ids, mask)  # [B, V]
    assert calls == [1] and last.shape == (len(prompts), full.shape[-1])
    np.testing.assert_allclose(last, full[:, -1], atol=1e-5)


def test_eos_stops_a_row(lm):
    prompt = _ids(lm, PROMPTS[2])
    first = lm.generate([prompt], GenerationSettings(max_new_tokens=5))[0].token_ids
    saved, lm.eos_token_ids = lm.eos_token_ids, (first[2],)  # the third greedy token is EOS
    try:
        stopped = lm.generate([prompt], GenerationSettings(max_new_tokens=5))[0]
    finally:
        lm.eos_token_ids = saved
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == first[:first.index(first[2])]


def test_rows_stopping_at_different_eos_tokens_equal_rows_alone(lm):
    """An EOS list; one row stops on its first token, one later, one runs to length."""
    prompts = [_ids(lm, p) for p in PROMPTS]
    settings = GenerationSettings(max_new_tokens=8)
    free = [lm.generate([p], settings)[0].token_ids for p in prompts]
    stops = {free[0][0], free[1][3]} - set(free[2])  # row 2 must never meet them
    assert len(stops) == 2, "pick other prompts: the tiny model's outputs collide"
    saved, lm.eos_token_ids = lm.eos_token_ids, tuple(stops)
    try:
        batched = lm.generate(prompts, settings)
        alone = [lm.generate([p], settings)[0] for p in prompts]
    finally:
        lm.eos_token_ids = saved
    assert [(g.token_ids, g.finish_reason) for g in batched] == \
        [(g.token_ids, g.finish_reason) for g in alone]
    assert (batched[0].token_ids, batched[0].finish_reason) == ([], "stop")
    assert batched[1].finish_reason == "stop" and len(batched[1].token_ids) <= 3
    assert (batched[2].token_ids, batched[2].finish_reason) == (free[2], "length")


def test_zero_new_tokens_everywhere_runs_no_forward(lm, monkeypatch):
    def no_forward(*args):
        raise AssertionError("forward called for max_new_tokens 0")

    monkeypatch.setattr(lm, "forward", no_forward)
    got = lm.generate([[5, 6], [7]], GenerationSettings(max_new_tokens=0))
    assert [(g.token_ids, g.finish_reason, g.prompt_tokens) for g in got] == \
        [([], "length", 2), ([], "length", 1)]


def test_sampling_is_reproducible_with_a_seed_and_top_p_tiny_is_greedy(lm):
    prompt = _ids(lm, PROMPTS[0])
    hot = GenerationSettings(max_new_tokens=8, temperature=1.5, seed=3)
    assert lm.generate([prompt], hot)[0].token_ids == lm.generate([prompt], hot)[0].token_ids
    others = {tuple(lm.generate([prompt], GenerationSettings(max_new_tokens=8, temperature=1.5,
                                                             seed=s))[0].token_ids)
              for s in range(4)}
    assert len(others) > 1  # sampling does sample
    nucleus = GenerationSettings(max_new_tokens=8, temperature=1.5, top_p=1e-9, seed=4)
    greedy = GenerationSettings(max_new_tokens=8)
    assert lm.generate([prompt], nucleus)[0].token_ids == lm.generate([prompt], greedy)[0].token_ids


@pytest.mark.parametrize("prompt, settings, expected", [
    ([], GenerationSettings(), "is empty"),
    ([5], GenerationSettings(max_new_tokens=-1), "max_new_tokens must be >= 0"),
    ([5] * 250, GenerationSettings(max_new_tokens=10), "over the model's 256"),
    ([5], GenerationSettings(temperature=-1.0), "temperature must be a finite number >= 0"),
    ([5], GenerationSettings(temperature=float("nan")), "found temperature nan"),
    ([5], GenerationSettings(temperature=float("inf")), "found temperature inf"),
    ([5], GenerationSettings(top_p=0.0), "top_p in (0, 1]"),
])
def test_bad_requests_are_refused_before_any_forward(lm, prompt, settings, expected):
    with pytest.raises(InferenceInputError) as caught:
        lm.generate([prompt], settings)
    assert expected in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_settings_count_must_match_prompts(lm):
    with pytest.raises(InferenceInputError, match="one GenerationSettings per prompt"):
        lm.generate([[5], [6]], [GenerationSettings()])


def test_run_directory_resolves_to_final(tmp_path, lm):
    (tmp_path / "run" / "final").mkdir(parents=True)
    (tmp_path / "run" / "final" / "config.json").write_text("{}")
    assert model_directory(tmp_path / "run") == tmp_path / "run" / "final"
    assert model_directory(tmp_path / "run" / "final") == tmp_path / "run" / "final"
    assert model_directory(tmp_path / "missing") is None


@pytest.mark.parametrize("manifest, expected", [
    ("not json", "not a readable export manifest"),
    (json.dumps({"format_version": 9, "format": "onnx"}), "expected format_version 1"),
    (json.dumps({"format_version": 1, "format": "tflite"}), "format onnx or torch"),
])
def test_bad_export_manifest_is_one_paragraph(tmp_path, manifest, expected):
    (tmp_path / "export.json").write_text(manifest)
    with pytest.raises(LogitStoreError) as caught:
        load_inference_model(tmp_path)
    assert expected in str(caught.value) and "\n" not in str(caught.value)
