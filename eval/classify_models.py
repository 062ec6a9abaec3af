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
load. Scoring goes through `logitstore.toolkit.classifier_adapter` (adapter_for,
preprocess_batch) under torch.inference_mode(), in batches of `--batch-size`, images decoded
with `load_rgb` (no augmentation: the canonical view, as teacher-dump stores it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from logitstore.errors import ConfigError
from logitstore.toolkit.hf import ModelLoadError, hub_offline, resolve_model

log = logging.getLogger(__name__)

IMAGE_ARCHITECTURE = "ForImageClassification"
TEXT_ARCHITECTURE = "ForSequenceClassification"
MAX_TEXT_TOKENS = 512  # longer texts are cut, as student-train --task classify does


@dataclass(frozen=True)
class ClassifierModel:
    """What one role's classifier is, read from its config."""

    role: str
    spec: Any  # logitstore.toolkit.hf.ModelSpec
    kind: str  # "composite" (ImageTextClassifier), "image" or "text" (single tower)
    heads: dict[str, int]  # head -> classes
    needs_image: bool
    needs_text: bool
    text_positions: int | None  # the text tower's max_position_embeddings

    @property
    def max_length(self) -> int:
        return min(self.text_positions or MAX_TEXT_TOKENS, MAX_TEXT_TOKENS)


@dataclass(frozen=True)
class Sample:
    """One labelled input to score: image path (None: text only), text, labels per head."""

    image_path: Path | None
    text: str
    labels: dict[str, int]  # head -> class, -1 = unlabelled


def _load_kwargs(cfg, spec) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code,
                              "local_files_only": hub_offline()}
    if spec.revision and not spec.is_local:
        kwargs["revision"] = spec.revision
    return kwargs


def _load_failure(role: str, spec, what: str, exc: BaseException) -> ModelLoadError:
    where = f"the directory {spec.path_or_id}" if spec.is_local else f"hub id {spec.path_or_id}"
    return ModelLoadError(
        f"could not load the {what} of the {role} classifier {spec.name!r} from {where}: "
        f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}. distill-eval --task "
        f"classify needs config.json, the weights (*.safetensors) and the preprocessors its "
        f"towers use (preprocessor_config.json for images, the tokenizer files for text) as "
        f"save_pretrained writes them; offline, a hub id must be in the Hugging Face cache")


def inspect_classifier(role: str, name: str, cfg) -> ClassifierModel:
    """The classifier `name` is, from its config alone; ModelLoadError / ConfigError (one
    paragraph) when it cannot be read or is not a classifier."""
    import logitstore.toolkit.classifier_models as classifier_models  # registers AutoModel
    from transformers import AutoConfig

    spec = resolve_model(name)
    try:
        config = AutoConfig.from_pretrained(spec.path_or_id, **_load_kwargs(cfg, spec))
    except (OSError, ValueError) as exc:
        raise _load_failure(role, spec, "config", exc) from exc
    architectures = list(getattr(config, "architectures", None) or [])
    if config.model_type == classifier_models.MODEL_TYPE:
        text = config.text_config
        return ClassifierModel(role, spec, "composite", dict(config.heads),
                               needs_image=config.vision_config is not None,
                               needs_text=text is not None,
                               text_positions=getattr(text, "max_position_embeddings", None))
    if any(a.endswith(IMAGE_ARCHITECTURE) for a in architectures):
        return ClassifierModel(role, spec, "image", {cfg.head_name: int(config.num_labels)},
                               True, False, None)
    if any(a.endswith(TEXT_ARCHITECTURE) for a in architectures):
        return ClassifierModel(role, spec, "text", {cfg.head_name: int(config.num_labels)},
                               False, True, getattr(config, "max_position_embeddings", None))
    raise ConfigError([
        f"{role} {name} is not a classifier distill-eval --task classify can run: its config "
        f"says model_type {config.model_type!r}, architectures {architectures or 'none'}; "
        f"expected an image+text classifier (model_type {classifier_models.MODEL_TYPE!r}) or a "
        f"transformers *{IMAGE_ARCHITECTURE} / *{TEXT_ARCHITECTURE} model. A language model "
        f"is evaluated with --task causal-lm (the default)"])


def load_preprocessors(model: ClassifierModel, cfg) -> tuple[Any, Any]:
    """(image processor or None, tokenizer or None) saved with the model, for its towers."""
    from logitstore.toolkit.classifier_adapter import load_image_processor
    from logitstore.toolkit.hf import load_tokenizer

    image_processor = tokenizer = None
    if model.needs_image:
        if model.spec.is_local:
            image_processor = load_image_processor(model.spec.path_or_id)
        else:
            from transformers import AutoImageProcessor

            try:
                image_processor = AutoImageProcessor.from_pretrained(
                    model.spec.path_or_id, **_load_kwargs(cfg, model.spec))
            except (OSError, ValueError) as exc:
                raise _load_failure(model.role, model.spec, "image processor", exc) from exc
    if model.needs_text:
        tokenizer = load_tokenizer(model.spec, None, cfg.trust_remote_code)
    return image_processor, tokenizer


def _device(device: str) -> str:
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_classifier(model: ClassifierModel, cfg) -> tuple[Any, dict[str, Any]]:
    """(the network in eval mode on cfg.device, report.json's models[role] entry)."""
    import torch
    from transformers import (AutoModel, AutoModelForImageClassification,
                              AutoModelForSequenceClassification)

    loader = {"composite": AutoModel, "image": AutoModelForImageClassification,
              "text": AutoModelForSequenceClassification}[model.kind]
    dtype = "auto" if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
    try:
        network = loader.from_pretrained(model.spec.path_or_id, dtype=dtype,
                                         **_load_kwargs(cfg, model.spec))
    except (OSError, ValueError) as exc:
        raise _load_failure(model.role, model.spec, "weights", exc) from exc
    network.to(_device(cfg.device)).eval()
    first = next(network.parameters())
    info = {"name": model.spec.name, "path_or_id": model.spec.path_or_id,
            "model_class": type(network).__name__, "kind": model.kind,
            "heads": dict(model.heads),
            "parameters": sum(p.numel() for p in network.parameters()),
            "dtype": str(first.dtype).removeprefix("torch."), "device": str(first.device)}
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
            image_processor=image_processor, tokenizer=tokenizer, max_length=model.max_length)
        # pixel_values [B,3,H,W] in the weights' dtype; token ids [B,L] stay integers.
        batch = {k: (t.to(first.device, first.dtype) if t.is_floating_point()
                     else t.to(first.device)) for k, t in batch.items()}
        with torch.inference_mode():
            logits = adapter(batch)["logits"]  # {head: [B, C]}
        for head in chunks:
            chunks[head].append(logits[head].float().cpu().numpy())
    return {head: np.concatenate(parts) if parts else
            np.zeros((0, model.heads[head]), np.float32) for head, parts in chunks.items()}
