"""student-train end to end on a tiny Llama teacher's real signals (tests/train_helpers.py).

Runs train() in this process: importing transformers + peft costs ~20 s per process on the
shared CI machine, paid once here. The 2-process run is @slow; its pieces (exact loss
normalisation over micro-batches and processes) are checked fast below.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from logitstore.errors import ChecksumError, ConfigError, SchemaMismatchError
from train_helpers import (build_world, read_metrics, run_training, shared_world, train_losses)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return shared_world(tmp_path_factory)


def evals(run: Path) -> list[dict]:
    return [m for m in read_metrics(run) if "eval/kd" in m]


# ----------------------------------------------------------------------------- distillation

def test_distillation_lowers_heldout_kd_and_saves_a_loadable_student(world, tmp_path):
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    final = run_training(world, run, max_steps=24, eval_fraction=0.25, eval_every=12,
                         eval_on_start=True, alpha=0.9, log_every=4)
    history = evals(run)
    assert [m["step"] for m in history] == [0, 12, 24]
    before, after = history[0]["eval/kd"], history[-1]["eval/kd"]
    assert after < before - 0.1, history  # held-out rows: the student generalises the teacher
    assert final["eval/kd"] == after and math.isfinite(final["eval/ppl"])

    model = AutoModelForCausalLM.from_pretrained(run / "final")  # a plain transformers model
    assert type(model).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 5, 9]])).logits).all()
    assert (run / "final" / "tokenizer.json").is_file()

    meta = json.loads((run / "training_metadata.json").read_text())
    manifest = (world.store / "manifest.json").read_bytes()
    assert meta["source"]["manifest_file_sha256"] == hashlib.sha256(manifest).hexdigest()
    assert meta["source"]["manifest_seal"] == json.loads(manifest)["manifest_sha256"]
    assert "manifest_sha256" not in meta["source"]  # the seal's own key, not a file hash
    assert meta["source"]["dataset_fingerprint"] == json.loads(manifest)["dataset_fingerprint"]
    assert meta["steps"] == 24 and meta["final_metrics"]["eval/kd"] == after
    assert meta["config"]["alpha"] == 0.9
    steps = [m for m in read_metrics(run) if "train/loss" in m]
    assert [m["step"] for m in steps] == [4, 8, 12, 16, 20, 24]
    assert all(k in steps[0] for k in ("train/kd", "train/ce", "train/lr", "train/tokens_per_s"))
    assert list((run / "tensorboard").rglob("events.out.tfevents*"))
    # run/config.yaml is itself a preset that resolves to the same config
    from student_train.config import resolve_config

    text = (run / "config.yaml").read_text()
    assert text.startswith("# student-train")
    assert resolve_config(run / "config.yaml").as_dict()["max_steps"] == 24


def test_sampled_target_packing_and_checkpointing_run(world, tmp_path):
    run = tmp_path / "run"
    run_training(world, run, max_steps=3, target="sampled", loss="jsd", temperature=2.0,
                 temperature_end=1.0, temperature_schedule="linear", log_every=1,
                 label_smoothing=0.1, packing=True, gradient_checkpointing=True)
    temps = [m["train/temperature"] for m in read_metrics(run)]
    assert temps[0] == 2.0 and temps[1] < 2.0
    assert all(math.isfinite(m["train/loss"]) for m in read_metrics(run))


# ----------------------------------------------------------------------------- resume

def test_resume_reproduces_the_uninterrupted_loss_curve(world, tmp_path):
    settings = dict(max_steps=6, grad_accum=2, save_every=3, log_every=1, eval_fraction=0.25,
                    eval_every=3, temperature=2.0, temperature_end=1.0,
                    temperature_schedule="exp", warmup_ratio=0.2, epochs=1)
    full = tmp_path / "full"
    run_training(world, full, **settings)
    # A run stopped after step 3: its directory holds exactly what the full run had then.
    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-00000003", part / "checkpoints" / "step-00000003")
    shutil.copy(full / "config.yaml", part / "config.yaml")
    run_training(world, part, resume="latest", **settings)

    full_curve, resumed = train_losses(full), train_losses(part)
    assert [s for s, _ in resumed] == [4, 5, 6]
    assert resumed == full_curve[3:]  # bit for bit on CPU
    assert [m for m in evals(part)] == [m for m in evals(full) if m["step"] > 3]
    a = load_file(full / "final" / "model.safetensors")
    b = load_file(part / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_changed_settings(world, tmp_path):
    run = tmp_path / "run"
    run_training(world, run, max_steps=2, save_every=2)
    with pytest.raises(ConfigError) as err:
        run_training(world, run, max_steps=2, save_every=2, lr=1e-2, resume="latest")
    assert "lr: run has 0.003, now 0.01" in str(err.value)


# ----------------------------------------------------------------------------- refusals

def test_tokenizer_mismatch_is_refused_showing_both_sides(world, tmp_path):
    from transformers import AutoTokenizer

    from logitstore.toolkit.tokenizer_identity import tokenizer_fingerprint
    from tiny_hf import make_tiny_llama, make_tokenizer

    other_tok = AutoTokenizer.from_pretrained(make_tokenizer(tmp_path / "tok", vocab_size=300))
    student = make_tiny_llama(tmp_path / "student", other_tok)
    with pytest.raises(SchemaMismatchError) as err:
        run_training(world, tmp_path / "run", student=str(student), max_steps=1)
    message = str(err.value)
    store_fp = json.loads((world.store / "manifest.json").read_text())["settings"][
        "tokenizer_fingerprint"]
    assert "tokenizer mismatch" in message and store_fp in message
    assert tokenizer_fingerprint(other_tok) in message
    assert "vocabulary size 300" in message
    # a foreign tokenizer is trained across tokenizers when the store holds text (issue 15):
    # this store holds none, which is what the refusal now says
    assert "holds no sample text" in message


def test_a_damaged_store_is_refused_naming_the_file(world, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(world.store, store)
    victim = sorted(p for p in store.rglob("topk_logprobs/c/**/*") if p.is_file())[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(ChecksumError) as err:
        run_training(world, tmp_path / "run", store=str(store), verify_store="full", max_steps=1)
    rel = victim.relative_to(store).as_posix()
    assert "damaged" in str(err.value) and rel in str(err.value)


def test_cheap_inputs_are_checked_before_the_student_is_loaded(world, tmp_path, monkeypatch):
    """A wrong path must fail in seconds, not after minutes of loading a 1B student."""
    import student_train.train as train_module
    from logitstore.errors import LogitStoreError, ManifestMissingError, StoreNotFoundError
    from logitstore.toolkit.data_sources import DataSourceError

    def no_student(*args, **kwargs):
        raise AssertionError("the student was loaded")

    monkeypatch.setattr(train_module, "load_student", no_student)
    # The hub offline, its caches empty: a hub dataset cannot be read.
    import datasets
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    (tmp_path / "empty").mkdir()
    (tmp_path / "a-file").write_text("not a directory")
    cases = [
        (dict(store=str(tmp_path / "nonexistent")), StoreNotFoundError, "does not exist"),
        (dict(store=str(tmp_path / "empty")), ManifestMissingError, "no manifest.json"),
        (dict(eval_store=str(tmp_path / "nonexistent")), StoreNotFoundError, "nonexistent"),
        (dict(store=None, data=[str(tmp_path / "missing.jsonl")]), DataSourceError,
         "does not exist"),
        (dict(store=None, data=["org/no-such-dataset@train"]), DataSourceError,
         "'org/no-such-dataset' (split train): the hub is offline"),
        (dict(out=str(tmp_path / "a-file")), LogitStoreError, "cannot be created or written"),
        (dict(out=str(tmp_path / "a-file" / "run")), LogitStoreError, "--out"),
        (dict(resume=str(tmp_path / "empty")), ConfigError, "not a complete checkpoint"),
        (dict(signals={"no-such-teacher": 1.0}), ConfigError, "not in the store"),
    ]
    for overrides, error, words in cases:
        settings = {"out": str(tmp_path / "run"), "max_steps": 1, **overrides}
        with pytest.raises(error) as err:
            run_training(world, Path(settings.pop("out")), **settings)
        assert words in str(err.value) and "\n\n" not in str(err.value), overrides
    with pytest.raises(AssertionError, match="the student was loaded"):  # inputs fine: loads
        run_training(world, tmp_path / "run", max_steps=1)


def test_training_progress_tracks_the_best_evaluation_and_round_trips():
    from student_train.checkpoint import TrainingProgress

    progress = TrainingProgress(total_steps=10)
    for step, loss in ((1, 2.0), (2, 1.5), (3, 1.7), (4, 1.6)):
        progress.step = step
        progress.record_eval({"eval/loss": loss}, patience=2)
    assert (progress.best_step, progress.best_eval_loss, progress.bad_evals) == (2, 1.5, 2)
    assert progress.stopped_early and progress.best_eval == {"eval/loss": 1.5}
    state = json.loads(json.dumps(progress.state_dict()))  # as trainer_state.json holds it
    assert TrainingProgress.from_state_dict(state) == progress
    del state["best_eval"]  # a checkpoint written before best_eval was always present
    assert TrainingProgress.from_state_dict(state).best_eval is None
    with pytest.raises(ConfigError, match="another version"):
        TrainingProgress.from_state_dict({**state, "epoch_float": 1.0})


# ----------------------------------------------------------------------------- LoRA

def test_lora_run_saves_adapters_and_a_merged_student(world, tmp_path):
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    run_training(world, run, max_steps=3, lora_r=4, lr=1e-2, save_every=3)
    assert (run / "adapter" / "adapter_config.json").is_file()
    adapter = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj",
                                              "gate_proj", "up_proj", "down_proj"}
    merged = load_file(run / "final" / "model.safetensors")
    assert not any("lora" in k for k in merged)
    base = load_file(world.student / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[key], base[key])  # the adapters were merged in
    assert torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    AutoModelForCausalLM.from_pretrained(run / "final")


# ----------------------------------------------------------------------------- alignment

def test_hidden_and_attention_alignment_with_packing_tied_and_padded_student(world, tmp_path):
    from tiny_hf import make_tiny_llama

    # Tied embeddings and an embedding matrix padded beyond the tokenizer (like Qwen2).
    student = make_tiny_llama(tmp_path / "student", world.tokenizer, tie_word_embeddings=True,
                              vocab_size=416)
    run = tmp_path / "run"
    run_training(world, run, student=str(student), max_steps=3, hidden_weight=1.0,
                 attention_weight=1.0, packing=True,
                 log_every=1, save_every=3, eval_fraction=0.25)
    for m in read_metrics(run):
        if "train/loss" in m:
            assert m["train/hidden"] > 0 and m["train/attention"] > 0
            assert all(math.isfinite(v) for v in m.values())
    saved = load_file(run / "alignment.safetensors")
    assert set(saved) == {"hidden.teacher.projections.-1.weight",
                          "hidden.teacher.projections.-1.bias"}
    assert saved["hidden.teacher.projections.-1.weight"].shape == (64, 64)
    ckpt = load_file(run / "checkpoints" / "step-00000003" / "model.safetensors")
    assert torch.equal(ckpt["aligners.0.projections.-1.weight"],
                       saved["hidden.teacher.projections.-1.weight"])
    meta = json.loads((run / "training_metadata.json").read_text())
    assert meta["vocab_padding_rows"] == 16
    assert "eval/hidden" in meta["final_metrics"] and "eval/attention" in meta["final_metrics"]


def test_alignment_layer_map_problems_are_listed_together(world, tmp_path):
    with pytest.raises(ConfigError) as err:
        run_training(world, tmp_path / "run", max_steps=1, hidden_weight=1.0,
                     attention_weight=1.0, layer_map="5:0,0:7", signals="teacher,ghost")
    assert "['ghost'] not in the store" in str(err.value)
    with pytest.raises(ConfigError) as err:
        run_training(world, tmp_path / "run", max_steps=1, hidden_weight=1.0,
                     attention_weight=1.0, layer_map="5:0,0:-1")
    problems = err.value.problems
    assert any("student block 5 does not exist" in p for p in problems)
    assert any("teacher layer -1 of signal 'teacher' has no stored attention" in p
               for p in problems)


# ----------------------------------------------------------------------------- objectives

@pytest.mark.parametrize("alpha_on", ["kd", "ce"])
def test_group_combination_matches_the_seed_003_reference(alpha_on):
    from reference_losses import distillm_med_loss
    from student_train.loss_combine import Weights, combine
    from student_train.objective import SignalPlan

    g = torch.Generator().manual_seed(0)
    kd, ce = torch.rand(4, 6, generator=g), torch.rand(4, 6, generator=g)
    mask = torch.rand(4, 6, generator=g) > 0.3
    specialty = torch.tensor([0, 2, 0, 1])
    group_w = torch.tensor([1.2, 1.0, 0.5])
    expected = distillm_med_loss(kd, ce, mask, specialty, group_w, alpha=0.7,
                                 alpha_weights=alpha_on)
    m = mask.float()

    def per_group(x):
        return torch.zeros(3).index_add(0, specialty, (x * m).sum(1))

    sums = {"kd": per_group(kd)[None], "ce": per_group(ce)}
    dens = {"tokens": per_group(torch.ones_like(kd)), "samples": torch.ones(1)}
    loss, _ = combine(sums, dens, [SignalPlan("t", kd_weight=1.0, target="topk")],
                      Weights(alpha=0.7, alpha_on=alpha_on, group_weights=(1.2, 1.0, 0.5)))
    torch.testing.assert_close(loss, expected)


def test_specialty_weights_curriculum_and_distillm_med_runs(world, tmp_path):
    weighted = tmp_path / "weighted"
    run_training(world, weighted, max_steps=3, specialty_weights={"cardiology": 3.0},
                 curriculum="difficulty", log_every=1)
    seed003 = tmp_path / "seed003"
    run_training(world, seed003, max_steps=3, objective="distillm-med", alpha=0.7,
                 alpha_on="ce", specialty_weights={"cardiology": 1.2, "radiology": 1.0},
                 attention_weight=0.2, attention_loss="frobenius", temperature=8.0,
                 temperature_end=1.0, temperature_schedule="exp", log_every=1)
    for run in (weighted, seed003):
        losses = [m["train/loss"] for m in read_metrics(run) if "train/loss" in m]
        assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    with pytest.raises(ConfigError, match="specialty_key 'ward' is not a tag"):
        run_training(world, tmp_path / "bad", max_steps=1, objective="distillm-med",
                     specialty_weights={"cardiology": 1.2}, specialty_key="ward")


# ----------------------------------------------------------------------------- early stopping

def test_early_stopping_restores_the_best_evaluation(world, tmp_path):
    run = tmp_path / "run"
    final = run_training(world, run, max_steps=8, lr=0.5, eval_fraction=0.25, eval_every=1,
                         eval_on_start=True, patience=1)
    meta = json.loads((run / "training_metadata.json").read_text())
    assert meta["stopped_early"] and meta["steps"] < 8
    assert final["eval/loss"] == meta["best_eval_loss"] == min(m["eval/loss"] for m in evals(run))


# ----------------------------------------------------------------------------- exact scaling

def test_micro_batches_with_global_denominators_give_the_full_batch_gradient(world):
    """What makes grad accumulation and DDP exact: sums / (weights of all micro-batches)."""
    from transformers import AutoModelForCausalLM

    from logitstore.reader import StoreReader
    from student_train.collate import collate
    from student_train.loss_combine import Weights, combine
    from student_train.objective import (DistillationObjective, LossSettings, SignalPlan,
                                         denominators)

    reader = StoreReader(str(world.store))
    samples = [reader.sample(i) for i in range(4)]
    model = AutoModelForCausalLM.from_pretrained(world.student)
    plans = [SignalPlan("teacher", kd_weight=1.0, target="topk")]
    objective = DistillationObjective(model, plans, LossSettings())
    weights = Weights(alpha=0.7)

    def grads(batches):
        objective.zero_grad()
        dens = [denominators(b) for b in batches]
        total = {k: sum(d[k] for d in dens) for k in dens[0]}
        for b in batches:
            loss, _ = combine(objective(b), total, plans, weights)
            loss.backward()
        return [p.grad.clone() for p in objective.parameters() if p.grad is not None]

    def batch(ss, w):
        return collate([[s] for s in ss], [[x] for x in w], ["teacher"], packing=False)

    weights_of = [1.0, 2.0, 0.5, 1.0]  # per-sample weights (e.g. specialties) too
    full = grads([batch(samples, weights_of)])
    split = grads([batch(samples[:1], weights_of[:1]), batch(samples[1:], weights_of[1:])])
    for a, b in zip(full, split):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_sum_gradients_hint_gives_the_same_gradients_without_a_backward_pass(world,
                                                                           monkeypatch):
    """Step.train's path: token_sum_gradients handed to every micro-batch's forward.

    Two KD terms (top-k tail mode + sampled, T = 2), specialty groups, label smoothing, two
    micro-batches and a scaled loss: the gradients equal those of the plain path (no hint,
    lm_head recomputed in backward), and with the hint no lm_head pass runs in backward.
    """
    from transformers import AutoModelForCausalLM

    import student_train.fused_head_loss as fused
    from logitstore.reader import StoreReader
    from student_train.collate import collate
    from student_train.loss_combine import Weights, combine, token_sum_gradients
    from student_train.objective import (DistillationObjective, LossSettings, SignalPlan,
                                         denominators, sample_groups)

    reader = StoreReader(str(world.store))
    samples = [reader.sample(i) for i in range(4)]
    model = AutoModelForCausalLM.from_pretrained(world.student)
    plans = [SignalPlan("teacher", kd_weight=0.6, target="topk"),
             SignalPlan("teacher", kd_weight=0.4, target="sampled", n_draws=16)]
    objective = DistillationObjective(model, plans, LossSettings(chunk_size=5))
    weights = Weights(alpha=0.7, group_weights=(1.2, 0.5))
    passes = []
    real = fused._head_pass
    monkeypatch.setattr(fused, "_head_pass",
                        lambda *a: (passes.append(torch.is_grad_enabled()), real(*a))[1])

    def batch(ss, group_of_sample):  # per-sample weights 1, 2, ... (e.g. specialties)
        b = collate([[s] for s in ss], [[1.0 + i] for i in range(len(ss))], ["teacher"],
                    packing=False)
        b["token_groups"] = sample_groups(b, torch.tensor(group_of_sample))
        return b

    window = [batch(samples[:1], [1]), batch(samples[1:], [0, 1, 0])]
    dens = [denominators(b, 2) for b in window]
    total = {k: sum(d[k] for d in dens) for k in dens[0]}

    def grads(hint: bool):
        objective.zero_grad()
        passes.clear()
        extra = {"sum_grads": token_sum_gradients(total, plans, weights)} if hint else {}
        for b in window:
            sums = objective(b, temperature=2.0, label_smoothing=0.1, n_groups=2, **extra)
            loss, _ = combine(sums, total, plans, weights)
            (loss * 3.0).backward()
        return [p.grad.clone() for p in objective.parameters() if p.grad is not None]

    plain = grads(hint=False)
    assert len(passes) == 4  # forward + recomputing backward, per micro-batch
    hinted = grads(hint=True)
    assert len(passes) == 2  # forward only
    assert len(plain) == len(hinted) > 0
    for a, b in zip(plain, hinted):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_two_gloo_processes_match_one_at_equal_global_batch(tmp_path):
    """2 gloo processes (grad_accum 1) == 1 process with grad_accum 2, step by step.

    accelerate 1.15's `launch --cpu --num_processes 2` starts ONE process unless MPI is set
    up (its simple launcher); torchrun via `--multi_gpu` with ACCELERATE_USE_CPU=1 starts two
    gloo processes on a CPU-only machine.
    """
    import os

    w = build_world(tmp_path / "world", fixed_length=12, n=32)
    preset = tmp_path / "preset.yaml"
    preset.write_text("# student-train --config preset.yaml\ntrain:\n  shuffle: false\n"
                      "  verify_store: none\n  log_every: 1\n  warmup_ratio: 0.0\n")
    common = ["--config", str(preset), "--store", str(w.store), "--student", str(w.student),
              "--max-steps", "4", "--batch-tokens", "24", "--lr", "3e-3",
              "--eval-fraction", "0.25", "--eval-every", "2", "--save-every", "0"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no"]
    one = subprocess.run([*launch, "--cpu", "--num_processes", "1", "-m", "student_train",
                          *common, "--grad-accum", "2", "--out", str(tmp_path / "one")],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1"}
    two = subprocess.run([*launch, "--multi_gpu", "--num_processes", "2",
                          "--main_process_port", "29533", "-m", "student_train", *common,
                          "--grad-accum", "1", "--out", str(tmp_path / "two")],
                         cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for x, y in zip(a, b):
        for key in x:
            if key.startswith(("train/loss", "train/kd", "train/ce", "eval/")):
                assert y[key] == pytest.approx(x[key], rel=1e-4), key
    meta = json.loads((tmp_path / "two" / "training_metadata.json").read_text())
    assert meta["world_size"] == 2
