"""student-train --fsdp (student_train/sharding.py): sharded training equals unsharded training.

Fast tests run FSDP2 in this process over a process group of one (what `student-train --fsdp`
does when not launched by torchrun): the same wrapping, DTensor parameters, gathers,
reduce-scatters, sharded checkpoints and final gather as with N processes. The @slow tests
launch 2 gloo processes with accelerate (as tests/test_train.py's DDP test does) and check the
issue's evidence: per-step losses equal to a 1-process run at equal global batch, an exact
resume after kill -9, `final/` loading with from_pretrained, LoRA + gradient checkpointing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from logitstore.errors import ConfigError, LogitStoreError
from train_helpers import build_world, read_metrics, run_training, shared_world, train_losses

REPO = Path(__file__).resolve().parents[1]
# Each micro-batch holds one 12-token sample (fixed_length=12 stores, batch_tokens 24 rounds
# to whole samples): the global batch is batch_tokens x processes x grad_accum.
ALIGN = dict(hidden_weight=1.0, attention_weight=1.0)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return shared_world(tmp_path_factory)


@pytest.fixture
def fresh_accelerate():
    """accelerate's process state is a per-process singleton, and --fsdp starts a process
    group of one and sets its environment: each run here starts and ends without either."""
    from accelerate.state import AcceleratorState, GradientState

    def reset():
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    saved = dict(os.environ)
    reset()
    yield reset
    reset()
    os.environ.clear()
    os.environ.update(saved)


def run_isolated(reset, world, out: Path, **settings):
    """One training run with accelerate's state reset before and after it."""
    reset()
    env = dict(os.environ)
    try:
        return run_training(world, out, **settings)
    finally:
        reset()
        os.environ.clear()
        os.environ.update(env)


def logits_of(model_dir: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return model(torch.arange(5, 37).reshape(2, 16)).logits


def assert_same_losses(a: Path, b: Path, tol: float = 1e-5) -> None:
    """Every logged training/eval value of the two runs, step by step, within `tol`."""
    ma, mb = read_metrics(a), read_metrics(b)
    assert [m["step"] for m in ma] == [m["step"] for m in mb] and ma
    for x, y in zip(ma, mb):
        keys = [k for k in x if k.startswith(("train/loss", "train/kd", "train/ce",
                                               "train/hidden", "train/attention", "eval/"))]
        assert keys
        for key in keys:
            assert y[key] == pytest.approx(x[key], abs=tol, rel=tol), (x["step"], key)


# ----------------------------------------------------------------------------- one process

def test_one_process_fsdp_equals_unsharded_training_and_saves_a_plain_model(
        world, tmp_path, fresh_accelerate, monkeypatch):
    import student_train.objective as objective
    from torch.distributed.tensor import DTensor

    heads = []  # the lm_head weight the objective hands the fused loss, at every call

    def recording(hidden, weight, *args, **kwargs):
        heads.append((type(weight), tuple(weight.shape)))
        return fused_head_loss(hidden, weight, *args, **kwargs)

    fused_head_loss = objective.fused_head_loss
    monkeypatch.setattr(objective, "fused_head_loss", recording)
    settings = dict(max_steps=4, grad_accum=2, log_every=1, eval_fraction=0.25, eval_every=2,
                    save_every=2, **ALIGN)
    plain, sharded = tmp_path / "plain", tmp_path / "sharded"
    run_isolated(fresh_accelerate, world, plain, **settings)
    run_isolated(fresh_accelerate, world, sharded, fsdp=True, **settings)
    assert_same_losses(plain, sharded)
    # The root unit is gathered while its forward runs: a whole plain tensor, not a shard.
    assert heads and all(kind is torch.nn.Parameter and not issubclass(kind, DTensor)
                         and shape == heads[0][1] for kind, shape in heads)
    # Checkpoints are sharded (torch.distributed.checkpoint), not one model file.
    ckpt = sharded / "checkpoints" / "step-00000004"
    assert (ckpt / "pytorch_model_fsdp_0" / ".metadata").is_file()
    assert not (ckpt / "model.safetensors").exists()
    # final/ is a plain HF model equal to the unsharded run's; alignment projections too.
    a, b = load_file(plain / "final" / "model.safetensors"), \
        load_file(sharded / "final" / "model.safetensors")
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits_of(sharded / "final"), logits_of(plain / "final"),
                               rtol=1e-4, atol=1e-4)
    pa, pb = load_file(plain / "alignment.safetensors"), \
        load_file(sharded / "alignment.safetensors")
    assert set(pa) == set(pb) == {"hidden.teacher.projections.-1.weight",
                                  "hidden.teacher.projections.-1.bias"}
    for key in pa:
        torch.testing.assert_close(pb[key], pa[key], rtol=1e-4, atol=1e-5)
    meta = json.loads((sharded / "training_metadata.json").read_text())
    assert meta["config"]["fsdp"] is True and meta["world_size"] == 1


def test_one_process_fsdp_resumes_exactly_and_refuses_to_resume_unsharded(
        world, tmp_path, fresh_accelerate):
    from tiny_hf import make_tiny_llama

    # Tied embeddings: one parameter that is both the input embedding and the lm_head.
    student = make_tiny_llama(tmp_path / "student", world.tokenizer, tie_word_embeddings=True)
    settings = dict(max_steps=4, log_every=1, save_every=2, fsdp=True, warmup_ratio=0.25,
                    student=str(student))
    full = tmp_path / "full"
    run_isolated(fresh_accelerate, world, full, **settings)
    part = tmp_path / "part"  # what a run stopped after step 2 leaves
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-00000002", part / "checkpoints" / "step-00000002")
    shutil.copy(full / "config.yaml", part / "config.yaml")
    with pytest.raises(ConfigError, match="fsdp: run has True, now False"):
        run_isolated(fresh_accelerate, world, part, resume="latest",
                     **{**settings, "fsdp": False})
    run_isolated(fresh_accelerate, world, part, resume="latest", **settings)
    assert train_losses(part) == train_losses(full)[2:]  # bit for bit
    a, b = load_file(full / "final" / "model.safetensors"), \
        load_file(part / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(part / "final")
    assert final.get_output_embeddings().weight is final.get_input_embeddings().weight
    assert not torch.equal(final.get_input_embeddings().weight,
                           load_file(student / "model.safetensors")["model.embed_tokens.weight"])


def test_one_process_fsdp_lora_with_gradient_checkpointing(world, tmp_path, fresh_accelerate):
    settings = dict(max_steps=3, lora_r=4, lr=1e-2, log_every=1, save_every=3,
                    gradient_checkpointing=True)
    plain, sharded = tmp_path / "plain", tmp_path / "sharded"
    run_isolated(fresh_accelerate, world, plain, **settings)
    run_isolated(fresh_accelerate, world, sharded, fsdp=True, **settings)
    assert_same_losses(plain, sharded)
    assert (sharded / "adapter" / "adapter_config.json").is_file()
    merged = load_file(sharded / "final" / "model.safetensors")
    assert not any("lora" in k for k in merged)
    base = load_file(world.student / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[key], base[key])  # the trained adapters were merged in
    torch.testing.assert_close(logits_of(sharded / "final"), logits_of(plain / "final"),
                               rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- refusals

def test_fsdp_with_qlora_is_refused_in_one_paragraph(tmp_path):
    from click.testing import CliRunner

    from student_train.cli import main

    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["--store", str(tmp_path), "--student", "m", "--out",
                                       str(out), "--fsdp", "--qlora", "--lora-r", "8"],
                                catch_exceptions=False)
    assert result.exit_code == 1  # a config error, before anything is loaded or written
    problems = [line for line in result.output.splitlines() if "fsdp" in line]
    assert len(problems) == 1
    assert "fsdp with qlora" in problems[0] and "--qlora without --fsdp" in problems[0]
    assert not out.exists()


def test_sharding_must_be_the_one_asked_for():
    from accelerate.utils import DistributedType

    from student_train.sharding import check_sharding

    check_sharding(SimpleNamespace(distributed_type=DistributedType.FSDP), True)
    check_sharding(SimpleNamespace(distributed_type=DistributedType.MULTI_GPU), False)
    with pytest.raises(LogitStoreError, match="not FSDP, so nothing would be sharded"):
        check_sharding(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU), True)
    with pytest.raises(LogitStoreError, match="was not given --fsdp"):
        check_sharding(SimpleNamespace(distributed_type=DistributedType.FSDP), False)


def test_fsdp_units_are_the_transformer_blocks_or_it_refuses(world):
    from student_train.sharding import block_classes, shard_blocks

    class NoBlocks(torch.nn.Module):
        _no_split_modules = ["LlamaDecoderLayer"]  # named, but not in this model

        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(2, 2)

    assert block_classes(NoBlocks()) == []
    from transformers import AutoModelForCausalLM

    from student_train.student import apply_lora

    llama = AutoModelForCausalLM.from_pretrained(world.student)
    assert block_classes(llama) == ["LlamaDecoderLayer"]
    lora = apply_lora(llama, SimpleNamespace(lora_r=2, lora_alpha=None, lora_dropout=0.0,
                                             lora_targets=()))
    assert block_classes(lora) == ["LlamaDecoderLayer"]
    with pytest.raises(ConfigError, match="names no transformer block class"):
        shard_blocks(None, NoBlocks())


# ----------------------------------------------------------------------------- 2 processes

SLOW = dict(max_steps=8, batch_tokens=24, lr=3e-3, eval_fraction=0.25, eval_every=4,
            save_every=2, shuffle=False, log_every=1, warmup_ratio=0.0)


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    """12-token samples: a 24-token micro-batch holds exactly one per process."""
    root = tmp_path_factory.mktemp("fsdp-world")
    return build_world(root / "world", fixed_length=12, n=32)


def launch_two(world, out: Path, *flags: str, wait: bool = True, **settings):
    """`accelerate launch` of 2 gloo processes training with --fsdp. accelerate's `--cpu
    --num_processes 2` starts one process without MPI; `--multi_gpu` with ACCELERATE_USE_CPU=1
    starts two gloo processes through torchrun (tests/test_train.py's DDP test does the same)."""
    from logitstore.toolkit.local_server import free_port

    args = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu",
            "--num_processes", "2", "--main_process_port", str(free_port()),
            "-m", "student_train", "--store", str(world.store), "--student", str(world.student),
            "--out", str(out), "--verify-store", "none", "--fsdp", *flags]
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        args += ([flag] if value is True else [f"--no-{flag[2:]}"] if value is False
                 else [flag, str(value)])
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def last_records(run: Path) -> dict[tuple[str, int], dict]:
    """The last train and eval record of every step, timings left out (a resumed run re-logs
    the steps after its checkpoint that the killed run had logged)."""
    out = {}
    for m in read_metrics(run):
        timing = ("train/tokens_per_s",)  # wall clock, not training math
        out[("eval" if "eval/loss" in m else "train", m["step"])] = {
            k: v for k, v in m.items() if k not in timing}
    return out


def trained_student_state(ckpt: Path) -> dict[str, torch.Tensor]:
    """The student's weights in a sharded (torch.distributed.checkpoint) checkpoint."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    whole = ckpt.parent / (ckpt.name + ".pt")
    dcp_to_torch_save(ckpt / "pytorch_model_fsdp_0", whole)
    state = torch.load(whole, weights_only=True)
    state = state.get("model", state)
    return {k.removeprefix("student."): v for k, v in state.items() if k.startswith("student.")}


@pytest.mark.slow
def test_two_fsdp_processes_equal_one_resume_after_kill_9_and_save_a_plain_model(
        small_world, tmp_path, fresh_accelerate):
    one, two, killed = tmp_path / "one", tmp_path / "two", tmp_path / "killed"
    run_isolated(fresh_accelerate, small_world, one, grad_accum=2, **ALIGN, **SLOW)
    launch_two(small_world, two, grad_accum=1, hidden_weight=1.0, attention_weight=1.0, **SLOW)
    # Equal global batch (24 tokens x 2 processes x 1 = 24 x 1 x 2): the same losses.
    assert_same_losses(one, two)
    assert json.loads((two / "training_metadata.json").read_text())["world_size"] == 2
    # final/ holds exactly the trained (checkpointed, sharded) weights, as a plain HF model.
    final = load_file(two / "final" / "model.safetensors")
    trained = trained_student_state(two / "checkpoints" / "step-00000008")
    assert set(final) <= set(trained) and final
    assert all(torch.equal(final[k], trained[k]) for k in final)
    torch.testing.assert_close(logits_of(two / "final"), logits_of(one / "final"),
                               rtol=1e-4, atol=1e-4)

    # kill -9 both processes once the step-2 checkpoint is complete, then resume.
    proc = launch_two(small_world, killed, grad_accum=1, hidden_weight=1.0,
                      attention_weight=1.0, wait=False, **SLOW)
    deadline = time.monotonic() + 300
    while not (killed / "checkpoints" / "step-00000002").is_dir():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert not (killed / "final").exists()  # it was killed before the end
    launch_two(small_world, killed, "--resume", grad_accum=1, hidden_weight=1.0,
               attention_weight=1.0, **SLOW)
    assert last_records(killed) == last_records(two)  # every later loss, bit for bit
    a, b = load_file(two / "final" / "model.safetensors"), \
        load_file(killed / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_fsdp_processes_train_lora_with_gradient_checkpointing(small_world, tmp_path,
                                                                  fresh_accelerate):
    from transformers import AutoModelForCausalLM

    one, two = tmp_path / "one", tmp_path / "two"
    # No LoRA dropout: 1 process draws its masks from one RNG stream, 2 processes from two.
    lora = dict(lora_r=4, lr=1e-2, gradient_checkpointing=True, lora_dropout=0.0)
    run_isolated(fresh_accelerate, small_world, one, grad_accum=2,
                 **{**SLOW, **lora, "max_steps": 4})
    launch_two(small_world, two, grad_accum=1, **{**SLOW, **lora, "max_steps": 4})
    assert_same_losses(one, two)
    assert (two / "adapter" / "adapter_config.json").is_file()
    merged = load_file(two / "final" / "model.safetensors")
    assert not any("lora" in k for k in merged)
    AutoModelForCausalLM.from_pretrained(two / "final")
    torch.testing.assert_close(logits_of(two / "final"), logits_of(one / "final"),
                               rtol=1e-4, atol=1e-4)
