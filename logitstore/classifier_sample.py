"""Classifier stores (format 2.3, FORMAT.md section 4.3): per-sample signals of a
classification teacher, written and committed by the same segment/record/head machinery as
causal-lm stores (logitstore/writer.py), with other arrays and no tokens.

Interface (numpy only, no torch):

    settings = StoreSettings(kind="classifier", heads={"modality": 5, "location": 12},
                             features={"image_cls": 768, "text_cls": 768, "fused": 384},
                             logits_encoding="f16")          # features_encoding f16 default
    with StoreWriter(url, settings) as writer:               # the one writer of both kinds
        writer.add(ClassifierSample(
            sample_id=classifier_sample_id(image_bytes, text), image="img/0001.png",
            text=text, split="train", logits={"modality": [5 floats], "location": [12]},
            features={"image_cls": [768 floats], ...}, labels={"modality": 2}))  # absent: -1

`StoreWriter.add` checks each sample against the settings (`validate_classifier_sample`:
every head and feature part present with its C or D, finite values, labels in -1..C-1)
before anything is written. Read back with logitstore/classifier_reader.py
(`ClassifierReader`). Per segment the arrays are `heads/<head>/logits` [n, C],
`features/<part>` [n, D] and `labels/<head>` [n] int32 (-1 = unlabelled); the segment's
index rows carry the sample id, `image` and `text` (the input reference), `source`, `split`
and free tags.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import zarr
from zarr.storage import MemoryStore

from logitstore.errors import LogitStoreError, SchemaMismatchError, StoreKindError
from logitstore.format import (CAUSAL_LM, CLASSIFIER, INDEX_COLUMNS,
                               SEGMENT_INDEX, STORE_KINDS, TOKEN_SETTINGS, StoreSettings)
from logitstore.parquet_io import table_to_bytes
from logitstore.segment import EncodedSegment, _put, check_tags, tag_columns

# Index columns of a classifier store beyond those of every store: the input reference.
REFERENCE_COLUMNS = ("image", "text")
ENCODING_DTYPES = {"f16": "float16", "f32": "float32"}  # logits_encoding, features_encoding
CLASSIFIER_ENCODINGS = tuple(ENCODING_DTYPES)
FLOAT16_MAX = 65504.0  # larger magnitudes would be stored as inf in float16
UNLABELLED = -1


def logits_array(head: str) -> str:
    return f"heads/{head}/logits"


def features_array(part: str) -> str:
    return f"features/{part}"


def labels_array(head: str) -> str:
    return f"labels/{head}"


def classifier_sample_id(image: bytes | None, text: str) -> str:
    """The stable id of an image+text input: sha256 (hex) over the image's byte count
    (uint64 little-endian), its bytes and the text's UTF-8 (no image: 0 bytes), so the same
    input gets the same id wherever its file lives, and no two inputs share one."""
    image = image or b""
    h = hashlib.sha256(struct.pack("<Q", len(image)))
    h.update(image)
    h.update(text.encode("utf-8"))
    return h.hexdigest()


def classifier_digest(sample_id: str, labels: list[int]) -> str:
    """The index `digest` of a classifier sample: sha256 over utf8(sample_id) + 0x00 + its
    labels in head-name order (sorted) as int64 little-endian (the dataset fingerprint's
    unit: equal fingerprints mean the same inputs with the same labels)."""
    h = hashlib.sha256(sample_id.encode("utf-8") + b"\0")
    h.update(np.asarray(labels, dtype="<i8").tobytes())
    return h.hexdigest()


@dataclass
class ClassifierSample:
    """One input of a classification teacher and what the teacher said about it."""

    sample_id: str  # stable: classifier_sample_id(image bytes, text)
    logits: dict[str, np.ndarray]  # head -> [C] float: the head's logits
    features: dict[str, np.ndarray] = field(default_factory=dict)  # part -> [D] float
    labels: dict[str, int] = field(default_factory=dict)  # head -> class; absent/-1: none
    image: str = ""  # the input reference: the image's path (relative to the data), or ""
    text: str = ""
    source: str = ""
    split: str = "train"
    tags: dict[str, Any] = field(default_factory=dict)

    def label(self, head: str) -> int:
        return int(self.labels.get(head, UNLABELLED))


def settings_problems(settings: StoreSettings) -> list[str]:
    """A classifier store's settings (StoreSettings.validate): its kind known, >= 1 head of
    >= 1 class, feature widths >= 1, plain names, known encodings, no token key set."""
    if settings.kind not in STORE_KINDS:
        return [f"kind must be one of {STORE_KINDS}, found {settings.kind!r}"]
    defaults = StoreSettings()
    out = [f"{key} is a key of {CAUSAL_LM} stores; a {CLASSIFIER} store holds no tokens"
           for key in TOKEN_SETTINGS if getattr(settings, key) != getattr(defaults, key)]
    if settings.signals:
        out.append(f"signals {sorted(settings.signals)} are per-token signals of {CAUSAL_LM} "
                   f"stores; a {CLASSIFIER} store holds heads and features (signals empty)")
    if not settings.heads:
        out.append("a classifier store needs >= 1 head, e.g. heads={'modality': 5}")
    for what, sizes in (("head", settings.heads), ("feature part", settings.features)):
        for name, size in sizes.items():
            if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
                out.append(f"{what} name {name!r} must be non-empty, without '/' and not "
                           f"start with '.'")
            if not isinstance(size, int) or isinstance(size, bool) or size < 1:
                out.append(f"{what} {name!r} needs a size >= 1 (classes or width), found "
                           f"{size!r}")
    for key in ("logits_encoding", "features_encoding"):
        if getattr(settings, key) not in CLASSIFIER_ENCODINGS:
            out.append(f"{key} must be one of {CLASSIFIER_ENCODINGS}, found "
                       f"{getattr(settings, key)!r}")
    for key in ("chunk_samples", "segment_samples"):
        value = getattr(settings, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            out.append(f"{key} must be an integer >= 1, found {value!r}")
    return out


def require_kind(settings: StoreSettings, kind: str, what: str, where: str) -> None:
    """StoreKindError unless the store (or writer) of `settings` is of `kind`."""
    if settings.kind == kind:
        return
    other = ("logitstore.classifier_reader.ClassifierReader and ClassifierSample"
             if settings.kind == CLASSIFIER else "logitstore.reader.StoreReader and Sample")
    raise StoreKindError(f"{where} is a {settings.kind} store, but {what} works on {kind} "
                         f"stores only; use {other} for a {settings.kind} store")


def _vector(value, size: int, name: str, encoding: str, where: str) -> np.ndarray:
    """`value` as a finite float vector of `size` within the encoding's range."""
    arr = np.asarray(value)
    if arr.shape != (size,) or not (np.issubdtype(arr.dtype, np.floating)
                                    or np.issubdtype(arr.dtype, np.integer)):
        raise SchemaMismatchError(f"{where}: {name} must be a float vector of shape ({size},) "
                                  f"as the store settings say, found shape {arr.shape} dtype "
                                  f"{arr.dtype}")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise SchemaMismatchError(f"{where}: {name} holds NaN or inf at index "
                                  f"{int(np.argmin(np.isfinite(arr)))}; expected finite values "
                                  f"(check the teacher's dtype and inputs)")
    if encoding == "f16" and np.abs(arr).max() > FLOAT16_MAX:
        raise SchemaMismatchError(f"{where}: {name} holds {float(np.abs(arr).max()):g}, beyond "
                                  f"float16's range ({FLOAT16_MAX:g}) of the store's f16 "
                                  f"encoding; write the store with encoding f32")
    return arr


def validate_classifier_sample(sample: Any, settings: StoreSettings) -> None:
    """Raise (one paragraph naming the sample) unless `sample` fits the settings: every head
    with C finite logits, every feature part with D finite values, labels in -1..C-1."""
    if not isinstance(sample, ClassifierSample):
        raise StoreKindError(f"this store is a {CLASSIFIER} store: it takes ClassifierSample "
                             f"(logitstore.classifier_sample), found {type(sample).__name__}; "
                             f"a tokenised Sample belongs in a {CAUSAL_LM} store")
    if not isinstance(sample.sample_id, str) or not sample.sample_id:
        raise SchemaMismatchError(f"sample_id must be a non-empty string (e.g. "
                                  f"classifier_sample_id(image bytes, text)), found "
                                  f"{sample.sample_id!r}")
    where = f"sample {sample.sample_id!r}"
    for key in ("image", "text", "source", "split"):
        if not isinstance(getattr(sample, key), str):
            raise SchemaMismatchError(f"{where}: {key} must be a string, found "
                                      f"{type(getattr(sample, key)).__name__}")
    check_tags(sample.tags, INDEX_COLUMNS + REFERENCE_COLUMNS, where)
    for what, given, expected in (("heads", sample.logits, settings.heads),
                                  ("feature parts", sample.features, settings.features)):
        if set(given) != set(expected):
            raise SchemaMismatchError(f"{where}: {what} {sorted(given)} != the store's "
                                      f"{sorted(expected)}; give a value for each {what[:-1]} "
                                      f"the settings name, and no other")
    for head, classes in settings.heads.items():
        _vector(sample.logits[head], classes, f"head {head!r} logits", settings.logits_encoding,
                where)
    for part, width in settings.features.items():
        _vector(sample.features[part], width, f"feature part {part!r}",
                settings.features_encoding, where)
    unknown = sorted(set(sample.labels) - set(settings.heads))
    if unknown:
        raise SchemaMismatchError(f"{where}: labels of {unknown}, which are not heads of the "
                                  f"store ({sorted(settings.heads)})")
    for head, label in sample.labels.items():
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or \
                not UNLABELLED <= label < settings.heads[head]:
            raise SchemaMismatchError(f"{where}: label {label!r} of head {head!r} must be an "
                                      f"integer class in 0..{settings.heads[head] - 1}, or -1 "
                                      f"for unlabelled")


def encode_classifier_segment(samples: list[ClassifierSample],
                              settings: StoreSettings) -> EncodedSegment:
    """Samples (already validated) -> files of one segment: the per-sample arrays and the
    segment's index (no tokens: `length` and `segment_offset` are 0)."""
    if not samples:
        raise LogitStoreError("cannot encode an empty segment")
    mem = MemoryStore()
    group = zarr.open_group(mem, mode="w", zarr_format=3)
    rows = settings.chunk_samples
    logits_dtype = ENCODING_DTYPES[settings.logits_encoding]
    for head in settings.heads:
        _put(group, logits_array(head),
             np.stack([np.asarray(s.logits[head], dtype=np.float64) for s in samples])
             .astype(logits_dtype), rows)
        _put(group, labels_array(head), np.array([s.label(head) for s in samples],
                                                 dtype=np.int32), rows)
    for part in settings.features:
        _put(group, features_array(part),
             np.stack([np.asarray(s.features[part], dtype=np.float64) for s in samples])
             .astype(ENCODING_DTYPES[settings.features_encoding]), rows)
    files = {key: buf.to_bytes() for key, buf in mem._store_dict.items()}
    files[SEGMENT_INDEX] = _index_bytes(samples, settings)
    return EncodedSegment(files=files, samples=len(samples), tokens=0, target_tokens=0,
                          sampled_entries={}, sampled_multi={},
                          sample_ids=[s.sample_id for s in samples])


def _index_bytes(samples: list[ClassifierSample], settings: StoreSettings) -> bytes:
    zeros = np.zeros(len(samples), dtype=np.int64)
    heads = sorted(settings.heads)  # the digest's order: JSON settings keep no key order
    columns = {
        "sample_id": pa.array([s.sample_id for s in samples], pa.string()),
        "source": pa.array([s.source for s in samples], pa.string()),
        "split": pa.array([s.split for s in samples], pa.string()),
        "segment_offset": pa.array(zeros, pa.int64()),
        "length": pa.array(zeros, pa.int64()),
        "digest": pa.array([classifier_digest(s.sample_id, [s.label(h) for h in heads])
                            for s in samples], pa.string()),
        "image": pa.array([s.image for s in samples], pa.string()),
        "text": pa.array([s.text for s in samples], pa.string()),
    }
    columns.update(tag_columns(samples))
    return table_to_bytes(pa.table(columns))


def expected_classifier_arrays(settings: StoreSettings, samples: int
                               ) -> dict[str, tuple[tuple[int, ...], str]]:
    """Array path inside a segment of `samples` samples -> (shape, dtype) the settings
    prescribe (verify)."""
    out = {}
    for head, classes in settings.heads.items():
        out[logits_array(head)] = ((samples, classes), ENCODING_DTYPES[settings.logits_encoding])
        out[labels_array(head)] = ((samples,), "int32")
    for part, width in settings.features.items():
        out[features_array(part)] = ((samples, width),
                                     ENCODING_DTYPES[settings.features_encoding])
    return out


def classifier_segment_problems(read: Callable[[str], np.ndarray], settings: StoreSettings,
                                where: str, sample_ids: list[str],
                                digests: list[str]) -> list[str]:
    """What is wrong with the values of one segment whose arrays have the expected shapes
    (`read(array path)` gives an array; `sample_ids`, `digests`: its index rows): labels
    outside -1..C-1, non-finite logits or features, digests that do not match the labels."""
    problems = []
    labels = {}
    for head, classes in settings.heads.items():
        labels[head] = read(labels_array(head)).astype(np.int64)
        bad = np.flatnonzero((labels[head] < UNLABELLED) | (labels[head] >= classes))
        if bad.size:
            problems.append(f"{where}/{labels_array(head)}: label {int(labels[head][bad[0]])} "
                            f"of sample {sample_ids[bad[0]]!r} is outside -1..{classes - 1} "
                            f"({bad.size} such)")
        if not np.all(np.isfinite(read(logits_array(head)))):
            problems.append(f"{where}/{logits_array(head)}: holds NaN or inf")
    for part in settings.features:
        if not np.all(np.isfinite(read(features_array(part)))):
            problems.append(f"{where}/{features_array(part)}: holds NaN or inf")
    for j, (sid, digest) in enumerate(zip(sample_ids, digests)):
        if classifier_digest(sid, [int(labels[h][j]) for h in sorted(labels)]) != digest:
            problems.append(f"{where}/{SEGMENT_INDEX}: digest of sample {sid!r} does not match "
                            f"its stored labels")
            break
    return problems
