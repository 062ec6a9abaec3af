"""student-train --task classify (student_train/classify_train.py) end to end, on tiny models.

The store is written directly (StoreWriter + ClassifierSample) from a tiny random
ImageTextClassifier teacher on 80 synthetic 32x32 images with short texts: 64 train, 16 val.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image
from store_helpers import make_samples, make_settings
from test_classifier_models import make_wordpiece_tokenizer

from logitstore.classifier_sample import ClassifierSample
from logitstore.errors import LogitStoreError
from logitstore.format import StoreSettings
from logitstore.writer import StoreWriter
from student_train.cli import main

HEADS = {"location": 3, "modality": 4}
VIT = dict(model_type="vit", image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
           num_attention_heads=2, intermediate_size=64)
BERT = dict(model_type="bert", vocab_size=200, hidden_size=32, num_hidden_layers=1,
            num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
WORDS = ["scan", "chest", "head", "left", "right", "lung", "bone", "the", "of", "shows"]
TERMS = ("ce", "kl", "mse", "cos", "crd")


def _images_and_texts(root, n: int, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    (root / "images").mkdir()
    images, texts = [], []
    for i in range(n):
        pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{i:03d}.png")
        images.append(f"images/{i:03d}.png")  # relative: read from --data-root
        texts.append(" ".join(rng.choice(WORDS, size=5)))
    return images, texts


def _teacher_signals(data_root, images, texts, tokenizer):
    """Logits and features of a tiny random ImageTextClassifier teacher."""
    from logitstore.toolkit.classifier_adapter import image_processor_for, preprocess_batch
    from logitstore.toolkit.classifier_models import (ImageTextClassifier,
                                                      ImageTextClassifierConfig)

    torch.manual_seed(1)
    config = ImageTextClassifierConfig(vision_config=VIT, text_config=BERT, heads=HEADS,
                                       fusion_dim=48, fusion_layers=1, fusion_heads=4)
    teacher = ImageTextClassifier(config).eval()
    batch = preprocess_batch(images=[Image.open(data_root / p) for p in images], texts=texts,
                             image_processor=image_processor_for(config), tokenizer=tokenizer)
    with torch.no_grad():
        out = teacher(**batch)
    return out.logits, out.features


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(store URL, data root, student config path, tokenizer)."""
    root = tmp_path_factory.mktemp("classify")
    tokenizer = make_wordpiece_tokenizer(root / "tokenizer")
    rng = np.random.default_rng(0)
    images, texts = _images_and_texts(root, 80, rng)
    logits, features = _teacher_signals(root, images, texts, tokenizer)
    parts = ("image_cls", "text_cls", "fused")
    settings = StoreSettings(kind="classifier", heads=HEADS,
                             features={p: features[p].shape[1] for p in parts},
                             logits_encoding="f32")
    store = str(root / "store")
    with StoreWriter(store, settings) as writer:
        for i in range(80):
            labels = {h: int(rng.integers(0, c)) for h, c in HEADS.items()}
            if i == 70:
                labels["location"] = -1  # one unlabelled eval sample
            writer.add(ClassifierSample(
                sample_id=f"s{i:03d}", image=images[i], text=texts[i],
                split="train" if i < 64 else "val", labels=labels,
                logits={h: logits[h][i].numpy() for h in HEADS},
                features={p: features[p][i].numpy() for p in parts}))
    student = root / "student.yaml"
    student.write_text(yaml.safe_dump({
        "vision_config": VIT, "text_config": BERT, "fusion_dim": 32, "fusion_layers": 1,
        "fusion_heads": 2, "dropout": 0.1, "tokenizer": "tokenizer"}), encoding="utf-8")
    return store, root, student


def train(setup, out, *extra):
    store, root, student = setup
    args = ["--task", "classify", "--store", store, "--student", str(student), "--out", str(out),
            "--data-root", str(root), "--batch-size", "16", "--lr", "1e-3", "--log-every", "1",
            "--warmup-ratio", "0", *extra]
    return CliRunner().invoke(main, args, catch_exceptions=False)


def records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


ALL_TERMS = ("--ce-weight", "1", "--kl-weight", "0.5", "--temperature", "2", "--mse-weight", "1",
             "--cos-weight", "1", "--crd-weight", "0.5", "--crd-k", "16", "--crd-embed-dim", "8")


@pytest.fixture(scope="module")
def full_run(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    result = train(setup, out, *ALL_TERMS, "--max-steps", "6", "--eval-every", "3",
                   "--save-every", "3")
    assert result.exit_code == 0, result.output
    return out


def test_end_to_end_final_loads_and_gives_the_saved_metrics(setup, full_run):
    from transformers import AutoModel

    from logitstore.classifier_reader import ClassifierReader
    from student_train.classify_data import load_split, make_batch
    from student_train.classify_student import load_classify_student
    from student_train.classify_train import evaluate

    store, root, _ = setup
    meta = json.loads((full_run / "training_metadata.json").read_text())
    assert meta["steps"] == 6 and meta["task"] == "classify"
    final = meta["final_metrics"]
    assert 0 <= final["eval/macro_f1"] <= 1 and "eval/location/ece" in final
    model = AutoModel.from_pretrained(str(full_run / "final")).eval()
    student = load_classify_student(str(full_run / "final"), HEADS)
    assert student.tokenizer is not None and student.image_processor is not None
    student.model = model
    val = load_split(ClassifierReader(store), "val", root)
    assert evaluate(student, val, batch_size=16) == pytest.approx(final, abs=1e-6)
    batch = make_batch(val, torch.arange(4), student)
    assert set(model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                     attention_mask=batch["attention_mask"]).logits) == set(HEADS)
    assert (full_run / "best" / "config.json").is_file()
    evals = [r for r in records(full_run) if "eval/macro_f1" in r]
    assert [r["step"] for r in evals] == [3, 6]


def test_every_active_term_is_logged(full_run):
    train_records = [r for r in records(full_run) if "train/loss" in r]
    assert len(train_records) == 6
    for term in TERMS:
        assert all(np.isfinite(r[f"train/{term}"]) for r in train_records), term
    assert "train/ce/modality" in train_records[0] and "train/mse/image_cls" in train_records[0]


@pytest.mark.parametrize("term", TERMS)
def test_a_term_appears_only_with_its_weight(setup, tmp_path, term):
    weights = ["--ce-weight", "0"] * (term != "ce") + [f"--{term}-weight", "1", "--crd-k", "8"]
    result = train(setup, tmp_path / "run", *weights, "--max-steps", "1", "--save-every", "0")
    assert result.exit_code == 0, result.output
    logged = [r for r in records(tmp_path / "run") if "train/loss" in r][0]
    assert {t for t in TERMS if f"train/{t}" in logged} == {term}


def _student_tensors(directory):
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


def test_resume_reproduces_the_uninterrupted_run(setup, full_run, tmp_path):
    import shutil

    # The run as stopped after step 3: its directory holds only what existed then.
    stopped = tmp_path / "run"
    shutil.copytree(full_run, stopped, ignore=shutil.ignore_patterns("final", "step-00000006"))
    ckpt = stopped / "checkpoints" / "step-00000003"
    result = train(setup, stopped, *ALL_TERMS, "--max-steps", "6", "--eval-every", "3",
                   "--save-every", "3", "--resume", str(ckpt))
    assert result.exit_code == 0, result.output
    want, got = _student_tensors(full_run / "final"), _student_tensors(stopped / "final")
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    from safetensors.torch import load_file
    a = load_file(str(full_run / "checkpoints" / "step-00000006" / "objective.safetensors"))
    b = load_file(str(stopped / "checkpoints" / "step-00000006" / "objective.safetensors"))
    assert any(k.startswith("crd.") for k in a) and any(k.startswith("projections.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    meta = json.loads((stopped / "training_metadata.json").read_text())
    assert meta["final_metrics"] == json.loads(
        (full_run / "training_metadata.json").read_text())["final_metrics"]
    assert records(stopped) == records(full_run)  # records after step 3 dropped, then redone


def test_early_stopping_keeps_the_best_student(setup, tmp_path):
    out = tmp_path / "run"
    result = train(setup, out, "--max-steps", "12", "--eval-every", "1", "--patience", "1",
                   "--save-every", "0", "--lr", "3e-3")
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "training_metadata.json").read_text())
    evals = [(r["step"], r["eval/macro_f1"]) for r in records(out) if "eval/macro_f1" in r]
    best_step, best = max(evals, key=lambda e: (e[1], -e[0]))  # the first of the best
    # Patience 1 with an eval every step: training stops at the first eval that is not a
    # new best (if one comes before max_steps).
    assert meta["steps"] == evals[-1][0] == (best_step + 1 if meta["stopped_early"] else 12)
    assert meta["best_step"] == best_step and meta["final_metrics"]["eval/macro_f1"] == best
    assert _student_tensors(out / "final").keys() == _student_tensors(out / "best").keys()
    assert all(torch.equal(v, _student_tensors(out / "best")[k])
               for k, v in _student_tensors(out / "final").items())


def test_heads_mismatch_is_refused_before_training(setup, tmp_path):
    _, root, student = setup
    config = yaml.safe_load(student.read_text())
    config.update(heads={"modality": 4, "location": 5}, tokenizer=str(root / "tokenizer"))
    other = tmp_path / "student.yaml"
    other.write_text(yaml.safe_dump(config))
    result = train((setup[0], root, other), tmp_path / "run", "--max-steps", "1")
    assert result.exit_code == 1
    assert "heads" in result.output and "'location': 3" in result.output
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_causal_lm_store_is_refused_clearly(setup, tmp_path):
    settings = make_settings()
    with StoreWriter(str(tmp_path / "lm"), settings) as writer:
        for sample in make_samples(3, settings=settings):
            writer.add(sample)
    result = train((str(tmp_path / "lm"), setup[1], setup[2]), tmp_path / "run",
                   "--max-steps", "1")
    assert result.exit_code == 1
    assert "not a classifier store" in result.output and "--task" in result.output


def test_causal_settings_and_missing_images_are_refused(setup, tmp_path):
    result = train(setup, tmp_path / "run", "--max-steps", "1", "--eval-fraction", "0.1",
                   "--grad-accum", "2")
    assert result.exit_code == 1
    assert "eval_fraction" in result.output and "grad_accum" in result.output
    store, _, student = setup
    result = train((store, tmp_path, student), tmp_path / "run2", "--max-steps", "1")
    assert result.exit_code == 1 and "images are missing" in result.output


def test_a_sweep_trial_reads_the_classifier_store(setup, tmp_path):
    # One trial (a child process) of `student-train sweep` on eval/macro_f1, maximised.
    store, root, student = setup
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"kl_weight": {"type": "float", "low": 0.0, "high": 1.0}}))
    result = CliRunner().invoke(main, [
        "sweep", "--space", str(space), "--trials", "1", "--out", str(tmp_path / "sweep"),
        "--metric", "eval_macro_f1", "--direction", "maximize", "--task", "classify",
        "--store", store, "--student", str(student), "--data-root", str(root),
        "--batch-size", "16", "--max-steps", "2", "--eval-every", "1", "--eval-split", "val",
        "--save-every", "0"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    trial = yaml.safe_load((tmp_path / "sweep" / "best.yaml").read_text())["train"]
    assert trial["task"] == "classify" and 0 <= trial["kl_weight"] <= 1
    run = tmp_path / "sweep" / "trials" / "000" / "run"
    final = json.loads((run / "training_metadata.json").read_text())["final_metrics"]
    assert f"{final['eval/macro_f1']:.6g}" in (tmp_path / "sweep" / "trials.csv").read_text()


def test_a_saved_student_directory_trains_further(setup, full_run, tmp_path):
    store, root, _ = setup
    result = train((store, root, full_run / "final"), tmp_path / "run", "--max-steps", "1",
                   "--save-every", "0", "--eval-split", "val")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "training_metadata.json").read_text())["student"] \
        == str(full_run / "final")


def test_relative_images_are_read_from_the_data_root(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from student_train.classify_data import resolve_data_root

    def reader(extra):
        return SimpleNamespace(store=SimpleNamespace(manifest={"extra": extra}))

    monkeypatch.chdir(tmp_path)
    assert resolve_data_root("/given", reader({"data_root": "/recorded"})) == Path("/given")
    assert resolve_data_root(None, reader({"data_root": "/recorded"})) == Path("/recorded")
    assert resolve_data_root(None, reader(None)) is None


def test_the_causal_loop_refuses_a_classifier_store(setup, tmp_path):
    from student_train.config import resolve_config
    from student_train.sources import check_inputs

    cfg = resolve_config(None, {"store": setup[0], "student": "qwen2-0.5b",
                                "out": str(tmp_path / "run")})
    with pytest.raises(LogitStoreError, match="--task classify"):
        check_inputs(cfg)
