"""bench/xtok_real_tokenizers.py on tiny LOCAL tokenizers (no download): a tiktoken file and
a SentencePiece model written here stand in for Llama 3's and Mistral's."""

from __future__ import annotations

import base64
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import xtok_real_tokenizers as real  # noqa: E402
from xtok_real_report import render_markdown  # noqa: E402

TEXTS = ["the theme of the thesis", "The patient reports chest pain.", "Café naïve 12 mg"]
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
                                  r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
FAKE_SOURCE = f'''
class Tokenizer:
    num_reserved_special_tokens = 8
    pat_str = r"""{LLAMA3_PATTERN}"""

    def __init__(self, model_path):
        special_tokens = ["<|begin_of_text|>", "<|end_of_text|>",
                          "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
                          "<|eot_id|>"]
        reserved_tokens = [f"<|reserved_special_token_{{2 + i}}|>"
                           for i in range(self.num_reserved_special_tokens - len(special_tokens))]
'''


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiktoken file (256 bytes + 5 merges) and a 300-piece byte-fallback SentencePiece."""
    import sentencepiece

    root = tmp_path_factory.mktemp("real")
    ranks = [bytes([b]) for b in range(256)] + [b"th", b"he", b"the", b" t", b" the"]
    tiktoken_file = root / "tiny.tiktoken"
    tiktoken_file.write_text("".join(f"{base64.b64encode(t).decode()} {i}\n"
                                     for i, t in enumerate(ranks)))
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXTS * 30 + ["chest pain radiating to the left arm"] * 30),
        model_prefix=str(root / "tiny"), vocab_size=300, model_type="bpe", byte_fallback=True,
        minloglevel=2)
    return {"tiktoken": tiktoken_file, "spm": root / "tiny.model", "root": root}


@pytest.fixture(scope="module")
def tokenizers(files):
    pattern, specials = real.llama3_spec(FAKE_SOURCE)
    llama = real.convert_llama3(files["tiktoken"], pattern, specials, files["root"] / "llama")
    spm = real.convert_spm(files["spm"], files["root"] / "spm")
    return {"llama": llama, "spm": spm, "specials": specials, "pattern": pattern}


def test_llama3_spec_reads_pattern_and_numbers_reserved_tokens_on():
    pattern, specials = real.llama3_spec(FAKE_SOURCE)
    assert pattern == LLAMA3_PATTERN
    assert specials[:5] == ["<|begin_of_text|>", "<|end_of_text|>",
                            "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
                            "<|eot_id|>"]
    assert specials[5:] == [f"<|reserved_special_token_{i}|>" for i in (2, 3, 4)]
    with pytest.raises(real.RealTokenizerError, match="pat_str"):
        real.llama3_spec("class Tokenizer:\n    x = 1\n")


def test_converted_tokenizers_match_their_source_libraries(files, tokenizers):
    llama, spm = tokenizers["llama"], tokenizers["spm"]
    reference = real.tiktoken_encoder(files["tiktoken"], tokenizers["pattern"],
                                      tokenizers["specials"])
    assert llama("the theme")["input_ids"] == reference("the theme")
    assert llama("the theme")["input_ids"][0] == 261  # BOS: the first special, after 261 ranks
    assert len(llama) == 261 + 8
    figures = real.check_tokenizer("tiny-llama", llama, TEXTS, reference)
    assert figures["round_trip"] == figures["same_ids_as_source_library"] == len(TEXTS)
    assert figures["byte_exact_spans"] == len(TEXTS)
    # tiktoken reads a literal special-token string as text; the fast tokenizer as the special
    assert "same_ids" in figures["stress_failures"]["literal <|begin_of_text|> and </s> and <s>"]
    figures = real.check_tokenizer("tiny-spm", spm, TEXTS, real.spm_encoder(files["spm"]))
    assert figures["same_ids_as_source_library"] == figures["round_trip"] == len(TEXTS)
    with pytest.raises(real.RealTokenizerError, match="128000"):
        real.check_llama3_ids(llama)


def test_wheel_members_are_read_without_downloading(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    wheel = wheels / real.WHEELS["llama-models==0.3.0"]
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(real.LLAMA3_SOURCE, FAKE_SOURCE)
    assert real.fetch_wheel("llama-models==0.3.0", wheels) == wheel
    dest = real.unzip_member(wheel, real.LLAMA3_SOURCE, tmp_path / "out" / "tokenizer.py")
    assert dest.read_text() == FAKE_SOURCE


def test_pair_figures_same_tokenizer_aligns_every_clean_position(tokenizers, tmp_path):
    spm = tokenizers["spm"]
    vocab_map, maps = real.map_figures(spm, spm, tmp_path / "maps", repeats=1)
    assert maps["npz_bytes"] > 0 and len(maps["build_s"]) == 1
    figures = real.pair_figures(spm, spm, vocab_map, TEXTS)
    shares = figures["reason_shares"]
    # only a lone dummy-prefix "▁" (zero-width, not clean) is never aligned
    assert shares["next_not_clean"] > 0.0
    assert shares["aligned"] == pytest.approx(1.0 - shares["next_not_clean"])
    assert figures["proxy_all_next_tokens"]["exact"] == 1.0
    assert figures["map_first_not_student_token"] == 0


@pytest.mark.parametrize("order", [("spm", "llama"), ("llama", "spm")])
def test_pair_figures_count_the_dummy_prefix_mismatch(tokenizers, tmp_path, order):
    """A text's first word is "▁the" to the SentencePiece tokenizer (a dummy prefix) and
    "the" to the byte-level one: both cover the same bytes, but the map spells the teacher
    token's own bytes (" the" / "the"), so its first piece is not the student's token."""
    teacher, student = (tokenizers[name] for name in order)
    vocab_map, _ = real.map_figures(teacher, student, tmp_path / "maps", repeats=1)
    texts = ["the theme", "the thesis"]
    figures = real.pair_figures(teacher, student, vocab_map, texts)
    assert figures["map_first_not_student_token_at_first_pair"] == len(texts)
    assert figures["map_first_not_student_token"] == len(texts)


def test_pair_figures_shares_and_reach(tokenizers, tmp_path):
    spm, llama = tokenizers["spm"], tokenizers["llama"]
    vocab_map, _ = real.map_figures(spm, llama, tmp_path / "maps", repeats=1)
    figures = real.pair_figures(spm, llama, vocab_map, TEXTS)
    shares = figures["reason_shares"]
    assert 0.0 < shares["aligned"] < 1.0 and shares["inside_teacher_token"] > 0.0
    assert sum(shares.values()) == pytest.approx(1.0)
    assert 0.0 < figures["inside_anchored_share"] <= shares["inside_teacher_token"]
    proxy = figures["proxy_all_next_tokens"]
    assert proxy["exact"] + proxy["first_piece"] + proxy["unmapped"] == pytest.approx(1.0)
    assert proxy["first_piece"] > 0.0  # "▁pa" is two byte-level tokens
    bos = spm.bos_token_id  # mapped by role
    reached = real.reach(vocab_map, np.array([-1, vocab_map.teacher_vocab_size, bos]))
    assert reached["tokens"] == 3 and [reached[k] * 3 for k in ("exact", "first_piece",
                                                                "unmapped")] == \
        pytest.approx([1, 0, 2])


def test_collate_figures_and_markdown(tokenizers, tmp_path):
    llama, spm = tokenizers["llama"], tokenizers["spm"]
    vocab_map, maps = real.map_figures(llama, spm, tmp_path / "maps", repeats=1)
    collate = real.collate_figures(llama, spm, vocab_map, TEXTS * 3, k=4, batch=4, repeats=2)
    assert collate["samples"] == 9 and len(collate["samples_per_s"]) == 2
    assert 0.0 < collate["aligned_share"] <= 1.0
    # each text's first word: the student's "▁" dummy prefix faces llama's bare word
    assert collate["dummy_prefix_skipped_share"] > 0.0
    result = {"command": "c", "machine": "m",
              "corpus": {"heldout_records": 3, "transfer_records": 9, "heldout_bytes": 70},
              "tokenizers": {"tiny": {**real.check_tokenizer(
                  "tiny", spm, TEXTS, lambda text: spm(text)["input_ids"]),
                  "tokens_per_byte": real.tokens_per_byte(spm, TEXTS)}},
              "pairs": [{"teacher": "llama", "student": "spm", "map": maps, "collate": collate,
                         "alignment": real.pair_figures(llama, spm, vocab_map, TEXTS)}]}
    assert 0.0 < result["tokenizers"]["tiny"]["tokens_per_byte"] <= 1.0
    text = render_markdown(result)
    assert "| llama -> spm |" in text and "samples/s" in text
