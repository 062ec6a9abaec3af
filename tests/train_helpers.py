"""Helpers for the student-train tests: a tiny teacher's real signals in a real store.

`build_world(root)` makes, under `root`: a tokenizer, a tiny Llama *teacher* initialised with
large weights (so its distributions are peaked and far from the student's; training one on
this shared 2-core machine would cost more than all the tests), a differently seeded tiny
Llama *student*, and a store written with `StoreWriter` holding, per sample, the
teacher's top-k (q8) and sampled targets (computed here from its real logits with torch),
pooled hidden states and pooled attention maps. Everything is deterministic.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from logitstore.format import (AttentionSpec, HiddenSpec, SampledSpec, SignalSpec, StoreSettings,
                               TopKSpec)
from logitstore.toolkit.tokenizer_identity import tokenizer_fingerprint
from logitstore.toolkit.pooling import pool_attention, pool_hidden
from logitstore.sample import Sample, Sampled, SignalData, TopK
from logitstore.writer import StoreWriter
from tiny_hf import corpus, make_tiny_llama, make_tokenizer

SPECIALTIES = ("cardiology", "radiology", "oncology")
HIDDEN_LAYERS = (0, -1)
ATTENTION_LAYERS = (0, 1)
GRID = 4


@dataclass
class World:
    root: Path
    tokenizer: Path
    teacher: Path
    student: Path
    store: Path


def _texts(n: int) -> list[str]:
    texts = corpus()
    step = max(1, len(texts) // n)  # spread over the corpus: varied subjects and findings
    return [texts[(i * step) % len(texts)] for i in range(n)]


def train_teacher(model, tokenizer, steps: int = 60, lr: float = 3e-3) -> None:
    """A few full-batch CE steps on the corpus: peaked, corpus-like predictions."""
    texts = corpus()
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def _sampled(logp: torch.Tensor, n_draws: int, seed: int) -> Sampled:
    """n_draws ids per position from the teacher (T=1), with counts and T=1 log-probs."""
    g = torch.Generator().manual_seed(seed)
    draws = torch.multinomial(logp.exp(), n_draws, replacement=True, generator=g)  # [L, N]
    ids, counts, lps = [], [], []
    for t in range(logp.shape[0]):
        uniq, cnt = torch.unique(draws[t], return_counts=True)
        ids.append(uniq.tolist())
        counts.append(cnt.tolist())
        lps.append(logp[t, uniq].tolist())
    return Sampled.from_lists(ids, counts, lps)


def build_store(url: Path, teacher_dir: Path, tokenizer, *, n: int = 40, k: int = 8,
                n_draws: int = 16, fixed_length: int | None = None, signal: str = "teacher",
                segment_tokens: int = 256) -> Path:
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, attn_implementation="eager")
    teacher.eval()
    settings = StoreSettings(
        vocab_size=len(tokenizer), tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        tokenizer_name="tiny", chunk_tokens=128, segment_tokens=segment_tokens, chunk_samples=8,
        signals={signal: SignalSpec(
            topk=TopKSpec(k), sampled=SampledSpec(n_draws),
            hidden=HiddenSpec(HIDDEN_LAYERS, teacher.config.hidden_size, "mean", "float32"),
            attention=AttentionSpec(ATTENTION_LAYERS, 1, GRID, "mean", "float32"),
            teacher={"model_id": str(teacher_dir)})})
    with StoreWriter(str(url), settings, overwrite=True) as writer:
        for i, text in enumerate(_texts(n)):
            ids = tokenizer(text)["input_ids"]
            if fixed_length is not None:
                ids = (ids * fixed_length)[:fixed_length]
            input_ids = torch.tensor([ids])
            with torch.no_grad():
                out = teacher(input_ids, output_hidden_states=True, output_attentions=True)
            logp = torch.log_softmax(out.logits[0].float(), -1)  # [L, V]
            top = logp.topk(k, -1)
            loss_mask = np.ones(len(ids), bool)
            loss_mask[0] = False  # BOS is never a target
            mask_t = torch.from_numpy(loss_mask)[None]
            ones = torch.ones_like(input_ids)
            states = out.hidden_states[1:]
            hidden = torch.stack([pool_hidden(states[layer], mask_t, ones, "mean")[0]
                                  for layer in HIDDEN_LAYERS])  # [layers, d]
            attention = torch.stack([
                pool_attention(out.attentions[layer], torch.tensor([len(ids)]), GRID)[0]
                .mean(0, keepdim=True) for layer in ATTENTION_LAYERS])  # [layers, 1, G, G]
            sample = Sample(sample_id=f"s{i:04d}", input_ids=np.asarray(ids, np.int64),
                            loss_mask=loss_mask, source="tiny-corpus",
                            tags={"specialty": SPECIALTIES[i % 3], "difficulty": i % 4})
            sample.signals[signal] = SignalData(
                topk=TopK(top.indices.numpy(), top.values.numpy()),
                sampled=_sampled(logp, n_draws, seed=i),
                hidden=hidden.numpy(), attention=attention.numpy())
            writer.add(sample)
    return url


def build_world(root: Path, *, teacher_steps: int = 0, **store_kwargs) -> World:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = Path(root)
    tok_dir = make_tokenizer(root / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    teacher_dir = make_tiny_llama(root / "teacher", tokenizer, seed=1, initializer_range=0.3)
    if teacher_steps:
        torch.manual_seed(1)
        teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
        train_teacher(teacher, tokenizer, steps=teacher_steps)
        teacher.save_pretrained(teacher_dir)
    student_dir = make_tiny_llama(root / "student", tokenizer, seed=0)
    store = build_store(root / "store", teacher_dir, tokenizer, **store_kwargs)
    return World(root, tok_dir, teacher_dir, student_dir, store)


def read_metrics(run: Path) -> list[dict]:
    path = Path(run) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_losses(run: Path) -> list[tuple[int, float]]:
    return [(m["step"], m["train/loss"]) for m in read_metrics(run) if "train/loss" in m]


def shared_world(tmp_path_factory, name: str = "train-world", **kwargs) -> World:
    """build_world once per pytest session (test modules share it through the base temp)."""
    root = Path(tmp_path_factory.getbasetemp()) / name
    done = root / "built"
    if not done.exists():
        build_world(root, **kwargs)
        done.write_text("ok")
    return World(root, root / "tokenizer", root / "teacher", root / "student", root / "store")


def run_training(world: World, out: Path, **overrides):
    """student-train in this process (imports are paid once per session); returns metrics."""
    from student_train.config import resolve_config
    from student_train.train import train

    settings = {"store": str(world.store), "student": str(world.student), "out": str(out),
                "batch_tokens": 256, "lr": 3e-3, "warmup_ratio": 0.0, "save_every": 0,
                "verify_store": "none"}
    settings.update(overrides)
    return train(resolve_config(None, settings))


def backward_on_forward_grads(loss, monkeypatch) -> None:
    """loss.backward(), asserting the fused lm_head used the gradients its forward built
    (every backward found grad_output a multiple of the expected gradient: no recompute)."""
    import student_train.fused_head_loss as fused

    factors = []
    common_factor = fused._common_factor
    monkeypatch.setattr(fused, "_common_factor",
                        lambda *a: factors.append(common_factor(*a)) or factors[-1])
    loss.backward()
    assert factors and None not in factors
