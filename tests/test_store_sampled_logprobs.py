"""Sampled signals stored without their log-probs (SampledSpec.logprobs false, FORMAT.md
section 2): the writer stores no `sampled_logprobs` array, the reader gives `logprobs`
None, and verify, info, show, cp, merge and subset handle such a store."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from logitstore.cli import main
from logitstore.errors import SchemaMismatchError, SettingsMismatchError
from logitstore.format import SampledSpec, StoreSettings
from logitstore.reader import StoreReader
from logitstore.verify import verify_store
from logitstore.writer import StoreWriter
from store_helpers import (assert_same_content, assert_sample_matches, make_samples,
                           make_settings, make_signal)

DATA = Path(__file__).parent / "data"


def settings_without_logprobs(n_draws=8, temperature=1.0) -> StoreSettings:
    signal = make_signal(n_draws=n_draws, temperature=temperature)
    return make_settings(signals={"teacher": replace(
        signal, sampled=replace(signal.sampled, logprobs=False))})


def write(path, settings, samples):
    with StoreWriter(str(path), settings) as w:
        w.add_many(samples)
    return str(path)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """(store without log-probs, store with them, samples): the same samples twice."""
    root = tmp_path_factory.mktemp("nolp")
    without = settings_without_logprobs()
    samples = make_samples(20, seed=4, settings=without)  # generated with log-probs
    return (write(root / "without", without, samples),
            write(root / "with", make_settings(signals={"teacher": make_signal()}), samples),
            samples)


def run(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_round_trip_without_logprobs(stores):
    url, _, samples = stores
    reader = StoreReader(url)
    assert reader.settings.signals["teacher"].sampled.logprobs is False
    assert len(reader.segments) > 2
    for original in samples:  # random access: ids and counts exact, no log-probs
        assert_sample_matches(original, reader.sample(original.sample_id), reader.settings)
    for original, streamed in zip(samples, reader.iter_samples()):  # whole shards
        assert_sample_matches(original, streamed, reader.settings)
    files = [p for p in Path(url).rglob("*") if p.is_file()]
    assert not [p for p in files if "sampled_logprobs" in str(p)]
    assert [p for p in files if "sampled_counts" in str(p)]


def test_the_only_difference_is_the_logprob_array(stores):
    without, with_lps, _ = stores
    a, b = StoreReader(without), StoreReader(with_lps)
    for x, y in zip(a.iter_samples(), b.iter_samples()):
        sx, sy = x.signals["teacher"].sampled, y.signals["teacher"].sampled
        assert sx.logprobs is None and sy.logprobs is not None
        for field in ("offsets", "ids", "counts"):
            np.testing.assert_array_equal(getattr(sx, field), getattr(sy, field))
    size = {u: sum(p.stat().st_size for p in Path(u).rglob("*") if "/sampled_" in str(p)
                   and p.is_file()) for u in (without, with_lps)}
    assert size[without] < size[with_lps]


def test_verify_info_and_show(stores):
    url = stores[0]
    assert verify_store(url) == []
    assert run("verify", url).exit_code == 0
    info = json.loads(run("info", url, "--json").output)
    assert info["settings"]["signals"]["teacher"]["sampled"]["logprobs"] is False
    arrays = info["sizes"]["arrays"]
    assert "signals/teacher/sampled_ids" in arrays
    assert "signals/teacher/sampled_logprobs" not in arrays
    assert info["sizes"]["signals"]["teacher"]["sampled"]["bytes"] > 0
    text = run("info", url)
    assert text.exit_code == 0 and "logprobs=False" in text.output
    shown = json.loads(run("show", url, "--index", "3", "--json").output)
    assert shown["signals"]["teacher"]["sampled"]["logprobs"] is None
    assert all(sum(c) == 8 for c in shown["signals"]["teacher"]["sampled"]["counts"])
    assert run("show", url, "--index", "3").exit_code == 0


def test_cp_and_subset_keep_the_store_without_logprobs(stores, tmp_path):
    url = stores[0]
    copy = tmp_path / "copy"
    assert run("cp", url, str(copy)).exit_code == 0
    assert verify_store(str(copy)) == []
    assert_same_content(StoreReader(url), StoreReader(str(copy)))
    part = tmp_path / "part"
    assert run("subset", url, str(part), "--split", "train").exit_code == 0
    reader = StoreReader(str(part))
    assert reader.settings.signals["teacher"].sampled.logprobs is False
    assert verify_store(str(part)) == [] and len(reader) > 0
    assert not [p for p in part.rglob("*") if "sampled_logprobs" in str(p)]


def test_merge_refuses_stores_that_differ_in_logprobs(stores, tmp_path):
    without, with_lps, _ = stores
    out = CliRunner().invoke(main, ["merge", without, with_lps, str(tmp_path / "m")])
    assert out.exit_code == 1 and "logprobs" in out.output


def test_a_missing_logprobs_key_reads_as_stored():
    """Manifests written before the key existed (here: the bundled format-1.1 store)."""
    settings = StoreSettings.from_json(
        json.loads((DATA / "store-1.1" / "manifest.json").read_text())["settings"])
    sampled = [s.sampled for s in settings.signals.values() if s.sampled]
    assert sampled and all(s.logprobs is True for s in sampled)
    data = make_settings().to_json()
    del data["signals"]["teacher"]["sampled"]["logprobs"]
    assert StoreSettings.from_json(data).signals["teacher"].sampled.logprobs is True
    assert StoreSettings.from_json(data) == make_settings()


def test_settings_refuse_a_logprobs_value_that_is_not_a_boolean():
    signal = make_signal()
    bad = replace(signal, sampled=SampledSpec(8, logprobs="no"))
    with pytest.raises(SettingsMismatchError, match="sampled logprobs must be true or false"):
        make_settings(signals={"teacher": bad})


def test_a_signal_with_logprobs_needs_them_from_the_writer(tmp_path):
    """Without log-probs the writer ignores what samples hold; with them it requires them."""
    samples = make_samples(3, seed=5)
    for s in samples:
        s.signals["teacher"].sampled.logprobs = None
    write(tmp_path / "fine", settings_without_logprobs(), samples)
    with pytest.raises(SchemaMismatchError, match="ids/counts/logprobs must each have"):
        write(tmp_path / "refused", make_settings(), samples)
