"""PyTorch INT8 exports: torchao int8 weights with dynamic int8 activations, in safetensors.

    info = save_int8(source_dir, out_dir)        # quantize a model directory, save it
    model = load_int8_model(out_dir)             # the int8 HF model, on the CPU

Scheme: torchao's `Int8DynamicActivationInt8WeightConfig` (per-row symmetric int8 weights,
activations quantized per token at run time, int8 x int8 matmuls) on every `nn.Linear`,
through transformers' `TorchAoConfig`, the maintained route (`torch.ao.quantization` is
deprecated). Measured on this 2-core CPU (a 6-layer, hidden-768, 32k-vocabulary Llama):
prompt processing ~1.7x faster than fp32; single-token decoding about as fast as fp32
(~22 ms/token against ~20-24), while torchao's int8 weight-only scheme was 2-3x slower than
fp32 on CPU (its weights are dequantized per call), hence not used.

Kept in fp32: the input embedding (a lookup, not a matmul) and an output head tied to it
(it is the same tensor). An untied output head is quantized too: for small students it is
a large share of the weights.

The export is saved with `save_pretrained(safe_serialization=True)`: torchao's tensor
subclasses are flattened into plain safetensors tensors plus JSON metadata (no pickle), and
config.json records the `quantization_config`, so `AutoModelForCausalLM.from_pretrained`
(transformers >= 5 with torchao installed) rebuilds the int8 model directly.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SCHEME = ("torchao Int8DynamicActivationInt8WeightConfig: per-row symmetric int8 weights, "
          "per-token dynamic int8 activations, on every nn.Linear")


def _quantization_config(source_dir: Path):
    """TorchAoConfig for `source_dir`: every Linear (the output head included), the input
    embedding excluded by its qualified name (found on a weightless meta-device copy)."""
    import torch
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig
    from transformers import AutoConfig, AutoModelForCausalLM, TorchAoConfig

    config = AutoConfig.from_pretrained(source_dir, trust_remote_code=False)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    embedding = skeleton.get_input_embeddings()
    names = [name for name, module in skeleton.named_modules() if module is embedding]
    # set_inductor_config=False: the export never compiles, so leave torch's global
    # inductor settings as the caller had them.
    return TorchAoConfig(quant_type=Int8DynamicActivationInt8WeightConfig(
                             set_inductor_config=False),
                         include_input_output_embeddings=True,  # quantize an untied head
                         modules_to_not_convert=names)


def save_int8(source_dir: str | os.PathLike, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Load the model in `source_dir` (fp32) quantized to int8 (see the module docstring),
    save config.json, generation_config.json and model.safetensors into `out_dir`; returns
    what was done, for export.json."""
    import torch
    import torchao
    from transformers import AutoModelForCausalLM

    source_dir, out_dir = Path(source_dir), Path(out_dir)
    quantization = _quantization_config(source_dir)
    model = AutoModelForCausalLM.from_pretrained(
        source_dir, quantization_config=quantization, dtype=torch.float32, device_map="cpu",
        trust_remote_code=False, local_files_only=True)
    model.eval()
    quantized, kept = [], []
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            # A quantized layer's weight is a torchao tensor subclass, no longer a Parameter.
            is_int8 = type(module.weight) is not torch.nn.Parameter
            (quantized if is_int8 else kept).append(name)
    if not quantized:
        from logitstore.errors import LogitStoreError

        raise LogitStoreError(
            f"torchao quantized no nn.Linear layer of {source_dir} (expected every Linear but "
            f"the input embedding, found none of {len(kept)} layers): the int8 export would be "
            "the fp32 model. Export with --format onnx --quantize int8, or --quantize none")
    model.save_pretrained(out_dir, safe_serialization=True)
    log.info("int8 (torchao): %d layers quantized, kept in fp32: %s", len(quantized),
             ", ".join(kept) or "none")
    return {"library": "torchao", "torchao_version": torchao.__version__, "scheme": SCHEME,
            "quantized_layers": len(quantized), "fp32_layers": kept,
            "serialization": "safetensors (torchao tensors flattened, no pickle)"}


def load_int8_model(directory: str | os.PathLike, manifest: dict[str, Any] | None = None):
    """The int8 HF causal LM of a torch export directory, in eval mode on the CPU.

    config.json must record torchao's `quantization_config` (as `save_int8` writes it):
    without it from_pretrained would quietly load plain fp32 weights, so that is refused
    (LogitStoreError). `manifest` (export.json) only names the export in that message."""
    import torch
    from transformers import AutoModelForCausalLM

    from logitstore.errors import LogitStoreError

    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    method = (config.get("quantization_config") or {}).get("quant_method")
    if method != "torchao":
        created = (manifest or {}).get("created", "?")
        raise LogitStoreError(
            f"{directory}: export.json says int8 (created {created}) but config.json records "
            f"no torchao quantization_config (found quant_method {method!r}); the directory "
            "was changed after the export: re-run student-export --format torch --quantize "
            "int8.")
    model = AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, device_map="cpu", trust_remote_code=False,
        local_files_only=True)
    return model.eval()
