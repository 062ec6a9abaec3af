"""Held-out token sequences for scoring a model: from a text file, or from a store's eval split.

A `TokenSequence` is token ids plus a target mask: position t is scored when `targets[t]`
is True, by the model's distribution over token t given tokens 0..t-1 (position 0 has no
context and is never scored).

Sources:
- a text file (`read_texts`): .jsonl with `text`, or `prompt` + `reference`, per record;
  any other file: paragraphs separated by blank lines. Every token is a target
  (`sequences_from_texts`), and with a fast tokenizer each token's UTF-8 bytes of the text
  come along (`token_bytes`, from its exact byte span; -1 for BOS/EOS) for a document it
  reads whole, after a BOS, spelling it exactly: a score per byte of text, comparable
  across tokenizers (eval/perplexity.py);
- a store's eval split (`sequences_from_store`): its `loss_mask` as targets, read with
  StoreReader (numpy); refused (`StoreTokenizerMismatch`) when the model's tokenizer is not
  the one the store was written with;
- the bundled held-out texts (`BUNDLED_TEXTS`: the medgen_mini answers shipped with
  logitstore.toolkit's tasks).

Used by student-export's quality gate; the same formats as distill-eval's --ppl-data and
--ppl-store. No torch here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from logitstore.errors import ConfigError, LogitStoreError
from logitstore.toolkit.eval_tasks import BUNDLED_TASKS_DIR

# Names a store's eval split usually has, tried in this order by split="auto".
EVAL_SPLITS = ("eval", "validation", "valid", "val", "dev", "test")
BUNDLED_TEXTS = BUNDLED_TASKS_DIR / "medgen_mini.jsonl"


class StoreTokenizerMismatch(LogitStoreError):
    """The store was tokenized with another tokenizer than the model's: ids mean other text."""


@dataclass
class TokenSequence:
    ids: np.ndarray  # [L] int64
    targets: np.ndarray  # [L] bool; targets[0] is ignored
    # Which document it is (text number, store row): the same for every model scoring the
    # same source, so per-sequence scores pair up across models whatever their tokenizers.
    source: int | None = None
    # [L] int: UTF-8 bytes of the text each token spells (0: a text token that spells none,
    # a lone dummy prefix; -1: a special token); None: not every byte of the document is
    # predicted exactly (sequences_from_texts)
    token_bytes: np.ndarray | None = None

    @classmethod
    def all_targets(cls, ids: Sequence[int]) -> "TokenSequence":
        ids = np.asarray(ids, dtype=np.int64)
        return cls(ids, np.ones(len(ids), dtype=bool))

    @property
    def scored(self) -> int:
        return int(self.targets[1:].sum())


def read_texts(path: str | Path, *, what: str = "held-out data") -> list[str]:
    """Documents of a held-out text file (see the module docstring for the formats);
    `what` names the setting in error messages (e.g. "--check-data")."""
    path = Path(path)
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{what} {path}: cannot read it ({exc})"]) from exc
    if path.suffix.lower() != ".jsonl":
        texts = [" ".join(p.split()) for p in content.split("\n\n")]
        return [t for t in texts if t]
    texts = []
    for number, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError([f"{what} {path}:{number} is not JSON ({exc})"]) from exc
        if isinstance(record, dict) and isinstance(record.get("text"), str):
            texts.append(record["text"])
        elif isinstance(record, dict) and {"prompt", "reference"} <= record.keys():
            texts.append(f"{record['prompt']}\n{record['reference']}")
        else:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ConfigError([f"{what} {path}:{number}: expected a record with `text` or "
                               f"with `prompt` and `reference`, found {keys}"])
    return texts


def sequences_from_texts(texts: Iterable[str], tokenizer, max_length: int) -> list[TokenSequence]:
    """Tokenized documents (special tokens as the tokenizer adds them) with each token's
    bytes of the text (`token_spans.tokenize_with_spans`), their first max_length tokens (a
    longer document gets no EOS: the text goes on); documents of fewer than 2 tokens
    (nothing to score) are left out. The bytes are kept only where every byte of the text is
    predicted once and exactly: the document is not cut, its first token is special (a BOS:
    the first text token has context) and its tokens spell it (`byte_exact`: no normaliser
    rewrote it). A slow tokenizer (no offsets) gives the ids of `tokenizer(text,
    truncation=True, max_length=...)` and no bytes."""
    from logitstore.errors import OffsetsUnavailableError
    from logitstore.toolkit.token_spans import tokenize_with_spans

    out = []
    for number, text in enumerate(texts):
        try:
            tok = tokenize_with_spans(tokenizer, text)
            ids, n_bytes = tok.ids[:max_length], None
            if len(tok.ids) <= max_length and len(ids) and tok.special[0] and tok.byte_exact:
                n_bytes = np.where(tok.special, -1, tok.spans[:, 1] - tok.spans[:, 0])
        except OffsetsUnavailableError:
            ids, n_bytes = tokenizer(text, add_special_tokens=True, truncation=True,
                                     max_length=max_length)["input_ids"], None
        if len(ids) >= 2:
            sequence = TokenSequence.all_targets(ids)
            sequence.source = number
            if n_bytes is not None:
                sequence.token_bytes = np.asarray(n_bytes, dtype=np.int64)
            out.append(sequence)
    return out


def pick_split(available: Iterable[str], split: str, *,
               hint: str = "pass a split name") -> str:
    """`split`, or with "auto" the first of EVAL_SPLITS the store has; ConfigError ending
    with `hint` (what the caller's user can do) when there is none."""
    available = sorted({s for s in available if s is not None})
    if split != "auto":
        if split not in available:
            raise ConfigError([f"the store has no split {split!r} (it has {available})"])
        return split
    for name in EVAL_SPLITS:
        if name in available:
            return name
    raise ConfigError([f"the store has no eval split: looked for {', '.join(EVAL_SPLITS)}, it "
                       f"has {available}; {hint}"])


def sequences_from_store(url: str, tokenizer, *, split: str = "auto", max_length: int,
                         limit: int | None = None,
                         hint: str = "pass a split name") -> tuple[str, list[TokenSequence]]:
    """(split used, sequences) of a store's eval split; StoreTokenizerMismatch when the
    model's tokenizer is not the one the store was written with; ConfigError ending with
    `hint` when the store has no such split (`pick_split`)."""
    from logitstore.reader import StoreReader
    from logitstore.toolkit.tokenizer_identity import tokenizer_fingerprint

    reader = StoreReader(url)
    expected = reader.settings.tokenizer_fingerprint
    if tokenizer_fingerprint(tokenizer) != expected:
        raise StoreTokenizerMismatch(
            f"the store {url} was tokenized with {reader.settings.tokenizer_name or 'another'} "
            f"tokenizer (fingerprint {expected[:12]}...), not this model's: its token ids "
            "would mean other text")
    splits = reader.index.column("split").to_pylist()
    split = pick_split(splits, split, hint=hint)
    rows = [i for i, s in enumerate(splits) if s == split]
    out = []
    for row in rows[:limit]:
        sample = reader.sample(row, signals=[])  # tokens and loss mask only
        ids, mask = sample.input_ids[:max_length], sample.loss_mask[:max_length]
        seq = TokenSequence(ids.astype(np.int64), mask.astype(bool), source=row)
        if seq.scored:
            out.append(seq)
    return split, out
