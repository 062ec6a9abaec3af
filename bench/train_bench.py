"""Training benchmark: offline KD from the store vs CE-only vs online KD; chunked KD loss; loader.

    python bench/train_bench.py [--tokens 20480 --seq-len 256 --batch-tokens 1024 --rounds 8]

Everything is built here, on CPU, and measured side by side in one run:

world   The demo corpus (demo/make_corpus.py), a byte-level BPE trained on it (its 6k merges
        padded with reserved ids to V = 32000, like real tokenizers' unused rows), a Llama
        *teacher* and a ~4x cheaper Llama *student* made with LlamaConfig + from_config, and a
        store of the teacher's real top-k (k = 32, q8) written with StoreWriter from its logits
        over `--tokens` tokens (windows of `--seq-len`). The teacher is randomly initialised
        (nothing is trained): its logits are real model outputs, which is all the timings need.
(a-c)   Step time, interleaved round by round on the SAME batches from the same student init
        (one copy per mode), each step being student_train.step.Step.train (accelerate, the
        real loop: forward -> combine -> backward -> clip -> AdamW):
          ce       CE only through the student-train objective (chunked lm_head: the --data path)
          hf_ce    CE only the usual way, HF `model(labels=...)` (full [B,S,V] logits), reference
          offline  KD from the store: DistillationObjective with a top-k plan (chunked KD + CE);
                   its batches come from a live StoreStream, fetched inline as train.py does
          online   the teacher in memory: teacher forward -> full logits, student full logits,
                   full-vocabulary KL (reference_losses.dense_kd_per_position) + CE
        Median over `--rounds` rounds after `--warmup`; the mode order rotates every round.
        The offline step charged against the goals = its median compute + the loader's
        amortised time per batch (e): train.py reads the stream in the training process.
        Peak memory: each mode again in its own fresh subprocess: setup (models, optimizer,
        batches), one warm-up step, gc + malloc_trim(0), baseline = VmRSS; then the kernel's
        peak-RSS mark is reset (`echo 5 > /proc/self/clear_refs`) and after `--mem-steps`
        steps VmHWM is read. Step peak = VmHWM - baseline (what a step needs on top of the
        loaded model and optimizer state; grads and loss temporaries included). The offline
        worker's measured steps read the store afresh (segment read + decode included).
        ru_maxrss is not used: it cannot be reset and inherits the forking parent's mark.
(d)     KD-loss memory at V = `--loss-vocab`: hidden [B,S,d] (B*S = `--loss-tokens`), lm_head
        [V, d], top-k target (k = 32) + labels, loss = 0.5 KD + 0.5 CE, forward + backward,
        each variant in its own subprocess measured like the steps (VmHWM over a baseline that
        holds the inputs and weight). naive = full fp32 logits [B,S,V] then the same
        per-position functions (losses.sparse_kd_per_position: logsumexp/log_softmax + KL;
        cross_entropy_per_position); chunked = tests/chunked_loss.chunked_kd_ce (the fused path,
        given the loss's gradient w.r.t. kd and ce as training gives it) at each
        `--loss-chunks` size. Loss values and grad norms are compared (must agree).
(e)     Loader: a fresh StoreStream per epoch iterated with no model (plan, segment reads,
        decoding, collation), tokens/s over whole epochs, vs the offline step's consumption.

Before measuring it waits until the machine is quiet (1-min load < `--quiet-load`, polled
every 30 s, at most `--quiet-wait` s); load averages and the CPU time other processes took
(from /proc/stat) are recorded. JSON goes to bench/out/train_bench.json.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
# the dense reference losses and the chunked [B, S, d] loss front (tests/reference_losses.py,
# tests/chunked_loss.py)
sys.path.insert(0, str(ROOT / "tests"))
MODES = ("ce", "hf_ce", "offline", "online")
MODE_LABELS = {"ce": "CE-only (student-train, chunked)", "hf_ce": "CE-only (HF loss, full logits)",
               "offline": "offline KD (store, chunked)", "online": "online KD (teacher, full V)"}
STUDENT = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=2)
TEACHER = dict(hidden_size=512, intermediate_size=1792, num_hidden_layers=8,
               num_attention_heads=8, num_key_value_heads=4)
SIGNAL = "teacher"
GOALS = {  # name: (description, limit, "max" | "min")
    "offline_vs_ce_step": ("offline step <= 1.10x CE-only step", 1.10, "max"),
    "online_vs_offline_step": ("offline >= 1.7x faster than online KD", 1.7, "min"),
    "offline_vs_ce_peak": ("offline step peak memory <= 1.05x CE-only", 1.05, "max"),
    "loader_vs_consumption": ("loader >= 20x training consumption", 20.0, "min"),
    "chunked_vs_naive_peak": ("chunked KD loss <= 0.25x naive memory", 0.25, "max"),
}


# ----------------------------------------------------------------------------- machine

def rss_kib() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                out[key] = int(value.split()[0])
    return out


def release_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back to the kernel
    except OSError:
        pass


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := current VmRSS (Linux >= 4.0)


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def cpu_busy_s() -> float:
    """Machine-wide busy CPU seconds so far (all CPUs, from /proc/stat)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class CpuWatch:
    """Wall time, our CPU time and everybody else's CPU time over a phase."""

    def __init__(self):
        self.wall, self.busy, self.own = time.perf_counter(), cpu_busy_s(), own_cpu_s()
        self.load_start = loadavg()

    def result(self) -> dict:
        wall = time.perf_counter() - self.wall
        own = own_cpu_s() - self.own
        others = max(0.0, cpu_busy_s() - self.busy - own)
        return {"wall_s": round(wall, 2), "own_cpu_s": round(own, 2),
                "others_cpu_s": round(others, 2), "others_cores": round(others / wall, 3),
                "loadavg_start": self.load_start, "loadavg_end": loadavg()}


def wait_until_quiet(threshold: float, max_wait: float, poll: float = 30.0) -> dict:
    start = time.monotonic()
    samples = [loadavg()]
    while samples[-1][0] >= threshold and time.monotonic() - start < max_wait:
        print(f"waiting for a quiet machine: 1-min load {samples[-1][0]:.2f} >= {threshold}",
              flush=True)
        time.sleep(poll)
        samples.append(loadavg())
    quiet = samples[-1][0] < threshold
    waited = time.monotonic() - start
    print(f"load {samples[-1]} after {waited:.0f}s: "
          f"{'quiet' if quiet else 'NOT quiet (gave up waiting)'}", flush=True)
    return {"threshold": threshold, "waited_s": round(waited, 1), "quiet": quiet,
            "polls": samples}


# ----------------------------------------------------------------------------- the world

@dataclass
class World:
    root: Path
    tokenizer: Path
    student: Path
    teacher: Path
    store: Path


def world_of(root: str | Path) -> World:
    root = Path(root)
    return World(root, root / "tokenizer", root / "student", root / "teacher", root / "store")


def make_tokenizer(texts: list[str], vocab: int, directory: Path):
    """Byte-level BPE on the corpus, padded with reserved ids up to `vocab` rows."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    backend.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    learned = backend.get_vocab_size()
    data = json.loads(backend.to_str())
    table = data["model"]["vocab"]
    for i in range(len(table), vocab):  # never produced: BPE has no merge that makes them
        table[f"<reserved_{i}>"] = i
    backend = Tokenizer.from_str(json.dumps(data))
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", backend.token_to_id("<s>"))])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", unk_token="<unk>")
    tok.save_pretrained(directory)
    assert len(tok) == vocab, (len(tok), vocab)
    return tok, learned


def make_llama(directory: Path, tok, shapes: dict, seed: int, max_pos: int):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         max_position_embeddings=max_pos, tie_word_embeddings=False, **shapes)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return model


def forward_flops_per_token(config, seq_len: int) -> float:
    """2 x (every Linear weight, lm_head included) + attention scores and mixing (avg context)."""
    d, L, ff = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    head = d // config.num_attention_heads
    kv = config.num_key_value_heads * head
    linear = L * (d * d * 2 + 2 * d * kv + 3 * d * ff) + config.vocab_size * d
    attention = L * 2 * 2 * d * (seq_len + 1) / 2
    return 2 * linear + attention


def build_world(root: Path, args) -> dict:
    import numpy as np
    import torch

    from logitstore.format import SignalSpec, StoreSettings, TopKSpec
    from logitstore.toolkit.tokenizer_identity import tokenizer_fingerprint
    from logitstore.info import size_report
    from logitstore.snapshot import committed_state
    from logitstore.sample import Sample, SignalData, TopK
    from logitstore.writer import StoreWriter

    world = world_of(root)
    started = time.perf_counter()
    corpus = root / "corpus"
    subprocess.run([sys.executable, str(ROOT / "demo" / "make_corpus.py"), "--out", str(corpus),
                    "--seed", "0"], check=True, capture_output=True)
    texts = [json.loads(line)["text"] for line in
             (corpus / "train.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    tok, learned = make_tokenizer(texts, args.vocab, world.tokenizer)
    ids: list[int] = []
    for text in texts:
        ids += tok(text)["input_ids"] + [tok.eos_token_id]
        if len(ids) >= args.tokens:
            break
    n_windows = args.tokens // args.seq_len
    if len(ids) < n_windows * args.seq_len:
        raise SystemExit(f"the demo corpus holds {len(ids)} tokens, fewer than --tokens")
    windows = np.asarray(ids[:n_windows * args.seq_len], np.int64).reshape(n_windows, -1)

    teacher = make_llama(world.teacher, tok, TEACHER, seed=1, max_pos=2 * args.seq_len).eval()
    student = make_llama(world.student, tok, STUDENT, seed=0, max_pos=2 * args.seq_len)
    flops = {"teacher": forward_flops_per_token(teacher.config, args.seq_len),
             "student": forward_flops_per_token(student.config, args.seq_len)}
    params = {"teacher": sum(p.numel() for p in teacher.parameters()),
              "student": sum(p.numel() for p in student.parameters())}
    del student

    settings = StoreSettings(
        vocab_size=len(tok), tokenizer_fingerprint=tokenizer_fingerprint(tok),
        tokenizer_name="bench-bpe", signals={SIGNAL: SignalSpec(
            topk=TopKSpec(args.k), teacher={"model_id": "bench-teacher (random init)"})})
    dump_start = time.perf_counter()
    entropies = []
    with StoreWriter(str(world.store), settings, overwrite=True) as writer, torch.no_grad():
        for a in range(0, n_windows, 8):
            batch = torch.from_numpy(windows[a:a + 8])
            logp = torch.log_softmax(teacher(input_ids=batch).logits.float(), -1)  # [b, S, V]
            entropies.append(float(-(logp.exp() * logp).sum(-1).mean()))
            top = logp.topk(args.k, -1)
            for j in range(batch.shape[0]):
                writer.add(Sample(
                    sample_id=f"w{a + j:05d}", input_ids=windows[a + j],
                    loss_mask=np.ones(args.seq_len, bool), source="demo-corpus",
                    signals={SIGNAL: SignalData(topk=TopK(top.indices[j].numpy(),
                                                          top.values[j].numpy()))}))
    dump_s = time.perf_counter() - dump_start
    manifest = committed_state(writer.fs)
    sizes = size_report(manifest)
    info = {
        "corpus": "demo/make_corpus.py --seed 0, train.jsonl",
        "tokenizer": {"vocab": len(tok), "bpe_learned": learned,
                      "reserved_rows": len(tok) - learned},
        "tokens": int(windows.size), "samples": n_windows, "seq_len": args.seq_len,
        "student": {**STUDENT, "params": params["student"],
                    "fwd_mflops_per_token": flops["student"] / 1e6},
        "teacher": {**TEACHER, "params": params["teacher"],
                    "fwd_mflops_per_token": flops["teacher"] / 1e6,
                    "mean_entropy_nats": float(np.mean(entropies))},
        "teacher_vs_student_fwd_flops": flops["teacher"] / flops["student"],
        "store": {"writer": "logitstore.writer.StoreWriter (this script)", "k": args.k,
                  "encoding": "q8", "bytes_per_token": sizes["bytes_per_token"],
                  "topk_bytes_per_entry": sizes["signals"][SIGNAL]["topk"]["bytes_per_entry"],
                  "segment_tokens": settings.segment_tokens, "dump_s": round(dump_s, 1),
                  "dump_tokens_per_s": windows.size / dump_s},
        "build_s": round(time.perf_counter() - started, 1),
    }
    return info


# ----------------------------------------------------------------------------- training modes

def train_settings(args) -> SimpleNamespace:
    """The student-train defaults the step and optimizer read (config.py)."""
    return SimpleNamespace(alpha=0.5, alpha_on="kd", hidden_weight=0.0, attention_weight=0.0,
                           grad_accum=1, label_smoothing=0.0, max_grad_norm=1.0, lr=2e-5,
                           weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
                           adam_epsilon=1e-8, temperature=1.0, lm_head_chunk=args.lm_head_chunk)


def make_stream(world: World, args):
    from student_train.stream import StoreStream

    return StoreStream(str(world.store), signals=[SIGNAL], batch_tokens=args.batch_tokens,
                       seed=0, shuffle=True)


def mode_module(mode: str, student, teacher, cfg):
    """(module with the objective's forward(batch, ...) -> loss sums, signal plans)."""
    import torch
    from torch import nn

    from reference_losses import dense_kd_per_position
    from student_train.losses import cross_entropy_per_position
    from student_train.objective import (IGNORE, DistillationObjective, LossSettings,
                                         SignalPlan, shifted, target_positions)

    plan = SignalPlan(SIGNAL, kd_weight=1.0, target="topk")
    settings = LossSettings(chunk_size=cfg.lm_head_chunk)
    if mode == "ce":
        return DistillationObjective(student, [], settings), []
    if mode == "offline":
        return DistillationObjective(student, [plan], settings), [plan]

    def model_inputs(batch):
        return dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=batch["position_ids"], use_cache=False)

    class HFCrossEntropy(nn.Module):
        def __init__(self):
            super().__init__()
            self.student = student

        def forward(self, batch, temperature=1.0, label_smoothing=0.0, n_groups=1):
            out = self.student(**model_inputs(batch), labels=batch["labels"])
            n = target_positions(batch).sum()
            return {"ce": (out.loss * n).reshape(1)}  # a sum, as the objective gives

    class OnlineKD(nn.Module):
        def __init__(self):
            super().__init__()
            self.student = student
            self.teacher = [teacher]  # not a submodule: neither trained nor clipped

        def forward(self, batch, temperature=1.0, label_smoothing=0.0, n_groups=1):
            with torch.no_grad():
                t_logits = self.teacher[0](**model_inputs(batch)).logits  # [B, S, V]
            s_logits = self.student(**model_inputs(batch)).logits
            w = shifted(batch["token_weights"].float(), 0.0) * target_positions(batch)
            kd = dense_kd_per_position(s_logits, t_logits, temperature=temperature)
            ce = cross_entropy_per_position(s_logits, shifted(batch["labels"], IGNORE),
                                            label_smoothing=label_smoothing)
            return {"kd": (kd * w).sum().reshape(1, 1), "ce": (ce * w).sum().reshape(1)}

    if mode == "hf_ce":
        return HFCrossEntropy(), []
    if mode == "online":
        return OnlineKD(), [plan]
    raise ValueError(mode)


class Runner:
    """One training mode: its own student copy (same init), AdamW, scheduler, Step."""

    def __init__(self, mode: str, world: World, accelerator, args, teacher=None):
        import torch
        from transformers import AutoModelForCausalLM

        from student_train.step import Step
        from student_train.train import make_optimizer

        self.mode, self.cfg = mode, train_settings(args)
        student = AutoModelForCausalLM.from_pretrained(world.student)  # fp32, identical init
        student.train()
        module, plans = mode_module(mode, student, teacher, self.cfg)
        optimizer = make_optimizer(self.cfg, module)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        self.model, self.optimizer = accelerator.prepare(module, optimizer)
        sources = SimpleNamespace(groups=[], group_weights=[], plans=plans, group_of={})
        self.step = Step(self.cfg, accelerator, self.model, sources)

    def __call__(self, batch) -> dict:
        return self.step.train([batch], self.cfg.temperature, self.optimizer, self.scheduler)


def accelerator_cpu():
    from accelerate import Accelerator

    return Accelerator(cpu=True, mixed_precision="no")


def load_teacher(world: World):
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(world.teacher).eval()
    teacher.requires_grad_(False)
    return teacher


def time_steps(world: World, args) -> dict:
    """(a)-(c): interleaved rounds, same batches, same init."""
    import torch

    accelerator = accelerator_cpu()
    teacher = load_teacher(world)
    runners = {m: Runner(m, world, accelerator, args, teacher if m == "online" else None)
               for m in MODES}
    prefetch = make_stream(world, args)
    batches = list(iter(prefetch))
    n_rounds = args.warmup + args.rounds
    if n_rounds > len(batches):
        raise SystemExit(f"{n_rounds} rounds need {n_rounds} batches; an epoch has "
                         f"{len(batches)}: raise --tokens")
    live = iter(make_stream(world, args))  # the offline mode reads the store inline
    times = {m: [] for m in MODES}
    fetch, losses = [], {m: [] for m in MODES}
    watch = CpuWatch()
    for r in range(n_rounds):
        order = MODES[r % len(MODES):] + MODES[:r % len(MODES)]
        for mode in order:
            if mode == "offline":
                t0 = time.perf_counter()
                batch = next(live)
                fetch.append(time.perf_counter() - t0)
                assert batch["sample_ids"] == batches[r]["sample_ids"]
            else:
                batch = batches[r]
            t0 = time.perf_counter()
            stats = runners[mode](batch)
            dt = time.perf_counter() - t0
            if r >= args.warmup:
                times[mode].append(dt)
            losses[mode].append(stats["loss"])
        print(f"round {r + 1}/{n_rounds} " + ("(warm-up)" if r < args.warmup else " ".join(
            f"{m}={times[m][-1]:.3f}s" for m in MODES)), flush=True)
    cpu = watch.result()
    tokens = [float(b["attention_mask"].sum()) for b in batches[:n_rounds]]
    return {"step_s": {m: {"median": statistics.median(v), "min": min(v), "max": max(v),
                           "all": [round(x, 4) for x in v]} for m, v in times.items()},
            "offline_fetch_s": [round(x, 4) for x in fetch],
            "loss_first_last": {m: [v[0], v[-1]] for m, v in losses.items()},
            "batch_tokens_mean": statistics.mean(tokens),
            "batch_shape": list(batches[0]["input_ids"].shape),
            "batches_per_epoch": len(batches), "threads": torch.get_num_threads(), "cpu": cpu}


def loader_rate(world: World, args, epochs: int = 3) -> dict:
    """(e): a fresh StoreStream per epoch, no model: whole-epoch tokens/s."""
    rates, seconds = [], []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        stream = make_stream(world, args)
        stream.set_epoch(epoch)
        tokens, n = 0, 0
        for batch in stream:
            tokens += int(batch["attention_mask"].sum())
            n += 1
        dt = time.perf_counter() - t0
        rates.append(tokens / dt)
        seconds.append(dt / n)
    return {"tokens_per_s": statistics.median(rates), "all_tokens_per_s": rates,
            "s_per_batch": statistics.median(seconds), "epochs": epochs}


# ----------------------------------------------------------------------------- subprocess workers

def worker_step_memory(world: World, args, mode: str, chunk: int) -> dict:
    """Peak memory of `mode`'s train step above its post-setup baseline (module docstring)."""
    args.lm_head_chunk = chunk
    accelerator = accelerator_cpu()
    teacher = load_teacher(world) if mode == "online" else None
    runner = Runner(mode, world, accelerator, args, teacher)
    first = make_stream(world, args)
    batches = list(iter(first))
    after_load = rss_kib()["VmRSS"]
    runner(batches[0])  # warm-up: optimizer state, lazy initialisation
    if mode == "offline":  # the measured steps read and decode from the store themselves
        del first, batches
        source = iter(make_stream(world, args))
        next(source)
    else:
        source = iter(batches[1:])
    release_memory()
    base = rss_kib()["VmRSS"]
    reset_peak()
    t0 = time.perf_counter()
    for _ in range(args.mem_steps):
        runner(next(source))
    elapsed = time.perf_counter() - t0
    peak = rss_kib()["VmHWM"]
    return {"mode": mode, "lm_head_chunk": chunk, "after_setup_mb": after_load / 1024,
            "baseline_mb": base / 1024,
            "peak_mb": peak / 1024, "step_peak_mb": (peak - base) / 1024,
            "steps": args.mem_steps, "s_per_step": elapsed / args.mem_steps}


def worker_loss_memory(args, variant: str, chunk: int) -> dict:
    """(d): one forward+backward of 0.5 KD + 0.5 CE at V = loss_vocab, naive or chunked."""
    import torch
    import torch.nn.functional as F

    from chunked_loss import chunked_kd_ce
    from reference_losses import masked_mean
    from student_train.losses import (build_topk_target, cross_entropy_per_position,
                                      sparse_kd_per_position)

    def inputs(V: int, N: int):
        torch.manual_seed(0)
        d, k = args.loss_dim, args.k
        B, S = 4, N // 4
        hidden = (torch.randn(B, S, d) * 0.5).requires_grad_()
        weight = (torch.randn(V, d) * 0.02).requires_grad_()
        start = torch.randint(0, V, (B, S, 1))
        ids = (start + torch.arange(k) * (V // (2 * k))) % V  # distinct per position
        lp = torch.log_softmax(torch.randn(B, S, k + 1) * 2, -1)[..., :k]  # leaves a tail
        target = build_topk_target(ids, lp, temperature=1.0)
        return (hidden, weight, target, torch.randint(0, V, (B, S)),
                torch.ones(B, S, dtype=torch.bool))

    def run(hidden, weight, target, labels, mask):
        if variant == "naive":
            logits = F.linear(hidden, weight).float()  # [B, S, V]
            kd = sparse_kd_per_position(logits, target)
            ce = cross_entropy_per_position(logits, labels)
            del logits
        else:  # with the loss's gradient w.r.t. kd and ce, as training passes it
            half_mean = 0.5 * mask.float() / mask.sum()
            kd, ce = chunked_kd_ce(hidden, weight, target=target, labels=labels, mask=mask,
                                   chunk_size=chunk, expected_grads=(half_mean, half_mean))
        loss = masked_mean(0.5 * kd + 0.5 * ce, mask)
        loss.backward()
        return loss

    run(*inputs(4 * args.k, 64))  # warm-up: thread pools, kernels, autograd engine
    N = args.loss_tokens
    hidden, weight, target, labels, mask = inputs(args.loss_vocab, N)
    release_memory()
    base = rss_kib()["VmRSS"]
    reset_peak()
    t0 = time.perf_counter()
    loss = run(hidden, weight, target, labels, mask)
    elapsed = time.perf_counter() - t0
    peak = rss_kib()["VmHWM"]
    V = args.loss_vocab
    return {"variant": variant, "chunk": chunk if variant == "chunked" else None,
            "baseline_mb": base / 1024, "peak_mb": peak / 1024,
            "loss_peak_mb": (peak - base) / 1024, "s": elapsed, "loss": float(loss),
            "weight_grad_norm": float(weight.grad.norm()),
            "hidden_grad_norm": float(hidden.grad.norm()),
            "weight_grad_mb": weight.grad.numel() * 4 / 2**20,
            "full_logits_mb": N * V * 4 / 2**20}


def run_worker(kind: str, payload: dict, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind,
           "--worker-args", json.dumps(payload)] + args.passthrough
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"worker {kind} {payload} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- report

def verdict(name: str, value: float) -> str:
    _, limit, kind = GOALS[name]
    ok = value <= limit if kind == "max" else value >= limit
    return "PASS" if ok else "MISS"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=20480, help="tokens in the store")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-tokens", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--lm-head-chunk", type=int, default=1024, help="student-train's default")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--mem-steps", type=int, default=3)
    p.add_argument("--mem-small-chunk", type=int, default=256,
                   help="also measure CE/offline step memory at this lm_head_chunk (0: skip)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--loss-vocab", type=int, default=128000)
    p.add_argument("--loss-tokens", type=int, default=2048)
    p.add_argument("--loss-dim", type=int, default=512)
    p.add_argument("--loss-chunks", default="1024,256", help="chunk sizes for (d)")
    p.add_argument("--quiet-load", type=float, default=1.5)
    p.add_argument("--quiet-wait", type=float, default=900.0, help="0: do not wait")
    p.add_argument("--work", help="work directory (default: a temporary one)")
    p.add_argument("--out", default="bench/out/train_bench.json")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-args", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    raw = list(sys.argv[1:] if argv is None else argv)
    # what workers must see: the shared settings, without --worker/--worker-args
    args.passthrough, skip = [], False
    for i, a in enumerate(raw):
        if skip:
            skip = False
            continue
        if a in ("--worker", "--worker-args"):
            skip = True
            continue
        if a.startswith(("--worker=", "--worker-args=")):
            continue
        args.passthrough.append(a)
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.worker:
        payload = json.loads(args.worker_args)
        if args.worker == "step-mem":
            result = worker_step_memory(world_of(payload["world"]), args, payload["mode"],
                                        payload["chunk"])
        else:
            result = worker_loss_memory(args, payload["variant"], payload["chunk"])
        print(json.dumps(result))
        return

    command = "python bench/train_bench.py" + ("" if not sys.argv[1:] else
                                                " " + shlex.join(sys.argv[1:]))
    quiet = (wait_until_quiet(args.quiet_load, args.quiet_wait) if args.quiet_wait > 0 else
             {"threshold": args.quiet_load, "waited_s": 0, "quiet": None, "polls": [loadavg()]})
    run_watch = CpuWatch()
    tmp = None
    if args.work:
        root = Path(args.work)
        root.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="train_bench_")
        root = Path(tmp.name)
    phases = {}
    try:
        watch = CpuWatch()
        world_info = build_world(root, args)
        phases["build"] = watch.result()
        world = world_of(root)
        print(f"world: {world_info['tokens']} tokens, V={world_info['tokenizer']['vocab']}, "
              f"teacher/student forward FLOPs {world_info['teacher_vs_student_fwd_flops']:.2f}x, "
              f"store {world_info['store']['bytes_per_token']:.1f} B/token, built in "
              f"{world_info['build_s']}s", flush=True)

        timing = time_steps(world, args)
        phases["timing"] = timing["cpu"]

        watch = CpuWatch()
        loader = loader_rate(world, args)
        phases["loader"] = watch.result()

        watch = CpuWatch()
        memory = {m: run_worker("step-mem", {"world": str(root), "mode": m,
                                             "chunk": args.lm_head_chunk}, args)
                  for m in MODES}
        small = args.mem_small_chunk  # the lm_head_chunk knob: both chunked modes again
        memory_small = {m: run_worker("step-mem", {"world": str(root), "mode": m,
                                                   "chunk": small}, args)
                        for m in (("ce", "offline") if small else ())}
        phases["step_memory"] = watch.result()

        watch = CpuWatch()
        chunks = [int(c) for c in args.loss_chunks.split(",") if c]
        loss_mem = [run_worker("loss-mem", {"variant": "naive", "chunk": 0}, args)]
        loss_mem += [run_worker("loss-mem", {"variant": "chunked", "chunk": c}, args)
                     for c in chunks]
        phases["loss_memory"] = watch.result()
    finally:
        if tmp is not None:
            tmp.cleanup()
    run_cpu = run_watch.result()

    # ------------------------------------------------------------------ figures and goals
    med = {m: timing["step_s"][m]["median"] for m in MODES}
    load_per_batch = timing["batch_tokens_mean"] / loader["tokens_per_s"]
    offline_step = med["offline"] + load_per_batch
    consumption = timing["batch_tokens_mean"] / offline_step
    naive = loss_mem[0]
    ratios = {
        "offline_vs_ce_step": offline_step / med["ce"],
        "online_vs_offline_step": med["online"] / offline_step,
        "offline_vs_ce_peak": memory["offline"]["step_peak_mb"] / memory["ce"]["step_peak_mb"],
        "loader_vs_consumption": loader["tokens_per_s"] / consumption,
        "chunked_vs_naive_peak": loss_mem[1]["loss_peak_mb"] / naive["loss_peak_mb"],
    }
    extra = {
        "offline_compute_vs_ce_step": med["offline"] / med["ce"],
        "offline_vs_hf_ce_step": offline_step / med["hf_ce"],
        "ce_vs_hf_ce_step": med["ce"] / med["hf_ce"],
        "offline_vs_hf_ce_peak": memory["offline"]["step_peak_mb"]
        / memory["hf_ce"]["step_peak_mb"],
        "online_vs_ce_peak": memory["online"]["step_peak_mb"] / memory["ce"]["step_peak_mb"],
        "offline_vs_ce_process_peak": memory["offline"]["peak_mb"] / memory["ce"]["peak_mb"],
        "online_vs_offline_process_peak": memory["online"]["peak_mb"]
        / memory["offline"]["peak_mb"],
    }
    best = {m: timing["step_s"][m]["min"] for m in MODES}  # least disturbed by other load
    extra["offline_vs_ce_step_min"] = (best["offline"] + load_per_batch) / best["ce"]
    extra["online_vs_offline_step_min"] = best["online"] / (best["offline"] + load_per_batch)
    if memory_small:
        extra[f"offline_vs_ce_peak_chunk{args.mem_small_chunk}"] = (
            memory_small["offline"]["step_peak_mb"] / memory_small["ce"]["step_peak_mb"])
    for r in loss_mem[1:]:
        extra[f"chunked{r['chunk']}_vs_naive_peak"] = r["loss_peak_mb"] / naive["loss_peak_mb"]
        extra[f"chunked{r['chunk']}_loss_abs_diff"] = abs(r["loss"] - naive["loss"])
        extra[f"chunked{r['chunk']}_wgrad_rel_diff"] = abs(
            r["weight_grad_norm"] - naive["weight_grad_norm"]) / naive["weight_grad_norm"]

    B, S = timing["batch_shape"]
    print(f"\nstudent {world_info['student']['params'] / 1e6:.1f}M params, teacher "
          f"{world_info['teacher']['params'] / 1e6:.1f}M (forward FLOPs "
          f"{world_info['teacher_vs_student_fwd_flops']:.2f}x), V={args.vocab}, batch "
          f"{B}x{S} = {timing['batch_tokens_mean']:.0f} tokens, k={args.k}, lm_head_chunk "
          f"{args.lm_head_chunk}, fp32, {timing['threads']} threads")
    print(f"\n{'mode':34s} {'step median s':>13s} {'min':>7s} {'max':>7s} {'vs CE':>6s} "
          f"{'step peak MB':>12s} {'vs CE':>6s} {'process peak MB':>15s}")
    for m in MODES:
        s, mem = timing["step_s"][m], memory[m]
        print(f"{MODE_LABELS[m]:34s} {s['median']:13.3f} {s['min']:7.3f} {s['max']:7.3f} "
              f"{s['median'] / med['ce']:5.2f}x {mem['step_peak_mb']:12.0f} "
              f"{mem['step_peak_mb'] / memory['ce']['step_peak_mb']:5.2f}x "
              f"{mem['peak_mb']:15.0f}")
    print(f"{'offline KD incl. loading':34s} {offline_step:13.3f} {'':7s} {'':7s} "
          f"{offline_step / med['ce']:5.2f}x   (+{load_per_batch * 1000:.1f} ms/batch "
          f"amortised StoreStream)")
    for m, mem in memory_small.items():
        print(f"{MODE_LABELS[m].replace('chunked', f'chunk {args.mem_small_chunk}'):34s} "
              f"{'':13s} {'':7s} {'':7s} {'':6s} {mem['step_peak_mb']:12.0f} "
              f"{mem['step_peak_mb'] / memory_small['ce']['step_peak_mb']:5.2f}x "
              f"{mem['peak_mb']:15.0f}")
    print(f"\nKD loss at V={args.loss_vocab}, {args.loss_tokens} tokens, d={args.loss_dim}, "
          f"fwd+bwd (full fp32 logits = {naive['full_logits_mb']:.0f} MB, lm_head grad = "
          f"{naive['weight_grad_mb']:.0f} MB):")
    print(f"{'variant':20s} {'peak MB':>9s} {'vs naive':>9s} {'time s':>7s} {'loss':>10s}")
    for r in loss_mem:
        name = "naive" if r["variant"] == "naive" else f"chunked ({r['chunk']})"
        print(f"{name:20s} {r['loss_peak_mb']:9.0f} "
              f"{r['loss_peak_mb'] / naive['loss_peak_mb']:8.3f}x {r['s']:7.1f} "
              f"{r['loss']:10.5f}")
    print(f"\nloader {loader['tokens_per_s']:,.0f} tokens/s (StoreStream, no model) vs offline "
          f"training consumption {consumption:,.0f} tokens/s")
    print(f"\n{'goal':42s} {'measured':>9s}  verdict")
    for name, value in ratios.items():
        desc, limit, kind = GOALS[name]
        print(f"{desc:42s} {value:8.3f}x  {verdict(name, value)}")
    print(f"(fastest steps instead of medians: offline/CE {extra['offline_vs_ce_step_min']:.3f}x, "
          f"online/offline {extra['online_vs_offline_step_min']:.3f}x)")
    print(f"\nload: before {quiet['polls'][-1]}, after {run_cpu['loadavg_end']}; other "
          f"processes used {run_cpu['others_cores']:.2f} cores on average during the run "
          f"(timing phase: {phases['timing']['others_cores']:.2f})")

    out = {
        "command": command, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "processor": platform.processor(), "torch_threads": timing["threads"]},
        "quiet_wait": quiet, "run_cpu": run_cpu, "phases": phases,
        "settings": {k: v for k, v in vars(args).items()
                     if k not in ("worker", "worker_args", "passthrough")},
        "world": world_info, "timing": timing, "memory": memory,
        "memory_small_chunk": memory_small, "loss_memory": loss_mem,
        "loader": loader,
        "derived": {"offline_step_incl_loading_s": offline_step,
                    "loader_s_per_batch_amortised": load_per_batch,
                    "consumption_tokens_per_s": consumption},
        "goals": {name: {"goal": GOALS[name][0], "value": v, "verdict": verdict(name, v)}
                  for name, v in ratios.items()},
        "extra_ratios": extra,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
