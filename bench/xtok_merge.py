"""Merge the seeds (or, with --join, the students) of cross-tokenizer benchmark runs into one.

    python bench/xtok_merge.py A.json B.json --out merged.json
    python bench/xtok_merge.py --join A.json B.json --out joined.json
    python bench/cross_tokenizer_bench.py --from-json merged.json --markdown merged.md

Each input is a bench/cross_tokenizer_bench.py JSON of the SAME setup (corpus, teachers, top-k,
steps and training settings: checked) on other seeds (`--seed` gives a run's first seed;
repeated seeds are refused). Give the runs the same `--steps`: with `--epochs` the step count
follows the first seed's batches, so runs of other first seeds differ in steps and are
refused as another setup. The merged JSON keeps the first input's setup and every run,
each cut to the students all inputs trained; `--from-json` then recomputes the summary, the
table and the plot from those runs alone, as for any finished run.

--join: the inputs ran the SAME seeds (same setup) with other students, e.g. a new ablation
run beside ce-C and kd-A only: each seed's run gets every input's students. Training is
deterministic per seed (same initial weights, same batches), so a student both inputs
trained must have the same held-out bits per byte to the last digit, else the join is
refused (the inputs are not the same runs). Paired figures across inputs are then exact;
step timings of students from different inputs were measured in different runs (other load)
and compare less well than within one run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from xtok_report import WEIGHTS_BEFORE_OPTION

SAME = ("corpus", "teachers", "settings")  # what must agree, besides the seeds' steps


def _setup(result: dict) -> dict:
    out = {k: result[k] for k in SAME}
    out["settings"] = {"two_teacher_weights": list(WEIGHTS_BEFORE_OPTION),
                       **{k: v for k, v in out["settings"].items() if k != "seeds"}}
    out["corpus"] = {k: v for k, v in out["corpus"].items() if k != "dir"}
    out["teachers"] = {n: {k: v for k, v in t.items() if k not in ("built", "path", "command")}
                       for n, t in out["teachers"].items()}
    return out


def _cut(run: dict, students: set[str]) -> dict:
    """A run restricted to `students` (per-student dicts, and the batch kinds they use)."""
    kinds = {run["batch_kind"][s] for s in students}
    out = dict(run)
    for key in ("step_s", "batch_kind", "tokens", "loss_first_last", "heldout"):
        out[key] = {k: v for k, v in run[key].items() if k in students}
    out["cross_counts"] = {k: v for k, v in run["cross_counts"].items() if k in students}
    out["collate_s"] = {k: v for k, v in run["collate_s"].items() if k in kinds}
    return out


def _check_one_setup(results: list[dict], verb: str) -> None:
    first = _setup(results[0])
    for i, r in enumerate(results[1:], 1):
        if _setup(r) != first:
            raise ValueError(f"input {i} is another setup than input 0 (corpus, teachers or "
                             f"training settings differ): only runs of one setup {verb}")


def _combined(results: list[dict], runs: list[dict]) -> dict:
    """The first input's result with `runs`, every input's command and their wall time."""
    out = dict(results[0])
    out["runs"] = runs
    out["settings"] = {**out["settings"], "seeds": len(runs)}
    out["command"] = " + ".join(r["command"] for r in results)
    out["wall_s"] = sum(r["wall_s"] for r in results)
    return out


def merge(results: list[dict]) -> dict:
    """The merged result (module docstring); ValueError on another setup or a repeated seed."""
    _check_one_setup(results, "merge")
    students = set.intersection(*(set(run["heldout"]) for r in results for run in r["runs"]))
    runs = [_cut(run, students) for r in results for run in r["runs"]]
    seeds = [run["seed"] for run in runs]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"the inputs repeat seeds {sorted(seeds)}: merge runs of other seeds "
                         f"(cross_tokenizer_bench.py --seed FIRST --seeds N)")
    return _combined(results, sorted(runs, key=lambda run: run["seed"]))


def _join_provenance(joined: dict, run: dict) -> None:
    """Add `run`'s cross setups (keyed by setup: pkl, uld, B, AB) to `joined`'s; a setup
    both hold must be the same."""
    ours = joined.setdefault("cross_provenance", {})
    for setup, provenance in run.get("cross_provenance", {}).items():
        if ours.setdefault(setup, provenance) != provenance:
            raise ValueError(f"seed {run['seed']}: cross setup {setup!r} differs between the "
                             f"inputs (vocabulary map or alignment settings): not the same "
                             f"runs; join runs of one code version")


def join(results: list[dict]) -> dict:
    """The joined result (module docstring); ValueError on another setup, other seeds, or a
    shared student whose bits per byte differ."""
    _check_one_setup(results, "join")
    seeds = [run["seed"] for run in results[0]["runs"]]
    for i, r in enumerate(results[1:], 1):
        if [run["seed"] for run in r["runs"]] != seeds:
            raise ValueError(f"input {i} ran seeds {[run['seed'] for run in r['runs']]}, input "
                             f"0 ran {seeds}: --join needs the same seeds (merge other seeds "
                             f"without --join)")
    runs = []
    for per_seed in zip(*(r["runs"] for r in results)):
        joined = {k: (dict(v) if isinstance(v, dict) else v) for k, v in per_seed[0].items()}
        for run in per_seed[1:]:
            for name, row in run["heldout"].items():
                if name in joined["heldout"]:
                    if joined["heldout"][name]["bits_per_byte"] != row["bits_per_byte"]:
                        raise ValueError(
                            f"seed {run['seed']}: student {name} has held-out bits per byte "
                            f"{joined['heldout'][name]['bits_per_byte']!r} in one input and "
                            f"{row['bits_per_byte']!r} in another: not the same runs (other "
                            f"code or settings, or another machine, thread count or GPU, "
                            f"whose arithmetic differs); join runs of one code version "
                            f"on one machine")
                    continue
                for key in ("step_s", "batch_kind", "tokens", "loss_first_last", "heldout",
                            "cross_counts"):
                    if name in run.get(key, {}):
                        joined.setdefault(key, {})[name] = run[key][name]
                kind = run["batch_kind"][name]
                joined["collate_s"].setdefault(kind, run["collate_s"][kind])
            _join_provenance(joined, run)
        runs.append(joined)
    return _combined(results, runs)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("inputs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--join", action="store_true", help="the inputs ran the same seeds: join "
                   "their students (module docstring)")
    args = p.parse_args(argv)
    results = [json.loads(path.read_text(encoding="utf-8")) for path in args.inputs]
    merged = (join if args.join else merge)(results)
    args.out.write_text(json.dumps(merged, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.out}: {len(merged['runs'])} seeds of {sorted(merged['runs'][0]['heldout'])}")
    return merged


if __name__ == "__main__":
    main()
