"""`teacher-dump --task classify`: image+text records -> a classifier teacher -> a store of kind
classifier (FORMAT.md section 4.3).

    report = run_classify_dump(resolve_config(None, {"task": "classify", "model": DIR,
                                                     "data": ["d/train.jsonl"], "out": "s/"}))

Steps of `run_classify_dump`, everything checked before the weights load:

1. Data: each `--data` is a JSONL file or an imagefolder directory, read with
   `logitstore.toolkit.classify_records.read_classify_records` against the model's heads.
   Each record's split is `--split`, else the data file's name (`train`/`val`/`test` .jsonl,
   or an imagefolder directory so named); a source whose split cannot be told is refused.
2. The teacher's config (teacher_dump.classify_batches.inspect_classifier): not a classifier,
   or a `--features` part it lacks, is refused; its heads decide the labels read.
3. The store at `--out`: a store of the other kind, one dumped with another config (the
   settings of `DumpConfig.as_dict`, resumable ones excepted), or a finished dump lacking
   records of this data, is refused unless `--overwrite` (which replaces it).
4. Records: bad ones (missing or corrupt image, unknown or out-of-range label, bad JSON,
   an input already read from another file, a text-only record for a model with a vision
   tower) are logged one per line as `FILE:LINE: reason`, counted in the summary and
   skipped; every other record is dumped. No usable record at all: one-paragraph error.
5. The model (eval mode, `torch.inference_mode()`), its adapter (`adapter_for`), image
   processor and tokenizer; batches of `--batch-samples` records in data order ->
   `preprocess_batch` -> adapter -> one `ClassifierSample` per record -> `StoreWriter` with
   `StoreSettings(kind="classifier", heads=adapter.heads, features=adapter.parts, ...)`.

What a sample holds: `sample_id` = `classifier_sample_id(image bytes, text)` (stable: the
same input has the same id in any file); `image` = the image's path relative to its data
source's directory (the JSONL file's directory, or the imagefolder root), POSIX separators,
absolute when it lies outside it, "" for a text-only record; `source` = the data source's
absolute path, so the student finds the image at `Path(source).parent / image` (JSONL) or
`Path(source) / image` (imagefolder); `text`; `split`; the labels of every head; the logits of
every head and the chosen feature parts, in float32 numpy before the store's encoding.

Saved config: the manifest's `extra` holds `teacher_dump_config` (the task's settings),
`teacher_dump_summary` (this report) and `teacher_dump_runs`, as for causal-lm dumps.

Resume: one process writes part `rank-00000` and commits every `--segment-samples` samples.
A killed dump rerun with the same command skips the committed samples and continues (the
writer removes the half-written segment); a rerun of a finished dump over the same data
writes nothing and says so. One process only: under a multi-process launch it is refused.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from logitstore.errors import ConfigError, SettingsMismatchError
from logitstore.format import CLASSIFIER, StoreSettings, settings_differences
from logitstore.toolkit.options import config_differences
from teacher_dump.classify_batches import (ClassifierTeacher, forward_batch, inspect_classifier,
                                           load_classifier, load_preprocessors, text_max_length)
from teacher_dump.config import FIELDS, DumpConfig, task_fields
from teacher_dump.existing_store import (EXTRA_CONFIG, EXTRA_RUNS, EXTRA_SUMMARY, ExistingStore,
                                         erase_store, inspect_store, refusal)

log = logging.getLogger(__name__)

PART = "rank-00000"  # the part a one-process dump writes (as causal-lm dumps name theirs)
SPLITS = {"train": "train", "val": "val", "validation": "val", "valid": "val", "dev": "val",
          "test": "test"}


@dataclass
class ClassifyDumpReport:
    url: str
    samples_written: int = 0  # by this run
    samples_resumed: int = 0  # already in the store: skipped
    records_skipped: int = 0  # bad records (file:line in the log)
    store: dict[str, Any] = field(default_factory=dict)  # samples, bytes, splits
    data: dict[str, Any] = field(default_factory=dict)  # per source: usable, skipped
    wall_seconds: float = 0.0
    device: str = ""
    teacher: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # every skipped record, FILE:LINE: why
    is_main: bool = True  # one process (the CLI prints the report of the main process)
    mode: str = "classify"

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("is_main", "problems")}

    def __str__(self) -> str:
        s = self.store
        rate = self.samples_written / self.wall_seconds if self.wall_seconds else 0.0
        splits = ", ".join(f"{k} {v}" for k, v in sorted(s.get("splits", {}).items()))
        return "\n".join([
            f"teacher-dump (classify): {self.teacher.get('model_id', '')} -> {self.url}",
            f"  this run: {self.samples_written} samples written ({self.samples_resumed} "
            f"already in the store) in {self.wall_seconds:.1f} s ({rate:.1f} samples/s), "
            f"{self.device}",
            f"  store: {s.get('samples', 0)} samples ({splits}), {s.get('bytes', 0)} bytes",
            f"  data: {sum(d['usable'] for d in self.data.values())} usable records, "
            f"{self.records_skipped} skipped (listed as FILE:LINE in the log)"])


@dataclass(frozen=True)
class _Source:
    path: Path  # absolute: a JSONL file or an imagefolder directory
    split: str

    @property
    def base(self) -> Path:
        """The directory its records' image paths are relative to."""
        return self.path if self.path.is_dir() else self.path.parent


@dataclass(frozen=True)
class _Item:
    """A usable record, ready for the teacher."""

    record: Any  # logitstore.toolkit.classify_records.ClassifyRecord
    source: _Source
    sample_id: str

    @property
    def image_ref(self) -> str:
        path = self.record.image_path
        if path is None:
            return ""
        try:
            return path.relative_to(self.source.base.resolve()).as_posix()
        except ValueError:  # an absolute path outside the data's directory
            return path.as_posix()


def data_sources(cfg: DumpConfig) -> list[_Source]:
    """Each --data path with its split; every problem at once, as a ConfigError."""
    out, problems = [], []
    for entry in cfg.data:
        path = Path(entry)
        if not path.exists():
            problems.append(f"data {entry}: no such file or directory; --task classify reads "
                            f"local JSONL files of image+text records or imagefolder "
                            f"directories")
            continue
        if path.is_file() and not os.access(path, os.R_OK):
            problems.append(f"data {entry}: not readable (check its permissions)")
            continue
        split = cfg.split or SPLITS.get(path.stem.lower() if path.is_file() else path.name.lower())
        if split is None:
            problems.append(f"data {entry}: cannot tell its split from its name (expected "
                            f"train, val or test .jsonl, or a directory so named); rename it "
                            f"or pass --split")
            continue
        out.append(_Source(path.resolve(), split))
    if problems:
        raise ConfigError(problems)
    return out


def read_items(cfg: DumpConfig, sources: list[_Source],
               teacher: ClassifierTeacher) -> tuple[list[_Item], list[str], dict[str, Any]]:
    """(usable records in data order, every skipped record as "FILE:LINE: reason", counts
    per source). ClassifyDataError when one source holds no usable record."""
    from logitstore.toolkit.classify_records import read_classify_records

    items: list[_Item] = []
    problems: list[str] = []
    counts: dict[str, Any] = {}
    seen: dict[str, str] = {}  # sample id -> location of its first record
    for source in sources:
        data = read_classify_records(source.path, heads=teacher.heads)
        problems += data.problems
        usable = 0
        for record in data.records:
            if teacher.needs_image and record.image_path is None:
                problems.append(f"{record.location}: no image, which {cfg.model} reads")
                continue
            sample_id = record.sample_id  # the store's id (classifier_sample_id)
            if sample_id in seen:
                problems.append(f"{record.location}: same image and text as {seen[sample_id]}")
                continue
            seen[sample_id] = record.location
            items.append(_Item(record, source, sample_id))
            usable += 1
        counts[str(source.path)] = {"split": source.split, "usable": usable,
                                    "skipped": len(data.problems) + len(data.records) - usable}
    if cfg.limit is not None:
        items = items[:cfg.limit]
    return items, problems, counts


def store_conflicts(cfg: DumpConfig, store: ExistingStore, pending: int) -> list[str]:
    """Why this run may not write into `store` (read before the weights load); `pending`:
    records of the data the store lacks."""
    if store.empty:
        return []
    if store.settings.kind != CLASSIFIER:
        return [f"it is a store of kind {store.settings.kind} (signals "
                f"{sorted(store.settings.signals)}), and --task classify writes a classifier "
                f"store"]
    out = []
    if store.config is not None:
        fields = {k: FIELDS[k] for k in task_fields("classify")}
        out += [f"config {d}" for d in config_differences(store.config, cfg.as_dict(), fields,
                                                          saved_as="store")]
    if not out and pending and store.parts.get(PART):
        out.append(f"its dump has finished, yet {pending} record(s) of this data are not in "
                   f"it (other data than it was dumped from)")
    return out


def run_classify_dump(cfg: DumpConfig, *, world: int = 1,
                      progress: bool | None = None) -> ClassifyDumpReport:
    """Dump `cfg.data` through the classifier `cfg.model` into `cfg.out` (module docstring).
    `world`: processes launched (more than one is refused); `progress`: None = cfg.progress."""
    from logitstore.toolkit.classifier_adapter import adapter_for

    started = time.monotonic()
    if world > 1:
        raise ConfigError([f"--task classify runs in one process, but {world} were launched: "
                           f"run it without accelerate launch (or with --num_processes 1)"])
    sources = data_sources(cfg)
    teacher = inspect_classifier(cfg)
    store = inspect_store(cfg.out)
    if not store.empty and store.settings.kind != CLASSIFIER and not cfg.overwrite:
        raise SettingsMismatchError(refusal(cfg.out, store_conflicts(cfg, store, 0)))
    items, problems, counts = read_items(cfg, sources, teacher)
    for problem in problems:
        log.warning("skipped %s", problem)
    pending = [item for item in items if item.sample_id not in store.committed_ids]
    conflicts = store_conflicts(cfg, store, len(pending))
    if conflicts and not cfg.overwrite:
        raise SettingsMismatchError(refusal(cfg.out, conflicts))
    image_processor, tokenizer = load_preprocessors(cfg, teacher)
    model, info = load_classifier(cfg, teacher)
    adapter = adapter_for(model, parts=list(cfg.features) or None, head_name=cfg.head_name)
    if teacher.kind == "composite" and cfg.head_name != FIELDS["head_name"].default:
        log.info("--head-name is ignored: %s names its heads itself (%s)", cfg.model,
                 ", ".join(adapter.heads))
    settings = StoreSettings(kind=CLASSIFIER, heads=dict(adapter.heads),
                             features=dict(adapter.parts), logits_encoding=cfg.logits_encoding,
                             features_encoding=cfg.features_encoding,
                             chunk_samples=cfg.chunk_samples,
                             segment_samples=cfg.segment_samples)
    if not conflicts and not store.empty:
        conflicts = [f"settings {d}" for d in settings_differences(store.settings, settings)]
        if conflicts and not cfg.overwrite:
            raise SettingsMismatchError(refusal(cfg.out, conflicts))
    if conflicts:  # --overwrite: this run's store replaces the old one
        log.warning("--overwrite: replacing %s (%s)", cfg.out, "; ".join(conflicts))
        erase_store(cfg.out)
        store, pending = inspect_store(cfg.out), items
    report = ClassifyDumpReport(cfg.out, samples_written=len(pending),
                                samples_resumed=len(items) - len(pending),
                                records_skipped=len(problems), data=counts,
                                device=info["device"], teacher=info, problems=problems)
    running = {EXTRA_CONFIG: cfg.as_dict(), EXTRA_SUMMARY: {"status": "running"},
               EXTRA_RUNS: store.runs}
    if pending or not store.parts.get(PART):  # a complete part is only consolidated
        _write(cfg, settings, adapter, teacher, (image_processor, tokenizer), pending, running,
               cfg.progress if progress is None else progress)
    else:
        log.info("nothing left to dump: %s holds every usable record of the data", cfg.out)
    _commit(cfg, report, running, store.runs, started)
    return report


def _write(cfg: DumpConfig, settings: StoreSettings, adapter, teacher: ClassifierTeacher,
           preprocessors: tuple[Any, Any], pending: list[_Item], extra: dict[str, Any],
           progress: bool) -> None:
    """Batches of `pending` through the adapter into part PART, committed per segment."""
    from tqdm.auto import tqdm

    from logitstore.classifier_sample import ClassifierSample
    from logitstore.toolkit.classify_records import load_rgb
    from logitstore.writer import StoreWriter

    max_length = text_max_length(cfg, teacher) if teacher.needs_text else 0
    writer = StoreWriter(cfg.out, settings, part=PART, commit_store=True, extra=extra)
    with writer, tqdm(total=len(pending), unit="sample", desc="dump classify",
                      disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, len(pending), cfg.batch_samples):
            chosen = pending[start:start + cfg.batch_samples]
            images = [load_rgb(i.record.image_path) for i in chosen] if teacher.needs_image \
                else []
            outputs = forward_batch(adapter, teacher, images, [i.record.text for i in chosen],
                                    *preprocessors, max_length)
            for item, (logits, features) in zip(chosen, outputs):
                writer.add(ClassifierSample(
                    item.sample_id, logits=logits, features=features,
                    labels=dict(item.record.labels), image=item.image_ref,
                    text=item.record.text, source=str(item.source.path),
                    split=item.source.split))
            bar.update(len(chosen))


def _commit(cfg: DumpConfig, report: ClassifyDumpReport, running: dict[str, Any],
            runs: list[dict[str, Any]], started: float) -> None:
    """The store manifest with the config, this run's summary and the run history."""
    from logitstore.classifier_reader import ClassifierReader
    from logitstore.commit import commit_store

    manifest = commit_store(cfg.out, extra=running)
    size = sum(f["size"] for f in manifest["files"].values()) + manifest["index"]["size"]
    report.store = {"samples": manifest["counts"]["samples"], "bytes": size,
                    "splits": ClassifierReader(cfg.out).split_counts()}
    report.wall_seconds = time.monotonic() - started
    summary = report.as_dict()
    run = {k: summary[k] for k in ("samples_written", "samples_resumed", "records_skipped",
                                   "wall_seconds", "device")}
    run["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    commit_store(cfg.out, extra={**running, EXTRA_SUMMARY: summary, EXTRA_RUNS: runs + [run]})
