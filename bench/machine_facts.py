"""The CPU a benchmark ran on, for its JSON: speed ratios between runs mean little across CPUs
(an AVX2-only CPU gains less from batching, and onnxruntime's INT8 kernels differ with VNNI)."""

from __future__ import annotations

import platform
from pathlib import Path

# the vector extensions that change which kernels torch and onnxruntime pick
VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")


def cpu_facts() -> dict:
    """{"model": the CPU's model name, "vector_extensions": those of VECTOR_FLAGS it has}
    from /proc/cpuinfo (Linux); elsewhere platform.processor() and no extensions."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break  # the first core's lines say it for all
    except OSError:
        pass
    return {"model": model, "vector_extensions": [f for f in VECTOR_FLAGS if f in flags]}
