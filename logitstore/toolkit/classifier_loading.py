"""Reading a saved classifier before and while loading it: what it is (from config.json alone,
before any weight loads), its preprocessors, and the network in eval mode. Shared by
teacher-dump --task classify and distill-eval --task classify; each tool says in a `Wording`
how its messages name the classifier and itself.

    wording = Wording(tool="distill-eval --task classify", named="the {role} classifier",
                      given="{role}", causal_hint="A language model is evaluated with ...")
    classifier = inspect_classifier("run/final", wording, role="student", head_name="label",
                                    trust_remote_code=False, revision=None)
    classifier.kind ("composite" | "image" | "text"), .heads {head: classes}, .part_names,
    classifier.needs_image, .needs_text, .text_positions
    image_processor, tokenizer = load_preprocessors(classifier, trust_remote_code=False)
    network = load_classifier(classifier, dtype="auto", device="auto", trust_remote_code=False)
    network_facts(network)   # {"model_class", "dtype", "device"}: for provenance / reports

Classifiers: an `ImageTextClassifier` (logitstore.toolkit.classifier_models, loaded through
AutoModel once that module has registered it) or a plain transformers single-tower classifier
whose config names a `*ForImageClassification` (AutoModelForImageClassification) or
`*ForSequenceClassification` (AutoModelForSequenceClassification) architecture; its one head
is `head_name`. Anything else (a causal LM, a base encoder) is refused in one paragraph
(ConfigError) before its weights load; files that cannot be read raise ModelLoadError.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from logitstore.errors import ConfigError
from logitstore.toolkit.hf import ModelLoadError, hub_offline, resolve_model

IMAGE_ARCHITECTURE = "ForImageClassification"
TEXT_ARCHITECTURE = "ForSequenceClassification"
# The feature parts a single-tower classifier's adapter outputs (classifier_adapter.py).
IMAGE_TOWER_PARTS = ("image_cls", "fused")
TEXT_TOWER_PARTS = ("text_cls", "fused")


@dataclass(frozen=True)
class Wording:
    """How one tool's messages name a classifier and the tool; "{role}" is filled in."""

    tool: str  # what needs the files / cannot run it, e.g. "distill-eval --task classify"
    named: str  # the classifier in a load failure, e.g. "the {role} classifier"
    given: str  # what was given, before its name, when it is not a classifier, e.g. "{role}"
    causal_hint: str  # the last sentence of that refusal: where a language model goes instead


@dataclass(frozen=True)
class Classifier:
    """What a classifier is, read from its config: how to load it and what it reads."""

    role: str  # who it is in messages and logs: "teacher", "student", "baseline"...
    wording: Wording
    spec: Any  # logitstore.toolkit.hf.ModelSpec
    kind: str  # "composite" (ImageTextClassifier), "image" or "text" (single tower)
    heads: dict[str, int]  # head -> classes
    part_names: tuple[str, ...]  # the feature parts its adapter outputs
    needs_image: bool
    needs_text: bool
    text_positions: int | None  # the text tower's max_position_embeddings (None: no text)


def _load_kwargs(spec, trust_remote_code: bool) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code,
                              "local_files_only": hub_offline()}
    if spec.revision and not spec.is_local:
        kwargs["revision"] = spec.revision
    return kwargs


def _load_failure(wording: Wording, role: str, spec, what: str,
                  exc: BaseException) -> ModelLoadError:
    where = f"the directory {spec.path_or_id}" if spec.is_local else f"hub id {spec.path_or_id}"
    named = wording.named.format(role=role)
    return ModelLoadError(
        f"could not load the {what} of {named} {spec.name!r} from {where}: "
        f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}. {wording.tool} needs "
        f"config.json, the weights (*.safetensors) and the preprocessors its towers use "
        f"(preprocessor_config.json for images, the tokenizer files for text) as "
        f"save_pretrained writes them; offline, a hub id must be in the Hugging Face cache")


def inspect_classifier(name: str, wording: Wording, *, role: str, head_name: str,
                       trust_remote_code: bool, revision: str | None = None) -> Classifier:
    """The classifier `name` (directory, alias or hub id) is, from its config alone;
    ModelLoadError / ConfigError (one paragraph) when it cannot be read or is not one."""
    import logitstore.toolkit.classifier_models as classifier_models  # registers AutoModel
    from transformers import AutoConfig

    spec = resolve_model(name, revision)
    try:
        config = AutoConfig.from_pretrained(spec.path_or_id,
                                            **_load_kwargs(spec, trust_remote_code))
    except (OSError, ValueError) as exc:
        raise _load_failure(wording, role, spec, "config", exc) from exc
    architectures = list(getattr(config, "architectures", None) or [])
    found = dict(role=role, wording=wording, spec=spec)
    if config.model_type == classifier_models.MODEL_TYPE:
        text = config.text_config
        return Classifier(**found, kind="composite", heads=dict(config.heads),
                          part_names=tuple(config.part_widths),
                          needs_image=config.vision_config is not None,
                          needs_text=text is not None,
                          text_positions=getattr(text, "max_position_embeddings", None))
    single = {head_name: int(config.num_labels)}
    if any(a.endswith(IMAGE_ARCHITECTURE) for a in architectures):
        return Classifier(**found, kind="image", heads=single, part_names=IMAGE_TOWER_PARTS,
                          needs_image=True, needs_text=False, text_positions=None)
    if any(a.endswith(TEXT_ARCHITECTURE) for a in architectures):
        return Classifier(**found, kind="text", heads=single, part_names=TEXT_TOWER_PARTS,
                          needs_image=False, needs_text=True,
                          text_positions=getattr(config, "max_position_embeddings", None))
    raise ConfigError([
        f"{wording.given.format(role=role)} {name} is not a classifier {wording.tool} can "
        f"run: its config says model_type {config.model_type!r}, architectures "
        f"{architectures or 'none'}; expected an image+text classifier (model_type "
        f"{classifier_models.MODEL_TYPE!r}, logitstore.toolkit.classifier_models) or a "
        f"transformers *{IMAGE_ARCHITECTURE} / *{TEXT_ARCHITECTURE} model. "
        f"{wording.causal_hint}"])


def load_preprocessors(classifier: Classifier, *, trust_remote_code: bool) -> tuple[Any, Any]:
    """(image processor or None, tokenizer or None): those of the towers the classifier has,
    saved next to it. No augmentation: the view a model is scored on is the canonical one."""
    from logitstore.toolkit.classifier_adapter import load_image_processor
    from logitstore.toolkit.hf import load_tokenizer

    spec = classifier.spec
    image_processor = tokenizer = None
    if classifier.needs_image:
        if spec.is_local:
            image_processor = load_image_processor(spec.path_or_id)
        else:
            from transformers import AutoImageProcessor

            try:
                image_processor = AutoImageProcessor.from_pretrained(
                    spec.path_or_id, **_load_kwargs(spec, trust_remote_code))
            except (OSError, ValueError) as exc:
                raise _load_failure(classifier.wording, classifier.role, spec,
                                    "image processor", exc) from exc
    if classifier.needs_text:
        # spec carries the revision inspect_classifier resolved; None keeps it.
        tokenizer = load_tokenizer(spec, None, trust_remote_code)
    return image_processor, tokenizer


def resolve_device(device: str | None) -> str:
    """`device` as given; "auto" (or None): cuda when there is one, else cpu."""
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_classifier(classifier: Classifier, *, dtype: str, device: str | None,
                    trust_remote_code: bool) -> Any:
    """The network, in eval mode on `device` ("auto": cuda when there is one), weights in
    `dtype` ("auto": as saved, else a torch dtype name such as "float32")."""
    import torch
    from transformers import (AutoModel, AutoModelForImageClassification,
                              AutoModelForSequenceClassification)

    loader = {"composite": AutoModel, "image": AutoModelForImageClassification,
              "text": AutoModelForSequenceClassification}[classifier.kind]
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    try:
        network = loader.from_pretrained(classifier.spec.path_or_id, dtype=torch_dtype,
                                         **_load_kwargs(classifier.spec, trust_remote_code))
    except (OSError, ValueError) as exc:
        raise _load_failure(classifier.wording, classifier.role, classifier.spec, "weights",
                            exc) from exc
    network.to(resolve_device(device)).eval()
    return network


def network_facts(network) -> dict[str, str]:
    """{"model_class", "dtype", "device"} of a loaded network (its first parameter's)."""
    first = next(network.parameters())
    return {"model_class": type(network).__name__,
            "dtype": str(first.dtype).removeprefix("torch."), "device": str(first.device)}
