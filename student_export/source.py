"""The model student-export reads: MODEL resolved to a local directory, and its provenance.

MODEL may be
- a student-train run directory (it holds config.yaml with a `train:` section): its final/;
- a run's final/ directory, or any Hugging Face model directory (config.json + weights);
- an alias (logitstore/toolkit/models.yaml) or a hub id: resolved by
  `logitstore.toolkit.hf.resolve_model` and fetched into (or, with HF_HUB_OFFLINE=1, read
  from) the Hugging Face cache, so everything after works on a local directory.

`Source.sha256` is the digest of the weight files: sha256 over the lines
`<sha256 of the file>  <file name>\\n` of every *.safetensors / *.bin weight file, sorted by name
(the format `sha256sum` prints), so one number names the exact weights whatever their
sharding; `Source.weights` keeps each file's own digest. `run_eval_store` reads which store
a run trained on, for the quality gate's default held-out data. No torch here.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from logitstore.errors import LogitStoreError

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin")
# *.bin files that are not weights (the Trainer's pickled arguments and optimizer state).
_NOT_WEIGHTS = ("training_args.bin", "optimizer.bin", "scheduler.bin")
RUN_CONFIG = "config.yaml"  # student-train's resolved config, in the run directory
RUN_FINAL = "final"
# What an export needs from a hub repository; optimizer states and other formats are skipped.
_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.tiktoken"]


@dataclass(frozen=True)
class Source:
    name: str  # MODEL as given
    path: Path  # local directory: config.json, tokenizer, weights
    run_dir: Path | None  # the student-train run it belongs to, when it does
    config: dict[str, Any] = field(repr=False)  # its config.json

    @property
    def model_type(self) -> str | None:
        return self.config.get("model_type")

    @property
    def max_position_embeddings(self) -> int | None:
        value = self.config.get("max_position_embeddings")
        return value if isinstance(value, int) else None

    def weight_files(self) -> list[Path]:
        return sorted(p for p in self.path.iterdir() if p.is_file()
                      and p.suffix in WEIGHT_SUFFIXES and p.name not in _NOT_WEIGHTS)

    def weights_sha256(self) -> tuple[str, dict[str, str]]:
        """(digest of every weight file, {file name: its sha256}); see the module docstring."""
        digests = {p.name: file_sha256(p) for p in self.weight_files()}
        listing = "".join(f"{digest}  {name}\n" for name, digest in sorted(digests.items()))
        return hashlib.sha256(listing.encode("utf-8")).hexdigest(), digests


def file_sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _train_section(directory: Path) -> dict[str, Any] | None:
    """The `train:` section of a run directory's config.yaml, None when it is no run."""
    import yaml

    config = directory / RUN_CONFIG
    if not config.is_file():
        return None
    try:
        data = yaml.safe_load(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None  # not a readable student-train config: treat the directory as a model
    section = data.get("train") if isinstance(data, dict) else None
    return section if isinstance(section, dict) else None


def local_problem(name: str) -> str | None:
    """What is wrong with MODEL when it names a local directory (None: fine, or not local).

    Cheap (no hub access, nothing loaded), for the checks made before any loading."""
    path = Path(name).expanduser()
    looks_local = path.is_absolute() or name.startswith((".", "~")) or path.exists()
    if not looks_local:
        return None  # an alias or a hub id: resolved later
    if not path.exists():
        return (f"MODEL {name}: no such directory; pass a student-train run directory, its "
                "final/, a Hugging Face model directory, an alias or a hub id")
    if not path.is_dir():
        return (f"MODEL {name} is a file; pass the directory that holds config.json and the "
                "weights (or a student-train run directory)")
    model_dir = path
    if _train_section(path) is not None and not (path / "config.json").is_file():
        model_dir = path / RUN_FINAL
        if not (model_dir / "config.json").is_file():
            return (f"MODEL {name} is a student-train run directory without a finished "
                    f"{RUN_FINAL}/ (no {RUN_FINAL}/config.json): the training has not ended. "
                    "Let it finish (or resume it with student-train --resume), or export a "
                    "checkpoint's model directory instead")
    if not (model_dir / "config.json").is_file():
        return (f"MODEL {name} holds no config.json: expected a model directory written by "
                "save_pretrained (config.json, tokenizer, *.safetensors) or a student-train "
                "run directory")
    if not any(p.suffix in WEIGHT_SUFFIXES for p in model_dir.iterdir()):
        return (f"MODEL {model_dir} holds no weights (*.safetensors or *.bin) next to its "
                "config.json; pass the directory save_pretrained wrote")
    return None


def resolve_source(name: str) -> Source:
    """MODEL -> Source (a local directory); LogitStoreError with one paragraph when it cannot
    be found or fetched."""
    problem = local_problem(name)
    if problem:
        raise LogitStoreError(problem)
    path = Path(name).expanduser()
    run_dir = None
    if path.is_dir():
        if _train_section(path) is not None and not (path / "config.json").is_file():
            run_dir, path = path, path / RUN_FINAL
        elif path.name == RUN_FINAL and _train_section(path.parent) is not None:
            run_dir = path.parent
    else:
        path = _fetch(name)
    path = path.resolve()
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LogitStoreError(f"cannot read {path / 'config.json'} ({exc}); the model "
                              "directory must hold the config.json save_pretrained writes")
    return Source(name, path, run_dir.resolve() if run_dir else None, config)


def _fetch(name: str) -> Path:
    """The local snapshot of an alias or hub id (downloaded unless HF_HUB_OFFLINE=1)."""
    from logitstore.toolkit.hf import ModelLoadError, hub_offline, resolve_model

    spec = resolve_model(name)
    if spec.is_local:
        return Path(spec.path_or_id)
    from huggingface_hub import snapshot_download

    offline = hub_offline()
    try:
        found = snapshot_download(spec.path_or_id, revision=spec.revision,
                                  allow_patterns=_HUB_PATTERNS, local_files_only=offline)
    except Exception as exc:  # hub/network/cache errors of every kind: one paragraph
        cause = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        where = "HF_HUB_OFFLINE=1, so only the cache was searched" if offline else \
            "the hub was tried"
        raise ModelLoadError(
            f"could not get model {name!r}: there is no local directory of that name, and as "
            f"hub id {spec.path_or_id}: {cause}; {where}. On a "
            f"machine with internet run `hf download {spec.path_or_id}` and copy the Hugging "
            "Face cache here (or point HF_HOME at it), or pass a local model directory") \
            from None
    return Path(found)


def run_eval_store(run_dir: Path | None) -> tuple[str, str] | None:
    """(store URL, split or "auto") a student-train run evaluated on: its eval_store, else
    its store; None when there is no run or it trained from raw data."""
    section = _train_section(run_dir) if run_dir is not None else None
    if not section:
        return None
    url = section.get("eval_store") or section.get("store")
    if not isinstance(url, str) or not url:
        return None
    split = section.get("eval_split")
    return url, split if isinstance(split, str) and split else "auto"
