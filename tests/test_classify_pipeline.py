"""The classifier path end to end through the real commands: synthetic image+text data ->
`teacher-dump --task classify` -> `logitstore verify` -> `student-train --task classify` on that
store (images found from the sample sources the dump recorded, no --data-root) -> the student
loads with AutoModel and scores the validation split as its run says."""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner

torch = pytest.importorskip("torch")

from logitstore.cli import main as logitstore_main  # noqa: E402
from logitstore.toolkit.classifier_adapter import image_processor_for  # noqa: E402
from logitstore.toolkit.synthetic_classify import generate  # noqa: E402
from student_train.cli import main as student_train  # noqa: E402
from teacher_dump.cli import teacher_dump  # noqa: E402
from test_classifier_models import BERT, VIT, make_wordpiece_tokenizer, tiny_model  # noqa: E402


def test_dump_then_train_a_student_from_the_store(tmp_path, monkeypatch):
    generate(tmp_path / "data", samples=60, seed=1, image_size=32)
    teacher = tiny_model()
    teacher.save_pretrained(tmp_path / "teacher")
    image_processor_for(teacher.config).save_pretrained(tmp_path / "teacher")
    make_wordpiece_tokenizer(tmp_path / "teacher")
    store = tmp_path / "store"
    data = [str(tmp_path / "data" / f"{s}.jsonl") for s in ("train", "val")]
    dumped = CliRunner().invoke(teacher_dump, [
        "--task", "classify", "--device", "cpu", "--no-progress", "--model",
        str(tmp_path / "teacher"), "--data", ",".join(data), "--out", str(store)])
    assert dumped.exit_code == 0, dumped.output
    verified = CliRunner().invoke(logitstore_main, ["verify", str(store)])
    assert verified.exit_code == 0, verified.output

    student = tmp_path / "student.yaml"
    student.write_text(yaml.safe_dump({
        "vision_config": VIT, "text_config": BERT, "fusion_dim": 32, "fusion_layers": 1,
        "fusion_heads": 2, "tokenizer": str(tmp_path / "teacher")}))
    monkeypatch.chdir(tmp_path / "teacher")  # not where the images are: sources must be used
    run = tmp_path / "run"
    trained = CliRunner().invoke(student_train, [
        "--task", "classify", "--store", str(store), "--student", str(student), "--out", str(run),
        "--batch-size", "16", "--max-steps", "4", "--eval-every", "2", "--kl-weight", "0.5",
        "--mse-weight", "1", "--warmup-ratio", "0"], catch_exceptions=False)
    assert trained.exit_code == 0, trained.output
    evals = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if "eval/macro_f1" in r]
    assert len(evals) == 2 and all(0 <= r["eval/macro_f1"] <= 1 for r in evals)
    assert {"train/kl", "train/mse"} <= set().union(*map(json.loads, (run / "metrics.jsonl")
                                                         .read_text().splitlines()))
    from transformers import AutoModel

    model = AutoModel.from_pretrained(run / "final")
    assert set(model.config.heads) == {"modality", "location"}
