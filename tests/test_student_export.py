"""student-export on a tiny local Llama: torch and ONNX exports, fp32 and int8, their
export.json and quality-gate figures, loading them back and generating; a failing gate
(files kept, exit 1); bad inputs (one paragraph each, exit 1 or 2, nothing written); the
held-out data the gate picks (a file, a run's store, the bundled texts)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from student_export.cli import student_export
from tiny_hf import make_tiny_llama, make_tokenizer

CHECK = ["--check-limit", "8"]  # 8 bundled sequences: enough to compare, fast


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    return make_tiny_llama(root / "model", make_tokenizer(root / "tok"))


def run_cli(*args: str):
    return CliRunner().invoke(student_export, [str(a) for a in args])


@pytest.fixture(scope="module")
def exports(tiny, tmp_path_factory):
    """{(format, quantize): (CliRunner result, export dir)}, built on first use."""
    built: dict = {}

    def get(fmt: str, quantize: str):
        if (fmt, quantize) not in built:
            out = tmp_path_factory.mktemp("exports") / f"{fmt}-{quantize}"
            result = run_cli(tiny, "--out", out, "--format", fmt, "--quantize", quantize,
                             "--max-length", 128, *CHECK)
            built[fmt, quantize] = result, out
        return built[fmt, quantize]
    return get


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def greedy(model, prompt: list[int], tokens: int = 6) -> list[int]:
    from logitstore.toolkit.inference import GenerationSettings

    return model.generate([prompt], GenerationSettings(max_new_tokens=tokens))[0].token_ids


@pytest.mark.parametrize("fmt,quantize", [("torch", "none"), ("torch", "int8"),
                                          ("onnx", "none"), ("onnx", "int8")])
def test_export_writes_a_checked_directory_that_loads_and_generates(exports, tiny, fmt,
                                                                    quantize):
    from logitstore.toolkit.inference import load_inference_model

    result, out = exports(fmt, quantize)
    assert result.exit_code == 0, result.output
    assert "quality gate passed" in result.output
    manifest = json.loads((out / "export.json").read_text())
    assert (manifest["format_version"], manifest["format"], manifest["quantize"],
            manifest["max_length"], manifest["status"]) == (1, fmt, quantize, 128, "complete")
    # The source hash is the sha256sum listing of its weight files, hashed.
    listing = f"{sha256(tiny / 'model.safetensors')}  model.safetensors\n"
    assert manifest["source"]["sha256"] == hashlib.sha256(listing.encode()).hexdigest()
    assert manifest["source"]["model_type"] == "llama"
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json",
                 "generation_config.json", "export_config.yaml"):
        assert manifest["files"][name] == sha256(out / name)
    assert not [p for p in out.rglob("*") if p.suffix in (".bin", ".pt", ".pkl", ".tmp")]
    saved = yaml.safe_load((out / "export_config.yaml").read_text())["export"]
    assert (saved["format"], saved["quantize"], saved["max_length"]) == (fmt, quantize, 128)

    quality = manifest["quality"]
    assert quality["passed"] is True and quality["data"]["kind"] == "bundled"
    assert quality["data"]["sequences"] == 8 and quality["tokens"] > 100
    assert quality["threshold"] == (1.02 if quantize == "int8" else 1.001)
    assert quality["perplexity_ratio"] == pytest.approx(
        quality["export_perplexity"] / quality["source_perplexity"], rel=1e-9)
    if quantize == "none":  # the same float32 math, up to operator order
        assert quality["max_abs_logprob_diff"] < 1e-4 and quality["top1_agreement"] == 1.0
    else:  # int8 moves the log-probs a little, never a lot on this model
        assert 1e-5 < quality["max_abs_logprob_diff"] < 0.5
        assert quality["top1_agreement"] > 0.8 and quality["perplexity_ratio"] <= 1.02

    model = load_inference_model(str(out))
    assert model.kind == f"{fmt}-{'int8' if quantize == 'int8' else 'fp32'}"
    assert model.kind == quality["export_kind"] and model.max_length == 128
    prompt = model.tokenizer("The patient reports chest pain")["input_ids"]
    tokens = greedy(model, prompt)
    assert len(tokens) == 6
    if quantize == "none":  # fp32 exports generate what the source model generates
        assert tokens == greedy(load_inference_model(str(tiny)), prompt)


def test_torch_int8_weights_are_torchao_int8_in_safetensors(exports):
    from safetensors import safe_open

    from logitstore.toolkit.torch_int8 import load_int8_model

    _, out = exports("torch", "int8")
    manifest = json.loads((out / "export.json").read_text())
    quantization = manifest["torch"]["quantization"]
    assert quantization["library"] == "torchao" and quantization["quantized_layers"] == 15
    assert quantization["fp32_layers"] == ["model.embed_tokens"]  # untied head: int8 too
    with safe_open(str(out / "model.safetensors"), framework="pt") as fh:
        dtypes = {str(fh.get_slice(k).get_dtype()) for k in fh.keys()}
    assert "I8" in dtypes
    model = load_int8_model(out)
    assert type(model.model.layers[0].mlp.up_proj.weight).__name__ == "Int8Tensor"
    assert type(model.lm_head.weight).__name__ == "Int8Tensor"


def test_onnx_int8_export_is_smaller_than_fp32(exports):
    sizes = {}
    for quantize in ("none", "int8"):
        _, out = exports("onnx", quantize)
        sizes[quantize] = sum(p.stat().st_size for p in out.glob("model.onnx*"))
        manifest = json.loads((out / "export.json").read_text())
        assert manifest["onnx"]["num_layers"] == 2 and manifest["onnx"]["max_length"] == 128
        assert (out / manifest["onnx"]["data_file"]).is_file()
    assert json.loads((out / "export.json").read_text())["onnx"]["quantization"][
        "weight_type"] == "QInt8"
    assert sizes["int8"] < 0.9 * sizes["none"]


# ----------------------------------------------------------------------------- the gate


def test_a_corrupt_export_fails_the_gate_and_keeps_its_files(tiny, tmp_path, monkeypatch):
    import torch
    from safetensors.torch import load_file, save_file

    from student_export import export

    original = export._write_model

    def write_then_corrupt(cfg, source, out, tokenizer, max_length):
        section = original(cfg, source, out, tokenizer, max_length)
        weights = load_file(out / "model.safetensors")
        generator = torch.Generator().manual_seed(0)
        head = weights["lm_head.weight"]
        weights["lm_head.weight"] = head + torch.randn(head.shape, generator=generator)
        save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
        return section

    monkeypatch.setattr(export, "_write_model", write_then_corrupt)
    out = tmp_path / "broken"
    result = run_cli(tiny, "--out", out, "--format", "torch", *CHECK)
    assert result.exit_code == 1
    message = result.output.strip().splitlines()[-1]
    assert message.startswith("student-export: error: quality gate failed")
    manifest = json.loads((out / "export.json").read_text())
    quality = manifest["quality"]
    assert quality["passed"] is False and manifest["status"] == "failed quality gate"
    assert quality["perplexity_ratio"] > 1.001 and quality["max_abs_logprob_diff"] > 0.1
    assert f"ratio {quality['perplexity_ratio']:.6g} > threshold 1.001" in message
    assert f"kept in {out}" in message and "--format torch" in message
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]  # no staging left


def test_gate_thresholds_default_by_quantize_and_can_be_set():
    from student_export.config import resolve_config

    base = {"model": "m", "out": "o"}
    assert resolve_config(None, {**base, "quantize": "int8"}).ppl_threshold() == 1.02
    assert resolve_config(None, base).ppl_threshold() == 1.001
    assert resolve_config(None, {**base, "max_ppl_ratio": "1.5"}).ppl_threshold() == 1.5


def test_compare_figures_match_a_hand_computation():
    from student_export.quality_gate import compare

    class Fixed:  # an InferenceModel stand-in: logits from a table, whatever the ids
        pad_token_id = 0

        def __init__(self, table):
            self.table, self.tokenizer = table, list(range(table.shape[-1]))

        def logits(self, ids, mask):
            return np.broadcast_to(self.table, (*ids.shape, self.table.shape[-1])).copy()

    from logitstore.toolkit.heldout import TokenSequence

    a, b = np.log(np.array([0.5, 0.25, 0.25])), np.log(np.array([0.25, 0.5, 0.25]))
    sequences = [TokenSequence.all_targets([0, 1, 0])]  # targets 1 then 0
    got = compare(Fixed(a), Fixed(b), sequences, threshold=1.02)
    # Source: p(1) = .25, p(0) = .5; export: p(1) = .5, p(0) = .25: equal perplexity.
    assert got["perplexity_ratio"] == pytest.approx(1.0)
    assert got["source_perplexity"] == pytest.approx(np.exp(-(np.log(.25) + np.log(.5)) / 2))
    assert got["max_abs_logprob_diff"] == pytest.approx(np.log(2))
    assert got["mean_abs_logprob_diff"] == pytest.approx(2 * np.log(2) / 3)
    assert got["top1_agreement"] == 0.0 and got["tokens"] == 2 and got["passed"] is True
    nan = compare(Fixed(a), Fixed(np.full(3, np.nan)), sequences, threshold=1.02)
    assert nan["passed"] is False


def test_compare_sizes_batches_by_the_models_vocabulary_not_the_tokenizers(monkeypatch):
    """A 64-row head behind a 3-token tokenizer: batches must be sized for 64 logits per
    position, or a padded 32k head would get batches 10000x too large."""
    from logitstore.toolkit.heldout import TokenSequence
    from student_export import quality_gate

    class Recording:
        pad_token_id = 0
        tokenizer = ["a", "b", "c"]

        def __init__(self):
            self.shapes = []

        def logits(self, ids, mask):
            self.shapes.append(ids.shape)
            return np.zeros((*ids.shape, 64), dtype=np.float32)

    monkeypatch.setattr(quality_gate, "_BATCH_FLOATS", 64 * 64)  # 64 positions a batch
    source, export = Recording(), Recording()
    sequences = [TokenSequence.all_targets([1] * 20) for _ in range(8)]
    got = quality_gate.compare(source, export, sequences, threshold=1.02)
    assert got["tokens"] == 8 * 19 and got["passed"] is True
    assert max(b * t for b, t in source.shapes) <= 64 and len(source.shapes) >= 4


# ----------------------------------------------------------------------------- held-out data


def write_store(path: Path, tokenizer_dir: Path, split: str) -> None:
    from transformers import AutoTokenizer

    from logitstore.format import StoreSettings
    from logitstore.sample import Sample
    from logitstore.toolkit.tokenizer_identity import tokenizer_fingerprint
    from logitstore.writer import StoreWriter

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    settings = StoreSettings(vocab_size=len(tokenizer), tokenizer_name="tiny",
                             tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
                             segment_tokens=64, chunk_tokens=16)
    texts = ["The nurse reports swelling of both ankles.", "A chest X-ray was ordered.",
             "The physician was treated for anemia."]
    with StoreWriter(str(path), settings) as writer:
        for i, text in enumerate(texts):
            ids = np.array(tokenizer(text)["input_ids"], dtype=np.int64)
            writer.add(Sample(f"s{i}", ids, np.ones(len(ids), bool),
                              split=split if i else "train"))


def make_run(tmp_path: Path, tiny: Path, store: str | None) -> Path:
    run = tmp_path / "run"
    shutil.copytree(tiny, run / "final")
    (run / "config.yaml").write_text(yaml.safe_dump({"train": {"store": store}}))
    return run


def test_gate_uses_the_runs_store_eval_split(tiny, tmp_path):
    write_store(tmp_path / "store", tiny, "validation")
    run = make_run(tmp_path, tiny, str(tmp_path / "store"))
    result = run_cli(run, "--out", tmp_path / "export", "--format", "torch")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "export" / "export.json").read_text())
    assert manifest["source"]["path"] == str((run / "final").resolve())
    assert manifest["source"]["run_dir"] == str(run.resolve())
    assert manifest["quality"]["data"] == {
        "kind": "store", "path": str(tmp_path / "store"), "split": "validation",
        "sequences": 2, "max_tokens_per_sequence": 256}


def test_gate_falls_back_to_bundled_texts_and_reads_check_data(tiny, tmp_path):
    from student_export.quality_gate import held_out_sequences
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny))
    gone = (str(tmp_path / "no-store"), "auto")
    data, sequences = held_out_sequences(None, gone, tokenizer, length=16, limit=5)
    assert data["kind"] == "bundled" and len(sequences) == 5
    assert max(len(s.ids) for s in sequences) == 16
    texts = tmp_path / "held.jsonl"
    texts.write_text('{"text": "The patient reports chest pain."}\n'
                     '{"prompt": "Q", "reference": "A chest X-ray was ordered."}\n')
    data, sequences = held_out_sequences(str(texts), gone, tokenizer, length=64, limit=9)
    assert (data["kind"], data["sequences"]) == ("file", 2)
    write_store(tmp_path / "trainonly", tiny, "train")
    from logitstore.errors import LogitStoreError

    with pytest.raises(LogitStoreError, match="no eval split") as caught:
        held_out_sequences(str(tmp_path / "trainonly"), None, tokenizer, length=64, limit=9)
    assert "pass a store with an eval split, or held-out text" in str(caught.value)
    assert "pass a split name" not in str(caught.value)  # student-export has no split flag


# ----------------------------------------------------------------------------- bad inputs


def _bad_cases(tiny: Path, tmp: Path) -> list[tuple[list, int, list[str]]]:
    (tmp / "full").mkdir()
    (tmp / "full" / "notes.txt").write_text("mine")
    (tmp / "run").mkdir()
    (tmp / "run" / "config.yaml").write_text("train: {store: s}\n")
    for previous in ("prev-with-dir", "prev-with-data"):  # earlier exports, by export.json
        (tmp / previous).mkdir()
        (tmp / previous / "export.json").write_text("{}")
    (tmp / "prev-with-dir" / "mine").mkdir()
    (tmp / "prev-with-data" / "held.jsonl").write_text('{"text": "The nurse reports"}\n')
    bad_jsonl = tmp / "bad.jsonl"
    bad_jsonl.write_text('{"question": 1}\n')
    out = tmp / "new"
    return [
        ([tiny, "--out", out, "--format", "tflite"], 1, ["format", "tflite", "onnx, torch"]),
        ([tiny, "--out", out, "--quantize", "int4"], 1, ["quantize", "int4", "none, int8"]),
        ([tiny, "--out", out, "--max-length", "0"], 1, ["max_length", ">= 1"]),
        ([tiny, "--out", out, "--max-length", "999"], 1, ["max_position_embeddings 256"]),
        ([tiny, "--out", out, "--max-ppl-ratio", "0.5"], 1, ["max_ppl_ratio", ">= 1.0"]),
        ([tmp / "missing", "--out", out], 1, ["no such directory"]),
        ([tmp / "run", "--out", out], 1, ["without a finished final/"]),
        ([tiny, "--out", tmp / "full", "--overwrite"], 1, ["not a previous export"]),
        ([tiny, "--out", tiny], 1, ["holds the model being exported"]),
        ([tiny, "--out", tmp / "prev-with-dir", "--overwrite"], 1, ["directories mine",
                                                                    "no export writes"]),
        ([tiny, "--out", tmp / "prev-with-data", "--overwrite", "--check-data",
          tmp / "prev-with-data" / "held.jsonl"], 1, ["is inside out", "deletes once"]),
        ([tiny, "--out", out, "--check-data", tmp / "nope.jsonl"], 1, ["check_data",
                                                                        "no such file"]),
        ([tiny, "--out", out, "--check-data", bad_jsonl], 1, ["bad.jsonl:1", "`text`"]),
        (["--out", out], 1, ["MODEL is required"]),
        ([tiny], 1, ["out is required"]),
        ([tiny, "--out", out, "--no-such-flag"], 2, ["No such option"]),
    ]


def test_bad_inputs_exit_with_one_paragraph_and_write_nothing(tiny, tmp_path):
    before = sorted(p.name for p in tiny.iterdir())
    for args, code, needles in _bad_cases(tiny, tmp_path):
        result = run_cli(*args)
        assert result.exit_code == code, (args, result.output)
        for needle in needles:
            assert needle in result.output, (args, result.output)
        assert "Traceback" not in result.output
        assert not (tmp_path / "new").exists(), args
    assert (tmp_path / "full" / "notes.txt").read_text() == "mine"
    assert (tmp_path / "prev-with-dir" / "mine").is_dir()
    assert (tmp_path / "prev-with-data" / "held.jsonl").is_file()
    assert sorted(p.name for p in tiny.iterdir()) == before


def test_all_input_problems_are_reported_together(tiny, tmp_path):
    result = run_cli(tmp_path / "missing", "--out", tmp_path / "o", "--format", "x",
                     "--check-data", tmp_path / "nope.txt")
    assert result.exit_code == 1
    assert "(3 problem(s))" in result.output
    for needle in ("format", "MODEL", "check_data"):
        assert needle in result.output


def test_overwrite_replaces_a_previous_export_only(exports, tiny, tmp_path):
    _, previous = exports("torch", "none")
    out = tmp_path / "again"
    shutil.copytree(previous, out)
    refused = run_cli(tiny, "--out", out, "--format", "torch", *CHECK)
    assert refused.exit_code == 1 and "--overwrite" in refused.output
    # Settings from a YAML preset's export: section, a flag on top.
    preset = tmp_path / "export.yaml"
    preset.write_text(yaml.safe_dump({"export": {"model": str(tiny), "format": "torch",
                                                 "quantize": "int8", "check_limit": 4}}))
    replaced = run_cli("--config", preset, "--out", out, "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    manifest = json.loads((out / "export.json").read_text())
    assert (manifest["quantize"], manifest["settings"]["model"]) == ("int8", str(tiny))
    assert manifest["quality"]["data"]["sequences"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "export.yaml"]


def test_a_hub_id_not_in_the_cache_is_one_paragraph(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run_cli("no-such-org/no-such-model", "--out", tmp_path / "o")
    assert result.exit_code == 1
    assert "could not get model 'no-such-org/no-such-model'" in result.output
    assert "hf download no-such-org/no-such-model" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
