"""`logitstore add-text SRC DST --tokenizer T`: a store written without sample text and token
spans (before format 2.1, or dumped with --no-text), copied with them, so that students of
other tokenizers and second teachers can use it without running its teacher again.

The text is recovered from the stored ids with the store's own tokenizer, and only where
that is exact:
* a byte-level tokenizer without a normaliser (GPT-2, Llama 3: every token stands for bytes
  of the text, nothing is added or dropped): the ids alone decide the text, the sample's
  ORIGINAL text (plus, for a tokenizer that adds a prefix space, that space): its tokens'
  bytes one after the other (`token_bytes.TokenBytes`, what `decode` reads), each token's
  span where its bytes sit;
* any other tokenizer (SentencePiece-style: Llama 2, Mistral, Gemma; or one with a
  normaliser, such as Qwen 2's NFC): the ids do not say whether the text began with a space
  nor what the normaliser changed, so the text is the tokenizer's `decode` of the ids, kept only when the
  tokenizer cuts that text into exactly the stored ids again (the round trip; the spans are
  that cut's): a text the teacher saw as these ids, which may differ from the original in
  what the tokenizer dropped (a leading space, the normalised characters). Under a dummy
  prefix a window that starts inside a word fails the round trip (the re-cut adds the
  prefix) and is refused; one that starts at a word comes back without its space.
The leading and trailing special tokens (BOS, EOS) are zero-width at the text's start and
end, as teacher-dump writes them. Refused before anything is read: a tokenizer that is not
the store's (fingerprint). Refused when any sample cannot be recovered, found by a first
pass over the ids before anything is written (the count and the first ones named; the
source never changes): a special token inside the text (chat-template markup: the turns and
roles are not in the ids; or a special token the data held), tokens whose bytes are not
whole UTF-8 characters (a window or cut that fell inside a character, whose other bytes are
in the neighbouring sample) and a failed round trip. A chat whose template writes its
markup as ordinary tokens comes back as a plain sample, the markup part of its text. The
tokenizer's files become the store's.

The copy is `copy_samples.execute_plan`'s (resumable, verified, provenance under
`extra["operation"]`, command "add-text", the tokenizer's fingerprint in its filter), with
each sample's text attached on the way; every id, target and signal is copied unchanged.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import numpy as np

from logitstore.copy_samples import CopyPlan, CopyResult, SourceSelection, execute_plan
from logitstore.errors import LogitStoreError, SettingsMismatchError, TokenSpansError
from logitstore.format import CLASSIFIER, TOKENIZER_DIR
from logitstore.reader import StoreReader
from logitstore.sample import Sample
from logitstore.text_spans import SampleText

REMEDY = "dump the store again with teacher-dump (it keeps text and spans unless --no-text)"


def add_text(src: str, dst: str, tokenizer_path: str, *, src_options: dict | None = None,
             dst_options: dict | None = None, overwrite: bool = False,
             progress: Callable[[int], None] | None = None) -> CopyResult:
    """Copy `src` to `dst` with each sample's text and token spans (module docstring)."""
    reader = StoreReader(src, storage_options=src_options)
    plan = plan_add_text(src, reader, tokenizer_path)
    return execute_plan(plan, dst, dst_options=dst_options, overwrite=overwrite,
                        progress=progress)


def plan_add_text(url: str, reader: StoreReader, tokenizer_path: str,
                  checked: Callable[[int], None] | None = None) -> CopyPlan:
    """The copy's plan; refuses, before any sample is read, a store that already holds text,
    a classifier store and a tokenizer other than the store's; then,
    before anything is written, a store with samples whose text cannot be recovered
    (`refuse_unrecoverable`, `checked(n)` after each sample's n tokens)."""
    from logitstore.toolkit.hf import load_tokenizer
    from logitstore.toolkit.tokenizer_files import saved_tokenizer_files
    from logitstore.toolkit.tokenizer_identity import tokenizer_fingerprint
    from logitstore.writer import tokenizer_file_entries

    settings = reader.settings
    if settings.kind == CLASSIFIER:
        raise LogitStoreError(f"{url} is a classifier store (format 2.3): it holds no tokens, "
                              f"so there is no text to add; add-text takes causal-lm stores")
    if settings.text:
        raise LogitStoreError(f"{url} already holds its samples' text and token spans "
                              f"(settings text: true): nothing to add; use it as it is")
    tokenizer = load_tokenizer(tokenizer_path)
    found = tokenizer_fingerprint(tokenizer)
    if found != settings.tokenizer_fingerprint:
        raise SettingsMismatchError(
            f"--tokenizer {tokenizer_path} is not the tokenizer {url} was dumped with: "
            f"expected fingerprint {settings.tokenizer_fingerprint} "
            f"({settings.tokenizer_name or 'its name unknown'}), found {found}. Give the "
            f"teacher's own tokenizer (its model directory or hub id)")
    recover = TextRecovery(tokenizer)
    files = saved_tokenizer_files(tokenizer, REMEDY)
    refuse_unrecoverable(url, reader, recover, checked)
    new_settings = replace(settings, text=True, tokenizer_files=tokenizer_file_entries(files))
    selection = SourceSelection(url, reader, np.arange(len(reader), dtype=np.int64))
    return CopyPlan(
        command="add-text", sources=[selection], settings=new_settings,
        filter={"tokenizer_fingerprint": found},
        counts={"samples_in": len(reader), "samples_out": len(reader), "duplicates": 0,
                "tokens_out": selection.tokens()},
        notes={"tokenizer": str(tokenizer_path)},
        tokenizer_files={f"{TOKENIZER_DIR}/{name}": data for name, data in files.items()},
        transform=lambda sample: with_text(recover, sample))


def refuse_unrecoverable(url: str, reader: StoreReader, recover: "TextRecovery",
                         checked: Callable[[int], None] | None = None) -> None:
    """Every sample's text recovered once, reading ids only, before anything is written:
    TokenSpansError saying how many cannot be, and why for the first ones."""
    count, first = 0, []
    for seg_no in range(len(reader.segments)):
        for sample in reader.read_segment(seg_no, []):
            try:
                recover(np.asarray(sample.input_ids, np.int64))
            except TokenSpansError as err:
                count += 1
                first += [f"sample {sample.sample_id!r}: {err}"][:3 - len(first)]
            if checked:
                checked(len(sample.input_ids))
    if count:
        raise TokenSpansError(f"{count} of the {len(reader)} samples of {url} cannot have "
                              f"their text recovered exactly from their ids, so nothing was "
                              f"written ({'; '.join(first)}); {REMEDY}")


def with_text(recover: "TextRecovery", sample: Sample) -> Sample:
    """`sample` with its text and spans recovered from its ids (module docstring), or
    TokenSpansError naming it."""
    try:
        text = recover(np.asarray(sample.input_ids, np.int64))
    except TokenSpansError as err:
        raise TokenSpansError(f"sample {sample.sample_id!r}: {err}; the copy stopped at this "
                              f"sample, which the first pass had recovered (the source changed "
                              f"since; add-text never writes to it): delete the unfinished "
                              f"destination, then {REMEDY}") from None
    return replace(sample, text_spans=text)


class TextRecovery:
    """A sample's text and spans from its ids (module docstring), for one tokenizer: what
    the tokenizer decides (its special ids, each token's bytes) is read once, not per
    sample."""

    def __init__(self, tokenizer):
        from logitstore.toolkit.token_bytes import backend_of, token_bytes_of

        self.backend = backend_of(tokenizer)
        self.read = token_bytes_of(self.backend)
        added = self.backend.get_added_tokens_decoder()
        # Llama 3's markup is added tokens marked special, not all listed in all_special_ids
        specials = set(tokenizer.all_special_ids) | {i for i, t in added.items() if t.special}
        self.special_ids = np.asarray(sorted(specials), np.int64)
        # the ids decide the original text only for bytes cut with nothing added or dropped
        self.exact_bytes = self.read.byte_level and self.backend.normalizer is None
        self.tokenizer = tokenizer

    def __call__(self, ids: np.ndarray) -> SampleText:
        """The text and spans of one sample's ids, or TokenSpansError."""
        special = np.isin(ids, self.special_ids)
        n_prefix = len(ids) if special.all() else int(np.argmin(special))
        n_suffix = 0 if special.all() else int(np.argmin(special[::-1]))
        inside = np.flatnonzero(special[n_prefix:len(ids) - n_suffix])
        if len(inside):
            at = n_prefix + int(inside[0])
            raise TokenSpansError(
                f"special token {int(ids[at])} at token {at} sits inside the text "
                f"(chat-template markup, or a special token the data held): its turns and "
                f"roles are not in the ids, so the text cannot be recovered exactly")
        inner = ids[n_prefix:len(ids) - n_suffix]
        text, inner_spans = (self._from_bytes(inner) if self.exact_bytes
                             else self._round_trip(inner, n_prefix))
        size = len(text.encode("utf-8"))
        spans = np.concatenate([np.zeros((n_prefix, 2), np.int64), inner_spans,
                                np.full((n_suffix, 2), size, np.int64)]).astype(np.int32)
        return SampleText(text, spans, special, np.zeros(len(ids), np.uint8))

    def _from_bytes(self, inner: np.ndarray) -> tuple[str, np.ndarray]:
        """(the text, spans [n, 2]) of byte-level ids: their bytes one after the other."""
        pieces = [self.read(int(i), self.backend.id_to_token(int(i))) for i in inner]
        data = b"".join(pieces)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise TokenSpansError(
                f"its tokens' bytes are not whole UTF-8 characters (byte {err.start} of "
                f"{len(data)}: a window or cut inside a character, whose other bytes are in "
                f"the neighbouring sample), so its text cannot be recovered alone") from None
        lengths = np.asarray([len(piece) for piece in pieces], np.int64)
        ends = np.cumsum(lengths)
        return text, np.stack([ends - lengths, ends], axis=1).reshape(-1, 2)

    def _round_trip(self, inner: np.ndarray, offset: int) -> tuple[str, np.ndarray]:
        """(the decoded text, spans [n, 2]) of ids the tokenizer cuts that text into again."""
        from logitstore.toolkit.token_spans import tokenize_with_spans

        text = self.tokenizer.decode(inner.tolist(), skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False)
        cut = tokenize_with_spans(self.tokenizer, text, add_special_tokens=False)
        if np.array_equal(cut.ids, inner):  # a U+FFFD the text really holds comes back too
            return text, np.asarray(cut.spans, np.int64).reshape(-1, 2)
        if "\ufffd" in text:  # decode's stand-in for bytes that are no whole character
            raise TokenSpansError(
                "its decoded text holds U+FFFD and does not cut into the stored ids again: "
                "its tokens' bytes are not whole UTF-8 characters (a window or cut inside a "
                "character, whose other bytes are in the neighbouring sample) or the round "
                "trip fails elsewhere, so its text cannot be recovered alone")
        at = next((i for i, (a, b) in enumerate(zip(cut.ids, inner)) if a != b),
                  min(len(cut.ids), len(inner)))
        found = int(cut.ids[at]) if at < len(cut.ids) else "the end"
        expected = int(inner[at]) if at < len(inner) else "the end"
        raise TokenSpansError(
            f"the tokenizer cuts the decoded text into other ids than the stored ones (at "
            f"token {offset + at}: expected {expected}, found {found}; e.g. a window that "
            f"starts inside a word under a dummy prefix, or text the tokenizer cannot give "
            f"back), so its text cannot be recovered exactly")
