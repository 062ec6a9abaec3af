"""Samples read from a store -> one training batch of CPU tensors (padding or packing layout).

A batch is a list of rows; each row holds one sample (padding) or several concatenated
samples (packing). Everything lies right-aligned to position 0 of its row, padding at the end.

The batch dict (B rows, S = longest row, n = samples, k = top-k, m = most sampled entries at
any position of the batch):

  input_ids         [B, S]  long   pad 0
  attention_mask    [B, S]  long   1 = real token (all real tokens are 1 in packing mode too)
  labels            [B, S]  long   input_ids where loss_mask, else -100; also -100 on the FIRST
                                   token of every sample (nothing in the sample predicts it;
                                   in packing mode the previous sample would) and on padding
  position_ids      [B, S]  long   restart at 0 at every sample; padding counts on from 0
  attention_mask_4d [B, 1, S, S] bool  packing only: True = query may attend key (causal and
                                   same sample; a padding position attends only itself)
  lengths           [B]     long   real tokens per row
  sample_weights    [B]     float  padding mode only (one sample per row)
  token_weights     [B, S]  float  weight of the sample owning the token, 0 on padding
  sample_ids        list[str]      n ids, row-major (row 0's samples first, in position order)
  num_target_tokens int            (labels != -100).sum()
  signals[name]:
    topk_ids [B,S,k] long, topk_logprobs [B,S,k] float, topk_tail [B,S] float
    sampled_ids / sampled_counts [B,S,m] long, sampled_logprobs [B,S,m] float (count 0 = pad;
    no sampled_logprobs for a signal stored without them)
    hidden [n,L,d] float, attention [n,L,H,G,G] float, with
    sample_row / sample_start / sample_length [n] long: where each sample lies

StoreStream adds `stream_position` (epoch, worker, num_workers, index) for resuming.

Packing with Hugging Face models: pass `attention_mask_4d` as `attention_mask` together with
`position_ids` (transformers uses a 4-D mask as given). sdpa takes the bool mask as is; the
eager path ADDS the mask to the scores, so give it `attention_bias(mask_4d)` instead (checked
on a tiny Llama in tests/test_stream.py: packed logits == alone, both paths). Flash-attention
kernels take no 4-D mask (they find packed samples from position_ids; not tested here).

Signal rows are NOT shifted: signal position t is the teacher's distribution of token t+1,
paired by the loss with labels[t+1] (FORMAT.md "Positions").

Padding values are finite so that nothing turns into NaN (0 * -inf) before masking:
top-k padding positions hold ids 0..k-1 (distinct: `losses.build_topk_target` refuses
repeated ids at a position even where it is masked) with log-prob 0 and tail 0; sampled
padding has count 0, which `losses.build_sampled_target` treats as "no entry". Padding
positions are never targets (labels -100, token_weights 0): always mask with them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from logitstore.sample import Sample


def _first_index(rows: list[list[Sample]]) -> list[tuple[int, int]]:
    """(row, start) of every sample, row-major."""
    out = []
    for b, row in enumerate(rows):
        start = 0
        for sample in row:
            out.append((b, start))
            start += len(sample)
    return out


def _sampled_width(samples: list[Sample], name: str) -> int:
    width = 0
    for s in samples:
        offsets = s.signals[name].sampled.offsets
        if len(offsets) > 1:
            width = max(width, int(np.diff(offsets).max()))
    return max(width, 1)


def collate(rows: list[list[Sample]], weights: list[list[float]], signals: list[str], *,
            packing: bool) -> dict[str, Any]:
    """Build the batch described in the module docstring. weights mirror rows (one per sample)."""
    samples = [s for row in rows for s in row]
    sample_weight = np.asarray([w for row in weights for w in row], dtype=np.float32)  # [n]
    where = _first_index(rows)
    B = len(rows)
    row_len = np.asarray([sum(len(s) for s in row) for row in rows], dtype=np.int64)  # [B]
    S = int(row_len.max()) if B else 0

    input_ids = np.zeros((B, S), np.int64)
    labels = np.full((B, S), -100, np.int64)
    attention_mask = (np.arange(S)[None, :] < row_len[:, None]).astype(np.int64)
    token_weights = np.zeros((B, S), np.float32)
    position_ids = np.tile(np.arange(S, dtype=np.int64), (B, 1))
    owner = -1 - np.tile(np.arange(S, dtype=np.int64), (B, 1))  # padding: its own "sample"
    for j, (s, (b, a)) in enumerate(zip(samples, where)):
        L = len(s)
        input_ids[b, a:a + L] = s.input_ids
        labels[b, a:a + L] = np.where(s.loss_mask, s.input_ids, -100)
        labels[b, a] = -100  # the first token of a sample is never a next-token target
        token_weights[b, a:a + L] = sample_weight[j]
        position_ids[b, a:a + L] = np.arange(L)
        owner[b, a:a + L] = j
    if packing:  # padding after the last sample: positions restart at 0 too
        for b in range(B):
            position_ids[b, row_len[b]:] = np.arange(S - row_len[b])

    batch: dict[str, Any] = {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention_mask),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(position_ids),
        "lengths": torch.from_numpy(row_len),
        "token_weights": torch.from_numpy(token_weights),
        "sample_ids": [s.sample_id for s in samples],
        "num_target_tokens": int((labels != -100).sum()),
    }
    if packing:
        own = torch.from_numpy(owner)
        causal = torch.ones(S, S, dtype=torch.bool).tril()
        batch["attention_mask_4d"] = ((own[:, :, None] == own[:, None, :]) & causal)[:, None]
    else:
        batch["sample_weights"] = torch.from_numpy(sample_weight)
    batch["signals"] = {name: _collate_signal(samples, where, name, B, S) for name in signals}
    return batch


def _collate_signal(samples: list[Sample], where: list[tuple[int, int]], name: str, B: int,
                    S: int) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    first = samples[0].signals[name]
    if first.topk is not None:
        k = first.topk.ids.shape[1]
        ids = np.broadcast_to(np.arange(k, dtype=np.int64), (B, S, k)).copy()  # [B, S, k]
        lps = np.zeros((B, S, k), np.float32)
        tail = np.zeros((B, S), np.float32)
        for s, (b, a) in zip(samples, where):
            t = s.signals[name].topk
            L = len(s)
            ids[b, a:a + L] = t.ids
            lps[b, a:a + L] = t.logprobs
            tail[b, a:a + L] = t.tail()
        out.update(topk_ids=torch.from_numpy(ids), topk_logprobs=torch.from_numpy(lps),
                   topk_tail=torch.from_numpy(tail))
    if first.sampled is not None:
        m = _sampled_width(samples, name)
        ids = np.zeros((B, S, m), np.int64)
        counts = np.zeros((B, S, m), np.int64)
        stored_lps = first.sampled.logprobs is not None  # one store: all samples alike
        lps = np.zeros((B, S, m), np.float32)
        for s, (b, a) in zip(samples, where):
            sp = s.signals[name].sampled
            per_pos = np.diff(sp.offsets)  # [L] entries per position
            pos = np.repeat(np.arange(len(per_pos)), per_pos)  # [E] position of each entry
            col = np.arange(len(pos)) - sp.offsets[pos]  # [E] its column within the position
            ids[b, a + pos, col] = sp.ids
            counts[b, a + pos, col] = sp.counts
            if stored_lps:
                lps[b, a + pos, col] = sp.logprobs
        out.update(sampled_ids=torch.from_numpy(ids), sampled_counts=torch.from_numpy(counts))
        if stored_lps:
            out["sampled_logprobs"] = torch.from_numpy(lps)
    per_sample = False
    if first.hidden is not None:
        out["hidden"] = torch.from_numpy(np.stack(
            [s.signals[name].hidden for s in samples]).astype(np.float32))  # [n, L, d]
        per_sample = True
    if first.attention is not None:
        out["attention"] = torch.from_numpy(np.stack(
            [s.signals[name].attention for s in samples]).astype(np.float32))  # [n, L, H, G, G]
        per_sample = True
    if per_sample:
        out["sample_row"] = torch.tensor([b for b, _ in where], dtype=torch.long)
        out["sample_start"] = torch.tensor([a for _, a in where], dtype=torch.long)
        out["sample_length"] = torch.tensor([len(s) for s in samples], dtype=torch.long)
    return out


def attention_bias(mask_4d: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """bool [B,1,S,S] (True = attend) -> additive float mask (0 / dtype min) for eager attention.

    transformers passes a 4-D mask through unchanged. The sdpa path reads a bool mask
    correctly, but the eager path ADDS the mask to the scores, so a bool mask there adds 1/0
    instead of masking: pass this additive form with attn_implementation="eager".
    """
    zero = torch.zeros((), dtype=dtype, device=mask_4d.device)
    return torch.where(mask_4d, zero, torch.finfo(dtype).min)
