"""The store a dump writes into, as found before writing: what it already holds (for
resuming), and why this run may not write into it (the refusals `--overwrite` lifts).

    store = inspect_store(url)
    conflicts = early_conflicts(store, cfg, fingerprint, vocab)   # then data_conflicts,
    if conflicts and not cfg.overwrite:                           # settings_conflicts
        raise SettingsMismatchError(refusal(url, conflicts))
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from logitstore.commit import load_json, read_part_manifests
from logitstore.format import (CAUSAL_LM, MANIFEST, PARTS_DIR, SEGMENT_INDEX, TOKENIZER_DIR,
                               StoreSettings, canonical_layers, settings_differences)
from logitstore.fs import StoreFS
from logitstore.parquet_io import table_from_bytes
from logitstore.segment import sample_digest
from logitstore.toolkit.options import config_differences
from teacher_dump.config import FIELDS, DumpConfig

# Keys of the store manifest's `extra` written by teacher-dump.
EXTRA_CONFIG = "teacher_dump_config"  # the resolved config of the latest run (as_dict)
EXTRA_SIGNAL_CONFIGS = "teacher_dump_signal_configs"  # {signal: config that dumped it}
EXTRA_SUMMARY = "teacher_dump_summary"  # DumpReport.as_dict of the latest run
EXTRA_RUNS = "teacher_dump_runs"  # one short record per run (a resumed dump has several)
LAYER_KEYS = ("hidden_layers", "attention_layers")  # teacher layer indices, either form


@dataclass
class ExistingStore:
    settings: StoreSettings | None  # None: an empty store
    committed: bool  # a store manifest exists
    fingerprint: str | None  # dataset fingerprint of the last commit
    config: dict[str, Any] | None  # extra[EXTRA_CONFIG]
    signal_configs: dict[str, dict[str, Any]]
    runs: list[dict[str, Any]]
    committed_ids: set[str]
    parts: dict[str, bool]  # part name -> complete

    @property
    def empty(self) -> bool:
        return self.settings is None

    @property
    def holds_text(self) -> bool:
        """A store keeping its samples' text: a teacher of another tokenizer may be added."""
        return self.settings is not None and self.settings.text

    def saved_config(self, signal: str) -> dict[str, Any] | None:
        """The resolved config that dumped `signal`, when the store kept it."""
        if signal in self.signal_configs:
            return self.signal_configs[signal]
        if self.config is not None and self.config.get("signal") == signal:
            return self.config
        return None


def inspect_store(url: str) -> ExistingStore:
    """What a (possibly half-written) store at `url` already holds; read-only.

    Committed ids come from every part's manifest, not only the store manifest: after a
    killed multi-process dump the parts hold more than the last store commit lists.
    """
    fs = StoreFS(url)
    manifest = load_json(fs, MANIFEST) if fs.exists(MANIFEST) else None
    parts = read_part_manifests(fs)
    settings = None
    if manifest is not None:
        settings = StoreSettings.from_json(manifest["settings"])
    elif parts:
        settings = StoreSettings.from_json(parts[0]["settings"])
    extra = (manifest or {}).get("extra") or {}
    ids: set[str] = set()
    for part in parts:
        for seg in part["segments"]:
            rel = f"{PARTS_DIR}/{part['part']}/{seg['name']}/{SEGMENT_INDEX}"
            table = table_from_bytes(fs.read_bytes(rel), columns=["sample_id"])
            ids.update(table.column("sample_id").to_pylist())
    return ExistingStore(settings, manifest is not None,
                         (manifest or {}).get("dataset_fingerprint"), extra.get(EXTRA_CONFIG),
                         dict(extra.get(EXTRA_SIGNAL_CONFIGS) or {}),
                         list(extra.get(EXTRA_RUNS) or []), ids,
                         {p["part"]: bool(p.get("complete")) for p in parts})


def erase_store(url: str) -> None:
    """Delete a store's committed state, parts and tokenizer files (what
    StoreWriter(overwrite=True) deletes)."""
    fs = StoreFS(url)
    for rel in (MANIFEST, "index", PARTS_DIR, TOKENIZER_DIR):
        fs.delete(rel, recursive=True)


def adds_signal(store: ExistingStore, cfg: DumpConfig) -> bool:
    """True when this run adds `cfg.signal` to a store dumped by another teacher."""
    return not store.empty and cfg.signal not in store.settings.signals


def is_foreign(store: ExistingStore, fingerprint: str, vocab: int) -> bool:
    """Whether this run's tokenizer is not the one that cut the store's own tokens: its
    signal goes on a tokenization of its own (teacher_dump.foreign_tokens)."""
    s = store.settings
    return not store.empty and (s.tokenizer_fingerprint != fingerprint or s.vocab_size != vocab)


def foreign_conflicts(store: ExistingStore, cfg: DumpConfig, fingerprint: str,
                      vocab: int) -> list[str]:
    """Why a teacher with another tokenizer than the store's may not add its signal."""
    from teacher_dump.foreign_tokens import no_text_refusal

    s = store.settings
    if not s.text:
        return [no_text_refusal(cfg.out, cfg.model)]
    signal = s.signals.get(cfg.signal)
    tokenization = s.tokenizations.get(signal.tokenization) if signal and \
        signal.tokenization else None
    if signal is not None and (tokenization is None or (
            tokenization.tokenizer_fingerprint, tokenization.vocab_size) != (fingerprint, vocab)):
        return [f"signal {cfg.signal!r} of the store was dumped with another tokenizer than "
                f"{cfg.model}'s (vocab {vocab}, fingerprint {fingerprint}); give this teacher "
                f"another --signal name"]
    return []


def early_conflicts(store: ExistingStore, cfg: DumpConfig, fingerprint: str,
                    vocab: int) -> list[str]:
    """Why `cfg` may not write into `store`, from what is known before reading the data."""
    if store.empty:
        return []
    out = []
    s = store.settings
    if s.kind != CAUSAL_LM:  # e.g. written by teacher-dump --task classify
        return [f"it is a store of kind {s.kind} (heads {sorted(s.heads)}), and --task "
                f"causal-lm writes a causal-lm store"]
    if is_foreign(store, fingerprint, vocab):
        out += foreign_conflicts(store, cfg, fingerprint, vocab)
    if adds_signal(store, cfg):
        if not store.committed or not all(store.parts.values()):
            out.append(f"the dump of signal(s) {sorted(s.signals)} into the store has not "
                       f"finished: rerun its command to complete it before adding "
                       f"{cfg.signal!r}")
    elif store.saved_config(cfg.signal) is not None:
        signal = s.signals.get(cfg.signal)
        depth = signal.depth if signal is not None else None
        saved = layers_as_blocks(store.saved_config(cfg.signal), depth)
        out += [f"config {d}" for d in config_differences(
            saved, layers_as_blocks(cfg.as_dict(), depth), FIELDS, saved_as="store")]
    return out


def layers_as_blocks(config: dict[str, Any], depth: int | None) -> dict[str, Any]:
    """`config` with its teacher layer lists as block numbers of a `depth`-layer teacher
    (-1 -> depth-1), so that a resume given `3` or `-1` compares equal; unchanged when the
    depth is unknown (a store written before it was recorded)."""
    return {**config, **{key: list(canonical_layers(config[key] or [], depth))
                         for key in LAYER_KEYS if key in config}}


def data_conflicts(store: ExistingStore, cfg: DumpConfig, samples: Iterable) -> list[str]:
    """Adding a signal: the data must give exactly the samples and tokens of the store.

    Reads `samples` (a stream) to its end in constant memory: both sides are reduced to
    `content_hash` of their (sample id, digest) pairs, which is equal exactly when the
    dataset fingerprints are (same pairs), without sorting the whole dataset."""
    if not adds_signal(store, cfg):
        return []
    from logitstore.reader import StoreReader

    index = StoreReader(cfg.out).index.select(["sample_id", "digest"])
    stored = content_hash(pair for batch in index.to_batches(1 << 16)
                          for pair in zip(*(c.to_pylist() for c in batch.columns)))
    found = content_hash((s.sample_id, sample_digest(s.sample_id, s.input_ids))
                         for s in samples)
    if found == stored:
        return []
    return [f"the data gives other samples or tokens than the store holds ({found[0]} samples, "
            f"content hash {found[1]:064x}; the store: {stored[0]} samples, content hash "
            f"{stored[1]:064x}, dataset fingerprint {store.fingerprint}): adding signal "
            f"{cfg.signal!r} needs the data and data options (--max-length, --format, "
            f"--limit...) the store was dumped with"]


def content_hash(pairs: Iterable[tuple[str, str]]) -> tuple[int, int]:
    """(number of pairs, sum mod 2**256 of sha256("{id}\\0{digest}\\n") over the pairs): an
    order-independent summary of (sample id, digest) pairs, computed in one pass in constant
    memory. Two sets of pairs with distinct ids get the same result exactly when they are
    equal (up to a sha256 collision), as with `commit.dataset_fingerprint`, which sorts."""
    count, total = 0, 0
    for sample_id, digest in pairs:
        line = f"{sample_id}\0{digest}\n".encode("utf-8")
        total = (total + int.from_bytes(hashlib.sha256(line).digest(), "big")) % (1 << 256)
        count += 1
    return count, total


def settings_conflicts(store: ExistingStore, settings: StoreSettings, signal: str) -> list[str]:
    """Dump mode into a store holding `signal`: its stored settings must equal this run's."""
    if store.empty or signal not in store.settings.signals:
        return []
    stored = replace(store.settings, signals={signal: store.settings.signals[signal]},
                     tokenizer_name=settings.tokenizer_name)  # the name is informative only
    return [f"settings {d}" for d in settings_differences(stored, settings)]


def refusal(url: str, conflicts: list[str]) -> str:
    return (f"refusing to write into {url}: " + "; ".join(conflicts) + ". Write to a new --out, "
            "or pass --overwrite to replace the existing store")
