"""The `logitstore` command: info, verify, cp, show, commit."""

import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from logitstore.cli import main
from logitstore.reader import StoreReader
from logitstore.writer import StoreWriter

from test_store_roundtrip import make, settings_for


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli") / "store"
    s = settings_for()
    samples = make(np.random.default_rng(9), 12, s)
    with StoreWriter(str(root), s) as w:
        w.add_many(samples)
    return str(root), samples


def run(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_info_text_and_json(store):
    out = run("info", store[0])
    assert out.exit_code == 0
    assert "12 samples" in out.output and "B/entry" in out.output and "teacher" in out.output
    data = json.loads(run("info", store[0], "--json").output)
    assert data["format_version"] == "2.2" and data["counts"]["samples"] == 12
    topk = data["sizes"]["signals"]["teacher"]["topk"]
    assert topk["entries"] == data["counts"]["tokens"] * 4 and topk["bytes_per_entry"] > 0
    assert data["sizes"]["arrays"]["input_ids"]["bytes"] > 0


def test_show_json_shape(store):
    out = run("show", store[0], store[1][3].sample_id, "--json")
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert set(data) >= {"sample_id", "input_ids", "loss_mask", "tags", "signals"}
    sig = data["signals"]["teacher"]
    assert set(sig) == {"topk", "sampled", "hidden", "attention"}
    assert len(sig["topk"]["ids"]) == len(data["input_ids"]) == len(sig["sampled"]["counts"])
    assert set(sig["sampled"]) == {"ids", "counts", "logprobs"}
    assert all(sum(c) == 12 for c in sig["sampled"]["counts"])
    assert sig["hidden"]["layers"] == [0, 1] and len(sig["hidden"]["pools"]) == 2
    by_index = json.loads(run("show", store[0], "--index", "3", "--json").output)
    assert by_index == data


def test_show_text_and_errors(store):
    out = run("show", store[0], "--index", "0")
    assert out.exit_code == 0 and "teacher top:" in out.output
    bad = CliRunner().invoke(main, ["show", store[0], "missing-id"])
    assert bad.exit_code == 1 and "'missing-id' is not in" in bad.output
    both = CliRunner().invoke(main, ["show", store[0], "x", "--index", "1"])
    assert both.exit_code == 2


def test_verify_exit_codes(store, tmp_path):
    assert run("verify", store[0]).exit_code == 0
    dst = tmp_path / "copy"
    assert run("cp", store[0], str(dst)).exit_code == 0
    assert StoreReader(str(dst)).sample_ids == StoreReader(store[0]).sample_ids
    shard = next(p for p in dst.rglob("*") if "topk_logprobs/c/" in str(p) and p.is_file())
    shard.write_bytes(shard.read_bytes()[:-3])
    res = CliRunner().invoke(main, ["verify", str(dst)])
    assert res.exit_code == 1 and "DAMAGED" in res.output and "topk_logprobs" in res.output
    again = CliRunner().invoke(main, ["cp", str(dst), str(tmp_path / "copy2")])
    assert again.exit_code == 1 and "damaged" in again.output  # damaged source refused
    exists = CliRunner().invoke(main, ["cp", store[0], str(tmp_path / "copy")])
    assert exists.exit_code == 1 and "--overwrite" in exists.output


def test_console_script_runs_without_torch(store):
    """`logitstore` is the store core: importing it must not import torch."""
    code = ("import sys, logitstore.cli, logitstore.reader, logitstore.writer, logitstore.verify;"
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    res = subprocess.run([sys.executable, "-m", "logitstore.cli", "verify", store[0]],
                         capture_output=True, text=True)
    assert res.returncode == 0 and "ok" in res.stdout
