"""Classifier stores (format 2.3, FORMAT.md section 4.3): per-sample head logits, pooled
features and labels of a classification teacher, through the same writer, records, commit,
reader, verify and cp as causal-lm stores; each kind's API refuses the other kind's store."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from logitstore.classifier_reader import ClassifierReader
from logitstore.classifier_sample import (ClassifierSample, classifier_sample_id,
                                          encode_classifier_segment)
from logitstore.cli import main
from logitstore.errors import (SchemaMismatchError, SettingsMismatchError, StoreKindError,
                               UnknownSampleError)
from logitstore.format import StoreSettings
from logitstore.reader import StoreReader
from logitstore.signal_writer import SignalAppender
from logitstore.verify import verify_store
from logitstore.writer import StoreWriter

from store_helpers import make_samples, make_settings, make_signal

HEADS = {"modality": 5, "location": 12}
FEATURES = {"image_cls": 16, "text_cls": 16, "fused": 8}
OLD_STORE = Path(__file__).parent / "data" / "store-1.1"


def classifier_settings(**overrides) -> StoreSettings:
    base = dict(kind="classifier", heads=HEADS, features=FEATURES, logits_encoding="f32",
                features_encoding="f32", segment_samples=5, chunk_samples=2)
    return StoreSettings(**{**base, **overrides})


def make_classifier_samples(n: int, seed: int = 0, heads=HEADS, features=FEATURES
                            ) -> list[ClassifierSample]:
    """Deterministic samples: ids from the input bytes, splits train/validation, some
    heads unlabelled, a tag on every other sample."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        image, text = bytes(rng.integers(0, 256, 32, dtype=np.uint8)), f"finding {i}: ok"
        labels = {"modality": int(rng.integers(0, heads["modality"]))}
        if i % 3:
            labels["location"] = int(rng.integers(0, heads["location"]))
        out.append(ClassifierSample(
            sample_id=classifier_sample_id(image, text), image=f"images/{i:04d}.png",
            text=text, split="train" if i % 4 else "validation", source="synthetic",
            logits={h: rng.normal(0, 3, c).astype(np.float32) for h, c in heads.items()},
            features={p: rng.normal(0, 1, d).astype(np.float32) for p, d in features.items()},
            labels=labels, tags={"site": f"s{i % 2}"} if i % 2 else {}))
    return out


def write(path, samples, settings=None, **kw) -> str:
    with StoreWriter(str(path), settings or classifier_settings(), **kw) as writer:
        writer.add_many(samples)
    return str(path)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    samples = make_classifier_samples(8)
    return write(tmp_path_factory.mktemp("cls") / "store", samples), samples


def assert_same(stored: ClassifierSample, original: ClassifierSample, dtype=np.float32) -> None:
    assert stored.sample_id == original.sample_id
    assert (stored.image, stored.text, stored.split, stored.source, stored.tags) == \
        (original.image, original.text, original.split, original.source, original.tags)
    for head in HEADS:
        np.testing.assert_array_equal(stored.logits[head],
                                      original.logits[head].astype(dtype).astype(np.float32))
        assert stored.label(head) == original.label(head)
    for part in FEATURES:
        np.testing.assert_array_equal(stored.features[part],
                                      original.features[part].astype(dtype).astype(np.float32))


def test_round_trip_two_segments(written):
    url, samples = written
    reader = ClassifierReader(url)
    assert len(reader.store.segments) == 2 and len(reader) == 8
    assert reader.heads == HEADS and reader.features == FEATURES
    for original in samples:
        assert_same(reader.sample(original.sample_id), original)
    assert_same(reader.sample(-1), samples[-1])
    for stored, original in zip(reader.iter_samples(), samples):
        assert_same(stored, original)
    validation = [s for s in samples if s.split == "validation"]
    assert [s.sample_id for s in reader.iter_samples("validation")] == \
        [s.sample_id for s in validation]
    arrays = reader.arrays("validation")
    assert arrays.sample_ids == [s.sample_id for s in validation]
    assert arrays.images == [s.image for s in validation] and set(arrays.splits) == {"validation"}
    np.testing.assert_array_equal(arrays.logits["location"],
                                  np.stack([s.logits["location"] for s in validation]))
    np.testing.assert_array_equal(arrays.features["fused"],
                                  np.stack([s.features["fused"] for s in validation]))
    assert arrays.labels["location"].dtype == np.int32
    assert arrays.labels["location"].tolist() == [s.label("location") for s in validation]
    assert reader.split_counts() == {"train": 6, "validation": 2}
    with pytest.raises(UnknownSampleError, match="split 'test'"):
        reader.arrays("test")


def test_manifest_records_and_settings_of_a_classifier_store(written):
    url, _ = written
    manifest = json.loads((Path(url) / "manifest.json").read_text())
    assert manifest["format_version"] == "2.3"
    assert manifest["counts"]["samples"] == 8 and manifest["counts"]["tokens"] == 0
    assert manifest["settings"] == {"kind": "classifier", "heads": HEADS, "features": FEATURES,
                                    "logits_encoding": "f32", "features_encoding": "f32",
                                    "segment_samples": 5, "chunk_samples": 2, "signals": {}}
    records = sorted((Path(url) / "parts" / "part-00000" / "records").glob("*.json"))
    assert [json.loads(r.read_text())["format_version"] for r in records] == ["2.3", "2.3"]
    assert json.loads((Path(url) / "parts/part-00000/head.json").read_text())[
        "format_version"] == "2.3"


def test_parts_of_several_writers_and_a_resumed_part(tmp_path):
    """The commit machinery of every store: two parts consolidated by `commit_store`, one
    of them interrupted after its first segment and resumed after its committed samples."""
    from logitstore.commit import commit_store

    samples = make_classifier_samples(12, seed=2)
    url = str(tmp_path / "parts")
    with StoreWriter(url, classifier_settings(), part="a", commit_store=False) as writer:
        writer.add_many(samples[:4])
    writer = StoreWriter(url, classifier_settings(), part="b", commit_store=False)
    writer.add_many(samples[4:11])  # one segment of 5 committed, 2 buffered
    writer.abort()
    writer = StoreWriter(url, classifier_settings(), part="b", commit_store=False)
    assert writer.committed_count == 5
    writer.add_many(samples[4 + writer.committed_count:])
    writer.close()
    commit_store(url)
    reader = ClassifierReader(url)
    assert reader.sample_ids == [s.sample_id for s in samples]
    for stored, original in zip(reader.iter_samples(), samples):
        assert_same(stored, original)
    assert verify_store(url) == []


def test_float16_encodings_store_the_rounded_values(tmp_path):
    samples = make_classifier_samples(3, seed=4)
    url = write(tmp_path / "f16", samples, classifier_settings(logits_encoding="f16",
                                                               features_encoding="f16"))
    reader = ClassifierReader(url)
    for original in samples:
        assert_same(reader.sample(original.sample_id), original, dtype=np.float16)
    assert verify_store(url) == []


def run(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_cli_info_verify_cp_show(written, tmp_path):
    url, samples = written
    out = run("info", url)
    assert out.exit_code == 0, out.output
    for text in ("kind         classifier", "modality (5 classes)", "location (12 classes)",
                 "image_cls (16)", "train 6, validation 2", "8 samples", "heads/modality/logits",
                 "labels/location"):
        assert text in out.output
    data = json.loads(run("info", url, "--json").output)
    assert data["settings"]["kind"] == "classifier"
    assert data["sizes"]["arrays"]["features/fused"]["bytes"] > 0
    assert run("verify", url).exit_code == 0
    copy = str(tmp_path / "copy")
    out = run("cp", url, copy)
    assert out.exit_code == 0 and "verified" in out.output
    assert_same(ClassifierReader(copy).sample(samples[3].sample_id), samples[3])
    shown = json.loads(run("show", copy, "--index", "3", "--json").output)
    assert shown["sample_id"] == samples[3].sample_id and shown["image"] == samples[3].image
    assert shown["labels"] == {h: samples[3].label(h) for h in HEADS}
    np.testing.assert_allclose(shown["logits"]["modality"], samples[3].logits["modality"],
                               atol=1e-5)
    out = run("show", url, samples[1].sample_id)
    assert out.exit_code == 0 and f"head location: label {samples[1].label('location')}" in \
        out.output and "feature fused: dim 8" in out.output
    missing = run("show", url, "no-such-id")
    assert missing.exit_code == 1 and "no-such-id" in missing.output


def test_verify_names_a_flipped_byte(written, tmp_path):
    url = shutil.copytree(written[0], tmp_path / "damaged")
    shard = sorted((url / "parts/part-00000/seg-000001/heads/location/logits/c").rglob("*"))[-1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    problems = verify_store(str(url))
    assert problems and all("heads/location/logits" in p for p in problems), problems
    out = run("verify", str(url))
    assert out.exit_code == 1 and "DAMAGED" in out.output


def _write_unchecked(monkeypatch, path, samples, encode_settings: StoreSettings) -> str:
    """A store whose writer skips the sample checks and encodes with `encode_settings`
    (what a buggy writer would do): its checksums hold, its content is wrong."""
    import logitstore.writer as writer_module

    monkeypatch.setattr(writer_module, "_CLASSIFIER_CODEC", (
        lambda sample, settings: None,
        lambda batch, settings: encode_classifier_segment(batch, encode_settings),
        lambda sample: 1))
    return write(path, samples)


def test_verify_catches_a_wrong_shape(monkeypatch, tmp_path):
    heads = {**HEADS, "modality": 6}
    url = _write_unchecked(monkeypatch, tmp_path / "shape", make_classifier_samples(3, heads=heads),
                           classifier_settings(heads=heads))
    problems = verify_store(url)
    assert any("heads/modality/logits: shape (3, 6), expected (3, 5)" in p for p in problems), \
        problems


def test_verify_catches_labels_out_of_range(monkeypatch, tmp_path):
    samples = make_classifier_samples(3)
    samples[1].labels["location"] = 12
    url = _write_unchecked(monkeypatch, tmp_path / "labels", samples, classifier_settings())
    problems = verify_store(url)
    assert len(problems) == 1 and "labels/location: label 12" in problems[0] and \
        "outside -1..11" in problems[0], problems


@pytest.mark.parametrize("change, message", [
    (lambda s: s.logits.pop("location"), r"heads \['modality'\] != the store's"),
    (lambda s: s.logits.update(modality=np.zeros(4)), r"head 'modality' logits .* shape \(5,\)"),
    (lambda s: s.features.update(fused=np.zeros(9)), r"feature part 'fused' .* shape \(8,\)"),
    (lambda s: s.logits["location"].__setitem__(3, np.nan), "NaN or inf at index 3"),
    (lambda s: s.labels.update(modality=5), r"label 5 of head 'modality' .* 0\.\.4"),
    (lambda s: s.labels.update(organ=1), r"labels of \['organ'\], which are not heads"),
    (lambda s: s.tags.update(image="x"), r"tag names \['image'\] are reserved"),
])
def test_samples_not_matching_the_settings_are_refused_before_writing(tmp_path, change, message):
    samples = make_classifier_samples(2)
    change(samples[1])
    writer = StoreWriter(str(tmp_path / "s"), classifier_settings())
    writer.add(samples[0])
    with pytest.raises(SchemaMismatchError, match=message):
        writer.add(samples[1])
    writer.abort()
    assert not (tmp_path / "s" / "parts" / "part-00000" / "seg-000000").exists()


def test_float16_range_is_checked(tmp_path):
    sample = make_classifier_samples(1)[0]
    sample.logits["modality"][0] = 1e5
    writer = StoreWriter(str(tmp_path / "s"), classifier_settings(logits_encoding="f16"))
    with pytest.raises(SchemaMismatchError, match="beyond float16's range .* encoding f32"):
        writer.add(sample)


@pytest.mark.parametrize("overrides, message", [
    (dict(heads={}), "needs >= 1 head"),
    (dict(heads={"a/b": 3}), "head name 'a/b'"),
    (dict(features={"fused": 0}), "feature part 'fused' needs a size >= 1"),
    (dict(logits_encoding="q8"), "logits_encoding must be one of"),
    (dict(vocab_size=100), "vocab_size is a key of causal-lm stores"),
    (dict(signals={"t": make_signal()}), "per-token signals of causal-lm stores"),
    (dict(kind="regression"), "kind must be one of"),
])
def test_invalid_classifier_settings(tmp_path, overrides, message):
    with pytest.raises(SettingsMismatchError, match=message):
        StoreWriter(str(tmp_path / "s"), classifier_settings(**overrides))


def test_causal_lm_settings_refuse_classifier_keys(tmp_path):
    with pytest.raises(SettingsMismatchError, match="heads is a key of classifier stores"):
        StoreWriter(str(tmp_path / "s"), make_settings(heads={"a": 2}))


def test_writing_into_a_store_with_other_heads_is_refused(written, tmp_path):
    url = shutil.copytree(written[0], tmp_path / "other")
    other = classifier_settings(heads={**HEADS, "modality": 4})
    with pytest.raises(SettingsMismatchError, match="heads.modality: store has 5, writer has 4"):
        StoreWriter(str(url), other, part="part-00001")


def test_causal_lm_api_refuses_a_classifier_store(written, tmp_path):
    url, samples = written
    reader = StoreReader(url)
    assert reader.kind == "classifier"
    for read in (lambda: reader.sample(0), lambda: reader.read_segment(0),
                 lambda: next(reader.iter_samples())):
        with pytest.raises(StoreKindError, match="is a classifier store, but StoreReader"
                                                 r"\.\w+ works on causal-lm stores only; use "
                                                 "logitstore.classifier_reader.ClassifierReader"):
            read()
    with pytest.raises(StoreKindError, match="classifier store"):
        SignalAppender(url, "extra", make_signal())
    token_sample = make_samples(1, 0, make_settings())[0]
    writer = StoreWriter(str(tmp_path / "c"), classifier_settings())
    with pytest.raises(StoreKindError, match="takes ClassifierSample .* found Sample"):
        writer.add(token_sample)
    writer.abort()
    writer = StoreWriter(str(tmp_path / "t"), make_settings())
    with pytest.raises(StoreKindError, match="takes tokenised samples .* found ClassifierSample"):
        writer.add(samples[0])
    writer.abort()


def test_old_and_causal_lm_stores_read_unchanged(tmp_path):
    old = StoreReader(str(OLD_STORE))  # written by the release of format 1.1
    assert old.kind == "causal-lm" and "kind" not in old.manifest["settings"]
    assert len(old.sample(0).input_ids) >= 1
    with pytest.raises(StoreKindError, match="is a causal-lm store, but ClassifierReader"):
        ClassifierReader(str(OLD_STORE))
    settings = make_settings()
    url = tmp_path / "lm"
    write(url, make_samples(4, 1, settings), settings)
    manifest = json.loads((url / "manifest.json").read_text())
    # this release writes a causal-lm store exactly as 2.2 did: version and settings keys
    assert manifest["format_version"] == "2.2"
    assert list(settings.to_json()) == ["vocab_size", "tokenizer_fingerprint", "signals",
                                        "tokenizer_name", "chunk_tokens", "segment_tokens",
                                        "chunk_samples"]
    assert StoreReader(str(url)).kind == "causal-lm"
    assert StoreSettings.from_json({**manifest["settings"], "kind": "causal-lm"}) == settings
    assert replace(settings, kind="causal-lm").to_json() == manifest["settings"]


def test_sample_ids_are_stable_and_unambiguous():
    assert classifier_sample_id(b"ab", "c") == classifier_sample_id(b"ab", "c")
    assert classifier_sample_id(b"ab", "c") != classifier_sample_id(b"a", "bc")
    assert classifier_sample_id(None, "x") == classifier_sample_id(b"", "x")
    assert len(classifier_sample_id(b"\x00", "")) == 64
