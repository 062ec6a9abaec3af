"""`logitstore decontaminate`: which samples share a 13-word n-gram with evaluation data,
the report per source, the clean store, and every bad input refused before the scan.

The store holds texts tokenized by a tiny local tokenizer (tests/tiny_hf.py), with
synthetic signals of every kind; the evaluation data is a JSONL file, a bundled task and an
lm-eval task whose data is not cached (HF_HUB_OFFLINE).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from logitstore.cli import main
from logitstore.reader import StoreReader
from logitstore.verify import verify_store
from logitstore.writer import StoreWriter
from store_helpers import content_differences, content_of, make_samples, make_settings
from tiny_hf import make_tokenizer

Q1 = ("Which drug is the first choice for a patient with newly diagnosed type two diabetes "
      "and normal kidney function?")  # 19 words
Q2 = ("An elderly man reports crushing chest pain radiating to the left arm with sweating "
      "and nausea since this morning")  # 19 words
MEDMCQ_001 = ("A patient has an irregularly irregular pulse and an ECG with absent P waves. "
              "Which rhythm is most likely?")  # bundled medmcq_mini item medmcq-001

# sample id -> (source, split, text)
TEXTS = {
    # the last 13 words of Q1, other case and punctuation, inside other text
    "a-hit": ("notes/a.jsonl", "train", "Review: for a PATIENT, with newly-diagnosed type two "
              "diabetes and normal kidney function? Metformin is usual."),
    # the first 12 words of Q1, then other words: one word short of a match
    "a-near": ("notes/a.jsonl", "train", "Question: which drug is the first choice for a "
               "patient with newly diagnosed asthma in the clinic"),
    "a-clean": ("notes/a.jsonl", "validation", "The patient reports a persistent dry cough "
                "and mild fever. A chest X-ray was ordered."),
    # Q2 whole, as a chat turn
    "b-hit": ("chat/b.jsonl", "validation", "<|user|>\n" + Q2 + "\n<|assistant|>\nCall an "
              "ambulance."),
    # Q2 with its 7th word changed: the longest shared run is 12 words
    "b-near": ("chat/b.jsonl", "train", Q2.replace("pain", "discomfort")),
    "b-bundled": ("chat/b.jsonl", "train", "Quiz. " + MEDMCQ_001 + " Atrial fibrillation."),
    "c-clean": ("web/c.jsonl", "train", "Follow-up is planned in two weeks. Laboratory tests "
                "revealed anemia."),
}
FLAGGED_BY_JSONL = {"a-hit", "b-hit"}


def _invoke(*args: str):
    return CliRunner().invoke(main, ["decontaminate", *args])


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def store(tmp_path_factory, tokenizer_dir) -> str:
    from transformers import AutoTokenizer

    from logitstore.toolkit.tokenizer_identity import tokenizer_fingerprint

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ids = {sid: tok(text)["input_ids"] for sid, (_, _, text) in TEXTS.items()}
    settings = make_settings(vocab_size=len(tok), tokenizer_fingerprint=tokenizer_fingerprint(tok),
                             tokenizer_name=str(tokenizer_dir), segment_tokens=64)
    samples = make_samples(len(TEXTS), settings=settings, lengths=[len(v) for v in ids.values()])
    for sample, (sid, (source, split, _)) in zip(samples, TEXTS.items()):
        sample.sample_id, sample.source, sample.split = sid, source, split
        sample.input_ids[:] = ids[sid]
    url = str(tmp_path_factory.mktemp("store") / "store")
    with StoreWriter(url, settings) as writer:
        writer.add_many(samples)
    assert len(StoreReader(url).segments) > 1  # the scan streams several segments
    return url


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("eval") / "exam.jsonl"
    records = [{"id": "q1", "question": Q1, "choices": ["Metformin", "Insulin", "Gliclazide",
                                                         "Acarbose"], "answer": 0},
               {"id": "q2", "prompt": Q2, "reference": "Acute coronary syndrome."},
               {"id": "q3", "question": "What is a short question?", "choices": ["a", "b"],
                "answer": 1}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_flags_exactly_the_samples_sharing_a_13_word_run(store, eval_file):
    res = _invoke(store, "--against", str(eval_file), "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert set(report["flagged_ids"]) == FLAGGED_BY_JSONL
    assert report["samples"] == len(TEXTS) and report["flagged"] == 2
    by_source = report["by_source"]
    assert {s: r["flagged"] for s, r in by_source.items()} == {
        "notes/a.jsonl": 1, "chat/b.jsonl": 1, "web/c.jsonl": 0}
    assert by_source["notes/a.jsonl"]["samples"] == 3
    assert by_source["chat/b.jsonl"]["flagged_by_split"] == {"validation": 1}
    [example] = by_source["notes/a.jsonl"]["examples"]
    assert example == {"sample_id": "a-hit", "split": "train", "eval_set": str(eval_file),
                       "eval_item": "q1", "ngram": "for a patient with newly diagnosed type "
                                                   "two diabetes and normal kidney function"}
    assert report["by_eval"][str(eval_file)] == {"items": 3, "checkable": 2, "items_matched": 2,
                                                 "samples_flagged": 2}


def test_a_shorter_ngram_catches_the_near_misses(store, eval_file):
    report = json.loads(_invoke(store, "--against", str(eval_file), "--ngram", "12",
                                "--json").stdout)
    assert set(report["flagged_ids"]) == FLAGGED_BY_JSONL | {"a-near", "b-near"}


def test_text_report_names_sources_and_examples(store, eval_file):
    res = _invoke(store, "--against", str(eval_file))
    assert res.exit_code == 0, res.output
    assert "2 flagged" in res.stdout
    assert "source notes/a.jsonl: 1 of 3 samples flagged (train 1)" in res.stdout
    assert 'b-hit: "an elderly man reports crushing chest pain' in res.stdout
    assert "(1 items shorter than 13 words in every field are not checked" in res.stdout


def test_a_bundled_task_name_is_evaluation_data(store):
    report = json.loads(_invoke(store, "--against", "medmcq_mini", "--json").stdout)
    assert report["flagged_ids"] == ["b-bundled"]
    [example] = report["by_source"]["chat/b.jsonl"]["examples"]
    assert (example["eval_set"], example["eval_item"]) == ("medmcq_mini", "medmcq-001")
    assert report["by_eval"]["medmcq_mini"]["items"] == 60


def test_out_writes_every_other_sample_with_every_signal(store, eval_file, tmp_path):
    clean = str(tmp_path / "clean")
    args = [store, "--against", str(eval_file), "--against", "medmcq_mini", "--out", clean]
    res = _invoke(*args)
    assert res.exit_code == 0, res.output
    assert f"{clean}: wrote; 4 of 7 samples (3 removed)" in res.stdout
    assert verify_store(clean) == []
    kept = set(TEXTS) - FLAGGED_BY_JSONL - {"b-bundled"}
    source, out = StoreReader(store), StoreReader(clean)
    assert set(out.sample_ids) == kept and out.signals == source.signals
    original = content_of(source, via="random", ids=sorted(kept))
    assert content_differences(content_of(out), original) == []
    operation = out.manifest["extra"]["operation"]
    assert operation["command"] == "decontaminate"
    assert operation["filter"]["against"] == [str(eval_file), "medmcq_mini"]
    assert operation["filter"]["ngram"] == 13
    assert operation["counts"]["removed"] == 3
    assert operation["counts"]["removed_by_source"] == {"notes/a.jsonl": 1, "chat/b.jsonl": 2}
    again = _invoke(*args)  # a rerun finds its own finished output
    assert again.exit_code == 0, again.output
    assert "already held this clean store: nothing written" in again.stdout
    other = _invoke(store, "--against", str(eval_file), "--out", clean)  # another job's output
    assert other.exit_code == 1 and "refusing to write the clean store" in other.stderr
    assert set(StoreReader(clean).sample_ids) == kept  # nothing lost


def test_an_interrupted_clean_store_is_resumed(store, eval_file, tmp_path, monkeypatch):
    clean = str(tmp_path / "clean")
    args = [store, "--against", str(eval_file), "--out", clean]
    original_add, added = StoreWriter.add, []

    def add_then_stop(writer, sample):
        if len(added) == 3:
            raise KeyboardInterrupt  # as a Ctrl-C (or a kill) in the middle of the copy
        added.append(sample.sample_id)
        original_add(writer, sample)

    monkeypatch.setattr(StoreWriter, "add", add_then_stop)
    assert _invoke(*args).exit_code == 130
    committed = len(StoreReader(clean))
    assert 0 < committed <= 3  # whole segments committed before the interrupt
    monkeypatch.setattr(StoreWriter, "add", original_add)
    res = _invoke(*args)
    assert res.exit_code == 0, res.output
    assert f"resumed after {committed} samples; 5 of 7 samples" in res.stdout
    kept = sorted(set(TEXTS) - FLAGGED_BY_JSONL)
    assert StoreReader(clean).sample_ids == [s for s in TEXTS if s in kept]  # store order
    assert content_differences(content_of(StoreReader(clean)),
                               content_of(StoreReader(store), via="random", ids=kept)) == []


@pytest.fixture
def no_scan(monkeypatch):
    """Bad inputs must be refused before the store is streamed."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("the store was read before the inputs were checked")

    monkeypatch.setattr(StoreReader, "read_segment", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.mark.parametrize("case", ["missing file", "unknown task", "no text", "ngram 0",
                                  "tokenizer mismatch", "out holds a store", "listed twice"])
def test_bad_inputs_are_one_paragraph_before_the_scan(case, store, eval_file, tmp_path,
                                                      no_scan):
    args, expected = _bad_case(case, store, eval_file, tmp_path)
    res = _invoke(*args)
    assert res.exit_code == 1, res.output
    assert res.stderr.startswith("logitstore: error: ") and "\n\n" not in res.stderr.strip()
    assert expected in res.stderr, res.stderr
    assert not (tmp_path / "clean").exists()


def _bad_case(case: str, store: str, eval_file: Path, tmp_path: Path) -> tuple[list[str], str]:
    if case == "missing file":
        return [store, "--against", str(tmp_path / "nope.jsonl")], "does not exist"
    if case == "unknown task":
        return [store, "--against", "no_such_task_xyz"], "unknown evaluation set"
    if case == "no text":
        empty = tmp_path / "ids.jsonl"
        empty.write_text('{"id": 1, "score": 2}\n')
        return [store, "--against", str(empty)], "holds no text to check"
    if case == "ngram 0":
        return [store, "--against", str(eval_file), "--ngram", "0"], "at least 1 word"
    if case == "tokenizer mismatch":
        other = make_tokenizer(tmp_path / "other", vocab_size=300)
        return [store, "--against", str(eval_file), "--tokenizer", str(other)], \
            "tokenizer mismatch"
    if case == "out holds a store":
        return [store, "--against", str(eval_file), "--out", store], "refusing to write"
    return [store, "--against", str(eval_file), "--against", str(eval_file)], "more than once"


def test_an_uncached_lm_eval_task_says_how_to_get_it(store, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-m", "logitstore.cli", "decontaminate", store,
                           "--against", "medqa_4options"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("logitstore: error: the documents of lm-eval task "
                                  "'medqa_4options' could not be loaded")
    assert "HF_HUB_OFFLINE" in proc.stderr and "JSONL file" in proc.stderr
    assert proc.stdout == ""
