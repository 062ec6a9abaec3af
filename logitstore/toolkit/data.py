"""Read training/dump data into tokenized samples with a loss mask.

Sources (`iter_samples(sources, ...)` takes one spec or a list, read in the order given;
resolved and read by `logitstore.toolkit.data_sources`):

* a local file: ``.jsonl`` / ``.ndjson`` (one record per line), ``.json`` (a list of
  records or ``{"data": [...]}``; a ``.json`` file holding JSON lines is read as JSONL),
  ``.parquet``; ``.gz`` variants of the JSON ones;
* a directory: every supported file inside it, recursively, sorted by relative path;
  or, if it was written by ``datasets``' ``save_to_disk``, that dataset (``DIR@split``
  picks one split of a saved DatasetDict);
* a glob (``data/*.jsonl``, ``data/**/*.parquet``): matching files, sorted;
* a Hugging Face dataset ``name[:config][@split]`` (``hf:`` prefix to force), loaded
  with ``datasets.load_dataset``; without ``@split`` every split is read.

Record formats, their rendering and pair tokenization live in `logitstore.toolkit.record_formats`.

`iter_samples` is lazy: records are read, rendered and tokenized one at a time as its
consumer asks (JSONL line by line, Parquet by record batches, datasets row by row from
their memory-mapped Arrow files; a ``.json`` file holding one JSON list is parsed whole),
and the summary is added up as it goes. What it keeps grows only with dedup: the sha256 of
each distinct record (about 100 bytes each). Sample ids are unique without being kept: dedup
drops a repeated record, and without dedup sources that would be read twice are refused
before anything is read (`data_sources.repeated_sources`).

Definitions that other tools rely on:

* **source**: a file's path relative to its data root (the directory given, the glob's
  fixed prefix, or the file's own directory for a single file), as POSIX; for datasets
  ``name[:config]@split`` (a saved dataset's directory name stands for ``name``).
* **row**: the 0-based position of the record in its source (JSONL: line number - 1,
  counting blank lines; JSON/Parquet/datasets: record index). Messages about bad records
  show ``source:LINE`` (1-based) for JSONL and ``source[row]`` otherwise.
* **sample id**: ``f"{source}:{row}:{sha256(prompt + response)[:12]}"`` where prompt and
  response are the tokenizer-independent renderings of `logitstore.toolkit.record_formats` (UTF-8,
  hex digest), so teams with different teachers or tokenizers agree. Windows of a long
  sample get ``#w0``, ``#w1``... appended.
* **duplicate**: same ``prompt + response`` text as an earlier sample of the run (the
  first one is kept).
* **tokenization**: prompt and response are tokenized separately without special tokens
  and concatenated, so the boundary is exact: ``[BOS if the tokenizer adds one] + prompt
  + response + [EOS]``. (Token ids at the seam may differ from tokenizing the joined text;
  harmless, since teacher and student both consume the stored ids.) EOS is not added
  twice when a chat template already ends the turn with it.
* **text** (``with_text``, teacher-dump's stores with text): each sample's text and its
  tokens' byte spans (`TokenizedSample.text_spans`, built by
  `logitstore.toolkit.sample_text` for exactly these ids, which it never changes); a
  truncated sample or a window keeps the text of its kept tokens.
* **loss_mask[i]** is True when ``input_ids[i]`` is a training target: response tokens
  and EOS; prompt tokens too with ``include_prompt=True``; every token for ``text``;
  never the BOS/prefix specials.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from logitstore.errors import TokenSpansError
from logitstore.text_spans import SampleText
from logitstore.toolkit.data_sources import (  # noqa: F401  (re-exported: part of this module's API)
    DataSourceError,
    HFDatasetSpec,
    RawRecord,
    iter_raw_records,
    parse_hf_spec,
    repeated_sources,
    resolve_sources,
)
from logitstore.toolkit.record_formats import (
    Format,
    RecordError,
    RenderOptions,
    TextPair,
    detect_format,
    get_format,
    render_with_chat_template,
    special_prefix,
    tags_of,
    tokenize_pair,
)
from logitstore.toolkit.sample_text import chat_sample_text, cut_text, pair_sample_text

log = logging.getLogger(__name__)

MAX_REPORTED = 5  # malformed records quoted in the summary and the log


@dataclass(frozen=True)
class DataOptions:
    format: str = "auto"  # "auto" or a name from logitstore.toolkit.record_formats.FORMAT_NAMES
    max_length: int | None = None  # in tokens, BOS and EOS included
    overflow: Literal["truncate", "window"] = "truncate"
    include_prompt: bool = False  # prompt tokens are targets too
    use_chat_template: bool = True  # chat records: tokenizer's template when it has one
    wrap_in_chat: bool = False  # render non-chat records as a user/assistant exchange
    dedup: bool = True
    limit: int | None = None  # at most this many samples
    mcq_index_base: int = 0  # see logitstore.toolkit.record_formats.RenderOptions
    default_split: str = "train"
    # Also each sample's text and token byte spans (TokenizedSample.text_spans): off unless
    # the reader writes a store that keeps them (costs a second tokenization with offsets).
    with_text: bool = False


@dataclass(frozen=True)
class TokenizedSample:
    sample_id: str
    source: str
    split: str
    input_ids: np.ndarray  # (seq,) int64
    loss_mask: np.ndarray  # (seq,) bool, True = training target
    tags: dict[str, str | int | float | bool]
    text_spans: SampleText | None = None  # with DataOptions.with_text


@dataclass
class DataSummary:
    """Counts for one read; `str()` is the end-of-run report."""

    format_requested: str = "auto"
    formats: dict[str, str] = field(default_factory=dict)  # source -> format used
    records: int = 0  # records seen, bad ones included
    samples: int = 0  # samples produced (windows count separately)
    tokens: int = 0
    target_tokens: int = 0
    malformed: int = 0
    malformed_examples: list[str] = field(default_factory=list)  # first MAX_REPORTED
    empty: int = 0
    duplicates: int = 0
    truncated: int = 0
    windowed: int = 0  # records split into windows
    no_target: int = 0  # samples left with no target token after truncation
    limit_reached: bool = False

    @property
    def format(self) -> str:
        used = sorted(set(self.formats.values()))
        return used[0] if len(used) == 1 else ("mixed" if used else "none")

    def add_malformed(self, location: str, reason: str) -> None:
        self.malformed += 1
        if len(self.malformed_examples) < MAX_REPORTED:
            message = f"{location}: {reason}"
            self.malformed_examples.append(message)
            log.warning("skipping malformed record %s", message)

    def __str__(self) -> str:
        how = "auto-detected" if self.format_requested == "auto" else "given"
        lines = [f"data summary: format {self.format} ({how})"]
        if len(self.formats) > 1 and self.format == "mixed":
            lines += [f"  {src}: {fmt}" for src, fmt in self.formats.items()]
        lines.append(
            f"  {self.records} records read -> {self.samples} samples, {self.tokens} tokens "
            f"({self.target_tokens} targets)"
        )
        lines.append(
            f"  skipped: {self.malformed} malformed, {self.empty} empty, "
            f"{self.duplicates} duplicates, {self.no_target} without targets"
        )
        lines.append(
            f"  over max_length: {self.truncated} truncated, {self.windowed} split into windows"
        )
        if self.limit_reached:
            lines.append("  stopped at the sample limit")
        if self.malformed_examples:
            more = self.malformed - len(self.malformed_examples)
            lines.append("  first malformed records:")
            lines += [f"    {m}" for m in self.malformed_examples]
            if more:
                lines.append(f"    ... and {more} more")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- pipeline


def _content_hash(prompt: str, response: str) -> str:
    return hashlib.sha256((prompt + response).encode("utf-8")).hexdigest()


def _split_of(record: Mapping, raw: RawRecord, options: DataOptions) -> str:
    explicit = record.get("split")
    if isinstance(explicit, str) and explicit:
        return explicit
    return raw.split or options.default_split


def _windows(length: int, options: DataOptions, summary: DataSummary):
    """[(id suffix, start, stop)]: the tokens kept of a `length`-token sample: all of it,
    the first max_length, or each max_length window."""
    limit = options.max_length
    if limit is None or length <= limit:
        return [("", 0, length)]
    if options.overflow == "window":
        summary.windowed += 1
        return [
            (f"#w{k}", start, min(start + limit, length))
            for k, start in enumerate(range(0, length, limit))
        ]
    summary.truncated += 1
    return [("", 0, limit)]


class _Reader:
    """State of one read: chosen formats, seen hashes, counts. Bad records are counted in
    `summary` and yield nothing."""

    def __init__(self, tokenizer, options: DataOptions, summary: DataSummary):
        self.tokenizer, self.options, self.summary = tokenizer, options, summary
        self.render_options = RenderOptions(index_base=options.mcq_index_base)
        self.use_template = options.use_chat_template and bool(
            getattr(tokenizer, "chat_template", None)
        )
        self.prefix = special_prefix(tokenizer)
        self.formats: dict[str, Format] = {}  # source -> format
        self.seen: set[bytes] = set()  # sha256 of prompt + response

    def format_for(self, raw: RawRecord, record: Mapping) -> Format | None:
        """The source's format: forced, or detected from its first usable record."""
        if raw.source in self.formats:
            return self.formats[raw.source]
        requested = self.options.format
        fmt = get_format(requested) if requested != "auto" else detect_format(record)
        if fmt is not None:
            self.formats[raw.source] = fmt
            self.summary.formats[raw.source] = fmt.name
            if requested == "auto":
                log.info("format of %s: %s (from fields %s)", raw.source, fmt.name, sorted(record))
        return fmt

    def samples(self, raw: RawRecord) -> list[TokenizedSample]:
        summary = self.summary
        summary.records += 1
        if raw.error is not None:
            summary.add_malformed(raw.location, raw.error)
            return []
        record = raw.record
        if not isinstance(record, Mapping):
            summary.add_malformed(raw.location, f"expected an object, got {type(record).__name__}")
            return []
        fmt = self.format_for(raw, record)
        if fmt is None:
            summary.add_malformed(raw.location, f"no known data format in fields {sorted(record)}")
            return []
        try:
            pair = fmt.render(record, self.render_options)
            if not pair.response.strip():
                summary.empty += 1
                return []
            digest = _content_hash(pair.prompt, pair.response)
            if self.options.dedup:
                if bytes.fromhex(digest) in self.seen:
                    summary.duplicates += 1
                    return []
                self.seen.add(bytes.fromhex(digest))
            text, messages = self.templated(fmt, record, pair)
        except RecordError as exc:
            summary.add_malformed(raw.location, str(exc))
            return []
        ids, mask = tokenize_pair(
            self.tokenizer,
            text.prompt,
            text.response,
            include_prompt=self.options.include_prompt or fmt.name == "text",
            prefix=self.prefix,
        )
        sample_text = (self.sample_text(text, messages, ids, raw.location)
                       if self.options.with_text else None)
        base_id = f"{raw.source}:{raw.row}:{digest[:12]}"
        split = _split_of(record, raw, self.options)
        tags = tags_of(record, fmt)
        out = []
        for suffix, start, stop in _windows(len(ids), self.options, summary):
            if not mask[start:stop].any():
                summary.no_target += 1
                continue
            kept_text = None if sample_text is None else cut_text(sample_text, start, stop)
            out.append(
                TokenizedSample(
                    base_id + suffix, raw.source, split, ids[start:stop], mask[start:stop],
                    dict(tags), kept_text,
                )
            )
        return out

    def sample_text(self, text: TextPair, messages: list[dict] | None, ids: np.ndarray,
                    location: str) -> SampleText:
        """The sample's text and the byte spans of its `ids` (module `sample_text`)."""
        try:
            if messages is not None:
                return chat_sample_text(self.tokenizer, messages, ids, self.prefix)
            return pair_sample_text(self.tokenizer, text.prompt, text.response, ids, self.prefix)
        except TokenSpansError as exc:
            raise TokenSpansError(f"record {location}: no exact text and token spans: "
                                  f"{exc}") from exc

    def templated(self, fmt: Format, record: Mapping,
                  pair: TextPair) -> tuple[TextPair, list[dict] | None]:
        """The pair as the tokenizer's chat template renders it, when that applies, and the
        messages it rendered (None: the pair as given)."""
        wrap = self.options.wrap_in_chat and fmt.name != "text"
        if not self.use_template or (fmt.messages is None and not wrap):
            return pair, None
        if fmt.messages is not None:
            messages = fmt.messages(record)
        else:
            messages = [
                {"role": "user", "content": pair.prompt},
                {"role": "assistant", "content": pair.response},
            ]
        return render_with_chat_template(self.tokenizer, messages), messages


def iter_samples(
    sources: str | os.PathLike | Iterable[str | os.PathLike],
    tokenizer,
    options: DataOptions | None = None,
    summary: DataSummary | None = None,
) -> Iterator[TokenizedSample]:
    """Tokenized samples from `sources`, in file then row order; bad data is counted in
    `summary` (pass one in to read it afterwards) and logged, never raised."""
    options = options or DataOptions()
    if options.format != "auto":
        get_format(options.format)  # fail before reading anything
    if options.overflow not in ("truncate", "window"):
        raise ValueError(f"overflow must be 'truncate' or 'window', got {options.overflow!r}")
    if options.max_length is not None and options.max_length < 1:
        raise ValueError(f"max_length must be positive, got {options.max_length}")
    if not options.dedup:  # with dedup a repeated record is dropped, so ids stay unique
        repeated = repeated_sources(sources)
        if repeated:
            raise DataSourceError(
                f"sample ids would occur more than once: {sorted(set(repeated))} would be read "
                "twice (ids are source:row:hash, and dedup is off). Is a data source listed "
                "twice? List each source once, rename one of two files with the same name, "
                "or turn dedup on")
    summary = summary if summary is not None else DataSummary()
    summary.format_requested = options.format
    if tokenizer.eos_token_id is None:
        log.warning("the tokenizer has no EOS token: responses are not terminated")
    reader = _Reader(tokenizer, options, summary)
    try:
        for raw in iter_raw_records(sources):
            for sample in reader.samples(raw):
                if options.limit is not None and summary.samples >= options.limit:
                    summary.limit_reached = True
                    return
                summary.samples += 1
                summary.tokens += len(sample.input_ids)
                summary.target_tokens += int(sample.loss_mask.sum())
                yield sample
    finally:
        log.info("%s", summary)


def read_samples(
    sources: str | os.PathLike | Iterable[str | os.PathLike],
    tokenizer,
    options: DataOptions | None = None,
) -> tuple[list[TokenizedSample], DataSummary]:
    """`iter_samples` collected into a list, with its summary."""
    summary = DataSummary()
    samples = list(iter_samples(sources, tokenizer, options, summary))
    return samples, summary
