"""The memory plan (student_train/memory_plan.py): exact parameter rows, the rules of each
optimizer, FSDP, LoRA, the batch solve, the suggestion, `--plan` and the checks in train()."""

from __future__ import annotations

import math

import pytest
import torch
from click.testing import CliRunner

from logitstore.errors import ConfigError, LogitStoreError
from student_train.config import resolve_config
from student_train.memory_plan import NF4_BYTES_PER_PARAM, GiB, estimate, parse_memory_size
from student_train.optimizers import state_bytes
from train_helpers import read_metrics, run_training, shared_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return shared_world(tmp_path_factory)


def tiny_config(**overrides):
    from transformers import LlamaConfig

    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                 tie_word_embeddings=False)
    return LlamaConfig(**{**shape, **overrides})


def llama_1b():
    """Llama-3.2-1B's config.json values (the hub is not reachable here)."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                       vocab_size=128256, tie_word_embeddings=True,
                       max_position_embeddings=131072)


def cfg_of(**overrides):
    settings = {"data": ["unused.jsonl"], "student": "org/tiny", "out": "unused-run"}
    return resolve_config(None, {**settings, **overrides})


def plan_of(model_config=None, processes=1, gpu_memory=None, device="cuda", **overrides):
    return estimate(cfg_of(**overrides), processes, gpu_memory,
                    model_config=model_config or tiny_config(), device=device)


# ----------------------------------------------------------------------------- rows

@pytest.mark.parametrize("tied", [False, True])
def test_parameter_rows_equal_the_real_model(tied):
    from transformers import LlamaForCausalLM

    config = tiny_config(tie_word_embeddings=tied)
    model = LlamaForCausalLM(config)
    params = list(model.parameters())  # shared (tied) tensors once
    n = sum(p.numel() for p in params)
    plan = plan_of(config)
    assert plan.facts["parameters"] == plan.facts["trainable_parameters"] == n
    assert plan.facts["tied_embeddings"] is tied
    assert plan.weights == plan.gradients == 4 * n  # fp32 weights and gradients
    assert plan.optimizer == sum(2 * 4 * p.numel() + 4 for p in params)  # AdamW: 2 moments
    half = plan_of(config, student_dtype="bfloat16")
    assert half.weights == half.gradients == 2 * n


def test_lora_rows_equal_peft(world):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    config = tiny_config()
    targets = ["q_proj", "v_proj", "down_proj"]
    peft_model = get_peft_model(LlamaForCausalLM(config),
                                LoraConfig(r=4, target_modules=targets, task_type="CAUSAL_LM"))
    trained = [p for p in peft_model.parameters() if p.requires_grad]
    plan = plan_of(config, lora_r=4, lora_targets=targets)
    assert plan.facts["trainable_parameters"] == sum(p.numel() for p in trained)
    assert plan.gradients == sum(4 * p.numel() for p in trained)
    base = sum(p.numel() for p in peft_model.parameters() if not p.requires_grad)
    assert plan.weights == 4 * (base + sum(p.numel() for p in trained))
    full = plan_of(config)
    assert plan.optimizer < full.optimizer / 10 and plan.gradients < full.gradients / 10


def test_optimizer_rows_follow_each_optimizer_rule():
    from transformers import LlamaForCausalLM

    config = tiny_config()
    shapes = [tuple(p.shape) for p in LlamaForCausalLM(config).parameters()]
    for optimizer in ("adamw", "adamw-8bit", "adafactor"):
        assert plan_of(config, optimizer=optimizer).optimizer == sum(
            state_bytes(optimizer, s) for s in shapes)
    matrix = 300 * 64  # the embedding: 8-bit moments and one fp32 absmax per 256 values
    assert state_bytes("adamw-8bit", (300, 64)) == 2 * matrix + 8 * math.ceil(matrix / 256)
    assert state_bytes("adafactor", (300, 64)) == (300 + 64) * 4 + 4
    big = llama_1b()
    full = plan_of(big, optimizer="adamw").optimizer
    assert plan_of(big, optimizer="adamw-8bit").optimizer < full / 3.9
    assert plan_of(big, optimizer="adafactor").optimizer < full / 100


def test_fsdp_divides_weights_gradients_and_optimizer_over_the_processes():
    one = plan_of(llama_1b())
    four = plan_of(llama_1b(), processes=4, fsdp=True)
    for row in ("weights", "gradients", "optimizer"):
        assert getattr(four, row) == pytest.approx(getattr(one, row) / 4, abs=1)
    assert four.other_rows["FSDP all-gathered units"] > 0
    assert four.activations == one.activations  # every process its own micro-batch
    ddp = plan_of(llama_1b(), processes=2)  # no sharding: DDP adds its gradient buckets
    assert ddp.weights == one.weights and ddp.other_rows["DDP gradient buckets"] == ddp.gradients


def test_qlora_weights_are_about_half_a_byte_per_quantised_parameter():
    big = llama_1b()
    plan = plan_of(big, lora_r=16, qlora=True)
    lora = plan.facts["trainable_parameters"]
    embedding = 128256 * 2048
    norms = (2 * 16 + 1) * 2048  # two per layer and the final one: fp32, like the embedding
    quantised = plan.facts["parameters"] - embedding - norms
    assert NF4_BYTES_PER_PARAM == pytest.approx(0.516, abs=0.001)
    expected = quantised * NF4_BYTES_PER_PARAM + (embedding + norms) * 4 + 4 * lora
    assert plan.weights == pytest.approx(expected, abs=1)
    assert plan.weights < plan_of(big, lora_r=16).weights / 2.5


def test_activations_grow_with_batch_tokens_and_checkpointing_cuts_them():
    sizes = (512, 1024, 4096, 16384)
    lora = [plan_of(llama_1b(), batch_tokens=b, lora_r=16).total for b in sizes]
    assert lora == sorted(lora) and len(set(lora)) == 4  # the forward is LoRA's peak
    # a full fine-tune peaks at the optimizer step until the activations outgrow it
    full = [plan_of(llama_1b(), batch_tokens=b) for b in sizes]
    assert [p.total for p in full] == sorted(p.total for p in full)
    assert full[0].peak_phase == "step" and full[-1].peak_phase == "forward"
    assert full[0].total > max(v for n, v in full[0].phases.items() if n != "step")
    plan = plan_of(llama_1b(), batch_tokens=8192)
    assert plan.activations_checkpointed < plan.activations / 4
    on = plan_of(llama_1b(), batch_tokens=8192, gradient_checkpointing=True)
    assert on.total < plan.total and on.activations_checkpointed == plan.activations_checkpointed


def _saved_bytes_per_layer(model, config, tokens: int) -> list[float]:
    """What autograd keeps per decoder layer in a forward (storages once, parameters not)."""
    seen = {p.untyped_storage().data_ptr() for p in model.parameters()}
    current, kept = [None], [0] * config.num_hidden_layers
    layers = model.get_decoder().layers
    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda *_a, i=i: current.__setitem__(0, i))
        layer.register_forward_hook(lambda *_a: current.__setitem__(0, None))

    def pack(t):
        storage = t.untyped_storage()
        if current[0] is not None and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            kept[current[0]] += storage.nbytes()
        return t

    ids = torch.randint(0, config.vocab_size, (2, tokens // 2))
    positions = torch.arange(tokens // 2).repeat(2, 1)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.get_decoder()(input_ids=ids, position_ids=positions)
    return [b / tokens for b in kept]


@pytest.mark.parametrize("lora_r", [0, 4])
def test_layer_activations_equal_what_autograd_keeps(lora_r):
    from transformers import LlamaForCausalLM

    from student_train import memory_plan_terms as terms
    from student_train.memory_plan import Knobs
    from student_train.memory_plan_facts import StoreFacts, model_facts

    config = tiny_config(intermediate_size=96, head_dim=24, attn_implementation="sdpa")
    cfg = cfg_of(lora_r=lora_r, mixed_precision="no")
    model = LlamaForCausalLM(config).train()
    if lora_r:
        from student_train.student import apply_lora

        model = apply_lora(model, cfg).base_model.model
    k = Knobs.of(cfg, 1, "cpu")
    planned = terms.layer_kept_per_token(model_facts(cfg, config),
                                         StoreFacts(longest_sample=32, shortest_sample=32), k)
    kept = _saved_bytes_per_layer(model, config, tokens=64)
    assert kept[1] == pytest.approx(planned, abs=0.01)  # layer 0 keeps less with LoRA


def test_phases_hold_what_was_measured():
    config = tiny_config(tie_word_embeddings=True)
    vd = 300 * 64 * 4
    full = plan_of(config, device="cpu", batch_tokens=64)
    static = full.weights + full.optimizer
    # the backward ends with the embedding's dense gradient and its sum with the head's
    assert full.phases["backward"] >= static + full.gradients + 2 * vd
    # no parameter gradient in the forward (grad_accum 1), but the fused head's [V, d]
    assert full.other_rows["lm_head gradient (fused head)"] == vd
    assert full.phases["forward"] == pytest.approx(
        static + full.activations + full.kd_buffers + vd, abs=2)
    accumulating = plan_of(config, device="cpu", batch_tokens=64, grad_accum=2)
    assert accumulating.phases["forward"] == full.phases["forward"] + full.gradients
    lora = plan_of(config, device="cpu", batch_tokens=64, lora_r=4)
    assert "lm_head gradient (fused head)" not in lora.other_rows
    assert full.total == max(full.phases.values())  # the CPU plan has no CUDA rows
    cuda = plan_of(config, batch_tokens=64)
    assert cuda.total > max(cuda.phases.values())  # context and allocator reserve
    assert "peak" in cuda.render() and cuda.peak_phase in cuda.phases


def test_max_batch_tokens_fits_and_one_more_chunk_does_not():
    budget = parse_memory_size("24GiB")
    plan = plan_of(llama_1b(), gpu_memory=budget, lora_r=16, gradient_checkpointing=True)
    best = plan.max_batch_tokens
    assert plan.fits and best > plan.facts["batch_tokens"]
    at = plan_of(llama_1b(), gpu_memory=budget, lora_r=16, gradient_checkpointing=True,
                 batch_tokens=best)
    assert at.fits and at.total <= budget
    for more in (best + 1, best + 1024):
        over = plan_of(llama_1b(), gpu_memory=budget, lora_r=16, gradient_checkpointing=True,
                       batch_tokens=more)
        assert not over.fits and over.total > budget


def test_full_fine_tune_of_llama_1b_does_not_fit_one_24gb_card_and_the_suggestion_does():
    budget = parse_memory_size("24GB")
    plan = plan_of(llama_1b(), gpu_memory=budget, batch_tokens=4096)
    assert plan.weights + plan.gradients + plan.optimizer > 19.5e9  # ~20 GB before activations
    assert plan.fits is False and plan.suggestion
    # the suggestion was found by planning it: applying it fits
    assert plan.suggestion == "--gradient-checkpointing --optimizer adamw-8bit" or \
        plan.suggestion.startswith("--optimizer adamw-8bit")
    fixed = plan_of(llama_1b(), gpu_memory=budget, batch_tokens=4096, optimizer="adamw-8bit",
                    gradient_checkpointing="--gradient-checkpointing" in plan.suggestion)
    assert fixed.fits
    text = plan.render()
    assert "does NOT fit" in text and "smallest change that fits" in text
    assert plan.as_dict()["total"] == plan.total


def test_parse_memory_size_accepts_units_and_refuses_junk():
    assert parse_memory_size("24GiB") == 24 * GiB
    assert parse_memory_size("24 GB") == 24 * 10**9
    assert parse_memory_size("1536MiB") == 1536 << 20 and parse_memory_size("16G") == 16 * 10**9
    for junk in ("", "lots", "-3GB", "0GiB", "24XB", "GiB"):
        with pytest.raises(ConfigError, match="expected a positive size"):
            parse_memory_size(junk)


# ----------------------------------------------------------------------------- the CLI

def _cli(args):
    from student_train.cli import main

    return CliRunner().invoke(main, args)


def _forbid_weights(monkeypatch):
    from transformers import PreTrainedModel

    def refuse(*_a, **_k):
        raise AssertionError("the memory plan loaded weights")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr("student_train.train.load_student", refuse)


def test_plan_prints_the_table_loads_no_weights_and_needs_no_out(world, monkeypatch):
    _forbid_weights(monkeypatch)
    args = ["--plan", "--store", str(world.store), "--student", str(world.student),
            "--gpu-memory", "8GiB", "--hidden-weight", "1"]
    result = _cli(args)
    assert result.exit_code == 0, result.output
    assert "total" in result.output and "fits in 8.00 GiB" in result.output
    assert "KD target widths [8]" in result.output  # the store's top-k, from its manifest
    tight = _cli(args[:-3] + ["1MiB"])
    assert tight.exit_code == 1
    assert "does NOT fit" in tight.output and "smallest change that fits" in tight.output


def test_bad_gpu_memory_is_one_paragraph_and_exit_1(world):
    result = _cli(["--plan", "--store", str(world.store), "--student", str(world.student),
                   "--gpu-memory", "a lot"])
    assert result.exit_code == 1
    assert "gpu_memory" in result.output and "24GiB" in result.output
    assert "Traceback" not in result.output


def test_store_facts_count_the_alignment_projection(world):
    cfg = resolve_config(None, {"store": str(world.store), "student": str(world.student),
                                "out": "x", "hidden_weight": 1.0})
    plan = estimate(cfg)
    assert plan.facts["alignment_parameters"] == 64 * 64 + 64  # one d_s -> d_t projection


# ----------------------------------------------------------------------------- training

def test_training_refuses_a_config_that_cannot_fit_before_loading(world, tmp_path,
                                                                   monkeypatch):
    _forbid_weights(monkeypatch)
    with pytest.raises(ConfigError, match="smallest change that fits"):
        run_training(world, tmp_path / "run", max_steps=2, gpu_memory="2MiB")


def test_training_on_cuda_checks_the_plan_against_the_gpu_without_gpu_memory(
        world, tmp_path, monkeypatch):
    """No --gpu-memory: on a CUDA device the plan is checked against that GPU's memory
    (the device is faked: a 2 MiB card), before any weight is loaded."""
    import types

    import torch

    _forbid_weights(monkeypatch)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: types.SimpleNamespace(total_memory=2 << 20))
    with pytest.raises(ConfigError, match="smallest change that fits"):
        run_training(world, tmp_path / "run", max_steps=2)


def test_out_of_memory_ends_in_one_paragraph_and_resume_continues(world, tmp_path,
                                                                  monkeypatch):
    from student_train.step import Step

    real_train, calls = Step.train, []

    def third_step_runs_out(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_train(self, *args, **kwargs)

    monkeypatch.setattr(Step, "train", third_step_runs_out)
    run = tmp_path / "run"
    settings = dict(max_steps=4, save_every=2, log_every=1)
    with pytest.raises(LogitStoreError) as info:
        run_training(world, run, **settings)
    message = str(info.value)
    assert "out of memory" in message and "rerun with --resume" in message
    assert "\n" not in message and "suggests" in message
    monkeypatch.setattr(Step, "train", real_train)
    run_training(world, run, resume="latest", gradient_checkpointing=True, **settings)
    steps = [m["step"] for m in read_metrics(run) if "train/loss" in m]
    assert steps == [1, 2, 3, 4] and (run / "final").is_dir()
