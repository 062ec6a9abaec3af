"""`logitstore subset SRC DST`: a new store holding the samples of SRC that a filter selects,
with every signal (top-k, sampled, hidden, attention); from a classifier store (format 2.3)
with every head's logits, the features, labels and input reference (`image`, `text`).

    result = subset_store("store/", "val/", split="validation", where=[("lang", "en")])

Filters, all optional and combined with AND:

- `split`: the sample's split equals it.
- `where`: (tag, value) pairs; the value text is read as the tag column's type in the
  sample index (integer, float, boolean: true/false/1/0/yes/no, or string) and compared
  for equality; a sample without the tag does not match. `source` and `split` (and a
  classifier store's `image` and `text`) may be used as tags too. An unknown tag, or a
  value that is not of the tag's type, is refused.
- `ids`: the sample ids to keep (`read_id_file` reads one per line). Ids the store does
  not hold are refused, naming some.
- `fraction` with `seed`: a sample is kept when the first 8 bytes of
  sha256(f"{seed}\\0{sample_id}"), read as a big-endian integer, are below
  `fraction * 2**64`: deterministic, and independent of store order, parts and segments
  (the same id is kept from any copy of the store), so it also selects consistently
  across stores holding the same ids.

The output keeps the source's order and settings, and is written, resumed and verified as
`logitstore.copy_samples` describes.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Iterable

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from logitstore.classifier_sample import REFERENCE_COLUMNS
from logitstore.copy_samples import (CopyPlan, CopyResult, SourceSelection, canonical_digest,
                                     execute_plan, open_sources, stored_tokenizer_files)
from logitstore.errors import LogitStoreError, UnknownSampleError
from logitstore.format import CLASSIFIER, INDEX_COLUMNS
from logitstore.reader import StoreReader

FILTERABLE = ("source", "split")  # index columns usable as --where tags besides the tags
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def subset_store(src: str, dst: str, *, split: str | None = None,
                 where: Iterable[tuple[str, str]] = (), ids: list[str] | None = None,
                 ids_label: str | None = None, fraction: float | None = None, seed: int = 0,
                 src_options: dict | None = None, dst_options: dict | None = None,
                 overwrite: bool = False,
                 progress: Callable[[int], None] | None = None) -> CopyResult:
    """Write the samples of `src` selected by the filters (module docstring) to `dst`;
    returns what was written, with `problems` from verifying it. `ids_label` names where
    `ids` came from, for the provenance record."""
    (reader,) = open_sources([src], src_options)
    plan = plan_subset(src, reader, split=split, where=list(where), ids=ids,
                       ids_label=ids_label, fraction=fraction, seed=seed)
    return execute_plan(plan, dst, dst_options=dst_options, overwrite=overwrite,
                        progress=progress)


def plan_subset(url: str, reader: StoreReader, *, split: str | None,
                where: list[tuple[str, str]], ids: list[str] | None, ids_label: str | None,
                fraction: float | None, seed: int) -> CopyPlan:
    keep = np.ones(len(reader), dtype=bool)
    record: dict[str, Any] = {}
    if split is not None:
        keep &= _equal_mask(reader.index.column("split"), split)
        record["split"] = split
    for tag, text in where:
        column = _tag_column(reader, url, tag)
        value = typed_value(tag, text, column.type)
        keep &= _equal_mask(column, value)
        record.setdefault("where", []).append([tag, value])
    if ids is not None:
        keep &= id_mask(reader, url, ids, ids_label)
        record["ids"] = {"count": len(set(ids)), "sha256": canonical_digest(ids)}
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise LogitStoreError(f"--fraction must be in (0, 1], found {fraction}")
        keep &= fraction_mask(reader.sample_ids, fraction, seed)
        record["fraction"], record["seed"] = fraction, seed
    selection = SourceSelection(url, reader, np.flatnonzero(keep).astype(np.int64))
    counts = {"samples_in": len(reader), "samples_out": int(keep.sum()), "duplicates": 0,
              "tokens_out": selection.tokens()}
    return CopyPlan(command="subset", sources=[selection], settings=reader.settings,
                    filter=record, counts=counts,
                    notes={"ids_file": ids_label} if ids is not None else {},
                    tokenizer_files=stored_tokenizer_files(reader))


def _equal_mask(column: pa.ChunkedArray, value: Any) -> np.ndarray:
    """True where `column` equals `value` (nulls never match)."""
    equal = pc.equal(column, pa.scalar(value, type=column.type))
    return pc.fill_null(equal, False).to_numpy(zero_copy_only=False).astype(bool)


def _tag_column(reader: StoreReader, url: str, tag: str) -> pa.ChunkedArray:
    names = reader.index.column_names
    # a classifier store's input reference columns are filterable, not tags
    reference = REFERENCE_COLUMNS if reader.settings.kind == CLASSIFIER else ()
    tags = [c for c in names if c not in INDEX_COLUMNS + reference]
    if tag not in names or (tag in INDEX_COLUMNS and tag not in FILTERABLE):
        raise LogitStoreError(f"--where {tag}=...: {url} has no tag {tag!r}; its tags are "
                              f"{tags or 'none'} (and {', '.join(FILTERABLE + reference)})")
    return reader.index.column(tag)


def typed_value(tag: str, text: str, kind: pa.DataType) -> Any:
    """`text` read as a value of the arrow type `kind`; LogitStoreError when it is not."""
    expected = None
    if pa.types.is_boolean(kind):
        if text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        expected = "a boolean (true/false, 1/0, yes/no)"
    elif pa.types.is_integer(kind):
        try:
            return int(text)
        except ValueError:
            expected = "an integer"
    elif pa.types.is_floating(kind):
        try:
            return float(text)
        except ValueError:
            expected = "a number"
    elif pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return text
    else:
        raise LogitStoreError(f"--where {tag}={text}: tag {tag!r} holds {kind} values, which "
                              f"--where cannot compare (it compares strings, numbers and "
                              f"booleans)")
    raise LogitStoreError(f"--where {tag}={text}: tag {tag!r} holds {kind} values, so the "
                          f"value must be {expected}, found {text!r}")


def id_mask(reader: StoreReader, url: str, ids: list[str], label: str | None) -> np.ndarray:
    wanted = set(ids)
    unknown = sorted(wanted - set(reader.sample_ids))
    if unknown:
        raise UnknownSampleError(
            f"{len(unknown)} of the {len(wanted)} ids in {label or 'the id list'} are not in "
            f"{url} (e.g. {unknown[:5]}); it holds {len(reader)} samples (e.g. "
            f"{reader.sample_ids[:3]}). Give ids of this store, one per line")
    return np.fromiter((sid in wanted for sid in reader.sample_ids), dtype=bool,
                       count=len(reader))


def fraction_mask(sample_ids: list[str], fraction: float, seed: int) -> np.ndarray:
    """The module docstring's hash rule for each id (order-independent)."""
    limit = min(int(fraction * 2**64), 2**64)
    prefix = f"{seed}\0".encode("utf-8")
    return np.fromiter(
        (int.from_bytes(hashlib.sha256(prefix + sid.encode("utf-8")).digest()[:8], "big") < limit
         for sid in sample_ids), dtype=bool, count=len(sample_ids))


def read_id_file(url: str) -> list[str]:
    """Sample ids from a text file (local path or fsspec URL): one per line, surrounding
    whitespace stripped, blank lines skipped."""
    with fsspec.open(url, "rt", encoding="utf-8") as handle:
        ids = [line.strip() for line in handle]
    ids = [sid for sid in ids if sid]
    if not ids:
        raise LogitStoreError(f"{url} holds no sample id; expected one sample id per line")
    return ids
