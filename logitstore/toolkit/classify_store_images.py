"""Where the image files of a classifier store's samples are, for every tool that reads them.

    paths = resolve_store_images(reader.arrays("train"), data_root=None,
                                 needed_by="student (run/final)", where="store S split 'train'",
                                 fix="give --data-root, the directory teacher-dump read from")

A classifier store keeps each sample's `image` as teacher-dump wrote it: relative to the data
source it read the record from (a JSONL file's directory, or the imagefolder directory itself,
the same base `read_classify_records` resolves a record's path from), or absolute when the file
was outside that base; "" for a text-only sample. `store_image_path` states the rule that turns
one reference back into a file; `resolve_store_images` applies it to a split and, when a model
reads the images, refuses the split in one paragraph if any file is missing, naming the first
few with the sample id and data source of each. No torch here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from logitstore.errors import LogitStoreError

MISSING_SHOWN = 5  # missing images quoted in the error


def store_image_path(image: str | None, source: str | None,
                     data_root: str | os.PathLike | None = None) -> Path | None:
    """The file of a stored `image` reference: None for "" (a text-only sample); an absolute
    path as is; a relative one under `data_root` when given, else beside its data `source`
    (inside it when it is a directory: an imagefolder; else in its parent: a JSONL file), else
    under the current directory."""
    if not image:
        return None
    path = Path(image)
    if path.is_absolute():
        return path
    if data_root is not None:
        return Path(data_root) / path
    if source:
        origin = Path(source)
        return (origin if origin.is_dir() else origin.parent) / path
    return Path.cwd() / path


def resolve_data_root(data_root: str | os.PathLike | None, reader) -> Path | None:
    """Where relative image references start: `data_root` when given (--data-root), else
    the `data_root` the store records in its manifest's `extra` (a writer may record it),
    else None (each sample's data source: store_image_path). `reader`: a ClassifierReader."""
    if data_root:
        return Path(data_root)
    recorded = (reader.store.manifest.get("extra") or {}).get("data_root")
    return Path(recorded) if recorded else None


def resolve_store_images(arrays, *, data_root: str | os.PathLike | None = None,
                         needed_by: str | None = None, where: str = "the store",
                         fix: str = "") -> list[Path | None]:
    """[N] files of the samples of `arrays` (a ClassifierArrays: .images, .sources,
    .sample_ids), by `store_image_path`. With `needed_by` (what reads the images, e.g.
    "student (run/final)"), a missing file or a sample without an image raises
    LogitStoreError: `where` names the split, `fix` says how to point at the files."""
    paths = [store_image_path(image, source, data_root)
             for image, source in zip(arrays.images, arrays.sources)]
    if needed_by:
        missing = _missing(paths, arrays.sample_ids, arrays.sources)
        if missing:
            shown = "; ".join(missing[:MISSING_SHOWN])
            more = f"; and {len(missing) - MISSING_SHOWN} more" if len(missing) > MISSING_SHOWN \
                else ""
            base = data_root if data_root is not None else \
                "beside each sample's data source (as teacher-dump recorded it)"
            raise LogitStoreError(
                f"{where}: {len(missing)} of {len(paths)} images are missing, e.g. {shown}{more}."
                f" The {needed_by} reads every image, and relative image paths were read from "
                f"{base}: expected every image of the store's records to exist"
                + (f"; {fix}" if fix else ""))
    return paths


def _missing(paths: Sequence[Path | None], sample_ids: Sequence[str],
             sources: Sequence[str]) -> list[str]:
    """One line per sample whose image file is absent: path, sample id and data source."""
    out = []
    for path, sample_id, source in zip(paths, sample_ids, sources):
        origin = f"sample {sample_id[:12]}, from {source or 'an unrecorded data source'}"
        if path is None:
            out.append(f"no image ({origin})")
        elif not path.is_file():
            out.append(f"{path} ({origin})")
    return out
