"""The student of `student-train --task classify`: an ImageTextClassifier with its preprocessing.

    student = load_classify_student(spec, store_heads={"modality": 5, "location": 12}, seed=0)
    student.model            ImageTextClassifier (train mode), heads equal to the store's
    student.tokenizer        the text tower's tokenizer (None without a text tower)
    student.image_processor  the vision tower's image processor (None without one)
    save_classify_student(student, directory)   # save_pretrained + tokenizer + processor

`spec` (the `student` setting) is either
* a config file, YAML or JSON: a mapping of `ImageTextClassifierConfig` fields
  (vision_config, text_config, heads, fusion_dim, fusion_layers, fusion_heads, dropout), plus
  `tokenizer: DIR` (a tokenizer directory, relative paths from the config file's directory),
  required with a text tower. `heads` may be left out: the store's heads are taken. The model
  is built with random weights after torch.manual_seed(seed), and its image processor from
  the vision tower's image_size (classifier_adapter.image_processor_for);
* a saved directory (`save_classify_student`, `save_pretrained` of an ImageTextClassifier):
  its weights, its tokenizer and its preprocessor_config.json (built from the config when
  absent).
The student's heads must be the store's, names and class counts (`check_heads`): a mismatch is
one paragraph, raised before any weight is loaded or built.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from logitstore.errors import LogitStoreError

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


@dataclass
class ClassifyStudent:
    model: Any  # ImageTextClassifier
    tokenizer: Any | None
    image_processor: Any | None
    source: str  # what `student` named, for the run's metadata


def check_heads(student_heads: dict[str, int], store_heads: dict[str, int], spec: str) -> None:
    """Raise a one-paragraph LogitStoreError unless both have the same heads and classes."""
    if dict(student_heads) == dict(store_heads):
        return
    raise LogitStoreError(
        f"student {spec}: its heads {dict(sorted(student_heads.items()))} are not the store's "
        f"{dict(sorted(store_heads.items()))} (expected the same head names with the same "
        f"class counts, since every head is trained on the store's logits and labels); set "
        f"`heads` in the student config to the store's, or leave it out to take the store's")


def _read_config_file(path: Path) -> dict[str, Any]:
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
        values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise LogitStoreError(f"student config {path}: cannot be read ({exc}); expected a YAML "
                              f"or JSON mapping of ImageTextClassifierConfig fields") from exc
    if not isinstance(values, dict):
        raise LogitStoreError(f"student config {path}: expected a mapping of "
                              f"ImageTextClassifierConfig fields, found {type(values).__name__}")
    return values


def _config_from_file(path: Path, store_heads: dict[str, int]):
    """(ImageTextClassifierConfig, tokenizer directory or None) from a config file."""
    from logitstore.toolkit.classifier_models import ImageTextClassifierConfig

    values = _read_config_file(path)
    tokenizer = values.pop("tokenizer", None)
    if "heads" in values:
        check_heads(values["heads"], store_heads, str(path))
    else:
        values["heads"] = dict(store_heads)
    config = ImageTextClassifierConfig(**values)  # ConfigError listing every problem
    tokenizer_dir = None
    if tokenizer is not None:
        tokenizer_dir = Path(tokenizer)
        if not tokenizer_dir.is_absolute():
            tokenizer_dir = path.parent / tokenizer_dir
    if config.text_config is not None and tokenizer_dir is None:
        raise LogitStoreError(f"student config {path}: it has a text tower but no `tokenizer:` "
                              f"(expected the directory of a tokenizer whose vocabulary fits "
                              f"text_config.vocab_size {config.text_config.vocab_size}); add "
                              f"`tokenizer: DIR`")
    return config, tokenizer_dir


def _load_tokenizer(directory: Path, config, spec: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError) as exc:
        raise LogitStoreError(f"student {spec}: no tokenizer could be loaded from {directory} "
                              f"({exc}); expected a tokenizer directory (tokenizer.json ...)"
                              ) from exc
    vocab = getattr(config.text_config, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise LogitStoreError(f"student {spec}: the tokenizer has {len(tokenizer)} tokens but "
                              f"the text tower's vocab_size is {vocab} (expected at least the "
                              f"tokenizer's size); raise text_config.vocab_size")
    return tokenizer


def load_classify_student(spec: str, store_heads: dict[str, int], seed: int = 0
                          ) -> ClassifyStudent:
    """The student `spec` names (module docstring), checked against the store's heads."""
    import torch

    from logitstore.toolkit.classifier_adapter import image_processor_for, load_image_processor
    from logitstore.toolkit.classifier_models import ImageTextClassifier, ImageTextClassifierConfig

    path = Path(spec)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LogitStoreError(f"student {spec}: the directory has no config.json (expected a "
                                  f"saved image+text classifier, or a YAML/JSON student config)")
        config = ImageTextClassifierConfig.from_pretrained(str(path))
        check_heads(config.heads, store_heads, spec)
        model = ImageTextClassifier.from_pretrained(str(path))
        tokenizer_dir = path if config.text_config is not None else None
        processor = (load_image_processor(path) if (path / "preprocessor_config.json").is_file()
                     else None)
    elif path.is_file() and path.suffix in CONFIG_SUFFIXES:
        config, tokenizer_dir = _config_from_file(path, store_heads)
        torch.manual_seed(seed)  # the student's initial weights follow the run's seed
        model = ImageTextClassifier(config)
        processor = None
    else:
        raise LogitStoreError(f"student {spec}: for --task classify expected a config file "
                              f"({', '.join(CONFIG_SUFFIXES)}: ImageTextClassifierConfig fields) "
                              f"or a saved classifier directory, found "
                              f"{'no such path' if not path.exists() else 'another file'}")
    if config.vision_config is not None and processor is None:
        processor = image_processor_for(config)
    tokenizer = _load_tokenizer(tokenizer_dir, config, spec) if tokenizer_dir else None
    model.train()
    return ClassifyStudent(model, tokenizer, processor, spec)


def save_classify_student(student: ClassifyStudent, directory: Path) -> None:
    """`directory`: save_pretrained weights (safetensors) + tokenizer + image processor, so that
    AutoModel.from_pretrained(directory) and load_classify_student(directory) both load it."""
    directory.mkdir(parents=True, exist_ok=True)
    student.model.save_pretrained(str(directory))
    if student.tokenizer is not None:
        student.tokenizer.save_pretrained(str(directory))
    if student.image_processor is not None:
        student.image_processor.save_pretrained(str(directory))
