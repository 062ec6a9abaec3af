"""Byte counts of one training step's parts, per token or per tensor (for memory_plan.py).

Each function is arithmetic on the student's shapes (ModelFacts), the store's KD targets
(StoreFacts) and the settings (memory_plan.Knobs). "Measured" below means: checked on the CPU
in fp32 (bench/memory_plan_bench.py, and autograd's saved tensors counted with
torch.autograd.graph.saved_tensors_hooks on Llama layers of 4 shapes, q_dim != d and GQA
included); the CUDA-only variants (autocast's 16-bit copies, the bool dropout mask) follow the
same ops and are not measured (no GPU ran them).

Notation: d hidden, ff intermediate, qd = heads x head_dim, kvd = kv_heads x head_dim; p the
bytes of the residual stream and unquantised weights (4 for fp32 and qlora, 2 for a bf16
student), a the bytes of the matmuls' inputs and outputs (2 under autocast, else p).
"""

from __future__ import annotations

import math

from student_train.memory_plan_facts import LinearShape, ModelFacts, StoreFacts

# The batch per token: ids, labels, positions and mask (int64), the token weight; per KD
# target entry (top-k or sampled): its id (int64) and fp32 log-prob. Measured: 40 + 12 K.
BATCH_BYTES_PER_TOKEN = 40
BATCH_BYTES_PER_TARGET_ENTRY = 12
# The fused head's O(n K) work per chunk position and stored entry (gathers, support masks,
# the KD gradient w.r.t. its bins, scatter indices): an upper figure, small next to [n, V].
HEAD_SPARSE_BYTES_PER_ENTRY = 64
# Names (last component) of the Linear layers that read a norm's output; the others read the
# attention output (o_proj) or the MLP's product (down_proj).
_ATTENTION_INPUTS = ("q_proj", "k_proj", "v_proj", "qkv_proj", "query_key_value", "c_attn")
_MLP_INPUTS = ("gate_proj", "up_proj", "gate_up_proj", "w1", "w3", "fc1", "c_fc")


_ATTENTION_OUTPUT_READERS = ("o_proj", "out_proj")  # read SDPA's output, kept already


def _reads(lin: LinearShape) -> str:
    """The activation a decoder Linear reads: its layer's attention or MLP norm output, SDPA's
    output ("kept"), or its own input."""
    parent, _, last = lin.name.rpartition(".")
    layer = parent.rpartition(".")[0]
    if last in _ATTENTION_INPUTS:
        return f"{layer}.attention_norm"
    if last in _MLP_INPUTS:
        return f"{layer}.mlp_norm"
    return "kept" if last in _ATTENTION_OUTPUT_READERS else lin.name


def row_length(s: StoreFacts, k) -> int:
    """Positions per row: packed rows are batch_tokens long, else the longest sample."""
    if k.packing or not s.longest_sample:
        return k.batch_tokens
    return min(k.batch_tokens, s.longest_sample)


def attention_mask_present(s: StoreFacts, k) -> bool:
    """Whether attention gets a mask: packing's block mask, or padding when the store's samples
    differ in length (without one, SDPA runs causal and grouped-query attention unrepeated)."""
    return k.packing or s.shortest_sample != s.longest_sample


def _norm_bytes(m: ModelFacts, k, consumers: int) -> float:
    """One RMSNorm (computed in fp32): its fp32 input and 1/rms; trained: the normalised rows
    (the weight's gradient) and its output, once, or under autocast one 16-bit copy per
    consuming projection. Frozen (LoRA): nothing else (adapters count their own inputs)."""
    kept = 4 * m.hidden + 4
    if k.lora_r:
        return kept
    output = consumers * k.compute_bytes * m.hidden if k.autocast else k.param_bytes * m.hidden
    return kept + k.param_bytes * m.hidden + output


def _attention_bytes(m: ModelFacts, s: StoreFacts, k) -> float:
    """SDPA keeps q, k, v (after RoPE, in the compute dtype), its output (which o_proj reads
    as a view) and the fp32 logsumexp; k and v repeated to all heads when a mask is given
    (transformers then calls repeat_kv). Eager: q, the repeated k and v, the output, and the
    fp32 probabilities (plus their 16-bit copy under autocast) per key."""
    a, qd, kvd = k.compute_bytes, m.heads * m.head_dim, m.kv_heads * m.head_dim
    if s.attention_maps:  # eager attention, maps returned for the alignment loss
        probabilities = m.heads * row_length(s, k) * (4 + (a if k.autocast else 0))
        return 4 * a * qd + probabilities
    kv_kept = qd if attention_mask_present(s, k) and m.kv_heads < m.heads else kvd
    return 2 * a * qd + 2 * a * kv_kept + 4 * m.heads


def _adapter_bytes(m: ModelFacts, k) -> float:
    """What the LoRA adapters of one layer keep: per adapted Linear, dropout's mask (bool on
    CUDA, the input's dtype on the CPU) and the input lora_A reads (fp32: peft casts it to the
    adapter's dtype; a 16-bit copy under autocast), and lora_A's [r] output. Without dropout,
    lora_A reads the layer's own activation: counted once per distinct input (a copy per
    adapter under autocast or when the cast to fp32 makes one)."""
    adapted = m.lora_linears()
    a_in = k.compute_bytes if k.autocast else 4
    rank_out = len(adapted) * k.lora_r * a_in
    if k.lora_dropout > 0:
        mask = 1 if k.device == "cuda" else 4
        return sum(lin.in_features for lin in adapted) * (mask + a_in) + rank_out
    if k.autocast or k.param_bytes != 4:
        return sum(lin.in_features for lin in adapted) * a_in + rank_out
    inputs = {_reads(lin): lin.in_features for lin in adapted}
    inputs.pop("kept", None)
    return sum(inputs.values()) * 4 + rank_out


def layer_kept_per_token(m: ModelFacts, s: StoreFacts, k) -> float:
    """What one decoder layer keeps for its backward, per token (HF Llama-style layer).

    Full fine-tune, fp32, SDPA: 24 d + 16 ff + 8 qd + 8 kvd + 4 heads + 8 (measured exactly).
    MLP: gate, up, silu(gate) and the product down_proj reads (its weight's gradient); with
    LoRA the frozen down_proj keeps nothing, its adapter counts its input.
    """
    a = k.compute_bytes
    norms = _norm_bytes(m, k, consumers=3) + _norm_bytes(m, k, consumers=2)
    mlp = 3 * a * m.intermediate + (0 if k.lora_r else a * m.intermediate)
    adapters = _adapter_bytes(m, k) / max(m.layers, 1) if k.lora_r else 0  # all layers'/L
    return norms + _attention_bytes(m, s, k) + mlp + adapters


def checkpointed_layer_per_token(m: ModelFacts, k) -> float:
    """Gradient checkpointing: a layer keeps its input only (measured: 4 d in fp32)."""
    return k.param_bytes * m.hidden


def outside_per_token(m: ModelFacts, s: StoreFacts, k) -> float:
    """Kept outside the layers, per token: the final norm, its output (the decoder's output),
    RoPE's cos and sin, the batch (measured in fp32, top-k 32: 12 d + 8 head_dim + 428 for a
    full fine-tune, 8 d + 8 head_dim + 428 with LoRA) and packing's [S, S] block masks."""
    final_norm = _norm_bytes(m, k, consumers=1) if not k.lora_r else 4 * m.hidden + 4
    output = k.param_bytes * m.hidden if k.lora_r else 0  # full: counted in _norm_bytes
    rope = 2 * 4 * m.head_dim  # cos and sin [B, S, head_dim] fp32, kept by RoPE's products
    batch = (BATCH_BYTES_PER_TOKEN + BATCH_BYTES_PER_TARGET_ENTRY * sum(s.target_widths)
             + s.cross_batch_bytes_per_token)
    mask = row_length(s, k) * (3 + (4 if s.attention_maps else 0)) if k.packing else 0
    return final_norm + output + rope + batch + mask


def backward_buffers_per_token(m: ModelFacts, s: StoreFacts, k) -> float:
    """Gradient buffers one layer's backward holds at once (the MLP's three [ff] gradients,
    the residual stream's); eager adds the [heads, S] gradient of the probabilities twice.
    Not measured: the CPU runs peaked elsewhere; sized from the ops."""
    extra = 2 * 4 * m.heads * row_length(s, k) if s.attention_maps else 0
    return 3 * k.compute_bytes * m.intermediate + 4 * k.param_bytes * m.hidden + extra


def head_chunk_bytes(m: ModelFacts, s: StoreFacts, k, tokens: int) -> float:
    """fused_head_loss at its largest chunk: the fp32 [n, V] buffer (a second one for
    zero-tail kl at T != 1; the 16-bit matmul output while converting under autocast), the
    O(n K) gathers, the picked hidden rows and their gradient [tokens, d] (kept from the
    forward), and under autocast the 16-bit head weight copy (and, when the head trains, the
    16-bit product added to its gradient per chunk). ULD across tokenizers runs after it, a
    chunk at a time (cross_tokenizer.uld_values): the logits, their fp32 copy, the sorted
    bins and a scatter's copy, [n, V] each (sized from the ops, not measured); the larger
    of the two chunks counts."""
    n = min(k.lm_head_chunk, tokens)
    conversion = 2 if k.compute_bytes == 2 else 0
    chunk = n * m.vocab * (4 + 4 * s.tempered_buffer + conversion)
    widths = s.target_widths if s.head_target_widths is None else s.head_target_widths
    sparse = n * (sum(widths) + s.head_extra_entries) * HEAD_SPARSE_BYTES_PER_ENTRY
    uld = n * m.vocab * (k.compute_bytes + 3 * 4) if s.uld_signals else 0
    weight_copy = 0
    if k.compute_bytes != k.param_bytes:
        weight_copy = 2 * m.vocab * m.hidden * (1 if k.lora_r else 2)
    rows = 2 * tokens * m.hidden * k.param_bytes
    return max(chunk + sparse, uld) + weight_copy + rows


def head_gradient_bytes(m: ModelFacts, k) -> float:
    """The lm_head gradient the fused head accumulates in the forward ([V, d] in the weight's
    dtype, whole even under FSDP) when the head trains: a full fine-tune. Measured."""
    return 0 if k.lora_r else m.vocab * m.hidden * k.param_bytes


def input_embedding_bytes(m: ModelFacts, k) -> float:
    """The input embedding's dense gradient, made last in the backward (full fine-tune)."""
    return 0 if k.lora_r else m.vocab * m.hidden * k.param_bytes


def step_transient(trainable, k, shards: int) -> float:
    """The optimizer step's temporaries: foreach AdamW on CUDA one copy of all the moments'
    size (sqrt of exp_avg_sq); per tensor on the CPU (sqrt and the denominator: 2 x the
    largest tensor, measured); Adafactor's fp32 update per tensor. bitsandbytes updates in
    place (its CPU kernel's fp32 scratch is no tensor: RSS only)."""
    largest = max((math.prod(shape) for shape, _ in trainable), default=0)
    if k.optimizer == "adamw":
        if k.device == "cuda":
            return sum(math.prod(shape) * b for shape, b in trainable) / shards
        return 2 * largest * max((b for _, b in trainable), default=4)
    if k.optimizer == "adafactor":
        return 3 * largest * 4
    return 0.0
