"""teacher-dump of a teacher whose tokenizer is not the store's: its signal on its own
tokenization of the stored text (format 2.2, FORMAT.md section 4.2).

    teacher-dump --model medgemma-4b --signal medgemma --out store/    # a store med42 wrote

The samples are the store's: the data (`--data`) is not read. Each stored sample's exact
text is cut by the teacher's tokenizer (`cut_sample`), the teacher runs on those tokens and
its signal is stored on their positions, with the tokens, their byte spans and the
tokenizer's files, as tokenization `<signal>` (`logitstore.signal_writer.SignalAppender`:
segment by segment, resumable, one part per rank as any added signal). The rules:

* **Plain samples** (no stored token has a role): the tokenizer's own rendering of the text,
  `tokenizer(text)` (its BOS), plus its EOS when the store's own tokens end with a special
  token (the EOS the store's teacher was given).
* **Chat samples** (stored roles): the turns are rebuilt from the stored roles
  (`text_spans.stored_messages`: a turn starts where the role changes, or where text
  follows the markup that closed text of the same role; their contents concatenate to the
  stored text). They are rendered by the teacher's chat template
  (`token_spans.stored_text_tokens`, as a foreign student's are); a tokenizer without a
  template, or one that cannot render them, stops the dump naming the sample (a student
  would train such a chat as plain text; a teacher is fed its own turns or nothing).
* **Targets**: a token is a target when the store's own token holding its first byte is
  (`tokenized.loss_mask_by_bytes`; a turn's template markup only after text of its
  role).
* **Cut**: a sample of more than `--max-length` of the teacher's tokens keeps its first
  max-length tokens, and records `covered_bytes`, the end of the last one kept: a student
  aligns with this teacher inside those bytes only. No sample is dropped; the cut ones are
  counted (`DumpReport.samples_cut`, over the whole store).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np

from logitstore.errors import TokenSpansError
from logitstore.format import TOKENIZER_DIR, SignalSpec, TokenizationSpec
from logitstore.sample import Sample
from logitstore.tokenized import Tokenized, loss_mask_by_bytes
from logitstore.toolkit.tokenizer_files import saved_tokenizer_files
from logitstore.writer import tokenizer_file_entries

log = logging.getLogger(__name__)


@dataclass
class ForeignTokenizer:
    """A dump's teacher tokenizer other than the store's, and what it stores."""

    tokenizer: Any
    name: str  # the tokenization's name in the store (the signal's)
    spec: TokenizationSpec
    files: dict[str, bytes] = field(default_factory=dict)  # "tokenizer/<name>/<file>" -> bytes
    max_length: int | None = None

    @classmethod
    def of(cls, tokenizer, name: str, model: str, fingerprint: str, vocab: int,
           max_length: int | None) -> "ForeignTokenizer":
        by_name = saved_tokenizer_files(tokenizer)
        folder = f"{TOKENIZER_DIR}/{name}"
        spec = TokenizationSpec(vocab, fingerprint, model, tokenizer_file_entries(by_name, folder))
        return cls(tokenizer, name, spec, {f"{folder}/{n}": d for n, d in by_name.items()},
                   max_length)


def no_text_refusal(url: str, model: str) -> str:
    return (f"{url} was written by another tokenizer and keeps no sample text (written "
            f"before store format 2.1, or with --no-text), so {model}'s signal cannot be added: "
            f"a teacher with another tokenizer cuts each stored sample's exact text into its "
            f"own tokens, expected a store whose settings say text: true. Add them with "
            f"`logitstore add-text {url} NEW_STORE --tokenizer <the store's tokenizer>` "
            f"(where the stored ids give them back exactly), or dump the store again with "
            f"this version's teacher-dump (it keeps the text unless --no-text), then add this "
            f"teacher with --signal to the new store")


def cut_sample(foreign: ForeignTokenizer, sample: Sample) -> tuple[Tokenized, bool]:
    """(the stored sample as the teacher's tokenizer cuts its text, whether it was cut at
    max-length); TokenSpansError naming the sample when its chat cannot be rendered."""
    from logitstore.toolkit.token_spans import stored_text_tokens

    t = sample.text_spans
    try:
        whole, chat, why_plain = stored_text_tokens(foreign.tokenizer, t, sample.sample_id)
    except TokenSpansError as err:
        raise TokenSpansError(f"sample {sample.sample_id!r}: {err}") from None
    if why_plain:  # the teacher is fed its own template's turns, never a chat as plain text
        raise TokenSpansError(
            f"sample {sample.sample_id!r} is a chat, and the tokenizer of signal "
            f"{foreign.name!r} cannot render its stored turns ({why_plain}): a teacher of "
            f"another tokenizer is fed its own chat template's rendering of them. Give that "
            f"tokenizer a chat template that renders these turns (tokenizer_config.json's "
            f"chat_template), or add the signal to a store without such chats")
    ids, spans = whole.ids.astype(np.int64), whole.spans.astype(np.int32)
    special, roles = whole.special.astype(bool), whole.role.astype(np.uint8)
    eos = getattr(foreign.tokenizer, "eos_token_id", None)
    if not chat and eos is not None and bool(t.special[-1]) and \
            (len(ids) == 0 or ids[-1] != eos):
        end = len(t.text.encode("utf-8"))
        ids, spans = np.append(ids, eos), np.concatenate([spans, [[end, end]]]).astype(np.int32)
        special, roles = np.append(special, True), np.append(roles, 0).astype(np.uint8)
    n = len(ids) if foreign.max_length is None else min(len(ids), foreign.max_length)
    cut = n < len(ids)
    covered = int(spans[:n, 1].max()) if cut and n else len(t.text.encode("utf-8"))
    mask = loss_mask_by_bytes(t, sample.loss_mask, spans[:n], roles[:n])
    return Tokenized(ids[:n], mask, spans[:n], special[:n], roles[:n], covered), cut


def add_foreign_signal(work, spec: SignalSpec, store) -> None:
    """Add-signal mode for a foreign teacher (module docstring): the segments of this rank's
    parts without the signal, each cut, computed whole and written with its tokenization."""
    from logitstore.signal_writer import SignalAppender
    from teacher_dump.batch_loops import append_jobs

    foreign, url, ranks = work.foreign, work.cfg.out, work.ranks
    mine = [p for i, p in enumerate(sorted(store.parts)) if i % ranks.world == ranks.rank]
    appender = SignalAppender(url, work.cfg.signal, spec, parts=mine,
                              commit_store=ranks.world == 1, tokenization=foreign.spec,
                              tokenizer_files=foreign.files)

    def cut(stored: list) -> tuple[list, tuple]:
        cuts = [cut_sample(foreign, s)[0] for s in stored]
        items = [SimpleNamespace(sample_id=s.sample_id, input_ids=c.input_ids,
                                 loss_mask=c.loss_mask) for s, c in zip(stored, cuts)]
        return items, (cuts,)

    append_jobs(work, appender, prepare=cut)


def count_cut(url: str, tokenization: str) -> int:
    """Samples of the store whose tokens on `tokenization` cover less than their text."""
    import zarr

    from logitstore.format import tokenization_array
    from logitstore.reader import StoreReader
    from logitstore.text_spans import TEXT_SAMPLE_BYTES
    from logitstore.tokenized import COVERED_BYTES

    reader = StoreReader(url)
    store, cut = reader.fs.zarr_store(), 0
    for seg in reader.segments:
        covered, size = (zarr.open_array(store, path=f"{seg.path}/{rel}", mode="r",
                                         zarr_format=3)[...]
                         for rel in (tokenization_array(tokenization, COVERED_BYTES),
                                     TEXT_SAMPLE_BYTES))
        cut += int((covered < size).sum())
    return cut
