"""Bad inputs to the four commands: the exit status and one paragraph, never a traceback.

One row per mistake a user makes: the command, what was given, the exit status
(logitstore/exit_codes.py: 1 user/config/data error, including a value outside its
choices, which the config checks with the other values; 2 usage error found by click) and the
words the message must contain. Commands run in-process (click's CliRunner): `{store}`,
`{model}`, `{file}` and `{tmp}` in the arguments are a small committed store, a tiny local
Llama, a plain file and a fresh directory.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from click.testing import CliRunner

from logitstore.cli import main as logitstore_cli
from logitstore.writer import StoreWriter
from test_store_roundtrip import make, settings_for

NO_MODEL = "/nonexistent/model-dir"

ROWS = [
    # (command, arguments, exit status, words the message must contain)
    ("logitstore", ["info", "/nonexistent/store"], 1, ["no store at", "does not exist"]),
    ("logitstore", ["verify", "{tmp}"], 1, ["not a committed store", "manifest.json"]),
    ("logitstore", ["show", "{store}", "missing-id"], 1, ["'missing-id' is not in"]),
    ("logitstore", ["show", "{store}", "--index", "999"], 1, ["out of range"]),
    ("logitstore", ["show", "{store}"], 2, ["either SAMPLE_ID or --index"]),
    ("logitstore", ["info", "foo://bucket/store"], 1, ["cannot open foo://", "Protocol"]),
    ("logitstore", ["info", "{file}"], 1, ["not a committed store"]),
    ("logitstore", ["cp", "/nonexistent/store", "{tmp}/copy"], 1, ["does not exist"]),
    ("logitstore", ["cp", "{store}", "{store}"], 1, ["already holds a store", "--overwrite"]),
    ("logitstore", ["verify"], 2, ["Missing argument"]),
    ("logitstore", ["info", "{store}", "--bogus"], 2, ["No such option"]),
    ("logitstore", ["show", "{store}", "x", "--tokenizer", "/nonexistent"], 2,
     ["does not exist"]),
    ("logitstore", ["show", "{store}", "--index", "0", "--tokenizer", "{tmp}"], 1,
     ["no tokenizer at {tmp}", "tokenizer.json", "a directory holding one"]),
    ("logitstore", ["show", "{store}", "--index", "0", "--tokenizer", "{file}"], 1,
     ["{file} is not a tokenizer file", "tokenizer.json"]),
    ("teacher-dump", ["--model", NO_MODEL, "--data", "{file}", "--out", "{tmp}/s",
                      "--device", "cpu"], 1, [NO_MODEL]),
    ("teacher-dump", ["--model", "{model}", "--data", "{file}", "--out", "{file}/store",
                      "--device", "cpu"], 1, ["{file}"]),
    ("teacher-dump", ["--model", "{model}", "--data", "{file}", "--out", "{tmp}/s",
                      "--format", "yaml"], 1, ["format", "must be one of", "'yaml'"]),
    ("teacher-dump", ["--model", "{model}", "--data", "{file}", "--out", "{tmp}/s",
                      "--hidden-layers", "a,b"], 1, ["hidden_layers"]),
    ("teacher-dump", ["--model", "{model}", "--data", "/nonexistent/data.jsonl", "--out",
                      "{tmp}/s", "--device", "cpu"], 1, ["/nonexistent/data.jsonl"]),
    ("teacher-dump", ["--config", "no-such-preset", "--out", "{tmp}/s"], 1, ["no-such-preset"]),
    ("teacher-dump", ["--model", "{model}", "--out", "foo://bucket/s", "--data", "{file}"], 1,
     ["foo://"]),
    ("teacher-dump", ["--top-kk", "3"], 2, ["No such option"]),
    ("student-train", ["--store", "/nonexistent/store", "--student", NO_MODEL, "--out",
                       "{tmp}/run"], 1, ["/nonexistent/store", "does not exist"]),
    ("student-train", ["--config", "{tmp}/unknown-key.yaml", "--store", "{store}", "--out",
                       "{tmp}/run"], 1, ["lerning_rate"]),
    ("student-train", ["--store", "{store}", "--student", "{model}", "--out", "{tmp}/run",
                       "--signals", "teacher:heavy"], 1, ["signals", "heavy"]),
    ("student-train", ["--store", "{store}", "--student", "{model}", "--out", "{tmp}/run"], 1,
     ["vocabulary size 300", "vocabulary size 400", "holds no sample text"]),
    ("student-train", ["--store", "{store}", "--student", "{model}", "--out", "{tmp}/run",
                       "--loss", "l2"], 1, ["loss", "must be one of", "'l2'"]),
    ("student-train", ["--store", "{tmp}", "--student", NO_MODEL, "--out", "{tmp}/run"], 1,
     ["not a committed store"]),
    # checked from the store's manifest before the (here missing) student is looked at
    ("student-train", ["--store", "{store}", "--student", NO_MODEL, "--out", "{tmp}/run",
                       "--signals", "qwen:1"], 1, ["'qwen'", "not in the store"]),
    # sampled targets stored without log-probs (sampled at T=0.8) at another temperature:
    # refused from the manifest, before the (here missing) student is looked at
    ("student-train", ["--store", "{nolp_store}", "--student", NO_MODEL, "--out", "{tmp}/run",
                       "--temperature", "2"], 1,
     ["'teacher'", "without their log-probs", "trains at temperature 2", "--temperature 0.8",
      "--sampled-logprobs"]),
    ("student-train", ["--store", "{nolp_store}", "--student", NO_MODEL, "--out", "{tmp}/run",
                       "--temperature", "0.8", "--temperature-end", "0.4",
                       "--temperature-schedule", "linear"], 1,
     ["without their log-probs", "from 0.8 to 0.4", "--temperature-schedule constant"]),
    ("student-train", ["--store", "{nolp_store}", "--student", NO_MODEL, "--out", "{tmp}/run",
                       "--temperature", "0.8", "--eval-fraction", "0.5"], 1,
     ["without their log-probs", "evaluates it at temperature 1"]),
    # a data format is checked with the config, before the (here missing) student is looked at
    ("student-train", ["--data", "{file}", "--student", NO_MODEL, "--out", "{tmp}/run",
                       "--data-format", "yaml"], 1, ["data_format", "must be one of", "'yaml'"]),
    ("distill-eval", ["--model", NO_MODEL, "--tasks", "local", "--out", "{tmp}/r",
                      "--device", "cpu", "--no-efficiency"], 1, [NO_MODEL]),
    ("distill-eval", ["--model", "{model}", "--tasks", "/nonexistent/tasks.jsonl", "--out",
                      "{tmp}/r", "--device", "cpu", "--no-efficiency"], 1,
     ["/nonexistent/tasks.jsonl"]),
    ("distill-eval", ["--model", "{model}", "--ppl-store", "/nonexistent/store", "--out",
                      "{tmp}/r", "--device", "cpu", "--no-efficiency"], 1,
     ["/nonexistent/store"]),
    ("distill-eval", ["--model", "{model}", "--bogus"], 2, ["No such option"]),
]


def _command(name: str):
    if name == "logitstore":
        return logitstore_cli
    pytest.importorskip("torch")
    if name == "teacher-dump":
        from teacher_dump.cli import teacher_dump

        return teacher_dump
    if name == "student-train":
        from student_train.cli import main

        return main
    from eval.cli import distill_eval

    return distill_eval


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    store = root / "store"
    settings = settings_for()
    with StoreWriter(str(store), settings) as writer:
        writer.add_many(make(np.random.default_rng(3), 4, settings))
    nolp = settings_for(k=0, hidden=None, attention=None)  # sampled at T=0.8 only
    nolp = replace(nolp, signals={"teacher": replace(nolp.signals["teacher"], sampled=replace(
        nolp.signals["teacher"].sampled, logprobs=False))})
    with StoreWriter(str(root / "nolp"), nolp) as writer:
        writer.add_many(make(np.random.default_rng(3), 4, nolp))
    plain = root / "plain.jsonl"
    plain.write_text('{"text": "The patient reports chest pain."}\n')
    out = {"store": str(store), "nolp_store": str(root / "nolp"), "file": str(plain),
           "model": NO_MODEL}
    try:
        from tiny_hf import make_tiny_llama, make_tokenizer

        out["model"] = str(make_tiny_llama(root / "llama", make_tokenizer(root / "tok")))
    except ImportError:  # no torch/transformers: rows of the three tools skip
        pass
    return out


@pytest.mark.parametrize("command,args,code,words", ROWS,
                         ids=[f"{r[0]}-{i}" for i, r in enumerate(ROWS)])
def test_bad_input(inputs, tmp_path, monkeypatch, command, args, code, words):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "unknown-key.yaml").write_text("train:\n  lerning_rate: 0.1\n")
    values = {**inputs, "tmp": str(tmp_path)}
    args = [a.format(**values) for a in args]
    result = CliRunner().invoke(_command(command), args)
    output = result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        (args, output, repr(result.exception))
    assert result.exit_code == code, (args, output)
    assert "Traceback" not in output, output
    for word in words:
        assert word.format(**values) in output, (args, word, output)
