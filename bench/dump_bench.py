"""teacher-dump benchmark: dump tokens/s against a bare forward pass of the same model over
the same batches, peak memory of both, and bytes per token written.

    python bench/dump_bench.py [--tokens 40000 --hidden 256 --layers 4 --vocab 32000
                                --top-k 32 --samples 16 --repeats 2]

Artefacts (the teacher is built once and cached under --workdir, default
bench/out/dump_bench_work/):

* a byte-level BPE tokenizer of exactly --vocab tokens, trained on the demo corpus
  (`demo/make_corpus.py`) plus generated pseudo-words (the demo text alone gives ~6k);
* a Llama-architecture teacher built with `LlamaConfig` + `from_config` (random init,
  fp32, untied embeddings), saved with the tokenizer as a local model directory. Being
  untrained, its next-token distribution is nearly uniform (entropy printed): speed does
  not depend on it, but the sampled bytes/token are a worst case (16 distinct ids in 16
  draws) and top-k ids compress less than a trained teacher's;
* a JSONL of the demo's text records holding about --tokens tokens (rewritten each run).

Measurements, each in a fresh subprocess (so every one gets its own peak RSS, from
getrusage ru_maxrss), alternating bare, dump, bare, dump... (--repeats pairs), medians
reported:

* bare: tokenizer, `teacher_dump.dump.read_data` and the dump's windowed batch plan
  with the dump's own resolved config, so the batches are the dump's, padded with
  `teacher_dump.capture.make_batch` before timing; the model loaded by
  `logitstore.toolkit.hf.load_causal_lm` as run_dump loads it; one untimed warm-up batch; then
  timed:
  `model(input_ids=..., attention_mask=..., use_cache=False)` under
  `torch.inference_mode()` over every batch (use_cache=False: the call the dump makes;
  the KV cache is work the dump does not do).
* dump: `teacher_dump.dump.run_dump` in-process on a new store in a temporary
  directory. Its loop (`teacher_dump.batch_loops.dump_samples`: forward, capture, hand-off
  to the writer thread, writer flush) is wrapped to time it apart from model/data
  loading; one untimed `capture_batch` of the first batch warms it up first. The headline
  figure is tokens / (loop + final store commit); the loop alone is reported too. The
  batch plan of both runs is hashed and checked equal.

Then, unless --no-breakdown, one more dump run (not counted; 1/--breakdown-fraction of the
records) instrumented with timers and torch.profiler: where the dump's time goes (forward
vs capture vs waiting for the writer thread, and the heaviest torch ops). For teachers whose
LM head the dump runs chunk by chunk (`teacher_dump.capture.lm_head_of`: Llama here),
"forward" is the decoder alone and the LM head counts under "capture".

The machine is shared: before measuring, the script waits until the 1-minute load average
is below --quiet-load (polled every 30 s, at most --quiet-max-wait s; --no-wait skips),
and it records the load and the CPU time used by other processes during every run.
On a busy machine every multi-threaded torch op waits for its slowest OpenMP thread to be
scheduled, which costs the dump's many mid-sized ops more than the forward's large
matmuls; `--threads 1` measures both paths on one thread each (work, not stalls).
Results: a printed table and bench/out/dump_bench.json (with the exact command line).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine_facts import cpu_facts  # noqa: E402

MARK = "@@DUMP_BENCH_RESULT@@"
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


# ----------------------------------------------------------------------------- artefacts


def _pseudo_words(n_lines: int, seed: int) -> list[str]:
    """Lines of generated pseudo-words: enough distinct pairs for a 32k-token BPE."""
    import random

    rng = random.Random(seed)
    syllables = ["ba", "ce", "di", "fo", "gu", "ha", "je", "ki", "lo", "mu", "na", "pe", "qi",
                 "ro", "su", "ta", "ve", "wi", "xo", "yu", "za", "th", "ch", "sh", "ar", "en",
                 "or", "ul"]
    return [" ".join("".join(rng.choice(syllables) for _ in range(rng.randint(2, 5)))
                     for _ in range(50)) for _ in range(n_lines)]


def build_artefacts(args, work: Path) -> dict:
    """Tokenizer + teacher directory (cached in `work` by their settings) and the data JSONL."""
    key = {k: getattr(args, k) for k in ("vocab", "hidden", "layers", "intermediate", "heads",
                                         "kv_heads", "max_length", "seed")}
    tag = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    base = work / f"artefacts-{tag}"
    done = base / "artefacts.json"
    if done.exists():
        print(f"artefacts: teacher cached in {base}")
        return {**json.loads(done.read_text()), **make_data(args, base)}
    if base.exists():
        shutil.rmtree(base)
    base.mkdir(parents=True)
    started = time.perf_counter()

    corpus = base / "corpus"
    subprocess.run([sys.executable, str(ROOT / "demo" / "make_corpus.py"), "--out", str(corpus),
                    "--seed", str(args.seed)], check=True, stdout=subprocess.DEVNULL)
    texts = [json.loads(line)["text"]
             for name in ("train.jsonl", "heldout.jsonl")
             for line in (corpus / name).read_text(encoding="utf-8").splitlines() if line.strip()]

    # 1. Tokenizer: byte-level BPE of exactly args.vocab tokens (as tests/tiny_hf.py does).
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=args.vocab, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train_from_iterator(texts + _pseudo_words(6000, args.seed), trainer=trainer)
    bos = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>",
                                        eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    if len(tokenizer) != args.vocab:
        raise SystemExit(f"the BPE reached {len(tokenizer)} tokens, not {args.vocab}: "
                         "more generated text is needed")

    # 2. Teacher: Llama architecture from a LlamaConfig, random init, fp32.
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                         intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                         max_position_embeddings=max(args.max_length, 512),
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    params = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight.numel()
    teacher = base / "teacher"
    model.save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)

    info = {"teacher_dir": str(teacher),
            "tokenizer_vocab": len(tokenizer), "model_vocab": int(config.vocab_size),
            "parameters": params, "embedding_parameters": embed, "lm_head_parameters": head,
            "non_embedding_parameters": params - embed - head,
            "architecture": {"class": type(model).__name__, "hidden_size": args.hidden,
                             "intermediate_size": args.intermediate,
                             "num_hidden_layers": args.layers,
                             "num_attention_heads": args.heads,
                             "num_key_value_heads": args.kv_heads,
                             "tie_word_embeddings": False, "dtype": "float32",
                             "init": f"random (torch.manual_seed({args.seed}))"},
            "build_seconds": time.perf_counter() - started}
    done.write_text(json.dumps(info, indent=1))
    print(f"artefacts: built in {info['build_seconds']:.0f}s -> {base}")
    return {**info, **make_data(args, base)}


def make_data(args, base: Path) -> dict:
    """The demo's text records, in file order, until about args.tokens tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base / "teacher")
    lines, tokens = [], 0
    for line in (base / "corpus" / "train.jsonl").read_text(encoding="utf-8").splitlines():
        if tokens >= args.tokens:
            break
        record = json.loads(line)
        tokens += min(len(tokenizer(record["text"])["input_ids"]) + 1, args.max_length)
        lines.append(json.dumps({"id": record["id"], "text": record["text"]}))
    data = base / f"data-{args.tokens}.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"data": str(data), "records": len(lines)}


def dump_overrides(args, art: dict) -> dict:
    """The teacher-dump flags of every run (a CPU version of the med42 preset's signal)."""
    return {"model": art["teacher_dir"], "data": [art["data"]], "format": "text",
            "quantize": "none", "dtype": "float32", "device": "cpu",
            "max_length": args.max_length, "batch_tokens": args.batch_tokens,
            "logits_chunk": args.logits_chunk, "top_k": args.top_k, "samples": args.samples,
            "sample_temperature": 1.0, "seed": 0, "logprob_encoding": "q8",
            "hidden_layers": args.hidden_layers or None, "signal": "teacher"}


# ----------------------------------------------------------------------------- children


class RssSampler:
    """Peak RSS of this process between start() and stop(), sampled every `every` s."""

    def __init__(self, every: float = 0.02):
        import psutil

        self.proc, self.every, self.peak = psutil.Process(), every, 0
        self.start_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(self.every)

    def start(self) -> "RssSampler":
        self.start_rss = self.peak = self.proc.memory_info().rss
        self._thread.start()
        return self

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        return {"rss_at_loop_start_mb": self.start_rss / 2**20,
                "loop_peak_rss_mb": self.peak / 2**20}


def _dump_plan(samples: list, cfg) -> list[list[int]]:
    """The dump's batch plan (`teacher_dump.ranks.stream_batches`) as sample positions."""
    from logitstore.toolkit.batching import windowed_padded_batches

    return list(windowed_padded_batches(range(len(samples)), cfg.batch_tokens,
                                        cfg.read_window_tokens,
                                        lambda i: len(samples[i].input_ids)))


def _plan_digest(samples, plan) -> str:
    ids = [[samples[i].sample_id for i in batch] for batch in plan]
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child_bare(cfg) -> dict:
    import numpy as np
    import torch

    from logitstore.toolkit.hf import load_causal_lm, load_tokenizer
    from teacher_dump.capture import make_batch
    from teacher_dump.dump import read_data

    t0 = time.perf_counter()
    tokenizer = load_tokenizer(cfg.model)
    samples, _ = read_data(cfg, tokenizer)
    samples = list(samples)  # a stream: held here, to pad every batch before timing
    plan = _dump_plan(samples, cfg)
    model, _ = load_causal_lm(cfg.model, quantize=cfg.quantize, dtype=cfg.dtype,
                              device=cfg.device)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = [make_batch([samples[i].sample_id for i in b], [samples[i].input_ids for i in b],
                          [samples[i].loss_mask for i in b], pad_id=pad, device=device)
               for b in plan]
    with torch.inference_mode():  # warm-up; also the teacher's entropy on real positions
        first = batches[0]
        logits = model(input_ids=first.input_ids, attention_mask=first.attention_mask,
                       use_cache=False).logits
        real = torch.cat([logits[b, :n] for b, n in enumerate(first.lengths.tolist())][:8])
        logp = torch.log_softmax(real.float(), -1)
        entropy = float(-(logp.exp() * logp).sum(-1).mean())
        del logits, real, logp
    setup_s = time.perf_counter() - t0
    rss = RssSampler().start()
    start, cpu0 = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        for batch in batches:
            out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                        use_cache=False)
            del out
    loop_s, cpu_s = time.perf_counter() - start, time.process_time() - cpu0
    tokens = int(sum(len(s.input_ids) for s in samples))
    return {"kind": "bare", "tokens": tokens, "samples": len(samples), "batches": len(plan),
            "padded_tokens": int(sum(b.input_ids.numel() for b in batches)),
            "plan_digest": _plan_digest(samples, plan), "setup_s": setup_s, "loop_s": loop_s,
            "measured_s": loop_s, "tokens_per_s": tokens / loop_s, "process_cpu_s": cpu_s,
            "peak_rss_mb": _peak_rss_mb(), **rss.stop(),
            "teacher_mean_entropy_nats": entropy,
            "max_entropy_nats": float(np.log(len(tokenizer))),
            "torch_threads": torch.get_num_threads()}


def child_dump(cfg, breakdown: bool = False) -> dict:
    import torch

    import teacher_dump.capture as capture
    import teacher_dump.dump as dump
    from teacher_dump.background_writer import BackgroundWriter
    from logitstore.snapshot import committed_state
    from logitstore.fs import StoreFS
    from logitstore.info import size_report

    timing: dict = {}
    inner = dump.dump_samples
    counters = {"forward_s": 0.0, "capture_s": 0.0, "make_batch_s": 0.0, "put_wait_s": 0.0,
                "writer_thread_cpu_s": 0.0}

    def timed_loop(work, settings, samples, store, extra, report):
        samples = list(samples)  # a stream: read whole here, so the plan can be hashed
        plan = _dump_plan(samples, work.cfg)
        timing["plan_digest"] = _plan_digest(samples, plan)
        timing["batches"] = len(plan)
        t = time.perf_counter()
        work.capture([samples[i] for i in plan[0]])  # warm-up, untimed, as the bare run's
        timing["warmup_s"] = time.perf_counter() - t  # includes torch.compile of the capture
        timing["capture_kernel"] = work.spec.kernel
        for key in counters:
            counters[key] = 0.0
        timing["rss"] = RssSampler().start()
        profiler = None
        if breakdown:
            profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            profiler.__enter__()
        timing["loop_start"], timing["cpu0"] = time.perf_counter(), time.process_time()
        try:
            inner(work, settings, samples, store, extra, report)
        finally:
            timing["loop_end"], timing["cpu1"] = time.perf_counter(), time.process_time()
            timing["rss"] = timing["rss"].stop()
            if profiler is not None:
                profiler.__exit__(None, None, None)
                timing["profile"] = profiler

    dump.dump_samples = timed_loop  # run_dump looks it up in its module
    if breakdown:  # timers around the pieces of one batch (main thread) and the writer thread
        def timer(fn, name):
            def wrapped(*a, **kw):
                t = time.perf_counter()
                try:
                    return fn(*a, **kw)
                finally:
                    counters[name] += time.perf_counter() - t
            return wrapped

        capture.run_model = timer(capture.run_model, "forward_s")
        capture.capture_outputs = timer(capture.capture_outputs, "capture_s")
        capture.make_batch = timer(capture.make_batch, "make_batch_s")
        BackgroundWriter.put = timer(BackgroundWriter.put, "put_wait_s")
        run = BackgroundWriter._run

        def writer_run(self):
            t = time.thread_time()
            try:
                run(self)
            finally:
                counters["writer_thread_cpu_s"] += time.thread_time() - t
        BackgroundWriter._run = writer_run

    t0 = time.perf_counter()
    report = dump.run_dump(cfg, progress=False)
    end = time.perf_counter()
    manifest = committed_state(StoreFS(cfg.out))
    sizes = size_report(manifest)
    loop_s = timing["loop_end"] - timing["loop_start"]
    commit_s = end - timing["loop_end"]
    tokens = report.tokens_written
    result = {"kind": "dump", "tokens": tokens, "samples": report.samples_written,
              "batches": timing["batches"], "plan_digest": timing["plan_digest"],
              "setup_s": timing["loop_start"] - t0, "warmup_s": timing["warmup_s"],
              "capture_kernel": timing["capture_kernel"], "loop_s": loop_s, "commit_s": commit_s,
              "measured_s": loop_s + commit_s, "tokens_per_s": tokens / (loop_s + commit_s),
              "loop_tokens_per_s": tokens / loop_s, "run_dump_wall_s": end - t0,
              "process_cpu_s": timing["cpu1"] - timing["cpu0"], "peak_rss_mb": _peak_rss_mb(),
              **timing["rss"], "store": report.store, "size_report": sizes,
              "torch_threads": torch.get_num_threads()}
    if breakdown:
        prof = timing["profile"]
        result["breakdown"] = dict(counters)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
        result["profile_table"] = table
        result["profile_ops"] = [
            {"op": e.key, "self_cpu_s": e.self_cpu_time_total / 1e6, "calls": e.count}
            for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:25]]
    return result


def child_main(kind: str, payload: str) -> None:
    from teacher_dump.config import resolve_config

    spec = json.loads(payload)
    if spec.get("threads"):
        import torch

        torch.set_num_threads(spec["threads"])
    cfg = resolve_config(None, spec["overrides"])
    result = child_bare(cfg) if kind == "bare" else child_dump(cfg, kind == "breakdown")
    result["kind"] = kind
    print(MARK + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- parent


def _cpu_jiffies() -> dict:
    """System-wide CPU time (jiffies) from /proc/stat: busy (user..softirq) and steal."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return {"busy": user + nice + system + irq + softirq, "steal": steal}


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def wait_quiet(args) -> dict:
    if args.no_wait:
        return {"waited_s": 0.0, "skipped": True, "load_1min": loadavg()}
    started = time.monotonic()
    polls = []
    while True:
        load = loadavg()
        polls.append(load)
        if load < args.quiet_load:
            return {"waited_s": time.monotonic() - started, "gave_up": False, "load_1min": load,
                    "polls": polls}
        if time.monotonic() - started >= args.quiet_max_wait:
            print(f"machine still busy (load {load:.2f}) after {args.quiet_max_wait:.0f}s: "
                  "measuring anyway", flush=True)
            return {"waited_s": time.monotonic() - started, "gave_up": True, "load_1min": load,
                    "polls": polls}
        print(f"waiting for a quiet machine: 1-min load {load:.2f} >= {args.quiet_load}",
              flush=True)
        time.sleep(args.quiet_poll)


def run_child(kind: str, overrides: dict, env: dict, threads: int = 0) -> dict:
    """One measurement in a fresh interpreter; adds the machine's load while it ran."""
    payload = json.dumps({"overrides": overrides, "threads": threads})
    hz = os.sysconf("SC_CLK_TCK")
    before_usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    before, load0, t = _cpu_jiffies(), loadavg(), time.perf_counter()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", kind,
                           "--child-payload", payload], capture_output=True, text=True,
                          env=env, cwd=ROOT)
    wall = time.perf_counter() - t
    after, load1 = _cpu_jiffies(), loadavg()
    after_usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    lines = [x for x in proc.stdout.splitlines() if x.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"{kind} run failed (exit {proc.returncode})")
    result = json.loads(lines[-1][len(MARK):])
    own = ((after_usage.ru_utime - before_usage.ru_utime)
           + (after_usage.ru_stime - before_usage.ru_stime))
    busy = (after["busy"] - before["busy"]) / hz
    result["machine"] = {"child_wall_s": wall, "load_1min_before": load0,
                         "load_1min_after": load1,
                         # CPU used by everything else on the machine while this run went on
                         "other_processes_cores": max(0.0, busy - own) / wall,
                         "steal_cores": (after["steal"] - before["steal"]) / hz / wall}
    return result


def _mb(x: float) -> str:
    return f"{x:,.0f} MB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=40000, help="about this many tokens of data")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--logits-chunk", type=int, default=512)
    p.add_argument("--top-k", type=int, default=32)
    p.add_argument("--samples", type=int, default=16, help="sampled draws per position")
    p.add_argument("--hidden-layers", default="", help="e.g. -1 (default: off)")
    p.add_argument("--repeats", type=int, default=2, help="bare/dump pairs, medians reported")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--goal", type=float, default=0.95, help="dump/bare tokens/s goal")
    p.add_argument("--no-breakdown", action="store_true",
                   help="skip the instrumented extra dump run (time + torch.profiler)")
    p.add_argument("--breakdown-fraction", type=int, default=4,
                   help="the instrumented run dumps 1/N of the records")
    p.add_argument("--quiet-load", type=float, default=1.5)
    p.add_argument("--quiet-max-wait", type=float, default=900)
    p.add_argument("--quiet-poll", type=float, default=30)
    p.add_argument("--no-wait", action="store_true", help="measure without waiting for quiet")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads of every run (default: torch's own)")
    p.add_argument("--workdir", default=str(ROOT / "bench" / "out" / "dump_bench_work"))
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "dump_bench.json"))
    p.add_argument("--child", choices=["bare", "dump", "breakdown"], help=argparse.SUPPRESS)
    p.add_argument("--child-payload", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child_main(args.child, args.child_payload)
        return

    command = "python " + shlex.join([os.path.relpath(__file__, ROOT)] + sys.argv[1:])
    started = time.perf_counter()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    art = build_artefacts(args, work)
    print(f"teacher: {art['architecture']['class']} hidden {args.hidden}, {args.layers} layers, "
          f"{args.heads} heads ({args.kv_heads} kv), MLP {args.intermediate}, vocab "
          f"{art['model_vocab']}: {art['parameters']:,} parameters "
          f"({art['embedding_parameters']:,} embeddings + {art['lm_head_parameters']:,} "
          f"LM head + {art['non_embedding_parameters']:,} blocks)")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [x for x in [
                   os.environ.get("PYTHONPATH")] if x]))

    quiet = wait_quiet(args)
    print(f"1-min load at start {quiet['load_1min']:.2f} (waited {quiet['waited_s']:.0f}s)",
          flush=True)
    stores = Path(tempfile.mkdtemp(prefix="stores-", dir=work))
    runs = []
    try:
        order = ["bare", "dump"] * args.repeats
        if not args.no_breakdown:
            order.append("breakdown")
        for n, kind in enumerate(order):
            overrides = dump_overrides(args, art)
            overrides["out"] = str(stores / f"store-{n}-{kind}")
            if kind == "breakdown":  # proportions only: a quarter of the data is enough
                overrides["limit"] = max(1, art["records"] // args.breakdown_fraction)
            r = run_child(kind, overrides, env, args.threads)
            r["run"] = n
            runs.append(r)
            m = r["machine"]
            print(f"  run {n} {kind:9s} {r['tokens']:,} tokens in {r['measured_s']:6.1f}s = "
                  f"{r['tokens_per_s']:7,.0f} tokens/s; peak RSS {_mb(r['peak_rss_mb'])}; "
                  f"load {m['load_1min_before']:.2f}->{m['load_1min_after']:.2f}, other "
                  f"processes {m['other_processes_cores']:.2f} cores", flush=True)
    finally:
        shutil.rmtree(stores, ignore_errors=True)

    bare = [r for r in runs if r["kind"] == "bare"]
    dumps = [r for r in runs if r["kind"] == "dump"]
    digests = {r["plan_digest"] for r in bare + dumps}
    tokens = {r["tokens"] for r in bare + dumps}
    if len(digests) != 1 or len(tokens) != 1:
        raise SystemExit(f"the runs did not see the same batches: plans {digests}, "
                         f"tokens {tokens}")
    med = statistics.median
    bare_tps, dump_tps = med(r["tokens_per_s"] for r in bare), med(r["tokens_per_s"] for r in dumps)
    loop_tps = med(r["loop_tokens_per_s"] for r in dumps)
    pair_ratios = [d["tokens_per_s"] / b["tokens_per_s"] for b, d in zip(bare, dumps)]
    ratio = dump_tps / bare_tps
    last = dumps[-1]
    sizes = last["size_report"]
    signal = sizes["signals"]["teacher"]
    arrays = sizes["arrays"]
    per_part = {name: a["bytes_per_token"] for name, a in arrays.items()}
    index_bpt = sizes["bytes_per_token"] - sum(per_part.values())
    other_cores = max(r["machine"]["other_processes_cores"] for r in runs)

    print()
    print(f"same batches: {bare[0]['batches']} batches of <= {args.batch_tokens} padded tokens, "
          f"{bare[0]['tokens']:,} tokens ({bare[0]['padded_tokens']:,} padded) in "
          f"{bare[0]['samples']} samples; plan {bare[0]['plan_digest']}")
    print(f"{'':28s} {'bare forward':>14s} {'teacher-dump':>14s} {'dump / bare':>12s}")
    rows = [
        ("tokens/s (median)", f"{bare_tps:,.0f}", f"{dump_tps:,.0f}", f"{ratio:.3f}"),
        ("tokens/s, dump loop only", f"{bare_tps:,.0f}", f"{loop_tps:,.0f}",
         f"{loop_tps / bare_tps:.3f}"),
        ("tokens/s per run", ", ".join(f"{r['tokens_per_s']:,.0f}" for r in bare),
         ", ".join(f"{r['tokens_per_s']:,.0f}" for r in dumps),
         ", ".join(f"{x:.3f}" for x in pair_ratios)),
        ("seconds (median)", f"{med(r['measured_s'] for r in bare):.1f}",
         f"{med(r['measured_s'] for r in dumps):.1f}", ""),
        ("process CPU s (median)", f"{med(r['process_cpu_s'] for r in bare):.1f}",
         f"{med(r['process_cpu_s'] for r in dumps):.1f}", ""),
        ("peak RSS, process", _mb(med(r["peak_rss_mb"] for r in bare)),
         _mb(med(r["peak_rss_mb"] for r in dumps)),
         f"{med(r['peak_rss_mb'] for r in dumps) / med(r['peak_rss_mb'] for r in bare):.3f}"),
        ("RSS at loop start", _mb(med(r["rss_at_loop_start_mb"] for r in bare)),
         _mb(med(r["rss_at_loop_start_mb"] for r in dumps)), ""),
        ("peak RSS during loop", _mb(med(r["loop_peak_rss_mb"] for r in bare)),
         _mb(med(r["loop_peak_rss_mb"] for r in dumps)), ""),
    ]
    for name, a, b, c in rows:
        print(f"{name:28s} {a:>14s} {b:>14s} {c:>12s}")
    print(f"\ngoal dump/bare >= {args.goal}: {'MET' if ratio >= args.goal else 'NOT MET'} "
          f"({ratio:.3f})")
    print(f"teacher mean entropy {bare[0]['teacher_mean_entropy_nats']:.2f} nats "
          f"(uniform: {bare[0]['max_entropy_nats']:.2f}); store "
          f"{last['store']['bytes']:,} bytes = {sizes['bytes_per_token']:.2f} bytes/token")
    print(f"{'bytes/token written':28s} {'B/token':>8s} {'B/entry':>8s} {'entries/token':>14s}")
    for kind in ("topk", "sampled"):
        if kind in signal:
            s = signal[kind]
            print(f"  {kind:26s} {s['bytes_per_token']:8.2f} {s['bytes_per_entry']:8.3f} "
                  f"{s['entries_per_token']:14.2f}")
    for name, a in arrays.items():
        print(f"    {name:24s} {a['bytes_per_token']:8.2f}")
    print(f"  {'index + manifests':26s} {index_bpt:8.2f}")
    print(f"  {'total':26s} {sizes['bytes_per_token']:8.2f}")

    breakdown = next((r for r in runs if r["kind"] == "breakdown"), None)
    if breakdown is not None:
        b = breakdown["breakdown"]
        loop = breakdown["loop_s"]
        print(f"\nwhere the dump loop's time goes (instrumented run: {breakdown['tokens']:,} "
              f"tokens, {loop:.1f}s loop, torch.profiler on; its forward alone "
              f"{breakdown['tokens'] / b['forward_s']:,.0f} tokens/s, bare {bare_tps:,.0f}):")
        for key in ("forward_s", "capture_s", "make_batch_s", "put_wait_s"):
            print(f"  {key[:-2]:24s} {b[key]:7.2f}s  {100 * b[key] / loop:5.1f}%")
        rest = loop - sum(b[k] for k in ("forward_s", "capture_s", "make_batch_s", "put_wait_s"))
        print(f"  {'rest (loop + flush)':24s} {rest:7.2f}s  {100 * rest / loop:5.1f}%")
        print(f"  writer thread CPU        {b['writer_thread_cpu_s']:7.2f}s (concurrent)")
        print("  heaviest torch ops (self CPU):")
        for op in breakdown["profile_ops"][:12]:
            print(f"    {op['op']:32s} {op['self_cpu_s']:7.2f}s  {op['calls']:6d} calls")

    cpu = cpu_facts()
    out = {
        "command": command, "argv": sys.argv, "cwd": os.getcwd(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "processor": cpu["model"], "cpu_facts": cpu,
                    "python": platform.python_version(),
                    "torch": _version("torch"), "transformers": _version("transformers"),
                    "torch_threads": bare[0]["torch_threads"]},
        "load": {"quiet_wait": quiet, "load_1min_per_run": [
                     (r["machine"]["load_1min_before"], r["machine"]["load_1min_after"])
                     for r in runs],
                 "max_other_processes_cores": other_cores,
                 "note": "load includes this benchmark's own ~2 busy threads; "
                         "other_processes_cores is system CPU time minus the run's own"},
        "teacher": art, "dump_config": dump_overrides(args, art),
        "batches": {"count": bare[0]["batches"], "batch_tokens": args.batch_tokens,
                    "tokens": bare[0]["tokens"], "padded_tokens": bare[0]["padded_tokens"],
                    "samples": bare[0]["samples"], "plan_digest": bare[0]["plan_digest"]},
        "teacher_mean_entropy_nats": bare[0]["teacher_mean_entropy_nats"],
        "bare_tokens_per_s": bare_tps, "dump_tokens_per_s": dump_tps,
        "dump_loop_tokens_per_s": loop_tps, "ratio": ratio,
        "loop_ratio": loop_tps / bare_tps, "pair_ratios": pair_ratios, "goal": args.goal,
        "goal_met": ratio >= args.goal,
        "peak_rss_mb": {"bare": med(r["peak_rss_mb"] for r in bare),
                        "dump": med(r["peak_rss_mb"] for r in dumps)},
        "bytes_per_token": {"total": sizes["bytes_per_token"], "topk":
                            signal.get("topk", {}).get("bytes_per_token"),
                            "sampled": signal.get("sampled", {}).get("bytes_per_token"),
                            "arrays": per_part, "index_and_manifests": index_bpt},
        "size_report": sizes,
        "runs": [{k: v for k, v in r.items() if k not in ("size_report", "profile_table")}
                 for r in runs],
        "profile_table": breakdown["profile_table"] if breakdown else None,
        "total_seconds": time.perf_counter() - started,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"\nwrote {args.out} ({out['total_seconds']:.0f}s in all)")


def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001
        return "?"


if __name__ == "__main__":
    main()
