"""The demo's stages in order: what each runs (the tools' commands here, the first three in
demo_prepare.py, the server of the last in demo_serve.py), what it writes and which settings
and code its reuse key hashes."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from typing import Any, Callable

from demo_context import (DEMO_DIR, SPECIAL_TOKENS, Context, DemoError, file_hash,
                          heldout_kd)
from demo_prepare import (init_models, make_corpus, make_documents, read_texts,
                          train_tokenizer)
from demo_serve import MAX_NEW_TOKENS as SERVE_MAX_NEW_TOKENS
from demo_serve import demo_question, serve_one_answer

def train_teacher(ctx: Context) -> None:
    p = ctx.paths
    ctx.runner.run("teacher", "student-train", [
        "--config", str(ctx.settings["teacher_preset"]), "--data", str(p["documents"]),
        "--student", str(p["teacher_init"]), "--out", str(p["teacher_run"])])


def dump(ctx: Context) -> None:
    p = ctx.paths
    ctx.runner.run("dump", "teacher-dump", [
        "--config", str(ctx.settings["preset"]), "--model", str(p["teacher"]),
        "--data", str(p["distill"]), "--out", str(p["store"]),
        "--signal", "teacher", "--no-progress"])


def inspect_store(ctx: Context) -> None:
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


def train_student(ctx: Context) -> None:
    p = ctx.paths
    ctx.runner.run("student", "student-train", [
        "--config", str(ctx.settings["preset"]), "--store", str(p["store"]),
        "--student", str(p["student_init"]), "--out", str(p["student_run"])])
    kd = heldout_kd(p["student_run"])
    if kd:
        print(f"    held-out KD: {kd[0][1]:.4f} (step {kd[0][0]}) -> {kd[-1][1]:.4f} "
              f"(step {kd[-1][0]})", flush=True)


def train_baseline(ctx: Context) -> None:
    p = ctx.paths
    ctx.runner.run("baseline", "student-train", [
        "--config", str(ctx.settings["preset"]), "--data", str(p["distill"]),
        "--hidden-weight", "0", "--attention-weight", "0",
        "--student", str(p["student_init"]), "--out", str(p["baseline_run"])])


def evaluate(ctx: Context) -> None:
    p = ctx.paths
    ctx.runner.run("eval", "distill-eval", [
        "--config", str(ctx.settings["preset"]), "--model", str(p["student"]),
        "--teacher", str(p["teacher"]), "--baseline", str(p["baseline"]),
        "--tasks", f"{ctx.settings['eval']['tasks']},{p['corpus'] / 'medmcq_kb.jsonl'}",
        "--ppl-data", str(p["corpus"] / "heldout.jsonl"), "--out", str(p["report"]),
        "--no-progress"])


def export_and_serve(ctx: Context) -> None:
    p = ctx.paths
    ctx.runner.run("export", "student-export", [
        str(p["student_run"]), "--out", str(p["export"]), "--format", "onnx",
        "--quantize", "int8",
        # the held-out documents distill-eval scores: the gate measures on the demo's own text
        "--check-data", str(p["corpus"] / "heldout.jsonl")])
    quality = json.loads((p["export"] / "export.json").read_text())["quality"]
    print(f"    quality gate: perplexity ratio {quality['perplexity_ratio']:.4f} "
          f"(threshold {quality['threshold']})", flush=True)
    served = serve_one_answer(ctx, p["export"], demo_question(p["corpus"]))
    p["serve"].mkdir(parents=True, exist_ok=True)
    (p["serve"] / "answer.json").write_text(json.dumps(served, indent=1), encoding="utf-8")
    answer = served["response"]
    print(f"    {served['request']['prompt']!r} -> {answer['text'].strip()!r} "
          f"({answer['completion_tokens']} tokens, {answer['timings']['total_ms']:.0f} ms)",
          flush=True)


@dataclass
class Stage:
    name: str
    title: str
    fn: Callable[[Context], None]
    outputs: tuple[str, ...]  # keys of Context.paths removed before a rerun
    inputs: Callable[[Context], Any]  # settings the key hashes (with upstream keys, code)
    helpers: tuple[Callable, ...] = ()  # functions of the stage whose code the key hashes

    def code(self) -> list[str]:
        import inspect

        return [inspect.getsource(f) for f in (self.fn, *self.helpers)]


PYTHON_STAGES = (make_corpus, train_tokenizer, init_models)  # the rest run the tools
STAGES = [
    Stage("corpus", "generate the bundled medical corpus", make_corpus, ("corpus",),
          lambda c: (c.demo["seed"], c.demo["corpus_scale"], c.demo.get("fact_drill", 0),
                     c.demo.get("entities", 0),
                     file_hash(DEMO_DIR / "make_corpus.py"),
                     *(file_hash(p) for p in sorted(DEMO_DIR.glob("corpus_*.py"))),
                     file_hash(DEMO_DIR / "knowledge_base.yaml"))),
    Stage("tokenizer", "train a byte-level BPE tokenizer; group records into documents",
          train_tokenizer, ("tokenizer", "documents", "distill", "split_sizes"),
          lambda c: (c.demo["tokenizer"], SPECIAL_TOKENS, c.demo["doc_tokens"],
                     c.demo["distill_documents"]), (make_documents, read_texts)),
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
    Stage("serve", "export the student to INT8 ONNX and serve one answer (student-export, "
          "distill-serve)", export_and_serve, ("export", "serve"),
          lambda c: (SERVE_MAX_NEW_TOKENS, file_hash(DEMO_DIR / "demo_serve.py"))),
]


