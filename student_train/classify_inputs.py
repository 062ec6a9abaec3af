"""The student's model inputs of a classifier store's samples, preprocessed once per run.

    cache = InputCache(budget_mb=2048, samples=len(split))
    inputs = cache.batch(rows, preprocess, text_pad(tokenizer))  # preprocess(rows) -> a batch
    # -> pixel_values [B,3,H,W], input_ids / attention_mask (/ token_type_ids) [B,L]

Decoding PNG/JPEG files and running the image processor is a large share of a small
student's step (about 30 % for bench/classify_bench.py's student on 48x48 images). The
inputs of a sample never change within a run (no augmentation: the stored teacher signals
are those of the canonical view, FORMAT.md section 4.3), so each sample is preprocessed the
first time a batch holds it and kept: from the second epoch on, a batch is a stack of kept
tensors. A sweep's trials each pay one epoch of preprocessing instead of every epoch.

What is kept per sample: its pixel values [3, H, W] float32, exactly what the image
processor makes of the image alone (ViT-style processors treat the images of a batch
independently), and its token ids, attention mask and token type ids unpadded; a batch pads
them with the tokenizer's own `pad` to the longest text of the batch, as tokenising the
batch's texts together does. tests/test_classify_inputs.py checks both against
`preprocess_batch` of the same batch.

The budget bounds the memory of one split's cache: the first sample's size times the split's
samples is compared with `budget_mb`, and a split that would not fit is not cached at all
(every batch is preprocessed together as before; the run's log says so once). As texts
differ in length, the kept bytes are also counted: once they reach the budget no further
sample is kept (those are preprocessed one by one, the same values), so the cache never
holds more than `budget_mb`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from logitstore.toolkit.classifier_adapter import TEXT_INPUT_NAMES

MB = 2**20


class InputCache:
    """Per-sample preprocessed inputs of one split, filled as samples are first used."""

    def __init__(self, budget_mb: int, samples: int,
                 log: Callable[[str], None] | None = None):
        self.budget_bytes = budget_mb * MB
        self.samples = samples
        self.enabled = budget_mb > 0
        self._kept: dict[int, dict[str, torch.Tensor]] = {}
        self._kept_bytes = 0
        self._log = log

    def batch(self, rows: Sequence[int],
              preprocess: Callable[[Sequence[int]], dict[str, torch.Tensor]],
              pad: Callable[[list[dict]], dict[str, torch.Tensor]] | None) -> dict[str, Any]:
        """The model inputs of the samples `rows`: from the kept tensors (a sample not kept
        yet is preprocessed alone, `preprocess([row])`, and kept unbatched), or
        `preprocess(rows)` when caching is off or the split does not fit."""
        if not self.enabled:
            return preprocess(rows)
        kept = []
        for row in rows:
            one = self._kept.get(row)
            if one is None:
                one = {name: value[0] for name, value in preprocess([row]).items()}
                if not self._kept and not self._fits(one):
                    return preprocess(rows)
                size = _nbytes(one)
                if self._kept_bytes + size <= self.budget_bytes:
                    self._kept[row] = one
                    self._kept_bytes += size
            kept.append(one)
        batch: dict[str, Any] = {}
        if "pixel_values" in kept[0]:
            batch["pixel_values"] = torch.stack([k["pixel_values"] for k in kept])
        texts = [{n: k[n] for n in TEXT_INPUT_NAMES if n in k} for k in kept]
        if texts[0] and pad is not None:
            batch.update(pad(texts))
        return batch

    def _fits(self, first: dict[str, torch.Tensor]) -> bool:
        per_sample = _nbytes(first)
        needed = per_sample * self.samples
        if needed <= self.budget_bytes:
            return True
        self.enabled = False
        if self._log:
            self._log(f"inputs not cached: {self.samples} samples x {per_sample / MB:.2f} MB "
                      f"= {needed / MB:.0f} MB > input_cache_mb={self.budget_bytes // MB}; "
                      f"every batch is preprocessed (raise --input-cache-mb to cache them)")
        return False


def _nbytes(inputs: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in inputs.values())


def text_pad(tokenizer) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
    """Pad kept per-sample text inputs to the longest of the batch with the tokenizer's
    own padding (side, pad id, pad token type), as tokenising the texts together does."""

    def pad(encodings: list[dict]) -> dict[str, torch.Tensor]:
        lists = [{n: t.tolist() for n, t in e.items()} for e in encodings]
        padded = tokenizer.pad(lists, padding=True, return_tensors="pt")
        return {n: padded[n] for n in TEXT_INPUT_NAMES if n in padded}

    return pad
