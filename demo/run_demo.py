#!/usr/bin/env python3
"""`make demo`: the whole logitstore pipeline on the bundled medical corpus, on a CPU.

    python demo/run_demo.py --out demo_out [--scale default|tiny] [--subprocess] [-v]

Stages, each one a call of the real command-line tool (the arguments are printed, and
saved in OUT/commands.sh so any stage can be rerun by hand):

  corpus     demo/make_corpus.py -> OUT/corpus/{train,heldout,...}.jsonl and the
             knowledge-base multiple-choice eval set OUT/corpus/medmcq_kb.jsonl
  tokenizer  byte-level BPE trained on train.jsonl with `tokenizers` -> OUT/tokenizer;
             train records grouped into documents of <= N tokens -> corpus/documents.jsonl,
             its first documents -> corpus/distill.jsonl (the transfer set: a held-in
             split, >= 10x smaller than the teacher's text; sizes in split_sizes.json)
  init       randomly initialised (seeded) Llama teacher and smaller student -> OUT/init/
  teacher    student-train --data documents.jsonl (hard labels) -> OUT/runs/teacher/final
  dump       teacher-dump of distill.jsonl (top-k, sampled, hidden, attention) -> OUT/store
  inspect    logitstore info + logitstore verify -> OUT/inspect/{info,verify}.txt
  student    student-train --store (KD + hidden + attention) -> OUT/runs/student/final
  baseline   student-train --data distill.jsonl, same settings, no teacher
             -> OUT/runs/baseline/final
  eval       distill-eval teacher/student/baseline on the bundled tasks, medmcq_kb and
             the held-out documents -> OUT/report/report.{md,json,png} (values with
             standard errors; which student-baseline differences are resolved)

Settings come from demo/configs/SCALE.yaml (`demo:`, `dump:` and `train:` sections) and
demo/configs/SCALE-teacher.yaml. Everything is seeded, so a run is reproducible.

Rerunning reuses finished stages: a finished stage writes OUT/.stages/NAME.json with a
key (hash of its settings, its code in this file and the keys of the stages before it);
it is skipped while that key is unchanged, and rerun from scratch (its output removed
first) otherwise, together with every later stage. `--force` reruns everything.

By default the tools run in this process (their click entry points, called with the
printed arguments: one import of torch/transformers instead of eight); `--subprocess`
runs each through its console script instead. Each stage's output goes to OUT/logs/.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import io
import json
import logging
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

DEMO_DIR = Path(__file__).resolve().parent
REPO = DEMO_DIR.parent
CONFIG_DIR = DEMO_DIR / "configs"
SCALES = ("default", "tiny")

# tool -> (module, click command attribute); the console scripts of pyproject.toml.
TOOLS = {
    "student-train": ("student_train.cli", "main"),
    "teacher-dump": ("teacher_dump.cli", "teacher_dump"),
    "logitstore": ("logitstore.cli", "main"),
    "distill-eval": ("eval.cli", "distill_eval"),
}
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>",
                  "unk_token": "<unk>"}


class DemoError(Exception):
    """A stage failed; the message names its log."""


# ----------------------------------------------------------------------------- settings


def load_settings(scale: str) -> dict[str, Any]:
    import yaml

    preset = CONFIG_DIR / f"{scale}.yaml"
    teacher = CONFIG_DIR / f"{scale}-teacher.yaml"
    data = yaml.safe_load(preset.read_text(encoding="utf-8"))
    return {"scale": scale, "preset": preset, "teacher_preset": teacher, "demo": data["demo"],
            "dump": data["dump"], "train": data["train"], "eval": data["eval"]}


def _sha(*parts: Any) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()


def _file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- running tools


class _CurrentStderr(io.TextIOBase):
    """Logging's stream: whatever sys.stderr is now (a stage's log while it runs)."""

    def write(self, s: str) -> int:
        return sys.stderr.write(s)

    def flush(self) -> None:
        sys.stderr.flush()


class _Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, s: str) -> int:
        for stream in self.streams:
            stream.write(s)
        return len(s)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()

    def isatty(self) -> bool:
        return False


def _rel(path: Path | str, out: Path) -> str:
    """A path as shown to the user: relative to the repo or cwd when it is inside them."""
    path = Path(path).resolve()
    for base in (Path.cwd().resolve(), REPO):
        try:
            return str(path.relative_to(base))
        except ValueError:
            continue
    return str(path)


@dataclass
class Runner:
    out: Path
    subprocess: bool = False
    verbose: bool = False
    commands: list[str] = field(default_factory=list)

    def shell(self, tool: str, argv: list[str]) -> str:
        return " ".join([tool] + [shlex.quote(a) for a in argv])

    def shown(self, tool: str, argv: list[str]) -> str:
        """The command as printed: paths under the current directory made relative."""
        here = str(Path.cwd().resolve()) + os.sep
        return self.shell(tool, [a.removeprefix(here) for a in argv])

    def run(self, stage: str, tool: str, argv: list[str], *, check: bool = True,
            log_name: str | None = None) -> int:
        """Run `tool argv` with its output in OUT/logs/; returns the exit status."""
        log = self.out / "logs" / f"{log_name or stage}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        command = self.shell(tool, argv)
        self.commands.append(command)  # absolute paths: commands.sh runs from anywhere
        print(f"    $ {self.shown(tool, argv)}", flush=True)
        with open(log, "w", encoding="utf-8") as fh:
            fh.write(f"$ {command}\n")
            fh.flush()
            code = (self._subprocess if self.subprocess else self._in_process)(tool, argv, fh)
        if check and code != 0:
            tail = "".join(log.read_text(encoding="utf-8", errors="replace")
                           .splitlines(keepends=True)[-15:])
            raise DemoError(f"stage {stage}: `{tool}` exited with {code}; log: {log}\n{tail}")
        return code

    def _in_process(self, tool: str, argv: list[str], fh) -> int:
        module, attr = TOOLS[tool]
        command = getattr(importlib.import_module(module), attr)
        stream = _Tee(fh, sys.__stdout__) if self.verbose else fh
        with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
            try:
                command.main(args=argv, prog_name=tool, standalone_mode=True)
                return 0
            except SystemExit as exc:  # click's standalone mode always ends with one
                if exc.code is None:
                    return 0
                return exc.code if isinstance(exc.code, int) else 1
            except Exception:  # a bug in a tool: its traceback goes to the stage log
                traceback.print_exc()
                return 1

    def _subprocess(self, tool: str, argv: list[str], fh) -> int:
        script = Path(sys.executable).parent / tool
        module = TOOLS[tool][0].removesuffix(".cli") if tool != "logitstore" else TOOLS[tool][0]
        cmd = [str(script)] if script.exists() else [sys.executable, "-m", module]
        if not self.verbose:
            return subprocess.run(cmd + argv, stdout=fh, stderr=subprocess.STDOUT,
                                  cwd=REPO).returncode
        proc = subprocess.Popen(cmd + argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                cwd=REPO, text=True)
        for line in proc.stdout:
            fh.write(line)
            sys.stdout.write(line)
        return proc.wait()


# ----------------------------------------------------------------------------- stages 0-2


def make_corpus(ctx: "Context") -> None:
    """demo/make_corpus.py (the bundled knowledge base -> JSONL corpora), seeded."""
    demo, corpus = ctx.demo, ctx.paths["corpus"]
    sys.path.insert(0, str(DEMO_DIR))
    try:
        import make_corpus
    finally:
        sys.path.remove(str(DEMO_DIR))
    argv = ["--out", str(corpus), "--seed", str(demo["seed"]),
            "--scale", str(demo["corpus_scale"])]
    ctx.runner.commands.append(ctx.runner.shell(f"python {DEMO_DIR / 'make_corpus.py'}", argv))
    print(f"    $ {ctx.runner.shown('python demo/make_corpus.py', argv)}", flush=True)
    log = ctx.out / "logs" / "make_corpus.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", encoding="utf-8") as fh, contextlib.redirect_stdout(fh), \
            contextlib.redirect_stderr(fh):
        if make_corpus.main(argv) != 0:
            raise DemoError(f"stage corpus: make_corpus.py failed; log: {log}")
    for line in log.read_text(encoding="utf-8").splitlines()[:2]:
        print(f"    {line}", flush=True)


@contextlib.contextmanager
def _python_stage_log(ctx: "Context", name: str):
    """stderr of the demo's own stages (library warnings, progress bars) -> OUT/logs/NAME.log;
    the tool stages redirect theirs per command (Runner.run)."""
    log = ctx.out / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", encoding="utf-8") as fh, contextlib.redirect_stderr(fh):
        yield


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                    encoding="utf-8")


def train_tokenizer(ctx: "Context") -> None:
    """Byte-level BPE (GPT-2/Llama-3 style), BOS added on encoding, saved for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [json.loads(line)["text"] for line in
             (ctx.paths["corpus"] / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=ctx.demo["tokenizer"]["vocab_size"],
                                  special_tokens=list(SPECIAL_TOKENS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    bos = SPECIAL_TOKENS["bos_token"]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
        special_tokens=[(bos, backend.token_to_id(bos))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS)
    tokenizer.save_pretrained(ctx.paths["tokenizer"])
    print(f"    vocab {len(tokenizer)} -> {_rel(ctx.paths['tokenizer'], ctx.out)}", flush=True)
    make_documents(ctx, backend, texts)


def make_documents(ctx: "Context", tokenizer, texts: list[str]) -> None:
    """documents.jsonl: the train records grouped, in order, into documents of at most
    `doc_tokens` tokens (BOS and EOS included; a longer record stays alone and is truncated
    by max_length); distill.jsonl: its first `distill_documents` documents.

    The teacher trains on every document; the store (and so the student) and the baseline
    get the distill split, text the teacher was trained on (a held-in split), a small part
    of it: the classic setting where the teacher has seen far more text than the transfer
    set (corpus/split_sizes.json has both sizes in tokens, and their ratio). Grouping keeps
    padding low: `--data` and the store batch whole samples padded to the longest of their
    micro-batch, and the corpus's records alone (~75 tokens, up to ~240) would waste about
    half of every batch."""
    budget = ctx.demo["doc_tokens"]

    def size(parts: list[str]) -> int:  # exact: BOS + the joined text + EOS
        return len(tokenizer.encode("\n\n".join(parts), add_special_tokens=False).ids) + 2

    docs: list[list[str]] = []
    current: list[str] = []
    for text in texts:
        if current and size(current + [text]) > budget:
            docs.append(current)
            current = []
        current.append(text)
    docs.append(current)
    records = [{"id": f"doc-{i:05d}", "text": "\n\n".join(d), "records": len(d)}
               for i, d in enumerate(docs)]
    tokens = [size(d) for d in docs]
    n_distill = ctx.demo["distill_documents"]
    if not 0 < n_distill < len(records):
        raise DemoError(f"distill_documents must be in 1..{len(records) - 1} (there are "
                        f"{len(records)} documents), got {n_distill}")
    _write_jsonl(ctx.paths["documents"], records)
    _write_jsonl(ctx.paths["distill"], records[:n_distill])
    held_in = sum(r["records"] for r in records[:n_distill])
    sizes = {"teacher_documents": len(records), "teacher_tokens": sum(tokens),
             "transfer_documents": n_distill, "transfer_tokens": sum(tokens[:n_distill]),
             "teacher_to_transfer": round(sum(tokens) / sum(tokens[:n_distill]), 2)}
    ctx.paths["split_sizes"].write_text(json.dumps(sizes, indent=1) + "\n", encoding="utf-8")
    print(f"    {len(texts)} train records -> {len(records)} documents of <= {budget} tokens: "
          f"{_rel(ctx.paths['documents'], ctx.out)}", flush=True)
    print(f"    distill split: the first {n_distill} documents ({held_in} records): "
          f"{_rel(ctx.paths['distill'], ctx.out)}", flush=True)
    print(f"    teacher's text {sizes['teacher_tokens']:,} tokens, transfer set "
          f"{sizes['transfer_tokens']:,} tokens ({sizes['teacher_to_transfer']:.1f}x less)",
          flush=True)


def init_models(ctx: "Context") -> None:
    """The teacher and the student, Llama architecture, random weights from the demo seed."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(ctx.paths["tokenizer"])
    for offset, role in enumerate(("teacher", "student")):
        config = LlamaConfig(
            vocab_size=len(tokenizer), max_position_embeddings=ctx.demo["context"],
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
            **ctx.demo[role])
        torch.manual_seed(ctx.demo["seed"] + offset)
        model = LlamaForCausalLM(config)
        directory = ctx.paths[f"{role}_init"]
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        n = sum(p.numel() for p in model.parameters())
        print(f"    {role}: {n / 1e6:.2f}M parameters ({config.num_hidden_layers} layers, "
              f"hidden {config.hidden_size}) -> {_rel(directory, ctx.out)}", flush=True)


# ----------------------------------------------------------------------------- tool stages


def train_teacher(ctx: "Context") -> None:
    p = ctx.paths
    ctx.runner.run("teacher", "student-train", [
        "--config", str(ctx.settings["teacher_preset"]), "--data", str(p["documents"]),
        "--student", str(p["teacher_init"]), "--out", str(p["teacher_run"])])


def dump(ctx: "Context") -> None:
    p = ctx.paths
    ctx.runner.run("dump", "teacher-dump", [
        "--config", str(ctx.settings["preset"]), "--model", str(p["teacher"]),
        "--data", str(p["distill"]), "--out", str(p["store"]),
        "--signal", "teacher", "--no-progress"])


def inspect_store(ctx: "Context") -> None:
    p = ctx.paths
    p["inspect"].mkdir(parents=True, exist_ok=True)
    ctx.runner.run("inspect", "logitstore", ["info", str(p["store"])], log_name="info")
    shutil.copyfile(ctx.out / "logs" / "info.log", p["info"])
    code = ctx.runner.run("inspect", "logitstore", ["verify", str(p["store"])], check=False,
                          log_name="verify")
    shutil.copyfile(ctx.out / "logs" / "verify.log", p["verify"])
    if code != 0:
        raise DemoError(f"logitstore verify found a damaged store (exit {code}): {p['verify']}")
    for line in p["info"].read_text(encoding="utf-8").splitlines():
        if line.startswith(("counts", "size", "  topk", "  sampled", "  hidden", "  attention")):
            print(f"    {line.strip()}", flush=True)


def train_student(ctx: "Context") -> None:
    p = ctx.paths
    ctx.runner.run("student", "student-train", [
        "--config", str(ctx.settings["preset"]), "--store", str(p["store"]),
        "--student", str(p["student_init"]), "--out", str(p["student_run"])])
    kd = heldout_kd(p["student_run"])
    if kd:
        print(f"    held-out KD: {kd[0][1]:.4f} (step {kd[0][0]}) -> {kd[-1][1]:.4f} "
              f"(step {kd[-1][0]})", flush=True)


def train_baseline(ctx: "Context") -> None:
    p = ctx.paths
    ctx.runner.run("baseline", "student-train", [
        "--config", str(ctx.settings["preset"]), "--data", str(p["distill"]),
        "--hidden-weight", "0", "--attention-weight", "0",
        "--student", str(p["student_init"]), "--out", str(p["baseline_run"])])


def evaluate(ctx: "Context") -> None:
    p = ctx.paths
    ctx.runner.run("eval", "distill-eval", [
        "--config", str(ctx.settings["preset"]), "--model", str(p["student"]),
        "--teacher", str(p["teacher"]), "--baseline", str(p["baseline"]),
        "--tasks", f"{ctx.settings['eval']['tasks']},{p['corpus'] / 'medmcq_kb.jsonl'}",
        "--ppl-data", str(p["corpus"] / "heldout.jsonl"), "--out", str(p["report"]),
        "--no-progress"])


# ----------------------------------------------------------------------------- bookkeeping


@dataclass
class Stage:
    name: str
    title: str
    fn: Callable[["Context"], None]
    outputs: tuple[str, ...]  # keys of Context.paths removed before a rerun
    inputs: Callable[["Context"], Any]  # settings the key hashes (with upstream keys, code)
    helpers: tuple[Callable, ...] = ()  # functions of the stage whose code the key hashes

    def code(self) -> list[str]:
        import inspect

        return [inspect.getsource(f) for f in (self.fn, *self.helpers)]


@dataclass
class Context:
    out: Path
    settings: dict[str, Any]
    runner: Runner
    paths: dict[str, Path] = field(default_factory=dict)

    @property
    def demo(self) -> dict[str, Any]:
        return self.settings["demo"]


def make_paths(out: Path) -> dict[str, Path]:
    p = {"corpus": out / "corpus", "tokenizer": out / "tokenizer",
         "init": out / "init", "teacher_init": out / "init" / "teacher",
         "student_init": out / "init" / "student", "teacher_run": out / "runs" / "teacher",
         "store": out / "store", "inspect": out / "inspect",
         "student_run": out / "runs" / "student", "baseline_run": out / "runs" / "baseline",
         "report": out / "report"}
    p.update(documents=p["corpus"] / "documents.jsonl", distill=p["corpus"] / "distill.jsonl",
             split_sizes=p["corpus"] / "split_sizes.json",
             teacher=p["teacher_run"] / "final", student=p["student_run"] / "final",
             baseline=p["baseline_run"] / "final", info=p["inspect"] / "info.txt",
             verify=p["inspect"] / "verify.txt")
    return p


def _tool_version() -> str:
    from logitstore import __version__

    return __version__


PYTHON_STAGES = (make_corpus, train_tokenizer, init_models)  # the rest run the tools
STAGES = [
    Stage("corpus", "generate the bundled medical corpus", make_corpus, ("corpus",),
          lambda c: (c.demo["seed"], c.demo["corpus_scale"],
                     _file_sha(DEMO_DIR / "make_corpus.py"),
                     _file_sha(DEMO_DIR / "knowledge_base.yaml"))),
    Stage("tokenizer", "train a byte-level BPE tokenizer; group records into documents",
          train_tokenizer, ("tokenizer", "documents", "distill", "split_sizes"),
          lambda c: (c.demo["tokenizer"], SPECIAL_TOKENS, c.demo["doc_tokens"],
                     c.demo["distill_documents"]), (make_documents,)),
    Stage("init", "initialise teacher and student (Llama)", init_models, ("init",),
          lambda c: (c.demo["seed"], c.demo["context"], c.demo["teacher"], c.demo["student"])),
    Stage("teacher", "train the teacher (student-train --data)", train_teacher,
          ("teacher_run",), lambda c: c.settings["teacher_preset"].read_text()),
    Stage("dump", "dump the teacher (teacher-dump)", dump, ("store",),
          lambda c: c.settings["dump"]),
    Stage("inspect", "logitstore info + verify", inspect_store, ("inspect",), lambda c: None),
    Stage("student", "distil the student (student-train --store)", train_student,
          ("student_run",), lambda c: c.settings["train"]),
    Stage("baseline", "train the baseline (student-train --data)", train_baseline,
          ("baseline_run",), lambda c: c.settings["train"]),
    Stage("eval", "evaluate (distill-eval)", evaluate, ("report",),
          lambda c: c.settings["eval"]),
]


def heldout_kd(run: Path) -> list[tuple[int, float]]:
    """(step, eval/kd) of a student-train run, in order (step 0 = before training)."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return [(r["step"], r["eval/kd"]) for r in rows if "eval/kd" in r]


def run_pipeline(out: Path, scale: str = "default", *, force: bool = False,
                 use_subprocess: bool = False, verbose: bool = False,
                 only: str | None = None) -> dict[str, Any]:
    """Run (or reuse) every stage; returns the summary dict (also OUT/summary.json)."""
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    settings = load_settings(scale)
    _check_settings(settings)
    _setup_environment(settings["demo"].get("threads"))
    ctx = Context(out, settings, Runner(out, use_subprocess, verbose), make_paths(out))
    marks = out / ".stages"
    marks.mkdir(exist_ok=True)
    timings: dict[str, dict[str, Any]] = {}
    commands: list[str] = []  # every stage's, run now or reused
    upstream = _sha(scale, _tool_version())
    rerun_rest = force
    started = time.perf_counter()
    print(f"logitstore demo, scale {scale!r} -> {out}", flush=True)
    for i, stage in enumerate(STAGES):
        key = _sha(upstream, stage.name, stage.inputs(ctx), stage.code())
        upstream = key
        mark = marks / f"{stage.name}.json"
        done = json.loads(mark.read_text()) if mark.is_file() else None
        header = f"[{i}/{len(STAGES) - 1}] {stage.name}: {stage.title}"
        if done and done.get("key") == key and not rerun_rest:
            print(f"{header} -- reused (finished earlier in {done['seconds']:.1f}s)", flush=True)
            timings[stage.name] = {"seconds": done["seconds"],
                                   "cpu_seconds": done.get("cpu_seconds"), "reused": True}
            commands += done.get("commands", [])
            continue
        rerun_rest = True  # everything after a stage that runs is rerun too
        print(header, flush=True)
        mark.unlink(missing_ok=True)
        for name in stage.outputs:  # a rerun starts from scratch: no stale half-written state
            path = ctx.paths[name]
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        t0, cpu0, first = time.perf_counter(), _cpu_seconds(), len(ctx.runner.commands)
        with _python_stage_log(ctx, stage.name) if stage.fn in PYTHON_STAGES \
                else contextlib.nullcontext():
            stage.fn(ctx)
        seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
        ran = ctx.runner.commands[first:]
        commands += ran
        mark.write_text(json.dumps({"key": key, "seconds": seconds, "cpu_seconds": cpu,
                                    "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                    "commands": ran}))
        timings[stage.name] = {"seconds": seconds, "cpu_seconds": cpu, "reused": False}
        print(f"    done in {seconds:.1f}s (CPU time {cpu:.1f}s)", flush=True)
        if only == stage.name:
            break
    total = time.perf_counter() - started
    (out / "commands.sh").write_text(
        "#!/bin/sh\n# The demo's stages as shell commands (the tokenizer, documents and model\n"
        "# initialisation are Python inside demo/run_demo.py)\nset -e\n"
        + "\n".join(commands) + "\n", encoding="utf-8")
    summary = build_summary(ctx, timings, total)
    (out / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    text = render_summary(summary)
    (out / "SUMMARY.txt").write_text(text + "\n", encoding="utf-8")
    print(text, flush=True)
    return summary


def _check_settings(settings: dict[str, Any]) -> None:
    """The demo's own consistency rules (each tool checks its own settings)."""
    import yaml

    doc = settings["demo"]["doc_tokens"]
    teacher = yaml.safe_load(settings["teacher_preset"].read_text())["train"]
    lengths = {"dump.max_length": settings["dump"].get("max_length"),
               "train.max_length": settings["train"].get("max_length"),
               f"{settings['teacher_preset'].name} train.max_length": teacher.get("max_length")}
    wrong = [f"{k} = {v}" for k, v in lengths.items() if v != doc]
    if wrong:
        raise DemoError(f"{settings['preset']}: demo.doc_tokens = {doc}, but " + ", ".join(wrong)
                        + ": documents must fit every max_length (the store and the baseline "
                          "then hold the same token sequences)")


def _cpu_seconds() -> float:
    """CPU time of this process and of the tool processes it waited for (all threads)."""
    import resource

    own, children = (resource.getrusage(w) for w in (resource.RUSAGE_SELF,
                                                       resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _setup_environment(threads: int | None) -> None:
    """Offline (nothing here needs the network), quiet tokenizers, logging to the stage log,
    torch's threads. Before torch is imported: OpenMP reads its variables when it starts."""
    # OpenMP threads sleep instead of spinning while they wait: on a machine with other work
    # spinning threads fight for the cores and training can run 3-5x slower; when the cores
    # are free this costs a few percent.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    if threads:  # read by torch when it starts (here, or in the tools' processes)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(threads)
    root = logging.getLogger()
    if not any(getattr(h, "_demo", False) for h in root.handlers):
        handler = logging.StreamHandler(_CurrentStderr())
        handler._demo = True  # type: ignore[attr-defined]
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)  # the tools' basicConfig() is then a no-op
        root.setLevel(logging.INFO)


# ----------------------------------------------------------------------------- summary


def _params(model_dir: Path) -> int | None:
    weights = model_dir / "model.safetensors"
    if not weights.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(weights), "np") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def build_summary(ctx: Context, timings: dict, total: float) -> dict[str, Any]:
    p, out = ctx.paths, ctx.out
    artifacts = {
        "corpus": p["corpus"], "tokenizer": p["tokenizer"], "teacher": p["teacher"],
        "store": p["store"], "store info": p["info"], "store verify": p["verify"],
        "student": p["student"], "student run": p["student_run"],
        "baseline": p["baseline"], "baseline run": p["baseline_run"],
        "report.md": p["report"] / "report.md", "report.json": p["report"] / "report.json",
        "report.png": p["report"] / "report.png", "logs": out / "logs",
        "commands": out / "commands.sh"}
    summary: dict[str, Any] = {
        "scale": ctx.settings["scale"], "out": str(out),
        "artifacts": {k: {"path": str(v), "exists": v.exists()} for k, v in artifacts.items()},
        "timings": timings, "total_seconds": total,
        "parameters": {r: _params(p[r]) for r in ("teacher", "student", "baseline")},
        "heldout_kd": heldout_kd(p["student_run"]),
        "data": _data_sizes(p),
    }
    report_file = p["report"] / "report.json"
    if report_file.is_file():
        report = json.loads(report_file.read_text(encoding="utf-8"))
        summary["comparison"] = [r for r in report["comparison"] if r["task"] != "efficiency"]
        summary["findings"] = report.get("findings", [])
        summary["ratios"] = report["ratios"]
        summary["skipped"] = report.get("skipped", [])
    verify = p["verify"]
    summary["verify"] = verify.read_text(encoding="utf-8").strip().splitlines()[-1] \
        if verify.is_file() else None
    return summary


def _data_sizes(p: dict[str, Path]) -> dict[str, Any] | None:
    """Teacher's text vs the transfer set (tokens), and the tokens the teacher trained on."""
    if not p["split_sizes"].is_file():
        return None
    sizes = json.loads(p["split_sizes"].read_text(encoding="utf-8"))
    metrics = p["teacher_run"] / "metrics.jsonl"
    if metrics.is_file():
        rows = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines()
                if line.strip()]
        seen = [r["train/tokens_seen"] for r in rows if "train/tokens_seen" in r]
        sizes["teacher_tokens_seen"] = int(seen[-1]) if seen else None
    return sizes


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)


def render_summary(s: dict[str, Any]) -> str:
    out = Path(s["out"])
    lines = ["", "=" * 78, f"logitstore demo ({s['scale']}) finished in {s['total_seconds']:.1f}s",
             "", "stage timings (wall, CPU):"]
    for name, t in s["timings"].items():
        cpu = f"{t['cpu_seconds']:7.1f}s" if t.get("cpu_seconds") is not None else "      -"
        lines.append(f"  {name:10s} {t['seconds']:7.1f}s {cpu}"
                     + ("  (reused: time of the run that made it)" if t["reused"] else ""))
    lines += ["", "artifacts:"]
    for name, a in s["artifacts"].items():
        lines.append(f"  {name:13s} {_rel(a['path'], out)}"
                     + ("" if a["exists"] else "  (missing)"))
    params = s["parameters"]
    if params.get("teacher"):
        lines += ["", f"parameters: teacher {params['teacher'] / 1e6:.2f}M, student "
                      f"{(params.get('student') or 0) / 1e6:.2f}M"]
    if s.get("verify"):
        lines.append(f"verify: {s['verify']}")
    if s["heldout_kd"]:
        (s0, k0), (s1, k1) = s["heldout_kd"][0], s["heldout_kd"][-1]
        lines.append(f"student held-out KD (teacher || student): {k0:.4f} at step {s0} -> "
                     f"{k1:.4f} at step {s1}")
    data = s.get("data")
    if data:
        seen = data.get("teacher_tokens_seen")
        lines.append(f"teacher's text {data['teacher_tokens']:,} tokens"
                     + (f" ({seen:,} seen in training)" if seen else "")
                     + f"; transfer set {data['transfer_tokens']:,} tokens "
                       f"({data['teacher_to_transfer']:.1f}x less)")
    if s.get("comparison"):
        lines += ["", "value ± standard error; * = student - baseline resolved (> 2 SE, paired)",
                  f"  {'task':16s} {'metric':14s} {'teacher':>15s} {'student':>15s} "
                  f"{'baseline':>15s} {'gap closed':>10s}"]
        for r in s["comparison"]:
            errors = r.get("stderr") or {}
            cells = [_fmt(r[role]) + (f" ±{errors[role]:.2g}" if errors.get(role) else "")
                     for role in ("teacher", "student", "baseline")]
            mark = "*" if (r.get("student_vs_baseline") or {}).get("resolved") else " "
            lines.append(f"  {r['task'][:16]:16s} {r['metric'][:14]:14s} {cells[0]:>15s} "
                         f"{cells[1]:>15s} {cells[2]:>15s} {_fmt(r['gap_closed']):>10s} {mark}")
    if s.get("findings"):
        lines += ["", "student vs baseline:"] + [f"  {f}" for f in s["findings"]]
    if s.get("ratios"):
        shown = ", ".join(f"{k} {_fmt(v)}" for k, v in s["ratios"].items() if v is not None)
        lines += ["", f"teacher/student ratios: {shown}"]
    for skip in s.get("skipped") or []:
        lines.append(f"skipped {skip['task']}: {skip['reason'][:100]}")
    lines.append("=" * 78)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:]))
    ap.add_argument("--out", type=Path, default=Path("demo_out"), help="output directory")
    ap.add_argument("--scale", choices=SCALES, default="default",
                    help="default: the demo (~10 CPU-minutes, < 10 min on 2 cores); tiny: "
                         "test size (< 1 min)")
    ap.add_argument("--force", action="store_true", help="rerun every stage")
    ap.add_argument("--subprocess", action="store_true",
                    help="run each tool through its console script, in its own process")
    ap.add_argument("--only", choices=[s.name for s in STAGES],
                    help="stop after this stage (debugging)")
    ap.add_argument("-v", "--verbose", action="store_true", help="show the tools' output too")
    args = ap.parse_args(argv)
    try:
        run_pipeline(args.out, args.scale, force=args.force, use_subprocess=args.subprocess,
                     verbose=args.verbose, only=args.only)
    except DemoError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("demo: interrupted; rerun the same command to continue after the last finished "
              "stage", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
