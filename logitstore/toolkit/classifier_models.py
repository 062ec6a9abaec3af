"""Image + text classifiers built from `transformers` parts: one class for composites and towers.

`ImageTextClassifier` is a ViT/DeiT vision tower and/or a BERT/DistilBERT text tower, a linear
projection of each tower to a common width (`fusion_dim`), cross-attention fusion when both towers
are present, dropout, and one linear head per named task (`heads: {modality: 5, location: 12}`).
Single-tower classifiers are the same class with the other tower's config set to None: an
image-only (`text_config=None`) or text-only (`vision_config=None`) model.

Fusion (both towers): the projected text CLS is the query of `fusion_layers` pre-LayerNorm blocks;
each block lets it attend to all projected image tokens (CLS + patches, and DeiT's distillation
token), then applies a feed-forward layer, both with residual connections. The fused vector is the
final LayerNorm of that query, so the text decides where to look in the image. With one tower
there is no fusion: `fused` is that tower's projected CLS, and `fusion_layers`/`fusion_heads` are
unused.

Interface (for teacher-dump, student-train and the bench):
    import logitstore.toolkit.classifier_models  # registers the model with AutoConfig/AutoModel
    config = ImageTextClassifierConfig(vision_config={"model_type": "vit", "image_size": 32, ...},
                                       text_config={"model_type": "bert", "vocab_size": 400, ...},
                                       heads={"modality": 5, "location": 12}, fusion_dim=64)
    model = ImageTextClassifier(config)
    out = model(pixel_values=[B,3,H,W], input_ids=[B,L], attention_mask=[B,L],
                labels={"modality": [B], ...} or None)
    out.logits    {head: [B, classes]}
    out.features  {"image_cls": [B, Hv], "image_proj": [B, F], "text_cls": [B, Ht],
                   "text_proj": [B, F], "fused": [B, F]}  (the parts of the towers present)
    out.loss      sum over heads of the mean cross-entropy (labels -100 ignored), or None
    model.save_pretrained(DIR); AutoModel.from_pretrained(DIR)  # safetensors, no remote code

`fused` is always what the heads read (before dropout): the penultimate representation that CRD
and feature losses compare. Omitting a tower's config gives the realistic default sizes, ViT-Base/16
at 224x224 and BERT-base (768 wide, 12 layers), with fusion_dim 384, 2 fusion layers of 4 heads
(seed 002's tuned student); nothing is downloaded: weights are randomly initialised from the config.

Unlike the other toolkit modules this one imports torch and transformers at the top: it defines
an nn.Module and registers it with transformers' Auto classes when imported.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel
from transformers.configuration_utils import SubConfigSpec
from transformers.utils import ModelOutput

from logitstore.errors import ConfigError, LogitStoreError

MODEL_TYPE = "logitstore-image-text-classifier"
# Tower model types this class can build (see _build_tower for the backbone class of each).
VISION_TOWERS = ("vit", "deit")
TEXT_TOWERS = ("bert", "distilbert")
# Every feature part a model can output; a model outputs those of the towers it has.
PART_NAMES = ("image_cls", "image_proj", "text_cls", "text_proj", "fused")
_HEAD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class ImageTextClassifierConfig(PreTrainedConfig):
    """Towers (sub-configs of any listed model type, None for an absent tower), heads and fusion.

    heads: {name: number of classes}, kept sorted by name; names are identifiers (they name sub-modules),
    every head has at least one class. fusion_dim: width of the projections, of the fusion blocks
    and of the heads' input. fusion_layers, fusion_heads: depth and attention heads of the fusion
    (both towers only). dropout: before the heads and inside the fusion blocks.
    """

    model_type = MODEL_TYPE
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="vit", optional=True),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="bert", optional=True),
    }

    vision_config: PreTrainedConfig | dict | None = field(
        default_factory=lambda: {"model_type": "vit"})
    text_config: PreTrainedConfig | dict | None = field(
        default_factory=lambda: {"model_type": "bert"})
    heads: dict = field(default_factory=lambda: {"label": 2})
    fusion_dim: int = 384
    fusion_layers: int = 2
    fusion_heads: int = 4
    dropout: float = 0.1
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        problems = config_problems(self)
        if problems:
            raise ConfigError(problems)
        # config.json sorts keys, so heads are kept sorted by name from the start: a model and
        # its reloaded copy list heads (and their logits) in the same order.
        self.heads = dict(sorted(self.heads.items()))

    @property
    def towers(self) -> tuple[str, ...]:
        """The modalities present, in a fixed order: ("image",), ("text",) or ("image", "text")."""
        return tuple(name for name, sub in (("image", self.vision_config),
                                            ("text", self.text_config)) if sub is not None)

    @property
    def part_names(self) -> tuple[str, ...]:
        """The feature parts this config's model outputs (see PART_NAMES)."""
        towers = self.towers
        return tuple(p for p in PART_NAMES if p == "fused" or p.split("_")[0] in towers)

    @property
    def part_widths(self) -> dict[str, int]:
        """{part: feature width} for `part_names`: the towers' widths for *_cls, else fusion_dim."""
        widths = {"image_cls": getattr(self.vision_config, "hidden_size", None),
                  "text_cls": self.text_config and _text_width(self.text_config)}
        return {part: widths.get(part) or self.fusion_dim for part in self.part_names}


def _head_problems(heads) -> list[str]:
    if not isinstance(heads, dict) or not heads:
        return [f"heads: expected a non-empty mapping of head name to number of classes "
                f"(e.g. {{modality: 5, location: 12}}), found {heads!r}"]
    problems = []
    for name, classes in heads.items():
        if not isinstance(name, str) or not _HEAD_NAME.match(name):
            problems.append(f"heads: head name {name!r} is not an identifier (letters, digits, "
                            f"underscores, not starting with a digit); rename it")
        if isinstance(classes, bool) or not isinstance(classes, int) or classes < 1:
            problems.append(f"heads.{name}: expected a number of classes of at least 1, found "
                            f"{classes!r}; set it to the number of labels of that task")
    return problems


def config_problems(config: ImageTextClassifierConfig) -> list[str]:
    """Every reason `config` cannot build a model (one sentence each), empty when it can."""
    problems = _head_problems(config.heads)
    towers = config.towers
    if not towers:
        problems.append("vision_config and text_config are both None: a classifier needs at "
                        "least one tower; give either a vision or a text config")
    for key, sub, allowed in (("vision_config", config.vision_config, VISION_TOWERS),
                              ("text_config", config.text_config, TEXT_TOWERS)):
        if sub is not None and sub.model_type not in allowed:
            problems.append(f"{key}.model_type: expected one of {', '.join(allowed)}, found "
                            f"{sub.model_type!r}; use a supported backbone or wrap your model in "
                            f"a ClassifierAdapter instead")
    if isinstance(config.fusion_dim, bool) or not isinstance(config.fusion_dim, int) \
            or config.fusion_dim < 1:
        problems.append(f"fusion_dim: expected a positive integer, found {config.fusion_dim!r}")
    if not 0.0 <= config.dropout < 1.0:
        problems.append(f"dropout: expected a probability in [0, 1), found {config.dropout!r}")
    if len(towers) == 2:
        if config.fusion_layers < 1:
            problems.append(f"fusion_layers: expected at least 1 with two towers (the image reaches "
                            f"the heads only through fusion), found {config.fusion_layers!r}")
        if config.fusion_heads < 1 or config.fusion_dim % config.fusion_heads:
            problems.append(f"fusion_heads: expected a positive divisor of fusion_dim "
                            f"({config.fusion_dim}), found {config.fusion_heads!r}")
    return problems


@dataclass
class ImageTextClassifierOutput(ModelOutput):
    """loss: summed per-head mean CE (labels given) or None; logits: {head: [B, classes]};
    features: {part: [B, width]} for the parts of the model's towers."""

    loss: torch.Tensor | None = None
    logits: dict | None = None
    features: dict | None = None


class CrossAttentionFusionLayer(nn.Module):
    """One pre-LayerNorm block: the query attends to the context tokens, then a feed-forward;
    both steps are residual, so a block starts close to the identity."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.query_norm = nn.LayerNorm(width)
        self.context_norm = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.feed_forward_norm = nn.LayerNorm(width)
        self.feed_forward = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * width, width))

    def forward(self, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # query [B, Q, F], context [B, L, F] -> [B, Q, F]
        context = self.context_norm(context)
        attended, _ = self.attention(self.query_norm(query), context, context, need_weights=False)
        query = query + attended
        return query + self.feed_forward(self.feed_forward_norm(query))


def _build_tower(sub_config: PreTrainedConfig) -> PreTrainedModel:
    """The backbone of a tower, without the pooler (the model reads the CLS token itself)."""
    from transformers import BertModel, DeiTModel, DistilBertModel, ViTModel

    builders = {"vit": lambda c: ViTModel(c, add_pooling_layer=False),
                "deit": lambda c: DeiTModel(c, add_pooling_layer=False),
                "bert": lambda c: BertModel(c, add_pooling_layer=False),
                "distilbert": DistilBertModel}
    return builders[sub_config.model_type](sub_config)


class ImageTextClassifier(PreTrainedModel):
    """Towers -> projections -> (fusion) -> dropout -> heads; see the module docstring."""

    config_class = ImageTextClassifierConfig
    config: ImageTextClassifierConfig
    base_model_prefix = "image_text_classifier"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    _supports_sdpa = True

    def __init__(self, config: ImageTextClassifierConfig):
        super().__init__(config)
        width = config.fusion_dim
        self.vision_tower = self.image_projection = None
        self.text_tower = self.text_projection = None
        if config.vision_config is not None:
            self.vision_tower = _build_tower(config.vision_config)
            # The tower keeps the composite's sub-config object, so saving writes one config.
            self.vision_tower.config = config.vision_config
            self.image_projection = nn.Linear(config.vision_config.hidden_size, width)
        if config.text_config is not None:
            self.text_tower = _build_tower(config.text_config)
            self.text_tower.config = config.text_config
            self.text_projection = nn.Linear(_text_width(config.text_config), width)
        fusing = len(config.towers) == 2
        self.fusion = nn.ModuleList(
            CrossAttentionFusionLayer(width, config.fusion_heads, config.dropout)
            for _ in range(config.fusion_layers if fusing else 0))
        self.fusion_norm = nn.LayerNorm(width) if fusing else None
        self.dropout = nn.Dropout(config.dropout)
        self.heads = nn.ModuleDict({name: nn.Linear(width, classes)
                                    for name, classes in config.heads.items()})
        self.post_init()

    def forward(self, pixel_values: torch.Tensor | None = None,
                input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None,
                labels: dict | None = None, **_unused) -> ImageTextClassifierOutput:
        """pixel_values [B,3,H,W] for a vision tower, input_ids/attention_mask [B,L] for a text
        tower; labels {head: [B] long} adds the loss. Extra keyword inputs are ignored so a batch
        that carries more (e.g. a sample id tensor) can be passed whole."""
        self._check_inputs(pixel_values, input_ids)
        features: dict[str, torch.Tensor] = {}
        image_tokens = None
        if self.vision_tower is not None:
            hidden = self.vision_tower(pixel_values=pixel_values).last_hidden_state  # [B, Li, Hv]
            image_tokens = self.image_projection(hidden)  # [B, Li, F]
            features["image_cls"] = hidden[:, 0]
            features["image_proj"] = image_tokens[:, 0]
        if self.text_tower is not None:
            text_inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
            if token_type_ids is not None and self.config.text_config.model_type == "bert":
                text_inputs["token_type_ids"] = token_type_ids
            hidden = self.text_tower(**text_inputs).last_hidden_state  # [B, Lt, Ht]
            features["text_cls"] = hidden[:, 0]
            features["text_proj"] = self.text_projection(hidden[:, 0])  # [B, F]
        features["fused"] = self._fuse(features, image_tokens)  # [B, F]
        pooled = self.dropout(features["fused"])
        logits = {name: head(pooled) for name, head in self.heads.items()}  # {head: [B, C]}
        loss = self._loss(logits, labels) if labels is not None else None
        return ImageTextClassifierOutput(loss=loss, logits=logits, features=features)

    def _fuse(self, features: dict, image_tokens: torch.Tensor | None) -> torch.Tensor:
        if self.fusion_norm is None:  # one tower: its projected CLS is what the heads read
            return features.get("image_proj", features.get("text_proj"))
        query = features["text_proj"].unsqueeze(1)  # [B, 1, F]
        for layer in self.fusion:
            query = layer(query, image_tokens)
        return self.fusion_norm(query[:, 0])

    def _check_inputs(self, pixel_values, input_ids) -> None:
        missing = [name for name, tower, value in (
            ("pixel_values", self.vision_tower, pixel_values),
            ("input_ids", self.text_tower, input_ids)) if tower is not None and value is None]
        if missing:
            raise LogitStoreError(
                f"this classifier has the towers {', '.join(self.config.towers)} and needs "
                f"{' and '.join(missing)}, which the batch lacks; preprocess every record's "
                f"{'image and text' if len(self.config.towers) == 2 else 'input'} "
                f"(classifier_adapter.preprocess_batch) before calling the model")

    def _loss(self, logits: dict, labels: dict) -> torch.Tensor:
        unknown = sorted(set(labels) - set(logits))
        if unknown:
            raise LogitStoreError(
                f"labels name the heads {unknown}, which this model does not have (its heads: "
                f"{', '.join(logits)}); pass labels only for the model's heads")
        losses = []
        for name, target in labels.items():  # target [B] long, -100 = no label for this head
            total = nn.functional.cross_entropy(logits[name], target, ignore_index=-100,
                                                reduction="sum")
            # A batch without any label for a head adds 0, not the NaN of an empty mean.
            losses.append(total / (target != -100).sum().clamp(min=1))
        return torch.stack(losses).sum()


def _text_width(text_config: PreTrainedConfig) -> int:
    # DistilBERT calls its width `dim`; BERT `hidden_size`.
    return getattr(text_config, "hidden_size", None) or text_config.dim


AutoConfig.register(MODEL_TYPE, ImageTextClassifierConfig, exist_ok=True)
AutoModel.register(ImageTextClassifierConfig, ImageTextClassifier, exist_ok=True)
