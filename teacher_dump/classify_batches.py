"""The teacher side of `teacher-dump --task classify`: what the classifier is (from its
config, before any weight is loaded), loading it with its preprocessors, and one batch's
forward pass.

    teacher = inspect_classifier(cfg)             # config.json only; refuses non-classifiers
    image_processor, tokenizer = load_preprocessors(cfg, teacher)
    model, info = load_classifier(cfg, teacher)   # eval mode, on cfg.device
    adapter = adapter_for(model, parts=cfg.features or None, head_name=cfg.head_name)
    outputs = forward_batch(adapter, teacher, [image or None, ...], [text, ...],
                            image_processor, tokenizer)   # [(logits, features)] per sample

Teachers: an `ImageTextClassifier` (logitstore.toolkit.classifier_models, loaded through
AutoModel once that module has registered it) or a plain transformers single-tower
classifier whose config names a `*ForImageClassification` (AutoModelForImageClassification)
or `*ForSequenceClassification` (AutoModelForSequenceClassification) architecture. Anything
else (a causal LM, a base encoder) is refused in one paragraph before its weights load.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

from logitstore.errors import ConfigError
from logitstore.toolkit.hf import ModelLoadError, hub_offline, resolve_model
from teacher_dump.config import DumpConfig

log = logging.getLogger(__name__)

IMAGE_ARCHITECTURE = "ForImageClassification"
TEXT_ARCHITECTURE = "ForSequenceClassification"


@dataclass(frozen=True)
class ClassifierTeacher:
    """What a classifier is, read from its config: how to load it and what it reads."""

    spec: Any  # logitstore.toolkit.hf.ModelSpec
    kind: str  # "composite" (ImageTextClassifier), "image" or "text" (single tower)
    heads: dict[str, int]  # head -> classes
    part_names: tuple[str, ...]  # the feature parts the model outputs
    needs_image: bool
    needs_text: bool
    text_positions: int | None  # the text tower's max_position_embeddings (None: no text)


def _load_kwargs(cfg: DumpConfig, spec) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code,
                              "local_files_only": hub_offline()}
    if spec.revision and not spec.is_local:
        kwargs["revision"] = spec.revision
    return kwargs


def _load_failure(spec, what: str, exc: BaseException) -> ModelLoadError:
    where = f"the directory {spec.path_or_id}" if spec.is_local else f"hub id {spec.path_or_id}"
    return ModelLoadError(
        f"could not load the {what} of classifier {spec.name!r} from {where}: "
        f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}. --task classify needs "
        f"config.json, the weights (*.safetensors), and the preprocessors its towers use "
        f"(preprocessor_config.json for images, the tokenizer files for text) as "
        f"save_pretrained writes them; offline, a hub id must be in the Hugging Face cache")


def inspect_classifier(cfg: DumpConfig) -> ClassifierTeacher:
    """The classifier `cfg.model` is, from its config alone; its feature parts checked
    against `cfg.features`. ModelLoadError / ConfigError in one paragraph otherwise."""
    import logitstore.toolkit.classifier_models as classifier_models  # registers AutoModel
    from transformers import AutoConfig

    spec = resolve_model(cfg.model, cfg.revision)
    try:
        config = AutoConfig.from_pretrained(spec.path_or_id, **_load_kwargs(cfg, spec))
    except (OSError, ValueError) as exc:
        raise _load_failure(spec, "config", exc) from exc
    architectures = list(getattr(config, "architectures", None) or [])
    if config.model_type == classifier_models.MODEL_TYPE:
        text = config.text_config
        teacher = ClassifierTeacher(
            spec, "composite", dict(config.heads), tuple(config.part_widths),
            needs_image=config.vision_config is not None, needs_text=text is not None,
            text_positions=getattr(text, "max_position_embeddings", None))
    elif any(a.endswith(IMAGE_ARCHITECTURE) for a in architectures):
        teacher = ClassifierTeacher(spec, "image", {cfg.head_name: int(config.num_labels)},
                                    ("image_cls", "fused"), True, False, None)
    elif any(a.endswith(TEXT_ARCHITECTURE) for a in architectures):
        teacher = ClassifierTeacher(spec, "text", {cfg.head_name: int(config.num_labels)},
                                    ("text_cls", "fused"), False, True,
                                    getattr(config, "max_position_embeddings", None))
    else:
        raise ConfigError([
            f"model {cfg.model} is not a classifier --task classify can run: its config says "
            f"model_type {config.model_type!r}, architectures {architectures or 'none'}; "
            f"expected an image+text classifier (model_type {classifier_models.MODEL_TYPE!r}, "
            f"logitstore.toolkit.classifier_models) or a transformers *{IMAGE_ARCHITECTURE} / "
            f"*{TEXT_ARCHITECTURE} model. A causal language model is dumped with --task "
            f"causal-lm (the default)"])
    unknown = [part for part in cfg.features if part not in teacher.part_names]
    if unknown:
        raise ConfigError([
            f"features: unknown part(s) {', '.join(map(repr, unknown))} for {cfg.model}, "
            f"which outputs {', '.join(teacher.part_names)}; choose among these, or leave "
            f"--features unset to store them all"])
    return teacher


def load_preprocessors(cfg: DumpConfig, teacher: ClassifierTeacher) -> tuple[Any, Any]:
    """(image processor or None, tokenizer or None): those of the towers the model has,
    saved next to it. No augmentation: the stored view is the canonical one."""
    from logitstore.toolkit.classifier_adapter import load_image_processor
    from logitstore.toolkit.hf import load_tokenizer

    image_processor = tokenizer = None
    if teacher.needs_image:
        if teacher.spec.is_local:
            image_processor = load_image_processor(teacher.spec.path_or_id)
        else:
            from transformers import AutoImageProcessor

            try:
                image_processor = AutoImageProcessor.from_pretrained(
                    teacher.spec.path_or_id, **_load_kwargs(cfg, teacher.spec))
            except (OSError, ValueError) as exc:
                raise _load_failure(teacher.spec, "image processor", exc) from exc
    if teacher.needs_text:
        tokenizer = load_tokenizer(teacher.spec, cfg.revision, cfg.trust_remote_code)
    return image_processor, tokenizer


def load_classifier(cfg: DumpConfig, teacher: ClassifierTeacher) -> tuple[Any, dict[str, Any]]:
    """(the model in eval mode on cfg.device, what was loaded: for the store's provenance)."""
    import torch
    from transformers import (AutoModel, AutoModelForImageClassification,
                              AutoModelForSequenceClassification)

    loader = {"composite": AutoModel, "image": AutoModelForImageClassification,
              "text": AutoModelForSequenceClassification}[teacher.kind]
    device = cfg.device if cfg.device != "auto" else (
        "cuda" if torch.cuda.is_available() else "cpu")
    dtype = "auto" if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
    try:
        model = loader.from_pretrained(teacher.spec.path_or_id, dtype=dtype,
                                       **_load_kwargs(cfg, teacher.spec))
    except (OSError, ValueError) as exc:
        raise _load_failure(teacher.spec, "weights", exc) from exc
    model.to(device).eval()
    info = {"model_id": teacher.spec.name, "path_or_id": teacher.spec.path_or_id,
            "revision": teacher.spec.revision, "model_class": type(model).__name__,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "device": str(next(model.parameters()).device), "kind": teacher.kind}
    log.info("loaded classifier %s", info)
    return model, info


def text_max_length(cfg: DumpConfig, teacher: ClassifierTeacher) -> int:
    """Tokens per text (special tokens included): cfg.max_length, at most the text tower's
    positions (a BERT of 512 positions cannot read more whatever --max-length says)."""
    limit = cfg.max_length or teacher.text_positions or 512
    if teacher.text_positions and limit > teacher.text_positions:
        log.info("texts are truncated at %d tokens, the text tower's positions (max_length "
                 "%d)", teacher.text_positions, limit)
        limit = teacher.text_positions
    return limit


def forward_batch(adapter, teacher: ClassifierTeacher, images: Sequence, texts: Sequence[str],
                  image_processor, tokenizer, max_length: int
                  ) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """One forward pass of the adapter under inference mode: per sample, ({head: [C]},
    {part: [D]}) as float32 numpy arrays. `images`: PIL images (read only when the model has
    a vision tower); `texts`: strings (tokenized only when it has a text tower)."""
    import torch

    from logitstore.toolkit.classifier_adapter import preprocess_batch

    batch = preprocess_batch(images=list(images) if teacher.needs_image else None,
                             texts=list(texts) if teacher.needs_text else None,
                             image_processor=image_processor, tokenizer=tokenizer,
                             max_length=max_length)
    parameter = next(adapter.model.parameters())
    # pixel_values [B,3,H,W] in the weights' dtype; token ids [B,L] stay integers.
    batch = {name: (t.to(parameter.device, parameter.dtype) if t.is_floating_point()
                    else t.to(parameter.device)) for name, t in batch.items()}
    with torch.inference_mode():
        out = adapter(batch)
    logits = {h: t.float().cpu().numpy() for h, t in out["logits"].items()}  # [B, C]
    features = {p: t.float().cpu().numpy() for p, t in out["features"].items()}  # [B, D]
    size = len(texts)
    return [({h: v[i] for h, v in logits.items()}, {p: v[i] for p, v in features.items()})
            for i in range(size)]
