"""A second teacher's signal added to a committed store over the same tokens."""

import zlib

import numpy as np
import pytest

from logitstore.errors import SchemaMismatchError
from logitstore.format import SampledSpec, SignalSpec, TopKSpec
from logitstore.reader import StoreReader
from logitstore.signal_writer import SignalAppender
from synthetic import ZipfTeacher, random_sample
from logitstore.verify import verify_store
from logitstore.writer import StoreWriter

from test_store_roundtrip import V, make, settings_for

SPEC = SignalSpec(topk=TopKSpec(3), sampled=SampledSpec(5), teacher={"model_id": "second"})


def second_signal(sample_id, length):
    """Deterministic per sample, so a resumed run produces the same data."""
    rng = np.random.default_rng(zlib.crc32(sample_id.encode()))
    s = random_sample(rng, sample_id, length, ZipfTeacher(vocab_size=V), k=3, n_draws=5)
    return s.signals["teacher"]


def test_add_signal_resumable_and_invisible_until_complete(tmp_path):
    s = settings_for()
    samples = make(np.random.default_rng(4), 15, s)
    with StoreWriter(str(tmp_path), s) as w:
        w.add_many(samples)
    appender = SignalAppender(str(tmp_path), "second", SPEC)
    jobs = appender.pending()
    assert len(jobs) == len(StoreReader(str(tmp_path)).segments) > 2
    first = jobs[0]
    made = {}
    data = [second_signal(i, n) for i, n in zip(first.sample_ids, first.lengths)]
    made.update(zip(first.sample_ids, data))
    appender.write(first, data)
    # Half-added: readers still see the old signal set, and the store verifies clean.
    assert StoreReader(str(tmp_path)).signals == ["teacher"]
    assert verify_store(str(tmp_path)) == []
    # A new appender (a restart) resumes with the remaining segments only.
    appender = SignalAppender(str(tmp_path), "second", SPEC)
    rest = appender.pending()
    assert [j.segment for j in rest] == [j.segment for j in jobs[1:]]
    for job in rest:
        data = [second_signal(i, n) for i, n in zip(job.sample_ids, job.lengths)]
        made.update(zip(job.sample_ids, data))
        appender.write(job, data)
    appender.close()
    r = StoreReader(str(tmp_path))
    assert sorted(r.signals) == ["second", "teacher"]
    assert verify_store(str(tmp_path)) == []
    for x in samples:
        got = r.sample(x.sample_id)
        np.testing.assert_array_equal(got.input_ids, x.input_ids)
        want = made[x.sample_id]
        np.testing.assert_array_equal(got.signals["second"].topk.ids,
                                      np.sort(want.topk.ids, axis=1))
        np.testing.assert_array_equal(got.signals["second"].sampled.offsets,
                                      want.sampled.offsets)


def test_existing_name_and_bad_shapes_refused(tmp_path):
    s = settings_for()
    with StoreWriter(str(tmp_path), s) as w:
        w.add_many(make(np.random.default_rng(4), 3, s))
    with pytest.raises(SchemaMismatchError, match="already in"):
        SignalAppender(str(tmp_path), "teacher", SPEC)
    appender = SignalAppender(str(tmp_path), "second", SPEC)
    job = appender.pending()[0]
    bad = [second_signal(i, n + 1) for i, n in zip(job.sample_ids, job.lengths)]
    with pytest.raises(SchemaMismatchError, match="shape"):
        appender.write(job, bad)
