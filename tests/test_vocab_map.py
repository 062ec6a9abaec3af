"""The teacher -> student vocabulary map (logitstore.toolkit.vocab_map) on tiny real tokenizers:
a byte-level BPE and a SentencePiece-style metaspace BPE with byte fallback, different sizes,
trained on different text. Token bytes in the checks come from tests/tiny_tokenizers.py's
own decoding, not from the code under test."""

from __future__ import annotations

import numpy as np
import pytest
from tiny_tokenizers import (
    CORPUS_A,
    CORPUS_B,
    byte_level_bpe,
    exact_tokenization,
    metaspace_bpe,
    oracle_bytes,
    random_text,
)

from logitstore.errors import LogitStoreError
from logitstore.toolkit import vocab_map as vm
from logitstore.toolkit.token_alignment import align_positions
from logitstore.toolkit.vocab_map import (
    VocabMap,
    VocabMapError,
    build_vocab_map,
    coverage,
    load_vocab_map,
    vocab_map_for,
)

BYTE_LEVEL_SPECIALS = ("<pad>", "<s>", "</s>", "<|im_start|>")
METASPACE_SPECIALS = ("<unk>", "<bos>", "<eos>")
BYTE_LEVEL_ROLES = {"pad": 0, "bos": 1, "eos": 2}
METASPACE_ROLES = {"bos": 1, "eos": 2}


@pytest.fixture(scope="module")
def byte_level():
    return byte_level_bpe(CORPUS_A, 520, BYTE_LEVEL_SPECIALS)


@pytest.fixture(scope="module")
def metaspace():
    return metaspace_bpe(CORPUS_B, 150, METASPACE_SPECIALS)


def specials_of(tokenizer) -> set[int]:
    return {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}


def check_pieces_spell_teacher_tokens(vocab_map: VocabMap, teacher, student):
    """Every mapped non-special teacher token: pieces spell its bytes; first = pieces[0];
    exact = one piece with the same bytes. Returns (exact, decomposed, unmapped) text counts."""
    counts = [0, 0, 0]
    specials = specials_of(teacher)
    for t in range(teacher.get_vocab_size()):
        pieces = vocab_map.pieces(t).tolist()
        if t in specials:
            continue
        if not pieces:
            assert vocab_map.teacher_to_student_first[t] == -1 and not vocab_map.exact[t]
            counts[2] += 1
            continue
        spelled = b"".join(oracle_bytes(student, p) for p in pieces)
        assert spelled == oracle_bytes(teacher, t), (teacher.id_to_token(t), pieces)
        assert vocab_map.teacher_to_student_first[t] == pieces[0]
        assert vocab_map.exact[t] == (len(pieces) == 1)
        assert not set(pieces) & specials_of(student)
        counts[0 if len(pieces) == 1 else 1] += 1
    return counts


def test_byte_level_teacher_to_metaspace_student(byte_level, metaspace):
    vocab_map = build_vocab_map(byte_level, metaspace, teacher_roles=BYTE_LEVEL_ROLES, student_roles=METASPACE_ROLES)
    exact, decomposed, unmapped = check_pieces_spell_teacher_tokens(vocab_map, byte_level, metaspace)
    assert exact > 100 and decomposed > 30 and unmapped == 0  # byte fallback spells everything
    assert vocab_map.teacher_vocab_size == byte_level.get_vocab_size()
    assert vocab_map.student_vocab_size == metaspace.get_vocab_size()
    # "Ġthe" = " the" = "▁the": the space conventions meet on the bytes.
    the = byte_level.token_to_id("Ġthe")
    assert vocab_map.exact[the]
    assert metaspace.id_to_token(int(vocab_map.teacher_to_student_first[the])) == "▁the"
    # A word the student splits: its first piece is what the loss reads.
    patient = byte_level.token_to_id("Ġpatient")
    pieces = [metaspace.id_to_token(int(p)) for p in vocab_map.pieces(patient)]
    assert pieces == ["▁pat", "ien", "t"] and not vocab_map.exact[patient]
    assert metaspace.id_to_token(int(vocab_map.teacher_to_student_first[patient])) == "▁pat"
    # A byte-level single byte inside a multi-byte character maps onto the byte-fallback token.
    e6 = byte_level.token_to_id("æ")  # byte 0xE6, first byte of 日/本/東
    assert metaspace.id_to_token(int(vocab_map.teacher_to_student_first[e6])) == "<0xE6>"


def test_partial_utf8_teacher_tokens_decompose_into_byte_fallback_pieces(byte_level, metaspace):
    vocab_map = build_vocab_map(byte_level, metaspace)
    partial = [
        t for t in range(byte_level.get_vocab_size())
        if t not in specials_of(byte_level) and len(oracle_bytes(byte_level, t)) > 1
        and not _valid_utf8(oracle_bytes(byte_level, t))
    ]
    assert partial, "the corpus must give the byte-level BPE merges that cut characters"
    for t in partial:
        pieces = [metaspace.id_to_token(int(p)) for p in vocab_map.pieces(t)]
        assert any(p.startswith("<0x") for p in pieces), (byte_level.id_to_token(t), pieces)


def _valid_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_metaspace_teacher_to_byte_level_student(byte_level, metaspace):
    vocab_map = build_vocab_map(metaspace, byte_level)
    exact, decomposed, unmapped = check_pieces_spell_teacher_tokens(vocab_map, metaspace, byte_level)
    assert exact > 100 and decomposed > 10 and unmapped == 0
    # Byte-fallback teacher tokens map onto the byte-level alphabet's single bytes.
    for b in (0x41, 0x0A, 0xE6, 0xFF):
        t = metaspace.token_to_id(f"<0x{b:02X}>")
        s = int(vocab_map.teacher_to_student_first[t])
        assert vocab_map.exact[t] and oracle_bytes(byte_level, s) == bytes([b])


@pytest.mark.parametrize("unk", [True, False], ids=["unk-token", "drops-unknown"])
def test_student_without_byte_fallback_leaves_unspellable_tokens_unmapped(byte_level, unk):
    corpus = ["plain ascii text about the patient and the nurse"] * 4
    ascii_student = metaspace_bpe(corpus, 80, byte_fallback=False, unk=unk)
    vocab_map = build_vocab_map(byte_level, ascii_student)
    exact, decomposed, unmapped = check_pieces_spell_teacher_tokens(vocab_map, byte_level, ascii_student)
    assert exact > 10 and unmapped > 50
    e_acute = byte_level.encode("é").ids  # the student never saw é: it cannot spell it
    assert (vocab_map.teacher_to_student_first[e_acute] == -1).all()
    the = byte_level.encode(" the").ids
    assert len(the) == 1 and vocab_map.exact[the[0]]


def test_special_tokens_map_by_role_only(byte_level, metaspace):
    vocab_map = build_vocab_map(byte_level, metaspace, teacher_roles=BYTE_LEVEL_ROLES, student_roles=METASPACE_ROLES)
    first, exact, by_role = vocab_map.teacher_to_student_first, vocab_map.exact, vocab_map.role_mapped
    assert (first[1], first[2]) == (1, 2) and exact[[1, 2]].all() and by_role[[1, 2]].all()
    assert first[0] == -1 and not by_role[0]  # pad: the student has no pad role
    assert first[byte_level.token_to_id("<|im_start|>")] == -1  # no role at all
    assert by_role.sum() == 2
    # Without roles (bare tokenizers carry none) every special is unmapped.
    bare = build_vocab_map(byte_level, metaspace)
    assert (bare.teacher_to_student_first[list(specials_of(byte_level))] == -1).all()
    # The student's unknown token is never a piece, and a teacher's <unk> maps nowhere.
    back = build_vocab_map(metaspace, byte_level)
    assert back.teacher_to_student_first[metaspace.token_to_id("<unk>")] == -1


def test_transformers_tokenizers_give_their_roles(tmp_path, metaspace):
    from tiny_hf import make_tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    teacher = AutoTokenizer.from_pretrained(str(make_tokenizer(tmp_path / "teacher")))
    student = PreTrainedTokenizerFast(tokenizer_object=metaspace, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")
    vocab_map = build_vocab_map(teacher, student)
    first = vocab_map.teacher_to_student_first
    assert first[teacher.bos_token_id] == student.bos_token_id
    assert first[teacher.eos_token_id] == student.eos_token_id
    assert first[teacher.pad_token_id] == -1  # the student has no pad token
    assert vocab_map.summary()["role_mapped"] == 2
    assert check_pieces_spell_teacher_tokens(vocab_map, teacher.backend_tokenizer, metaspace)[2] == 0


def test_aligned_same_end_pairs_map_to_the_students_own_token(byte_level, metaspace):
    vocab_map = build_vocab_map(byte_level, metaspace)
    rng = np.random.default_rng(1)
    checked = 0
    for _ in range(30):
        text = random_text(rng)
        t_ids, t_spans, t_special = exact_tokenization(byte_level, text, bos_id=1)
        s_ids, s_spans, s_special = exact_tokenization(metaspace, text, bos_id=1)
        result = align_positions(t_spans, t_special, s_spans, s_special)
        t_next, s_next = t_ids[result.teacher_pos + 1], s_ids[result.student_pos + 1]
        same = result.same_end
        assert vocab_map.exact[t_next[same]].all()
        assert np.array_equal(vocab_map.teacher_to_student_first[t_next[same]], s_next[same])
        checked += int(same.sum())
    assert checked > 50


def test_cache_round_trip_and_rebuild(tmp_path, byte_level, metaspace, monkeypatch):
    built = vocab_map_for(byte_level, metaspace, cache_dir=tmp_path)
    files = list(tmp_path.iterdir())
    assert [f.name for f in files] == [f"{built.key}.npz"] and len(built.key) == 64
    with np.load(files[0], allow_pickle=False) as saved:  # plain arrays, no pickle
        assert int(saved["format"]) == vm.MAP_FORMAT

    def no_build(*args):
        raise AssertionError("the cached map should have been loaded")

    monkeypatch.setattr(vm, "_build", no_build)
    loaded = vocab_map_for(byte_level, metaspace, cache_dir=tmp_path)
    for name, array in built.arrays().items():
        assert np.array_equal(loaded.arrays()[name], array), name
    monkeypatch.undo()
    # Another pair, other roles or the reverse direction: another key.
    keys = {built.key, vocab_map_for(metaspace, byte_level, cache_dir=tmp_path).key}
    keys.add(vocab_map_for(byte_level, metaspace, cache_dir=tmp_path, teacher_roles={"bos": 1}).key)
    assert len(keys) == 3 and len(list(tmp_path.iterdir())) == 3
    # A damaged cache file is rebuilt and replaced, never trusted.
    files[0].write_bytes(b"not an npz")
    assert load_vocab_map(files[0]) is None
    rebuilt = vocab_map_for(byte_level, metaspace, cache_dir=tmp_path)
    assert np.array_equal(rebuilt.piece_ids, built.piece_ids)
    assert load_vocab_map(files[0], built.key) is not None
    assert load_vocab_map(files[0], "0" * 64) is None  # another key: stale


def test_default_cache_dir_follows_logitstore_cache_then_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("LOGITSTORE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert vm.default_cache_dir() == tmp_path / "logitstore" / "vocab_maps"
    monkeypatch.setenv("LOGITSTORE_CACHE", str(tmp_path / "own"))
    assert vm.default_cache_dir() == tmp_path / "own" / "vocab_maps"


def hand_map() -> VocabMap:
    """Teacher ids 0..4: 0 exact, 1 decomposed (pieces 7, 8), 2 unmapped, 3 role, 4 exact."""
    first = np.array([5, 7, -1, 9, 6], np.int32)
    return VocabMap(
        teacher_to_student_first=first,
        exact=np.array([True, False, False, True, True]),
        role_mapped=np.array([False, False, False, True, False]),
        piece_offsets=np.array([0, 1, 3, 3, 4, 5], np.int64),
        piece_ids=np.array([5, 7, 8, 9, 6], np.int32),
        student_vocab_size=10,
        key="k",
        teacher_byte_lengths=np.array([1, 2, 1, 0, 1], np.int32),
        student_byte_lengths=np.ones(10, np.int32),
    )


def test_coverage_splits_mass_into_exact_decomposed_unmapped():
    vocab_map = hand_map()
    assert vocab_map.pieces(1).tolist() == [7, 8] and vocab_map.pieces(2).tolist() == []
    ids = np.array([[0, 1, 2, 3], [4, 1, -1, 99]])
    probs = np.array([[0.4, 0.2, 0.1, 0.1], [0.5, 0.25, 0.0, 0.05]])
    result = coverage(vocab_map, ids, probs)
    assert result.total_mass == pytest.approx(1.6)
    assert result.exact == pytest.approx((0.4 + 0.1 + 0.5) / 1.6)
    assert result.decomposed == pytest.approx(0.45 / 1.6)
    assert result.unmapped == pytest.approx(0.15 / 1.6)
    assert result.mapped == pytest.approx(1.45 / 1.6)
    assert coverage(vocab_map, np.array([0]), np.array([0.0])).total_mass == 0.0
    assert vocab_map.summary() == {"teacher_vocab": 5, "exact": 3, "role_mapped": 1, "decomposed": 1, "unmapped": 1}


@pytest.mark.parametrize(
    "ids, probs, found",
    [
        (np.array([0, 1]), np.array([0.5]), "of one shape"),
        (np.array([0.0, 1.0]), np.array([0.5, 0.5]), "integer top-k ids"),
        (np.array([0, 1]), np.array([-0.5, -1.0]), "not the log-probs"),
        (np.array([0, 1]), np.array([np.nan, 0.1]), "finite"),
    ],
)
def test_coverage_refuses_bad_top_k(ids, probs, found):
    with pytest.raises(VocabMapError, match=found) as raised:
        coverage(hand_map(), ids, probs)
    assert isinstance(raised.value, LogitStoreError) and "\n" not in str(raised.value)


def test_a_slow_or_foreign_tokenizer_is_refused(byte_level):
    with pytest.raises(LogitStoreError, match="fast tokenizer"):
        build_vocab_map(object(), byte_level)
