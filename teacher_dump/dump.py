"""The teacher-dump run: data -> teacher forward -> captured signals -> store.

    report = run_dump(resolve_config("configs/tiny-cpu.yaml", {"data": [...], "out": "s/"}))

Two modes, chosen from what `cfg.out` holds:

* **dump** (new store, or one holding `cfg.signal`): samples from `cfg.data` are written
  with their tokens and the signal (`logitstore.writer.StoreWriter`, one part per rank).
* **add-signal** (a complete store without `cfg.signal`): a second teacher's signal is
  added over the tokens already stored (`logitstore.signal_writer.SignalAppender`). The
  data must be the one the store was dumped from (same dataset fingerprint); token ids
  and loss masks are read back from the store.
* **add-signal, another tokenizer** (format 2.2: a store with text written by a teacher of
  another tokenizer): the data is not read; each stored sample's text is cut by this
  teacher's tokenizer and the signal stored on those tokens, as tokenization `cfg.signal`
  (`teacher_dump.foreign_tokens`, whose docstring and FORMAT.md section 4.2 state the
  rules: chat turns from the stored roles, targets by bytes, samples over `max_length`
  cut and counted, never dropped). A store without text is refused in one paragraph.

Steps, top to bottom in `run_dump`:

0. Hub datasets of `cfg.data` (`--data`, or the alias's `default_data`) are checked to be
   readable (`teacher_dump.default_data`): offline and not cached fails before any loading.
1. Tokenizer, then the existing store (`teacher_dump.existing_store`): another tokenizer,
   or a saved config of the same signal that differs on a content key, is refused -
   unless `overwrite`, which replaces such a store. A store with the same config is
   resumed (never replaced), so a killed dump restarted with the same command continues.
   A new store keeps each sample's text, token spans and the tokenizer's files unless
   `--no-text`; an existing one keeps its own choice (`teacher_dump.store_text`). The main
   process writes the tokenizer files before any rank's writer opens.
2. Data: a stream of samples (`logitstore.toolkit.data.iter_samples`), read and
   tokenized as the dump consumes it, so memory does not grow with the data (its first
   sample is read before the model loads, to fail early on unusable data). The *batch
   plan* (`teacher_dump.ranks.stream_batches`): the stream is read `read_window_tokens`
   tokens at a time, each window sorted by (length, position) and cut into batches of at
   most `batch_tokens` padded tokens (batch size x longest sample). The data summary and
   this run's counts are added up as the stream is read. In add-signal mode the data is
   only compared with the store (read once, constant memory) and each stored segment gets
   its own plan.
3. Ranks (`teacher_dump.ranks`): every rank reads the whole stream; batch j of the plan
   goes to process j mod world_size (add-signal: part i of the store to process i mod
   world_size). Batches are the same whatever the number of processes, so every sample is
   computed once, in the same batch - same padding, same floating-point results - as in a
   1-process dump, and a resume recomputes a half-written batch (segment) whole. Each rank
   writes part `rank-{i:05d}`.
4. Resume: sample ids committed in any part (segments holding the signal) are skipped.
   Teacher layers are compared as block numbers (`-1` and `3` of a 4-layer teacher are
   one layer) where the store records the teacher's depth.
5. Forward under inference mode, capture (`teacher_dump.capture`) and hand the numpy
   results to a writer thread through a bounded queue (`teacher_dump.batch_loops`,
   `teacher_dump.background_writer`), so the accelerator never waits for compression or
   I/O; a writer-thread error is re-raised in the main thread.
6. All ranks wait; the main process commits the store with the resolved config and the
   run summary in the manifest's `extra`.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from logitstore.commit import commit_store
from logitstore.fs import StoreFS
from logitstore.writer import write_tokenizer_files
from logitstore.toolkit.data import DataOptions, DataSourceError, DataSummary, iter_samples
from logitstore.errors import ConfigError, SettingsMismatchError
from logitstore.format import (AttentionSpec, HiddenSpec, SampledSpec, SignalSpec, StoreSettings,
                               TopKSpec, canonical_layers)
from teacher_dump.batch_loops import DumpWork, add_signal, capture_spec, dump_samples
from teacher_dump.config import DumpConfig
from teacher_dump.default_data import check_dump_data_readable
from teacher_dump.existing_store import (EXTRA_CONFIG, EXTRA_RUNS, EXTRA_SIGNAL_CONFIGS,
                                         EXTRA_SUMMARY, ExistingStore, adds_signal, data_conflicts,
                                         early_conflicts, erase_store, inspect_store, is_foreign,
                                         refusal, settings_conflicts)
from teacher_dump.ranks import RankContext
from teacher_dump.store_text import kept_store_text, new_store_text, reads_text

log = logging.getLogger(__name__)


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
    # a teacher with another tokenizer than the store's: the store's samples it cut at its
    # max_length (covering less than their text), counted over the whole store; else None
    samples_cut: int | None = None

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
            f"{d.get('truncated', 0)} truncated, {d.get('windowed', 0)} split into windows"
            if self.samples_cut is None else
            f"  data: the store's samples, cut by this teacher's own tokenizer (tokenization "
            f"{self.signal!r}); {self.samples_cut} cut at its max length (none dropped)",
        ])


def read_data(cfg: DumpConfig, tokenizer, with_text: bool = False) -> tuple[Iterator, DataSummary]:
    """The samples of `cfg.data` as a stream, read and tokenized lazily as it is consumed
    (`with_text`: with their text and token spans), and the summary it fills meanwhile
    (complete once the stream is). The first sample is read here, so data without a usable
    sample fails before the model is loaded."""
    options = DataOptions(format=cfg.format, max_length=cfg.max_length, with_text=with_text,
                          overflow="window" if cfg.split_long else "truncate",
                          include_prompt=cfg.include_prompt,
                          use_chat_template=cfg.use_chat_template, wrap_in_chat=cfg.wrap_in_chat,
                          dedup=cfg.dedup, limit=cfg.limit, mcq_index_base=cfg.mcq_index_base)
    summary = DataSummary()
    # Sample ids are unique without keeping them: dedup drops a repeated record, and without
    # dedup iter_samples refuses sources that would be read twice.
    stream = iter_samples(list(cfg.data), tokenizer, options, summary)
    first = next(stream, None)
    if first is None:
        raise DataSourceError(f"no usable samples in {', '.join(cfg.data)}. "
                              + " ".join(str(summary).split()))
    return itertools.chain([first], stream), summary


@dataclass
class _Plan:
    """What run_dump has found and decided before any rank writes."""

    store: ExistingStore
    settings: StoreSettings
    spec: SignalSpec
    conflicts: list[str]  # non-empty only with --overwrite: the store is replaced
    tokenizer_files: dict[str, bytes]  # {"tokenizer/<name>": bytes} a new store keeps


def run_dump(cfg: DumpConfig, *, ranks: RankContext | None = None,
             progress: bool | None = None) -> DumpReport:
    """Dump `cfg.data` through `cfg.model` into the store `cfg.out` (module docstring).
    `progress`: show the progress bar (None: as `cfg.progress` says)."""
    from teacher_dump.logit_stats import resolve_kernel
    from logitstore.toolkit.hf import load_causal_lm, load_tokenizer
    from logitstore.toolkit.tokenizer_identity import tokenizer_fingerprint, vocab_size_of

    started = time.monotonic()
    ranks = ranks or RankContext.from_accelerate()
    # Offline without the data: refused before any load. Into a store with text the run may
    # add a teacher of another tokenizer, which reads no data: checked once that is known.
    data_checked = not inspect_store(cfg.out).holds_text
    if data_checked:
        check_dump_data_readable(cfg.data, cfg.model)
    tokenizer = load_tokenizer(cfg.model, cfg.revision, cfg.trust_remote_code)
    fingerprint, vocab = tokenizer_fingerprint(tokenizer), vocab_size_of(tokenizer)
    store, samples, data_summary, conflicts = _check_store_and_read_data(
        cfg, tokenizer, fingerprint, vocab, data_checked)
    foreign = None
    if not conflicts and is_foreign(store, fingerprint, vocab):  # the store's text is the data
        from teacher_dump.foreign_tokens import ForeignTokenizer

        foreign = ForeignTokenizer.of(tokenizer, cfg.signal, cfg.model, fingerprint, vocab,
                                      cfg.max_length)
        _say_foreign_choices(cfg)
    quantize = None if cfg.quantize == "auto" else cfg.quantize  # None: hf decides
    model, info = load_causal_lm(cfg.model, quantize=quantize,
                                 dtype=cfg.dtype, device=_device(cfg) or ranks.device,
                                 need_attentions=bool(cfg.attention_layers),
                                 trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
    kernel = resolve_kernel(cfg.capture_kernel, next(model.parameters()).device)  # compiles
    _warm_up_pyarrow()
    plan = _plan_store(cfg, tokenizer, (fingerprint, vocab), model, info, kernel, store,
                       conflicts, foreign)
    adding = (adds_signal(plan.store, cfg) or foreign is not None) and not plan.conflicts
    if adding:  # segments still without the signal, all parts: read before anyone writes
        from logitstore.signal_writer import SignalAppender

        all_jobs = [] if not adds_signal(plan.store, cfg) else SignalAppender(
            cfg.out, cfg.signal, plan.spec, tokenization=foreign and foreign.spec,
            tokenizer_files=foreign and foreign.files).pending()
    ranks.wait()  # every rank has read the old store before it may be erased or written
    if plan.conflicts:
        _replace_store(cfg, ranks, plan)
    if plan.tokenizer_files:  # written once, before any rank's writer looks for them
        if ranks.is_main:
            write_tokenizer_files(StoreFS(cfg.out), plan.settings, plan.tokenizer_files)
        ranks.wait()

    # 2-5. This rank's share of the work, computed and written.
    report = DumpReport(url=cfg.out, signal=cfg.signal, is_main=ranks.is_main,
                        world_size=ranks.world, device=str(next(model.parameters()).device),
                        teacher=info.as_dict())
    signal_configs = {**plan.store.signal_configs, cfg.signal: cfg.as_dict()}
    running = {EXTRA_CONFIG: cfg.as_dict(), EXTRA_SIGNAL_CONFIGS: signal_configs,
               EXTRA_SUMMARY: {"status": "running"}, EXTRA_RUNS: plan.store.runs}
    progress = cfg.progress if progress is None else progress
    work = DumpWork(cfg, model, capture_spec(cfg, vocab, kernel), ranks, progress,
                    pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
                    tokenizer_files=plan.tokenizer_files, foreign=foreign)
    if adding:
        report.mode = "add-signal"
        report.samples_written = sum(len(job.sample_ids) for job in all_jobs)
        report.tokens_written = sum(sum(job.lengths) for job in all_jobs)
        report.samples_resumed = len(plan.store.committed_ids) - report.samples_written
        if adds_signal(plan.store, cfg):  # else a foreign signal the store holds whole
            add_signal(work, plan.spec, plan.store)
    else:
        dump_samples(work, plan.settings, samples, plan.store, running, report)
    # Complete now: the stream has been read to its end (by the dump, or by data_conflicts).
    report.data = {k: v for k, v in asdict(data_summary).items() if k != "malformed_examples"}
    ranks.wait()
    if ranks.is_main:
        _commit(cfg, report, running, plan.store.runs, started,
                foreign.name if foreign is not None else None)
    report.wall_seconds = time.monotonic() - started
    return report


def _check_store_and_read_data(cfg: DumpConfig, tokenizer, fingerprint: str, vocab: int,
                               data_checked: bool):
    """Steps 1-2: (store, samples, data summary, conflicts); a conflict is raised unless
    `cfg.overwrite` (then the store will be replaced). `data_checked`: the data sources were
    checked readable already."""
    store = inspect_store(cfg.out)
    conflicts = early_conflicts(store, cfg, fingerprint, vocab)
    if conflicts and not cfg.overwrite:
        raise SettingsMismatchError(refusal(cfg.out, conflicts))
    if not conflicts and is_foreign(store, fingerprint, vocab):
        return store, None, DataSummary(), []  # the samples are the store's: no data read
    if not cfg.data:  # config allowed it for a teacher of another tokenizer only
        raise ConfigError([f"data is required: {cfg.out} was written by {cfg.model}'s own "
                           f"tokenizer, so its signal is added over the store's samples "
                           f"read again from their data (--data)"])
    if not data_checked:
        check_dump_data_readable(cfg.data, cfg.model)  # offline without data: before the model
    adding = not conflicts and adds_signal(store, cfg)  # the data is only compared
    samples, data_summary = read_data(cfg, tokenizer, not adding and reads_text(cfg, store))
    if adding:
        conflicts = data_conflicts(store, cfg, samples)  # reads the stream to its end
        if conflicts and cfg.overwrite:  # the store will be replaced: dump from a new read
            samples, data_summary = read_data(cfg, tokenizer, cfg.text)
    if conflicts and not cfg.overwrite:
        raise SettingsMismatchError(refusal(cfg.out, conflicts))
    return store, samples, data_summary, conflicts


def _plan_store(cfg: DumpConfig, tokenizer, tokenizer_id: tuple[str, int], model, info,
                kernel: str, store: ExistingStore, conflicts: list[str],
                foreign=None) -> _Plan:
    """The teacher's signal spec and the store settings of this run, checked against the
    model and the existing store; `tokenizer_id`: (fingerprint, vocabulary size). With
    `foreign` (a tokenizer other than the store's) the signal is on its own tokenization
    and the store's settings are kept."""
    from logitstore.toolkit.tokenizer_identity import check_vocab_compat

    fingerprint, vocab = tokenizer_id
    problems = model_problems(cfg, model, vocab)
    if problems:
        raise ConfigError(problems)
    check_vocab_compat(tokenizer, model)
    stored = store.settings.signals.get(cfg.signal) if store.settings else None
    # A store written before the teacher's depth was recorded keeps its layer indices as
    # given when it is resumed (not when --overwrite replaces it for an earlier conflict).
    legacy = stored is not None and stored.depth is None and not conflicts
    spec = teacher_signal(cfg, model, info, kernel, record_depth=not legacy)
    if foreign is not None:
        spec = replace(spec, tokenization=foreign.name)
        return _Plan(store, store.settings, spec, [], {})
    # Layout keys (chunk/segment sizes) of an existing store win: they do not change content.
    layout = store.settings or StoreSettings(vocab, fingerprint, chunk_tokens=cfg.chunk_tokens,
                                             segment_tokens=cfg.segment_tokens,
                                             chunk_samples=cfg.chunk_samples)
    # So does its text setting, with its tokenizer files (teacher_dump.store_text).
    kept = store.settings is not None and not conflicts
    text = (kept_store_text(cfg.text, store.settings) if kept
            else new_store_text(cfg.text, tokenizer))
    settings = StoreSettings(vocab_size=vocab, tokenizer_fingerprint=fingerprint,
                             signals={cfg.signal: spec}, tokenizer_name=cfg.model,
                             chunk_tokens=layout.chunk_tokens, segment_tokens=layout.segment_tokens,
                             chunk_samples=layout.chunk_samples, text=text.text,
                             tokenizer_files=text.entries)
    conflicts = conflicts or settings_conflicts(store, settings, cfg.signal)
    if conflicts and not cfg.overwrite:
        raise SettingsMismatchError(refusal(cfg.out, conflicts))
    if conflicts and kept:  # --overwrite replaces the store: this run's choice
        text = new_store_text(cfg.text, tokenizer)
        settings = replace(settings, text=text.text, tokenizer_files=text.entries)
    return _Plan(store, settings, spec, conflicts, text.files)


def _replace_store(cfg: DumpConfig, ranks: RankContext, plan: _Plan) -> None:
    """--overwrite of a conflicting store: erase it (main rank), start with this run's layout."""
    if ranks.is_main:
        log.warning("--overwrite: replacing %s (%s)", cfg.out, "; ".join(plan.conflicts))
        erase_store(cfg.out)
    ranks.wait()
    plan.store = inspect_store(cfg.out)
    plan.settings = replace(plan.settings, chunk_tokens=cfg.chunk_tokens,
                            segment_tokens=cfg.segment_tokens, chunk_samples=cfg.chunk_samples)


def _commit(cfg: DumpConfig, report: DumpReport, running: dict[str, Any],
            runs: list[dict[str, Any]], started: float, tokenization: str | None = None) -> None:
    """Step 6 (main process): commit parts, config and the run summary (`tokenization`: of
    a foreign teacher's signal, whose cut samples it counts)."""
    manifest = commit_store(cfg.out, extra=running)
    if tokenization is not None:
        from teacher_dump.foreign_tokens import count_cut

        report.samples_cut = count_cut(cfg.out, tokenization)
    counts = manifest["counts"]
    size = sum(f["size"] for f in manifest["files"].values()) + manifest["index"]["size"]
    report.store = {"samples": counts["samples"], "tokens": counts["tokens"],
                    "target_tokens": counts["target_tokens"], "bytes": size,
                    "bytes_per_token": size / max(counts["tokens"], 1),
                    "signals": sorted(manifest["settings"]["signals"])}
    report.wall_seconds = time.monotonic() - started
    summary = report.as_dict()
    commit_store(cfg.out, extra={**running, EXTRA_SUMMARY: summary,
                                 EXTRA_RUNS: runs + [_run_record(summary)]})


def teacher_signal(cfg: DumpConfig, model, info, kernel: str, *,
                   record_depth: bool = True) -> SignalSpec:
    """The store's description of what this run captures from `model`; `kernel`: the
    resolved capture kernel (a resume with another one is refused: see logit_stats).
    With `record_depth` the teacher's depth is stored and layers as block numbers
    0..depth-1 (`-1` of a 4-layer teacher is stored as 3); without it (resuming a store
    written before depths were recorded), layers as given and no depth."""
    text = model.config.get_text_config()
    depth = int(text.num_hidden_layers) if record_depth else None
    hidden_layers = canonical_layers(cfg.hidden_layers, depth)
    attention_layers = canonical_layers(cfg.attention_layers, depth)
    heads = int(text.num_attention_heads)
    teacher = {k: v for k, v in info.as_dict().items() if k not in ("device", "is_local")}
    teacher.update(num_layers=int(text.num_hidden_layers), hidden_size=int(text.hidden_size),
                   capture=f"grouped-inverse-cdf/{kernel}",
                   num_attention_heads=heads,
                   hidden_layers_index="output.hidden_states[1:] (block outputs; -1 = last, "
                                       "after the final norm)")
    enc, step = cfg.logprob_encoding, cfg.logprob_step
    return SignalSpec(
        topk=TopKSpec(cfg.top_k, enc, step) if cfg.top_k else None,
        sampled=(SampledSpec(cfg.samples, cfg.sample_temperature, enc, step, cfg.singleton_step,
                             logprobs=cfg.sampled_logprobs) if cfg.samples else None),
        hidden=(HiddenSpec(hidden_layers, int(text.hidden_size), cfg.hidden_pool,
                           cfg.hidden_dtype) if cfg.hidden_layers else None),
        attention=(AttentionSpec(attention_layers,
                                 1 if cfg.attention_heads == "mean" else heads,
                                 cfg.attention_grid, cfg.attention_heads, cfg.attention_dtype)
                   if cfg.attention_layers else None),
        teacher=teacher, depth=depth)


def model_problems(cfg: DumpConfig, model, vocab: int) -> list[str]:
    n = int(model.config.get_text_config().num_hidden_layers)
    out = [f"{key}: layer {i} is out of range for {cfg.model}, which has {n} layers "
           f"(valid: {-n}..{n - 1})"
           for key in ("hidden_layers", "attention_layers") for i in getattr(cfg, key)
           if not -n <= i < n]
    for key in ("hidden_layers", "attention_layers"):
        blocks = canonical_layers(getattr(cfg, key), n)
        twice = sorted({b for b in blocks if blocks.count(b) > 1 and 0 <= b < n})
        out += [f"{key}: {' and '.join(str(i) for i in getattr(cfg, key) if i % n == b)} are "
                f"the same layer of {cfg.model}, which has {n} layers; list each layer once"
                for b in twice]
    if cfg.top_k > vocab:
        out.append(f"top_k: {cfg.top_k} is larger than the vocabulary ({vocab})")
    return out


def _warm_up_pyarrow() -> None:
    """pyarrow imports pandas on its first array (~0.5 s of CPU): paid here, with the other
    loading, rather than by the writer thread while the teacher runs."""
    import pyarrow as pa

    pa.array([0])


def _say_foreign_choices(cfg: DumpConfig) -> None:
    """Choices that a teacher of another tokenizer than the store's ignores or makes
    useless, said before its weights load (the run goes on: they are not errors)."""
    if cfg.data:
        log.info("--data is not read: %s's tokenizer is not the store's, so it cuts the "
                 "store's own samples (their stored text)", cfg.model)
    if cfg.samples and not cfg.top_k and cfg.sample_temperature != 1.0 \
            and not cfg.sampled_logprobs:
        log.warning("signal %r stores draws at sample temperature %g without their log-probs "
                    "and no top-k: a student of another tokenizer than %s's reads draws as an "
                    "estimate of the teacher's T=1 distribution, which these do not give "
                    "(students of this tokenizer can use them). Keep --sampled-logprobs, draw "
                    "at --sample-temperature 1, or set --top-k (e.g. 32)", cfg.signal,
                    cfg.sample_temperature, cfg.model)
    if cfg.split_long:
        log.warning("--split-long does not apply to a teacher of another tokenizer: it cuts "
                    "the store's own samples, each one whole up to its --max-length of %s "
                    "tokens (the rest of a longer one is not covered by this signal)",
                    cfg.max_length)


def _device(cfg: DumpConfig) -> str | None:
    return None if cfg.device == "auto" else cfg.device


def _run_record(summary: dict[str, Any]) -> dict[str, Any]:
    """One line of the store's run history (a resumed dump has several)."""
    keys = ("samples_written", "tokens_written", "samples_resumed", "wall_seconds", "world_size",
            "device")
    return {k: summary[k] for k in keys} | {"finished": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                     time.gmtime())}
