"""An ONNX export (written by student-export) run by onnxruntime on the CPU.

`OnnxLM.from_export(directory, manifest)` checks the export directory and the manifest's "onnx"
section (graph file, cache input/output names, cache shape) before anything is loaded, then
opens an onnxruntime session on model.onnx and the tokenizer saved next to it. `forward` feeds
the graph (input_ids, attention_mask, position_ids from the mask, the cache) and returns the
logits plus the new cache. The cache stays in onnxruntime's own buffers (OrtValues) between
calls, so a decode step copies only the logits out, not the whole cache.

onnxruntime and transformers are imported inside the functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from logitstore.errors import LogitStoreError
from logitstore.toolkit.inference import (
    InferenceModel,
    eos_token_ids,
    position_ids,
    prepare_tokenizer,
)

ONNX_FILE = "model.onnx"
_INPUTS = ("input_ids", "attention_mask", "position_ids")


class OnnxExportLoadError(LogitStoreError):
    """An ONNX export directory that is incomplete or whose manifest does not match its graph."""


@dataclass(frozen=True)
class OnnxGraphSpec:
    """What the manifest's "onnx" section says about the graph's inputs, outputs and cache."""

    file: str
    past_names: tuple[str, ...]  # past_key_values.{i}.key/.value, in layer order
    present_names: tuple[str, ...]  # present.{i}.key/.value, same order
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_manifest(cls, directory: Path, section: Any) -> OnnxGraphSpec:
        """The spec of `section`, or OnnxExportLoadError naming what is missing or wrong."""
        where = f"{directory}/export.json"
        if not isinstance(section, dict):
            raise OnnxExportLoadError(
                f"{where} has no \"onnx\" section (found {type(section).__name__}); the "
                "export is incomplete: re-run student-export with --format onnx.")
        required = {"input_names": list, "output_names": list, "num_layers": int,
                    "num_kv_heads": int, "head_dim": int}
        wrong = [f"{key} (expected {kind.__name__}, found {section.get(key)!r})"
                 for key, kind in required.items() if not isinstance(section.get(key), kind)]
        if wrong:
            raise OnnxExportLoadError(
                f"{where}: the \"onnx\" section lacks or mistypes {', '.join(wrong)}; re-run "
                "student-export with --format onnx to write a complete manifest.")
        inputs, outputs = section["input_names"], section["output_names"]
        layers = section["num_layers"]
        if (tuple(inputs[:3]) != _INPUTS or outputs[:1] != ["logits"]
                or len(inputs) != 3 + 2 * layers or len(outputs) != 1 + 2 * layers):
            raise OnnxExportLoadError(
                f"{where}: expected input_names {list(_INPUTS)} + 2 cache tensors per layer "
                f"and output_names ['logits'] + 2 per layer for num_layers {layers}, found "
                f"input_names {inputs} and output_names {outputs}; re-run student-export.")
        return cls(file=str(section.get("file", ONNX_FILE)), past_names=tuple(inputs[3:]),
                   present_names=tuple(outputs[1:]), num_kv_heads=section["num_kv_heads"],
                   head_dim=section["head_dim"])


class OnnxLM(InferenceModel):
    """A causal LM exported to ONNX (fp32 or INT8), run by onnxruntime's CPU provider.

    The cache returned by `forward` is a list of OrtValues [B, kv_heads, past, head_dim] in the
    order of the graph's cache inputs.
    """

    def __init__(self, session, tokenizer, spec: OnnxGraphSpec, *, kind: str, source: str,
                 max_length: int, eos_ids: tuple[int, ...]):
        self.session = session
        self.tokenizer = prepare_tokenizer(tokenizer)
        self.spec = spec
        self.kind = kind
        self.source = source
        self.max_length = int(max_length)
        self.eos_token_ids = eos_ids
        self._output_names = ["logits", *spec.present_names]

    @classmethod
    def from_export(cls, path: str | Path, manifest: dict, threads: int | None = None) -> OnnxLM:
        """Load an export directory whose export.json (already read) is `manifest`."""
        directory = Path(path)
        spec = OnnxGraphSpec.from_manifest(directory, manifest.get("onnx"))
        graph = directory / spec.file
        if not graph.is_file():
            raise OnnxExportLoadError(
                f"{directory} has export.json with format onnx but no {spec.file}; the export "
                "is incomplete or was moved without its files: re-run student-export.")
        max_length = manifest.get("max_length")
        if not isinstance(max_length, int) or max_length < 1:
            raise OnnxExportLoadError(
                f"{directory}/export.json: expected max_length a positive integer, found "
                f"{max_length!r}; re-run student-export.")
        session = open_session(graph, threads)
        check_session_io(session, spec, directory)
        from logitstore.toolkit.hf import load_tokenizer

        tokenizer = load_tokenizer(str(directory))
        kind = "onnx-int8" if manifest.get("quantize") == "int8" else "onnx-fp32"
        eos_ids = eos_token_ids(SimpleNamespace(generation_config=_generation_config(directory)),
                                tokenizer)
        return cls(session, tokenizer, spec, kind=kind, source=str(directory),
                   max_length=max_length, eos_ids=eos_ids)

    def forward(self, input_ids, attention_mask, past):
        import onnxruntime as ort

        ids = np.ascontiguousarray(input_ids, dtype=np.int64)  # [B, t]
        mask = np.ascontiguousarray(attention_mask, dtype=np.int64)  # [B, past + t]
        if past is None:
            empty = np.zeros((ids.shape[0], self.spec.num_kv_heads, 0, self.spec.head_dim),
                             dtype=np.float32)  # [B, kv_heads, 0, head_dim]
            past = [ort.OrtValue.ortvalue_from_numpy(empty)] * len(self.spec.past_names)
        feed = {
            "input_ids": ort.OrtValue.ortvalue_from_numpy(ids),
            "attention_mask": ort.OrtValue.ortvalue_from_numpy(mask),
            "position_ids": ort.OrtValue.ortvalue_from_numpy(position_ids(mask, ids.shape[1])),
            **dict(zip(self.spec.past_names, past)),
        }
        # OrtValues in and out: the cache never leaves onnxruntime's buffers.
        logits, *present = self.session.run_with_ort_values(self._output_names, feed)
        return logits.numpy(), present  # logits [B, t, V] float32

    def close(self) -> None:
        self.session = None


def open_session(graph: Path, threads: int | None):
    """An onnxruntime CPU session on `graph`: all graph optimisations, `threads` intra-op."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = int(threads or 0)  # 0: onnxruntime picks the core count
    options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/NoSuchFile types
        raise OnnxExportLoadError(
            f"onnxruntime could not load {graph} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); the file (or its "
            f"{graph.name}.data weights beside it) is damaged or incomplete: re-run "
            "student-export.") from exc


def check_session_io(session, spec: OnnxGraphSpec, directory: Path) -> None:
    """OnnxExportLoadError when the graph's inputs/outputs differ from the manifest's."""
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    expected_in = [*_INPUTS, *spec.past_names]
    expected_out = ["logits", *spec.present_names]
    if sorted(inputs) != sorted(expected_in) or sorted(outputs) != sorted(expected_out):
        raise OnnxExportLoadError(
            f"{directory}/{spec.file} takes inputs {inputs} and gives outputs {outputs}, but "
            f"export.json expects inputs {expected_in} and outputs {expected_out}; the graph "
            "and the manifest come from different exports: re-run student-export.")


def _generation_config(directory: Path):
    """The export's GenerationConfig, or None where it has no generation_config.json."""
    if not (directory / "generation_config.json").is_file():
        return None
    from transformers import GenerationConfig

    return GenerationConfig.from_pretrained(str(directory))
