"""The teacher-dump run: data -> teacher forward -> captured signals -> store.

    report = run_dump(resolve_config("configs/tiny-cpu.yaml", {"data": [...], "out": "s/"}))

Two modes, chosen from what `cfg.out` holds:

* **dump** (new store, or one holding `cfg.signal`): samples from `cfg.data` are written
  with their tokens and the signal (`logitstore.writer.StoreWriter`, one part per rank).
* **add-signal** (a complete store without `cfg.signal`): a second teacher's signal is
  added over the tokens already stored (`logitstore.signal_writer.SignalAppender`). The
  data must be the one the store was dumped from (same dataset fingerprint); token ids
  and loss masks are read back from the store.

Steps, top to bottom in `run_dump`:

1. Tokenizer, then the existing store: another tokenizer, or a saved config of the same
   signal that differs on a content key, is refused - unless `overwrite`, which replaces
   such a store. A store with the same config is resumed (never replaced), so a killed
   dump restarted with the same command continues.
2. Data: every sample is read (`logitstore.data.iter_samples`). The *batch plan*:
   samples sorted by (length, input position), cut into batches of at most
   `batch_tokens` padded tokens (batch size x longest sample); in add-signal mode, one
   plan per stored segment.
3. Ranks: batch j of the plan goes to process j mod world_size (add-signal: part i of
   the store to process i mod world_size). Batches are the same whatever the number of
   processes, so every sample is computed in the same batch - same padding, same
   floating-point results - as in a 1-process dump, and a resume recomputes a
   half-written batch (segment) whole. Each rank writes part `rank-{i:05d}`.
4. Resume: sample ids committed in any part (segments holding the signal) are skipped.
5. Forward under inference mode, capture (`teacher_dump.capture`) and hand the numpy
   results to a writer thread through a bounded queue, so the accelerator never waits for
   compression or I/O; a writer-thread error is re-raised in the main thread.
6. All ranks wait; the main process commits the store with the resolved config and the
   run summary in the manifest's `extra`.
"""

from __future__ import annotations

import io
import logging
import queue
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

import pyarrow.parquet as pq

from logitstore.commit import commit_store, dataset_fingerprint, load_json, read_part_manifests
from logitstore.errors import ConfigError, LogitStoreError, SettingsMismatchError
from logitstore.format import (INDEX_COLUMNS, MANIFEST, PARTS_DIR, SEGMENT_INDEX, AttentionSpec,
                               HiddenSpec, SampledSpec, SignalSpec, StoreSettings, TopKSpec,
                               settings_differences)
from logitstore.fs import StoreFS
from logitstore.sample import Sample, SignalData
from logitstore.segment import sample_digest
from teacher_dump.config import DumpConfig, content_differences
from logitstore.data import DataOptions, DataSourceError, DataSummary, iter_samples

log = logging.getLogger(__name__)

# Keys of the store manifest's `extra` written by teacher-dump.
EXTRA_CONFIG = "teacher_dump_config"  # the resolved config of the latest run (as_dict)
EXTRA_SIGNAL_CONFIGS = "teacher_dump_signal_configs"  # {signal: config that dumped it}
EXTRA_SUMMARY = "teacher_dump_summary"  # DumpReport.as_dict of the latest run
EXTRA_RUNS = "teacher_dump_runs"  # one short record per run (a resumed dump has several)


# ----------------------------------------------------------------------------- ranks


@dataclass
class RankContext:
    """This process's place in the dump; `wait` is a barrier across all processes."""

    rank: int = 0
    world: int = 1
    device: str | None = None  # None: logitstore.hf's default (cuda if available, else cpu)
    wait: Callable[[], None] = lambda: None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def part(self) -> str:
        return f"rank-{self.rank:05d}"

    @classmethod
    def from_accelerate(cls) -> "RankContext":
        import datetime

        import torch
        from accelerate import PartialState
        from accelerate.utils import DistributedType, parse_flag_from_env

        # cpu=True without a GPU (accelerate otherwise ignores a CPU multi-process launch)
        # or under `accelerate launch --cpu`. A long timeout: ranks may reach the final
        # barrier hours apart on big dumps.
        use_cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
        state = PartialState(cpu=use_cpu, timeout=datetime.timedelta(hours=72))
        if state.distributed_type == DistributedType.NO:
            return cls(device="cpu" if parse_flag_from_env("ACCELERATE_USE_CPU") else None)
        device = state.device
        name = "cpu" if device.type == "cpu" else str(device)
        return cls(state.process_index, state.num_processes, name, state.wait_for_everyone)


def plan_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Sample positions sorted by (length, position), in batches of at most `batch_tokens`
    padded tokens; a sample longer than the budget gets a batch of its own."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:  # lengths ascending: the newest sample is the longest of its batch
        if current and (len(current) + 1) * lengths[i] > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def batches_of_rank(n_batches: int, rank: int, world: int) -> list[int]:
    """Batch numbers of the plan that `rank` of `world` processes computes (j mod world)."""
    return list(range(rank, n_batches, world))


# ----------------------------------------------------------------------------- the store


@dataclass
class ExistingStore:
    settings: StoreSettings | None  # None: an empty store
    committed: bool  # a store manifest exists
    fingerprint: str | None  # dataset fingerprint of the last commit
    config: dict[str, Any] | None  # extra[EXTRA_CONFIG]
    signal_configs: dict[str, dict[str, Any]]
    runs: list[dict[str, Any]]
    committed_ids: set[str]
    parts: dict[str, bool]  # part name -> complete

    @property
    def empty(self) -> bool:
        return self.settings is None

    def saved_config(self, signal: str) -> dict[str, Any] | None:
        """The resolved config that dumped `signal`, when the store kept it."""
        if signal in self.signal_configs:
            return self.signal_configs[signal]
        if self.config is not None and self.config.get("signal") == signal:
            return self.config
        return None


def inspect_store(url: str) -> ExistingStore:
    """What a (possibly half-written) store at `url` already holds; read-only.

    Committed ids come from every part's manifest, not only the store manifest: after a
    killed multi-process dump the parts hold more than the last store commit lists.
    """
    fs = StoreFS(url)
    manifest = load_json(fs, MANIFEST) if fs.exists(MANIFEST) else None
    parts = read_part_manifests(fs)
    settings = None
    if manifest is not None:
        settings = StoreSettings.from_json(manifest["settings"])
    elif parts:
        settings = StoreSettings.from_json(parts[0]["settings"])
    extra = (manifest or {}).get("extra") or {}
    ids: set[str] = set()
    for part in parts:
        for seg in part["segments"]:
            rel = f"{PARTS_DIR}/{part['part']}/{seg['name']}/{SEGMENT_INDEX}"
            table = pq.read_table(io.BytesIO(fs.read_bytes(rel)), columns=["sample_id"])
            ids.update(table.column("sample_id").to_pylist())
    return ExistingStore(settings, manifest is not None,
                         (manifest or {}).get("dataset_fingerprint"), extra.get(EXTRA_CONFIG),
                         dict(extra.get(EXTRA_SIGNAL_CONFIGS) or {}),
                         list(extra.get(EXTRA_RUNS) or []), ids,
                         {p["part"]: bool(p.get("complete")) for p in parts})


def erase_store(url: str) -> None:
    """Delete a store's committed state and parts (what StoreWriter(overwrite=True) deletes)."""
    fs = StoreFS(url)
    for rel in (MANIFEST, "index", PARTS_DIR):
        fs.delete(rel, recursive=True)


def adds_signal(store: ExistingStore, cfg: DumpConfig) -> bool:
    """True when this run adds `cfg.signal` to a store dumped by another teacher."""
    return not store.empty and cfg.signal not in store.settings.signals


def early_conflicts(store: ExistingStore, cfg: DumpConfig, fingerprint: str,
                    vocab: int) -> list[str]:
    """Why `cfg` may not write into `store`, from what is known before reading the data."""
    if store.empty:
        return []
    out = []
    s = store.settings
    if s.tokenizer_fingerprint != fingerprint or s.vocab_size != vocab:
        out.append(f"the store was written with another tokenizer: store {s.tokenizer_name or '?'} "
                   f"(vocab {s.vocab_size}, fingerprint {s.tokenizer_fingerprint}), now "
                   f"{cfg.model} (vocab {vocab}, fingerprint {fingerprint}); a store holds "
                   "the signals of teachers sharing one tokenizer")
    if adds_signal(store, cfg):
        if not store.committed or not all(store.parts.values()):
            out.append(f"the dump of signal(s) {sorted(s.signals)} into the store has not "
                       f"finished: rerun its command to complete it before adding "
                       f"{cfg.signal!r}")
    elif store.saved_config(cfg.signal) is not None:
        out += [f"config {d}" for d in content_differences(store.saved_config(cfg.signal), cfg)]
    return out


def data_conflicts(store: ExistingStore, cfg: DumpConfig, samples: list) -> list[str]:
    """Adding a signal: the data must give exactly the samples and tokens of the store."""
    if not adds_signal(store, cfg):
        return []
    ids = [s.sample_id for s in samples]
    found = dataset_fingerprint(ids, [sample_digest(s.sample_id, s.input_ids) for s in samples])
    if found == store.fingerprint:
        return []
    return [f"the data gives other samples or tokens than the store holds (dataset fingerprint "
            f"{found}, store {store.fingerprint}): adding signal {cfg.signal!r} needs the data "
            f"and data options (--max-length, --format, --limit...) the store was dumped with"]


def settings_conflicts(store: ExistingStore, settings: StoreSettings, signal: str) -> list[str]:
    """Dump mode into a store holding `signal`: its stored settings must equal this run's."""
    if store.empty or signal not in store.settings.signals:
        return []
    stored = replace(store.settings, signals={signal: store.settings.signals[signal]},
                     tokenizer_name=settings.tokenizer_name)  # the name is informative only
    return [f"settings {d}" for d in settings_differences(stored, settings)]


def teacher_signal(cfg: DumpConfig, model, info) -> SignalSpec:
    """The store's description of what this run captures from `model`."""
    text = model.config.get_text_config()
    heads = int(text.num_attention_heads)
    teacher = {k: v for k, v in info.as_dict().items() if k not in ("device", "is_local")}
    teacher.update(num_layers=int(text.num_hidden_layers), hidden_size=int(text.hidden_size),
                   num_attention_heads=heads,
                   hidden_layers_index="output.hidden_states[1:] (block outputs; -1 = last, "
                                       "after the final norm)")
    enc, step = cfg.logprob_encoding, cfg.logprob_step
    return SignalSpec(
        topk=TopKSpec(cfg.top_k, enc, step) if cfg.top_k else None,
        sampled=(SampledSpec(cfg.samples, cfg.sample_temperature, enc, step, cfg.singleton_step)
                 if cfg.samples else None),
        hidden=(HiddenSpec(cfg.hidden_layers, int(text.hidden_size), cfg.hidden_pool,
                           cfg.hidden_dtype) if cfg.hidden_layers else None),
        attention=(AttentionSpec(cfg.attention_layers,
                                 1 if cfg.attention_heads == "mean" else heads,
                                 cfg.attention_grid, cfg.attention_heads, cfg.attention_dtype)
                   if cfg.attention_layers else None),
        teacher=teacher)


def model_problems(cfg: DumpConfig, model, vocab: int) -> list[str]:
    n = int(model.config.get_text_config().num_hidden_layers)
    out = [f"{key}: layer {i} is out of range for {cfg.model}, which has {n} layers "
           f"(valid: {-n}..{n - 1})"
           for key in ("hidden_layers", "attention_layers") for i in getattr(cfg, key)
           if not -n <= i < n]
    if cfg.top_k > vocab:
        out.append(f"top_k: {cfg.top_k} is larger than the vocabulary ({vocab})")
    return out


# ----------------------------------------------------------------------------- writer thread


class BackgroundWriter:
    """Feeds a StoreWriter from a bounded queue in a thread; `put` re-raises its errors."""

    _CLOSE = object()  # flush, mark the part complete
    _ABORT = object()  # drop what is buffered; the part stays resumable

    def __init__(self, writer, max_batches: int):
        self.writer = writer
        self.queue: queue.Queue = queue.Queue(maxsize=max_batches)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while True:
                item = self.queue.get()
                if item is self._CLOSE:
                    self.writer.close()
                    return
                if item is self._ABORT:
                    self.writer.abort()
                    return
                for sample in item:
                    self.writer.add(sample)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            self.error = exc
            self.writer.abort()

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    def put(self, samples: list[Sample]) -> None:
        while True:  # a dead writer never drains the queue: look at it between tries
            self._check()
            try:
                self.queue.put(samples, timeout=0.5)
                return
            except queue.Full:
                continue

    def finish(self) -> None:
        """Flush, close the part (marks it complete) and re-raise any writer error."""
        self.put(self._CLOSE)  # type: ignore[arg-type]
        self.thread.join()
        self._check()

    def abandon(self) -> None:
        """After an error in the main thread: drop the queued batches and stop without
        closing the part, which stays resumable after its last committed segment."""
        if not self.thread.is_alive():
            return
        while True:
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break
        self.queue.put(self._ABORT)  # only this thread puts: there is room now
        self.thread.join()


# ----------------------------------------------------------------------------- the run


@dataclass
class DumpReport:
    url: str
    signal: str
    is_main: bool
    samples_written: int = 0  # by this run, all ranks
    tokens_written: int = 0
    samples_resumed: int = 0  # already in the store: skipped
    store: dict[str, Any] = field(default_factory=dict)  # samples, tokens, bytes, bytes_per_token
    data: dict[str, Any] = field(default_factory=dict)  # DataSummary counts
    wall_seconds: float = 0.0
    world_size: int = 1
    device: str = ""
    teacher: dict[str, Any] = field(default_factory=dict)
    mode: str = "dump"  # or "add-signal"

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "is_main"}

    def __str__(self) -> str:
        s, d = self.store, self.data
        rate = self.tokens_written / self.wall_seconds if self.wall_seconds else 0.0
        return "\n".join([
            f"teacher-dump ({self.mode}): signal {self.signal!r} -> {self.url} "
            f"(signals {', '.join(s.get('signals', []))})",
            f"  this run: {self.samples_written} samples, {self.tokens_written} tokens written "
            f"({self.samples_resumed} already in the store) in {self.wall_seconds:.1f} s "
            f"({rate:.0f} tokens/s) on {self.world_size} process(es), {self.device}",
            f"  store: {s.get('samples', 0)} samples, {s.get('tokens', 0)} tokens, "
            f"{s.get('bytes', 0)} bytes ({s.get('bytes_per_token', 0):.2f} bytes/token)",
            f"  data: {d.get('records', 0)} records -> {d.get('samples', 0)} samples; skipped "
            f"{d.get('malformed', 0)} malformed, {d.get('empty', 0)} empty, "
            f"{d.get('duplicates', 0)} duplicates, {d.get('no_target', 0)} without targets; "
            f"{d.get('truncated', 0)} truncated, {d.get('windowed', 0)} split into windows",
        ])


def read_data(cfg: DumpConfig, tokenizer) -> tuple[list, DataSummary]:
    options = DataOptions(format=cfg.format, max_length=cfg.max_length,
                          overflow="window" if cfg.split_long else "truncate",
                          include_prompt=cfg.include_prompt,
                          use_chat_template=cfg.use_chat_template, wrap_in_chat=cfg.wrap_in_chat,
                          dedup=cfg.dedup, limit=cfg.limit, mcq_index_base=cfg.mcq_index_base)
    summary = DataSummary()
    samples = list(iter_samples(list(cfg.data), tokenizer, options, summary))
    if not samples:
        raise DataSourceError(f"no usable samples in {', '.join(cfg.data)}. "
                              + " ".join(str(summary).split()))
    seen: set[str] = set()
    repeated = []
    for sample in samples:
        if sample.sample_id in seen:
            repeated.append(sample.sample_id)
        seen.add(sample.sample_id)
    if repeated:  # e.g. one file given twice with dedup off: the store needs unique ids
        raise DataSourceError(f"{len(repeated)} sample ids occur more than once (e.g. "
                              f"{repeated[:3]}); is a data source listed twice?")
    return samples, summary


def store_tags(tags: dict[str, Any]) -> dict[str, Any]:
    """Tags as stored: a name that is an index column (`source`, `length`...) gets a
    `tag_` prefix instead of failing the whole dump."""
    return {(f"tag_{k}" if k in INDEX_COLUMNS else k): v for k, v in tags.items()}


def run_dump(cfg: DumpConfig, *, ranks: RankContext | None = None,
             progress: bool = True) -> DumpReport:
    """Dump `cfg.data` through `cfg.model` into the store `cfg.out` (module docstring)."""
    from logitstore.hf import (check_vocab_compat, load_causal_lm, load_tokenizer,
                               tokenizer_fingerprint, vocab_size_of)

    started = time.monotonic()
    ranks = ranks or RankContext.from_accelerate()
    tokenizer = load_tokenizer(cfg.model, cfg.revision, cfg.trust_remote_code)
    fingerprint, vocab = tokenizer_fingerprint(tokenizer), vocab_size_of(tokenizer)

    # 1. The existing store: refuse (or, with overwrite, replace) a conflicting one.
    store = inspect_store(cfg.out)
    conflicts = early_conflicts(store, cfg, fingerprint, vocab)
    if conflicts and not cfg.overwrite:
        raise SettingsMismatchError(_refusal(cfg.out, conflicts))
    samples, data_summary = read_data(cfg, tokenizer)
    conflicts = conflicts or data_conflicts(store, cfg, samples)
    if conflicts and not cfg.overwrite:
        raise SettingsMismatchError(_refusal(cfg.out, conflicts))
    quantize = None if cfg.quantize == "auto" else cfg.quantize  # None: logitstore.hf decides
    model, info = load_causal_lm(cfg.model, quantize=quantize,
                                 dtype=cfg.dtype, device=_device(cfg) or ranks.device,
                                 need_attentions=bool(cfg.attention_layers),
                                 trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
    problems = model_problems(cfg, model, vocab)
    if problems:
        raise ConfigError(problems)
    check_vocab_compat(tokenizer, model)
    spec = teacher_signal(cfg, model, info)
    # Layout keys (chunk/segment sizes) of an existing store win: they do not change content.
    layout = store.settings or StoreSettings(vocab, fingerprint, chunk_tokens=cfg.chunk_tokens,
                                             segment_tokens=cfg.segment_tokens,
                                             chunk_samples=cfg.chunk_samples)
    settings = StoreSettings(vocab_size=vocab, tokenizer_fingerprint=fingerprint,
                             signals={cfg.signal: spec}, tokenizer_name=cfg.model,
                             chunk_tokens=layout.chunk_tokens, segment_tokens=layout.segment_tokens,
                             chunk_samples=layout.chunk_samples)
    conflicts = conflicts or settings_conflicts(store, settings, cfg.signal)
    if conflicts and not cfg.overwrite:
        raise SettingsMismatchError(_refusal(cfg.out, conflicts))
    adding = adds_signal(store, cfg) and not conflicts
    if adding:  # segments still without the signal, all parts: read before anyone writes
        from logitstore.signal_writer import SignalAppender

        all_jobs = SignalAppender(cfg.out, cfg.signal, spec).pending()
    ranks.wait()  # every rank has read the old store before it may be erased or written
    if conflicts:
        if ranks.is_main:
            log.warning("--overwrite: replacing %s (%s)", cfg.out, "; ".join(conflicts))
            erase_store(cfg.out)
        ranks.wait()
        store = inspect_store(cfg.out)
        settings = replace(settings, chunk_tokens=cfg.chunk_tokens,
                           segment_tokens=cfg.segment_tokens, chunk_samples=cfg.chunk_samples)

    # 2-5. This rank's share of the work, computed and written.
    report = DumpReport(url=cfg.out, signal=cfg.signal, is_main=ranks.is_main,
                        world_size=ranks.world, device=str(next(model.parameters()).device),
                        teacher=info.as_dict())
    report.data = {k: v for k, v in asdict(data_summary).items() if k != "malformed_examples"}
    signal_configs = {**store.signal_configs, cfg.signal: cfg.as_dict()}
    running = {EXTRA_CONFIG: cfg.as_dict(), EXTRA_SIGNAL_CONFIGS: signal_configs,
               EXTRA_SUMMARY: {"status": "running"}, EXTRA_RUNS: store.runs}
    work = _Work(cfg, model, _capture_spec(cfg, vocab), ranks, progress,
                 pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    if adding:
        report.mode = "add-signal"
        report.samples_written = sum(len(job.sample_ids) for job in all_jobs)
        report.tokens_written = sum(sum(job.lengths) for job in all_jobs)
        report.samples_resumed = len(store.committed_ids) - report.samples_written
        _add_signal(work, spec, store)
    else:
        _dump_samples(work, settings, samples, store, running, report)

    # 6. Everyone done: the main process commits parts, config and summary.
    ranks.wait()
    if ranks.is_main:
        manifest = commit_store(cfg.out, extra=running)
        counts = manifest["counts"]
        size = sum(f["size"] for f in manifest["files"].values()) + manifest["index"]["size"]
        report.store = {"samples": counts["samples"], "tokens": counts["tokens"],
                        "target_tokens": counts["target_tokens"], "bytes": size,
                        "bytes_per_token": size / max(counts["tokens"], 1),
                        "signals": sorted(manifest["settings"]["signals"])}
        report.wall_seconds = time.monotonic() - started
        summary = report.as_dict()
        commit_store(cfg.out, extra={**running, EXTRA_SUMMARY: summary,
                                     EXTRA_RUNS: store.runs + [_run_record(summary)]})
    report.wall_seconds = time.monotonic() - started
    return report


@dataclass
class _Work:
    """What every batch of a run needs."""

    cfg: DumpConfig
    model: Any
    spec: Any  # teacher_dump.capture.CaptureSpec
    ranks: RankContext
    progress: bool
    pad_id: int

    def capture(self, chosen: list) -> list[SignalData]:
        """Forward + capture one batch of samples (anything with sample_id, input_ids,
        loss_mask), in order."""
        from teacher_dump.capture import capture_batch, make_batch

        batch = make_batch([s.sample_id for s in chosen], [s.input_ids for s in chosen],
                           [s.loss_mask for s in chosen], pad_id=self.pad_id,
                           device=next(self.model.parameters()).device)
        return capture_batch(self.model, batch, self.spec)

    def bar(self, total: int):
        from tqdm.auto import tqdm

        return tqdm(total=total, unit="sample", desc=f"dump {self.cfg.signal}",
                    disable=not (self.progress and self.ranks.is_main), dynamic_ncols=True)


def _capture_spec(cfg: DumpConfig, vocab: int):
    from teacher_dump.capture import CaptureSpec

    return CaptureSpec(vocab_size=vocab, top_k=cfg.top_k, n_draws=cfg.samples,
                       temperature=cfg.sample_temperature, seed=cfg.seed,
                       hidden_layers=cfg.hidden_layers, hidden_pool=cfg.hidden_pool,
                       attention_layers=cfg.attention_layers, attention_grid=cfg.attention_grid,
                       attention_heads=cfg.attention_heads, logits_chunk=cfg.logits_chunk)


def _dump_samples(work: _Work, settings: StoreSettings, samples: list, store: ExistingStore,
                  extra: dict[str, Any], report: DumpReport) -> None:
    """Dump mode: this rank's batches of the plan, new samples only, into its part."""
    from logitstore.writer import StoreWriter

    committed, ranks, signal = store.committed_ids, work.ranks, work.cfg.signal
    pending = [s for s in samples if s.sample_id not in committed]
    report.samples_written = len(pending)
    report.tokens_written = sum(len(s.input_ids) for s in pending)
    report.samples_resumed = len(samples) - len(pending)
    plan = plan_batches([len(s.input_ids) for s in samples], work.cfg.batch_tokens)
    todo = [j for j in batches_of_rank(len(plan), ranks.rank, ranks.world)
            if any(samples[i].sample_id not in committed for i in plan[j])]
    if not todo:
        log.info("rank %d: nothing left to dump", ranks.rank)
        return
    if store.parts.get(ranks.part):
        raise LogitStoreError(
            f"part {ranks.part} of {work.cfg.out} is complete but samples of its batches are "
            f"missing: the dump was started with another number of processes "
            f"({sum(p.startswith('rank-') for p in store.parts)} parts); rerun it with that many")
    writer = StoreWriter(work.cfg.out, settings, part=ranks.part, commit_store=ranks.world == 1,
                         extra=extra)
    background = BackgroundWriter(writer, work.cfg.queue_batches)
    bar = work.bar(sum(samples[i].sample_id not in committed for j in todo for i in plan[j]))
    tokens, t0 = 0, time.monotonic()
    try:
        for j in todo:
            chosen = [samples[i] for i in plan[j]]
            signals = work.capture(chosen)
            # A batch cut by the last commit of a killed run is recomputed whole (same
            # padding, same numbers); only its missing samples are written.
            out = [Sample(s.sample_id, s.input_ids, s.loss_mask, source=s.source, split=s.split,
                          tags=store_tags(s.tags), signals={signal: sig})
                   for s, sig in zip(chosen, signals) if s.sample_id not in committed]
            background.put(out)
            tokens += sum(len(s.input_ids) for s in out)
            bar.update(len(out))
            bar.set_postfix(tok_s=f"{tokens / max(time.monotonic() - t0, 1e-9):.0f}")
        background.finish()
    except BaseException:
        background.abandon()
        raise
    finally:
        bar.close()


class _AppendSink:
    """The StoreWriter interface BackgroundWriter drives, over a SignalAppender: each item
    is one whole segment, (job, [SignalData per sample])."""

    def __init__(self, appender):
        self.appender = appender

    def add(self, item) -> None:
        self.appender.write(*item)

    def close(self) -> None:
        self.appender.close()

    def abort(self) -> None:
        pass  # segments written so far stay; the others are pending for a rerun


def _add_signal(work: _Work, spec: SignalSpec, store: ExistingStore) -> None:
    """Add-signal mode: the segments of this rank's parts that lack the signal, each
    computed whole (its own batch plan) from the tokens stored in it."""
    from logitstore.reader import StoreReader
    from logitstore.signal_writer import SignalAppender

    url, signal, ranks = work.cfg.out, work.cfg.signal, work.ranks
    mine = [p for i, p in enumerate(sorted(store.parts)) if i % ranks.world == ranks.rank]
    appender = SignalAppender(url, signal, spec, parts=mine, commit_store=ranks.world == 1)
    jobs = appender.pending()
    if not jobs:
        log.info("rank %d: signal %s is already in all its segments", ranks.rank, signal)
        return
    reader = StoreReader(url)
    segment_of = {(seg.part, seg.name): n for n, seg in enumerate(reader.segments)}
    background = BackgroundWriter(_AppendSink(appender), work.cfg.queue_batches)
    bar = work.bar(sum(len(job.sample_ids) for job in jobs))
    try:
        for job in jobs:
            stored = reader.read_segment(segment_of[(job.part, job.segment)], signals=[])
            data: list[SignalData | None] = [None] * len(stored)
            for batch in plan_batches([len(s.input_ids) for s in stored], work.cfg.batch_tokens):
                for i, sig in zip(batch, work.capture([stored[i] for i in batch])):
                    data[i] = sig
                bar.update(len(batch))
            background.put([(job, data)])
        background.finish()
    except BaseException:
        background.abandon()
        raise
    finally:
        bar.close()


def _device(cfg: DumpConfig) -> str | None:
    return None if cfg.device == "auto" else cfg.device


def _refusal(url: str, conflicts: list[str]) -> str:
    return (f"refusing to write into {url}: " + "; ".join(conflicts) + ". Write to a new --out, "
            "or pass --overwrite to replace the existing store")


def _run_record(summary: dict[str, Any]) -> dict[str, Any]:
    """One line of the store's run history (a resumed dump has several)."""
    keys = ("samples_written", "tokens_written", "samples_resumed", "wall_seconds", "world_size",
            "device")
    return {k: summary[k] for k in keys} | {"finished": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                     time.gmtime())}
