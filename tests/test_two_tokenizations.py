"""Format 2.2: a second teacher's tokenization of the same samples in one store
(logitstore/tokenized.py, FORMAT.md section 4.2): written by SignalAppender, read back,
verified, and carried by cp, subset and merge."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from click.testing import CliRunner

from logitstore.cli import main
from logitstore.errors import LogitStoreError, SchemaMismatchError, SettingsMismatchError
from logitstore.format import SignalSpec, StoreSettings, TokenizationSpec, TopKSpec, SampledSpec
from logitstore.merge import merge_stores
from logitstore.reader import StoreReader
from logitstore.signal_writer import SignalAppender
from logitstore.subset import subset_store
from logitstore.tokenized import Tokenized, segment_tokenized_problems, encode_tokenized
from logitstore.transfer import copy_store
from logitstore.verify import verify_store
from logitstore.writer import tokenizer_file_entries
from store_helpers import _canonical_sampled, _canonical_topk, make_signal
from synthetic import ZipfTeacher, random_sample
from test_store_text import (TOKENIZER_FILES, _bpe_tokenizer_json, text_samples, text_settings,
                             write)

VOCAB2 = 300
SECOND_FILES = {"tokenizer.json": _bpe_tokenizer_json("the patient has fever").encode()}
SECOND = TokenizationSpec(VOCAB2, "cd" * 32, "char-tokenizer",
                          tokenizer_file_entries(SECOND_FILES, "tokenizer/second"))
SPEC = SignalSpec(topk=TopKSpec(3, "f32"), sampled=SampledSpec(6, logprob_encoding="f32"),
                  teacher={"model_id": "second"}, tokenization="second")


def char_cut(text: str, max_tokens: int | None = None) -> Tokenized:
    """A BOS (special, zero-width at 0) then one token per character; cut after
    `max_tokens` tokens: covered_bytes is then the end of the last kept character."""
    spans, at = [[0, 0]], 0
    for char in text:
        size = len(char.encode("utf-8"))
        spans.append([at, at + size])
        at += size
    spans = np.array(spans[:max_tokens], np.int32)
    n = len(spans)
    ids = np.array([1] + [2 + ord(c) % (VOCAB2 - 2) for c in text], np.int64)[:n]
    return Tokenized(ids, np.arange(n) > 0, spans, np.arange(n) == 0,
                     np.zeros(n, np.uint8), int(spans[-1, 1]))


def second_signal(sample_id: str, length: int):
    rng = np.random.default_rng(abs(hash(sample_id)) % 2**32)
    return random_sample(rng, sample_id, length, ZipfTeacher(vocab_size=VOCAB2), k=3,
                         n_draws=6, signal="second").signals["second"]


def add_second(url: str, cut_at: int | None = None, stop_after: int | None = None) -> dict:
    """Adds signal "second" on tokenization "second"; returns {id: (Tokenized, data)}."""
    appender = SignalAppender(url, "second", SPEC, tokenization=SECOND,
                              tokenizer_files={f"tokenizer/second/{k}": v
                                               for k, v in SECOND_FILES.items()})
    reader, written = StoreReader(url), {}
    for n, job in enumerate(appender.pending()):
        if stop_after is not None and n == stop_after:
            return written
        cuts = [char_cut(reader.sample(sid).text_spans.text, cut_at) for sid in job.sample_ids]
        data = [second_signal(sid, len(c)) for sid, c in zip(job.sample_ids, cuts)]
        appender.write(job, data, cuts)
        written.update({sid: (c, d) for sid, c, d in zip(job.sample_ids, cuts, data)})
    appender.close()
    return written


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    settings = text_settings(signals={"first": make_signal(k=4, hidden=None, attention=None)})
    samples = text_samples(24, seed=5, settings=settings)
    url = write(tmp_path_factory.mktemp("two") / "store", samples, settings,
                tokenizer_files=TOKENIZER_FILES)
    return url, {s.sample_id: s for s in samples}, add_second(url, cut_at=12)


def assert_same_cut(got: Tokenized, want: Tokenized) -> None:
    for key in ("input_ids", "loss_mask", "spans", "special"):
        np.testing.assert_array_equal(getattr(got, key), getattr(want, key))
    assert got.covered_bytes == want.covered_bytes


def assert_same_second(got, want) -> None:
    for canonical, kind in ((_canonical_topk, "topk"), (_canonical_sampled, "sampled")):
        a, b = canonical(getattr(got, kind)), canonical(getattr(want, kind))
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-6, err_msg=f"{kind} {key}")


def test_round_trip_with_two_tokenizations_by_id_and_by_segment(two):
    url, samples, written = two
    reader = StoreReader(url)
    assert reader.tokenizations == ["second"] and reader.settings.signals["second"] == SPEC
    assert reader.settings.tokenizations["second"] == SECOND
    assert reader.tokenizer_files("second") == SECOND_FILES
    assert json.loads(reader.manifest_bytes)["format_version"] == "2.2"
    by_segment = {s.sample_id: s for s in reader.iter_samples()}
    for sid, (cut, data) in written.items():
        for got in (reader.sample(sid), by_segment[sid]):
            np.testing.assert_array_equal(got.input_ids, samples[sid].input_ids)
            assert_same_cut(got.tokenizations["second"], cut)
            assert_same_second(got.signals["second"], data)
            assert len(got.signals["first"].topk.ids) == len(got.input_ids)
    assert reader.sample(0, signals=["first"]).tokenizations == {}
    assert verify_store(url) == []


def test_a_cut_sample_records_the_byte_where_its_tokens_stop(two):
    url, samples, written = two
    long = [sid for sid, (cut, _) in written.items()
            if len(samples[sid].text_spans.text) > 11]
    assert long, "the fixture has samples longer than the cut"
    for sid in long:
        cut = StoreReader(url).sample(sid).tokenizations["second"]
        text = samples[sid].text_spans.text
        assert len(cut) == 12 and cut.covered_bytes == len(text[:11].encode("utf-8"))


def test_verify_names_damage_in_the_second_tokenization(two, tmp_path):
    url, _, _ = two
    copy = str(tmp_path / "copy")
    copy_store(url, copy)
    shard = next(p for p in sorted((tmp_path / "copy" / "parts").rglob("*"))
                 if "tokenizations/second/spans/length/c" in str(p) and p.is_file())
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    (tmp_path / "copy" / "tokenizer" / "second" / "tokenizer.json").write_bytes(b"{}")
    problems = verify_store(copy)
    assert any("tokenizations/second/spans/length" in p for p in problems), problems
    assert any("tokenizer/second/tokenizer.json" in p for p in problems), problems


def test_the_segment_check_finds_spans_past_the_covered_bytes():
    cut = char_cut("héllo")
    arrays = encode_tokenized([cut], "uint16")
    assert segment_tokenized_problems(arrays, np.array([6], np.uint32), VOCAB2) == []
    arrays["covered_bytes"] = np.array([3], np.uint32)
    problems = segment_tokenized_problems(arrays, np.array([6], np.uint32), VOCAB2)
    assert problems and "ends past" in problems[0]
    arrays["covered_bytes"] = np.array([9], np.uint32)
    assert "covered_bytes 9" in segment_tokenized_problems(arrays, np.array([6], np.uint32),
                                                           VOCAB2)[0]


def test_cp_subset_and_merge_keep_every_tokenization(two, tmp_path):
    url, _, written = two
    copy, part = str(tmp_path / "cp"), str(tmp_path / "subset")
    copy_store(url, copy)
    keep = sorted(written)[:5]
    assert subset_store(url, part, ids=keep).problems == []
    merged = merge_stores([part, copy], str(tmp_path / "merged"))
    assert merged.problems == []
    for where in (copy, part, str(tmp_path / "merged")):
        reader = StoreReader(where)
        assert reader.settings.tokenizations == {"second": SECOND}
        assert reader.tokenizer_files("second") == SECOND_FILES
        assert_same_cut(reader.sample(keep[0]).tokenizations["second"], written[keep[0]][0])
        assert verify_store(where) == []


def test_merge_refuses_the_same_tokenization_name_with_another_tokenizer(two, tmp_path):
    url, _, _ = two
    other = str(tmp_path / "other")
    copy_store(url, other)
    manifest = json.loads((tmp_path / "other" / "manifest.json").read_text())
    settings = StoreSettings.from_json(manifest["settings"])
    forged = replace(settings, tokenizations={"second": replace(SECOND, vocab_size=301)})
    with pytest.raises(SettingsMismatchError, match="tokenizations.second.vocab_size"):
        from logitstore.merge import check_settings_agree

        class Fake:
            def __init__(self, s):
                self.settings = s
        check_settings_agree(["a", "b"], [Fake(settings), Fake(forged)], ["first", "second"])


def test_common_signals_leaves_out_a_tokenization_no_kept_signal_indexes(two, tmp_path):
    url, _, _ = two
    settings = text_settings(signals={"first": make_signal(k=4, hidden=None, attention=None)})
    plain = write(tmp_path / "plain", text_samples(4, seed=9, settings=settings), settings,
                  tokenizer_files=TOKENIZER_FILES)
    with pytest.raises(SchemaMismatchError, match="signal 'second' is missing"):
        merge_stores([url, plain], str(tmp_path / "refused"))
    merged = merge_stores([url, plain], str(tmp_path / "m"), common_signals=True)
    reader = StoreReader(str(tmp_path / "m"))
    assert merged.problems == [] and reader.signals == ["first"] and reader.tokenizations == []


def test_show_prints_the_second_tokenization_with_its_signal(two, tmp_path):
    url, _, written = two
    sid = sorted(written)[1]
    (tmp_path / "tokenizer.json").write_bytes(SECOND_FILES["tokenizer.json"])
    # the store's own tokenizer files are stand-ins: --tokenizer decodes its tokens
    result = CliRunner().invoke(main, ["show", url, sid, "--tokenizer",
                                       str(tmp_path / "tokenizer.json")])
    assert result.exit_code == 0, result.output
    assert "tokenization second:" in result.output and "second top:" in result.output
    data = json.loads(CliRunner().invoke(main, ["show", url, sid, "--json", "--tokenizer",
                                                str(tmp_path / "tokenizer.json")]).output)
    assert data["tokenizations"]["second"]["input_ids"] == \
        written[sid][0].input_ids.tolist()
    from tokenizers import Tokenizer  # the second tokenization decoded by its stored files

    second = Tokenizer.from_str(SECOND_FILES["tokenizer.json"].decode("utf-8"))
    assert data["tokenizations"]["second"]["tokens"] == \
        [second.decode([t]) for t in written[sid][0].input_ids.tolist()]
    info = CliRunner().invoke(main, ["info", url, "--json"])
    assert info.exit_code == 0, info.output
    arrays = json.loads(info.output)["sizes"]["arrays"]
    assert {"tokenizations/second/input_ids", "tokenizations/second/spans/gap",
            "signals/second/topk_ids"} <= set(arrays)


def test_an_interrupted_addition_resumes_and_readers_never_see_half(tmp_path):
    settings = text_settings(signals={"first": make_signal(k=4, hidden=None, attention=None)})
    url = write(tmp_path / "s", text_samples(24, seed=5, settings=settings), settings,
                tokenizer_files=TOKENIZER_FILES)
    add_second(url, stop_after=1)
    assert StoreReader(url).signals == ["first"] and verify_store(url) == []
    add_second(url)
    assert StoreReader(url).signals == ["first", "second"] and verify_store(url) == []


def test_refusals(tmp_path, two):
    url, _, _ = two
    settings = make_settings_without_text()
    plain = write(tmp_path / "notext", text_samples(3, seed=1, settings=settings), settings)
    with pytest.raises(LogitStoreError, match="keeps no sample text"):
        SignalAppender(plain, "second", SPEC, tokenization=SECOND)
    fresh = write(tmp_path / "fresh", text_samples(3, seed=1, settings=text_settings()),
                  text_settings(), tokenizer_files=TOKENIZER_FILES)
    appender = SignalAppender(fresh, "second", SPEC, tokenization=SECOND,
                              tokenizer_files={f"tokenizer/second/{k}": v
                                               for k, v in SECOND_FILES.items()})
    job = appender.pending()[0]
    text = StoreReader(fresh).sample(job.sample_ids[0]).text_spans.text
    bad = char_cut(text + "extra")  # spans past the sample's text
    cuts = [bad] + [char_cut(StoreReader(fresh).sample(s).text_spans.text)
                    for s in job.sample_ids[1:]]
    data = [second_signal(s, len(c)) for s, c in zip(job.sample_ids, cuts)]
    with pytest.raises(SchemaMismatchError, match="tokenization 'second'"):
        appender.write(job, data, cuts)
    with pytest.raises(SchemaMismatchError, match="expected each of the"):
        appender.write(job, data)
    with pytest.raises(SchemaMismatchError, match="another tokenizer"):
        SignalAppender(url, "third", replace(SPEC, teacher={"model_id": "third"}),
                       tokenization=replace(SECOND, tokenizer_fingerprint="ef" * 32))
    with pytest.raises(SettingsMismatchError, match="indexed by no signal"):
        replace(StoreReader(url).settings, signals={}).validate()


def make_settings_without_text() -> StoreSettings:
    from store_helpers import make_settings

    return make_settings(signals={"first": make_signal(k=4, hidden=None, attention=None)})


def test_the_two_teacher_preset_resolves_both_dumps_and_the_weighted_training():
    from pathlib import Path

    from student_train.config import resolve_config as train_config
    from teacher_dump.config import resolve_config as dump_config

    path = Path(__file__).resolve().parents[1] / "configs" / "med42+medgemma-to-llama3.2-1b.yaml"
    header = [line[2:] for line in path.read_text().splitlines()[:3]]
    first, second = (dump_config(path, {"data": ["d.jsonl"], "out": "store/", **extra})
                     for extra in ({}, {"model": "medgemma-4b", "signal": "medgemma"}))
    assert header[1].split()[3:] == ["--model", "medgemma-4b", "--signal", "medgemma",
                                     "--out", "store/"]
    assert (first.model, second.model, second.signal) == ("med42", "medgemma-4b", "medgemma")
    assert first.text and first.top_k and not first.samples  # top-k: what crosses tokenizers
    train = train_config(path, {"store": "store/", "out": "run/"})
    assert train.signals == {"med42": 0.6, "medgemma": 0.4} and train.target == "topk"
    assert train.student == "llama3.2-1b" and train.cross_loss == "pkl"
