"""The bundled classifier preset (configs/image-text-classifier-kd.yaml) resolves for every
tool it names, with the classify task and the seed's KD settings."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NAME = "image-text-classifier-kd"


def test_the_classifier_preset_resolves_for_each_tool(tmp_path):
    from eval.config import resolve_config as eval_config
    from student_train.config import resolve_config as train_config
    from teacher_dump.config import resolve_config as dump_config

    path = REPO / "configs" / f"{NAME}.yaml"
    text = path.read_text(encoding="utf-8")
    for command in ("teacher-dump", "student-train", "student-train sweep", "distill-eval"):
        assert f"# {command} --config configs/{NAME}.yaml" in text, command
    records = tmp_path / "records.jsonl"
    records.write_text("", encoding="utf-8")
    dump = dump_config(NAME, {"model": "t", "data": [str(records)], "out": str(tmp_path / "s")})
    train = train_config(NAME, {"store": "s", "student": "s.yaml", "out": str(tmp_path / "r")})
    evaluation = eval_config(NAME, {"model": "m", "store": "s", "out": str(tmp_path / "e")})
    assert dump.task == train.task == evaluation.task == "classify"
    assert (train.kl_weight, train.temperature, evaluation.split) == (0.518, 3.19, "test")
    assert dump.logits_encoding == "f32" and train.crd_weight > 0 and train.mse_weight > 0
