"""The ONNX graph of a transformers causal LM, with a KV cache, and its INT8 version.

`export_onnx` traces one graph that serves both prefill (past of length 0) and decode (past of
any length) through `torch.onnx.export(dynamo=True)`: a small wrapper module takes the cache as
flat tensors, builds a transformers `DynamicCache` from them, runs the model and returns the
updated cache as flat tensors again. Inputs and outputs carry the names optimum uses
(`past_key_values.{i}.key` in, `present.{i}.key` out) so other ONNX runtimes can read the file.
Weights always go to an external data file next to the graph (`model.onnx.data`), so models
over protobuf's 2 GB limit export the same way as small ones.

`quantize_onnx_int8` runs onnxruntime's dynamic quantisation (INT8 weights, activations
quantised per call) on the MatMul nodes.

torch, transformers, onnx and onnxruntime are imported inside the functions.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import warnings
from pathlib import Path

from logitstore.errors import LogitStoreError

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
ONNX_DATA_FILE = "model.onnx.data"
# model_type values whose export was checked against PyTorch (tests/test_onnx_export.py).
SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
INPUT_IDS, ATTENTION_MASK, POSITION_IDS = "input_ids", "attention_mask", "position_ids"
# Sizes of the example inputs the graph is traced with: all different and > 1, so that
# torch.export does not specialise an axis (it treats sizes 0 and 1 as constants).
_EXAMPLE_BATCH, _EXAMPLE_PAST, _EXAMPLE_NEW = 2, 3, 4


class OnnxExportError(LogitStoreError):
    """A model that cannot be exported to ONNX, or an export that failed."""


def past_names(num_layers: int) -> list[str]:
    """Graph input names of the cache: past_key_values.{i}.key, .value for every layer."""
    return [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    """Graph output names of the updated cache: present.{i}.key, .value for every layer."""
    return [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def cache_shape(config) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) of a transformers decoder config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return int(config.num_hidden_layers), int(kv_heads), int(head_dim)


def check_exportable(model) -> None:
    """OnnxExportError when `model` is not a causal LM architecture this exporter handles."""
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise OnnxExportError(
            f"ONNX export supports the model types {', '.join(SUPPORTED_MODEL_TYPES)} "
            f"(decoder-only causal LMs with a plain key/value cache), found model_type "
            f"{model_type!r} ({type(model).__name__}); export it with --format torch instead.")
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if getattr(config, "use_sliding_window", False) or layer_types != {"full_attention"}:
        raise OnnxExportError(
            f"the {model_type} model uses sliding-window attention (use_sliding_window or "
            f"layer_types {sorted(layer_types)} in its config.json), which this ONNX graph (a "
            "full key/value cache) does not implement; export it with --format torch instead.")


def check_max_length(config, max_length: int) -> None:
    """OnnxExportError when max_length is below 2 or beyond the model's position range."""
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(max_length, int) or max_length < 2 or (limit and max_length > limit):
        raise OnnxExportError(
            f"max_length must be an integer from 2 to the model's max_position_embeddings "
            f"({limit}), found {max_length!r}; pass a --max-length in that range.")


def _flat_cache_module(model):
    """A torch.nn.Module around `model` whose forward torch.onnx can trace: flat tensors in,
    flat tensors out (torch is imported here: this module loads without it)."""
    import torch
    from transformers import DynamicCache

    num_layers = cache_shape(model.config)[0]
    # transformers 5 names the cache argument `cache`, 4.x `past_key_values`.
    parameters = inspect.signature(model.forward).parameters
    cache_arg = "cache" if "cache" in parameters else "past_key_values"

    class FlatCacheLM(torch.nn.Module):
        """forward(input_ids, attention_mask, position_ids, *past) -> (logits, *present)."""

        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            # past: 2 * num_layers tensors [B, kv_heads, past_len, head_dim], key then value.
            layers = [(past[2 * i], past[2 * i + 1]) for i in range(num_layers)]
            cache = DynamicCache(ddp_cache_data=layers, config=self.model.config)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=position_ids, use_cache=True, **{cache_arg: cache})
            updated = getattr(out, cache_arg)
            present = [t for layer in updated.layers for t in (layer.keys, layer.values)]
            return (out.logits, *present)  # logits [B, t, V]; present [B, kv, past + t, hd]

    return FlatCacheLM().eval()


@contextlib.contextmanager
def _quiet_exporter():
    """Silence what torch.onnx says on every export of a model like ours (torchvision ops it
    skips, a pytree deprecation, dynamic axes it renames), unless this module logs DEBUG
    (student-export -v): none of it is about the model being exported."""
    if log.isEnabledFor(logging.DEBUG):
        yield
        return
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"# The axis name: .* will not be used")
            warnings.filterwarnings("ignore", message=r".*LeafSpec.* is deprecated",
                                    category=FutureWarning)
            yield
    finally:
        exporter_log.setLevel(level)


def _example_inputs(config) -> tuple:
    import torch

    num_layers, kv_heads, head_dim = cache_shape(config)
    batch, past, new = _EXAMPLE_BATCH, _EXAMPLE_PAST, _EXAMPLE_NEW
    input_ids = torch.arange(batch * new).reshape(batch, new) % config.vocab_size  # [B, t]
    attention_mask = torch.ones(batch, past + new, dtype=torch.long)  # [B, past + t]
    positions = torch.arange(past, past + new).expand(batch, new).contiguous()  # [B, t]
    cache = [torch.zeros(batch, kv_heads, past, head_dim) for _ in range(2 * num_layers)]
    return (input_ids, attention_mask, positions, *cache)


def _dynamic_shapes(num_layers: int) -> tuple:
    batch, new, total, past = "batch", "sequence", "total_sequence", "past_sequence"
    cache = tuple({0: batch, 2: past} for _ in range(2 * num_layers))
    return ({0: batch, 1: new}, {0: batch, 1: total}, {0: batch, 1: new}, cache)


def export_onnx(model, out_dir: Path, *, max_length: int, opset: int | None = None) -> dict:
    """Write out_dir/model.onnx (+ model.onnx.data) for `model`; return the manifest section.

    The graph takes input_ids [B, t], attention_mask [B, past + t], position_ids [B, t] (int64)
    and the cache past_key_values.{i}.key/.value [B, kv_heads, past, head_dim] (float32, past
    may be 0); it returns logits [B, t, V] float32 and present.{i}.key/.value
    [B, kv_heads, past + t, head_dim]. `model` is moved to the CPU and float32 first (in
    place, as torch's Module.to does). `max_length` is checked and recorded; the graph itself
    has no fixed length.
    """
    import onnx
    import torch

    check_exportable(model)
    check_max_length(model.config, max_length)
    model = model.to(device="cpu", dtype=torch.float32).eval()
    num_layers, kv_heads, head_dim = cache_shape(model.config)
    inputs = [INPUT_IDS, ATTENTION_MASK, POSITION_IDS, *past_names(num_layers)]
    outputs = ["logits", *present_names(num_layers)]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / ONNX_FILE
    try:
        with torch.inference_mode(False), torch.no_grad(), _quiet_exporter():
            program = torch.onnx.export(
                _flat_cache_module(model), _example_inputs(model.config), dynamo=True,
                input_names=inputs, output_names=outputs, opset_version=opset,
                dynamic_shapes=_dynamic_shapes(num_layers), verbose=False)
    except Exception as exc:  # torch.export / onnxscript raise many unrelated types
        raise OnnxExportError(
            f"torch.onnx.export could not trace the {model.config.model_type} model "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "export it with --format torch instead, or report the model and this message."
        ) from exc
    program.save(path, external_data=True)
    graph = onnx.load(str(path), load_external_data=False)
    found_opset = next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))
    return {
        "file": ONNX_FILE,
        "data_file": ONNX_DATA_FILE,
        "input_names": inputs,
        "output_names": outputs,
        "num_layers": num_layers,
        "num_kv_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": int(model.config.vocab_size),
        "max_length": int(max_length),
        "opset": int(found_opset),
        "exporter": f"torch.onnx.export(dynamo=True) torch {torch.__version__}",
    }


def quantize_onnx_int8(src: Path, dst: Path) -> dict:
    """Write dst (+ dst.data): `src` with INT8 MatMul weights; return the settings used.

    onnxruntime's dynamic quantisation: weights are stored as signed INT8 per output channel,
    activations are quantised on the fly at each call (no calibration data needed), with one
    scale per activation tensor, i.e. per batch: a row's logits move slightly (~1e-2 on a
    tiny model) with the rows batched with it, so greedy outputs may differ from a batch-1
    run at near-ties (onnxruntime's MatMulNBits, 8 bits with accuracy_level 4, quantises
    activations per row instead, at some cost in batched throughput). Every
    MatMul with a constant weight is quantised, the lm_head included (keeping it float32 gave
    no better perplexity on a trained demo-size Llama and cost ~20% of the tokens/s); the
    embedding table (a Gather) stays float32. Weights use 7 of their 8 bits (reduce_range):
    onnxruntime multiplies u8 activations by s8 weights with VPMADDUBSW on x86 CPUs without
    VNNI (AVX2, plain AVX-512), whose int16 sums saturate on full-range weights (measured on
    an AVX2-only EPYC, tiny Llama: max log-prob error 0.147 full range, 0.015 reduced, the
    mean 0.0068 vs 0.0026); the export cannot know the CPU that will serve it.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    settings = {
        "method": "onnxruntime.quantization.quantize_dynamic",
        "weight_type": "QInt8",
        "per_channel": True,
        "reduce_range": True,  # no u8 x s8 saturation without VNNI (docstring)
        "op_types": ["MatMul"],
        "extra_options": {"MatMulConstBOnly": True},
    }
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise OnnxExportError(
            f"cannot quantise {src}: no such ONNX file; export the fp32 graph first.")
    if src.resolve() == dst.resolve():
        raise OnnxExportError(
            f"cannot quantise {src} onto itself: give a different output path.")
    data = dst.with_name(dst.name + ".data")
    dst.parent.mkdir(parents=True, exist_ok=True)
    # onnxruntime appends weights to an existing data file: start from none.
    for stale in (dst, data):
        stale.unlink(missing_ok=True)
    quantize_dynamic(
        src, dst, op_types_to_quantize=settings["op_types"], per_channel=settings["per_channel"],
        reduce_range=settings["reduce_range"], weight_type=QuantType.QInt8,
        use_external_data_format=True, extra_options=settings["extra_options"])
    _readable_like_other_files(data, dst)
    return {**settings, "data_file": data.name}


def _readable_like_other_files(data: Path, graph: Path) -> None:
    """Give `data` the mode of `graph`: onnxruntime writes its data file as 0600, which a
    server running as another user (in a container, say) could not read."""
    if data.is_file() and graph.is_file():
        data.chmod(graph.stat().st_mode & 0o777)
