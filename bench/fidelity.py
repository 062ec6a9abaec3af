"""Fidelity benchmark: how close does a student distilled from the store come to online KD,
per byte of stored signal? (issue 12, sections 2 and 3)

    python bench/fidelity.py                      # the full sweep (see BENCHMARKS.md)
    python bench/fidelity.py --configs topk8,sampled16,topk8+sampled16,sampled16-f16 \\
        --seeds 2 --teacher-size small --teacher-steps 240 --steps 40 --heldout-limit 128 \\
        --out bench/out/fidelity-smoke.json --work bench/out/fidelity-smoke   # a smoke run

corpus    real text that ships with Python and the project's dependencies (docstrings of the
          standard library, numpy, matplotlib and torch; pydoc's language topics), split by
          module into the teacher's text, a transfer set (a small held-in part of it) and
          held-out modules; a byte-level BPE tokenizer trained on the teacher's text
          (bench/fidelity_corpus.py; cached under --cache)
teacher   a Llama trained from scratch on all of the teacher's text by `student-train --data`
          for --teacher-minutes of this CPU (bench/fidelity_teacher.py; cached, keyed by
          the SHA-256 of its settings and data)
stores    one store of the transfer set, one signal per stored setting, each written by a
          `teacher-dump` run (a subprocess) over the same tokens: topkK (top-k K), sampledN
          (N draws at T = 1), with -f16 the log-probs as float16 instead of q8; bytes per
          token of each signal from `logitstore info --json` (its own arrays on disk)
configs   what a student learns from: one signal, or topkK+sampledN (both signals, equal
          weights: the KD term is the mean of their two KL terms); its bytes per token are
          those of its signals
students  per seed, every config plus CE only and online KD (the teacher in memory, full
          vocabulary), same initial weights and batches (bench/fidelity_train.py); alpha 0.8
          (0.8 KD + 0.2 CE), KL, T = 1, top-k tail mode, hidden/attention terms off
metrics   on the held-out modules' documents, for every student and the teacher: next-token
          NLL, perplexity, accuracy, ECE (15 bins), KL(teacher || student)
analysis  per seed the relative held-out NLL gap of each method to online KD (paired), its
          mean and 95 % t-interval over seeds; "within 0.5 %, resolved" = the interval's upper
          end < +0.5 % (bench/fidelity_stats.py); the Pareto front of bytes vs mean gap

Outputs (under bench/out/, gitignored): fidelity.json (every figure, the commands, the
machine), fidelity.png (the curve), and with --markdown FILE the tables for BENCHMARKS.md.
--from-json JSON re-renders the tables and the plot of a finished run without training.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
# This checkout's packages first, in this process as in the tools it starts (tool_env): an
# editable install elsewhere must not mix two versions of logitstore in one run.
sys.path[:0] = [str(Path(__file__).resolve().parent), str(ROOT)]

FULL_SWEEP = ["topk4", "topk8", "topk16", "topk32", "topk64",
              "sampled4", "sampled8", "sampled16", "sampled32", "sampled64",
              "topk4+sampled8", "topk8+sampled16", "topk16+sampled16",
              "topk16-f16", "sampled16-f16"]
SIGNAL_NAME = re.compile(r"^(topk|sampled)([1-9][0-9]*)(-f16)?$")
DUMP = {"quantize": "none", "dtype": "float32", "device": "cpu", "max_length": 256,
        "batch_tokens": 4096, "logits_chunk": 256, "sample_temperature": 1.0, "seed": 0,
        "hidden_layers": [], "attention_layers": [], "segment_tokens": 32768,
        "chunk_tokens": 4096, "chunk_samples": 64}
TRAIN = {"target": "auto", "topk_mode": "tail", "loss": "kl", "alpha": 0.8,
         "temperature": 1.0, "hidden_weight": 0.0, "attention_weight": 0.0, "max_length": 256,
         "batch_tokens": 1024, "lr": 3.0e-3, "adam_beta2": 0.95, "warmup_ratio": 0.05,
         "eval_fraction": 0.0, "save_every": 0, "log_every": 10}


# ----------------------------------------------------------------------------- configs

def signal_spec(name: str) -> dict:
    """topk16 / sampled32 / topk16-f16 -> the teacher-dump settings of that signal."""
    match = SIGNAL_NAME.match(name)
    if not match:
        raise ValueError(f"signal {name!r}: expected topkK or sampledN, optionally with -f16 "
                         f"(e.g. topk16, sampled32-f16)")
    kind, n, f16 = match.groups()
    return {"top_k": int(n) if kind == "topk" else 0,
            "samples": int(n) if kind == "sampled" else 0,
            "logprob_encoding": "f16" if f16 else "q8"}


def parse_configs(names: list[str]) -> dict[str, list[str]]:
    """config -> its signals: 'topk8+sampled16' -> ['topk8', 'sampled16']."""
    configs = {}
    for name in names:
        parts = name.split("+")
        for part in parts:
            signal_spec(part)  # raises on a bad name
        kinds = [signal_spec(p)["top_k"] > 0 for p in parts]
        if len(parts) > 2 or len(set(kinds)) != len(kinds):
            raise ValueError(f"config {name!r}: expected one signal or topkK+sampledN")
        configs[name] = parts
    return configs


# ----------------------------------------------------------------------------- subprocesses

def tool_env() -> dict[str, str]:
    """The tools import this checkout's packages (PYTHONPATH first), offline."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]]
                                                       if env.get("PYTHONPATH") else []))
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        env.setdefault(var, "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run_tool(argv: list[str], log: Path) -> str:
    """Run `python ARGV` with its output in `log`; returns stdout; fails with the log's tail."""
    from logitstore.errors import LogitStoreError

    log.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable] + argv, capture_output=True, text=True,
                          env=tool_env(), cwd=ROOT)
    log.write_text(f"$ python {shlex.join(argv)}\n{proc.stderr}\n{proc.stdout}", encoding="utf-8")
    if proc.returncode != 0:
        raise LogitStoreError(f"expected exit status 0 from `python {shlex.join(argv[:3])} ...`, "
                              f"found {proc.returncode}; log {log}:\n{proc.stderr[-3000:]}")
    return proc.stdout


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_yaml(path: Path, section: str, values: dict) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# written by bench/fidelity.py\n"
                    + yaml.safe_dump({section: values}, sort_keys=False), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- the store

def build_store(teacher: dict, transfer: Path, work: Path, signals: list[str]) -> dict:
    """One store of the transfer set holding every signal, each added by a teacher-dump run.
    Reused (only missing signals dumped) while the teacher, data and dump settings match."""
    store, config = work / "store", write_yaml(work / "dump.yaml", "dump", DUMP)
    inputs = {"teacher": teacher["key"], "data": file_sha256(transfer), "dump": DUMP}
    stamp_file = work / "store.stamp.json"
    saved = json.loads(stamp_file.read_text()) if stamp_file.is_file() else {}
    if saved.get("inputs") != inputs and store.exists():
        shutil.rmtree(store)  # another teacher, data or settings: dump afresh
    done = saved.get("signals", {}) if saved.get("inputs") == inputs else {}
    for name in signals:
        spec = signal_spec(name)
        argv = ["-m", "teacher_dump", "--config", str(config), "--model", teacher["path"],
                "--data", str(transfer), "--out", str(store), "--signal", name,
                "--top-k", str(spec["top_k"]), "--samples", str(spec["samples"]),
                "--logprob-encoding", spec["logprob_encoding"], "--no-progress"]
        if name in done:
            continue
        print(f"  $ teacher-dump ... --signal {name} --top-k {spec['top_k']} --samples "
              f"{spec['samples']} --logprob-encoding {spec['logprob_encoding']}", flush=True)
        t0 = time.perf_counter()
        run_tool(argv, work / "logs" / f"dump-{name}.log")
        done[name] = {"dump_s": round(time.perf_counter() - t0, 1),
                      "command": "python " + shlex.join(argv)}
        stamp_file.write_text(json.dumps({"inputs": inputs, "signals": done}))
    info = json.loads(run_tool(["-m", "logitstore.cli", "info", "--json", str(store)],
                               work / "logs" / "info.log"))
    sizes = info["sizes"]
    out = {}
    for name in signals:
        kind = "topk" if signal_spec(name)["top_k"] else "sampled"
        s = sizes["signals"][name][kind]
        out[name] = {"kind": kind, **signal_spec(name), **done[name],
                     **{k: s[k] for k in ("bytes_per_token", "bytes_per_entry",
                                          "entries_per_token", "compression_ratio")}}
    return {"url": str(store), "counts": info["counts"], "signals": out,
            "input_ids_bytes_per_token": sizes["arrays"]["input_ids"]["bytes_per_token"]}


# ----------------------------------------------------------------------------- the run

def code_version() -> dict:
    """The checkout the figures come from: its commit and whether tracked files differ."""
    def git(*argv: str) -> str:
        proc = subprocess.run(["git", "-C", str(ROOT), *argv], capture_output=True, text=True)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    return {"root": str(ROOT), "commit": git("rev-parse", "HEAD") or None,
            "modified": git("status", "--porcelain", "--untracked-files=no").splitlines()}


def load_teacher(path: str):
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(path).float().eval()
    teacher.requires_grad_(False)
    return teacher


def prepare(args) -> SimpleNamespace:
    """Corpus, teacher, student config and store: built, or reused from the cache."""
    from fidelity_corpus import build_corpus
    from fidelity_teacher import build_teacher, steps_for_minutes, student_config_dir

    corpus = build_corpus(args.cache)
    sizes = corpus["sizes_data"]
    print(f"corpus {corpus['dir']}: teacher {sizes['teacher']['tokens']:,} tokens, transfer "
          f"{sizes['transfer']['tokens']:,} ({sizes['teacher_to_transfer']}x less), held-out "
          f"{sizes['heldout']['tokens']:,}", flush=True)
    steps = args.teacher_steps or steps_for_minutes(args.teacher_size, args.teacher_minutes)
    teacher = build_teacher(args.cache, corpus, args.teacher_size, steps, run_tool)
    print(f"teacher {teacher['path']} ({'trained' if teacher['built'] else 'cached'}, "
          f"{teacher['steps']} steps, {teacher['train_s']:.0f}s)", flush=True)
    configs = parse_configs(args.configs)
    signals = list(dict.fromkeys(s for parts in configs.values() for s in parts))
    store = build_store(teacher, corpus["transfer"], args.work, signals)
    for name, s in store["signals"].items():
        print(f"  {name}: {s['bytes_per_token']:.2f} B/token ({s['entries_per_token']:.1f} "
              f"entries/token)", flush=True)
    preset = write_yaml(args.work / "train.yaml", "train", TRAIN)
    plan = SimpleNamespace(preset=preset, store=store["url"], work=args.work,
                           student_config=student_config_dir(args.cache, corpus),
                           configs=configs, signals=signals, epochs=args.epochs,
                           steps=args.steps)
    bytes_per_token = {c: sum(store["signals"][s]["bytes_per_token"] for s in parts)
                       for c, parts in configs.items()}
    return SimpleNamespace(corpus=corpus, teacher=teacher, store=store, plan=plan,
                           bytes_per_token=bytes_per_token)


def run_seeds(args, ready) -> list[dict]:
    from fidelity_metrics import heldout_metrics
    from fidelity_train import train_students

    teacher = load_teacher(ready.teacher["path"])
    runs = []
    for offset in range(args.seeds):
        run = train_students(ready.plan, teacher, args.seed + offset)
        run["heldout"], run["heldout_size"] = heldout_metrics(
            run.pop("students"), teacher, ready.corpus["tokenizer"], ready.corpus["heldout"],
            TRAIN["max_length"], args.heldout_limit)
        print("  held-out NLL: " + " ".join(f"{k}={v['nll']:.4f}"
                                            for k, v in run["heldout"].items()), flush=True)
        runs.append(run)
    return runs


def header(result: dict) -> list[str]:
    t, b = result["teacher"], result["budget"]
    return [f"teacher: Llama {t['params'] / 1e6:.1f}M ({t['size']}), {t['steps']} steps of "
            f"{t['train']['batch_tokens']} tokens on {b['teacher_tokens']:,} tokens of text",
            f"students: {b['steps']} steps of <= {TRAIN['batch_tokens']} tokens on the "
            f"transfer set ({b['transfer_tokens']:,} tokens, {b['batches_per_epoch']} batches "
            f"per epoch), {b['seeds']} seed(s); held-out {b['heldout_tokens']:,} tokens "
            f"({b['heldout_records']} documents)"]


def write_outputs(result: dict, args) -> str:
    from fidelity_report import plot, render

    text = render(result["summary"], header(result))
    png = plot(result["summary"], args.png,
               f"{result['budget']['seeds']} seeds, teacher {result['teacher']['params'] / 1e6:.1f}M"
               f" ({result['teacher']['steps']} steps); {result['date']}")
    result["table"], result["png"] = text, str(png)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str), encoding="utf-8")
    if args.markdown:
        args.markdown.write_text(text + f"\n\n![fidelity per byte]({png.name})\n", encoding="utf-8")
    print("\n" + text + f"\n\nwrote {args.out}, {png}"
          + (f", {args.markdown}" if args.markdown else ""), flush=True)
    return text


def run_benchmark(args, command: str) -> dict:
    import torch

    from fidelity_metrics import ECE_BINS, summarise

    load_start, started = os.getloadavg(), time.perf_counter()
    ready = prepare(args)
    runs = run_seeds(args, ready)
    size = runs[0]["heldout_size"]
    sizes = ready.corpus["sizes_data"]
    result = {
        "command": command, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(),
                    "loadavg_start": list(load_start), "loadavg_end": list(os.getloadavg())},
        "wall_s": round(time.perf_counter() - started, 1), "code": code_version(),
        "corpus": {"dir": str(ready.corpus["dir"]), **sizes},
        "teacher": ready.teacher, "store": ready.store,
        "settings": {"configs": ready.plan.configs, "dump": DUMP, "train": TRAIN,
                     "ece_bins": ECE_BINS, "bytes_per_token": ready.bytes_per_token},
        "budget": {"seeds": args.seeds, "steps": runs[0]["steps"],
                   "batches_per_epoch": runs[0]["batches_per_epoch"],
                   "teacher_tokens": sizes["teacher"]["tokens"],
                   "transfer_tokens": sizes["transfer"]["tokens"],
                   "heldout_records": size["records"], "heldout_tokens": size["tokens"]},
        "runs": runs, "summary": summarise(runs, ready.bytes_per_token)}
    write_outputs(result, args)
    return result


def parse_args(argv=None):
    from fidelity_teacher import TEACHER_SHAPES

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("--configs", default=",".join(FULL_SWEEP),
                   help="comma-separated configs: topkK, sampledN, their -f16 variants, "
                        "topkK+sampledN (default: the full sweep)")
    p.add_argument("--seeds", type=int, default=5, help="student seeds (>= 5 for the result)")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--teacher-size", default="medium", choices=sorted(TEACHER_SHAPES))
    p.add_argument("--teacher-minutes", type=float, default=45.0,
                   help="teacher training budget on this 2-core CPU (sets its steps)")
    p.add_argument("--teacher-steps", type=int, help="teacher steps (overrides the minutes)")
    p.add_argument("--epochs", type=float, default=1.0, help="student passes over the "
                   "transfer set")
    p.add_argument("--steps", type=int, help="student steps (overrides --epochs)")
    p.add_argument("--heldout-limit", type=int, help="at most this many held-out documents")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--cache", type=Path, default=OUT / "cache" / "fidelity",
                   help="corpus, teacher and student config (reused across runs)")
    p.add_argument("--work", type=Path, default=OUT / "fidelity", help="store and logs")
    p.add_argument("--out", type=Path, help="the JSON (default: bench/out/fidelity.json, or "
                   "the --from-json file)")
    p.add_argument("--png", type=Path, help="the plot (default: --out with .png)")
    p.add_argument("--markdown", type=Path, help="also write the report as markdown here")
    p.add_argument("--from-json", type=Path,
                   help="re-render tables and plot from this fidelity.json, no training")
    args = p.parse_args(argv)
    args.configs = [c for c in args.configs.split(",") if c]
    args.out = args.out or args.from_json or OUT / "fidelity.json"
    args.png = args.png or args.out.with_suffix(".png")
    if args.seeds < 1 or args.epochs <= 0 or not args.configs:
        p.error(f"expected --seeds >= 1, --epochs > 0 and at least one config, found "
                f"{args.seeds}, {args.epochs} and {args.configs}")
    try:
        parse_configs(args.configs)
    except ValueError as exc:
        p.error(str(exc))
    return args


def main(argv=None) -> dict:
    # Before torch starts OpenMP: waiting threads sleep instead of spinning, which on a shared
    # machine would make every step several times slower; the tools' subprocesses inherit it.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = parse_args(argv)
    if args.from_json:
        result = json.loads(args.from_json.read_text(encoding="utf-8"))
        write_outputs(result, args)
        return result
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars of every student copy
    if args.threads:
        torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "bench/fidelity.py",
                          *(sys.argv[1:] if argv is None else argv)])
    return run_benchmark(args, command)


if __name__ == "__main__":
    main()
