"""student-train's command line and configuration: flags, presets, errors, --data mode."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from logitstore.errors import ConfigError, LogitStoreError
from student_train.cli import main
from student_train.config import FIELDS, resolve_config
from train_helpers import read_metrics, shared_world

BRIEF_FLAGS = """--store --data --student --out --config --signals --target --topk-mode --loss --alpha
--temperature --temperature-end --temperature-schedule --label-smoothing --hidden-weight
--attention-weight --layer-map --max-steps --epochs --batch-tokens --grad-accum --lr
--warmup-ratio --seed --save-every --eval-every --eval-fraction --eval-store --patience --resume
--lora-r --qlora --gradient-checkpointing --packing""".split()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return shared_world(tmp_path_factory)


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_help_lists_every_flag():
    result = invoke("--help")
    assert result.exit_code == 0
    for flag in BRIEF_FLAGS:
        assert flag in result.output, flag


def test_every_flag_is_a_config_key():
    # The flags are generated from config.FIELDS: one mechanism for YAML and the command line.
    flags = {p.name for p in main.params} - {"config_path"}
    assert flags == {name for name, f in FIELDS.items() if f.flag}


def test_bare_resume_means_latest():
    # --resume alone is --resume latest; a directory or `latest` still work as values.
    def resume(*args):
        ctx = main.make_context("student-train", list(args))
        return ctx.params["resume"], ctx.params["out"]

    assert resume("--resume", "--out", "r") == ("latest", "r")
    assert resume("--out", "r", "--resume") == ("latest", "r")
    assert resume("--resume", "run/checkpoint-20", "--out", "r") == ("run/checkpoint-20", "r")
    assert resume("--resume", "latest") == ("latest", None)
    assert resume("--out", "r") == (None, "r")
    cfg = resolve_config(None, {"store": "s", "student": "x", "out": "r",
                                "resume": resume("--resume")[0]})
    assert cfg.resume == "latest"


def test_config_problems_are_reported_together(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("# student-train --config p.yaml\ntrain:\n  lr: fast\n  lora_rank: 8\n"
                      "  loss: kl\n")
    result = invoke("--config", str(preset), "--alpha", "2", "--loss", "nope",
                    "--max-steps", "x", "--qlora", "--layer-map", "1-3")
    assert result.exit_code == 1  # a config error (exit_codes.USER_ERROR)
    out = result.output
    for expected in ("lr (", "must be a number, got 'fast'", "unknown setting 'lora_rank' "
                     "(did you mean 'lora_r'?)", "alpha (command line): must be in [0, 1]",
                     "loss (command line): must be one of", "max_steps (command line): must be "
                     "an integer", "give exactly one of store", "student is required",
                     "out is required", "qlora trains LoRA adapters", "layer_map:"):
        assert expected in out, expected
    assert "problem(s)" in out and out.count("\n  - ") >= 10


def test_preset_sections_and_overrides(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("# student-train --config p.yaml --store S --out R\n"
                      "dump:\n  model: med42\ntrain:\n  student: llama3.2-1b\n  lr: 1e-4\n"
                      "  signals: {med42: 0.6, qwen: 0.4}\n  specialty_weights: {cardiology: 2}\n"
                      "  temperature_schedule: exp\n")
    cfg = resolve_config(preset, {"store": "s", "out": "r", "lr": "3e-4", "packing": None})
    assert cfg.lr == 3e-4 and cfg.student == "llama3.2-1b" and cfg.packing is False
    assert cfg.signals == {"med42": 0.6, "qwen": 0.4}
    assert cfg.specialty_weights == {"cardiology": 2.0}
    assert cfg.temperature_schedule == "exponential" and cfg.temperature_end == 1.0
    flags = resolve_config(None, {"store": "s", "out": "r", "student": "x",
                                  "signals": "med42:0.6,qwen:0.4"})
    assert flags.signals == {"med42": 0.6, "qwen": 0.4}
    with pytest.raises(ConfigError) as err:
        resolve_config(tmp_path / "missing.yaml", {})
    assert "cannot read config file" in str(err.value)
    bare = tmp_path / "bare.yaml"
    bare.write_text("lr: 1\n")
    with pytest.raises(ConfigError) as err:
        resolve_config(bare, {})
    assert "no 'train:' section (keys ['lr'] belong under 'train:')" in str(err.value)


def test_cli_run_with_preset_and_overrides(world, tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("# student-train --config p.yaml\ntrain:\n  lr: 1.0e-3\n  max_steps: 9\n"
                      "  batch_tokens: 256\n  log_every: 1\n  save_every: 0\n")
    run = tmp_path / "run"
    result = invoke("--config", str(preset), "--store", str(world.store), "--student",
                    str(world.student), "--out", str(run), "--max-steps", "2",
                    "--eval-fraction", "0.25", "--signals", "teacher")
    assert result.exit_code == 0, result.output
    assert f"done: {run}/final" in result.output and "eval/kd" in result.output
    saved = resolve_config(run / "config.yaml")
    assert saved.lr == 1e-3 and saved.max_steps == 2 and saved.signals == {"teacher": 1.0}
    assert [m["step"] for m in read_metrics(run) if "train/loss" in m] == [1, 2]


def test_cli_errors_exit_nonzero_with_a_reason(world, tmp_path):
    result = invoke("--store", str(tmp_path / "nowhere"), "--student", str(world.student),
                    "--out", str(tmp_path / "r"))
    assert result.exit_code == 1 and "no store at" in result.output
    result = invoke("--store", str(world.store), "--student", str(tmp_path / "nope"),
                    "--out", str(tmp_path / "r"))
    assert result.exit_code == 1 and "is not an existing directory" in result.output


# ----------------------------------------------------------------------------- --data mode

def _text_samples(tokenizer, n=24):
    from tiny_hf import corpus

    out = []
    for i, text in enumerate(corpus()[:n]):
        ids = np.asarray(tokenizer(text)["input_ids"], np.int64)
        mask = np.ones(len(ids), bool)
        mask[0] = False
        out.append(type("S", (), {"sample_id": f"t{i}", "input_ids": ids, "loss_mask": mask})())
    return out


def test_text_batches_resume_and_split_over_processes(world):
    from transformers import AutoTokenizer

    from student_train.text_data import TextBatches, holdout

    samples = _text_samples(AutoTokenizer.from_pretrained(world.tokenizer))
    train, held = holdout(samples, 0.25, seed=0)
    assert len(train) + len(held) == len(samples) and held
    assert holdout(samples[::-1], 0.25, seed=0)[1] == held[::-1]  # order-independent

    def ids(stream):
        return [tuple(b["sample_ids"]) for b in stream]

    stream = TextBatches(samples, batch_tokens=128, seed=3)
    stream.set_epoch(1)
    full = ids(stream)
    assert stream.num_batches() == len(full) > 2
    it = iter(stream)
    next(it), next(it)
    state = stream.state_dict()
    again = TextBatches(samples, batch_tokens=128, seed=3)
    again.load_state_dict(state)
    again.set_epoch(1)
    assert ids(again) == full[2:]
    ranks = [TextBatches(samples, batch_tokens=128, seed=3, rank=r, world_size=2)
             for r in range(2)]
    assert len(ids(ranks[0])) == len(ids(ranks[1]))
    batch = next(iter(stream))
    assert (batch["labels"][:, 0] == -100).all() and batch["num_target_tokens"] > 0


def test_data_mode_trains_on_hard_labels(world, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    import student_train.text_data as text_data

    samples = _text_samples(AutoTokenizer.from_pretrained(world.tokenizer))
    monkeypatch.setattr(text_data, "load_text_samples", lambda *a, **k: samples)
    monkeypatch.chdir(tmp_path)  # --data paths are checked to exist before the student loads
    (tmp_path / "notes.jsonl").write_text("")
    run = tmp_path / "run"
    result = invoke("--data", "notes.jsonl", "--student", str(world.student), "--out", str(run),
                    "--max-steps", "3", "--batch-tokens", "256", "--eval-fraction", "0.25",
                    "--lr", "3e-3")
    assert result.exit_code == 0, result.output
    metrics = read_metrics(run)
    assert "train/kd" not in metrics[-2] and metrics[-1]["eval/loss"] == metrics[-1]["eval/ce"]
    meta = json.loads((run / "training_metadata.json").read_text())
    assert meta["source"] == {"data": ["notes.jsonl"], "samples": len(samples)}


def test_store_only_settings_are_refused_with_data():
    with pytest.raises(ConfigError) as err:
        resolve_config(None, {"data": ["d.jsonl"], "student": "s", "out": "o",
                              "hidden_weight": 1.0, "packing": True})
    assert len(err.value.problems) == 2


# ----------------------------------------------------------------------------- QLoRA

@pytest.mark.slow
def test_qlora_trains_and_merges_into_a_full_precision_student(world, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    result = invoke("--store", str(world.store), "--student", str(world.student), "--out",
                    str(run), "--max-steps", "2", "--batch-tokens", "256", "--lora-r", "4",
                    "--qlora", "--lr", "1e-2")
    assert result.exit_code == 0, result.output
    merged = load_file(run / "final" / "model.safetensors")
    assert all(v.dtype.is_floating_point for v in merged.values())
    assert not any("lora" in k or "absmax" in k for k in merged)
    AutoModelForCausalLM.from_pretrained(run / "final")
