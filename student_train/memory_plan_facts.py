"""What the memory plan needs to know, read without loading any weight.

For student_train/memory_plan.py. `model_facts(cfg, model_config)`: the student's shapes, from
its config alone. The model is built on the meta device (no storage), so the parameter counts
are exact for any architecture transformers can build, tied embeddings counted once
(`named_parameters` drops duplicates).
`store_facts(cfg, model_config, inputs=None)`: the store's vocabulary, per-token KD targets
(top-k size or sampled draws), alignment projections and sample lengths, from the manifest
and index (the same `StoreReader` metadata `check_inputs` opens, reused when given); on the
cross path (a student of another tokenizer, or a signal on another tokenization) also the
student's tokenizer files (training's cached read when given) and the first segment's
text, as cross_tokenizer.cross_setup reads them: sample lengths in the student's tokens
and the batch's cross tensors. Both import torch and transformers lazily.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from types import SimpleNamespace

from logitstore.errors import ConfigError, LogitStoreError

# What a decoder layer is called in the module tree (Llama, Qwen2, Mistral, Gemma: layers.N).
_LAYER_CONTAINERS = ("layers", "h", "blocks", "block")


@dataclass(frozen=True)
class LinearShape:
    name: str  # module name in the model
    in_features: int
    out_features: int

    @property
    def params(self) -> int:
        return self.in_features * self.out_features


@dataclass
class ModelFacts:
    """The student's geometry and parameters (counts, not tensors)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int  # rows of the lm_head (the model's vocabulary, padding included)
    tied: bool
    shapes: dict[str, tuple[int, ...]]  # every distinct parameter, by name
    layer_prefixes: list[str]  # "model.layers.0." ... one per decoder layer
    linears: list[LinearShape]  # the Linear layers inside the decoder layers
    lora_targets: list[str]  # what LoRA adapts (cfg.lora_targets or the detected ones)
    torch_dtype: str | None = None  # the checkpoint's own dtype (qlora's "auto")

    @property
    def total_params(self) -> int:
        return sum(_numel(s) for s in self.shapes.values())

    def layer_params(self) -> int:
        """Parameters of the largest decoder layer (one FSDP unit)."""
        sizes = [sum(_numel(s) for n, s in self.shapes.items() if n.startswith(p))
                 for p in self.layer_prefixes]
        return max(sizes, default=0)

    def outside_layers(self) -> int:
        """Parameters outside the decoder layers: embeddings, final norm, untied lm_head
        (FSDP's root unit)."""
        inside = sum(_numel(s) for n, s in self.shapes.items()
                     if any(n.startswith(p) for p in self.layer_prefixes))
        return self.total_params - inside

    def lora_linears(self) -> list[LinearShape]:
        return [lin for lin in self.linears
                if any(lin.name == t or lin.name.endswith("." + t) for t in self.lora_targets)]


@dataclass
class StoreFacts:
    """What the store adds to a step: KD targets per position, alignment projections."""

    vocab: int | None = None  # the store's vocabulary (None: --data)
    target_widths: list[int] = field(default_factory=list)  # ids per position, per KD target
    tempered_buffer: bool = False  # zero-tail kl at T != 1: a second [chunk, V] buffer
    aligner_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    attention_maps: bool = False  # eager attention, maps kept for the alignment loss
    longest_sample: int | None = None  # in the student's tokens
    shortest_sample: int | None = None  # equal to longest_sample: rows need no padding;
    # None across tokenizers (re-cut lengths differ: padded)
    signals: list[str] = field(default_factory=list)
    # the cross path (student_train/cross_batch.py): the student's mean tokens per stored
    # token (shown, not used: rows use the largest ratio), the bytes per position its batch
    # adds (kd_mask, inside-token and chain ids), and the entries the head's sparse target
    # adds (a chain's entry k + 1, per chained signal)
    cross_length_ratio: float | None = None
    cross_batch_bytes_per_token: int = 0
    head_extra_entries: int = 0
    # the widths the fused head's sparse targets hold (None: target_widths; ULD signals run
    # apart, cross_tokenizer.uld_values, each chunk with its own [chunk, V] buffers)
    head_target_widths: list[int] | None = None
    uld_signals: int = 0


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


# ----------------------------------------------------------------------------- model

def load_model_config(cfg):
    """The student's transformers config (config.json only: an alias, directory or hub id)."""
    from transformers import AutoConfig

    from logitstore.toolkit.hf import ModelLoadError, resolve_model

    spec = resolve_model(cfg.student, cfg.revision)
    try:
        return AutoConfig.from_pretrained(spec.path_or_id, revision=spec.revision,
                                          trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"student {cfg.student!r}: its config.json cannot be read from {spec.path_or_id} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); the "
            f"memory plan needs only that file: give a local model directory, or make the hub "
            f"reachable (or cached)") from None


def meta_model(model_config, trust_remote_code: bool = False):
    """The causal LM built on the meta device: shapes without storage."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust_remote_code)


def _layer_prefixes(names: list[str]) -> list[str]:
    prefixes = []
    for name in names:
        parts = name.split(".")
        for i in range(len(parts) - 1):
            if parts[i] in _LAYER_CONTAINERS and parts[i + 1].isdigit():
                prefix = ".".join(parts[:i + 2]) + "."
                if prefix not in prefixes:
                    prefixes.append(prefix)
                break
    return prefixes


def model_facts(cfg, model_config) -> ModelFacts:
    """Shapes of the student `model_config` describes, and the LoRA targets of `cfg`."""
    from torch import nn

    from student_train.student import detect_lora_targets

    model = meta_model(model_config, cfg.trust_remote_code)
    text = model_config.get_text_config()
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    prefixes = _layer_prefixes(list(shapes))
    head = model.get_output_embeddings()
    linears = [LinearShape(n, m.in_features, m.out_features) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and m is not head
               and any(n.startswith(p) for p in prefixes)]
    heads = int(text.num_attention_heads)
    hidden = int(text.hidden_size)
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    dtype = getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None)
    return ModelFacts(
        hidden=hidden, intermediate=int(getattr(text, "intermediate_size", 4 * hidden)),
        layers=int(text.num_hidden_layers), heads=heads,
        kv_heads=int(getattr(text, "num_key_value_heads", None) or heads), head_dim=head_dim,
        vocab=int(head.weight.shape[0]), tied=head.weight is model.get_input_embeddings().weight,
        shapes=shapes, layer_prefixes=prefixes, linears=linears,
        lora_targets=list(cfg.lora_targets) or detect_lora_targets(model),
        torch_dtype=None if dtype is None else str(dtype).removeprefix("torch."))


# ----------------------------------------------------------------------------- store

def store_facts(cfg, model_config, inputs=None) -> StoreFacts:
    """KD targets and alignment projections of the signals `cfg` trains on (the manifest and
    index; across tokenizers also `_cross_facts`' reads). inputs: sources.Inputs whose opened
    store and cached tokenizer read are reused (None: opened and read here)."""
    if not cfg.store:
        return StoreFacts(longest_sample=cfg.max_length)
    import torch

    from logitstore.reader import StoreReader
    from student_train.sources import plan_signals

    reader = inputs.store if inputs is not None and inputs.store is not None \
        else StoreReader(cfg.store, cache_dir=cfg.cache_dir)
    settings = reader.settings
    problems: list[str] = []
    with torch.device("meta"):  # the projections' shapes, no storage
        plans, aligners = plan_signals(cfg, settings, SimpleNamespace(config=model_config),
                                       problems)
    if problems:
        raise ConfigError(problems)
    cross = _cross_facts(cfg, reader, plans, inputs and inputs.student_tokenizer)
    widths, tempered = [], False
    temperatures = {cfg.temperature, cfg.temperature_end or cfg.temperature}
    for plan in plans:
        if plan.target == "topk":
            widths.append(settings.signals[plan.name].topk.k)
            zero_tail = cfg.topk_mode == "renormalised" and cross is None
        elif plan.target == "sampled":
            widths.append(plan.n_draws)
            zero_tail = cross is None  # across tokenizers the draws are read as a top-k
        else:
            continue
        tempered |= zero_tail and cfg.loss == "kl" and temperatures != {1.0}
    lengths = reader.index.column("length").to_numpy() if len(reader) else []
    facts = StoreFacts(
        vocab=settings.vocab_size, target_widths=widths, tempered_buffer=tempered,
        aligner_shapes={f"aligner.{name}.{n}": tuple(p.shape) for name, a in aligners
                        for n, p in a.named_parameters()},
        attention_maps=any(p.attention_weight > 0 for p in plans),
        longest_sample=int(max(lengths)) if len(lengths) else None,
        shortest_sample=int(min(lengths)) if len(lengths) else None,
        signals=[p.name for p in plans])
    return facts if cross is None else _across_tokenizers(facts, cfg, *cross)


def _cross_facts(cfg, reader, plans, read_tokenizer=None) -> tuple[float, float] | None:
    """(mean, largest) student tokens per stored token for a run on the cross-tokenizer path
    (cross_tokenizer.cross_setup's rule: a signal on another tokenization, or a student of
    another tokenizer), else None. Reads the student's tokenizer (no weights) and the first
    segment's text, as cross_setup does (`read_tokenizer()` when given, training's cached
    read); a student tokenizer that cannot be read counts as the store's (training's own
    error says why), a store without text is refused by training before any step."""
    from logitstore.toolkit.hf import load_tokenizer
    from student_train.cross_tokenizer import first_segment_length_ratios, is_foreign
    from student_train.sources import _on_other_tokenization

    if not reader.has_text:
        return None
    on_other = _on_other_tokenization(reader.settings, [p.name for p in plans])
    try:
        tokenizer = read_tokenizer() if read_tokenizer is not None else load_tokenizer(
            cfg.student, cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except (LogitStoreError, OSError, ValueError):
        return (1.0, 1.0) if on_other else None
    if not (on_other or is_foreign(tokenizer, reader.settings)):
        return None
    return first_segment_length_ratios(reader, tokenizer)


def _across_tokenizers(facts: StoreFacts, cfg, ratio: float, largest: float) -> StoreFacts:
    """`facts` of a cross-tokenizer run: rows in the student's tokens (the longest stored
    sample at the largest ratio seen; re-cut samples differ in length, so rows are padded),
    the cross batch's tensors, the chain's head entry, and ULD's own chunk (no fused head)."""
    pkl = cfg.cross_loss == "pkl"
    chained, inside = pkl and cfg.chained_token_targets, pkl and cfg.inside_token_targets
    longest = facts.longest_sample
    return replace(
        facts, longest_sample=None if longest is None else int(math.ceil(longest * largest)),
        shortest_sample=None, cross_length_ratio=ratio,
        cross_batch_bytes_per_token=sum(_cross_bytes_per_token(w, chained, inside)
                                        for w in facts.target_widths),
        head_extra_entries=len(facts.target_widths) if chained else 0,
        head_target_widths=facts.target_widths if pkl else [],
        uld_signals=0 if pkl else len(facts.target_widths))


def _cross_bytes_per_token(width: int, chained: bool, inside: bool) -> int:
    """What cross_batch.CrossCollate adds per position and KD signal: kd_mask (bool), with
    inside-token targets inside_ids [width] int64 and inside_mask (bool), with chains
    chain_entry and chain_ids (int64) and chain_logc (fp32)."""
    return 1 + (8 * width + 1 if inside else 0) + (8 + 8 + 4 if chained else 0)
