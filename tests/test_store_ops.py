"""`logitstore merge` and `logitstore subset` (issue 13, sections 3 and 5).

- merge: duplicates (same digest) kept once and counted, conflicting settings and missing
  signals refused naming them (or only the common signals kept), ids naming different
  samples refused, provenance in the manifest;
- subset: by split, typed --where tags, --ids, --fraction/--seed (exact expected ids,
  computed here independently), every signal equal to the source's, verified;
- both: refusing a destination that holds another store (--overwrite replaces it), a
  round trip local -> S3 (moto on 127.0.0.1) -> local, and SIGKILL at seeded random moments
  (a forked child, killed a random number of written samples into its run plus a random
  part of a sample's time), then rerun: verify clean, content and layout equal to an
  uninterrupted run's.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from store_helpers import (cli, content_differences, content_of, make_samples, make_settings,
                           make_signal, one_paragraph_error)

from logitstore.copy_samples import OPERATION_KEY
from logitstore.errors import ManifestMissingError
from logitstore.merge import merge_stores
from logitstore.reader import StoreReader
from logitstore.subset import subset_store
from logitstore.verify import verify_store
from logitstore.writer import StoreWriter
from test_store_remote import s3  # noqa: F401  (the moto S3 server fixture)

SETTINGS = make_settings(segment_tokens=48)  # every kind of signal, several segments


def write_store(path: Path, samples, settings=SETTINGS) -> str:
    with StoreWriter(str(path), settings) as writer:
        writer.add_many(samples)
    return str(path)


def expected_content(*urls: str) -> dict:
    out = {}
    for url in urls:
        for sid, content in content_of(StoreReader(url)).items():
            out.setdefault(sid, content)
    return out


def assert_content(url: str, ids: list[str], expected: dict) -> StoreReader:
    """The store at `url` is clean and holds exactly `ids` (in order) with `expected`'s
    content, every signal kind included."""
    assert verify_store(url) == []
    reader = StoreReader(url)
    assert reader.sample_ids == ids
    got = content_of(reader)
    assert not content_differences(got, {sid: expected[sid] for sid in ids})
    kinds = {key.split("/", 1)[1] for c in got.values() for key in c if "/" in key}
    assert {"topk/ids", "sampled/ids", "hidden", "attention"} <= kinds
    return reader


# -- merge ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("ops")
    a = make_samples(10, 1, SETTINGS)
    b = make_samples(6, 2, SETTINGS) + a[2:5]  # 3 duplicates of a's samples
    c = make_samples(5, 3, SETTINGS) + [a[7]]  # 1 more
    return {"root": root, "a": write_store(root / "a", a), "b": write_store(root / "b", b),
            "c": write_store(root / "c", c), "samples": {"a": a, "b": b, "c": c}}


def test_merge_keeps_duplicates_once_and_records_provenance(stores, tmp_path):
    a, b, c = stores["a"], stores["b"], stores["c"]
    dst = tmp_path / "merged"
    result = cli("merge", a, b, c, dst)
    assert result.exit_code == 0, result.output
    assert "21 samples of 25 (4 duplicate(s) kept once)" in result.output
    samples = stores["samples"]
    ids = [s.sample_id for s in samples["a"] + samples["b"][:6] + samples["c"][:5]]
    reader = assert_content(str(dst), ids, expected_content(a, b, c))

    op = reader.manifest["extra"][OPERATION_KEY]
    assert op["command"] == "merge" and op["signals"] == ["teacher"]
    assert op["counts"] == {"samples_in": 25, "samples_out": 21, "duplicates": 4,
                            "tokens_out": reader.num_tokens}
    assert op["filter"] == {"common_signals": False, "signals_left_out": []}
    for entry, url, dups in zip(op["sources"], (a, b, c), (0, 3, 1)):
        source = StoreReader(url)
        assert entry["url"] == url and entry["duplicates"] == dups
        assert entry["manifest_sha256"] == hashlib.sha256(source.manifest_bytes).hexdigest()
        assert entry["dataset_fingerprint"] == source.manifest["dataset_fingerprint"]
    assert len(op["job"]) == 64

    again = cli("merge", a, b, c, dst)  # the same merge again: nothing left to do
    assert again.exit_code == 0 and "already held this output" in again.output


def test_merge_refuses_conflicting_settings(stores, tmp_path):
    other = make_settings(segment_tokens=48, chunk_tokens=32, tokenizer_fingerprint="cd" * 32,
                          signals={"teacher": make_signal(k=2)})
    d = write_store(tmp_path / "d", make_samples(3, 4, other), other)
    dst = tmp_path / "merged"
    error = one_paragraph_error(cli("merge", stores["a"], d, dst))
    assert f"chunk_tokens is 16 in {stores['a']}, 32 in {d}" in error
    assert f"signals.teacher.topk.k is 4 in {stores['a']}, 2 in {d}" in error
    assert f"tokenizer_fingerprint is '{'ab' * 32}' in {stores['a']}" in error
    assert "segment_tokens" not in error  # only what differs
    assert not dst.exists()


def test_merge_missing_signal_refused_or_common_signals_kept(stores, tmp_path):
    two = make_settings(segment_tokens=48, signals={
        "teacher": make_signal(), "second": make_signal(k=2, n_draws=None, hidden=None,
                                                        attention=None)})
    e = write_store(tmp_path / "e", make_samples(4, 5, two), two)
    a = stores["a"]
    dst = tmp_path / "merged"
    error = one_paragraph_error(cli("merge", a, e, dst))
    assert f"signal 'second' is missing from {a}" in error and "--common-signals" in error
    assert not dst.exists()

    result = cli("merge", a, e, dst, "--common-signals")
    assert result.exit_code == 0, result.output
    expected = {sid: {k: v for k, v in content.items() if not k.startswith("second/")}
                for sid, content in expected_content(a, e).items()}
    ids = StoreReader(a).sample_ids + StoreReader(e).sample_ids
    reader = assert_content(str(dst), ids, expected)
    assert reader.signals == ["teacher"]
    assert reader.manifest["extra"][OPERATION_KEY]["filter"] == {
        "common_signals": True, "signals_left_out": ["second"]}


def test_merge_refuses_an_id_naming_different_samples(stores, tmp_path):
    clash = write_store(tmp_path / "clash", make_samples(3, 1, SETTINGS, lengths=[5, 6, 7]))
    dst = tmp_path / "merged"
    error = one_paragraph_error(cli("merge", stores["a"], clash, dst))
    assert "3 sample id(s) name different samples" in error
    assert f"'doc-1-00000' ({stores['a']} and {clash})" in error
    assert not dst.exists()


# -- subset ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def source(tmp_path_factory):
    samples = make_samples(30, 6, SETTINGS)
    url = write_store(tmp_path_factory.mktemp("subset") / "src", samples)
    return url, samples, content_of(StoreReader(url))


def hash_keeps(sid: str, fraction: float, seed: int) -> bool:
    """The documented --fraction rule, written out independently of logitstore.subset."""
    digest = hashlib.sha256(f"{seed}\0{sid}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


SUBSETS = {
    "split": (["--split", "validation"], lambda i, s: s.split == "validation"),
    "str and int tags": (["--where", "lang=en", "--where", "turn=1"],
                         lambda i, s: s.tags.get("lang") == "en" and s.tags.get("turn") == 1),
    "bool tag": (["--where", "reviewed=false"], lambda i, s: s.tags.get("reviewed") is False),
    "source": (["--where", "source=synthetic/notes"], lambda i, s: i % 2 == 1),
    "fraction": (["--fraction", "0.5", "--seed", "7"],
                 lambda i, s: hash_keeps(s.sample_id, 0.5, 7)),
    "all at once": (["--split", "train", "--where", "lang=fr", "--fraction", "0.8"],
                    lambda i, s: s.split == "train" and s.tags.get("lang") == "fr"
                    and hash_keeps(s.sample_id, 0.8, 0)),
}


@pytest.mark.parametrize("name", list(SUBSETS))
def test_subset_holds_exactly_the_selected_samples(source, tmp_path, name):
    url, samples, content = source
    args, keep = SUBSETS[name]
    ids = [s.sample_id for i, s in enumerate(samples) if keep(i, s)]
    assert 0 < len(ids) < len(samples), "the filter must select some, not all"
    dst = tmp_path / "subset"
    result = cli("subset", url, dst, *args)
    assert result.exit_code == 0, result.output
    assert f"{len(ids)} of 30 samples" in result.output
    reader = assert_content(str(dst), ids, content)
    op = reader.manifest["extra"][OPERATION_KEY]
    assert op["counts"]["samples_out"] == len(ids) and op["counts"]["samples_in"] == 30
    assert op["sources"][0]["dataset_fingerprint"] == \
        StoreReader(url).manifest["dataset_fingerprint"]


def test_subset_by_id_file(source, tmp_path):
    url, samples, content = source
    id_file = tmp_path / "keep.txt"
    id_file.write_text(f"  {samples[17].sample_id}\n\n{samples[3].sample_id}\n"
                       f"{samples[8].sample_id}\n{samples[3].sample_id}\n")
    dst = tmp_path / "subset"
    assert cli("subset", url, dst, "--ids", id_file).exit_code == 0
    reader = assert_content(str(dst), [samples[i].sample_id for i in (3, 8, 17)], content)
    operation = reader.manifest["extra"][OPERATION_KEY]
    assert operation["filter"]["ids"]["count"] == 3 and operation["ids_file"] == str(id_file)
    moved = tmp_path / "moved.txt"  # where the list lies does not decide the content
    moved.write_text(id_file.read_text())
    again = cli("subset", url, dst, "--ids", moved)
    assert again.exit_code == 0 and "already held this output" in again.output


def test_fraction_does_not_depend_on_store_order_or_segments(source, tmp_path):
    url, samples, _ = source
    reordered = write_store(tmp_path / "reordered", samples[::-1],
                            make_settings(segment_tokens=200))
    picked = {}
    for name, src in (("a", url), ("b", reordered)):
        subset_store(src, str(tmp_path / name), fraction=0.4, seed=11)
        picked[name] = set(StoreReader(str(tmp_path / name)).sample_ids)
    assert picked["a"] == picked["b"] == {s.sample_id for s in samples
                                          if hash_keeps(s.sample_id, 0.4, 11)}
    subset_store(url, str(tmp_path / "c"), fraction=0.4, seed=12)
    assert set(StoreReader(str(tmp_path / "c")).sample_ids) != picked["a"]  # the seed matters


def test_subset_bad_inputs(source, tmp_path):
    url, samples, _ = source
    dst = tmp_path / "subset"
    assert "has no tag 'colour'" in one_paragraph_error(cli("subset", url, dst, "--where",
                                                            "colour=red"))
    error = one_paragraph_error(cli("subset", url, dst, "--where", "turn=one"))
    assert "must be an integer, found 'one'" in error
    error = one_paragraph_error(cli("subset", url, dst, "--where", "reviewed=maybe"))
    assert "must be a boolean" in error
    ids = tmp_path / "ids.txt"
    ids.write_text(f"{samples[0].sample_id}\nnot-a-sample\n")
    error = one_paragraph_error(cli("subset", url, dst, "--ids", ids))
    assert "1 of the 2 ids" in error and "'not-a-sample'" in error
    assert "selects no sample" in one_paragraph_error(cli("subset", url, dst, "--where",
                                                          "lang=xx"))
    assert not dst.exists()  # nothing written by a refused subset
    assert cli("subset", url, dst, "--where", "lang").exit_code == 2
    assert cli("subset", url, dst, "--fraction", "0").exit_code == 2
    assert cli("subset", url, dst, "--seed", "3").exit_code == 2


def test_destination_holding_another_store(source, stores, tmp_path):
    url, samples, content = source
    dst = tmp_path / "subset"
    assert cli("subset", url, dst, "--split", "validation").exit_code == 0
    error = one_paragraph_error(cli("subset", url, dst, "--split", "train"))
    assert "written by `logitstore subset` from other sources or with another filter" in error
    assert "--overwrite" in error
    assert StoreReader(str(dst)).sample_ids == [s.sample_id for s in samples
                                                if s.split == "validation"]  # untouched
    error = one_paragraph_error(cli("merge", stores["a"], stores["b"], url))
    assert "not written by this command" in error  # a teacher-dump style store
    error = one_paragraph_error(cli("subset", url, url + "/", "--split", "train", "--overwrite"))
    assert "is also a source" in error
    assert len(StoreReader(url)) == 30 and verify_store(url) == []
    result = cli("subset", url, dst, "--split", "train", "--overwrite")
    assert result.exit_code == 0, result.output
    assert_content(str(dst), [s.sample_id for s in samples if s.split == "train"], content)


def test_destination_holding_an_unfinished_store(source, tmp_path):
    """Parts without a committed store manifest (e.g. a dump killed before its first
    commit) are another store too, unless they are a prefix of this command's output."""
    url, samples, content = source
    for name, settings, refusal in (
            ("same-settings", SETTINGS, "an unfinished store of 3 other samples"),
            ("other-settings", CRASH_SETTINGS, "an unfinished store with other settings")):
        dst = tmp_path / name
        writer = StoreWriter(str(dst), settings, commit_store=False)
        writer.add_many(make_samples(3, 99, settings))
        writer.flush()  # a segment in the part; the store itself never committed
        writer.abort()
        assert refusal in one_paragraph_error(cli("subset", url, dst, "--split", "train"))
        result = cli("subset", url, dst, "--split", "train", "--overwrite")
        assert result.exit_code == 0, result.output
        assert_content(str(dst), [s.sample_id for s in samples if s.split == "train"], content)


# -- S3 (moto on loopback) ------------------------------------------------------------------

def test_merge_to_s3_and_subset_back(s3, tmp_path):
    one_segment = make_settings(segment_tokens=10_000)  # few objects: moto is slow per request
    a = write_store(tmp_path / "a", make_samples(4, 8, one_segment), one_segment)
    b = write_store(tmp_path / "b", make_samples(3, 9, one_segment), one_segment)
    remote = s3.url("ops-merged")
    merged = merge_stores([a, b], remote, dst_options=s3.options)
    assert merged.problems == [] and "manifest.json" in s3.keys("ops-merged")
    back = tmp_path / "back"
    result = subset_store(remote, str(back), split="train", src_options=s3.options)
    assert result.problems == [] and result.provenance["sources"][0]["url"] == remote
    samples = make_samples(4, 8, one_segment) + make_samples(3, 9, one_segment)
    ids = [s.sample_id for s in samples if s.split == "train"]
    assert_content(str(back), ids, expected_content(a, b))


# -- SIGKILL at seeded random moments, then the same command again ---------------------------

# Tiny segments (many commits per run) of few arrays (each file costs an fsync): a per-token
# and a per-sample signal array; the other kinds are copied the same way (tests above).
CRASH_SETTINGS = make_settings(segment_tokens=32, signals={"teacher": make_signal(
    n_draws=None, attention=None)})
PRELOAD = ["numpy", "pyarrow", "pyarrow.parquet", "zarr", "logitstore.merge",
           "logitstore.subset", "logitstore.verify"]  # missing ones are skipped
TIMEOUT = 120  # seconds a child may take (never reached)


@dataclass
class Job:
    """One merge or subset: `run(*args, dst, **kwargs)`, and its uninterrupted output."""

    run: Callable
    args: tuple
    kwargs: dict
    reference: StoreReader
    content: dict
    seconds: float  # wall time of an uninterrupted child, from start to exit


@pytest.fixture(scope="module")
def mp():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # no effect when this process's forkserver runs already
    return ctx


def run_child(mp, job_run, args, kwargs, dst: str, kill_after: int | None = None,
              delay: float = 0.0) -> int:
    """Run the job in a forked child; with kill_after, SIGKILL it `delay` seconds after it
    has handed its `kill_after`-th sample to the writer (it may finish first). Returns its
    exit code (0: finished, -SIGKILL: killed)."""
    receiver, sender = mp.Pipe(duplex=False)
    proc = mp.Process(target=job_run, args=(*args, dst),
                      kwargs={**kwargs, "progress": sender.send}, daemon=True)
    proc.start()
    sender.close()
    try:
        if kill_after is not None:
            seen = 0
            while seen < kill_after and receiver.poll(TIMEOUT):
                try:
                    receiver.recv()
                except EOFError:
                    break  # finished
                seen += 1
            time.sleep(delay)
            proc.kill()
        proc.join(TIMEOUT)
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
        receiver.close()
    assert proc.exitcode in (0, -signal.SIGKILL), f"child failed: exit {proc.exitcode}"
    return proc.exitcode


def make_job(mp, tmp_path: Path, job_run, args, kwargs) -> Job:
    dst = str(tmp_path / "reference")
    start = time.perf_counter()
    assert run_child(mp, job_run, args, kwargs, dst) == 0
    seconds = time.perf_counter() - start
    assert verify_store(dst) == []
    reference = StoreReader(dst)
    assert len(reference.segments) >= 4, "segments too large for kills to land between commits"
    return Job(job_run, args, kwargs, reference, content_of(reference), seconds)


def left_behind(dst: Path, job: Job) -> str:
    """What a kill left at `dst`: checks that a committed state is clean and a prefix of the
    uninterrupted output."""
    if not dst.exists() or not any(dst.iterdir()):
        return "nothing"
    try:
        reader = StoreReader(str(dst))
    except ManifestMissingError:
        return "uncommitted files"
    assert verify_store(str(dst)) == []
    n = len(reader)
    assert reader.sample_ids == job.reference.sample_ids[:n]
    return f"{n} of {len(job.reference)} samples committed"


def assert_same_as_reference(dst: Path, job: Job) -> None:
    reader = StoreReader(str(dst))
    ref = job.reference
    assert reader.sample_ids == ref.sample_ids
    assert reader.index.to_pylist() == ref.index.to_pylist()  # same rows, parts, segments
    assert [s.samples for s in reader.segments] == [s.samples for s in ref.segments]
    assert not content_differences(content_of(reader), job.content)
    assert reader.manifest["extra"] == ref.manifest["extra"]
    assert reader.manifest["dataset_fingerprint"] == ref.manifest["dataset_fingerprint"]


def kill_and_rerun(mp, job: Job, tmp_path: Path, trials: int, seed: int) -> list[str]:
    """`trials` destinations, each written by a child SIGKILLed after a seeded random number
    of samples plus a random part of a sample's time (every third trial kills the resumed
    child too), then finished by the same call in this process."""
    rng = np.random.default_rng(seed)
    n = len(job.reference)
    report = []
    for trial in range(trials):
        dst = tmp_path / f"t{trial:02d}"
        states = []
        for _ in range(1 + (trial % 3 == 2)):
            after, delay = int(rng.integers(0, n)), float(rng.uniform(0, 2 * job.seconds / n))
            code = run_child(mp, job.run, job.args, job.kwargs, str(dst), after, delay)
            states.append(("killed: " if code else "finished first: ") + left_behind(dst, job))
            if code == 0:
                break
        result = job.run(*job.args, str(dst), **job.kwargs)
        assert result.problems == []
        assert_same_as_reference(dst, job)
        report.append(f"trial {trial}: {'; '.join(states)}; rerun resumed after "
                      f"{result.resumed_after}")
    print("\n".join(report))
    return report


def assert_kills_landed(report: list[str]) -> None:
    """Most kills must have cut a run short with part of the output on storage."""
    midway = [line for line in report if "killed: " in line
              and ("uncommitted" in line or "samples committed" in line)]
    resumed = [line for line in report if not line.endswith("resumed after 0")]
    assert len(midway) >= len(report) // 2 and len(resumed) >= 3, report


@pytest.fixture(scope="module")
def crash_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash-ops")
    x = make_samples(6, 21, CRASH_SETTINGS)
    y = make_samples(5, 22, CRASH_SETTINGS) + x[1:3]
    return (write_store(root / "x", x, CRASH_SETTINGS), write_store(root / "y", y, CRASH_SETTINGS),
            write_store(root / "z", make_samples(16, 23, CRASH_SETTINGS), CRASH_SETTINGS))


@pytest.mark.slow  # ~20 s: a crash campaign (10 kills); the CLI kill below stays fast
def test_merge_killed_at_random_moments_then_rerun(mp, crash_sources, tmp_path):
    x, y, _ = crash_sources
    job = make_job(mp, tmp_path, merge_stores, ([x, y],), {})
    assert job.reference.manifest["extra"][OPERATION_KEY]["counts"]["duplicates"] == 2
    assert_kills_landed(kill_and_rerun(mp, job, tmp_path, trials=10, seed=1301))


@pytest.mark.slow  # ~20 s: a crash campaign (10 kills)
def test_subset_killed_at_random_moments_then_rerun(mp, crash_sources, tmp_path):
    _, _, z = crash_sources
    job = make_job(mp, tmp_path, subset_store, (z,), {"fraction": 0.8, "seed": 3})
    assert 8 <= len(job.reference) < 16
    assert_kills_landed(kill_and_rerun(mp, job, tmp_path, trials=10, seed=1302))


def test_cli_subset_killed_then_rerun_resumes(crash_sources, tmp_path):
    """The command itself, in a fresh interpreter, killed once its first segment is
    committed; the same command line finishes it."""
    _, _, z = crash_sources
    reference = tmp_path / "reference"
    subset_store(z, str(reference), fraction=0.8, seed=3)
    dst = tmp_path / "killed"
    command = [sys.executable, "-m", "logitstore.cli", "subset", z, str(dst), "--fraction",
               "0.8", "--seed", "3"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + TIMEOUT
    while not (dst / "manifest.json").exists() and proc.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.kill()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the subset finished before the kill"
    again = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT)
    assert again.returncode == 0, again.stderr
    assert "resumed after" in again.stdout and "verified" in again.stdout
    job = Job(subset_store, (), {}, StoreReader(str(reference)),
              content_of(StoreReader(str(reference))), 0.0)
    assert_same_as_reference(dst, job)
