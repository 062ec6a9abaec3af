"""`logitstore add-text`: a store dumped without text gets each sample's text and token spans
recovered from its ids with the store's tokenizer, exactly the ones a dump with text writes;
refusals (another tokenizer, a store with text, chat markup, ids that do not come back)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from tokenizers import AddedToken

pytest.importorskip("torch")

from logitstore.cli import main as logitstore_cli  # noqa: E402
from logitstore.errors import TokenSpansError  # noqa: E402
from logitstore.reader import StoreReader  # noqa: E402
from logitstore.verify import verify_store  # noqa: E402
from test_dump_text import (ACCENTED, FAST, _cli, _hf, _metaspace_tokenizer,  # noqa: E402
                            _write_jsonl, stores, tiny)  # noqa: F401
from tiny_hf import corpus  # noqa: E402


def _add_text(*args, expect: int = 0):
    result = CliRunner().invoke(logitstore_cli, ["add-text", *[str(a) for a in args]])
    assert result.exit_code == expect, result.output
    return result


@pytest.fixture(scope="module")
def plain_dumps(tiny):  # noqa: F811
    """Plain-text and prompt/completion records dumped with text and with --no-text."""
    data = tiny["root"] / "no_chat"
    data.mkdir()
    _write_jsonl(data / "a_text.jsonl", [{"text": ACCENTED + s} for s in corpus()[:4]])
    _write_jsonl(data / "b_pc.jsonl", [{"prompt": "Question: what does the patient report?",
                                        "completion": f" {s}"} for s in corpus()[10:12]])
    base = ["--model", tiny["llama"], "--data", data, *FAST]
    text, plain = tiny["root"] / "nc_text", tiny["root"] / "nc_plain"
    _cli(*base, "--out", text)
    _cli(*base, "--out", plain, "--no-text")
    return text, plain


def test_the_recovered_text_and_spans_are_those_a_dump_with_text_writes(tiny, plain_dumps,
                                                                         tmp_path):  # noqa: F811
    text_store, plain_store = plain_dumps
    out = tmp_path / "added"
    result = _add_text(plain_store, out, "--tokenizer", tiny["tok"])
    assert "6 samples with their text" in result.output and "verified" in result.output
    added, plain = StoreReader(str(out)), StoreReader(str(plain_store))
    assert added.has_text and verify_store(str(out)) == []
    assert added.tokenizer_files()["tokenizer.json"] == \
        StoreReader(str(text_store)).tokenizer_files()["tokenizer.json"]
    dumped = {s.sample_id: s for s in StoreReader(str(text_store)).iter_samples()}
    before = {s.sample_id: s for s in plain.iter_samples()}
    for sample in added.iter_samples():
        want, old = dumped[sample.sample_id].text_spans, before.pop(sample.sample_id)
        assert sample.text_spans.text == want.text
        np.testing.assert_array_equal(sample.text_spans.spans, want.spans)
        np.testing.assert_array_equal(sample.text_spans.special, want.special)
        np.testing.assert_array_equal(sample.input_ids, old.input_ids)  # nothing else moves
        np.testing.assert_array_equal(sample.loss_mask, old.loss_mask)
        np.testing.assert_array_equal(sample.signals["llama"].topk.logprobs,
                                      old.signals["llama"].topk.logprobs)
    assert not before
    operation = added.manifest["extra"]["operation"]
    assert operation["command"] == "add-text" and operation["counts"]["samples_out"] == 6
    again = _add_text(plain_store, out, "--tokenizer", tiny["tok"])  # a rerun: nothing to do
    assert "already held this output" in again.output


def test_another_tokenizer_and_a_store_with_text_are_refused_before_anything_is_written(
        tiny, plain_dumps, tmp_path):  # noqa: F811
    text_store, plain_store = plain_dumps
    other = tmp_path / "other_tok"
    _metaspace_tokenizer().save_pretrained(other)
    refused = _add_text(plain_store, tmp_path / "a", "--tokenizer", other, expect=1)
    message = refused.output.strip()
    assert "is not the tokenizer" in message and "expected fingerprint" in message
    assert "\n" not in message and not (tmp_path / "a").exists()
    refused = _add_text(text_store, tmp_path / "b", "--tokenizer", tiny["tok"], expect=1)
    assert "already holds" in refused.output and not (tmp_path / "b").exists()


def test_a_chat_sample_is_refused_before_anything_is_written_naming_it(
        tiny, stores, tmp_path):  # noqa: F811
    _, plain_store = stores  # its data holds a chat rendered by the tokenizer's template
    manifest = (plain_store / "manifest.json").read_bytes()
    refused = _add_text(plain_store, tmp_path / "c", "--tokenizer", tiny["tok"], expect=1)
    message = refused.output[refused.output.index("logitstore: error"):].strip()
    assert "sits inside the text" in message and "teacher-dump" in message
    assert "1 of the" in message and "nothing was written" in message and "\n" not in message
    chat = next(s for s in StoreReader(str(plain_store)).iter_samples()
                if s.source == "c_chat.jsonl")
    assert repr(chat.sample_id) in message
    assert (plain_store / "manifest.json").read_bytes() == manifest
    assert not (tmp_path / "c").exists()  # found by the first pass, before any write


def test_windows_come_back_as_a_dump_with_text_writes_them(tiny, tmp_path):  # noqa: F811
    """--split-long windows (ASCII text): windows after the first start mid-text, no BOS."""
    data = tmp_path / "long"
    data.mkdir()
    _write_jsonl(data / "a.jsonl", [{"text": " ".join(corpus()[:6])}])
    base = ["--model", tiny["llama"], "--data", data, *FAST, "--max-length", "24",
            "--split-long"]
    _cli(*base, "--out", tmp_path / "text")
    _cli(*base, "--out", tmp_path / "plain", "--no-text")
    _add_text(tmp_path / "plain", tmp_path / "added", "--tokenizer", tiny["tok"])
    dumped = {s.sample_id: s.text_spans
              for s in StoreReader(str(tmp_path / "text")).iter_samples()}
    added = list(StoreReader(str(tmp_path / "added")).iter_samples())
    assert len(added) == len(dumped) > 3
    for sample in added:
        assert sample.text_spans.text == dumped[sample.sample_id].text
        np.testing.assert_array_equal(sample.text_spans.spans, dumped[sample.sample_id].spans)


def test_what_the_ids_cannot_give_back_exactly_is_refused(tiny, tmp_path):  # noqa: F811
    from logitstore.toolkit.add_text import TextRecovery

    tokenizer = _hf(tiny["tok"])

    def recovered_text(tokenizer, ids):
        return TextRecovery(tokenizer)(ids)
    whole = tokenizer("fever and cough")["input_ids"]
    assert recovered_text(tokenizer, np.asarray(whole)).text == "fever and cough"
    # a cut inside a character: its other bytes are in the neighbouring window
    emoji = tokenizer("a 😀 b", add_special_tokens=False)["input_ids"]
    halves = [i for i in range(1, len(emoji))
              if "\ufffd" in tokenizer.decode(emoji[:i])]
    assert halves, "the tiny tokenizer splits the emoji"
    with pytest.raises(TokenSpansError, match="not whole UTF-8 characters"):
        recovered_text(tokenizer, np.asarray(emoji[:halves[0]]))
    # an added token marked special but not listed among all_special_ids (Llama 3's markup)
    tokenizer.add_tokens([AddedToken("<|header|>", special=True)])
    marked = tokenizer.convert_tokens_to_ids("<|header|>")
    assert marked not in tokenizer.all_special_ids
    with pytest.raises(TokenSpansError, match="sits inside the text"):
        recovered_text(tokenizer, np.asarray(whole[:2] + [marked] + whole[2:]))
    assert TextRecovery(tokenizer).exact_bytes  # the ids' own bytes: the original text
    assert not TextRecovery(_metaspace_tokenizer()).exact_bytes  # the round trip


def _llama2_style(tokenizer):
    """`tokenizer` with Llama 2's dummy prefix: a "▁" prepended to the text's first word,
    stripped again by the decoder."""
    from tokenizers import decoders, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = tokenizer.backend_tokenizer
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>",
                                   eos_token="<eos>", unk_token="<unk>")


@pytest.mark.parametrize("dummy_prefix", [False, True])
def test_a_sentencepiece_style_text_comes_back_where_the_round_trip_is_exact(dummy_prefix):
    """Metaspace + byte fallback: the decoded text, kept when it cuts into the same ids
    (its spans that cut's); what does not come back is refused, never guessed: half a
    character, and with a dummy prefix a window starting inside a word (its re-cut adds
    the prefix) and a text whose leading space the prefix swallowed comes back without it."""
    from logitstore.toolkit.add_text import TextRecovery
    from logitstore.toolkit.token_spans import tokenize_with_spans

    tokenizer = _metaspace_tokenizer()
    tokenizer = _llama2_style(tokenizer) if dummy_prefix else tokenizer
    recover = TextRecovery(tokenizer)
    for text in ("fever and cough", ACCENTED + "rash", "two  spaces, then\na line",
                 "a stand-in \ufffd the data held"):  # U+FFFD as text, not a cut
        cut = tokenize_with_spans(tokenizer, text)
        got = recover(np.asarray(cut.ids, np.int64))
        assert got.text == text  # nothing dropped or normalised: the original
        np.testing.assert_array_equal(got.spans, cut.spans)
        np.testing.assert_array_equal(got.special, cut.special)
        assert got.special[0] and tuple(got.spans[0]) == (0, 0)  # BOS, zero-width
    leading = tokenize_with_spans(tokenizer, " fever").ids
    got = recover(np.asarray(leading, np.int64)).text
    assert got == ("fever" if dummy_prefix else " fever")  # the same ids either way
    assert tokenizer(got)["input_ids"] == leading.tolist()
    words = tokenizer("fever and cough", add_special_tokens=False)["input_ids"]
    window = np.asarray(words[1:], np.int64)  # starts inside "fever"
    if dummy_prefix:
        with pytest.raises(TokenSpansError, match="other ids than the stored ones"):
            recover(window)
    else:
        assert recover(window).text == "ever and cough"
    emoji = tokenizer("a 🩺 b", add_special_tokens=False)["input_ids"]  # not in the vocabulary
    halves = [i for i in range(1, len(emoji)) if "\ufffd" in tokenizer.decode(emoji[:i])]
    assert halves, "byte fallback spells the emoji in bytes"
    with pytest.raises(TokenSpansError, match="not whole UTF-8 characters"):
        recover(np.asarray(emoji[:halves[0]], np.int64))


def test_a_sentencepiece_teachers_store_gets_the_text_a_dump_with_text_writes(
        tiny, plain_dumps, tmp_path):  # noqa: F811
    """A store dumped by a SentencePiece-style teacher (metaspace, byte fallback) without
    text: add-text gives back what the same dump with text holds (the records' texts hold
    no leading space for a dummy prefix to swallow)."""
    from tiny_hf import make_tiny_llama

    teacher = make_tiny_llama(tmp_path / "ms_llama", _metaspace_tokenizer())
    base = ["--model", teacher, "--data", tiny["root"] / "no_chat", *FAST]
    _cli(*base, "--out", tmp_path / "text")
    _cli(*base, "--out", tmp_path / "plain", "--no-text")
    _add_text(tmp_path / "plain", tmp_path / "added", "--tokenizer", teacher)
    dumped = {s.sample_id: s for s in StoreReader(str(tmp_path / "text")).iter_samples()}
    added = list(StoreReader(str(tmp_path / "added")).iter_samples())
    assert len(added) == len(dumped) == 6 and verify_store(str(tmp_path / "added")) == []
    for sample in added:
        want = dumped[sample.sample_id]
        np.testing.assert_array_equal(sample.input_ids, want.input_ids)
        assert sample.text_spans.text == want.text_spans.text
        np.testing.assert_array_equal(sample.text_spans.spans, want.text_spans.spans)
        np.testing.assert_array_equal(sample.text_spans.special, want.text_spans.special)


def test_a_student_of_another_tokenizer_trains_on_the_copy_it_was_refused_before(
        tiny, plain_dumps, tmp_path):  # noqa: F811
    """The point of add-text: the store without text is refused to a foreign-tokenizer
    student; its copy with text trains one, aligned by the recovered spans."""
    from transformers import AutoTokenizer

    from logitstore.errors import SchemaMismatchError
    from student_train.config import resolve_config
    from student_train.train import train
    from test_cross_tokenizer_train import make_student_tokenizer
    from tiny_hf import make_tiny_llama
    from train_helpers import read_metrics

    _, plain_store = plain_dumps
    tok = AutoTokenizer.from_pretrained(make_student_tokenizer(tmp_path / "student_tok"))
    student = make_tiny_llama(tmp_path / "student", tok, seed=0)

    def run(store, out):
        return train(resolve_config(None, {
            "store": str(store), "student": str(student), "out": str(out), "max_steps": 2,
            "batch_tokens": 256, "save_every": 0, "verify_store": "none", "log_every": 1,
            "signals": {"llama": 1.0}, "target": "topk"}))

    with pytest.raises(SchemaMismatchError, match="logitstore add-text"):
        run(plain_store, tmp_path / "refused")
    added = tmp_path / "added"
    _add_text(plain_store, added, "--tokenizer", tiny["tok"])
    run(added, tmp_path / "run")
    rows = [m for m in read_metrics(tmp_path / "run") if "train/cross/positions" in m]
    assert len(rows) == 2
    assert all(0.3 < m["train/cross/aligned_share"] <= 1.0 and np.isfinite(m["train/kd"])
               for m in rows)
