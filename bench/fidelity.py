"""Fidelity benchmark: does a student distilled from the store learn what online KD teaches?

    python bench/fidelity.py --demo-out demo_out [--epochs 1] [--seeds 1] [--quick]

One teacher, five students trained side by side, one table:

teacher  The demo teacher, DEMO_OUT/runs/teacher/final, with DEMO_OUT/tokenizer, the student
         initialisation DEMO_OUT/init/student and the corpus splits DEMO_OUT/corpus/
         {distill,heldout}.jsonl. What is missing is built first by `demo/run_demo.py --out
         DEMO_OUT --only teacher` (a subprocess; the demo reuses its finished stages).
stores   The real `teacher-dump` CLI (a subprocess) dumps distill.jsonl into one store three
         times, each run adding a signal over the same tokens: topk8 (top-k 8), topk64 (top-k
         64), sampled50 (50 draws at T = 1), all q8 (the default encoding), no hidden or
         attention capture; the other dump settings are the demo preset's `dump:` section.
         Bytes per token of each signal come from `logitstore info --json` (on-disk sizes).
         The store is reused while the teacher's weights, the data and the settings match.
students Five copies of the SAME initial weights, trained in ONE loop on the SAME batches
         (one StoreStream holding all three signals, so the data order is identical by
         construction) with the SAME optimizer (student_train.train.make_optimizer: AdamW),
         lr schedule (transformers.get_scheduler, the preset's cosine + warmup), steps and
         seed, each step being student_train.step.Step.train (the real loop):
           ce         CE only: DistillationObjective with no signal (what --data trains)
           topk8      KD from the topk8 signal   } plans from student_train.sources.plan_signals
           topk64     KD from the topk64 signal  } (--signals NAME --target topk|sampled), the
           sampled50  KD from the sampled50 signal} objective's chunked lm_head + sparse KD
           online     the teacher in memory: its full logits, full-vocabulary forward KL at
                      T = 1 (reference_losses.dense_kd_per_position) on the student's full logits
         KD variants use the same blend: alpha 0.5 (0.5 KD + 0.5 CE), loss kl, top-k mode tail,
         T = 1; hidden and attention terms are off everywhere, so only the token target
         differs. Other settings are the demo preset's `train:` section, except eval_fraction
         0 (every distill document is trained on; held-out text is heldout.jsonl) and the
         step budget (--epochs passes over the distill split).
budget   Default 1 epoch (150 steps of <= 1024 tokens, the demo's own student budget): KD can
         only beat CE on held-out text while the teacher predicts it better than the CE-only
         student learns to, and the demo teacher (held-out NLL ~3.79, one pass over the
         corpus) is overtaken by a CE-only student after 2 epochs (~2.76: the corpus is
         templated, so a second pass memorises it). The report warns when that happens.
timing   Step time = median seconds of Step.train per variant, measured in the same loop,
         variants interleaved within every step (their order rotating step by step). Store
         variants also report their loader cost: one epoch of a StoreStream reading only their
         signal, with no model, per batch (train.py reads the stream in the training process).
metrics  On heldout.jsonl (records neither the teacher nor the students trained on), for
         every student and the teacher: mean next-token NLL (nats) and perplexity, next-token
         accuracy, expected calibration error (see `expected_calibration_error`) and the mean
         KL(teacher || model) over the full vocabulary.
goals    (issue 6) sampled50 within 0.5% of online KD on held-out NLL (one-sided:
         (sampled - online) / online <= 0.005) and better than topk64; every KD variant better
         than CE only; sampled50 <= 24 bytes/token. Verdicts are computed from the figures.
seeds    --seeds N repeats the five students N times: seed 0 starts from DEMO_OUT/init/student
         with stream seed --seed; seed i > 0 re-draws the initial weights from the same
         config (torch.manual_seed(--seed + i)) and shuffles with stream seed --seed + i.
         Tables show mean +- std (sample std) over seeds.

JSON (command line, date, machine, teacher, settings, every figure) -> bench/out/fidelity.json.
Timings on a shared machine are noisy: the load averages around the run are recorded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from fidelity_metrics import ECE_BINS, VARIANTS, heldout_metrics, render, summarise

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the dense reference losses (online KD baseline)
# the store variants' signals (their names are VARIANTS[1:4]): one teacher-dump run each
SIGNALS = {"topk8": {"top_k": 8, "samples": 0, "target": "topk"},
           "topk64": {"top_k": 64, "samples": 0, "target": "topk"},
           "sampled50": {"top_k": 0, "samples": 50, "target": "sampled"}}
SAMPLE_TEMPERATURE = 1.0


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
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- demo and stores

def demo_paths(demo_out: Path) -> dict[str, Path]:
    return {"teacher": demo_out / "runs" / "teacher" / "final",
            "tokenizer": demo_out / "tokenizer", "student_init": demo_out / "init" / "student",
            "distill": demo_out / "corpus" / "distill.jsonl",
            "heldout": demo_out / "corpus" / "heldout.jsonl"}


def ensure_demo(demo_out: Path, scale: str, work: Path) -> dict[str, Path]:
    """The demo's teacher, student init and splits; built by run_demo.py when missing."""
    paths = demo_paths(demo_out)
    missing = [k for k, p in paths.items()
               if not (p / "model.safetensors" if k in ("teacher", "student_init") else p).exists()]
    if missing:
        print(f"demo artifacts missing ({', '.join(missing)}): building them with "
              f"demo/run_demo.py --out {demo_out} --scale {scale} --only teacher", flush=True)
        t0 = time.perf_counter()
        run_tool([str(ROOT / "demo" / "run_demo.py"), "--out", str(demo_out), "--scale", scale,
                  "--only", "teacher"], work / "logs" / "run_demo.log")
        print(f"  built in {time.perf_counter() - t0:.0f}s", flush=True)
    return paths


def dump_preset(work: Path, preset: Path) -> Path:
    """The demo preset's `dump:` section without hidden/attention capture (token targets only)."""
    import yaml

    section = dict(yaml.safe_load(preset.read_text(encoding="utf-8"))["dump"])
    section.update(hidden_layers=[], attention_layers=[], sample_temperature=SAMPLE_TEMPERATURE)
    out = work / "dump.yaml"
    out.write_text("# written by bench/fidelity.py from " + str(preset) + "\n"
                   + yaml.safe_dump({"dump": section}, sort_keys=False), encoding="utf-8")
    return out


def build_store(paths: dict[str, Path], work: Path, preset: Path, limit: int | None) -> dict:
    """One store, three signals over the same tokens, each added by a `teacher-dump` run."""
    import shutil

    store, config = work / "store", dump_preset(work, preset)
    stamp = {"teacher": file_sha256(paths["teacher"] / "model.safetensors"),
             "data": file_sha256(paths["distill"]), "dump": config.read_text(encoding="utf-8"),
             "signals": SIGNALS, "limit": limit}
    stamp_file = work / "store.stamp.json"
    saved = json.loads(stamp_file.read_text()) if stamp_file.is_file() else {}
    reuse = saved.get("inputs") == stamp
    if not reuse and store.exists():
        shutil.rmtree(store)  # another teacher, data or settings: dump afresh
    seconds = saved.get("dump_s", {}) if reuse else {}
    commands = {}
    for name, spec in SIGNALS.items():
        argv = ["-m", "teacher_dump", "--config", str(config), "--model", str(paths["teacher"]),
                "--data", str(paths["distill"]), "--out", str(store), "--signal", name,
                "--top-k", str(spec["top_k"]), "--samples", str(spec["samples"]), "--no-progress"]
        argv += ["--limit", str(limit)] if limit else []
        commands[name] = "python " + shlex.join(argv)
        if reuse:
            continue
        print(f"  $ teacher-dump ... --signal {name} --top-k {spec['top_k']} "
              f"--samples {spec['samples']}", flush=True)
        t0 = time.perf_counter()
        run_tool(argv, work / "logs" / f"dump-{name}.log")
        seconds[name] = round(time.perf_counter() - t0, 1)
    stamp_file.write_text(json.dumps({"inputs": stamp, "dump_s": seconds}))
    info = json.loads(run_tool(["-m", "logitstore.cli", "info", "--json", str(store)],
                               work / "logs" / "info.log"))
    sizes = info["sizes"]
    signals = {}
    for name, spec in SIGNALS.items():
        kind = spec["target"]
        s = sizes["signals"][name][kind]
        signals[name] = {"kind": kind, "bytes_per_token": s["bytes_per_token"],
                         "bytes_per_entry": s["bytes_per_entry"],
                         "entries_per_token": s["entries_per_token"],
                         "compression_ratio": s["compression_ratio"], "dump_s": seconds.get(name),
                         "command": commands[name]}
    return {"url": str(store), "reused": reuse, "counts": info["counts"], "signals": signals,
            "input_ids_bytes_per_token": sizes["arrays"]["input_ids"]["bytes_per_token"],
            "total_bytes_per_token": sizes["bytes_per_token"], "preset": str(config)}


# ----------------------------------------------------------------------------- training

def train_config(preset: Path, store: str, student: Path, out: Path, steps: int, seed: int,
                 **overrides):
    """The preset's `train:` section as student-train resolves it, KD target terms only."""
    from student_train.config import resolve_config

    return resolve_config(preset, {"store": store, "student": str(student), "out": str(out),
                                   "hidden_weight": 0.0, "attention_weight": 0.0,
                                   "eval_fraction": 0.0, "max_steps": steps, "seed": seed,
                                   **overrides})


def initial_student(init_dir: Path, seed_offset: int, seed: int):
    """fp32 student: the demo's init (seed_offset 0), else weights re-drawn from its config."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if seed_offset == 0:
        return AutoModelForCausalLM.from_pretrained(init_dir).float()
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(init_dir))


def online_module(student, teacher):
    """Online KD: the teacher's full logits [B, S, V] in memory, full-vocabulary forward KL."""
    import torch
    from torch import nn

    from reference_losses import dense_kd_per_position
    from student_train.losses import cross_entropy_per_position
    from student_train.objective import IGNORE, shifted, target_positions

    class OnlineKD(nn.Module):
        def __init__(self):
            super().__init__()
            self.student = student
            self.teacher = [teacher]  # a list, not a submodule: neither trained nor clipped

        def forward(self, batch, temperature=1.0, label_smoothing=0.0, n_groups=1):
            inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          position_ids=batch["position_ids"], use_cache=False)
            with torch.no_grad():
                t_logits = self.teacher[0](**inputs).logits  # [B, S, V]
            s_logits = self.student(**inputs).logits  # [B, S, V]
            w = shifted(batch["token_weights"].float(), 0.0) * target_positions(batch)  # [B, S]
            kd = dense_kd_per_position(s_logits, t_logits, temperature=temperature)  # [B, S]
            ce = cross_entropy_per_position(s_logits, shifted(batch["labels"], IGNORE),
                                            label_smoothing=label_smoothing)  # [B, S]
            # sums, shaped as DistillationObjective's: kd [n_kd, groups], ce [groups]
            return {"kd": (kd * w).sum().reshape(1, 1), "ce": (ce * w).sum().reshape(1)}

    return OnlineKD()


class Variant:
    """One student: its module, AdamW, schedule and Step, on the accelerator."""

    def __init__(self, name: str, cfg, student, reader_settings, teacher, accelerator):
        from accelerate.utils import set_seed
        from transformers import get_scheduler

        from logitstore.errors import ConfigError
        from student_train.objective import DistillationObjective, LossSettings, SignalPlan
        from student_train.sources import plan_signals
        from student_train.step import Step
        from student_train.train import make_optimizer

        self.name, self.cfg = name, cfg
        set_seed(cfg.seed)
        settings = LossSettings(loss=cfg.loss, topk_mode=cfg.topk_mode, jsd_beta=cfg.jsd_beta,
                                skew_alpha=cfg.skew_alpha, chunk_size=cfg.lm_head_chunk)
        if name == "ce":
            module, plans = DistillationObjective(student, [], settings), []
        elif name == "online":
            module = online_module(student, teacher)
            plans = [SignalPlan("online-teacher", kd_weight=1.0, target="dense")]
        else:
            problems: list[str] = []
            plans, _ = plan_signals(cfg, reader_settings, student, problems)
            if problems:
                raise ConfigError(problems)
            module = DistillationObjective(student, plans, settings)
        optimizer = make_optimizer(cfg, module)
        self.scheduler = get_scheduler(cfg.lr_schedule, optimizer,
                                       num_warmup_steps=math.ceil(cfg.warmup_ratio * cfg.max_steps),
                                       num_training_steps=cfg.max_steps)
        self.model, self.optimizer = accelerator.prepare(module, optimizer)
        self.student = student
        sources = SimpleNamespace(groups=[], group_weights=[], plans=plans, group_of={})
        self.step = Step(cfg, accelerator, self.model, sources)
        self.times: list[float] = []  # seconds per Step.train, the first one included
        self.losses: list[float] = []

    def train_step(self, batch: dict) -> None:
        t0 = time.perf_counter()
        stats = self.step.train([batch], self.cfg.temperature, self.optimizer, self.scheduler)
        self.times.append(time.perf_counter() - t0)
        self.losses.append(stats["loss"])


def loader_seconds_per_batch(store: str, signal: str, batch_tokens: int, seed: int) -> float:
    """One epoch of a StoreStream reading only `signal`, no model: seconds per batch."""
    from student_train.stream import StoreStream

    stream = StoreStream(store, signals=[signal], batch_tokens=batch_tokens, seed=seed)
    t0, n = time.perf_counter(), 0
    for _ in stream:
        n += 1
    return (time.perf_counter() - t0) / max(1, n)


def train_students(args, paths, store: dict, teacher, seed_offset: int) -> dict:
    """The five students of one seed, trained in one interleaved loop; returns them + timings."""
    from accelerate import Accelerator

    from logitstore.reader import StoreReader
    from student_train.stream import StoreStream

    seed = args.seed + seed_offset
    probe = train_config(args.preset, store["url"], paths["student_init"], args.work / "run", 1,
                         seed)
    stream = StoreStream(store["url"], signals=list(SIGNALS), batch_tokens=probe.batch_tokens,
                         seed=seed, shuffle=probe.shuffle)
    per_epoch = stream.num_batches()
    steps = max(1, round(args.epochs * per_epoch))
    settings = StoreReader(store["url"]).settings
    accelerator = Accelerator(mixed_precision="no")  # fp32 everywhere, as train.py on CPU
    variants = []
    for name in VARIANTS:
        extra = ({"signals": {name: 1.0}, "target": SIGNALS[name]["target"]}
                 if name in SIGNALS else {})
        cfg = train_config(args.preset, store["url"], paths["student_init"],
                           args.work / "run" / name, steps, seed, **extra)
        student = initial_student(paths["student_init"], seed_offset, seed).train()
        variants.append(Variant(name, cfg, student, settings, teacher, accelerator))
    print(f"seed {seed}: {steps} steps ({args.epochs:g} epochs x {per_epoch} batches of <= "
          f"{probe.batch_tokens} tokens), variants interleaved", flush=True)
    step, epoch, tokens = 0, 0, 0
    started = time.perf_counter()
    while step < steps:
        stream.set_epoch(epoch)
        for batch in stream:
            if step >= steps:
                break
            shift = step % len(variants)
            for v in variants[shift:] + variants[:shift]:
                v.train_step(batch)
            tokens += int(batch["attention_mask"].sum())
            step += 1
            if step % max(1, steps // 10) == 0 or step == steps:
                print(f"  step {step}/{steps} ({time.perf_counter() - started:.0f}s) "
                      + " ".join(f"{v.name}={v.losses[-1]:.3f}" for v in variants), flush=True)
        epoch += 1
    load = {name: loader_seconds_per_batch(store["url"], name, probe.batch_tokens, seed)
            for name in SIGNALS}
    return {"seed": seed, "steps": steps, "batches_per_epoch": per_epoch, "tokens": tokens,
            "train_s": round(time.perf_counter() - started, 1),
            "students": {v.name: v.student.eval() for v in variants},
            # the first step pays lazy initialisation (kernels, optimizer state): not timed
            "step_s": {v.name: statistics.median(v.times[1:] or v.times) for v in variants},
            "load_s_per_batch": load,
            "loss_first_last": {v.name: [v.losses[0], v.losses[-1]] for v in variants},
            "config": variants[0].cfg.as_dict()}


def code_version() -> dict:
    """The checkout the figures come from: its commit and whether tracked files differ."""
    def git(*argv: str) -> str:
        proc = subprocess.run(["git", "-C", str(ROOT), *argv], capture_output=True, text=True)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    return {"root": str(ROOT), "commit": git("rev-parse", "HEAD") or None,
            "modified": git("status", "--porcelain", "--untracked-files=no").splitlines()}


def load_teacher(path: Path):
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(path).float().eval()
    teacher.requires_grad_(False)
    return teacher


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("--demo-out", type=Path, default=ROOT / "demo_out",
                   help="the demo's output directory (built when missing)")
    p.add_argument("--demo-scale", default="default", choices=("default", "tiny"),
                   help="scale run_demo.py builds a missing demo at")
    p.add_argument("--teacher", type=Path,
                   help="teacher directory (default: DEMO_OUT/runs/teacher/final); same tokenizer")
    p.add_argument("--preset", type=Path, default=ROOT / "demo" / "configs" / "default.yaml",
                   help="dump: and train: settings (the demo's)")
    p.add_argument("--epochs", type=float, default=1.0,
                   help="passes over the distill split (see `budget` in the module docstring)")
    p.add_argument("--seeds", type=int, default=1, help="repeat with this many student seeds")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 32 dumped samples, 0.5 epoch, 64 held-out records")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--work", type=Path, help="store and logs (default: bench/out/fidelity, "
                   "bench/out/fidelity-quick with --quick)")
    p.add_argument("--out", type=Path, help="JSON (default: bench/out/fidelity.json, "
                   "bench/out/fidelity-quick.json with --quick)")
    args = p.parse_args(argv)
    suffix = "-quick" if args.quick else ""
    args.work = args.work or ROOT / "bench" / "out" / f"fidelity{suffix}"
    args.out = args.out or ROOT / "bench" / "out" / f"fidelity{suffix}.json"
    if args.quick:
        args.epochs = min(args.epochs, 0.5)
    if args.seeds < 1 or args.epochs <= 0:
        p.error(f"expected --seeds >= 1 and --epochs > 0, found {args.seeds} and {args.epochs}")
    return args


def main(argv=None) -> dict:
    # Before torch starts OpenMP: waiting threads sleep instead of spinning. With other work
    # on the cores, spinning threads fight for them and steps run several times slower
    # (demo/run_demo.py does the same); the tools' subprocesses inherit it.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    from transformers.utils import logging as hf_logging

    args = parse_args(argv)
    hf_logging.disable_progress_bar()  # "Loading weights" bars of every student copy
    if args.threads:
        torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "bench/fidelity.py",
                          *(sys.argv[1:] if argv is None else argv)])
    load_start, started = os.getloadavg(), time.perf_counter()
    paths = ensure_demo(args.demo_out.resolve(), args.demo_scale, args.work)
    if args.teacher:  # another teacher of the same tokenizer (stated in the output)
        paths["teacher"] = args.teacher.resolve()
    print(f"stores: teacher-dump of {paths['distill']}", flush=True)
    store = build_store(paths, args.work, args.preset, 32 if args.quick else None)
    for name, s in store["signals"].items():
        print(f"  {name}: {s['bytes_per_token']:.2f} B/token ({s['bytes_per_entry']:.2f} B/entry, "
              f"{s['entries_per_token']:.1f} entries/token)" + (" (reused)" if store["reused"]
                                                                 else ""), flush=True)
    teacher = load_teacher(paths["teacher"])
    teacher_info = {"path": str(paths["teacher"]),
                    "params": sum(p.numel() for p in teacher.parameters()),
                    "weights_sha256": file_sha256(paths["teacher"] / "model.safetensors")}
    runs = []
    for offset in range(args.seeds):
        run = train_students(args, paths, store, teacher, offset)
        run["heldout"], heldout_size = heldout_metrics(
            run.pop("students"), teacher, paths, run["config"]["max_length"],
            64 if args.quick else None)
        print(f"  held-out NLL: " + " ".join(f"{k}={v['nll']:.4f}"
                                             for k, v in run["heldout"].items()), flush=True)
        runs.append(run)
    teacher_info["heldout"] = runs[0]["heldout"]["teacher"]
    summary = summarise(runs, store)
    budget = {"epochs": args.epochs, "steps": runs[0]["steps"], "seeds": args.seeds,
              "batches_per_epoch": runs[0]["batches_per_epoch"],
              "tokens_per_student": runs[0]["tokens"], "heldout_records": heldout_size["records"],
              "heldout_tokens": heldout_size["tokens"]}
    text = render(summary, store, teacher_info, budget)
    print("\n" + text, flush=True)
    result = {
        "command": command, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                    "loadavg_start": list(load_start), "loadavg_end": list(os.getloadavg())},
        "wall_s": round(time.perf_counter() - started, 1),
        "code": code_version(), "teacher": teacher_info,
        "demo_out": str(args.demo_out.resolve()),
        "settings": {"epochs": args.epochs, "seeds": args.seeds, "seed": args.seed,
                     "quick": args.quick, "preset": str(args.preset), "signals": SIGNALS,
                     "train_config": runs[0]["config"], "ece_bins": ECE_BINS,
                     "step_timing": "median Step.train seconds; the five variants interleaved "
                                    "within every step, their order rotating"},
        "budget": budget, "store": store, "runs": runs, **summary, "table": text,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str), encoding="utf-8")
    print(f"wrote {args.out}", flush=True)
    return result


if __name__ == "__main__":
    main()
