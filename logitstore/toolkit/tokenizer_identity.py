"""What identifies a tokenizer, and whether a model's vocabulary fits it.

`tokenizer_fingerprint` hashes a tokenizer's vocabulary, merges and added/special tokens: a
store records it (StoreSettings.tokenizer_fingerprint) and every tool that reads the store
checks the tokenizer it loads against it. `check_vocab_compat` checks a model's embedding rows
against a tokenizer. Works on any tokenizer object (fast or slow); imports nothing heavy.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from logitstore.errors import SchemaMismatchError


class VocabMismatchError(SchemaMismatchError):
    """A model whose embedding matrix has fewer rows than its tokenizer has tokens."""


def _merge_text(merge) -> str:
    # tokenizers >= 0.20 saves merges as [a, b] pairs, older ones as "a b": same identity.
    return " ".join(merge) if isinstance(merge, (list, tuple)) else str(merge)


def _tokenizer_identity(tokenizer) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        model = state.get("model") or {}
        added = state.get("added_tokens") or []
        return {
            "model": model.get("type"),
            "vocab": model.get("vocab"),  # token -> id (a [token, score] list for Unigram)
            "merges": [_merge_text(m) for m in model.get("merges") or []],
            "added": sorted(
                (
                    {"content": t["content"], "id": t["id"], "special": bool(t.get("special"))}
                    for t in added
                ),
                key=lambda t: t["id"],
            ),
        }
    # Slow (Python) tokenizers: the vocabulary plus the added/special tokens.
    specials = set(tokenizer.all_special_tokens)
    added = {
        tok.content if hasattr(tok, "content") else str(tok): idx
        for idx, tok in getattr(tokenizer, "added_tokens_decoder", {}).items()
    }
    for token in specials:
        added.setdefault(token, tokenizer.convert_tokens_to_ids(token))
    return {
        "model": type(tokenizer).__name__,
        "vocab": tokenizer.get_vocab(),
        "merges": [],
        "added": sorted(
            ({"content": c, "id": i, "special": c in specials} for c, i in added.items()),
            key=lambda t: (t["id"], t["content"]),
        ),
    }


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 hex of the vocabulary, merges and added/special tokens (canonical JSON).

    Stable across processes and save/reload; changes when any token or id changes. It
    deliberately ignores the chat template and normalizer settings.
    """
    canonical = json.dumps(
        _tokenizer_identity(tokenizer), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def vocab_size_of(tokenizer) -> int:
    """Number of ids the tokenizer can emit (added tokens included)."""
    return len(tokenizer)


def check_vocab_compat(tokenizer, model) -> int:
    """Rows of padding beyond the tokenizer's vocabulary (>= 0), or VocabMismatchError.

    Padded embeddings (Qwen2: 151,936 rows for ~151,646 tokens) are fine: those rows are
    never produced by the tokenizer. Fewer rows than tokens would index out of range.
    """
    n_tokens = max(vocab_size_of(tokenizer), max(tokenizer.get_vocab().values()) + 1)
    embedding = model.get_input_embeddings()
    rows = {"input embedding": embedding.num_embeddings}
    head = model.get_output_embeddings()
    if head is not None:  # Linear4bit packs its weight: out_features is the true row count
        rows["output head"] = getattr(head, "out_features", None) or head.weight.shape[0]
    too_small = {k: v for k, v in rows.items() if v < n_tokens}
    if too_small:
        parts = ", ".join(f"{k} has {v} rows" for k, v in too_small.items())
        raise VocabMismatchError(
            f"the model's {parts} but the tokenizer has {n_tokens} tokens: ids >= the row "
            "count would be out of range. Use the tokenizer the model was trained with, or "
            "resize the embeddings (model.resize_token_embeddings(len(tokenizer)))."
        )
    return min(rows.values()) - n_tokens
