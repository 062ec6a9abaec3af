"""`logitstore add-text SRC DST --tokenizer T`: a store written without sample text and token
spans (before format 2.1, or dumped with --no-text), copied with them, so that students of
other tokenizers and second teachers can use it without running its teacher again.

The text is recovered from the stored ids with the store's own tokenizer, and kept only
where that is exact: per sample, the leading and trailing special tokens (BOS, EOS) are the
frame; the ids between them are decoded in two parts split at the first target token (the
prompt and the response, which teacher-dump tokenizes apart), each part tokenized again with
byte offsets, and the result must give back every stored id (`sample_text.pair_sample_text`,
the spans teacher-dump itself writes). A sample with a special token inside its text (chat
template markup: its turns and roles are not in the ids), or whose ids do not come back,
stops the copy naming it (the source is never changed). A chat whose template writes its
markup as ordinary tokens comes back as a plain sample, the markup part of its text. The
tokenizer must be the store's (its fingerprint, from the store settings) and becomes the
store's tokenizer files.

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


def plan_add_text(url: str, reader: StoreReader, tokenizer_path: str) -> CopyPlan:
    """The copy's plan; refuses, before any sample is read, a store that already holds text,
    a classifier store and a tokenizer other than the store's."""
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
    files = saved_tokenizer_files(tokenizer, REMEDY)
    new_settings = replace(settings, text=True, tokenizer_files=tokenizer_file_entries(files))
    selection = SourceSelection(url, reader, np.arange(len(reader), dtype=np.int64))
    return CopyPlan(
        command="add-text", sources=[selection], settings=new_settings,
        filter={"tokenizer_fingerprint": found},
        counts={"samples_in": len(reader), "samples_out": len(reader), "duplicates": 0,
                "tokens_out": selection.tokens()},
        notes={"tokenizer": str(tokenizer_path)},
        tokenizer_files={f"{TOKENIZER_DIR}/{name}": data for name, data in files.items()},
        transform=lambda sample: with_text(tokenizer, sample))


def with_text(tokenizer, sample: Sample) -> Sample:
    """`sample` with its text and spans recovered from its ids (module docstring), or
    TokenSpansError naming it."""
    try:
        text = recovered_text(tokenizer, np.asarray(sample.input_ids, np.int64),
                              np.asarray(sample.loss_mask, bool))
    except TokenSpansError as err:
        raise TokenSpansError(f"sample {sample.sample_id!r}: {err}") from None
    return replace(sample, text_spans=text)


def recovered_text(tokenizer, ids: np.ndarray, loss_mask: np.ndarray) -> SampleText:
    """The text and spans of one sample's ids, exact or TokenSpansError (module docstring)."""
    from logitstore.toolkit.sample_text import pair_sample_text

    special = np.isin(ids, np.asarray(tokenizer.all_special_ids, np.int64))
    n_prefix = int(np.argmin(special)) if not special.all() else len(ids)
    n_suffix = int(np.argmin(special[::-1])) if not special.all() else 0
    body = slice(n_prefix, len(ids) - n_suffix)
    inside = np.flatnonzero(special[body])
    if len(inside):
        at = n_prefix + int(inside[0])
        raise TokenSpansError(
            f"special token {int(ids[at])} at token {at} sits inside the text (chat-template "
            f"markup, or a special token the data held): its turns and roles are not in the "
            f"ids, so the text cannot be recovered exactly; {REMEDY}")
    targets = np.flatnonzero(loss_mask[body])
    seam = int(targets[0]) if len(targets) else 0  # no target: all of it one part
    body_ids = ids[body].tolist()

    def decode(part: list[int]) -> str:
        return tokenizer.decode(part, skip_special_tokens=False,
                                clean_up_tokenization_spaces=False)

    return pair_sample_text(tokenizer, decode(body_ids[:seam]), decode(body_ids[seam:]),
                            ids, list(ids[:n_prefix].tolist()), hint=REMEDY)
