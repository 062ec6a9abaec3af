"""Cross-tokenizer distillation benchmark (issue 15): students whose tokenizer is not the
teacher's, distilled from the store, against CE only and same-tokenizer KD, in bits per byte.

    python bench/cross_tokenizer_bench.py --markdown bench/out/xtok.md   # the full run
    python bench/cross_tokenizer_bench.py --size tiny --seeds 2 --steps 2 \\
        --teacher-steps 2 --transfer-records 16 --heldout-records 6 --out /tmp/x.json  # smoke

corpus      the bundled medical corpus (demo/make_corpus.py): teachers train on its 3,600
            train records, the students on a 900-record transfer set of them, every model is
            measured on its 400 held-out records (bench/xtok_corpus.py)
tokenizers  three, trained locally on DIFFERENT text: A byte-level BPE (4k) and B
            metaspace + byte-fallback BPE (6k) on the first / second third of the train
            records, C byte-level BPE (5k) for the student on Python's language reference
            (general text) plus the last third (--c-text other: general text only)
teachers    a Llama per tokenizer A and B trained by `student-train --data` on the train
            records, and its `teacher-dump` (top-k) of the transfer set, with sample text and
            token spans; cached under --cache (bench/xtok_teachers.py)
students    one architecture; per seed, same steps, same stored samples in the same order,
            alpha 0.8, KL, T = 1 (bench/xtok_train.py): (1) ce-C CE only, (2) kd-A same
            tokenizer KD, (3) xkd-pkl / xkd-uld student C from teacher A's store, plus ce-A
            (CE only, tokenizer A) and, unless --no-b, xkd-B-pkl (student C from teacher B's
            store) and (4) xkd-AB-pkl: two teachers A and B into C, `--signals
            topk32:0.5,topk32-B:0.5` (--two-teacher-weights sets others) on store AB (store
            A plus teacher B's signal, added by `teacher-dump --model B --signal topk32-B
            --out store-AB`); --variants picks some, e.g. the ablations xkd-pkl-aligned
            (xkd-pkl with inside-token targets and chains off: the plain mapped target at
            aligned positions only), xkd-pkl-unchained (chains off), xkd-AB-pkl-conf
            and xkd-AB-pkl-priority (two teachers, signal_mixture confidence / priority)
            for paired comparisons
metric      bits per byte on the held-out records (bench/xtok_eval.py), the only loss
            comparable across tokenizers; paired per seed (bench/xtok_report.py)

Outputs: --out JSON (every figure, the commands, the machine), its PNG, --markdown the report.
--from-json JSON re-renders a finished run without training.
"""

from __future__ import annotations

import argparse
import math
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
sys.path[:0] = [str(Path(__file__).resolve().parent), str(ROOT)]

TRAIN = {"target": "topk", "topk_mode": "tail", "loss": "kl", "alpha": 0.8,
         "temperature": 1.0, "hidden_weight": 0.0, "attention_weight": 0.0, "max_length": 1024,
         "batch_tokens": 1024, "lr": 3.0e-3, "adam_beta2": 0.95, "warmup_ratio": 0.05,
         "eval_fraction": 0.0, "save_every": 0, "log_every": 10, "min_mapped_share": 0.5}


def load_model(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path).float().eval()
    model.requires_grad_(False)
    return model


def student_dirs(args, corpus) -> dict:
    """Config + tokenizer of the student of tokenizer A and of C (seeds draw the weights)."""
    from xtok_teachers import STUDENT_SHAPES, save_model

    dirs = {}
    for name in ("A", "C"):
        directory = args.cache / f"student-{args.size}-{name}-{corpus['key'][:12]}"
        if not (directory / "config.json").is_file():
            save_model(directory, corpus["tokenizers"][name], STUDENT_SHAPES[args.size], None)
        dirs[name] = directory
    return dirs


def read_all(reader, signals: list[str]) -> dict:
    """sample id -> Sample of every sample of a store (those `signals` only)."""
    return {s.sample_id: s for seg in range(len(reader.segments))
            for s in reader.read_segment(seg, signals)}


def two_teacher_parts(args, teachers, stores, readers) -> tuple:
    """(store AB's info, its {sample id: Sample} with both signals): teacher B's signal added
    to a copy of store A by `teacher-dump --signal` (xtok_teachers.build_two_teacher_store),
    its reader put in `readers["AB"]`; (None, {}) under --no-b."""
    from fidelity import run_tool
    from logitstore.reader import StoreReader
    from xtok_teachers import build_two_teacher_store

    if "B" not in teachers:
        return None, {}
    store = build_two_teacher_store(stores["A"], teachers["B"], args.work / "stores",
                                    args.top_k, run_tool)
    readers["AB"] = StoreReader(store["url"])
    samples = read_all(readers["AB"], store["signals"])
    if set(samples) != set(readers["A"].sample_ids):
        raise SystemExit(f"store AB ({store['url']}) does not hold store A's sample ids: it "
                         f"should be a copy of store A with teacher B's signal added; delete "
                         f"it and its stamp file and run again")
    print(f"store AB: {store['url']} (signals {store['signals']}, B's dump "
          f"{store['dump_s']:.0f}s)", flush=True)
    return store, samples


def train_keys(args) -> dict:
    """The students' shared student-train keys: TRAIN with the run's --min-mapped-share,
    --alpha, --temperature and --loss where given."""
    given = {key: getattr(args, key, None)
             for key in ("min_mapped_share", "alpha", "temperature", "loss")}
    return {**TRAIN, **{key: value for key, value in given.items() if value is not None}}


def prepare(args) -> SimpleNamespace:
    """Corpus, teachers, stores and the students' plan: built, or reused from the cache."""
    from transformers import AutoTokenizer

    from fidelity import run_tool, write_yaml
    from logitstore.reader import StoreReader
    from xtok_corpus import build_corpus
    from xtok_teachers import build_store, build_teacher
    from xtok_train import shared_stream

    corpus = build_corpus(args.cache, {"transfer_records": args.transfer_records,
                                       "heldout_records": args.heldout_records,
                                       "c_text": args.c_text,
                                       **({"vocab_c": 3072} if args.c_text == "other" else {}),
                                       **({"vocab_a": 400, "vocab_b": 640, "vocab_c": 320}
                                          if args.size == "tiny" else {})})
    print(f"corpus {corpus['dir']}: {json.dumps({k: corpus['sizes'][k] for k in ('teacher', 'transfer', 'heldout')})}",
          flush=True)
    names = ["A"] + ([] if args.no_b else ["B"])
    teachers = {n: build_teacher(args.cache, corpus, n, args.size, args.teacher_steps, run_tool)
                for n in names}
    for t in teachers.values():
        print(f"teacher {t['name']}: {t['path']} ({'trained' if t['built'] else 'cached'}, "
              f"{t['train_s']:.0f}s)", flush=True)
    stores = {n: build_store(teachers[n], corpus["transfer"], args.work / "stores", args.top_k,
                             run_tool) for n in names}
    readers = {n: StoreReader(s["url"]) for n, s in stores.items()}
    signal = f"topk{args.top_k}"
    samples_b = read_all(readers["B"], [signal]) if "B" in readers else {}
    if samples_b and set(samples_b) != set(readers["A"].sample_ids):
        raise SystemExit("stores A and B hold different sample ids: the B student could not "
                         "read the same texts; dump both from the same transfer file")
    preset = write_yaml(args.work / "train.yaml", "train", train_keys(args))
    plan = SimpleNamespace(preset=preset,
                           work=args.work, steps=args.steps, signal=signal, stores=stores,
                           readers=readers, student_dirs=student_dirs(args, corpus),
                           tokenizer_c=AutoTokenizer.from_pretrained(corpus["tokenizers"]["C"]),
                           samples_b=samples_b, variants=args.variants,
                           two_teacher_weights=args.two_teacher_weights)
    plan.two_teacher, plan.samples_ab = two_teacher_parts(args, teachers, stores, readers)
    per_epoch = shared_stream(plan, args.seed, TRAIN["batch_tokens"], True).num_batches()
    plan.steps = args.steps or max(1, round(args.epochs * per_epoch))
    return SimpleNamespace(corpus=corpus, teachers=teachers, stores=stores, plan=plan,
                           two_teacher=plan.two_teacher)


def heldout_texts(ready, limit: int | None) -> list[str]:
    from xtok_corpus import read_jsonl

    texts = [r["text"] for r in read_jsonl(ready.corpus["heldout"])]
    return texts[:limit] if limit else texts


def tokenizers_of(ready) -> dict:
    from transformers import AutoTokenizer

    return {n: AutoTokenizer.from_pretrained(d) for n, d in ready.corpus["tokenizers"].items()}


def run_seeds(args, ready) -> tuple[list[dict], dict]:
    from xtok_eval import bits_per_byte
    from xtok_teachers import CONTEXT
    from xtok_train import A_VARIANTS, train_students

    texts, toks = heldout_texts(ready, args.heldout_limit), tokenizers_of(ready)
    teachers = {f"teacher-{n}": bits_per_byte(load_model(t["path"]), toks[n], texts, CONTEXT)
                for n, t in ready.teachers.items()}
    print("  teachers: " + " ".join(f"{k}={v['bits_per_byte']:.4f}" for k, v in
                                    teachers.items()), flush=True)
    runs = []
    for offset in range(args.seeds):
        run = train_students(ready.plan, args.seed + offset)
        run["heldout"] = {name: bits_per_byte(model, toks["A" if name in A_VARIANTS else "C"],
                                              texts, CONTEXT)
                          for name, model in run.pop("students").items()}
        print("  held-out bits/byte: " + " ".join(
            f"{k}={v['bits_per_byte']:.4f}" for k, v in run["heldout"].items()), flush=True)
        runs.append(run)
    return runs, teachers


def exact_coverage(stores: dict, tokenizer_dirs: dict, signal: str) -> dict:
    """Per teacher store: shares of its stored top-k mass (every position) whose token the
    student's tokenizer C spells exactly / by a first piece / not at all
    (`vocab_map.coverage`, the map built from the store's and C's tokenizers)."""
    import numpy as np
    from transformers import AutoTokenizer

    from logitstore.reader import StoreReader
    from logitstore.toolkit.vocab_map import coverage, vocab_map_for

    student = AutoTokenizer.from_pretrained(tokenizer_dirs["C"])
    out = {}
    for name, store in stores.items():
        vocab_map = vocab_map_for(AutoTokenizer.from_pretrained(tokenizer_dirs[name]), student)
        reader = StoreReader(store["url"])
        rows = [s.signals[signal].topk for seg in range(len(reader.segments))
                for s in reader.read_segment(seg, [signal])]
        ids = np.concatenate([t.ids for t in rows])
        probs = np.exp(np.concatenate([t.logprobs for t in rows]).astype(np.float64))
        c = coverage(vocab_map, ids, np.where(ids >= 0, probs, 0.0))
        out[name] = {"exact": c.exact, "decomposed": c.decomposed, "unmapped": c.unmapped}
    return out


def write_outputs(result: dict, args) -> str:
    from xtok_report import plot, render

    text = render(result)
    png = plot(result, args.png)
    result["table"], result["png"] = text, str(png) if png else None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str), encoding="utf-8")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text + (f"\n\n![cross-tokenizer KD]({png.name})\n" if png
                                         else "\n"), encoding="utf-8")
    print("\n" + text + f"\n\nwrote {args.out}" + (f", {png}" if png else "")
          + (f", {args.markdown}" if args.markdown else ""), flush=True)
    return text


def run_benchmark(args, command: str) -> dict:
    import torch

    from fidelity import code_version
    from xtok_report import summarise

    load_start, started = os.getloadavg(), time.perf_counter()
    ready = prepare(args)
    runs, teachers = run_seeds(args, ready)
    result = {
        "command": command, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(),
                    "loadavg_start": list(load_start), "loadavg_end": list(os.getloadavg())},
        "wall_s": round(time.perf_counter() - started, 1), "code": code_version(),
        "corpus": {"dir": str(ready.corpus["dir"]), **ready.corpus["sizes"]},
        "teachers": {n: {k: v for k, v in t.items()} for n, t in ready.teachers.items()},
        "stores": {n: {k: v for k, v in s.items() if k != "sizes"}
                   for n, s in ready.stores.items()},
        "two_teacher_store": ready.two_teacher,
        "settings": {"train": train_keys(args), "size": args.size, "top_k": args.top_k,
                     "two_teacher_weights": list(args.two_teacher_weights),
                     "steps": ready.plan.steps, "seeds": args.seeds},
        "teacher_heldout": teachers, "runs": runs,
        "summary": summarise(runs, teachers)}
    result["summary"]["exact_coverage"] = exact_coverage(
        ready.stores, ready.corpus["tokenizers"], ready.plan.signal)
    write_outputs(result, args)
    return result


def _two_weights(text: str) -> tuple[float, float]:
    try:
        weights = tuple(float(w) for w in text.split(","))
    except ValueError:
        weights = ()
    if len(weights) != 2 or not all(math.isfinite(w) and w > 0 for w in weights):
        raise argparse.ArgumentTypeError(f"expected two positive weights WA,WB (e.g. 0.8,0.2), "
                                         f"found {text!r}")
    return weights


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("--seeds", type=int, default=3, help="student seeds (>= 3 for the result)")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--size", default="small", choices=("small", "tiny"),
                   help="model shapes (tiny: the test's smoke run)")
    p.add_argument("--teacher-steps", type=int, default=400, help="steps of 4096 tokens")
    p.add_argument("--top-k", type=int, default=32, help="the teachers' stored top-k")
    p.add_argument("--transfer-records", type=int, default=900)
    p.add_argument("--heldout-records", type=int, default=0, help="0: all 400")
    p.add_argument("--heldout-limit", type=int, help="evaluate on at most this many records")
    p.add_argument("--epochs", type=float, default=2.0, help="student passes over the "
                   "transfer set")
    p.add_argument("--steps", type=int, help="student steps (overrides --epochs)")
    p.add_argument("--no-b", action="store_true", help="no teacher B (nor its student)")
    from student_train.losses import KD_LOSSES
    from xtok_train import ABLATIONS, ALL_VARIANTS, DEFAULT_VARIANTS, TWO_TEACHER_WEIGHTS

    p.add_argument("--variants", help="comma-separated students to train (default: all but "
                   f"the ablations {', '.join(ABLATIONS)}; ce-C and kd-A always, the "
                   f"report's references), of: {', '.join(ALL_VARIANTS)} (bench/xtok_train.py "
                   "says what each one is)")
    p.add_argument("--min-mapped-share", type=float, help="the students' min_mapped_share "
                   f"(default {TRAIN['min_mapped_share']}): aligned positions' mapped share "
                   "and inside-token positions' conditioned share")
    p.add_argument("--alpha", type=float, help=f"every student's KD weight alpha (default "
                   f"{TRAIN['alpha']}; CE students ignore it): loss = alpha KD + (1 - alpha) CE")
    p.add_argument("--temperature", type=float, help="every KD student's temperature T "
                   "(default 1; the teacher's and the student's log-probs both divided by T)")
    p.add_argument("--loss", choices=KD_LOSSES, help=f"every KD student's divergence (default "
                   f"{TRAIN['loss']}; student-train's --loss)")
    p.add_argument("--two-teacher-weights", type=_two_weights, metavar="WA,WB",
                   help="the two-teacher students' signal weights of teachers A and B "
                        "(default 0.5,0.5)")
    p.add_argument("--c-text", choices=("mixed", "other"), default="mixed",
                   help="tokenizer C's text: general text plus a third of the domain records "
                   "(mixed, 5,120 tokens), or general text only (other, 3,072 tokens: C as the "
                   "first runs built it, a stress case)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--cache", type=Path, default=OUT / "cache" / "xtok",
                   help="corpus, tokenizers, teachers, student configs (reused across runs)")
    p.add_argument("--work", type=Path, default=OUT / "xtok", help="stores, logs, maps")
    p.add_argument("--out", type=Path, help="the JSON (default bench/out/xtok.json, or the "
                   "--from-json file)")
    p.add_argument("--png", type=Path, help="the plot (default: --out with .png)")
    p.add_argument("--markdown", type=Path, help="also write the report as markdown here")
    p.add_argument("--from-json", type=Path, help="re-render a finished run, no training")
    args = p.parse_args(argv)
    args.out = args.out or args.from_json or OUT / "xtok.json"
    args.png = args.png or args.out.with_suffix(".png")
    chosen = DEFAULT_VARIANTS if not args.variants else \
        tuple(v.strip() for v in args.variants.split(",") if v.strip())
    unknown = sorted(set(chosen) - set(ALL_VARIANTS))
    if unknown or not {"ce-C", "kd-A"} <= set(chosen):
        p.error(f"--variants takes names of {', '.join(ALL_VARIANTS)} and must hold ce-C and "
                f"kd-A (the report's references), found {args.variants!r}")
    args.variants = chosen
    args.two_teacher_weights = args.two_teacher_weights or TWO_TEACHER_WEIGHTS
    if args.seeds < 1 or args.epochs <= 0 or args.top_k < 1:
        p.error(f"expected --seeds >= 1, --epochs > 0 and --top-k >= 1, found {args.seeds}, "
                f"{args.epochs} and {args.top_k}")
    return args


def main(argv=None) -> dict:
    # Waiting OpenMP threads sleep instead of spinning (a shared machine); subprocesses inherit.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = parse_args(argv)
    if args.from_json:  # the summary is recomputed from the runs: the report's code may be newer
        from xtok_report import summarise

        result = json.loads(args.from_json.read_text(encoding="utf-8"))
        kept = result["summary"].get("exact_coverage")
        result["summary"] = summarise(result["runs"], result["teacher_heldout"])
        if kept is None and all(Path(s["url"]).is_dir() for s in result["stores"].values()):
            kept = exact_coverage(result["stores"], {n: Path(result["corpus"]["dir"])
                                                     / f"tokenizer-{n}" for n in "ABC"},
                                  f"topk{result['settings']['top_k']}")
        result["summary"]["exact_coverage"] = kept or {}
        write_outputs(result, args)
        return result
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "bench/cross_tokenizer_bench.py",
                          *(sys.argv[1:] if argv is None else argv)])
    return run_benchmark(args, command)


if __name__ == "__main__":
    main()
