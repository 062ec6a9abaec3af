"""A dumped sample's text and its tokens' byte spans, for the ids `tokenize_pair` gives.

The ids a teacher sees are those of `record_formats.tokenize_pair`: ``[prefix specials] +
prompt + response + [EOS]``, prompt and response tokenized apart. The text and spans built
here (`logitstore.text_spans.SampleText`, FORMAT.md section 4.1) are for exactly those
ids; they never change them (a dump with text and one without store the same ids):

* plain renderings (every non-chat format, and chats rendered by the default template when
  the tokenizer has none or `use_chat_template` is off): the text is prompt + response;
  each part's spans come from `tokenize_with_spans(..., add_special_tokens=False)`, the
  response's shifted by the prompt's bytes;
* chats rendered by the tokenizer's template (and records wrapped in one): the text is the
  concatenation of the message contents, spans from `chat_with_spans` (the template's own
  tokens special and zero-width, each with the role of its turn). Its ids come from the
  whole rendering tokenized at once, so they are adopted only when they equal the dump's;
  a template whose prompt/response seam tokenizes differently is refused (`TokenSpansError`)
  rather than given spans of other tokens.

In both, the prefix specials (BOS) the dump adds are special and zero-width at byte 0, an
EOS it appends special and zero-width at the text's end; their role is "none". A sample cut
to `max_length`, or into windows, keeps the text of its kept tokens (`cut_text`).
"""

from __future__ import annotations

import numpy as np

from logitstore.errors import TokenSpansError
from logitstore.text_spans import SampleText

NO_TEXT_HINT = "dump without text (teacher-dump --no-text)"


def pair_sample_text(tokenizer, prompt: str, response: str, ids: np.ndarray,
                     prefix: list[int]) -> SampleText:
    """Text prompt + response and the spans of `ids` (tokenize_pair's ids of the pair)."""
    from logitstore.toolkit.token_spans import tokenize_with_spans

    parts = [tokenize_with_spans(tokenizer, prompt, add_special_tokens=False)] if prompt else []
    parts.append(tokenize_with_spans(tokenizer, response, add_special_tokens=False))
    shift = len(prompt.encode("utf-8"))
    body_ids = np.concatenate([p.ids for p in parts])
    body_spans = np.concatenate([parts[0].spans if prompt else np.zeros((0, 2), np.int32),
                                 parts[-1].spans + shift]).astype(np.int32)
    body_special = np.concatenate([p.special for p in parts])
    frame = _frame(ids, body_ids, prefix, tokenizer.eos_token_id)
    if frame is None:
        raise TokenSpansError(
            f"tokenizing the prompt and the response with byte offsets gives other ids than "
            f"the sample's ({_first_difference(ids, body_ids)}), so the spans would belong to "
            f"other tokens; the tokenizer ({type(tokenizer).__name__}) does not encode the "
            f"same way with offsets: {NO_TEXT_HINT}")
    text = prompt + response
    return _framed(text, body_spans, body_special, np.zeros(len(body_ids), np.uint8), frame)


def chat_sample_text(tokenizer, messages: list[dict], ids: np.ndarray,
                     prefix: list[int]) -> SampleText:
    """Text = the messages' contents, and the spans of `ids` (tokenize_pair's ids of the
    chat template's rendering, split before the last turn); see the module docstring."""
    from logitstore.toolkit.token_spans import chat_with_spans

    whole = chat_with_spans(tokenizer, messages)
    frame = _frame(ids, whole.ids, prefix, tokenizer.eos_token_id)
    if frame is None:
        raise TokenSpansError(
            f"the chat template's rendering tokenized whole gives other ids than its prompt "
            f"and last turn tokenized apart, which is what the teacher is fed "
            f"({_first_difference(ids, whole.ids)}): the seam before the last turn tokenizes "
            f"differently, so no span can be placed on the sample's tokens exactly. Render "
            f"chats with the default template (--no-use-chat-template), or {NO_TEXT_HINT}")
    return _framed(whole.text, whole.spans, whole.special, whole.role.astype(np.uint8), frame)


def cut_text(sample: SampleText, start: int, stop: int) -> SampleText:
    """The text and spans of tokens `start:stop` of `sample` (a truncated sample, a window):
    the text from the first kept token's start (byte 0 for the sample's first token) to the
    last one's end (the text's end for its last token), widened to whole characters (a
    byte-level token may hold part of one), with the spans shifted to it."""
    data = sample.text.encode("utf-8")
    spans = sample.spans[start:stop].astype(np.int64)
    low = 0 if start == 0 else int(spans[0, 0])
    high = len(data) if stop >= len(sample.spans) else int(spans[-1, 1])
    while 0 < low < len(data) and data[low] & 0xC0 == 0x80:  # a UTF-8 continuation byte
        low -= 1
    while high < len(data) and data[high] & 0xC0 == 0x80:
        high += 1
    roles = None if sample.roles is None else np.asarray(sample.roles)[start:stop]
    return SampleText(data[low:high].decode("utf-8"), (spans - low).astype(np.int32),
                      np.asarray(sample.special)[start:stop], roles)


# ----------------------------------------------------------------------------- framing


def _frame(ids: np.ndarray, body_ids: np.ndarray, prefix: list[int],
           eos_id: int | None) -> tuple[int, int] | None:
    """(prefix tokens, suffix tokens) with ids == prefix[:n] + body + [EOS][:m] (the
    prefix and EOS that tokenize_pair adds or leaves out), None when no such split exists."""
    ids = np.asarray(ids, dtype=np.int64)
    for n_prefix in ((len(prefix), 0) if prefix else (0,)):
        if list(ids[:n_prefix]) != list(prefix[:n_prefix]):
            continue
        for n_suffix in ((1, 0) if eos_id is not None else (0,)):
            end = len(ids) - n_suffix
            if end - n_prefix == len(body_ids) and np.array_equal(ids[n_prefix:end], body_ids) \
                    and (n_suffix == 0 or int(ids[-1]) == eos_id):
                return n_prefix, n_suffix
    return None


def _framed(text: str, spans: np.ndarray, special: np.ndarray, roles: np.ndarray,
            frame: tuple[int, int]) -> SampleText:
    """The body's spans with the prefix (zero-width at byte 0) and the EOS (zero-width at
    the text's end) around it, both special with role "none"."""
    n_prefix, n_suffix = frame
    end = len(text.encode("utf-8"))
    spans = np.concatenate([np.zeros((n_prefix, 2), np.int64), np.asarray(spans, np.int64),
                            np.full((n_suffix, 2), end, np.int64)]).astype(np.int32)
    special = np.concatenate([np.ones(n_prefix, bool), np.asarray(special, bool),
                              np.ones(n_suffix, bool)])
    roles = np.concatenate([np.zeros(n_prefix, np.uint8), roles, np.zeros(n_suffix, np.uint8)])
    return SampleText(text, spans, special, roles)


def _first_difference(ids: np.ndarray, other: np.ndarray) -> str:
    """Where two id sequences first differ, for an error message."""
    ids, other = list(np.asarray(ids).tolist()), list(np.asarray(other).tolist())
    i = next((i for i, (a, b) in enumerate(zip(ids, other)) if a != b), min(len(ids), len(other)))
    return (f"{len(ids)} ids against {len(other)}, first different at token {i}: "
            f"{ids[i:i + 3]} against {other[i:i + 3]}")
