"""What a dump keeps for cross-tokenizer distillation: each sample's UTF-8 text and its
tokens' byte spans (store settings `text`), and the tokenizer's files (`tokenizer_files`,
ROOT/tokenizer/<name>), FORMAT.md sections 2 and 4.1.

A new store keeps them unless the run says `--no-text` (config `text: false`). An existing
store, resumed or given another teacher's signal, keeps its own choice and its own
tokenizer files, as it keeps its layout: a store written without text (before format 2.1,
or with --no-text) is resumed without text, not refused. A store that `--overwrite`
replaces starts with this run's choice.

The tokenizer's files are what `save_pretrained` writes, data files only (JSON, Jinja chat
templates, vocabulary text files, SentencePiece models; never pickles). Every process of a
dump and every resume of a half-written new store builds them again and the store settings
list their sha256, so they must be the same bytes each time: checked by saving twice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from logitstore.format import TOKENIZER_DIR, StoreSettings
from logitstore.toolkit.tokenizer_files import saved_tokenizer_files
from logitstore.writer import tokenizer_file_entries

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class StoreText:
    """A store's text setting and its tokenizer files: `entries` as the settings list them
    ({"tokenizer/<name>": {"size", "sha256"}}), `files` their bytes by the same keys (empty
    for an existing store: its files are already there)."""

    text: bool
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)

    @classmethod
    def of_store(cls, settings: StoreSettings) -> "StoreText":
        return cls(settings.text, dict(settings.tokenizer_files))


def reads_text(cfg, store) -> bool:
    """Whether the dump reads its samples' text and spans: those of a new store (`cfg.text`),
    of an existing one keeping them, or that `--overwrite` may replace with text (a
    conflict found later replaces the store; its samples must then have their text)."""
    if store.empty:
        return cfg.text
    return store.settings.text or (cfg.overwrite and cfg.text)


def new_store_text(wanted: bool, tokenizer) -> StoreText:
    """A new store's: with `wanted`, text and the tokenizer's files; else neither."""
    if not wanted:
        return StoreText(False)
    by_name = saved_tokenizer_files(tokenizer)
    files = {f"{TOKENIZER_DIR}/{name}": data for name, data in by_name.items()}
    return StoreText(True, tokenizer_file_entries(by_name), files)


def kept_store_text(wanted: bool, settings: StoreSettings) -> StoreText:
    """An existing store's own choice (module docstring), said in the log when this run
    asked for the other one."""
    if wanted != settings.text:
        log.info("the store %s its samples' text and token spans: kept (an existing store "
                 "keeps its own choice, like its layout; --overwrite replaces it)",
                 "holds" if settings.text else "was written without")
    return StoreText.of_store(settings)
