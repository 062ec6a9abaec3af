"""distill-eval end to end on tiny local models and the bundled tasks, and its errors.

One full run (teacher, student, baseline; bundled MCQ and generation sets, an offline hub
task, held-out text and a store's eval split) is shared by the report checks.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from eval.cli import distill_eval
from logitstore.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
ROLES = ("teacher", "student", "baseline")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from tiny_hf import make_tiny_llama, make_tiny_qwen2, make_tokenizer

    root = tmp_path_factory.mktemp("eval_models")
    tok = make_tokenizer(root / "tok")
    return {
        "teacher": make_tiny_llama(root / "teacher", tok, seed=0, num_hidden_layers=3),
        "student": make_tiny_llama(root / "student", tok, seed=1, num_hidden_layers=1),
        "baseline": make_tiny_qwen2(root / "baseline", tok, seed=2, num_hidden_layers=1),
        "tokenizer": tok,
    }


def _store(path: Path, tokenizer_dir: Path) -> str:
    from transformers import AutoTokenizer

    from logitstore.format import StoreSettings
    from logitstore.toolkit.tokenizer_identity import tokenizer_fingerprint
    from logitstore.sample import Sample
    from logitstore.writer import StoreWriter

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    settings = StoreSettings(vocab_size=len(tok), tokenizer_fingerprint=tokenizer_fingerprint(tok),
                             segment_tokens=64, chunk_tokens=16)
    texts = ["The nurse reports swelling of both ankles.", "A chest X-ray was ordered.",
             "The physician was treated for anemia.", "Laboratory tests revealed anemia."]
    with StoreWriter(str(path), settings) as writer:
        for i, text in enumerate(texts):
            ids = np.array(tok(text)["input_ids"], dtype=np.int64)
            writer.add(Sample(f"s{i}", ids, np.ones(len(ids), dtype=bool),
                              split="validation" if i % 2 else "train"))
    return str(path)


@pytest.fixture(scope="module")
def full_run(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_run")
    heldout = root / "heldout.jsonl"
    heldout.write_text('{"text": "The patient reports chest pain radiating to the left arm."}\n'
                       '{"text": "The child presents with a persistent dry cough."}\n')
    out = root / "report"
    args = ["--model", str(models["student"]), "--teacher", str(models["teacher"]),
            "--baseline", str(models["baseline"]), "--tasks", "local,medmcqa",
            "--limit", "3", "--num-fewshot", "1", "--batch-size", "4", "--max-new-tokens", "6",
            "--ppl-data", str(heldout), "--ppl-store", _store(root / "store", models["tokenizer"]),
            "--efficiency-samples", "2", "--efficiency-repeats", "2",
            "--efficiency-new-tokens", "3", "--network", "auto", "--out", str(out)]
    result = CliRunner().invoke(distill_eval, args, catch_exceptions=False)
    return result, out


def test_full_run_writes_every_file(full_run):
    result, out = full_run
    assert result.exit_code == 0, result.output
    for name in ("report.json", "report.md", "report.png", "config.yaml"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert f"report: {out / 'report.md'}" in result.output


def _numbers(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _numbers(v)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value


def test_report_has_every_role_task_and_metric(full_run):
    report = json.loads((full_run[1] / "report.json").read_text())
    results = report["results"]
    assert set(results) == set(ROLES) == set(report["models"])
    for role in ROLES:
        r = results[role]
        assert set(r["medmcq_mini"]) == {"acc", "acc_norm"}
        assert set(r["medgen_mini"]) == {"rouge1", "rouge2", "rougeL", "bleu"}
        assert {"perplexity", "nll", "next_token_accuracy"} <= set(r["ppl/heldout"])
        assert r["ppl/store"]["tokens"] > 0
        assert {"parameters", "weights_bytes", "disk_bytes", "peak_memory_bytes",
                "prompt_tokens_per_s", "generation_tokens_per_s", "latency_p50_s",
                "latency_p95_s"} <= set(r["efficiency"])
        assert 0 <= r["medmcq_mini"]["acc"] <= 1 and r["ppl/heldout"]["perplexity"] > 1
        assert all(math.isfinite(x) for x in _numbers(r))
        assert report["models"][role]["quantization"] == "none"
        assert report["tasks"]["medmcq_mini"]["samples"][role] == 3
    assert results["teacher"]["efficiency"]["parameters"] > \
        results["student"]["efficiency"]["parameters"]
    assert report["stderr"]["student"]["medmcq_mini"]["acc"] >= 0


def test_unreachable_hub_task_is_skipped_with_reason(full_run):
    report = json.loads((full_run[1] / "report.json").read_text())
    assert report["tasks"]["medmcqa"]["status"] == "skipped"
    (skip,) = [s for s in report["skipped"] if s["task"] == "medmcqa"]
    assert skip["role"] is None and "could not be loaded" in skip["reason"]
    assert all("medmcqa" not in report["results"][role] for role in ROLES)
    assert report["environment"]["network"]["offline"] is True
    assert "skipped medmcqa" in full_run[0].output


def test_comparison_ratios_and_markdown(full_run):
    report = json.loads((full_run[1] / "report.json").read_text())
    rows = {(r["task"], r["metric"]): r for r in report["comparison"]}
    acc = rows[("medmcq_mini", "acc")]
    assert acc["retention"] == (pytest.approx(acc["student"] / acc["teacher"])
                                if acc["teacher"] else None)
    params = report["results"]
    assert report["ratios"]["compression_parameters"] == pytest.approx(
        params["teacher"]["efficiency"]["parameters"]
        / params["student"]["efficiency"]["parameters"])
    assert report["ratios"]["compression_parameters"] > 1
    assert all(report["ratios"][k] is not None for k in ("compression_disk",
                                                          "speedup_generation_tokens",
                                                          "speedup_latency_p50"))
    md = (full_run[1] / "report.md").read_text()
    for text in ("## Results", "| medmcq_mini | acc |", "| ppl/store | perplexity |",
                 "| efficiency | latency_p50_s |", "## Compression and speed-up",
                 "compression_parameters", "## Skipped", "**medmcqa**",
                 "## How efficiency was measured", "![accuracy and efficiency](report.png)"):
        assert text in md


def test_resolved_config_is_saved(full_run):
    import yaml

    config = yaml.safe_load((full_run[1] / "config.yaml").read_text())
    report = json.loads((full_run[1] / "report.json").read_text())
    assert config == report["config"]
    assert config["limit"] == 3 and config["num_fewshot"] == 1 and config["tasks"] == \
        ["local", "medmcqa"]
    assert config["quantize"] == "auto" and config["efficiency_repeats"] == 2


# ----------------------------------------------------------------------------- errors


def _fails(args: list[str], *expected: str) -> str:
    result = CliRunner().invoke(distill_eval, args)
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)  # a clean exit, not a crash
    assert result.output.startswith("distill-eval: error: ")
    assert "Traceback" not in result.output
    for text in expected:
        assert text in result.output
    return result.output


def test_error_messages(tmp_path, models):
    out = str(tmp_path / "out")
    student = str(models["student"])
    _fails(["--model", str(tmp_path / "nope"), "--tasks", "local", "--out", out],
           "not an existing directory")
    _fails(["--model", student, "--tasks", str(tmp_path / "t.yaml"), "--out", out],
           "does not exist")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n')
    _fails(["--model", student, "--tasks", f"{bad}", "--out", out], "question/choices/answer")
    _fails(["--model", student, "--tasks", "local", "--limit", "0", "--batch-size", "0",
            "--out", out], "limit (command line): must be > 0",
           "batch_size (command line): must be >= 1")
    _fails(["--model", student, "--tasks", "local", "--ppl-data", str(tmp_path / "x.txt"),
            "--out", out], "--ppl-data")
    _fails(["--model", student, "--tasks", "local", "--ppl-store", str(tmp_path / "store"),
            "--out", out], "no store at")
    (tmp_path / "file").write_text("")
    _fails(["--model", student, "--tasks", "local", "--out", str(tmp_path / "file")],
           "not a directory")
    assert not (tmp_path / "out").exists()  # nothing written when the options are wrong


def test_model_without_weights_fails_after_tasks_load(tmp_path, models):
    empty = tmp_path / "no_weights"
    empty.mkdir()
    for f in Path(models["tokenizer"]).iterdir():
        (empty / f.name).write_bytes(f.read_bytes())
    _fails(["--model", str(empty), "--tasks", "medmcq_mini", "--no-efficiency",
            "--network", "offline", "--out", str(tmp_path / "o")], "config.json")


def test_usage_errors_exit_2():
    result = CliRunner().invoke(distill_eval, ["--tasks", "local", "--no-such-flag"])
    assert result.exit_code == 2 and "--no-such-flag" in result.output


def test_missing_model_is_a_config_error():
    # --model may come from a preset's eval: section, so its absence is a config error (1).
    _fails(["--tasks", "local"], "model is required", "out is required")


def test_eval_section_of_a_preset(tmp_path, models):
    from eval.config import resolve_config

    preset = tmp_path / "p.yaml"
    preset.write_text("# distill-eval --config p.yaml\ndump:\n  top_k: 4\neval:\n"
                      f"  model: {models['student']}\n  tasks: local\n  batch_size: 2\n"
                      "  limit: 5\n  progress: false\n")
    cfg = resolve_config(preset, {"out": "o", "batch_size": "3"})
    assert (cfg.model, cfg.tasks, cfg.batch_size, cfg.limit, cfg.progress) == \
        (str(models["student"]), ("local",), 3, 5, False)
    assert isinstance(cfg.limit, int) and resolve_config(None, {"model": "m", "out": "o",
                                                                "limit": "0.5"}).limit == 0.5
    assert cfg.roles() == {"student": str(models["student"])}
    for name in ("med42-to-llama3.2-1b", "qwen2-1.5b-to-qwen2-0.5b",  # bundled, by name
                 "llama3-8b-to-llama3.2-1b", "tiny-cpu"):
        bundled = resolve_config(name, {"model": "run/final", "out": "o"})
        assert bundled.tasks in (("medical", "local"), ("local",))
    for scale in ("tiny", "default"):  # the demo's presets: every section resolves
        demo = REPO / "demo" / "configs" / f"{scale}.yaml"
        assert resolve_config(demo, {"model": "m", "out": "o"}).network == "offline"
    # A flag's value is checked by the same code as a preset's; all problems at once.
    bad = tmp_path / "bad.yaml"
    bad.write_text("eval:\n  quantise: 4bit\n  network: maybe\n")
    _fails(["--config", str(bad), "--model", "m", "--out", str(tmp_path / "o"),
            "--teacher-quantize", "3bit"], "unknown setting 'quantise' (did you mean "
           "'quantize'?)", "network (", "teacher_quantize (command line): must be one of")


def test_tasks_is_a_list_in_a_preset_and_on_the_command_line(tmp_path):
    from eval.config import resolve_config
    from eval.tasks import resolve_tasks

    preset = tmp_path / "p.yaml"
    preset.write_text("eval:\n  model: m\n  out: o\n  tasks: [medmcq_mini, medgen_mini]\n")
    as_list = resolve_config(preset).tasks
    assert as_list == ("medmcq_mini", "medgen_mini")
    assert resolve_config(None, {"model": "m", "out": "o",
                                 "tasks": ["medmcq_mini,medgen_mini"]}).tasks == as_list
    repeated = distill_eval.make_context("distill-eval", [
        "--tasks", "medmcq_mini", "--tasks", "medgen_mini"]).params["tasks"]
    assert resolve_config(None, {"model": "m", "out": "o", "tasks": repeated}).tasks == as_list
    assert [r.name for r in resolve_tasks(as_list)] == ["medmcq_mini", "medgen_mini"]
    assert resolve_config(None, {"model": "m", "out": "o"}).tasks == ("medical",)
    preset.write_text("eval:\n  model: m\n  out: o\n  tasks: {medical: 1}\n")
    with pytest.raises(ConfigError, match="tasks .*must be strings"):
        resolve_config(preset)


def test_python_dash_m_eval_one_paragraph_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "eval", "--model", "x/y", "--tasks",
                             str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "distill-eval: error:" in result.stderr and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr
