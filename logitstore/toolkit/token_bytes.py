"""Each token's own bytes, and where they sit in a text: the engine under `token_spans`.

A fast tokenizer reports *character* offsets, which cannot say which bytes of a multi-byte
character each piece of a byte-level BPE split holds (every piece gets the whole character),
and which are rewritten by normalisers. So `place_tokens` puts every token where its own
bytes are, walking a cursor through the text's UTF-8 bytes, and falls back to the offsets
only for a token whose bytes are not there (a normaliser changed the text, an unknown
token); such a token is marked inexact, never placed silently wrong.

A token's own bytes are read the way the tokenizer's decoder reads it (`TokenBytes`):
byte-level BPE (GPT-2, Llama 3, Qwen) through the byte-to-unicode alphabet, byte-fallback
tokens ``<0xAB>`` as that byte, the SentencePiece ``▁`` as a space, WordPiece's ``##``
continuation prefix dropped, added tokens as their content. Nothing here imports torch or
transformers; `tokenizers` is imported only to recognise a bare `tokenizers.Tokenizer`.
"""

from __future__ import annotations

import json
import re
import weakref
from dataclasses import dataclass

import numpy as np

from logitstore.errors import OffsetsUnavailableError

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")
SPACE = b" "


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the alphabet of every byte-level BPE)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


_BYTE_LEVEL_DECODER = {char: byte for byte, char in bytes_to_unicode().items()}


def _component_configs(component) -> list[dict]:
    """Every typed config in a tokenizers component (a Sequence's members included)."""
    if component is None:
        return []
    found = []

    def walk(node) -> None:
        if isinstance(node, dict):
            if "type" in node:
                found.append(node)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(_state(component)))
    return found


class TokenBytes:
    """Maps (id, token string) to the bytes that token stands for in a text.

    Built from the backend's decoder and pre-tokenizer settings, so it reads tokens the
    way `decode` does. Always returns bytes, possibly empty; a token that stands for no
    bytes of the text (an unknown token's "<unk>") simply does not match them, which
    `place_tokens` reports as inexact.
    """

    def __init__(self, backend):
        decoder = _component_configs(backend.decoder)
        pre_tokenizer = _component_configs(backend.pre_tokenizer)
        types = {c["type"] for c in decoder + pre_tokenizer}
        self.byte_level = "ByteLevel" in types
        self.byte_fallback = any(c["type"] == "ByteFallback" for c in decoder)
        # Only the decoder's Replace maps tokens back to text (a normaliser's goes the other way).
        self.replacements = [
            (c["pattern"]["String"], c["content"])
            for c in decoder
            if c["type"] == "Replace" and "String" in c.get("pattern", {})
        ]
        self.replacements += [
            (c.get("replacement", "▁"), " ")
            for c in decoder + pre_tokenizer
            if c["type"] == "Metaspace"
        ]
        self.prefix = next((c["prefix"] for c in decoder if c["type"] == "WordPiece"), None)
        self.suffix = next((c["suffix"] for c in decoder if c["type"] == "BPEDecoder"), None)
        added = backend.get_added_tokens_decoder()
        self.added = {token_id: token.content for token_id, token in added.items()}
        self._cache: dict[int, bytes] = {}

    def __call__(self, token_id: int, token: str) -> bytes:
        cached = self._cache.get(token_id)
        if cached is None:
            cached = self._cache[token_id] = self._read(token_id, token)
        return cached

    def _read(self, token_id: int, token: str) -> bytes:
        if token_id in self.added:  # added tokens match the text literally
            return self.added[token_id].encode("utf-8")
        if self.byte_fallback:
            match = _BYTE_FALLBACK.fullmatch(token)
            if match:
                return bytes([int(match.group(1), 16)])
        if self.byte_level and all(char in _BYTE_LEVEL_DECODER for char in token):
            return bytes(_BYTE_LEVEL_DECODER[char] for char in token)
        if self.prefix and token.startswith(self.prefix):
            token = token[len(self.prefix) :]
        if self.suffix and token.endswith(self.suffix):
            token = token[: -len(self.suffix)]
        for pattern, content in self.replacements:
            token = token.replace(pattern, content)
        return token.encode("utf-8")


# One TokenBytes per backend, reused while its vocabulary size, decoder and pre-tokenizer
# stay the same: building one reads every added token (thousands for some tokenizers).
_TOKEN_BYTES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def token_bytes_of(backend) -> TokenBytes:
    """The (cached) `TokenBytes` of a `tokenizers.Tokenizer`."""
    key = (
        backend.get_vocab_size(with_added_tokens=True),
        _state(backend.decoder),
        _state(backend.pre_tokenizer),
    )
    cached = _TOKEN_BYTES.get(backend)
    if cached is None or cached[0] != key:
        cached = _TOKEN_BYTES[backend] = (key, TokenBytes(backend))
    return cached[1]


def _state(component) -> bytes:
    return b"" if component is None else component.__getstate__()


@dataclass(frozen=True)
class Encoded:
    """One text's encoding: ids, token strings, character offsets, and `inserted` (True for
    tokens the post-processor added, e.g. BOS/EOS: they hold no character of the text)."""

    ids: list[int]
    tokens: list[str]
    offsets: list[tuple[int, int]]
    inserted: list[bool]
    token_bytes: TokenBytes


def backend_of(tokenizer):
    """The `tokenizers.Tokenizer` behind `tokenizer` (or `tokenizer` itself when it is one)."""
    from tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not getattr(tokenizer, "is_fast", False):
        raise OffsetsUnavailableError(
            f"token byte spans need a fast tokenizer (backed by the `tokenizers` library, which "
            f"reports each token's offsets), but got {type(tokenizer).__name__}, a slow "
            "(pure-Python) tokenizer that reports none; load it with "
            "AutoTokenizer.from_pretrained(..., use_fast=True), or convert it to a tokenizer.json "
            "(PreTrainedTokenizerFast) first"
        )
    return backend


def encode(tokenizer, text: str, add_special_tokens: bool) -> Encoded:
    """Encode `text` exactly as `tokenizer(text)` would, keeping offsets and token strings."""
    backend = backend_of(tokenizer)
    if backend is tokenizer:
        encoding = backend.encode(text, add_special_tokens=add_special_tokens)
    else:
        encoding = tokenizer(text, add_special_tokens=add_special_tokens).encodings[0]
    return Encoded(
        ids=list(encoding.ids),
        tokens=list(encoding.tokens),
        offsets=list(encoding.offsets),
        # sequence id None = added by the post-processor; a special token written in the text
        # itself (e.g. a chat template's "<|eot_id|>") has sequence id 0 and holds characters.
        inserted=[sequence is None for sequence in encoding.sequence_ids],
        token_bytes=token_bytes_of(backend),
    )


def char_to_byte(text: str) -> np.ndarray:
    """int64 [len(text) + 1]: the UTF-8 byte offset of each character offset."""
    code_points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    widths = 1 + (code_points >= 0x80) + (code_points >= 0x800) + (code_points >= 0x10000)
    table = np.zeros(len(code_points) + 1, dtype=np.int64)
    np.cumsum(widths, out=table[1:])
    return table


@dataclass
class Placement:
    """Byte spans [T, 2] (int64) of an encoding in its text's UTF-8 bytes, and per token
    whether its span holds exactly its own bytes; `first_inexact` explains the first that
    does not (empty when all do)."""

    spans: np.ndarray
    exact: np.ndarray
    first_inexact: str = ""


def _dummy_prefix(data: bytes, cursor: int, encoded: Encoded, first: int, to_byte) -> bool | None:
    """At the start of a section (the text's start, or after an added token): True when the
    section's tokens spell a space and then exactly the text up to the next added token (the
    tokenizer prepended a space the text lacks: SentencePiece's dummy "▁", add_prefix_space),
    False when they spell the text itself, None when neither (decided token by token)."""
    added = encoded.token_bytes.added
    pieces, end = [], len(data)
    for j in range(first, len(encoded.ids)):
        if encoded.inserted[j] or encoded.ids[j] in added:
            end = len(data) if encoded.inserted[j] else int(to_byte[encoded.offsets[j][0]])
            break
        pieces.append(encoded.token_bytes(encoded.ids[j], encoded.tokens[j]))
    spelled = b"".join(pieces)
    if spelled == data[cursor:end]:
        return False
    if spelled[:1] == SPACE and spelled[1:] == data[cursor:end]:
        return True
    return None


def _locate(data: bytes, cursor: int, own: bytes, offsets: tuple[int, int], maybe_dummy: bool):
    """(start, end, exact) of one token whose own bytes are `own`; offsets are in bytes."""
    if data.startswith(own, cursor):
        return cursor, cursor + len(own), True
    # In a section `_dummy_prefix` could not decide, a leading space the text lacks is
    # still taken as a dummy prefix at the section's first token.
    if maybe_dummy and own[:1] == SPACE and data.startswith(own[1:], cursor):
        return cursor, cursor + len(own) - 1, True
    # A pre-tokenizer that drops bytes (WordPiece drops whitespace): the token is further on.
    if offsets[0] > cursor and data.startswith(own, offsets[0]):
        return offsets[0], offsets[0] + len(own), True
    start = max(offsets[0], cursor)  # never overlap or go back: spans stay increasing
    return start, max(offsets[1], start), False


def place_tokens(text: str, encoded: Encoded) -> Placement:
    """Place every token of `encoded` (an encoding of `text`) at its bytes in `text`.

    Inserted tokens get a zero-width span where they sit (before the first text token: 0,
    after the last: len(bytes)). A prefix space the tokenizer added (`_dummy_prefix`) is
    left out of its token's span. A token whose own bytes are not at the cursor, nor at its
    offsets' start, takes its offsets' bytes (clipped so spans never overlap) and is inexact.
    """
    data = text.encode("utf-8")
    to_byte = char_to_byte(text)
    count = len(encoded.ids)
    spans = np.zeros((count, 2), dtype=np.int64)
    exact = np.ones(count, dtype=bool)
    first_inexact, cursor, section_start = "", 0, True
    for i in range(count):
        if encoded.inserted[i]:
            spans[i] = cursor
            section_start = True
            continue
        token_id, token = encoded.ids[i], encoded.tokens[i]
        own = encoded.token_bytes(token_id, token)
        dummy = _dummy_prefix(data, cursor, encoded, i, to_byte) if section_start else False
        if dummy:  # the space is the tokenizer's, not the text's: the token covers the rest
            own = own[1:]
        offsets = (int(to_byte[encoded.offsets[i][0]]), int(to_byte[encoded.offsets[i][1]]))
        start, end, exact[i] = _locate(data, cursor, own, offsets, dummy is None)
        if not exact[i] and not first_inexact:
            first_inexact = (
                f"token {i} ({token!r}, bytes {own!r}) is not the text's bytes "
                f"{data[start:end]!r} at [{start}, {end}) (a normaliser rewrote the text, or "
                "the token is unknown), so its span comes from the tokenizer's offsets"
            )
        spans[i] = (start, end)
        cursor = end
        section_start = token_id in encoded.token_bytes.added  # added tokens start a section
    text_tokens = [i for i in range(count) if not encoded.inserted[i]]
    last_text_token = text_tokens[-1] if text_tokens else -1
    for i in range(last_text_token + 1, count):
        spans[i] = len(data)
    return Placement(spans, exact, first_inexact)
