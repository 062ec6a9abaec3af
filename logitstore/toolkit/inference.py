"""One interface for running a student, whatever it was saved as: a Hugging Face model directory
(PyTorch fp32), a PyTorch INT8 export or an ONNX export (fp32 or INT8).

student-export's quality gate, distill-serve and distill-eval all go through
`load_inference_model(source)` and an `InferenceModel`, so the gate checks exactly what
serving runs. A backend supplies `forward` (new positions + cache in, logits + cache out);
the decoding loop (`generate`: left-padded batches, greedy or temperature/top-p sampling, per
row settings, stop on EOS) is written once, here, for every backend.

Arrays crossing the interface are numpy (int64 ids and masks, float32 logits), so the ONNX
runtime and torch backends look the same to callers. torch and transformers are imported
lazily.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from logitstore.errors import LogitStoreError

log = logging.getLogger(__name__)

EXPORT_MANIFEST = "export.json"
EXPORT_FORMAT_VERSION = 1


class InferenceInputError(LogitStoreError):
    """A generation request the model cannot run (empty prompt, too long, bad settings)."""


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None  # for sampling; None = nondeterministic


@dataclass
class Generation:
    token_ids: list[int]  # the new tokens, without the stop token
    finish_reason: str  # "stop" (an EOS token) | "length"
    prompt_tokens: int


class InferenceModel(ABC):
    """A causal LM ready to score and generate; see the module docstring."""

    kind: str  # "torch-fp32" | "torch-int8" | "onnx-fp32" | "onnx-int8"
    tokenizer: Any  # a transformers tokenizer, left padding, pad token set
    max_length: int  # positions the model takes: prompt + new tokens
    eos_token_ids: tuple[int, ...]
    source: str  # the directory it was loaded from

    @abstractmethod
    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                past: Any) -> tuple[np.ndarray, Any]:
        """Logits [B, t, V] float32 of the new positions and the cache after them.

        input_ids [B, t] int64 are the new positions; attention_mask [B, past_len + t] int64
        has 0 on left padding; past is None on the first call, else the cache the previous call
        returned (opaque). Position ids come from the mask (cumsum - 1), so a left-padded row
        gets the logits it would get alone.
        """

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, Any]:
        """Logits [B, V] of the last position of whole prompts, and the cache after them:
        the first step of `generate`. Backends that can skip the output head on the other
        positions override it (with a 128k vocabulary that head costs more than the rest of
        a 1B model's prefill)."""
        logits, past = self.forward(input_ids, attention_mask, None)
        return logits[:, -1, :], past

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Logits [B, T, V] of whole sequences in one forward (no cache kept)."""
        return self.forward(_int64(input_ids), _int64(attention_mask), None)[0]

    def close(self) -> None:
        """Release the model's memory (a no-op where the garbage collector does it)."""

    def generate(self, prompts: Sequence[Sequence[int]],
                 settings: GenerationSettings | Sequence[GenerationSettings]) -> list[Generation]:
        """Continue every prompt (token ids) in one left-padded batch.

        `settings` is one for all rows or one per row. Generation stops per row at an EOS
        token (not returned; finish_reason "stop") or after max_new_tokens ("length"; when
        every row asks for 0, no forward runs). A greedy row gives the tokens it gives when generated
        alone wherever the backend computes each row independently of the others: torch fp32,
        torch int8 (torchao quantizes activations per token) and ONNX fp32. ONNX int8 does
        not: onnxruntime's dynamic quantization picks one activation scale per tensor, i.e.
        per batch, so a row's logits move slightly (~1e-2) with its batch mates and a near-tie
        argmax may flip.
        """
        rows = list(prompts)
        per_row = _per_row_settings(settings, len(rows))
        self.check_request(rows, per_row)
        if all(s.max_new_tokens == 0 for s in per_row):
            return [Generation([], "length", len(prompt)) for prompt in rows]
        ids, mask = left_pad(rows, self.pad_token_id)  # [B, L] each
        last, past = self.prefill(ids, mask)  # [B, V]
        samplers = [_Sampler(s) for s in per_row]
        out: list[list[int]] = [[] for _ in rows]
        reasons: list[str | None] = [None if s.max_new_tokens > 0 else "length" for s in per_row]
        eos = set(self.eos_token_ids)
        while any(r is None for r in reasons):
            step = np.full((len(rows), 1), self.pad_token_id, dtype=np.int64)  # [B, 1]
            for i, sampler in enumerate(samplers):
                if reasons[i] is not None:
                    continue
                token = sampler.choose(last[i])
                if token in eos:
                    reasons[i] = "stop"
                    continue
                out[i].append(token)
                step[i, 0] = token
                if len(out[i]) >= per_row[i].max_new_tokens:
                    reasons[i] = "length"
            if all(r is not None for r in reasons):
                break
            # Finished rows are fed padding; their logits are never read again.
            mask = np.concatenate([mask, np.ones((len(rows), 1), dtype=np.int64)], axis=1)
            logits, past = self.forward(step, mask, past)
            last = logits[:, -1, :]
        return [Generation(tokens, reason, len(prompt))
                for tokens, reason, prompt in zip(out, reasons, rows)]

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.eos_token_ids[0])

    def check_request(self, prompts: Sequence[Sequence[int]],
                      settings: Sequence[GenerationSettings]) -> None:
        """InferenceInputError for the first prompt or setting this model cannot run."""
        for i, (prompt, s) in enumerate(zip(prompts, settings)):
            where = f"prompt {i}" if len(prompts) > 1 else "the prompt"
            if len(prompt) == 0:
                raise InferenceInputError(f"{where} is empty: give at least one token of text.")
            if s.max_new_tokens < 0:
                raise InferenceInputError(
                    f"max_new_tokens must be >= 0, found {s.max_new_tokens}.")
            if len(prompt) + s.max_new_tokens > self.max_length:
                raise InferenceInputError(
                    f"{where} has {len(prompt)} tokens and asks for {s.max_new_tokens} new ones: "
                    f"{len(prompt) + s.max_new_tokens} positions, over the model's "
                    f"{self.max_length}; shorten the prompt or lower max_new_tokens.")
            if not (math.isfinite(s.temperature) and s.temperature >= 0 and 0 < s.top_p <= 1):
                raise InferenceInputError(
                    f"temperature must be a finite number >= 0 and top_p in (0, 1], found "
                    f"temperature "
                    f"{s.temperature}, top_p {s.top_p}.")


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids [B, L], attention_mask [B, L]) int64, rows right-aligned (left padding)."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        if len(row):
            ids[i, width - len(row):] = row
            mask[i, width - len(row):] = 1
    return ids, mask


def position_ids(attention_mask: np.ndarray, new: int) -> np.ndarray:
    """Position ids [B, new] of the last `new` positions: count of real tokens before each."""
    positions = np.cumsum(attention_mask, axis=1) - 1  # [B, past + t]
    return np.clip(positions[:, -new:], 0, None).astype(np.int64)


class _Sampler:
    """Picks one row's next token: argmax at temperature 0, else top-p sampling."""

    def __init__(self, settings: GenerationSettings):
        self.settings = settings
        self.rng = np.random.default_rng(settings.seed)

    def choose(self, logits: np.ndarray) -> int:  # logits [V]
        if self.settings.temperature == 0:
            return int(np.argmax(logits))
        scaled = logits.astype(np.float64) / self.settings.temperature
        probs = np.exp(scaled - scaled.max())
        probs /= probs.sum()
        if self.settings.top_p < 1:
            order = np.argsort(-probs)
            cumulative = np.cumsum(probs[order])
            # Keep the smallest prefix whose mass reaches top_p (always at least one token).
            keep = order[: int(np.searchsorted(cumulative, self.settings.top_p)) + 1]
            kept = np.zeros_like(probs)
            kept[keep] = probs[keep]
            probs = kept / kept.sum()
        return int(self.rng.choice(len(probs), p=probs))


def _per_row_settings(settings, rows: int) -> list[GenerationSettings]:
    if isinstance(settings, GenerationSettings):
        return [settings] * rows
    settings = list(settings)
    if len(settings) != rows:
        raise InferenceInputError(
            f"expected one GenerationSettings per prompt ({rows}), found {len(settings)}.")
    return settings


def _int64(array) -> np.ndarray:
    return np.ascontiguousarray(array, dtype=np.int64)


# ----------------------------------------------------------------------------- torch backend


class TorchLM(InferenceModel):
    """A transformers causal LM run by PyTorch on the CPU (fp32, or INT8 through torchao)."""

    def __init__(self, model, tokenizer, *, kind: str, source: str, max_length: int | None = None):
        self.model = model.eval()
        self.tokenizer = prepare_tokenizer(tokenizer)
        self.kind = kind
        self.source = source
        self.max_length = int(max_length or context_length(model.config))
        self.eos_token_ids = eos_token_ids(model, self.tokenizer)
        # transformers 5.x names the cache argument `cache`; 4.x `past_key_values`.
        parameters = inspect.signature(model.forward).parameters
        self._cache_name = "cache" if "cache" in parameters else "past_key_values"
        self._keeps_last_logits = "logits_to_keep" in parameters

    def forward(self, input_ids, attention_mask, past):
        return self._run(input_ids, attention_mask, past, {})

    def prefill(self, input_ids, attention_mask):
        if not self._keeps_last_logits:
            return super().prefill(input_ids, attention_mask)
        logits, past = self._run(input_ids, attention_mask, None, {"logits_to_keep": 1})
        return logits[:, -1, :], past  # [B, V]

    def _run(self, input_ids, attention_mask, past, extra: dict[str, Any]):
        import torch

        if past is None:
            from transformers import DynamicCache

            past = DynamicCache(config=self.model.config)
        ids = torch.from_numpy(_int64(input_ids))
        mask = torch.from_numpy(_int64(attention_mask))
        positions = torch.from_numpy(position_ids(attention_mask, ids.shape[1]))
        with torch.inference_mode():
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                             use_cache=True, **{self._cache_name: past}, **extra)
        return out.logits.float().numpy(), getattr(out, self._cache_name)

    def close(self) -> None:
        self.model = None


def prepare_tokenizer(tokenizer):
    """The tokenizer set for batched generation: left padding, a pad token (EOS if none)."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def context_length(config) -> int:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def eos_token_ids(model, tokenizer) -> tuple[int, ...]:
    """EOS ids from the generation config (int or list), else the tokenizer's."""
    config = getattr(model, "generation_config", None)
    found = getattr(config, "eos_token_id", None) if config is not None else None
    if found is None:
        found = tokenizer.eos_token_id
    ids = found if isinstance(found, (list, tuple)) else [found]
    return tuple(int(i) for i in ids if i is not None)


# ----------------------------------------------------------------------------- loading


def model_directory(source: str | Path) -> Path | None:
    """The directory to load for `source`: itself, or a student-train run's final/."""
    path = Path(source).expanduser()
    if not path.is_dir():
        return None
    if not (path / "config.json").is_file() and (path / "final" / "config.json").is_file():
        return path / "final"
    return path


def read_export_manifest(directory: Path) -> dict[str, Any]:
    """export.json of an export directory, checked for the fields loading needs."""
    path = directory / EXPORT_MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise LogitStoreError(
            f"{path} is not a readable export manifest ({exc}); re-run student-export to "
            "write the export again.") from exc
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != EXPORT_FORMAT_VERSION or manifest.get("format") not in ("onnx", "torch"):
        raise LogitStoreError(
            f"{path}: expected format_version {EXPORT_FORMAT_VERSION} and format onnx or "
            f"torch, found format_version {version!r}, format "
            f"{manifest.get('format') if isinstance(manifest, dict) else None!r}; export the "
            "model again with this version of student-export.")
    return manifest


def load_inference_model(source: str | Path, *, threads: int | None = None) -> InferenceModel:
    """The InferenceModel for an export directory, a model directory, a run, alias or hub id."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    directory = model_directory(source)
    if directory is not None and (directory / EXPORT_MANIFEST).is_file():
        manifest = read_export_manifest(directory)
        if (manifest.get("quality") or {}).get("passed") is False:
            # Kept for inspection by student-export; loading it is allowed, not silent.
            log.warning("%s failed student-export's quality gate (%s); its outputs may differ "
                        "from the source model's", directory, manifest.get("status", "failed"))
        if manifest["format"] == "onnx":
            from logitstore.toolkit.onnx_lm import OnnxLM

            return OnnxLM.from_export(directory, manifest, threads=threads)
        return _load_torch_export(directory, manifest)
    from logitstore.toolkit.hf import load_causal_lm, load_tokenizer

    spec = str(directory) if directory is not None else str(source)
    model, _ = load_causal_lm(spec, quantize="none", dtype="float32", device="cpu")
    return TorchLM(model, load_tokenizer(spec), kind="torch-fp32", source=spec)


def _load_torch_export(directory: Path, manifest: dict[str, Any]) -> InferenceModel:
    from logitstore.toolkit.hf import load_causal_lm, load_tokenizer

    if manifest.get("quantize") == "int8":
        from logitstore.toolkit.torch_int8 import load_int8_model

        model = load_int8_model(directory, manifest)
        kind = "torch-int8"
    else:
        model, _ = load_causal_lm(str(directory), quantize="none", dtype="float32", device="cpu")
        kind = "torch-fp32"
    return TorchLM(model, load_tokenizer(str(directory)), kind=kind, source=str(directory),
                   max_length=manifest.get("max_length"))
