"""Exact UTF-8 byte spans of every token: the coordinates that align two tokenizers.

A sample's text is a `str`; its UTF-8 bytes are the coordinate system. One tokenization
(`Tokenization`) is, per token: its id (int64), the byte span [start, end) it covers
(int32 [T, 2]), whether it is special (bool: it holds no byte of the text, e.g. BOS/EOS or
a chat template's own tokens; its span is zero-width, start == end, at the byte where it
sits) and the role of the turn it belongs to (int8, `ROLE_NAMES`).

`tokenize_with_spans` tokenizes a plain text; `chat_with_spans` (module `chat_spans`) a
conversation rendered by the tokenizer's chat template, whose text is the concatenation of
the message contents. Both need a fast tokenizer (`OffsetsUnavailableError` otherwise).
`stored_text_tokens` re-cuts a stored sample's text with another tokenizer, the one way a
second teacher (teacher_dump/foreign_tokens.py) and a foreign student (student_train/
cross_batch.py) do it; each decides what a chat it cannot render costs.

Decisions:
* Spans come from each token's own bytes (`token_bytes`), so a byte-level BPE token holding
  part of a multi-byte character covers exactly its bytes, and byte-fallback tokens
  ``<0xAB>`` exactly their byte.
* A SentencePiece ``▁word`` token covers the space byte when the text has one. A prefix
  space the tokenizer adds itself (the dummy ``▁`` at the start, or after an added token)
  has no byte in the text: the token's span starts at the word, and a lone dummy ``▁``
  token gets a zero-width span. This is exact (the text is unchanged) and not flagged.
* `byte_exact` is True when every non-special token's span holds exactly its own bytes and
  the non-special spans tile the text with no gap, i.e. concatenating the tokens' bytes gives
  the text back. Otherwise (a normaliser lowercased or NFKC-rewrote the text, a pre-tokenizer
  dropped whitespace, an unknown token) spans still map to the original bytes through the
  tokenizer's offsets, stay non-overlapping and increasing, and `byte_exact` is False with
  `inexact_reason` saying why: never silently wrong.
* A special token written in the text itself (a literal "</s>" the tokenizer matches) holds
  bytes of the text, so it is not `special`: its span covers those bytes.
* Truncating a tokenization (the first n tokens) keeps every span valid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from logitstore.errors import TokenSpansError
from logitstore.text_spans import SampleText, stored_messages
from logitstore.toolkit.token_bytes import backend_of, encode, place_tokens, token_bytes_of

# Role codes stored per token (int8). Template tokens get the role of their turn; tokens of
# a plain text, and tokens the post-processor adds (BOS/EOS), get ROLE_NONE.
ROLE_NONE, ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT, ROLE_TOOL, ROLE_OTHER = range(6)
ROLE_NAMES = ("none", "system", "user", "assistant", "tool", "other")
_ROLE_ALIASES = {
    "system": ROLE_SYSTEM,
    "developer": ROLE_SYSTEM,
    "user": ROLE_USER,
    "human": ROLE_USER,
    "assistant": ROLE_ASSISTANT,
    "model": ROLE_ASSISTANT,
    "gpt": ROLE_ASSISTANT,
    "tool": ROLE_TOOL,
    "ipython": ROLE_TOOL,
    "function": ROLE_TOOL,
}


def role_code(role: str) -> int:
    """The stored code of a message role name (ROLE_OTHER for names not in the table)."""
    return _ROLE_ALIASES.get(role.strip().lower(), ROLE_OTHER)


@dataclass(frozen=True, eq=False)
class Tokenization:
    """One tokenization of `text` (see the module docstring for what each array means)."""

    text: str
    ids: np.ndarray  # int64 [T]
    spans: np.ndarray  # int32 [T, 2], byte offsets into text.encode("utf-8")
    special: np.ndarray  # bool [T]
    role: np.ndarray  # int8 [T]
    byte_exact: bool
    inexact_reason: str = ""

    def __post_init__(self):
        count = len(self.ids)
        expected = {
            "ids": (self.ids, np.int64, (count,)),
            "spans": (self.spans, np.int32, (count, 2)),
            "special": (self.special, np.bool_, (count,)),
            "role": (self.role, np.int8, (count,)),
        }
        for name, (array, dtype, shape) in expected.items():
            if not isinstance(array, np.ndarray) or array.dtype != dtype or array.shape != shape:
                found = (
                    f"{array.dtype} {array.shape}"
                    if isinstance(array, np.ndarray)
                    else type(array).__name__
                )
                raise TokenSpansError(
                    f"Tokenization.{name} must be a {np.dtype(dtype)} array of shape {shape} "
                    f"(T = {count} tokens), found {found}; build it with tokenize_with_spans "
                    "or chat_with_spans, or convert the arrays to these dtypes"
                )

    def __len__(self) -> int:
        return len(self.ids)


def build_tokenization(text, ids, spans, special, role, token_exact, first_inexact):
    """A `Tokenization` with `byte_exact` and `inexact_reason` worked out from the pieces:
    exact when every non-special token holds its own bytes and they tile the text."""
    special = np.asarray(special, dtype=bool)
    spans = np.asarray(spans, dtype=np.int32).reshape(-1, 2)
    reason = first_inexact if not np.all(np.asarray(token_exact)[~special]) else ""
    reason = reason or _tiling_problem(spans, special, len(text.encode("utf-8")))
    return Tokenization(
        text=text,
        ids=np.asarray(ids, dtype=np.int64),
        spans=spans,
        special=special,
        role=np.asarray(role, dtype=np.int8),
        byte_exact=not reason,
        inexact_reason=reason,
    )


def tokenize_with_spans(tokenizer, text: str, *, add_special_tokens: bool = True) -> Tokenization:
    """Tokenize `text` exactly as `tokenizer(text)` does, with the byte span of every token.

    `tokenizer`: a fast Hugging Face tokenizer or a bare `tokenizers.Tokenizer`. Tokens the
    post-processor adds (BOS/EOS) are special and zero-width; every role is ROLE_NONE.
    """
    if not isinstance(text, str):
        raise TokenSpansError(
            f"tokenize_with_spans needs the sample's text as a str, found "
            f"{type(text).__name__}; decode bytes with .decode('utf-8') first"
        )
    encoded = encode(tokenizer, text, add_special_tokens)
    placement = place_tokens(text, encoded)
    return build_tokenization(
        text,
        encoded.ids,
        placement.spans,
        encoded.inserted,
        np.full(len(encoded.ids), ROLE_NONE),
        placement.exact,
        placement.first_inexact,
    )


def chat_with_spans(tokenizer, messages, *, add_special_tokens: bool = False) -> Tokenization:
    """Tokenize a conversation rendered by the tokenizer's chat template (see `chat_spans`)."""
    from logitstore.toolkit.chat_spans import tokenize_chat

    return tokenize_chat(tokenizer, messages, add_special_tokens=add_special_tokens)


# ----------------------------------------------------------------------------- checks


def stored_text_tokens(tokenizer, text: SampleText,
                       sample_id: str) -> tuple[Tokenization, bool, str | None]:
    """(the tokenizer's tokens of a stored sample's text, whether it is a chat, why its chat
    was cut as plain text or None). A chat (stored roles: the turns text_spans.stored_messages
    rebuilds, whose contents concatenate to the text, so the spans index it) is rendered by
    the tokenizer's chat template; one it has no template for, or whose template cannot
    render those turns, is tokenized as plain text, as a plain sample is."""
    messages = stored_messages(text, sample_id)
    if messages is None:
        return tokenize_with_spans(tokenizer, text.text), False, None
    if not getattr(tokenizer, "chat_template", None):
        return tokenize_with_spans(tokenizer, text.text), True, "the tokenizer has no chat " \
            "template"
    try:
        return chat_with_spans(tokenizer, messages), True, None
    except TokenSpansError as err:
        return tokenize_with_spans(tokenizer, text.text), True, str(err)


def _tiling_problem(spans: np.ndarray, special: np.ndarray, n_bytes: int) -> str:
    """Why the non-special spans do not tile [0, n_bytes) end to end ("" when they do)."""
    text_spans = spans[~special].astype(np.int64)
    starts, ends = text_spans[:, 0], text_spans[:, 1]
    expected_starts = np.concatenate([[0], ends[:-1]])
    gaps = np.flatnonzero(starts != expected_starts)
    if gaps.size:
        at = int(expected_starts[gaps[0]])
        return (
            f"bytes [{at}, {int(starts[gaps[0]])}) of the text are covered by no token "
            "(the tokenizer dropped them, e.g. whitespace, or a chat template trimmed them)"
        )
    covered = int(ends[-1]) if ends.size else 0
    if covered != n_bytes:
        return f"bytes [{covered}, {n_bytes}) at the end of the text are covered by no token"
    return ""


def _order_problem(spans: np.ndarray, special: np.ndarray, n_bytes: int) -> str:
    starts, ends = spans[:, 0].astype(np.int64), spans[:, 1].astype(np.int64)
    checks = [
        (starts < 0, "starts before byte 0"),
        (ends < starts, "ends before it starts"),
        (ends > n_bytes, f"ends after the text's last byte ({n_bytes})"),
        (special & (ends != starts), "is special but not zero-width"),
        (np.concatenate([[False], starts[1:] < ends[:-1]]), "overlaps the token before it"),
    ]
    for bad, what in checks:
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            return f"token {i} (span [{int(starts[i])}, {int(ends[i])})) {what}"
    return ""


def _own_bytes_problem(tokenization: Tokenization, data: bytes, tokenizer) -> str:
    backend = backend_of(tokenizer)
    token_bytes = token_bytes_of(backend)
    section_start = True
    for i, token_id in enumerate(tokenization.ids.tolist()):
        if tokenization.special[i]:
            section_start = True
            continue
        own = token_bytes(token_id, backend.id_to_token(token_id) or "")
        start, end = (int(x) for x in tokenization.spans[i])
        dummy_prefix = section_start and own[:1] == b" " and own[1:] == data[start:end]
        if own != data[start:end] and not dummy_prefix:
            return f"token {i} (bytes {own!r}) does not equal the text's bytes {data[start:end]!r}"
        section_start = token_id in token_bytes.added
    return ""


def span_problem(tokenization: Tokenization, text: str, tokenizer=None) -> str:
    """Why `tokenization`'s spans are not an exact byte tokenization of `text` ("" if they are).

    Checks that the spans lie in the text, increase without overlap, special tokens are
    zero-width, the non-special spans tile the text, and `byte_exact` is set. With
    `tokenizer` (the one that made it), also that every non-special token's own bytes equal
    the text's bytes at its span (a dummy prefix space aside).
    """
    if text != tokenization.text:
        return "the tokenization was made for another text"
    n_bytes = len(text.encode("utf-8"))
    problem = _order_problem(tokenization.spans, tokenization.special, n_bytes)
    problem = problem or _tiling_problem(tokenization.spans, tokenization.special, n_bytes)
    problem = problem or tokenization.inexact_reason
    if not problem and not tokenization.byte_exact:
        problem = "the tokenization is flagged as not byte-exact"
    if not problem and tokenizer is not None:
        problem = _own_bytes_problem(tokenization, text.encode("utf-8"), tokenizer)
    return problem


def spans_exact(tokenization: Tokenization, text: str, tokenizer=None) -> bool:
    """True when `tokenization` is an exact byte tokenization of `text` (`span_problem`)."""
    return not span_problem(tokenization, text, tokenizer)
