"""Hugging Face helpers shared by teacher-dump, student-train and distill-eval.

Resolve a model name (alias from the bundled models.yaml or $LOGITSTORE_MODELS, local
directory or hub id), then load its tokenizer and causal LM (optionally bitsandbytes-quantized),
turning a missing or unreachable model into one ModelLoadError paragraph that says how to get
it. A tokenizer's fingerprint and the model/tokenizer vocabulary check live in
tokenizer_identity.py.

torch / transformers / huggingface_hub are imported inside the functions that need them, so
importing this module loads none of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from logitstore.errors import ConfigError, LogitStoreError
from logitstore.toolkit.hub_probe import env_flag_set

log = logging.getLogger(__name__)

MODELS_ENV = "LOGITSTORE_MODELS"
DEFAULT_MODELS_FILE = Path(__file__).resolve().parent / "models.yaml"  # package data
QUANTIZE_CHOICES = ("4bit", "8bit", "none")
DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")
# Hub repo ids: "name" or "org/name" of word characters, dots and dashes.
_HUB_ID = re.compile(r"[\w.-]{1,96}(/[\w.-]{1,96})?")
_SNAPSHOT_COMMIT = re.compile(r"/snapshots/([0-9a-f]{40})(/|$)")
_COMMIT = re.compile(r"[0-9a-f]{40}")

Quantize = Literal["4bit", "8bit", "none"]
DType = Literal["auto", "bfloat16", "float16", "float32"]


class ModelLoadError(LogitStoreError):
    """A model or tokenizer that cannot be resolved or loaded (unknown name, missing weights)."""


@dataclass(frozen=True)
class ModelSpec:
    name: str  # what the user typed: alias, directory or hub id
    path_or_id: str  # what from_pretrained gets: absolute directory or hub id
    is_local: bool
    revision: str | None = None
    defaults: dict[str, Any] = field(default_factory=dict)  # the alias entry's other keys


@dataclass(frozen=True)
class LoadedModel:
    """What was loaded, for provenance in store manifests and run logs."""

    name: str
    hub_id: str
    is_local: bool
    revision: str | None  # as asked (None: default branch)
    commit_hash: str | None  # resolved commit when known
    dtype: str
    quantization: str  # "4bit" | "8bit" | "none"
    device: str
    attn_implementation: str | None
    license: str | None
    model_class: str

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- aliases


def models_file() -> Path:
    """The bundled models.yaml (package data of logitstore.toolkit), or $LOGITSTORE_MODELS."""
    override = os.environ.get(MODELS_ENV)
    return Path(override).expanduser() if override else DEFAULT_MODELS_FILE


def load_aliases(path: str | os.PathLike | None = None) -> dict[str, dict[str, Any]]:
    """alias -> entry (hub_id, revision, dtype, quantize, license...), validated."""
    import yaml

    path = Path(path) if path is not None else models_file()
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise ConfigError([f"cannot read model aliases {path}: {exc}"]) from exc
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path} is not valid YAML: {exc}"]) from exc
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: expected a mapping of alias -> settings"])
    problems = []
    for alias, entry in data.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("hub_id"), str):
            problems.append(f"{path}: alias {alias!r} needs a 'hub_id' string")
            continue
        if entry.get("dtype", "auto") not in DTYPE_CHOICES:
            problems.append(f"{path}: {alias}.dtype must be one of {DTYPE_CHOICES}")
        if entry.get("quantize", "none") not in QUANTIZE_CHOICES:
            problems.append(f"{path}: {alias}.quantize must be one of {QUANTIZE_CHOICES}")
    if problems:
        raise ConfigError(problems)
    return {str(alias): entry for alias, entry in data.items()}


def _spec_from_alias(name: str, entry: dict, revision: str | None) -> ModelSpec:
    target = Path(entry["hub_id"]).expanduser()
    is_local = target.is_dir()
    defaults = {k: v for k, v in entry.items() if k not in ("hub_id", "revision")}
    return ModelSpec(
        name=name,
        path_or_id=str(target.resolve()) if is_local else entry["hub_id"],
        is_local=is_local,
        revision=revision or entry.get("revision"),
        defaults=defaults,
    )


def resolve_model(name: str | os.PathLike | ModelSpec, revision: str | None = None) -> ModelSpec:
    """An existing directory is a local model; else an alias; else a hub id (as HF does).

    A hub id that an alias points at picks up that alias's defaults (dtype, license...).
    """
    if isinstance(name, ModelSpec):
        return name if revision is None else dataclasses.replace(name, revision=revision)
    name = os.fspath(name)
    path = Path(name).expanduser()
    if path.is_dir():
        return ModelSpec(name, str(path.resolve()), True, revision)
    aliases = load_aliases()
    if name in aliases:
        return _spec_from_alias(name, aliases[name], revision)
    if _HUB_ID.fullmatch(name) and ".." not in name:
        for entry in aliases.values():
            if entry["hub_id"] == name:
                spec = _spec_from_alias(name, entry, revision)
                return dataclasses.replace(spec, name=name)
        return ModelSpec(name, name, False, revision)
    raise ModelLoadError(
        f"{name!r} is not an existing directory, not an alias in {models_file()} "
        f"({', '.join(sorted(aliases))}) and not a hub id (ORG/NAME)."
    )


# ----------------------------------------------------------------------------- hub errors


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as set now (the hub library reads it only once, at import)."""
    if env_flag_set(os.environ.get("HF_HUB_OFFLINE")):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)


def _hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _load_error_types() -> tuple[type[BaseException], ...]:
    """Errors from a missing/unreachable model; anything else (a bug) propagates as is."""
    from huggingface_hub import errors

    types: list[type[BaseException]] = [
        OSError,  # transformers' "couldn't find/connect", LocalEntryNotFound, HTTP errors
        TimeoutError,
        errors.HFValidationError,
        errors.EntryNotFoundError,
    ]
    with contextlib.suppress(ImportError):
        import httpx

        types.append(httpx.HTTPError)
    return tuple(types)


def _load_error_message(spec: ModelSpec, what: str, exc: BaseException) -> str:
    cause = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    if spec.is_local:
        return (
            f"Could not load the {what} of model {spec.name!r} from the local directory "
            f"{spec.path_or_id}: {cause}. The directory must hold config.json, the tokenizer "
            "files and the weights (*.safetensors) as written by save_pretrained or by "
            f"`hf download ORG/NAME --local-dir {spec.path_or_id}`."
        )
    offline = hub_offline()
    revision = spec.revision or "main"
    rev_flag = f" --revision {spec.revision}" if spec.revision else ""
    gated = ""
    if spec.defaults.get("gated"):
        gated = " This model is gated: accept its licence on its model page, then `hf auth login`."
    network = (
        "HF_HUB_OFFLINE=1, so only the cache was searched"
        if offline
        else "HF_HUB_OFFLINE unset, so the hub was tried too (set HF_HUB_OFFLINE=1 on machines "
        "without internet to fail fast)"
    )
    return (
        f"Could not load the {what} of model {spec.name!r} (hub id {spec.path_or_id}, revision "
        f"{revision}): {cause}. Looked in the Hugging Face cache {_hub_cache()} with {network}. "
        f"To fix: on a machine with internet run `hf download {spec.path_or_id}{rev_flag}` "
        "(older huggingface_hub: `huggingface-cli download`) and copy that cache directory "
        "here (or point HF_HOME / HF_HUB_CACHE at the copy), or pass a local directory that "
        f"holds config.json, the tokenizer and the weights instead of the hub id.{gated}"
    )


# A local directory lacking these makes transformers raise bare ValueErrors: check first.
_REQUIRED_LOCAL_FILES = {
    "tokenizer": ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json"),
    "weights": ("config.json",),
}


@contextlib.contextmanager
def _translate_load_errors(spec: ModelSpec, what: str):
    if spec.is_local:
        needed = _REQUIRED_LOCAL_FILES[what]
        if not any((Path(spec.path_or_id) / name).is_file() for name in needed):
            missing = FileNotFoundError(f"none of {', '.join(needed)} in the directory")
            raise ModelLoadError(_load_error_message(spec, what, missing))
    try:
        yield
    except LogitStoreError:
        raise
    except _load_error_types() as exc:
        raise ModelLoadError(_load_error_message(spec, what, exc)) from exc


# ----------------------------------------------------------------------------- loading


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError([f"{name} must be one of {', '.join(choices)}, got {value!r}"])


def _resolve_device(device: str | None) -> str:
    import torch

    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", torch.cuda.current_device())
    return str(resolved)


def load_tokenizer(
    spec: str | os.PathLike | ModelSpec,
    revision: str | None = None,
    trust_remote_code: bool = False,
):
    """The model's tokenizer (AutoTokenizer), or ModelLoadError explaining how to get it."""
    from transformers import AutoTokenizer

    spec = resolve_model(spec, revision)
    kwargs: dict[str, Any] = {
        "trust_remote_code": trust_remote_code,
        "local_files_only": hub_offline(),
    }
    if spec.revision and not spec.is_local:
        kwargs["revision"] = spec.revision
    with _translate_load_errors(spec, "tokenizer"):
        return AutoTokenizer.from_pretrained(spec.path_or_id, **kwargs)


def _quantization_config(quantize: str):
    import torch
    from transformers import BitsAndBytesConfig

    if quantize == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def _commit_hash(spec: ModelSpec, model) -> str | None:
    """The commit the weights came from: config attribute, snapshot path or HF cache refs."""
    known = getattr(model.config, "_commit_hash", None)
    if isinstance(known, str) and _COMMIT.fullmatch(known):
        return known
    if spec.is_local:
        match = _SNAPSHOT_COMMIT.search(Path(spec.path_or_id).resolve().as_posix())
        return match.group(1) if match else None
    if spec.revision and _COMMIT.fullmatch(spec.revision):
        return spec.revision
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(spec.path_or_id, "config.json", revision=spec.revision)
    match = _SNAPSHOT_COMMIT.search(Path(cached).as_posix()) if isinstance(cached, str) else None
    return match.group(1) if match else None


def load_causal_lm(
    spec: str | os.PathLike | ModelSpec,
    *,
    quantize: Quantize | None = None,
    dtype: DType = "auto",
    device: str | None = None,
    need_attentions: bool = False,
    trust_remote_code: bool = False,
    revision: str | None = None,
):
    """(model in eval mode, LoadedModel) for a causal LM.

    quantize None: the alias's `quantize` (default 4bit) on CUDA, none on CPU.
    dtype "auto": the alias's `dtype`, else the checkpoint's own.
    need_attentions: eager attention, because SDPA/flash return no attention weights.
    """
    if quantize is not None:
        _check_choice("quantize", quantize, QUANTIZE_CHOICES)
    _check_choice("dtype", dtype, DTYPE_CHOICES)
    spec = resolve_model(spec, revision)

    import torch
    from transformers import AutoModelForCausalLM

    device = _resolve_device(device)
    on_cuda = device.startswith("cuda")
    if quantize is None:
        quantize = spec.defaults.get("quantize", "4bit") if on_cuda else "none"
    if quantize != "none" and not on_cuda:
        warnings.warn(
            f"loading {spec.name} {quantize}-quantized on {device}: bitsandbytes' CPU kernels "
            "are slow; use quantize='none' on CPU unless memory forces it",
            stacklevel=2,
        )
    dtype_name = spec.defaults.get("dtype", "auto") if dtype == "auto" else dtype
    kwargs: dict[str, Any] = {
        "dtype": "auto" if dtype_name == "auto" else getattr(torch, dtype_name),
        "device_map": {"": device},
        "trust_remote_code": trust_remote_code,
        "local_files_only": hub_offline(),
    }
    if spec.revision and not spec.is_local:
        kwargs["revision"] = spec.revision
    if quantize != "none":
        kwargs["quantization_config"] = _quantization_config(quantize)
    if need_attentions:
        kwargs["attn_implementation"] = "eager"
    with _translate_load_errors(spec, "weights"):
        model = AutoModelForCausalLM.from_pretrained(spec.path_or_id, **kwargs)
    model.eval()
    info = LoadedModel(
        name=spec.name,
        hub_id=spec.path_or_id,
        is_local=spec.is_local,
        revision=spec.revision,
        commit_hash=_commit_hash(spec, model),
        dtype=str(model.dtype).removeprefix("torch."),
        quantization=quantize,
        device=device,
        attn_implementation=getattr(model.config, "_attn_implementation", None),
        license=spec.defaults.get("license"),
        model_class=type(model).__name__,
    )
    log.info("loaded %s", info)
    return model, info
