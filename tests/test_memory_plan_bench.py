"""bench/memory_plan_bench.py's harness on the tiniest student (one configuration), and the
live-tensor-bytes tracker of bench/memory_measure.py against known allocations."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import memory_measure  # noqa: E402
import memory_plan_bench  # noqa: E402
from memory_plan_report import markdown, summary  # noqa: E402


def test_tracker_counts_storages_once_and_frees_them():
    import torch

    tracker = memory_measure._make_tracker_class()()
    with tracker:
        a = torch.empty(1000, 250)  # 1,000,000 bytes
        view = a.view(-1)
        assert tracker.total == 1_000_000  # a view shares the storage: counted once
        del a
        assert tracker.total == 1_000_000  # still held by the view
        b = view * 2
        assert tracker.total == 2_000_000 and tracker.peak == 2_000_000
        del view, b
    assert tracker.total == 0 and tracker.peak == 2_000_000
    assert sum(tracker.current.values()) == 0


def test_tracker_roles_follow_gradients():
    import torch

    tracker = memory_measure._make_tracker_class()()
    weight = torch.nn.Parameter(torch.ones(100, 10))
    tracker.track_all([weight], "weights")
    weight.register_post_accumulate_grad_hook(lambda p: tracker.track(p.grad, "gradients"))
    with tracker:
        (weight * 3).sum().backward()
    assert tracker.current["weights"] == 4000
    assert tracker.current["gradients"] == 4000  # relabelled from "other" by the hook


def test_one_configuration_end_to_end(tmp_path):
    """World, plan and a 2-step measurement of student-train's own step in a subprocess."""
    root = tmp_path / "world"
    world = memory_plan_bench.build_world(root, ["tiny"], vocab=512, seq_len=64, samples=8,
                                          k=8)
    params = world["students"]["tiny"]["params"]
    result = memory_plan_bench.measure_config(root, "tiny", "full", "adamw", steps=2, nice=0)
    m = result["measurement"]
    assert m["params"] == params and m["param_bytes"] == 4 * params
    assert m["gradient_bytes"] == 4 * params  # full fine-tune: every parameter has a gradient
    # AdamW: exp_avg and exp_avg_sq (fp32) plus one scalar step tensor per parameter
    assert 8 * params <= m["optimizer_bytes"] <= 8 * params + 4 * 64
    assert [s["step"] for s in m["steps"]] == [1, 2]
    assert m["peak_tensor"] > m["param_bytes"] + m["optimizer_bytes"]
    assert sum(m["peak_roles"].values()) == m["peak_tensor"]
    # RSS holds the tensors plus what the allocator and Python add around them
    assert m["peak_rss"] >= m["peak_tensor"] * 0.9
    assert result["measured"]["total_tensor"] == m["peak_tensor"]
    if result.get("plan") is not None:
        assert result["planned"]["total_tensor"] == result["plan"]["total"] > 0
        assert set(result["ratios"]) == set(result["planned"]) <= set(result["measured"])
    report = {"results": [result], "summary": summary([result], memory_plan_bench.GOAL)}
    table = markdown(report)
    assert "| tiny (0M) | full | adamw | 128 |" in table


def test_unknown_size_is_refused(tmp_path):
    args = memory_plan_bench.parse_args(["--sizes", "7B", "--root", str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown"):
        memory_plan_bench.run_bench(args)
