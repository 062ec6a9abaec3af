"""Perplexity and next-token accuracy of a causal LM on held-out token sequences.

A sequence is token ids plus a target mask: position t is scored when `targets[t]` is
True, by the model's distribution over token t given tokens 0..t-1 (position 0 has no
context and is never scored). Over all scored positions of all sequences:

    nll                 = mean of -log p(token_t | tokens_<t)          (nats/token)
    perplexity          = exp(nll)
    next_token_accuracy = share of positions whose argmax prediction is token_t
    bits_per_byte       = sum of -log2 p(token_t | tokens_<t) over the scored tokens that
                          spell text / the UTF-8 bytes they spell
The first three are per token of the model's own tokenizer: two models of different
tokenizers cannot be compared on them. Bits per byte can (the same texts, counted in bytes):
taken over the sequences that know their tokens' bytes (`TokenSequence.token_bytes`: text
sources with a fast tokenizer, each document read whole after a BOS and spelled exactly, so
every byte of it is predicted once); special tokens (EOS: a cost another tokenizer may not
pay) are left out of it, a text token spelling no byte (a lone dummy prefix) is counted.
`bytes` says how many bytes it covers: where a model's tokenizer cuts a document another's
does not, or spells it inexactly, the two values rest on different texts (their paired
difference still pairs the documents both have).

`score_sequences(..., per_sequence=[])` also gives each sequence's NLL sum, correct
predictions and scored tokens: the report's standard errors treat sequences as the
independent units (eval/report.py).

Sources: a text file (`--ppl-data`: .jsonl with `text`, or `prompt` + `reference`, per
record; any other file: paragraphs separated by blank lines), every token a target; or a
store's eval split (`--ppl-store`), its `loss_mask` as targets, read with StoreReader
(numpy) and fed to the model as torch tensors. The sources live in
logitstore/toolkit/heldout.py (student-export's quality gate reads the same formats).
`model` is a transformers causal LM or an InferenceModel (an export:
logitstore/toolkit/inference.py), scored the same way.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from logitstore.toolkit import heldout
from logitstore.toolkit.batching import by_length, padded_batches
# The sequence sources are shared with student-export's quality gate (re-exported here).
from logitstore.toolkit.heldout import (EVAL_SPLITS, StoreTokenizerMismatch,  # noqa: F401
                                        TokenSequence, pick_split, sequences_from_store,
                                        sequences_from_texts)


# ----------------------------------------------------------------------------- scoring


def score_sequences(model, sequences: Sequence[TokenSequence], *, max_batch_tokens: int = 4096,
                    pad_id: int = 0, progress: bool = False,
                    per_sequence: list[dict] | None = None) -> dict[str, float | int]:
    """{"perplexity", "nll", "next_token_accuracy", "tokens", "sequences"} over `sequences`
    (and "bits_per_byte", "bytes" over the sequences with `token_bytes`, when any has).

    Batches hold at most `max_batch_tokens` padded positions (the logits of a batch are
    batch x length x vocabulary floats: this bounds memory for 128k-token vocabularies).
    When `per_sequence` is a list, one {"index", "nll", "correct", "tokens"} is appended
    per scored sequence, in input order: its `source` (else its index in `sequences`), NLL
    sum (nats), correct argmax predictions and scored positions of that sequence (and, with
    bytes, "text_nll" and "bytes": the NLL sum of its scored text tokens and their bytes).
    """
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    scored = [s for s in sequences if s.scored > 0]
    indices = [i if s.source is None else s.source for i, s in enumerate(sequences)
               if s.scored > 0]
    if not scored:
        raise ValueError("no sequence has a scored position (each needs >= 2 tokens and a "
                         "target after the first)")
    device, forward = _logits_function(model)
    lengths = [len(s.ids) for s in scored]
    with_bytes = [s.token_bytes is not None for s in scored]
    sums = np.zeros((len(scored), 5))  # per sequence: NLL sum, correct, tokens, text NLL, bytes
    bar = tqdm(total=len(scored), desc="perplexity", disable=not progress, leave=False)
    with torch.inference_mode():
        # Sorted by length: batches of similar lengths, least padding.
        for positions in padded_batches(lengths, max_batch_tokens, order=by_length(lengths)):
            batch = [scored[i] for i in positions]
            width = max(len(s.ids) for s in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.bool)
            n_bytes = torch.zeros((len(batch), width), dtype=torch.float64)
            for row, seq in enumerate(batch):
                n = len(seq.ids)
                ids[row, :n] = torch.from_numpy(seq.ids)
                attention[row, :n] = 1
                mask[row, :n] = torch.from_numpy(seq.targets)
                if seq.token_bytes is not None:
                    n_bytes[row, :n] = torch.from_numpy(seq.token_bytes).double()
                else:
                    n_bytes[row, :n] = -1.0  # not counted: its bytes are not all predicted
            ids, attention, mask = ids.to(device), attention.to(device), mask.to(device)
            logits = forward(ids, attention)[:, :-1].float()
            labels, keep = ids[:, 1:], mask[:, 1:] & attention[:, 1:].bool()
            nll = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
            hits = (logits.argmax(-1) == labels) & keep
            nll, keep = nll.double().cpu(), keep.cpu()
            text = keep & (n_bytes[:, 1:] >= 0)  # scored non-special tokens
            sums[list(positions)] = torch.stack(
                [(nll * keep).sum(1), hits.sum(1).double().cpu(), keep.sum(1).double(),
                 (nll * text).sum(1), (n_bytes[:, 1:].clamp_min(0) * text).sum(1)], 1).numpy()
            bar.update(len(batch))
    bar.close()
    total_nll, correct, count = float(sums[:, 0].sum()), int(sums[:, 1].sum()), \
        int(sums[:, 2].sum())
    if per_sequence is not None:
        per_sequence.extend({"index": i, "nll": float(n), "correct": int(c), "tokens": int(t),
                             **({"text_nll": float(x), "bytes": int(b)} if known else {})}
                            for i, (n, c, t, x, b), known in zip(indices, sums, with_bytes))
    mean_nll = total_nll / count
    out = {
        "perplexity": math.exp(mean_nll) if mean_nll < 700 else math.inf,
        "nll": mean_nll,
        "next_token_accuracy": correct / count,
        "tokens": count,
        "sequences": len(scored),
    }
    total_bytes = int(sums[:, 4].sum())
    if total_bytes:
        out.update(bits_per_byte=float(sums[:, 3].sum()) / math.log(2) / total_bytes,
                   bytes=total_bytes)
    return out


def _logits_function(model):
    """(device, fn(ids, attention_mask) -> logits [B, T, V]) of a transformers model or of
    an InferenceModel (an export: numpy in and out, on the CPU; position ids come from the
    mask, so the right padding used here leaves the real positions' logits unchanged)."""
    import torch

    from logitstore.toolkit.inference import InferenceModel

    if isinstance(model, InferenceModel):
        return torch.device("cpu"), lambda ids, mask: torch.from_numpy(
            model.logits(ids.numpy(), mask.numpy()))
    return next(model.parameters()).device, \
        lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits


# ----------------------------------------------------------------------------- sources


def read_texts(path: str | Path) -> list[str]:
    """Documents of a --ppl-data file (formats: logitstore.toolkit.heldout.read_texts)."""
    return heldout.read_texts(path, what="--ppl-data")
