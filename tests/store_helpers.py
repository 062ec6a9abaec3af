"""Shared helpers for the store tests (import as `from store_helpers import ...`).

- `make_settings(**overrides)`: small, fast `StoreSettings` (vocab 500, tiny chunks and
  segments, so a few dozen samples already span several segments and chunks) with one
  signal "teacher" capturing top-k, sampled, hidden and attention.
- `make_samples(n, seed, settings=None, ...)`: deterministic synthetic samples matching
  `settings` (every signal it declares), with varied lengths (1-token samples included),
  sources, splits and tags. The same arguments give the same samples in any process.
- `content_of(reader)`: a store's decoded content as `{sample_id: {field: value}}`,
  independent of layout (parts, segments, store order); `content_differences(a, b)` lists
  how two such dicts differ.
- `assert_same_content(reader_a, reader_b)`: both stores hold the same ids and, for each
  id, the same source, split, tags, tokens, loss mask and every signal array bit for bit
  (top-k and sampled entries compared per position as sets), and the same
  dataset_fingerprint (FORMAT.md section 6, "the same store").
- `assert_sample_matches(original, stored, settings)`: a stored sample against the sample
  that was written, within the documented quantisation error of each encoding.
- `store_files(path)`: relative paths of all files under a local store directory.

Nothing here depends on pytest, so writer subprocesses (tests/crash_writer.py) can use it.
"""

from __future__ import annotations

import os
from typing import Any, Iterable

import numpy as np

from logitstore.format import (AttentionSpec, HiddenSpec, SampledSpec, SignalSpec, StoreSettings,
                               TopKSpec)
from logitstore.sample import Sample
from synthetic import ZipfTeacher, random_sample

VOCAB = 500


def make_signal(k: int | None = 4, n_draws: int | None = 8, hidden: tuple[int, int] | None = (2, 4),
                attention: tuple[int, int, int] | None = (1, 1, 3), encoding: str = "q8",
                temperature: float = 1.0) -> SignalSpec:
    """A SignalSpec; pass None for a capture to leave it out. attention = (layers, heads, grid)."""
    return SignalSpec(
        topk=TopKSpec(k, encoding) if k else None,
        sampled=SampledSpec(n_draws, temperature, encoding) if n_draws else None,
        hidden=HiddenSpec(tuple(range(hidden[0])), hidden[1]) if hidden else None,
        attention=AttentionSpec(tuple(range(attention[0])), attention[1], attention[2],
                                heads="mean" if attention[1] == 1 else "all")
        if attention else None,
        teacher={"model_id": "synthetic-zipf"})


def make_settings(**overrides: Any) -> StoreSettings:
    """Small settings: vocab 500, chunk_tokens 16, segment_tokens 64, chunk_samples 3.

    Any StoreSettings field can be overridden, e.g. `make_settings(segment_tokens=32,
    signals={"a": make_signal(k=2), "b": make_signal(n_draws=None, encoding="f32")})`.
    """
    base: dict[str, Any] = dict(vocab_size=VOCAB, tokenizer_fingerprint="ab" * 32,
                                tokenizer_name="synthetic", chunk_tokens=16, segment_tokens=64,
                                chunk_samples=3, signals={"teacher": make_signal()})
    base.update(overrides)
    settings = StoreSettings(**base)
    settings.validate()
    return settings


def sample_lengths(n: int, seed: int, max_len: int = 40) -> list[int]:
    """Varied lengths in 1..max_len; every 7th sample (0, 7, 14, ...) has exactly 1 token."""
    rng = np.random.default_rng([seed, 1])
    return [1 if i % 7 == 0 else int(rng.integers(2, max_len + 1)) for i in range(n)]


def make_samples(n: int, seed: int = 0, settings: StoreSettings | None = None, *,
                 lengths: list[int] | None = None, max_len: int = 40,
                 id_prefix: str = "doc") -> list[Sample]:
    """n deterministic samples matching `settings` (default `make_settings()`).

    Sample i depends only on (seed, i): make_samples(n, s) is a prefix of
    make_samples(n + m, s). Ids are f"{id_prefix}-{seed}-{i:05d}"; lengths come from
    `sample_lengths` (samples 0, 7, 14, ... have 1 token). Tags: none on samples 0, 5,
    10, ...; the others have `lang` (str) and `turn` (int), most `reviewed` (bool), a few
    `note` (str). Sources alternate between two names; every 6th sample is "validation".
    """
    settings = settings or make_settings()
    lengths = lengths if lengths is not None else sample_lengths(n, seed, max_len)
    teacher = ZipfTeacher(vocab_size=settings.vocab_size)
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, 2, i])
        if i % 5 == 0:
            tags: dict[str, Any] = {}
        else:
            tags = {"lang": ["en", "fr", "de"][i % 3], "turn": i % 4}
            if i % 3:
                tags["reviewed"] = bool(i % 2)
            if i % 11 == 1:
                tags["note"] = f"note {i}"
        sample = None
        for name, spec in settings.signals.items():
            one = random_sample(
                rng, f"{id_prefix}-{seed}-{i:05d}", lengths[i], teacher,
                k=spec.topk.k if spec.topk else None,
                n_draws=spec.sampled.n_draws if spec.sampled else None,
                temperature=spec.sampled.temperature if spec.sampled else 1.0,
                hidden=(len(spec.hidden.layers), spec.hidden.dim) if spec.hidden else None,
                attention=(len(spec.attention.layers), spec.attention.num_heads,
                           spec.attention.grid) if spec.attention else None,
                signal=name, tags=tags)
            if sample is None:
                sample = one
                sample.source = f"synthetic/{['pubmed', 'notes'][i % 2]}"
                sample.split = "validation" if i % 6 == 5 else "train"
            else:
                sample.signals[name] = one.signals[name]
        out.append(sample)
    return out


# -- comparing stores ---------------------------------------------------------------------

def _canonical_topk(topk) -> dict[str, np.ndarray]:
    """Entries of each position sorted by id (as stored), so comparison = set comparison."""
    ids = np.asarray(topk.ids, dtype=np.int64)
    lps = np.asarray(topk.logprobs)
    order = np.argsort(ids, axis=1, kind="stable")
    return {"ids": np.take_along_axis(ids, order, axis=1),
            "logprobs": np.take_along_axis(lps, order, axis=1),
            "tail": np.asarray(topk.tail())}


def _canonical_sampled(sampled) -> dict[str, np.ndarray]:
    """Per position, entries sorted by id: (offsets, ids, counts, logprobs when stored)."""
    offsets = np.asarray(sampled.offsets, dtype=np.int64)
    ids = np.asarray(sampled.ids, dtype=np.int64)
    position = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    order = np.lexsort((ids, position))
    out = {"offsets": offsets, "ids": ids[order],
           "counts": np.asarray(sampled.counts, dtype=np.int64)[order]}
    if sampled.logprobs is not None:
        out["logprobs"] = np.asarray(sampled.logprobs)[order]
    return out


def sample_content(sample: Sample) -> dict[str, Any]:
    """Layout-independent content of one sample: plain values and numpy arrays."""
    out: dict[str, Any] = {
        "source": sample.source, "split": sample.split,
        "tags": {k: v for k, v in sample.tags.items() if v is not None},
        "input_ids": np.asarray(sample.input_ids, dtype=np.int64),
        "loss_mask": np.asarray(sample.loss_mask, dtype=bool),
    }
    for name in sorted(sample.signals):
        sig = sample.signals[name]
        if sig.topk is not None:
            for key, value in _canonical_topk(sig.topk).items():
                out[f"{name}/topk/{key}"] = value
        if sig.sampled is not None:
            for key, value in _canonical_sampled(sig.sampled).items():
                out[f"{name}/sampled/{key}"] = value
        if sig.hidden is not None:
            out[f"{name}/hidden"] = np.asarray(sig.hidden)
        if sig.attention is not None:
            out[f"{name}/attention"] = np.asarray(sig.attention)
    return out


def content_of(reader, *, via: str = "iter", ids: Iterable[str] | None = None
               ) -> dict[str, dict[str, Any]]:
    """{sample_id: sample_content(...)} of a StoreReader.

    via="iter" streams whole segments (`iter_samples`); via="random" reads each sample by
    id (`reader.sample(id)`), i.e. the random-access path. `ids` restricts to those ids
    (random access only).
    """
    if via == "iter":
        if ids is not None:
            raise ValueError("ids= needs via='random'")
        out = {}
        for sample in reader.iter_samples():
            assert sample.sample_id not in out, f"sample {sample.sample_id!r} read twice"
            out[sample.sample_id] = sample_content(sample)
        return out
    if via == "random":
        return {sid: sample_content(reader.sample(sid))
                for sid in (reader.sample_ids if ids is None else ids)}
    raise ValueError(f"via must be 'iter' or 'random', found {via!r}")


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        return a.shape == b.shape and a.dtype == b.dtype and \
            bool(np.array_equal(a, b, equal_nan=a.dtype.kind == "f"))
    return a == b


def content_differences(a: dict[str, dict[str, Any]], b: dict[str, dict[str, Any]],
                        limit: int = 10) -> list[str]:
    """Human-readable differences between two content_of() results ([] when equal)."""
    problems = []
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if only_a:
        problems.append(f"{len(only_a)} id(s) only in the first: {only_a[:5]}")
    if only_b:
        problems.append(f"{len(only_b)} id(s) only in the second: {only_b[:5]}")
    for sid in sorted(set(a) & set(b)):
        ca, cb = a[sid], b[sid]
        for key in sorted(set(ca) | set(cb)):
            if key not in ca or key not in cb:
                problems.append(f"{sid}: field {key!r} present in only one store")
            elif not _equal(ca[key], cb[key]):
                problems.append(f"{sid}: {key} differs: {ca[key]!r} != {cb[key]!r}")
        if len(problems) >= limit:
            break
    return problems[:limit]


def assert_same_content(reader_a, reader_b, *, via: str = "iter") -> None:
    """Same set of ids, identical per-id content (order and layout may differ) and equal
    dataset fingerprints. via="iter" reads whole segments, via="random" each sample by id."""
    a = content_of(reader_a, via=via)
    b = content_of(reader_b, via=via)
    problems = content_differences(a, b)
    assert not problems, "stores differ:\n  " + "\n  ".join(problems)
    assert len(a) == len(reader_a) and len(b) == len(reader_b)
    assert reader_a.manifest["dataset_fingerprint"] == reader_b.manifest["dataset_fingerprint"]


def assert_sample_matches(original: Sample, stored: Sample, settings: StoreSettings) -> None:
    """A stored sample equals the written one: ids, mask, tags exactly; log-probs and float
    arrays within the documented error of their encoding (q8: step/2; f16: 2**-11 relative)."""
    assert stored.sample_id == original.sample_id
    np.testing.assert_array_equal(stored.input_ids, np.asarray(original.input_ids))
    np.testing.assert_array_equal(stored.loss_mask, np.asarray(original.loss_mask, dtype=bool))
    assert stored.source == original.source and stored.split == original.split
    assert stored.tags == {k: v for k, v in original.tags.items() if v is not None}
    for name, spec in settings.signals.items():
        want, got = original.signals[name], stored.signals[name]
        if spec.topk:
            w, g = _canonical_topk(want.topk), _canonical_topk(got.topk)
            np.testing.assert_array_equal(g["ids"], w["ids"])
            _assert_lp_close(g["logprobs"], w["logprobs"], spec.topk, spec.topk.logprob_step)
            _assert_lp_close(g["tail"], w["tail"], spec.topk, spec.topk.logprob_step)
        if spec.sampled:
            w, g = _canonical_sampled(want.sampled), _canonical_sampled(got.sampled)
            for key in ("offsets", "ids", "counts"):
                np.testing.assert_array_equal(g[key], w[key])
            if spec.sampled.logprobs:
                steps = np.where(w["counts"] == 1, spec.sampled.singleton_step,
                                 spec.sampled.logprob_step)
                _assert_lp_close(g["logprobs"], w["logprobs"], spec.sampled, steps)
            else:
                assert got.sampled.logprobs is None, "log-probs read from a signal without them"
        for kind in ("hidden", "attention"):
            cap = getattr(spec, kind)
            if cap:
                expected = np.asarray(getattr(want, kind)).astype(cap.dtype).astype(np.float32)
                np.testing.assert_array_equal(getattr(got, kind), expected)


def _assert_lp_close(got, want, spec, step) -> None:
    """q8: |got - max(want, -255 step)| <= step/2; f16: want rounded to half; f32: exact."""
    want = np.asarray(want, dtype=np.float64)
    got = np.asarray(got, dtype=np.float64)
    if spec.logprob_encoding == "f32":
        np.testing.assert_array_equal(got, want)
    elif spec.logprob_encoding == "f16":
        np.testing.assert_array_equal(got, want.astype(np.float16).astype(np.float64))
    else:
        step = np.asarray(step, dtype=np.float64)
        err = np.abs(got - np.maximum(want, -255 * step))
        assert np.all(err <= step / 2 + 1e-6), f"q8 log-probs off by up to {err.max()}"


# -- files --------------------------------------------------------------------------------

def store_files(root: str | os.PathLike) -> set[str]:
    """Relative paths ('/'-separated) of every file under a local store directory."""
    root = os.fspath(root)
    out = set()
    for dirpath, _, names in os.walk(root):
        for name in names:
            out.add(os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/"))
    return out


def settings_json(settings: StoreSettings) -> str:
    """Settings as a JSON string (to hand to a writer subprocess)."""
    import json

    return json.dumps(settings.to_json())


def settings_from_json(text: str) -> StoreSettings:
    import json

    return StoreSettings.from_json(json.loads(text))


def cli(*args):
    """Run `logitstore ARGS` in process; an exception other than the exit itself fails the test."""
    from click.testing import CliRunner

    from logitstore.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        result.exc_info
    return result


def one_paragraph_error(result) -> str:
    """The one line `logitstore: error: ...` of a command that failed with exit status 1."""
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("logitstore: error: "), result.output
    return lines[0]
