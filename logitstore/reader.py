"""Read a committed store: numpy out, random access by sample id, streaming by segment.

Only the committed state is read (logitstore/snapshot.py: the consolidated state plus the
segments the heads of followed parts have committed since, as of the open), so segments
still being written are invisible. At open the manifest is checked against its seal, the
heads and records read against theirs and their hash chain, and every sample index against
its recorded sha256; chunk data carries a crc32c per chunk, checked by zarr on every read.
A file the committed state lists that is absent is refused when first read
(MissingFileError naming it), never read as zeros. A failure of the storage (timeout,
permission, credentials) is raised as StoreIOError naming the URL, never as damage.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import zarr
from zarr.storage import WrapperStore

from logitstore.classifier_sample import require_kind
from logitstore.commit import require_committed
from logitstore.encoding import decode_logprobs, decode_sampled, decode_topk_ids
from logitstore.errors import (ChecksumError, LogitStoreError, UnknownSampleError,
                               UnknownSignalError)
from logitstore.format import (CAUSAL_LM, PARTS_DIR, TOKENIZER_DIR, StoreSettings,
                               signal_array, tokenization_array)
from logitstore.fs import StoreFS, sha256_hex, storage_error
from logitstore.records import missing
from logitstore.sample import Sample, Sampled, SignalData, TopK
from logitstore.snapshot import read_snapshot
from logitstore.text_spans import (SPAN_GAP, SPAN_LENGTH, TEXT_SAMPLE_BYTES, TEXT_UTF8, TOKEN_KIND,
                                   SampleText, decode_sample_text)
from logitstore.tokenized import (COVERED_BYTES, SAMPLE_TOKENS, TOKEN_ARRAYS, Tokenized,
                                  decode_tokenized)


@dataclass
class SegmentRef:
    part: str
    name: str
    first_sample: int  # position of its first sample in store order
    samples: int
    tokens: int

    @property
    def path(self) -> str:
        return f"{PARTS_DIR}/{self.part}/{self.name}"


class StoreReader:
    """A committed store at any fsspec URL (optionally through a local read cache)."""

    def __init__(self, url: str, *, storage_options: dict | None = None,
                 cache_dir: str | None = None):
        self.fs = StoreFS(url, storage_options, cache_dir=cache_dir)
        require_committed(self.fs)
        snapshot = read_snapshot(self.fs)
        # The manifest's bytes as read: what this reader's view of the store was built from.
        self.manifest_bytes = snapshot.root_raw
        # The committed state in the shape of a 1.1 store manifest (logitstore/snapshot.py).
        self.manifest: dict[str, Any] = snapshot.view
        self.index: pa.Table = snapshot.index
        self.settings = StoreSettings.from_json(self.manifest["settings"])
        self.sample_ids: list[str] = self.index.column("sample_id").to_pylist()
        self._row_of = {sid: i for i, sid in enumerate(self.sample_ids)}
        self._seg_of_row = np.zeros(len(self.sample_ids), dtype=np.int64)
        self.segments: list[SegmentRef] = []
        first = 0
        for part in self.manifest["parts"]:
            for seg in part["segments"]:
                self._seg_of_row[first:first + seg["samples"]] = len(self.segments)
                self.segments.append(SegmentRef(part["name"], seg["name"], first, seg["samples"],
                                                seg["tokens"]))
                first += seg["samples"]
        self._local_offset = self.index.column("segment_offset").to_numpy()
        self._length = self.index.column("length").to_numpy()
        self._zstore = ListedFiles(self.fs, self.manifest["files"])
        self._arrays: OrderedDict[str, Any] = OrderedDict()
        self._nuniq_cache: OrderedDict[tuple[int, str], np.ndarray] = OrderedDict()
        self._text_offsets: OrderedDict[int, np.ndarray] = OrderedDict()
        self._token_offsets: OrderedDict[tuple[int, str], np.ndarray] = OrderedDict()

    # -- metadata -------------------------------------------------------------------------

    @property
    def kind(self) -> str:
        """`causal-lm` (tokens and per-token signals) or (2.3) `classifier` (per-sample
        heads and features: read those with logitstore.classifier_reader.ClassifierReader)."""
        return self.settings.kind

    @property
    def signals(self) -> list[str]:
        return list(self.settings.signals)

    def __len__(self) -> int:
        return len(self.sample_ids)

    @property
    def num_tokens(self) -> int:
        return int(self.manifest["counts"]["tokens"])

    @property
    def has_text(self) -> bool:
        """Whether every sample holds its text and token spans (format 2.1 `text`)."""
        return self.settings.text

    @property
    def tokenizations(self) -> list[str]:
        """The extra tokenizations of the store (format 2.2), by name."""
        return list(self.settings.tokenizations)

    def tokenizer_files(self, tokenization: str | None = None) -> dict[str, bytes]:
        """The tokenizer's files stored in the store (format 2.1), by file name
        (`tokenizer.json`, ...), each checked against its sha256; {} when it holds none.
        `tokenization`: those of that extra tokenization (2.2) instead of the store's own."""
        out = {}
        listed = self.settings.tokenizer_files if tokenization is None else \
            self.settings.tokenizations[tokenization].tokenizer_files
        folder = TOKENIZER_DIR if tokenization is None else f"{TOKENIZER_DIR}/{tokenization}"
        for rel, meta in sorted(listed.items()):
            try:
                data = self.fs.read_bytes(rel, meta["size"])
            except FileNotFoundError:
                raise missing(self.fs, rel, "a tokenizer file the store settings list") from None
            if sha256_hex(data) != meta["sha256"]:
                raise ChecksumError(f"checksum mismatch in {self.fs.path(rel)}: expected sha256 "
                                    f"{meta['sha256']}, found {sha256_hex(data)} (run "
                                    f"`logitstore verify`)", path=rel)
            out[rel[len(folder) + 1:]] = data
        return out

    def tags(self, row: int) -> dict[str, Any]:
        fixed = {"sample_id", "source", "split", "offset", "length", "part", "segment",
                 "segment_offset", "digest"}
        return {c: self.index.column(c)[row].as_py() for c in self.index.column_names
                if c not in fixed and self.index.column(c)[row].as_py() is not None}

    def row(self, key: str | int) -> int:
        if isinstance(key, (int, np.integer)):
            if not -len(self) <= key < len(self):
                raise UnknownSampleError(f"sample index {key} is out of range: the store holds "
                                         f"{len(self)} samples")
            return int(key) % len(self)
        try:
            return self._row_of[key]
        except KeyError:
            raise UnknownSampleError(f"sample id {key!r} is not in {self.fs.url} "
                                     f"({len(self)} samples; e.g. {self.sample_ids[:3]})") from None

    def _check_signals(self, signals) -> list[str]:
        if signals is None:
            return self.signals
        missing = [s for s in signals if s not in self.settings.signals]
        if missing:
            raise UnknownSignalError(f"signal(s) {missing} not in {self.fs.url}; it holds "
                                     f"{self.signals}")
        return list(signals)

    # -- array access -------------------------------------------------------------------

    def _array(self, seg: SegmentRef, name: str):
        key = f"{seg.path}/{name}"
        arr = self._arrays.get(key)
        if arr is None:
            try:
                arr = zarr.open_array(self._zstore, path=key, mode="r", zarr_format=3)
            except LogitStoreError:
                raise  # a listed file that is missing (ListedFiles), named already
            except Exception as err:
                failure = storage_error(err, self.fs.url_of(key))
                if failure is not None:
                    raise failure from err
                # zarr raises many types for a missing or unparsable zarr.json
                raise ChecksumError(f"cannot open array {self.fs.path(key)}: {err}; the store is "
                                    f"damaged (run `logitstore verify`)", path=key) from None
            self._arrays[key] = arr
            if len(self._arrays) > 512:
                self._arrays.popitem(last=False)
        return arr

    def _read(self, seg: SegmentRef, name: str, start: int | None = None,
              stop: int | None = None) -> np.ndarray:
        arr = self._array(seg, name)
        try:
            return arr[start:stop] if (start is not None or stop is not None) else arr[...]
        except LogitStoreError:
            raise  # a listed file that is missing (ListedFiles), named already
        except Exception as err:
            failure = storage_error(err, self.fs.url_of(f"{seg.path}/{name}"))
            if failure is not None:
                raise failure from err
            # a bad crc32c, a truncated shard or shard index: zarr and numcodecs raise many types
            raise ChecksumError(f"cannot read {self.fs.path(seg.path + '/' + name)}: "
                                f"{type(err).__name__}: {err}; the file is damaged or truncated "
                                f"(run `logitstore verify`)", path=f"{seg.path}/{name}") from None

    def _entry_offsets(self, seg_no: int, signal: str) -> tuple[np.ndarray, np.ndarray]:
        """[tokens+1] start of each position's sampled entries, and of its stored counts."""
        key = (seg_no, signal)
        cached = self._nuniq_cache.get(key)
        if cached is None:
            seg = self.segments[seg_no]
            cached = tuple(
                np.concatenate([[0], np.cumsum(self._read(seg, signal_array(signal, a)),
                                               dtype=np.int64)])
                for a in ("sampled_nuniq", "sampled_nmulti"))
            self._nuniq_cache[key] = cached
            if len(self._nuniq_cache) > 64:
                self._nuniq_cache.popitem(last=False)
        return cached

    def _signal(self, seg_no: int, name: str, start: int, stop: int, sample_pos: int,
                sample_stop: int) -> SignalData:
        """Decode positions [start, stop) and per-sample rows [sample_pos, sample_stop)."""
        seg = self.segments[seg_no]
        spec = self.settings.signals[name]
        out = SignalData()
        if spec.topk:
            ids = decode_topk_ids(self._read(seg, signal_array(name, "topk_ids"), start, stop))
            lps = decode_logprobs(self._read(seg, signal_array(name, "topk_logprobs"), start, stop),
                                  spec.topk.logprob_encoding, spec.topk.logprob_step)
            tail = decode_logprobs(self._read(seg, signal_array(name, "topk_tail"), start, stop),
                                   spec.topk.logprob_encoding, spec.topk.logprob_step)
            out.topk = TopK(ids, lps, tail)
        if spec.sampled:
            offs, multi_offs = self._entry_offsets(seg_no, name)
            a, b = int(offs[start]), int(offs[stop])
            ma, mb = int(multi_offs[start]), int(multi_offs[stop])
            nuniq = np.diff(offs[start:stop + 1])
            nmulti = np.diff(multi_offs[start:stop + 1])
            local, ids, counts = decode_sampled(
                nuniq, nmulti, self._read(seg, signal_array(name, "sampled_ids"), a, b),
                self._read(seg, signal_array(name, "sampled_counts"), ma, mb))
            lps = None  # a signal stored without log-probs
            if spec.sampled.logprobs:
                steps = np.where(counts == 1, spec.sampled.singleton_step,
                                 spec.sampled.logprob_step)
                lps = decode_logprobs(self._read(seg, signal_array(name, "sampled_logprobs"),
                                                 a, b), spec.sampled.logprob_encoding, steps)
            out.sampled = Sampled(local, ids, counts, lps)
        if spec.hidden:
            out.hidden = self._read(seg, signal_array(name, "hidden"), sample_pos,
                                    sample_stop).astype(np.float32)
        if spec.attention:
            out.attention = self._read(seg, signal_array(name, "attention"), sample_pos,
                                       sample_stop).astype(np.float32)
        return out

    def _text_byte_offsets(self, seg_no: int) -> np.ndarray:
        """[samples+1] first byte of each sample's text in the segment's text/utf8."""
        offsets = self._text_offsets.get(seg_no)
        if offsets is None:
            sizes = self._read(self.segments[seg_no], TEXT_SAMPLE_BYTES)
            offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
            self._text_offsets[seg_no] = offsets
            if len(self._text_offsets) > 64:
                self._text_offsets.popitem(last=False)
        return offsets

    def _texts(self, seg_no: int, first: int, last: int, start: int,
               stop: int) -> list[SampleText]:
        """Text and spans of the segment's samples first..last-1, whose tokens are
        [start, stop) of the segment."""
        seg = self.segments[seg_no]
        offsets = self._text_byte_offsets(seg_no)
        utf8 = self._read(seg, TEXT_UTF8, int(offsets[first]), int(offsets[last]))
        arrays = [self._read(seg, name, start, stop) for name in (SPAN_GAP, SPAN_LENGTH,
                                                                  TOKEN_KIND)]
        out, token = [], 0
        for j in range(first, last):
            row = seg.first_sample + j
            n = int(self._length[row])
            a, b = (int(offsets[j] - offsets[first]), int(offsets[j + 1] - offsets[first]))
            try:
                out.append(decode_sample_text(utf8[a:b], *(x[token:token + n] for x in arrays)))
            except UnicodeDecodeError as err:
                raise ChecksumError(f"{self.fs.path(seg.path + '/' + TEXT_UTF8)}: the text of "
                                    f"sample {self.sample_ids[row]!r} is not UTF-8 ({err}); the "
                                    f"store is damaged (run `logitstore verify`)",
                                    path=f"{seg.path}/{TEXT_UTF8}") from None
            token += n
        return out

    def _tokenization_offsets(self, seg_no: int, tokenization: str) -> np.ndarray:
        """[samples+1] first token of each sample on a tokenization's axis in the segment."""
        key = (seg_no, tokenization)
        offsets = self._token_offsets.get(key)
        if offsets is None:
            counts = self._read(self.segments[seg_no],
                                tokenization_array(tokenization, SAMPLE_TOKENS))
            offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
            self._token_offsets[key] = offsets
            if len(self._token_offsets) > 64:
                self._token_offsets.popitem(last=False)
        return offsets

    def _tokenized(self, seg_no: int, tokenization: str, first: int,
                   last: int) -> list[Tokenized]:
        """The segment's samples first..last-1 as the tokenization cut them (2.2)."""
        seg = self.segments[seg_no]
        offsets = self._tokenization_offsets(seg_no, tokenization)
        a, b = int(offsets[first]), int(offsets[last])
        arrays = [self._read(seg, tokenization_array(tokenization, name), a, b)
                  for name in TOKEN_ARRAYS]
        covered = self._read(seg, tokenization_array(tokenization, COVERED_BYTES), first, last)
        out = []
        for j in range(first, last):
            lo, hi = int(offsets[j]) - a, int(offsets[j + 1]) - a
            out.append(decode_tokenized(*(x[lo:hi] for x in arrays), covered[j - first]))
        return out

    def _positions(self, seg_no: int, signal: str, first: int, last: int,
                   start: int, stop: int) -> tuple[int, int]:
        """[start, stop) of samples first..last-1 on the axis of `signal`'s positions: the
        store's tokens (given), or its tokenization's (2.2)."""
        tokenization = self.settings.signals[signal].tokenization
        if tokenization is None:
            return start, stop
        offsets = self._tokenization_offsets(seg_no, tokenization)
        return int(offsets[first]), int(offsets[last])

    def _used_tokenizations(self, signals: list[str]) -> list[str]:
        return sorted({self.settings.signals[n].tokenization for n in signals} - {None})

    # -- public reads -------------------------------------------------------------------

    def sample(self, key: str | int, signals: list[str] | None = None) -> Sample:
        """One sample by id or by position in store order (reads only the chunks it spans)."""
        require_kind(self.settings, CAUSAL_LM, "StoreReader.sample", self.fs.url)
        row = self.row(key)
        signals = self._check_signals(signals)
        seg_no = int(self._seg_of_row[row])
        seg = self.segments[seg_no]
        start = int(self._local_offset[row])
        stop = start + int(self._length[row])
        pos = row - seg.first_sample
        sample = self._base_sample(row, self._read(seg, "input_ids", start, stop),
                                   self._read(seg, "loss_mask", start, stop))
        if self.has_text:
            sample.text_spans = self._texts(seg_no, pos, pos + 1, start, stop)[0]
        for tokenization in self._used_tokenizations(signals):
            sample.tokenizations[tokenization] = self._tokenized(seg_no, tokenization, pos,
                                                                 pos + 1)[0]
        for name in signals:
            data = self._signal(seg_no, name, *self._positions(seg_no, name, pos, pos + 1,
                                                               start, stop), pos, pos + 1)
            if data.hidden is not None:
                data.hidden = data.hidden[0]
            if data.attention is not None:
                data.attention = data.attention[0]
            sample.signals[name] = data
        return sample

    def _base_sample(self, row: int, input_ids: np.ndarray, loss_mask: np.ndarray) -> Sample:
        return Sample(sample_id=self.sample_ids[row], input_ids=input_ids.astype(np.int64),
                      loss_mask=loss_mask.astype(bool),
                      source=self.index.column("source")[row].as_py(),
                      split=self.index.column("split")[row].as_py(), tags=self.tags(row))

    def read_segment(self, seg_no: int, signals: list[str] | None = None) -> list[Sample]:
        """Every sample of one segment, decoded from whole shards (sequential streaming)."""
        require_kind(self.settings, CAUSAL_LM, "StoreReader.read_segment", self.fs.url)
        signals = self._check_signals(signals)
        seg = self.segments[seg_no]
        ids = self._read(seg, "input_ids")
        mask = self._read(seg, "loss_mask")
        whole = {name: self._signal(seg_no, name, *self._positions(
                     seg_no, name, 0, seg.samples, 0, seg.tokens), 0, seg.samples)
                 for name in signals}
        texts = self._texts(seg_no, 0, seg.samples, 0, seg.tokens) if self.has_text else None
        tokenized = {t: self._tokenized(seg_no, t, 0, seg.samples)
                     for t in self._used_tokenizations(signals)}
        out = []
        for j in range(seg.samples):
            row = seg.first_sample + j
            a = int(self._local_offset[row])
            b = a + int(self._length[row])
            sample = self._base_sample(row, ids[a:b], mask[a:b])
            sample.text_spans = texts[j] if texts is not None else None
            sample.tokenizations = {t: cut[j] for t, cut in tokenized.items()}
            for name, data in whole.items():
                tokenization = self.settings.signals[name].tokenization
                if tokenization is None:
                    sample.signals[name] = _slice_signal(data, a, b, j)
                else:
                    offsets = self._tokenization_offsets(seg_no, tokenization)
                    sample.signals[name] = _slice_signal(data, int(offsets[j]),
                                                         int(offsets[j + 1]), j)
            out.append(sample)
        return out

    def iter_samples(self, signals: list[str] | None = None,
                     segments: list[int] | None = None) -> Iterator[Sample]:
        for seg_no in (range(len(self.segments)) if segments is None else segments):
            yield from self.read_segment(seg_no, signals)


class ListedFiles(WrapperStore):
    """The store's zarr store, refusing to read a listed file as absent.

    zarr reads a missing shard as fill values (0): a committed file deleted or lost would
    be read as zeros. Every read that finds nothing where the committed state lists a file
    raises MissingFileError naming it instead; it costs no request."""

    def __init__(self, fs: StoreFS, files: dict[str, Any]):
        super().__init__(fs.zarr_store())
        self._fs, self._files = fs, files

    async def get(self, key, prototype, byte_range=None):
        value = await self._store.get(key, prototype, byte_range)
        if value is None and key in self._files:
            segment = "/".join(key.split("/")[:3])
            raise missing(self._fs, key, f"a file of committed segment {segment}")
        return value


def _slice_signal(data: SignalData, a: int, b: int, j: int) -> SignalData:
    out = SignalData()
    if data.topk is not None:
        out.topk = TopK(data.topk.ids[a:b], data.topk.logprobs[a:b], data.topk.tail_logprob[a:b])
    if data.sampled is not None:
        s = data.sampled
        lo, hi = int(s.offsets[a]), int(s.offsets[b])
        out.sampled = Sampled(s.offsets[a:b + 1] - lo, s.ids[lo:hi], s.counts[lo:hi],
                              None if s.logprobs is None else s.logprobs[lo:hi])
    if data.hidden is not None:
        out.hidden = data.hidden[j]
    if data.attention is not None:
        out.attention = data.attention[j]
    return out
