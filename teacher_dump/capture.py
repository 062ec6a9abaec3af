"""Capture teacher signals from one padded batch, on the model's device, into numpy.

    batch = make_batch(sample_ids, input_ids, loss_masks, pad_id=0, device="cuda:0")
    signals = capture_batch(model, batch, spec)          # list[SignalData], one per sample

(`teacher_dump.batch_loops` does this for every batch of a dump.)

Per position t of a sample (FORMAT.md section 4: the distribution of token t+1):

* top-k: the k most likely ids with their fp32 log-probs at T=1, normalised over the
  tokenizer's vocabulary (`spec.vocab_size` columns of the logits: padded embedding rows
  beyond it, as in Qwen2, are dropped before the softmax), and the exact tail log-mass
  log(1 - sum p), computed as the log of the sum of the other probabilities.
* sampled: `n_draws` draws with replacement from softmax(logits / T) by inverse CDF with
  uniforms from a CPU generator seeded per sample from (seed, sample_id), so the draws of
  a sample do not depend on its batch, its rank or a resume; stored as unique ids, their
  counts and their log-probs at T=1.

Both come from one read of the logits in chunks of `spec.logits_chunk` positions
(`teacher_dump.token_signals`), so the fp32 working set is O(logits_chunk x vocab)
whatever the batch. For the usual decoder LMs (`lm_head_of`) the logits themselves are
computed chunk by chunk from the decoder's last hidden states: the [B, S, V] tensor of a
full forward is never made. Per sample:

* hidden: `spec.hidden_layers[i]` indexes `output.hidden_states[1:]`, i.e. layer index j
  is the output of decoder block j (0-based) and -1 the last block's output - which
  Hugging Face returns after the model's final norm, the same tensor the LM head reads.
  Pooled with `logitstore.toolkit.pooling.pool_hidden`. Both forms name one layer (3 and -1
  of a 4-layer teacher); the store records them as block numbers (`teacher_dump.dump`).
* attention: `spec.attention_layers[i]` indexes `output.attentions` (one per decoder
  block, -1 = last); needs eager attention (`load_causal_lm(need_attentions=True)`).
  Head-averaged or per head, pooled to G x G with `logitstore.toolkit.pooling.pool_attention`.
  Where the blocks are `decoder.layers[i].self_attn` (Llama, Qwen2, Mistral, Gemma...),
  forward hooks on the selected layers pool each map as soon as its layer has run and the
  forward is not asked for output_attentions, so no layer's [B, H, S, S] map outlives its
  layer (with output_attentions, all of them are kept until the forward returns: for an
  8B teacher at 2,048 tokens that is 32 layers x 32 heads x 2048^2 floats per sample).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from logitstore.errors import LogitStoreError
from logitstore.toolkit.pooling import pool_attention, pool_hidden
from logitstore.sample import SignalData
from teacher_dump.token_signals import HeadLogits, capture_token_signals

Tensor = torch.Tensor


@dataclass(frozen=True)
class CaptureSpec:
    vocab_size: int  # the tokenizer's vocabulary: logits columns beyond it are dropped
    top_k: int = 0  # 0 = off
    n_draws: int = 0  # 0 = off
    temperature: float = 1.0
    seed: int = 0
    hidden_layers: tuple[int, ...] = ()  # indices into output.hidden_states[1:]
    hidden_pool: str = "mean"
    attention_layers: tuple[int, ...] = ()  # indices into output.attentions
    attention_grid: int = 16
    attention_heads: str = "mean"  # "mean" | "all"
    logits_chunk: int = 512  # positions per fp32 [chunk x vocab] work block
    kernel: str = "eager"  # group statistics: "compiled" | "eager" (logit_stats.resolve_kernel)


@dataclass
class Batch:
    """Samples right-padded into one batch (real tokens at positions 0..length-1)."""

    sample_ids: list[str]
    input_ids: Tensor  # [B, S] long
    attention_mask: Tensor  # [B, S] long, 1 = real token
    loss_mask: Tensor  # [B, S] bool, True = training target
    lengths: Tensor  # [B] long, on the CPU

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())


def make_batch(sample_ids: list[str], input_ids: list[np.ndarray], loss_masks: list[np.ndarray],
               *, pad_id: int, device: str | torch.device) -> Batch:
    """Right-pad samples into tensors on `device`."""
    lengths = torch.tensor([len(x) for x in input_ids], dtype=torch.long)
    width = int(lengths.max())
    ids = torch.full((len(input_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(input_ids), width), dtype=torch.long)
    loss = torch.zeros((len(input_ids), width), dtype=torch.bool)
    for b, (x, m) in enumerate(zip(input_ids, loss_masks)):
        ids[b, :len(x)] = torch.from_numpy(np.asarray(x, dtype=np.int64))
        mask[b, :len(x)] = 1
        loss[b, :len(x)] = torch.from_numpy(np.asarray(m, dtype=bool))
    return Batch(list(sample_ids), ids.to(device), mask.to(device), loss.to(device), lengths)


# ----------------------------------------------------------------------------- forward


def _hidden_request(model, layers: tuple[int, ...]):
    """`output_hidden_states` value: the indices only, where transformers can select them
    (>= 5: the other layers' states are then never kept), else True (all of them)."""
    if not layers:
        return False
    try:
        from transformers.utils.output_capturing import selected_hidden_states  # noqa: F401
    except ImportError:
        return True
    if not getattr(model, "_can_record_outputs", None) and not getattr(
            getattr(model, "model", None), "_can_record_outputs", None):
        return True
    n_states = num_layers(model) + 1  # embeddings + one per block
    return sorted({(i + 1) if i >= 0 else (n_states + i) for i in layers})


def num_layers(model) -> int:
    return int(model.config.get_text_config().num_hidden_layers)


def run_model(model, batch: Batch, spec: CaptureSpec, decoder_only: bool = False,
              output_attentions: bool | None = None):
    """One forward pass with the outputs `spec` needs (call under torch.inference_mode());
    `decoder_only`: the decoder without the LM head (its last_hidden_state instead of logits);
    `output_attentions`: default, whether `spec` asks for attention maps."""
    net = model.get_decoder() if decoder_only else model
    if output_attentions is None:
        output_attentions = bool(spec.attention_layers)
    return net(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
               output_hidden_states=_hidden_request(model, spec.hidden_layers),
               output_attentions=output_attentions, use_cache=False)


def attention_modules(model) -> list[torch.nn.Module] | None:
    """The decoder blocks' attention modules in order, when the model has them as
    `decoder.layers[i].self_attn` (one per block), else None."""
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None or len(layers) != num_layers(model):
        return None
    modules = [getattr(layer, "self_attn", None) for layer in layers]
    return modules if all(m is not None for m in modules) else None


def _attention_grid(attn: Tensor, batch: Batch, spec: CaptureSpec) -> Tensor:
    """One layer's maps [B, H, S, S] -> its stored grids [B, H or 1, G, G]."""
    if spec.attention_heads == "mean":
        attn = attn.float().mean(1, keepdim=True)  # pooling is linear: same as after
    return pool_attention(attn, batch.lengths.to(attn.device), spec.attention_grid,
                          attention_mask=batch.attention_mask)


@contextmanager
def _pooling_hooks(modules: list[torch.nn.Module] | None, batch: Batch, spec: CaptureSpec):
    """Forward hooks that pool the selected layers' attention maps as each layer runs;
    yields {layer index >= 0: grid [B, H or 1, G, G]}, filled by the forward (none without
    modules)."""
    grids: dict[int, Tensor] = {}

    def hook_for(index: int):
        def keep(module, args, output):
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if weights is None:
                raise LogitStoreError(
                    f"layer {index} returned no attention weights: attention maps need eager "
                    f"attention (load the teacher with attn_implementation='eager')")
            grids[index] = _attention_grid(weights, batch, spec)
        return keep

    wanted = sorted({i % len(modules) for i in spec.attention_layers}) if modules else []
    handles = [modules[i].register_forward_hook(hook_for(i)) for i in wanted]
    try:
        yield grids
    finally:
        for handle in handles:
            handle.remove()


# Architectures whose logits are exactly lm_head(decoder output): no soft-capping or scaling
# after the head (Gemma 2's final_logit_softcapping, Cohere's logit_scale, Granite's
# logits_scaling). Others take the full forward.
_PLAIN_HEAD_TYPES = {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe",
                     "phi3", "gemma", "olmo", "olmo2", "starcoder2"}
_AFTER_HEAD_KEYS = ("final_logit_softcapping", "logit_scale", "logits_scaling",
                    "output_multiplier_scale")


def lm_head_of(model) -> torch.nn.Module | None:
    """The model's LM head when its logits are head(decoder(x).last_hidden_state) and
    nothing else, else None."""
    config = model.config
    if config.model_type not in _PLAIN_HEAD_TYPES:
        return None
    if any(getattr(config, key, None) not in (None, 1, 1.0) for key in _AFTER_HEAD_KEYS):
        return None
    head, decoder = model.get_output_embeddings(), model.get_decoder()
    if head is None or decoder is None or decoder is model:
        return None
    return head


def capture_batch(model, batch: Batch, spec: CaptureSpec) -> list[SignalData]:
    """Forward `batch` through `model` and capture every signal of `spec` (numpy, CPU)."""
    with torch.inference_mode():
        head = lm_head_of(model) if spec.top_k or spec.n_draws else None
        modules = attention_modules(model) if spec.attention_layers else None
        with _pooling_hooks(modules, batch, spec) as pooled:
            output = run_model(model, batch, spec, decoder_only=head is not None,
                               output_attentions=bool(spec.attention_layers) and not modules)
        logits = (HeadLogits(output.last_hidden_state, head) if head is not None
                  else getattr(output, "logits", None))
        hidden = None
        if spec.hidden_layers:
            states = output.hidden_states[1:]  # drop the embedding output
            hidden = [states[i] for i in spec.hidden_layers]
        grids = None
        if spec.attention_layers:
            grids = ([pooled[i % len(modules)] for i in spec.attention_layers] if modules else
                     [_attention_grid(output.attentions[i], batch, spec)
                      for i in spec.attention_layers])
        return capture_outputs(logits, hidden, grids, batch, spec)


# ----------------------------------------------------------------------------- capture


def capture_outputs(logits: Tensor | HeadLogits | None, hidden: list[Tensor] | None,
                    attention_grids: list[Tensor] | None, batch: Batch, spec: CaptureSpec
                    ) -> list[SignalData]:
    """logits [B, S, V'] (V' >= vocab_size) or a HeadLogits, hidden: per layer [B, S, d],
    attention_grids: per layer [B, H or 1, G, G] -> one SignalData per sample, numpy on
    the CPU."""
    out = [SignalData() for _ in batch.sample_ids]
    if spec.top_k or spec.n_draws:
        topk, sampled = capture_token_signals(logits, batch.lengths.tolist(), batch.sample_ids,
                                              spec)
        for b, data in enumerate(out):
            data.topk = topk[b] if topk else None
            data.sampled = sampled[b] if sampled else None
    if hidden:
        pooled = torch.stack([pool_hidden(h, batch.loss_mask, batch.attention_mask,
                                          spec.hidden_pool) for h in hidden], 1)  # [B, layers, d]
        pooled = pooled.cpu().numpy()
        for b, data in enumerate(out):
            data.hidden = pooled[b]
    if attention_grids:
        stacked = torch.stack(attention_grids, 1).cpu().numpy()  # [B, layers, H or 1, G, G]
        for b, data in enumerate(out):
            data.attention = stacked[b]
    return out
