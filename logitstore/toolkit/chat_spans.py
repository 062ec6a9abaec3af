"""Byte spans of a chat-templated conversation (`token_spans.chat_with_spans`).

The text of a conversation is the concatenation of its message contents, in order, with
nothing between them: what every tokenizer's template shares, so two tokenizers with
different templates still index the same bytes. The template's own tokens (headers, turn
markers, BOS it writes, a default system prompt it injects) hold no byte of that text: they
are special, zero-width at the text byte where they sit (after the content of the messages
rendered before them), with the role of the turn they belong to.

How contents are found in the rendered string: the template is rendered once more with a
unique placeholder in place of each content; the real rendering must be that skeleton with
each placeholder replaced by the content, verbatim or with leading/trailing whitespace
trimmed (Llama 3's and Gemma's templates `trim`). Trimmed whitespace is covered by no
token, so such a tokenization is not byte-exact (flagged). A template that changes a content
any other way raises `TokenSpansError`.

How template tokens get their turn: turn k ends where the rendering of the first k+1
messages ends, when each such rendering is a prefix of the full one; otherwise template
text before a message's content belongs to that message (its header), and text after the
last content to the last message. Everything before the first content belongs to turn 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from logitstore.errors import TokenSpansError
from logitstore.toolkit.token_bytes import backend_of, char_to_byte, encode, place_tokens
from logitstore.toolkit.token_spans import ROLE_NONE, Tokenization, build_tokenization, role_code


def _checked_messages(messages) -> list[dict]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise TokenSpansError(
            "chat_with_spans needs a non-empty list of messages like "
            f"{{'role': 'user', 'content': '...'}}, found {type(messages).__name__} "
            f"{messages!r:.80}"
        )
    for k, message in enumerate(messages):
        if not isinstance(message, Mapping) or not all(
            isinstance(message.get(key), str) for key in ("role", "content")
        ):
            raise TokenSpansError(
                f"message {k} must be a mapping with a string 'role' and a string 'content' "
                f"(multimodal content lists are not supported), found {message!r:.80}"
            )
    return [dict(message) for message in messages]


def _render(tokenizer, messages: list[dict]) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as exc:  # jinja/transformers raise many types for a template problem
        raise TokenSpansError(
            f"the tokenizer's chat template could not render the conversation "
            f"({type(exc).__name__}: {exc}); give the tokenizer a chat template "
            "(tokenizer.chat_template) that accepts these roles"
        ) from exc


def _placeholder(k: int) -> str:
    # Private-use characters: no real text holds them, and no template rewrites them.
    return f"\ue000{k}\ue001"


def _content_regions(tokenizer, messages: list[dict], rendered: str) -> list[tuple[int, int, int]]:
    """Per message: (start, end) of its content in `rendered` (characters), and how many
    leading characters of the content the template trimmed."""
    with_placeholders = [dict(m, content=_placeholder(k)) for k, m in enumerate(messages)]
    skeleton = _render(tokenizer, with_placeholders)
    pieces, rest = [], skeleton
    for k in range(len(messages)):
        before, found, rest = rest.partition(_placeholder(k))
        if not found or _placeholder(k) in rest:
            raise TokenSpansError(
                f"the chat template does not render message {k}'s content exactly once, in "
                "order, so its tokens cannot be placed in the conversation's text; use a "
                "template that writes every message's content once"
            )
        pieces.append(before)
    pieces.append(rest)
    regions, at = [], 0
    for k, message in enumerate(messages):
        if not rendered.startswith(pieces[k], at):
            raise _rewritten(k, message)
        at += len(pieces[k])
        content = message["content"]
        trimmed = (content.strip(), len(content) - len(content.lstrip()))
        for variant, lead in ((content, 0), trimmed):
            if rendered.startswith(variant, at) and rendered.startswith(
                pieces[k + 1], at + len(variant)
            ):
                regions.append((at, at + len(variant), lead))
                at += len(variant)
                break
        else:
            raise _rewritten(k, message)
    if at + len(pieces[-1]) != len(rendered):
        raise _rewritten(len(messages) - 1, messages[-1])
    return regions


def _rewritten(k: int, message: dict) -> TokenSpansError:
    return TokenSpansError(
        f"the chat template renders message {k} ({message['role']}) with a content other than "
        "the message's own (it changes more than leading/trailing whitespace, or renders "
        "differently depending on the content), so the content's tokens cannot be placed in "
        "the text; use a template that writes contents verbatim, or store the sample as plain "
        "text"
    )


def _turn_ends(tokenizer, messages, rendered: str, regions, to_byte) -> np.ndarray:
    """Byte offset in `rendered` where each turn but the last ends (int64 [n - 1])."""
    ends = []
    for k in range(len(messages) - 1):
        try:
            prefix = tokenizer.apply_chat_template(messages[: k + 1], tokenize=False)
        except Exception:  # some templates refuse a partial conversation: use the fallback
            prefix = None
        if prefix is None or not rendered.startswith(prefix):
            # Fallback: the template text after message k's content is message k + 1's header.
            return np.array([to_byte[end] for _, end, _ in regions[:-1]], dtype=np.int64)
        ends.append(to_byte[len(prefix)])
    return np.asarray(ends, dtype=np.int64)


@dataclass(frozen=True)
class _Layout:
    """Where each message's content is, in the rendered string and in the text (bytes)."""

    rendered: np.ndarray  # int64 [n, 2]: content [start, end) in the rendered string
    text_starts: np.ndarray  # int64 [n]: where the rendered content starts in the text
    message_ends: np.ndarray  # int64 [n]: where each message's (untrimmed) content ends
    text_bytes: int

    @classmethod
    def of(cls, messages: list[dict], regions, to_byte: np.ndarray) -> _Layout:
        sizes = np.array([len(m["content"].encode("utf-8")) for m in messages], dtype=np.int64)
        trimmed = [len(m["content"][:r[2]].encode("utf-8")) for m, r in zip(messages, regions)]
        ends = np.cumsum(sizes)
        return cls(
            rendered=np.array([(to_byte[a], to_byte[b]) for a, b, _ in regions], dtype=np.int64),
            text_starts=ends - sizes + np.asarray(trimmed, dtype=np.int64),
            message_ends=ends,
            text_bytes=int(ends[-1]),
        )


def _map_to_text(placement, inserted, layout: _Layout):
    """Rendered-string byte spans -> text byte spans, special mask, message index per token
    (-1 for template tokens) and exactness (a token straddling a content edge is inexact)."""
    count = len(placement.spans)
    out = np.zeros((count, 2), dtype=np.int64)
    special = np.ones(count, dtype=bool)
    message = np.full(count, -1, dtype=np.int64)
    exact = placement.exact.copy()
    region_starts, region_ends = layout.rendered[:, 0], layout.rendered[:, 1]
    for i in range(count):
        start, end = (int(x) for x in placement.spans[i])
        if inserted[i]:  # the post-processor's BOS/EOS: at the text's start or end
            out[i] = 0 if start == 0 else layout.text_bytes
            continue
        k = int(np.searchsorted(region_ends, start, side="right"))  # regions ended before it
        inside = k < len(region_starts) and region_starts[k] <= start
        overlaps = k < len(region_starts) and end > region_starts[k]
        if inside or overlaps:
            clipped = (max(start, region_starts[k]), min(end, region_ends[k]))
            exact[i] &= clipped == (start, end)
            offset = layout.text_starts[k] - region_starts[k]
            out[i] = (clipped[0] + offset, clipped[1] + offset)
            special[i], message[i] = False, k
        else:  # a template token: after the contents of the messages rendered before it
            out[i] = layout.message_ends[k - 1] if k else 0
    return out, special, message, exact


def tokenize_chat(tokenizer, messages, *, add_special_tokens: bool = False) -> Tokenization:
    """Tokenize `messages` rendered by the tokenizer's chat template, with byte spans into
    the concatenation of their contents (module docstring).

    The ids are those of `tokenizer(rendered, add_special_tokens=add_special_tokens)`; the
    default False matches `apply_chat_template(..., tokenize=True)` (templates write BOS).
    """
    backend_of(tokenizer)  # refuse a slow tokenizer before any rendering
    messages = _checked_messages(messages)
    rendered = _render(tokenizer, messages)
    regions = _content_regions(tokenizer, messages, rendered)
    encoded = encode(tokenizer, rendered, add_special_tokens)
    placement = place_tokens(rendered, encoded)
    to_byte = char_to_byte(rendered)
    inserted = np.asarray(encoded.inserted, dtype=bool)
    spans, special, message, exact = _map_to_text(
        placement, inserted, _Layout.of(messages, regions, to_byte)
    )
    roles = np.array([role_code(m["role"]) for m in messages], dtype=np.int8)
    turn_ends = _turn_ends(tokenizer, messages, rendered, regions, to_byte)
    turn = np.searchsorted(turn_ends, placement.spans[:, 0], side="right")
    role = np.where(message >= 0, roles[np.maximum(message, 0)], roles[turn])
    role[inserted] = ROLE_NONE
    first_inexact = placement.first_inexact
    if not first_inexact and not exact[~special].all():
        first_inexact = "a token straddles a message content's edge and the template's text"
    text = "".join(m["content"] for m in messages)
    return build_tokenization(text, encoded.ids, spans, special, role, exact, first_inexact)
