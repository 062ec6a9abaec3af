"""Perplexity and next-token accuracy of a causal LM on held-out token sequences.

A sequence is token ids plus a target mask: position t is scored when `targets[t]` is
True, by the model's distribution over token t given tokens 0..t-1 (position 0 has no
context and is never scored). Over all scored positions of all sequences:

    nll                 = mean of -log p(token_t | tokens_<t)          (nats/token)
    perplexity          = exp(nll)
    next_token_accuracy = share of positions whose argmax prediction is token_t

`score_sequences(..., per_sequence=[])` also gives each sequence's NLL sum, correct
predictions and scored tokens: the report's standard errors treat sequences as the
independent units (eval/report.py).

Sources: a text file (`--ppl-data`: .jsonl with `text`, or `prompt` + `reference`, per
record; any other file: paragraphs separated by blank lines), every token a target; or a
store's eval split (`--ppl-store`), its `loss_mask` as targets, read with StoreReader
(numpy) and fed to the model as torch tensors.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from logitstore.errors import ConfigError, LogitStoreError
from logitstore.toolkit.batching import by_length, padded_batches

# Names a store's eval split usually has, tried in this order by split="auto".
EVAL_SPLITS = ("eval", "validation", "valid", "val", "dev", "test")


class StoreTokenizerMismatch(LogitStoreError):
    """The store was tokenized with another tokenizer than the model's: ids mean other text."""


@dataclass
class TokenSequence:
    ids: np.ndarray  # [L] int64
    targets: np.ndarray  # [L] bool; targets[0] is ignored
    # Which document it is (text number, store row): the same for every model scoring the
    # same source, so per-sequence scores pair up across models whatever their tokenizers.
    source: int | None = None

    @classmethod
    def all_targets(cls, ids: Sequence[int]) -> "TokenSequence":
        ids = np.asarray(ids, dtype=np.int64)
        return cls(ids, np.ones(len(ids), dtype=bool))

    @property
    def scored(self) -> int:
        return int(self.targets[1:].sum())


# ----------------------------------------------------------------------------- scoring


def score_sequences(model, sequences: Sequence[TokenSequence], *, max_batch_tokens: int = 4096,
                    pad_id: int = 0, progress: bool = False,
                    per_sequence: list[dict] | None = None) -> dict[str, float | int]:
    """{"perplexity", "nll", "next_token_accuracy", "tokens", "sequences"} over `sequences`.

    Batches hold at most `max_batch_tokens` padded positions (the logits of a batch are
    batch x length x vocabulary floats: this bounds memory for 128k-token vocabularies).
    When `per_sequence` is a list, one {"index", "nll", "correct", "tokens"} is appended
    per scored sequence, in input order: its `source` (else its index in `sequences`), NLL
    sum (nats), correct argmax predictions and scored positions of that sequence.
    """
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    scored = [s for s in sequences if s.scored > 0]
    indices = [i if s.source is None else s.source for i, s in enumerate(sequences)
               if s.scored > 0]
    if not scored:
        raise ValueError("no sequence has a scored position (each needs >= 2 tokens and a "
                         "target after the first)")
    device = next(model.parameters()).device
    lengths = [len(s.ids) for s in scored]
    sums = np.zeros((len(scored), 3))  # per scored sequence: NLL sum, correct, tokens
    bar = tqdm(total=len(scored), desc="perplexity", disable=not progress, leave=False)
    with torch.inference_mode():
        # Sorted by length: batches of similar lengths, least padding.
        for positions in padded_batches(lengths, max_batch_tokens, order=by_length(lengths)):
            batch = [scored[i] for i in positions]
            width = max(len(s.ids) for s in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.bool)
            for row, seq in enumerate(batch):
                n = len(seq.ids)
                ids[row, :n] = torch.from_numpy(seq.ids)
                attention[row, :n] = 1
                mask[row, :n] = torch.from_numpy(seq.targets)
            ids, attention, mask = ids.to(device), attention.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
            labels, keep = ids[:, 1:], mask[:, 1:] & attention[:, 1:].bool()
            nll = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
            hits = (logits.argmax(-1) == labels) & keep
            sums[list(positions)] = torch.stack(
                [(nll.double() * keep).sum(1), hits.sum(1).double(),
                 keep.sum(1).double()], 1).cpu().numpy()
            bar.update(len(batch))
    bar.close()
    total_nll, correct, count = float(sums[:, 0].sum()), int(sums[:, 1].sum()), \
        int(sums[:, 2].sum())
    if per_sequence is not None:
        per_sequence.extend({"index": i, "nll": float(n), "correct": int(c), "tokens": int(t)}
                            for i, (n, c, t) in zip(indices, sums))
    mean_nll = total_nll / count
    return {
        "perplexity": math.exp(mean_nll) if mean_nll < 700 else math.inf,
        "nll": mean_nll,
        "next_token_accuracy": correct / count,
        "tokens": count,
        "sequences": len(scored),
    }


# ----------------------------------------------------------------------------- text files


def read_texts(path: str | Path) -> list[str]:
    """Documents of a held-out text file (see the module docstring for the formats)."""
    path = Path(path)
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"--ppl-data {path}: cannot read it ({exc})"]) from exc
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
            raise ConfigError([f"--ppl-data {path}:{number} is not JSON ({exc})"]) from exc
        if isinstance(record, dict) and isinstance(record.get("text"), str):
            texts.append(record["text"])
        elif isinstance(record, dict) and {"prompt", "reference"} <= record.keys():
            texts.append(f"{record['prompt']}\n{record['reference']}")
        else:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ConfigError([f"--ppl-data {path}:{number}: expected a record with `text` or "
                               f"with `prompt` and `reference`, found {keys}"])
    return texts


def sequences_from_texts(texts: Iterable[str], tokenizer, max_length: int) -> list[TokenSequence]:
    """Tokenized documents (special tokens as the tokenizer adds them), cut at max_length."""
    out = []
    for number, text in enumerate(texts):
        ids = tokenizer(text, add_special_tokens=True, truncation=True,
                        max_length=max_length)["input_ids"]
        if len(ids) >= 2:
            sequence = TokenSequence.all_targets(ids)
            sequence.source = number
            out.append(sequence)
    return out


# ----------------------------------------------------------------------------- stores


def pick_split(available: Iterable[str], split: str) -> str:
    """`split`, or with "auto" the first of EVAL_SPLITS the store has."""
    available = sorted({s for s in available if s is not None})
    if split != "auto":
        if split not in available:
            raise ConfigError([f"the store has no split {split!r} (it has {available})"])
        return split
    for name in EVAL_SPLITS:
        if name in available:
            return name
    raise ConfigError([f"the store has no eval split: looked for {', '.join(EVAL_SPLITS)}, it "
                       f"has {available}; pass --ppl-split NAME"])


def sequences_from_store(url: str, tokenizer, *, split: str = "auto", max_length: int,
                         limit: int | None = None) -> tuple[str, list[TokenSequence]]:
    """(split used, sequences) of a store's eval split; StoreTokenizerMismatch when the
    model's tokenizer is not the one the store was written with."""
    from logitstore.toolkit.tokenizer_identity import tokenizer_fingerprint
    from logitstore.reader import StoreReader

    reader = StoreReader(url)
    expected = reader.settings.tokenizer_fingerprint
    if tokenizer_fingerprint(tokenizer) != expected:
        raise StoreTokenizerMismatch(
            f"the store {url} was tokenized with {reader.settings.tokenizer_name or 'another'} "
            f"tokenizer (fingerprint {expected[:12]}...), not this model's: its token ids "
            "would mean other text")
    split = pick_split(reader.index.column("split").to_pylist(), split)
    rows = [i for i, s in enumerate(reader.index.column("split").to_pylist()) if s == split]
    out = []
    for row in rows[:limit]:
        sample = reader.sample(row, signals=[])  # tokens and loss mask only
        ids, mask = sample.input_ids[:max_length], sample.loss_mask[:max_length]
        seq = TokenSequence(ids.astype(np.int64), mask.astype(bool), source=row)
        if seq.scored:
            out.append(seq)
    return split, out
