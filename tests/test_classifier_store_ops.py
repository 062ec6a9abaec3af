"""`logitstore merge` and `logitstore subset` on classifier stores (format 2.3, FORMAT.md
section 4.3; issue 17): every head's logits, the features, labels, input reference, split
and tags copied; duplicates (same id and labels) kept once; differing heads, mixed kinds,
ids naming other labels and --common-signals refused in one paragraph; subset by split,
tag, ids and fraction (expected ids computed here from the documented rule); no token
counts; a run killed after a fixed number of samples resumes to the uninterrupted output.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import signal
import time
from dataclasses import replace

import pytest

from store_helpers import cli, make_samples, make_settings, one_paragraph_error
from test_store_classifier import (FEATURES, assert_same, classifier_settings,
                                   make_classifier_samples, write)

from logitstore.classifier_reader import ClassifierReader
from logitstore.copy_samples import OPERATION_KEY
from logitstore.errors import SettingsMismatchError, StoreKindError
from logitstore.merge import merge_stores
from logitstore.reader import StoreReader
from logitstore.subset import subset_store
from logitstore.verify import verify_store
from logitstore.writer import StoreWriter

TIMEOUT = 120  # seconds a child may take (never reached)


def assert_holds(url: str, expected: list) -> ClassifierReader:
    """The store at `url` verifies clean and holds exactly `expected`, in order, with every
    head, feature, label, input reference, split and tag."""
    assert verify_store(url) == []
    reader = ClassifierReader(url)
    assert reader.sample_ids == [s.sample_id for s in expected]
    for stored, original in zip(reader.iter_samples(), expected):
        assert_same(stored, original)
    return reader


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("cls-ops")
    a = make_classifier_samples(12, seed=0)
    # b: its own samples, in a split a lacks, then 3 duplicates of a's (same id and labels)
    b = [replace(s, split="test") for s in make_classifier_samples(7, seed=1)] + a[3:6]
    return {"a": write(root / "a", a), "b": write(root / "b", b), "samples": {"a": a, "b": b}}


# -- merge ----------------------------------------------------------------------------------

def test_merge_keeps_duplicates_once_with_every_split(sources, tmp_path):
    a, b = sources["samples"]["a"], sources["samples"]["b"]
    result = merge_stores([sources["a"], sources["b"]], str(tmp_path / "m"))
    assert result.problems == [] and result.samples_written == 19
    reader = assert_holds(str(tmp_path / "m"), a + b[:7])
    assert reader.split_counts() == {"test": 7, "train": 9, "validation": 3}
    assert reader.settings == classifier_settings()
    operation = reader.store.manifest["extra"][OPERATION_KEY]
    assert operation["counts"] == {"samples_in": 22, "samples_out": 19, "duplicates": 3,
                                   "tokens_out": 0}
    assert [s["duplicates"] for s in operation["sources"]] == [0, 3]
    assert [s["tokens"] for s in operation["sources"]] == [0, 0]
    again = merge_stores([sources["a"], sources["b"]], str(tmp_path / "m"))
    assert again.already_complete and again.samples_written == 0


def test_cli_merge_counts_samples_not_tokens(sources, tmp_path):
    result = cli("merge", sources["a"], sources["b"], tmp_path / "m")
    assert result.exit_code == 0, result.output
    assert "19 samples of 22 (3 duplicate(s) kept once)" in result.output
    assert "verified" in result.output and "tokens" not in result.output


def test_merge_refuses_other_heads_naming_key_and_values(sources, tmp_path):
    heads = {"modality": 5, "location": 7}
    other = write(tmp_path / "o", make_classifier_samples(4, seed=5, heads=heads),
                  classifier_settings(heads=heads))
    with pytest.raises(SettingsMismatchError) as err:
        merge_stores([sources["a"], other], str(tmp_path / "m"))
    assert f"heads.location is 12 in {sources['a']}, 7 in {other}" in str(err.value)
    features = {**FEATURES, "extra": 4}
    wider = write(tmp_path / "w", make_classifier_samples(4, seed=6, features=features),
                  classifier_settings(features=features, logits_encoding="f16"))
    error = one_paragraph_error(cli("merge", sources["a"], wider, tmp_path / "m"))
    assert f"features.extra is absent in {sources['a']}, 4 in {wider}" in error
    assert f"logits_encoding is 'f32' in {sources['a']}, 'f16' in {wider}" in error
    assert "classifier stores" in error and not (tmp_path / "m").exists()


def test_merge_refuses_a_causal_lm_store_with_a_classifier_store(sources, tmp_path):
    settings = make_settings()
    lm = str(tmp_path / "lm")
    with StoreWriter(lm, settings) as writer:
        writer.add_many(make_samples(3, 1, settings))
    with pytest.raises(StoreKindError):
        merge_stores([lm, sources["a"]], str(tmp_path / "m"))
    error = one_paragraph_error(cli("merge", sources["a"], lm, tmp_path / "m"))
    assert f"{sources['a']} is a classifier store, {lm} is a causal-lm store" in error
    assert not (tmp_path / "m").exists()


def test_merge_refuses_an_id_with_other_labels_and_common_signals(sources, tmp_path):
    first = sources["samples"]["a"][0]
    relabelled = replace(first, labels={**first.labels,
                                        "modality": (first.labels["modality"] + 1) % 5})
    clash = write(tmp_path / "clash", [relabelled])
    error = one_paragraph_error(cli("merge", sources["a"], clash, tmp_path / "m"))
    assert "name different samples (other labels)" in error and first.sample_id in error
    error = one_paragraph_error(cli("merge", sources["a"], sources["b"], tmp_path / "m",
                                    "--common-signals"))
    assert "are classifier stores" in error and "without --common-signals" in error


# -- subset ---------------------------------------------------------------------------------

def kept_by_fraction(sample_id: str, fraction: float, seed: int) -> bool:
    """The documented --fraction rule, written out independently of logitstore.subset."""
    digest = hashlib.sha256(f"{seed}\0{sample_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def test_subset_by_split_tag_ids_and_fraction(sources, tmp_path):
    a = sources["samples"]["a"]
    result = subset_store(sources["a"], str(tmp_path / "v"), split="validation")
    assert result.counts["samples_out"] == 3 and result.counts["tokens_out"] == 0
    assert_holds(str(tmp_path / "v"), [s for s in a if s.split == "validation"])
    subset_store(sources["a"], str(tmp_path / "t"), where=[("site", "s1")])
    assert_holds(str(tmp_path / "t"), [s for s in a if s.tags.get("site") == "s1"])
    wanted = [a[1].sample_id, a[8].sample_id, a[10].sample_id]
    subset_store(sources["a"], str(tmp_path / "i"), ids=wanted[::-1])
    assert_holds(str(tmp_path / "i"), [a[1], a[8], a[10]])
    subset_store(sources["a"], str(tmp_path / "f"), fraction=0.5, seed=4)
    expected = [s for s in a if kept_by_fraction(s.sample_id, 0.5, 4)]
    assert 0 < len(expected) < len(a)
    assert_holds(str(tmp_path / "f"), expected)


def test_cli_subset_and_overwrite(sources, tmp_path):
    a = sources["samples"]["a"]
    ids = tmp_path / "ids.txt"
    ids.write_text("\n".join(s.sample_id for s in a[:4]) + "\n")
    dst = tmp_path / "s"
    result = cli("subset", sources["a"], dst, "--ids", ids, "--split", "train")
    assert result.exit_code == 0, result.output
    assert "3 of 12 samples; verified" in result.output and "tokens" not in result.output
    assert_holds(str(dst), [s for s in a[:4] if s.split == "train"])
    error = one_paragraph_error(cli("subset", sources["a"], dst, "--split", "validation"))
    assert "written by `logitstore subset` from other sources or with another filter" in error
    assert cli("subset", sources["a"], dst, "--split", "validation", "--overwrite"
               ).exit_code == 0
    assert_holds(str(dst), [s for s in a if s.split == "validation"])
    error = one_paragraph_error(cli("subset", sources["a"], dst, "--where", "colour=red"))
    assert "its tags are ['site'] (and source, split, image, text)" in error


# -- killed after a fixed number of samples, then the same call again -----------------------

def stall_after(count: int, conn, run, args, kwargs) -> None:
    """Run `run(*args, **kwargs)`; once `count` samples are handed to the writer, send the
    progress amounts seen so far on `conn` and sleep until killed (a forkserver child:
    a module-level target)."""
    seen = []

    def progress(amount: int) -> None:
        seen.append(amount)
        if len(seen) == count:
            conn.send(seen)
            time.sleep(TIMEOUT)

    run(*args, **kwargs, progress=progress)


@pytest.mark.parametrize("operation", ["subset", "merge"])
def test_killed_midway_then_rerun_resumes(sources, tmp_path, operation):
    many = make_classifier_samples(40, seed=9)
    big = write(tmp_path / "big", many)
    run, args, kwargs = ((subset_store, (big,), {"fraction": 0.8, "seed": 2})
                         if operation == "subset" else
                         (merge_stores, ([big, sources["a"]],), {}))
    reference = run(*args, str(tmp_path / "reference"), **kwargs)
    dst = str(tmp_path / "killed")
    ctx = multiprocessing.get_context("forkserver")
    receiver, sender = ctx.Pipe(duplex=False)
    child = ctx.Process(target=stall_after, args=(17, sender, run, (*args, dst), kwargs),
                        daemon=True)
    child.start()
    try:
        # a classifier sample counts as one sample: it has no tokens
        assert receiver.poll(TIMEOUT) and receiver.recv() == [1] * 17
        child.kill()
        child.join(TIMEOUT)
    finally:
        if child.is_alive():
            child.kill()
            child.join()
    assert child.exitcode == -signal.SIGKILL
    # StoreWriter.add commits a segment once it holds 5 samples, before returning: 3
    # segments were committed, the 2 samples of the fourth only buffered
    left = StoreReader(dst)
    assert len(left) == 15 and verify_store(dst) == []
    result = run(*args, dst, **kwargs)
    assert result.problems == [] and result.resumed_after == 15
    assert result.samples_written == reference.counts["samples_out"] - 15
    done, ref = StoreReader(dst), StoreReader(str(tmp_path / "reference"))
    assert done.index.to_pylist() == ref.index.to_pylist()
    assert done.manifest["extra"] == ref.manifest["extra"]
    assert done.manifest["dataset_fingerprint"] == ref.manifest["dataset_fingerprint"]
    originals = {s.sample_id: s for s in many + sources["samples"]["a"]}
    assert_holds(dst, [originals[sid] for sid in ref.sample_ids])
    rerun = cli(operation, *(args[0] if operation == "merge" else args), dst,
                *(["--fraction", "0.8", "--seed", "2"] if operation == "subset" else []))
    assert rerun.exit_code == 0 and "already held this output" in rerun.output, rerun.output
