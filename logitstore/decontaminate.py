"""`logitstore decontaminate`: find stored samples that share a long n-gram with evaluation
data, report them per source, and optionally write a clean store without them.

What is matched: **word n-grams of the decoded text** (default 13 words), as in the
decontamination of GPT-3 and Llama. Each stored sample's token ids are decoded with the
store's own tokenizer (special tokens dropped); evaluation items are taken as text. Both
sides are normalised the same way (`words_of`): lower-cased, every run of characters other
than letters and digits is a word break, so punctuation, case and whitespace never hide a
match. Text rather than token ids because a passage's ids depend on its context (a leading
space, the merges at its edges, a chat template around it), while its words do not; the
cost is one decode per sample.

An item's texts (question, each option, reference answer...) are n-grammed one by one, so
an n-gram never spans two fields: the same MCQ rendered with "A." labels between its
options must match on the question alone. A field of fewer than n words contributes no
n-gram (too short to tell a leak from a common phrase); items with no n-gram at all are
counted as not checkable in the report. An n-gram across the boundary of two windows of a
long record (`#w0`, `#w1`) is not seen.

How: every evaluation n-gram is hashed to 64 bits (a set of eval n-grams is small); the
store is streamed one segment at a time, token ids only, and each sample's n-gram hashes are
looked up in the sorted eval hashes; a hash hit is confirmed by comparing the words, so a
hash collision never flags a sample. Memory: the eval n-grams plus one segment.

Writing the clean store (`clean_plan`) goes through `logitstore.copy_samples` (the copy
`merge` and `subset` use): every signal kept, verified, resumable after a kill, provenance
(source, evaluation sets, n-gram length, counts removed) in the manifest `extra`.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from logitstore.copy_samples import CopyPlan, SourceSelection
from logitstore.reader import StoreReader

DEFAULT_NGRAM = 13
EXAMPLES_PER_SOURCE = 3
_WORD = re.compile(r"[^\W_]+")  # letters and digits (any script); the rest separates words
_MULTIPLIER = 0x9E3779B97F4A7C15  # odd, so the n-gram hash is a bijection per word slot
_MASK = (1 << 64) - 1

Decoder = Callable[[list[list[int]]], list[str]]


def words_of(text: str) -> list[str]:
    """Normalised words: lower-cased runs of letters and digits."""
    return _WORD.findall(text.lower())


class _WordHasher:
    """64-bit hashes of words (blake2b, so the same in every process), cached."""

    def __init__(self, limit: int = 1_000_000):
        self._cache: dict[str, int] = {}
        self._limit = limit

    def __call__(self, words: list[str]) -> np.ndarray:
        if len(self._cache) > self._limit:
            self._cache.clear()
        out = np.empty(len(words), dtype=np.uint64)
        for i, word in enumerate(words):
            value = self._cache.get(word)
            if value is None:
                value = int.from_bytes(hashlib.blake2b(word.encode("utf-8"), digest_size=8)
                                       .digest(), "little")
                self._cache[word] = value
            out[i] = value
        return out


def ngram_hashes(word_hashes: np.ndarray, n: int) -> np.ndarray:
    """[len - n + 1] uint64 hash of each run of n consecutive words (empty when shorter)."""
    count = len(word_hashes) - n + 1
    if count <= 0:
        return np.zeros(0, dtype=np.uint64)
    out = np.zeros(count, dtype=np.uint64)
    weight = 1
    for i in range(n - 1, -1, -1):  # sum of word_hash[j + i] * M^(n-1-i), mod 2^64
        out += word_hashes[i:i + count] * np.uint64(weight)
        weight = (weight * _MULTIPLIER) & _MASK
    return out


# ----------------------------------------------------------------------------- eval side


@dataclass(frozen=True)
class EvalItem:
    eval_set: str  # the --against entry it came from (file path or task name)
    label: str  # its id field, "line N" or "task#N"
    texts: tuple[str, ...]  # its fields' texts, n-grammed one by one


@dataclass
class EvalSet:
    name: str
    items: list[EvalItem]


class EvalIndex:
    """The hashed n-grams of every evaluation item, and which items hold each."""

    def __init__(self, sets: list[EvalSet], n: int):
        if n < 1:
            raise ValueError(f"n-gram length must be at least 1, got {n}")
        self.n = n
        self.sets = sets
        self.items: list[EvalItem] = [item for s in sets for item in s.items]
        self.hasher = _WordHasher()
        self.ngram_text: dict[int, str] = {}
        self.holders: dict[int, list[int]] = defaultdict(list)  # hash -> item numbers
        self.checkable: Counter[str] = Counter()  # eval set -> items with >= 1 n-gram
        for number, item in enumerate(self.items):
            mine = set()
            for text in item.texts:
                words = words_of(text)
                for j, h in enumerate(ngram_hashes(self.hasher(words), n).tolist()):
                    if h not in mine:
                        mine.add(h)
                        self.holders[h].append(number)
                        self.ngram_text.setdefault(h, " ".join(words[j:j + n]))
            self.checkable[item.eval_set] += bool(mine)
        self.sorted_hashes = np.array(sorted(self.holders), dtype=np.uint64)

    def fingerprint(self) -> str:
        """sha256 over n and the sorted n-gram hashes: equal iff the same n-grams are sought."""
        digest = hashlib.sha256(str(self.n).encode() + b"\0")
        digest.update(self.sorted_hashes.astype("<u8").tobytes())
        return digest.hexdigest()

    def _known(self, hashes: np.ndarray) -> np.ndarray:
        """[len] bool: which hashes are eval n-gram hashes (binary search, no re-sort)."""
        if not len(self.sorted_hashes) or not len(hashes):
            return np.zeros(len(hashes), dtype=bool)
        at = np.minimum(np.searchsorted(self.sorted_hashes, hashes), len(self.sorted_hashes) - 1)
        return self.sorted_hashes[at] == hashes

    def matches(self, text: str) -> list[tuple[int, str]]:
        """(hash, n-gram text) of every distinct eval n-gram in `text`, confirmed word by word."""
        words = words_of(text)
        hashes = ngram_hashes(self.hasher(words), self.n)
        hits = np.flatnonzero(self._known(hashes))
        found = {}
        for j in hits.tolist():
            h = int(hashes[j])
            ngram = " ".join(words[j:j + self.n])
            if h not in found and self.ngram_text[h] == ngram:
                found[h] = ngram
        return list(found.items())


# ----------------------------------------------------------------------------- the scan


@dataclass
class SourceReport:
    samples: int = 0
    flagged: int = 0
    flagged_by_split: Counter = field(default_factory=Counter)
    examples: list[dict[str, str]] = field(default_factory=list)


@dataclass
class ScanReport:
    store: str
    ngram: int
    samples: int = 0
    tokens: int = 0
    flagged_ids: list[str] = field(default_factory=list)
    flagged_rows: list[int] = field(default_factory=list)
    by_source: dict[str, SourceReport] = field(default_factory=dict)
    # eval set -> {"items", "checkable", "items_matched", "samples_flagged"}
    by_eval: dict[str, dict[str, int]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"store": self.store, "ngram": self.ngram, "samples": self.samples,
                "tokens": self.tokens, "flagged": len(self.flagged_ids),
                "by_source": {src: {"samples": r.samples, "flagged": r.flagged,
                                    "flagged_by_split": dict(r.flagged_by_split),
                                    "examples": r.examples}
                              for src, r in self.by_source.items()},
                "by_eval": self.by_eval, "flagged_ids": self.flagged_ids}

    def lines(self) -> list[str]:
        """The report as text: totals, then each evaluation set, then each source."""
        out = [f"scanned {self.samples} samples ({self.tokens} tokens) of {self.store} for "
               f"{self.ngram}-word n-grams of {len(self.by_eval)} evaluation set(s): "
               f"{len(self.flagged_ids)} flagged"]
        for name, c in self.by_eval.items():
            short = c["items"] - c["checkable"]
            out.append(f"eval {name}: {c['items_matched']} of {c['items']} items found in "
                       f"{c['samples_flagged']} samples" + (
                           f" ({short} items shorter than {self.ngram} words in every field "
                           "are not checked; a lower --ngram checks them)" if short else ""))
        for source, r in self.by_source.items():
            splits = ", ".join(f"{s} {n}" for s, n in sorted(r.flagged_by_split.items()))
            out.append(f"source {source or '-'}: {r.flagged} of {r.samples} samples flagged"
                       + (f" ({splits})" if splits else ""))
            for ex in r.examples:
                out.append(f"  {ex['sample_id']}: \"{ex['ngram']}\" = {ex['eval_set']} "
                           f"{ex['eval_item']}")
        return out


def scan_store(reader: StoreReader, decode: Decoder, index: EvalIndex, *,
               progress: Callable[[int], None] | None = None) -> ScanReport:
    """Every sample of the store checked against `index`, one segment at a time (token ids
    only); `progress(tokens)` after each segment."""
    report = ScanReport(reader.fs.url, index.n)
    report.by_eval = {s.name: {"items": len(s.items), "checkable": index.checkable[s.name],
                               "items_matched": 0, "samples_flagged": 0} for s in index.sets}
    matched_items: set[int] = set()
    for seg_no, seg in enumerate(reader.segments):
        samples = reader.read_segment(seg_no, signals=[])
        texts = decode([s.input_ids.tolist() for s in samples])
        for j, (sample, text) in enumerate(zip(samples, texts)):
            source = report.by_source.setdefault(sample.source, SourceReport())
            source.samples += 1
            found = index.matches(text)
            if found:
                _flag(report, source, sample, seg.first_sample + j, found, index, matched_items)
        report.samples += len(samples)
        report.tokens += seg.tokens
        if progress:
            progress(seg.tokens)
    for number in matched_items:
        report.by_eval[index.items[number].eval_set]["items_matched"] += 1
    return report


def _flag(report: ScanReport, source: SourceReport, sample, row: int,
          found: list[tuple[int, str]], index: EvalIndex, matched_items: set[int]) -> None:
    report.flagged_ids.append(sample.sample_id)
    report.flagged_rows.append(row)
    source.flagged += 1
    source.flagged_by_split[sample.split] += 1
    items = {number for h, _ in found for number in index.holders[h]}
    matched_items |= items
    for eval_set in {index.items[number].eval_set for number in items}:
        report.by_eval[eval_set]["samples_flagged"] += 1
    if len(source.examples) < EXAMPLES_PER_SOURCE:
        h, ngram = found[0]
        item = index.items[index.holders[h][0]]
        source.examples.append({"sample_id": sample.sample_id, "split": sample.split,
                                "ngram": ngram, "eval_set": item.eval_set,
                                "eval_item": item.label})


# ----------------------------------------------------------------------------- the clean store


def decontamination_filter(index: EvalIndex, tokenizer_fingerprint: str) -> dict[str, Any]:
    """What decides which samples a clean store drops (its provenance `filter`): the
    evaluation sets, the n-gram length, and the fingerprints of the n-grams sought and of
    the tokenizer that decoded the samples. Known before the store is scanned."""
    return {"against": [s.name for s in index.sets], "ngram": index.n,
            "eval_ngrams": len(index.sorted_hashes),
            "eval_ngrams_sha256": index.fingerprint(),
            "tokenizer_fingerprint": tokenizer_fingerprint}


def clean_plan(url: str, reader: StoreReader, filter_: dict[str, Any],
               report: ScanReport | None) -> CopyPlan:
    """The copy plan of the clean store: every sample of `reader` but the flagged ones, in
    store order, with every signal. `report` None: the plan before the scan (all samples),
    used to recognise this job's unfinished output."""
    rows = np.arange(len(reader), dtype=np.int64)
    if report is not None:
        rows = np.setdiff1d(rows, np.asarray(report.flagged_rows, dtype=np.int64))
    lengths = reader.index.column("length").to_numpy()
    counts = {"samples_in": len(reader), "samples_out": int(len(rows)),
              "removed": len(reader) - int(len(rows)), "tokens_out": int(lengths[rows].sum())}
    if report is not None:
        counts["removed_by_source"] = {src: r.flagged for src, r in report.by_source.items()
                                       if r.flagged}
    return CopyPlan("decontaminate", [SourceSelection(url, reader, rows)], reader.settings,
                    dict(filter_), counts)
