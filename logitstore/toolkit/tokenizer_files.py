"""The tokenizer files a store keeps (settings `tokenizer_files`, FORMAT.md section 2): what
`save_pretrained` writes, data files only (JSON, Jinja chat templates, vocabulary text files,
SentencePiece models; never pickles). Shared by teacher-dump and `logitstore add-text`."""

from __future__ import annotations

import tempfile
from pathlib import Path

from logitstore.errors import LogitStoreError

# Suffixes of the tokenizer files a store keeps: data formats only (no pickles, no code).
TOKENIZER_FILE_SUFFIXES = (".json", ".jinja", ".txt", ".model", ".tiktoken")


def saved_tokenizer_files(tokenizer, remedy: str = "dump without text (teacher-dump --no-text)"
                          ) -> dict[str, bytes]:
    """{file name: bytes} of the data files `tokenizer.save_pretrained` writes; the same
    bytes every call (LogitStoreError otherwise, ending with `remedy`: the store settings
    list their sha256)."""
    first, second = _save(tokenizer), _save(tokenizer)
    if first != second:
        changed = sorted(name for name in first.keys() | second.keys()
                         if first.get(name) != second.get(name))
        raise LogitStoreError(
            f"the tokenizer writes different bytes each time it is saved ({', '.join(changed)}), "
            f"so a resumed or multi-process run could not match the files the store lists; "
            f"{remedy}")
    if "tokenizer.json" not in first:
        raise LogitStoreError(
            f"the tokenizer ({type(tokenizer).__name__}) saves no tokenizer.json (found "
            f"{sorted(first) or 'no data files'}), so the store could not be read without it; "
            f"load a fast tokenizer, or {remedy}")
    return first


def _save(tokenizer) -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {path.name: path.read_bytes() for path in sorted(Path(tmp).iterdir())
                if path.is_file() and path.suffix in TOKENIZER_FILE_SUFFIXES
                and not path.name.startswith(".")}
