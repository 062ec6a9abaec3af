"""2.2: the samples' text cut by another tokenizer: an extra tokenization of a segment.

A store whose settings list `tokenizations` keeps, per segment and per such tokenization
`<name>` (FORMAT.md section 4.2), the same samples' stored text (section 4.1) cut by that
tokenizer, under `tokenizations/<name>/`:

- `input_ids` `[T']` (the tokenization's id dtype), `loss_mask` `[T']` bool;
- `sample_tokens` `[n]` uint32: tokens of each sample (>= 1), in sample order (T' is their sum);
- `covered_bytes` `[n]` uint32: the bytes of the sample's text its tokens cover, from byte 0:
  the text's length, or less for a sample this tokenization cut (its max length);
- `spans/gap`, `spans/length`, `spans/kind` `[T']`: its tokens' byte spans in the sample's
  text, special flags and roles, encoded as the store's own (logitstore/text_spans.py).

Invariants of one sample: at least one token; ids below the tokenization's vocabulary size;
`covered_bytes <= ` the text's bytes; the spans hold text_spans' invariants and none ends
past `covered_bytes`. The signals whose settings name the tokenization index these tokens:
their per-position arrays have `T'` rows. numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from logitstore.text_spans import (ROLE_MASK, SampleText, decode_kind, decode_spans,
                                   encode_texts, span_problem)

INPUT_IDS = "input_ids"
LOSS_MASK = "loss_mask"
SAMPLE_TOKENS = "sample_tokens"
COVERED_BYTES = "covered_bytes"
SPAN_ARRAYS = ("spans/gap", "spans/length", "spans/kind")
TOKEN_ARRAYS = (INPUT_IDS, LOSS_MASK) + SPAN_ARRAYS  # [T'] each
SAMPLE_ARRAYS = (SAMPLE_TOKENS, COVERED_BYTES)  # [n] each
ARRAYS = TOKEN_ARRAYS + SAMPLE_ARRAYS


@dataclass
class Tokenized:
    """One sample as another tokenizer cut its stored text (the in-memory form)."""

    input_ids: np.ndarray  # [L'] int
    loss_mask: np.ndarray  # [L'] bool
    spans: np.ndarray  # [L', 2] int32, byte [start, end) in the sample's UTF-8 text
    special: np.ndarray  # [L'] bool
    roles: np.ndarray | None  # [L'] role codes (text_spans.ROLES); None: 0 everywhere
    covered_bytes: int  # its tokens cover the text's bytes [0, covered_bytes)

    def __len__(self) -> int:
        return len(self.input_ids)


def tokenized_problem(t: Tokenized, vocab_size: int, text_bytes: int) -> str | None:
    """What breaks the module docstring's invariants for one sample, or None."""
    ids = np.asarray(t.input_ids)
    n = len(ids)
    if ids.ndim != 1 or n < 1 or not np.issubdtype(ids.dtype, np.integer):
        return f"input_ids must be a non-empty 1-D integer array, found {ids.shape} {ids.dtype}"
    if ids.min() < 0 or ids.max() >= vocab_size:
        return f"token ids must be in [0, {vocab_size}), found [{ids.min()}, {ids.max()}]"
    mask, spans, special = (np.asarray(a) for a in (t.loss_mask, t.spans, t.special))
    if mask.shape != (n,) or mask.dtype != bool:
        return f"loss_mask must be a [{n}] bool array, found {mask.shape} {mask.dtype}"
    if spans.shape != (n, 2) or not np.issubdtype(spans.dtype, np.integer):
        return f"spans must be a [{n}, 2] integer array, found {spans.shape} {spans.dtype}"
    if special.shape != (n,) or special.dtype != bool:
        return f"special must be a [{n}] bool array, found {special.shape} {special.dtype}"
    if t.roles is not None:
        roles = np.asarray(t.roles)
        if roles.shape != (n,) or roles.min() < 0 or roles.max() > ROLE_MASK:
            return f"roles must be [{n}] integer codes in 0..{ROLE_MASK}"
    if not 0 <= int(t.covered_bytes) <= text_bytes:
        return f"covered_bytes {t.covered_bytes} must be in 0..{text_bytes} (the text's bytes)"
    return span_problem(int(t.covered_bytes), spans, special)


def encode_tokenized(items: list[Tokenized], token_dtype: str) -> dict[str, np.ndarray]:
    """One segment's samples (already validated) -> {array name: data} (module docstring)."""
    spans = encode_texts([SampleText("", t.spans, t.special, t.roles) for t in items])
    return {INPUT_IDS: np.concatenate([np.asarray(t.input_ids) for t in items]).astype(token_dtype),
            LOSS_MASK: np.concatenate([np.asarray(t.loss_mask, bool) for t in items]),
            SAMPLE_TOKENS: np.array([len(t) for t in items], np.uint32),
            COVERED_BYTES: np.array([int(t.covered_bytes) for t in items], np.uint32),
            "spans/gap": spans.gap, "spans/length": spans.length, "spans/kind": spans.kind}


def decode_tokenized(ids, mask, gap, length, kind, covered: int) -> Tokenized:
    """One sample's stored arrays -> its Tokenized."""
    special, roles = decode_kind(kind)
    return Tokenized(np.asarray(ids).astype(np.int64), np.asarray(mask).astype(bool),
                     decode_spans(gap, length), special, roles, int(covered))


def segment_tokenized_problems(arrays: dict[str, np.ndarray], sample_bytes: np.ndarray,
                               vocab_size: int) -> list[str]:
    """Problems of one segment's arrays of a tokenization (`arrays` by name, ARRAYS) against
    its samples' text bytes, sample by sample."""
    counts = arrays[SAMPLE_TOKENS].astype(np.int64)
    if len(counts) != len(sample_bytes):
        return [f"{SAMPLE_TOKENS} holds {len(counts)} samples, the segment {len(sample_bytes)}"]
    total = int(counts.sum())
    wrong = [name for name in TOKEN_ARRAYS if len(arrays[name]) != total]
    if wrong:
        return [f"{', '.join(wrong)} must hold the {total} tokens {SAMPLE_TOKENS} adds up to"]
    offsets = np.concatenate([[0], np.cumsum(counts)])
    problems = []
    for j in range(len(counts)):
        a, b = offsets[j], offsets[j + 1]
        sample = decode_tokenized(*(arrays[name][a:b] for name in TOKEN_ARRAYS),
                                  arrays[COVERED_BYTES][j])
        problem = tokenized_problem(sample, vocab_size, int(sample_bytes[j]))
        if problem:
            problems.append(f"sample {j} of the segment: {problem}")
    return problems


def loss_mask_by_bytes(own: SampleText, own_mask: np.ndarray, spans: np.ndarray,
                       roles: np.ndarray | None = None) -> np.ndarray:
    """[L'] bool: the targets of another tokenization of a sample, read from the store's own
    tokens: a token is a target when the store's text token (non-special, non-empty) holding
    its first byte is one; a zero-width token (BOS, EOS, template markup) looks at the byte
    before it, so an EOS after a target is one too. Given the tokens' `roles` (a chat
    rendered by another template), a zero-width token of a turn is a target only when that
    text token is of the same turn's role: the end-of-turn markup after an answer is, the
    next user turn's header is not."""
    text = ~own.special & (own.spans[:, 1] > own.spans[:, 0])
    spans = np.asarray(spans).reshape(-1, 2)
    if not text.any():
        return np.zeros(len(spans), bool)
    starts = own.spans[text, 0].astype(np.int64)
    masks = np.asarray(own_mask, bool)[text]
    width = spans[:, 1] - spans[:, 0]
    anchor = np.maximum(spans[:, 0].astype(np.int64) - (width == 0), 0)
    owner = np.clip(np.searchsorted(starts, anchor, side="right") - 1, 0, len(starts) - 1)
    mask = masks[owner]
    if roles is not None and own.roles is not None:
        roles = np.asarray(roles)
        markup = (width == 0) & (roles != 0)
        mask &= ~markup | (roles == np.asarray(own.roles)[text][owner])
    return mask
