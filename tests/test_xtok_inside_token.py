"""Teacher targets at student positions inside a teacher token (student_train/cross_inside.py):
hand-made cases, and the whole data path + loss against a dense reference written with loops."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from reference_cross_losses import mapped_kd_reference, softmax, temper, textbook_divergence
from tiny_tokenizers import CORPUS_A, CORPUS_B, byte_level_bpe

from logitstore.sample import Sample, SignalData, TopK
from logitstore.text_spans import SampleText
from logitstore.toolkit.token_alignment import (InsideAnchors, SkipReason, align_positions,
                                                inside_anchors)
from logitstore.toolkit.token_spans import tokenize_with_spans
from logitstore.toolkit.vocab_map import build_vocab_map
from student_train.cross_batch import REASONS, CrossCollate, finish_stats, placements
from student_train.cross_inside import ENDS_HERE, INSIDE_REASONS, condition_inside
from student_train.cross_token_losses import project_topk_target
from student_train.losses import sparse_kd_per_position

TEXTS = [
    "The patient reports chest pain radiating to the left arm.",
    "A naïve café nurse noted 東京 and 大阪; the résumé was filed.",
    "Follow-up in two weeks; the patient was advised to rest.",
]

# ----------------------------------------------------------------------------- hand-made map

# Teacher ids 0..5 decomposed into student ids: 0 -> [7, 8, 9] (a word split 1:3),
# 1 -> [7, 8, 5], 2 -> [7] (spells the first piece alone), 3 -> [6], 4 -> [7, 8, 9, 4],
# 5 -> unmapped.
OFFSETS = np.array([0, 3, 6, 7, 8, 12, 12], np.int64)
PIECES = np.array([7, 8, 9, 7, 8, 5, 7, 6, 7, 8, 9, 4], np.int64)


def one_word(depth: int) -> InsideAnchors:
    """Teacher tokens [x, word]; student tokens [x, 7, 8, 9]: student position `depth` sits
    inside the word after `depth` pieces (first piece at student token 1)."""
    return InsideAnchors(student_pos=np.array([depth]), teacher_token=np.array([1]),
                         first_piece=np.array([1]), unanchored=np.array([], np.int64))


def condition(depth, ids, probs, teacher_word=0, min_share=0.0):
    lp = np.log(np.array([probs], np.float64)).astype(np.float32)
    return condition_inside(one_word(depth), np.array([3, teacher_word]),
                            np.array([3, 7, 8, 9]), np.array([ids]), lp, OFFSETS, PIECES,
                            min_share)


def test_a_word_split_1_to_3_conditions_on_the_pieces_emitted_so_far():
    # after piece 7: entries 0 -> 8, 1 -> 8, 4 -> 8; entry 2 ends at the prefix (ENDS_HERE);
    # 3 not consistent
    got = condition(1, [0, 1, 2, 3, 4], [0.3, 0.2, 0.1, 0.15, 0.05])
    assert got.student_pos.tolist() == [1] and got.teacher_pos.tolist() == [0]
    assert got.piece_ids.tolist() == [[8, 8, ENDS_HERE, -1, 8]]
    assert got.conditioned_mass == pytest.approx([0.55]) and got.topk_mass == pytest.approx([0.8])
    # after 7, 8: entry 0 -> 9, entry 1 -> 5, entry 4 -> 9
    deeper = condition(2, [0, 1, 2, 3, 4], [0.3, 0.2, 0.1, 0.15, 0.05])
    assert deeper.piece_ids.tolist() == [[9, 5, -1, -1, 9]]


def test_the_teacher_token_need_not_be_in_the_topk():
    got = condition(1, [1, 3, -1], [0.5, 0.4, 1.0])  # padding: id -1
    assert got.piece_ids.tolist() == [[8, -1, -1]] and got.conditioned_mass == pytest.approx([0.5])


def test_skip_reasons_mismatch_no_mass_and_low_share():
    mismatch = condition(1, [0, 1], [0.5, 0.4], teacher_word=3)  # t = [6]: not the pieces
    assert mismatch.skipped["inside_mismatch"].tolist() == [1] and not mismatch.student_pos.size
    unmapped = condition(1, [0], [0.5], teacher_word=5)
    assert unmapped.skipped["inside_mismatch"].tolist() == [1]
    nothing = condition(1, [2, 3], [0.5, 0.4])  # nothing extends the pieces
    assert nothing.skipped["inside_no_mass"].tolist() == [1]
    # C = 0.2, E (entry 2) = 0.3, tail = 0.4: share 0.2 / 0.9
    low = condition(1, [0, 2, 3], [0.2, 0.3, 0.1], min_share=0.25)
    assert low.skipped["inside_low_share"].tolist() == [1]
    assert condition(1, [0, 2, 3], [0.2, 0.3, 0.1], min_share=0.2).student_pos.tolist() == [1]


def test_conditioned_rows_are_renormalised_and_merged_per_piece():
    ids = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]])
    lp = torch.tensor([[0.3, 0.2, 0.1, 0.15], [0.3, 0.2, 0.1, 0.15]]).log()
    first = torch.tensor([7, 7, 7, 6, 7, -1])
    pieces = torch.tensor([[8, 8, -1, -1], [-1, -1, -1, -1]])
    conditioned = torch.tensor([True, False])
    got = project_topk_target(ids, lp, first, conditioned_ids=pieces, conditioned=conditioned)
    t = got.target
    assert t.valid[0].tolist() == [True, False, False, False] and t.ids[0, 0] == 8
    assert t.logprobs[0, 0].exp() == pytest.approx(1.0) and t.tail_logprob[0].exp() == 0.0
    plain = project_topk_target(ids, lp, first).target  # the unconditioned row: unchanged
    for field in ("ids", "logprobs", "valid", "tail_logprob"):
        assert torch.equal(getattr(t, field)[1], getattr(plain, field)[1])
    with pytest.raises(ValueError, match="both or neither"):
        project_topk_target(ids, lp, first, conditioned=conditioned)


def test_the_other_bin_keeps_the_mass_of_entries_ending_where_the_student_stands():
    """inside_other_bin: pieces 8 (0.3 + 0.2) and 9 (0.05), E = 0.1 (entry 2), entry 3 not
    consistent: the bins are the stored consistent mass 0.65 split 0.5 / 0.05 / 0.1."""
    ids = torch.tensor([[0, 1, 2, 3, 4], [0, 1, 2, 3, 4]])
    lp = torch.tensor([[0.3, 0.2, 0.1, 0.15, 0.05]] * 2).log()
    first = torch.tensor([7, 7, 7, 6, 7, -1])
    pieces = torch.tensor([[8, 8, ENDS_HERE, -1, 9], [8, 8, -1, -1, 9]])  # row 1: no E
    conditioned = torch.tensor([True, True])
    t = project_topk_target(ids, lp, first, conditioned_ids=pieces, conditioned=conditioned,
                            ends_in_other=True).target
    got = {int(i): float(v.exp()) for i, v, ok in zip(t.ids[0], t.logprobs[0], t.valid[0]) if ok}
    assert got == pytest.approx({8: 0.5 / 0.65, 9: 0.05 / 0.65})
    assert t.tail_logprob[0].exp() == pytest.approx(0.1 / 0.65)
    # without E the row is renormalised over the contributing entries, as before
    assert t.tail_logprob[1].exp() == 0.0
    assert t.logprobs[1, 0].exp() == pytest.approx(0.5 / 0.55)
    renormalised = project_topk_target(ids, lp, first, conditioned_ids=pieces,
                                       conditioned=conditioned).target
    assert renormalised.tail_logprob[0].exp() == 0.0  # the default: E left out
    assert renormalised.logprobs[0, 0].exp() == pytest.approx(0.5 / 0.55)
    for field in ("ids", "logprobs", "valid", "tail_logprob"):
        assert torch.equal(getattr(t, field)[1], getattr(renormalised, field)[1])
    # with the chain tensors of a batch (no chain in these rows: the top-k gains an entry)
    chained = project_topk_target(ids, lp, first, conditioned_ids=pieces, conditioned=conditioned,
                                  ends_in_other=True, chain_entry=torch.tensor([-1, -1]),
                                  chain_ids=torch.tensor([0, 0]),
                                  chain_logc=torch.tensor([0.0, 0.0])).target
    assert chained.tail_logprob.exp().tolist() == pytest.approx([0.1 / 0.65, 0.0])


def test_anchors_need_a_student_boundary_at_the_teacher_tokens_start():
    # teacher: [0,5) [5,10); student: [0,4) [4,6) [6,8) [8,10): the student crosses byte 5
    teacher = np.array([[0, 5], [5, 10]]), np.zeros(2, bool)
    student = np.array([[0, 4], [4, 6], [6, 8], [8, 10]]), np.zeros(4, bool)
    align = align_positions(*teacher, *student)
    anchors = inside_anchors(align, *teacher, *student)
    inside = np.flatnonzero(align.student_reason == SkipReason.INSIDE_TEACHER_TOKEN)
    assert inside.tolist() == [0, 1, 2] and anchors.unanchored.tolist() == [0, 1, 2]
    # student [0,5) [5,7) [7,8) [8,10): positions 1, 2 sit after pieces 1 / 2 of the word
    student = np.array([[0, 5], [5, 7], [7, 8], [8, 10]]), np.zeros(4, bool)
    align = align_positions(*teacher, *student)
    anchors = inside_anchors(align, *teacher, *student)
    assert anchors.student_pos.tolist() == [1, 2] and anchors.depth.tolist() == [1, 2]
    assert anchors.teacher_token.tolist() == [1, 1] and anchors.first_piece.tolist() == [1, 1]


def test_an_inside_position_needs_a_teacher_token_that_covers_its_next_token():
    # teacher "x" [0,1), "ab" [1,3), "cd" [4,6) (byte 3 dropped); student x, a, b, " ", cd:
    # student position 2 predicts " " [3,4), in the teacher's gap. An alignment that calls it
    # inside (made from other spans) must not anchor it on "ab", which ends at byte 3.
    teacher = np.array([[0, 1], [1, 3], [4, 6]]), np.zeros(3, bool)
    student = np.array([[0, 1], [1, 2], [2, 3], [3, 4], [4, 6]]), np.zeros(5, bool)
    align = align_positions(*teacher, *student)
    assert align.student_reason.tolist() == [SkipReason.ALIGNED, SkipReason.INSIDE_TEACHER_TOKEN,
                                             SkipReason.TEACHER_GAP, SkipReason.ALIGNED]
    reasons = align.student_reason.copy()
    reasons[2] = SkipReason.INSIDE_TEACHER_TOKEN
    anchors = inside_anchors(dataclasses.replace(align, student_reason=reasons),
                             *teacher, *student)
    assert anchors.student_pos.tolist() == [1] and anchors.depth.tolist() == [1]
    assert anchors.unanchored.tolist() == [2]
    # no clean teacher token at or before the next token's start at all: unanchored too
    late = np.array([[2, 3], [3, 6]]), np.zeros(2, bool)
    reasons = np.array([SkipReason.INSIDE_TEACHER_TOKEN] + [SkipReason.TEACHER_GAP] * 3, np.int8)
    anchors = inside_anchors(dataclasses.replace(align, student_reason=reasons), *late, *student)
    assert anchors.student_pos.tolist() == [] and anchors.unanchored.tolist() == [0]


# ----------------------------------------------------------------------------- data path

@pytest.fixture(scope="module")
def pair():
    teacher = byte_level_bpe(CORPUS_A + CORPUS_B + TEXTS * 4, 700)
    student = byte_level_bpe(CORPUS_B, 300)  # few merges: words split into several pieces
    return teacher, student, build_vocab_map(teacher, student)


def make_sample(teacher, text: str, seed: int, k: int, loss_mask=None) -> Sample:
    """The teacher's cut of `text` and a random top-k favouring the true next token."""
    cut = tokenize_with_spans(teacher, text)
    g = torch.Generator().manual_seed(seed)
    vocab = teacher.get_vocab_size()
    logits = torch.randn(len(cut.ids), vocab, generator=g) * 2
    logits[torch.arange(len(cut.ids) - 1), torch.from_numpy(cut.ids[1:]).long()] += 5
    top = logits.log_softmax(-1).topk(k, -1)
    mask = np.ones(len(cut.ids), bool) if loss_mask is None else loss_mask(len(cut.ids))
    return Sample(sample_id=f"s{seed}", input_ids=cut.ids, loss_mask=mask,
                  text_spans=SampleText(text, cut.spans, cut.special, cut.role),
                  signals={"t": SignalData(topk=TopK(top.indices.numpy(),
                                                     top.values.numpy()))})


def reference_inside(sample: Sample, student, vocab_map, min_share: float,
                     other_bin: bool = False) -> dict:
    """{student position: (pieces emitted since the teacher token's start, {student piece:
    conditioned probability}, E's share)} by loops (cross_inside's rules; other_bin: E's mass
    is the target's "other" bin; the share counts it as lost either way)."""
    t = sample.text_spans
    cut = tokenize_with_spans(student, t.text)
    align = align_positions(t.spans, t.special, cut.spans, cut.special)
    topk = sample.signals["t"].topk
    out = {}
    for j in np.flatnonzero(align.student_reason == SkipReason.INSIDE_TEACHER_TOKEN):
        s = cut.spans[j + 1, 0]
        u = next(i for i, (a, b) in enumerate(t.spans) if not t.special[i] and a <= s < b)
        b0 = t.spans[u, 0]
        v = next((i for i, (a, b) in enumerate(cut.spans) if a == b0 and b > a
                  and not cut.special[i]), None)
        if v is None or v < 1 or align.student_reason[v - 1] != SkipReason.ALIGNED:
            continue
        run = range(v, j + 2)
        if any(cut.special[i] or cut.spans[i, 1] <= cut.spans[i, 0] for i in run) or \
                any(cut.spans[i, 0] != cut.spans[i - 1, 1] for i in run[1:]):
            continue
        emitted = cut.ids[v:j + 1].tolist()
        word = vocab_map.pieces(int(sample.input_ids[u])).tolist()
        if word[:len(emitted) + 1] != cut.ids[v:j + 2].tolist():
            continue
        bins, ends, stored = {}, 0.0, 0.0
        for tid, lp in zip(topk.ids[u - 1].tolist(), topk.logprobs[u - 1].tolist()):
            p = math.exp(lp)
            stored += p
            pieces = vocab_map.pieces(tid).tolist()
            if pieces[:len(emitted)] == emitted and len(pieces) > len(emitted):
                bins[pieces[len(emitted)]] = bins.get(pieces[len(emitted)], 0.0) + p
            elif pieces == emitted:
                ends += p
        total = sum(bins.values())
        kept = total + ends if other_bin else total  # what the target is normalised over
        if total > 0 and total / (total + ends + max(1.0 - stored, 0.0)) >= min_share:
            out[int(j)] = len(emitted), {piece: p / kept for piece, p in bins.items()}, \
                ends / kept if other_bin else 0.0
    return out


def conditioned_kl(logits: torch.Tensor, bins: dict, other: float, temperature: float) -> float:
    student = softmax([float(x) for x in logits])
    order = sorted(bins)
    q = [student[s] for s in order]
    p = [bins[s] for s in order] + [other]
    q.append(max(0.0, 1.0 - sum(q)))
    return temperature ** 2 * textbook_divergence("kl", temper(p, temperature),
                                                  temper(q, temperature))


@pytest.mark.parametrize("temperature,min_share,other_bin",
                         [(1.0, 0.0, False), (2.0, 0.5, False), (2.0, 0.0, True)])
def test_loss_matches_a_dense_reference_at_aligned_and_inside_positions(pair, temperature,
                                                                         min_share, other_bin):
    teacher, student, vocab_map = pair
    samples = [make_sample(teacher, text, i, k=48) for i, text in enumerate(TEXTS)]
    collate = CrossCollate(student, ["t"], {"t": vocab_map.teacher_to_student_first}, min_share,
                           piece_maps={"t": (vocab_map.piece_offsets, vocab_map.piece_ids)})
    batch = collate([[s] for s in samples], [[1.0]] * 3, ["t"], packing=False)
    signal = batch["signals"]["t"]
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(*batch["input_ids"].shape, vocab_map.student_vocab_size, generator=g)
    mapped = project_topk_target(
        signal["topk_ids"].long(), signal["topk_logprobs"].float(),
        torch.from_numpy(vocab_map.teacher_to_student_first).long(),
        temperature=temperature, conditioned_ids=signal["inside_ids"],
        conditioned=signal["inside_mask"], ends_in_other=other_bin)
    values = sparse_kd_per_position(logits, mapped.target)  # [B, S]
    depths, others = [], []
    for b, sample in enumerate(samples):
        t = sample.text_spans
        cut = tokenize_with_spans(student, t.text)
        align = align_positions(t.spans, t.special, cut.spans, cut.special)
        inside = reference_inside(sample, student, vocab_map, min_share, other_bin)
        expected = {}
        topk = sample.signals["t"].topk
        for i, j in zip(align.teacher_pos, align.student_pos):
            probs = dict(zip(topk.ids[i].tolist(), np.exp(topk.logprobs[i].astype(float))))
            expected[int(j)] = mapped_kd_reference(
                logits[b, j], probs, max(0.0, 1.0 - sum(probs.values())),
                vocab_map.teacher_to_student_first.tolist(), temperature=temperature)
        expected.update({j: conditioned_kl(logits[b, j], bins, other, temperature)
                         for j, (_, bins, other) in inside.items()})
        assert sorted(np.flatnonzero(signal["kd_mask"][b].numpy()).tolist()) == sorted(expected)
        assert sorted(np.flatnonzero(signal["inside_mask"][b].numpy())) == sorted(inside)
        for j, value in expected.items():
            assert values[b, j].item() == pytest.approx(value, rel=1e-4, abs=1e-5), (b, j)
        depths += [depth for depth, _, _ in inside.values()]
        others += [other for _, _, other in inside.values()]
    assert depths and max(depths) >= 2  # a word split into 3+ pieces, conditioned deep inside
    assert max(others) > 0 if other_bin else not any(others)  # the bin holds some E mass


def multibyte_inside(pair) -> int:
    teacher, student, vocab_map = pair
    text = TEXTS[1]
    sample = make_sample(teacher, text, 1, k=48)
    cut = tokenize_with_spans(student, text)
    data = text.encode("utf-8")
    return sum(1 for j in reference_inside(sample, student, vocab_map, 0.0)
               if any(b >= 0x80 for b in data[cut.spans[j + 1, 0]:cut.spans[j + 1, 1]]))


def test_multibyte_utf8_positions_get_conditioned_targets(pair):
    assert multibyte_inside(pair) > 0


def test_counts_add_up_per_reason_and_the_switch_keeps_the_old_behaviour(pair):
    teacher, student, vocab_map = pair
    samples = [make_sample(teacher, text, i, k=48) for i, text in enumerate(TEXTS)]
    first = {"t": vocab_map.teacher_to_student_first}
    pieces = {"t": (vocab_map.piece_offsets, vocab_map.piece_ids)}
    new = CrossCollate(student, ["t"], first, 0.5, piece_maps=pieces)([samples], [[1.0] * 3],
                                                                      ["t"], packing=True)
    old = CrossCollate(student, ["t"], first, 0.5)([samples], [[1.0] * 3], ["t"], packing=True)
    n, o = new["cross_stats"], old["cross_stats"]
    skipped = sum(n[f"cross/skipped_{r}"] for r in REASONS)
    assert n["cross/aligned"] + n["cross/inside_conditioned"] + skipped == n["cross/positions"]
    inside_total = o["cross/skipped_inside_teacher_token"]
    per_signal = n["cross/inside/t"] + sum(n[f"cross/skipped_{r}/t"] for r in INSIDE_REASONS)
    assert per_signal == inside_total > n["cross/inside/t"] == n["cross/inside_conditioned"] > 0
    assert n["cross/kd_positions/t"] == o["cross/kd_positions/t"] + n["cross/inside/t"]
    assert "inside_ids" not in old["signals"]["t"]
    assert torch.equal(old["signals"]["t"]["kd_mask"],
                       new["signals"]["t"]["kd_mask"] & ~new["signals"]["t"]["inside_mask"])
    coverage = finish_stats(n)["cross/conditioned_coverage/t"]
    assert 0 < coverage <= 1


def test_packed_rows_hold_each_samples_masks_and_inside_targets_where_it_sits(pair):
    teacher, student, vocab_map = pair
    rows = [[make_sample(teacher, TEXTS[0], 0, k=8), make_sample(teacher, TEXTS[1], 1, k=8)],
            [make_sample(teacher, TEXTS[2], 2, k=8)]]
    collate = CrossCollate(student, ["t"], {"t": vocab_map.teacher_to_student_first}, 0.0,
                           piece_maps={"t": (vocab_map.piece_offsets, vocab_map.piece_ids)})
    batch = collate(rows, [[1.0, 1.0], [1.0]], ["t"], packing=True)
    converted = [[collate.student_sample(s) for s in row] for row in rows]
    placed = placements(converted)
    lengths = [len(c.sample) for row in converted for c in row]
    assert [(b, at.start, at.stop) for b, at, _ in placed] == [
        (0, 0, lengths[0]), (0, lengths[0], lengths[0] + lengths[1]), (1, 0, lengths[2])]
    signal = batch["signals"]["t"]
    for b, at, c in placed:
        assert np.array_equal(signal["kd_mask"][b, at].numpy(), c.kd_mask["t"])
        assert np.array_equal(signal["inside_ids"][b, at].numpy(), c.inside["t"][0])
        assert np.array_equal(signal["inside_mask"][b, at].numpy(), c.inside["t"][1])
    assert signal["inside_mask"].sum() == sum(c.inside["t"][1].sum() for _, _, c in placed) > 0
    assert not signal["kd_mask"][1, lengths[2]:].any()  # the padding holds nothing
    assert (signal["inside_ids"][1, lengths[2]:] == -1).all()


def test_all_masked_and_single_token_samples(pair):
    teacher, student, vocab_map = pair
    masked = make_sample(teacher, TEXTS[0], 0, k=16, loss_mask=lambda n: np.zeros(n, bool))
    single = make_sample(teacher, "a", 1, k=16)
    assert len(single) == 1
    collate = CrossCollate(student, ["t"], {"t": vocab_map.teacher_to_student_first}, 0.5,
                           piece_maps={"t": (vocab_map.piece_offsets, vocab_map.piece_ids)})
    batch = collate([[masked], [single]], [[1.0], [1.0]], ["t"], packing=False)
    stats = batch["cross_stats"]
    assert stats["cross/positions"] == 0 and stats["cross/inside/t"] == 0
    assert all(stats[f"cross/skipped_{r}/t"] == 0 for r in INSIDE_REASONS)
    assert batch["signals"]["t"]["inside_mask"][1].sum() == 0
    rows = batch["signals"]["t"]["kd_mask"] & torch.zeros_like(batch["attention_mask"]).bool()
    mapped = project_topk_target(
        batch["signals"]["t"]["topk_ids"][rows].long(),
        batch["signals"]["t"]["topk_logprobs"][rows].float(),
        torch.from_numpy(vocab_map.teacher_to_student_first).long(),
        conditioned_ids=batch["signals"]["t"]["inside_ids"][rows],
        conditioned=batch["signals"]["t"]["inside_mask"][rows])
    assert mapped.target.ids.shape == (0, 16)
