"""The demo pipeline end to end at test size: `python demo/run_demo.py --scale tiny`.

The same script, stages and tools as `make demo` (demo/configs/tiny*.yaml instead of
default*.yaml): corpus -> tokenizer -> teacher (student-train --data) -> teacher-dump ->
logitstore info/verify -> student-train --store (KD + hidden + attention) -> baseline
(student-train --data) -> distill-eval. Run once in a subprocess (it sets torch's thread
count, logging and HF offline variables, which must not leak into other tests), then
inspected; a second run must reuse every stage.

The student's held-out KD at its start comes from the run itself: the demo presets set
`eval_on_start: true`, so student-train evaluates the untrained student at step 0 (on the
store samples held out by `eval_fraction`) before the first optimizer step.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
ROLES = ("teacher", "student", "baseline")
STAGES = ("corpus", "tokenizer", "init", "teacher", "dump", "inspect", "student", "baseline",
          "eval", "serve")


def run_demo(out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "demo" / "run_demo.py"), "--out", str(out),
                           "--scale", "tiny"], cwd=REPO, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    result = run_demo(out)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)


def test_every_artifact_exists(demo):
    out, result = demo
    summary = json.loads((out / "summary.json").read_text())
    missing = [name for name, a in summary["artifacts"].items() if not a["exists"]]
    assert not missing, missing
    for path in ("corpus/train.jsonl", "corpus/heldout.jsonl", "corpus/distill.jsonl",
                 "corpus/documents.jsonl", "corpus/medmcq_kb.jsonl", "corpus/split_sizes.json",
                 "tokenizer/tokenizer.json",
                 "init/teacher/model.safetensors", "init/student/model.safetensors",
                 "runs/teacher/final/model.safetensors", "runs/teacher/final/tokenizer.json",
                 "store/manifest.json", "inspect/info.txt", "inspect/verify.txt",
                 "runs/student/final/model.safetensors", "runs/student/metrics.jsonl",
                 "runs/student/training_metadata.json", "runs/student/alignment.safetensors",
                 "runs/baseline/final/model.safetensors", "runs/baseline/metrics.jsonl",
                 "report/report.json", "report/report.md", "report/report.png",
                 "report/config.yaml", "export/export.json", "export/model.onnx",
                 "serve/answer.json", "commands.sh", "SUMMARY.txt"):
        assert (out / path).is_file(), path
    # The last stage served one answer from the INT8 export and stopped the server cleanly.
    served = json.loads((out / "serve" / "answer.json").read_text())
    assert served["exit_code"] == 0 and served["response"]["completion_tokens"] > 0
    assert summary["served"]["answer"] == served["response"]["text"]
    assert "served by distill-serve" in result.stdout
    assert (out / "report" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The printed summary names where every artifact is.
    for name in ("tokenizer", "teacher", "store", "store info", "store verify", "student",
                 "baseline", "report.md", "report.png"):
        assert summary["artifacts"][name]["path"] in result.stdout or \
            Path(summary["artifacts"][name]["path"]).name in result.stdout, name
    # Teacher > student, both Llama, the student initialised from the same checkpoint as the
    # baseline.
    params = summary["parameters"]
    assert params["teacher"] > params["student"] == params["baseline"] > 0
    # The teacher's text vs the transfer set (the distill split, a part of it), in tokens.
    data = summary["data"]
    assert data["teacher_tokens"] > data["transfer_tokens"] > 0
    assert data["teacher_to_transfer"] == pytest.approx(
        data["teacher_tokens"] / data["transfer_tokens"], abs=0.01)
    assert data["teacher_tokens_seen"] > 0
    # Every tool stage is a plain command, listed in commands.sh.
    commands = (out / "commands.sh").read_text().splitlines()
    assert [c.split()[0] for c in commands if not c.startswith(("#", "set ", "python "))] == [
        "student-train", "teacher-dump", "logitstore", "logitstore", "student-train",
        "student-train", "distill-eval", "student-export", "distill-serve", "until", "curl",
        "kill"]


def test_store_holds_every_capture_and_verifies(demo):
    from logitstore.cli import main as logitstore_cli
    from logitstore.reader import StoreReader

    out, _ = demo
    result = CliRunner().invoke(logitstore_cli, ["verify", str(out / "store")])
    assert result.exit_code == 0, result.output
    assert (out / "inspect" / "verify.txt").read_text().strip().endswith(": ok")
    spec = StoreReader(str(out / "store")).settings.signals["teacher"]
    assert spec.topk is not None and spec.sampled is not None
    assert spec.hidden is not None and spec.attention is not None
    info = (out / "inspect" / "info.txt").read_text()
    for kind in ("topk", "sampled", "hidden", "attention"):
        assert f"  {kind}" in info, kind
    distill = (out / "corpus" / "distill.jsonl").read_text().splitlines()
    assert json.loads((out / "store" / "manifest.json").read_text())["counts"]["samples"] \
        == len(distill)


def test_student_heldout_kd_falls(demo):
    out, _ = demo
    rows = [json.loads(line) for line in (out / "runs" / "student" / "metrics.jsonl")
            .read_text().splitlines()]
    evals = [(r["step"], r["eval/kd"]) for r in rows if "eval/kd" in r]
    assert evals[0][0] == 0, "eval_on_start: the first evaluation is the untrained student"
    assert evals[-1][0] > 0
    assert all(_finite(kd) for _, kd in evals)
    assert evals[-1][1] < evals[0][1], evals
    # KD, hidden and attention terms were all on; the baseline had no teacher at all.
    assert {"train/kd", "train/hidden", "train/attention"} <= set().union(*rows)
    baseline = [json.loads(line) for line in (out / "runs" / "baseline" / "metrics.jsonl")
                .read_text().splitlines()]
    assert not any(k.startswith(("train/kd", "eval/kd")) for r in baseline for k in r)
    meta = json.loads((out / "runs" / "baseline" / "training_metadata.json").read_text())
    assert meta["config"]["store"] is None and meta["config"]["data"]


def test_report_is_complete(demo):
    out, _ = demo
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["skipped"] == []
    assert {t for t, e in report["tasks"].items() if e["status"] == "ok"} \
        == {"medmcq_mini", "medgen_mini", "medmcq_kb"}
    expected = {"medmcq_mini": {"acc", "acc_norm"}, "medmcq_kb": {"acc", "acc_norm"},
                "medgen_mini": {"rouge1", "rouge2", "rougeL", "bleu"},
                "ppl/heldout": {"perplexity", "nll", "next_token_accuracy"},
                "efficiency": {"parameters", "peak_memory_bytes", "generation_tokens_per_s",
                               "latency_p50_s"}}
    for role in ROLES:
        results = report["results"][role]
        for task, metrics in expected.items():
            assert metrics <= set(results[task]), (role, task)
            for metric in metrics:
                assert _finite(results[task][metric]), (role, task, metric)
    rows = report["comparison"]
    assert {(r["task"], r["metric"]) for r in rows} >= {
        (t, m) for t, ms in expected.items() for m in ms}
    for row in rows:
        assert all(_finite(row[role]) for role in ROLES), row
        # retention is null only where it is undefined (division by 0).
        assert _finite(row["retention"]) or row["teacher"] == 0, row
        # gap_closed: a number exactly where the teacher beats the baseline beyond noise,
        # else null with the reason.
        gap = row.get("teacher_vs_baseline")
        beyond_noise = bool(gap) and gap["resolved"] and gap["better"] == "teacher"
        assert _finite(row["gap_closed"]) == beyond_noise, row
        assert (row["gap_closed_reason"] is None) == beyond_noise, row
        if row["task"] == "efficiency" or row["metric"] == "bleu":
            continue
        # Per-item scores: every role has a standard error, the differences are paired.
        assert all(_finite(row["stderr"][role]) for role in ROLES), row
        assert row["student_vs_baseline"]["paired"] and row["student_vs_baseline"]["items"] \
            >= 2, row
    assert len(report["findings"]) == len([r for r in rows if r["task"] != "efficiency"])
    assert report["ratios"] and all(_finite(v) for v in report["ratios"].values()), \
        report["ratios"]
    markdown = (out / "report" / "report.md").read_text()
    for word in ("medmcq_mini", "medgen_mini", "medmcq_kb", "ppl/heldout", "efficiency",
                 "## Student vs baseline: what is resolved", " ± "):
        assert word in markdown


def test_rerun_reuses_every_stage(demo):
    out, _ = demo
    before = {p: p.stat().st_mtime_ns for p in (out / "report" / "report.json",
                                                out / "store" / "manifest.json",
                                                out / "runs" / "student" / "final" /
                                                "model.safetensors")}
    commands = (out / "commands.sh").read_text()
    result = run_demo(out)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["timings"]) == list(STAGES)
    assert all(t["reused"] for t in summary["timings"].values()), summary["timings"]
    assert result.stdout.count("-- reused") == len(STAGES)
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert (out / "commands.sh").read_text() == commands
