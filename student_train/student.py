"""The student: loading (full, LoRA, QLoRA), compatibility with a store, and the final save.

LoRA targets are detected from the architecture: the attention and MLP projections that Llama,
Qwen2, Mistral, Gemma... all name q/k/v/o_proj and gate/up/down_proj; failing that, every
Linear layer but the output head. `--lora-targets` overrides the detection.

QLoRA trains adapters on a 4-bit (NF4) base. Merging adapters into 4-bit weights would
requantise them, so the final save reloads the base in full precision, loads the adapters on
it and merges there (the adapters alone are also kept in run/adapter/).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from logitstore.toolkit.hf import load_causal_lm, load_tokenizer
from logitstore.toolkit.tokenizer_identity import tokenizer_fingerprint, vocab_size_of

log = logging.getLogger(__name__)
KNOWN_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def load_student(cfg, device: torch.device | str, read_tokenizer=None):
    """(tokenizer, model in train mode, LoadedModel info) as the config asks; the tokenizer
    from `read_tokenizer()` when given (sources.Inputs' cached read), else read here."""
    tokenizer = read_tokenizer() if read_tokenizer is not None else load_tokenizer(
        cfg.student, cfg.revision, trust_remote_code=cfg.trust_remote_code)
    model, info = load_causal_lm(
        cfg.student, quantize="4bit" if cfg.qlora else "none",
        dtype="auto" if cfg.qlora else cfg.student_dtype, device=str(device),
        need_attentions=cfg.attention_weight > 0,  # SDPA returns no attention maps
        trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
    ckpt_kwargs = {"use_reentrant": False}  # re-entrant checkpointing needs grads on inputs
    if cfg.qlora:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs=ckpt_kwargs)
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
    if cfg.lora_r:
        model = apply_lora(model, cfg)
    model.config.use_cache = False  # the KV cache is for generation, never for training
    model.train()
    return tokenizer, model, info


def detect_lora_targets(model: nn.Module) -> list[str]:
    """Names (last component) of the Linear layers LoRA should adapt."""
    linear_names = set()
    head = model.get_output_embeddings()
    for name, module in model.named_modules():
        if module is head:
            continue
        if isinstance(module, nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            linear_names.add(name.rsplit(".", 1)[-1])
    known = [n for n in KNOWN_LORA_TARGETS if n in linear_names]
    return known or sorted(linear_names)


def apply_lora(model: nn.Module, cfg) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    targets = list(cfg.lora_targets) or detect_lora_targets(model)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha or 2 * cfg.lora_r,
                      lora_dropout=cfg.lora_dropout, target_modules=targets,
                      task_type="CAUSAL_LM")
    try:
        model = get_peft_model(model, lora)
    except ValueError as exc:  # peft: "Target modules {...} not found in the base model"
        from logitstore.errors import ConfigError

        raise ConfigError([f"lora_targets {targets}: {exc}"]) from None
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("LoRA r=%d on %s: %d of %d parameters trainable", cfg.lora_r, targets, trainable,
             total)
    return model


def num_blocks(model: nn.Module) -> int:
    return int(model.config.get_text_config().num_hidden_layers)


def compat_problems(tokenizer, settings, url: str) -> list[str]:
    """Why a store cannot train this student (tokenizer identity and vocabulary size)."""
    problems = []
    mine = tokenizer_fingerprint(tokenizer)
    if mine != settings.tokenizer_fingerprint:
        problems.append(
            f"tokenizer mismatch: store {url} was dumped with tokenizer "
            f"{settings.tokenizer_name or '?'} (fingerprint {settings.tokenizer_fingerprint}), "
            f"the student's tokenizer has fingerprint {mine}. Token ids would not mean the same "
            f"tokens; use a student that shares the teacher's tokenizer")
    size = vocab_size_of(tokenizer)
    if size != settings.vocab_size:
        problems.append(f"vocabulary size mismatch: store {url} has vocab_size "
                        f"{settings.vocab_size}, the student's tokenizer has {size} tokens")
    return problems


# ----------------------------------------------------------------------------- final save

def save_final(student: nn.Module, tokenizer, cfg, out_dir: Path,
               state_dict: dict[str, Any] | None = None) -> Path:
    """Write a plain transformers model (adapters merged) + tokenizer to out_dir/final."""
    final = out_dir / "final"
    if cfg.lora_r:
        adapter_dir = out_dir / "adapter"
        student.save_pretrained(adapter_dir)  # adapters only (small), kept for reference
        tokenizer.save_pretrained(adapter_dir)
        merged = _merged_model(student, cfg, adapter_dir)
        merged.save_pretrained(final)
    else:
        student.save_pretrained(final, state_dict=state_dict)
    tokenizer.save_pretrained(final)
    return final


def _merged_model(student: nn.Module, cfg, adapter_dir: Path) -> nn.Module:
    if not cfg.qlora:
        return student.merge_and_unload()
    from peft import PeftModel

    # 4-bit weights cannot take a merge without requantising: merge into a full-precision base.
    base, _ = load_causal_lm(cfg.student, quantize="none", dtype=cfg.student_dtype,
                             device="cpu", trust_remote_code=cfg.trust_remote_code,
                             revision=cfg.revision)
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
