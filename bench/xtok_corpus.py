"""Corpus and tokenizers of the cross-tokenizer benchmark (bench/cross_tokenizer_bench.py).

The text is the bundled medical corpus: `demo/make_corpus.py` run on demo/knowledge_base.yaml
(3,600 train records, 1.2 MB; 400 held-out records, 141 kB, built from (entity, template)
combinations no train record uses). Splits:
  teacher.jsonl   every train record: what both teachers are trained on
  transfer.jsonl  `transfer_records` train records (seeded choice): what both teachers dump
                  and every student trains on (a held-in part of the teachers' text)
  heldout.jsonl   the held-out records: bits per byte of every model
Three tokenizers, each trained with the `tokenizers` library on DIFFERENT text (the train
records are dealt into thirds by position; no two tokenizers see the same record):
  A  byte-level BPE (Llama 3 style specials), vocab_a, on the first third
  B  SentencePiece style BPE: Metaspace "▁" pre-tokenizer with a dummy prefix and the 256
     <0x..> byte-fallback tokens (Gemma style specials), vocab_b, on the second third
  C  byte-level BPE (its own specials), vocab_c, on general text (the Python language
     reference: pydoc topics, and the toolkit's two mini medical task files) plus, with
     c_text "mixed" (the default), the last third: a general tokenizer that has seen some of
     the domain, as Llama 3's, Gemma's and Qwen's have: it spells the held-out text in
     about as many tokens as A does, as real general tokenizers do medical text.
     c_text "other" (general text only) builds C as the first runs did, a stress case: it
     spells the domain in far more tokens than A (figures in BENCHMARKS.md).
Every tokenizer adds its BOS when encoding (the bits-per-byte evaluator predicts a text's
first token from it). The directory is named by the SHA-256 of the settings and of the
knowledge base and generator sources, so it is rebuilt only when they change.
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "demo"
TASKS = ROOT / "logitstore" / "toolkit" / "tasks"
DEFAULT_CORPUS = {"scale": 1.0, "seed": 0, "transfer_records": 900, "vocab_a": 4096,
                  "vocab_b": 6144, "vocab_c": 5120, "c_text": "mixed", "heldout_records": 0}
C_TEXTS = ("mixed", "other")
SPECIALS = {
    "A": {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
          "pad_token": "<|pad|>"},
    "B": {"pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>",
          "unk_token": "<unk>"},
    "C": {"pad_token": "<|endoftext|>", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"},
}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()
            if line.strip()]


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                    encoding="utf-8")


def other_text() -> list[str]:
    """Tokenizer C's text: pydoc's language topics and the mini medical task files."""
    from pydoc_data.topics import topics

    texts = [v for _, v in sorted(topics.items())]
    for path in sorted(TASKS.glob("*.jsonl")):
        for record in read_jsonl(path):
            texts.append(" ".join(str(record[k]) for k in ("prompt", "reference", "question")
                                  if k in record)
                         + "".join(f" {c}" for c in record.get("choices", [])))
    return texts


def _save(backend, specials: dict, out: Path) -> None:
    """BOS added on encoding; saved for transformers under `out`."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    bos = specials["bos_token"]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
        special_tokens=[(bos, backend.token_to_id(bos))])
    PreTrainedTokenizerFast(tokenizer_object=backend, **specials).save_pretrained(out)


def train_byte_level(texts: list[str], vocab_size: int, specials: dict, out: Path) -> Path:
    """GPT-2 / Llama 3 style byte-level BPE (no prefix space)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    _save(backend, specials, out)
    return out


def train_metaspace_fallback(texts: list[str], vocab_size: int, specials: dict,
                             out: Path) -> Path:
    """SentencePiece / Gemma style: "▁" for a space with a dummy prefix, BPE over characters,
    the 256 <0x..> byte-fallback tokens appended for bytes no piece spells (so any text
    tokenizes exactly); `vocab_size` counts them."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE(unk_token=specials["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 256,
                                  special_tokens=list(specials.values()), show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    state = json.loads(backend.to_str())
    vocab = state["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    state["model"]["byte_fallback"] = True
    state["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
        {"type": "ByteFallback"}, {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    _save(Tokenizer.from_str(json.dumps(state)), specials, out)
    return out


def corpus_key(settings: dict) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for path in sorted([DEMO / "knowledge_base.yaml", *DEMO.glob("corpus_*.py"),
                        DEMO / "make_corpus.py", *TASKS.glob("*.jsonl"), Path(__file__)]):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def build_corpus(cache: Path, settings: dict | None = None) -> dict:
    """The corpus directory of `settings` (DEFAULT_CORPUS's keys), built when missing:
    {dir, key, teacher, transfer, heldout (paths), tokenizers {A, B, C: dir}, sizes}."""
    s = {**DEFAULT_CORPUS, **(settings or {})}
    if s["c_text"] not in C_TEXTS:
        raise ValueError(f"c_text is one of {', '.join(C_TEXTS)}, found {s['c_text']!r}")
    key = corpus_key(s)
    out = Path(cache) / f"corpus-{key[:12]}"
    paths = {"dir": out, "key": key, "teacher": out / "teacher.jsonl",
             "transfer": out / "transfer.jsonl", "heldout": out / "heldout.jsonl",
             "tokenizers": {n: out / f"tokenizer-{n}" for n in "ABC"}}
    sizes_file = out / "sizes.json"
    if sizes_file.is_file():
        return {**paths, "built": False, "sizes": json.loads(sizes_file.read_text())}
    raw = out / "raw"
    subprocess.run([sys.executable, str(DEMO / "make_corpus.py"), "--out", str(raw),
                    "--seed", str(s["seed"]), "--scale", str(s["scale"])], check=True,
                   capture_output=True)
    train = [{"id": r["id"], "text": r["text"]} for r in read_jsonl(raw / "train.jsonl")]
    heldout = [{"id": r["id"], "text": r["text"]} for r in read_jsonl(raw / "heldout.jsonl")]
    heldout = heldout[:s["heldout_records"]] if s["heldout_records"] else heldout
    order = list(range(len(train)))
    random.Random(s["seed"]).shuffle(order)
    transfer = [train[i] for i in sorted(order[:s["transfer_records"]])]
    write_jsonl(paths["teacher"], train)
    write_jsonl(paths["transfer"], transfer)
    write_jsonl(paths["heldout"], heldout)
    texts = [r["text"] for r in train]
    tok = paths["tokenizers"]
    train_byte_level(texts[0::3], s["vocab_a"], SPECIALS["A"], tok["A"])
    train_metaspace_fallback(texts[1::3], s["vocab_b"], SPECIALS["B"], tok["B"])
    domain_c = texts[2::3] if s["c_text"] == "mixed" else []
    train_byte_level(other_text() + domain_c, s["vocab_c"], SPECIALS["C"], tok["C"])
    general = "pydoc language topics + logitstore/toolkit/tasks/*.jsonl"
    sizes = {"settings": s, "tokenizer_text": {
        "A": "train records 0, 3, 6, ...", "B": "train records 1, 4, 7, ...",
        "C": general + (" + train records 2, 5, 8, ..." if domain_c else "")}}
    for part, records in (("teacher", train), ("transfer", transfer), ("heldout", heldout)):
        sizes[part] = {"records": len(records),
                       "bytes": sum(len(r["text"].encode("utf-8")) for r in records)}
    sizes_file.write_text(json.dumps(sizes, indent=1) + "\n", encoding="utf-8")
    return {**paths, "built": True, "sizes": sizes}
