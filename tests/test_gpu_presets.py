"""The GPU presets of med42 -> Llama-3.2-1B (issue 14 §4): each resolves for student-train,
says how to launch it, fits its card by the memory plan, and its header states what the plan
computes (bench/plan_presets.py, Llama-3.2-1B's config on paper, no weights)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import plan_presets  # noqa: E402
from student_train.config import resolve_config  # noqa: E402


@pytest.mark.parametrize("name", sorted(plan_presets.PRESETS))
def test_gpu_preset_fits_and_its_header_says_so(name):
    path = ROOT / "configs" / f"{name}.yaml"
    text = path.read_text(encoding="utf-8")
    processes = plan_presets.PRESETS[name]
    launch = "student-train" if processes == 1 else \
        f"accelerate launch --num_processes {processes} -m student_train"
    assert text.startswith(f"# {launch} --config configs/{name}.yaml")
    cfg = resolve_config(path, {"store": "store/", "out": "run/"})
    assert cfg.gpu_memory and cfg.student == "llama3.2-1b"
    assert cfg.fsdp == (processes > 1)
    plan = plan_presets.paper_plan(name)
    assert plan.fits and plan.max_batch_tokens >= cfg.batch_tokens
    assert plan_presets.preset_problems(name) == []


def test_a_full_fine_tune_on_one_24gb_card_does_not_fit(tmp_path):
    """The issue's starting point: fp32 weights, gradients and AdamW moments of 1.24 B
    parameters (~18.5 GiB) leave no room on a 24 GiB card; the plan says what would fit."""
    preset = tmp_path / "full.yaml"
    base = (ROOT / "configs" / "med42-to-llama3.2-1b-1x24gb-lora.yaml").read_text()
    preset.write_text(base.replace("  lora_r: 16\n", "  lora_r: 0\n"), encoding="utf-8")
    plan = plan_presets.plan_of_preset(preset, processes=1)
    assert not plan.fits and plan.max_batch_tokens is None
    assert "adamw-8bit" in plan.suggestion
