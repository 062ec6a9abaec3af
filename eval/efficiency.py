"""What a model costs on the current device: size, memory and speed.

- `parameters`: elements of all parameters; 4-bit bitsandbytes weights count their
  unpacked shape (a packed Params4bit tensor holds two weights per byte).
- `weights_bytes`: bytes of the parameters and buffers as loaded (exact; reflects dtype
  and load-time quantisation).
- `disk_bytes`: sum of the weight files (*.safetensors, *.bin, ...) of the model's local
  directory or of its Hugging Face cache snapshot; null when neither is found. This is
  the checkpoint as stored, before any quantisation at load time.
- `peak_memory_bytes`: peak while the model is loaded and benchmarked (see PeakMemory;
  the tokenizer is loaded before the meter starts): on CUDA
  `torch.cuda.max_memory_allocated` (tensors only, after resetting the peak); on CPU the
  peak resident set size (psutil, sampled every 5 ms) minus the RSS before loading.
  `prime_runtime()` runs a throwaway tiny model first, so one-time process costs (lazy
  imports, thread pools, kernel caches) are not charged to whichever role loads first,
  and `release_memory()` hands freed heap back to the OS between roles. The CPU figure
  still includes allocator overhead and misses peaks shorter than the sampling interval:
  compare it between roles of one run, not across machines.
- Speed (batch 1, greedy, per prompt): `prompt_tokens_per_s` = prompt tokens / time of
  one forward pass over the prompt (prefill); `generation_tokens_per_s` = new tokens /
  wall time of `generate` (prefill included), with exactly `max_new_tokens` new tokens
  (EOS suppressed, so a model that stops early does not look faster); `latency_p50_s` /
  `latency_p95_s`: percentiles of the `generate` wall time over prompts x repetitions,
  after `warmup` discarded runs. CUDA work is synchronised before each clock read.
  `benchmark_inference_speed` measures an InferenceModel (an export) the same way, through
  its `logits` (prefill) and `generate` (EOS ids cleared for the run, so every prompt gets
  exactly `max_new_tokens`).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
CPU_MEMORY_METHOD = "cpu: peak RSS minus RSS before loading (psutil, sampled every 5 ms)"
CUDA_MEMORY_METHOD = "cuda: torch.cuda.max_memory_allocated after reset_peak_memory_stats"


# ----------------------------------------------------------------------------- size


def count_parameters(model) -> int:
    total = 0
    for param in model.parameters():
        quant_state = getattr(param, "quant_state", None)  # bitsandbytes 4-bit: packed
        shape = getattr(quant_state, "shape", None)
        total += math.prod(shape) if shape is not None else param.numel()
    return int(total)


def weights_dir(spec) -> Path | None:
    """The directory holding a ModelSpec's weights: its local dir or cached hub snapshot."""
    if spec.is_local:
        return Path(spec.path_or_id)
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    cached = try_to_load_from_cache(spec.path_or_id, "config.json", revision=spec.revision)
    return Path(cached).parent if isinstance(cached, str) else None


def disk_bytes(directory: str | Path | None) -> int | None:
    """Sum of the weight files in `directory` (sub-folders included); None if there are none."""
    if directory is None or not Path(directory).is_dir():
        return None
    sizes = [f.stat().st_size for f in Path(directory).rglob("*")  # stat follows cache links
             if f.suffix in WEIGHT_SUFFIXES and f.is_file()]
    return sum(sizes) if sizes else None


def weights_bytes(model) -> int:
    """Bytes of parameters and buffers in memory (packed storage for quantized weights)."""
    tensors = [*model.parameters(), *model.buffers()]
    return int(sum(t.numel() * t.element_size() for t in tensors))


# ----------------------------------------------------------------------------- memory


def prime_runtime() -> None:
    """Pay one-time process costs before any role is measured: a 1-layer random Llama
    runs a forward pass and `generate` (imports generation code, starts thread pools), and
    bitsandbytes is imported when installed."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    with torch.inference_mode():
        model = LlamaForCausalLM(config).eval()
        ids = torch.tensor([[1, 2, 3, 4]])
        model(input_ids=ids)
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2,
                       min_new_tokens=2, do_sample=False, pad_token_id=0)
    del model
    with contextlib.suppress(Exception):  # quantized loads import bitsandbytes lazily
        import bitsandbytes  # noqa: F401
        import transformers.integrations.bitsandbytes  # noqa: F401
    release_memory()


def release_memory() -> None:
    """Free what Python/torch no longer use, and give glibc's freed heap back to the OS so
    the next role's RSS growth is measured from a low base (no-op elsewhere)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Peak memory between start() and stop(); see the module docstring for the method."""

    def __init__(self, device: str, interval_s: float = 0.005):
        self.on_cuda = str(device).startswith("cuda")
        self.device = device
        self.interval_s = interval_s
        self.method = CUDA_MEMORY_METHOD if self.on_cuda else CPU_MEMORY_METHOD
        self.peak_bytes: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "PeakMemory":
        gc.collect()
        if self.on_cuda:
            import torch

            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        import psutil

        self._process = psutil.Process(os.getpid())
        self._base = self._peak = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True, name="peak-rss")
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._peak = max(self._peak, self._process.memory_info().rss)

    def stop(self) -> int:
        if self.on_cuda:
            import torch

            torch.cuda.synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self._peak = max(self._peak, self._process.memory_info().rss)
            self.peak_bytes = int(self._peak - self._base)
        return self.peak_bytes


# ----------------------------------------------------------------------------- speed


@contextmanager
def _timer(on_cuda: bool) -> Iterator[list[float]]:
    import torch

    out: list[float] = []
    if on_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    yield out
    if on_cuda:
        torch.cuda.synchronize()
    out.append(time.perf_counter() - start)


def benchmark_speed(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 32,
                    warmup: int = 1, repetitions: int = 3) -> dict[str, Any]:
    """Prompt and generation throughput and per-sample latency (batch 1, greedy)."""
    import numpy as np
    import torch

    if not prompts:
        raise ValueError("no prompts to benchmark")
    device = next(model.parameters()).device
    on_cuda = device.type == "cuda"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
        tokenizer.eos_token_id
    encoded = []
    for prompt in prompts:  # input ids and mask only: some tokenizers add token_type_ids
        enc = tokenizer(prompt, return_tensors="pt")
        encoded.append({"input_ids": enc["input_ids"].to(device),
                        "attention_mask": enc["attention_mask"].to(device)})
    generate_kwargs = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                           do_sample=False, pad_token_id=pad_id)
    prompt_tokens = prefill_s = new_tokens = generate_s = 0.0
    latencies = []
    with torch.inference_mode():
        for _ in range(warmup):  # first calls pay for kernel selection, caches, allocation
            model(**encoded[0])
            model.generate(**encoded[0], **generate_kwargs)
        for _ in range(repetitions):
            for batch in encoded:
                with _timer(on_cuda) as prefill:
                    model(**batch)
                with _timer(on_cuda) as generation:
                    output = model.generate(**batch, **generate_kwargs)
                n_prompt = batch["input_ids"].shape[1]
                prompt_tokens += n_prompt
                prefill_s += prefill[0]
                new_tokens += output.shape[1] - n_prompt
                generate_s += generation[0]
                latencies.append(generation[0])
    return _speed_figures(prompt_tokens, prefill_s, new_tokens, generate_s, latencies)


def benchmark_inference_speed(model, prompts: Sequence[str], *, max_new_tokens: int = 32,
                              warmup: int = 1, repetitions: int = 3) -> dict[str, Any]:
    """`benchmark_speed`'s figures for an InferenceModel (batch 1, greedy, CPU)."""
    import numpy as np

    from logitstore.toolkit.inference import GenerationSettings

    if not prompts:
        raise ValueError("no prompts to benchmark")
    room = model.max_length - max_new_tokens
    encoded = [model.tokenizer(p)["input_ids"][-room:] for p in prompts]  # list[int] each
    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    prompt_tokens = prefill_s = new_tokens = generate_s = 0.0
    latencies = []
    saved_eos = model.eos_token_ids
    model.eos_token_ids = ()  # no early stop: a model that ends sooner must not look faster
    try:
        for _ in range(warmup):
            model.logits(np.asarray([encoded[0]]), np.ones((1, len(encoded[0]))))
            model.generate([encoded[0]], settings)
        for _ in range(repetitions):
            for ids in encoded:
                start = time.perf_counter()
                model.logits(np.asarray([ids]), np.ones((1, len(ids))))
                prefill_s += time.perf_counter() - start
                start = time.perf_counter()
                generation = model.generate([ids], settings)[0]
                latencies.append(time.perf_counter() - start)
                generate_s += latencies[-1]
                prompt_tokens += len(ids)
                new_tokens += len(generation.token_ids)
    finally:
        model.eos_token_ids = saved_eos
    return _speed_figures(prompt_tokens, prefill_s, new_tokens, generate_s, latencies)


def _speed_figures(prompt_tokens: int, prefill_s: float, new_tokens: int, generate_s: float,
                   latencies: list[float]) -> dict[str, float]:
    import numpy as np

    return {
        "prompt_tokens_per_s": prompt_tokens / prefill_s,
        "generation_tokens_per_s": new_tokens / generate_s,
        "latency_p50_s": float(np.percentile(latencies, 50)),
        "latency_p95_s": float(np.percentile(latencies, 95)),
        "speed_samples": len(latencies),
    }
