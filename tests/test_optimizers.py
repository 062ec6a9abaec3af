"""student-train's `--optimizer` (student_train/optimizers.py): each one trains and resumes.

Each optimizer runs 6 steps of the tiny Llama world (tests/train_helpers.py) with a checkpoint
at step 3; a run resumed from that checkpoint must log the same losses at steps 4-6 and end
with the same weights. The rest are unit checks: the state sizes `state_bytes` predicts, the
parameter groups, Adafactor following the schedule's lr, and the refusals.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import sys
import warnings

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from logitstore.errors import ConfigError
from student_train.config import FIELDS, OPTIMIZERS, resolve_config
from student_train.optimizers import make_optimizer, state_bytes
from train_helpers import run_training, shared_world, train_losses

CHECKPOINT = "step-00000003"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return shared_world(tmp_path_factory)


def config(**overrides):
    return resolve_config(None, {"store": "s", "student": "x", "out": "r", **overrides})


def optimizer_state(run) -> dict:
    """The optimizer state a checkpoint holds (accelerate's optimizer.bin)."""
    return torch.load(run / "checkpoints" / CHECKPOINT / "optimizer.bin", weights_only=True)


def moments(saved: dict) -> set[tuple[str, torch.dtype]]:
    """(name, dtype) of the per-value state tensors of a saved optimizer state (bitsandbytes
    nests its quantisation state in one dict per parameter)."""
    found = set()
    for per_param in saved["state"].values():
        for key, value in per_param.items():
            values = value.items() if isinstance(value, dict) else [(key, value)]
            found |= {(k, v.dtype) for k, v in values if torch.is_tensor(v) and v.dim()
                      and k not in ("qmap1", "qmap2", "absmax1", "absmax2")}
    return found


F32, U8 = torch.float32, torch.uint8
EIGHT_BIT_MOMENTS = {("state1", U8), ("state2", U8),  # tensors of >= 4096 values
                     ("state1", F32), ("state2", F32)}  # smaller ones keep 32-bit state
MOMENTS = {"adamw": {("exp_avg", F32), ("exp_avg_sq", F32)},
           "adamw-8bit": EIGHT_BIT_MOMENTS, "paged-adamw-8bit": EIGHT_BIT_MOMENTS,
           # factored statistics for matrices, a full one for the norms' scales
           "adafactor": {("exp_avg_sq_row", F32), ("exp_avg_sq_col", F32), ("exp_avg_sq", F32)}}


# ----------------------------------------------------------------------------- train + resume

@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_trains_and_resumes_exactly(world, tmp_path, name):
    settings = dict(optimizer=name, max_steps=6, save_every=3, log_every=1, lr=1e-2,
                    weight_decay=0.1, warmup_ratio=0.2, grad_accum=2)
    full = tmp_path / "full"
    run_training(world, full, **settings)
    curve = train_losses(full)
    assert [s for s, _ in curve] == [1, 2, 3, 4, 5, 6]
    losses = [loss for _, loss in curve]
    assert all(math.isfinite(x) for x in losses) and min(losses[3:]) < losses[0], losses
    start = load_file(world.student / "model.safetensors")
    trained = load_file(full / "final" / "model.safetensors")
    assert not torch.equal(start["model.layers.0.mlp.up_proj.weight"],
                           trained["model.layers.0.mlp.up_proj.weight"])
    assert f"optimizer: {name}" in (full / "config.yaml").read_text()
    assert moments(optimizer_state(full)) == MOMENTS[name]

    # A run stopped after step 3: its directory holds exactly what the full run had then.
    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / CHECKPOINT, part / "checkpoints" / CHECKPOINT)
    shutil.copy(full / "config.yaml", part / "config.yaml")
    run_training(world, part, resume="latest", **settings)
    resumed = train_losses(part)
    assert [s for s, _ in resumed] == [4, 5, 6]
    # bit for bit so far on this CPU; the tolerance allows a kernel's threads to reorder a sum
    assert [x for _, x in resumed] == pytest.approx(losses[3:], rel=1e-6, abs=0)
    final = load_file(part / "final" / "model.safetensors")
    for key in trained:
        torch.testing.assert_close(final[key], trained[key], rtol=1e-5, atol=1e-7)


def test_resuming_with_another_optimizer_is_refused(world, tmp_path):
    from student_train.cli import main

    run = tmp_path / "run"
    run_training(world, run, optimizer="adamw-8bit", max_steps=2, save_every=2)
    with pytest.raises(ConfigError) as err:
        run_training(world, run, optimizer="adafactor", max_steps=2, save_every=2,
                     resume="latest")
    assert "optimizer: run has 'adamw-8bit', now 'adafactor'" in str(err.value)
    result = CliRunner().invoke(main, [
        "--store", str(world.store), "--student", str(world.student), "--out", str(run),
        "--max-steps", "2", "--save-every", "2", "--batch-tokens", "256", "--lr", "3e-3",
        "--warmup-ratio", "0", "--verify-store", "none", "--optimizer", "adamw",
        "--resume"], catch_exceptions=False)
    assert result.exit_code == 1
    assert "optimizer: run has 'adamw-8bit', now 'adamw'" in result.output
    assert "\n\n" not in result.output.strip()


def test_eight_bit_optimizers_train_lora_adapters(world, tmp_path, caplog):
    """LoRA r=64 on the 64-wide tiny model: its 64x64 A and q/o B matrices (4096 values) are
    large enough for bitsandbytes' 8-bit state, the k/v B matrices (32x64) keep 32-bit."""
    run = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # bitsandbytes' CPU paging warning
        with caplog.at_level(logging.INFO, logger="student_train.optimizers"):
            run_training(world, run, optimizer="paged-adamw-8bit", lora_r=64, lr=1e-2,
                         max_steps=3, save_every=3, log_every=1)
    assert "where bitsandbytes does not page" in caplog.text
    assert "keep 8-bit state" in caplog.text
    assert moments(optimizer_state(run)) == EIGHT_BIT_MOMENTS
    merged = load_file(run / "final" / "model.safetensors")
    base = load_file(world.student / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[key], base[key])  # the trained adapters were merged in
    assert all(math.isfinite(x) for _, x in train_losses(run))


# ----------------------------------------------------------------------------- unit checks

def _toy_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(100, 64),  # 6400 values: 8-bit state
                               torch.nn.Linear(64, 16),  # 1024: 32-bit state in bitsandbytes
                               torch.nn.LayerNorm(16))


def _one_step(optimizer, model) -> None:
    model(torch.arange(10)).pow(2).mean().backward()
    optimizer.step()


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_state_bytes_counts_each_optimizers_real_state(name):
    model = _toy_model()
    optimizer = make_optimizer(config(optimizer=name, weight_decay=0.1), model)
    _one_step(optimizer, model)
    for p in model.parameters():
        held = sum(v.numel() * v.element_size() for k, v in optimizer.state[p].items()
                   if torch.is_tensor(v) and k not in ("qmap1", "qmap2"))  # maps are shared
        assert held == state_bytes(name, tuple(p.shape)), (name, tuple(p.shape))
    n = 4096 * 1024
    per_param = {o: state_bytes(o, (4096, 1024)) / n for o in OPTIMIZERS}
    assert per_param["adamw"] == pytest.approx(8)
    assert per_param["adamw-8bit"] == per_param["paged-adamw-8bit"] == pytest.approx(2, rel=0.02)
    assert per_param["adafactor"] < 0.01


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_matrices_decay_and_vectors_do_not(name):
    model = _toy_model()
    optimizer = make_optimizer(config(optimizer=name, weight_decay=0.1, lr=0.01), model)
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert {id(p) for p in model.parameters()} == set(decay)
    assert all(decay[id(p)] == (0.1 if p.dim() >= 2 else 0.0) for p in model.parameters())
    assert all(g["lr"] == 0.01 for g in optimizer.param_groups)


def test_adafactor_steps_with_the_schedules_lr(caplog):
    """relative_step off: a group's lr (the scheduler's) is the step size; lr 0 moves nothing,
    where Adafactor's own relative step would still move every weight."""
    model = _toy_model()
    with caplog.at_level(logging.WARNING, logger="student_train.optimizers"):
        optimizer = make_optimizer(config(optimizer="adafactor", adam_beta2=0.95), model)
    assert "optimizer adafactor ignores adam_beta2" in caplog.text
    before = [p.detach().clone() for p in model.parameters()]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    _one_step(optimizer, model)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    for group in optimizer.param_groups:
        group["lr"] = 1e-2
    _one_step(optimizer, model)
    assert not torch.equal(before[0], model[0].weight)


def test_missing_bitsandbytes_is_refused_with_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails, find_spec: None
    monkeypatch.delitem(sys.modules, "bitsandbytes.optim", raising=False)
    with pytest.raises(ConfigError) as err:
        config(optimizer="adamw-8bit")
    message = str(err.value)
    assert "optimizer adamw-8bit needs bitsandbytes" in message and "pip install" in message
    assert "\n\n" not in message
    config(optimizer="adafactor")  # the others do not need it
    # Installed when the config was checked, gone (or broken) when the optimizer is made:
    cfg = dataclasses.replace(config(optimizer="adamw"), optimizer="paged-adamw-8bit")
    with pytest.raises(ConfigError, match="paged-adamw-8bit needs bitsandbytes.*pip install"):
        make_optimizer(cfg, _toy_model())


def test_unknown_optimizer_is_a_config_problem():
    with pytest.raises(ConfigError, match="optimizer .*must be one of"):
        config(optimizer="sgd")


@pytest.mark.skipif("fsdp" not in FIELDS, reason="the fsdp setting is not in this checkout")
@pytest.mark.parametrize("name", ["adamw-8bit", "paged-adamw-8bit", "adafactor"])
def test_fsdp_takes_adamw_only(name):
    with pytest.raises(ConfigError, match=f"optimizer {name} cannot step the sharded"):
        config(optimizer=name, fsdp=True)
    assert config(optimizer="adamw", fsdp=True).fsdp
