"""Store benchmark: bytes per entry/token of each encoding, write MB/s, read tokens/s.

    python bench/store_bench.py [--samples 64 --length 512 --vocab 32000 --k 64 --draws 50]

Teacher signals come from the synthetic Zipf-like teacher (tests/synthetic.py), or,
with `--model DIR --data JSONL`, from the real logits of a trained causal LM (e.g. the demo
teacher) over text records; the measured mean entropy is printed and stored. The sampled
signal is also written without its log-probs. Everything is measured side by side in one
run; ratios are what to compare across machines. JSON goes to bench/out/store_bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import zarr
from zarr.storage import LocalStore

from logitstore.snapshot import committed_state
from logitstore.format import SampledSpec, SignalSpec, StoreSettings, TopKSpec
from logitstore.info import size_report
from logitstore.reader import StoreReader
from logitstore.sample import SignalData
from logitstore.writer import StoreWriter

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the synthetic teacher
from synthetic import ZipfTeacher, mean_entropy, random_sample  # noqa: E402


def raw_baseline(tokens: int, k: int, entries: int) -> dict[str, float]:
    """int32 ids + float16 values (+ uint16 counts / per-position entry counts for sampled)."""
    return {"topk_bytes_per_entry": 4 + 2, "sampled_bytes_per_token": (entries * (4 + 2 + 2)
                                                                       + tokens * 2) / tokens}


def run_encoding(samples, vocab: int, k: int, draws: int, encoding: str, workdir: str,
                 random_reads: int, seed: int) -> dict:
    settings = StoreSettings(
        vocab_size=vocab, tokenizer_fingerprint="bench", segment_tokens=1 << 15,
        signals={"teacher": SignalSpec(topk=TopKSpec(k, encoding),
                                       sampled=SampledSpec(draws, 1.0, encoding))})
    root = os.path.join(workdir, encoding)
    start = time.perf_counter()
    with StoreWriter(root, settings) as writer:
        writer.add_many(samples)
    write_s = time.perf_counter() - start
    manifest = committed_state(writer.fs)
    sizes = size_report(manifest)
    tokens = manifest["counts"]["tokens"]

    reader = StoreReader(root)
    start = time.perf_counter()
    streamed = sum(len(s.input_ids) for s in reader.iter_samples())
    seq_s = time.perf_counter() - start
    assert streamed == tokens

    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(reader), size=random_reads)
    reader = StoreReader(root)  # cold caches
    start = time.perf_counter()
    rand_tokens = sum(len(reader.sample(int(i)).input_ids) for i in picks)
    rand_s = time.perf_counter() - start
    sig = sizes["signals"]["teacher"]
    return {
        "encoding": encoding,
        "topk_bytes_per_entry": sig["topk"]["bytes_per_entry"],
        "topk_bytes_per_token": sig["topk"]["bytes_per_token"],
        "sampled_bytes_per_token": sig["sampled"]["bytes_per_token"],
        "sampled_bytes_per_entry": sig["sampled"]["bytes_per_entry"],
        "sampled_entries_per_token": sig["sampled"]["entries_per_token"],
        "store_bytes_per_token": sizes["bytes_per_token"],
        "write_mb_per_s": sizes["total_bytes"] / 1e6 / write_s,
        "write_tokens_per_s": tokens / write_s,
        "seq_read_tokens_per_s": tokens / seq_s,
        "random_read_samples_per_s": random_reads / rand_s,
        "random_read_tokens_per_s": rand_tokens / rand_s,
        "arrays": {n: a["bytes_per_entry"] for n, a in sizes["arrays"].items()},
    }


def sampled_without_logprobs(samples, vocab: int, draws: int, workdir: str) -> dict:
    """The sampled signal stored without its log-probs (teacher-dump --no-sampled-logprobs):
    a store of that signal alone, written for real, so its bytes are measured, not derived."""
    settings = StoreSettings(
        vocab_size=vocab, tokenizer_fingerprint="bench", segment_tokens=1 << 15,
        signals={"teacher": SignalSpec(sampled=SampledSpec(draws, 1.0, logprobs=False))})
    bare = [replace(s, signals={"teacher": SignalData(sampled=s.signals["teacher"].sampled)})
            for s in samples]
    root = os.path.join(workdir, "no-logprobs")
    with StoreWriter(root, settings) as writer:
        writer.add_many(bare)
    sig = size_report(committed_state(writer.fs))["signals"]["teacher"]["sampled"]
    return {"sampled_bytes_per_token": sig["bytes_per_token"],
            "sampled_bytes_per_entry": sig["bytes_per_entry"]}


def partial_vs_whole_shard(workdir: str, tokens: int, k: int, piece: int) -> dict:
    """Why the writer buffers a whole segment: zarr rewrites a shard on every partial write."""
    data = np.random.default_rng(0).integers(0, 200, size=(tokens, k), dtype=np.uint16)
    timings = {}
    for mode in ("whole", "pieces"):
        arr = zarr.create_array(LocalStore(os.path.join(workdir, f"shard-{mode}")), shape=data.shape,
                                dtype=data.dtype, chunks=(4096, k), shards=(tokens, k))
        start = time.perf_counter()
        if mode == "whole":
            arr[:] = data
        else:
            for a in range(0, tokens, piece):
                arr[a:a + piece] = data[a:a + piece]
        timings[mode] = time.perf_counter() - start
    return {"tokens": tokens, "piece_tokens": piece, "whole_s": timings["whole"],
            "pieces_s": timings["pieces"], "slowdown": timings["pieces"] / timings["whole"]}


def model_samples(args, rng):
    """Samples whose signals are a trained LM's real top-k / sampled targets on real text."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from logitstore.sample import Sample, SignalData
    from synthetic import sampled_of, topk_of

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    texts = [json.loads(line)["text"] for line in Path(args.data).read_text().splitlines()
             if line.strip()]
    ids = np.concatenate([tok(t)["input_ids"] for t in texts])
    samples, entropies = [], []
    for i in range(min(args.samples, len(ids) // args.length)):
        window = ids[i * args.length:(i + 1) * args.length]
        with torch.inference_mode():
            logits = model(torch.tensor(window)[None]).logits[0].float().numpy()
        logits = logits[:, :len(tok)]  # drop padded embedding rows, if any
        entropies.append(mean_entropy(logits))
        data = SignalData(topk=topk_of(logits, args.k),
                          sampled=sampled_of(logits, args.draws, 1.0, rng))
        samples.append(Sample(f"bench:{i}", window, np.ones(len(window), bool),
                              signals={"teacher": data}))
    return samples, float(np.mean(entropies)), len(tok)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--draws", type=int, default=50)
    p.add_argument("--random-reads", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", help="a trained causal LM directory: use its real logits")
    p.add_argument("--data", help="JSONL with a `text` field, read with --model")
    p.add_argument("--out", default="bench/out/store_bench.json")
    args = p.parse_args()

    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    if args.model:
        samples, entropy, args.vocab = model_samples(args, rng)
        kind = f"trained LM {args.model} on {args.data}"
    else:
        teacher = ZipfTeacher(vocab_size=args.vocab)
        entropy = mean_entropy(teacher.logits(np.random.default_rng(args.seed + 1), 1024))
        samples = [random_sample(rng, f"bench:{i}", args.length, teacher, k=args.k,
                                 n_draws=args.draws) for i in range(args.samples)]
        kind = "synthetic Zipf (tests/synthetic.py)"
    print(f"teacher: {kind}, V={args.vocab}, mean entropy {entropy:.2f} nats/position")
    print(f"generated {len(samples)} samples in {time.perf_counter() - start:.1f}s")
    tokens = sum(len(x.input_ids) for x in samples)
    entries = sum(int(s.signals["teacher"].sampled.offsets[-1]) for s in samples)
    base = raw_baseline(tokens, args.k, entries)

    results = []
    with tempfile.TemporaryDirectory() as workdir:
        # Warm-up (imports, codec set-up) so the first encoding is not charged for it.
        run_encoding(samples[:2], args.vocab, args.k, args.draws, "q8", workdir + "/warm", 2,
                     args.seed)
        for encoding in ("q8", "f16", "f32"):
            r = run_encoding(samples, args.vocab, args.k, args.draws, encoding, workdir,
                             args.random_reads, args.seed)
            r["topk_vs_raw"] = base["topk_bytes_per_entry"] / r["topk_bytes_per_entry"]
            r["sampled_vs_raw"] = base["sampled_bytes_per_token"] / r["sampled_bytes_per_token"]
            results.append(r)
        no_lps = sampled_without_logprobs(samples, args.vocab, args.draws, workdir)
        shard = partial_vs_whole_shard(workdir, 1 << 16, args.k, args.length)

    print(f"\nraw baseline: top-k {base['topk_bytes_per_entry']:.2f} B/entry, sampled "
          f"{base['sampled_bytes_per_token']:.2f} B/token (int32 ids, fp16 values)")
    print(f"{'enc':4s} {'topk B/entry':>12s} {'vs raw':>7s} {'sampled B/tok':>13s} {'vs raw':>7s} "
          f"{'write MB/s':>10s} {'seq tok/s':>10s} {'rand tok/s':>10s}")
    for r in results:
        print(f"{r['encoding']:4s} {r['topk_bytes_per_entry']:12.3f} {r['topk_vs_raw']:6.2f}x "
              f"{r['sampled_bytes_per_token']:13.2f} {r['sampled_vs_raw']:6.2f}x "
              f"{r['write_mb_per_s']:10.1f} {r['seq_read_tokens_per_s']:10.0f} "
              f"{r['random_read_tokens_per_s']:10.0f}")
    print(f"sampled without log-probs (--no-sampled-logprobs): "
          f"{no_lps['sampled_bytes_per_token']:.2f} B/token, "
          f"{no_lps['sampled_bytes_per_entry']:.2f} B/entry")
    print(f"\nsampled entries/token: {results[0]['sampled_entries_per_token']:.2f}")
    print(f"zarr shard written in {shard['piece_tokens']}-token pieces: {shard['slowdown']:.1f}x "
          f"slower than one whole-shard write")
    out = {"command": "python bench/store_bench.py " + " ".join(
               f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
           "teacher": {"kind": kind, "vocab": args.vocab,
                       "mean_entropy_nats": entropy},
           "samples": args.samples, "length": args.length, "k": args.k, "draws": args.draws,
           "raw_baseline": base, "results": results, "sampled_without_logprobs": no_lps,
           "partial_shard_writes": shard}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
