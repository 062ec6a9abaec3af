"""Corruption is caught by verify and by the reader, naming the file; every error is clear."""

import hashlib
import json
import os
import re
import shutil
import uuid

import fsspec
import numpy as np
import pytest
from click.testing import CliRunner

import logitstore.fs as fs_module
from logitstore.cli import main as cli

from logitstore.commit import commit_store, sealed_json
from logitstore.errors import (ChecksumError, FormatVersionError, LogitStoreError,
                               ManifestMissingError, SchemaMismatchError, SettingsMismatchError,
                               StoreIOError, StoreNotFoundError, UnknownSampleError,
                               UnknownSignalError)
from logitstore.format import MANIFEST, StoreSettings, TopKSpec
from logitstore.reader import StoreReader
from logitstore.verify import verify_store
from logitstore.writer import StoreWriter

from store_helpers import make_samples, make_settings, make_signal, store_files
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
    """Every file a reader reads: the data files, the consolidated index and catalog."""
    manifest = json.loads((root / MANIFEST).read_text())
    return sorted(StoreReader(str(root)).manifest["files"]) + [manifest["index"]["path"],
                                                              manifest["catalog"]["path"]]


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
    for other in ("3.1", "1.7"):  # another major; a 1.x the 1.x line never had
        manifest["format_version"] = other  # sealed, as its writer would: an unsealed hand
        (root / MANIFEST).write_bytes(sealed_json(manifest))  # edit is damage (seal first)
        with pytest.raises(FormatVersionError, match=rf"{other}.*expected major version 2"):
            StoreReader(str(root))
    manifest["format_version"] = "2.7"  # a newer minor is readable (once sealed again:
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


# -- every file of a committed store --------------------------------------------------------

def _kind(rel: str, manifest: dict) -> str:
    if rel == MANIFEST:
        return "store manifest"
    if rel == manifest["index"]["path"]:
        return "store index"
    if rel == manifest["catalog"]["path"]:
        return "catalog"
    if rel.endswith("/head.json"):
        return "part head"
    if "/records/" in rel:
        return "segment record"
    if rel.endswith("/index.parquet"):
        return "segment index"
    if rel.endswith("zarr.json"):
        return "zarr metadata"
    return "shard"


KINDS = ["store manifest", "store index", "catalog", "part head", "segment record",
         "segment index", "zarr metadata", "shard"]


@pytest.fixture(scope="module")
def two_parts(tmp_path_factory):
    """A small committed store of two parts (two segments each), free metadata in `extra`."""
    root = tmp_path_factory.mktemp("two_parts") / "store"
    s = make_settings(segment_tokens=40, signals={"teacher": make_signal(hidden=None,
                                                                         attention=(1, 1, 2))})
    samples = make_samples(8, 3, s)
    for part, chunk in (("p0", samples[:4]), ("p1", samples[4:])):
        with StoreWriter(str(root), s, part=part, commit_store=False) as w:
            w.add_many(chunk)
    commit_store(str(root), extra={"teacher_dump_config": {"model": "tiny", "lr": 0.5}})
    assert verify_store(str(root)) == []
    manifest = json.loads((root / MANIFEST).read_text())
    files = sorted(store_files(root))
    assert {_kind(f, manifest) for f in files} == set(KINDS)
    return root, files, manifest


def _letter_in_a_string(data: bytes, rng) -> int | None:
    """Position of an ASCII letter inside a JSON string: flipping its case bit keeps the
    JSON valid, so only a checksum can tell."""
    spots = [m.start() + 1 + i for m in re.finditer(rb'"[^"\\]*"', data)
             for i, c in enumerate(m.group()[1:-1]) if chr(c).isalpha()]
    return int(rng.choice(spots)) if spots else None


@pytest.mark.parametrize("damage", ["flip", "truncate"])
@pytest.mark.parametrize("kind", KINDS)
def test_every_file_damaged_makes_verify_exit_1_naming_it(two_parts, tmp_path, kind, damage):
    root, files, manifest = two_parts
    victims = [f for f in files if _kind(f, manifest) == kind]
    missed = []
    for n, rel in enumerate(victims):
        copy_root = tmp_path / f"{n}"
        shutil.copytree(root, copy_root)
        path = copy_root / rel
        data = bytearray(path.read_bytes())
        rng = np.random.default_rng([n, len(data)])
        if damage == "truncate":
            # a lost last byte (the JSON files' final newline: still valid JSON) or half
            path.write_bytes(bytes(data[:len(data) - 1 if n % 2 == 0 else len(data) // 2]))
        else:
            pos = _letter_in_a_string(data, rng) if rel.endswith(".json") else None
            if pos is not None:
                data[pos] ^= 0x20  # case bit: the JSON stays valid
            else:
                data[int(rng.integers(len(data)))] ^= 1 << int(rng.integers(8))
            path.write_bytes(bytes(data))
        result = CliRunner().invoke(cli, ["verify", str(copy_root)])
        if result.exit_code != 1 or rel not in result.output or "Traceback" in result.output:
            missed.append((rel, result.exit_code, result.output[-300:]))
        shutil.rmtree(copy_root)
    assert not missed, missed


def test_flip_in_free_metadata_and_in_part_manifest(two_parts, tmp_path):
    """The issue's two examples: valid JSON after the flip, caught by the seals."""
    root, _, _ = two_parts
    for rel, needle in ((MANIFEST, b'"tiny"'), ("parts/p1/head.json", b'"p1"'),
                        ("parts/p0/records/seg-000001.json", b'"p0"')):
        store = tmp_path / rel.replace("/", "_")
        shutil.copytree(root, store)
        data = (store / rel).read_bytes()
        assert needle in data
        (store / rel).write_bytes(data.replace(needle, needle.upper(), 1))
        json.loads((store / rel).read_text())  # still valid JSON
        problems = verify_store(str(store))
        assert problems and all(rel in p for p in problems), problems
        if rel == MANIFEST:
            with pytest.raises(ChecksumError, match="manifest_sha256"):
                StoreReader(str(store))


def test_flipped_bit_in_major_version_is_damage_not_another_version(two_parts, tmp_path):
    """'2' -> '0' in format_version of a sealed manifest: the seal no longer matches, so it
    is damage naming the file, not a store of another major version."""
    root, _, _ = two_parts
    for rel in (MANIFEST, "parts/p1/head.json", "parts/p1/records/seg-000000.json"):
        store = tmp_path / rel.replace("/", "_")
        shutil.copytree(root, store)
        data = (store / rel).read_bytes()
        needle = b'"format_version": "2.'
        assert data.count(needle) == 1
        pos = data.index(needle) + len(needle) - 2
        flipped = bytearray(data)
        flipped[pos] ^= 2  # ASCII '2' -> '0': major version 0
        (store / rel).write_bytes(bytes(flipped))
        assert json.loads((store / rel).read_text())["format_version"].startswith("0.")
        result = CliRunner().invoke(cli, ["verify", str(store)])
        assert result.exit_code == 1, result.output
        # (a consolidated record is checked against the sha256 the catalog records)
        seal = "sha256" if "/records/" in rel else "manifest_sha256"
        assert f"DAMAGED {store / rel}: {seal}" in result.output, result.output
        assert "Traceback" not in result.output and "major version" not in result.output
        if rel == MANIFEST:
            with pytest.raises(ChecksumError, match=f"{re.escape(str(store / rel))}: "
                                                    f"manifest_sha256"):
                StoreReader(str(store))


def test_seal_is_documented_procedure(two_parts):
    """FORMAT.md section 5, done by hand: blank the 64 digits of manifest_sha256, hash."""
    root, _, _ = two_parts
    for rel in (MANIFEST, "parts/p0/head.json", "parts/p0/records/seg-000000.json"):
        raw = (root / rel).read_bytes()
        seal = json.loads(raw)["manifest_sha256"]
        assert hashlib.sha256(raw.replace(seal.encode(), b"0" * 64)).hexdigest() == seal
    # FORMAT.md section 7: the records of a part form a hash chain ending at its head
    for part in ("p0", "p1"):
        head = json.loads((root / f"parts/{part}/head.json").read_text())
        previous = None
        for n in range(head["segments"]):
            raw = (root / f"parts/{part}/records/seg-{n:06d}.json").read_bytes()
            assert json.loads(raw)["previous"] == previous
            previous = hashlib.sha256(raw).hexdigest()
        assert head["last_record"] == previous is not None


def test_part_head_advanced_by_a_writer_is_not_damage(tmp_path):
    """A rank (no store commits of its own) committed a segment to its part after the last
    consolidation: the store is clean; a lost head, a newer segment's file lost, or a head
    that lost a committed segment are damage naming the file."""
    root = tmp_path / "store"
    s = make_settings(segment_tokens=40, signals={"teacher": make_signal(hidden=None,
                                                                         attention=None)})
    samples = make_samples(12, 4, s)
    writer = StoreWriter(str(root), s, part="p0", commit_store=False)
    writer.add_many(samples[:6])
    commit_store(str(root))
    committed = len(StoreReader(str(root)))
    writer.add_many(samples[6:])  # commits more segments to the part only
    head_rel = "parts/p0/head.json"
    head = json.loads((root / head_rel).read_text())
    assert head["samples"] > committed and len(StoreReader(str(root))) == committed
    assert verify_store(str(root)) == []
    newest = f"parts/p0/seg-{head['segments'] - 1:06d}/input_ids/zarr.json"
    saved = (root / newest).read_bytes()
    (root / newest).unlink()
    assert any(newest in p and "missing" in p for p in verify_store(str(root)))
    (root / newest).write_bytes(saved)
    cut = json.loads((root / MANIFEST).read_text())["parts"][0]["segments"] - 1
    (root / head_rel).write_bytes(sealed_json({**head, "segments": cut}))  # lost a segment
    assert any(head_rel in p for p in verify_store(str(root)))
    (root / head_rel).unlink()
    problems = verify_store(str(root))
    assert any(head_rel in p and "missing" in p for p in problems), problems
    writer.abort()


def test_not_a_store_is_not_damage(tmp_path):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(cli, ["verify", str(tmp_path / "empty")])
    assert result.exit_code == 1 and "not a committed store" in result.output
    assert "DAMAGED" not in result.output and "Traceback" not in result.output
    with pytest.raises(StoreNotFoundError):
        verify_store(str(tmp_path / "nowhere"))


# -- transient storage failures are I/O errors, never damage ---------------------------------

@pytest.fixture
def memory_store():
    url = f"memory://integrity-{uuid.uuid4().hex}/store"
    s = make_settings(signals={"teacher": make_signal(hidden=None, attention=None)})
    with StoreWriter(url, s) as w:
        w.add_many(make_samples(4, 1, s))
    yield url
    fsspec.filesystem("memory").rm(url.split("/store")[0], recursive=True)


class FailingReads:
    """The memory filesystem's reads raise `error` while `armed` (the first `fail_first`
    times). Patched on the class: zarr's async wrapper binds the method when a reader opens."""

    def __init__(self, monkeypatch, error: type[Exception], fail_first: int = 10**9):
        from fsspec.implementations.memory import MemoryFileSystem

        self.calls: list[str] = []
        self.armed = True
        real = MemoryFileSystem.cat_file

        def cat_file(fs, path, *args, **kwargs):
            if self.armed:
                self.calls.append(path)
                if len(self.calls) <= fail_first:
                    raise error(f"simulated {error.__name__} reading {path}")
            return real(fs, path, *args, **kwargs)

        monkeypatch.setattr(MemoryFileSystem, "cat_file", cat_file)
        monkeypatch.setattr(fs_module, "RETRY_DELAYS", (0.0, 0.0))


def _open_then_fail(url: str, failing: FailingReads) -> StoreReader:
    failing.armed = False
    reader = StoreReader(url)
    failing.armed = True
    return reader


@pytest.mark.parametrize("error", [TimeoutError, ConnectionResetError, PermissionError])
def test_storage_failure_is_an_io_error_with_the_url(memory_store, monkeypatch, error):
    failing = FailingReads(monkeypatch, error)
    for what, action in (("open", lambda: StoreReader(memory_store)),
                         ("verify", lambda: verify_store(memory_store)),
                         ("chunk read", lambda: _open_then_fail(memory_store, failing).sample(0))):
        failing.calls.clear()
        with pytest.raises(StoreIOError, match="I/O error") as info:
            action()
        message = str(info.value)
        assert memory_store in message, (what, message)
        assert "damage" not in message.replace("not damage", ""), (what, message)
        assert not isinstance(info.value, ChecksumError)
        if error is PermissionError:
            assert "permission denied" in message and len(failing.calls) == 1
        else:  # idempotent reads are retried (3 attempts) before giving up
            assert len(failing.calls) == 3, (what, failing.calls)
    result = CliRunner().invoke(cli, ["verify", memory_store])
    assert result.exit_code == 1 and "I/O error" in result.output
    assert "DAMAGED" not in result.output and "Traceback" not in result.output


def test_transient_failure_is_retried(memory_store, monkeypatch):
    failing = FailingReads(monkeypatch, TimeoutError, fail_first=2)
    reader = StoreReader(memory_store)  # the first two reads time out, the third answers
    assert len(reader) == 4 and len(failing.calls) > 2
    assert verify_store(memory_store) == []
    failing.calls.clear()
    reader = _open_then_fail(memory_store, failing)  # now chunk reads (through zarr)
    assert reader.sample(1).sample_id == reader.sample_ids[1]
    assert len(failing.calls) > 2
