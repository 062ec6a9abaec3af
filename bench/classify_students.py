"""Students of bench/classify_bench.py: the methods, training from the store, held-out scores,
and the online-teacher trial used only for timing.

    METHODS                                   name -> loss weights (CE only ... +KL+MSE+CRD)
    train_student(base, weights, out, seed)   student-train --task classify's own loop
                                              (train_classifier) in this process; returns the
                                              held-out (test split) metrics per head, the
                                              per-sample correctness and the trial's seconds
    online_teacher(teacher_dir, store)        context manager: while active, every training
                                              step of train_classifier first runs the teacher
                                              on its batch and uses those logits/features
                                              instead of the stored ones

Every student of a seed is built from the same config after torch.manual_seed(seed) (so the
same init) and sees the same batches (epoch_order(seed)); only the loss weights differ. The
students run in this process instead of through `student-train` subprocesses so each trial
pays the store reading and model building, not a fresh interpreter's imports: the same code
the command runs (student_train.classify_train.train_classifier).

The product distils offline only; the online trial exists here to measure what the store
saves. It wraps `train_step`: before each step the teacher (loaded once per trial, eval mode,
no grad) scores the batch's images and captions through its own image processor and tokenizer
(its preprocessed inputs kept per sample within the `input_cache_mb` budget, as the
student's are: an online distiller could keep them too) and its head logits and features
replace the stored rows of that batch. Everything else
(student, objective, CRD bank initialised from the stored features, batches) is the store
trial's, so the difference in time is the teacher's per-batch forward (plus its loading).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import torch

METHODS: dict[str, dict[str, float]] = {
    "ce": {"ce_weight": 1.0, "kl_weight": 0.0, "mse_weight": 0.0, "crd_weight": 0.0},
    "kl": {"ce_weight": 1.0, "kl_weight": 1.0, "mse_weight": 0.0, "crd_weight": 0.0},
    "kl_mse": {"ce_weight": 1.0, "kl_weight": 1.0, "mse_weight": 1.0, "crd_weight": 0.0},
    "kl_mse_crd": {"ce_weight": 1.0, "kl_weight": 1.0, "mse_weight": 1.0, "crd_weight": 0.5},
}
METHOD_LABELS = {"ce": "CE only", "kl": "+KL", "kl_mse": "+KL+MSE",
                 "kl_mse_crd": "+KL+MSE+CRD", "sweep_best": "best of sweep"}
FULL_KD = "kl_mse_crd"
SWEEP_KEYS = ("kl_weight", "mse_weight", "crd_weight", "temperature", "lr")


def sweep_space(quick: bool) -> dict[str, dict[str, Any]]:
    """The sweep's space.yaml content: loss weights, temperature and learning rate."""
    return {"kl_weight": {"type": "float", "low": 0.0, "high": 2.0},
            "mse_weight": {"type": "float", "low": 0.0, "high": 2.0},
            "crd_weight": {"type": "float", "low": 0.0, "high": 1.0},
            "temperature": {"type": "float", "low": 1.0, "high": 6.0},
            "lr": {"type": "float", "low": 3e-4, "high": 3e-3, "log": True}}


def _config(base: dict[str, Any], weights: dict[str, float], out: Path, seed: int):
    from student_train.config import resolve_config

    return resolve_config(None, {**base, **weights, "task": "classify", "out": str(out),
                                 "seed": seed, "save_every": 0, "eval_on_start": False})


def held_out(run_dir: Path, store: str, seed: int, batch_size: int = 64) -> dict:
    """Test-split metrics of run_dir/final: {head: {"accuracy", "macro_f1"}}, "mean_macro_f1",
    and "correct" {head: [0/1 per test sample]} for paired per-sample comparisons."""
    from logitstore.classifier_reader import ClassifierReader
    from logitstore.toolkit.classify_metrics import classifier_metrics
    from student_train.classify_data import load_split, make_batch, resolve_data_root
    from student_train.classify_student import load_classify_student
    from student_train.classify_train import student_outputs

    reader = ClassifierReader(store)
    student = load_classify_student(str(run_dir / "final"), reader.heads, seed)
    split = load_split(reader, "test", resolve_data_root(None, reader), True)
    model, scores = student.model.eval(), {h: [] for h in split.labels}
    with torch.no_grad():
        for start in range(0, len(split), batch_size):
            index = torch.arange(start, min(start + batch_size, len(split)))
            logits = student_outputs(model, make_batch(split, index, student, "cpu")).logits
            for head in scores:
                scores[head].append(logits[head].float())
    logits = {h: torch.cat(v) for h, v in scores.items()}                   # {head: [N, C]}
    metrics = classifier_metrics({h: v.numpy() for h, v in logits.items()},
                                 {h: y.numpy() for h, y in split.labels.items()}, bootstrap=0)
    return {"heads": {h: {"accuracy": m.accuracy, "macro_f1": m.macro_f1}
                      for h, m in metrics.heads.items()},
            "mean_macro_f1": metrics.mean_macro_f1,
            "correct": {h: (logits[h].argmax(-1) == split.labels[h]).int().tolist()
                        for h in logits}}


def train_student(base: dict[str, Any], weights: dict[str, float], out: Path, seed: int,
                  teacher_dir: Path | None = None) -> dict:
    """One student trial (store, or online with `teacher_dir`); its test metrics and seconds
    (the trial itself: store reading, student building, training, the final val evaluation);
    an online trial (timing only) is not scored on the test split."""
    from student_train.classify_train import train_classifier

    cfg = _config(base, weights, out, seed)
    online = online_teacher(teacher_dir) if teacher_dir else contextlib.nullcontext()
    started = time.perf_counter()
    with online:
        final = train_classifier(cfg)
    seconds = time.perf_counter() - started
    return {"seed": seed, "weights": weights, "seconds": seconds,
            "val_macro_f1": final.get("eval/macro_f1"),
            "test": held_out(out, base["store"], seed) if teacher_dir is None else None}


@contextlib.contextmanager
def online_teacher(teacher_dir: Path):
    """Patch classify_train.train_step so each batch's teacher signals are computed now by
    the teacher in `teacher_dir` (module docstring); restored on exit."""
    from transformers import AutoTokenizer

    from logitstore.toolkit.classifier_adapter import (adapter_for, load_image_processor,
                                                       preprocess_batch)
    from logitstore.toolkit.classifier_models import ImageTextClassifier
    from logitstore.toolkit.classify_records import load_rgb
    from student_train import classify_train
    from student_train.classify_inputs import InputCache, text_pad

    teacher = ImageTextClassifier.from_pretrained(teacher_dir).eval()
    adapter = adapter_for(teacher)
    image_processor = load_image_processor(teacher_dir)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    stored_step = classify_train.train_step
    kept: dict[str, InputCache] = {}  # the teacher's inputs, kept as the student's are

    def preprocess(run, rows) -> dict[str, torch.Tensor]:
        return preprocess_batch(
            images=[load_rgb(run.train.image_paths[i]) for i in rows],
            texts=[run.train.texts[i] for i in rows], image_processor=image_processor,
            tokenizer=tokenizer, max_length=64)

    def step_with_teacher(run, index: torch.Tensor) -> dict[str, float]:
        if "train" not in kept:
            kept["train"] = InputCache(run.cfg.input_cache_mb, len(run.train))
        inputs = kept["train"].batch(index.tolist(), lambda rows: preprocess(run, rows),
                                     text_pad(tokenizer))
        with torch.no_grad():
            signals = adapter(inputs)
        for head, logits in signals["logits"].items():                     # [B, C]
            run.train.logits[head][index] = logits.float()
        for part in run.train.features:
            run.train.features[part][index] = signals["features"][part].float()  # [B, D]
        return stored_step(run, index)

    classify_train.train_step = step_with_teacher
    try:
        yield teacher
    finally:
        classify_train.train_step = stored_step
