"""teacher-dump keeps each sample's text, its tokens' byte spans and the tokenizer's files
(format 2.1, issue 15): the reader's text for every data format, windows and truncation,
the ids it never changes, --no-text, resuming stores with and without text, two ranks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("torch")

from logitstore.cli import main as logitstore_cli  # noqa: E402
from logitstore.errors import TokenSpansError  # noqa: E402
from logitstore.reader import StoreReader  # noqa: E402
from logitstore.text_spans import sample_text_problem  # noqa: E402
from logitstore.toolkit.data import DataOptions, read_samples  # noqa: E402
from logitstore.verify import verify_store  # noqa: E402
from teacher_dump.batch_loops import DumpWork  # noqa: E402
from teacher_dump.cli import teacher_dump  # noqa: E402
from teacher_dump.config import resolve_config  # noqa: E402
from teacher_dump.dump import run_dump  # noqa: E402
from teacher_dump.ranks import RankContext  # noqa: E402
from tiny_hf import corpus, make_tiny_llama, make_tokenizer  # noqa: E402
from tiny_tokenizers import CORPUS_A, metaspace_bpe, oracle_bytes  # noqa: E402

FAST = ["--top-k", "4", "--samples", "8", "--device", "cpu", "--no-progress"]
ACCENTED = "Le café du résumé: naïve fièvre, 東京 😀. "
CONTENTS = ["You are brief.", "What happened?", corpus()[31]]  # the chat record's messages
# The prompt ends with a space and the answer (SEAM_CHAT) starts "a rash": tokenized whole,
# " a" is one token, apart it is " " and "a".
SEAM_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")
SEAM_CHAT = {"messages": [{"role": "user", "content": "What happened?"},
                          {"role": "assistant", "content": "a rash on the forearms."}]}


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _write_data(folder: Path) -> Path:
    folder.mkdir()
    _write_jsonl(folder / "a_text.jsonl", [{"text": ACCENTED + s} for s in corpus()[:4]])
    _write_jsonl(folder / "b_pc.jsonl", [{"prompt": "Question: what does the patient report?",
                                          "completion": f" {s}"} for s in corpus()[10:12]])
    _write_jsonl(folder / "c_chat.jsonl", [{"messages": [
        {"role": "system", "content": CONTENTS[0]}, {"role": "user", "content": CONTENTS[1]},
        {"role": "assistant", "content": CONTENTS[2]}]}])
    _write_jsonl(folder / "d_mcq.jsonl", [{"question": "Most likely diagnosis?",
                                           "options": ["anemia", "fever"], "answer": 1}])
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("dump_text")
    tok = make_tokenizer(root / "tok")
    return {"root": root, "tok": tok, "llama": make_tiny_llama(root / "llama", tok),
            "llama2": make_tiny_llama(root / "llama2", tok, seed=1),  # same tokenizer
            "data": _write_data(root / "data")}


def _hf(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _metaspace_tokenizer():
    """SentencePiece-style (metaspace, byte fallback), BOS added, no chat template."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    backend = metaspace_bpe(CORPUS_A + corpus()[:40], 320)
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", backend.token_to_id("<bos>"))])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>",
                                   eos_token="<eos>", unk_token="<unk>")


def _assert_spans_spell_the_text(sample, backend) -> None:
    """Sound spans; each non-special token's own bytes (read independently of the code
    under test) are the text's bytes at its span."""
    text = sample.text_spans
    assert sample_text_problem(text.text, text.spans, text.special, text.roles,
                               len(sample.input_ids)) is None
    data = text.text.encode("utf-8")
    for token_id, (start, end), special in zip(sample.input_ids, text.spans, text.special):
        if special:
            assert start == end
        else:
            assert oracle_bytes(backend, int(token_id)) == data[start:end], sample.sample_id


# ----------------------------------------------------------------------------- the reader


@pytest.mark.parametrize("tokenizer_kind", ["byte-level+template", "byte-level", "metaspace"])
@pytest.mark.parametrize("options", [{}, {"wrap_in_chat": True},
                                     {"max_length": 7, "overflow": "window"},
                                     {"max_length": 9}], ids=["whole", "wrap", "window", "cut"])
def test_reader_text_leaves_ids_unchanged_and_spans_spell_the_text(tiny, tokenizer_kind,
                                                                   options):
    if tokenizer_kind == "metaspace":
        tokenizer = _metaspace_tokenizer()
    else:
        tokenizer = _hf(tiny["tok"])
        if tokenizer_kind == "byte-level":
            tokenizer.chat_template = None  # chats get the default rendering
    sources = sorted(str(p) for p in tiny["data"].iterdir())
    with_text, _ = read_samples(sources, tokenizer, DataOptions(with_text=True, **options))
    plain, _ = read_samples(sources, tokenizer, DataOptions(**options))
    assert [s.sample_id for s in with_text] == [s.sample_id for s in plain]
    for sample, other in zip(with_text, plain):
        assert other.text_spans is None
        assert np.array_equal(sample.input_ids, other.input_ids)
        assert np.array_equal(sample.loss_mask, other.loss_mask)
        _assert_spans_spell_the_text(sample, tokenizer.backend_tokenizer)
    whole = [s for s in with_text if "#w" not in s.sample_id and not options.get("max_length")]
    for sample in whole:  # every byte of the text is some token's
        text = sample.text_spans
        data = text.text.encode("utf-8")
        spelled = b"".join(data[a:b] for (a, b), special in zip(text.spans, text.special)
                           if not special)
        assert spelled == data
    chats = [s for s in whole if s.source == "c_chat.jsonl"]
    if tokenizer_kind == "byte-level+template" and chats:
        assert chats[0].text_spans.text == "".join(CONTENTS)  # the contents, no template text
        assert set(chats[0].text_spans.roles[chats[0].text_spans.special].tolist()) >= {1, 2, 3}
    elif chats:  # the default rendering: its markup is text
        assert chats[0].text_spans.text.startswith("<|system|>\nYou are brief.")
    assert bool(chats) is not bool(options.get("max_length"))


def test_a_window_cut_inside_a_character_keeps_whole_characters(tiny):
    tokenizer = _hf(tiny["tok"])  # trained on ASCII: "é" is two byte tokens
    source = _write_jsonl(tiny["root"] / "accents.jsonl", [{"text": "éééé"}])
    windows, _ = read_samples(str(source), tokenizer,
                              DataOptions(with_text=True, max_length=3, overflow="window"))
    # [BOS c3 a9] [c3 a9 c3] [a9 c3 a9] [EOS]: the EOS alone holds no text.
    assert [w.text_spans.text for w in windows] == ["é", "éé", "éé", ""]
    assert windows[3].text_spans.special.tolist() == [True]
    # Window 2 starts on the second byte of a character: that byte is its first token's.
    assert windows[2].text_spans.spans.tolist() == [[1, 2], [2, 3], [3, 4]]
    assert DataOptions().with_text is False  # student-train's --data reads no text


def test_a_chat_seam_that_tokenizes_differently_is_refused(tiny):
    tokenizer = _hf(tiny["tok"])
    tokenizer.chat_template = SEAM_TEMPLATE
    source = str(_write_jsonl(tiny["root"] / "seam.jsonl", [SEAM_CHAT]))
    with pytest.raises(TokenSpansError) as refused:
        read_samples(source, tokenizer, DataOptions(with_text=True))
    message = str(refused.value)
    assert "seam.jsonl:1" in message and "--no-text" in message and "\n" not in message
    assert read_samples(source, tokenizer, DataOptions())[0]  # without text: as before


# ----------------------------------------------------------------------------- the dump


def _cli(*args, expect: int = 0):
    result = CliRunner().invoke(teacher_dump, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == expect, result.output
    return result


@pytest.fixture(scope="module")
def stores(tiny):
    """A dump with text (the default) and the same dump with --no-text."""
    base = ["--model", tiny["llama"], "--data", tiny["data"], *FAST]
    text, plain = tiny["root"] / "text", tiny["root"] / "plain"
    _cli(*base, "--out", text)
    _cli(*base, "--out", plain, "--no-text")
    return text, plain


def test_a_dump_keeps_text_spans_and_the_tokenizer_files(tiny, stores):
    text_store, _ = stores
    assert verify_store(str(text_store)) == []
    reader = StoreReader(str(text_store))
    assert reader.has_text
    stored = reader.tokenizer_files()
    assert sorted(stored) == ["chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]
    saved = {p.name: p.read_bytes() for p in Path(tiny["tok"]).iterdir()}
    assert stored["tokenizer.json"] == saved["tokenizer.json"]
    # The store is self-contained: its files load the teacher's tokenizer, template included.
    folder = tiny["root"] / "from_store"
    folder.mkdir()
    for name, data in stored.items():
        (folder / name).write_bytes(data)
    loaded, teacher = _hf(folder), _hf(tiny["tok"])
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ACCENTED}]
    assert loaded(ACCENTED)["input_ids"] == teacher(ACCENTED)["input_ids"]
    assert loaded.apply_chat_template(chat, tokenize=False) == teacher.apply_chat_template(
        chat, tokenize=False)
    backend = _hf(tiny["tok"]).backend_tokenizer
    samples = list(reader.iter_samples())
    for sample in samples:
        _assert_spans_spell_the_text(sample, backend)
    chat = next(s for s in samples if s.source == "c_chat.jsonl")
    assert chat.text_spans.text == "".join(CONTENTS)


def test_show_decodes_with_the_stored_tokenizer_and_prints_the_exact_text(stores):
    reader = StoreReader(str(stores[0]))
    sample = next(s for s in reader.iter_samples() if s.source == "a_text.jsonl")
    shown = CliRunner().invoke(logitstore_cli, ["show", str(stores[0]), sample.sample_id])
    assert shown.exit_code == 0, shown.output
    assert f"text {sample.text_spans.text!r}" in shown.output
    assert "'<s>'" in shown.output  # BOS decoded with no --tokenizer (else its id, '1')
    as_json = CliRunner().invoke(logitstore_cli, ["show", str(stores[0]), sample.sample_id,
                                                  "--json"])
    shown_json = json.loads(as_json.output)
    assert shown_json["text"] == sample.text_spans.text
    assert "".join(shown_json["tokens"]).endswith(sample.text_spans.text[-20:] + "</s>")


def test_no_text_leaves_them_out_and_stores_the_same_ids_and_signals(stores):
    text_store, plain_store = stores
    plain, text = StoreReader(str(plain_store)), StoreReader(str(text_store))
    settings = json.loads((plain_store / "manifest.json").read_text())["settings"]
    assert "text" not in settings and "tokenizer_files" not in settings  # as 2.0 wrote
    assert not (plain_store / "tokenizer").exists() and not list(plain_store.rglob("spans"))
    assert plain.manifest["dataset_fingerprint"] == text.manifest["dataset_fingerprint"]
    by_id = {s.sample_id: s for s in text.iter_samples()}
    for sample in plain.iter_samples():
        other = by_id.pop(sample.sample_id)
        assert sample.text_spans is None
        assert np.array_equal(sample.input_ids, other.input_ids)
        ours, theirs = sample.signals["llama"], other.signals["llama"]
        assert np.array_equal(ours.topk.ids, theirs.topk.ids)
        assert np.array_equal(ours.topk.logprobs, theirs.topk.logprobs)
        assert np.array_equal(ours.sampled.ids, theirs.sampled.ids)
        assert np.array_equal(ours.sampled.counts, theirs.sampled.counts)
        assert np.array_equal(ours.sampled.logprobs, theirs.sampled.logprobs)
    assert not by_id


def _interrupted(cfg, monkeypatch, batches: int) -> None:
    """`run_dump(cfg)` stopped by Ctrl-C after `batches` forward passes (the segments
    committed by then stay; the part is left incomplete, as after a kill)."""
    real, done = DumpWork.capture, []

    def capture(work, chosen):
        if len(done) == batches:
            raise KeyboardInterrupt
        done.append(1)
        return real(work, chosen)

    with monkeypatch.context() as patched:
        patched.setattr(DumpWork, "capture", capture)
        with pytest.raises(KeyboardInterrupt):
            run_dump(cfg, ranks=RankContext(), progress=False)


def test_resume_keeps_the_store_choice_of_text(tiny, tmp_path, monkeypatch):
    data = _write_jsonl(tmp_path / "d.jsonl", [{"text": ACCENTED + s} for s in corpus()[:8]])

    def config(out, **changes):
        return resolve_config(None, dict(dict(model=str(tiny["llama"]), data=[str(data)],
                                              out=str(out), top_k=4, samples=0, device="cpu",
                                              batch_tokens=64, segment_tokens=60), **changes))

    for name, has_text in (("text", True), ("old", False)):  # "old": as 2.0 wrote stores
        _interrupted(config(tmp_path / name, text=has_text), monkeypatch, batches=5)
        # Resumed without --no-text: the store decides.
        report = run_dump(config(tmp_path / name), ranks=RankContext(), progress=False)
        assert report.samples_resumed > 0 and report.samples_written > 0
        reader = StoreReader(str(tmp_path / name))
        assert reader.has_text is has_text and len(reader) == 8
        assert bool(reader.settings.tokenizer_files) is has_text
        assert all((s.text_spans is not None) is has_text for s in reader.iter_samples())
        assert verify_store(str(tmp_path / name)) == []
    # --overwrite replaces the store without text by one with this run's choice (text).
    run_dump(config(tmp_path / "old", top_k=5, overwrite=True), ranks=RankContext(),
             progress=False)
    replaced = StoreReader(str(tmp_path / "old"))
    assert replaced.has_text and "tokenizer/tokenizer.json" in replaced.settings.tokenizer_files
    assert verify_store(str(tmp_path / "old")) == []


def test_a_second_teacher_adds_its_signal_to_a_store_with_text(tiny, stores, tmp_path):
    import shutil

    store = tmp_path / "store"
    shutil.copytree(stores[0], store)
    texts = {s.sample_id: s.text_spans.text for s in StoreReader(str(store)).iter_samples()}
    added = _cli("--model", tiny["llama2"], "--signal", "second", "--data", tiny["data"],
                 "--out", store, *FAST)
    assert "teacher-dump (add-signal)" in added.stdout
    reader = StoreReader(str(store))
    assert sorted(reader.signals) == ["llama", "second"] and reader.has_text
    assert {s.sample_id: s.text_spans.text for s in reader.iter_samples()} == texts
    assert verify_store(str(store)) == []


def test_a_template_the_spans_cannot_follow_is_refused_before_anything_is_written(tiny,
                                                                                 tmp_path):
    model = tmp_path / "seam"
    tokenizer = _hf(tiny["tok"])
    tokenizer.chat_template = SEAM_TEMPLATE
    make_tiny_llama(model, tokenizer)
    data = _write_jsonl(tmp_path / "seam.jsonl", [SEAM_CHAT])
    base = ["--model", model, "--data", data, *FAST]
    refused = _cli(*base, "--out", tmp_path / "s", expect=1)
    assert "--no-text" in refused.output and not (tmp_path / "s").exists()
    _cli(*base, "--out", tmp_path / "s", "--no-text")
    assert len(StoreReader(str(tmp_path / "s"))) == 1


def test_two_ranks_write_their_texts_and_the_tokenizer_files_once(tiny, tmp_path):
    def config(out):
        return resolve_config(None, dict(model=str(tiny["llama"]), data=[str(tiny["data"])],
                                         out=str(out), top_k=4, samples=0, device="cpu",
                                         batch_tokens=96, segment_tokens=128))

    run_dump(config(tmp_path / "one"), ranks=RankContext(), progress=False)
    # Rank 1 first: it does not commit; rank 0 (main) commits both parts.
    run_dump(config(tmp_path / "two"), ranks=RankContext(rank=1, world=2), progress=False)
    run_dump(config(tmp_path / "two"), ranks=RankContext(rank=0, world=2), progress=False)
    one, two = StoreReader(str(tmp_path / "one")), StoreReader(str(tmp_path / "two"))
    assert [p["name"] for p in two.manifest["parts"]] == ["rank-00000", "rank-00001"]
    assert verify_store(str(tmp_path / "two")) == []
    assert two.tokenizer_files() == one.tokenizer_files()
    texts = {s.sample_id: s.text_spans for s in one.iter_samples()}
    for sample in two.iter_samples():
        expected = texts.pop(sample.sample_id)
        assert sample.text_spans.text == expected.text
        assert np.array_equal(sample.text_spans.spans, expected.spans)
        assert np.array_equal(sample.text_spans.special, expected.special)
    assert not texts
