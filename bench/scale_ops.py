"""Throughput of `logitstore merge` and `logitstore subset` next to `logitstore cp`, in tokens/s.

    python bench/scale_ops.py [--tokens 300000] [--workdir DIR] [--out bench/out/scale_ops.json]

    from scale_ops import measure_ops            # bench/ on sys.path (bench/scale_bench.py)
    figures = measure_ops(workdir, tokens=300_000, dst_root="s3://bucket/bench",
                          dst_options={...})      # outputs on S3, sources local

Two synthetic stores of `tokens / 2` tokens each are written locally (Zipf-like teacher,
tests/synthetic.py: top-k 8 and 50 sampled draws per position, vocabulary 32,000, 512-token
samples, 32,768-token segments); the second repeats the last quarter of the first's
samples (same ids and tokens), so the merge has duplicates to drop. Then, each writing to
`dst_root` (default: the work directory):

- `cp`: `copy_store` of each source plus `verify_store` of the copy, as `logitstore cp`
  does: bytes copied, nothing decoded;
- `merge`: `merge_stores` of both (every kept sample decoded and re-encoded; includes the
  final verify);
- `subset`: `subset_store` of the first at `--fraction 0.5` (the same, for about half).

tokens/s is the tokens of the sources read (cp, merge: both sources; subset: its source)
and the tokens written, per wall-clock second. The JSON also holds the ratios to cp's
throughput. To keep generation quick the signals of a pool of 16 distinct samples are
reused under new ids; each chunk of an array still holds distinct samples.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the synthetic teacher

from synthetic import ZipfTeacher, random_sample  # noqa: E402

from logitstore.format import SampledSpec, SignalSpec, StoreSettings, TopKSpec  # noqa: E402
from logitstore.merge import merge_stores  # noqa: E402
from logitstore.reader import StoreReader  # noqa: E402
from logitstore.subset import subset_store  # noqa: E402
from logitstore.transfer import copy_store  # noqa: E402
from logitstore.verify import verify_store  # noqa: E402
from logitstore.writer import StoreWriter  # noqa: E402

SAMPLE_TOKENS = 512
POOL = 16
SETTINGS = StoreSettings(
    vocab_size=32000, tokenizer_fingerprint="bench-scale-ops", tokenizer_name="synthetic",
    segment_tokens=32768, chunk_tokens=4096,
    signals={"teacher": SignalSpec(topk=TopKSpec(8), sampled=SampledSpec(50),
                                   teacher={"model_id": "synthetic-zipf"})})


def sample_pool(seed: int):
    rng = np.random.default_rng(seed)
    teacher = ZipfTeacher(vocab_size=SETTINGS.vocab_size)
    return [random_sample(rng, f"pool-{i}", SAMPLE_TOKENS, teacher, k=8, n_draws=50,
                          tags={"lang": ["en", "fr"][i % 2]})
            for i in range(POOL)]


def write_sources(workdir: str, tokens: int, seed: int) -> tuple[str, str]:
    """The two source stores (module docstring); returns their paths."""
    pool = sample_pool(seed)
    per_store = max(4, tokens // 2 // SAMPLE_TOKENS)
    first = [replace(pool[i % POOL], sample_id=f"a-{i:06d}", split="train")
             for i in range(per_store)]
    shared = first[-(per_store // 4):]
    second = shared + [replace(pool[(i * 7) % POOL], sample_id=f"b-{i:06d}", split="train")
                       for i in range(per_store - len(shared))]
    paths = []
    for name, samples in (("a", first), ("b", second)):
        path = os.path.join(workdir, name)
        with StoreWriter(path, SETTINGS, overwrite=True) as writer:
            writer.add_many(samples)
        paths.append(path)
    return paths[0], paths[1]


def _rate(tokens_in: int, tokens_out: int, seconds: float) -> dict:
    return {"tokens_in": tokens_in, "tokens_out": tokens_out, "seconds": round(seconds, 3),
            "tokens_in_per_s": round(tokens_in / seconds), "tokens_out_per_s":
            round(tokens_out / seconds)}


def time_cp(sources: list[str], dst_root: str, dst_options: dict | None) -> dict:
    tokens, start = 0, time.perf_counter()
    for i, src in enumerate(sources):
        dst = f"{dst_root}/cp-{i}"
        copy_store(src, dst, dst_options=dst_options, overwrite=True)
        problems = verify_store(dst, storage_options=dst_options)
        assert not problems, problems
        tokens += StoreReader(src).num_tokens
    return _rate(tokens, tokens, time.perf_counter() - start)


def measure_ops(workdir: str, *, tokens: int = 300_000, seed: int = 0,
                dst_root: str | None = None, dst_options: dict | None = None) -> dict:
    """Write the sources under `workdir`, time cp, merge and subset into `dst_root`
    (default `workdir`; any fsspec URL) and return the figures (module docstring)."""
    dst_root = (dst_root or workdir).rstrip("/")
    a, b = write_sources(workdir, tokens, seed)
    tokens_a, tokens_b = StoreReader(a).num_tokens, StoreReader(b).num_tokens
    cp = time_cp([a, b], dst_root, dst_options)

    start = time.perf_counter()
    merged = merge_stores([a, b], f"{dst_root}/merged", dst_options=dst_options, overwrite=True)
    merge = _rate(tokens_a + tokens_b, merged.counts["tokens_out"], time.perf_counter() - start)
    merge["duplicates"] = merged.counts["duplicates"]
    assert not merged.problems and merged.resumed_after == 0, merged.problems

    start = time.perf_counter()
    part = subset_store(a, f"{dst_root}/subset", fraction=0.5, seed=seed,
                        dst_options=dst_options, overwrite=True)
    subset = _rate(tokens_a, part.counts["tokens_out"], time.perf_counter() - start)
    assert not part.problems and part.resumed_after == 0, part.problems

    return {
        "benchmark": "scale_ops", "machine": {"python": platform.python_version(),
                                              "cpus": os.cpu_count(),
                                              "platform": platform.platform()},
        "destination": "local" if "://" not in dst_root else dst_root.split("://")[0],
        "settings": {"vocab_size": SETTINGS.vocab_size, "topk": 8, "sampled_draws": 50,
                     "segment_tokens": SETTINGS.segment_tokens,
                     "sample_tokens": SAMPLE_TOKENS},
        "sources": {"a": {"samples": len(StoreReader(a)), "tokens": tokens_a},
                    "b": {"samples": len(StoreReader(b)), "tokens": tokens_b}},
        "cp": cp, "merge": merge, "subset": subset,
        "ratio_to_cp": {"merge": round(merge["tokens_in_per_s"] / cp["tokens_in_per_s"], 3),
                        "subset": round(subset["tokens_in_per_s"] / cp["tokens_in_per_s"], 3)},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=300_000,
                   help="Tokens of the two source stores together.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", help="Where the stores go (default: a temporary directory).")
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "scale_ops.json"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="scale-ops-") as tmp:
        figures = measure_ops(args.workdir or tmp, tokens=args.tokens, seed=args.seed)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(figures, indent=1) + "\n")
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
