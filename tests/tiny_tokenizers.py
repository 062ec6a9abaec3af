"""Two kinds of tiny `tokenizers` tokenizers for cross-tokenizer tests, trained in milliseconds.

* `byte_level_bpe`: GPT-2 / Llama 3 / Qwen style (byte-to-unicode alphabet, no prefix space).
* `metaspace_bpe`: SentencePiece / Gemma style ("▁" for a space, no dummy prefix) with the 256
  byte-fallback tokens `<0x00>`..`<0xFF>` appended, so any text is spelled exactly.

`oracle_bytes` reads a token's bytes with a decoding written here from the conventions (not
with the code under test), and `exact_tokenization` turns an encoding into byte spans by
concatenating those bytes, checking they spell the text: spans exact by construction.
"""

from __future__ import annotations

import json
import re

import numpy as np

CORPUS_A = [
    "The patient reports chest pain radiating to the left arm.",
    "Blood pressure was 150/90 mmHg; the café nurse noted naïve questions.",
    "日本語のテキストと English text mixed: 東京, 大阪. Price: 12 € or 10 £.",
    "An ECG showed sinus rhythm 😀 and the résumé was filed.",
] * 8
CORPUS_B = [
    "A nurse notes swelling of both ankles after the long flight.",
    "The physician prescribed antibiotics; fièvre et toux sèche.",
    "日本 and 中国 share characters; naïve café résumé.",
    "Follow-up in two weeks; the patient was advised to rest.",
] * 8


def _gpt2_byte_table() -> dict[str, int]:
    """Alphabet character -> byte, from GPT-2's published construction."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + shifted)
            shifted += 1
    return {c: b for b, c in chars.items()}


_BYTE_OF_CHAR = _gpt2_byte_table()
_FALLBACK = re.compile(r"<0x([0-9A-F]{2})>")


def byte_level_bpe(corpus, vocab_size: int, specials=("<pad>", "<s>", "</s>")):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return tokenizer


def metaspace_bpe(
    corpus, vocab_size: int, specials=("<unk>", "<bos>", "<eos>"), byte_fallback=True, unk=True
):
    """SentencePiece-style BPE. Without byte fallback, an unknown character becomes `<unk>`
    (the first special) when `unk`, else the model silently drops it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    model = models.BPE(byte_fallback=False, unk_token=specials[0] if unk and not byte_fallback else None)
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials), show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    if not byte_fallback:
        return tokenizer
    state = json.loads(tokenizer.to_str())
    vocab = state["model"]["vocab"]
    first_free = max(vocab.values()) + 1
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = first_free + b
    state["model"]["byte_fallback"] = True
    return Tokenizer.from_str(json.dumps(state))


def oracle_bytes(tokenizer, token_id: int) -> bytes:
    token = tokenizer.id_to_token(token_id)
    if type(tokenizer.pre_tokenizer).__name__ == "ByteLevel":
        return bytes(_BYTE_OF_CHAR[c] for c in token)
    match = _FALLBACK.fullmatch(token)
    return bytes([int(match.group(1), 16)]) if match else token.replace("▁", " ").encode()


def exact_tokenization(tokenizer, text: str, bos_id: int | None = None):
    """(ids int64 [T], spans int32 [T, 2], special bool [T]) of `text`, a zero-width special
    BOS first when `bos_id` is given; spans from the tokens' own bytes."""
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    pieces = [oracle_bytes(tokenizer, i) for i in ids]
    assert b"".join(pieces) == text.encode(), "the tokens must spell the text exactly"
    ends = np.cumsum([len(p) for p in pieces], dtype=np.int64)
    spans = np.stack([ends - [len(p) for p in pieces], ends], axis=1).reshape(-1, 2)
    special = np.zeros(len(ids), dtype=bool)
    if bos_id is not None:
        ids, spans, special = [bos_id, *ids], np.vstack([[[0, 0]], spans]), np.append(True, special)
    return np.array(ids, np.int64), spans.astype(np.int32), special


def random_text(rng) -> str:
    words = ["the", "patient", "café", "naïve", "日本", "語", "東京", "😀", "€", "12", "ECG", "rest", ",", "."]
    gaps = [" ", " ", " ", "  ", "\n", ""]
    count = int(rng.integers(1, 25))
    return "".join(str(rng.choice(words)) + str(rng.choice(gaps)) for _ in range(count))
