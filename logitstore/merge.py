"""`logitstore merge SRC... DST`: one store from several.

    result = merge_stores(["a/", "s3://b/store"], "merged/", common_signals=False)

Rules (checked before anything is written):

- **Kind.** Every source must be of one kind (FORMAT.md section 2, `kind`): causal-lm
  stores (tokens, per-token signals) or classifier stores (2.3: per-sample head logits,
  features and labels, section 4.3). Mixed kinds are refused, naming each source's kind.
- **Settings.** Every source must have the same store settings: `vocab_size`,
  `tokenizer_fingerprint`, `chunk_tokens`, `segment_tokens`, `chunk_samples`, and for each
  signal kept its whole capture spec (top-k, sampled, hidden, attention, depth, teacher).
  Conflicts are refused in one paragraph naming each key and its value in each source.
  `tokenizer_name` is informative (FORMAT.md section 2) and taken from the first source.
  Classifier stores must agree on their whole settings the same way: `heads` with their
  class counts, `features` with their widths, `logits_encoding`, `features_encoding`,
  `segment_samples`, `chunk_samples`. They hold no signals, text or tokenizer, so the
  rules below on those do not apply, and `common_signals` is refused for them.
- **Signals.** Every source must hold every signal; with `common_signals` only the signals
  all sources hold are kept (the others are left out of the new store).
- **Text.** The samples' text and token spans (format 2.1 settings `text`) are kept when
  every source holds them. Sources with and without text are refused, like a signal some
  sources lack; with `common_signals` the text is left out instead (only what all sources
  hold is kept). The tokenizer's files (`tokenizer_files`) are those of the first source
  that stores them: every source has the same tokenizer (its fingerprint), so they are
  informative like `tokenizer_name`.
- **Tokenizations** (format 2.2: the text cut by another teacher's tokenizer, FORMAT.md
  section 4.2) are settings like the others: every source holding a kept signal on one must
  hold it with the same tokenizer (a differing fingerprint or vocabulary is refused, naming
  the key); a tokenization no kept signal indexes is left out.
- **Duplicates.** A sample whose index `digest` (sha256 of its id and tokens, FORMAT.md
  section 3; of a classifier sample, of its id and labels, section 4.3) equals one already
  taken from an earlier source is kept once: the copy from the first source in argument
  order, with that source's split, tags and signals (or heads and features). Their number
  is reported (`counts.duplicates`).
- **Id collisions.** A sample id held by two sources with different tokens (classifier
  stores: labels), i.e. different digests, is refused, naming the ids and sources: ids are
  what other tools refer to (id lists, evaluation splits, decontamination reports), so they
  are never rewritten.
  Subset the sources to leave one of them out (`logitstore subset --ids`), then merge.

The output is written and resumed as `logitstore.copy_samples` describes: sources in
argument order, each in its store order, duplicates left out.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

import numpy as np

from logitstore.copy_samples import (CopyPlan, CopyResult, SourceSelection, execute_plan,
                                     open_sources, stored_tokenizer_files)
from logitstore.errors import (LogitStoreError, SchemaMismatchError, SettingsMismatchError,
                               StoreKindError)
from logitstore.format import CLASSIFIER, flatten_settings
from logitstore.reader import StoreReader

INFORMATIVE_SETTINGS = ("tokenizer_name", "tokenizer_files")  # may differ between sources
DECIDED_APART = ("text",)  # kept_text decides it


def merge_stores(sources: list[str], dst: str, *, common_signals: bool = False,
                 src_options: dict | None = None, dst_options: dict | None = None,
                 overwrite: bool = False,
                 progress: Callable[[int], None] | None = None) -> CopyResult:
    """Merge the stores at `sources` into a new store at `dst` (see the module docstring);
    returns what was written, with `problems` from verifying it."""
    readers = open_sources(list(sources), src_options)
    plan = plan_merge(list(sources), readers, common_signals=common_signals)
    return execute_plan(plan, dst, dst_options=dst_options, overwrite=overwrite,
                        progress=progress)


def plan_merge(urls: list[str], readers: list[StoreReader], *,
               common_signals: bool) -> CopyPlan:
    """What the merge of `readers` (opened from `urls`) writes; refuses what the module
    docstring's rules refuse."""
    if len(readers) < 1:
        raise LogitStoreError("merge needs at least one source store")
    check_one_kind(urls, readers, common_signals)
    signals = kept_signals(urls, readers, common_signals)
    check_settings_agree(urls, readers, signals)
    text = kept_text(urls, readers, common_signals)
    tokenizer_source = next((r for r in readers if r.settings.tokenizer_files), readers[0])
    first = readers[0].settings
    used = {first.signals[name].tokenization for name in signals}
    settings = replace(first, signals={name: first.signals[name] for name in signals},
                       text=text, tokenizer_files=tokenizer_source.settings.tokenizer_files,
                       tokenizations={t: spec for t, spec in first.tokenizations.items()
                                      if t in used})
    selections, per_source, duplicates = select_unique(urls, readers)
    tokens = sum(s.tokens() for s in selections)
    samples_in = sum(len(r) for r in readers)
    dropped = sorted({n for r in readers for n in r.signals} - set(signals))
    return CopyPlan(
        command="merge", sources=selections, settings=settings,
        filter={"common_signals": common_signals, "signals_left_out": dropped,
                **({"text_left_out": True} if any(r.has_text for r in readers) and not text
                   else {})},
        counts={"samples_in": samples_in, "samples_out": samples_in - duplicates,
                "duplicates": duplicates, "tokens_out": tokens},
        per_source=per_source, tokenizer_files=stored_tokenizer_files(tokenizer_source))


def check_one_kind(urls: list[str], readers: list[StoreReader], common_signals: bool) -> None:
    """StoreKindError when the sources are not all of one kind; LogitStoreError for
    `common_signals` on classifier stores (they hold no signals to choose from)."""
    kinds = {reader.settings.kind for reader in readers}
    if len(kinds) > 1:
        held = ", ".join(f"{url} is a {reader.settings.kind} store"
                         for url, reader in zip(urls, readers))
        raise StoreKindError(
            f"cannot merge stores of different kinds: {held}. A causal-lm store holds tokens "
            f"and per-token signals, a classifier store per-sample head logits, features and "
            f"labels; a merged store is of one kind: merge the stores of each kind apart "
            f"(`logitstore info` shows a store's kind)")
    if common_signals and kinds == {CLASSIFIER}:
        raise LogitStoreError(
            f"--common-signals keeps the signals every source holds, but {', '.join(urls)} "
            f"are classifier stores, which hold heads and features instead of signals and "
            f"must hold the same ones; merge them without --common-signals")


def kept_text(urls: list[str], readers: list[StoreReader], common_signals: bool) -> bool:
    """Whether the merged store keeps the samples' text and spans (module docstring)."""
    lacking = [u for u, r in zip(urls, readers) if not r.has_text]
    if not lacking or len(lacking) == len(readers) or common_signals:
        return not lacking
    holding = [u for u, r in zip(urls, readers) if r.has_text]
    raise SchemaMismatchError(
        f"cannot merge: {', '.join(holding)} keep each sample's text and token spans, "
        f"{', '.join(lacking)} do not (written before format 2.1, or with teacher-dump "
        f"--no-text). A merged store holds them for every sample or for none: pass "
        f"--common-signals to leave the text out, or re-dump the sources without it")


def kept_signals(urls: list[str], readers: list[StoreReader], common_signals: bool) -> list[str]:
    """The signals of the merged store, in the first source's order."""
    every = [n for n in readers[0].signals]
    every += sorted({n for r in readers[1:] for n in r.signals} - set(every))
    common = [n for n in every if all(n in r.settings.signals for r in readers)]
    if common_signals:
        if not common:
            held = "; ".join(f"{u}: {r.signals}" for u, r in zip(urls, readers))
            raise SchemaMismatchError(f"cannot merge: the sources have no signal in common "
                                      f"({held}); a store holds at least one signal")
        return common
    missing = []
    for name in every:
        lacking = [u for u, r in zip(urls, readers) if name not in r.settings.signals]
        if lacking:
            missing.append(f"signal {name!r} is missing from {', '.join(lacking)}")
    if missing:
        raise SchemaMismatchError(
            f"cannot merge: {'; '.join(missing)}. Every source must hold every signal; pass "
            f"--common-signals to keep only the signals all sources hold ({common or 'none'})")
    return every


def check_settings_agree(urls: list[str], readers: list[StoreReader],
                         signals: list[str]) -> None:
    """SettingsMismatchError naming every key (of the settings and of each kept signal)
    whose value differs between sources, with its value in each source."""
    flat = []
    for reader in readers:
        data = reader.settings.to_json()
        kept = {name: data["signals"][name] for name in signals}
        used = {signal.get("tokenization") for signal in kept.values()}
        plain = {k: v for k, v in data.items() if k not in ("signals", "tokenizations")
                 and k not in INFORMATIVE_SETTINGS + DECIDED_APART}
        tokenizations = {t: spec for t, spec in (data.get("tokenizations") or {}).items()
                         if t in used}
        flat.append(flatten_settings({**plain, "signals": kept,
                                      **({"tokenizations": tokenizations} if tokenizations
                                         else {})}))
    conflicts = settings_conflicts(urls, flat)
    if conflicts and readers[0].settings.kind == CLASSIFIER:
        raise SettingsMismatchError(
            f"cannot merge: the classifier stores were written with different settings: "
            f"{'; '.join(conflicts)}. A merged store has one set of settings: merge classifier "
            f"stores with the same heads and class counts, feature parts and widths, "
            f"encodings and segment layout (`logitstore info --json` shows them), e.g. dumps "
            f"of the same teacher written with the same teacher-dump options")
    if conflicts:
        raise SettingsMismatchError(
            f"cannot merge: the sources were written with different settings: "
            f"{'; '.join(conflicts)}. A merged store has one set of settings: merge stores "
            f"written with the same tokenizer, store and signal settings (`logitstore info "
            f"--json` shows them), or drop a differing signal with --common-signals when "
            f"another source lacks it")


def settings_conflicts(urls: list[str], flat: list[dict[str, Any]]) -> list[str]:
    """'KEY is VALUE in URL, VALUE in URL' for each flattened settings key whose value
    differs between sources (`flat`: one flattened settings dict per source); a key a
    source lacks reads `absent`."""
    conflicts = []
    for key in sorted(set().union(*flat)):
        values: dict[str, list[str]] = {}
        for url, entries in zip(urls, flat):
            value = repr(entries[key]) if key in entries else "absent"
            values.setdefault(value, []).append(url)
        if len(values) > 1:
            conflicts.append(f"{key} is " + ", ".join(f"{value} in {' and '.join(where)}"
                                                      for value, where in values.items()))
    return conflicts


def select_unique(urls: list[str], readers: list[StoreReader]
                  ) -> tuple[list[SourceSelection], list[dict[str, int]], int]:
    """Each source's rows that are not a duplicate of an earlier source's sample; refuses
    ids shared with different content. Returns (selections, per-source counts, duplicates)."""
    seen: dict[str, tuple[str, int]] = {}  # sample id -> (digest, source number)
    collisions: list[str] = []
    selections, per_source, duplicates = [], [], 0
    for number, (url, reader) in enumerate(zip(urls, readers)):
        digests = reader.index.column("digest").to_pylist()
        keep = np.ones(len(reader), dtype=bool)
        for row, (sid, digest) in enumerate(zip(reader.sample_ids, digests)):
            earlier = seen.get(sid)
            if earlier is None:
                seen[sid] = (digest, number)
            elif earlier[0] == digest:
                keep[row] = False
            else:
                collisions.append(f"{sid!r} ({urls[earlier[1]]} and {url})")
        rows = np.flatnonzero(keep).astype(np.int64)
        dropped = len(reader) - len(rows)
        duplicates += dropped
        selections.append(SourceSelection(url, reader, rows))
        per_source.append({"selected": int(len(rows)), "duplicates": int(dropped)})
    if collisions:
        other = "labels" if readers[0].settings.kind == CLASSIFIER else "tokens"
        raise SchemaMismatchError(
            f"cannot merge: {len(collisions)} sample id(s) name different samples (other "
            f"{other}) in different sources: {', '.join(collisions[:5])}"
            f"{' ...' if len(collisions) > 5 else ''}. Ids must name one sample; merge "
            f"refuses rather than renaming them. Leave one of each out first (`logitstore "
            f"subset SRC OUT --ids KEEP`), or dump the sources with distinct ids")
    return selections, per_source, duplicates
