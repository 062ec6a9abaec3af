"""Read a classifier store (format 2.3, FORMAT.md section 4.3): per-sample head logits,
pooled features and labels, by sample or as whole arrays of one split.

    reader = ClassifierReader(url)            # or ClassifierReader(StoreReader(url))
    reader.heads, reader.features             # {"modality": 5, ...}, {"image_cls": 768, ...}
    one = reader.sample("3f2a...")            # ClassifierSample, by id or position
    for sample in reader.iter_samples(split="train"): ...
    train = reader.arrays("train")            # ClassifierArrays: numpy, float32 values
    train.logits["modality"]                  # [N, 5]; train.labels["modality"] [N] int32

It reads through a StoreReader (logitstore/reader.py), so it sees the committed state
only and every read is checked the same way (crc32c per chunk, listed files present, the
index against its sha256). Given a causal-lm store it raises StoreKindError naming the kind.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from logitstore.classifier_sample import (REFERENCE_COLUMNS, ClassifierSample, features_array,
                                          labels_array, logits_array, require_kind)
from logitstore.errors import UnknownSampleError
from logitstore.format import CLASSIFIER, INDEX_COLUMNS
from logitstore.reader import StoreReader

_FIXED_COLUMNS = set(INDEX_COLUMNS) | set(REFERENCE_COLUMNS)


@dataclass
class ClassifierArrays:
    """The samples of one split (or all), in store order, as whole arrays."""

    sample_ids: list[str]
    images: list[str]
    texts: list[str]
    splits: list[str]
    sources: list[str]  # the data source each was read from (teacher-dump: its absolute path)
    logits: dict[str, np.ndarray]  # head -> [N, C] float32
    features: dict[str, np.ndarray]  # part -> [N, D] float32
    labels: dict[str, np.ndarray]  # head -> [N] int32, -1 = unlabelled

    def __len__(self) -> int:
        return len(self.sample_ids)


class ClassifierReader:
    """A committed classifier store at any fsspec URL (or an open StoreReader of one)."""

    def __init__(self, store: str | StoreReader, **reader_options: Any):
        self.store = store if isinstance(store, StoreReader) else \
            StoreReader(store, **reader_options)
        self.settings = self.store.settings
        require_kind(self.settings, CLASSIFIER, "ClassifierReader", self.store.fs.url)
        self.index = self.store.index
        self.sample_ids = self.store.sample_ids
        self._splits = self.index.column("split").to_pylist()

    @property
    def heads(self) -> dict[str, int]:
        return dict(self.settings.heads)

    @property
    def features(self) -> dict[str, int]:
        return dict(self.settings.features)

    def __len__(self) -> int:
        return len(self.sample_ids)

    def split_counts(self) -> dict[str, int]:
        """{split: samples}, in name order."""
        return dict(sorted(Counter(self._splits).items()))

    def _column(self, name: str, row: int) -> Any:
        return self.index.column(name)[row].as_py()

    def tags(self, row: int) -> dict[str, Any]:
        return {c: self._column(c, row) for c in self.index.column_names
                if c not in _FIXED_COLUMNS and self._column(c, row) is not None}

    def _segment_arrays(self, seg_no: int, start: int | None = None, stop: int | None = None
                        ) -> tuple[dict, dict, dict]:
        """(logits, features, labels) of the segment's samples [start, stop) (all: None)."""
        seg = self.store.segments[seg_no]
        read = self.store._read  # checked reads: missing files and bad chunks named

        def floats(name: str) -> np.ndarray:
            return read(seg, name, start, stop).astype(np.float32)

        logits = {h: floats(logits_array(h)) for h in self.settings.heads}
        features = {p: floats(features_array(p)) for p in self.settings.features}
        labels = {h: read(seg, labels_array(h), start, stop).astype(np.int32)
                  for h in self.settings.heads}
        return logits, features, labels

    def _sample(self, row: int, logits: dict, features: dict, labels: dict,
                j: int) -> ClassifierSample:
        return ClassifierSample(
            sample_id=self.sample_ids[row], logits={h: a[j] for h, a in logits.items()},
            features={p: a[j] for p, a in features.items()},
            labels={h: int(a[j]) for h, a in labels.items()},
            image=self._column("image", row), text=self._column("text", row),
            source=self._column("source", row), split=self._splits[row], tags=self.tags(row))

    def sample(self, key: str | int) -> ClassifierSample:
        """One sample by id or by position in store order (reads only its chunks)."""
        row = self.store.row(key)
        seg_no = int(self.store._seg_of_row[row])
        pos = row - self.store.segments[seg_no].first_sample
        return self._sample(row, *self._segment_arrays(seg_no, pos, pos + 1), 0)

    def read_segment(self, seg_no: int) -> list[ClassifierSample]:
        """Every sample of one segment, from whole shards."""
        seg = self.store.segments[seg_no]
        arrays = self._segment_arrays(seg_no)
        return [self._sample(seg.first_sample + j, *arrays, j) for j in range(seg.samples)]

    def iter_samples(self, split: str | None = None) -> Iterator[ClassifierSample]:
        """Every sample (of `split`) in store order, a segment at a time."""
        self._check_split(split)
        for seg_no, seg in enumerate(self.store.segments):
            rows = self._splits[seg.first_sample:seg.first_sample + seg.samples]
            if split is None or split in rows:
                yield from (s for s in self.read_segment(seg_no)
                            if split is None or s.split == split)

    def _check_split(self, split: str | None) -> None:
        if split is not None and split not in self.split_counts():
            raise UnknownSampleError(f"split {split!r} is not in {self.store.fs.url}; it holds "
                                     f"{self.split_counts()}")

    def arrays(self, split: str | None = None) -> ClassifierArrays:
        """The samples of `split` (None: all), in store order, as whole arrays; reads the
        segments that hold any of them, each whole."""
        self._check_split(split)
        picked: list[tuple[np.ndarray, tuple[dict, dict, dict]]] = []
        rows_all = []
        for seg_no, seg in enumerate(self.store.segments):
            rows = np.arange(seg.first_sample, seg.first_sample + seg.samples)
            if split is not None:
                rows = rows[[self._splits[r] == split for r in rows]]
            if len(rows):
                picked.append((rows - seg.first_sample, self._segment_arrays(seg_no)))
                rows_all.extend(rows.tolist())

        def gather(which: int, names, width) -> dict[str, np.ndarray]:
            return {n: np.concatenate([arrays[which][n][local] for local, arrays in picked])
                    if picked else np.zeros((0,) + width(n), np.float32 if which < 2
                                            else np.int32) for n in names}

        settings = self.settings
        column = {c: self.index.column(c).to_pylist() for c in (*REFERENCE_COLUMNS, "source")}
        return ClassifierArrays(
            sample_ids=[self.sample_ids[r] for r in rows_all],
            images=[column["image"][r] for r in rows_all],
            texts=[column["text"][r] for r in rows_all],
            splits=[self._splits[r] for r in rows_all],
            sources=[column["source"][r] for r in rows_all],
            logits=gather(0, settings.heads, lambda h: (settings.heads[h],)),
            features=gather(1, settings.features, lambda p: (settings.features[p],)),
            labels=gather(2, settings.heads, lambda h: ()))


def classifier_info_lines(reader: ClassifierReader, sizes: dict[str, Any]) -> list[str]:
    """The part of `logitstore info` specific to a classifier store: heads, feature parts,
    samples per split and labelled samples per head, stored bytes per array and sample."""
    settings = reader.settings
    samples = max(1, len(reader))
    lines = [f"heads        " + ", ".join(f"{h} ({c} classes)" for h, c in settings.heads.items())
             + f"; logits {settings.logits_encoding}",
             f"features     " + (", ".join(f"{p} ({d})" for p, d in settings.features.items())
                                 or "-") + f"; {settings.features_encoding}",
             f"splits       " + (", ".join(f"{s} {n}" for s, n in reader.split_counts().items())
                                 or "-")]
    labelled = {h: 0 for h in settings.heads}
    for seg in reader.store.segments:  # the label arrays only
        for head in settings.heads:
            labelled[head] += int((reader.store._read(seg, labels_array(head)) >= 0).sum())
    lines.append("labelled     " + ", ".join(f"{h} {n}/{len(reader)}"
                                              for h, n in labelled.items()))
    lines.append("arrays:")
    lines += [f"  {name:40s} {a['bytes'] / 1e6:9.3f} MB  {a['bytes'] / samples:9.1f} B/sample  "
              f"{a['compression_ratio']:5.1f}x" for name, a in sizes["arrays"].items()]
    return lines
