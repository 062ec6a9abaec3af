"""Bits per byte: the held-out loss of a causal LM that is comparable across tokenizers.

    bits per byte = sum over the text's tokens of -ln p(token | BOS, tokens before it)
                    / ln 2 / (UTF-8 bytes of the text)

Per text, the tokenizer's own tokenization (`token_spans.tokenize_with_spans`): only the
tokens that hold bytes of the text are predicted (special tokens such as BOS/EOS are not:
they have no byte, and an EOS would be a cost no other tokenizer pays), and those tokens must
spell the text exactly (`byte_exact`; else the count of bytes would not be what was
predicted: refused). The model reads BOS, then the text tokens; a text longer than the
model's context is cut into consecutive windows of `context - 1` text tokens, each after its
own BOS, so every text token is predicted exactly once (a window's first tokens lose the
context before it: documented, and the held-out records here fit one window).
Sums are float64 over every text; the mean NLL per token and tokens per byte come along.
"""

from __future__ import annotations

import math

import numpy as np

LN2 = math.log(2.0)


class BitsPerByteError(ValueError):
    """A text the evaluator cannot count exactly (see the module docstring)."""


def text_token_ids(tokenizer, text: str) -> np.ndarray:
    """[n] int64: the ids of the tokens that spell `text` (special tokens left out)."""
    from logitstore.toolkit.token_spans import tokenize_with_spans

    tok = tokenize_with_spans(tokenizer, text)
    if not tok.byte_exact:
        raise BitsPerByteError(
            f"expected the tokens of {text[:40]!r}... to spell its {len(text.encode())} UTF-8 "
            f"bytes exactly, found that they do not ({tok.inexact_reason}): bits per byte "
            f"would not count what the model predicts; use a tokenizer without a normaliser "
            f"that rewrites text")
    return tok.ids[~tok.special].astype(np.int64)


def windows(ids: np.ndarray, bos_id: int, context: int) -> list[np.ndarray]:
    """[BOS, t_0 .. t_{w-1}] pieces of at most `context` tokens covering every text token
    once (an empty text gives none)."""
    if context < 2:
        raise BitsPerByteError(f"expected a context of at least 2 tokens, found {context}")
    step = context - 1
    return [np.concatenate([[bos_id], ids[i:i + step]]).astype(np.int64)
            for i in range(0, len(ids), step)]


def _batches(pieces: list[np.ndarray], batch_tokens: int):
    """Pieces sorted by length, grouped into batches of about batch_tokens padded tokens."""
    order = sorted(range(len(pieces)), key=lambda i: len(pieces[i]))
    batch: list[np.ndarray] = []
    for i in order:
        if batch and (len(batch) + 1) * len(pieces[i]) > batch_tokens:
            yield batch
            batch = []
        batch.append(pieces[i])
    if batch:
        yield batch


def bits_per_byte(model, tokenizer, texts: list[str], context: int,
                  batch_tokens: int = 8192) -> dict:
    """The model's bits per byte over `texts` (module docstring):
    {bits_per_byte, nll_sum_nats, bytes, tokens, nll_per_token, tokens_per_byte, texts}."""
    import torch
    import torch.nn.functional as F

    bos = tokenizer.bos_token_id
    if bos is None:
        raise BitsPerByteError(f"expected a tokenizer with a BOS token (the context of a "
                               f"text's first token), found none in {type(tokenizer).__name__}; "
                               f"give the tokenizer a bos_token")
    pieces, n_bytes = [], 0
    for text in texts:
        n_bytes += len(text.encode("utf-8"))
        pieces.extend(windows(text_token_ids(tokenizer, text), bos, context))
    total, tokens = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch in _batches(pieces, batch_tokens):
            width = max(len(p) for p in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for row, piece in enumerate(batch):
                ids[row, :len(piece)] = torch.from_numpy(piece)
                mask[row, :len(piece)] = 1
            positions = torch.arange(width).expand(len(batch), width)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                           use_cache=False).logits.float()  # [B, S, V]
            logp = F.log_softmax(logits[:, :-1], -1)  # position t predicts token t+1
            nll = -logp.gather(-1, ids[:, 1:, None])[..., 0]  # [B, S-1]
            keep = mask[:, 1:].bool()
            total += float(nll[keep].double().sum())
            tokens += int(keep.sum())
    model.train(was_training)
    if n_bytes == 0:
        raise BitsPerByteError("expected held-out texts with at least one byte, found none")
    return {"bits_per_byte": total / LN2 / n_bytes, "nll_sum_nats": total, "bytes": n_bytes,
            "tokens": tokens, "nll_per_token": total / max(1, tokens),
            "tokens_per_byte": tokens / n_bytes, "texts": len(texts)}
