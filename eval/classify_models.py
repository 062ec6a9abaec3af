"""The classifiers of `distill-eval --task classify`: what each role's model is (from its
config, before any weight loads), its preprocessors, loading it, and scoring samples.

    model = inspect_classifier("student", "run/final", cfg)   # config.json only
    model.heads {head: classes}, model.needs_image, model.needs_text
    preprocessors = load_preprocessors(model, cfg)             # (image processor, tokenizer)
    network, info = load_classifier(model, cfg)                # eval mode, on cfg.device
    logits = score(network, model, preprocessors, samples, batch_size)   # {head: [N, C]}

Models: an `ImageTextClassifier` (logitstore.toolkit.classifier_models, loaded through
AutoModel once that module has registered it) or a plain transformers single-tower classifier
whose config names a `*ForImageClassification` / `*ForSequenceClassification` architecture
(its one head is `--head-name`). Anything else is refused in one paragraph before its weights
load. Reading and loading are logitstore.toolkit.classifier_loading's, worded for distill-eval
here. Scoring goes through `logitstore.toolkit.classifier_adapter` (adapter_for,
preprocess_batch) under torch.inference_mode(), in batches of `--batch-size`, images decoded
with `load_rgb` (no augmentation: the canonical view, as teacher-dump stores it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from logitstore.toolkit import classifier_loading
from logitstore.toolkit.classifier_loading import Classifier, Wording, network_facts

log = logging.getLogger(__name__)

MAX_TEXT_TOKENS = 512  # longer texts are cut, as student-train --task classify does
WORDING = Wording(tool="distill-eval --task classify", named="the {role} classifier",
                  given="{role}", causal_hint="A language model is evaluated with --task "
                  "causal-lm (the default)")
ClassifierModel = Classifier  # what one role's classifier is, read from its config


@dataclass(frozen=True)
class Sample:
    """One labelled input to score: image path (None: text only), text, labels per head."""

    image_path: Path | None
    text: str
    labels: dict[str, int]  # head -> class, -1 = unlabelled


def text_max_length(model: ClassifierModel) -> int:
    """Tokens per text: the text tower's positions, at most MAX_TEXT_TOKENS."""
    return min(model.text_positions or MAX_TEXT_TOKENS, MAX_TEXT_TOKENS)


def inspect_classifier(role: str, name: str, cfg) -> ClassifierModel:
    """The classifier `name` is, from its config alone; ModelLoadError / ConfigError (one
    paragraph) when it cannot be read or is not a classifier."""
    return classifier_loading.inspect_classifier(
        name, WORDING, role=role, head_name=cfg.head_name,
        trust_remote_code=cfg.trust_remote_code)


def load_preprocessors(model: ClassifierModel, cfg) -> tuple[Any, Any]:
    """(image processor or None, tokenizer or None) saved with the model, for its towers."""
    return classifier_loading.load_preprocessors(model, trust_remote_code=cfg.trust_remote_code)


def load_classifier(model: ClassifierModel, cfg) -> tuple[Any, dict[str, Any]]:
    """(the network in eval mode on cfg.device, report.json's models[role] entry)."""
    network = classifier_loading.load_classifier(model, dtype=cfg.dtype, device=cfg.device,
                                                 trust_remote_code=cfg.trust_remote_code)
    facts = network_facts(network)
    info = {"name": model.spec.name, "path_or_id": model.spec.path_or_id,
            "model_class": facts["model_class"], "kind": model.kind,
            "heads": dict(model.heads),
            "parameters": sum(p.numel() for p in network.parameters()),
            "dtype": facts["dtype"], "device": facts["device"]}
    log.info("[%s] loaded %s", model.role, info)
    return network, info


def score(network, model: ClassifierModel, preprocessors: tuple[Any, Any],
          samples: Sequence[Sample], batch_size: int, head_name: str = "label",
          progress: bool = False) -> dict[str, Any]:
    """{head: logits [N, C] float32 numpy} of `samples`, in their order."""
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from logitstore.toolkit.classifier_adapter import adapter_for, preprocess_batch
    from logitstore.toolkit.classify_records import load_rgb

    adapter = adapter_for(network, head_name=head_name)
    image_processor, tokenizer = preprocessors
    first = next(network.parameters())
    chunks: dict[str, list[np.ndarray]] = {head: [] for head in model.heads}
    for start in tqdm(range(0, len(samples), batch_size), desc=f"score {model.role}",
                      unit="batch", disable=not progress):
        chosen = samples[start:start + batch_size]
        batch = preprocess_batch(
            images=[load_rgb(s.image_path) for s in chosen] if model.needs_image else None,
            texts=[s.text for s in chosen] if model.needs_text else None,
            image_processor=image_processor, tokenizer=tokenizer,
            max_length=text_max_length(model))
        # pixel_values [B,3,H,W] in the weights' dtype; token ids [B,L] stay integers.
        batch = {k: (t.to(first.device, first.dtype) if t.is_floating_point()
                     else t.to(first.device)) for k, t in batch.items()}
        with torch.inference_mode():
            logits = adapter(batch)["logits"]  # {head: [B, C]}
        for head in chunks:
            chunks[head].append(logits[head].float().cpu().numpy())
    return {head: np.concatenate(parts) if parts else
            np.zeros((0, model.heads[head]), np.float32) for head, parts in chunks.items()}
