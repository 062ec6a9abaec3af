"""distill-eval on student-export directories: ExportLM scores like HFLM, perplexity and speed
through the InferenceModel, and a full run with an export in a role.

The exports here are PyTorch fp32 export directories written by hand (export.json + the model
files), so these checks do not depend on the ONNX exporter; one test runs the real
`student-export` to ONNX INT8 and evaluates that.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from eval.cli import distill_eval

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tiny_hf import make_tiny_llama, make_tokenizer

    root = tmp_path_factory.mktemp("eval_export")
    tok = make_tokenizer(root / "tok")
    teacher = make_tiny_llama(root / "teacher", tok, seed=0, num_hidden_layers=2)
    student = make_tiny_llama(root / "student", tok, seed=1, num_hidden_layers=1)
    return {"root": root, "teacher": teacher, "student": student,
            "export": _torch_export(student, root / "student_export")}


def _torch_export(model_dir: Path, out: Path, **manifest) -> Path:
    """A PyTorch fp32 export directory (the layout student-export writes for --format torch)."""
    shutil.copytree(model_dir, out)
    (out / "export.json").write_text(json.dumps({
        "format_version": 1, "format": "torch", "quantize": "none", "max_length": 128,
        "source": {"path": str(model_dir), "sha256": "0" * 64, "model_type": "llama"},
        "quality": {"ppl_ratio": 1.0}, **manifest}))
    return out


def _instance(args, request_type="loglikelihood"):
    from lm_eval.api.instance import Instance

    return Instance(request_type=request_type, doc={}, arguments=args, idx=0)


def test_export_lm_scores_like_hflm(tiny):
    """ExportLM over the InferenceModel gives HFLM's log-likelihoods, greedy flags, rolling
    log-likelihoods and generated text for the same model."""
    from lm_eval.models.huggingface import HFLM

    from eval.export_lm import ExportLM
    from logitstore.toolkit.hf import load_causal_lm, load_tokenizer
    from logitstore.toolkit.inference import load_inference_model

    inference = load_inference_model(tiny["student"])
    ours = ExportLM(inference, batch_size=3)
    model, _ = load_causal_lm(str(tiny["student"]), quantize="none", dtype="float32",
                              device="cpu")
    reference = HFLM(pretrained=model, tokenizer=load_tokenizer(str(tiny["student"])),
                     batch_size=3, max_length=inference.max_length)
    pairs = [("The patient reports", " chest pain"), ("Question: What is the most likely "
             "diagnosis? ", "A"), ("", "The nurse"), ("An ECG showed", " sinus rhythm.")]
    requests = [_instance(pair) for pair in pairs]
    mine, theirs = ours.loglikelihood(requests), reference.loglikelihood(requests)
    assert [g for _, g in mine] == [g for _, g in theirs]
    np.testing.assert_allclose([v for v, _ in mine], [v for v, _ in theirs], rtol=1e-4)
    assert all(v < 0 for v, _ in mine)
    texts = [_instance(("The child was treated for a rash on the forearms. " * 12,),
                       "loglikelihood_rolling")]
    np.testing.assert_allclose(ours.loglikelihood_rolling(texts),
                               reference.loglikelihood_rolling(texts), rtol=1e-4)
    gen_kwargs = {"until": ["\n"], "max_gen_toks": 8, "do_sample": False}
    prompts = [_instance((p, dict(gen_kwargs)), "generate_until")
               for p in ("Question: What was ordered?\nAnswer:", "The physician")]
    assert ours.generate_until(prompts) == reference.generate_until(prompts)


def test_perplexity_of_an_inference_model_equals_the_torch_model(tiny):
    from eval.perplexity import TokenSequence, score_sequences
    from logitstore.toolkit.hf import load_causal_lm
    from logitstore.toolkit.inference import load_inference_model

    sequences = [TokenSequence.all_targets(ids) for ids in
                 ([1, 40, 50, 60, 70, 80], [1, 90, 91], [1, 30, 31, 32, 33, 34, 35, 36])]
    model, _ = load_causal_lm(str(tiny["student"]), quantize="none", dtype="float32",
                              device="cpu")
    expected = score_sequences(model, sequences)
    found = score_sequences(load_inference_model(tiny["export"]), sequences)
    assert found["tokens"] == expected["tokens"] == 5 + 2 + 7
    assert found["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-5)
    assert found["next_token_accuracy"] == expected["next_token_accuracy"]


def test_speed_benchmark_of_an_export_generates_exactly_the_tokens_asked(tiny):
    from eval.efficiency import benchmark_inference_speed
    from logitstore.toolkit.inference import load_inference_model

    model = load_inference_model(tiny["export"])
    eos = model.eos_token_ids
    speed = benchmark_inference_speed(model, ["Question: a?\nAnswer:", "The nurse"],
                                      max_new_tokens=5, warmup=0, repetitions=2)
    assert speed["speed_samples"] == 4
    assert speed["generation_tokens_per_s"] > 0 and speed["prompt_tokens_per_s"] > 0
    assert speed["latency_p95_s"] >= speed["latency_p50_s"] > 0
    assert model.eos_token_ids == eos  # restored after the benchmark


def _run(args):
    return CliRunner().invoke(distill_eval, args, catch_exceptions=False)


def test_distill_eval_with_an_export_in_a_role(tiny, tmp_path):
    """Student = the export of the baseline's weights: every score equals the baseline's,
    the export's sizes come from its weight files and config, and the report names it."""
    out = tmp_path / "report"
    ppl = tmp_path / "heldout.txt"
    ppl.write_text("The patient reports chest pain.\n\nA chest X-ray was ordered today.\n")
    result = _run(["--model", str(tiny["export"]), "--baseline", str(tiny["student"]),
                   "--teacher", str(tiny["teacher"]), "--tasks", "local", "--limit", "4",
                   "--ppl-data", str(ppl), "--out", str(out), "--efficiency-samples", "2",
                   "--efficiency-repeats", "1", "--efficiency-new-tokens", "4",
                   "--max-new-tokens", "8", "--network", "offline", "--no-progress"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["models"]["student"]["quantization"] == "none (torch export)"
    assert report["models"]["student"]["export"]["quality"] == {"ppl_ratio": 1.0}
    student, baseline = report["results"]["student"], report["results"]["baseline"]
    assert {"medmcq_mini", "medgen_mini", "ppl/heldout", "efficiency"} <= set(student)
    assert not [s for s in report["skipped"] if s["role"] == "student"]
    for task in ("medmcq_mini", "medgen_mini", "ppl/heldout"):
        for metric, value in baseline[task].items():
            assert student[task][metric] == pytest.approx(value, rel=1e-4, abs=1e-6), \
                (task, metric)
    efficiency = student["efficiency"]
    assert efficiency["parameters"] == baseline["efficiency"]["parameters"]
    weights = (tiny["export"] / "model.safetensors").stat().st_size
    assert efficiency["disk_bytes"] == efficiency["weights_bytes"] == weights
    assert efficiency["generation_tokens_per_s"] > 0 and efficiency["peak_memory_bytes"] >= 0
    assert "torch export" in (out / "report.md").read_text()


def test_bad_export_manifest_fails_before_loading(tiny, tmp_path):
    broken = _torch_export(tiny["student"], tmp_path / "broken", format_version=99)
    result = _run(["--model", str(broken), "--tasks", "local", "--out", str(tmp_path / "r")])
    assert result.exit_code == 1
    assert "format_version 1" in result.output and "student-export" in result.output
    assert not (tmp_path / "r").exists()


def test_quantize_option_on_an_export_is_refused(tiny, tmp_path):
    result = _run(["--model", str(tiny["export"]), "--student-quantize", "8bit",
                   "--tasks", "local", "--out", str(tmp_path / "r")])
    assert result.exit_code == 1
    assert "--student-quantize 8bit" in result.output and "runs as exported" in result.output
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_distill_eval_on_a_real_onnx_int8_export(tiny, tmp_path):
    """student-export to ONNX INT8, then distill-eval on it: perplexity close to the source's
    (the gate's bound), sizes from model.onnx, the kind in the report."""
    export = tmp_path / "onnx_int8"
    done = subprocess.run([sys.executable, "-m", "student_export", str(tiny["teacher"]),
                           "--out", str(export), "--format", "onnx", "--quantize", "int8",
                           "--max-length", "128"], capture_output=True, text=True, cwd=REPO,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    ppl = tmp_path / "heldout.txt"
    ppl.write_text("The patient reports chest pain.\n\nA chest X-ray was ordered today.\n")
    out = tmp_path / "report"
    result = _run(["--model", str(export), "--teacher", str(tiny["teacher"]),
                   "--tasks", "medmcq_mini", "--limit", "4", "--ppl-data", str(ppl),
                   "--out", str(out), "--efficiency-samples", "1", "--efficiency-repeats", "1",
                   "--efficiency-new-tokens", "4", "--network", "offline", "--no-progress"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["models"]["student"]["model_class"] == "onnx-int8"
    student, teacher = report["results"]["student"], report["results"]["teacher"]
    ratio = student["ppl/heldout"]["perplexity"] / teacher["ppl/heldout"]["perplexity"]
    assert math.isfinite(ratio) and abs(ratio - 1) < 0.05
    onnx_files = sum(f.stat().st_size for f in export.iterdir()
                     if f.name.startswith("model.onnx"))
    assert student["efficiency"]["disk_bytes"] == onnx_files > 0
    assert student["efficiency"]["parameters"] == teacher["efficiency"]["parameters"]
    assert "acc" in student["medmcq_mini"]
