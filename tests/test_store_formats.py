"""Stores of format 1.0 and 1.1 still read, verify and copy; a missing file is refused.

tests/data/store-1.1 was written by the logitstore of format 1.1 (tests/data/README.md);
a 1.0 store is made from it by removing the seals. A committed file that is absent is
refused naming it, by the reader (never read as zeros), by verify and by the CLI.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from store_helpers import (assert_sample_matches, content_differences, content_of,
                           make_samples, make_settings, make_signal)

from logitstore.cli import main as cli
from logitstore.commit import commit_store
from logitstore.errors import LogitStoreError, MissingFileError
from logitstore.format import MANIFEST
from logitstore.reader import StoreReader
from logitstore.transfer import copy_store
from logitstore.verify import verify_store
from logitstore.writer import StoreWriter

OLD = Path(__file__).with_name("data") / "store-1.1"
OLD_SETTINGS = make_settings(segment_tokens=20, signals={"teacher": make_signal(
    k=2, n_draws=4, hidden=(1, 2), attention=None)})
OLD_SAMPLES = make_samples(8, 11, OLD_SETTINGS, max_len=20)


@pytest.fixture
def old(tmp_path) -> Path:
    root = tmp_path / "old"
    shutil.copytree(OLD, root)
    return root


def test_store_of_format_1_1_reads_verifies_and_copies(old, tmp_path):
    reader = StoreReader(str(old))
    assert reader.manifest["format_version"] == "1.1" and len(reader.segments) == 4
    assert sorted(reader.sample_ids) == sorted(s.sample_id for s in OLD_SAMPLES)
    for sample in OLD_SAMPLES:
        assert_sample_matches(sample, reader.sample(sample.sample_id), OLD_SETTINGS)
    assert verify_store(str(old)) == []
    info = CliRunner().invoke(cli, ["info", str(old)])
    assert info.exit_code == 0 and "1.1" in info.output and "8 samples" in info.output
    copy = tmp_path / "copy"
    copy_store(str(old), str(copy))  # copied as it is: still format 1.1
    assert (copy / MANIFEST).read_bytes() == (old / MANIFEST).read_bytes()
    assert verify_store(str(copy)) == []
    assert not content_differences(content_of(StoreReader(str(copy))), content_of(reader))


def test_store_of_format_1_0_without_seals_reads_and_verifies(old):
    for rel in (MANIFEST, "parts/p0/manifest.json", "parts/p1/manifest.json"):
        doc = json.loads((old / rel).read_text())
        doc.pop("manifest_sha256")
        doc.pop("part_manifests", None)
        doc["format_version"] = "1.0"
        (old / rel).write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    assert verify_store(str(old)) == []
    assert len(StoreReader(str(old))) == 8
    os.remove(old / "parts/p1/manifest.json")  # copies made by 1.0's `cp` had none
    assert verify_store(str(old)) == []


def test_writing_into_a_1_1_store_is_refused_with_the_reason(old):
    before = {p: p.read_bytes() for p in old.rglob("*") if p.is_file()}
    for part in ("p0", "p9"):
        with pytest.raises(LogitStoreError, match="format 1.1; this release reads it"):
            StoreWriter(str(old), OLD_SETTINGS, part=part)
    with pytest.raises(LogitStoreError, match="format 1.1; this release reads it"):
        commit_store(str(old))
    assert {p: p.read_bytes() for p in old.rglob("*") if p.is_file()} == before


# -- a committed file that is missing ----------------------------------------------------

def _shard(root: Path, reader: StoreReader, segment: int, array: str = "input_ids") -> str:
    rel = next(f for f in reader.manifest["files"]
               if f.startswith(f"{reader.segments[segment].path}/{array}/c"))
    assert (root / rel).is_file()
    return rel


@pytest.mark.parametrize("store", ["1.1", "2.0"])
def test_missing_shard_is_refused_naming_it_never_read_as_zeros(old, tmp_path, store):
    if store == "2.0":
        old = tmp_path / "new"
        with StoreWriter(str(old), OLD_SETTINGS) as writer:
            writer.add_many(OLD_SAMPLES)
    reader = StoreReader(str(old))
    rel = _shard(old, reader, 1)
    victim = reader.sample_ids[reader.segments[1].first_sample]
    os.remove(old / rel)
    for read in (lambda r: r.sample(victim), lambda r: r.read_segment(1)):
        with pytest.raises(MissingFileError) as err:
            read(StoreReader(str(old)))  # opens: the consolidated state names no missing file
        assert rel in str(err.value) and "is missing" in str(err.value)
        assert "\n" not in str(err.value) and err.value.path == rel
    assert StoreReader(str(old)).sample(reader.sample_ids[0]).sample_id  # others still read
    problems = verify_store(str(old))
    assert any(rel in p and "missing" in p for p in problems), problems
    show = CliRunner().invoke(cli, ["show", str(old), victim])
    assert show.exit_code == 1 and rel in show.output and "Traceback" not in show.output


def test_missing_file_of_an_unconsolidated_segment_is_refused_at_open(tmp_path):
    """Segments a running writer committed after the last consolidation are read at open
    (record and sample index): one of them missing refuses the open, naming it."""
    root = tmp_path / "store"
    writer = StoreWriter(str(root), OLD_SETTINGS)  # a single writer: readers follow it
    writer.add_many(OLD_SAMPLES[:6])
    reader = StoreReader(str(root))
    assert 0 < len(reader) <= 6 and len(reader.segments) >= 2
    assert reader.manifest["index"]["path"] is None  # nothing consolidated yet
    for rel in (f"{reader.segments[1].path}/index.parquet", "parts/part-00000/records/"
                                                            "seg-000001.json"):
        saved = (root / rel).read_bytes()
        os.remove(root / rel)
        with pytest.raises(MissingFileError, match="is missing") as err:
            StoreReader(str(root))
        assert err.value.path == rel and rel in str(err.value)
        result = CliRunner().invoke(cli, ["verify", str(root)])
        assert result.exit_code == 1 and rel in result.output
        (root / rel).write_bytes(saved)
    assert verify_store(str(root)) == []
    writer.add_many(OLD_SAMPLES[6:])
    writer.close()
    after = StoreReader(str(root))
    assert after.manifest["index"]["path"] is not None and len(after) == 8
    np.testing.assert_array_equal(after.sample(OLD_SAMPLES[7].sample_id).input_ids,
                                  OLD_SAMPLES[7].input_ids)
