"""teacher-dump of a teacher whose tokenizer is not the store's (format 2.2): its signal on its
own tokenization of the stored text (teacher_dump/foreign_tokens.py), cut samples, resume
after an interruption, and the refusals."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from logitstore.reader import StoreReader  # noqa: E402
from logitstore.verify import verify_store  # noqa: E402
from teacher_dump.config import resolve_config  # noqa: E402
from teacher_dump.dump import run_dump  # noqa: E402
from teacher_dump.ranks import RankContext  # noqa: E402
from test_dump_text import (ACCENTED, FAST, _cli, _interrupted, _metaspace_tokenizer,  # noqa: E402
                            _write_jsonl)
from tiny_hf import corpus, make_tiny_llama, make_tokenizer  # noqa: E402
from tiny_tokenizers import oracle_bytes  # noqa: E402

# A template of another family (Gemma-like turn markers) for the second teacher.
OTHER_TEMPLATE = ("{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}"
                  "<end_of_turn>\n{% endfor %}")
MAX = 24  # the second teacher's max length: cuts the longer samples


def other_tokenizer():
    tokenizer = _metaspace_tokenizer()
    tokenizer.chat_template = OTHER_TEMPLATE
    tokenizer.pad_token = "<eos>"
    return tokenizer


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("two_tok")
    tok = make_tokenizer(root / "tok")
    data = root / "data"
    data.mkdir()
    _write_jsonl(data / "a.jsonl", [{"text": ACCENTED + s} for s in corpus()[:5]]
                 + [{"text": "Short note."}])
    _write_jsonl(data / "b.jsonl", [{"messages": [
        {"role": "system", "content": "You are brief."},
        {"role": "user", "content": "What happened? "},
        {"role": "assistant", "content": corpus()[31]}]}])
    store = root / "store"
    # peaked teachers (as in test_cross_tokenizer_train): a KD loss a student can lower
    llama = make_tiny_llama(root / "llama", tok, initializer_range=0.3)
    _cli("--model", llama, "--data", data, "--out", store, "--segment-tokens", "40", *FAST)
    other = make_tiny_llama(root / "other", other_tokenizer(), seed=2, initializer_range=0.3)
    return {"root": root, "store": store, "other": other, "data": data, "llama": llama}


def config(teachers, out, **changes):
    return resolve_config(None, dict(dict(model=str(teachers["other"]), signal="other",
                                          out=str(out), top_k=4, samples=4, device="cpu",
                                          max_length=MAX, batch_tokens=64), **changes))


@pytest.fixture(scope="module")
def added(teachers):
    store = teachers["root"] / "added"
    shutil.copytree(teachers["store"], store)
    report = run_dump(config(teachers, store), ranks=RankContext(), progress=False)
    return store, report


def test_the_second_teacher_stores_its_own_tokens_of_the_exact_text(teachers, added):
    store, report = added
    reader = StoreReader(str(store))
    assert reader.signals == ["llama", "other"] and reader.tokenizations == ["other"]
    assert reader.settings.signals["other"].tokenization == "other"
    tokenizer = other_tokenizer()
    assert reader.tokenizer_files("other")["tokenizer.json"] == \
        (Path(teachers["other"]) / "tokenizer.json").read_bytes()
    chats = 0
    for sample in reader.iter_samples():
        cut, text = sample.tokenizations["other"], sample.text_spans.text
        if sample.text_spans.roles.any():  # the chat: rendered by the other template
            chats += 1
            messages = [{"role": "system", "content": "You are brief."},
                        {"role": "user", "content": "What happened? "},
                        {"role": "assistant", "content": corpus()[31]}]
            rendered = tokenizer.apply_chat_template(messages, tokenize=False)
            want = tokenizer(rendered, add_special_tokens=False)["input_ids"]
        else:
            want = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
        assert cut.input_ids.tolist() == want[:MAX], sample.sample_id
        data = text.encode("utf-8")
        for token, (start, end), special in zip(cut.input_ids, cut.spans, cut.special):
            if not special:
                assert oracle_bytes(tokenizer.backend_tokenizer, int(token)) == data[start:end]
        if len(want) > MAX:  # cut: covers up to the end of its last kept token
            assert cut.covered_bytes == int(cut.spans[:, 1].max()) < len(data)
        else:
            assert cut.covered_bytes == len(data)
        assert len(sample.signals["other"].topk.ids) == len(cut)
        # targets follow the store's own: none in the system and user turns of the chat
        assert not cut.loss_mask[np.isin(cut.roles, [1, 2])].any()
        assert cut.loss_mask.any() or sample.text_spans.roles.any()
    assert chats == 1
    assert report.samples_cut == sum(
        s.tokenizations["other"].covered_bytes < len(s.text_spans.text.encode("utf-8"))
        for s in reader.iter_samples()) > 0
    assert "cut at its max length" in str(report)
    assert verify_store(str(store)) == []


def test_its_signal_is_the_teachers_forward_on_its_own_tokens(teachers, added):
    import torch
    from transformers import AutoModelForCausalLM

    sample = StoreReader(str(added[0])).sample(1)
    cut = sample.tokenizations["other"]
    model = AutoModelForCausalLM.from_pretrained(str(teachers["other"]))
    with torch.no_grad():
        logits = model(torch.from_numpy(cut.input_ids[None])).logits[0].float()
    logprobs = torch.log_softmax(logits, -1).numpy()
    topk = sample.signals["other"].topk
    got = np.take_along_axis(logprobs, topk.ids.astype(np.int64), 1)
    np.testing.assert_allclose(topk.logprobs, got, atol=1 / 32 + 1e-3)  # q8 step 1/16


def test_an_interrupted_dump_resumes_to_the_same_signal(teachers, added, tmp_path,
                                                        monkeypatch):
    store = tmp_path / "resumed"
    shutil.copytree(teachers["store"], store)
    _interrupted(config(teachers, store), monkeypatch, batches=1)
    assert StoreReader(str(store)).signals == ["llama"] and verify_store(str(store)) == []
    report = run_dump(config(teachers, store), ranks=RankContext(), progress=False)
    assert report.samples_resumed > 0
    whole, resumed = StoreReader(str(added[0])), StoreReader(str(store))
    for a, b in zip(whole.iter_samples(), resumed.iter_samples()):
        np.testing.assert_array_equal(a.tokenizations["other"].input_ids,
                                      b.tokenizations["other"].input_ids)
        np.testing.assert_array_equal(a.signals["other"].topk.ids, b.signals["other"].topk.ids)
    again = run_dump(config(teachers, store), ranks=RankContext(), progress=False)
    assert again.samples_written == 0 and verify_store(str(store)) == []


def test_a_store_without_text_is_refused_in_one_paragraph(teachers, tmp_path):
    plain = tmp_path / "plain"
    _cli("--model", teachers["llama"], "--data", teachers["data"], "--out", plain,
         "--no-text", *FAST)
    result = _cli("--model", teachers["other"], "--signal", "other", "--out", plain, *FAST,
                  expect=1)
    message = result.output[result.output.index("teacher-dump: error"):].strip()
    assert "keeps no sample text" in message and "--no-text" in message
    assert "\n" not in message
    assert StoreReader(str(plain)).signals == ["llama"]


def test_a_signal_name_of_the_store_own_tokenizer_is_refused(teachers, added):
    result = _cli("--model", teachers["other"], "--signal", "llama", "--out", added[0],
                  *FAST, expect=1)
    assert "another --signal name" in result.output


def test_two_ranks_add_the_foreign_signal_part_by_part(teachers, added, tmp_path):
    store = tmp_path / "ranks"

    first = resolve_config(None, dict(model=str(teachers["llama"]), data=[str(teachers["data"])],
                                      out=str(store), top_k=4, samples=8, device="cpu",
                                      segment_tokens=40, batch_tokens=64))
    for rank in (1, 0):  # rank 1 first: it does not commit; the main rank commits both parts
        run_dump(first, ranks=RankContext(rank=rank, world=2), progress=False)
    for rank in (1, 0):
        report = run_dump(config(teachers, store), ranks=RankContext(rank=rank, world=2),
                          progress=False)
    assert report.samples_cut == added[1].samples_cut
    reader, whole = StoreReader(str(store)), StoreReader(str(added[0]))
    assert [p["name"] for p in reader.manifest["parts"]] == ["rank-00000", "rank-00001"]
    assert reader.signals == ["llama", "other"] and verify_store(str(store)) == []
    for sample in reader.iter_samples():
        want = whole.sample(sample.sample_id)
        np.testing.assert_array_equal(sample.tokenizations["other"].input_ids,
                                      want.tokenizations["other"].input_ids)
        np.testing.assert_array_equal(sample.signals["other"].topk.ids,
                                      want.signals["other"].topk.ids)


def test_choices_useless_for_another_tokenizer_are_warned_and_the_dump_goes_on(
        teachers, tmp_path, caplog):
    store = tmp_path / "sampled_only"
    shutil.copytree(teachers["store"], store)
    with caplog.at_level("WARNING", logger="teacher_dump.dump"):
        run_dump(config(teachers, store, top_k=0, split_long=True, sample_temperature=2.0,
                        sampled_logprobs=False), ranks=RankContext(), progress=False)
    said = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "without their log-probs" in said and "--top-k" in said
    assert "--split-long does not apply" in said
    spec = StoreReader(str(store)).settings.signals["other"]
    assert spec.topk is None and spec.sampled is not None
