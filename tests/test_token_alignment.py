"""Position alignment of two tokenizations by byte spans (logitstore.toolkit.token_alignment).

Hand-made tokenizations (spans from the pieces' UTF-8 lengths) for each case issue 15 lists,
a loop reference on random tokenizations with specials, and a property test on two real tiny
tokenizers (spans from each token's own bytes, so they are exact by construction).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from logitstore.errors import LogitStoreError, TokenSpansError
from logitstore.toolkit.token_alignment import PositionAlignment, SkipReason, align_positions


@dataclass(frozen=True)
class Sp:
    """A special / chat-template token in a `tokenization(...)` piece list."""

    name: str


def tokenization(*pieces):
    """(spans int32 [T, 2], special bool [T]) of a tokenization given as its pieces: text pieces
    (str, or bytes for part of a character) follow each other; `Sp` pieces are zero-width."""
    spans, special, cursor = [], [], 0
    for piece in pieces:
        width = 0 if isinstance(piece, Sp) else len(piece if isinstance(piece, bytes) else piece.encode())
        spans.append((cursor, cursor + width))
        special.append(isinstance(piece, Sp))
        cursor += width
    return np.array(spans, dtype=np.int32).reshape(-1, 2), np.array(special, dtype=bool)


def align(teacher, student) -> PositionAlignment:
    return align_positions(*teacher, *student)


def pairs(result: PositionAlignment) -> list[tuple[int, int]]:
    return list(zip(result.teacher_pos.tolist(), result.student_pos.tolist()))


def reasons(result: PositionAlignment) -> list[str]:
    return [SkipReason(r).name for r in result.student_reason]


BOS = Sp("<s>")


def test_one_teacher_token_split_in_three_student_tokens():
    teacher = tokenization(BOS, "an", " unbelievable", " day")
    student = tokenization(BOS, "an", " un", "belie", "vable", " day")
    result = align(teacher, student)
    assert pairs(result) == [(0, 0), (1, 1), (2, 4)]
    assert reasons(result) == ["ALIGNED", "ALIGNED", "INSIDE_TEACHER_TOKEN", "INSIDE_TEACHER_TOKEN", "ALIGNED"]
    assert result.teacher_next_bytes.tolist() == [2, 13, 4]
    assert result.student_next_bytes.tolist() == [2, 3, 4]
    assert result.same_end.tolist() == [True, False, True]
    assert (result.student_positions, result.aligned, result.skipped) == (5, 3, 2)
    assert result.teacher_positions == 3


def test_three_teacher_tokens_merged_in_one_student_token():
    teacher = tokenization(BOS, "an", " un", "belie", "vable", " day")
    student = tokenization(BOS, "an", " unbelievable", " day")
    result = align(teacher, student)
    assert pairs(result) == [(0, 0), (1, 1), (4, 2)]
    assert reasons(result) == ["ALIGNED"] * 3
    assert result.same_end.tolist() == [True, False, True]
    assert result.teacher_next_bytes.tolist() == [2, 3, 4]
    assert result.student_next_bytes.tolist() == [2, 13, 4]


def test_two_two_split_aligns_only_the_shared_boundaries():
    teacher = tokenization(BOS, "to", "gether", " now")
    student = tokenization(BOS, "tog", "ether", " now")
    result = align(teacher, student)
    assert pairs(result) == [(0, 0), (2, 2)]
    assert reasons(result) == ["ALIGNED", "INSIDE_TEACHER_TOKEN", "ALIGNED"]
    assert result.same_end.tolist() == [False, True]


def test_byte_fallback_tokens_align_by_their_bytes():
    # "a€b": € is E2 82 AC. The teacher spells it with three byte-fallback tokens.
    teacher = tokenization(BOS, "a", b"\xe2", b"\x82", b"\xac", "b")
    student = tokenization(BOS, "a", "€", "b")
    result = align(teacher, student)
    assert pairs(result) == [(0, 0), (1, 1), (4, 2)]
    assert result.teacher_next_bytes.tolist() == [1, 1, 1]
    assert result.student_next_bytes.tolist() == [1, 3, 1]
    assert result.same_end.tolist() == [True, False, True]
    # Seen from the other side, the student's byte tokens inside € are skipped, counted.
    back = align(student, teacher)
    assert pairs(back) == [(0, 0), (1, 1), (2, 4)]
    assert reasons(back) == ["ALIGNED", "ALIGNED", "INSIDE_TEACHER_TOKEN", "INSIDE_TEACHER_TOKEN", "ALIGNED"]


def test_multi_byte_characters_split_across_byte_level_tokens():
    # 日 = E6 97 A5, 本 = E6 9C AC: the teacher's byte-level tokens cut inside both.
    teacher = tokenization(BOS, b"\xe6\x97", b"\xa5\xe6\x9c", b"\xac", "!")
    student = tokenization(BOS, "日", "本", "!")
    result = align(teacher, student)
    assert pairs(result) == [(0, 0), (3, 2)]
    assert reasons(result) == ["ALIGNED", "INSIDE_TEACHER_TOKEN", "ALIGNED"]
    assert result.teacher_next_bytes.tolist() == [2, 1]
    assert result.student_next_bytes.tolist() == [3, 1]


def test_chat_templates_with_different_special_tokens_align_within_turns():
    # Text "Hello thereHi": turn 1 = bytes [0, 11), turn 2 = [11, 13). Llama-3-like teacher,
    # ChatML-like student (no BOS, one marker per turn opening).
    begin, header, end_header, eot = Sp("<|begin|>"), Sp("<|hdr|>"), Sp("<|/hdr|>"), Sp("<|eot|>")
    im_start, im_end = Sp("<|im_start|>"), Sp("<|im_end|>")
    teacher = tokenization(begin, header, end_header, "Hello", " there", eot, header, end_header, "Hi", eot)
    student = tokenization(im_start, "Hel", "lo", " there", im_end, im_start, "Hi", im_end)
    result = align(teacher, student)
    # Turn openings pair the last marker before the text; " there" pairs mid-turn.
    assert pairs(result) == [(2, 0), (3, 2), (7, 5)]
    assert reasons(result) == [
        "ALIGNED", "INSIDE_TEACHER_TOKEN", "ALIGNED", "NEXT_SPECIAL", "NEXT_SPECIAL", "ALIGNED", "NEXT_SPECIAL",
    ]
    assert result.skip_counts()["next_special"] == 3


def test_a_turn_boundary_only_one_template_marks_skips_that_position_only():
    # The student's template has no marker between the turns: its "Hi" is mid-text there,
    # the teacher's opens a turn. That one position is skipped; the next ones still align.
    teacher = tokenization(Sp("<a>"), "Hello", Sp("<eot>"), Sp("<b>"), "Hi", " you")
    student = tokenization(Sp("<x>"), "Hello", "Hi", " you")
    result = align(teacher, student)
    assert pairs(result) == [(0, 0), (4, 2)]
    assert reasons(result) == ["ALIGNED", "SPECIAL_BOUNDARY", "ALIGNED"]
    # A student token crossing the turn boundary: the teacher's turn opening has no partner.
    crossing = tokenization(Sp("<x>"), "Hell", "oHi", " you")
    result = align(teacher, crossing)
    assert pairs(result) == [(0, 0), (4, 2)]
    assert reasons(result) == ["ALIGNED", "INSIDE_TEACHER_TOKEN", "ALIGNED"]


def test_whitespace_normalisers_dropped_bytes_and_dummy_prefixes():
    # "a  b": a WordPiece-like teacher drops the spaces (its "b" starts at byte 3); the student
    # keeps them in a token of its own, which starts in the teacher's gap.
    teacher = (np.array([[0, 0], [0, 1], [3, 4]], np.int32), np.array([True, False, False]))
    student = tokenization(BOS, "a", "  ", "b")
    result = align(teacher, student)
    assert pairs(result) == [(0, 0), (1, 2)]
    assert reasons(result) == ["ALIGNED", "TEACHER_GAP", "ALIGNED"]
    # SentencePiece's dummy-prefix "▁" alone is a zero-width text token: never a target.
    teacher = tokenization(BOS, "1", "2")
    student = (np.array([[0, 0], [0, 0], [0, 1], [1, 2]], np.int32), np.array([True, False, False, False]))
    result = align(teacher, student)
    assert pairs(result) == [(0, 1), (1, 2)]
    assert reasons(result) == ["NEXT_NOT_CLEAN", "ALIGNED", "ALIGNED"]


def test_overlapping_tokens_from_an_expanding_normaliser_use_only_the_first():
    # "ﬁx" (ﬁ = 3 bytes): NFKC turns ﬁ into "f" + "i", both spanning the ligature's bytes.
    teacher = (np.array([[0, 0], [0, 3], [0, 3], [3, 4]], np.int32), np.array([True, False, False, False]))
    student = tokenization(BOS, "ﬁ", "x")
    assert pairs(align(teacher, student)) == [(0, 0), (2, 1)]
    back = align(student, teacher)
    assert pairs(back) == [(0, 0), (1, 2)]
    assert reasons(back) == ["ALIGNED", "NEXT_NOT_CLEAN", "ALIGNED"]


def test_truncated_teacher_and_teacher_without_bos():
    teacher = tokenization(BOS, "one", " two")  # cut at its max length
    student = tokenization(BOS, "one", " two", " three", " four")
    result = align(teacher, student)
    assert pairs(result) == [(0, 0), (1, 1)]
    assert reasons(result) == ["ALIGNED", "ALIGNED", "BEYOND_TEACHER", "BEYOND_TEACHER"]
    # A teacher without BOS has no position predicting its first token.
    result = align(tokenization("one", " two"), tokenization(BOS, "one", " two"))
    assert pairs(result) == [(0, 1)]
    assert reasons(result) == ["NO_TEACHER_POSITION", "ALIGNED"]


def test_empty_and_single_token_tokenizations_have_no_positions():
    empty = (np.zeros((0, 2), np.int32), np.zeros(0, bool))
    for teacher, student in [(empty, empty), (tokenization(BOS), tokenization(BOS, "a")), (tokenization(BOS, "a"), empty)]:
        result = align(teacher, student)
        assert result.aligned == 0 and result.student_reason.dtype == np.int8
        assert result.student_positions == max(len(student[0]) - 1, 0)
    result = align(tokenization(BOS), tokenization(BOS, "a"))
    assert reasons(result) == ["BEYOND_TEACHER"]


def test_metrics_are_flat_counts():
    result = align(tokenization(BOS, "to", "gether"), tokenization(BOS, "tog", "ether"))
    metrics = result.metrics()
    assert metrics["student_positions"] == 2 and metrics["aligned"] == 1
    assert metrics["aligned_same_end"] == 0 and metrics["skipped"] == 1
    assert metrics["skipped_inside_teacher_token"] == 1
    assert sum(v for k, v in metrics.items() if k.startswith("skipped_")) == metrics["skipped"]


@pytest.mark.parametrize(
    "spans, special, found",
    [
        (np.zeros((3,), np.int32), np.zeros(3, bool), "integer array [T, 2]"),
        (np.zeros((3, 2), np.float32), np.zeros(3, bool), "integer array [T, 2]"),
        (np.zeros((3, 2), np.int32), np.zeros(2, bool), "bool array [T] with T=3"),
        (np.zeros((3, 2), np.int32), np.zeros(3, np.int8), "bool array [T] with T=3"),
        (np.array([[0, 1], [3, 2]], np.int32), np.zeros(2, bool), "token 1 has span [3, 2]"),
        (np.array([[0, 1], [-1, 2]], np.int32), np.zeros(2, bool), "token 1 has span [-1, 2]"),
    ],
)
def test_malformed_spans_are_refused_with_one_paragraph(spans, special, found):
    good = tokenization(BOS, "a")
    with pytest.raises(TokenSpansError) as raised:
        align_positions(spans, special, *good)
    message = str(raised.value)
    assert isinstance(raised.value, LogitStoreError) and "\n" not in message
    assert "teacher" in message and found in message and "tokenize_with_spans" in message
    with pytest.raises(TokenSpansError, match="student"):
        align_positions(*good, spans, special)


def reference(teacher, student):
    """Loop reference: (pairs, reasons) by the module docstring's rules, position by position."""

    def targets(spans, special):
        text_end, previous_special, out = -1, False, []
        for k in range(len(spans)):
            start, end = int(spans[k][0]), int(spans[k][1])
            text = not special[k] and end > start
            clean = text and start >= text_end
            if text:
                text_end = max(text_end, end)
            out.append((start, end, bool(special[k]), clean, previous_special))
            if special[k] or end > start:  # zero-width text does not change "after a special"
                previous_special = bool(special[k])
        return out

    t, s = targets(*teacher), targets(*student)
    t_clean = [(k, x) for k, x in enumerate(t) if x[3]]
    coverage_end = max([x[1] for x in t if not x[2] and x[1] > x[0]], default=0)
    found_pairs, found_reasons = [], []
    for j in range(len(s) - 1):
        start, _, special, clean, after = s[j + 1]
        match = [k for k, x in t_clean if x[0] == start]
        if special:
            reason = "NEXT_SPECIAL"
        elif not clean:
            reason = "NEXT_NOT_CLEAN"
        elif match and match[0] >= 1:
            reason = "ALIGNED" if t[match[0]][4] == after else "SPECIAL_BOUNDARY"
            if reason == "ALIGNED":
                found_pairs.append((match[0] - 1, j))
        elif match:
            reason = "NO_TEACHER_POSITION"
        elif start >= coverage_end:
            reason = "BEYOND_TEACHER"
        elif any(x[0] < start < x[1] for _, x in t_clean):
            reason = "INSIDE_TEACHER_TOKEN"
        else:
            reason = "TEACHER_GAP"
        found_reasons.append(reason)
    return found_pairs, found_reasons


def random_tokenization(rng, n_bytes: int):
    """Random cuts of n bytes, with special tokens, zero-width text tokens, dropped bytes and
    overlapping tokens sprinkled in, sometimes truncated."""
    cuts = np.flatnonzero(rng.random(n_bytes - 1) < 0.4) + 1
    bounds = [0, *cuts.tolist(), n_bytes]
    spans, special = [], []
    for start, end in zip(bounds[:-1], bounds[1:]):
        for _ in range(rng.integers(0, 3) if rng.random() < 0.2 else 0):
            spans.append((start, start))
            special.append(bool(rng.random() < 0.8))  # mostly specials, a few dummy prefixes
        nudge = rng.random()  # a dropped byte (gap) or an overlap with the token before
        if nudge < 0.1 and end - start >= 2:
            start += 1
        elif nudge > 0.95 and start > 0:
            start -= 1
        spans.append((start, end))
        special.append(False)
    end = int(rng.integers(1, n_bytes + 1)) if rng.random() < 0.3 else n_bytes  # truncation
    keep = [i for i, (a, b) in enumerate(spans) if b <= end]
    return np.array(spans, np.int32)[keep].reshape(-1, 2), np.array(special, bool)[keep]


def test_vectorised_alignment_matches_the_loop_reference_on_random_cases():
    rng = np.random.default_rng(15)
    for _ in range(300):
        n_bytes = int(rng.integers(1, 40))
        teacher, student = random_tokenization(rng, n_bytes), random_tokenization(rng, n_bytes)
        result = align(teacher, student)
        expected_pairs, expected_reasons = reference(teacher, student)
        assert pairs(result) == expected_pairs
        assert reasons(result) == expected_reasons
        t_next, s_next = teacher[0][result.teacher_pos + 1], student[0][result.student_pos + 1]
        assert np.array_equal(t_next[:, 0], s_next[:, 0])
        assert np.array_equal(result.same_end, t_next[:, 1] == s_next[:, 1])
        assert np.array_equal(result.teacher_next_bytes, t_next[:, 1] - t_next[:, 0])


def test_real_tokenizers_align_exactly_where_next_tokens_start_at_one_byte():
    from tiny_tokenizers import CORPUS_A, CORPUS_B, byte_level_bpe, exact_tokenization, metaspace_bpe, random_text

    teacher_tok = byte_level_bpe(CORPUS_A, 300)
    student_tok = metaspace_bpe(CORPUS_B, 150)
    rng = np.random.default_rng(0)
    seen = {"aligned": 0, "skipped": 0, "different_end": 0}
    for _ in range(60):
        text = random_text(rng)
        _, t_spans, t_special = exact_tokenization(teacher_tok, text, bos_id=1)
        _, s_spans, s_special = exact_tokenization(student_tok, text, bos_id=1 if rng.random() < 0.5 else None)
        result = align_positions(t_spans, t_special, s_spans, s_special)
        # Every position with a next token: aligned iff some teacher next token starts there.
        teacher_next = {int(start): i for i, start in enumerate(t_spans[1:, 0])}
        aligned = dict(zip(result.student_pos.tolist(), result.teacher_pos.tolist()))
        for j, start in enumerate(s_spans[1:, 0].tolist()):
            assert aligned.get(j) == teacher_next.get(start), (text, j)
        ends_t, ends_s = t_spans[result.teacher_pos + 1, 1], s_spans[result.student_pos + 1, 1]
        assert np.array_equal(result.same_end, ends_t == ends_s)
        seen["aligned"] += result.aligned
        seen["skipped"] += result.skipped
        seen["different_end"] += int((~result.same_end).sum())
    assert all(count > 20 for count in seen.values()), seen
