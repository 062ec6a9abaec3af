"""A sparse map from a teacher's vocabulary to a student's, built from the two tokenizers alone.

Contract of a `VocabMap` (what the cross-tokenizer losses may rely on), for teacher id t in
[0, teacher_vocab_size):

* `teacher_to_student_first[t]` (int32) is a student id, or -1 when t is unmapped. It is the
  FIRST piece of the student's tokenization of t's bytes: a student token whose bytes are a
  non-empty prefix of t's bytes (equal to them when `exact[t]`). At an aligned position (both
  next tokens start at the same byte, see token_alignment) p_S(first[t]) is the student's
  probability of starting the text that t spells with that piece.
* `exact[t]` (bool): first[t] spells exactly t's bytes (a 1:1 match), or both are special tokens
  of the same role (`role_mapped[t]`). Among several student tokens with the same bytes the one
  the student's tokenizer produces is chosen: an added (non-special) token, else a regular one,
  else a byte-fallback `<0xAB>` token; lowest id among equals.
* `pieces(t)` = piece_ids[piece_offsets[t]:piece_offsets[t+1]] (int32): the student's whole
  tokenization of t's bytes; their bytes concatenate to exactly t's bytes (checked when built,
  else t is unmapped). Length 1 when exact, 0 when unmapped; pieces(t)[0] == first[t].
* Unmapped (-1, no pieces): special tokens with no role shared by both tokenizers, the teacher's
  unknown token, ids that no token uses, and tokens whose bytes the student cannot spell
  (no byte-level alphabet nor byte-fallback token for a byte: its tokenization drops or
  `<unk>`s it).
* Special tokens are mapped by role only: `bos`, `eos`, `pad` (from a transformers tokenizer's
  `<role>_token_id`) or any role names passed in `teacher_roles` / `student_roles` (e.g. an
  end-of-turn token), where both tokenizers have that role.
* Bytes are the token's own bytes, spaces included: SentencePiece's "▁Hello" is b" Hello" even
  where it stands at a section start for "Hello" alone (a dummy prefix: its span, hence the
  alignment's `teacher_next_bytes`, is then one byte shorter than its bytes).
* `teacher_byte_lengths[t]` (int32 [Vt]) and `student_byte_lengths[s]` (int32
  [student_vocab_size]): the length of each id's own bytes, 0 for an id with none (special,
  unknown, unused). A token whose span is shorter than its own bytes carries a prefix space the
  text lacks; where exactly one of two aligned next tokens does, the map's first piece is not
  the token the student writes there (the cross-tokenizer data path skips that pair).
* The map is NOT injective: several teacher tokens can share a student first piece (" Hello"
  and " Help" both start with " Hel"; byte-fallback duplicates even share exact matches), so a
  loss that projects student probabilities onto teacher tokens must merge teacher mass per
  student id before comparing, or it counts one student probability several times.

A token's bytes are read as `token_bytes.TokenBytes` reads them for byte spans (byte-level
alphabet, `<0xAB>` byte fallback, SentencePiece "▁" = space), so maps and spans agree. The
student's tokenization of bytes runs its model (BPE merges / Unigram) on them as one word, with
no normaliser nor pre-tokenizer (which could add a dummy prefix): it matches the student's full
pipeline wherever no merge crosses a pre-token boundary (BPE learns merges inside pre-tokens
only) and no normaliser rewrites the text (NFKC, lower-casing), and is a valid spelling anyway. Maps are cached as .npz (never pickle) under a key hashing both tokenizers'
fingerprints, byte conventions and roles: `vocab_map_for` loads it when present.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from logitstore.errors import LogitStoreError
from logitstore.toolkit.token_bytes import TokenBytes, bytes_to_unicode, backend_of
from logitstore.toolkit.tokenizer_identity import tokenizer_fingerprint

MAP_FORMAT = 2  # bump when the map's construction changes: old cache entries are not reused
DEFAULT_ROLES = ("bos", "eos", "pad")
_BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_BYTE_LEVEL_ALPHABET = bytes_to_unicode()  # byte -> the character a byte-level BPE spells it with
_SURROGATE = re.compile("([\udc80-\udcff])")  # an undecodable byte under "surrogateescape"


class VocabMapError(LogitStoreError):
    """Top-k arrays that do not fit a vocabulary map."""


@dataclass(frozen=True)
class VocabMap:
    """Teacher vocabulary -> student vocabulary (contract in the module docstring)."""

    teacher_to_student_first: np.ndarray  # int32 [Vt], -1 = unmapped
    exact: np.ndarray  # bool [Vt]
    role_mapped: np.ndarray  # bool [Vt]: special tokens matched by role (also exact)
    piece_offsets: np.ndarray  # int64 [Vt + 1]
    piece_ids: np.ndarray  # int32 [total pieces]
    student_vocab_size: int
    key: str  # the cache key (sha256 hex) of the tokenizer pair
    teacher_byte_lengths: np.ndarray  # int32 [Vt]: own bytes per teacher id, 0 = none
    student_byte_lengths: np.ndarray  # int32 [student_vocab_size]: the same per student id

    @property
    def teacher_vocab_size(self) -> int:
        return int(self.teacher_to_student_first.shape[0])

    def pieces(self, teacher_id: int) -> np.ndarray:
        """The student's tokenization of teacher token `teacher_id`'s bytes (empty: unmapped)."""
        return self.piece_ids[self.piece_offsets[teacher_id] : self.piece_offsets[teacher_id + 1]]

    def summary(self) -> dict[str, int]:
        """How many teacher ids map exactly (roles included), via a first piece, or not at all."""
        mapped = self.teacher_to_student_first >= 0
        return {
            "teacher_vocab": self.teacher_vocab_size,
            "exact": int(self.exact.sum()),
            "role_mapped": int(self.role_mapped.sum()),
            "decomposed": int((mapped & ~self.exact).sum()),
            "unmapped": int((~mapped).sum()),
        }

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "teacher_to_student_first": self.teacher_to_student_first,
            "exact": self.exact,
            "role_mapped": self.role_mapped,
            "piece_offsets": self.piece_offsets,
            "piece_ids": self.piece_ids,
            "teacher_byte_lengths": self.teacher_byte_lengths,
            "student_byte_lengths": self.student_byte_lengths,
            "student_vocab_size": np.array(self.student_vocab_size, dtype=np.int64),
            "key": np.array(self.key),
            "format": np.array(MAP_FORMAT, dtype=np.int64),
        }


@dataclass(frozen=True)
class MapCoverage:
    """Shares of a teacher top-k's probability mass (normalised by `total_mass`, the top-k's
    summed probability) whose tokens map exactly, map via a first piece only, or not at all."""

    exact: float
    decomposed: float
    unmapped: float
    total_mass: float

    @property
    def mapped(self) -> float:
        return self.exact + self.decomposed


def coverage(vocab_map: VocabMap, teacher_topk_ids, teacher_topk_probs) -> MapCoverage:
    """Share of the teacher's top-k mass that the map reaches, exactly / via a first piece.

    `teacher_topk_ids` and `teacher_topk_probs` have one shape (any: [k], [n, k], ...);
    probabilities, not log-probs (pass np.exp of stored log-probs). Ids outside the teacher's
    vocabulary (padding, -1) count as unmapped. All shares are 0.0 when the mass is 0.
    """
    ids = np.asarray(teacher_topk_ids)
    probs = np.asarray(teacher_topk_probs, dtype=np.float64)
    if ids.shape != probs.shape or not np.issubdtype(ids.dtype, np.integer):
        raise VocabMapError(
            f"coverage needs integer top-k ids and probabilities of one shape, found ids "
            f"{ids.dtype} {ids.shape} and probabilities {probs.dtype} {probs.shape}; pass the "
            "stored top-k ids with np.exp of their log-probs"
        )
    if np.any(probs < 0) or not np.all(np.isfinite(probs)):
        raise VocabMapError(
            "coverage needs probabilities >= 0 and finite, found negative or non-finite values: "
            "pass np.exp of the stored log-probs, not the log-probs themselves"
        )
    valid = (ids >= 0) & (ids < vocab_map.teacher_vocab_size)
    safe = np.where(valid, ids, 0)
    exact = valid & vocab_map.exact[safe]
    mapped = valid & (vocab_map.teacher_to_student_first[safe] >= 0)
    total = float(probs.sum())
    if total == 0.0:
        return MapCoverage(0.0, 0.0, 0.0, 0.0)
    exact_share = float(probs[exact].sum()) / total
    decomposed_share = float(probs[mapped & ~exact].sum()) / total
    return MapCoverage(exact_share, decomposed_share, 1.0 - exact_share - decomposed_share, total)


class _Side:
    """One tokenizer as the map sees it: each id's bytes (None = special / unknown / unused),
    its special ids by role, and how to run its model on raw bytes."""

    def __init__(self, tokenizer, roles: dict[str, int] | None):
        self.backend = backend_of(tokenizer)
        self.reader = TokenBytes(self.backend)
        self.roles = _roles_of(tokenizer, roles)

    def read_vocabulary(self) -> None:
        """Read every id's token and bytes (O(vocab); a cache hit skips it)."""
        backend = self.backend
        vocab = backend.get_vocab(with_added_tokens=True)
        self.size = max(backend.get_vocab_size(with_added_tokens=True), max(vocab.values()) + 1)
        self.tokens: list[str | None] = [None] * self.size
        for token, token_id in vocab.items():
            self.tokens[token_id] = token
        added = backend.get_added_tokens_decoder()
        self.special_ids = {i for i, token in added.items() if token.special}
        self.added_text_ids = {i for i, token in added.items() if not token.special}
        model = json.loads(backend.model.__getstate__())
        unk = model.get("unk_token")
        self.unk_id = vocab.get(unk) if isinstance(unk, str) else model.get("unk_id")
        self.token_bytes = [self._bytes(i) for i in range(self.size)]

    def byte_lengths(self) -> np.ndarray:
        """int32 [size]: each id's own byte length (0: no bytes)."""
        return np.fromiter((len(data) if data else 0 for data in self.token_bytes),
                           dtype=np.int32, count=self.size)

    def _bytes(self, token_id: int) -> bytes | None:
        token = self.tokens[token_id]
        if token is None or token_id in self.special_ids or token_id == self.unk_id:
            return None
        return self.reader(token_id, token) or None

    def is_byte_fallback(self, token_id: int) -> bool:
        return self.reader.byte_fallback and bool(_BYTE_FALLBACK.fullmatch(self.tokens[token_id]))

    def bytes_to_id(self) -> dict[bytes, int]:
        """Each byte string to the id the tokenizer itself would produce for it (see contract)."""
        def tier(token_id: int) -> int:
            if token_id in self.added_text_ids:
                return 0
            return 2 if self.is_byte_fallback(token_id) else 1

        ranked = sorted(
            (tier(i), i) for i, data in enumerate(self.token_bytes) if data is not None
        )
        table: dict[bytes, int] = {}
        for _, token_id in ranked:
            table.setdefault(self.token_bytes[token_id], token_id)
        return table

    def surface(self, text: str) -> str:
        """Text spelled in the model's own alphabet (inverse of the decoder's replacements)."""
        for pattern, content in reversed(self.reader.replacements):
            if content:
                text = text.replace(content, pattern)
        return text

    def convention(self) -> dict:
        """What, beyond the fingerprint, decides how tokens read as bytes (for the cache key)."""
        return {
            "byte_level": self.reader.byte_level,
            "byte_fallback": self.reader.byte_fallback,
            "replacements": self.reader.replacements,
            "prefix": self.reader.prefix,
            "suffix": self.reader.suffix,
            "roles": sorted(self.roles.items()),
        }


def _roles_of(tokenizer, roles: dict[str, int] | None) -> dict[str, int]:
    if roles is not None:
        return {name: int(token_id) for name, token_id in roles.items()}
    found = {}
    for name in DEFAULT_ROLES:
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        if isinstance(token_id, int):
            found[name] = token_id
    return found


def _tokenize_bytes(data: bytes, student: _Side, single_bytes: dict[bytes, int]) -> list | None:
    """The student's tokenization of `data` (see the module docstring), or None when its
    pieces do not spell exactly `data` (an unknown character, a byte it cannot represent)."""
    model = student.backend.model
    if student.reader.byte_level:
        spelled_in_alphabet = "".join(_BYTE_LEVEL_ALPHABET[b] for b in data)
        ids = [token.id for token in model.tokenize(spelled_in_alphabet)]
    else:
        ids = []
        # Undecodable bytes (a piece of a multi-byte character) become lone surrogates and
        # are spelled by the student's single-byte token (byte fallback) if it has one.
        for part in _SURROGATE.split(data.decode("utf-8", errors="surrogateescape")):
            if len(part) == 1 and "\udc80" <= part <= "\udcff":
                byte_id = single_bytes.get(bytes([ord(part) - 0xDC00]))
                if byte_id is None:
                    return None
                ids.append(byte_id)
            elif part:
                ids.extend(token.id for token in model.tokenize(student.surface(part)))
    spelled = [student.token_bytes[i] if i < student.size else None for i in ids]
    if not ids or any(piece is None for piece in spelled) or b"".join(spelled) != data:
        return None
    return ids


def build_vocab_map(teacher, student, *, teacher_roles=None, student_roles=None) -> VocabMap:
    """Build the teacher -> student map (no cache; see `vocab_map_for`).

    `teacher` and `student` are fast transformers tokenizers or `tokenizers.Tokenizer`s;
    `teacher_roles` / `student_roles` ({role name: special token id}) replace the roles read
    from the tokenizers (bos/eos/pad), e.g. to add an end-of-turn token.
    """
    t_side, s_side = _Side(teacher, teacher_roles), _Side(student, student_roles)
    return _build(t_side, s_side, _cache_key(teacher, student, t_side, s_side))


def _build(t_side: _Side, s_side: _Side, key: str) -> VocabMap:
    t_side.read_vocabulary()
    s_side.read_vocabulary()
    by_bytes = s_side.bytes_to_id()
    pieces: list[list[int]] = [[] for _ in range(t_side.size)]
    exact = np.zeros(t_side.size, dtype=bool)
    role_mapped = np.zeros(t_side.size, dtype=bool)
    for name, t_id in t_side.roles.items():
        s_id = s_side.roles.get(name)
        if s_id is not None and 0 <= t_id < t_side.size and not role_mapped[t_id]:
            pieces[t_id], exact[t_id], role_mapped[t_id] = [s_id], True, True
    for t_id, data in enumerate(t_side.token_bytes):
        if data is None or role_mapped[t_id]:
            continue
        s_id = by_bytes.get(data)
        if s_id is not None:
            pieces[t_id], exact[t_id] = [s_id], True
        else:
            pieces[t_id] = _tokenize_bytes(data, s_side, by_bytes) or []
    counts = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=t_side.size)
    offsets = np.zeros(t_side.size + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    flat = np.fromiter((i for p in pieces for i in p), dtype=np.int32, count=int(offsets[-1]))
    first = np.full(t_side.size, -1, dtype=np.int32)
    has = counts > 0
    first[has] = flat[offsets[:-1][has]]
    return VocabMap(first, exact, role_mapped, offsets, flat, s_side.size, key,
                    t_side.byte_lengths(), s_side.byte_lengths())


def _cache_key(teacher, student, t_side: _Side, s_side: _Side) -> str:
    def fingerprint(tokenizer, side: _Side) -> str:
        if side.backend is tokenizer:  # a bare tokenizers.Tokenizer: fingerprint its JSON
            tokenizer = types.SimpleNamespace(backend_tokenizer=tokenizer)
        return tokenizer_fingerprint(tokenizer)

    identity = {
        "format": MAP_FORMAT,
        "teacher": [fingerprint(teacher, t_side), t_side.convention()],
        "student": [fingerprint(student, s_side), s_side.convention()],
    }
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def default_cache_dir() -> Path:
    """$LOGITSTORE_CACHE/vocab_maps, else $XDG_CACHE_HOME/logitstore/vocab_maps (~/.cache
    when XDG_CACHE_HOME is unset)."""
    if os.environ.get("LOGITSTORE_CACHE"):
        return Path(os.environ["LOGITSTORE_CACHE"]) / "vocab_maps"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "logitstore" / "vocab_maps"


def vocab_map_for(
    teacher, student, *, cache_dir=None, teacher_roles=None, student_roles=None
) -> VocabMap:
    """The teacher -> student map, loaded from `cache_dir` (default `default_cache_dir()`)
    when built before for the same pair, else built and saved there as `<key>.npz`.

    A cache file that cannot be read, or holds another key or format, is rebuilt and replaced.
    """
    t_side, s_side = _Side(teacher, teacher_roles), _Side(student, student_roles)
    key = _cache_key(teacher, student, t_side, s_side)
    path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / f"{key}.npz"
    cached = load_vocab_map(path, key)
    if cached is not None:
        return cached
    built = _build(t_side, s_side, key)
    save_vocab_map(built, path)
    return built


def save_vocab_map(vocab_map: VocabMap, path: str | Path) -> None:
    """Write the map's arrays as one .npz, atomically (a temporary file, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as handle:
        np.savez(handle, **vocab_map.arrays())
    os.replace(temporary, path)


def load_vocab_map(path: str | Path, key: str | None = None) -> VocabMap | None:
    """The map saved at `path`, or None when it is missing, unreadable, of another format,
    of another key than `key` (when given), or inconsistent (offsets vs pieces,
    byte lengths vs vocabulary sizes)."""
    try:
        with np.load(Path(path), allow_pickle=False) as saved:
            arrays = {name: saved[name] for name in saved.files}
        vocab_map = VocabMap(
            teacher_to_student_first=arrays["teacher_to_student_first"].astype(np.int32),
            exact=arrays["exact"].astype(bool),
            role_mapped=arrays["role_mapped"].astype(bool),
            piece_offsets=arrays["piece_offsets"].astype(np.int64),
            piece_ids=arrays["piece_ids"].astype(np.int32),
            student_vocab_size=int(arrays["student_vocab_size"]),
            key=str(arrays["key"]),
            teacher_byte_lengths=arrays["teacher_byte_lengths"].astype(np.int32),
            student_byte_lengths=arrays["student_byte_lengths"].astype(np.int32),
        )
        stale = int(arrays["format"]) != MAP_FORMAT or (key is not None and vocab_map.key != key)
    except (OSError, ValueError, KeyError, EOFError):
        return None
    size = vocab_map.teacher_vocab_size
    consistent = (
        vocab_map.exact.shape == vocab_map.role_mapped.shape == (size,)
        and vocab_map.piece_offsets.shape == (size + 1,)
        and int(vocab_map.piece_offsets[-1]) == vocab_map.piece_ids.shape[0]
        and vocab_map.teacher_byte_lengths.shape == (size,)
        and vocab_map.student_byte_lengths.shape == (vocab_map.student_vocab_size,)
    )
    return None if stale or not consistent else vocab_map
