"""Encode a batch of samples into one immutable segment: zarr v3 arrays + a Parquet index.

A segment is written once and never modified, so every array is a single zarr shard
written in one go (zarr rewrites a whole shard on a partial write; buffering to a full
segment avoids that), and its files can be checksummed as they are produced.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import zarr
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec
from zarr.storage import MemoryStore

from logitstore.encoding import encode_logprobs, encode_sampled, encode_topk_ids
from logitstore.errors import LogitStoreError, SchemaMismatchError
from logitstore.format import (INDEX_COLUMNS, SEGMENT_INDEX, SignalSpec, StoreSettings,
                               int_dtype_for, signal_array, tokenization_array)
from logitstore.parquet_io import table_to_bytes
from logitstore.sample import Sample, SignalData
from logitstore.text_spans import (TEXT_CHUNK_FACTOR, TEXT_SAMPLE_BYTES, TEXT_UTF8, encode_texts,
                                   sample_text_problem)
from logitstore.tokenized import SAMPLE_ARRAYS, encode_tokenized, tokenized_problem


@dataclass
class EncodedSegment:
    files: dict[str, bytes]  # path relative to the segment directory -> bytes
    samples: int
    tokens: int
    target_tokens: int
    sampled_entries: dict[str, int]  # signal -> ids stored
    sampled_multi: dict[str, int]  # signal -> counts stored (ids drawn more than once)
    sample_ids: list[str]


def sample_digest(sample_id: str, input_ids: np.ndarray) -> str:
    """sha256 over the id and the token ids (int64 little-endian): the dataset fingerprint's unit."""
    h = hashlib.sha256(sample_id.encode("utf-8") + b"\0")
    h.update(np.ascontiguousarray(input_ids, dtype="<i8").tobytes())
    return h.hexdigest()


def _codecs(dtype: np.dtype):
    # Measured (bench/store_bench.py and a paired codec study on the synthetic teacher):
    # byte-shuffle packs multi-byte id deltas best; for one-byte codes (q8 log-probs, draw
    # counts) it is the same as no shuffle and 4-5 % smaller than bitshuffle on a sampled
    # signal; bitshuffle stays for floats. The crc32c inside each chunk lets readers detect
    # corruption without hashing whole files.
    shuffle = BloscShuffle.bitshuffle if dtype.kind == "f" else BloscShuffle.shuffle
    return [BloscCodec(cname="zstd", clevel=7, shuffle=shuffle, typesize=dtype.itemsize),
            Crc32cCodec()]


def _put(group, name: str, data: np.ndarray, chunk_rows: int) -> None:
    rows = max(1, min(chunk_rows, data.shape[0]))
    chunks = (rows,) + data.shape[1:]
    shard_rows = -(-max(data.shape[0], 1) // rows) * rows
    arr = group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=chunks,
                             shards=(shard_rows,) + data.shape[1:],
                             compressors=_codecs(data.dtype), fill_value=0)
    if data.size:
        arr[...] = data


def validate_sample(sample: Sample, settings: StoreSettings) -> None:
    """Raise SchemaMismatchError naming the sample and what is wrong with it."""
    where = f"sample {sample.sample_id!r}"
    if not isinstance(sample.sample_id, str) or not sample.sample_id:
        raise SchemaMismatchError(f"sample_id must be a non-empty string, found {sample.sample_id!r}")
    ids = np.asarray(sample.input_ids)
    if ids.ndim != 1 or len(ids) < 1 or not np.issubdtype(ids.dtype, np.integer):
        raise SchemaMismatchError(f"{where}: input_ids must be a non-empty 1-D integer array, "
                                  f"found shape {ids.shape} dtype {ids.dtype}")
    if ids.min() < 0 or ids.max() >= settings.vocab_size:
        raise SchemaMismatchError(f"{where}: token ids must be in [0, {settings.vocab_size}), "
                                  f"found [{ids.min()}, {ids.max()}]")
    if np.asarray(sample.loss_mask).shape != ids.shape:
        raise SchemaMismatchError(f"{where}: loss_mask shape {np.asarray(sample.loss_mask).shape} "
                                  f"!= input_ids shape {ids.shape}")
    check_tags(sample.tags, INDEX_COLUMNS, where)
    if settings.text:
        _check_text(sample, len(ids))
    _check_tokenizations(sample, settings)
    if set(sample.signals) != set(settings.signals):
        raise SchemaMismatchError(f"{where}: signals {sorted(sample.signals)} != store signals "
                                  f"{sorted(settings.signals)}")
    for name, spec in settings.signals.items():
        data = sample.signals[name]
        # a signal on an extra tokenization has that tokenization's positions (2.2)
        length = len(ids) if spec.tokenization is None else \
            len(sample.tokenizations[spec.tokenization])
        for kind in ("topk", "sampled", "hidden", "attention"):
            if (getattr(spec, kind) is None) != (getattr(data, kind) is None):
                state = "captured" if getattr(spec, kind) else "not captured"
                raise SchemaMismatchError(f"{where}: signal {name!r} {kind} is {state} in the "
                                          f"store settings but the sample disagrees")
        if spec.topk:
            shape = (length, spec.topk.k)
            for arr_name in ("ids", "logprobs"):
                found = np.shape(getattr(data.topk, arr_name))
                if found != shape:
                    raise SchemaMismatchError(f"{where}: signal {name!r} topk {arr_name} shape "
                                              f"{found}, expected {shape} (k={spec.topk.k})")
            _check_ids(data.topk.ids, settings.signal_vocab_size(name),
                       f"{where}: signal {name!r} topk")
        if spec.sampled:
            s = data.sampled
            if len(s.offsets) != length + 1 or s.offsets[0] != 0 or np.any(np.diff(s.offsets) < 1):
                raise SchemaMismatchError(f"{where}: signal {name!r} sampled offsets must have "
                                          f"{length + 1} non-decreasing entries starting at 0, "
                                          f"each position with >= 1 id")
            n_entries = int(s.offsets[-1])
            arrays = [s.ids, s.counts] + ([s.logprobs] if spec.sampled.logprobs else [])
            if any(a is None or len(a) != n_entries for a in arrays):
                stored = "ids/counts/logprobs" if spec.sampled.logprobs else "ids/counts"
                raise SchemaMismatchError(f"{where}: signal {name!r} sampled {stored} must each "
                                          f"have {n_entries} entries")
            _check_ids(s.ids, settings.signal_vocab_size(name), f"{where}: signal {name!r} sampled")
            sums = np.add.reduceat(np.asarray(s.counts, dtype=np.int64), s.offsets[:-1])
            if np.any(sums != spec.sampled.n_draws):
                t = int(np.argmax(sums != spec.sampled.n_draws))
                raise SchemaMismatchError(f"{where}: signal {name!r} sampled counts at position "
                                          f"{t} sum to {sums[t]}, expected n_draws="
                                          f"{spec.sampled.n_draws}")
        if spec.hidden:
            expected = (len(spec.hidden.layers), spec.hidden.dim)
            if np.shape(data.hidden) != expected:
                raise SchemaMismatchError(f"{where}: signal {name!r} hidden shape "
                                          f"{np.shape(data.hidden)}, expected {expected}")
        if spec.attention:
            a = spec.attention
            expected = (len(a.layers), a.num_heads, a.grid, a.grid)
            if np.shape(data.attention) != expected:
                raise SchemaMismatchError(f"{where}: signal {name!r} attention shape "
                                          f"{np.shape(data.attention)}, expected {expected}")


def check_tags(tags: dict[str, Any], reserved, where: str) -> None:
    """Tags are plain values (str/int/float/bool/None) under names no index column has."""
    bad_tags = sorted(set(tags) & set(reserved))
    if bad_tags:
        raise SchemaMismatchError(f"{where}: tag names {bad_tags} are reserved index columns; "
                                  f"rename them")
    for tag, value in tags.items():
        if value is not None and not isinstance(value, (str, int, float, bool, np.generic)):
            raise SchemaMismatchError(f"{where}: tag {tag!r} must be str/int/float/bool/None, "
                                      f"found {type(value).__name__}")


def _check_text(sample: Sample, length: int) -> None:
    """A store with text needs every sample's text and spans, sound (text_spans.py)."""
    where = f"sample {sample.sample_id!r}"
    t = sample.text_spans
    if t is None:
        raise SchemaMismatchError(
            f"{where} has no text: this store keeps each sample's text and token spans "
            f"(settings `text`), expected Sample.text_spans; give them, or write the store "
            f"without text (teacher-dump --no-text)")
    problem = sample_text_problem(t.text, t.spans, t.special, t.roles, length)
    if problem:
        raise SchemaMismatchError(f"{where}: {problem}; expected byte spans [start, end) of "
                                  f"each token in the UTF-8 text (logitstore/text_spans.py)")


def _check_tokenizations(sample: Sample, settings: StoreSettings) -> None:
    """2.2: the sample's text cut by every extra tokenization of the store, sound
    (logitstore/tokenized.py); none that the store does not list."""
    where = f"sample {sample.sample_id!r}"
    if set(sample.tokenizations) != set(settings.tokenizations):
        raise SchemaMismatchError(
            f"{where}: tokenizations {sorted(sample.tokenizations)} != the store's "
            f"{sorted(settings.tokenizations)}; give the sample's text cut by each tokenizer "
            f"the store lists (Sample.tokenizations)")
    for name, spec in settings.tokenizations.items():
        problem = tokenized_problem(sample.tokenizations[name], spec.vocab_size,
                                    len(sample.text_spans.text.encode("utf-8")))
        if problem:
            raise SchemaMismatchError(f"{where}: tokenization {name!r}: {problem}; expected its "
                                      f"tokens' byte spans in the sample's text "
                                      f"(logitstore/tokenized.py)")


def _check_ids(ids, vocab_size: int, where: str) -> None:
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise SchemaMismatchError(f"{where} ids must be in [0, {vocab_size}), "
                                  f"found [{ids.min()}, {ids.max()}]")


def encode_segment(samples: list[Sample], settings: StoreSettings) -> EncodedSegment:
    """Samples (already validated) -> files of one segment."""
    if not samples:
        raise LogitStoreError("cannot encode an empty segment")
    lengths = np.array([len(s.input_ids) for s in samples], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    tokens = int(offsets[-1])
    ct = settings.chunk_tokens
    input_ids = np.concatenate([np.asarray(s.input_ids) for s in samples])
    loss_mask = np.concatenate([np.asarray(s.loss_mask, dtype=bool) for s in samples])

    mem = MemoryStore()
    group = zarr.open_group(mem, mode="w", zarr_format=3)
    _put(group, "input_ids", input_ids.astype(settings.token_dtype), ct)
    _put(group, "loss_mask", loss_mask, ct)
    if settings.text:
        chunk_rows = {TEXT_UTF8: TEXT_CHUNK_FACTOR * ct, TEXT_SAMPLE_BYTES: settings.chunk_samples}
        for name, data in encode_texts([s.text_spans for s in samples]).arrays().items():
            _put(group, name, data, chunk_rows.get(name, ct))
    for tok, spec in settings.tokenizations.items():
        put_tokenized(group, tok, encode_tokenized([s.tokenizations[tok] for s in samples],
                                                   spec.token_dtype), settings)
    entries: dict[str, int] = {}
    multi: dict[str, int] = {}
    for name, spec in settings.signals.items():
        n = _put_signal(group, name, spec, [s.signals[name] for s in samples], settings)
        if n is not None:
            entries[name], multi[name] = n
    files = {key: buf.to_bytes() for key, buf in mem._store_dict.items()}
    files[SEGMENT_INDEX] = _index_bytes(samples, offsets, lengths)
    return EncodedSegment(files=files, samples=len(samples), tokens=tokens,
                          target_tokens=int(loss_mask.sum()), sampled_entries=entries,
                          sampled_multi=multi, sample_ids=[s.sample_id for s in samples])


def put_tokenized(group, tokenization: str, arrays: dict[str, np.ndarray],
                  settings: StoreSettings) -> None:
    """2.2: one extra tokenization's arrays (tokenized.encode_tokenized) into a segment group."""
    for name, data in arrays.items():
        rows = settings.chunk_samples if name in SAMPLE_ARRAYS else settings.chunk_tokens
        _put(group, tokenization_array(tokenization, name), data, rows)


def encode_signal(name: str, spec: SignalSpec, data: list[SignalData],
                  settings: StoreSettings, tokenized: dict[str, np.ndarray] | None = None
                  ) -> tuple[dict[str, bytes], tuple[int, int] | None]:
    """One signal's arrays for the samples of an existing segment (in segment order), and
    with `tokenized` (2.2: the encoded arrays of the signal's new tokenization) those too.

    Returns the files (paths relative to the segment directory) and, for sampled targets,
    (ids stored, counts stored).
    """
    mem = MemoryStore()
    group = zarr.open_group(mem, mode="w", zarr_format=3)
    entries = _put_signal(group, name, spec, data, settings)
    if tokenized is not None:
        put_tokenized(group, spec.tokenization, tokenized, settings)
    files = {key: buf.to_bytes() for key, buf in mem._store_dict.items()
             if key.startswith(("signals/", "tokenizations/"))}
    return files, entries


def _put_signal(group, name: str, spec: SignalSpec, sig: list[SignalData],
                settings: StoreSettings) -> tuple[int, int] | None:
    """Write one signal's arrays into a segment group; returns (ids, counts) stored."""
    ct, cs = settings.chunk_tokens, settings.chunk_samples
    id_dtype = int_dtype_for(settings.signal_vocab_size(name) - 1)
    entries = None
    if spec.topk:
        ids = np.concatenate([d.topk.ids for d in sig])
        lps = np.concatenate([d.topk.logprobs for d in sig])
        tail = np.concatenate([d.topk.tail() for d in sig])
        deltas, sorted_lp = encode_topk_ids(ids, lps, id_dtype)
        _put(group, signal_array(name, "topk_ids"), deltas, ct)
        _put(group, signal_array(name, "topk_logprobs"),
             encode_logprobs(sorted_lp, spec.topk.logprob_encoding, spec.topk.logprob_step), ct)
        _put(group, signal_array(name, "topk_tail"),
             encode_logprobs(tail, spec.topk.logprob_encoding, spec.topk.logprob_step), ct)
    if spec.sampled:
        nuniq = np.concatenate([np.diff(d.sampled.offsets) for d in sig])
        # A signal without log-probs ignores any the samples hold.
        stored = ("ids", "counts") + (("logprobs",) if spec.sampled.logprobs else ())
        flat = [np.concatenate([getattr(d.sampled, a) for d in sig]) for a in stored]
        enc = encode_sampled(np.concatenate([[0], np.cumsum(nuniq)]), *flat[:2],
                             flat[2] if spec.sampled.logprobs else None, dtype=id_dtype)
        count_dtype = int_dtype_for(spec.sampled.n_draws)
        entry_rows = ct * max(1, spec.sampled.n_draws // 4)
        steps = np.where(enc.single, spec.sampled.singleton_step, spec.sampled.logprob_step)
        _put(group, signal_array(name, "sampled_nuniq"), nuniq.astype(count_dtype), ct)
        _put(group, signal_array(name, "sampled_nmulti"), enc.nmulti.astype(count_dtype), ct)
        _put(group, signal_array(name, "sampled_ids"), enc.id_deltas, entry_rows)
        _put(group, signal_array(name, "sampled_counts"), enc.multi_counts.astype(count_dtype),
             entry_rows)
        if spec.sampled.logprobs:
            _put(group, signal_array(name, "sampled_logprobs"),
                 encode_logprobs(enc.logprobs, spec.sampled.logprob_encoding, steps), entry_rows)
        entries = (int(len(enc.id_deltas)), int(len(enc.multi_counts)))
    if spec.hidden:
        _put(group, signal_array(name, "hidden"),
             np.stack([d.hidden for d in sig]).astype(spec.hidden.dtype), cs)
    if spec.attention:
        _put(group, signal_array(name, "attention"),
             np.stack([d.attention for d in sig]).astype(spec.attention.dtype), cs)
    return entries


def _index_bytes(samples: list[Sample], offsets: np.ndarray, lengths: np.ndarray) -> bytes:
    columns = {
        "sample_id": pa.array([s.sample_id for s in samples], pa.string()),
        "source": pa.array([s.source for s in samples], pa.string()),
        "split": pa.array([s.split for s in samples], pa.string()),
        "segment_offset": pa.array(offsets[:-1], pa.int64()),
        "length": pa.array(lengths, pa.int64()),
        "digest": pa.array([sample_digest(s.sample_id, s.input_ids) for s in samples], pa.string()),
    }
    columns.update(tag_columns(samples))
    return table_to_bytes(pa.table(columns))


def tag_columns(samples) -> dict[str, pa.Array]:
    """{tag: column} of the free tags of `samples` (anything with a `tags` dict; classifier
    samples too), in name order; null where a sample lacks the tag."""
    columns = {}
    for tag in sorted({t for s in samples for t in s.tags}):
        values = [_plain(s.tags.get(tag)) for s in samples]
        try:
            columns[tag] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            columns[tag] = pa.array([None if v is None else str(v) for v in values], pa.string())
    return columns


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value
