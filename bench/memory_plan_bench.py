"""The memory plan's estimate against the measured peak memory of real student-train steps.

    nice python bench/memory_plan_bench.py [--sizes 20M,100M,300M] [--modes full,lora,ckpt]
        [--optimizers adamw,adamw-8bit] [--steps 2] [--markdown bench/out/memory_plan_bench.md]
        [--png bench/out/memory_plan_bench.png]

World (built once under --root, reused while its recipe is unchanged): a byte-level BPE
trained on the tests' tiny clinical corpus and padded with reserved ids to V = --vocab (like
real tokenizers' unused rows); per size a Llama student made with LlamaConfig and random
weights (SIZES: ~20M, ~100M untied, ~300M with tied embeddings like Llama-3.2-1B); a store
written with logitstore's StoreWriter holding --samples samples of --seq-len tokens with the
synthetic Zipf teacher's top-k (tests/synthetic.py, k = --k, q8).

Per configuration (size x mode x optimizer; modes: full fine-tune, LoRA r=16 on the detected
projections, full fine-tune with gradient checkpointing), on the CPU in fp32:
  plan      student_train.memory_plan.estimate(cfg, num_processes=1, gpu_memory=None,
            model_config=the student's LlamaConfig): per-device bytes by row;
  measured  bench/memory_measure.py in a fresh subprocess (its docstring: how, and how
            precisely): `--steps` optimizer steps of student-train's own Run + Step, the peak of
            live tensor bytes (what CUDA's max_memory_allocated reports) and the peak RSS growth
            over the pre-load baseline; weights, gradients and optimizer state counted exactly
            from the tensors; the dynamic part = tensor peak - those.
Goal (issue 14): the plan's total within 15 % of the measured peak (tensor bytes; the RSS
ratio is reported next to it). Rows that disagree are listed per configuration.
Output: JSON (--out), a markdown table (--markdown), a PNG of plan vs measured (--png).
`--replan OLD.json` measures nothing: it plans again with the current memory_plan.py against
the measurements stored in OLD.json (seconds, to check a change of the plan).
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # synthetic.py, tiny_hf.py: the test fixtures
sys.path.insert(0, str(ROOT / "bench"))
from memory_measure import run_measurement  # noqa: E402
from memory_plan_report import markdown, plot, summary  # noqa: E402

GOAL = 0.15
SIGNAL = "teacher"
SIZES = {  # name: (LlamaConfig shape, batch_tokens)
    "tiny": (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2), 128),
    "20M": (dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6,
                 num_attention_heads=4, num_key_value_heads=2), 2048),
    "100M": (dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
                  num_attention_heads=12, num_key_value_heads=4), 1024),
    "300M": (dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=18,
                  num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=True),
             512),
}
MODES = {"full": {}, "lora": {"lora_r": 16}, "ckpt": {"gradient_checkpointing": True}}
OPTIMIZERS = ("adamw", "adamw-8bit")
PLAN_ROWS = ("weights", "gradients", "optimizer", "activations", "activations_checkpointed",
             "kd_buffers", "other", "total")


# ----------------------------------------------------------------------------- world

def make_tokenizer(directory: Path, vocab: int):
    """Byte-level BPE on tiny_hf's corpus, padded with never-produced reserved ids to `vocab`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from tiny_hf import corpus

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(corpus(), trainers.BpeTrainer(
        vocab_size=min(vocab, 400), special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    data = json.loads(backend.to_str())
    table = data["model"]["vocab"]
    for i in range(len(table), vocab):
        table[f"<reserved_{i}>"] = i
    backend = Tokenizer.from_str(json.dumps(data))
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", backend.token_to_id("<s>"))])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", unk_token="<unk>")
    tok.save_pretrained(directory)
    return tok


def make_student(directory: Path, tok, shape: dict, seq_len: int) -> int:
    """A randomly initialised Llama saved with its tokenizer; returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         max_position_embeddings=max(2 * seq_len, 256),
                         **{"tie_word_embeddings": False, **shape})
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def make_store(url: Path, tok, n: int, seq_len: int, k: int) -> None:
    import numpy as np

    from logitstore.format import SignalSpec, StoreSettings, TopKSpec
    from logitstore.toolkit.tokenizer_identity import tokenizer_fingerprint
    from logitstore.writer import StoreWriter
    from synthetic import ZipfTeacher, random_sample

    settings = StoreSettings(
        vocab_size=len(tok), tokenizer_fingerprint=tokenizer_fingerprint(tok),
        tokenizer_name="bench-bpe", signals={SIGNAL: SignalSpec(
            topk=TopKSpec(k), teacher={"model_id": "synthetic-zipf"})})
    teacher = ZipfTeacher(vocab_size=len(tok))
    with StoreWriter(str(url), settings, overwrite=True) as writer:
        for i in range(n):
            writer.add(random_sample(np.random.default_rng([7, i]), f"s{i:05d}", seq_len,
                                     teacher, k=k, signal=SIGNAL))


def build_world(root: Path, sizes: list[str], *, vocab: int, seq_len: int, samples: int,
                k: int) -> dict:
    """Tokenizer, one student per size and the store under `root` (reused when the recipe in
    root/world.json is the same); returns that recipe with the parameter counts."""
    root.mkdir(parents=True, exist_ok=True)
    recipe_file = root / "world.json"
    recipe = {"vocab": vocab, "seq_len": seq_len, "samples": samples, "k": k}
    known = json.loads(recipe_file.read_text()) if recipe_file.is_file() else {}
    if {key: known.get(key) for key in recipe} != recipe:
        known = {**recipe, "students": {}}
        tok = make_tokenizer(root / "tokenizer", vocab)
        make_store(root / "store", tok, samples, seq_len, k)
        recipe_file.write_text(json.dumps(known))
    for size in sizes:
        shape = SIZES[size][0]
        if known["students"].get(size, {}).get("shape") != shape:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(root / "tokenizer")
            params = make_student(root / f"student-{size}", tok, shape, seq_len)
            known["students"][size] = {"shape": shape, "params": params}
            recipe_file.write_text(json.dumps(known))
    return known


# ----------------------------------------------------------------------------- one configuration

def train_settings(root: Path, size: str, mode: str, optimizer: str, run_dir: Path) -> dict:
    """student-train settings of one configuration (CPU: fp32 weights, no autocast)."""
    settings = {"store": str(root / "store"), "student": str(root / f"student-{size}"),
                "out": str(run_dir), "batch_tokens": SIZES[size][1], "max_steps": 100,
                "warmup_ratio": 0.0, "save_every": 0, "verify_store": "none",
                "mixed_precision": "no", "student_dtype": "float32", **MODES[mode]}
    if optimizer != "adamw":  # left out when default, so runs work before the field exists
        settings["optimizer"] = optimizer
    return settings


def plan_of(settings: dict) -> dict | None:
    """The plan's rows (bytes) for these settings, or None while memory_plan is missing."""
    try:
        from student_train import memory_plan
    except ImportError:
        return None
    from transformers import AutoConfig

    from student_train.config import resolve_config

    cfg = resolve_config(None, settings)
    # device="cpu": what the same run holds on the CPU (no autocast, per-tensor AdamW, no
    # CUDA context), the run measured here; older plans without it are CUDA plans
    extra = {"device": "cpu"} if "device" in inspect.signature(memory_plan.estimate).parameters \
        else {}
    plan = memory_plan.estimate(cfg, num_processes=1, gpu_memory=None,
                                model_config=AutoConfig.from_pretrained(settings["student"]),
                                **extra)
    rows = plan.as_dict()
    return {k: rows.get(k) for k in PLAN_ROWS if rows.get(k) is not None} | {
        "other_rows": rows.get("other_rows", {}), "device": extra.get("device", "cuda"),
        "peak_phase": rows.get("peak_phase"),
        "render": plan.render()}


def measured_rows(m: dict) -> dict:
    """Measured bytes by plan row. weights, gradients, optimizer: counted from the tensors
    (gradients: all of them, at the optimizer step; optimizer: the states). dynamic: the tensor
    peak less the weights, gradients and optimizer states live AT the peak (activations, KD
    buffers, the lm_head gradient the fused head builds in the forward, step temporaries);
    gradients_at_peak: the parameter gradients live then (none before the first backward
    accumulation: with grad_accum 1 the activation peak comes before any .grad exists).
    dynamic splits into forward_kept, the live "other" bytes at the decoder stack's output
    (what the forward keeps for backward, the batch included), and head_and_backward, the
    rest of the peak (lm_head + KD-loss buffers, the lm_head gradient) when the peak is in
    the forward (None otherwise). Past the forward, dynamic is the peak less all of the
    gradients (one being made then, the embedding's, is not yet a .grad). peak_phase: "step"
    (optimizer temporaries live beyond the states), "backward" (parameter gradients live),
    else "forward"."""
    roles = m["peak_roles"]
    phase = "step" if roles["optimizer"] > m["optimizer_bytes"] else (
        "backward" if roles["gradients"] else "forward")
    # past the forward, all the gradients count as static (as the plan's phases count them):
    # one still being made (the embedding's at the end of the backward) is not yet a .grad
    gradients = m["gradient_bytes"] if phase != "forward" else roles["gradients"]
    live_static = roles["weights"] + gradients + min(roles["optimizer"], m["optimizer_bytes"])
    return {"weights": m["param_bytes"] + m["buffer_bytes"], "gradients": m["gradient_bytes"],
            "optimizer": m["optimizer_bytes"], "dynamic": m["peak_tensor"] - live_static,
            "forward_kept": m["decoder_output_tensor"],
            "head_and_backward": m["peak_tensor"] - live_static - m["decoder_output_tensor"]
            if phase == "forward" else None,
            "gradients_at_peak": roles["gradients"], "total_tensor": m["peak_tensor"],
            "total_rss": m["peak_rss"], "peak_phase": phase}


def compare(plan: dict | None, m: dict, checkpointing: bool) -> dict:
    """Plan vs measured, row by row (bytes, and ratios plan / measured)."""
    measured = measured_rows(m)
    out = {"measured": measured}
    if plan is None:
        return out
    acts = plan.get("activations_checkpointed" if checkpointing else "activations", 0)
    dynamic = acts + plan.get("kd_buffers", 0) + plan.get("other", 0)
    if plan.get("peak_phase") in ("backward", "step"):  # a phased plan: gradients live then
        dynamic = plan["total"] - plan["weights"] - plan["optimizer"] - plan["gradients"]
    planned = {"weights": plan.get("weights", 0), "gradients": plan.get("gradients", 0),
               "optimizer": plan.get("optimizer", 0), "dynamic": dynamic,
               "forward_kept": acts, "head_and_backward": plan.get("kd_buffers", 0)
               + plan.get("other", 0),
               "total_tensor": plan["total"], "total_rss": plan["total"]}
    ratios = {k: planned[k] / measured[k] if measured[k] else None for k in planned}
    ratios["forward_kept"] = planned["forward_kept"] / measured["forward_kept"] \
        if measured["forward_kept"] and not checkpointing else None  # ckpt: recompute differs
    misses = [k for k in ("weights", "gradients", "optimizer", "dynamic")
              if ratios[k] is not None and abs(ratios[k] - 1) > GOAL]
    out.update(planned=planned, ratios=ratios, rows_off=misses,
               within_goal=abs(ratios["total_tensor"] - 1) <= GOAL,
               within_goal_rss=abs(ratios["total_rss"] - 1) <= GOAL)
    return out


def measure_config(root: Path, size: str, mode: str, optimizer: str, steps: int,
                   nice: int) -> dict:
    run_dir = root / "runs" / f"{size}-{mode}-{optimizer}"
    settings = train_settings(root, size, mode, optimizer, run_dir)
    plan = plan_of(settings)
    started = time.perf_counter()
    measured = run_measurement({"config": settings, "steps": steps}, nice=nice)
    result = {"size": size, "mode": mode, "optimizer": optimizer, "settings": settings,
              "plan": plan, "measurement": measured,
              "wall_s": round(time.perf_counter() - started, 1)}
    result.update(compare(plan, measured, mode == "ckpt"))
    return result


# ----------------------------------------------------------------------------- main

def optimizer_field_present() -> bool:
    from student_train.config import FIELDS

    return "optimizer" in FIELDS


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="20M,100M,300M", help=f"of {', '.join(SIZES)}")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    p.add_argument("--steps", type=int, default=2,
                   help="optimizer steps per configuration (the 2nd is the steady state: "
                        "optimizer state allocated before its forward)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--k", type=int, default=32, help="top-k entries per position in the store")
    p.add_argument("--root", type=Path, default=Path("/tmp/memory_plan_bench"),
                   help="world (tokenizer, students, store) and run directories")
    p.add_argument("--out", type=Path, default=ROOT / "bench/out/memory_plan_bench.json")
    p.add_argument("--markdown", type=Path, default=None, help="also write the tables here")
    p.add_argument("--png", type=Path, default=None, help="plan vs measured figure")
    p.add_argument("--nice", type=int, default=10, help="niceness of the measuring workers")
    p.add_argument("--replan", type=Path, default=None, metavar="JSON",
                   help="measure nothing: redo the plans and comparisons of this earlier "
                        "output with the current memory_plan.py, write --out/--markdown/--png")
    return p.parse_args(argv)


def run_bench(args) -> dict:
    sizes = [s for s in args.sizes.split(",") if s]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        raise SystemExit(f"--sizes: unknown {unknown}; known: {list(SIZES)}")
    optimizers = [o for o in args.optimizers.split(",") if o]
    skipped = []
    if not optimizer_field_present():
        skipped = [o for o in optimizers if o != "adamw"]
        optimizers = [o for o in optimizers if o == "adamw"]
    report = {"bench": "memory_plan_bench", "args": {k: str(v) for k, v in vars(args).items()},
              "calibration": run_measurement(None, nice=args.nice),
              "world": build_world(args.root, sizes, vocab=args.vocab, seq_len=args.seq_len,
                                   samples=args.samples, k=args.k),
              "skipped_optimizers": skipped, "results": []}
    for size in sizes:
        for mode in args.modes.split(","):
            for optimizer in optimizers:
                print(f"measuring {size} {mode} {optimizer}", flush=True)
                report["results"].append(
                    measure_config(args.root, size, mode, optimizer, args.steps, args.nice))
                report["summary"] = summary(report["results"], GOAL)
                write_json(report, args.out)  # kept after each configuration
    return report


def write_json(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(path)


def replan(path: Path) -> dict:
    """The report at `path` with the plan and the comparison made again by the current
    memory_plan.py (the measurements kept: the students and store must still be there)."""
    report = json.loads(path.read_text())
    for result in report["results"]:
        result["plan"] = plan_of(result["settings"])
        for key in ("planned", "ratios", "rows_off", "within_goal", "within_goal_rss"):
            result.pop(key, None)
        result.update(compare(result["plan"], result["measurement"], result["mode"] == "ckpt"))
    report["summary"] = summary(report["results"], GOAL)
    return report


def main(argv=None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    if args.replan:
        report = replan(args.replan)
    else:
        report = run_bench(args)
        report["wall_s"] = round(time.perf_counter() - started, 1)
    write_json(report, args.out)
    table = markdown(report)
    print(table)
    if args.markdown:
        args.markdown.write_text(table)
    if args.png and plot(report, args.png):
        print(f"figure: {args.png}")


if __name__ == "__main__":
    main()
