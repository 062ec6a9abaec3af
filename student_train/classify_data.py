"""The data of `student-train --task classify`: one split of a classifier store, in batches.

    data_root = resolve_data_root(cfg.data_root, reader)
    train = load_split(reader, "train", data_root)      # ClassifySplit, checked (images exist)
    order = epoch_order(len(train), seed, epoch)        # the samples' order in one epoch
    batch = make_batch(train, order[:32], student)      # model inputs + teacher signals
    batch["pixel_values"] [B,3,H,W], batch["input_ids"] / ["attention_mask"] [B,L]
    batch["labels"] {head: [B] long, -100 unlabelled}, batch["teacher_logits"] {head: [B,C]},
    batch["teacher_features"] {part: [B,D]}, batch["sample_index"] [B] long

`ClassifySplit` holds what `ClassifierReader.arrays(split)` returns as torch tensors, plus each
sample's image path resolved to a file. Its samples are numbered 0..N-1 in store order; that
number is `sample_index`, the row of CRD's memory banks.

Image paths (logitstore.toolkit.classify_store_images.store_image_path): an absolute path is
read as is; a relative one from the data root when there is one (`--data-root`, else a
`data_root` the store records in its manifest's `extra`), else from the sample's data source
as teacher-dump records it (the JSONL file's directory, or the imagefolder itself), else from
the current directory. Every image file of the split is checked to exist before training (one
paragraph naming the first missing ones, with their sample ids and data sources, and the data
root used). Images are loaded and preprocessed through the student's own image processor
and texts through its tokenizer (no augmentation: the stored teacher signals are those of
this canonical view), per batch, or once per sample when the split has an `inputs` cache
(classify_inputs.InputCache, `input_cache_mb`). The order of an epoch is a permutation
drawn from (seed, epoch) alone, so a resumed run finds it again from the epoch number.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from logitstore.errors import LogitStoreError
from logitstore.toolkit.classify_store_images import resolve_data_root  # noqa: F401 (re-export)
from student_train.classify_inputs import InputCache, text_pad

UNLABELLED_IN_LOSS = -100  # classify_losses' ignore index; the store writes -1


@dataclass
class ClassifySplit:
    """One split of the store: inputs (paths, texts) and teacher signals, sample i in row i."""

    name: str
    sample_ids: list[str]
    image_paths: list[Path | None]
    texts: list[str | None]
    logits: dict[str, torch.Tensor]  # head -> [N, C] float32
    features: dict[str, torch.Tensor]  # part -> [N, D] float32
    labels: dict[str, torch.Tensor]  # head -> [N] long, -1 = unlabelled
    # the student's preprocessed inputs, kept per sample (classify_inputs); None: per batch
    inputs: InputCache | None = None

    def __len__(self) -> int:
        return len(self.sample_ids)


def load_split(reader, split: str, data_root: Path | None,
               needs_images: bool = True) -> ClassifySplit:
    """The samples of `split` with their image files resolved (classify_store_images) and,
    when the student has a vision tower (`needs_images`), checked to exist."""
    from logitstore.toolkit.classify_store_images import resolve_store_images

    counts = reader.split_counts()
    if not counts.get(split):
        raise LogitStoreError(f"store {reader.store.fs.url}: expected samples in split {split!r}, "
                              f"found the splits {counts}; choose one with --train-split / "
                              f"--eval-split")
    arrays = reader.arrays(split)
    paths = resolve_store_images(
        arrays, data_root=data_root, needed_by="student's vision tower" if needs_images else None,
        where=f"store {reader.store.fs.url} split {split!r}",
        fix="give --data-root, the directory teacher-dump read the records from")
    return ClassifySplit(
        name=split, sample_ids=list(arrays.sample_ids), image_paths=paths,
        texts=list(arrays.texts),
        logits={h: torch.from_numpy(np.asarray(a, np.float32)) for h, a in arrays.logits.items()},
        features={p: torch.from_numpy(np.asarray(a, np.float32))
                  for p, a in arrays.features.items()},
        labels={h: torch.from_numpy(np.asarray(a, np.int64)) for h, a in arrays.labels.items()})


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """[n] long: the samples' order in `epoch` (store order without shuffle)."""
    if not shuffle:
        return torch.arange(n)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator)


def batches_per_epoch(n: int, batch_size: int) -> int:
    """Full batches only: a short last batch would change the loss scale and CRD's batch."""
    return n // batch_size


def _model_inputs(split: ClassifySplit, index: torch.Tensor, student) -> dict[str, Any]:
    from logitstore.toolkit.classifier_adapter import preprocess_batch
    from logitstore.toolkit.classify_records import load_rgb

    text_config = student.model.config.text_config
    max_length = getattr(text_config, "max_position_embeddings", 128) if text_config else 128

    def preprocess(rows) -> dict[str, Any]:
        images = texts = None
        if student.image_processor is not None:
            images = [load_rgb(split.image_paths[i]) for i in rows]
        if student.tokenizer is not None:
            texts = [split.texts[i] or "" for i in rows]
        return preprocess_batch(images=images, texts=texts,
                                image_processor=student.image_processor,
                                tokenizer=student.tokenizer, max_length=min(max_length, 512))

    rows = index.tolist()
    if split.inputs is None:
        return preprocess(rows)
    pad = text_pad(student.tokenizer) if student.tokenizer is not None else None
    return split.inputs.batch(rows, preprocess, pad)


def make_batch(split: ClassifySplit, index: torch.Tensor, student,
               device: torch.device | str = "cpu") -> dict[str, Any]:
    """The model inputs and teacher signals of the samples `index` ([B] long) of `split`."""
    batch = {name: value.to(device) for name, value in _model_inputs(split, index, student).items()}
    batch["labels"] = {h: torch.where(y[index] < 0, UNLABELLED_IN_LOSS, y[index]).to(device)
                       for h, y in split.labels.items()}
    batch["teacher_logits"] = {h: v[index].to(device) for h, v in split.logits.items()}
    batch["teacher_features"] = {p: v[index].to(device) for p, v in split.features.items()}
    batch["sample_index"] = index.to(device)
    return batch
