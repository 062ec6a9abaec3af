"""The memory plan: what one training step holds per device, before any weight is loaded.

    plan = estimate(cfg, num_processes=2, gpu_memory=parse_memory_size("24GiB"))
    print(plan.render())  # weights, gradients, optimizer, activations, KD buffers, total

The figures are the peak tensor bytes of a step (what torch.cuda.max_memory_allocated reports),
plus, on CUDA, the context and allocator reserve. Shapes come from the student's config (a
meta-device model, memory_plan_facts.py) and the store's manifest; every row is arithmetic:

  weights      parameters x student_dtype bytes (qlora: decoder Linear layers in 4-bit NF4 with
               double-quantised absmax, ~0.516 B/param; the rest fp32, as peft's
               prepare_model_for_kbit_training casts it); LoRA adapters and alignment
               projections fp32
  gradients    the trainable parameters, in their own dtype
  optimizer    student_train.optimizers.state_bytes per trainable tensor
  activations  what autograd keeps per token for the backward of a Llama-style decoder layer
               (`_layer_bytes_per_token`), x layers x batch_tokens; with gradient
               checkpointing each layer keeps its input only and one layer is recomputed at a
               time; plus the final norm, the trained positions' hidden rows and the batch
  kd_buffers   fused_head_loss.py's chunk: one fp32 [chunk, vocab] buffer, a second one for
               zero-tail kl at T != 1, a 16-bit copy while converting under autocast; its
               16-bit weight copy and the hidden-row gradient it holds until backward
  other        bf16 autocast copies of fp32 Linear weights (saved for backward), FSDP's
               all-gathered units, DDP's gradient buckets, the optimizer step's transient where
               it exceeds the forward/backward's, the CUDA context and allocator reserve

With `fsdp`, weights, gradients and optimizer state are divided over the processes. Gradients
are counted whole during the forward (they are, from the second micro-batch of an accumulation
on, and the fused head makes the lm_head gradient in the forward), so the total errs high.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

from logitstore.errors import ConfigError
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

    @classmethod
    def of(cls, cfg, processes: int, device: str) -> "Knobs":
        return cls(cfg.batch_tokens, cfg.gradient_checkpointing,
                   getattr(cfg, "optimizer", "adamw"), getattr(cfg, "fsdp", False),
                   processes, cfg.lora_r, cfg.qlora, cfg.lora_dropout, cfg.student_dtype,
                   cfg.mixed_precision, cfg.lm_head_chunk, cfg.packing, device)

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
    other_rows: dict[str, int] = field(default_factory=dict)  # what `other` is made of
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


def _row_length(s: StoreFacts, k: Knobs) -> int:
    """Positions per row: packed rows are batch_tokens long, else the longest sample."""
    if k.packing or not s.longest_sample:
        return k.batch_tokens
    return min(k.batch_tokens, s.longest_sample)


def _layer_bytes_per_token(m: ModelFacts, s: StoreFacts, k: Knobs, eager: bool) -> float:
    """What one decoder layer keeps for backward, per token (HF Llama-style layer).

    Norms (2): the fp32 input and normalised rows; their output once, or under autocast one
    16-bit copy per consuming projection (q, k, v; gate, up). Attention: q, k and their
    rotate_half, the SDPA inputs (k, v repeated to all heads for grouped-query attention
    with a mask), its output and the contiguous copy o_proj saves, the logsumexp; eager adds
    the fp32 softmax and its 16-bit copy per query and key. MLP: gate, up, silu(gate) and the
    product down_proj saves. LoRA: dropout's mask and output (or autocast's copy) per adapted
    input.
    """
    a, r, p = k.compute_bytes, k.param_bytes, k.param_bytes
    h, inter = m.hidden, m.intermediate
    qd, kvd = m.heads * m.head_dim, m.kv_heads * m.head_dim
    kv_sdpa = qd if m.kv_heads < m.heads else kvd
    norms = 2 * 2 * r * h + (5 * a * h if k.autocast else 2 * p * h)
    attention = 5 * a * qd + 2 * a * kvd + 2 * a * kv_sdpa + 4 * m.heads
    if eager:
        attention += m.heads * _row_length(s, k) * (4 + (a if k.autocast else 0))
    mlp = 4 * a * inter
    lora = 0.0
    if k.lora_r:
        per_value = (1 + a) if k.lora_dropout > 0 else (a if k.autocast else 0)
        lora = sum(lin.in_features for lin in m.lora_linears()) * per_value / max(m.layers, 1)
    return norms + attention + mlp + lora


def _backward_bytes_per_token(m: ModelFacts, s: StoreFacts, k: Knobs, eager: bool) -> float:
    """Gradient buffers of one layer's backward in flight (MLP intermediates, the residual)."""
    extra = 2 * 4 * m.heads * _row_length(s, k) if eager else 0
    return 3 * k.compute_bytes * m.intermediate + 4 * k.param_bytes * m.hidden + extra


def _outside_bytes_per_token(m: ModelFacts, s: StoreFacts, k: Knobs, eager: bool) -> float:
    """Final norm, the final hidden rows and their trained-position copy, the batch tensors
    (ids, labels, positions, mask, weights; KD ids and log-probs) and a packing mask."""
    p, r = k.param_bytes, k.param_bytes
    batch = 48 + 24 * sum(s.target_widths)
    mask = _row_length(s, k) * (3 + (4 if eager else 0)) if k.packing else 0
    return 2 * r * m.hidden + 2 * p * m.hidden + batch + mask


def _activations(m, s, k, tokens: int, eager: bool, checkpointed: bool) -> float:
    layer = _layer_bytes_per_token(m, s, k, eager)
    kept = m.layers * (k.param_bytes * m.hidden if checkpointed else layer)
    recompute = layer if checkpointed else 0
    return tokens * (kept + recompute + _backward_bytes_per_token(m, s, k, eager)
                     + _outside_bytes_per_token(m, s, k, eager))


def _kd_buffers(m: ModelFacts, s: StoreFacts, k: Knobs, tokens: int) -> float:
    """fused_head_loss: the chunk's [n, V] buffers, O(n K) gathers, the 16-bit head weight copy
    and product under autocast, the hidden-row gradient [tokens, d] kept until backward."""
    n = min(k.lm_head_chunk, tokens)
    conversion = 2 if k.compute_bytes == 2 else 0
    chunk = n * m.vocab * (4 + 4 * s.tempered_buffer + conversion)
    sparse = n * sum(s.target_widths) * 4 * 16
    weight_copy = 0
    if k.compute_bytes != k.param_bytes:
        weight_copy = 2 * m.vocab * m.hidden * (1 if k.lora_r else 2)
    return chunk + sparse + weight_copy + tokens * m.hidden * k.param_bytes


def _step_transient(trainable, k: Knobs, shards: int) -> float:
    """The optimizer step's temporaries: foreach AdamW on CUDA one copy of all the moments'
    size (sqrt of exp_avg_sq), per tensor on the CPU; Adafactor's fp32 update per tensor."""
    largest = max((math.prod(shape) for shape, _ in trainable), default=0)
    if k.optimizer == "adamw":
        if k.device == "cuda":
            return sum(math.prod(shape) * b for shape, b in trainable) / shards
        return 2 * largest * max((b for _, b in trainable), default=4)
    if k.optimizer == "adafactor":
        return 3 * largest * 4
    return 0.0  # bitsandbytes updates each tensor in place


def _rows(m: ModelFacts, s: StoreFacts, k: Knobs, tokens: int) -> dict[str, float]:
    """Every row of the plan at `tokens` per micro-batch; "total" is the peak."""
    from student_train.optimizers import state_bytes

    shards = k.processes if k.fsdp else 1
    trainable = _trainable(m, s, k)
    eager = s.attention_maps
    rows = {"weights": _weight_bytes(m, s, k) / shards,
            "gradients": sum(math.prod(shape) * b for shape, b in trainable) / shards,
            "optimizer": sum(state_bytes(k.optimizer, shape, b) for shape, b in trainable)
            / shards,
            "activations": _activations(m, s, k, tokens, eager, False),
            "activations_checkpointed": _activations(m, s, k, tokens, eager, True),
            "kd_buffers": _kd_buffers(m, s, k, tokens)}
    other = {}
    if k.autocast and k.param_bytes == 4 and not k.qlora:  # fp32 weights cast per forward
        linear = sum(lin.params for lin in m.linears)
        per_layer = linear / max(m.layers, 1)
        other["bf16 autocast weight copies"] = 2 * (per_layer if k.gradient_checkpointing
                                                    else linear)
    if k.qlora:  # bitsandbytes dequantises one weight at a time
        other["4-bit dequantised weight"] = 2 * max((lin.params for lin in m.linears), default=0)
    if k.fsdp and shards > 1:
        head_grad = 0 if k.lora_r else m.outside_layers() * k.param_bytes
        other["FSDP all-gathered units"] = (1 - 1 / shards) * (
            (m.outside_layers() + 2 * m.layer_params()) * k.param_bytes + head_grad)
    activations = rows["activations_checkpointed" if k.gradient_checkpointing else "activations"]
    forward_backward = activations + rows["kd_buffers"] + sum(other.values())
    persistent = rows["weights"] + rows["gradients"] + rows["optimizer"]
    if k.processes > 1 and not k.fsdp:  # kept from the first backward on
        other["DDP gradient buckets"] = rows["gradients"]
        persistent += rows["gradients"]
    step = _step_transient(trainable, k, shards)
    if m.tied and not k.lora_r:  # the embedding's dense gradient, added to the head's
        step = max(step, m.vocab * m.hidden * k.param_bytes)
    if step > forward_backward:
        other["optimizer step transient"] = step - forward_backward
    tensors = persistent + max(forward_backward, step)
    if k.device == "cuda":
        other["CUDA context + allocator reserve"] = CUDA_CONTEXT_BYTES + ALLOCATOR_RESERVE * tensors
    rows["other"] = sum(other.values())
    rows["total"] = (rows["weights"] + rows["gradients"] + rows["optimizer"] + activations
                     + rows["kd_buffers"] + rows["other"])
    rows["other_rows"] = other
    return rows


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
             *, device: str = "cuda") -> MemoryPlan:
    """The plan of `cfg` per device over `num_processes` processes (see the module docstring).

    model_config: the student's transformers config (else read from cfg.student's config.json).
    gpu_memory: bytes of one device: sets `fits`, `max_batch_tokens` and `suggestion`.
    device: "cuda" plans a GPU run (autocast, foreach AdamW, context); "cpu" what the same run
    holds on the CPU (what bench/memory_plan_bench.py measures).
    """
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu', found {device!r}")
    if num_processes < 1:
        raise ConfigError([f"num_processes must be >= 1, found {num_processes}"])
    model_config = model_config if model_config is not None else load_model_config(cfg)
    m, s = model_facts(cfg, model_config), store_facts(cfg, model_config)
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
        other_rows={name: round(v) for name, v in rows["other_rows"].items()}, facts=facts)
