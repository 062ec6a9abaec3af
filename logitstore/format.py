"""The store's on-disk contract: version, paths, and the settings every part must agree on.

`FORMAT.md` beside this file is the human-readable form of what this module encodes. The
writer and the reader both import this module and never each other (as in mosaic streaming).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from logitstore.errors import FormatVersionError, SchemaMismatchError, SettingsMismatchError

FORMAT_NAME = "logitstore"
# major.minor: readers refuse another major, accept any minor. 2.1 added the optional
# sample text, token spans and tokenizer files (settings `text`, `tokenizer_files`); 2.2 the
# extra tokenizations of a teacher with another tokenizer (settings `tokenizations`); 2.3
# the kind `classifier` (FORMAT.md 4.3), which only classifier stores say: a causal-lm
# store says FORMAT_VERSION, its content is exactly a 2.2 store's (`written_version`).
FORMAT_VERSION, CLASSIFIER_VERSION = "2.2", "2.3"
LATEST_VERSION = CLASSIFIER_VERSION  # the newest format this release reads and writes
CAUSAL_LM, CLASSIFIER = STORE_KINDS = ("causal-lm", "classifier")
LEGACY_VERSIONS = ("1.0", "1.1")  # one store manifest listing every file (FORMAT.md section 9)
MANIFEST = "manifest.json"  # the store manifest, written last; its presence = a committed store
PARTS_DIR = "parts"
INDEX_DIR = "index"  # consolidated sample index and catalog (content-addressed names)
PART_MANIFEST = "manifest.json"  # parts/<part>/manifest.json (format 1.0 and 1.1 only)
PART_HEAD = "head.json"  # parts/<part>/head.json (1.2): the part's committed segment count
RECORDS_DIR = "records"  # parts/<part>/records/<segment>.json (1.2): segment commit records
SEGMENT_INDEX = "index.parquet"  # parts/<part>/<segment>/index.parquet
TMP_MARK = ".tmp-"  # in the name of every file still being written; never read

# Columns of the sample index that tags may not shadow.
INDEX_COLUMNS = ("sample_id", "source", "split", "offset", "length", "part", "segment",
                 "segment_offset", "digest")

LOGPROB_ENCODINGS = ("q8", "f16", "f32")
OPTIONAL_SETTINGS = ("text", "tokenizer_files", "tokenizations")  # 2.1/2.2; absent while unused
# 2.3: the keys only classifier stores hold, and those only causal-lm stores hold
CLASSIFIER_SETTINGS = ("kind", "heads", "features", "logits_encoding", "features_encoding",
                       "segment_samples")
# (a classifier store keeps `signals`, empty: the code shared by both kinds reads it)
TOKEN_SETTINGS = ("vocab_size", "tokenizer_fingerprint", "tokenizer_name", "chunk_tokens",
                  "segment_tokens") + OPTIONAL_SETTINGS
TOKENIZER_DIR = "tokenizer"  # ROOT/tokenizer/<file>: the tokenizer's files (2.1)
HIDDEN_POOLINGS = ("mean", "mean-all", "last")
ATTENTION_HEADS = ("mean", "all")


def written_version(kind: str | None) -> str:
    """The format_version a store of `kind` is written with (None or absent: causal-lm)."""
    return CLASSIFIER_VERSION if kind == CLASSIFIER else FORMAT_VERSION


def major(version: str) -> int:
    return int(str(version).split(".")[0])


def check_format_version(found: str, where: str) -> None:
    """Refuse a store written with another major format version."""
    try:
        found_major = major(found)
    except (TypeError, ValueError):
        raise FormatVersionError(
            f"{where}: format_version {found!r} is not of the form MAJOR.MINOR; "
            f"expected {FORMAT_VERSION}") from None
    if found_major != major(FORMAT_VERSION) and str(found) not in LEGACY_VERSIONS:
        raise FormatVersionError(
            f"{where}: store format version {found} is not supported by this reader "
            f"(expected major version {major(FORMAT_VERSION)}, i.e. {FORMAT_VERSION}, or one "
            f"of the older {', '.join(LEGACY_VERSIONS)} it still reads); install the "
            f"logitstore release that wrote it, or convert the store")


def int_dtype_for(max_value: int) -> str:
    """Smallest unsigned dtype holding 0..max_value (ids, deltas and counts are stored this way)."""
    if max_value < 2**8:
        return "uint8"
    if max_value < 2**16:
        return "uint16"
    return "uint32"


@dataclass(frozen=True)
class TopKSpec:
    k: int
    logprob_encoding: str = "q8"
    logprob_step: float = 1.0 / 16  # q8 only: stored q = round(-logprob / step), clipped to 255


@dataclass(frozen=True)
class SampledSpec:
    n_draws: int
    temperature: float = 1.0
    logprob_encoding: str = "q8"
    logprob_step: float = 1.0 / 16
    # q8 only: ids drawn once get a coarser step. Their weight's Monte-Carlo noise (~100%)
    # dwarfs a +-0.25-nat error, and they are ~80% of the entries, so this saves ~30% bytes.
    singleton_step: float = 0.5
    # Whether the ids' log-probs are stored. At training temperature == `temperature` the
    # target is counts / n_draws and never reads them (they re-weight the draws only for
    # another temperature): without them a signal is about a third smaller. A manifest
    # without the key (written before it existed) stored them.
    logprobs: bool = True


@dataclass(frozen=True)
class HiddenSpec:
    layers: tuple[int, ...]
    dim: int
    pooling: str = "mean"
    dtype: str = "float16"


@dataclass(frozen=True)
class AttentionSpec:
    layers: tuple[int, ...]
    num_heads: int  # stored heads: 1 when head-averaged
    grid: int
    heads: str = "mean"
    dtype: str = "float16"


@dataclass(frozen=True)
class SignalSpec:
    """What one teacher signal holds and how it was captured."""

    topk: TopKSpec | None = None
    sampled: SampledSpec | None = None
    hidden: HiddenSpec | None = None
    attention: AttentionSpec | None = None
    teacher: dict[str, Any] = field(default_factory=dict)  # model id, revision, dtype, ...
    # The teacher's number of decoder layers (blocks). When known, hidden and attention
    # `layers` are stored as block numbers 0..depth-1 (`canonical_layers`); None: unknown
    # (stores written before it was recorded keep their indices as given, -1 = last).
    depth: int | None = None
    # 2.2: the extra tokenization (settings `tokenizations`) whose positions and ids the
    # signal's arrays index; None: the store's own (its `input_ids`).
    tokenization: str | None = None

    def kinds(self) -> list[str]:
        return [k for k in ("topk", "sampled", "hidden", "attention") if getattr(self, k)]


def canonical_layer(index: int, depth: int | None) -> int:
    """A teacher layer index in its stored form: the block number 0..depth-1, so that -1 and
    depth-1 are one layer; `index` unchanged when the depth is unknown or it is out of range."""
    if depth is None or not -depth <= index < depth:
        return index
    return index % depth


def canonical_layers(layers, depth: int | None) -> tuple[int, ...]:
    return tuple(canonical_layer(int(i), depth) for i in layers)


@dataclass(frozen=True)
class TokenizationSpec:
    """2.2: a tokenizer other than the store's, cutting the same samples' text into its own
    tokens (segment arrays `tokenizations/<name>/...`, FORMAT.md section 4.2)."""

    vocab_size: int
    tokenizer_fingerprint: str
    tokenizer_name: str = ""
    # {"tokenizer/<tokenization>/<file>": {"size", "sha256"}}: its tokenizer's files
    tokenizer_files: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def token_dtype(self) -> str:
        return int_dtype_for(self.vocab_size - 1)


@dataclass(frozen=True)
class StoreSettings:
    """Everything a part is written with; all parts of one store must agree on it. A
    classifier store (2.3, `kind`) leaves the token keys at their defaults and sets the
    classifier keys; a causal-lm store the other way round."""

    vocab_size: int = 0
    tokenizer_fingerprint: str = ""
    signals: dict[str, SignalSpec] = field(default_factory=dict)
    tokenizer_name: str = ""
    chunk_tokens: int = 4096  # positions per zarr chunk (unit of random reads)
    segment_tokens: int = 1 << 18  # target tokens per segment (one shard per array)
    chunk_samples: int = 64  # samples per chunk of per-sample arrays
    # 2.1: every sample holds its UTF-8 text and its tokens' byte spans (text_spans.py).
    text: bool = False
    # 2.1: the tokenizer's files stored in the store, {"tokenizer/<name>": {"size", "sha256"}}
    tokenizer_files: dict[str, dict[str, Any]] = field(default_factory=dict)
    # 2.2: {name: TokenizationSpec}, the other tokenizations signals may index
    tokenizations: dict[str, TokenizationSpec] = field(default_factory=dict)
    # 2.3: `classifier`: per-sample signals of a classification teacher (FORMAT.md 4.3)
    kind: str = CAUSAL_LM
    heads: dict[str, int] = field(default_factory=dict)  # head name -> classes C
    features: dict[str, int] = field(default_factory=dict)  # feature part -> width D
    logits_encoding: str = "f32"  # f16 / f32: dtype of heads/<name>/logits
    features_encoding: str = "f16"  # f16 / f32: dtype of features/<part>
    segment_samples: int = 4096  # samples per segment of a classifier store

    @property
    def token_dtype(self) -> str:
        return int_dtype_for(self.vocab_size - 1)

    def all_tokenizer_files(self) -> dict[str, dict[str, Any]]:
        """Every tokenizer file the settings list: the store's own and (2.2) those of its
        extra tokenizations, {path: {"size", "sha256"}}."""
        out = dict(self.tokenizer_files)
        for spec in self.tokenizations.values():
            out.update(spec.tokenizer_files)
        return out

    def signal_vocab_size(self, signal: str) -> int:
        """Vocabulary size of the tokenization a signal's ids belong to."""
        tokenization = self.signals[signal].tokenization
        return self.vocab_size if tokenization is None else \
            self.tokenizations[tokenization].vocab_size

    def validate(self) -> None:
        if self.kind != CAUSAL_LM:
            from logitstore.classifier_sample import settings_problems  # imports this module
            problems = settings_problems(self)
            if problems:
                raise SettingsMismatchError("invalid store settings: " + "; ".join(problems))
            return
        problems = [f"{key} is a key of classifier stores; this store's kind is {CAUSAL_LM}"
                    for key in CLASSIFIER_SETTINGS[1:] if getattr(self, key) != _DEFAULTS[key]]
        if self.vocab_size < 1:
            problems.append(f"vocab_size must be >= 1, found {self.vocab_size}")
        if self.vocab_size > 2**31:
            problems.append(f"vocab_size must be < 2**31, found {self.vocab_size}")
        if not self.tokenizer_fingerprint:
            problems.append("tokenizer_fingerprint is empty (use logitstore.toolkit.tokenizer_identity.tokenizer_fingerprint)")
        for name in ("chunk_tokens", "segment_tokens", "chunk_samples"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, found {getattr(self, name)}")
        for name, sig in self.signals.items():
            problems += _signal_problems(name, sig)
        if not isinstance(self.text, bool):
            problems.append(f"text must be true or false, found {self.text!r}")
        problems += _tokenizer_file_problems(self.tokenizer_files)
        problems += _tokenization_problems(self)
        if problems:
            raise SettingsMismatchError("invalid store settings: " + "; ".join(problems))

    def to_json(self) -> dict[str, Any]:
        data = json.loads(json.dumps(dataclasses.asdict(self)))
        # 2.3: each kind's settings carry its own keys only (a causal-lm store's: 2.2's)
        for key in (TOKEN_SETTINGS if self.kind == CLASSIFIER else CLASSIFIER_SETTINGS):
            del data[key]
        if self.kind == CLASSIFIER:
            return data
        # The 2.1 keys are left out while unused, so such settings read as 2.0 settings
        # (a 2.0 reader refuses any key it does not know).
        for key in OPTIONAL_SETTINGS:
            if not data[key]:
                del data[key]
        for signal in data["signals"].values():  # 2.2 key, left out for the store's own
            if signal.get("tokenization") is None:
                signal.pop("tokenization", None)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "StoreSettings":
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise SchemaMismatchError(
                f"store settings hold {unknown}, which this logitstore does not know (it reads "
                f"format {LATEST_VERSION} and older); the store was written by a newer release: "
                f"upgrade logitstore to read it")
        signals = {name: _signal_from_json(s) for name, s in data.get("signals", {}).items()}
        tokenizations = {name: TokenizationSpec(**t)
                         for name, t in (data.get("tokenizations") or {}).items()}
        plain = {k: v for k, v in data.items() if k not in ("signals", "tokenizations")}
        return cls(signals=signals, tokenizations=tokenizations, **plain)


# every settings key's default: a key set to another value is in use
_DEFAULTS = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
             for f in dataclasses.fields(StoreSettings)}


def _tokenization_problems(settings: "StoreSettings") -> list[str]:
    """2.2: tokenization names, their tokenizer files (`tokenizer/<name>/<file>`), the text
    they need, and that every signal's tokenization exists and every tokenization is used."""
    out = []
    for name, spec in settings.tokenizations.items():
        if not name or "/" in name or name.startswith(".") or TMP_MARK in name:
            out.append(f"tokenization name {name!r} must be non-empty, without '/' and not "
                       f"start with '.'")
        if spec.vocab_size < 1 or not spec.tokenizer_fingerprint:
            out.append(f"tokenization {name!r} needs vocab_size >= 1 and a tokenizer_fingerprint")
        if spec.tokenizer_fingerprint == settings.tokenizer_fingerprint:
            out.append(f"tokenization {name!r} has the store's own tokenizer fingerprint: its "
                       f"signals index the store's own tokens (tokenization null)")
        prefix = f"{TOKENIZER_DIR}/{name}/"
        for rel in spec.tokenizer_files:
            if not rel.startswith(prefix):
                out.append(f"tokenizer file {rel!r} of tokenization {name!r} must be "
                           f"{prefix}<name>")
        out += _tokenizer_file_problems({TOKENIZER_DIR + "/" + rel[len(prefix):]: meta
                                         for rel, meta in spec.tokenizer_files.items()
                                         if rel.startswith(prefix)})
    if settings.tokenizations and not settings.text:
        out.append(f"tokenizations {sorted(settings.tokenizations)} need the samples' text "
                   f"(settings text: true): their spans index it")
    used = {s.tokenization for s in settings.signals.values()}
    for name, sig in settings.signals.items():
        if sig.tokenization is not None and sig.tokenization not in settings.tokenizations:
            out.append(f"signal {name!r} indexes tokenization {sig.tokenization!r}, which the "
                       f"settings do not list ({sorted(settings.tokenizations)})")
    unused = sorted(set(settings.tokenizations) - used)
    if unused:
        out.append(f"tokenizations {unused} are indexed by no signal")
    return out


def _tokenizer_file_problems(files: dict[str, Any]) -> list[str]:
    """`tokenizer_files` entries: `tokenizer/<plain name>` -> {"size", "sha256"}."""
    out = []
    for rel, meta in files.items():
        name = rel[len(TOKENIZER_DIR) + 1:] if rel.startswith(TOKENIZER_DIR + "/") else ""
        if not name or "/" in name or name.startswith(".") or TMP_MARK in name:
            out.append(f"tokenizer file {rel!r} must be {TOKENIZER_DIR}/<name> (no folders)")
        if not isinstance(meta, dict) or set(meta) != {"size", "sha256"}:
            out.append(f"tokenizer file {rel!r} must list its size and sha256, found {meta!r}")
    return out


def _signal_problems(name: str, sig: SignalSpec) -> list[str]:
    out = []
    if not name or "/" in name or name.startswith("."):
        out.append(f"signal name {name!r} must be non-empty, without '/' and not start with '.'")
    if not sig.kinds():
        out.append(f"signal {name!r} holds nothing (enable top-k, sampled, hidden or attention)")
    for kind in ("topk", "sampled"):
        spec = getattr(sig, kind)
        if spec is None:
            continue
        if spec.logprob_encoding not in LOGPROB_ENCODINGS:
            out.append(f"signal {name!r}: {kind} logprob_encoding must be one of "
                       f"{LOGPROB_ENCODINGS}, found {spec.logprob_encoding!r}")
        steps = [spec.logprob_step] + ([spec.singleton_step] if kind == "sampled" else [])
        if not all(step > 0 for step in steps):
            out.append(f"signal {name!r}: {kind} quantisation steps must be > 0, found {steps}")
    if sig.topk is not None and sig.topk.k < 1:
        out.append(f"signal {name!r}: top-k k must be >= 1, found {sig.topk.k}")
    if sig.sampled is not None:
        if not 1 <= sig.sampled.n_draws < 2**16:
            out.append(f"signal {name!r}: n_draws must be in 1..65535, found {sig.sampled.n_draws}")
        if not sig.sampled.temperature > 0:
            out.append(f"signal {name!r}: sample temperature must be > 0, "
                       f"found {sig.sampled.temperature}")
        if not isinstance(sig.sampled.logprobs, bool):
            out.append(f"signal {name!r}: sampled logprobs must be true or false, "
                       f"found {sig.sampled.logprobs!r}")
    if sig.depth is not None:
        out += _depth_problems(name, sig)
    if sig.hidden is not None:
        if sig.hidden.pooling not in HIDDEN_POOLINGS:
            out.append(f"signal {name!r}: hidden pooling must be one of {HIDDEN_POOLINGS}, "
                       f"found {sig.hidden.pooling!r}")
        if not sig.hidden.layers or sig.hidden.dim < 1:
            out.append(f"signal {name!r}: hidden needs >= 1 layer and dim >= 1")
        if sig.hidden.dtype not in ("float16", "float32"):
            out.append(f"signal {name!r}: hidden dtype must be float16 or float32 "
                       f"(bfloat16 is not a zarr dtype), found {sig.hidden.dtype!r}")
    if sig.attention is not None:
        att = sig.attention
        if att.heads not in ATTENTION_HEADS:
            out.append(f"signal {name!r}: attention heads must be one of {ATTENTION_HEADS}, "
                       f"found {att.heads!r}")
        if not att.layers or att.grid < 1 or att.num_heads < 1:
            out.append(f"signal {name!r}: attention needs >= 1 layer, grid >= 1, num_heads >= 1")
        if att.heads == "mean" and att.num_heads != 1:
            out.append(f"signal {name!r}: head-averaged attention stores 1 head, "
                       f"found num_heads={att.num_heads}")
        if att.dtype not in ("float16", "float32"):
            out.append(f"signal {name!r}: attention dtype must be float16 or float32, "
                       f"found {att.dtype!r}")
    return out


def _depth_problems(name: str, sig: SignalSpec) -> list[str]:
    """With a known depth, stored layers are block numbers of the teacher, each once."""
    if sig.depth < 1:
        return [f"signal {name!r}: depth must be >= 1, found {sig.depth}"]
    out = []
    for kind in ("hidden", "attention"):
        spec = getattr(sig, kind)
        if spec is None:
            continue
        if any(not 0 <= i < sig.depth for i in spec.layers) or len(set(spec.layers)) != len(
                spec.layers):
            out.append(f"signal {name!r}: {kind} layers must be distinct block numbers in "
                       f"0..{sig.depth - 1} (depth {sig.depth}), found {list(spec.layers)}")
    return out


def _signal_from_json(data: dict[str, Any]) -> SignalSpec:
    def build(cls, value):
        if value is None:
            return None
        value = dict(value)
        if "layers" in value:
            value["layers"] = tuple(value["layers"])
        return cls(**value)

    return SignalSpec(
        topk=build(TopKSpec, data.get("topk")),
        sampled=build(SampledSpec, data.get("sampled")),
        hidden=build(HiddenSpec, data.get("hidden")),
        attention=build(AttentionSpec, data.get("attention")),
        teacher=dict(data.get("teacher", {})),
        depth=data.get("depth"),
        tokenization=data.get("tokenization"),
    )


def settings_differences(expected: StoreSettings, found: StoreSettings) -> list[str]:
    """Human-readable list of the settings that differ (empty when they agree)."""
    a, b = flatten_settings(expected.to_json()), flatten_settings(found.to_json())
    return [f"{key}: store has {a.get(key)!r}, writer has {b.get(key)!r}"
            for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)]


def flatten_settings(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested settings JSON -> {"signals.teacher.topk.k": 8, ...} (for naming differences)."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(flatten_settings(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): data}


def segment_name(number: int) -> str:
    return f"seg-{number:06d}"


def tokenization_array(tokenization: str, array: str) -> str:
    """Path of an extra tokenization's array inside a segment (2.2), e.g.
    tokenizations/medgemma/input_ids."""
    return f"tokenizations/{tokenization}/{array}"


def signal_array(signal: str, array: str) -> str:
    """Path of a signal's array inside a segment, e.g. signals/med42/topk_ids."""
    return f"signals/{signal}/{array}"
