"""The models of bench/serve_bench.py, their tokenizers and their exports (cached).

models      demo-student  the demo's KD student (demo_out/runs/student/final) when `make demo`
                          has run; else a stand-in: a random-init Llama of the demo student's
                          shape (demo/configs/default.yaml `demo.student`, context 512) with the
                          demo's tokenizer recipe (byte-level BPE, 5,120 entries, trained on the
                          demo corpus's train.jsonl)
            llama-100m    a random-init Llama, 100.1M parameters: hidden 768, 12 layers, 12
                          heads, 4 KV heads, MLP 2048, tied embeddings (as Llama 3.2 1B), V =
                          32,000 from a byte-level BPE trained here to exactly 32,000 entries
                          on the demo corpus plus the docstrings of Python's standard library,
                          numpy and torch (bench/fidelity_corpus.py's sources)
            tiny          --quick only: hidden 64, 2 layers, a 512-entry BPE
variants    torch-fp32 (the model directory), onnx-fp32 and onnx-int8 (`student-export
            --format onnx [--quantize int8]`, run as a subprocess with its quality gate)

Everything is built under the cache directory and reused while its key (settings, and for
exports the exporter's code) is unchanged.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO_STUDENT = ROOT / "demo_out" / "runs" / "student" / "final"
SHAPE_100M = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                  num_attention_heads=12, num_key_value_heads=4, tie_word_embeddings=True)
SHAPE_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
# Sources of the 32k tokenizer's text besides the demo corpus (bench/fidelity_corpus.py).
TOKENIZER_SOURCES = ["pydoc-topics", "stdlib", "numpy", "torch"]
EXPORTER_CODE = ("student_export", "logitstore/toolkit/onnx_lm.py",
                 "logitstore/toolkit/inference.py")


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def demo_corpus(cache: Path) -> Path:
    """demo/make_corpus.py at the demo's default settings -> cache/corpus (train, heldout)."""
    out = cache / "corpus"
    if not (out / "heldout.jsonl").is_file():
        subprocess.run([sys.executable, str(ROOT / "demo" / "make_corpus.py"), "--out", str(out),
                        "--seed", "0", "--scale", "1.2", "--entities", "24"], check=True,
                       stdout=subprocess.DEVNULL, cwd=ROOT)
    return out


def read_jsonl_texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]


def tokenizer(cache: Path, vocab_size: int, *, extra_sources: bool) -> Path:
    """A byte-level BPE of `vocab_size` entries (the demo's recipe), cached."""
    out = cache / f"tokenizer-{vocab_size}{'-mixed' if extra_sources else ''}"
    if (out / "tokenizer.json").is_file():
        return out
    sys.path.insert(0, str(ROOT / "bench"))
    from fidelity_corpus import _train_tokenizer, collect_units

    texts = read_jsonl_texts(demo_corpus(cache) / "train.jsonl")
    if extra_sources:
        texts += list(collect_units(TOKENIZER_SOURCES, 80).values())
    _train_tokenizer(texts, vocab_size, out)
    return out


def random_llama(directory: Path, tokenizer_dir: Path, shape: dict, *, context: int,
                 seed: int) -> Path:
    """A seeded random-init Llama of `shape` with the tokenizer -> directory (cached)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (directory / "config.json").is_file():
        return directory
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tok), max_position_embeddings=context,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, **shape)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(directory)
    return directory


def demo_student_shape() -> dict:
    import yaml

    demo = yaml.safe_load((ROOT / "demo" / "configs" / "default.yaml").read_text())["demo"]
    return {**demo["student"], "tie_word_embeddings": False}, demo["context"]


def build_models(cache: Path, quick: bool) -> list[dict]:
    """[{"name", "path", "description", "max_length"}] of the bench's models (built or reused)."""
    cache.mkdir(parents=True, exist_ok=True)
    if quick:
        tok = tokenizer(cache, 512, extra_sources=False)
        path = random_llama(cache / "tiny", tok, SHAPE_TINY, context=256, seed=0)
        models = [{"name": "tiny", "path": str(path), "max_length": 256,
                   "description": "random-init Llama, hidden 64, 2 layers, 512-entry BPE"}]
    else:
        models = full_models(cache)
    for model in models:
        model["parameters"] = parameters(Path(model["path"]))
    return models


def full_models(cache: Path) -> list[dict]:
    models = []
    if (DEMO_STUDENT / "config.json").is_file():
        models.append({"name": "demo-student", "path": str(DEMO_STUDENT), "max_length": 512,
                       "description": "the demo's KD student (demo_out/runs/student/final)"})
    else:
        shape, context = demo_student_shape()
        tok = tokenizer(cache, 5120, extra_sources=False)
        path = random_llama(cache / "demo-student-standin", tok, shape, context=context, seed=1)
        models.append({"name": "demo-student", "path": str(path), "max_length": context,
                       "description": "stand-in (demo_out absent): random-init Llama of the "
                                      "demo student's shape and tokenizer recipe"})
    tok = tokenizer(cache, 32000, extra_sources=True)
    path = random_llama(cache / "llama-100m", tok, SHAPE_100M, context=2048, seed=0)
    models.append({"name": "llama-100m", "path": str(path), "max_length": 512,
                   "description": "random-init Llama, hidden 768, 12 layers, 12 heads / 4 KV "
                                  "heads, MLP 2048, tied embeddings, V = 32,000"})
    return models


def parameters(model_dir: Path) -> int:
    """Parameters of a saved model (tied embeddings counted once, as torch does)."""
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "np") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def exporter_hash() -> str:
    files = []
    for item in EXPORTER_CODE:
        path = ROOT / item
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return _key(*(hashlib.sha256(f.read_bytes()).hexdigest() for f in files))


def export(model: dict, quantize: str, cache: Path, *, check_limit: int) -> dict:
    """`student-export MODEL --format onnx --quantize Q` (a subprocess) -> cache, reused while
    the model, the settings and the exporter's code are unchanged; {"path", "seconds",
    "quality"} with the command's quality gate figures (export.json)."""
    settings = {"model": model["path"], "quantize": quantize, "max_length": model["max_length"],
                "check_limit": check_limit}
    key = _key(settings, exporter_hash(), (Path(model["path"]) / "config.json").read_text())
    out = cache / "exports" / f"{model['name']}-onnx-{quantize}"
    done = out / "bench_key.json"
    if done.is_file() and json.loads(done.read_text()).get("key") == key:
        record = json.loads(done.read_text())
        return {**record, "reused": True, "quality": _quality(out)}
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "student_export", model["path"], "--out", str(out),
               "--format", "onnx", "--quantize", quantize, "--max-length",
               str(model["max_length"]), "--check-limit", str(check_limit)]
    started = time.perf_counter()
    done_process = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - started
    if done_process.returncode != 0:
        tail = (done_process.stdout + done_process.stderr)[-2000:]
        raise RuntimeError(f"student-export failed (exit {done_process.returncode}) for "
                           f"{model['name']} {quantize}:\n{tail}")
    record = {"key": key, "path": str(out), "seconds": seconds,
              "command": "student-export " + " ".join(command[3:])}
    done.write_text(json.dumps(record))
    return {**record, "reused": False, "quality": _quality(out)}


def _quality(directory: Path) -> dict:
    return json.loads((directory / "export.json").read_text()).get("quality") or {}


def weight_bytes(directory: Path) -> int:
    """Bytes of a model's or export's weight files (model.onnx + data, or safetensors)."""
    suffixes = (".onnx", ".data", ".safetensors")
    return sum(f.stat().st_size for f in Path(directory).iterdir()
               if f.is_file() and f.name.endswith(suffixes))
