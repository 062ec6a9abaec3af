"""`distill-eval --task classify`: teacher, student and baseline classifiers scored on the same
labelled samples, with the metrics student-train reports (issue 17, section 3).

    report, paths = run_classify(resolve_config(None, {"task": "classify", "model": "run/final",
                                                       "teacher": "teacher/", "data": ["test.jsonl"],
                                                       "out": "report/"}))

Order, chosen so that every problem surfaces before a weight loads (`check_classify`):
1. the options (eval/config.py): --data or --store, exactly one;
2. each role's config (eval/classify_models.py): a classifier, with the student's heads (names
   and class counts) — every role is compared on the same heads;
3. the samples: `--data` JSONL files / imagefolder directories read with
   `read_classify_records` against those heads (bad records skipped, listed as FILE:LINE and
   counted in the report; a record without an image for a model with a vision tower too; an
   input already read from another file is skipped as a duplicate), or the `--split` of the
   classifier store `--store` (labels, texts, images found beside each sample's recorded data
   source by logitstore.toolkit.classify_store_images, every image checked to exist);
4. the preprocessors each model saved (image processor, tokenizer);
then, one model in memory at a time: load, score every sample (logits per head), free.

Metrics (logitstore.toolkit.classify_metrics, bootstrap `--bootstrap` resamples drawn with
`--seed`, ECE over `--ece-bins`): per role `classifier_metrics` (per head accuracy, macro-F1,
ECE, NLL with standard errors; mean macro-F1); paired differences over the same samples
(`paired_differences`) student − baseline and student − teacher, "resolved" when |d| > 2 SE.
The report (eval/classify_report.py) goes to --out: report.json, report.md, report.png,
config.yaml.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eval.classify_models import (ClassifierModel, Sample, inspect_classifier, load_classifier,
                                  load_preprocessors, score)
from eval.config import EvalConfig
from logitstore.errors import ConfigError, LogitStoreError

log = logging.getLogger(__name__)

AUTO_SPLITS = ("test", "val", "validation", "eval", "dev")
MISSING_SHOWN = 5


@dataclass
class ClassifyPlan:
    """Everything checked before any weight loads."""

    models: dict[str, ClassifierModel]  # role -> model, report order
    heads: dict[str, int]
    samples: list[Sample]
    data: dict[str, Any]  # report.json's `data`: sources, samples, skipped, problems
    preprocessors: dict[str, tuple[Any, Any]] = field(default_factory=dict)


def _check_heads(models: dict[str, ClassifierModel]) -> dict[str, int]:
    heads = models["student"].heads
    wrong = [f"{role} {m.spec.name} has heads {m.heads}" for role, m in models.items()
             if m.heads != heads]
    if wrong:
        raise ConfigError([f"every role must classify the same heads as the student "
                           f"({models['student'].spec.name}: {heads}), but "
                           f"{'; '.join(wrong)}; compare models of the same task"])
    return heads


def _read_data(cfg: EvalConfig, heads: dict[str, int], needs_image: str | None
               ) -> tuple[list[Sample], dict[str, Any]]:
    """Samples of every --data source in order, and what was read and skipped."""
    from logitstore.toolkit.classify_records import read_classify_records

    missing = [d for d in cfg.data if not Path(d).exists()]
    if missing:
        raise ConfigError([f"data {d}: no such file or directory; --task classify reads local "
                           f"JSONL files of labelled image+text records or imagefolder "
                           f"directories" for d in missing])
    samples, problems, sources, seen = [], [], {}, {}
    for path in cfg.data:
        records, found = read_classify_records(path, heads=heads)  # ClassifyDataError: none
        problems += found
        usable = 0
        for record in records:
            if needs_image and record.image_path is None:
                problems.append(f"{record.location}: no image, which the {needs_image} reads")
            elif record.sample_id in seen:
                problems.append(f"{record.location}: same image and text as "
                                f"{seen[record.sample_id]}")
            else:
                seen[record.sample_id] = record.location
                samples.append(Sample(record.image_path, record.text, dict(record.labels)))
                usable += 1
        sources[str(path)] = {"usable": usable, "skipped": len(found) + len(records) - usable}
    if not samples:
        raise LogitStoreError(f"no usable record in {', '.join(cfg.data)}: {len(problems)} "
                              f"skipped, e.g. {'; '.join(problems[:MISSING_SHOWN])}")
    return samples, {"sources": sources, "samples": len(samples),
                     "records_skipped": len(problems), "problems": problems}


def _pick_split(counts: dict[str, int], split: str, url: str) -> str:
    if split != "auto":
        if not counts.get(split):
            raise ConfigError([f"--split {split}: store {url} has no sample in it (its splits: "
                               f"{counts or 'none'}); choose one of those"])
        return split
    for name in AUTO_SPLITS:
        if counts.get(name):
            return name
    raise ConfigError([f"--split auto: store {url} has none of the splits "
                       f"{', '.join(AUTO_SPLITS)} (its splits: {counts or 'none'}); name one "
                       f"with --split"])


def _read_store(cfg: EvalConfig, heads: dict[str, int], needs_image: str | None
                ) -> tuple[list[Sample], dict[str, Any]]:
    """Samples of the store split, images checked to exist."""
    from logitstore.classifier_reader import ClassifierReader
    from logitstore.toolkit.classify_store_images import resolve_data_root, resolve_store_images

    reader = ClassifierReader(cfg.store)  # StoreNotFoundError, StoreKindError...
    if dict(reader.heads) != heads:
        raise ConfigError([f"store {cfg.store} holds the heads {dict(reader.heads)}, the "
                           f"models classify {heads}; evaluate on a store dumped for them"])
    split = _pick_split(reader.split_counts(), cfg.split, cfg.store)
    arrays = reader.arrays(split)
    paths = resolve_store_images(
        arrays, data_root=resolve_data_root(None, reader), needed_by=needs_image, where=f"store {cfg.store} split {split!r}",
        fix="put the records back where teacher-dump read them from (the data sources named)")
    samples = [Sample(p, t or "", {h: int(arrays.labels[h][i]) for h in heads})
               for i, (p, t) in enumerate(zip(paths, arrays.texts))]
    return samples, {"store": cfg.store, "split": split, "samples": len(samples),
                     "records_skipped": 0, "problems": []}


def check_classify(cfg: EvalConfig) -> ClassifyPlan:
    """Every check of the module docstring's steps 1-4; ConfigError / LogitStoreError
    (one paragraph each) for what is wrong, before any weight loads."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ConfigError([f"--out {out} exists and is not a directory; give a directory "
                           f"(created if missing)"])
    models = {role: inspect_classifier(role, name, cfg) for role, name in cfg.roles().items()}
    heads = _check_heads(models)
    needs_image = next((f"{role} ({m.spec.name})" for role, m in models.items()
                        if m.needs_image), None)
    samples, data = (_read_data if cfg.data else _read_store)(cfg, heads, needs_image)
    for problem in data["problems"]:
        log.warning("skipped %s", problem)
    plan = ClassifyPlan(models, heads, samples, data)
    plan.preprocessors = {role: load_preprocessors(m, cfg) for role, m in models.items()}
    return plan


def labels_of(plan: ClassifyPlan) -> dict[str, Any]:
    """{head: labels [N] int64}, -1 = unlabelled."""
    import numpy as np

    return {h: np.array([s.labels.get(h, -1) for s in plan.samples], np.int64)
            for h in plan.heads}


def score_roles(cfg: EvalConfig, plan: ClassifyPlan) -> tuple[dict, dict]:
    """({role: {head: logits [N, C]}}, {role: models entry}), one model in memory at a time."""
    import gc

    logits, infos = {}, {}
    for role, model in plan.models.items():
        network, infos[role] = load_classifier(model, cfg)
        log.info("[%s] scoring %d samples", role, len(plan.samples))
        logits[role] = score(network, model, plan.preprocessors[role], plan.samples,
                             cfg.batch_size, head_name=cfg.head_name, progress=cfg.progress)
        del network
        gc.collect()
    return logits, infos


def run_classify(cfg: EvalConfig) -> tuple[dict[str, Any], dict[str, Path]]:
    """(report, written paths). Raises LogitStoreError subclasses for user errors."""
    from eval.classify_report import build_classify_report, write_classify_report

    plan = check_classify(cfg)
    logits, infos = score_roles(cfg, plan)
    report = build_classify_report(logits, labels_of(plan), models=infos, heads=plan.heads,
                                   data=plan.data, config=cfg.as_dict(),
                                   options={"bootstrap": cfg.bootstrap, "seed": cfg.seed,
                                            "ece_bins": cfg.ece_bins})
    return report, write_classify_report(report, cfg.out)
