"""Where a cross-tokenizer student's bits go: held-out bits per byte of student C split by
how its next token meets teacher A's tokens: ALIGNED (it starts where one of A's tokens
starts: the cross-tokenizer loss gives a teacher target there), split again by whether it
ends where that A token ends ("same"), after it ("coarser": C spells in one token what A
spells in several, so the mapped target holds A's first token's piece, not C's token) or
before it ("finer"); or INSIDE one of A's tokens (a conditioned target or none).

    python bench/xtok_split.py [--seed 0] [--variants ce-C,xkd-pkl]

Trains the chosen student-C variants of one seed exactly as bench/cross_tokenizer_bench.py
does (same cache, teachers, stores, batches, steps; bench/xtok_train.py), then, per held-out
record, tokenizes the text with A and C (`token_spans.tokenize_with_spans`), aligns their
positions (`token_alignment.align_positions`) and sums the student's NLL of each text token
into those parts; each part is divided by the held-out bytes, so the parts add up
to the student's bits per byte (one window per record: every record fits the context).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
PARTS = ("aligned, same end", "aligned, coarser", "aligned, finer", "inside")


def split_bits(model, tok_a, tok_c, texts: list[str]) -> dict:
    """{part: {"bits_per_byte", "tokens", "bits_per_token"}} of model (C), part one of
    PARTS (module docstring)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from logitstore.toolkit.token_alignment import align_positions
    from logitstore.toolkit.token_spans import tokenize_with_spans

    nll = dict.fromkeys(PARTS, 0.0)
    count = dict.fromkeys(PARTS, 0)
    n_bytes = 0
    model.eval()
    with torch.no_grad():
        for text in texts:
            a, c = tokenize_with_spans(tok_a, text), tokenize_with_spans(tok_c, text)
            alignment = align_positions(a.spans, a.special, c.spans, c.special)
            ids = torch.as_tensor(c.ids)[None]
            logp = F.log_softmax(model(input_ids=ids).logits.float()[0, :-1], -1)
            per_token = -logp.gather(-1, ids[0, 1:, None])[:, 0].double()  # [T-1]
            part = np.full(len(c.ids) - 1, PARTS.index("inside"))
            longer = alignment.student_next_bytes - alignment.teacher_next_bytes  # [A]
            part[alignment.student_pos] = np.select(
                [longer == 0, longer > 0], [PARTS.index("aligned, same end"),
                                            PARTS.index("aligned, coarser")],
                PARTS.index("aligned, finer"))
            text_next = ~c.special[1:]  # special next tokens hold no byte: not counted
            for i, key in enumerate(PARTS):
                mask = (part == i) & text_next
                nll[key] += float(per_token[torch.as_tensor(mask)].sum())
                count[key] += int(mask.sum())
            n_bytes += len(text.encode("utf-8"))
    return {k: {"bits_per_byte": nll[k] / math.log(2) / n_bytes, "tokens": count[k],
                "bits_per_token": nll[k] / math.log(2) / max(1, count[k])} for k in nll}


def train_variants(argv, seed: int, names: list[str]):
    """(SimpleNamespace(ready, args), [variant]): the named students of `seed`, trained
    exactly as bench/cross_tokenizer_bench.py trains them (argv: its other options; only
    the named students, and the bench's references ce-C and kd-A, are built)."""
    import cross_tokenizer_bench as bench
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from xtok_train import make_variants, shared_stream

    chosen = ",".join(dict.fromkeys(["ce-C", "kd-A", *names]))  # the bench needs both
    args = bench.parse_args(["--seeds", "1", "--seed", str(seed), "--variants", chosen, *argv])
    ready = bench.prepare(args)
    set_seed(seed)
    variants, built = make_variants(ready.plan, seed, Accelerator(mixed_precision="no"))
    variants = [v for v in variants if v.name in names]
    stream = shared_stream(ready.plan, seed, variants[0].cfg.batch_tokens,
                           variants[0].cfg.shuffle)
    step, epoch = 0, 0
    while step < ready.plan.steps:
        stream.set_epoch(epoch)
        for raw in stream:
            if step >= ready.plan.steps:
                break
            batches = {k: built["collates"][k](raw) for k in {v.batch_kind for v in variants}}
            for v in variants:
                v.train_step(batches[v.batch_kind])
            step += 1
        epoch += 1
    return SimpleNamespace(ready=ready, args=args), variants


def main(argv=None) -> dict:
    import cross_tokenizer_bench as bench

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", default="ce-C,xkd-pkl")
    own, rest = p.parse_known_args(argv)
    run, variants = train_variants(rest, own.seed, own.variants.split(","))
    ready, args = run.ready, run.args
    toks = bench.tokenizers_of(ready)
    texts = bench.heldout_texts(ready, args.heldout_limit)
    out = {v.name: split_bits(v.student, toks["A"], toks["C"], texts) for v in variants}
    for name, parts in out.items():
        print(name + ": " + ", ".join(f"{k} {v['bits_per_byte']:.4f} bits/byte ({v['tokens']} "
                                      f"tokens, {v['bits_per_token']:.3f} bits/token)"
                                      for k, v in parts.items()), flush=True)
    return out


if __name__ == "__main__":
    main()
