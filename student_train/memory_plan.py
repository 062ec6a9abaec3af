"""The memory plan: what one training step holds per device, before any weight is loaded.

    plan = estimate(cfg, num_processes=2, gpu_memory=parse_memory_size("24GiB"))
    print(plan.render())  # weights, gradients, optimizer, activations, KD buffers, total

The figures are the peak tensor bytes of a step (what torch.cuda.max_memory_allocated reports),
plus, on CUDA, the context and allocator reserve. Shapes come from the student's config (a
meta-device model, memory_plan_facts.py) and the store's manifest (across tokenizers also
the student's tokenizer and the first segment's text); every row is arithmetic:

  weights      parameters x student_dtype bytes (qlora: decoder Linear layers in 4-bit NF4 with
               double-quantised absmax, ~0.516 B/param; the rest fp32, as peft's
               prepare_model_for_kbit_training casts it); LoRA adapters and alignment
               projections fp32
  gradients    the trainable parameters, in their own dtype
  optimizer    student_train.optimizers.state_bytes per trainable tensor
  activations  what the forward keeps for backward per token (memory_plan_terms.py: a
               Llama-style layer, measured exact in fp32), x layers x batch_tokens, plus the
               final norm, RoPE's tables and the batch; with gradient checkpointing each layer
               keeps its input only (the recompute of one layer comes in the backward)
  kd_buffers   fused_head_loss.py's largest chunk: the fp32 [chunk, vocab] buffer, a second
               one for zero-tail kl at T != 1, a 16-bit copy while converting under autocast;
               its 16-bit weight copy, the picked hidden rows and their gradient (ULD across
               tokenizers: its own [chunk, vocab] buffers, when larger)
  other        what else the peak phase holds: the lm_head gradient the fused head builds in
               the forward (full fine-tune), the backward's buffers, recompute and embedding
               gradients, the optimizer step's temporaries; on CUDA: bf16 autocast copies of
               fp32 Linear weights, FSDP's all-gathered units, DDP's gradient buckets, the
               CUDA context and allocator reserve

The rows peak at different moments (with grad_accum 1 no parameter gradient exists in the
forward; the optimizer's temporaries exist only in the step), so `total` is the largest of
three phases, forward, backward and step (`_rows` says what each holds), and `peak_phase`
names it. With `fsdp`, weights, gradients and optimizer state are divided over the processes.
Measured on the CPU in fp32 (bench/memory_plan_bench.py); the CUDA-only rows (autocast copies,
the context and reserve, foreach AdamW's transient, FSDP's and DDP's buffers) are sized from
the ops and not measured.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

from logitstore.errors import ConfigError
from student_train import memory_plan_terms as terms
from student_train.memory_plan_facts import (ModelFacts, StoreFacts, load_model_config,
                                             model_facts, store_facts)

GiB = 1 << 30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# bitsandbytes NF4 with double quantisation: 4 bits, an 8-bit absmax per 64 values and an fp32
# absmax per 256 of those.
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
CUDA_CONTEXT_BYTES = 512 << 20  # CUDA context, cuBLAS workspace: outside the allocator's count
ALLOCATOR_RESERVE = 0.05  # fragmentation of the caching allocator, share of the tensor peak
SUGGESTED_LORA_R = 16
BACKWARD_ROW = "backward activations + buffers"  # the backward's peak beyond W + O + G
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 1 << 10, "m": 10**6, "mb": 10**6,
          "mib": 1 << 20, "g": 10**9, "gb": 10**9, "gib": 1 << 30, "t": 10**12, "tb": 10**12,
          "tib": 1 << 40}


def _parse_size(text) -> int | None:
    if isinstance(text, int) and not isinstance(text, bool):
        return text if text > 0 else None
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match and match.group(2).lower()
    if not match or unit not in _UNITS or float(match.group(1)) <= 0:
        return None
    return int(float(match.group(1)) * _UNITS[unit])


def memory_size_problem(text) -> str | None:
    """What is wrong with a memory size (None when parse_memory_size takes it)."""
    if _parse_size(text) is not None:
        return None
    return (f"expected a positive size such as 24GiB, 24GB, 16G or 1536MiB, found {text!r}")


def parse_memory_size(text: str | int) -> int:
    """Bytes of '24GiB', '24 GB', '1536MiB', '16G' (G and M are decimal, GiB and MiB binary);
    a ConfigError for anything else."""
    size = _parse_size(text)
    if size is None:
        raise ConfigError([f"gpu_memory: {memory_size_problem(text)}"])
    return size


@dataclass(frozen=True)
class Knobs:
    """The settings the plan depends on (a TrainConfig's, or a candidate change of them)."""

    batch_tokens: int
    gradient_checkpointing: bool
    optimizer: str
    fsdp: bool
    processes: int
    lora_r: int
    qlora: bool
    lora_dropout: float
    student_dtype: str
    mixed_precision: str
    lm_head_chunk: int
    packing: bool
    device: str  # "cuda" (the plan) or "cpu" (what the same run holds on the CPU)
    grad_accum: int = 1

    @classmethod
    def of(cls, cfg, processes: int, device: str) -> "Knobs":
        return cls(cfg.batch_tokens, cfg.gradient_checkpointing,
                   getattr(cfg, "optimizer", "adamw"), getattr(cfg, "fsdp", False),
                   processes, cfg.lora_r, cfg.qlora, cfg.lora_dropout, cfg.student_dtype,
                   cfg.mixed_precision, cfg.lm_head_chunk, cfg.packing, device,
                   cfg.grad_accum)

    @property
    def autocast(self) -> bool:
        """accelerate's autocast: bf16/fp16 on CUDA (mixed_precision auto or set), none on CPU."""
        return self.device == "cuda" and self.mixed_precision != "no"

    @property
    def param_bytes(self) -> int:
        """Bytes per value of the unquantised parameters (qlora: fp32 after prepare)."""
        return 4 if self.qlora else DTYPE_BYTES[self.student_dtype]

    @property
    def compute_bytes(self) -> int:
        return 2 if self.autocast else self.param_bytes


@dataclass
class MemoryPlan:
    """Per-device bytes of one training step (see the module docstring for each row)."""

    weights: int
    gradients: int
    optimizer: int
    activations: int  # without gradient checkpointing
    activations_checkpointed: int  # with it
    kd_buffers: int
    other: int
    total: int
    fits: bool | None  # None: no gpu_memory given
    max_batch_tokens: int | None  # the largest that fits (None: no gpu_memory, or none fits)
    suggestion: str | None  # the smallest change that fits, when this does not
    gpu_memory: int | None = None
    other_rows: dict[str, int] = field(default_factory=dict)  # the rows besides the main ones
    peak_phase: str = "forward"  # the phase `total` is: forward, backward or step
    phases: dict[str, int] = field(default_factory=dict)  # each phase's bytes (no CUDA rows)
    facts: dict = field(default_factory=dict)  # parameters, vocabulary, settings planned

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def render(self) -> str:
        from student_train.memory_plan_render import render_plan

        return render_plan(self)


# ----------------------------------------------------------------------------- the rows

def _trainable(m: ModelFacts, s: StoreFacts, k: Knobs) -> list[tuple[tuple[int, ...], int]]:
    """(shape, bytes per value) of every trainable tensor: the model or its LoRA adapters, and
    the alignment projections (fp32)."""
    if k.lora_r:  # peft: lora_A [r, in], lora_B [out, r], fp32 (autocast_adapter_dtype)
        out = [((k.lora_r, lin.in_features), 4) for lin in m.lora_linears()]
        out += [((lin.out_features, k.lora_r), 4) for lin in m.lora_linears()]
    else:
        out = [(shape, k.param_bytes) for shape in m.shapes.values()]
    return out + [(shape, 4) for shape in s.aligner_shapes.values()]


def _weight_bytes(m: ModelFacts, s: StoreFacts, k: Knobs) -> float:
    base = m.total_params * k.param_bytes
    if k.qlora:  # bitsandbytes quantises every Linear but the lm_head
        quantised = sum(lin.params for lin in m.linears)
        base = quantised * NF4_BYTES_PER_PARAM + (m.total_params - quantised) * 4
    if k.lora_r:
        base += sum(math.prod(shape) * b for shape, b in _trainable(m, StoreFacts(), k))
    return base + sum(math.prod(shape) * 4 for shape in s.aligner_shapes.values())


def _extras(m: ModelFacts, k: Knobs, shards: int, gradients: float) -> dict[str, float]:
    """Rows outside the table's main ones that hold in the forward and backward (DDP's
    buckets in every phase). CUDA-only ones are sized from the ops, not measured."""
    extras = {}
    if k.autocast and k.param_bytes == 4 and not k.qlora:
        # 16-bit copies of the fp32 Linear weights, saved for backward (trained ones cached
        # by autocast for the whole forward); with checkpointing one layer's at a time
        linear = sum(lin.params for lin in m.linears)
        per_layer = linear / max(m.layers, 1)
        extras["bf16 autocast weight copies"] = 2 * (per_layer if k.gradient_checkpointing
                                                     else linear)
    if k.qlora:  # bitsandbytes dequantises one weight at a time
        extras["4-bit dequantised weight"] = 2 * max((lin.params for lin in m.linears),
                                                     default=0)
    if k.fsdp and shards > 1:  # the root unit (embeddings, head) and a layer and its prefetch
        extras["FSDP all-gathered units"] = (1 - 1 / shards) * (
            (m.outside_layers() + 2 * m.layer_params()) * k.param_bytes)
    if k.processes > 1 and not k.fsdp:
        extras["DDP gradient buckets"] = gradients  # allocated with the DDP wrapper
    return extras


def _rows(m: ModelFacts, s: StoreFacts, k: Knobs, tokens: int) -> dict:
    """Every row of the plan at `tokens` per micro-batch, the phases they add up to, and
    "total": the largest phase (+ on CUDA the context and allocator reserve).

    The rows peak at different moments (measured, bench/memory_plan_bench.py), so a step's
    peak is the largest of:
      forward   weights + optimizer + what the forward keeps + the fused head's chunk and the
                lm_head gradient it builds (+ gradients from the 2nd micro-batch of an
                accumulation on)
      backward  weights + optimizer + gradients + the largest of: the top layer's (all kept
                activations, its gradient buffers, with checkpointing its recompute), the
                bottom layer's under checkpointing (its recompute, the input embedding's
                gradient not made yet), the end (the embeddings' gradient; tied: the head's
                and the embedding's [V, d] and their sum)
      step      weights + gradients + optimizer + the optimizer step's temporaries
    """
    from student_train.optimizers import state_bytes

    shards = k.processes if k.fsdp else 1
    trainable = _trainable(m, s, k)
    weights = _weight_bytes(m, s, k) / shards
    gradients = sum(math.prod(shape) * b for shape, b in trainable) / shards
    optimizer = sum(state_bytes(k.optimizer, shape, b) for shape, b in trainable) / shards
    outside = terms.outside_per_token(m, s, k)
    layer = terms.layer_kept_per_token(m, s, k)
    activations = tokens * (m.layers * layer + outside)
    checkpointed = tokens * (m.layers * terms.checkpointed_layer_per_token(m, k) + outside)
    kept = checkpointed if k.gradient_checkpointing else activations
    kd = terms.head_chunk_bytes(m, s, k, tokens)
    head_grad = terms.head_gradient_bytes(m, k)
    extras = _extras(m, k, shards, gradients)
    ddp = extras.get("DDP gradient buckets", 0)
    gradients_in_forward = gradients if k.grad_accum > 1 else 0
    buffers = tokens * terms.backward_buffers_per_token(m, s, k)
    recompute = tokens * layer if k.gradient_checkpointing else 0
    input_grad = tokens * m.hidden * k.param_bytes  # a layer's input gradient
    end = input_grad  # the embeddings' output gradient; tied: the embedding's dense [V, d]
    if m.tied and not k.lora_r:  # gradient and its sum with the head's (measured)
        end += 2 * terms.head_gradient_bytes(m, k)
    bottom = 0.0
    if k.gradient_checkpointing:  # the input embedding's gradient is not made yet
        missing = 0 if m.tied else terms.input_embedding_bytes(m, k) / shards
        bottom = recompute + buffers + input_grad - missing
    top = kept + buffers + recompute + input_grad
    top_gradients = head_grad + gradients_in_forward  # the head's own until it hands it over
    phases = {
        "forward": {"weights": weights, "optimizer": optimizer, "gradients": gradients_in_forward,
                    "activations": kept, "kd_buffers": kd, "lm_head gradient (fused head)":
                    head_grad, **extras},
        "backward": {"weights": weights, "optimizer": optimizer, "gradients": gradients,
                     BACKWARD_ROW: max(top + top_gradients - gradients, end, bottom),
                     **extras},
        "step": {"weights": weights, "gradients": gradients, "optimizer": optimizer,
                 "optimizer step transient": terms.step_transient(trainable, k, shards),
                 **({"DDP gradient buckets": ddp} if ddp else {})},
    }
    sums = {name: sum(parts.values()) for name, parts in phases.items()}
    peak = max(sums, key=sums.get)
    total = sums[peak]
    other_rows = {"lm_head gradient (fused head)": head_grad, **extras,
                  "recomputed layer (backward)": recompute,
                  BACKWARD_ROW: phases["backward"][BACKWARD_ROW],
                  "optimizer step transient": phases["step"]["optimizer step transient"]}
    if k.device == "cuda":
        other_rows["CUDA context + allocator reserve"] = (CUDA_CONTEXT_BYTES
                                                          + ALLOCATOR_RESERVE * total)
        total += other_rows["CUDA context + allocator reserve"]
    main = ("weights", "gradients", "optimizer", "activations", "kd_buffers")
    other = total - sum(v for name, v in phases[peak].items() if name in main)
    return {"weights": weights, "gradients": gradients, "optimizer": optimizer,
            "activations": activations, "activations_checkpointed": checkpointed,
            "kd_buffers": kd, "other": other, "total": total, "peak_phase": peak,
            "phases": sums, "other_rows": {n: v for n, v in other_rows.items() if v}}


# ----------------------------------------------------------------------------- solving

def _total(m, s, k: Knobs, tokens: int) -> float:
    return _rows(m, s, k, tokens)["total"]


def largest_batch_tokens(m, s, k: Knobs, budget: int, limit: int = 1 << 24) -> int | None:
    """The largest batch_tokens whose total fits `budget` (the total grows with it), or None
    when not even one token does."""
    if _total(m, s, k, 1) > budget:
        return None
    low, high = 1, 2
    while high <= limit and _total(m, s, k, high) <= budget:
        low, high = high, high * 2
    if high > limit:
        return limit
    while high - low > 1:  # low fits, high does not
        mid = (low + high) // 2
        low, high = (mid, high) if _total(m, s, k, mid) <= budget else (low, mid)
    return low


def _candidates(k: Knobs) -> list[tuple[str, dict]]:
    """Changes to try, smallest first (the batch size is tried separately)."""
    ckpt = {} if k.gradient_checkpointing else {"gradient_checkpointing": True}
    with_ckpt = "" if k.gradient_checkpointing else " --gradient-checkpointing"
    out = []
    if ckpt:
        out.append(("--gradient-checkpointing", ckpt))
    if k.optimizer in ("adamw", "adafactor") and not k.fsdp:
        out.append((f"--optimizer adamw-8bit{with_ckpt}", {**ckpt, "optimizer": "adamw-8bit"}))
    if not k.fsdp and k.optimizer == "adamw":
        for n in sorted({max(k.processes, 2), 2, 4, 8}):
            if n >= k.processes:
                out.append((f"--fsdp over {n} processes (accelerate launch --num_processes {n})"
                            f"{with_ckpt}", {**ckpt, "fsdp": True, "processes": n}))
    if not k.lora_r:
        out.append((f"--lora-r {SUGGESTED_LORA_R}{with_ckpt}",
                    {**ckpt, "lora_r": SUGGESTED_LORA_R, "fsdp": False}))
    if not k.qlora:
        out.append((f"--qlora --lora-r {k.lora_r or SUGGESTED_LORA_R}{with_ckpt}",
                    {**ckpt, "qlora": True, "lora_r": k.lora_r or SUGGESTED_LORA_R,
                     "fsdp": False}))
    return out


def _useful_batch(k: Knobs, tokens: int | None) -> bool:
    """A lower batch_tokens worth suggesting: at least a quarter of the one asked for."""
    return tokens is not None and tokens >= max(1, min(256, k.batch_tokens), k.batch_tokens // 4)


def _batch_advice(k: Knobs, tokens: int, grad_accum: int) -> str:
    accum = math.ceil(k.batch_tokens * grad_accum / tokens)
    return (f"--batch-tokens {tokens} (and --grad-accum {accum} to keep the tokens per "
            f"optimizer step)")


def suggest(m, s, k: Knobs, budget: int, grad_accum: int = 1) -> str:
    """The smallest change that fits `budget`, found by planning each candidate."""
    fitting = largest_batch_tokens(m, s, k, budget)
    if _useful_batch(k, fitting):
        return "lower " + _batch_advice(k, fitting, grad_accum)
    for words, change in _candidates(k):
        changed = dataclasses.replace(k, **change)
        if _total(m, s, changed, k.batch_tokens) <= budget:
            return words
        fitting = largest_batch_tokens(m, s, changed, budget)
        if _useful_batch(k, fitting):
            return f"{words} and {_batch_advice(k, fitting, grad_accum)}"
    return (f"none of {', '.join(w for w, _ in _candidates(k)) or 'the usual changes'} fits "
            f"{budget / GiB:.1f} GiB at a useful batch size: use a smaller student, more "
            f"GPUs (--fsdp) or a GPU with more memory")


# ----------------------------------------------------------------------------- estimate

def estimate(cfg, num_processes: int = 1, gpu_memory: int | None = None, model_config=None,
             *, device: str = "cuda", inputs=None) -> MemoryPlan:
    """The plan of `cfg` per device over `num_processes` processes (see the module docstring).

    model_config: the student's transformers config (else read from cfg.student's config.json).
    gpu_memory: bytes of one device: sets `fits`, `max_batch_tokens` and `suggestion`.
    device: "cuda" plans a GPU run (autocast, foreach AdamW, context); "cpu" what the same run
    holds on the CPU (what bench/memory_plan_bench.py measures).
    inputs: sources.Inputs of training's check_inputs, whose opened store and tokenizer read
    the plan reuses (else it opens and reads its own).
    """
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu', found {device!r}")
    if num_processes < 1:
        raise ConfigError([f"num_processes must be >= 1, found {num_processes}"])
    model_config = model_config if model_config is not None else load_model_config(cfg)
    m, s = model_facts(cfg, model_config), store_facts(cfg, model_config, inputs)
    k = Knobs.of(cfg, num_processes, device)
    rows = _rows(m, s, k, k.batch_tokens)
    fits = max_tokens = suggestion = None
    if gpu_memory is not None:
        fits = rows["total"] <= gpu_memory
        max_tokens = largest_batch_tokens(m, s, k, gpu_memory)
        suggestion = None if fits else suggest(m, s, k, gpu_memory, cfg.grad_accum)
    trainable = sum(math.prod(shape) for shape, _ in _trainable(m, s, k))
    facts = {"student": cfg.student, "parameters": m.total_params,
             "trainable_parameters": trainable, "tied_embeddings": m.tied,
             "layers": m.layers, "hidden": m.hidden, "vocab": m.vocab,
             "store_vocab": s.vocab, "kd_target_widths": s.target_widths,
             "cross_length_ratio": s.cross_length_ratio,
             "attention": "eager" if s.attention_maps else "sdpa",
             "alignment_parameters": sum(math.prod(x) for x in s.aligner_shapes.values()),
             **dataclasses.asdict(k)}
    return MemoryPlan(
        weights=round(rows["weights"]), gradients=round(rows["gradients"]),
        optimizer=round(rows["optimizer"]), activations=round(rows["activations"]),
        activations_checkpointed=round(rows["activations_checkpointed"]),
        kd_buffers=round(rows["kd_buffers"]), other=round(rows["other"]),
        total=round(rows["total"]), fits=fits, max_batch_tokens=max_tokens,
        suggestion=suggestion, gpu_memory=gpu_memory,
        other_rows={name: round(v) for name, v in rows["other_rows"].items()},
        peak_phase=rows["peak_phase"],
        phases={name: round(v) for name, v in rows["phases"].items()}, facts=facts)
