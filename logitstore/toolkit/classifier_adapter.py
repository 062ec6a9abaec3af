"""Where a classifier's heads' logits and pooled features come from, and its input preprocessing.

A `ClassifierAdapter` is bound to one loaded model and turns a batch into the signals a
classifier store holds (issue 17, section 2):

    adapter = adapter_for(model)                 # or CompositeClassifierAdapter(model, parts=...)
    adapter.heads        {head: classes}         e.g. {"location": 12, "modality": 5}
    adapter.parts        {part: width}           e.g. {"image_cls": 768, "fused": 384}
    adapter.input_names  the batch keys it reads e.g. ("pixel_values", "input_ids", ...)
    adapter(batch)  ->   {"logits": {head: [B, classes]}, "features": {part: [B, width]}}

`batch` maps input names to tensors: pixel_values [B,3,H,W] float and/or input_ids,
attention_mask (and token_type_ids) [B,L] long; other keys are ignored. An adapter neither
switches the model to eval mode nor disables gradients: the caller decides (a teacher dump runs
it under torch.inference_mode() on an eval() model, a student's training step with gradients).

Ready adapters:
* `CompositeClassifierAdapter`: an `ImageTextClassifier` (classifier_models), any towers; its
  heads, and the parts image_cls, image_proj, text_cls, text_proj, fused of its towers.
* `SingleTowerAdapter`: a plain transformers classifier with one tower and a linear `classifier`
  module (ViTForImageClassification, DeiTForImageClassification, BertForSequenceClassification,
  DistilBertForSequenceClassification...): one head named `head_name` with config.num_labels
  classes; parts `image_cls` or `text_cls` (the last encoder layer's hidden state at position 0,
  from hidden_states, so before ViT's final LayerNorm) and `fused` (the classifier's input: ViT's
  normed CLS, BERT's pooler output, DistilBERT's pre-classifier activation).
Any other Hugging Face model works through a small class with the same four members.

Preprocessing: `image_processor_for(config)` builds the processor a new model saves next to its
weights (resize to the tower's image_size, rescale to [0, 1], normalise with mean/std; the PIL
backend, so torchvision is not needed), `load_image_processor(DIR)` reads the one a model
directory holds, and `preprocess_batch(...)` turns PIL images and texts into the batch above.
No augmentation: the same image always gives the same pixel_values.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

from logitstore.errors import LogitStoreError

# ViT's own defaults: pixel values end up in [-1, 1].
DEFAULT_IMAGE_MEAN = (0.5, 0.5, 0.5)
DEFAULT_IMAGE_STD = (0.5, 0.5, 0.5)
TEXT_INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


class ClassifierAdapter(Protocol):
    """The four members every adapter has; see the module docstring."""

    heads: dict[str, int]
    parts: dict[str, int]
    input_names: tuple[str, ...]

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, dict[str, Any]]: ...


def _chosen_parts(available: dict[str, int], parts: Sequence[str] | None,
                  model_name: str) -> dict[str, int]:
    """`available` restricted to `parts` (all when None), in `available`'s order."""
    if parts is None:
        return dict(available)
    unknown = [part for part in parts if part not in available]
    if unknown:
        raise LogitStoreError(
            f"unknown feature part(s) {', '.join(map(repr, unknown))} for {model_name}: it "
            f"outputs {', '.join(available)}; choose parts among these (or leave the parts "
            f"unset to keep them all)")
    return {part: width for part, width in available.items() if part in parts}


def _require_inputs(batch: Mapping[str, Any], required: Sequence[str], model_name: str) -> None:
    missing = [name for name in required if batch.get(name) is None]
    if missing:
        raise LogitStoreError(
            f"the batch lacks {', '.join(missing)}, which {model_name} needs (it has "
            f"{', '.join(sorted(k for k, v in batch.items() if v is not None)) or 'nothing'}); "
            f"build batches with preprocess_batch using the model's image processor and/or "
            f"tokenizer")


class CompositeClassifierAdapter:
    """An `ImageTextClassifier` (any towers): its heads and the chosen feature parts."""

    def __init__(self, model, parts: Sequence[str] | None = None):
        config = model.config
        available = config.part_widths
        self.model = model
        self.heads = dict(config.heads)
        self.parts = _chosen_parts(available, parts, "this image+text classifier")
        self.input_names = (("pixel_values",) if config.vision_config is not None else ()) + (
            TEXT_INPUT_NAMES if config.text_config is not None else ())

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        required = [n for n in self.input_names if n in ("pixel_values", "input_ids")]
        _require_inputs(batch, required, "this image+text classifier")
        output = self.model(**{name: batch.get(name) for name in self.input_names})
        return {"logits": dict(output.logits),
                "features": {part: output.features[part] for part in self.parts}}


class SingleTowerAdapter:
    """A transformers `*ForImageClassification` / `*ForSequenceClassification` model: one head
    named `head_name`; parts `image_cls` or `text_cls` and `fused` (the classifier's input)."""

    def __init__(self, model, head_name: str = "label", parts: Sequence[str] | None = None,
                 classifier_module: str = "classifier"):
        import torch

        name = type(model).__name__
        classifier = getattr(model, classifier_module, None)
        modality = {"pixel_values": "image", "input_ids": "text"}.get(
            getattr(model, "main_input_name", None))
        if modality is None or not isinstance(classifier, torch.nn.Linear):
            raise LogitStoreError(
                f"{name} is not a single-tower classifier this adapter knows: expected a model "
                f"whose main input is pixel_values or input_ids and whose "
                f"`{classifier_module}` module is a torch.nn.Linear, found main input "
                f"{getattr(model, 'main_input_name', None)!r} and {type(classifier).__name__}; "
                f"name the linear head with classifier_module= or write a small adapter with the "
                f"members of ClassifierAdapter")
        hidden = model.config.get_text_config().to_dict()
        width = hidden.get("hidden_size") or hidden.get("dim")
        available = {f"{modality}_cls": width, "fused": classifier.in_features}
        self.model = model
        self.modality = modality
        self.classifier = classifier
        self.heads = {head_name: classifier.out_features}
        self.parts = _chosen_parts(available, parts, name)
        # Only the inputs forward() takes: DistilBERT has no token_type_ids, yet a BERT-style
        # tokenizer produces them.
        accepted = inspect.signature(model.forward).parameters
        self.input_names = ("pixel_values",) if modality == "image" else tuple(
            n for n in TEXT_INPUT_NAMES if n in accepted)

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        _require_inputs(batch, self.input_names[:1], type(self.model).__name__)
        captured = []
        # The classifier's input is the representation the head reads; a pre-hook sees it
        # without re-implementing each model's pooling.
        hook = self.classifier.register_forward_pre_hook(
            lambda _module, args: captured.append(args[0]))
        try:
            inputs = {n: batch[n] for n in self.input_names if batch.get(n) is not None}
            output = self.model(**inputs, output_hidden_states=True)
        finally:
            hook.remove()
        head_input = captured[-1]  # [B, D]; [B, L, D] for heads that pool themselves
        available = {f"{self.modality}_cls": output.hidden_states[-1][:, 0],
                     "fused": head_input[:, 0] if head_input.dim() == 3 else head_input}
        (head_name,) = self.heads
        return {"logits": {head_name: output.logits},
                "features": {part: available[part] for part in self.parts}}


def adapter_for(model, *, parts: Sequence[str] | None = None,
                head_name: str = "label") -> ClassifierAdapter:
    """The ready adapter for `model`: composite for an ImageTextClassifier, single tower
    otherwise (which refuses, in one paragraph, models it cannot read)."""
    from logitstore.toolkit.classifier_models import ImageTextClassifier

    if isinstance(model, ImageTextClassifier):
        return CompositeClassifierAdapter(model, parts=parts)
    return SingleTowerAdapter(model, head_name=head_name, parts=parts)


# ---- preprocessing ---------------------------------------------------------------------------

def image_processor_for(config_or_size, mean: Sequence[float] = DEFAULT_IMAGE_MEAN,
                        std: Sequence[float] = DEFAULT_IMAGE_STD):
    """A ViT image processor (PIL backend) for a model config with a vision tower, a ViT/DeiT
    config, or an image side in pixels; save it with `.save_pretrained(model_dir)`."""
    from transformers import ViTImageProcessorPil

    size = config_or_size
    if not isinstance(size, int):
        vision = getattr(size, "vision_config", size)
        size = getattr(vision, "image_size", None)
        if not isinstance(size, int):
            raise LogitStoreError(
                f"cannot tell the image size from {type(config_or_size).__name__}: expected a "
                f"config with a vision tower (its image_size) or an int, found image_size "
                f"{size!r}; pass the image side in pixels")
    return ViTImageProcessorPil(size={"height": size, "width": size}, image_mean=list(mean),
                                image_std=list(std), do_resize=True, do_rescale=True,
                                do_normalize=True)


def load_image_processor(model_dir: str | Path):
    """The image processor saved in a model directory (preprocessor_config.json)."""
    from transformers import AutoImageProcessor

    path = Path(model_dir) / "preprocessor_config.json"
    if not path.is_file():
        raise LogitStoreError(
            f"{model_dir} has no preprocessor_config.json, so its images cannot be preprocessed "
            f"the way the model expects; save one with image_processor_for(model.config)"
            f".save_pretrained({str(model_dir)!r})")
    # Without torchvision, transformers resolves ViT's processor to its PIL backend.
    return AutoImageProcessor.from_pretrained(str(model_dir))


def pixel_values_from_images(image_processor, images: Sequence) -> Any:
    """PIL images (any mode, any size) -> pixel_values [B, 3, H, W] float32."""
    rgb = [image.convert("RGB") for image in images]  # grey or RGBA scans become 3 channels
    return image_processor(rgb, return_tensors="pt")["pixel_values"]


def text_inputs_from_texts(tokenizer, texts: Sequence[str], max_length: int = 128) -> dict:
    """Texts -> input_ids, attention_mask (and token_type_ids if the tokenizer makes them),
    each [B, L] long, padded to the longest text and truncated to `max_length` tokens."""
    encoded = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
    return {name: encoded[name] for name in TEXT_INPUT_NAMES if name in encoded}


def preprocess_batch(*, images: Sequence | None = None, texts: Sequence[str] | None = None,
                     image_processor=None, tokenizer=None, max_length: int = 128) -> dict:
    """The model inputs of one batch: pixel_values from `images` (with `image_processor`)
    and/or text inputs from `texts` (with `tokenizer`)."""
    batch: dict[str, Any] = {}
    for what, values, tool, tool_name in (("images", images, image_processor, "image_processor"),
                                          ("texts", texts, tokenizer, "tokenizer")):
        if values is not None and tool is None:
            raise LogitStoreError(
                f"preprocess_batch got {what} but no {tool_name}; pass the model's own "
                f"{tool_name} (load_image_processor / AutoTokenizer on the model directory)")
    if images is not None:
        batch["pixel_values"] = pixel_values_from_images(image_processor, images)
    if texts is not None:
        batch.update(text_inputs_from_texts(tokenizer, texts, max_length))
    return batch
