"""distill-eval metric math against hand computations: ROUGE/BLEU on known strings,
perplexity and next-token accuracy on a fixed tiny model, store eval splits, retention
and ratio edge cases, and the report files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from eval.generation import (bleu_score, generation_scores, pairs_from_lm_eval_samples,
                             rouge_scores)
from eval.perplexity import (StoreTokenizerMismatch, TokenSequence, pick_split, read_texts,
                             score_sequences, sequences_from_store, sequences_from_texts)
from eval.report import (build_report, comparison_rows, efficiency_ratios, gap_closed, ratio,
                         render_markdown, retention, write_report)
from logitstore.errors import ConfigError

# ----------------------------------------------------------------------------- ROUGE / BLEU


def test_rouge_matches_hand_counts():
    # pred/ref share "the cat ... on the mat": 5 of 6 unigrams, 3 of 5 bigrams, LCS 5.
    pred, ref = "the cat sat on the mat", "the cat is on the mat"
    scores = rouge_scores([pred, "hello world"], [ref, "goodbye moon"])
    assert scores["rouge1"] == pytest.approx((5 / 6 + 0) / 2)
    assert scores["rouge2"] == pytest.approx((3 / 5 + 0) / 2)
    assert scores["rougeL"] == pytest.approx((5 / 6 + 0) / 2)


def test_rouge_uses_the_stemmer_and_ignores_case():
    scores = rouge_scores(["Patients TREATED"], ["patient treat"])
    assert scores == {"rouge1": pytest.approx(1.0), "rouge2": pytest.approx(1.0),
                      "rougeL": pytest.approx(1.0)}


def test_bleu_matches_hand_computation():
    # Precisions 5/6, 3/5, 1/4 and 0/3 -> sacrebleu's exp smoothing: 1 / (2 * 3); BP = 1.
    expected = 100 * (5 / 6 * 3 / 5 * 1 / 4 * 1 / 6) ** 0.25
    assert bleu_score(["the cat sat on the mat"], ["the cat is on the mat"]) == \
        pytest.approx(expected, rel=1e-9)
    # All n-grams match but the hypothesis is 5 tokens for 6: brevity penalty exp(1 - 6/5).
    assert bleu_score(["the cat is on the"], ["the cat is on the mat"]) == \
        pytest.approx(100 * math.exp(1 - 6 / 5), rel=1e-9)
    assert bleu_score(["a b c d e"], ["a b c d e"]) == pytest.approx(100.0)


def test_generation_scores_edge_cases():
    assert generation_scores([], []) == {}
    with pytest.raises(ValueError):
        rouge_scores(["a"], [])
    assert set(generation_scores(["x"], ["y"])) == {"rouge1", "rouge2", "rougeL", "bleu"}


def test_pairs_from_lm_eval_samples():
    samples = [
        {"filtered_resps": [" answer one "], "target": "ref one"},
        {"resps": [["answer two"]], "target": ["ref two", "alt"]},
        {"filtered_resps": ["no target"], "target": None},
    ]
    assert pairs_from_lm_eval_samples(samples) == (["answer one", "answer two"],
                                                   ["ref one", "ref two"])


# ----------------------------------------------------------------------------- perplexity


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tiny_hf import make_tiny_llama, make_tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("ppl")
    tok_dir = make_tokenizer(root / "tok")
    model_dir = make_tiny_llama(root / "model", tok_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def _by_hand(model, sequences):
    """Sum of NLL and of correct argmaxes over scored positions, one sequence at a time."""
    import torch

    nll, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for seq in sequences:
            ids = torch.tensor(seq.ids)[None]
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
            for t in range(1, len(seq.ids)):
                if seq.targets[t]:
                    nll -= float(logprobs[t - 1, seq.ids[t]])
                    correct += int(int(logprobs[t - 1].argmax()) == int(seq.ids[t]))
                    count += 1
    return nll, correct, count


def test_perplexity_is_exp_mean_nll_with_padding_and_masks(tiny):
    model, tokenizer = tiny
    texts = ["The patient reports chest pain radiating to the left arm.",
             "The child denies headache.", "An ECG showed sinus rhythm. A chest X-ray was "
             "ordered. Follow-up is planned in two weeks."]
    sequences = sequences_from_texts(texts, tokenizer, max_length=64)
    masked = TokenSequence(sequences[0].ids, np.arange(len(sequences[0].ids)) % 2 == 0)
    sequences.append(masked)  # only even positions scored
    nll, correct, count = _by_hand(model, sequences)
    # A tiny batch budget forces several batches of different widths (right padding).
    per_sequence = []
    got = score_sequences(model, sequences, max_batch_tokens=40, pad_id=tokenizer.pad_token_id,
                          per_sequence=per_sequence)
    assert got["tokens"] == count == sum(s.scored for s in sequences)
    # Per sequence, in input order, named by source (text number; the masked copy has none).
    assert [s["index"] for s in per_sequence] == [0, 1, 2, 3]
    assert [s["tokens"] for s in per_sequence] == [s.scored for s in sequences]
    assert sum(s["nll"] for s in per_sequence) == pytest.approx(nll, rel=1e-5)
    assert sum(s["correct"] for s in per_sequence) == correct
    assert got["nll"] == pytest.approx(nll / count, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert got["next_token_accuracy"] == pytest.approx(correct / count)
    assert got["sequences"] == 4


def test_bits_per_byte_counts_the_text_tokens_and_their_bytes(tiny):
    """NLL of the scored non-special tokens, in bits, over the bytes they spell: with a BOS
    every byte of a text (multi-byte characters included) is predicted once, the EOS is not
    counted; a model of another tokenizer is scored on the very same bytes."""
    import torch

    model, tokenizer = tiny
    texts = ["The patient reports chest pain radiating to the left arm.",
             "Naïve café patients: 東京 😀 follow-up in two weeks."]
    sequences = sequences_from_texts(texts, tokenizer, max_length=64)
    for seq, text in zip(sequences, texts):
        assert seq.ids[0] == tokenizer.bos_token_id and seq.token_bytes[0] == -1
        assert seq.token_bytes[seq.token_bytes > 0].sum() == len(text.encode("utf-8"))
    per_sequence = []
    got = score_sequences(model, sequences, per_sequence=per_sequence, max_batch_tokens=40)
    bits = 0.0
    with torch.no_grad():
        for seq in sequences:
            logprobs = torch.log_softmax(model(input_ids=torch.tensor(seq.ids)[None])
                                         .logits[0].double(), -1)
            bits -= sum(float(logprobs[t - 1, seq.ids[t]]) for t in range(1, len(seq.ids))
                        if seq.token_bytes[t] >= 0) / math.log(2)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    assert got["bytes"] == n_bytes == sum(s["bytes"] for s in per_sequence)
    assert got["bits_per_byte"] == pytest.approx(bits / n_bytes, rel=1e-5)
    theirs = sequences_from_texts(texts, _metaspace_with_bos(texts), max_length=64)
    assert [s.token_bytes[s.token_bytes > 0].sum() for s in theirs] == \
        [len(t.encode("utf-8")) for t in texts]


def test_bits_per_byte_leaves_out_documents_whose_bytes_are_not_all_predicted(tiny):
    """A document cut at max_length (no EOS where its text goes on), a tokenizer without a
    BOS (its first token has no context), one whose normaliser rewrites the text: no bytes,
    so no bits per byte from them; perplexity as before."""
    from tiny_tokenizers import metaspace_bpe
    from tokenizers import normalizers
    from transformers import PreTrainedTokenizerFast

    model, tokenizer = tiny
    texts = ["The patient reports chest pain radiating to the left arm.", "Rest."]
    cut, whole = sequences_from_texts(texts, tokenizer, max_length=5)
    assert len(cut.ids) == 5 and tokenizer.eos_token_id not in cut.ids.tolist()
    assert cut.token_bytes is None and whole.token_bytes is not None
    got = score_sequences(model, [cut, whole])
    assert got["bytes"] == len(texts[1]) and got["tokens"] == cut.scored + whole.scored
    no_bos = PreTrainedTokenizerFast(tokenizer_object=metaspace_bpe(texts * 20, 120))
    assert all(s.token_bytes is None for s in sequences_from_texts(texts, no_bos, 64))
    lower = _metaspace_with_bos(texts)
    lower.backend_tokenizer.normalizer = normalizers.Lowercase()
    assert all(s.token_bytes is None for s in sequences_from_texts(texts, lower, 64))


def _metaspace_with_bos(texts):
    """A SentencePiece-style tokenizer (byte fallback, lone "▁" tokens) that writes a BOS."""
    from tiny_tokenizers import metaspace_bpe
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    backend = metaspace_bpe(texts * 20, 120)
    bos = backend.token_to_id("<bos>")
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A",
                                                           special_tokens=[("<bos>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>")


def test_next_token_accuracy_on_a_sequence_the_model_predicts(tiny):
    import torch

    model, _ = tiny
    # Greedy continuation of the model itself: every scored argmax is right by construction.
    with torch.no_grad():
        out = model.generate(torch.tensor([[1, 50]]), max_new_tokens=6, do_sample=False,
                             min_new_tokens=6, pad_token_id=0)[0].numpy()
    targets = np.zeros(len(out), dtype=bool)
    targets[2:] = True  # only generated tokens
    got = score_sequences(model, [TokenSequence(out, targets)])
    assert got["next_token_accuracy"] == 1.0 and got["tokens"] == 6


def test_score_sequences_needs_a_scored_position(tiny):
    with pytest.raises(ValueError, match="scored"):
        score_sequences(tiny[0], [TokenSequence.all_targets([5])])


def test_read_texts_formats(tmp_path):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"text": "one"}\n\n{"prompt": "q", "reference": "r"}\n')
    assert read_texts(jsonl) == ["one", "q\nr"]
    txt = tmp_path / "a.txt"
    txt.write_text("first para\nsame para\n\n\nsecond\n")
    assert read_texts(txt) == ["first para same para", "second"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "x"}\n')
    with pytest.raises(ConfigError, match="text"):
        read_texts(bad)


def test_store_eval_split_uses_loss_mask_and_checks_tokenizer(tiny, tmp_path):
    from logitstore.format import StoreSettings
    from logitstore.toolkit.tokenizer_identity import tokenizer_fingerprint
    from logitstore.sample import Sample
    from logitstore.writer import StoreWriter

    model, tokenizer = tiny
    settings = StoreSettings(vocab_size=len(tokenizer),
                             tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
                             tokenizer_name="tiny", segment_tokens=64, chunk_tokens=16)
    texts = ["The nurse reports swelling of both ankles.", "A chest X-ray was ordered.",
             "The physician was treated for anemia.", "Blood pressure was 150/90 mmHg."]
    samples = []
    for i, text in enumerate(texts):
        ids = np.array(tokenizer(text)["input_ids"], dtype=np.int64)
        mask = np.arange(len(ids)) >= len(ids) // 2  # second half = targets
        samples.append(Sample(f"s{i}", ids, mask, split="validation" if i % 2 else "train"))
    with StoreWriter(str(tmp_path / "store"), settings) as writer:
        for sample in samples:
            writer.add(sample)
    split, sequences = sequences_from_store(str(tmp_path / "store"), tokenizer, max_length=64)
    assert split == "validation" and len(sequences) == 2
    assert [s.ids.tolist() for s in sequences] == [samples[1].input_ids.tolist(),
                                                   samples[3].input_ids.tolist()]
    nll, _, count = _by_hand(model, sequences)
    assert score_sequences(model, sequences)["perplexity"] == \
        pytest.approx(math.exp(nll / count), rel=1e-5)

    other = StoreSettings(vocab_size=len(tokenizer), tokenizer_fingerprint="cd" * 32)
    with StoreWriter(str(tmp_path / "other"), other) as writer:
        writer.add(samples[1])
    with pytest.raises(StoreTokenizerMismatch):
        sequences_from_store(str(tmp_path / "other"), tokenizer, max_length=64)


def test_pick_split():
    assert pick_split(["train", "test", "validation"], "auto") == "validation"
    assert pick_split(["train", "dev"], "dev") == "dev"
    with pytest.raises(ConfigError, match="no eval split"):
        pick_split(["train"], "auto")
    with pytest.raises(ConfigError, match="no split 'x'"):
        pick_split(["train"], "x")


# ----------------------------------------------------------------------------- retention


def test_retention_and_gap_closed():
    assert retention(0.6, 0.8) == pytest.approx(0.75)
    assert gap_closed(0.7, 0.8, 0.6) == pytest.approx(0.5)
    # Lower-is-better metrics: 1 = matches the teacher, 0 = no better than the baseline.
    assert gap_closed(12.0, 10.0, 20.0) == pytest.approx(0.8)
    assert gap_closed(0.9, 0.8, 0.6) == pytest.approx(1.5)  # student beats the teacher


@pytest.mark.parametrize("args", [(0.5, 0.7, 0.7), (0.5, None, 0.3), (None, 0.7, 0.3),
                                  (0.5, 0.7, None), (float("nan"), 0.7, 0.3),
                                  (0.5, float("inf"), 0.3), ("0.5", 0.7, 0.3)])
def test_gap_closed_is_null_not_an_error(args):
    assert gap_closed(*args) is None


@pytest.mark.parametrize("args", [(1.0, 0.0), (None, 1.0), (1.0, None), (float("nan"), 1.0),
                                  (True, 1.0)])
def test_ratio_is_null_not_an_error(args):
    assert ratio(*args) is None


def _results():
    eff = {"parameters": 1000, "weights_bytes": 4000, "disk_bytes": 4100,
           "peak_memory_bytes": 8000, "prompt_tokens_per_s": 100.0,
           "generation_tokens_per_s": 10.0, "latency_p50_s": 2.0, "latency_p95_s": 4.0,
           "speed_samples": 3}
    return {
        "teacher": {"mcq": {"acc": 0.8, "acc_norm": 0.7}, "efficiency": eff},
        "student": {"mcq": {"acc": 0.6, "acc_norm": float("nan")},
                    "efficiency": {**eff, "parameters": 250, "disk_bytes": None,
                                   "generation_tokens_per_s": 40.0, "latency_p50_s": 0.5}},
        "baseline": {"mcq": {"acc": 0.4}},
    }


# lm-eval's standard errors of mcq acc: teacher - baseline = 0.4 +- sqrt(2) * 0.05, resolved.
STDERR = {role: {"mcq": {"acc": 0.05}} for role in ("teacher", "student", "baseline")}


def test_comparison_rows_and_ratios():
    rows = {(r["task"], r["metric"]): r for r in comparison_rows(_results(), STDERR)}
    assert rows[("mcq", "acc")]["retention"] == pytest.approx(0.75)
    assert rows[("mcq", "acc")]["gap_closed"] == pytest.approx(0.5)
    assert rows[("mcq", "acc")]["gap_closed_reason"] is None
    # Without any standard error the teacher's lead cannot be told from noise.
    (bare,) = [r for r in comparison_rows(_results()) if r["metric"] == "acc"]
    assert bare["gap_closed"] is None and "standard error" in bare["gap_closed_reason"]
    assert rows[("mcq", "acc_norm")]["student"] is None  # NaN
    assert rows[("mcq", "acc_norm")]["retention"] is None
    assert rows[("mcq", "acc_norm")]["baseline"] is None  # metric missing for a role
    assert rows[("efficiency", "parameters")]["higher_is_better"] is False
    assert rows[("efficiency", "parameters")]["gap_closed"] is None
    assert ("efficiency", "speed_samples") not in rows
    assert list(rows)[-1][0] == "efficiency"
    ratios = efficiency_ratios(_results())
    assert ratios["compression_parameters"] == pytest.approx(4.0)
    assert ratios["compression_disk"] is None  # student disk size unknown
    assert ratios["speedup_generation_tokens"] == pytest.approx(4.0)
    assert ratios["speedup_latency_p50"] == pytest.approx(4.0)
    assert ratios["memory_reduction"] == pytest.approx(1.0)


def test_per_token_figures_are_not_compared_across_tokenizers():
    """A student of another tokenizer than the teacher's: no perplexity retention, no
    difference from a baseline of yet another tokenizer, no gap closed (and why); bits per
    byte is compared as usual."""
    values = {"teacher": (4.0, 1.0), "student": (6.0, 1.4), "baseline": (9.0, 1.9)}
    results = {role: {"ppl/texts": {"perplexity": ppl, "bits_per_byte": bpb, "bytes": 900}}
               for role, (ppl, bpb) in values.items()}
    same = {r["metric"]: r for r in comparison_rows(results, tokenizers=dict.fromkeys(
        values, "same"))}
    assert same["perplexity"]["retention"] == pytest.approx(1.5)
    assert "tokenizer_note" not in same["perplexity"]
    rows = {r["metric"]: r for r in comparison_rows(
        results, tokenizers={"teacher": "a", "student": "c", "baseline": "c"})}
    ppl, bpb = rows["perplexity"], rows["bits_per_byte"]
    assert ppl["retention"] is None and ppl["gap_closed"] is None
    assert ppl["teacher_vs_baseline"] is None  # tokenizers a and c
    assert ppl["student_vs_baseline"]["difference"] == pytest.approx(-3.0)  # both c
    assert "student and teacher have different tokenizers" in ppl["tokenizer_note"]
    assert "bits_per_byte" in ppl["gap_closed_reason"]
    assert bpb["retention"] == pytest.approx(1.4) and not bpb["higher_is_better"]
    assert "tokenizer_note" not in bpb and "bytes" not in rows


def test_missing_roles_give_nulls():
    only_student = {"student": {"mcq": {"acc": 0.5}}}
    (row,) = comparison_rows(only_student)
    assert row["teacher"] is None and row["retention"] is None and row["gap_closed"] is None
    assert all(v is None for v in efficiency_ratios(only_student).values())


def test_report_files(tmp_path):
    report = build_report(results=_results(), stderr=STDERR, models={
        "teacher": {"name": "t"}, "student": {"name": "s"}, "baseline": {"name": "b"}},
        tasks={"mcq": {"status": "ok"}, "medmcqa": {"status": "skipped", "reason": "offline"}},
        skipped=[{"task": "medmcqa", "role": None, "reason": "offline"}],
        efficiency_notes={"peak memory": "rss"}, config={"model": "s", "limit": None},
        environment={})
    paths = write_report(report, tmp_path / "out")
    loaded = json.loads(paths["report.json"].read_text())  # strict JSON: NaN became null
    assert loaded["results"]["student"]["mcq"]["acc_norm"] is None
    assert paths["report.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = paths["report.md"].read_text()
    for section in ("## Results", "## Compression and speed-up", "## Skipped", "medmcqa",
                    "report.png", "| mcq | acc | ↑ | 0.8 ± 0.05 | 0.6 ± 0.05 | 0.4 ± 0.05 | "
                    "+0.2 ± 0.071 **✓** | 0.75 | 0.5 |"):
        assert section in md
    import yaml

    assert yaml.safe_load(paths["config.yaml"].read_text()) == {"model": "s", "limit": None}
    assert render_markdown(report) == md
