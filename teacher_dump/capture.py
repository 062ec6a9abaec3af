"""Capture teacher signals from one padded batch, on the model's device, into numpy.

    batch = make_batch(samples, pad_id=0, device="cuda:0")
    signals = capture_batch(model, batch, spec)          # list[SignalData], one per sample

Per position t of a sample (FORMAT.md section 4: the distribution of token t+1):

* top-k: the k most likely ids with their fp32 log-probs at T=1, normalised over the
  tokenizer's vocabulary (`spec.vocab_size` columns of the logits: padded embedding rows
  beyond it, as in Qwen2, are dropped before the softmax), and the exact tail log-mass
  log(1 - sum p) = logsumexp of the other log-probs.
* sampled: `n_draws` draws with replacement from softmax(logits / T) by inverse CDF with
  uniforms from a CPU generator seeded per sample from (seed, sample_id), so the draws of
  a sample do not depend on its batch, its rank or a resume; stored as unique ids, their
  counts and their log-probs at T=1.

Both come from one pass over the logits in chunks of `spec.logits_chunk` positions, so the
fp32 working set is O(logits_chunk x vocab) whatever the batch. Per sample:

* hidden: `spec.hidden_layers[i]` indexes `output.hidden_states[1:]`, i.e. layer index j
  is the output of decoder block j (0-based) and -1 the last block's output - which
  Hugging Face returns after the model's final norm, the same tensor the LM head reads.
  Pooled with `logitstore.pooling.pool_hidden`.
* attention: `spec.attention_layers[i]` indexes `output.attentions` (one per decoder
  block, -1 = last); needs eager attention (`load_causal_lm(need_attentions=True)`).
  Head-averaged or per head, pooled to G x G with `logitstore.pooling.pool_attention`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from logitstore.pooling import pool_attention, pool_hidden
from logitstore.sample import Sampled, SignalData, TopK

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
    logits_chunk: int = 512  # positions per fp32 log-softmax chunk


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


def sample_seed(seed: int, sample_id: str) -> int:
    """63-bit generator seed from (seed, sample_id): same draws in every batch, rank and run."""
    digest = hashlib.sha256(f"{seed}\0{sample_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sample_uniforms(seed: int, sample_id: str, length: int, n_draws: int) -> Tensor:
    """[length, n_draws] float32 uniforms in [0, 1) of one sample (CPU, device-independent)."""
    generator = torch.Generator(device="cpu").manual_seed(sample_seed(seed, sample_id))
    return torch.rand((length, n_draws), generator=generator, dtype=torch.float32)


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


def run_model(model, batch: Batch, spec: CaptureSpec):
    """One forward pass with the outputs `spec` needs (call under torch.inference_mode())."""
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                 output_hidden_states=_hidden_request(model, spec.hidden_layers),
                 output_attentions=bool(spec.attention_layers), use_cache=False)


def capture_batch(model, batch: Batch, spec: CaptureSpec) -> list[SignalData]:
    """Forward `batch` through `model` and capture every signal of `spec` (numpy, CPU)."""
    with torch.inference_mode():
        output = run_model(model, batch, spec)
        hidden = None
        if spec.hidden_layers:
            states = output.hidden_states[1:]  # drop the embedding output
            hidden = [states[i] for i in spec.hidden_layers]
        attentions = None
        if spec.attention_layers:
            attentions = [output.attentions[i] for i in spec.attention_layers]
        return capture_outputs(output.logits, hidden, attentions, batch, spec)


# ----------------------------------------------------------------------------- capture


def capture_outputs(logits: Tensor, hidden: list[Tensor] | None, attentions: list[Tensor] | None,
                    batch: Batch, spec: CaptureSpec) -> list[SignalData]:
    """logits [B, S, V'] (V' >= vocab_size), hidden: per layer [B, S, d], attentions: per
    layer [B, H, S, S] -> one SignalData per sample, numpy on the CPU."""
    out = [SignalData() for _ in batch.sample_ids]
    if spec.top_k or spec.n_draws:
        _capture_token_signals(logits, batch, spec, out)
    if hidden:
        pooled = torch.stack([pool_hidden(h, batch.loss_mask, batch.attention_mask,
                                          spec.hidden_pool) for h in hidden], 1)  # [B, layers, d]
        pooled = pooled.cpu().numpy()
        for b, data in enumerate(out):
            data.hidden = pooled[b]
    if attentions:
        grids = []
        for attn in attentions:  # [B, H, S, S]
            if spec.attention_heads == "mean":
                attn = attn.float().mean(1, keepdim=True)  # pooling is linear: same as after
            grids.append(pool_attention(attn, batch.lengths.to(attn.device), spec.attention_grid,
                                        attention_mask=batch.attention_mask))
        stacked = torch.stack(grids, 1).cpu().numpy()  # [B, layers, H or 1, G, G]
        for b, data in enumerate(out):
            data.attention = stacked[b]
    return out


def _capture_token_signals(logits: Tensor, batch: Batch, spec: CaptureSpec,
                           out: list[SignalData]) -> None:
    """Top-k and sampled targets of every real position, in chunks of positions."""
    lengths = batch.lengths.tolist()
    device = logits.device
    # Real positions flattened sample by sample: row r is (rows_b[r], rows_t[r]).
    rows_b = torch.cat([torch.full((n,), b, dtype=torch.long) for b, n in enumerate(lengths)])
    rows_t = torch.cat([torch.arange(n) for n in lengths])
    total = len(rows_b)
    uniforms = None
    if spec.n_draws:
        uniforms = torch.cat([sample_uniforms(spec.seed, sid, n, spec.n_draws)
                              for sid, n in zip(batch.sample_ids, lengths)])  # [total, N]
    top_ids, top_lps, tails = [], [], []
    draw_rows, draw_ids, draw_counts, draw_lps = [], [], [], []
    for start in range(0, total, spec.logits_chunk):
        stop = min(start + spec.logits_chunk, total)
        b_idx, t_idx = rows_b[start:stop].to(device), rows_t[start:stop].to(device)
        raw = logits[b_idx, t_idx, :spec.vocab_size].float()  # [P, V]
        logp = torch.log_softmax(raw, dim=-1)
        if spec.top_k:
            ids, lps, tail = _topk_with_tail(logp, spec.top_k)
            top_ids.append(ids.cpu())
            top_lps.append(lps.cpu())
            tails.append(tail.cpu())
        if spec.n_draws:
            u = uniforms[start:stop].to(device)
            rows, ids, counts = _draw(raw, logp, u, spec.temperature)
            draw_rows.append(rows.cpu() + start)
            draw_ids.append(ids.cpu())
            draw_counts.append(counts.cpu())
            draw_lps.append(logp[rows, ids].cpu())
        del raw, logp

    bounds = np.concatenate([[0], np.cumsum(lengths)])
    if spec.top_k:
        ids = torch.cat(top_ids).numpy()
        lps = torch.cat(top_lps).numpy()
        tail = torch.cat(tails).numpy()
        for b, data in enumerate(out):
            a, z = bounds[b], bounds[b + 1]
            data.topk = TopK(ids[a:z], lps[a:z], tail[a:z])
    if spec.n_draws:
        rows = torch.cat(draw_rows).numpy()
        ids, counts = torch.cat(draw_ids).numpy(), torch.cat(draw_counts).numpy()
        lps = torch.cat(draw_lps).numpy()
        per_row = np.bincount(rows, minlength=total)  # unique ids per position
        entry_bounds = np.concatenate([[0], np.cumsum(per_row)])
        for b, data in enumerate(out):
            a, z = entry_bounds[bounds[b]], entry_bounds[bounds[b + 1]]
            offsets = entry_bounds[bounds[b]:bounds[b + 1] + 1] - a
            data.sampled = Sampled(offsets.astype(np.int64), ids[a:z], counts[a:z], lps[a:z])


def _topk_with_tail(logp: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """logp [P, V] -> ids [P, k], log-probs [P, k], tail [P] = log of the mass outside them.

    The tail is the logsumexp of the other log-probs, exact even when the top-k hold
    nearly all the mass (where log(1 - sum p) would cancel catastrophically).
    """
    k = min(k, logp.shape[-1])
    lps, ids = torch.topk(logp, k, dim=-1)
    if k == logp.shape[-1]:
        tail = torch.full(lps.shape[:1], float("-inf"), device=logp.device)
    else:
        tail = logp.scatter(-1, ids, float("-inf")).logsumexp(-1)
    return ids, lps, tail


def _draw(raw: Tensor, logp: Tensor, u: Tensor, temperature: float):
    """Inverse-CDF draws of softmax(raw / T) for uniforms u [P, N] -> unique (row, id, count).

    Returned sorted by row, then id; every row has >= 1 entry and its counts sum to N.
    """
    probs = logp.exp() if temperature == 1.0 else torch.softmax(raw / temperature, dim=-1)
    # fp32 is enough: id i is drawn when the target falls in [cdf[i-1], cdf[i]), whose width
    # is p_i up to one rounding (~6e-8 absolute); the accumulated cumsum error is common to
    # both ends. [P, V], non-decreasing in fp32 too (all terms >= 0).
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:]  # [P, 1]: 1 +- rounding; scaling by it keeps every draw in range
    # Strictly below the total, so the draw is never an id past the last one with p > 0.
    below = torch.nextafter(total, torch.zeros_like(total))
    target = torch.minimum(u * total, below)  # [P, N]
    # First id whose cdf exceeds the target: id i is drawn with probability p_i.
    drawn = torch.searchsorted(cdf, target, right=True)
    vocab = cdf.shape[-1]
    row = torch.arange(drawn.shape[0], device=drawn.device)[:, None].expand_as(drawn)
    keys, counts = torch.unique(row * vocab + drawn, sorted=True, return_counts=True)
    return keys // vocab, keys % vocab, counts
