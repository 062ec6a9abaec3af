"""Where tokenizer C's handicap and the cross-tokenizer gap sit: held-out bits per byte of
students A and C compared chunk by chunk.

Bits of two tokenizations are comparable over a stretch of text both cut at the same byte
offsets. Per held-out record, the byte offsets where a token of A and a token of C both end
cut the text into CHUNKS; each chunk holds a whole number of each tokenizer's tokens and is
one of
  same      one A token, one C token (the same bytes)
  C finer   one A token, several C tokens (a student position inside a teacher token)
  C coarser several A tokens, one C token (a chained target)
  crossing  several of each, their inner boundaries at different bytes
A student's NLL of the chunk's tokens (each predicted after BOS and the tokens before it,
as bench/xtok_eval.py counts them; one window per record: every held-out record fits the
students' context) is summed per kind and divided by ALL held-out bytes, so
the kinds add up to the student's bits per byte. The report then splits C's handicap
(ce-C - ce-A), each student's KD gain and the gap left (xkd-pkl - kd-A) by chunk kind.

    python bench/xtok_chunks.py --seeds 2 [--json bench/results/xtok_chunks.json]
Trains ce-A, kd-A, ce-C, xkd-pkl per seed exactly as bench/cross_tokenizer_bench.py does
(bench/xtok_split.train_variants: same cache, teachers, stores, batches, steps).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
KINDS = ("same", "C finer", "C coarser", "crossing")
LATER = "C finer, later pieces"  # a C student's pieces after the first in a "C finer" chunk
BINS = (*KINDS, LATER)
STUDENTS = {"ce-A": "A", "kd-A": "A", "ce-C": "C", "xkd-pkl": "C"}  # name -> tokenizer


def text_tokens(tokenizer, text: str):
    """([n] ids, [n] byte ends) of the tokens that spell `text` (specials left out); refuses
    tokens that do not spell it exactly, as bench/xtok_eval.py does."""
    from logitstore.toolkit.token_spans import tokenize_with_spans
    from xtok_eval import BitsPerByteError

    tok = tokenize_with_spans(tokenizer, text)
    keep = ~tok.special
    ends = tok.spans[keep][:, 1].astype("int64")
    if not tok.byte_exact or not len(ends) or ends[-1] != len(text.encode("utf-8")):
        raise BitsPerByteError(f"expected the tokens of {text[:40]!r}... to spell it exactly, "
                               f"found they do not: its chunks would not be comparable")
    return tok.ids[keep].astype("int64"), ends


def token_bins(kind_of_token, chunk_of_token):
    """[n] index into BINS per token: its chunk's kind, LATER for the tokens after the first
    of a "C finer" chunk (only a C student has those)."""
    import numpy as np

    first = np.diff(chunk_of_token, prepend=-1) != 0
    later = (kind_of_token == KINDS.index("C finer")) & ~first
    return np.where(later, BINS.index(LATER), kind_of_token)


def chunk_kinds(ends_a, ends_c):
    """([n_a] chunk of each A token, [n_c] chunk of each C token, [chunks] kind index,
    [chunks] bytes of each chunk)."""
    import numpy as np

    cuts = np.intersect1d(ends_a, ends_c)  # both tokenizations end a token here
    of_a = np.searchsorted(cuts, ends_a)  # tokens ending in (cuts[j-1], cuts[j]] -> chunk j
    of_c = np.searchsorted(cuts, ends_c)
    n_a = np.bincount(of_a, minlength=len(cuts))
    n_c = np.bincount(of_c, minlength=len(cuts))
    kind = np.select([(n_a == 1) & (n_c == 1), n_a == 1, n_c == 1], [0, 1, 2], 3)
    return of_a, of_c, kind, np.diff(cuts, prepend=0)


def token_nll(model, bos_id: int, ids):
    """[n] float64: -ln p(token_i | BOS, tokens before it) under `model`."""
    import torch
    import torch.nn.functional as F

    x = torch.as_tensor([bos_id, *ids.tolist()])[None]
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=x).logits.float()[0, :-1], -1)
    return (-logp.gather(-1, x[0, 1:, None])[:, 0]).double().numpy()


def split_by_chunks(students: dict, toks: dict, texts: list[str]) -> dict:
    """{student: {bin: bits per byte}} (BINS: "C finer" holds a chunk's first piece only)
    plus "_bytes": {kind: share of the held-out bytes}."""
    import numpy as np

    nll = {name: np.zeros(len(BINS)) for name in students}
    chunk_bytes, total = np.zeros(len(KINDS)), 0
    for model in students.values():
        model.eval()
    for text in texts:
        ids_a, ends_a = text_tokens(toks["A"], text)
        ids_c, ends_c = text_tokens(toks["C"], text)
        of_a, of_c, kind, sizes = chunk_kinds(ends_a, ends_c)
        chunk_bytes += np.bincount(kind, weights=sizes, minlength=len(KINDS))
        total += len(text.encode("utf-8"))
        for name, model in students.items():
            side = STUDENTS[name]
            ids, of = (ids_a, of_a) if side == "A" else (ids_c, of_c)
            per = token_nll(model, toks[side].bos_token_id, ids)
            nll[name] += np.bincount(token_bins(kind[of], of), weights=per,
                                     minlength=len(BINS))
    out = {name: dict(zip(BINS, (v / math.log(2) / total).tolist())) for name, v in nll.items()}
    out["_bytes"] = dict(zip(KINDS, (chunk_bytes / total).tolist()))
    return out


def derived(split: dict) -> dict:
    """Per kind, "C finer" also by piece, and "all": C's handicap, both KD gains and the gap
    left, bits per byte (an A student's "C finer" chunk is one token: its "1st piece")."""
    rows = {}
    whole = {"C finer": ("C finer", LATER), "all": BINS}
    for kind in (*KINDS, "C finer, 1st piece", LATER, "all"):
        bins = whole.get(kind, ("C finer",) if kind == "C finer, 1st piece" else (kind,))
        get = (lambda s, bins=bins: sum(split[s][b] for b in bins))
        rows[kind] = {"handicap ce-C - ce-A": get("ce-C") - get("ce-A"),
                      "gain kd-A": get("ce-A") - get("kd-A"),
                      "gain xkd-pkl": get("ce-C") - get("xkd-pkl"),
                      "gap xkd-pkl - kd-A": get("xkd-pkl") - get("kd-A")}
    return rows


def main(argv=None) -> dict:
    import cross_tokenizer_bench as bench
    from xtok_split import train_variants

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--json", type=Path, default=bench.OUT / "xtok_chunks.json")
    own, rest = p.parse_known_args(argv)
    runs = []
    for seed in range(own.seed, own.seed + own.seeds):
        run, variants = train_variants(rest, seed, list(STUDENTS))
        toks = bench.tokenizers_of(run.ready)
        texts = bench.heldout_texts(run.ready, run.args.heldout_limit)
        split = split_by_chunks({v.name: v.student for v in variants}, toks, texts)
        runs.append({"seed": seed, "split": split, "derived": derived(split)})
        print(f"seed {seed}: " + json.dumps(runs[-1]["derived"]), flush=True)
    mean = {kind: {k: statistics.mean(r["derived"][kind][k] for r in runs) for k in row}
            for kind, row in runs[0]["derived"].items()}
    report = {"runs": runs, "mean": mean,
              "bytes": {k: statistics.mean(r["split"]["_bytes"][k] for r in runs) for k in KINDS}}
    own.json.parent.mkdir(parents=True, exist_ok=True)
    own.json.write_text(json.dumps(report, indent=1))
    print(f"{'kind':22} {'bytes':>6} " + " ".join(f"{k:>20}" for k in mean["all"]))
    for kind, row in mean.items():
        share = report["bytes"].get(kind, 1.0 if kind == "all" else math.nan)
        print(f"{kind:22} {share:6.3f} " + " ".join(f"{v:20.4f}" for v in row.values()))
    return report


if __name__ == "__main__":
    main()
