"""The demo's first stages, Python in this process: the corpus (demo/make_corpus.py), the
tokenizer and the documents/distill split, and the models' random initialisation."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

from demo_context import DEMO_DIR, SPECIAL_TOKENS, Context, DemoError, rel_path

def make_corpus(ctx: Context) -> None:
    """demo/make_corpus.py (the bundled knowledge base -> JSONL corpora), seeded."""
    demo, corpus = ctx.demo, ctx.paths["corpus"]
    sys.path.insert(0, str(DEMO_DIR))
    try:
        import make_corpus
    finally:
        sys.path.remove(str(DEMO_DIR))
    argv = ["--out", str(corpus), "--seed", str(demo["seed"]),
            "--scale", str(demo["corpus_scale"]), "--drill", str(demo.get("fact_drill", 0)),
            "--entities", str(demo.get("entities", 0))]
    ctx.runner.commands.append(ctx.runner.shell(f"python {DEMO_DIR / 'make_corpus.py'}", argv))
    print(f"    $ {ctx.runner.shown('python demo/make_corpus.py', argv)}", flush=True)
    log = ctx.out / "logs" / "make_corpus.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", encoding="utf-8") as fh, contextlib.redirect_stdout(fh), \
            contextlib.redirect_stderr(fh):
        if make_corpus.main(argv) != 0:
            raise DemoError(f"stage corpus: make_corpus.py failed; log: {log}")
    for line in log.read_text(encoding="utf-8").splitlines()[:2]:
        print(f"    {line}", flush=True)


@contextlib.contextmanager
def python_stage_log(ctx: Context, name: str):
    """stderr of the demo's own stages (library warnings, progress bars) -> OUT/logs/NAME.log;
    the tool stages redirect theirs per command (Runner.run)."""
    log = ctx.out / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", encoding="utf-8") as fh, contextlib.redirect_stderr(fh):
        yield


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                    encoding="utf-8")


def train_byte_level_bpe(texts: list[str], vocab_size: int, out: Path):
    """Byte-level BPE (GPT-2/Llama-3 style) trained on `texts`, BOS added on encoding, saved
    for transformers under `out`; returns the `tokenizers` backend (bench/fidelity_corpus.py
    trains its tokenizer with this function too)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size,
                                  special_tokens=list(SPECIAL_TOKENS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    bos = SPECIAL_TOKENS["bos_token"]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
        special_tokens=[(bos, backend.token_to_id(bos))])
    PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS).save_pretrained(out)
    return backend


def train_tokenizer(ctx: Context) -> None:
    """The demo's tokenizer, trained on the corpus's train.jsonl; then its documents."""
    from transformers import PreTrainedTokenizerFast

    texts = read_texts(ctx.paths["corpus"] / "train.jsonl")
    backend = train_byte_level_bpe(texts, ctx.demo["tokenizer"]["vocab_size"],
                                   ctx.paths["tokenizer"])
    tokenizer = PreTrainedTokenizerFast.from_pretrained(ctx.paths["tokenizer"])
    print(f"    vocab {len(tokenizer)} -> {rel_path(ctx.paths['tokenizer'], ctx.out)}", flush=True)
    corpus = ctx.paths["corpus"]
    drill = corpus / "drill.jsonl"
    if drill.is_file():  # make_corpus.py --drill: the facts in the scored form
        texts = read_texts(corpus / "transfer.jsonl") + texts + read_texts(drill)
    make_documents(ctx, backend, texts)


def read_texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]


def make_documents(ctx: Context, tokenizer, texts: list[str]) -> None:
    """documents.jsonl: the records (with make_corpus.py --drill: the transfer facts, the
    train records, the drill; else the train records) grouped, in order, into documents of
    at most `doc_tokens` tokens (BOS and EOS included; a longer record stays alone and is truncated
    by max_length); distill.jsonl: its first `distill_documents` documents.

    The teacher trains on every document; the store (and so the student) and the baseline
    get the distill split, text the teacher was trained on (a held-in split), a small part
    of it: the classic setting where the teacher has seen far more text than the transfer
    set (corpus/split_sizes.json has both sizes in tokens, and their ratio). Grouping keeps
    padding low: `--data` and the store batch whole samples padded to the longest of their
    micro-batch, and the corpus's records alone (~75 tokens, up to ~240) would waste about
    half of every batch."""
    budget = ctx.demo["doc_tokens"]

    def size(parts: list[str]) -> int:  # exact: BOS + the joined text + EOS
        return len(tokenizer.encode("\n\n".join(parts), add_special_tokens=False).ids) + 2

    docs: list[list[str]] = []
    current: list[str] = []
    for text in texts:
        if current and size(current + [text]) > budget:
            docs.append(current)
            current = []
        current.append(text)
    docs.append(current)
    records = [{"id": f"doc-{i:05d}", "text": "\n\n".join(d), "records": len(d)}
               for i, d in enumerate(docs)]
    tokens = [size(d) for d in docs]
    n_distill = ctx.demo["distill_documents"]
    if not 0 < n_distill < len(records):
        raise DemoError(f"distill_documents must be in 1..{len(records) - 1} (there are "
                        f"{len(records)} documents), got {n_distill}")
    write_jsonl(ctx.paths["documents"], records)
    write_jsonl(ctx.paths["distill"], records[:n_distill])
    held_in = sum(r["records"] for r in records[:n_distill])
    sizes = {"teacher_documents": len(records), "teacher_tokens": sum(tokens),
             "transfer_documents": n_distill, "transfer_tokens": sum(tokens[:n_distill]),
             "teacher_to_transfer": round(sum(tokens) / sum(tokens[:n_distill]), 2)}
    ctx.paths["split_sizes"].write_text(json.dumps(sizes, indent=1) + "\n", encoding="utf-8")
    print(f"    {len(texts)} train records -> {len(records)} documents of <= {budget} tokens: "
          f"{rel_path(ctx.paths['documents'], ctx.out)}", flush=True)
    print(f"    distill split: the first {n_distill} documents ({held_in} records): "
          f"{rel_path(ctx.paths['distill'], ctx.out)}", flush=True)
    print(f"    teacher's text {sizes['teacher_tokens']:,} tokens, transfer set "
          f"{sizes['transfer_tokens']:,} tokens ({sizes['teacher_to_transfer']:.1f}x less)",
          flush=True)


def init_models(ctx: Context) -> None:
    """The teacher and the student, Llama architecture, random weights from the demo seed."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(ctx.paths["tokenizer"])
    for offset, role in enumerate(("teacher", "student")):
        config = LlamaConfig(
            vocab_size=len(tokenizer), max_position_embeddings=ctx.demo["context"],
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
            **ctx.demo[role])
        torch.manual_seed(ctx.demo["seed"] + offset)
        model = LlamaForCausalLM(config)
        directory = ctx.paths[f"{role}_init"]
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        n = sum(p.numel() for p in model.parameters())
        print(f"    {role}: {n / 1e6:.2f}M parameters ({config.num_hidden_layers} layers, "
              f"hidden {config.hidden_size}) -> {rel_path(directory, ctx.out)}", flush=True)


