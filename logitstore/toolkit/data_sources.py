"""Where data comes from: local files, globs, directories, saved and hub datasets -> raw records.

`resolve_sources(spec)` turns one ``--data`` spec into its sources in reading order and
`iter_raw_records(specs)` yields every record of them, unparsed ones included (with
`error`), so `logitstore.toolkit.data` can count and report them. The definitions of *source*
and *row* (used in sample ids) are in `logitstore.toolkit.data`'s docstring.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from logitstore.errors import LogitStoreError

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz")
JSON_SUFFIXES = (".json", ".json.gz")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES = JSONL_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES


class DataSourceError(LogitStoreError):
    """A data source that cannot be found or opened at all (bad path, unknown dataset)."""



@dataclass(frozen=True)
class HFDatasetSpec:
    name: str
    config: str | None = None
    split: str | None = None

    @property
    def label(self) -> str:
        return self.name + (f":{self.config}" if self.config else "")


def parse_hf_spec(spec: str) -> HFDatasetSpec:
    """``name[:config][@split]`` (optional ``hf:`` prefix) -> HFDatasetSpec."""
    text = spec.removeprefix("hf:")
    name_config, at, split = text.partition("@")
    name, colon, config = name_config.partition(":")
    if not name or (colon and not config) or (at and not split):
        raise DataSourceError(f"bad dataset spec {spec!r}: expected name[:config][@split]")
    return HFDatasetSpec(name, config or None, split or None)


@dataclass(frozen=True)
class DataSource:
    kind: Literal["file", "hub", "disk"]
    label: str  # source name used in sample ids (for datasets: without the split)
    path: Path | None = None
    hf: HFDatasetSpec | None = None
    split: str | None = None  # disk datasets: the split asked for


@dataclass(frozen=True)
class RawRecord:
    source: str
    row: int
    location: str  # for messages: "file:LINE" or "source[row]"
    record: object = None
    error: str | None = None  # set when the record could not even be parsed
    split: str | None = None  # the dataset split it came from


def _is_supported(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(SUPPORTED_SUFFIXES)


def _is_saved_dataset(path: Path) -> bool:
    """A directory written by Dataset.save_to_disk or DatasetDict.save_to_disk."""
    if (path / "dataset_dict.json").is_file():
        return True
    return (path / "state.json").is_file() and (path / "dataset_info.json").is_file()


def _files_under(root: Path, files: Iterable[Path]) -> list[DataSource]:
    found = sorted((f.resolve().relative_to(root.resolve()).as_posix(), f) for f in files)
    return [DataSource("file", name, path=f) for name, f in found]


def resolve_sources(spec: str | os.PathLike) -> list[DataSource]:
    """One spec -> its sources, in reading order (module docstring)."""
    text = os.fspath(spec)
    path = Path(text).expanduser()
    if text.startswith("hf:"):
        return [DataSource("hub", parse_hf_spec(text).label, hf=parse_hf_spec(text))]
    if path.is_file():
        return [DataSource("file", path.name, path=path)]
    if path.is_dir():
        if _is_saved_dataset(path):
            return [DataSource("disk", path.resolve().name, path=path)]
        sources = _files_under(path, (f for f in path.rglob("*") if _is_supported(f)))
        if not sources:
            raise DataSourceError(
                f"directory {text} holds no data files ({', '.join(SUPPORTED_SUFFIXES)})"
            )
        return sources
    if glob.has_magic(text):
        matches = [Path(m) for m in glob.glob(os.path.expanduser(text), recursive=True)]
        matches = [m for m in matches if _is_supported(m)]
        if matches:
            parts = Path(os.path.expanduser(text)).parts
            fixed = parts[: next(i for i, p in enumerate(parts) if glob.has_magic(p))]
            return _files_under(Path(*fixed) if fixed else Path("."), matches)
        if "@" not in text:  # "name@train[:100]" is a dataset split slice, not a glob
            raise DataSourceError(f"no data files match {text!r}")
    base, at, split = text.rpartition("@")
    if at and Path(base).expanduser().is_dir() and _is_saved_dataset(Path(base).expanduser()):
        base_path = Path(base).expanduser()
        return [DataSource("disk", base_path.resolve().name, path=base_path, split=split)]
    if text.startswith((".", "/", "~")) or path.suffix.lower() in {
        ".json",
        ".jsonl",
        ".parquet",
        ".gz",
    }:
        raise DataSourceError(f"data file or directory {text!r} does not exist")
    hf = parse_hf_spec(text)
    return [DataSource("hub", hf.label, hf=hf)]


def _open_bytes(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _read_jsonl_lines(source: str, lines: Iterable[bytes]) -> Iterator[RawRecord]:
    for row, raw_line in enumerate(lines):
        where = f"{source}:{row + 1}"
        if not raw_line.strip():
            continue  # blank lines (a trailing newline, say) are not records
        try:
            yield RawRecord(source, row, where, record=json.loads(raw_line.decode("utf-8")))
        except UnicodeDecodeError as exc:
            yield RawRecord(source, row, where, error=f"not UTF-8 ({exc.reason})")
        except json.JSONDecodeError as exc:
            yield RawRecord(
                source, row, where, error=f"invalid JSON ({exc.msg} at column {exc.colno})"
            )


def _read_file(src: DataSource) -> Iterator[RawRecord]:
    name = src.path.name.lower()
    if name.endswith(PARQUET_SUFFIXES):
        yield from _read_parquet(src)
        return
    with _open_bytes(src.path) as handle:
        if name.endswith(JSONL_SUFFIXES):
            yield from _read_jsonl_lines(src.label, handle)
            return
        content = handle.read()
    try:
        data = json.loads(content.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        # Many ".json" files are really JSON lines: read them as such, line by line.
        yield from _read_jsonl_lines(src.label, content.splitlines())
        return
    if isinstance(data, Mapping) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        yield RawRecord(
            src.label, 0, src.label, error='expected a list of records or {"data": [...]}'
        )
        return
    for row, record in enumerate(data):
        yield RawRecord(src.label, row, f"{src.label}[{row}]", record=record)


def _read_parquet(src: DataSource) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(src.path).iter_batches(batch_size=1024)
        row = 0
        for batch in batches:
            for record in batch.to_pylist():
                yield RawRecord(src.label, row, f"{src.label}[{row}]", record=record)
                row += 1
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        yield RawRecord(src.label, 0, src.label, error=f"unreadable parquet file ({exc})")


def _hub_state() -> str:
    import datasets

    offline = "1" if datasets.config.HF_HUB_OFFLINE else "unset/0"
    return f"datasets cache {datasets.config.HF_DATASETS_CACHE}, HF_HUB_OFFLINE={offline}"


def _load_dataset(src: DataSource):
    """A Dataset or DatasetDict for a hub or saved-to-disk source, or a clear error."""
    import datasets

    try:
        if src.kind == "disk":
            loaded = datasets.load_from_disk(str(src.path))
            if src.split is not None:
                loaded = loaded[src.split]
            return loaded
        return datasets.load_dataset(src.hf.name, src.hf.config, split=src.hf.split)
    except Exception as exc:  # datasets raises many types (FileNotFound, Connection, Value...)
        what = str(src.path) if src.kind == "disk" else f"Hugging Face dataset {src.hf.name!r}"
        detail = (
            ""
            if src.kind == "disk"
            else (f" (config {src.hf.config or 'default'}, split {src.hf.split or 'all'})")
        )
        raise DataSourceError(
            f"could not load {what}{detail}: {type(exc).__name__}: {str(exc)[:300]}. "
            f"Looked in the {_hub_state()}. To fix: check the spelling (specs are "
            "name[:config][@split]); on a machine with internet run "
            f"`hf download {src.hf.name if src.hf else 'NAME'} --repo-type dataset` and copy "
            "the Hugging Face cache here, or save the dataset with save_to_disk(DIR) and pass "
            "DIR, or export it to JSONL/Parquet and pass the file."
        ) from exc


def _read_dataset(src: DataSource) -> Iterator[RawRecord]:
    loaded = _load_dataset(src)
    if isinstance(loaded, dict):  # DatasetDict: every split, in the dict's own order
        parts = list(loaded.items())
    else:
        split = src.split or (src.hf.split if src.hf else None) or loaded.split
        parts = [(str(split) if split else None, loaded)]
    for split, dataset in parts:
        label = f"{src.label}@{split}" if split else src.label
        for row, record in enumerate(dataset):
            yield RawRecord(label, row, f"{label}[{row}]", record=record, split=split)


def repeated_sources(sources: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """Source names that more than one of the resolved `sources` would read, so that their
    rows could get the same sample id (``source:row:hash``): a file or dataset listed twice,
    two files with the same relative name, a split read twice. A dataset read without a
    split (every split) clashes with any split of the same name."""
    specs = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    seen: dict[str, set[str | None]] = {}
    repeated = []
    for src in (src for spec in specs for src in resolve_sources(spec)):
        split = src.split if src.kind == "disk" else (src.hf.split if src.hf else "")
        splits = seen.setdefault(src.label, set())
        if split in splits or (splits and (split is None or None in splits)):
            repeated.append(src.label if not split else f"{src.label}@{split}")
        splits.add(split)
    return repeated


def iter_raw_records(
    sources: str | os.PathLike | Iterable[str | os.PathLike],
) -> Iterator[RawRecord]:
    """Every record of every source, in order, unparsed ones included (with `error`)."""
    specs = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    resolved = [src for spec in specs for src in resolve_sources(spec)]  # bad paths fail first
    for src in resolved:
        yield from (_read_file(src) if src.kind == "file" else _read_dataset(src))
