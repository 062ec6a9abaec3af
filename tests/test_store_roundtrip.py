"""Write -> read gives back every array exactly, or within the documented quantisation error."""

import numpy as np
import pytest
from hypothesis import given, settings as hsettings, strategies as st

from logitstore.encoding import decode_sampled, decode_topk_ids, encode_sampled, encode_topk_ids
from logitstore.format import (AttentionSpec, HiddenSpec, SampledSpec, SignalSpec, StoreSettings,
                               TopKSpec)
from logitstore.reader import StoreReader
from logitstore.sample import Sample, Sampled, SignalData, TopK
from synthetic import ZipfTeacher, random_sample
from logitstore.writer import StoreWriter

V = 300


def settings_for(encoding="q8", k=4, n_draws=12, hidden=(2, 6), attention=(1, 2, 3),
                 vocab=V, **kw):
    spec = SignalSpec(
        topk=TopKSpec(k, encoding) if k else None,
        sampled=SampledSpec(n_draws, 0.8, encoding) if n_draws else None,
        hidden=HiddenSpec(tuple(range(hidden[0])), hidden[1]) if hidden else None,
        attention=AttentionSpec(tuple(range(attention[0])), attention[1], attention[2],
                                heads="all") if attention else None,
        teacher={"model_id": "synthetic"})
    base = dict(vocab_size=vocab, tokenizer_fingerprint="f" * 64, chunk_tokens=16,
                segment_tokens=120, chunk_samples=3, signals={"teacher": spec})
    base.update(kw)
    return StoreSettings(**base)


def make(rng, n, s: StoreSettings, lengths=None):
    spec = s.signals["teacher"]
    teacher = ZipfTeacher(vocab_size=s.vocab_size)
    out = []
    for i in range(n):
        length = lengths[i] if lengths else int(rng.integers(1, 40))
        tags = {} if i % 3 == 0 else {"specialty": ["cardio", "neuro"][i % 2], "difficulty": i % 4}
        out.append(random_sample(
            rng, f"src:{i}:{i * 7919 % 1000:03d}", length, teacher,
            k=spec.topk.k if spec.topk else None,
            n_draws=spec.sampled.n_draws if spec.sampled else None,
            temperature=spec.sampled.temperature if spec.sampled else 1.0,
            hidden=(len(spec.hidden.layers), spec.hidden.dim) if spec.hidden else None,
            attention=(len(spec.attention.layers), spec.attention.num_heads,
                       spec.attention.grid) if spec.attention else None,
            tags=tags))
    return out


def tolerance(encoding, step):
    return {"q8": step / 2 + 1e-6, "f16": 2e-3, "f32": 0.0}[encoding]


def assert_roundtrip(original: Sample, got: Sample, s: StoreSettings):
    spec = s.signals["teacher"]
    assert got.sample_id == original.sample_id
    np.testing.assert_array_equal(got.input_ids, original.input_ids)
    np.testing.assert_array_equal(got.loss_mask, original.loss_mask)
    assert got.tags == original.tags
    a, b = original.signals["teacher"], got.signals["teacher"]
    if spec.topk:
        tol = tolerance(spec.topk.logprob_encoding, spec.topk.logprob_step)
        order = np.argsort(a.topk.ids, axis=1)
        np.testing.assert_array_equal(b.topk.ids, np.take_along_axis(a.topk.ids, order, 1))
        want = np.take_along_axis(a.topk.logprobs, order, 1)
        floor = -255 * spec.topk.logprob_step if spec.topk.logprob_encoding == "q8" else -np.inf
        assert np.all(np.abs(b.topk.logprobs - np.maximum(want, floor)) <= tol * (1 + np.abs(want)
                      if spec.topk.logprob_encoding == "f16" else 1) + 1e-6)
        assert np.all(np.abs(b.topk.tail() - np.maximum(a.topk.tail(), floor))
                      <= tol * (1 + np.abs(a.topk.tail())) + 1e-6)
    if spec.sampled:
        sa, sb = a.sampled, b.sampled
        np.testing.assert_array_equal(sb.offsets, sa.offsets)
        for t in range(sa.num_positions):
            ia, ca, la = sa.position(t)
            ib, cb, lb = sb.position(t)
            order = np.argsort(ia)
            back = np.argsort(ib)  # entries are stored in runs: the order carries no meaning
            np.testing.assert_array_equal(ib[back], ia[order])
            np.testing.assert_array_equal(cb[back], ca[order])
            step = np.where(ca[order] == 1, spec.sampled.singleton_step, spec.sampled.logprob_step)
            if spec.sampled.logprob_encoding == "q8":
                assert np.all(np.abs(lb[back] - la[order]) <= step / 2 + 1e-6)
            elif spec.sampled.logprob_encoding == "f32":
                np.testing.assert_array_equal(lb[back], la[order])
    if spec.hidden:
        np.testing.assert_allclose(b.hidden, a.hidden, rtol=1e-3, atol=1e-3)
    if spec.attention:
        np.testing.assert_allclose(b.attention, a.attention, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("encoding", ["q8", "f16", "f32"])
def test_roundtrip_every_encoding(tmp_path, encoding):
    rng = np.random.default_rng(1)
    s = settings_for(encoding)
    samples = make(rng, 25, s)
    with StoreWriter(str(tmp_path), s) as w:
        w.add_many(samples)
    r = StoreReader(str(tmp_path))
    assert len(r) == 25 and len(r.segments) > 2
    assert r.num_tokens == sum(len(x) for x in samples)
    for x in samples:  # random access by id
        assert_roundtrip(x, r.sample(x.sample_id), s)
    streamed = list(r.iter_samples())  # sequential, whole shards
    assert [x.sample_id for x in streamed] == [x.sample_id for x in samples]
    for x, y in zip(samples, streamed):
        assert_roundtrip(x, y, s)
    assert_roundtrip(samples[-1], r.sample(-1), s)  # by position


@pytest.mark.parametrize("shape", [dict(k=1, n_draws=1), dict(k=0, n_draws=300, hidden=None),
                                   dict(k=7, n_draws=0, attention=None),
                                   dict(k=3, n_draws=0, hidden=None, attention=None,
                                        vocab=70000)])
def test_roundtrip_edge_shapes(tmp_path, shape):
    """k=1, a single draw, >255 draws (uint16 counts), >65536 vocab (uint32 ids), 1-token samples."""
    rng = np.random.default_rng(2)
    s = settings_for(**shape)
    samples = make(rng, 8, s, lengths=[1, 1, 2, 5, 1, 30, 1, 3])
    with StoreWriter(str(tmp_path), s) as w:
        w.add_many(samples)
    r = StoreReader(str(tmp_path))
    for x in samples:
        assert_roundtrip(x, r.sample(x.sample_id), s)


def test_signal_subset_and_tags_columns(tmp_path):
    rng = np.random.default_rng(3)
    s = settings_for()
    samples = make(rng, 9, s)
    with StoreWriter(str(tmp_path), s) as w:
        w.add_many(samples)
    r = StoreReader(str(tmp_path))
    assert set(r.index.column_names) >= {"sample_id", "source", "split", "offset", "length",
                                         "specialty", "difficulty", "digest"}
    assert r.sample(0).tags == {}  # empty tags stay empty (nulls are not invented)
    assert r.sample(0, signals=[]).signals == {}


@hsettings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(1, 9), st.integers(2, 70000), st.integers(0, 2**31))
def test_topk_id_encoding_is_lossless(rows, k, vocab, seed):
    rng = np.random.default_rng(seed)
    k = min(k, vocab)
    ids = np.stack([rng.choice(vocab, k, replace=False) for _ in range(rows)])
    lp = -rng.random((rows, k))
    deltas, sorted_lp = encode_topk_ids(ids, lp, "uint32")
    back = decode_topk_ids(deltas)
    np.testing.assert_array_equal(back, np.sort(ids, axis=1))
    for r_ in range(rows):  # log-probs follow their ids
        assert dict(zip(back[r_], sorted_lp[r_])) == dict(zip(ids[r_], lp[r_]))


@hsettings(max_examples=80, deadline=None)
@given(st.lists(st.integers(1, 6), min_size=1, max_size=8), st.integers(0, 2**31))
def test_sampled_encoding_is_lossless(lengths, seed):
    rng = np.random.default_rng(seed)
    ids = [rng.choice(1000, n, replace=False) for n in lengths]
    counts = [rng.choice([1, 1, 1, 2, 5], n) for n in lengths]  # mostly single draws
    lps = [-rng.random(n).astype(np.float32) for n in lengths]
    s = Sampled.from_lists(ids, counts, lps)
    enc = encode_sampled(s.offsets, s.ids, s.counts, s.logprobs, dtype="uint16")
    assert np.all(enc.multi_counts >= 2) and len(enc.multi_counts) == (s.counts > 1).sum()
    offsets, back_ids, back_counts = decode_sampled(enc.nuniq, enc.nmulti, enc.id_deltas,
                                                    enc.multi_counts)
    np.testing.assert_array_equal(offsets, s.offsets)
    for t in range(len(lengths)):
        a, b = offsets[t], offsets[t + 1]
        got = dict(zip(back_ids[a:b].tolist(), zip(back_counts[a:b].tolist(),
                                                   enc.logprobs[a:b].tolist())))
        assert got == dict(zip(ids[t].tolist(), zip(counts[t].tolist(), lps[t].tolist())))


def test_derived_tail_when_not_given(tmp_path):
    s = settings_for(k=2, n_draws=0, hidden=None, attention=None)
    topk = TopK(np.array([[3, 9]]), np.log(np.array([[0.5, 0.25]], dtype=np.float32)))
    sample = Sample("only", np.array([5]), np.array([True]), signals={"teacher": SignalData(topk)})
    with StoreWriter(str(tmp_path), s) as w:
        w.add(sample)
    got = StoreReader(str(tmp_path)).sample("only").signals["teacher"].topk
    assert abs(np.exp(got.tail()[0]) - 0.25) < 0.25 * 0.04
