"""How closely each cross-tokenizer bench teacher fits the text it is dumped on.

    python bench/xtok_teacher_fit.py --json bench/results/xtok_teacher_fit.json

The students learn from the teachers' top-k over the transfer set, which is part of the
records the teachers trained on. A teacher that memorised those records more than the other
gives a sharper, label-like target there than on new text, which teaches a student less. This
prints each teacher's bits per byte (bench/xtok_eval.py) on the transfer set and on the
held-out records: the difference is how much better it does on text it trained on. Teachers
come from the bench's cache (built by bench/cross_tokenizer_bench.py with the same options).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(Path(__file__).resolve().parent), str(ROOT)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path, default=ROOT / "bench" / "out" / "cache" / "xtok",
                   help="the bench's cache (corpus, tokenizers, teachers)")
    p.add_argument("--teacher-steps", type=int, default=400, help="as the bench's")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch
    from transformers import AutoTokenizer

    from cross_tokenizer_bench import load_model
    from fidelity import run_tool
    from xtok_corpus import build_corpus, read_jsonl
    from xtok_eval import bits_per_byte
    from xtok_teachers import CONTEXT, build_teacher

    if args.threads:
        torch.set_num_threads(args.threads)
    corpus = build_corpus(args.cache, {})
    texts = {part: [r["text"] for r in read_jsonl(corpus[part])] for part in ("transfer", "heldout")}
    report = {"corpus": corpus["key"], "records": {k: len(v) for k, v in texts.items()}}
    for name in ("A", "B"):
        teacher = build_teacher(args.cache, corpus, name, "small", args.teacher_steps, run_tool)
        if teacher["built"]:
            print(f"teacher {name} was not cached: trained it now", flush=True)
        model = load_model(teacher["path"])
        tokenizer = AutoTokenizer.from_pretrained(corpus["tokenizers"][name])
        fit = {part: bits_per_byte(model, tokenizer, t, CONTEXT)["bits_per_byte"]
               for part, t in texts.items()}
        fit["heldout_minus_transfer"] = fit["heldout"] - fit["transfer"]
        report[f"teacher-{name}"] = fit
        print(f"teacher {name}: bits/byte transfer {fit['transfer']:.4f}, held-out "
              f"{fit['heldout']:.4f} (held-out - transfer {fit['heldout_minus_transfer']:+.4f})",
              flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
