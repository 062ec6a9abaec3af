"""distill-eval --task classify on tiny classifiers: a student trained 4 steps from a store of the
teacher, the teacher and a random baseline, scored on the synthetic set; its metrics equal a
direct computation with classify_metrics on the models' logits; bad inputs exit 1 before any
model loads; settings of the other task are refused."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

torch = pytest.importorskip("torch")

from eval.cli import distill_eval  # noqa: E402
from logitstore.toolkit.classifier_adapter import image_processor_for  # noqa: E402
from logitstore.toolkit.classify_metrics import (RESOLVED_AT, classifier_metrics,  # noqa: E402
                                                 paired_differences)
from logitstore.toolkit.synthetic_classify import generate  # noqa: E402
from test_classifier_models import BERT, VIT, make_wordpiece_tokenizer, tiny_model  # noqa: E402

OPTIONS = {"bootstrap": 50, "seed": 3, "ece_bins": 10}
FLAGS = ["--task", "classify", "--device", "cpu", "--no-progress", "--batch-size", "7",
         "--bootstrap", "50", "--seed", "3", "--ece-bins", "10"]


def _save(model, directory, tokenizer_from=None):
    model.save_pretrained(directory)
    image_processor_for(model.config).save_pretrained(directory)
    if tokenizer_from is None:
        make_wordpiece_tokenizer(directory)
    else:
        for path in tokenizer_from.iterdir():
            if "token" in path.name or path.name == "vocab.txt":
                shutil.copy(path, directory / path.name)
    return directory


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from student_train.cli import main as student_train
    from teacher_dump.cli import teacher_dump

    root = tmp_path_factory.mktemp("eval_classify")
    generate(root / "data", samples=200, seed=1, image_size=32)
    teacher = _save(tiny_model(seed=0), root / "teacher")
    baseline = _save(tiny_model(seed=7), root / "baseline", tokenizer_from=teacher)
    store = root / "store"
    data = ",".join(str(root / "data" / f"{s}.jsonl") for s in ("train", "val"))
    dumped = CliRunner().invoke(teacher_dump, ["--task", "classify", "--device", "cpu",
                                               "--no-progress", "--model", str(teacher),
                                               "--data", data, "--out", str(store)])
    assert dumped.exit_code == 0, dumped.output
    student_yaml = root / "student.yaml"
    student_yaml.write_text(yaml.safe_dump({
        "vision_config": VIT, "text_config": BERT, "fusion_dim": 32, "fusion_layers": 1,
        "fusion_heads": 2, "tokenizer": str(teacher)}))
    trained = CliRunner().invoke(student_train, [
        "--task", "classify", "--store", str(store), "--student", str(student_yaml),
        "--out", str(root / "run"), "--batch-size", "16", "--max-steps", "4", "--eval-every",
        "4", "--kl-weight", "0.5", "--warmup-ratio", "0"], catch_exceptions=False)
    assert trained.exit_code == 0, trained.output
    # The test records plus two bad ones, which are skipped and reported by FILE:LINE.
    records = root / "data" / "test_with_bad.jsonl"
    good = (root / "data" / "test.jsonl").read_text().splitlines()
    records.write_text("\n".join(good + [
        json.dumps({"image": "images/nope.png", "text": "x", "labels": {"modality": 0,
                                                                        "location": 0}}),
        json.dumps({**json.loads(good[0]), "labels": {"modality": 99, "location": 0}})]) + "\n")
    return {"root": root, "teacher": teacher, "baseline": baseline, "store": store,
            "student": root / "run" / "final", "records": records, "good": len(good)}


def _roles(setup) -> list[str]:
    return ["--model", str(setup["student"]), "--teacher", str(setup["teacher"]),
            "--baseline", str(setup["baseline"])]


def _direct_logits(model_dir, records) -> dict[str, np.ndarray]:
    """{head: [N, C]}: the model run on all the records at once, outside distill-eval."""
    from transformers import AutoModel, AutoTokenizer

    from logitstore.toolkit.classifier_adapter import load_image_processor, preprocess_batch
    from logitstore.toolkit.classify_records import load_rgb

    model = AutoModel.from_pretrained(model_dir).eval()
    batch = preprocess_batch(images=[load_rgb(r.image_path) for r in records],
                             texts=[r.text for r in records],
                             image_processor=load_image_processor(model_dir),
                             tokenizer=AutoTokenizer.from_pretrained(model_dir), max_length=64)
    with torch.no_grad():
        return {h: v.numpy() for h, v in model(**batch).logits.items()}


@pytest.fixture(scope="module")
def data_run(setup):
    out = setup["root"] / "report"
    result = CliRunner().invoke(distill_eval, FLAGS + _roles(setup) + [
        "--data", str(setup["records"]), "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads((out / "report.json").read_text()), out


def _assert_close(found, expected):
    if isinstance(expected, dict):
        assert set(found) == set(expected)
        for key in expected:
            _assert_close(found[key], expected[key])
    elif isinstance(expected, list):
        assert len(found) == len(expected)
        for a, b in zip(found, expected):
            _assert_close(a, b)
    elif isinstance(expected, float):
        assert found == pytest.approx(expected, rel=1e-4, abs=1e-5)
    else:
        assert found == expected


def test_metrics_of_every_role_equal_a_direct_computation(setup, data_run):
    from logitstore.toolkit.classify_records import read_classify_records

    report, out = data_run
    records = read_classify_records(setup["records"], heads={"modality": 5, "location": 12})
    labels = {h: np.array([r.labels[h] for r in records.records]) for h in records.heads}
    logits = {role: _direct_logits(setup[role], records.records)
              for role in ("teacher", "student", "baseline")}
    assert list(report["results"]) == ["teacher", "student", "baseline"]
    for role, scores in logits.items():
        _assert_close(report["results"][role],
                      classifier_metrics(scores, labels, **OPTIONS).to_dict())
    expected = paired_differences(logits["student"], logits["baseline"], labels, **OPTIONS)
    _assert_close(report["comparison"]["student_vs_baseline"], expected.to_dict())
    assert report["comparison"]["student_vs_teacher"]["mean_macro_f1"] is not None
    assert report["data"]["samples"] == setup["good"] and report["data"]["records_skipped"] == 2
    assert [p.split(": ")[0] for p in report["data"]["problems"]] == [
        f"{setup['records']}:{setup['good'] + 1}", f"{setup['records']}:{setup['good'] + 2}"]
    for name in ("report.md", "report.png", "config.yaml"):
        assert (out / name).stat().st_size > 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config == report["config"] and config["task"] == "classify"
    assert "tasks" not in config and config["bootstrap"] == 50
    assert "test_with_bad.jsonl:" in (out / "report.md").read_text()


def test_paired_differences_are_resolved_exactly_beyond_two_standard_errors(data_run):
    report, _ = data_run
    checked = 0
    for pair in ("student_vs_baseline", "student_vs_teacher"):
        entry = report["comparison"][pair]
        diffs = [entry["mean_macro_f1"]] + [d for h in entry["heads"].values()
                                            for d in h.values()]
        for diff in diffs:
            assert diff["stderr"] is not None and diff["n"] > 1
            assert diff["resolved"] == (abs(diff["value"]) > RESOLVED_AT * diff["stderr"])
            checked += 1
    assert checked == 2 * (1 + 2 * 4)
    resolved = sum(1 for s in report["findings"] if "student is" in s)
    assert resolved == sum(d["resolved"] for pair in report["comparison"].values()
                           for d in [pair["mean_macro_f1"]] + [
                               x for h in pair["heads"].values() for x in h.values()])


def test_a_store_split_is_scored_with_its_labels(setup):
    from logitstore.classifier_reader import ClassifierReader

    out = setup["root"] / "store_report"
    result = CliRunner().invoke(distill_eval, FLAGS + [
        "--model", str(setup["student"]), "--teacher", str(setup["teacher"]),
        "--store", str(setup["store"]), "--split", "val", "--out", str(out)],
        catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    arrays = ClassifierReader(str(setup["store"])).arrays("val")
    assert report["data"]["split"] == "val" and report["data"]["samples"] == len(arrays.sample_ids)
    # The teacher scored now equals the teacher the store recorded (f32 logits).
    stored = classifier_metrics(arrays.logits, arrays.labels, **OPTIONS).to_dict()
    _assert_close(report["results"]["teacher"], stored)
    assert report["comparison"]["student_vs_baseline"] is None


def _refused(args, *needles):
    result = CliRunner().invoke(distill_eval, args)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.output, result.output
    return result.output


def test_bad_inputs_exit_1_before_any_model_loads(setup, monkeypatch, tmp_path):
    import eval.classify_models as models

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "load_classifier", no_load)
    monkeypatch.setattr("eval.classify_runner.load_classifier", no_load)
    base = FLAGS + ["--model", str(setup["student"]), "--out", str(tmp_path / "o")]
    _refused(base + ["--data", str(tmp_path / "missing.jsonl")], "no such file")
    _refused(base, "--data", "--store", "neither")
    _refused(base + ["--data", str(setup["records"]), "--store", str(setup["store"])], "both")
    _refused(base + ["--store", str(setup["store"]), "--split", "nope"], "--split nope")
    other_heads = _save(tiny_model(seed=1, heads={"label": 3}), tmp_path / "other",
                        tokenizer_from=setup["teacher"])
    _refused(base + ["--data", str(setup["records"]), "--baseline", str(other_heads)],
             "same heads", "'label': 3")
    bad = tmp_path / "test.jsonl"
    bad.write_text('{"image": "x.png", "text": "t", "labels": {"modality": 0, "location": 0}}\n'
                   "not json\n")
    _refused(base + ["--data", str(bad)], f"{bad}:1", f"{bad}:2")
    encoder = tmp_path / "encoder"
    encoder.mkdir()
    (encoder / "config.json").write_text(json.dumps({**BERT, "architectures": ["BertModel"]}))
    _refused(base + ["--data", str(setup["records"]), "--teacher", str(encoder)],
             "not a classifier")
    assert not (tmp_path / "o").exists()


def test_settings_of_the_other_task_are_refused(setup, tmp_path):
    base = ["--model", str(setup["student"]), "--out", str(tmp_path / "o")]
    output = _refused(FLAGS + base + ["--data", str(setup["records"]), "--tasks", "local",
                                      "--ppl-data", "x.jsonl", "--quantize", "4bit"],
                      "tasks (command line)", "ppl_data", "quantize", "--task causal-lm")
    assert "Traceback" not in output
    _refused(base + ["--data", str(setup["records"]), "--bootstrap", "5"],
             "data (command line)", "bootstrap", "--task classify")
    assert not (tmp_path / "o").exists()


def test_a_clear_difference_is_resolved_and_stated(tmp_path):
    from eval.classify_report import build_classify_report, write_classify_report

    rng = np.random.default_rng(0)
    labels = {"modality": rng.integers(0, 5, 200), "location": rng.integers(0, 12, 200)}
    good = {h: 4.0 * np.eye(c)[labels[h]] + rng.normal(size=(200, c))
            for h, c in (("modality", 5), ("location", 12))}
    noise = {h: rng.normal(size=v.shape) for h, v in good.items()}
    report = build_classify_report({"student": good, "baseline": noise}, labels, models={},
                                   heads={"modality": 5, "location": 12},
                                   data={"sources": {"d.jsonl": {}}, "samples": 200,
                                         "records_skipped": 0, "problems": []},
                                   config={"task": "classify"}, options=OPTIONS)
    mean = report["comparison"]["student_vs_baseline"]["mean_macro_f1"]
    assert mean["resolved"] and mean["better"] == "a" and mean["value"] > 0.5
    assert report["comparison"]["student_vs_teacher"] is None
    assert any("better than the baseline on all heads mean macro-F1" in s
               for s in report["findings"])
    paths = write_classify_report(report, tmp_path)
    assert "**✓**" in paths["report.md"].read_text()
