"""This rank's share of a dump, batch by batch: forward + capture on the model's device,
then the numpy results handed to the writer thread (`BackgroundWriter`).

* `dump_samples` (dump mode): this rank's batches of the plan, new samples only, into its
  part of the store (`logitstore.writer.StoreWriter`); the samples arrive as a stream and
  are planned a window at a time (`teacher_dump.ranks.stream_batches`).
* `add_signal` (add-signal mode): the segments of this rank's parts that lack the signal,
  each recomputed whole from the tokens stored in it (`logitstore.signal_writer`).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from logitstore.errors import LogitStoreError
from logitstore.format import INDEX_COLUMNS, SignalSpec, StoreSettings
from logitstore.sample import Sample, SignalData
from teacher_dump.background_writer import writing_in_background
from teacher_dump.config import DumpConfig
from teacher_dump.existing_store import ExistingStore
from teacher_dump.ranks import RankContext, is_batch_of_rank, plan_batches, stream_batches

if TYPE_CHECKING:
    from teacher_dump.dump import DumpReport

log = logging.getLogger(__name__)


@dataclass
class DumpWork:
    """What every batch of a run needs."""

    cfg: DumpConfig
    model: Any
    spec: Any  # teacher_dump.capture.CaptureSpec
    ranks: RankContext
    progress: bool
    pad_id: int
    tokenizer_files: dict[str, bytes] = field(default_factory=dict)  # a new store's, by path
    # a teacher tokenizer other than the store's (teacher_dump.foreign_tokens.ForeignTokenizer)
    foreign: Any = None

    def capture(self, chosen: list) -> list[SignalData]:
        """Forward + capture one batch of samples (anything with sample_id, input_ids,
        loss_mask), in order."""
        from teacher_dump.capture import capture_batch, make_batch

        batch = make_batch([s.sample_id for s in chosen], [s.input_ids for s in chosen],
                           [s.loss_mask for s in chosen], pad_id=self.pad_id,
                           device=next(self.model.parameters()).device)
        return capture_batch(self.model, batch, self.spec)

    def bar(self, total: int | None):
        from tqdm.auto import tqdm

        return tqdm(total=total, unit="sample", desc=f"dump {self.cfg.signal}",
                    disable=not (self.progress and self.ranks.is_main), dynamic_ncols=True)


def capture_spec(cfg: DumpConfig, vocab: int, kernel: str):
    """The capture settings of `cfg` (teacher_dump.capture.CaptureSpec); `kernel`: the
    resolved capture_kernel."""
    from teacher_dump.capture import CaptureSpec

    return CaptureSpec(vocab_size=vocab, top_k=cfg.top_k, n_draws=cfg.samples,
                       temperature=cfg.sample_temperature, seed=cfg.seed,
                       hidden_layers=cfg.hidden_layers, hidden_pool=cfg.hidden_pool,
                       attention_layers=cfg.attention_layers, attention_grid=cfg.attention_grid,
                       attention_heads=cfg.attention_heads, logits_chunk=cfg.logits_chunk,
                       kernel=kernel)


def dump_samples(work: DumpWork, settings: StoreSettings, samples: Iterable,
                 store: ExistingStore, extra: dict[str, Any], report: DumpReport) -> None:
    """Dump mode: this rank's batches of the plan (`ranks.stream_batches` over the sample
    stream), new samples only, into its part. The stream is read to its end, and the run's
    counts (`report.samples_written`... all ranks) are added up as it is read."""
    ranks = work.ranks
    batches = stream_batches(_counted(samples, store.committed_ids, report),
                             work.cfg.batch_tokens, work.cfg.read_window_tokens)
    mine = (batch for j, batch in enumerate(batches)
            if is_batch_of_rank(j, ranks.rank, ranks.world)
            and any(s.sample_id not in store.committed_ids for s in batch))
    first = next(mine, None)  # reads up to this rank's first batch with work left
    if first is None:
        log.info("rank %d: nothing left to dump", ranks.rank)
        return
    writer = _open_part(work, settings, store, extra)
    committed, signal = store.committed_ids, work.cfg.signal
    keep_text = settings.text  # the reader built text for a store that keeps it
    tokens, t0 = 0, time.monotonic()
    with (work.bar(None) as bar,
          writing_in_background(writer, work.cfg.queue_batches) as background):
        for chosen in itertools.chain([first], mine):
            signals = work.capture(chosen)
            # A batch cut by the last commit of a killed run is recomputed whole (same
            # padding, same numbers); only its missing samples are written.
            out = [Sample(s.sample_id, s.input_ids, s.loss_mask, source=s.source, split=s.split,
                          tags=store_tags(s.tags), signals={signal: sig},
                          text_spans=s.text_spans if keep_text else None)
                   for s, sig in zip(chosen, signals) if s.sample_id not in committed]
            background.put(out)
            tokens += sum(len(s.input_ids) for s in out)
            bar.update(len(out))
            bar.set_postfix(tok_s=f"{tokens / max(time.monotonic() - t0, 1e-9):.0f}")


def _counted(samples: Iterable, committed: set[str], report: DumpReport) -> Iterator:
    """`samples`, unchanged, counting into `report` those already in the store (resumed) and
    the others (written by this run, whichever rank computes them) as they are read."""
    for s in samples:
        if s.sample_id in committed:
            report.samples_resumed += 1
        else:
            report.samples_written += 1
            report.tokens_written += len(s.input_ids)
        yield s


def _open_part(work: DumpWork, settings: StoreSettings, store: ExistingStore,
               extra: dict[str, Any]):
    """The writer of this rank's part; refused when that part was closed by a run with
    another number of processes (its batches are not this rank's)."""
    from logitstore.writer import StoreWriter

    if store.parts.get(work.ranks.part):
        raise LogitStoreError(
            f"part {work.ranks.part} of {work.cfg.out} is complete but samples of its batches "
            f"are missing: the dump was started with another number of processes "
            f"({sum(p.startswith('rank-') for p in store.parts)} parts); rerun it with that "
            f"many")
    return StoreWriter(work.cfg.out, settings, part=work.ranks.part,
                       commit_store=work.ranks.world == 1, extra=extra,
                       tokenizer_files=work.tokenizer_files)


class AppendSink:
    """The StoreWriter interface a BackgroundWriter drives, over a SignalAppender: each item
    is one whole segment, (job, [SignalData per sample]) or, for a signal adding its
    tokenization, (job, [SignalData], [Tokenized])."""

    def __init__(self, appender):
        self.appender = appender

    def add(self, item) -> None:
        self.appender.write(*item)

    def close(self) -> None:
        self.appender.close()

    def abort(self) -> None:
        pass  # segments written so far stay; the others are pending for a rerun


def add_signal(work: DumpWork, spec: SignalSpec, store: ExistingStore) -> None:
    """Add-signal mode: the segments of this rank's parts that lack the signal, each
    computed whole (its own batch plan) from the tokens stored in it; a teacher with another
    tokenizer cuts the stored text first (teacher_dump.foreign_tokens)."""
    from logitstore.signal_writer import SignalAppender

    if work.foreign is not None:
        from teacher_dump.foreign_tokens import add_foreign_signal

        return add_foreign_signal(work, spec, store)

    url, signal, ranks = work.cfg.out, work.cfg.signal, work.ranks
    mine = [p for i, p in enumerate(sorted(store.parts)) if i % ranks.world == ranks.rank]
    append_jobs(work, SignalAppender(url, signal, spec, parts=mine,
                                     commit_store=ranks.world == 1))


def append_jobs(work: DumpWork, appender, prepare=None) -> None:
    """Compute and append the signal of every segment `appender` has pending, each segment
    whole (its own batch plan). prepare(stored samples) -> (the items the teacher reads, extra
    payload for the sink); default: the stored samples themselves, nothing extra."""
    from logitstore.reader import StoreReader

    jobs = appender.pending()
    if not jobs:
        log.info("rank %d: signal %s is already in all its segments", work.ranks.rank,
                 work.cfg.signal)
        appender.close()  # a kill after the last segment may have left the heads to write
        return
    reader = StoreReader(work.cfg.out)
    segment_of = {(seg.part, seg.name): n for n, seg in enumerate(reader.segments)}
    with (work.bar(sum(len(job.sample_ids) for job in jobs)) as bar,
          writing_in_background(AppendSink(appender), work.cfg.queue_batches) as background):
        for job in jobs:
            stored = reader.read_segment(segment_of[(job.part, job.segment)], signals=[])
            items, extra = prepare(stored) if prepare else (stored, ())
            data: list[SignalData | None] = [None] * len(items)
            for batch in plan_batches([len(s.input_ids) for s in items], work.cfg.batch_tokens):
                for i, sig in zip(batch, work.capture([items[i] for i in batch])):
                    data[i] = sig
                bar.update(len(batch))
            background.put([(job, data, *extra)])


def store_tags(tags: dict[str, Any]) -> dict[str, Any]:
    """Tags as stored: a name that is an index column (`source`, `length`...) gets a
    `tag_` prefix instead of failing the whole dump."""
    return {(f"tag_{k}" if k in INDEX_COLUMNS else k): v for k, v in tags.items()}
