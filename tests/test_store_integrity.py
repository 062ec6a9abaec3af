"""Corruption is caught by verify and by the reader, naming the file; every error is clear."""

import json
import os
import shutil

import numpy as np
import pytest

from logitstore.commit import commit_store, sealed_json
from logitstore.errors import (ChecksumError, FormatVersionError, LogitStoreError,
                               ManifestMissingError, SchemaMismatchError, SettingsMismatchError,
                               StoreNotFoundError, UnknownSampleError, UnknownSignalError)
from logitstore.format import MANIFEST, StoreSettings, TopKSpec
from logitstore.reader import StoreReader
from logitstore.verify import verify_store
from logitstore.writer import StoreWriter

from test_store_roundtrip import V, make, settings_for


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("pristine")
    s = settings_for()
    samples = make(np.random.default_rng(5), 20, s)
    with StoreWriter(str(root), s) as w:
        w.add_many(samples)
    return root, samples


def copy(pristine, tmp_path):
    dst = tmp_path / "store"
    shutil.copytree(pristine[0], dst)
    return dst


def data_files(root):
    manifest = json.loads((root / MANIFEST).read_text())
    return sorted(manifest["files"]) + [manifest["index"]["path"]]


def read_everything(root):
    r = StoreReader(str(root))
    for sid in r.sample_ids:
        r.sample(sid)
    list(r.iter_samples())


def test_pristine_store_verifies(pristine):
    assert verify_store(str(pristine[0])) == []


@pytest.mark.parametrize("trial", range(12))
def test_byte_flip_or_truncation_is_caught(pristine, tmp_path, trial):
    rng = np.random.default_rng(100 + trial)
    root = copy(pristine, tmp_path)
    files = data_files(root)
    rel = files[int(rng.integers(len(files)))]
    path = root / rel
    data = bytearray(path.read_bytes())
    if trial % 3 == 2:
        path.write_bytes(bytes(data[: int(rng.integers(0, len(data)))]))  # truncation
    else:
        pos = int(rng.integers(len(data)))
        data[pos] ^= 1 << int(rng.integers(8))  # one bit flipped
        path.write_bytes(bytes(data))
    problems = verify_store(str(root))
    assert problems and any(rel in p for p in problems), (rel, problems)
    if rel.endswith("zarr.json") and b'"group"' in (pristine[0] / rel).read_bytes():
        return  # group metadata is not needed to read arrays; verify alone must see it
    if rel.endswith("/index.parquet") and rel.startswith("parts/"):
        return  # segment index rows are consolidated in the store index at commit
    with pytest.raises(LogitStoreError) as err:
        read_everything(root)
    assert rel.rsplit("/c/", 1)[0].rsplit("/zarr.json", 1)[0] in str(err.value)


def test_missing_file_is_named(pristine, tmp_path):
    root = copy(pristine, tmp_path)
    victim = [f for f in data_files(root) if "topk_ids/c/" in f][0]
    os.remove(root / victim)
    problems = verify_store(str(root))
    assert any(victim in p and "missing" in p for p in problems)


def test_uncommitted_leftovers_are_ignored(pristine, tmp_path):
    root = copy(pristine, tmp_path)
    (root / "parts" / "part-00000" / "seg-999999").mkdir()
    (root / "parts" / "part-00000" / "seg-999999" / "junk").write_bytes(b"partial")
    (root / ".tmp-123-manifest.json").write_bytes(b"{")
    assert verify_store(str(root)) == []
    assert len(StoreReader(str(root))) == 20


def test_missing_store_and_missing_manifest(tmp_path):
    with pytest.raises(StoreNotFoundError, match="does not exist"):
        StoreReader(str(tmp_path / "nowhere"))
    (tmp_path / "running").mkdir()
    with pytest.raises(ManifestMissingError, match="still running"):
        StoreReader(str(tmp_path / "running"))
    assert isinstance(ManifestMissingError("x"), FileNotFoundError)  # builtin still catches it


def test_unknown_major_version_names_both(pristine, tmp_path):
    root = copy(pristine, tmp_path)
    manifest = json.loads((root / MANIFEST).read_text())
    manifest["format_version"] = "2.3"
    (root / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(FormatVersionError, match=r"2\.3.*expected major version 1"):
        StoreReader(str(root))
    manifest["format_version"] = "1.7"  # a newer minor is readable (once sealed again:
    (root / MANIFEST).write_bytes(sealed_json(manifest))  # any hand edit breaks the seal)
    assert len(StoreReader(str(root))) == 20


def test_unknown_sample_and_signal(pristine):
    r = StoreReader(str(pristine[0]))
    with pytest.raises(UnknownSampleError, match="'nope' is not in"):
        r.sample("nope")
    with pytest.raises(UnknownSampleError, match="out of range"):
        r.sample(10_000)
    with pytest.raises(UnknownSignalError, match=r"\['qwen'\] not in"):
        r.sample(0, signals=["qwen"])
    with pytest.raises(KeyError):  # also a KeyError, as callers expect of lookups
        r.sample("nope")


def test_different_settings_refused(pristine, tmp_path):
    root = copy(pristine, tmp_path)
    s = settings_for()
    other = StoreSettings(**{**s.__dict__, "signals": {"teacher": s.signals["teacher"].__class__(
        **{**s.signals["teacher"].__dict__, "topk": TopKSpec(8)})}})
    with pytest.raises(SettingsMismatchError, match=r"signals\.teacher\.topk\.k: store has 4, "
                                                     r"writer has 8"):
        StoreWriter(str(root), other, part="rank1")
    with StoreWriter(str(root), other, part="rank1", overwrite=True) as w:  # explicit replace
        w.add_many(make(np.random.default_rng(0), 2, other))
    assert len(StoreReader(str(root))) == 2


def test_parts_with_different_k_refused_at_commit(tmp_path):
    a = settings_for(k=4)
    b = settings_for(k=5)
    with StoreWriter(str(tmp_path), a, part="p0", commit_store=False) as w:
        w.add_many(make(np.random.default_rng(0), 3, a))
    # Simulate a part written elsewhere with other settings and copied in.
    other = tmp_path.parent / "other"
    with StoreWriter(str(other), b, part="p1", commit_store=False) as w:
        w.add_many(make(np.random.default_rng(1), 3, b))
    shutil.copytree(other / "parts" / "p1", tmp_path / "parts" / "p1")
    with pytest.raises(SchemaMismatchError, match="different settings.*topk.k"):
        commit_store(str(tmp_path))


def test_bad_samples_are_refused_with_reasons(tmp_path):
    s = settings_for(k=2, n_draws=4, hidden=None, attention=None)
    good = make(np.random.default_rng(0), 1, s, lengths=[3])[0]
    with StoreWriter(str(tmp_path), s) as w:
        w.add(good)
        with pytest.raises(SchemaMismatchError, match="already written"):
            w.add(good)
        bad = make(np.random.default_rng(1), 1, s, lengths=[3])[0]
        bad.sample_id = "bad"
        bad.input_ids = bad.input_ids + V
        with pytest.raises(SchemaMismatchError, match=r"token ids must be in \[0, 300\)"):
            w.add(bad)
        bad = make(np.random.default_rng(1), 1, s, lengths=[3])[0]
        bad.sample_id = "bad2"
        bad.signals["teacher"].sampled.counts[0] += 1
        with pytest.raises(SchemaMismatchError, match="sum to .*expected n_draws=4"):
            w.add(bad)
        bad.tags = {"offset": 3}
        with pytest.raises(SchemaMismatchError, match="reserved"):
            w.add(bad)
    assert StoreReader(str(tmp_path)).sample_ids == [good.sample_id]


def test_complete_part_cannot_be_appended(pristine, tmp_path):
    root = copy(pristine, tmp_path)
    with pytest.raises(LogitStoreError, match="is complete"):
        StoreWriter(str(root), settings_for())
    with pytest.raises(ChecksumError):  # a damaged manifest is reported, not a bare traceback
        (root / MANIFEST).write_text("{not json")
        StoreReader(str(root))
