"""The fidelity benchmark's teacher: a Llama trained from scratch on the real-text corpus
(bench/fidelity_corpus.py), built once and cached.

build_teacher(cache, corpus, size, steps) trains it with the real `student-train --data`
(hard labels, a subprocess) on every teacher document (the transfer set is a small held-in
part of them), and returns its directory. The run lives in CACHE/teacher-KEY/, KEY being the
SHA-256 of the corpus key, the model shape and the training settings: a finished teacher
(its done.json) is reused while none of them changes.

Sizes (LlamaConfig; parameters with the corpus's 8192-token vocabulary):
  small   hidden 192, 3 blocks: ~4.3M, for smoke runs (a few minutes)
  medium  hidden 256, 4 blocks: ~7.4M, the full run's (about 2.5x the student's compute)
  large   hidden 384, 6 blocks: ~16M
and the student every variant trains: hidden 128, 4 blocks, ~2.9M.

--teacher-minutes M sets the steps from the measured cost of one step of the size on this
2-core CPU (SECONDS_PER_STEP, 4096-token batches): the step count, not the
clock, is what the cache key holds, so a rerun reuses the teacher whatever the machine's load.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

STUDENT_SHAPE = {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
                 "num_attention_heads": 4, "num_key_value_heads": 2}
TEACHER_SHAPES = {
    "small": {"hidden_size": 192, "intermediate_size": 512, "num_hidden_layers": 3,
              "num_attention_heads": 4, "num_key_value_heads": 2},
    "medium": {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4,
               "num_attention_heads": 4, "num_key_value_heads": 2},
    "large": {"hidden_size": 384, "intermediate_size": 1024, "num_hidden_layers": 6,
              "num_attention_heads": 6, "num_key_value_heads": 2},
}
# seconds per 4096-token training step on this 2-core CPU, machine shared (load ~3), startup
# included: small 240 steps in 219 s, medium 40 steps in 66 s (measured); large scaled from
# medium by its per-token FLOPs (blocks plus lm_head, 2.6x)
SECONDS_PER_STEP = {"small": 0.9, "medium": 1.5, "large": 3.9}
CONTEXT = 512
TEACHER_TRAIN = {"max_length": 256, "batch_tokens": 4096, "lr": 3.0e-3, "adam_beta2": 0.95,
                 "warmup_ratio": 0.03, "lr_schedule": "cosine", "eval_fraction": 0.0,
                 "save_every": 0, "log_every": 50, "seed": 0}


def steps_for_minutes(size: str, minutes: float) -> int:
    return max(10, math.floor(minutes * 60 / SECONDS_PER_STEP[size]))


def save_model_dir(directory: Path, tokenizer_dir: Path, shape: dict, seed: int | None,
                   context: int = CONTEXT):
    """A Llama of `shape` for the corpus's tokenizer -> directory (weights from `seed`, or
    only config + tokenizer when seed is None; `context` positions). Returns the model (None
    without weights). bench/xtok_teachers.py builds its models with it too."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=context,
                         bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, **shape)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(directory)
    if seed is None:
        config.save_pretrained(directory)
        return None
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    return model


def teacher_key(corpus: dict, size: str, steps: int) -> str:
    settings = {"corpus": corpus["key"], "shape": TEACHER_SHAPES[size], "context": CONTEXT,
                "train": TEACHER_TRAIN, "steps": steps}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def build_teacher(cache: Path, corpus: dict, size: str, steps: int, run_tool) -> dict:
    """The trained teacher of these settings (see the module docstring); `run_tool(argv,
    log)` runs a tool of this checkout as a subprocess."""
    import yaml

    key = teacher_key(corpus, size, steps)
    home = cache / f"teacher-{key[:12]}"
    done = home / "done.json"
    final = home / "run" / "final"
    if done.is_file():
        return {**json.loads(done.read_text()), "path": str(final), "built": False}
    init = home / "init"
    model = save_model_dir(init, corpus["tokenizer"], TEACHER_SHAPES[size], seed=0)
    params = sum(p.numel() for p in model.parameters())
    config = home / "teacher.yaml"
    config.write_text("# written by bench/fidelity_teacher.py\n"
                      + yaml.safe_dump({"train": {**TEACHER_TRAIN, "max_steps": steps}},
                                       sort_keys=False), encoding="utf-8")
    argv = ["-m", "student_train", "--config", str(config), "--data", str(corpus["teacher"]),
            "--student", str(init), "--out", str(home / "run")]
    print(f"teacher: {size} ({params / 1e6:.1f}M parameters), {steps} steps of "
          f"{TEACHER_TRAIN['batch_tokens']} tokens (~{steps * SECONDS_PER_STEP[size] / 60:.0f} "
          f"min on 2 idle cores) -> {home}", flush=True)
    started = time.perf_counter()
    run_tool(argv, home / "train.log")
    info = {"size": size, "shape": TEACHER_SHAPES[size], "params": params, "steps": steps,
            "train": TEACHER_TRAIN, "key": key, "corpus": str(corpus["dir"]),
            "train_s": round(time.perf_counter() - started, 1),
            "command": "python " + " ".join(argv)}
    done.write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    return {**info, "path": str(final), "built": True}


def student_config_dir(cache: Path, corpus: dict) -> Path:
    """Config + tokenizer of the student (every seed draws its weights from it)."""
    directory = cache / f"student-{corpus['key'][:12]}"
    if not (directory / "config.json").is_file():
        save_model_dir(directory, corpus["tokenizer"], STUDENT_SHAPE, seed=None)
    return directory
