"""A dummy prefix space on one side of an aligned pair (student_train/cross_batch.py).

A SentencePiece tokenizer with a dummy prefix writes "▁Blood" (own bytes b" Blood", span
"Blood") at the start of a text or after an added token, where a byte-level BPE without one
writes "Blood". The two next tokens cover the same bytes, so the positions align, but the
vocabulary map spells every token by its own bytes: its first piece there is not the token the
student writes. The data path skips such a pair (`skipped_dummy_prefix/<signal>`), in both
directions, keeps pairs where both sides or neither carry the prefix, and the inside-token
positions right after it fail the piece check (`skipped_inside_mismatch/<signal>`).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny_tokenizers import CORPUS_A, CORPUS_B, byte_level_bpe, oracle_bytes

from logitstore.sample import Sample, SignalData, TopK
from logitstore.text_spans import SampleText
from logitstore.toolkit.token_alignment import align_positions, inside_anchors
from logitstore.toolkit.token_spans import tokenize_with_spans
from logitstore.toolkit import vocab_map as vm
from logitstore.toolkit.vocab_map import build_vocab_map, load_vocab_map, vocab_map_for
from student_train.cross_batch import REASONS, CrossCollate, dummy_prefix_pairs
from student_train.cross_inside import condition_inside

TEXTS = [
    "Blood pressure was 150/90 mmHg; the nurse noted it.",
    "swelling of both ankles after the long flight.",
    "physician prescribed antibiotics; the patient was advised to rest.",
    "Naïve questions about the résumé were filed.",
]
SEP = "<sep>"  # an added (non-special) token: a section starts after it


def _with_bos(tokenizer):
    from tokenizers import AddedToken, processors

    tokenizer.add_tokens([AddedToken(SEP, special=False)])
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos)])
    return tokenizer


def metaspace_prefixed(corpus, vocab_size: int, scheme: str = "first"):
    """SentencePiece / Mistral style, as bench/xtok_corpus.train_metaspace_fallback: "▁" for a
    space, a dummy prefix ("first": the text's start; "always": every section's), the 256
    byte-fallback tokens; a BOS and the added token SEP."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme=scheme)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  show_progress=False)
    backend.train_from_iterator(corpus, trainer=trainer)
    state = json.loads(backend.to_str())
    for byte in range(256):
        state["model"]["vocab"].setdefault(f"<0x{byte:02X}>", len(state["model"]["vocab"]))
    state["model"]["byte_fallback"] = True
    state["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
        {"type": "ByteFallback"}, {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    return _with_bos(Tokenizer.from_str(json.dumps(state)))


@pytest.fixture(scope="module")
def tok():
    corpus = CORPUS_A + CORPUS_B + TEXTS * 4
    # the large ones learn every first word whole; the small ones cut some finer
    return {"sp": metaspace_prefixed(corpus, 500), "sp_other": metaspace_prefixed(corpus, 400),
            "sp_small": metaspace_prefixed(CORPUS_B, 150),
            "sp_always": metaspace_prefixed(corpus, 500, "always"),
            "bl": _with_bos(byte_level_bpe(corpus, 700)),
            "bl_small": _with_bos(byte_level_bpe(CORPUS_B, 300))}


def make_sample(teacher, text: str, seed: int, k: int = 16) -> Sample:
    """The teacher's cut of `text` and a random top-k favouring the true next token."""
    cut = tokenize_with_spans(teacher, text)
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(cut.ids), teacher.get_vocab_size(), generator=g) * 2
    logits[torch.arange(len(cut.ids) - 1), torch.from_numpy(cut.ids[1:]).long()] += 5
    top = logits.log_softmax(-1).topk(k, -1)
    return Sample(sample_id=f"s{seed}", input_ids=cut.ids, loss_mask=np.ones(len(cut.ids), bool),
                  text_spans=SampleText(text, cut.spans, cut.special, cut.role),
                  signals={"t": SignalData(topk=TopK(top.indices.numpy(), top.values.numpy()))})


def collate_of(student, vocab_map, *, lengths: bool = True, pieces: bool = True) -> CrossCollate:
    return CrossCollate(
        student, ["t"], {"t": vocab_map.teacher_to_student_first}, 0.0,
        piece_maps={"t": (vocab_map.piece_offsets, vocab_map.piece_ids)} if pieces else None,
        byte_lengths={"t": (vocab_map.teacher_byte_lengths, vocab_map.student_byte_lengths)}
        if lengths else None)


def first_text_pair(teacher, student, text):
    """(alignment, teacher cut, student cut, index of the pair whose next tokens start at 0)."""
    t, s = tokenize_with_spans(teacher, text), tokenize_with_spans(student, text)
    a = align_positions(t.spans, t.special, s.spans, s.special)
    at = np.flatnonzero(s.spans[a.student_pos + 1, 0] == 0)
    assert at.tolist() == [0], "the text's first token is predicted from BOS on both sides"
    return a, t, s, 0


# ----------------------------------------------------------------------------- the map

def test_the_map_keeps_each_ids_own_byte_length(tok):
    vocab_map = build_vocab_map(tok["sp"], tok["bl"])
    for side, lengths in (("sp", vocab_map.teacher_byte_lengths),
                          ("bl", vocab_map.student_byte_lengths)):
        tokenizer = tok[side]
        assert lengths.dtype == np.int32 and len(lengths) == tokenizer.get_vocab_size()
        specials = {tokenizer.token_to_id(t) for t in ("<unk>", "<pad>", "<s>", "</s>")} - {None}
        for token_id in range(tokenizer.get_vocab_size()):
            expected = 0 if token_id in specials else len(oracle_bytes(tokenizer, token_id))
            if tokenizer.id_to_token(token_id) == SEP:
                expected = len(SEP)
            assert lengths[token_id] == expected, (side, token_id)
    assert vocab_map.teacher_byte_lengths[tok["sp"].token_to_id("▁the")] == 4


def test_a_cache_of_the_previous_format_is_rebuilt(tok, tmp_path):
    built = vocab_map_for(tok["sp"], tok["bl"], cache_dir=tmp_path)
    path = tmp_path / f"{built.key}.npz"
    old = {k: v for k, v in built.arrays().items() if not k.endswith("_byte_lengths")}
    old["format"] = np.array(vm.MAP_FORMAT - 1, np.int64)
    with open(path, "wb") as handle:
        np.savez(handle, **old)
    assert load_vocab_map(path) is None
    rebuilt = vocab_map_for(tok["sp"], tok["bl"], cache_dir=tmp_path)
    assert np.array_equal(rebuilt.teacher_byte_lengths, built.teacher_byte_lengths)
    assert load_vocab_map(path, built.key) is not None


# ----------------------------------------------------------------------------- the pairs

@pytest.mark.parametrize("teacher,student", [("sp", "bl"), ("bl", "sp")])
def test_only_the_first_pair_has_a_one_sided_dummy_prefix_and_the_map_misses_it_there(
        tok, teacher, student):
    vocab_map = build_vocab_map(tok[teacher], tok[student])
    wrong_elsewhere = 0
    for text in TEXTS:
        a, t, s, first = first_text_pair(tok[teacher], tok[student], text)
        dummy = dummy_prefix_pairs(a, t.ids, s.ids, vocab_map.teacher_byte_lengths,
                                   vocab_map.student_byte_lengths)
        assert np.flatnonzero(dummy).tolist() == [first]
        mapped = vocab_map.teacher_to_student_first[t.ids[a.teacher_pos + 1]]
        student_next = s.ids[a.student_pos + 1]
        # the bug: the pair covers the same bytes, the map's piece is not the student's token
        assert a.same_end[first] and mapped[first] != student_next[first]
        wrong_elsewhere += int((a.same_end & (mapped != student_next))[1:].sum())
    assert wrong_elsewhere == 0


@pytest.mark.parametrize("teacher,student", [("sp", "bl"), ("bl", "sp")])
def test_the_first_pair_is_skipped_and_counted_and_every_other_pair_keeps_its_target(
        tok, teacher, student):
    vocab_map = build_vocab_map(tok[teacher], tok[student])
    samples = [make_sample(tok[teacher], text, i) for i, text in enumerate(TEXTS)]
    batch = collate_of(tok[student], vocab_map)([[s] for s in samples], [[1.0]] * len(samples),
                                                ["t"], packing=False)
    signal, stats = batch["signals"]["t"], batch["cross_stats"]
    for b, sample in enumerate(samples):
        a, _, _, first = first_text_pair(tok[teacher], tok[student], sample.text_spans.text)
        kd = signal["kd_mask"][b].numpy()
        assert not kd[a.student_pos[first]]
        others = np.delete(a.student_pos, first)
        assert kd[others].all()
        np.testing.assert_array_equal(signal["topk_ids"][b, others].numpy(),
                                      sample.signals["t"].topk.ids[np.delete(a.teacher_pos,
                                                                             first)])
    assert stats["cross/skipped_dummy_prefix/t"] == len(samples)
    assert stats["cross/skipped_low_mapped_share/t"] == 0  # share 0: nothing else dropped
    assert stats["cross/kd_positions/t"] == stats["cross/aligned/t"] \
        - stats["cross/skipped_dummy_prefix/t"] + stats["cross/inside/t"]
    skipped = sum(stats[f"cross/skipped_{r}"] for r in REASONS)
    assert stats["cross/aligned"] + stats["cross/inside_conditioned"] + skipped \
        == stats["cross/positions"]
    # without byte lengths (ULD compares sorted probabilities, no ids) the pair is kept
    kept = collate_of(tok[student], vocab_map, lengths=False)(
        [[s] for s in samples], [[1.0]] * len(samples), ["t"], packing=False)
    assert "cross/skipped_dummy_prefix/t" not in kept["cross_stats"]
    assert kept["signals"]["t"]["kd_mask"][:, 0].all()
    assert kept["cross_stats"]["cross/kd_positions/t"] == \
        stats["cross/kd_positions/t"] + len(samples)


@pytest.mark.parametrize("teacher,student", [("sp", "sp_other"), ("bl", "bl_small")])
def test_both_sides_prefixed_or_neither_keep_every_pair(tok, teacher, student):
    vocab_map = build_vocab_map(tok[teacher], tok[student])
    samples = [make_sample(tok[teacher], text, i) for i, text in enumerate(TEXTS)]
    batch = collate_of(tok[student], vocab_map)([[s] for s in samples], [[1.0]] * len(samples),
                                                ["t"], packing=False)
    assert batch["cross_stats"]["cross/skipped_dummy_prefix/t"] == 0
    assert batch["signals"]["t"]["kd_mask"][:, 0].all()  # the first word keeps its target


@pytest.mark.parametrize("teacher,student", [("sp_always", "bl"), ("bl", "sp_always")])
def test_a_section_start_after_an_added_token_is_skipped_too(tok, teacher, student):
    text = f"The patient{SEP}Blood pressure was high."
    vocab_map = build_vocab_map(tok[teacher], tok[student])
    t, s = tokenize_with_spans(tok[teacher], text), tokenize_with_spans(tok[student], text)
    a = align_positions(t.spans, t.special, s.spans, s.special)
    dummy = dummy_prefix_pairs(a, t.ids, s.ids, vocab_map.teacher_byte_lengths,
                               vocab_map.student_byte_lengths)
    after_sep = len(text[:text.index(SEP) + len(SEP)].encode())
    starts = s.spans[a.student_pos[dummy] + 1, 0].tolist()
    assert starts == [0, after_sep]  # the text's start and the section after SEP
    batch = collate_of(tok[student], vocab_map)([[make_sample(tok[teacher], text, 0)]],
                                                [[1.0]], ["t"], packing=False)
    assert batch["cross_stats"]["cross/skipped_dummy_prefix/t"] == 2


# ----------------------------------------------------------------------------- inside after it

@pytest.mark.parametrize("teacher,student", [("sp", "bl_small"), ("bl", "sp_small")])
def test_inside_positions_after_a_dummy_prefix_pair_fail_the_piece_check(tok, teacher, student):
    """The student cuts the first word finer ("▁swe" "lling" against "swelling", "B" "l" ...
    against "▁Blood"): its positions inside the teacher's first token are anchored on the
    skipped pair, and the map's pieces of the teacher's token never start with the student's
    first piece there (one spells the space, the other does not): inside_mismatch."""
    vocab_map = build_vocab_map(tok[teacher], tok[student])
    after_dummy = 0
    for i, text in enumerate(TEXTS):
        sample = make_sample(tok[teacher], text, i)
        t, s = tokenize_with_spans(tok[teacher], text), tokenize_with_spans(tok[student], text)
        a = align_positions(t.spans, t.special, s.spans, s.special)
        dummy = dummy_prefix_pairs(a, t.ids, s.ids, vocab_map.teacher_byte_lengths,
                                   vocab_map.student_byte_lengths)
        anchors = inside_anchors(a, t.spans, t.special, s.spans, s.special)
        topk = sample.signals["t"].topk
        cond = condition_inside(anchors, t.ids, s.ids, topk.ids, topk.logprobs,
                                vocab_map.piece_offsets, vocab_map.piece_ids, 0.0)
        anchored_on_dummy = anchors.student_pos[np.isin(anchors.first_piece - 1,
                                                        a.student_pos[dummy])]
        assert not np.isin(anchored_on_dummy, cond.student_pos).any()
        assert np.isin(anchored_on_dummy, cond.skipped["inside_mismatch"]).all()
        after_dummy += len(anchored_on_dummy)
        stats = collate_of(tok[student], vocab_map).student_sample(sample).stats
        assert stats["inside/t"] == stats["inside_conditioned"] == len(cond.student_pos)
        assert stats["skipped_inside_mismatch/t"] == len(cond.skipped["inside_mismatch"])
    assert after_dummy > 0
