"""Chained targets for a student token spanning several teacher tokens
(student_train/cross_chain.py): hand-made spans, the split in the projected target, and the
whole data path + loss against a dense reference written with loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from reference_cross_losses import chained_kd_reference, mapped_kd_reference
from test_xtok_inside_token import TEXTS, make_sample
from tiny_tokenizers import CORPUS_A, CORPUS_B, byte_level_bpe

from logitstore.toolkit.token_alignment import align_positions
from logitstore.toolkit.token_spans import tokenize_with_spans
from logitstore.toolkit.vocab_map import build_vocab_map
from student_train.cross_batch import CrossCollate
from student_train.cross_chain import actual_logprobs, chain_targets
from student_train.cross_token_losses import project_topk_target
from student_train.losses import sparse_kd_per_position

# ----------------------------------------------------------------------------- hand-made spans

# teacher: <s> "The" " hyper" "tension" " is"   (ids 0, 10, 11, 12, 13)
T_SPANS = np.array([[0, 0], [0, 3], [3, 9], [9, 16], [16, 19]])
T_SPECIAL = np.array([True, False, False, False, False])
T_IDS = np.array([0, 10, 11, 12, 13])


def topk(rows: list[list[tuple[int, float]]]) -> tuple[np.ndarray, np.ndarray]:
    """[T, k] ids / T=1 log-probs from (id, probability) rows, padded with -1 / -inf."""
    k = max(len(r) for r in rows)
    ids = np.full((len(rows), k), -1, np.int64)
    lp = np.full((len(rows), k), -np.inf, np.float32)
    for i, row in enumerate(rows):
        for j, (tid, p) in enumerate(row):
            ids[i, j], lp[i, j] = tid, math.log(p)
    return ids, lp


ROWS = [[(10, 0.9)], [(13, 0.2), (11, 0.6)], [(12, 0.5), (13, 0.1)], [(13, 0.7)], [(0, 1.0)]]


def chains(student_spans, rows=ROWS, t_spans=T_SPANS, t_special=T_SPECIAL):
    s_spans = np.array(student_spans)
    s_special = np.array([True] + [False] * (len(s_spans) - 1))
    a = align_positions(t_spans, t_special, s_spans, s_special)
    return a, chain_targets(a, t_spans, t_special, T_IDS, *topk(rows))


def test_a_student_token_spanning_two_teacher_tokens_gets_their_chained_probability():
    # student: <s> "The" " hypertension" " is": position 1 predicts " hyper"+"tension"
    a, got = chains([[0, 0], [0, 3], [3, 16], [16, 19]])
    assert a.student_pos[got.pair].tolist() == [1]
    assert got.entry.tolist() == [1]  # " hyper" is column 1 of teacher position 1's top-k
    assert got.log_c == pytest.approx([math.log(0.5)])  # P("tension" | .. " hyper")
    # three teacher tokens in one: " hyper" "tension" " is" -> C = 0.5 * 0.7
    a, got = chains([[0, 0], [0, 3], [3, 19]])
    assert got.log_c == pytest.approx([math.log(0.35)], rel=1e-6)


def test_chains_that_cannot_be_read_are_counted_not_guessed():
    # the student's token ends inside "tension": no teacher boundary there
    a, got = chains([[0, 0], [0, 3], [3, 12], [12, 16], [16, 19]])
    assert got.pair.size == 0 and a.student_pos[got.skipped["unended"]].tolist() == [1]
    # "tension" not in teacher position 2's top-k
    rows = [ROWS[0], ROWS[1], [(13, 0.1)], ROWS[3], ROWS[4]]
    a, got = chains([[0, 0], [0, 3], [3, 16], [16, 19]], rows)
    assert a.student_pos[got.skipped["unranked"]].tolist() == [1]
    # " hyper" (t1) not in teacher position 1's top-k
    rows = [ROWS[0], [(13, 0.2)], ROWS[2], ROWS[3], ROWS[4]]
    a, got = chains([[0, 0], [0, 3], [3, 16], [16, 19]], rows)
    assert a.student_pos[got.skipped["unranked"]].tolist() == [1]
    # a special token between " hyper" and "tension" breaks the chain
    t_spans = np.array([[0, 0], [0, 3], [3, 9], [9, 9], [9, 16]])
    t_special = np.array([True, False, False, True, False])
    a, got = chains([[0, 0], [0, 3], [3, 16]], ROWS, t_spans, t_special)
    assert got.pair.size == 0 and a.student_pos[got.skipped["unended"]].tolist() == [1]
    # two teacher tokens with one span (a normaliser's expansion): not read as a chain that
    # stops at the first of them (its factors would miss the second's)
    t_spans = np.array([[0, 0], [0, 3], [3, 9], [9, 16], [9, 16]])
    a, got = chains([[0, 0], [0, 3], [3, 16]], ROWS, t_spans,
                    np.array([True, False, False, False, False]))
    assert got.pair.size == 0 and a.student_pos[got.skipped["unended"]].tolist() == [1]
    # same-end and finer pairs are no chains at all
    a, got = chains([[0, 0], [0, 3], [3, 9], [9, 16], [16, 19]])
    assert got.pair.size == 0 and not any(v.size for v in got.skipped.values())


def test_actual_logprobs_reads_each_positions_true_next_token():
    column, value = actual_logprobs(T_IDS, *topk(ROWS))
    assert column.tolist() == [0, 1, 0, 0]
    assert value == pytest.approx(np.log([0.9, 0.6, 0.5, 0.7]))


def test_the_split_moves_the_chained_mass_and_keeps_the_rest():
    ids = torch.tensor([[0, 1, 2], [0, 1, 2]])
    lp = torch.tensor([[0.5, 0.3, 0.1], [0.5, 0.3, 0.1]]).log()
    first = torch.tensor([7, 8, 7])
    entry, chain_ids = torch.tensor([0, -1]), torch.tensor([9, -1])
    log_c = torch.tensor([math.log(0.4), 0.0])
    t = project_topk_target(ids, lp, first, chain_entry=entry, chain_ids=chain_ids,
                            chain_logc=log_c).target
    dense = {int(i): float(p) for i, p, v in zip(t.ids[0], t.logprobs[0].exp(), t.valid[0]) if v}
    assert dense == pytest.approx({7: 0.5 * 0.6 + 0.1, 8: 0.3, 9: 0.5 * 0.4})
    assert t.tail_logprob[0].exp() == pytest.approx(0.1)
    plain = project_topk_target(ids, lp, first).target  # the row without a chain: unchanged
    for field in ("ids", "logprobs", "valid"):
        assert torch.equal(getattr(t, field)[1, :3], getattr(plain, field)[1])
    assert not t.valid[1, 3] and torch.equal(t.tail_logprob[1], plain.tail_logprob[1])
    # C = 1: all of t1's mass moves
    whole = project_topk_target(ids[:1], lp[:1], first, chain_entry=entry[:1],
                                chain_ids=chain_ids[:1], chain_logc=torch.zeros(1)).target
    got = {int(i): float(p) for i, p, v in zip(whole.ids[0], whole.logprobs[0].exp(),
                                               whole.valid[0]) if v}
    assert got[9] == pytest.approx(0.5) and got[7] == pytest.approx(0.1, abs=1e-6)
    with pytest.raises(ValueError, match="all\nthree|all three"):
        project_topk_target(ids, lp, first, chain_entry=entry)


# ----------------------------------------------------------------------------- data path

@pytest.fixture(scope="module")
def coarser_pair():
    teacher = byte_level_bpe(CORPUS_B, 300)  # few merges: the teacher splits words
    student = byte_level_bpe(CORPUS_A + CORPUS_B + TEXTS * 4, 700)  # coarser words
    return teacher, student, build_vocab_map(teacher, student)


def reference_chains(sample, student) -> dict[int, tuple[int, int, float]]:
    """{student position: (t1, student token, C)} by loops over the coarser aligned pairs."""
    t = sample.text_spans
    cut = tokenize_with_spans(student, t.text)
    align = align_positions(t.spans, t.special, cut.spans, cut.special)
    top = sample.signals["t"].topk
    out = {}
    for i, j in zip(align.teacher_pos.tolist(), align.student_pos.tolist()):
        end = int(cut.spans[j + 1, 1])
        if end <= t.spans[i + 1, 1]:
            continue
        run = [i + 1]
        while t.spans[run[-1], 1] < end and run[-1] + 1 < len(t.spans):
            run.append(run[-1] + 1)
        if t.spans[run[-1], 1] != end or any(
                t.special[x] or t.spans[x, 0] != t.spans[x - 1, 1] for x in run[1:]):
            continue
        probs = []
        for x in run:
            row = dict(zip(top.ids[x - 1].tolist(), top.logprobs[x - 1].tolist()))
            probs.append(math.exp(row[int(sample.input_ids[x])])
                         if int(sample.input_ids[x]) in row else None)
        if None in probs:
            continue
        out[j] = int(sample.input_ids[i + 1]), int(cut.ids[j + 1]), math.prod(probs[1:])
    return out


def test_loss_matches_a_dense_reference_at_chained_positions(coarser_pair):
    teacher, student, vocab_map = coarser_pair
    samples = [make_sample(teacher, text, i, k=48) for i, text in enumerate(TEXTS)]
    collate = CrossCollate(student, ["t"], {"t": vocab_map.teacher_to_student_first}, 0.0,
                           chain_signals=["t"])
    batch = collate([[s] for s in samples], [[1.0]] * 3, ["t"], packing=False)
    signal = batch["signals"]["t"]
    logits = torch.randn(*batch["input_ids"].shape, vocab_map.student_vocab_size,
                         generator=torch.Generator().manual_seed(3))
    mapped = project_topk_target(
        signal["topk_ids"].long(), signal["topk_logprobs"].float(),
        torch.from_numpy(vocab_map.teacher_to_student_first).long(),
        chain_entry=signal["chain_entry"], chain_ids=signal["chain_ids"],
        chain_logc=signal["chain_logc"])
    values = sparse_kd_per_position(logits, mapped.target)  # [B, S]
    first = vocab_map.teacher_to_student_first.tolist()
    chained = 0
    for b, sample in enumerate(samples):
        t = sample.text_spans
        cut = tokenize_with_spans(student, t.text)
        align = align_positions(t.spans, t.special, cut.spans, cut.special)
        expected = reference_chains(sample, student)
        assert sorted(np.flatnonzero(signal["chain_entry"][b].numpy() >= 0)) == sorted(expected)
        top = sample.signals["t"].topk
        for i, j in zip(align.teacher_pos.tolist(), align.student_pos.tolist()):
            probs = dict(zip(top.ids[i].tolist(), np.exp(top.logprobs[i].astype(float))))
            tail = max(0.0, 1.0 - sum(probs.values()))
            want = chained_kd_reference(logits[b, j], probs, tail, first, *expected[j]) \
                if j in expected else mapped_kd_reference(logits[b, j], probs, tail, first)
            assert values[b, j].item() == pytest.approx(want, rel=1e-4, abs=1e-5), (b, j)
        chained += len(expected)
    assert chained > 0 and batch["cross_stats"]["cross/chained/t"] == chained


def test_unreadable_chains_are_skipped_unless_asked_to_keep_the_plain_target(coarser_pair):
    teacher, student, vocab_map = coarser_pair
    # a top-3: many continuations are left unranked, so many chains cannot be read
    samples = [make_sample(teacher, text, i, k=3) for i, text in enumerate(TEXTS)]
    first = {"t": vocab_map.teacher_to_student_first}

    def kd_mask(skip):
        collate = CrossCollate(student, ["t"], first, 0.0, chain_signals=["t"],
                               skip_unchained=skip)
        batch = collate([[s] for s in samples], [[1.0]] * 3, ["t"], packing=False)
        return batch["signals"]["t"]["kd_mask"].numpy(), batch["cross_stats"]

    kept, kept_stats = kd_mask(False)
    skipped, skip_stats = kd_mask(True)
    unchained = 0
    for b, sample in enumerate(samples):  # reference: coarser aligned pairs without a chain
        t = sample.text_spans
        cut = tokenize_with_spans(student, t.text)
        align = align_positions(t.spans, t.special, cut.spans, cut.special)
        chained = reference_chains(sample, student)
        want = {j for i, j in zip(align.teacher_pos.tolist(), align.student_pos.tolist())
                if cut.spans[j + 1, 1] > t.spans[i + 1, 1] and j not in chained}
        assert set(np.flatnonzero(kept[b] & ~skipped[b]).tolist()) == want, b
        assert not (skipped[b] & ~kept[b]).any()
        unchained += len(want)
    assert unchained > 0
    assert unchained == sum(skip_stats[f"cross/chain_skipped_{why}/t"]
                            for why in ("unended", "unranked"))
    assert kept_stats["cross/kd_positions/t"] - skip_stats["cross/kd_positions/t"] == unchained
