"""teacher-dump --task classify end to end on a tiny ImageTextClassifier and a tiny BERT
classifier over the synthetic image+text set: what the store holds against a direct forward
of the model, bad records reported by file:line with the rest dumped, inputs refused before
the weights load, resume after a crash, and the causal-lm settings kept apart."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")

from logitstore.classifier_reader import ClassifierReader  # noqa: E402
from logitstore.classifier_sample import classifier_sample_id  # noqa: E402
from logitstore.cli import main as logitstore_main  # noqa: E402
from logitstore.errors import ConfigError  # noqa: E402
from logitstore.reader import StoreReader  # noqa: E402
from logitstore.toolkit.classifier_adapter import (  # noqa: E402
    image_processor_for, load_image_processor, preprocess_batch)
from logitstore.toolkit.classify_records import load_rgb  # noqa: E402
from logitstore.toolkit.synthetic_classify import generate  # noqa: E402
from logitstore.writer import StoreWriter  # noqa: E402
from store_helpers import make_samples, make_settings  # noqa: E402
from teacher_dump import classify_dump  # noqa: E402
from teacher_dump.cli import teacher_dump  # noqa: E402
from teacher_dump.config import CLASSIFY_ONLY, resolve_config  # noqa: E402
from test_classifier_models import BERT, make_wordpiece_tokenizer, tiny_model  # noqa: E402
from tiny_hf import make_tiny_llama, make_tokenizer  # noqa: E402

FAST = ["--task", "classify", "--device", "cpu", "--no-progress", "--batch-samples", "16"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """60 synthetic samples at 32x32 (48 train, 6 val, 6 test) and a saved composite."""
    root = tmp_path_factory.mktemp("classify_dump")
    generate(root / "data", samples=60, seed=0, image_size=32)
    model = tiny_model()
    model.save_pretrained(root / "model")
    image_processor_for(model.config).save_pretrained(root / "model")
    make_wordpiece_tokenizer(root / "model")
    return root


def dump(*args: str):
    return CliRunner().invoke(teacher_dump, [*FAST, *map(str, args)])


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def direct_forward(model_dir: Path, data: Path, rows: list[dict]) -> dict[str, np.ndarray]:
    """The model's head logits on `rows`, computed here without the dump's code."""
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(model_dir).eval()
    batch = preprocess_batch(images=[load_rgb(data.parent / r["image"]) for r in rows],
                             texts=[r["text"] for r in rows],
                             image_processor=load_image_processor(model_dir),
                             tokenizer=AutoTokenizer.from_pretrained(model_dir),
                             max_length=BERT["max_position_embeddings"])
    with torch.no_grad():
        out = model(**batch)
    return {h: v.numpy() for h, v in out.logits.items()}


def test_dump_matches_a_direct_forward_with_labels_ids_and_references(tiny, tmp_path):
    data = tiny / "data"
    out = tmp_path / "store"
    result = dump("--model", tiny / "model", "--data", data / "train.jsonl",
                  "--data", data / "test.jsonl", "--out", out)
    assert result.exit_code == 0, result.output
    assert "54 samples written" in result.output
    reader = ClassifierReader(str(out))
    assert reader.heads == {"location": 12, "modality": 5}
    assert set(reader.features) == {"image_cls", "image_proj", "text_cls", "text_proj", "fused"}
    assert reader.split_counts() == {"test": 6, "train": 48}
    for split, size in (("train", 48), ("test", 6)):
        rows = jsonl(data / f"{split}.jsonl")
        arrays = reader.arrays(split)
        assert len(arrays) == size
        by_id = {classifier_sample_id((data / r["image"]).read_bytes(), r["text"]): r
                 for r in rows}
        assert arrays.sample_ids == list(by_id)  # data order, content ids
        assert arrays.images == [r["image"] for r in rows]  # relative to the JSONL file
        assert arrays.texts == [r["text"] for r in rows]
        for head in ("modality", "location"):
            assert arrays.labels[head].tolist() == [r["labels"][head] for r in rows]
        want = direct_forward(tiny / "model", data / f"{split}.jsonl", rows)
        for head, logits in want.items():  # f32 logits: only batch-shape rounding differs
            np.testing.assert_allclose(arrays.logits[head], logits, rtol=0, atol=1e-5)
    stored = StoreReader(str(out))
    assert stored.index.column("source").to_pylist()[0] == str((data / "train.jsonl").resolve())
    extra = stored.manifest["extra"]
    assert extra["teacher_dump_config"]["task"] == "classify"
    assert not set(extra["teacher_dump_config"]) & {"top_k", "samples", "signal"}
    assert extra["teacher_dump_summary"]["samples_written"] == 54
    verified = CliRunner().invoke(logitstore_main, ["verify", str(out)])
    assert verified.exit_code == 0, verified.output
    again = dump("--model", tiny / "model", "--data", data / "train.jsonl",
                 "--data", data / "test.jsonl", "--out", out)  # finished: nothing to do
    assert again.exit_code == 0 and "0 samples written (54 already" in again.output


def test_bad_records_are_reported_by_file_and_line_and_the_rest_dumped(tiny, tmp_path, caplog):
    data = tmp_path / "data"
    shutil.copytree(tiny / "data", data)
    rows = jsonl(data / "val.jsonl")
    bad = [{**rows[0], "image": "images/missing.png"},
           {**rows[1], "labels": {**rows[1]["labels"], "modality": 9}}]
    lines = [json.dumps(r) for r in rows[2:]] + [json.dumps(r) for r in bad]
    (data / "val.jsonl").write_text("\n".join(lines) + "\n")
    (data / "test.jsonl").write_text(lines[0] + "\n")  # an input val.jsonl holds already
    out = tmp_path / "store"
    with caplog.at_level(logging.WARNING, logger="teacher_dump"):
        result = dump("--model", tiny / "model", "--data", data / "val.jsonl",
                      "--data", data / "test.jsonl", "--out", out)
    assert result.exit_code == 0, result.output
    assert "4 usable records, 3 skipped" in result.output
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped")]
    assert len(skipped) == 3
    assert f"{data / 'val.jsonl'}:5: image" in skipped[0] and "not found" in skipped[0]
    assert f"{data / 'val.jsonl'}:6: label 9 of head 'modality'" in skipped[1]
    assert f"{data / 'test.jsonl'}:1: same image and text as {data / 'val.jsonl'}:1" \
        in skipped[2]
    arrays = ClassifierReader(str(out)).arrays()
    assert arrays.texts == [r["text"] for r in rows[2:]] and set(arrays.splits) == {"val"}
    summary = StoreReader(str(out)).manifest["extra"]["teacher_dump_summary"]
    assert summary["records_skipped"] == 3


def _causal_store(path: Path) -> None:
    with StoreWriter(str(path), make_settings()) as writer:
        writer.add_many(make_samples(2))


@pytest.mark.parametrize("case", ["missing data", "causal lm", "unknown part", "causal option",
                                  "causal store", "no split"])
def test_bad_inputs_exit_1_in_one_paragraph_before_the_weights_load(tiny, tmp_path, monkeypatch,
                                                                    case):
    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(classify_dump, "load_classifier", never)
    data, model, extra = tiny / "data" / "val.jsonl", tiny / "model", []
    expected = {"missing data": "no such file", "causal lm": "is not a classifier",
                "unknown part": "unknown part(s) 'pixels'", "causal option": "top_k",
                "causal store": "kind causal-lm", "no split": "cannot tell its split"}[case]
    if case == "missing data":
        data = tmp_path / "absent.jsonl"
    elif case == "causal lm":
        model = make_tiny_llama(tmp_path / "llama", make_tokenizer(tmp_path / "tok"))
    elif case == "unknown part":
        extra = ["--features", "fused,pixels"]
    elif case == "causal option":
        extra = ["--top-k", "4"]
    elif case == "causal store":
        _causal_store(tmp_path / "store")
    else:
        data = tmp_path / "records.jsonl"
        shutil.copy(tiny / "data" / "val.jsonl", data)
    result = dump("--model", model, "--data", data, "--out", tmp_path / "store", *extra)
    assert result.exit_code == 1, result.output
    assert result.output.count("error:") == 1 and expected in result.output
    assert "Traceback" not in result.output


def test_a_crashed_dump_resumes_after_its_committed_segments(tiny, tmp_path, monkeypatch):
    data = tiny / "data" / "train.jsonl"
    overrides = {"task": "classify", "model": str(tiny / "model"), "data": [str(data)],
                 "device": "cpu", "batch_samples": "8", "segment_samples": "16"}
    calls = []
    real_forward = classify_dump.forward_batch

    def crash_on_fifth(*args):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("killed")
        return real_forward(*args)

    monkeypatch.setattr(classify_dump, "forward_batch", crash_on_fifth)
    crashed = resolve_config(None, {**overrides, "out": str(tmp_path / "crashed")})
    with pytest.raises(RuntimeError, match="killed"):
        classify_dump.run_classify_dump(crashed, progress=False)
    monkeypatch.setattr(classify_dump, "forward_batch", real_forward)
    report = classify_dump.run_classify_dump(crashed, progress=False)
    assert (report.samples_resumed, report.samples_written) == (32, 16)  # 2 segments kept
    clean = resolve_config(None, {**overrides, "out": str(tmp_path / "clean")})
    classify_dump.run_classify_dump(clean, progress=False)
    resumed, whole = (ClassifierReader(str(tmp_path / n)).arrays() for n in ("crashed", "clean"))
    assert resumed.sample_ids == whole.sample_ids
    for head in whole.logits:
        np.testing.assert_allclose(resumed.logits[head], whole.logits[head], atol=1e-5)
    changed = resolve_config(None, {**overrides, "out": str(tmp_path / "clean"),
                                    "logits_encoding": "f16"})
    with pytest.raises(Exception, match="logits_encoding: store has 'f32', now 'f16'"):
        classify_dump.run_classify_dump(changed, progress=False)


def test_a_text_only_classifier_names_its_head_and_stores_its_parts(tiny, tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(**{k: v for k, v in BERT.items() if k != "model_type"}, num_labels=5)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(tmp_path / "bert")
    make_wordpiece_tokenizer(tmp_path / "bert")
    out = tmp_path / "store"
    result = dump("--model", tmp_path / "bert", "--data", tiny / "data" / "val.jsonl",
                  "--out", out, "--head-name", "modality", "--features", "fused",
                  "--logits-encoding", "f16")
    assert result.exit_code == 0, result.output
    reader = ClassifierReader(str(out))
    assert (reader.heads, reader.features) == ({"modality": 5}, {"fused": 32})
    assert reader.settings.logits_encoding == "f16"
    rows = jsonl(tiny / "data" / "val.jsonl")
    assert reader.arrays("val").labels["modality"].tolist() == \
        [r["labels"]["modality"] for r in rows]


def test_each_task_refuses_the_other_tasks_settings_and_saves_only_its_own(tiny):
    with pytest.raises(ConfigError, match="features .command line.: a setting of --task classify"):
        resolve_config(None, {"model": "m", "data": [str(tiny / "data")], "out": "s",
                              "features": ["fused"]})
    causal = resolve_config(None, {"model": "m", "data": [str(tiny / "data")], "out": "s"})
    assert causal.task == "causal-lm" and not set(causal.as_dict()) & set(CLASSIFY_ONLY)
    assert causal.as_dict()["top_k"] == 0 and causal.as_dict()["signal"] == "m"


def test_a_causal_lm_dump_refuses_a_classifier_store(tiny, tmp_path):
    from logitstore.classifier_sample import ClassifierSample
    from logitstore.format import StoreSettings

    out = tmp_path / "store"
    settings = StoreSettings(kind="classifier", heads={"modality": 5})
    with StoreWriter(str(out), settings) as writer:
        writer.add(ClassifierSample("a" * 64, logits={"modality": np.zeros(5)}))
    model = make_tiny_llama(tmp_path / "llama", make_tokenizer(tmp_path / "tok"))
    (tmp_path / "t.jsonl").write_text(json.dumps({"text": "the patient is fine"}) + "\n")
    result = CliRunner().invoke(teacher_dump, ["--model", str(model), "--data",
                                               str(tmp_path / "t.jsonl"), "--out", str(out),
                                               "--device", "cpu", "--no-progress"])
    assert result.exit_code == 1, result.output
    assert "it is a store of kind classifier" in result.output
