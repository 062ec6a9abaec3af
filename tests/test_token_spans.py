"""Exact byte spans of tokens (logitstore.toolkit.token_spans) on tiny tokenizers trained
here: byte-level BPE (GPT-2, Llama 3), SentencePiece-style BPE with byte fallback and "▁"
(Gemma, Llama 2), WordPiece with a lowercasing normaliser (BERT); each with BOS/EOS and its
own chat template."""

from __future__ import annotations

import json
import unicodedata

import numpy as np
import pytest
from tokenizers import Regex, Tokenizer, decoders, models, normalizers
from tokenizers import pre_tokenizers, processors, trainers

from logitstore.errors import LogitStoreError, OffsetsUnavailableError, TokenSpansError
from logitstore.toolkit.token_spans import ROLE_ASSISTANT, ROLE_NONE, ROLE_SYSTEM, ROLE_USER
from logitstore.toolkit.token_spans import Tokenization, chat_with_spans, span_problem
from logitstore.toolkit.token_spans import spans_exact, tokenize_with_spans

NON_ASCII = "naïve café 東京 😀"
WORDS = (
    "the patient reports chest pain and a dry cough with mild fever after meals "
    "blood pressure was normal the nurse advised rest naïve café 東京 😀 Grüße señor "
)
CORPUS = [WORDS * 3, NON_ASCII + " " + NON_ASCII] * 40  # a few hundred words
TEXTS = [
    "The patient reports chest pain.",
    NON_ASCII,
    "  leading spaces, a\ttab and\nnewlines  😀😀 東京!",
    "café😀x 東",  # emoji glued to words: byte-level merges split it differently
    "",
]
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_TEMPLATE = (
    "{{ '<|begin_of_text|>' }}{% for m in messages %}"
    "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>"
    "{% endfor %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
)
BERT_TEMPLATE = (
    "{% for m in messages %}[CLS] {{ m['role'] }}: {{ m['content'] }} [SEP] {% endfor %}"
)
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Is 東京 naïve? 😀"},
    {"role": "assistant", "content": "Yes, café."},
]


def _fast(backend: Tokenizer, template: str, **specials):
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **specials)
    tokenizer.chat_template = template
    return tokenizer


def _bos_eos(backend: Tokenizer, bos: str, eos: str, before=()):
    template = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        special_tokens=[(bos, backend.token_to_id(bos)), (eos, backend.token_to_id(eos))],
    )
    backend.post_processor = processors.Sequence([*before, template])


def byte_level_bpe(gpt2_style: bool = False):
    """Llama 3 style (regex split, no prefix space) or GPT-2 style (prefix space, trimmed
    offsets): a 300-token vocabulary, so emoji and CJK bytes merge only partly."""
    backend = Tokenizer(models.BPE())
    if gpt2_style:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    backend.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eot_id|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(CORPUS, trainer=trainer)
    _bos_eos(backend, "<|begin_of_text|>", "<|end_of_text|>",
             [processors.ByteLevel(trim_offsets=gpt2_style)])
    return _fast(backend, LLAMA3_TEMPLATE, bos_token="<|begin_of_text|>",
                 eos_token="<|end_of_text|>")


def sentencepiece_bpe(llama2: bool = False):
    """SentencePiece style, BPE over characters with <0x00>..<0xFF> byte-fallback tokens for
    what the vocabulary lacks (東京, 😀) and a dummy "▁" prefix: Gemma-like with a Metaspace
    pre-tokenizer, or Llama 2-like (`llama2`) where the normaliser writes the "▁"s."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    replace = {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}
    if llama2:
        backend.normalizer = normalizers.Sequence(
            [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        strip = {"type": "Strip", "content": " ", "start": 1, "stop": 0}
        decoder = [replace, {"type": "ByteFallback"}, {"type": "Fuse"}, strip]
    else:
        backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        decoder = [replace, {"type": "ByteFallback"}, {"type": "Fuse"}]
    specials = ["<unk>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"]
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=specials, show_progress=False)
    latin_only = WORDS.replace("東京", "").replace("😀", "")  # left to byte fallback
    backend.train_from_iterator([latin_only * 3] * 40, trainer=trainer)
    state = json.loads(backend.to_str())
    vocab = state["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    state["model"]["byte_fallback"] = True
    state["decoder"] = {"type": "Sequence", "decoders": decoder}
    backend = Tokenizer.from_str(json.dumps(state))
    _bos_eos(backend, "<bos>", "<eos>")
    return _fast(backend, GEMMA_TEMPLATE, bos_token="<bos>", eos_token="<eos>",
                 unk_token="<unk>")


def wordpiece_lowercase(lowercase: bool = True):
    """BERT style: lowercasing, accent-stripping normaliser (or none, `lowercase=False`);
    the pre-tokenizer drops whitespace."""
    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    if lowercase:
        backend.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=300, special_tokens=["[UNK]", "[CLS]", "[SEP]"], show_progress=False
    )
    backend.train_from_iterator(CORPUS, trainer=trainer)
    _bos_eos(backend, "[CLS]", "[SEP]")
    return _fast(backend, BERT_TEMPLATE, cls_token="[CLS]", sep_token="[SEP]",
                 unk_token="[UNK]")


@pytest.fixture(scope="module")
def family():
    return {
        "llama3": byte_level_bpe(),
        "gpt2": byte_level_bpe(gpt2_style=True),
        "sentencepiece": sentencepiece_bpe(),
        "llama2": sentencepiece_bpe(llama2=True),
        "wordpiece": wordpiece_lowercase(),
    }


def assert_well_formed(tok: Tokenization, text: str):
    """Spans inside the text, increasing, non-overlapping; special tokens zero-width; and
    the non-special spans' bytes concatenated give the text back, or it is flagged."""
    data = text.encode("utf-8")
    starts, ends = tok.spans[:, 0], tok.spans[:, 1]
    assert tok.ids.dtype == np.int64 and tok.spans.dtype == np.int32
    assert tok.special.dtype == bool and tok.role.dtype == np.int8
    assert (starts >= 0).all() and (ends >= starts).all() and (ends <= len(data)).all()
    assert (starts[1:] >= ends[:-1]).all()  # increasing, never overlapping
    assert (starts[tok.special] == ends[tok.special]).all()
    rebuilt = b"".join(data[s:e] for s, e in tok.spans[~tok.special].tolist())
    if tok.byte_exact:
        assert rebuilt == data and tok.inexact_reason == ""
    else:
        assert tok.inexact_reason
    assert spans_exact(tok, text) == tok.byte_exact


@pytest.mark.parametrize("name", ["llama3", "gpt2", "sentencepiece", "llama2"])
@pytest.mark.parametrize("text", TEXTS)
def test_exact_families_reproduce_the_text(family, name, text):
    tokenizer = family[name]
    tok = tokenize_with_spans(tokenizer, text)
    assert tok.ids.tolist() == tokenizer(text)["input_ids"]
    assert_well_formed(tok, text)
    assert tok.byte_exact, tok.inexact_reason
    assert spans_exact(tok, text, tokenizer)
    assert tok.special.tolist() == [True] + [False] * (len(tok) - 2) + [True]
    assert tok.spans[[0, -1]].tolist() == [[0, 0], [len(text.encode())] * 2]
    assert (tok.role == ROLE_NONE).all()


def test_byte_level_token_holding_part_of_a_character(family):
    """Byte-level BPE splits 😀 (4 bytes) and 東 (3 bytes) across tokens: character offsets
    give every piece the whole character; the spans give each piece exactly its bytes, as
    the tokenizer's own decoder counts them (decoding the tokens up to i gives the text's
    bytes up to token i's end, an incomplete last character as one U+FFFD)."""
    tokenizer = family["llama3"]
    text = TEXTS[3]
    tok = tokenize_with_spans(tokenizer, text)
    data = text.encode("utf-8")
    char_offsets = tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
    tokens = tokenizer.convert_ids_to_tokens(tok.ids.tolist())
    decoder = tokenizer.backend_tokenizer.decoder
    partial = 0
    for i in np.flatnonzero(~tok.special):
        start, end = tok.spans[i].tolist()
        assert decoder.decode(tokens[1 : i + 1]) == data[:end].decode("utf-8", "replace")
        try:
            data[start:end].decode("utf-8")
        except UnicodeDecodeError:
            partial += 1
            whole = text[char_offsets[i][0] : char_offsets[i][1]].encode("utf-8")
            assert len(whole) > end - start  # the offsets cover the whole character
    assert partial >= 2, "the test text must split a character across tokens"
    assert spans_exact(tok, text, tokenizer)


def test_gpt2_prefix_space_and_trimmed_offsets(family):
    """GPT-2 style adds a prefix space the text lacks (zero-width) and trims the offsets of
    "Ġword" to the word; the spans still cover the space bytes that are in the text."""
    tokenizer = family["gpt2"]
    tok = tokenize_with_spans(tokenizer, "the nurse")
    tokens = tokenizer.convert_ids_to_tokens(tok.ids.tolist())
    assert tokens[1] == "Ġthe" and tok.spans[1].tolist() == [0, 3]  # dummy space: no byte
    offsets = tokenizer("the nurse", return_offsets_mapping=True)["offset_mapping"]
    assert tokens[2].startswith("Ġn") and offsets[2][0] == 4  # trimmed: starts at "n"
    assert tok.spans[2].tolist() == [3, 3 + len(tokens[2])]  # covers the space byte
    assert tok.byte_exact


def test_sentencepiece_metaspace_and_byte_fallback(family):
    tokenizer = family["sentencepiece"]
    text = "the 東京 😀"
    tok = tokenize_with_spans(tokenizer, text, add_special_tokens=False)
    tokens = tokenizer.convert_ids_to_tokens(tok.ids.tolist())
    spans = list(zip(tokens, tok.spans.tolist()))
    assert spans[0] == ("▁the", [0, 3])  # dummy prefix: no space byte in the text
    fallback = [(t, s) for t, s in spans if t.startswith("<0x")]
    assert len(fallback) == 3 + 3 + 4  # 東, 京, 😀 byte by byte
    assert all(end - start == 1 for _, (start, end) in fallback)
    assert fallback[0] == ("<0xE6>", [4, 5])
    # " 東" starts with a real space: the "▁" token before the bytes covers it
    space = tokens.index("<0xE6>") - 1
    assert tokens[space] == "▁" and tok.spans[space].tolist() == [3, 4]
    assert tok.byte_exact and spans_exact(tok, text, tokenizer)


def test_wordpiece_lowercasing_is_flagged_but_maps_to_original_bytes(family):
    tokenizer = family["wordpiece"]
    text = "Naïve CAFÉ reports  Grüße"
    tok = tokenize_with_spans(tokenizer, text)
    assert_well_formed(tok, text)
    assert not tok.byte_exact and not spans_exact(tok, text)
    assert "normaliser" in tok.inexact_reason
    data = text.encode("utf-8")
    tokens = tokenizer.convert_ids_to_tokens(tok.ids.tolist())
    for i in np.flatnonzero(~tok.special):
        start, end = tok.spans[i].tolist()
        original = data[start:end].decode("utf-8")
        decomposed = unicodedata.normalize("NFD", original.lower())
        folded = "".join(c for c in decomposed if not unicodedata.combining(c))
        assert folded == tokens[i].removeprefix("##"), (tokens[i], original)


def test_dropped_whitespace_is_flagged_with_exact_token_spans():
    """A cased WordPiece changes no byte but drops the spaces: every token still sits at
    exactly its bytes, and the gaps make the tokenization not byte-exact."""
    tokenizer = wordpiece_lowercase(lowercase=False)
    text = "chest pain  reports"
    tok = tokenize_with_spans(tokenizer, text)
    assert_well_formed(tok, text)
    assert not tok.byte_exact and "[5, 6) of the text are covered by no token" in tok.inexact_reason
    data = text.encode("utf-8")
    tokens = tokenizer.convert_ids_to_tokens(tok.ids.tolist())
    for i in np.flatnonzero(~tok.special):
        assert data[slice(*tok.spans[i].tolist())] == tokens[i].removeprefix("##").encode()


def test_normaliser_rewriting_bytes_is_flagged():
    """An NFKC normaliser turns "ﬁ" (3 bytes) into "fi": the token's span still covers the
    original ligature bytes, and the tokenization says it is not byte-exact."""
    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFKC()
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=280, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    text = "ﬁne café"
    tok = tokenize_with_spans(backend, text)  # a bare tokenizers.Tokenizer works too
    assert_well_formed(tok, text)
    assert not tok.byte_exact
    assert tok.spans[0, 0] == 0 and tok.spans[~tok.special][-1, 1] == len(text.encode())


def test_literal_special_token_in_text_covers_its_bytes(family):
    tokenizer = family["llama3"]
    tok = tokenize_with_spans(tokenizer, "pain<|eot_id|>rest")
    i = tok.ids.tolist().index(tokenizer.convert_tokens_to_ids("<|eot_id|>"))
    assert not tok.special[i] and tok.spans[i].tolist() == [4, 14]
    assert tok.byte_exact


# ----------------------------------------------------------------------------- chat


@pytest.mark.parametrize("name", ["llama3", "gpt2", "sentencepiece", "llama2", "wordpiece"])
def test_chat_template_tokens_are_special_with_their_turn(family, name):
    tokenizer = family[name]
    tok = chat_with_spans(tokenizer, CONVERSATION)
    text = "".join(m["content"] for m in CONVERSATION)
    assert tok.text == text
    assert tok.ids.tolist() == tokenizer.apply_chat_template(CONVERSATION, tokenize=True,
                                                             return_dict=False)
    assert_well_formed(tok, text)
    assert tok.byte_exact == (name != "wordpiece"), tok.inexact_reason
    # every content token sits inside its own message and carries its role
    bounds = np.cumsum([0] + [len(m["content"].encode()) for m in CONVERSATION])
    roles = [ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT]
    for i in np.flatnonzero(~tok.special):
        k = int(np.searchsorted(bounds, tok.spans[i, 0], side="right")) - 1
        assert tok.spans[i, 1] <= bounds[k + 1] and tok.role[i] == roles[k]
    # the template's own tokens: zero-width at a message boundary, with their turn's role
    tokens = tokenizer.convert_ids_to_tokens(tok.ids.tolist())
    assert np.isin(tok.spans[tok.special, 0], bounds).all()
    assert {int(r) for r in tok.role[tok.special]} == set(roles)
    last_special = np.flatnonzero(tok.special)[-1]
    assert tok.role[last_special] == ROLE_ASSISTANT  # the end-of-turn marker of the answer
    assert tok.spans[last_special, 0] == len(text.encode())
    if name == "llama3":
        header = tokens.index("<|start_header_id|>", tokens.index("<|eot_id|>"))
        assert tok.role[header] == ROLE_USER and tok.spans[header, 0] == bounds[1]
        assert tok.role[tokens.index("<|eot_id|>")] == ROLE_SYSTEM


def test_chat_template_that_trims_whitespace_is_flagged(family):
    messages = [{"role": "user", "content": "  chest pain \n"},
                {"role": "assistant", "content": "rest"}]
    tok = chat_with_spans(family["llama3"], messages)
    assert_well_formed(tok, tok.text)
    assert not tok.byte_exact and "trimmed" in tok.inexact_reason
    content = tok.spans[~tok.special]
    assert content[0, 0] == 2 and tok.text.encode()[content[0, 0]:content[0, 0] + 5] == b"chest"


def test_chat_token_straddling_template_and_content_is_flagged():
    """"role: " + content: byte-level BPE merges the template's space with the content's
    first word ("Ġthe"); that token is clipped to the content and flagged."""
    tokenizer = byte_level_bpe()
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    )
    tok = chat_with_spans(tokenizer, [{"role": "user", "content": "the patient"}])
    assert_well_formed(tok, "the patient")
    first = np.flatnonzero(~tok.special)[0]
    assert tokenizer.convert_ids_to_tokens(int(tok.ids[first])) == "Ġthe"
    assert tok.spans[first].tolist() == [0, 3]
    assert not tok.byte_exact and "straddles" in tok.inexact_reason


def test_chat_turns_when_partial_renderings_are_no_prefix():
    """A template that marks the last turn renders a partial conversation differently: the
    fallback gives each header to the message after it, the last turn what follows it."""
    tokenizer = byte_level_bpe()
    tokenizer.chat_template = (
        "{% for m in messages %}{% if loop.last %}<|end_of_text|>{% endif %}"
        "<|start_header_id|>{{ m['role'] }}<|end_header_id|>{{ m['content'] }}<|eot_id|>"
        "{% endfor %}"
    )
    tok = chat_with_spans(tokenizer, CONVERSATION)
    assert tok.byte_exact
    tokens = tokenizer.convert_ids_to_tokens(tok.ids.tolist())
    headers = [i for i, t in enumerate(tokens) if t == "<|start_header_id|>"]
    assert tok.role[headers].tolist() == [ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT]
    assert tok.role[tokens.index("<|end_of_text|>")] == ROLE_ASSISTANT
    assert tok.role[tokens.index("<|eot_id|>")] == ROLE_USER  # the fallback's known cost
    assert tok.role[len(tokens) - 1] == ROLE_ASSISTANT


SAME_ROLE_TWICE = [  # a system prompt in two parts, a question in two turns, a two-part answer
    {"role": "system", "content": "Be brief."},
    {"role": "system", "content": "Cite sources."},
    {"role": "user", "content": "Is 東京 naïve?"},
    {"role": "user", "content": "😀 And café?"},
    {"role": "assistant", "content": "Yes."},
    {"role": "assistant", "content": "Both."},
]


@pytest.mark.parametrize("name", ["llama3", "gpt2", "sentencepiece", "llama2"])
def test_stored_roles_and_markup_give_back_each_turn(family, name):
    """Turns of one role in a row are rebuilt as they were (the markup between them splits
    them), also from a window that starts inside a turn; no empty turn after the last."""
    from logitstore.text_spans import SampleText, stored_messages
    from logitstore.toolkit.sample_text import cut_text

    tok = chat_with_spans(family[name], SAME_ROLE_TWICE)
    assert tok.byte_exact, tok.inexact_reason
    stored = SampleText(tok.text, tok.spans, tok.special, tok.role.astype(np.uint8))
    assert stored_messages(stored, "s") == SAME_ROLE_TWICE
    first_text = np.flatnonzero(~tok.special & (tok.role == ROLE_USER))[1]  # inside turn 3
    window = cut_text(stored, int(first_text), len(tok.ids))
    rebuilt = stored_messages(window, "s")
    assert [m["role"] for m in rebuilt] == ["user", "user", "assistant", "assistant"]
    assert [m["content"] for m in rebuilt[1:]] == [m["content"] for m in SAME_ROLE_TWICE[3:]]
    assert SAME_ROLE_TWICE[2]["content"].endswith(rebuilt[0]["content"])


def test_an_empty_turn_between_two_of_its_role_is_the_one_turn_not_rebuilt(family):
    from logitstore.text_spans import SampleText, stored_messages

    messages = [{"role": "user", "content": "Hi."}, {"role": "user", "content": ""},
                {"role": "user", "content": "Pain?"}, {"role": "assistant", "content": "Rest."}]
    tok = chat_with_spans(family["llama3"], messages)
    stored = SampleText(tok.text, tok.spans, tok.special, tok.role.astype(np.uint8))
    assert stored_messages(stored, "s") == [messages[0], *messages[2:]]


def test_chat_bos_from_post_processor_has_no_role(family):  # plus the template's own <bos>
    tok = chat_with_spans(family["sentencepiece"], CONVERSATION, add_special_tokens=True)
    assert tok.special[0] and tok.role[0] == ROLE_NONE and tok.spans[0].tolist() == [0, 0]
    assert tok.special[-1] and tok.role[-1] == ROLE_NONE
    assert tok.byte_exact


# ----------------------------------------------------------------------------- refusals


class SlowTokenizer:  # what a slow (Python) tokenizer shows: no offsets
    is_fast = False


def test_slow_tokenizer_is_refused_with_a_fix():
    with pytest.raises(OffsetsUnavailableError, match="use_fast=True") as error:
        tokenize_with_spans(SlowTokenizer(), "text")
    assert isinstance(error.value, LogitStoreError)  # exit code 1 in the tools
    with pytest.raises(OffsetsUnavailableError):
        chat_with_spans(SlowTokenizer(), [{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("messages", [[], "hi", [{"role": "user"}],
                                      [{"role": "user", "content": [{"type": "text"}]}]])
def test_bad_messages_are_refused(family, messages):
    with pytest.raises(TokenSpansError, match="message"):
        chat_with_spans(family["llama3"], messages)


@pytest.mark.parametrize("template,match", [
    ("{% for m in messages %}{{ m['content'] | upper }}{% endfor %}", "verbatim"),
    ("{% for m in messages %}{{ m['content'] }}{{ m['content'] }}{% endfor %}", "exactly once"),
    ("{% for m in messages %}{{ m['role'] }}{% endfor %}", "exactly once"),
    (None, "give the tokenizer a chat template"),
])
def test_template_rewriting_contents_or_missing_is_refused(template, match):
    tokenizer = byte_level_bpe()
    tokenizer.chat_template = template
    with pytest.raises(TokenSpansError, match=match):
        chat_with_spans(tokenizer, [{"role": "user", "content": "Is it naïve?"}])


def test_bytes_for_text_and_wrong_dtypes_are_refused(family):
    with pytest.raises(TokenSpansError, match="str"):
        tokenize_with_spans(family["llama3"], b"bytes")
    tok = tokenize_with_spans(family["llama3"], "chest pain")
    with pytest.raises(TokenSpansError, match="spans must be a int32"):
        Tokenization(tok.text, tok.ids, tok.spans.astype(np.int64), tok.special, tok.role, True)


def _altered(tok: Tokenization, **arrays) -> Tokenization:
    return Tokenization(**{**tok.__dict__, "inexact_reason": "", **arrays})


def test_spans_exact_catches_damage(family):
    tokenizer = family["llama3"]
    text = "chest pain 😀"
    tok = tokenize_with_spans(tokenizer, text)
    assert spans_exact(tok, text, tokenizer)
    shifted = tok.spans.copy()
    shifted[2] += 1
    assert "overlaps" in span_problem(_altered(tok, spans=shifted), text)
    gap = tok.spans.copy()
    gap[1, 1] -= 1
    assert "covered by no token" in span_problem(_altered(tok, spans=gap), text)
    wide = tok.spans.copy()
    wide[0, 1] = 1
    assert "zero-width" in span_problem(_altered(tok, spans=wide), text)
    swapped = tok.ids.copy()
    swapped[[1, 2]] = swapped[[2, 1]]
    assert spans_exact(_altered(tok, ids=swapped), text)  # structure alone cannot tell
    assert not spans_exact(_altered(tok, ids=swapped), text, tokenizer)
    assert not spans_exact(tok, text + " ")
    assert not spans_exact(_altered(tok, byte_exact=False), text)


FOLDING_TEMPLATE = (  # Llama 2 / Gemma 3 style: the system prompt inside the first user turn
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set rest = messages[1:] %}{% else %}{% set system = '' %}{% set rest = messages %}"
    "{% endif %}{% for m in rest %}<start_of_turn>"
    "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{% if loop.first and system %}{{ system }}\n\n{% endif %}{{ m['content'] }}"
    "<end_of_turn>\n{% endfor %}"
)


def test_a_system_prompt_inside_the_first_user_turn_is_rebuilt_as_the_system_turn(family):
    """The user header sits before the system text there, with the user's role: that turn
    of markup alone holds no content and is dropped, so the same turns come back."""
    from logitstore.text_spans import SampleText, stored_messages

    tokenizer = family["sentencepiece"]
    tokenizer.chat_template, before = FOLDING_TEMPLATE, tokenizer.chat_template
    try:
        tok = chat_with_spans(tokenizer, CONVERSATION)
    finally:
        tokenizer.chat_template = before
    assert tok.byte_exact, tok.inexact_reason
    first = tokenizer.convert_ids_to_tokens(tok.ids.tolist()).index("<start_of_turn>")
    assert tok.role[first] == ROLE_USER and tok.spans[first, 0] == 0  # before the system text
    stored = SampleText(tok.text, tok.spans, tok.special, tok.role.astype(np.uint8))
    assert stored_messages(stored, "s") == CONVERSATION
