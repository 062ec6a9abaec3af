"""Which positions of two tokenizations of the same text predict the same thing.

Two tokenizations (a teacher's and a student's) of one sample's text are given as byte spans
(issue 15's shared representation): `spans[T, 2]` = byte [start, end) of each token in the UTF-8
text and `special[T]` = special / chat-template token (zero-width span at the byte where it sits).
Position i predicts token i + 1 (causal LM), so only positions 0 .. T-2 have a target.

`align_positions` pairs teacher position i with student position j when:

* both next tokens are *clean text* tokens: not special, at least one byte wide, and starting at
  or after the end of every earlier text token of their tokenization (a normaliser that expands
  one character into several tokens gives them overlapping spans: only the first is clean);
* both next tokens start at the same byte (so both models have consumed the same text prefix);
* both agree on whether a special token sits right before that next token (zero-width text
  tokens in between, such as a dummy-prefix "▁", do not count). This is the rule
  across chat templates: the first text token of a turn aligns only with the first text token
  of the same turn in the other tokenization (both after their own turn markers, whatever those
  are), and a turn boundary that only one template marks (or a student token that crosses it)
  skips that one position, counted, instead of pairing a turn opening with a mid-text position.

Special tokens never align with text tokens nor with each other (two templates' markers do not
correspond one to one); the loss's vocabulary map handles specials by role at aligned positions.
Every student position that is not aligned gets exactly one reason (`SkipReason`), so metrics
can say why positions were skipped; nothing is guessed. All work is vectorised numpy
(searchsorted / intersect1d): cheap enough to run per sample in a data loader.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

from logitstore.errors import TokenSpansError


class SkipReason(enum.IntEnum):
    """Why a student position is (not) aligned; stored per position as int8."""

    ALIGNED = 0
    NEXT_SPECIAL = 1  # the student's next token is a special / chat-template token
    NEXT_NOT_CLEAN = 2  # ... is zero-width text (a dummy prefix) or overlaps earlier text
    INSIDE_TEACHER_TOKEN = 3  # it starts strictly inside a teacher text token
    TEACHER_GAP = 4  # it starts in bytes no clean teacher token covers (dropped whitespace...)
    BEYOND_TEACHER = 5  # it starts after the teacher's last text byte (teacher truncated)
    NO_TEACHER_POSITION = 6  # the teacher token starting there is its first token: no predictor
    SPECIAL_BOUNDARY = 7  # one side has a special token right before it, the other does not


@dataclass(frozen=True)
class PositionAlignment:
    """Aligned (teacher, student) position pairs of one sample, and why the rest were skipped.

    `teacher_pos[k]`, `student_pos[k]`: the k-th aligned pair (both increasing). The next tokens
    of the pair start at the same byte; `teacher_next_bytes` / `student_next_bytes` are their
    byte lengths and `same_end` says whether they also end at the same byte (then the two next
    tokens cover exactly the same bytes). `student_reason[j]` is the `SkipReason` of student
    position j (0 .. student_positions-1).
    """

    teacher_pos: np.ndarray  # int64 [A]
    student_pos: np.ndarray  # int64 [A]
    teacher_next_bytes: np.ndarray  # int32 [A]
    student_next_bytes: np.ndarray  # int32 [A]
    same_end: np.ndarray  # bool [A]
    student_reason: np.ndarray  # int8 [student_positions]
    teacher_positions: int  # teacher positions that have a next token (T_teacher - 1)

    @property
    def student_positions(self) -> int:
        """Student positions that have a next token (T_student - 1)."""
        return int(self.student_reason.shape[0])

    @property
    def aligned(self) -> int:
        return int(self.teacher_pos.shape[0])

    @property
    def skipped(self) -> int:
        return self.student_positions - self.aligned

    def skip_counts(self) -> dict[str, int]:
        """Skipped student positions per reason (lower-case reason names; zeros included)."""
        counts = np.bincount(self.student_reason, minlength=len(SkipReason))
        return {r.name.lower(): int(counts[r]) for r in SkipReason if r != SkipReason.ALIGNED}

    def metrics(self) -> dict[str, int]:
        """Flat counts for metrics.jsonl: totals, aligned, same-end pairs and skips by reason."""
        out = {
            "student_positions": self.student_positions,
            "teacher_positions": self.teacher_positions,
            "aligned": self.aligned,
            "aligned_same_end": int(self.same_end.sum()),
            "skipped": self.skipped,
        }
        out.update({f"skipped_{name}": n for name, n in self.skip_counts().items()})
        return out


@dataclass(frozen=True)
class _Targets:
    """Per-position view of one tokenization's next tokens (positions 0 .. T-2)."""

    start: np.ndarray  # int64: byte where the next token starts
    end: np.ndarray  # int64: byte where it ends
    special: np.ndarray  # bool: the next token is special
    clean: np.ndarray  # bool: the next token is clean text (see the module docstring)
    after_special: np.ndarray  # bool: a special token sits right before the next token
    text_starts: np.ndarray  # int64 [n_text]: starts of the clean text tokens (increasing)
    text_ends: np.ndarray  # int64 [n_text]: their ends
    coverage_end: int  # last byte (exclusive) of any text token; 0 if none


def _checked(spans, special, who: str) -> tuple[np.ndarray, np.ndarray]:
    spans = np.asarray(spans)
    special = np.asarray(special)
    problem = None
    if spans.ndim != 2 or spans.shape[1] != 2 or not np.issubdtype(spans.dtype, np.integer):
        problem = f"spans must be an integer array [T, 2], found {spans.dtype} {spans.shape}"
    elif special.shape != (spans.shape[0],) or special.dtype != np.bool_:
        problem = (
            f"special must be a bool array [T] with T={spans.shape[0]} (one flag per token), "
            f"found {special.dtype} {special.shape}"
        )
    elif spans.size and (spans.min() < 0 or np.any(spans[:, 0] > spans[:, 1])):
        bad = int(np.flatnonzero((spans[:, 0] > spans[:, 1]) | (spans.min(axis=1) < 0))[0])
        problem = f"token {bad} has span {spans[bad].tolist()}: need 0 <= start <= end"
    if problem is not None:
        raise TokenSpansError(
            f"cannot align the {who} tokenization: {problem}. Spans are byte [start, end) "
            "offsets into the sample's UTF-8 text, as logitstore.toolkit.token_spans."
            "tokenize_with_spans returns them; pass those arrays unchanged."
        )
    return spans.astype(np.int64, copy=False), special


def _clean_text(spans: np.ndarray, special: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(text, clean) [T] bool: not special and at least one byte wide; and also starting at or
    after the end of every earlier text token (module docstring)."""
    starts, ends = spans[:, 0], spans[:, 1]
    text = ~special & (ends > starts)
    # End of the text read so far, just before each token: a token starting earlier overlaps.
    text_end_so_far = np.maximum.accumulate(np.where(text, ends, -1)) if len(ends) else ends
    prior_text_end = np.concatenate([[-1], text_end_so_far[:-1]]) if len(ends) else ends
    return text, text & (starts >= prior_text_end)


def _targets(spans: np.ndarray, special: np.ndarray) -> _Targets:
    starts, ends = spans[:, 0], spans[:, 1]
    text, clean = _clean_text(spans, special)
    # The token before, skipping zero-width text (a dummy-prefix "▁" adds no text nor turn).
    substantive = special | (ends > starts)
    last_substantive = np.maximum.accumulate(np.where(substantive, np.arange(len(ends)), -1))
    before = np.concatenate([[-1], last_substantive[:-1]]) if len(ends) else last_substantive
    after_special = (before >= 0) & special[np.maximum(before, 0)]
    nxt = slice(1, None)
    return _Targets(
        start=starts[nxt],
        end=ends[nxt],
        special=special[nxt],
        clean=clean[nxt],
        after_special=after_special[nxt],
        text_starts=starts[clean],
        text_ends=ends[clean],
        coverage_end=int(ends[text].max()) if text.any() else 0,
    )


def _student_reasons(
    student: _Targets, teacher: _Targets, teacher_first_clean_start: int | None
) -> np.ndarray:
    """The skip reason of every student position assuming no match; matches overwrite it."""
    reason = np.full(student.start.shape, SkipReason.NEXT_NOT_CLEAN, dtype=np.int8)
    reason[student.special] = SkipReason.NEXT_SPECIAL
    clean = student.clean
    s = student.start
    covering = np.searchsorted(teacher.text_starts, s, side="right") - 1
    has_covering = covering >= 0
    padded_ends = np.append(teacher.text_ends, -1)  # index -1 (no covering token) reads -1
    covering_end = padded_ends[covering]
    inside = has_covering & (s < covering_end)
    reason[clean] = SkipReason.TEACHER_GAP
    reason[clean & inside] = SkipReason.INSIDE_TEACHER_TOKEN
    reason[clean & (s >= teacher.coverage_end)] = SkipReason.BEYOND_TEACHER
    if teacher_first_clean_start is not None:
        reason[clean & (s == teacher_first_clean_start)] = SkipReason.NO_TEACHER_POSITION
    return reason


def align_positions(teacher_spans, teacher_special, student_spans, student_special):
    """Align the positions of two tokenizations of one text by the byte where their next
    tokens start (rules in the module docstring). Returns a `PositionAlignment`.

    Raises TokenSpansError (a LogitStoreError) on malformed spans: wrong shape or dtype, a
    `special` array of another length, or a span with start > end or a negative offset.
    """
    t_spans, t_special = _checked(teacher_spans, teacher_special, "teacher")
    s_spans, s_special = _checked(student_spans, student_special, "student")
    teacher, student = _targets(t_spans, t_special), _targets(s_spans, s_special)

    # Clean next-token starts are strictly increasing within a tokenization: intersect1d pairs
    # them one to one. Indexes are into the positions whose next token is clean.
    t_clean_pos, s_clean_pos = np.flatnonzero(teacher.clean), np.flatnonzero(student.clean)
    _, t_hit, s_hit = np.intersect1d(
        teacher.start[t_clean_pos], student.start[s_clean_pos],
        assume_unique=True, return_indices=True,
    )
    t_pos, s_pos = t_clean_pos[t_hit], s_clean_pos[s_hit]
    same_side = teacher.after_special[t_pos] == student.after_special[s_pos]

    # The teacher's token 0 is never a next token; if clean text, a student position whose next
    # token starts there has no teacher position to pair with.
    first_text = _first_clean_text_start(t_spans, t_special)
    reason = _student_reasons(student, teacher, first_text)
    reason[s_pos[~same_side]] = SkipReason.SPECIAL_BOUNDARY
    t_pos, s_pos = t_pos[same_side], s_pos[same_side]
    reason[s_pos] = SkipReason.ALIGNED

    t_len = (teacher.end[t_pos] - teacher.start[t_pos]).astype(np.int32)
    s_len = (student.end[s_pos] - student.start[s_pos]).astype(np.int32)
    return PositionAlignment(
        teacher_pos=t_pos.astype(np.int64),
        student_pos=s_pos.astype(np.int64),
        teacher_next_bytes=t_len,
        student_next_bytes=s_len,
        same_end=teacher.end[t_pos] == student.end[s_pos],
        student_reason=reason,
        teacher_positions=max(len(t_spans) - 1, 0),
    )


def _first_clean_text_start(spans: np.ndarray, special: np.ndarray) -> int | None:
    """Start byte of token 0 when it is clean text (nobody predicts it), else None."""
    if len(spans) == 0 or special[0] or spans[0, 1] <= spans[0, 0]:
        return None
    return int(spans[0, 0])


@dataclass(frozen=True)
class InsideAnchors:
    """The student positions whose next token starts strictly inside a teacher text token
    (`SkipReason.INSIDE_TEACHER_TOKEN`), split by whether the student's tokens since that
    teacher token's start can condition the teacher's prediction of it.

    Anchored position `student_pos[m]`: teacher text token `teacher_token[m]` (index into the
    teacher's tokens; clean, starting at byte b0) holds the start of the student's next token;
    the student's tokens `first_piece[m]` .. `student_pos[m] + 1` are clean text, each starting
    where the one before ends, the first at b0; and the student position before b0
    (`first_piece[m] - 1`) is aligned with teacher position `teacher_token[m] - 1`, whose
    prediction of the token at b0 is the one to condition. `unanchored` holds the other
    inside positions: a student token crosses b0, a special / zero-width / overlapping token
    sits among the pieces, the position before b0 is not aligned (turn boundary, b0 is
    the teacher's first token), or no clean teacher token covers the next token's start (an
    alignment made from other spans than those given).
    """

    student_pos: np.ndarray  # int64 [M]
    teacher_token: np.ndarray  # int64 [M]
    first_piece: np.ndarray  # int64 [M]
    unanchored: np.ndarray  # int64 [U]

    @property
    def depth(self) -> np.ndarray:
        """[M] student pieces emitted since b0 (>= 1); the next token is piece depth + 1."""
        return self.student_pos - self.first_piece + 1


def inside_anchors(alignment: PositionAlignment, teacher_spans, teacher_special,
                   student_spans, student_special) -> InsideAnchors:
    """Split `alignment`'s inside-teacher-token positions into anchored and unanchored ones
    (`InsideAnchors`); the spans are those `align_positions` aligned. Vectorised numpy."""
    t_spans, t_special = _checked(teacher_spans, teacher_special, "teacher")
    s_spans, s_special = _checked(student_spans, student_special, "student")
    pos = np.flatnonzero(alignment.student_reason == SkipReason.INSIDE_TEACHER_TOKEN)
    _, t_clean = _clean_text(t_spans, t_special)
    t_clean_idx = np.flatnonzero(t_clean)
    nxt = pos + 1  # the student's next token, inside a teacher text token
    # u: the last clean teacher token starting at or before it; it must also cover it (not so
    # when `alignment` came from other spans than these): else no anchor
    before = np.searchsorted(t_spans[t_clean_idx, 0], s_spans[nxt, 0], "right") - 1
    u = t_clean_idx[np.maximum(before, 0)] if len(t_clean_idx) else np.zeros_like(pos)
    covers = (before >= 0) & (t_spans[u, 1] > s_spans[nxt, 0]) if len(t_clean_idx) else \
        np.zeros(len(pos), bool)
    b0 = t_spans[u, 0]
    _, s_clean = _clean_text(s_spans, s_special)
    s_clean_idx = np.flatnonzero(s_clean)
    at = np.searchsorted(s_spans[s_clean_idx, 0], b0)
    found = at < len(s_clean_idx)
    v = np.where(found, s_clean_idx[np.minimum(at, max(len(s_clean_idx) - 1, 0))], -1) \
        if len(s_clean_idx) else np.full_like(pos, -1)
    found &= covers & (v >= 1) & (s_spans[np.maximum(v, 0), 0] == b0) & (v <= pos)
    # contiguous clean text from v to the next token: no break between v and nxt
    follows = np.zeros(len(s_spans), bool)
    follows[1:] = s_clean[1:] & (s_spans[1:, 0] == s_spans[:-1, 1])
    breaks = np.cumsum(~follows)
    safe_v = np.maximum(v, 0)
    found &= breaks[nxt] == breaks[safe_v]
    found &= alignment.student_reason[np.maximum(safe_v - 1, 0)] == SkipReason.ALIGNED
    return InsideAnchors(student_pos=pos[found].astype(np.int64),
                         teacher_token=u[found].astype(np.int64),
                         first_piece=v[found].astype(np.int64),
                         unanchored=pos[~found].astype(np.int64))
