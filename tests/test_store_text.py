"""Format 2.1: each sample's text, its tokens' byte spans and the tokenizer's files in the
store (logitstore/text_spans.py, FORMAT.md section 4.1)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from logitstore.cli import main
from logitstore.errors import LogitStoreError, SchemaMismatchError
from logitstore.format import StoreSettings
from logitstore.info import size_report
from logitstore.merge import merge_stores
from logitstore.reader import StoreReader
from logitstore.subset import subset_store
from logitstore.text_spans import ROLES, SampleText, segment_text_problems
from logitstore.transfer import copy_store
from logitstore.verify import verify_store
from logitstore.writer import StoreWriter, tokenizer_file_entries
from store_helpers import make_samples, make_settings

ROOT = Path(__file__).resolve().parents[1]
# Pieces of text, one per token: multi-byte UTF-8 of 2, 3 and 4 bytes included.
PIECES = ["The ", "pâtient", " has", " 日本", " fever", "€", "😀", " ok", "\n", "é"]
TOKENIZER_FILES = {"tokenizer/tokenizer.json": b'{"version": "1.0"}',
                   "tokenizer/tokenizer_config.json": b'{"bos_token": "<s>"}'}


def with_text(sample, seed: int):
    """`sample` with a text of len(sample)-1 pieces: a special BOS (zero-width at byte 0),
    then one token per piece; the first half of the pieces is the user's turn, the rest
    the assistant's, and a zero-width special turn marker sits between them."""
    rng = np.random.default_rng(seed)
    length = len(sample.input_ids)
    pieces = [PIECES[i] for i in rng.integers(0, len(PIECES), max(0, length - 1))]
    spans, special, roles, at = [[0, 0]], [True], [ROLES.index("none")], 0
    for k, piece in enumerate(pieces):
        size = len(piece.encode("utf-8"))
        turn_marker = k == len(pieces) // 2 and k > 0
        spans.append([at, at] if turn_marker else [at, at + size])
        special.append(turn_marker)
        roles.append(ROLES.index("user" if k < len(pieces) // 2 else "assistant"))
        at += 0 if turn_marker else size
    text = "".join(p for k, p in enumerate(pieces) if not (k == len(pieces) // 2 and k > 0))
    sample.text_spans = SampleText(text, np.array(spans, np.int32), np.array(special),
                                   np.array(roles, np.uint8))
    return sample


def text_samples(n: int, seed: int = 0, settings=None):
    return [with_text(s, seed * 1000 + i) for i, s in enumerate(make_samples(n, seed, settings))]


def text_settings(**overrides) -> StoreSettings:
    return make_settings(text=True, tokenizer_files=tokenizer_file_entries(
        {rel.split("/", 1)[1]: data for rel, data in TOKENIZER_FILES.items()}), **overrides)


def write(path, samples, settings, **kwargs) -> str:
    with StoreWriter(str(path), settings, overwrite=True, **kwargs) as writer:
        writer.add_many(samples)
    return str(path)


def assert_same_text(got: SampleText, want: SampleText) -> None:
    assert got.text == want.text
    np.testing.assert_array_equal(got.spans, want.spans)
    np.testing.assert_array_equal(got.special, want.special)
    np.testing.assert_array_equal(got.roles, want.roles)


@pytest.fixture(scope="module")
def text_store(tmp_path_factory):
    settings = text_settings()
    samples = text_samples(30, seed=3, settings=settings)
    url = write(tmp_path_factory.mktemp("text") / "store", samples, settings,
                tokenizer_files=TOKENIZER_FILES)
    return url, samples


def test_round_trip_by_id_and_by_segment(text_store):
    url, samples = text_store
    reader = StoreReader(url)
    assert reader.has_text and len(reader.segments) > 2
    assert any(len(s.text_spans.text.encode()) > len(s.text_spans.text) for s in samples)
    for original in samples:
        assert_same_text(reader.sample(original.sample_id).text_spans, original.text_spans)
    streamed = {s.sample_id: s for s in reader.iter_samples()}
    for original in samples:
        assert_same_text(streamed[original.sample_id].text_spans, original.text_spans)
    tokens = streamed[samples[5].sample_id].text_spans
    assert set(tokens.roles.tolist()) <= {0, 2, 3} and tokens.special[0]
    assert verify_store(url) == []
    assert reader.tokenizer_files() == {k.split("/", 1)[1]: v for k, v in TOKENIZER_FILES.items()}


def test_stores_without_text_read_as_before(tmp_path):
    settings = make_settings()
    url = write(tmp_path / "plain", make_samples(5, 1, settings), settings)
    reader = StoreReader(url)
    assert not reader.has_text and reader.tokenizer_files() == {}
    assert reader.sample(0).text_spans is None
    stored = json.loads((tmp_path / "plain" / "manifest.json").read_text())["settings"]
    assert "text" not in stored and "tokenizer_files" not in stored  # what 2.0 wrote
    assert verify_store(url) == []


def test_settings_of_a_newer_release_are_refused_in_one_sentence():
    data = {**make_settings().to_json(), "a_key_of_a_later_release": {}}
    with pytest.raises(SchemaMismatchError, match="newer release.*upgrade"):
        StoreSettings.from_json(data)


@pytest.mark.parametrize("damage, expected", [
    (lambda t: t.spans.__setitem__((2, 1), 10_000), "ends past the text"),
    (lambda t: t.spans.__setitem__((0, 1), 1), "is special but covers text"),
    (lambda t: t.spans.__setitem__((3, 0), t.spans[2, 0]), "without overlap"),
    (lambda t: setattr(t, "spans", t.spans[:-1]), "must be a"),
])
def test_writer_refuses_bad_spans_naming_the_sample(tmp_path, damage, expected):
    settings = text_settings()
    sample = next(s for s in text_samples(10, 2, settings) if len(s.input_ids) > 4)
    damage(sample.text_spans)
    with StoreWriter(str(tmp_path / "s"), settings, tokenizer_files=TOKENIZER_FILES) as writer:
        with pytest.raises(SchemaMismatchError, match=expected) as err:
            writer.add(sample)
    assert sample.sample_id in str(err.value)


def test_writer_refuses_a_sample_without_text(tmp_path):
    settings = text_settings()
    with StoreWriter(str(tmp_path / "s"), settings, tokenizer_files=TOKENIZER_FILES) as writer:
        with pytest.raises(SchemaMismatchError, match="has no text.*--no-text"):
            writer.add(make_samples(1, 0, settings)[0])


def test_writer_refuses_tokenizer_bytes_other_than_listed(tmp_path):
    wrong = {**TOKENIZER_FILES, "tokenizer/tokenizer.json": b"{}"}
    with pytest.raises(LogitStoreError, match="not the ones the settings list"):
        StoreWriter(str(tmp_path / "s"), text_settings(), tokenizer_files=wrong)
    with pytest.raises(LogitStoreError, match="neither in"):
        StoreWriter(str(tmp_path / "t"), text_settings())


def test_verify_finds_spans_that_break_the_invariants(tmp_path, monkeypatch):
    import logitstore.segment as segment

    settings = text_settings()
    samples = text_samples(6, 4, settings)
    bad = next(s for s in samples if len(s.input_ids) > 3)
    end = bad.text_spans.spans[2, 1]
    bad.text_spans.spans[2] = [end + 1, end]  # ends before it starts
    monkeypatch.setattr(segment, "_check_text", lambda sample, length: None)
    url = write(tmp_path / "s", samples, settings, tokenizer_files=TOKENIZER_FILES)
    problems = verify_store(url)
    assert len(problems) == 1 and "/spans: sample" in problems[0], problems


def test_segment_check_finds_non_utf8_text_and_byte_count_mismatch():
    utf8 = np.frombuffer("é".encode(), np.uint8)[:1]  # half a character
    ok = dict(gap=np.zeros(1, np.int32), span_length=np.ones(1, np.uint32),
              kind=np.zeros(1, np.uint8), lengths=np.array([1]))
    assert "not UTF-8" in segment_text_problems(utf8, np.array([1], np.uint32), **ok)[0]
    assert "sum to 2" in segment_text_problems(utf8, np.array([2], np.uint32), **ok)[0]


def test_verify_names_a_damaged_or_missing_tokenizer_file(text_store, tmp_path):
    url = copy_store(text_store[0], str(tmp_path / "copy")) and str(tmp_path / "copy")
    (tmp_path / "copy" / "tokenizer" / "tokenizer.json").write_bytes(b"{}")
    assert any("tokenizer/tokenizer.json" in p for p in verify_store(url))
    (tmp_path / "copy" / "tokenizer" / "tokenizer.json").unlink()
    assert any("tokenizer/tokenizer.json: missing" in p for p in verify_store(url))


def test_cp_and_subset_carry_text_and_tokenizer(text_store, tmp_path):
    url, samples = text_store
    copy_store(url, str(tmp_path / "cp"))
    keep = [s.sample_id for s in samples[::3]]
    result = subset_store(url, str(tmp_path / "sub"), ids=keep)
    assert result.problems == []
    for dst in ("cp", "sub"):
        reader = StoreReader(str(tmp_path / dst))
        assert reader.has_text and verify_store(str(tmp_path / dst)) == []
        assert set(reader.tokenizer_files()) == {"tokenizer.json", "tokenizer_config.json"}
        for original in samples:
            if original.sample_id in reader.sample_ids:
                assert_same_text(reader.sample(original.sample_id).text_spans,
                                 original.text_spans)
    assert len(StoreReader(str(tmp_path / "sub"))) == len(keep)


def test_merge_keeps_text_of_all_and_refuses_or_drops_a_mix(text_store, tmp_path):
    url, samples = text_store
    settings = text_settings()
    other = write(tmp_path / "other", text_samples(4, 9, settings), settings,
                  tokenizer_files=TOKENIZER_FILES)
    merged = merge_stores([url, other], str(tmp_path / "m"))
    assert merged.problems == [] and StoreReader(str(tmp_path / "m")).has_text
    plain_settings = replace(settings, text=False, tokenizer_files={})
    plain = write(tmp_path / "plain", make_samples(4, 9, plain_settings), plain_settings)
    with pytest.raises(SchemaMismatchError, match="--common-signals to leave the text out"):
        merge_stores([url, plain], str(tmp_path / "mix"))
    dropped = merge_stores([plain, url], str(tmp_path / "mix"), common_signals=True)
    reader = StoreReader(str(tmp_path / "mix"))
    assert dropped.problems == [] and not reader.has_text
    assert dropped.provenance["filter"]["text_left_out"] is True
    assert "tokenizer.json" in reader.tokenizer_files()  # from the source that has them


def _bpe_tokenizer_json(text: str) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return tok.to_str()


def test_show_decodes_with_the_stored_tokenizer_and_prints_the_text(tmp_path):
    from tokenizers import Tokenizer

    text = "The patient has a fever and a cough."
    tokenizer_json = _bpe_tokenizer_json(text * 3)
    encoding = Tokenizer.from_str(tokenizer_json).encode(text)
    ids = np.array(encoding.ids)
    files = {"tokenizer/tokenizer.json": tokenizer_json.encode()}
    settings = make_settings(vocab_size=300, text=True, tokenizer_files=tokenizer_file_entries(
        {"tokenizer.json": files["tokenizer/tokenizer.json"]}))
    sample = replace(make_samples(1, 0, settings)[0], input_ids=ids,
                     loss_mask=np.ones(len(ids), bool),
                     text_spans=SampleText(text, np.array(encoding.offsets, np.int32),
                                           np.zeros(len(ids), bool), None))
    _resize_signals(sample, len(ids))
    url = write(tmp_path / "s", [sample], settings, tokenizer_files=files)
    data = json.loads(CliRunner().invoke(main, ["show", url, "--index", "0", "--json"]).output)
    assert "".join(data["tokens"]) == text and data["text"] == text
    assert data["spans"] == [list(o) for o in encoding.offsets] and len(data["tokens"]) > 3
    out = CliRunner().invoke(main, ["show", url, "--index", "0"])
    assert out.exit_code == 0, out.output
    assert f"text {text!r}" in out.output
    assert all(repr(token) in out.output for token in data["tokens"])


def _resize_signals(sample, length: int) -> None:
    """Give `sample` a top-k-only signal of `length` positions (show prints its entries)."""
    from logitstore.sample import SignalData, TopK

    for name, data in sample.signals.items():
        ids = np.tile(np.arange(4), (length, 1))
        sample.signals[name] = SignalData(topk=TopK(ids, np.full((length, 4), -2.0)),
                                          sampled=data.sampled and _sampled(length),
                                          hidden=data.hidden, attention=data.attention)


def _sampled(length: int):
    from logitstore.sample import Sampled

    return Sampled.from_lists([[1]] * length, [[8]] * length, [[-0.1]] * length)


def test_text_and_spans_cost_under_4_bytes_per_token_on_the_demo_corpus(tmp_path):
    """The issue's budget, on the bundled medical corpus tokenised by a BPE of 4,000
    tokens trained on it (about 4.7 bytes of text per token)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    subprocess.run([sys.executable, str(ROOT / "demo" / "make_corpus.py"), "--out",
                    str(tmp_path / "corpus"), "--scale", "0.1"], check=True, capture_output=True,
                   timeout=120)
    texts = [json.loads(line)["text"] for line in
             (tmp_path / "corpus" / "train.jsonl").read_text().splitlines()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=4000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    settings = make_settings(vocab_size=4000, text=True, chunk_tokens=4096,
                             segment_tokens=1 << 18, chunk_samples=64)
    samples = []
    for i, (text, enc) in enumerate(zip(texts, tok.encode_batch(texts))):
        sample = make_samples(1, i, settings)[0]
        sample.sample_id, sample.input_ids = f"doc{i}", np.array(enc.ids)
        sample.loss_mask = np.ones(len(enc.ids), bool)
        sample.text_spans = SampleText(text, np.array(enc.offsets, np.int32),  # ASCII text
                                       np.zeros(len(enc.ids), bool), None)
        _resize_signals(sample, len(enc.ids))
        samples.append(sample)
    assert all(t.isascii() for t in texts)  # so character offsets are byte offsets
    url = write(tmp_path / "s", samples, settings)
    report = size_report(StoreReader(url).manifest)
    per_token = sum(a["bytes_per_token"] for name, a in report["arrays"].items()
                    if name.startswith(("text/", "spans/")))
    raw = sum(len(t) for t in texts) / sum(len(s.input_ids) for s in samples)
    assert raw > 3.5 and per_token < 4.0, (raw, per_token)
