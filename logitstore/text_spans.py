"""The text of each sample and the byte span of each of its tokens, as a segment stores them.

A store whose settings say `text` (FORMAT.md section 4.1) keeps, for every sample, the
exact UTF-8 text its tokens were cut from and, per token, the byte span `[start, end)` of
the token in that text, whether it is special (BOS, EOS, chat-template markup: no text of
the sample, so a zero-width span `start == end` at the byte where it sits) and the role of
the turn it belongs to (`ROLES`). This module is the encoding of those (numpy only):

- `text/utf8` `[B]` uint8: the segment's texts, concatenated in sample order;
  `text/sample_bytes` `[n]` uint32: bytes of each sample's text.
- `spans/gap` `[T]` int32: `start[t] - end[t-1]` (>= 0), with `end[-1] = 0` at each
  sample's first token; `spans/length` `[T]` uint32: `end[t] - start[t]`. Tokens cut from
  contiguous text have gap 0 and lengths of a few bytes, which byte-shuffle + zstd pack to
  under half a byte per token (as small as uint8 codes with an escape, measured, without
  the escape).
- `spans/kind` `[T]` uint8: bit 7 set for a special token, bits 0-6 the role code (`ROLES`).

Invariants of one sample (checked by the writer and by `logitstore verify`): spans lie in
`[0, len(utf8)]`, `start <= end`, no span starts before the previous one ends (spans
increase and never overlap), and a special token's span is empty. A non-special token may
have an empty span too: SentencePiece's lone dummy prefix "▁" holds no byte of the text
(logitstore/toolkit/token_spans.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from logitstore.errors import TokenSpansError

# Role codes of spans/kind (bits 0-6): code = position. The same table as
# logitstore.toolkit.token_spans.ROLE_NAMES (which maps role names and aliases to codes);
# a code's meaning never changes, new roles get new codes.
ROLES = ("none", "system", "user", "assistant", "tool", "other")
SPECIAL_BIT = 0x80
ROLE_MASK = 0x7F

TEXT_UTF8 = "text/utf8"
TEXT_SAMPLE_BYTES = "text/sample_bytes"
SPAN_GAP = "spans/gap"
SPAN_LENGTH = "spans/length"
TOKEN_KIND = "spans/kind"
TEXT_ARRAYS = (TEXT_UTF8, TEXT_SAMPLE_BYTES, SPAN_GAP, SPAN_LENGTH, TOKEN_KIND)
TEXT_CHUNK_FACTOR = 16  # text/utf8 chunks hold 16 * chunk_tokens bytes (~4 B per token x 4)
MAX_TEXT_BYTES = 2**31 - 1  # spans are int32 on disk


@dataclass
class SampleText:
    """One sample's text and its tokens' spans (the in-memory form)."""

    text: str
    spans: np.ndarray  # [L, 2] int32, byte [start, end) in text.encode("utf-8")
    special: np.ndarray  # [L] bool
    roles: np.ndarray | None  # [L] role codes (ROLES); None: 0 ("none") everywhere


def stored_messages(t: SampleText, sample_id: str) -> list[dict] | None:
    """The chat turns of a stored sample, None for a plain one (no token has a role).

    A turn starts where the role changes (tokens without a role skipped) and, within a run of
    one role, where text follows template markup that itself followed text of that role: a
    message's content is all text tokens, markup sits outside contents, so that is two
    turns of one role in a row. A turn's content is the text from the byte where its first
    token sits (a split: where the markup sits, the boundary of the two contents) to where
    the next turn's does (the first from byte 0, the last to the text's end). A turn of
    markup alone with no content is dropped: a template that writes the system prompt inside
    the first user turn puts that turn's header, with the user's role, before the system
    text. The contents concatenate to the stored text, so any tokenizer's chat template can
    render them again (teacher_dump/foreign_tokens.py, student_train/cross_batch.py). Not
    rebuilt: a message with empty content."""
    if t.roles is None:
        return None
    turns: list[list] = []  # [role code, start byte, holds text]
    markup = None  # the byte of the markup after this turn's text
    for role, special, (start, _) in zip(np.asarray(t.roles).tolist(),
                                         np.asarray(t.special).tolist(), t.spans.tolist()):
        if not role:
            continue
        if not turns or turns[-1][0] != role:
            turns.append([role, start, not special])
            markup = None
        elif special:
            markup = start if turns[-1][2] and markup is None else markup
        else:
            if markup is not None:  # text after the markup that closed text of this role
                turns.append([role, markup, True])
            turns[-1][2], markup = True, None
    if not turns:
        return None
    data = t.text.encode("utf-8")
    bounds = [0] + [start for _, start, _ in turns[1:]] + [len(data)]
    try:
        messages = [({"role": ROLES[role], "content": data[a:b].decode("utf-8")}, text)
                    for (role, _, text), a, b in zip(turns, bounds, bounds[1:])]
    except UnicodeDecodeError:
        raise TokenSpansError(f"sample {sample_id!r}: a turn of its stored roles starts "
                              f"inside a character; the store's spans are damaged (run "
                              f"`logitstore verify`)") from None
    return [m for m, text in messages if text or m["content"]] or None


def span_problem(utf8_length: int, spans: np.ndarray, special: np.ndarray) -> str | None:
    """What breaks the module docstring's invariants for one sample, or None."""
    if len(spans) == 0:
        return None
    start, end = spans[:, 0].astype(np.int64), spans[:, 1].astype(np.int64)
    checks = (
        (start < 0, "starts before byte 0"),
        (end > utf8_length, f"ends past the text's {utf8_length} bytes"),
        (end < start, "ends before it starts"),
        (special & (end != start), "is special but covers text (expected start == end)"),
        (np.concatenate([[False], start[1:] < end[:-1]]),
         "starts before the token before it ends (spans must increase without overlap)"),
    )
    for bad, what in checks:
        if bad.any():
            t = int(np.argmax(bad))
            return f"token {t} (span [{start[t]}, {end[t]})) {what}"
    return None


def sample_text_problem(text, spans, special, roles, length: int) -> str | None:
    """Shape, type and span problems of one sample's text fields, or None."""
    if not isinstance(text, str):
        return f"text must be a str, found {type(text).__name__}"
    spans, special = np.asarray(spans), np.asarray(special)
    if spans.shape != (length, 2) or not np.issubdtype(spans.dtype, np.integer):
        return f"spans must be a [{length}, 2] integer array, found {spans.shape} {spans.dtype}"
    if special.shape != (length,) or special.dtype != bool:
        return f"special must be a [{length}] bool array, found {special.shape} {special.dtype}"
    if roles is not None:
        roles = np.asarray(roles)
        if roles.shape != (length,) or not np.issubdtype(roles.dtype, np.integer) or (
                roles.size and (roles.min() < 0 or roles.max() > ROLE_MASK)):
            return f"roles must be [{length}] integer codes in 0..{ROLE_MASK} (ROLES)"
    utf8 = len(text.encode("utf-8"))
    if utf8 > MAX_TEXT_BYTES:
        return f"text is {utf8} bytes; at most {MAX_TEXT_BYTES} are stored"
    return span_problem(utf8, spans, special)


@dataclass
class EncodedText:
    """The arrays of one segment (module docstring)."""

    utf8: np.ndarray
    sample_bytes: np.ndarray
    gap: np.ndarray
    length: np.ndarray
    kind: np.ndarray

    def arrays(self) -> dict[str, np.ndarray]:
        return {TEXT_UTF8: self.utf8, TEXT_SAMPLE_BYTES: self.sample_bytes, SPAN_GAP: self.gap,
                SPAN_LENGTH: self.length, TOKEN_KIND: self.kind}


def encode_texts(texts: list[SampleText]) -> EncodedText:
    """Samples' texts and spans (already validated) -> the segment's arrays."""
    blobs = [t.text.encode("utf-8") for t in texts]
    gaps, lengths, kinds = [], [], []
    for t in texts:
        spans = np.asarray(t.spans, dtype=np.int64).reshape(-1, 2)
        previous_end = np.concatenate([[0], spans[:-1, 1]])
        gaps.append(spans[:, 0] - previous_end)
        lengths.append(spans[:, 1] - spans[:, 0])
        roles = np.zeros(len(spans), np.uint8) if t.roles is None else np.asarray(t.roles)
        kinds.append(roles.astype(np.uint8) | np.where(np.asarray(t.special), SPECIAL_BIT, 0)
                     .astype(np.uint8))
    return EncodedText(
        utf8=np.frombuffer(b"".join(blobs), dtype=np.uint8),
        sample_bytes=np.array([len(b) for b in blobs], dtype=np.uint32),
        gap=np.concatenate(gaps).astype(np.int32),
        length=np.concatenate(lengths).astype(np.uint32),
        kind=np.concatenate(kinds).astype(np.uint8))


def decode_spans(gap: np.ndarray, length: np.ndarray) -> np.ndarray:
    """One sample's `spans/gap` and `spans/length` -> [L, 2] int32 spans."""
    gap, length = gap.astype(np.int64), length.astype(np.int64)
    # end[t] = sum over u <= t of (gap[u] + length[u]); start[t] = end[t] - length[t]
    end = np.cumsum(gap + length)
    return np.stack([end - length, end], axis=1).astype(np.int32)


def decode_kind(kind: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`spans/kind` -> (special [L] bool, roles [L] uint8)."""
    kind = np.asarray(kind, dtype=np.uint8)
    return (kind & SPECIAL_BIT) != 0, (kind & ROLE_MASK).astype(np.uint8)


def decode_sample_text(utf8: bytes | np.ndarray, gap: np.ndarray, length: np.ndarray,
                       kind: np.ndarray) -> SampleText:
    """One sample's stored arrays -> its SampleText. UnicodeDecodeError when the bytes are
    not UTF-8 (damage: a writer stores `str.encode("utf-8")`)."""
    text = bytes(np.asarray(utf8, dtype=np.uint8)).decode("utf-8")
    special, roles = decode_kind(kind)
    return SampleText(text, decode_spans(gap, length), special, roles)


def segment_text_problems(utf8: np.ndarray, sample_bytes: np.ndarray, lengths: np.ndarray,
                          gap: np.ndarray, span_length: np.ndarray,
                          kind: np.ndarray) -> list[str]:
    """Problems of one segment's text arrays, sample by sample (`lengths`: tokens per
    sample, from the index): texts add up to `utf8`, are UTF-8, spans hold the invariants."""
    if int(sample_bytes.astype(np.int64).sum()) != len(utf8):
        return [f"text/sample_bytes sum to {int(sample_bytes.astype(np.int64).sum())}, "
                f"text/utf8 holds {len(utf8)} bytes"]
    byte_offsets = np.concatenate([[0], np.cumsum(sample_bytes, dtype=np.int64)])
    token_offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    problems = []
    for j in range(len(sample_bytes)):
        a, b = token_offsets[j], token_offsets[j + 1]
        try:
            sample = decode_sample_text(utf8[byte_offsets[j]:byte_offsets[j + 1]], gap[a:b],
                                        span_length[a:b], kind[a:b])
        except UnicodeDecodeError as err:
            problems.append(f"sample {j} of the segment: text is not UTF-8 ({err})")
            continue
        problem = span_problem(int(sample_bytes[j]), sample.spans, sample.special)
        if problem:
            problems.append(f"sample {j} of the segment: {problem}")
    return problems
