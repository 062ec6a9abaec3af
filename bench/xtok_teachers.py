"""Teachers and stores of the cross-tokenizer benchmark, built once and cached.

build_teacher   a Llama for tokenizer A or B trained from scratch on every train record of the
                medical corpus by the real `student-train --data` (hard labels, a subprocess);
                cached in CACHE/teacher-NAME-KEY/, KEY = SHA-256 of the corpus key, the
                tokenizer, the shape and the training settings
build_store     the teacher's `teacher-dump` of the transfer set: top-k and, in the same
                signal, 16 draws at T = 1 with their log-probs (teacher-dump's default
                capture, for the -draws students); sample text and token spans kept, the
                dump's default; reused while the teacher, data and settings match (a stamp
                file), else dumped afresh
build_two_teacher_store   store A copied to store-AB, then teacher B's signal added to it by
                the real `teacher-dump --model B --signal topk{k}-B --out store-AB` (no
                --data: B cuts each stored text with its own tokenizer, format 2.2); the
                store the two-teacher student reads; reused while store A and teacher B match
save_model      a Llama of a shape for a tokenizer: config + tokenizer (+ seeded weights)
"""

from __future__ import annotations

import hashlib
import json
import shlex
import shutil
import time
from pathlib import Path

CONTEXT = 1024  # positions: tokenizer C spells a 1.2 kB record in up to ~500 tokens
# "small": the run's (teachers 2.79M / 3.58M with vocabularies of 4k / 6k, students 1.84M / 1.57M);
# "tiny": the test's, which only checks the machinery
TEACHER_SHAPES = {
    "small": {"hidden_size": 192, "intermediate_size": 512, "num_hidden_layers": 3,
              "num_attention_heads": 4, "num_key_value_heads": 2},
    "tiny": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
             "num_attention_heads": 2, "num_key_value_heads": 1}}
STUDENT_SHAPES = {
    "small": {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
              "num_attention_heads": 4, "num_key_value_heads": 2},
    "tiny": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
             "num_attention_heads": 2, "num_key_value_heads": 1}}
TEACHER_TRAIN = {"max_length": 512, "batch_tokens": 4096, "lr": 3.0e-3, "adam_beta2": 0.95,
                 "warmup_ratio": 0.03, "lr_schedule": "cosine", "eval_fraction": 0.0,
                 "save_every": 0, "log_every": 50, "seed": 0}
DUMP = {"quantize": "none", "dtype": "float32", "device": "cpu", "max_length": 512,
        "batch_tokens": 4096, "logits_chunk": 256, "samples": 16, "seed": 0,
        "hidden_layers": [], "attention_layers": [], "segment_tokens": 32768,
        "chunk_tokens": 4096, "chunk_samples": 64}


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def dir_sha256(directory: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(Path(directory).iterdir()):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def write_yaml(path: Path, section: str, values: dict) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# written by bench/cross_tokenizer_bench.py\n"
                    + yaml.safe_dump({section: values}, sort_keys=False), encoding="utf-8")
    return path


def save_model(directory: Path, tokenizer_dir: Path, shape: dict, seed: int | None):
    """A Llama of `shape` for the tokenizer -> directory (seeded weights, or config and
    tokenizer only when seed is None; this bench's context). Returns the model (None without
    weights)."""
    from fidelity_teacher import save_model_dir

    return save_model_dir(directory, tokenizer_dir, shape, seed, context=CONTEXT)


def build_teacher(cache: Path, corpus: dict, name: str, size: str, steps: int,
                  run_tool) -> dict:
    """Teacher `name` (A or B: its tokenizer), trained or reused (module docstring);
    `run_tool(argv, log)` runs a tool of this checkout as a subprocess."""
    tokenizer = corpus["tokenizers"][name]
    settings = {"corpus": corpus["key"], "tokenizer": dir_sha256(tokenizer),
                "shape": TEACHER_SHAPES[size], "context": CONTEXT, "train": TEACHER_TRAIN,
                "steps": steps}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    home = Path(cache) / f"teacher-{name}-{key[:12]}"
    done, final = home / "done.json", home / "run" / "final"
    if done.is_file():
        return {**json.loads(done.read_text()), "path": str(final), "built": False}
    if home.exists():
        shutil.rmtree(home)  # a run that did not finish
    model = save_model(home / "init", tokenizer, TEACHER_SHAPES[size], seed=0)
    params = sum(p.numel() for p in model.parameters())
    config = write_yaml(home / "teacher.yaml", "train", {**TEACHER_TRAIN, "max_steps": steps})
    argv = ["-m", "student_train", "--config", str(config), "--data", str(corpus["teacher"]),
            "--student", str(home / "init"), "--out", str(home / "run")]
    print(f"teacher {name}: {params / 1e6:.2f}M parameters, {steps} steps of "
          f"{TEACHER_TRAIN['batch_tokens']} tokens -> {home}", flush=True)
    started = time.perf_counter()
    run_tool(argv, home / "train.log")
    info = {"name": name, "size": size, "shape": TEACHER_SHAPES[size], "params": params, "steps": steps,
            "train": TEACHER_TRAIN, "key": key, "vocab_size": model.config.vocab_size,
            "train_s": round(time.perf_counter() - started, 1),
            "command": "python " + shlex.join(argv)}
    done.write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    return {**info, "path": str(final), "built": True}


def build_store(teacher: dict, transfer: Path, work: Path, top_k: int, run_tool) -> dict:
    """Store of the teacher's top-k over the transfer set, signal `topk{top_k}` (module
    docstring); {url, signal, dump_s, command, bytes_per_token, text_bytes_per_token}."""
    name = teacher["name"]
    store, signal = Path(work) / f"store-{name}", f"topk{top_k}"
    dump = {**DUMP, "top_k": top_k}
    config = write_yaml(Path(work) / f"dump-{name}.yaml", "dump", dump)
    inputs = {"teacher": teacher["key"], "data": file_sha256(transfer), "dump": dump}
    stamp_file = Path(work) / f"store-{name}.stamp.json"
    saved = json.loads(stamp_file.read_text()) if stamp_file.is_file() else {}
    if saved.get("inputs") != inputs:
        if store.exists():
            shutil.rmtree(store)
        argv = ["-m", "teacher_dump", "--config", str(config), "--model", teacher["path"],
                "--data", str(transfer), "--out", str(store), "--signal", signal,
                "--no-progress"]
        print(f"  $ teacher-dump --model teacher-{name} --signal {signal} --top-k {top_k} "
              f"--samples {dump['samples']}", flush=True)
        t0 = time.perf_counter()
        run_tool(argv, Path(work) / "logs" / f"dump-{name}.log")
        saved = {"inputs": inputs, "dump_s": round(time.perf_counter() - t0, 1),
                 "command": "python " + shlex.join(argv)}
        stamp_file.write_text(json.dumps(saved))
    info = json.loads(run_tool(["-m", "logitstore.cli", "info", "--json", str(store)],
                               Path(work) / "logs" / f"info-{name}.log"))
    sizes = info["sizes"]
    return {"url": str(store), "signal": signal, "dump_s": saved["dump_s"],
            "command": saved["command"], "counts": info["counts"],
            "bytes_per_token": sizes["signals"][signal]["topk"]["bytes_per_token"],
            "sizes": sizes}


def two_teacher_signal(top_k: int) -> str:
    """Teacher B's signal name in the two-teacher store (A's is `topk{top_k}`)."""
    return f"topk{top_k}-B"


def build_two_teacher_store(store_a: dict, teacher_b: dict, work: Path, top_k: int,
                            run_tool) -> dict:
    """Store AB: a copy of store A plus teacher B's top-k on B's own tokenization of the
    stored texts (module docstring); {url, signals, dump_s, command, counts, bytes_per_token}
    (bytes_per_token: of B's signal)."""
    work = Path(work)
    store, signal_b = work / "store-AB", two_teacher_signal(top_k)
    dump = {**DUMP, "top_k": top_k}
    config = write_yaml(work / "dump-AB.yaml", "dump", dump)
    stamp_a = json.loads((work / "store-A.stamp.json").read_text())
    inputs = {"store_a": stamp_a["inputs"], "teacher_b": teacher_b["key"], "dump": dump}
    stamp_file = work / "store-AB.stamp.json"
    saved = json.loads(stamp_file.read_text()) if stamp_file.is_file() else {}
    if saved.get("inputs") != inputs:
        if store.exists():
            shutil.rmtree(store)
        shutil.copytree(store_a["url"], store)
        argv = ["-m", "teacher_dump", "--config", str(config), "--model", teacher_b["path"],
                "--out", str(store), "--signal", signal_b, "--no-progress"]
        print(f"  $ teacher-dump --model teacher-B --signal {signal_b} --out store-AB "
              f"(a copy of store A)", flush=True)
        t0 = time.perf_counter()
        run_tool(argv, work / "logs" / "dump-AB.log")
        saved = {"inputs": inputs, "dump_s": round(time.perf_counter() - t0, 1),
                 "command": "python " + shlex.join(argv)}
        stamp_file.write_text(json.dumps(saved))
    info = json.loads(run_tool(["-m", "logitstore.cli", "info", "--json", str(store)],
                               work / "logs" / "info-AB.log"))
    return {"url": str(store), "signals": [store_a["signal"], signal_b],
            "dump_s": saved["dump_s"], "command": saved["command"], "counts": info["counts"],
            "bytes_per_token": info["sizes"]["signals"][signal_b]["topk"]["bytes_per_token"]}
