"""bench/serve_bench.py: its statistics and goal verdicts, and a --quick run end to end (a tiny
Llama exported by student-export, served by a real distill-serve process)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from serve_report import (goals, percentile_interval, ratio_interval,  # noqa: E402
                          render_markdown, shown_ratio, summarize_server, verdict)


def test_ratio_is_shown_only_when_the_interval_is_narrow():
    narrow = ratio_interval([4.0, 4.2, 4.1], [1.0, 1.0, 1.0])
    assert shown_ratio(narrow) == (pytest.approx(4.1), None)
    value, why = shown_ratio(ratio_interval([1.0, 9.0], [1.0, 1.0]))
    assert value is None and "noise" in why
    value, why = shown_ratio(ratio_interval([3.0], [1.0]))
    assert value is None and "one round" in why


def test_verdicts_follow_the_interval():
    assert verdict(ratio_interval([4.5, 4.6, 4.4], [1, 1, 1]), 4.0) == "met"
    assert verdict(ratio_interval([2.0, 2.1, 1.9], [1, 1, 1]), 4.0) == "not met"
    assert verdict(ratio_interval([3.0, 5.0, 4.1], [1, 1, 1]), 4.0) == "unresolved"


def test_percentile_interval_brackets_the_value():
    values = [float(v) for v in range(1, 101)]
    p50 = percentile_interval(values, 50)
    assert p50["value"] == pytest.approx(50.5)
    assert p50["low"] < p50["value"] < p50["high"] and p50["n"] == 100


def _direct(gen_fp32, gen_int8):
    from fidelity_stats import interval

    return {"m": {"torch-fp32": {"generation_tokens_per_s": interval(gen_fp32),
                                 "prefill_tokens_per_s": interval([100.0, 101.0])},
                  "onnx-int8": {"generation_tokens_per_s": interval(gen_int8),
                                "prefill_tokens_per_s": interval([300.0, 310.0])}}}


def test_speed_goal_fails_on_perplexity_even_when_fast():
    direct = _direct([10.0, 10.0, 10.0], [30.0, 31.0, 29.0])
    fast = goals(direct, {}, {"m": {"onnx-int8": {"perplexity_ratio": 1.01}}})
    assert [g["verdict"] for g in fast] == ["met"]
    lossy = goals(direct, {}, {"m": {"onnx-int8": {"perplexity_ratio": 1.05}}})
    assert [g["verdict"] for g in lossy] == ["not met"]


def _phase(c, throughput):
    return {"concurrency": c, "requests": 2 * c, "wall_s": 1.0, "completion_tokens": 10,
            "throughput_tokens_per_s": throughput, "latencies_s": [0.1 * c] * (2 * c),
            "mean_batch_size": float(c)}


def test_scaling_is_paired_per_round_and_judged():
    rounds = [{"1": _phase(1, 10.0), "16": _phase(16, 50.0)},
              {"1": _phase(1, 20.0), "16": _phase(16, 100.0)}]
    summary = summarize_server(rounds, [1, 16])
    # Paired: each round's 16-client throughput is 5x its 1-client one, whatever the round.
    assert summary["scaling"]["16"]["values"] == [5.0, 5.0]
    assert summary["by_concurrency"]["16"]["requests"] == 64
    out = goals({}, {"m": {"onnx-int8": summary}}, {})
    assert out[0]["verdict"] == "met" and out[0]["variant"] == "onnx-int8"


@pytest.mark.slow  # ~40 s: export, INT8, a served model, two rounds (as the other benches')
def test_quick_run_end_to_end(tmp_path):
    out = tmp_path / "serve.json"
    done = subprocess.run([sys.executable, "bench/serve_bench.py", "--quick", "--cache",
                           str(tmp_path / "cache"), "--out", str(out), "--check-limit", "8"],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    (model,) = result["models"]
    assert set(model["variants"]) == {"torch-fp32", "onnx-int8"}
    assert 0.9 < model["variants"]["onnx-int8"]["ppl_ratio"] <= 1.02  # the export's gate
    direct = result["direct"]["tiny"]
    for variant in ("torch-fp32", "onnx-int8"):
        assert len(direct[variant]["generation_tokens_per_s"]["values"]) == 2
        assert min(direct[variant]["generation_tokens_per_s"]["values"]) > 0
    served = result["server"]["tiny"]["onnx-int8"]
    assert served["exit_code"] == 0 and served["peak_rss_bytes"] > 10_000_000
    assert [p["requests"] for r in served["rounds"] for p in r.values()] == [2, 8, 2, 8]
    assert all(p["completion_tokens"] > 0 for r in served["rounds"] for p in r.values())
    assert served["by_concurrency"]["4"]["mean_batch_size"] >= 1
    assert [g["verdict"] in ("met", "not met", "unresolved") for g in result["goals"]] == [True]
    markdown = out.with_suffix(".md").read_text()
    assert "## Goals" in markdown and "distill-serve" in markdown
    assert out.with_suffix(".png").stat().st_size > 1000
    assert render_markdown(result) == markdown
