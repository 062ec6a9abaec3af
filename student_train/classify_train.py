"""`student-train --task classify`: train an image+text classifier student from a classifier store.

    student-train --task classify --store S --student student.yaml --out run/ \
        [--data-root DIR] [--kl-weight 0.5 --temperature 3 --mse-weight 100 --crd-weight 10 ...]

The teacher is never loaded: its logits and features are read from the store
(ClassifierReader). `train_classifier(cfg)`, top to bottom:
  1. open the store (a causal-lm store is refused, naming the kind), pick the splits (train:
     `train_split`, default "train"; eval: `eval_split`, default "val" when the store has it,
     else no evaluation), load the student (classify_student.py: its heads must be the
     store's) and the split data (classify_data.py: every image checked to exist);
  2. seed everything (`seed`), build the ClassifyObjective (weights ce/kl/mse/cos/crd_weight,
     `class_weights` of the CE resolved by classify_class_weights.py (checked against the
     store's heads before the student loads), `temperature`, `feature_parts`, `crd_part`,
     `crd_k`, `crd_embed_dim`), materialize it on the first training batch BEFORE the
     optimizer, fill CRD's teacher bank from every stored training feature
     (`crd_fill_bank`), then AdamW over the student's and the objective's parameters and the
     `lr_schedule`;
  3. resume (`--resume`): restore student, objective (projections, CRD banks), optimizer,
     scheduler, RNGs and data position (classify_checkpoint.py), so the run continues exactly;
  4. steps until max_steps (else `epochs` of full batches of `batch_size`), logging every
     `log_every` steps, evaluating every `eval_every`, checkpointing every `save_every`;
     early stopping after `patience` evaluations without a better mean macro-F1.
  5. the final evaluation, run/best/ (the best evaluation's student) and run/final/ (the last
     student; with patience > 0 the best one, as the causal loop restores it), both
     save_pretrained directories with tokenizer and image processor, loadable by
     AutoModel.from_pretrained; run/training_metadata.json with `final_metrics` and the
     `class_weights` the CE used ({head: [C] weights}, "balanced" resolved to numbers).

run/metrics.jsonl, one JSON object per line with "step" (also in run/tensorboard/):
  train/loss (the weighted total), train/ce, train/kl, train/mse, train/cos, train/crd (each
  active term unweighted), train/ce/<head>, train/mse/<part>..., train/lr, train/epoch,
  train/samples_seen;
  eval/loss (summed per-head mean CE on the eval split, without class_weights), eval/macro_f1
  (mean macro-F1 over the heads: early stopping's metric, and `student-train sweep --metric
  eval_macro_f1 --direction maximize`'s), eval/accuracy (mean over heads), eval/<head>/accuracy,
  eval/<head>/macro_f1, eval/<head>/ece.
Runs on CUDA when available, else on the CPU, in fp32 (mixed_precision, student_dtype and
gradient_checkpointing are settings of the causal loop; the store is checked by its reads'
per-chunk checksums, not by a full verify_store pass). The temperature is constant.
On resume, metrics.jsonl keeps the records up to the checkpoint's step, so a resumed run's
file equals an uninterrupted run's.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from logitstore import __version__
from logitstore.errors import LogitStoreError, StoreKindError
from student_train.classify_checkpoint import (ClassifyProgress, TrainingParts,
                                               load_classify_checkpoint, save_classify_checkpoint)
from student_train.classify_data import (ClassifySplit, batches_per_epoch, epoch_order,
                                         load_split, make_batch, resolve_data_root)
from student_train.classify_inputs import InputCache
from student_train.classify_student import (ClassifyStudent, load_classify_student,
                                            save_classify_student)
from student_train.config import TrainConfig, save_config

log = logging.getLogger(__name__)
MODEL_INPUTS = ("pixel_values", "input_ids", "attention_mask", "token_type_ids")
DEFAULT_FEATURE_PARTS = ("image_cls", "text_cls")
BANK_FILL_CHUNK = 1024


def open_classifier_store(url: str):
    """ClassifierReader of `url`; a causal-lm store is refused in one paragraph."""
    from logitstore.classifier_reader import ClassifierReader

    try:
        return ClassifierReader(url)
    except StoreKindError as exc:
        raise LogitStoreError(
            f"store {url} is not a classifier store ({exc}); --task classify trains from a "
            f"store written by teacher-dump --task classify; to distil a language model from "
            f"this store, leave --task at causal-lm") from None


def choose_splits(cfg: TrainConfig, reader) -> tuple[str, str | None]:
    """(train split, eval split or None), checked against the store's splits."""
    counts = reader.split_counts()
    train_split = cfg.train_split or "train"
    eval_split = cfg.eval_split or ("val" if counts.get("val") else None)
    if cfg.patience and eval_split is None:
        raise LogitStoreError(f"patience (early stopping) needs an evaluation split, and store "
                              f"{cfg.store} has no 'val' split (its splits: {counts}); set "
                              f"--eval-split")
    return train_split, eval_split


def feature_parts(cfg: TrainConfig, reader, student: ClassifyStudent) -> list[str]:
    """The parts the MSE/cosine terms match (and CRD's part), checked on both sides."""
    stored, produced = set(reader.features), set(student.model.config.part_names)
    parts = list(cfg.feature_parts) or [p for p in DEFAULT_FEATURE_PARTS
                                        if p in stored and p in produced]
    uses = cfg.mse_weight > 0 or cfg.cos_weight > 0
    wanted = (parts if uses else []) + ([cfg.crd_part] if cfg.crd_weight > 0 else [])
    bad = sorted({p for p in wanted if p not in stored or p not in produced})
    if bad or (uses and not parts):
        raise LogitStoreError(
            f"feature parts {bad or parts}: expected parts that the store holds "
            f"({sorted(stored)}) and the student outputs ({sorted(produced)}); choose "
            f"--feature-parts / --crd-part among both, or set their loss weights to 0")
    return parts


def build_objective(cfg: TrainConfig, heads: list[str], parts: list[str], n_samples: int,
                    class_weights: dict[str, list[float]] | None = None):
    from student_train.classify_objective import ClassifyLossWeights, ClassifyObjective
    from student_train.crd import CRDConfig

    try:
        return ClassifyObjective(
            ClassifyLossWeights(ce=cfg.ce_weight, kl=cfg.kl_weight, mse=cfg.mse_weight,
                                cos=cfg.cos_weight, crd=cfg.crd_weight),
            heads=heads, temperature=cfg.temperature, class_weights=class_weights,
            feature_parts=parts,
            crd_part=cfg.crd_part if cfg.crd_weight > 0 else None,
            crd_config=CRDConfig(embed_dim=cfg.crd_embed_dim, k_negatives=cfg.crd_k),
            n_samples=n_samples)
    except ValueError as exc:  # e.g. crd_k above the training set's size - 1
        raise LogitStoreError(f"{exc} (settings ce/kl/mse/cos/crd_weight, crd_k, "
                              f"crd_embed_dim, temperature)") from None


def student_outputs(model, batch: dict[str, Any]):
    return model(**{name: batch[name] for name in MODEL_INPUTS if name in batch})


@dataclass
class ClassifyRun:
    cfg: TrainConfig
    out: Path
    device: torch.device
    student: ClassifyStudent
    train: ClassifySplit
    eval: ClassifySplit | None
    parts: TrainingParts
    per_epoch: int
    store_url: str


def _materialize(run_cfg: TrainConfig, objective, student, train: ClassifySplit, device,
                 generator: torch.Generator) -> None:
    """Widths of the projections and CRD from the first training batch; CRD's teacher bank
    from every stored training feature."""
    first = epoch_order(len(train), run_cfg.seed, 0, run_cfg.shuffle)[:run_cfg.batch_size]
    batch = make_batch(train, first, student, device)
    student.model.eval()  # widths only: no dropout, so no RNG draw
    with torch.no_grad():
        features = student_outputs(student.model, batch).features
    student.model.train()
    objective.materialize(features, batch["teacher_features"], generator=generator)
    objective.to(device)
    if objective.crd is not None and run_cfg.crd_fill_bank:
        stored = train.features[run_cfg.crd_part]                          # [N, D_t]
        for start in range(0, len(train), BANK_FILL_CHUNK):
            index = torch.arange(start, min(start + BANK_FILL_CHUNK, len(train)))
            objective.crd.fill_teacher_bank(index.to(device), stored[index].to(device))


def prepare_classify_run(cfg: TrainConfig, out: Path) -> ClassifyRun:
    """Store, splits, student, data, objective (materialized), optimizer and schedule."""
    from transformers import get_scheduler, set_seed

    from student_train.classify_class_weights import (check_class_weights,
                                                      resolve_class_weights)

    reader = open_classifier_store(cfg.store)
    train_split, eval_split = choose_splits(cfg, reader)
    check_class_weights(cfg.class_weights, reader.heads)  # before the student loads
    set_seed(cfg.seed)  # python, numpy, torch: a saved student's projections start the same too
    student = load_classify_student(cfg.student, reader.heads, cfg.seed)  # heads checked
    parts = feature_parts(cfg, reader, student)
    data_root = resolve_data_root(cfg.data_root, reader)
    needs_images = student.image_processor is not None
    train = load_split(reader, train_split, data_root, needs_images)
    evaluation = load_split(reader, eval_split, data_root, needs_images) if eval_split else None
    for split in (train, evaluation) if cfg.input_cache_mb else ():
        if split is not None:
            split.inputs = InputCache(cfg.input_cache_mb, len(split), log=log.warning)
    per_epoch = batches_per_epoch(len(train), cfg.batch_size)
    if per_epoch < 1:
        raise LogitStoreError(f"split {train_split!r} holds {len(train)} samples, fewer than "
                              f"one batch of batch_size={cfg.batch_size}; lower --batch-size")
    class_weights = resolve_class_weights(cfg.class_weights,
                                          {h: y.numpy() for h, y in train.labels.items()},
                                          reader.heads)
    objective = build_objective(cfg, sorted(reader.heads), parts, len(train), class_weights)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    student.model.to(device)
    generator = torch.Generator().manual_seed(cfg.seed)  # CRD's banks and negatives
    _materialize(cfg, objective, student, train, device, generator)
    optimizer = torch.optim.AdamW(
        [*student.model.parameters(), *objective.parameters()], lr=cfg.lr,
        betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
        # one fused kernel instead of a loop over ~100 small tensors: 5 % of a small
        # student's CPU step (bench/classify_bench.py's); float32 parameters on CPU or CUDA
        weight_decay=cfg.weight_decay, fused=True)
    total = planned_steps(cfg, per_epoch)
    scheduler = get_scheduler(cfg.lr_schedule, optimizer,
                              num_warmup_steps=math.ceil(cfg.warmup_ratio * total),
                              num_training_steps=total)
    return ClassifyRun(cfg, out, device, student, train, evaluation,
                       TrainingParts(student.model, objective, optimizer, scheduler, generator),
                       per_epoch, cfg.store)


class MetricsLog:
    """run/metrics.jsonl (one record per line, with "step") and run/tensorboard/."""

    def __init__(self, out: Path, cfg: TrainConfig):
        from torch.utils.tensorboard import SummaryWriter

        self.file = (out / "metrics.jsonl").open("a", encoding="utf-8")
        self.board = SummaryWriter(str(out / "tensorboard"))
        self.board.add_text("config", json.dumps(cfg.as_dict(), default=str))

    def record(self, step: int, values: dict[str, float]) -> None:
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()
        for key, value in values.items():
            self.board.add_scalar(key, value, step)

    def close(self) -> None:
        self.file.close()
        self.board.close()


def evaluate(student: ClassifyStudent, split: ClassifySplit, batch_size: int,
             device: torch.device | str = "cpu") -> dict[str, float]:
    """eval/* metrics (module docstring) of `student` on `split`: store order, every sample;
    the model is left in train mode."""
    import torch.nn.functional as F

    from logitstore.toolkit.classify_metrics import classifier_metrics

    model = student.model
    scores: dict[str, list[torch.Tensor]] = {h: [] for h in split.labels}
    model.eval()
    with torch.no_grad():
        for start in range(0, len(split), batch_size):
            index = torch.arange(start, min(start + batch_size, len(split)))
            logits = student_outputs(model, make_batch(split, index, student, device)).logits
            for head in scores:
                scores[head].append(logits[head].float().cpu())
    model.train()
    logits = {h: torch.cat(v) for h, v in scores.items()}                  # {head: [N, C]}
    metrics = classifier_metrics({h: v.numpy() for h, v in logits.items()},
                                 {h: y.numpy() for h, y in split.labels.items()}, bootstrap=0)
    values = {"eval/loss": sum(F.cross_entropy(logits[h], split.labels[h], ignore_index=-1).item()
                               for h in logits if bool((split.labels[h] >= 0).any()))}
    if metrics.mean_macro_f1 is not None:
        values["eval/macro_f1"] = metrics.mean_macro_f1
    accuracies = [m.accuracy for m in metrics.heads.values() if m.accuracy is not None]
    if accuracies:
        values["eval/accuracy"] = math.fsum(accuracies) / len(accuracies)
    for head, m in metrics.heads.items():
        for name in ("accuracy", "macro_f1", "ece"):
            if getattr(m, name) is not None:
                values[f"eval/{head}/{name}"] = float(getattr(m, name))
    return values


def train_step(run: ClassifyRun, index: torch.Tensor) -> dict[str, float]:
    """One optimizer step on the training samples `index` ([B] long); the terms' values."""
    cfg, parts = run.cfg, run.parts
    batch = make_batch(run.train, index, run.student, run.device)
    outputs = student_outputs(parts.model, batch)
    total, terms = parts.objective(
        student_logits={h: v.float() for h, v in outputs.logits.items()},
        labels=batch["labels"], teacher_logits=batch["teacher_logits"],
        student_features={p: v.float() for p, v in outputs.features.items()},
        teacher_features=batch["teacher_features"], sample_index=batch["sample_index"],
        generator=parts.crd_generator)
    parts.optimizer.zero_grad(set_to_none=True)
    total.backward()
    if cfg.max_grad_norm:
        torch.nn.utils.clip_grad_norm_([p for g in parts.optimizer.param_groups
                                        for p in g["params"]], cfg.max_grad_norm)
    parts.optimizer.step()
    parts.scheduler.step()
    values = {f"train/{name}": float(value) for name, value in terms.items() if name != "total"}
    values["train/loss"] = float(terms["total"])
    return values


def _next_batch(run: ClassifyRun, progress: ClassifyProgress, orders: dict) -> torch.Tensor:
    """The samples of the next batch; moves progress to the next epoch when one ends."""
    if progress.batch_in_epoch >= run.per_epoch:
        progress.epoch, progress.batch_in_epoch = progress.epoch + 1, 0
    if progress.epoch not in orders:
        orders.clear()
        orders[progress.epoch] = epoch_order(len(run.train), run.cfg.seed, progress.epoch,
                                             run.cfg.shuffle)
    start = progress.batch_in_epoch * run.cfg.batch_size
    progress.batch_in_epoch += 1
    return orders[progress.epoch][start:start + run.cfg.batch_size]


@dataclass
class LoopState:
    progress: ClassifyProgress
    metrics: MetricsLog
    saved_at: int | None
    evaluated_at: int | None = None
    last_eval: dict[str, float] | None = None
    started: float = 0.0
    elapsed_before: float = 0.0


def _checkpoint(run: ClassifyRun, state: LoopState) -> None:
    progress = state.progress
    progress.elapsed_s = state.elapsed_before + time.perf_counter() - state.started
    save_classify_checkpoint(run.out, run.parts, progress, run.cfg.keep_checkpoints)
    state.saved_at = progress.step


def _evaluate(run: ClassifyRun, state: LoopState) -> None:
    metrics = evaluate(run.student, run.eval, run.cfg.batch_size, run.device)
    state.last_eval, state.evaluated_at = metrics, state.progress.step
    state.metrics.record(state.progress.step, metrics)
    if state.progress.record_eval(metrics, run.cfg.patience):
        save_classify_student(run.student, run.out / "best")


def run_steps(run: ClassifyRun, state: LoopState) -> None:
    """Optimizer steps until total_steps or early stopping; log, evaluate, checkpoint."""
    cfg, progress, orders = run.cfg, state.progress, {}
    while progress.step < progress.total_steps and not progress.stopped_early:
        values = train_step(run, _next_batch(run, progress, orders))
        progress.step += 1
        progress.samples += cfg.batch_size
        if progress.step % cfg.log_every == 0 or progress.step == progress.total_steps:
            state.metrics.record(progress.step, {
                **values, "train/lr": run.parts.scheduler.get_last_lr()[0],
                "train/epoch": progress.epoch, "train/samples_seen": progress.samples})
        if run.eval is not None and cfg.eval_every and progress.step % cfg.eval_every == 0:
            _evaluate(run, state)
        if cfg.save_every and progress.step % cfg.save_every == 0:
            _checkpoint(run, state)


def _start(run: ClassifyRun, ckpt: Path | None) -> LoopState:
    progress = ClassifyProgress(total_steps=_planned_steps(run))
    if ckpt is not None:
        progress = load_classify_checkpoint(ckpt, run.parts)
        if progress.total_steps != _planned_steps(run):
            raise LogitStoreError(f"resume: the checkpoint plans {progress.total_steps} steps, "
                                  f"this run {_planned_steps(run)}: the data or batching "
                                  f"changed; resume with the run's settings or start a new --out")
        _drop_records_after(run.out / "metrics.jsonl", progress.step)
        log.info("resumed from %s at step %d", ckpt, progress.step)
    save_config(run.cfg, run.out / "config.yaml")
    return LoopState(progress, MetricsLog(run.out, run.cfg),
                     saved_at=progress.step if ckpt else None, started=time.perf_counter(),
                     elapsed_before=progress.elapsed_s)


def _drop_records_after(path: Path, step: int) -> None:
    """Keep the metrics.jsonl records up to the resumed checkpoint's step: the steps after it
    are trained (and logged) again, so the file reads as one uninterrupted run."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
    tmp.replace(path)


def _planned_steps(run: ClassifyRun) -> int:
    return planned_steps(run.cfg, run.per_epoch)


def planned_steps(cfg: TrainConfig, per_epoch: int) -> int:
    """max_steps, else epochs x full batches per epoch (at least 1)."""
    return cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch))


def train_classifier(cfg: TrainConfig) -> dict[str, float]:
    """Run (or resume) a classify training as configured; returns the final metrics."""
    from student_train.train import check_run_dir

    out, ckpt = check_run_dir(cfg)  # writable run dir; the checkpoint --resume names
    run = prepare_classify_run(cfg, out)
    state = _start(run, ckpt)
    progress = state.progress
    if run.eval is not None and cfg.eval_on_start and progress.step == 0:
        _evaluate(run, state)  # the untrained student: a baseline
    run_steps(run, state)
    if run.eval is not None and state.evaluated_at != progress.step:
        _evaluate(run, state)  # the final student is always evaluated
    if cfg.save_every and state.saved_at != progress.step:
        _checkpoint(run, state)  # so that --resume latest after the end has nothing to do
    final_metrics = state.last_eval or {}
    final_dir = out / "final"
    if cfg.patience and progress.best_step is not None and progress.best_step != progress.step:
        import shutil

        log.info("final = the best evaluation (step %d)", progress.best_step)
        if final_dir.exists():
            shutil.rmtree(final_dir)
        shutil.copytree(out / "best", final_dir)
        final_metrics = progress.best_eval
    else:
        save_classify_student(run.student, final_dir)
    progress.elapsed_s = state.elapsed_before + time.perf_counter() - state.started
    _write_metadata(run, progress, final_metrics)
    state.metrics.close()
    return final_metrics


def _write_metadata(run: ClassifyRun, progress: ClassifyProgress, final: dict) -> None:
    metadata = {
        "tool": "student-train", "tool_version": __version__, "task": "classify",
        "student": run.student.source, "store": run.store_url, "config": run.cfg.as_dict(),
        "class_weights": {h: w.tolist() for h, w in run.parts.objective.class_weights.items()},
        "train_split": run.train.name, "train_samples": len(run.train),
        "eval_split": run.eval.name if run.eval else None,
        "eval_samples": len(run.eval) if run.eval else 0,
        "steps": progress.step, "total_steps": progress.total_steps,
        "stopped_early": progress.stopped_early, "best_step": progress.best_step,
        "best_metrics": progress.best_eval, "final_metrics": final,
        "device": str(run.device), "elapsed_s": progress.elapsed_s,
    }
    tmp = run.out / "training_metadata.json.tmp"
    tmp.write_text(json.dumps(metadata, indent=1, default=str), encoding="utf-8")
    tmp.replace(run.out / "training_metadata.json")
