"""The students of bench/cross_tokenizer_bench.py: every variant of one seed in one loop.

Every variant reads the SAME stored samples in the same order: one StoreStream over teacher
A's store whose collate_fn hands back the raw rows of samples, and each variant turns those
rows into its own batch:
  ce-A      tokenizer A, CE only            student_train.collate.collate (the stored ids)
  kd-A      tokenizer A, KD from store A    same batch; top-k target, the existing path
  kd-A-draws                                (only when --variants names it) kd-A with the
                                            signal's 16 draws as the target (sampled)
  kd-A-drop                                 (only when --variants names it) kd-A with no KD
                                            target at a random KD_DROP_SHARE of positions
                                            (CE alone there, as a cross student where it
                                            has no target): what missing targets cost
  kd-A-drop-blend, xkd-pkl-blend,           (only when --variants names them) with
  xkd-B-pkl-blend, xkd-AB-pkl-blend         ce_without_target blend: CE at 1 - alpha where
                                            no KD target, not 1
  ce-C      tokenizer C, CE only            the stored texts re-tokenized with C (the uld
                                            batch below: same tokens, its signal unused)
  xkd-pkl   tokenizer C, KD from store A    student_train.cross_tokenizer.cross_setup with
  xkd-uld                                   cross_loss pkl / uld: its CrossCollate (tokenize,
                                            align by byte spans, gather the top-k) and its
                                            vocabulary map, as `student-train` sets them up
  xkd-pkl-aligned                           (only when --variants names it) xkd-pkl with
                                            inside_token_targets and chained_token_targets
                                            false: aligned positions only, the plain mapped
                                            target (the behaviour before both)
  xkd-pkl-unchained                         (only when --variants names it) xkd-pkl with
                                            chained_token_targets false: a student token
                                            spanning several teacher tokens gets the first
                                            one's piece (the behaviour before chains)
  xkd-pkl-draws                             (only when --variants names it) xkd-pkl with
                                            the signal's draws as the target (target
                                            sampled: the distribution they estimate,
                                            student_train/cross_sampled.py); its
                                            reference is kd-A-draws
  xkd-B-pkl tokenizer C, KD from store B    (unless --no-b) teacher B's samples of the same
                                            ids, through B's own cross setup
  xkd-AB-pkl tokenizer C, KD from store AB  (unless --no-b) two teachers: store A plus
                                            teacher B's signal on B's own tokenization
                                            (format 2.2), signals A:0.5, B:0.5 (bench
                                            --two-teacher-weights: others), pkl; store
                                            AB's samples of the same ids, both signals
  xkd-AB-pkl-means                          (only when --variants names it) xkd-AB-pkl with
                                            mix_signals_per_position false: each teacher's
                                            mean over its own positions, weighted
  xkd-AB-pkl-conf                           (only when --variants names it) xkd-AB-pkl with
                                            signal_mixture confidence: where both teachers
                                            give a target, each weighs its weight times
                                            the probability its target gives the next token
  xkd-AB-pkl-priority                       (only when --variants names it) xkd-AB-pkl with
                                            signal_mixture priority: teacher A's target
                                            where it has one, B's only where A has none
  xkd-AB-pkl-priority-blend                 (only when --variants names it) the same with
                                            ce_without_target blend
  xkd-B-pkl-draws, xkd-AB-pkl-draws         (only when --variants names them) xkd-B-pkl and
                                            xkd-AB-pkl with the teachers' draws as target
  xkd-B-pkl-aligned, xkd-AB-pkl-aligned     (only when --variants names them) xkd-B-pkl and
                                            xkd-AB-pkl with inside_token_targets and
                                            chained_token_targets false (as xkd-pkl-aligned)
  xkd-pkl-noinside, xkd-B-pkl-noinside,     (only when --variants names them) with
  xkd-AB-pkl-noinside                       inside_token_targets false, chains kept
  xkd-pkl-renorm, xkd-B-pkl-renorm,         (only when --variants names them) with
  xkd-AB-pkl-renorm                         inside_other_bin false: an inside-token target
                                            renormalised over the continuing entries (the
                                            behaviour before 2026-12-07; the others keep
                                            the mass of teacher tokens ending there as an
                                            "other" bin)
  xkd-pkl-keep-unchained,                   (only when --variants names them) with
  xkd-B-pkl-keep-unchained,                 skip_unchained_pairs false:
  xkd-AB-pkl-keep-unchained                 a coarser pair
                                            whose chain cannot be read keeps the plain
                                            mapped target (the behaviour before
                                            2026-12-07 15:30; now skipped)
Per seed, the variants of one tokenizer start from the same weights; the A and C students
share every weight but the embeddings and lm_head (both drawn under torch.manual_seed(seed),
then C's block weights copied into A). Same optimizer (AdamW), schedule, steps and alpha;
each step is student_train.step.Step.train (the real loop). Timing: the median seconds of
Step.train per variant and of each collate per batch (the first step left out); variants run
interleaved, their order rotating step by step, so the machine's load falls on all alike.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import replace
from types import SimpleNamespace

# Every variant's name is built here, once: a student, then an ablation's suffix.
A_VARIANTS = ("ce-A", "kd-A", "kd-A-draws", "kd-A-drop", "kd-A-drop-blend")  # the rest: C
# kd-A-drop's share of positions without a KD target: xkd-pkl's (93.3 % of its trained
# positions get one, bench/results/xtok_current.md)
KD_DROP_SHARE = 0.067
# student C from teacher A, from teacher B, from both (store AB)
CROSS_STUDENTS = ("xkd-pkl", "xkd-B-pkl", "xkd-AB-pkl")
# what every cross student is also run with (_switches and TARGETS read the suffix)
CROSS_ABLATIONS = ("-draws", "-aligned", "-noinside", "-renorm", "-keep-unchained", "-blend")
TWO_TEACHER_MIXTURES = ("-means", "-conf", "-priority")  # _two_teacher_variant reads them
DEFAULT_VARIANTS = ("ce-A", "kd-A", "ce-C", "xkd-pkl", "xkd-uld", "xkd-B-pkl", "xkd-AB-pkl")
# run only when --variants names them
ABLATIONS = ("kd-A-draws", "kd-A-drop", "kd-A-drop-blend", "xkd-pkl-unchained",
             *(f"xkd-AB-pkl{m}" for m in TWO_TEACHER_MIXTURES),
             "xkd-AB-pkl-priority-blend",  # the two of TWO_TEACHER_MIXTURES and -blend tried
             *(f"{student}{a}" for student in CROSS_STUDENTS for a in CROSS_ABLATIONS))
ALL_VARIANTS = (*DEFAULT_VARIANTS, *ABLATIONS)
A_TEACHER_CROSS = tuple(n for n in ALL_VARIANTS if n.startswith(("xkd-pkl", "xkd-uld")))
B_TEACHER_CROSS = tuple(n for n in ALL_VARIANTS if n.startswith("xkd-B-pkl"))
TWO_TEACHER_VARIANTS = tuple(n for n in ALL_VARIANTS if n.startswith("xkd-AB-pkl"))
# the target of each variant's KD (the rest: the signal's top-k)
TARGETS = {name: "sampled" for name in ALL_VARIANTS if name.endswith("-draws")}


def train_config(plan, store: str, student_dir, name: str, seed: int, **overrides):
    """The preset's `train:` section as student-train resolves it, for one variant."""
    from student_train.config import resolve_config

    return resolve_config(plan.preset, {"store": store, "student": str(student_dir),
                                        "out": str(plan.work / "run" / name),
                                        "max_steps": plan.steps, "seed": seed,
                                        "cache_dir": str(plan.work / "cache"), **overrides})


def initial_students(plan, seed: int) -> dict:
    """{"A": model, "C": model}: fp32, drawn under manual_seed(seed); A gets C's weights
    wherever the shapes agree (every block: only the vocabulary-sized matrices differ)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    models = {}
    for name in ("C", "A"):
        torch.manual_seed(seed)
        config = AutoConfig.from_pretrained(plan.student_dirs[name])
        models[name] = AutoModelForCausalLM.from_config(config).float()
    c_state = models["C"].state_dict()
    shared = {k: v for k, v in c_state.items()
              if k in models["A"].state_dict() and models["A"].state_dict()[k].shape == v.shape}
    models["A"].load_state_dict(shared, strict=False)
    return models


def copy_of(model):
    import copy

    return copy.deepcopy(model).train()


def cross_parts(cfg, reader, tokenizer):
    """(plans, CrossTokenizer) of a foreign-tokenizer variant, as student-train's sources
    set them up (student_train/sources.py store_sources)."""
    from logitstore.errors import ConfigError
    from student_train.cross_tokenizer import cross_setup
    from student_train.sources import plan_signals

    problems: list[str] = []
    plans, _ = plan_signals(cfg, reader.settings, _probe_student(cfg), problems)
    cross = cross_setup(cfg, reader, None, tokenizer, plans, problems) if not problems else None
    if problems or cross is None:
        raise ConfigError(problems or [f"store {cfg.store}: the student's tokenizer is the "
                                       f"store's, expected another one"])
    plans = [replace(p, cross_loss=cross.loss) if p.target else p for p in plans]
    return plans, cross


def _probe_student(cfg):
    from transformers import AutoConfig, AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg.student))


class Variant:
    """One student: its objective, AdamW, schedule, Step, and which batch it reads."""

    def __init__(self, name: str, cfg, student, plans, batch_kind: str, accelerator,
                 vocab_maps: dict | None = None):
        from transformers import get_scheduler

        from student_train.objective import DistillationObjective, LossSettings
        from student_train.step import Step
        from student_train.train import make_optimizer

        self.name, self.cfg, self.batch_kind, self.student = name, cfg, batch_kind, student
        module = DistillationObjective(student, plans, LossSettings.of(cfg),
                                       vocab_maps=vocab_maps)
        optimizer = make_optimizer(cfg, module)
        self.scheduler = get_scheduler(
            cfg.lr_schedule, optimizer, num_training_steps=cfg.max_steps,
            num_warmup_steps=math.ceil(cfg.warmup_ratio * cfg.max_steps))
        self.model, self.optimizer = accelerator.prepare(module, optimizer)
        sources = SimpleNamespace(groups=[], group_weights=[], plans=plans, group_of={})
        self.step = Step(cfg, accelerator, self.model, sources)
        self.times: list[float] = []
        self.losses: list[float] = []
        self.tokens = 0
        # summed cross/ counts of its batches (a KD variant across tokenizers only: ce-C
        # reads the same batches, whose counts are not its own)
        self.cross: dict[str, float] = {}
        self.counts_cross = any(p.cross_loss for p in plans)

    def train_step(self, batch: dict) -> None:
        t0 = time.perf_counter()
        stats = self.step.train([batch], self.cfg.temperature, self.optimizer, self.scheduler)
        self.times.append(time.perf_counter() - t0)
        self.losses.append(stats["loss"])
        self.tokens += int(batch["attention_mask"].sum())
        for key, value in (batch.get("cross_stats", {}) if self.counts_cross else {}).items():
            self.cross[key] = self.cross.get(key, 0.0) + value


def raw_rows(rows, weights, signals, *, packing):
    """collate_fn of the shared stream: the rows as read, for every variant to collate."""
    return {"rows": rows, "weights": weights, "signals": signals, "packing": packing}


def make_variants(plan, seed: int, accelerator) -> tuple[list, dict]:
    """The variants of one seed and their collates {batch kind: fn(raw) -> batch}."""
    from student_train.collate import collate

    signal = plan.signal
    chosen = getattr(plan, "variants", DEFAULT_VARIANTS)  # bench --variants
    students = initial_students(plan, seed)
    a_store, b_store = plan.stores["A"]["url"], plan.stores.get("B", {}).get("url")
    kd = {"signals": {signal: 1.0}, "target": "topk"}

    def kd_of(name: str) -> dict:
        return {**kd, "target": TARGETS.get(name, "topk")}

    cfg = {n: train_config(plan, a_store, plan.student_dirs["A"], n, seed,
                           **(kd_of(n) if n != "ce-A" else {}),
                           ce_without_target=_ce_without_target(n))
           for n in A_VARIANTS}
    from student_train.sources import plan_signals

    variants = []
    for name in (n for n in A_VARIANTS if n in chosen):
        problems: list[str] = []
        plans = [] if name == "ce-A" else plan_signals(
            cfg[name], plan.readers["A"].settings, students["A"], problems)[0]
        variants.append(Variant(name, cfg[name], copy_of(students["A"]), plans,
                                "A-drop" if "-drop" in name else "A", accelerator))
    collates = {"A": _raw_collate(collate)}
    if any("-drop" in name for name in chosen):
        collates["A-drop"] = _dropping_collate(collates["A"], signal, seed)
    crosses = {}
    for name in A_TEACHER_CROSS:
        kind = "C-" + name[len("xkd-"):]
        if name not in chosen and not (name == "xkd-uld" and "ce-C" in chosen):
            continue  # ce-C reads the uld batch (the student's tokens, its signal unused)
        cfg_x = train_config(plan, a_store, plan.student_dirs["C"], name, seed,
                             cross_loss="uld" if name == "xkd-uld" else "pkl",
                             **_switches(name), **kd_of(name))
        plans, crosses[kind[2:]] = cross_parts(cfg_x, plan.readers["A"], plan.tokenizer_c)
        if name in chosen:
            variants.append(Variant(name, cfg_x, copy_of(students["C"]), plans, kind,
                                    accelerator, crosses[kind[2:]].vocab_maps))
        collates[kind] = _raw_collate(crosses[kind[2:]].collate)
    if "ce-C" in chosen:
        cfg_ce = train_config(plan, a_store, plan.student_dirs["C"], "ce-C", seed)
        variants.insert(2, Variant("ce-C", cfg_ce, copy_of(students["C"]), [], "C-uld",
                                   accelerator))
    variants = [v for v in variants if v.name in chosen]
    for name in B_TEACHER_CROSS:
        if b_store is None or name not in chosen:
            continue
        key = name[len("xkd-"):].replace("-pkl", "")  # B, B-draws, B-aligned, ... B-renorm
        cfg_b = train_config(plan, b_store, plan.student_dirs["C"], name, seed,
                             cross_loss="pkl", **kd_of(name), **_switches(name))
        plans, crosses[key] = cross_parts(cfg_b, plan.readers["B"], plan.tokenizer_c)
        variants.append(Variant(name, cfg_b, copy_of(students["C"]), plans, f"C-{key}",
                                accelerator, crosses[key].vocab_maps))
        collates[f"C-{key}"] = _b_collate(crosses[key].collate, plan.samples_b)
    for name in TWO_TEACHER_VARIANTS:
        if getattr(plan, "two_teacher", None) is not None and name in chosen:
            variants.append(_two_teacher_variant(plan, seed, students["C"], accelerator,
                                                 crosses, collates, name))
    return variants, {"collates": collates, "crosses": crosses}


def _switches(name: str) -> dict:
    """The cross switches of a variant: "-aligned" no inside-token targets and no chains,
    "-noinside" no inside-token targets, "-pkl-unchained" no chains; else both on; "-renorm"
    inside-token targets renormalised (inside_other_bin false); "-keep-unchained" coarser
    pairs without a readable chain keep the plain target (skip_unchained_pairs false);
    "-blend" CE at 1 - alpha where no KD target (ce_without_target blend)."""
    aligned = name.endswith("-aligned")
    return {"ce_without_target": _ce_without_target(name),
            "inside_token_targets": not (aligned or name.endswith("-noinside")),
            "chained_token_targets": not (aligned or name.endswith("-pkl-unchained")),
            "inside_other_bin": not name.endswith("-renorm"),
            "skip_unchained_pairs": not name.endswith("-keep-unchained")}


# Equal weights: neither teacher is known to be better for student C before the run (A's
# single-teacher student did better, B is the stronger teacher); the objective normalises the
# weights, so where both align the KD term weighs as much as a single teacher's.
TWO_TEACHER_WEIGHTS = (0.5, 0.5)


def _two_teacher_variant(plan, seed: int, student, accelerator, crosses: dict,
                         collates: dict, name: str) -> "Variant":
    """xkd-AB-pkl: student C from store AB with `--signals A:0.5,B:0.5` (module docstring;
    bench --two-teacher-weights sets other weights);
    xkd-AB-pkl-means: the same with mix_signals_per_position false; xkd-AB-pkl-conf: with
    signal_mixture confidence; xkd-AB-pkl-priority: with signal_mixture priority (A first),
    xkd-AB-pkl-priority-blend the same with ce_without_target blend;
    xkd-AB-pkl-draws: the draws as target; xkd-AB-pkl-aligned:
    no inside-token targets nor chains; xkd-AB-pkl-noinside: no inside-token targets;
    xkd-AB-pkl-renorm: inside-token targets renormalised (no "other" bin). Adds their
    collate (kind C-<key>) and cross setup (key AB, AB-draws, AB-aligned, AB-noinside or
    AB-renorm: the first variant of a key builds them)."""
    store = plan.two_teacher
    signals = dict(zip(store["signals"], getattr(plan, "two_teacher_weights",
                                                 TWO_TEACHER_WEIGHTS)))
    cfg = train_config(plan, store["url"], plan.student_dirs["C"], name, seed,
                       cross_loss="pkl", signals=signals, target=TARGETS.get(name, "topk"),
                       mix_signals_per_position=name != "xkd-AB-pkl-means",
                       signal_mixture=_signal_mixture(name),
                       **_switches(name))
    plans, cross = cross_parts(cfg, plan.readers["AB"], plan.tokenizer_c)
    # the top-k ones read the same batches, but for the inside and chain switches
    key = "AB" + next((s for s in CROSS_ABLATIONS if name.endswith(s)), "")
    if f"C-{key}" not in collates:  # the first one's collate
        crosses[key] = cross
        collates[f"C-{key}"] = _b_collate(cross.collate, plan.samples_ab, store["signals"])
    return Variant(name, cfg, copy_of(student), plans, f"C-{key}", accelerator,
                   crosses[key].vocab_maps)


def _signal_mixture(name: str) -> str:
    """A two-teacher variant's signal_mixture: "-conf" confidence, "-priority" priority (also
    with a suffix after it, as in xkd-AB-pkl-priority-blend), else weights."""
    found = {"-conf": "confidence", "-priority": "priority"}
    return next((found[m] for m in found if f"{m}-" in f"{name}-"), "weights")


def _ce_without_target(name: str) -> str:
    """A variant's ce_without_target: "-blend" blend (CE at 1 - alpha), else full."""
    return "blend" if name.endswith("-blend") else "full"


def _dropping_collate(collate_raw, signal: str, seed: int):
    """`collate_raw`'s batch with `kd_mask` False at a random KD_DROP_SHARE of its positions
    (drawn from a generator of the seed, so every run of the seed drops the same ones)."""
    import numpy as np
    import torch

    rng = np.random.default_rng([seed, 15])

    def collate_dropping(raw):
        batch = collate_raw(raw)
        shape = tuple(batch["input_ids"].shape)
        batch["signals"][signal]["kd_mask"] = torch.from_numpy(rng.random(shape) >= KD_DROP_SHARE)
        return batch
    return collate_dropping


def _raw_collate(fn):
    """fn (a collate of rows, weights, signals, packing) as a function of the raw rows."""
    return lambda raw: fn(raw["rows"], raw["weights"], raw["signals"], packing=raw["packing"])


def _b_collate(fn, samples_b: dict, signals: list[str] | None = None):
    """Another store's samples of the rows' sample ids (same texts; store B: B's tokens and
    top-k; store AB: both teachers' signals, then `signals` names them)."""
    def collate_b(raw):
        rows = [[samples_b[s.sample_id] for s in row] for row in raw["rows"]]
        return fn(rows, raw["weights"], signals or raw["signals"], packing=raw["packing"])
    return collate_b


def shared_stream(plan, seed: int, batch_tokens: int, shuffle: bool):
    from student_train.stream import StoreStream

    return StoreStream(plan.stores["A"]["url"], signals=[plan.signal],
                       batch_tokens=batch_tokens, seed=seed, shuffle=shuffle,
                       collate_fn=raw_rows)


def train_students(plan, seed: int) -> dict:
    """Every variant of one seed, trained in one interleaved loop; returns them + timings.
    plan: SimpleNamespace(preset, work, steps, signal, stores, readers, student_dirs,
    tokenizer_c, samples_b, two_teacher, samples_ab)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    set_seed(seed)
    variants, built = make_variants(plan, seed, Accelerator(mixed_precision="no"))
    cfg0 = variants[0].cfg
    stream = shared_stream(plan, seed, cfg0.batch_tokens, cfg0.shuffle)
    per_epoch = stream.num_batches()
    collate_s = {k: [] for k in built["collates"]}
    print(f"seed {seed}: {len(variants)} students x {plan.steps} steps ({per_epoch} batches "
          f"of <= {cfg0.batch_tokens} tokens of store A per epoch), interleaved", flush=True)
    step, epoch, started = 0, 0, time.perf_counter()
    while step < plan.steps:
        stream.set_epoch(epoch)
        for raw in stream:
            if step >= plan.steps:
                break
            batches = {}
            for kind, fn in built["collates"].items():
                t0 = time.perf_counter()
                batches[kind] = fn(raw)
                collate_s[kind].append(time.perf_counter() - t0)
            shift = step % len(variants)
            for v in variants[shift:] + variants[:shift]:
                v.train_step(batches[v.batch_kind])
            step += 1
            if step % max(1, plan.steps // 5) == 0 or step == plan.steps:
                print(f"  step {step}/{plan.steps} ({time.perf_counter() - started:.0f}s) "
                      + " ".join(f"{v.name}={v.losses[-1]:.3f}" for v in variants), flush=True)
        epoch += 1
    return _result(seed, plan, variants, built, collate_s, per_epoch, started)


def _median(values: list[float]) -> float:
    return statistics.median(values[1:] or values)


def _result(seed, plan, variants, built, collate_s, per_epoch, started) -> dict:
    crosses = built["crosses"]
    return {"seed": seed, "steps": plan.steps, "batches_per_epoch": per_epoch,
            "train_s": round(time.perf_counter() - started, 1),
            "students": {v.name: v.student.eval() for v in variants},
            "step_s": {v.name: _median(v.times) for v in variants},
            "batch_kind": {v.name: v.batch_kind for v in variants},
            "collate_s": {k: _median(t) for k, t in collate_s.items()},
            "tokens": {v.name: v.tokens for v in variants},
            "loss_first_last": {v.name: [v.losses[0], v.losses[-1]] for v in variants},
            "cross_counts": {v.name: v.cross for v in variants if v.cross},
            "cross_provenance": {k: c.provenance for k, c in crosses.items()},
            "config": variants[0].cfg.as_dict()}
