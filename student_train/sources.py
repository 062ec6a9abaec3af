"""Where training batches come from, checked before any step: store(s) or raw --data.

`check_inputs` runs before any model is loaded and checks what costs only metadata: the
store(s) exist and are committed (their manifest and index are read), the --data specs
resolve to files, directories or dataset names (a hub dataset: readable, i.e. online or
cached), the --signals names are in the store, and a sampled signal stored without
log-probs is used only at its sample temperature (student_train/sampled_logprobs.py).
Then, with the student loaded, a store is refused, before training, when its vocabulary
differs from the student's while its tokenizer is the same (both sides shown), when a checksum
fails (the damaged files named), or when the config
asks for what it does not hold (signals, captures, layers). Config problems are collected
and raised together, like the config's own. A store whose tokenizer is not the student's is
trained across tokenizers (student_train/cross_tokenizer.py: the stored text re-tokenized,
positions aligned by byte spans, `cross_loss` pkl or uld), or refused when it holds no text.

The run's provenance (training_metadata.json `source`) names the store by its manifest:
`manifest_file_sha256`, the sha256 of the manifest bytes this run read, and
`manifest_seal`, the store's own seal (manifest.json `manifest_sha256`, format 1.1; None
for older stores).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from logitstore.commit import SEAL_KEY
from logitstore.errors import ChecksumError, ConfigError, LogitStoreError, SchemaMismatchError
from logitstore.reader import StoreReader
from logitstore.verify import verify_store
from student_train.alignment import HiddenStateAligner, parse_layer_map, stored_teacher_layer
from student_train.cross_tokenizer import cross_setup, is_foreign, no_text_problem
from student_train.objective import SignalPlan
from student_train.sampled_logprobs import kd_target_of, missing_logprob_problems
from student_train.student import compat_problems, num_blocks

OTHER_GROUP = "(other)"


@dataclass
class Sources:
    train: Any  # StoreStream | TextBatches: set_epoch, __iter__, state_dict, num_batches
    eval: Any | None
    plans: list[SignalPlan] = field(default_factory=list)
    aligners: list[tuple[str, HiddenStateAligner]] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)  # distillm-med specialties
    group_weights: list[float] = field(default_factory=list)
    group_of: dict[str, int] = field(default_factory=dict)  # sample_id -> group
    provenance: dict[str, Any] = field(default_factory=dict)
    # signal -> (teacher_to_student_first, exact): a student with another tokenizer, pkl loss
    vocab_maps: dict[str, Any] = field(default_factory=dict)


class SpecialtyWeight:
    """sample_weight for the stream: index row -> weight of its specialty (picklable)."""

    def __init__(self, key: str, weights: dict[str, float], default: float = 1.0):
        self.key, self.weights, self.default = key, dict(weights), default

    def __call__(self, row: dict) -> float:
        return float(self.weights.get(row.get(self.key), self.default))


def _on_main(accelerator, fn: Callable[[], Any]) -> Any:
    """fn() on the main process, its result (or its exception text) on every process."""
    from accelerate.utils import broadcast_object_list

    result: list[Any] = [None]
    if accelerator.is_main_process:
        try:
            result = [("ok", fn())]
        except Exception as exc:  # reported on every rank below, never left to hang the others
            result = [("error", f"{type(exc).__name__}: {exc}")]
    if accelerator.num_processes > 1:
        broadcast_object_list(result, from_process=0)
    status, value = result[0]
    if status == "error":
        raise SchemaMismatchError(value)
    return value


@dataclass
class Inputs:
    """The run's stores, opened by `check_inputs` (None: not configured), and the student's
    tokenizer read at most once for the checks, the memory plan and training
    (`student_tokenizer()`, cached: the checks may have read it already)."""

    store: StoreReader | None = None
    eval_store: StoreReader | None = None
    student_tokenizer: Callable[[], Any] | None = None

    def across_tokenizers(self, cfg) -> bool:
        """Whether the run takes the cross-tokenizer path (False without a store)."""
        return self.store is not None and _across_tokenizers(cfg, self.store,
                                                             self.student_tokenizer)


def check_inputs(cfg) -> Inputs:
    """Open the store and eval_store (each: exists, committed, a format this version reads)
    or resolve every --data spec (a hub dataset must be readable: online or cached); raises
    their one-paragraph LogitStoreError otherwise."""
    if not cfg.distill:
        from logitstore.toolkit.hub_data import check_hub_data_readable

        check_hub_data_readable(cfg.data)
        return Inputs(student_tokenizer=functools.cache(_student_tokenizer_loader(cfg)))
    store = StoreReader(cfg.store, cache_dir=cfg.cache_dir)
    if store.settings.kind == "classifier":
        raise LogitStoreError(f"store {cfg.store} is a classifier store (per-sample head logits, "
                              f"no tokens), which the causal-LM loop cannot train from; train a "
                              f"classifier student from it with --task classify")
    eval_store = StoreReader(cfg.eval_store, cache_dir=cfg.cache_dir) if cfg.eval_store \
        else None
    problem = _unknown_signals(cfg, store.settings)
    problems = [problem] if problem else missing_logprob_problems(
        cfg, store.settings, cfg.store, eval_store.settings if eval_store else None,
        cfg.eval_store)
    student_tokenizer = functools.cache(_student_tokenizer_loader(cfg))  # read once, if at all
    if problems and not problem and _across_tokenizers(cfg, store, student_tokenizer):
        problems = []  # draws read as a T=1 estimate: cross_tokenizer.draws_problems' rule
    if problems:
        raise ConfigError(problems)
    _refuse_foreign_student_without_text({cfg.store: store, cfg.eval_store: eval_store},
                                         student_tokenizer)
    return Inputs(store, eval_store, student_tokenizer)


def _student_tokenizer_loader(cfg) -> Callable[[], Any]:
    """A function reading the student's tokenizer files (cheap next to its weights)."""
    from logitstore.toolkit.hf import load_tokenizer

    return lambda: load_tokenizer(cfg.student, cfg.revision,
                                  trust_remote_code=cfg.trust_remote_code)


def _across_tokenizers(cfg, store: StoreReader, student_tokenizer: Callable[[], Any]) -> bool:
    """Whether the run takes the cross-tokenizer path (a selected signal on another
    tokenization of the store, or a student of another tokenizer). A student whose tokenizer
    cannot be read counts as the store's (its own error comes when the student loads)."""
    if _on_other_tokenization(store.settings, list(cfg.signals) or list(store.settings.signals)):
        return True
    try:
        tokenizer = student_tokenizer()
    except (LogitStoreError, OSError, ValueError):
        return False
    return is_foreign(tokenizer, store.settings)


def _on_other_tokenization(settings, names: list[str]) -> bool:
    """Whether a signal of `names` sits on another tokenization of the store (format 2.2):
    its run goes through the cross path whatever the student's tokenizer."""
    return any(settings.signals[n].tokenization for n in names)


def _refuse_foreign_student_without_text(readers: dict,
                                         student_tokenizer: Callable[[], Any]) -> None:
    """A student of another tokenizer needs the stores' text and spans: refused before the
    student's weights load (its tokenizer alone is read, only for a store without text)."""
    lacking = {url: r for url, r in readers.items() if r is not None and not r.has_text}
    if not lacking:
        return
    tokenizer = student_tokenizer()
    for url, reader in lacking.items():
        if is_foreign(tokenizer, reader.settings):
            raise SchemaMismatchError(no_text_problem(url, reader.settings, tokenizer))


def _unknown_signals(cfg, settings) -> str | None:
    """The problem with --signals names the store does not hold (None when all are held)."""
    unknown = [n for n in cfg.signals if n not in settings.signals]
    if not unknown:
        return None
    return f"signals: {unknown} not in the store, which holds {list(settings.signals)}"


def check_store(reader: StoreReader, url: str, cfg, tokenizer, accelerator,
                foreign: bool = False) -> None:
    """Refuse a store the student cannot train on (tokenizer, vocabulary) or a damaged one;
    foreign: the student's tokenizer is another one, trained across tokenizers."""
    problems = [] if foreign else compat_problems(tokenizer, reader.settings, url)
    if problems:
        raise SchemaMismatchError("; ".join(problems))
    if cfg.verify_store == "full":
        damaged = _on_main(accelerator, lambda: verify_store(url))
        if damaged:
            raise ChecksumError(
                f"store {url} is damaged ({len(damaged)} problem(s)): " + "; ".join(damaged[:10])
                + f". Run `logitstore verify {url}`; restore the named files from a good copy "
                  f"(`logitstore cp`) or dump again", path=damaged[0].split(": ", 1)[0])


def manifest_provenance(reader: StoreReader) -> dict[str, str | None]:
    """The manifest this run read: the sha256 of its bytes, and the store's seal."""
    return {"manifest_file_sha256": hashlib.sha256(reader.manifest_bytes).hexdigest(),
            "manifest_seal": reader.manifest.get(SEAL_KEY)}


# ----------------------------------------------------------------------------- signal plans

def _layer_map(user: dict[int, int] | None, stored: tuple[int, ...], kind: str, name: str,
               n_blocks: int, problems: list[str], depth: int | None = None) -> dict[int, int]:
    """The student->teacher map for one captured kind, checked against what is stored;
    teacher layers given in either form (3 or -1, with the teacher's `depth` known) come
    back in the stored form."""
    mapping = dict(user) if user else {-1: stored[-1]}
    for s, t in mapping.items():
        if not -n_blocks <= s < n_blocks:
            problems.append(f"layer_map: student block {s} does not exist (the student has "
                            f"{n_blocks} blocks: 0..{n_blocks - 1}, or -1 for the last)")
        found = stored_teacher_layer(t, stored, depth)
        if found is None:
            problems.append(f"layer_map: teacher layer {t} of signal {name!r} has no stored "
                            f"{kind}; stored layers: {list(stored)}")
        else:
            mapping[s] = found
    return mapping


def plan_signals(cfg, settings, student, problems: list[str]):
    """(plans, aligners) of the selected signals; appends what is wrong to `problems`."""
    names = list(cfg.signals) or list(settings.signals)
    unknown = _unknown_signals(cfg, settings)
    if unknown:
        problems.append(unknown)
        return [], []
    user_map = parse_layer_map(cfg.layer_map) if cfg.layer_map else None
    text = student.config.get_text_config()
    n_blocks = num_blocks(student)
    raw_weight = {n: cfg.signals.get(n, 1.0) if cfg.signals else 1.0 for n in names}
    entries = []
    for name in names:
        spec = settings.signals[name]
        target = kd_target_of(cfg, spec)
        if target and getattr(spec, target) is None:
            problems.append(f"target {cfg.target}: signal {name!r} has no {target} capture "
                            f"(it holds {spec.kinds()})")
            target = None
        entry = {"name": name, "target": target}
        if target == "sampled":
            entry.update(n_draws=spec.sampled.n_draws,
                         sample_temperature=spec.sampled.temperature)
        if cfg.hidden_weight > 0 and spec.hidden:
            entry["hidden_map"] = _layer_map(user_map, spec.hidden.layers, "hidden states",
                                             name, n_blocks, problems, spec.depth)
        if cfg.attention_weight > 0 and spec.attention:
            att = spec.attention
            if att.num_heads not in (1, text.num_attention_heads):
                problems.append(f"signal {name!r} stores {att.num_heads} attention heads, the "
                                f"student has {text.num_attention_heads}: per-head alignment "
                                f"needs equal counts (or a head-averaged dump)")
            entry["layer_map"] = _layer_map(user_map, att.layers, "attention", name, n_blocks,
                                            problems, spec.depth)
            entry["attention_layers"] = tuple(att.layers)
        entries.append(entry)

    def shares(key: str) -> dict[str, float]:
        chosen = [e["name"] for e in entries if e.get(key)]
        total = sum(raw_weight[n] for n in chosen)
        return {n: raw_weight[n] / total for n in chosen} if total > 0 else {}

    kd, hidden, attention = shares("target"), shares("hidden_map"), shares("layer_map")
    if cfg.alpha > 0 and not kd and not problems:
        problems.append(f"alpha > 0 needs per-token teacher targets, but signals {names} hold "
                        f"neither top-k nor sampled targets (set --alpha 0 to align only)")
    if cfg.hidden_weight > 0 and not hidden:
        problems.append(f"hidden_weight > 0 but none of the signals {names} stores hidden states")
    if cfg.attention_weight > 0 and not attention:
        problems.append(f"attention_weight > 0 but none of the signals {names} stores attention")
    plans, aligners = [], []
    for e in entries:
        name = e["name"]
        plans.append(SignalPlan(
            name=name, kd_weight=kd.get(name, 0.0), target=e["target"] if name in kd else None,
            n_draws=e.get("n_draws", 0), sample_temperature=e.get("sample_temperature", 1.0),
            hidden_weight=hidden.get(name, 0.0), attention_weight=attention.get(name, 0.0),
            attention_layers=e.get("attention_layers", ()), layer_map=e.get("layer_map", {})))
        if name in hidden and not problems:
            spec = settings.signals[name].hidden
            aligners.append((name, HiddenStateAligner(
                e["hidden_map"], text.hidden_size, spec.dim, loss=cfg.hidden_loss,
                pooling=spec.pooling, teacher_layers=spec.layers)))
    return plans, aligners


# ----------------------------------------------------------------------------- streams

def _stream_api():
    return importlib.import_module("student_train.stream")


def _make_stream(api, url: str, problems: list[str], **kwargs):
    try:
        return api.StoreStream(url, **kwargs)
    except ValueError as exc:
        problems.append(f"{url}: {exc}")
        return None


def store_sources(cfg, inputs: Inputs, tokenizer, student, accelerator) -> Sources:
    reader, eval_reader = inputs.store, inputs.eval_store
    foreign = is_foreign(tokenizer, reader.settings)
    check_store(reader, cfg.store, cfg, tokenizer, accelerator, foreign)
    if eval_reader is not None:
        check_store(eval_reader, cfg.eval_store, cfg, tokenizer, accelerator, foreign)
    problems: list[str] = []
    plans, aligners = plan_signals(cfg, reader.settings, student, problems)
    # a signal of another tokenization (format 2.2) goes through the cross path too
    on_tokenization = _on_other_tokenization(reader.settings, [p.name for p in plans])
    cross = cross_setup(cfg, reader, eval_reader, tokenizer, plans, problems) \
        if (foreign or on_tokenization) and not problems else None
    if cross is not None:
        plans = [replace(p, cross_loss=cross.loss) if p.target else p for p in plans]
    names = [p.name for p in plans]
    if eval_reader is not None:
        missing = [n for n in names if n not in eval_reader.settings.signals]
        if missing:
            problems.append(f"eval_store {cfg.eval_store} lacks signal(s) {missing}")
    src = Sources(train=None, eval=None, plans=plans, aligners=aligners,
                  vocab_maps=cross.vocab_maps if cross is not None else {})
    weight_fn = None
    if cfg.objective == "distillm-med":  # specialty weights apply per group, not per sample
        src.groups = list(cfg.specialty_weights) + [OTHER_GROUP]
        src.group_weights = list(cfg.specialty_weights.values()) + [1.0]
        if cfg.specialty_key not in reader.index.column_names:
            problems.append(f"specialty_key {cfg.specialty_key!r} is not a tag of the store "
                            f"(columns: {reader.index.column_names})")
        else:
            index = {g: i for i, g in enumerate(src.groups)}
            specialties = reader.index.column(cfg.specialty_key).to_pylist()
            src.group_of = {sid: index.get(sp, len(src.groups) - 1)
                            for sid, sp in zip(reader.sample_ids, specialties)}
    elif cfg.specialty_weights:
        weight_fn = SpecialtyWeight(cfg.specialty_key, cfg.specialty_weights)
    if problems:
        raise ConfigError(problems)

    api = _stream_api()
    train_rows = eval_rows = None
    if cfg.eval_fraction:
        train_rows, eval_rows = api.holdout_rows(reader, cfg.eval_fraction, cfg.seed)
        if len(eval_rows) == 0:
            problems.append(f"eval_fraction {cfg.eval_fraction} holds out none of the "
                            f"{len(reader)} samples; raise it")
    common = dict(signals=names, batch_tokens=cfg.batch_tokens, packing=cfg.packing,
                  rank=accelerator.process_index, world_size=accelerator.num_processes,
                  cache_dir=cfg.cache_dir, seed=cfg.seed)
    if cross is not None:  # batches planned in teacher tokens, filled with the student's
        common.update(collate_fn=cross.collate,
                      batch_tokens=max(1, int(cfg.batch_tokens / max(cross.length_ratio, 1.0))))
    order = "curriculum" if cfg.curriculum else ("shuffle" if cfg.shuffle else "sequential")
    src.train = _make_stream(api, cfg.store, problems, split=cfg.train_split, rows=train_rows,
                             shuffle=cfg.shuffle, sample_weight=weight_fn, order=order,
                             curriculum_key=cfg.curriculum or "difficulty", **common)
    if eval_rows is not None or cfg.eval_store or cfg.eval_split:
        src.eval = _make_stream(api, cfg.eval_store or cfg.store, problems, split=cfg.eval_split,
                                rows=eval_rows, shuffle=False, order="sequential", **common)
    if problems:
        raise ConfigError(problems)
    src.provenance = {"store": cfg.store, **manifest_provenance(reader),
                      "dataset_fingerprint": reader.manifest.get("dataset_fingerprint"),
                      "signals": {n: reader.manifest["settings"]["signals"][n] for n in names},
                      **(cross.provenance if cross is not None else {})}
    if eval_reader is not None:
        eval_manifest = {f"eval_{k}": v for k, v in manifest_provenance(eval_reader).items()}
        src.provenance.update(eval_store=cfg.eval_store, **eval_manifest,
                              eval_dataset_fingerprint=eval_reader.manifest.get(
                                  "dataset_fingerprint"))
    return src


def text_sources(cfg, tokenizer, accelerator) -> Sources:
    from student_train.text_data import TextBatches, holdout, load_text_samples

    # A list when the data fits in one read window, else a stream re-read at each pass.
    samples = load_text_samples(cfg.data, tokenizer, data_format=cfg.data_format,
                                max_length=cfg.max_length, include_prompt=cfg.include_prompt,
                                window_tokens=cfg.read_window_tokens)
    train, held = holdout(samples, cfg.eval_fraction, cfg.seed) if cfg.eval_fraction \
        else (samples, [])
    common = dict(batch_tokens=cfg.batch_tokens, seed=cfg.seed, rank=accelerator.process_index,
                  world_size=accelerator.num_processes, pad_id=tokenizer.pad_token_id or 0,
                  window_tokens=cfg.read_window_tokens)
    return Sources(train=TextBatches(train, shuffle=cfg.shuffle, **common),
                   eval=TextBatches(held, shuffle=False, drop_uneven=False, **common)
                   if held else None,
                   provenance={"data": list(cfg.data), "samples": len(samples)})


def open_sources(cfg, inputs: Inputs, tokenizer, student, accelerator) -> Sources:
    """The train (and eval) batches of the run, from the inputs `check_inputs` opened."""
    if cfg.distill:
        return store_sources(cfg, inputs, tokenizer, student, accelerator)
    return text_sources(cfg, tokenizer, accelerator)
