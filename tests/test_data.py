"""logitstore.toolkit.data / logitstore.toolkit.record_formats: sources, formats, tokenization, bad data."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import numpy as np
import pytest

from logitstore.toolkit.data import (
    DataOptions,
    DataSourceError,
    HFDatasetSpec,
    parse_hf_spec,
    read_samples,
    resolve_sources,
    tokenize_pair,
)
from logitstore.toolkit.record_formats import ALPACA_PROMPT_NO_INPUT
from tiny_hf import make_tokenizer

ID_PATTERN = re.compile(r"^(?P<source>.+):(?P<row>\d+):(?P<hash>[0-9a-f]{12})(#w\d+)?$")


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("data_tok")
    return {
        "chat": AutoTokenizer.from_pretrained(make_tokenizer(root / "chat")),
        "plain": AutoTokenizer.from_pretrained(make_tokenizer(root / "plain", chat_template=None)),
        "no_bos": AutoTokenizer.from_pretrained(
            make_tokenizer(root / "nobos", chat_template=None, add_bos=False)
        ),
    }


@pytest.fixture
def tok(tokenizers):
    return tokenizers["chat"]


def write_jsonl(path: Path, rows) -> Path:
    """rows: dicts (dumped) or raw strings (written verbatim, to make bad lines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def read_one(tmp_path, tokenizer, record, **options):
    samples, summary = read_samples(
        write_jsonl(tmp_path / "one.jsonl", [record]), tokenizer, DataOptions(**options)
    )
    assert len(samples) == 1, str(summary)
    return samples[0], summary


def decode(tokenizer, ids) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False)


def targets(tokenizer, sample) -> str:
    return decode(tokenizer, sample.input_ids[sample.loss_mask])


# ----------------------------------------------------------------------------- formats


def test_text_every_token_is_a_target_but_bos(tmp_path, tok):
    sample, summary = read_one(tmp_path, tok, {"text": "The patient reports chest pain."})
    assert summary.format == "text"
    assert sample.input_ids.dtype == np.int64 and sample.loss_mask.dtype == np.bool_
    assert sample.input_ids[0] == tok.bos_token_id and sample.input_ids[-1] == tok.eos_token_id
    assert not sample.loss_mask[0] and sample.loss_mask[1:].all()
    assert decode(tok, sample.input_ids) == "<s>The patient reports chest pain.</s>"


def test_no_bos_when_the_tokenizer_adds_none(tmp_path, tokenizers):
    no_bos = tokenizers["no_bos"]
    sample, _ = read_one(tmp_path, no_bos, {"text": "Fever."})
    assert decode(no_bos, sample.input_ids) == "Fever.</s>" and sample.loss_mask.all()


def test_prompt_completion_mask_boundary_is_exact(tmp_path, tok):
    prompt, completion = "Q: What lowers blood glucose?", " Insulin lowers it."
    sample, summary = read_one(tmp_path, tok, {"prompt": prompt, "completion": completion})
    assert summary.format == "prompt_completion"
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    n_response = len(tok(completion, add_special_tokens=False)["input_ids"])
    expected = [False] * (1 + n_prompt) + [True] * (n_response + 1)  # BOS, prompt | response, EOS
    assert sample.loss_mask.tolist() == expected
    assert decode(tok, sample.input_ids[: 1 + n_prompt]) == "<s>" + prompt
    assert targets(tok, sample) == completion + "</s>"


def test_include_prompt_makes_prompt_tokens_targets(tmp_path, tok):
    sample, _ = read_one(
        tmp_path, tok, {"prompt": "Dose?", "completion": " Ten mg."}, include_prompt=True
    )
    assert not sample.loss_mask[0] and sample.loss_mask[1:].all()


def test_tokenize_pair_direct(tok):
    ids, mask = tokenize_pair(tok, "Dose?", " Ten mg.")
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert mask.sum() == len(tok(" Ten mg.", add_special_tokens=False)["input_ids"]) + 1


def test_instruction_alpaca_with_and_without_input(tmp_path, tok):
    rows = [
        {
            "instruction": "Name the drug.",
            "input": "Used for type 2 diabetes.",
            "output": "Metformin.",
        },
        {
            "instruction": "Define anemia.",
            "input": "",
            "output": "Low hemoglobin.",
            "specialty": "hematology",
        },
    ]
    samples, summary = read_samples(write_jsonl(tmp_path / "a.jsonl", rows), tok)
    assert summary.format == "instruction"
    with_input, without = (decode(tok, s.input_ids[~s.loss_mask]) for s in samples)
    assert "### Input:\nUsed for type 2 diabetes." in with_input
    assert without == "<s>" + ALPACA_PROMPT_NO_INPUT.format(instruction="Define anemia.")
    assert targets(tok, samples[1]) == "Low hemoglobin.</s>"
    assert samples[1].tags == {"specialty": "hematology"} and samples[0].tags == {}


CHAT = {
    "messages": [
        {"role": "system", "content": "You are a careful clinician."},
        {"role": "user", "content": "Is fever a symptom of flu?"},
        {"role": "assistant", "content": "Yes, usually."},
    ],
    "difficulty": 2,
}


def test_chat_uses_the_tokenizers_template(tmp_path, tok):
    sample, summary = read_one(tmp_path, tok, CHAT)
    assert summary.format == "chat"
    prompt = decode(tok, sample.input_ids[~sample.loss_mask])
    assert prompt == (
        "<s><|system|>\nYou are a careful clinician.</s>\n"
        "<|user|>\nIs fever a symptom of flu?</s>\n<|assistant|>\n"
    )
    # The template ends the turn with EOS itself: it is a target, and not added twice.
    assert targets(tok, sample) == "Yes, usually.</s>\n"
    assert sample.tags == {"difficulty": 2}


def test_chat_default_template_without_tokenizer_template(tmp_path, tokenizers):
    plain = tokenizers["plain"]
    sample, _ = read_one(tmp_path, plain, CHAT)
    assert decode(plain, sample.input_ids) == (
        "<s><|system|>\nYou are a careful clinician.\n<|user|>\nIs fever a symptom of flu?\n"
        "<|assistant|>\nYes, usually.</s>"
    )
    assert targets(plain, sample) == "Yes, usually.</s>"


def test_chat_template_can_be_disabled_and_instructions_wrapped(tmp_path, tok):
    sample, _ = read_one(tmp_path, tok, CHAT, use_chat_template=False)
    assert decode(tok, sample.input_ids).endswith("\n<|assistant|>\nYes, usually.</s>")
    wrapped, _ = read_one(
        tmp_path, tok, {"prompt": "Dose?", "completion": "Ten mg."}, wrap_in_chat=True
    )
    assert decode(tok, wrapped.input_ids) == "<s><|user|>\nDose?</s>\n<|assistant|>\nTen mg.</s>\n"


OPTIONS = ["Aspirin", "Insulin", "Metformin", "Warfarin"]
MCQ_PROMPT = (
    "Question: Which drug is a biguanide?\nA. Aspirin\nB. Insulin\nC. Metformin\nD. Warfarin\n"
    "Answer:"
)


@pytest.mark.parametrize(
    "answer_fields",
    [
        {"answer": 2},  # index
        {"answer": "C"},  # letter
        {"answer": "c"},
        {"answer": "(C)"},
        {"answer": "Metformin"},  # option text
        {"answer": "metformin "},
        {"answer_idx": "C", "answer": "Metformin"},  # MedQA style: both
    ],
)
def test_mcq_answer_styles(tmp_path, tok, answer_fields):
    record = {"question": "Which drug is a biguanide?", "options": OPTIONS, **answer_fields}
    sample, summary = read_one(tmp_path, tok, record)
    assert summary.format == "mcq"
    assert decode(tok, sample.input_ids[~sample.loss_mask]) == "<s>" + MCQ_PROMPT
    assert targets(tok, sample) == " C. Metformin</s>"


def test_mcq_option_dict_choices_and_index_base(tmp_path, tok):
    as_dict = {"question": "Q?", "options": {"A": "x", "B": "y", "E": "z"}, "answer_idx": "E"}
    assert targets(tok, read_one(tmp_path, tok, as_dict)[0]) == " E. z</s>"
    arc = {"question": "Q?", "choices": {"label": ["1", "2"], "text": ["yes", "no"]}, "answer": "2"}
    assert targets(tok, read_one(tmp_path, tok, arc)[0]) == " 2. no</s>"
    one_based = {"question": "Q?", "choices": ["yes", "no"], "answer": 1}
    assert targets(tok, read_one(tmp_path, tok, one_based, mcq_index_base=1)[0]) == " A. yes</s>"


def test_medmcqa_fields(tmp_path, tok):
    record = {
        "id": "e9ad821a",
        "question": "Deficiency of which vitamin causes scurvy?",
        "opa": "Vitamin A",
        "opb": "Vitamin B12",
        "opc": "Vitamin C",
        "opd": "Vitamin D",
        "cop": 2,
        "choice_type": "single",
        "exp": None,
        "subject_name": "Biochemistry",
        "topic_name": "Vitamins",
    }
    sample, summary = read_one(tmp_path, tok, record)
    assert summary.format == "medmcqa"
    assert "\nD. Vitamin D\nAnswer:" in decode(tok, sample.input_ids)
    assert targets(tok, sample) == " C. Vitamin C</s>"
    assert sample.tags == {
        "id": "e9ad821a",
        "choice_type": "single",
        "subject_name": "Biochemistry",
        "topic_name": "Vitamins",
    }
    # The original MedMCQA JSON counts cop from 1; out-of-range values are reported, not guessed.
    original = dict(record, cop=3)
    assert (
        targets(tok, read_one(tmp_path, tok, original, mcq_index_base=1)[0]) == " C. Vitamin C</s>"
    )
    samples, summary = read_samples(
        write_jsonl(tmp_path / "m.jsonl", [dict(record, cop=4), dict(record, cop=-1)]), tok
    )
    assert not samples and summary.malformed == 2
    assert "cop 4 is out of range" in summary.malformed_examples[0]


def test_auto_detection_is_per_file_and_reported(tmp_path, tok):
    write_jsonl(tmp_path / "d" / "a.jsonl", [{"text": "Cough."}])
    write_jsonl(tmp_path / "d" / "b.jsonl", [CHAT])
    samples, summary = read_samples(tmp_path / "d", tok)
    assert summary.formats == {"a.jsonl": "text", "b.jsonl": "chat"}
    assert summary.format == "mixed" and "b.jsonl: chat" in str(summary)
    forced, summary = read_samples(
        tmp_path / "d" / "a.jsonl", tok, DataOptions(format="prompt_completion")
    )
    assert not forced and summary.malformed == 1 and "missing field 'prompt'" in str(summary)
    with pytest.raises(ValueError, match="unknown data format"):
        read_samples(tmp_path / "d", tok, DataOptions(format="csv"))


# ----------------------------------------------------------------------------- sources


def test_json_parquet_gzip_directory_and_glob_sources(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    (root / "list.json").write_text(json.dumps([{"text": "One."}, {"text": "Two."}]))
    (root / "wrapped.json").write_text(json.dumps({"data": [{"text": "Three."}]}))
    (root / "lines.json").write_text('{"text": "Four."}\n{"text": "Five."}\n')  # JSONL in .json
    with gzip.open(root / "sub" / "z.jsonl.gz", "wt") as handle:
        handle.write('{"text": "Six."}\n')
    pq.write_table(
        pa.Table.from_pylist([{"text": "Seven.", "ward": "icu"}]), root / "sub" / "t.parquet"
    )
    (root / "notes.txt").write_text("ignored: unsupported suffix")

    samples, summary = read_samples(root, tok)
    assert [s.source for s in samples] == [
        "lines.json",
        "lines.json",
        "list.json",
        "list.json",
        "sub/t.parquet",
        "sub/z.jsonl.gz",
        "wrapped.json",
    ]
    assert summary.malformed == 0 and samples[4].tags == {"ward": "icu"}
    globbed, _ = read_samples(str(root / "**" / "*.parquet"), tok)
    assert [s.sample_id.split(":")[0] for s in globbed] == ["sub/t.parquet"]
    both, _ = read_samples([root / "list.json", root / "wrapped.json"], tok)
    assert [s.source for s in both] == ["list.json", "list.json", "wrapped.json"]


def test_missing_local_sources_are_clear_errors(tmp_path, tok):
    with pytest.raises(DataSourceError, match="does not exist"):
        read_samples(tmp_path / "nope.jsonl", tok)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataSourceError, match="no data files"):
        read_samples(tmp_path / "empty", tok)
    with pytest.raises(DataSourceError, match="no data files match"):
        read_samples(str(tmp_path / "*.parquet"), tok)


def test_hf_spec_parsing():
    assert parse_hf_spec("openlifescienceai/medmcqa") == HFDatasetSpec("openlifescienceai/medmcqa")
    assert parse_hf_spec("bigbio/med_qa:med_qa_en_source@train") == HFDatasetSpec(
        "bigbio/med_qa", "med_qa_en_source", "train"
    )
    assert parse_hf_spec("hf:medalpaca/medical_meadow_wikidoc@train[:100]").split == "train[:100]"
    # "[:100]" looks like a glob, but with no matching file it is a dataset split slice.
    (source,) = resolve_sources("org/ds:cfg@train[:100]")
    assert (source.kind, source.label, source.hf.split) == ("hub", "org/ds:cfg", "train[:100]")
    for bad in ("name:", "name@", ":cfg", "hf:"):
        with pytest.raises(DataSourceError, match="name\\[:config\\]\\[@split\\]"):
            parse_hf_spec(bad)


def test_missing_hub_dataset_gives_a_clear_error(monkeypatch, tok):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataSourceError) as info:
        read_samples("logitstore-test-org/no-such-dataset@train", tok)
    message = str(info.value)
    assert "'logitstore-test-org/no-such-dataset'" in message and "split train" in message
    assert "HF_HUB_OFFLINE=1" in message and "save_to_disk" in message


def test_saved_to_disk_datasets(tmp_path, tok):
    import datasets

    rows = {"question": ["Q1?", "Q2?"], "options": [["a", "b"], ["c", "d"]], "answer": [0, 1]}
    dd = datasets.DatasetDict(
        train=datasets.Dataset.from_dict(rows),
        test=datasets.Dataset.from_dict({"text": ["Held out."], "split": ["dev"]}),
    )
    dd.save_to_disk(tmp_path / "saved")
    samples, summary = read_samples(tmp_path / "saved", tok)
    assert [(s.source, s.split) for s in samples] == [
        ("saved@train", "train"),
        ("saved@train", "train"),
        ("saved@test", "dev"),
    ]
    assert summary.formats == {"saved@train": "mcq", "saved@test": "text"}
    only_test, _ = read_samples(f"{tmp_path / 'saved'}@test", tok)
    assert [s.sample_id for s in only_test] == [samples[2].sample_id]

    dd["train"].save_to_disk(tmp_path / "single")
    single, _ = read_samples(tmp_path / "single", tok)
    assert len(single) == 2 and single[0].split == "train"


# ----------------------------------------------------------------------------- bad data


def test_bad_records_are_skipped_counted_and_reported(tmp_path, tok):
    path = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            {"prompt": "Dose?", "completion": " Ten mg."},  # line 1: good (fixes the format)
            '{"prompt": "unterminated',  # line 2: bad JSON
            {"prompt": "No completion"},  # line 3: missing field
            {"prompt": "Dose?", "completion": ["list"]},  # line 4: wrong type
            "[1, 2]",  # line 5: not an object
            {"prompt": "Anything?", "completion": "   "},  # line 6: empty
            {"prompt": "Dose?", "completion": " Ten mg."},  # line 7: duplicate of line 1
            "",  # blank line: not a record
            {"prompt": "Route?", "completion": " Oral.", "split": "validation"},  # line 9: good
        ],
    )
    samples, summary = read_samples(path, tok)
    assert [s.sample_id.split(":")[1] for s in samples] == ["0", "8"]
    assert [s.split for s in samples] == ["train", "validation"]
    assert (summary.records, summary.malformed, summary.empty, summary.duplicates) == (8, 4, 1, 1)
    assert summary.samples == 2
    reported = summary.malformed_examples
    assert [m.split(": ")[0] for m in reported] == [
        "bad.jsonl:2",
        "bad.jsonl:3",
        "bad.jsonl:4",
        "bad.jsonl:5",
    ]
    assert "invalid JSON" in reported[0] and "missing field 'completion'" in reported[1]
    assert "must be a string" in reported[2] and "expected an object" in reported[3]
    text = str(summary)
    assert "4 malformed, 1 empty, 1 duplicates" in text and "bad.jsonl:3" in text


def test_only_the_first_five_malformed_are_quoted(tmp_path, tok):
    path = write_jsonl(tmp_path / "x.jsonl", ["{bad"] * 8 + [{"text": "ok"}])
    samples, summary = read_samples(path, tok)
    assert len(samples) == 1 and summary.malformed == 8
    assert len(summary.malformed_examples) == 5 and "... and 3 more" in str(summary)


def test_over_long_samples_truncate_or_split_into_windows(tmp_path, tok):
    text = " ".join(["The patient reports chest pain radiating to the left arm."] * 6)
    sample, summary = read_one(tmp_path, tok, {"text": text}, max_length=16)
    assert len(sample.input_ids) == 16 and summary.truncated == 1

    full, _ = read_one(tmp_path, tok, {"text": text})
    windows, summary = read_samples(
        write_jsonl(tmp_path / "one.jsonl", [{"text": text}]),
        tok,
        DataOptions(max_length=16, overflow="window"),
    )
    assert summary.windowed == 1 and summary.samples == len(windows) == -(
        -len(full.input_ids) // 16
    )
    assert np.array_equal(np.concatenate([w.input_ids for w in windows]), full.input_ids)
    assert [w.sample_id for w in windows] == [f"{full.sample_id}#w{k}" for k in range(len(windows))]

    # Truncation that leaves no response token drops the sample (counted).
    long_prompt = {"prompt": text, "completion": " Yes."}
    samples, summary = read_samples(
        write_jsonl(tmp_path / "p.jsonl", [long_prompt]), tok, DataOptions(max_length=16)
    )
    assert not samples and summary.truncated == 1 and summary.no_target == 1


# ----------------------------------------------------------------------------- ids, order, limit


def test_sample_ids_are_stable_and_tokenizer_independent(tmp_path, tokenizers):
    path = write_jsonl(tmp_path / "c.jsonl", [CHAT, {"messages": CHAT["messages"][1:]}])
    first, _ = read_samples(path, tokenizers["chat"])
    second, _ = read_samples(path, tokenizers["chat"])
    other_tokenizer, _ = read_samples(path, tokenizers["no_bos"])
    ids = [s.sample_id for s in first]
    assert ids == [s.sample_id for s in second] == [s.sample_id for s in other_tokenizer]
    match = ID_PATTERN.match(ids[1])
    assert match and match["source"] == "c.jsonl" and match["row"] == "1"
    assert all(np.array_equal(a.input_ids, b.input_ids) for a, b in zip(first, second))


def test_limit_and_order(tmp_path, tok):
    write_jsonl(tmp_path / "d" / "b.jsonl", [{"text": f"B{i}."} for i in range(3)])
    write_jsonl(tmp_path / "d" / "a.jsonl", [{"text": f"A{i}."} for i in range(3)])
    samples, summary = read_samples(tmp_path / "d", tok, DataOptions(limit=4))
    assert [decode(tok, s.input_ids[1:-1]) for s in samples] == ["A0.", "A1.", "A2.", "B0."]
    assert summary.limit_reached and "limit" in str(summary)


def test_data_module_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, logitstore.toolkit.data; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
