"""ONNX export of tiny Llama / Qwen2 models with a KV cache, its INT8 version, and OnnxLM.

Each model is exported once per module (a few seconds each); the export directories are
assembled here the way student-export lays them out (graph, tokenizer, generation config,
export.json), so OnnxLM and load_inference_model are tested on what serving will read.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from tiny_hf import make_tiny_llama, make_tiny_qwen2, make_tokenizer  # noqa: E402

from logitstore.toolkit.inference import GenerationSettings, load_inference_model  # noqa: E402
from logitstore.toolkit.onnx_lm import OnnxExportLoadError, OnnxLM  # noqa: E402
from student_export.onnx_graph import (  # noqa: E402
    OnnxExportError,
    check_exportable,
    export_onnx,
    quantize_onnx_int8,
)

MAX_LENGTH = 128
# INT8 tolerances, from measurement: on the tiny random-init Llama below the largest next-token
# log-prob difference to fp32 was 0.014 (mean 0.002) and the perplexity ratio 0.9998; a trained
# demo-size Llama (hidden 256, 4 layers) gave 0.68 on rare tokens, mean 0.05, ratio 1.0001.
# The log-prob bound leaves ~3.5x headroom over the tiny model's figure.
INT8_MAX_LOGPROB_DIFF = 0.05
INT8_MAX_PPL_RATIO = 1.02


def _write_export_dir(directory: Path, model_dir: Path, section: dict, quantize: str) -> Path:
    """The files student-export writes next to the graph: tokenizer, configs, export.json."""
    from transformers import AutoTokenizer, GenerationConfig

    AutoTokenizer.from_pretrained(str(model_dir)).save_pretrained(directory)
    GenerationConfig.from_pretrained(str(model_dir)).save_pretrained(directory)
    shutil.copy(model_dir / "config.json", directory / "config.json")
    manifest = {"format_version": 1, "format": "onnx", "quantize": quantize,
                "max_length": MAX_LENGTH, "onnx": section}
    (directory / "export.json").write_text(json.dumps(manifest))
    return directory


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """{"llama"|"qwen2": (torch model, fp32 export dir)} plus "llama-int8": (None, dir)."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("onnx")
    make_tokenizer(root / "tok")
    built = {}
    for name, make in (("llama", make_tiny_llama), ("qwen2", make_tiny_qwen2)):
        model_dir = make(root / f"{name}-hf", root / "tok")
        model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
        section = export_onnx(model, root / name, max_length=MAX_LENGTH)
        built[name] = (model, _write_export_dir(root / name, model_dir, section, "none"))
    int8_dir = root / "llama-int8"
    settings = quantize_onnx_int8(root / "llama" / "model.onnx", int8_dir / "model.onnx")
    assert settings["weight_type"] == "QInt8"
    section = json.loads((root / "llama" / "export.json").read_text())["onnx"]
    built["llama-int8"] = (None, _write_export_dir(int8_dir, root / "llama-hf", section, "int8"))
    return built


def _two_prompts() -> list[list[int]]:
    return [[1, 40, 41, 42, 43, 44, 45, 46, 47], [1, 60, 61, 62]]


def _torch_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].numpy()  # [T, V]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_left_padded_batch_logits_equal_each_prompt_alone_in_torch(exports, arch):
    model, directory = exports[arch]
    lm = load_inference_model(directory, threads=1)
    assert isinstance(lm, OnnxLM) and lm.kind == "onnx-fp32" and lm.max_length == MAX_LENGTH
    from logitstore.toolkit.inference import left_pad

    prompts = _two_prompts()
    ids, mask = left_pad(prompts, lm.pad_token_id)
    logits = lm.logits(ids, mask)  # [2, 9, V]
    assert logits.dtype == np.float32 and logits.shape == (2, 9, model.config.vocab_size)
    for row, prompt in enumerate(prompts):
        real = logits[row, ids.shape[1] - len(prompt):]
        np.testing.assert_allclose(real, _torch_logits(model, prompt), atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_prefill_then_five_cached_decode_steps_equal_a_full_forward(exports, arch):
    model, directory = exports[arch]
    lm = load_inference_model(directory, threads=1)
    from logitstore.toolkit.inference import left_pad

    prompts = _two_prompts()
    ids, mask = left_pad(prompts, lm.pad_token_id)
    logits, past = lm.forward(ids, mask, None)
    steps = [[70, 71, 72, 73, 74], [80, 81, 82, 83, 84]]
    for k in range(5):
        step = np.array([[row[k]] for row in steps], dtype=np.int64)  # [2, 1]
        mask = np.concatenate([mask, np.ones((2, 1), dtype=np.int64)], axis=1)
        logits, past = lm.forward(step, mask, past)
        assert logits.shape == (2, 1, model.config.vocab_size)
    assert past[0].shape() == [2, model.config.num_key_value_heads, 9 + 5, 16]
    for row, prompt in enumerate(prompts):
        full = _torch_logits(model, prompt + steps[row])  # [len + 5, V]
        np.testing.assert_allclose(logits[row, -1], full[-1], atol=1e-4, rtol=0)


def test_int8_graph_is_smaller_and_its_log_probs_stay_close(exports):
    _, fp32_dir = exports["llama"]
    _, int8_dir = exports["llama-int8"]

    def size(directory: Path) -> int:
        return sum(p.stat().st_size for p in directory.glob("model.onnx*"))

    assert size(int8_dir) < 0.7 * size(fp32_dir)
    fp32 = load_inference_model(fp32_dir, threads=1)
    int8 = load_inference_model(int8_dir, threads=1)
    assert int8.kind == "onnx-int8"
    ids = np.array([list(range(5, 120))], dtype=np.int64)
    mask = np.ones_like(ids)
    reference = _log_softmax(fp32.logits(ids, mask)[0, :-1].astype(np.float64))
    quantized = _log_softmax(int8.logits(ids, mask)[0, :-1].astype(np.float64))
    assert np.abs(quantized - reference).max() < INT8_MAX_LOGPROB_DIFF
    targets = ids[0, 1:]
    positions = np.arange(len(targets))
    ratio = np.exp(reference[positions, targets].mean() - quantized[positions, targets].mean())
    assert ratio <= INT8_MAX_PPL_RATIO


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_generate_equals_the_torch_models_generate(exports, arch):
    model, directory = exports[arch]
    lm = load_inference_model(directory, threads=1)
    prompts = _two_prompts()
    got = lm.generate(prompts, GenerationSettings(max_new_tokens=12))
    for prompt, generation in zip(prompts, got):
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
        expected = out[0, len(prompt):].tolist()
        if expected and expected[-1] in lm.eos_token_ids:
            expected = expected[:-1]
        assert generation.token_ids == expected
        assert generation.prompt_tokens == len(prompt)


def test_fp32_batched_greedy_rows_equal_rows_alone_over_many_steps(exports):
    """Left padding of 1 to 11 positions, 24 decode steps, rows stopping at different
    lengths: position ids and the cache stay right for every row."""
    _, directory = exports["llama"]
    lm = load_inference_model(directory, threads=1)
    prompts = [[1, *range(40, 51)], [1, 60], [1, 70, 71, 72, 73, 74]]
    per_row = [GenerationSettings(max_new_tokens=n) for n in (24, 9, 17)]
    batched = lm.generate(prompts, per_row)
    alone = [lm.generate([p], s)[0] for p, s in zip(prompts, per_row)]
    assert [g.token_ids for g in batched] == [g.token_ids for g in alone]
    assert [len(g.token_ids) for g in batched] == [24, 9, 17]


def test_int8_rows_move_little_with_their_batch_mates(exports):
    """onnxruntime's dynamic quantization takes one activation scale per tensor, so a row's
    int8 logits shift a little with the rest of the batch (documented on
    InferenceModel.generate); the shift must stay far below the int8 error itself."""
    _, directory = exports["llama-int8"]
    lm = load_inference_model(directory, threads=1)
    from logitstore.toolkit.inference import left_pad

    prompts = _two_prompts()
    ids, mask = left_pad(prompts, lm.pad_token_id)
    batched = lm.logits(ids, mask)
    for row, prompt in enumerate(prompts):
        alone = lm.logits(np.array([prompt]), np.ones((1, len(prompt)), np.int64))[0]
        shift = np.abs(batched[row, ids.shape[1] - len(prompt):] - alone).max()
        assert shift < INT8_MAX_LOGPROB_DIFF


def test_a_one_token_prompt_alone_runs_the_smallest_shapes(exports):
    """Batch 1, one new position, an empty cache: sizes torch.export could have fixed."""
    model, directory = exports["llama"]
    lm = load_inference_model(directory, threads=1)
    logits = lm.logits(np.array([[1]]), np.array([[1]]))
    np.testing.assert_allclose(logits[0], _torch_logits(model, [1]), atol=1e-4, rtol=0)
    assert len(lm.generate([[1]], GenerationSettings(max_new_tokens=3))[0].token_ids) <= 3


def test_unsupported_architecture_is_refused_in_one_paragraph(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(OnnxExportError) as caught:
        check_exportable(model)
    message = str(caught.value)
    assert "gpt2" in message and "--format torch" in message and "\n" not in message
    with pytest.raises(OnnxExportError):
        export_onnx(model, tmp_path / "out", max_length=64)
    assert not (tmp_path / "out" / "model.onnx").exists()


def test_max_length_outside_the_models_positions_is_refused(exports, tmp_path):
    model, _ = exports["llama"]
    for bad in (1, model.config.max_position_embeddings + 1):
        with pytest.raises(OnnxExportError, match="pass a --max-length in that range"):
            export_onnx(model, tmp_path / "out", max_length=bad)
    assert not (tmp_path / "out").exists()


def test_a_failed_trace_is_a_one_paragraph_error(exports, tmp_path, monkeypatch):
    model, _ = exports["llama"]

    def fail(*args, **kwargs):
        raise RuntimeError("Unsupported: data-dependent control flow\n  (long torch trace)")

    monkeypatch.setattr(torch.onnx, "export", fail)
    with pytest.raises(OnnxExportError) as caught:
        export_onnx(model, tmp_path / "out", max_length=64)
    message = str(caught.value)
    assert "data-dependent control flow" in message and "--format torch" in message
    assert "\n" not in message


def _copy_export(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


@pytest.mark.parametrize("lost, expected", [
    ("model.onnx", "no model.onnx"),
    ("model.onnx.data", "damaged or incomplete"),
])
def test_export_dir_missing_a_graph_file_is_a_one_paragraph_error(exports, tmp_path, lost,
                                                                   expected):
    directory = _copy_export(exports["llama"][1], tmp_path / "broken")
    (directory / lost).unlink()
    with pytest.raises(OnnxExportLoadError) as caught:
        load_inference_model(directory)
    assert expected in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("damage, expected", [
    (lambda m: m.pop("onnx"), 'no "onnx" section'),
    (lambda m: m["onnx"].update(num_kv_heads="two"), "num_kv_heads (expected int"),
    (lambda m: m["onnx"].update(num_layers=3), "for num_layers 3"),
    (lambda m: m.update(max_length=None), "max_length a positive integer"),
    (lambda m: m["onnx"].update(
        input_names=[n.replace("past_key_values", "past") for n in m["onnx"]["input_names"]]),
     "come from different exports"),
])
def test_a_wrong_manifest_is_a_one_paragraph_error(exports, tmp_path, damage, expected):
    directory = _copy_export(exports["llama"][1], tmp_path / "wrong")
    manifest = json.loads((directory / "export.json").read_text())
    damage(manifest)
    (directory / "export.json").write_text(json.dumps(manifest))
    with pytest.raises(OnnxExportLoadError) as caught:
        load_inference_model(directory)
    assert expected in str(caught.value) and "\n" not in str(caught.value)


def test_int8_of_a_missing_graph_or_onto_itself_is_refused(exports, tmp_path):
    with pytest.raises(OnnxExportError, match="no such ONNX file"):
        quantize_onnx_int8(tmp_path / "absent.onnx", tmp_path / "out" / "model.onnx")
    graph = exports["llama"][1] / "model.onnx"
    with pytest.raises(OnnxExportError, match="onto itself"):
        quantize_onnx_int8(graph, graph)


def test_quantising_again_replaces_the_data_file_and_keeps_it_readable(exports, tmp_path):
    """onnxruntime appends to an existing .data file; a second run must not double it."""
    graph = exports["llama"][1] / "model.onnx"
    settings = quantize_onnx_int8(graph, tmp_path / "model.onnx")
    data = tmp_path / settings["data_file"]
    first = data.stat().st_size
    quantize_onnx_int8(graph, tmp_path / "model.onnx")
    assert data.stat().st_size == first
    assert data.stat().st_mode & 0o777 == (tmp_path / "model.onnx").stat().st_mode & 0o777
