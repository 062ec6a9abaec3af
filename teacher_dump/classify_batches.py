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
Reading and loading are logitstore.toolkit.classifier_loading's, worded for teacher-dump
here; this module adds the check of `--features` against the parts the teacher outputs.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

from logitstore.errors import ConfigError
from logitstore.toolkit import classifier_loading
from logitstore.toolkit.classifier_loading import Classifier, Wording, network_facts
from teacher_dump.config import DumpConfig

log = logging.getLogger(__name__)

WORDING = Wording(tool="--task classify", named="classifier", given="model",
                  causal_hint="A causal language model is dumped with --task causal-lm "
                  "(the default)")
ClassifierTeacher = Classifier  # what the teacher is, read from its config


def inspect_classifier(cfg: DumpConfig) -> ClassifierTeacher:
    """The classifier `cfg.model` is, from its config alone; its feature parts checked
    against `cfg.features`. ModelLoadError / ConfigError in one paragraph otherwise."""
    teacher = classifier_loading.inspect_classifier(
        cfg.model, WORDING, role="teacher", head_name=cfg.head_name,
        trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
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
    return classifier_loading.load_preprocessors(teacher,
                                                 trust_remote_code=cfg.trust_remote_code)


def load_classifier(cfg: DumpConfig, teacher: ClassifierTeacher) -> tuple[Any, dict[str, Any]]:
    """(the model in eval mode on cfg.device, what was loaded: for the store's provenance)."""
    model = classifier_loading.load_classifier(teacher, dtype=cfg.dtype, device=cfg.device,
                                               trust_remote_code=cfg.trust_remote_code)
    facts = network_facts(model)
    info = {"model_id": teacher.spec.name, "path_or_id": teacher.spec.path_or_id,
            "revision": teacher.spec.revision, "model_class": facts["model_class"],
            "dtype": facts["dtype"], "device": facts["device"], "kind": teacher.kind}
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
