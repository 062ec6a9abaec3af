"""bench/cross_tokenizer_bench.py: the bits-per-byte evaluator against a hand computation, and
the whole harness (corpus, tokenizers, teachers, stores, students, report) at its tiniest size.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

from xtok_eval import BitsPerByteError, bits_per_byte, text_token_ids, windows  # noqa: E402

TEXTS = ["The patient reports chest pain.", "Café naïve résumé: 12 € — fièvre", "a"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from xtok_corpus import SPECIALS, train_byte_level

    out = tmp_path_factory.mktemp("tok") / "C"
    corpus = ["The patient reports chest pain radiating to the left arm.",
              "Café naïve résumé fièvre", "twelve euros 12 €"] * 20
    train_byte_level(corpus, 300, SPECIALS["C"], out)
    return AutoTokenizer.from_pretrained(out)


class MarkovLM:
    """A causal LM whose logits at a position depend on that position's token only:
    logits[b, t] = table[input_ids[b, t]] (a fixed random table)."""

    def __init__(self, vocab: int, seed: int = 0):
        import torch

        self.table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed))
        self.training = False

    def eval(self):
        return self

    def train(self, mode=True):
        self.training = mode
        return self

    def __call__(self, input_ids, attention_mask, position_ids, use_cache):
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.table[input_ids])


def hand_bits_per_byte(model: MarkovLM, tokenizer, texts, context: int) -> float:
    """The definition, written out: every text token t_k predicted from the token before it
    in its window ([BOS, t_0 .. t_{w-1}] windows of context - 1 text tokens)."""
    total, n_bytes = 0.0, 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        n_bytes += len(text.encode("utf-8"))
        for k, token in enumerate(ids):
            before = tokenizer.bos_token_id if k % (context - 1) == 0 else ids[k - 1]
            row = [float(x) for x in model.table[before]]
            log_z = math.log(sum(math.exp(x) for x in row))
            total += log_z - row[token]
    return total / math.log(2) / n_bytes


@pytest.mark.parametrize("context", [512, 4, 2])
def test_bits_per_byte_matches_the_hand_computation(tokenizer, context):
    model = MarkovLM(len(tokenizer))
    got = bits_per_byte(model, tokenizer, TEXTS, context=context, batch_tokens=16)
    assert got["bits_per_byte"] == pytest.approx(hand_bits_per_byte(model, tokenizer, TEXTS,
                                                                     context), rel=1e-6)  # float32 log-softmax
    assert got["bytes"] == sum(len(t.encode("utf-8")) for t in TEXTS)  # UTF-8, not characters
    assert got["tokens"] == sum(len(tokenizer(t, add_special_tokens=False)["input_ids"])
                                for t in TEXTS)


def test_a_uniform_model_costs_log2_vocabulary_bits_per_token(tokenizer):
    model = MarkovLM(len(tokenizer))
    model.table.zero_()
    got = bits_per_byte(model, tokenizer, TEXTS, context=5)
    assert got["bits_per_byte"] == pytest.approx(
        got["tokens"] * math.log2(len(tokenizer)) / got["bytes"], rel=1e-6)


def test_windows_cover_every_text_token_once():
    import numpy as np

    ids = np.arange(10, 17)
    pieces = windows(ids, bos_id=1, context=4)
    assert [p.tolist() for p in pieces] == [[1, 10, 11, 12], [1, 13, 14, 15], [1, 16]]
    assert windows(ids[:0], bos_id=1, context=4) == []
    with pytest.raises(BitsPerByteError, match="context of at least 2"):
        windows(ids, bos_id=1, context=1)


def test_text_tokens_leave_out_bos(tokenizer):
    ids = text_token_ids(tokenizer, TEXTS[0])
    assert tokenizer.bos_token_id not in ids.tolist()
    assert tokenizer.decode(ids.tolist()) == TEXTS[0]


def test_refuses_a_tokenizer_without_bos_and_an_inexact_one(tokenizer, tmp_path):
    from tokenizers import normalizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    no_bos = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    no_bos.bos_token = None
    with pytest.raises(BitsPerByteError, match="BOS"):
        bits_per_byte(MarkovLM(len(tokenizer)), no_bos, TEXTS, context=8)
    backend = tokenizer.backend_tokenizer
    backend.normalizer = normalizers.Lowercase()  # rewrites the text: spans are not exact
    lower = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=tokenizer.bos_token)
    with pytest.raises(BitsPerByteError, match="spell its .* UTF-8 bytes exactly"):
        bits_per_byte(MarkovLM(len(tokenizer)), lower, TEXTS, context=8)


@pytest.mark.slow
def test_the_harness_runs_end_to_end_at_its_tiniest_size(tmp_path):
    """Corpus, three tokenizers, two teachers and their stores (subprocesses of the real
    tools), six students over 2 seeds, bits per byte, summary, markdown and plot."""
    from cross_tokenizer_bench import main

    out = tmp_path / "x.json"
    main(["--size", "tiny", "--seeds", "2", "--steps", "2", "--teacher-steps", "2",
          "--transfer-records", "12", "--heldout-records", "4", "--top-k", "8",
          "--cache", str(tmp_path / "cache"), "--work", str(tmp_path / "work"),
          "--out", str(out), "--markdown", str(tmp_path / "x.md")])
    result = json.loads(out.read_text())
    summary = result["summary"]
    assert set(summary["methods"]) == {"ce-A", "kd-A", "ce-C", "xkd-pkl", "xkd-uld",
                                       "xkd-B-pkl"}
    for row in summary["methods"].values():
        assert 0 < row["bits_per_byte"]["mean"] < 20 and row["bits_per_byte"]["n"] == 2
    assert set(summary["alignment"]) == {"xkd-pkl", "xkd-uld", "xkd-B-pkl"}
    for row in summary["alignment"].values():
        assert 0 < row["aligned_share"] <= 1
    assert 0 < summary["alignment"]["xkd-pkl"]["map_coverage"] <= 1
    assert "map_coverage" not in summary["alignment"]["xkd-uld"]  # ULD maps nothing
    assert summary["two_teachers"]["runnable"] is False
    assert (tmp_path / "x.png").stat().st_size > 0
    assert set(summary["exact_coverage"]) == {"A", "B"}
    for shares in summary["exact_coverage"].values():
        assert sum(shares.values()) == pytest.approx(1.0)
    text = (tmp_path / "x.md").read_text()
    assert "two teachers A + B into C**: – (not runnable yet" in text
    again = main(["--from-json", str(out), "--out", str(tmp_path / "again.json")])
    assert again["table"] == result["table"]  # re-rendered from the runs alone
