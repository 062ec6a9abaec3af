"""What the mapped targets give student C's own next token, per teacher and kind of position.

    python bench/xtok_targets.py --json bench/results/xtok_targets.json

Over one epoch of the bench's transfer set (the shared stream of seed --seed), student C's
batches from store AB (teacher A's and teacher B's top-32, bench/cross_tokenizer_bench.py)
are built by the CrossCollate student-train uses, and each teacher's target is projected
onto C's vocabulary at T = 1 as the objective projects it (DistillationObjective._target).
At every trained position it reports the probability each target gives C's actual next
token (the label), by kind of position: plain (aligned, the mapped top-k), chained (C's
token spans several teacher tokens; also the medians of the target's two factors there: the
first teacher token's probability and the chain's continuation) and inside (C's position
inside a teacher token, the conditioned target); and, where one teacher gives no target, what the other's gives. As a
reference it reports the same for teacher A on its own tokens (store A's top-32 and its
next token), which is what same-tokenizer KD trains on. A label outside a target's support
(outside the top-k, or mapped elsewhere) counts as 0: the "p < 1e-4" share is where KD at
weight alpha pulls the student away from its own label.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

KINDS = ("plain", "chained", "inside")


def own_token_reference(store_url: str, signal: str) -> np.ndarray:
    """[n] the probability teacher A's stored top-k gives its own next token, per trained
    position of its store."""
    from logitstore.reader import StoreReader

    reader, out = StoreReader(store_url), []
    for seg in range(len(reader.segments)):
        for s in reader.read_segment(seg, [signal]):
            topk, labels = s.signals[signal].topk, np.asarray(s.input_ids[1:])
            hit = np.asarray(topk.ids)[:-1] == labels[:, None]
            p = np.where(hit, np.exp(np.asarray(topk.logprobs, np.float64)[:-1]), 0.0).sum(1)
            out.append(p[np.asarray(s.loss_mask[1:], bool)])
    return np.concatenate(out)


def collates(plan, seed: int) -> dict:
    """{skip_unchained: (kd plans, cross setup, collate)} of student C on store AB."""
    from xtok_train import _b_collate, cross_parts, train_config

    store, out = plan.two_teacher, {}
    for skip in (True, False):
        cfg = train_config(plan, store["url"], plan.student_dirs["C"], f"targets-{skip}", seed,
                           cross_loss="pkl", signals=dict.fromkeys(store["signals"], 0.5),
                           target="topk", skip_unchained_pairs=skip)
        plans, cross = cross_parts(cfg, plan.readers["AB"], plan.tokenizer_c)
        out[skip] = ([p for p in plans if p.target], cross,
                     _b_collate(cross.collate, plan.samples_ab, store["signals"]))
    return out


def epoch_columns(plan, seed: int) -> dict:
    """Per trained position of one epoch: each teacher's mask, kind and p(label); teacher
    A's mask without the unchained skip."""
    import torch

    from student_train.cross_terms import cross_kd_masks
    from student_train.losses import SparseTarget
    from student_train.objective import (IGNORE, DistillationObjective, LossSettings,
                                         label_probability, shifted, target_positions)
    from xtok_train import initial_students, shared_stream

    built = collates(plan, seed)
    kd, cross, _ = built[True]
    objective = DistillationObjective(initial_students(plan, seed)["C"], kd, LossSettings(),
                                      vocab_maps=cross.vocab_maps)
    cols: dict[str, list] = {}
    for raw in shared_stream(plan, seed, 1024, True):
        batches = {skip: fn(raw) for skip, (_, _, fn) in built.items()}
        batch = batches[True]
        B, S = batch["input_ids"].shape
        rows = target_positions(batch).reshape(-1).nonzero().squeeze(-1)

        def pick(x):  # [B, S, ...] -> [n, ...]
            return x.reshape(B * S, *x.shape[2:]).index_select(0, rows)

        labels = pick(shifted(batch["labels"], IGNORE))
        masks = cross_kd_masks(kd, batch["signals"], pick)  # [n, 2]
        kept = cross_kd_masks(kd, batches[False]["signals"], pick)
        found = {"A_kept": kept[:, 0]}
        for i, who in enumerate("AB"):
            signal = batch["signals"][kd[i].name]
            t = objective._target(kd[i], signal, lambda x: pick(x)[None], 1.0)
            t = SparseTarget(t.ids[0], t.logprobs[0], t.valid[0], None, t.temperature)
            kind = torch.zeros(len(rows), dtype=torch.long)
            if "chain_entry" in signal:  # the chain's two factors: P(t1) and C
                entry = pick(signal["chain_entry"]).long()
                kind = torch.where(entry >= 0, 1, kind)
                first = pick(signal["topk_logprobs"]).float().gather(1, entry.clamp_min(0)[:, None])
                found.update({f"first_{who}": first[:, 0].exp(),
                              f"continuation_{who}": pick(signal["chain_logc"]).float().exp()})
            if "inside_mask" in signal:
                kind = torch.where(pick(signal["inside_mask"]).bool(), 2, kind)
            found.update({who: masks[:, i], f"kind_{who}": kind,
                          f"p_{who}": label_probability(t, labels)})
        for key, value in found.items():
            cols.setdefault(key, []).append(value.numpy())
    return {key: np.concatenate(value) for key, value in cols.items()}


def summary(p: np.ndarray) -> dict:
    return {"positions": int(p.size), "mean_p_label": float(p.mean()) if p.size else None,
            "share_p_below_1e-4": float((p < 1e-4).mean()) if p.size else None}


def report(c: dict, own: np.ndarray) -> dict:
    A, B, kept = c["A"], c["B"], c["A_kept"]
    out = {"positions": int(A.size), "teacher_A_own_tokens": summary(own), "by_kind": {},
           "where_one_is_missing": {}}
    for who, cover in (("A", A), ("B", B)):
        for i, kind in enumerate(KINDS):
            sel = cover & (c[f"kind_{who}"] == i)
            out["by_kind"][f"{who} {kind}"] = summary(c[f"p_{who}"][sel])
        chained = cover & (c[f"kind_{who}"] == 1)
        if f"first_{who}" in c and chained.any():  # target = P(t1) * C, each factor's median
            out["by_kind"][f"{who} chained"].update(
                {f"median_{factor}": float(np.median(c[f"{factor}_{who}"][chained]))
                 for factor in ("first", "continuation")})
    gaps = {"A unchained (skipped), B gives one": ~A & kept & B,
            "A's other gaps, B gives one": ~A & ~kept & B,
            "B's gaps, A gives one": A & ~B}
    for name, sel in gaps.items():
        who = "A" if name.startswith("B's") else "B"
        out["where_one_is_missing"][name] = {**summary(c[f"p_{who}"][sel]), "of": who}
    return out


def main(argv=None) -> None:
    import argparse

    import cross_tokenizer_bench as bench

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0, help="the shared stream's seed (its order)")
    p.add_argument("--cache", type=Path, default=bench.OUT / "cache" / "xtok")
    p.add_argument("--work", type=Path, default=bench.OUT / "xtok")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    ready = bench.prepare(bench.parse_args(["--cache", str(args.cache), "--work", str(args.work),
                                            "--seed", str(args.seed),
                                            "--variants", "ce-C,kd-A,xkd-AB-pkl"]))
    figures = report(epoch_columns(ready.plan, args.seed),
                     own_token_reference(ready.stores["A"]["url"], ready.plan.signal))
    for section in ("by_kind", "where_one_is_missing"):
        for name, row in figures[section].items():
            factors = "".join(f"  median {f} {row[f'median_{f}']:.3f}"
                              for f in ("first", "continuation") if f"median_{f}" in row)
            print(f"{name:36s} {row['positions']:7d} positions  mean p(label) "
                  f"{row['mean_p_label'] or 0:.3f}  p < 1e-4: {row['share_p_below_1e-4'] or 0:.3f}"
                  + factors)
    own = figures["teacher_A_own_tokens"]
    print(f"{'teacher A on its own tokens':36s} {own['positions']:7d} positions  mean p(label) "
          f"{own['mean_p_label']:.3f}  p < 1e-4: {own['share_p_below_1e-4']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
