"""logitstore.toolkit.hf (model resolution, loading: plain, eager, bitsandbytes 4/8-bit, errors)
and logitstore.toolkit.tokenizer_identity (tokenizer fingerprints, vocabulary checks), all on
tiny local models."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from logitstore.errors import ConfigError, LogitStoreError
from logitstore.toolkit.hf import (
    DEFAULT_MODELS_FILE,
    ModelLoadError,
    ModelSpec,
    load_aliases,
    load_causal_lm,
    load_tokenizer,
    resolve_model,
)
from logitstore.toolkit.tokenizer_identity import (
    VocabMismatchError,
    check_vocab_compat,
    tokenizer_fingerprint,
    vocab_size_of,
)
from tiny_hf import make_tiny_llama, make_tiny_qwen2, make_tokenizer

torch = pytest.importorskip("torch")

FAKE_HUB_ID = "logitstore-test-org/no-such-model"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_hf")
    tok_dir = make_tokenizer(root / "tok")
    return {
        "tok": tok_dir,
        "llama": make_tiny_llama(root / "llama", tok_dir),
        "qwen_padded": make_tiny_qwen2(root / "qwen", tok_dir, vocab_size=400 + 48),
    }


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1 for this test, also in the already-imported hub library."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _ids(*tokens):
    return torch.tensor([list(tokens)])


# ----------------------------------------------------------------------------- resolution


def test_import_logitstore_hf_does_not_import_torch():
    code = (
        "import sys, logitstore, logitstore.toolkit.hf;"
        "sys.exit('torch' in sys.modules or 'transformers' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_bundled_aliases_resolve_to_hub_ids():
    expected = {
        "med42": "m42-health/Llama3-Med42-8B",
        "llama3-8b": "meta-llama/Meta-Llama-3-8B",
        "llama3.2-1b": "meta-llama/Llama-3.2-1B-Instruct",
        "qwen2-1.5b": "Qwen/Qwen2-1.5B",
        "qwen2-0.5b": "Qwen/Qwen2-0.5B",
        "medgemma-4b": "google/medgemma-4b-it",
    }
    assert DEFAULT_MODELS_FILE.read_text().startswith("#")
    assert set(expected) <= set(load_aliases())
    for alias, hub_id in expected.items():
        spec = resolve_model(alias)
        assert (spec.name, spec.path_or_id, spec.is_local) == (alias, hub_id, False)
        assert spec.defaults["dtype"] in ("bfloat16", "float16", "float32", "auto")
    assert resolve_model("qwen2-0.5b").defaults["license"] == "apache-2.0"


def test_models_file_env_override_and_validation(tmp_path, monkeypatch, tiny):
    custom = tmp_path / "models.yaml"
    custom.write_text(f"mine:\n  hub_id: {tiny['llama']}\n  dtype: float32\n  revision: v1\n")
    monkeypatch.setenv("LOGITSTORE_MODELS", str(custom))
    spec = resolve_model("mine")
    assert spec.is_local and spec.path_or_id == str(Path(tiny["llama"]).resolve())
    assert spec.revision == "v1" and spec.defaults == {"dtype": "float32"}
    assert resolve_model("mine", revision="v2").revision == "v2"

    custom.write_text("broken:\n  dtype: int3\n")
    with pytest.raises(ConfigError, match="hub_id"):
        resolve_model("broken")


def test_local_directory_and_hub_ids(tiny):
    local = resolve_model(str(tiny["llama"]))
    assert local.is_local and local.path_or_id == str(Path(tiny["llama"]).resolve())
    hub = resolve_model("Qwen/Qwen2.5-0.5B", revision="main")
    assert hub == ModelSpec("Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B", False, "main", {})
    # A hub id that an alias points at gets the alias's defaults.
    assert resolve_model("Qwen/Qwen2-0.5B").defaults["license"] == "apache-2.0"
    with pytest.raises(ModelLoadError, match="not an existing directory"):
        resolve_model("./no/such dir!")


# ----------------------------------------------------------------------------- errors


def test_offline_missing_hub_model_gives_one_clear_paragraph(offline):
    for load in (load_tokenizer, lambda s: load_causal_lm(s, device="cpu")):
        with pytest.raises(ModelLoadError) as info:
            load(FAKE_HUB_ID)
        message = str(info.value)
        assert isinstance(info.value, LogitStoreError) and isinstance(info.value, ValueError)
        assert "\n" not in message
        assert f"hub id {FAKE_HUB_ID}" in message
        assert "HF_HUB_OFFLINE=1" in message
        assert "huggingface" in message.lower() and "cache" in message  # where it looked
        assert f"hf download {FAKE_HUB_ID}" in message
        assert "local directory" in message


def test_local_directory_without_weights_is_a_clear_error(tmp_path, offline):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="local directory .*config.json"):
        load_causal_lm(tmp_path / "empty", device="cpu")


def test_bad_quantize_value_is_rejected(tiny):
    with pytest.raises(ConfigError, match="quantize"):
        load_causal_lm(tiny["llama"], quantize="3bit", device="cpu")


# ----------------------------------------------------------------------------- loading


def test_load_on_cpu_defaults(tiny):
    model, info = load_causal_lm(tiny["llama"], device="cpu")
    assert not model.training
    assert info.quantization == "none" and info.device == "cpu"
    assert info.dtype == "float32" and info.hub_id == str(Path(tiny["llama"]).resolve())
    assert info.is_local and info.commit_hash is None and info.model_class == "LlamaForCausalLM"
    assert info.attn_implementation != "eager"
    assert model(_ids(1, 5, 6)).logits.shape == (1, 3, 400)
    assert load_tokenizer(tiny["llama"]).eos_token == "</s>"


def test_dtype_is_applied(tiny):
    model, info = load_causal_lm(tiny["llama"], dtype="bfloat16", device="cpu")
    assert model.dtype == torch.bfloat16 and info.dtype == "bfloat16"


def test_need_attentions_loads_eager_and_returns_attention_maps(tiny):
    model, info = load_causal_lm(tiny["llama"], device="cpu", need_attentions=True)
    assert info.attn_implementation == "eager"
    out = model(_ids(1, 5, 6, 7), output_attentions=True)
    assert len(out.attentions) == 2
    assert all(a.shape == (1, 4, 4, 4) for a in out.attentions)  # (batch, heads, q, k)
    assert torch.allclose(out.attentions[0].sum(-1), torch.ones(1, 4, 4))


def test_commit_hash_read_from_hf_cache_snapshot_path(tmp_path, tiny):
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "models--org--tiny" / "snapshots" / commit
    shutil.copytree(tiny["llama"], snapshot)
    _, info = load_causal_lm(snapshot, device="cpu")
    assert info.commit_hash == commit


@pytest.mark.parametrize(
    ("quantize", "layer_class"), [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")]
)
def test_bitsandbytes_quantized_forward_on_cpu(tiny, quantize, layer_class):
    pytest.importorskip("bitsandbytes")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, info = load_causal_lm(tiny["llama"], quantize=quantize, device="cpu")
    assert any("slow" in str(w.message) for w in caught), "CPU quantization must warn"
    assert info.quantization == quantize
    q_proj = model.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == layer_class
    with torch.no_grad():
        logits = model(_ids(1, 5, 6, 7)).logits
    assert logits.shape == (1, 4, 400) and torch.isfinite(logits).all()


# ----------------------------------------------------------------------------- fingerprint


def test_fingerprint_stable_across_save_reload_and_processes(tmp_path, tiny):
    tokenizer = load_tokenizer(tiny["tok"])
    fingerprint = tokenizer_fingerprint(tokenizer)
    assert len(fingerprint) == 64 and fingerprint == tokenizer_fingerprint(tokenizer)

    tokenizer.save_pretrained(tmp_path / "copy")
    assert tokenizer_fingerprint(load_tokenizer(tmp_path / "copy")) == fingerprint
    # The model directory carries its own copy of the same tokenizer.
    assert tokenizer_fingerprint(load_tokenizer(tiny["llama"])) == fingerprint

    # Another process (another hash seed) computing it from the backend alone agrees.
    code = textwrap.dedent(f"""
        from tokenizers import Tokenizer
        from logitstore.toolkit.tokenizer_identity import tokenizer_fingerprint
        class Shim:
            backend_tokenizer = Tokenizer.from_file({str(tmp_path / "copy" / "tokenizer.json")!r})
        print(tokenizer_fingerprint(Shim()))
    """)
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONHASHSEED": "123"}
    )
    assert other.stdout.strip() == fingerprint, other.stderr


def test_fingerprint_changes_when_one_token_changes(tmp_path, tiny):
    tokenizer = load_tokenizer(tiny["tok"])
    original = tokenizer_fingerprint(tokenizer)

    state = json.loads((Path(tiny["tok"]) / "tokenizer.json").read_text())
    vocab = state["model"]["vocab"]
    # Swap the ids of two tokens (renaming one would break the merges that build it).
    a, b = (next(t for t, i in vocab.items() if i == n) for n in (300, 301))
    vocab[a], vocab[b] = 301, 300
    shutil.copytree(tiny["tok"], tmp_path / "edited")
    (tmp_path / "edited" / "tokenizer.json").write_text(json.dumps(state))
    assert tokenizer_fingerprint(load_tokenizer(tmp_path / "edited")) != original

    tokenizer.add_tokens(["<specialty>"])
    assert tokenizer_fingerprint(tokenizer) != original


def test_fingerprint_fallback_for_slow_tokenizers():
    class SlowTokenizer:
        def __init__(self, vocab):
            self.vocab = vocab
            self.all_special_tokens = ["<s>"]

        def get_vocab(self):
            return dict(self.vocab)

        def convert_tokens_to_ids(self, token):
            return self.vocab[token]

    a = tokenizer_fingerprint(SlowTokenizer({"<s>": 0, "a": 1, "b": 2}))
    assert a == tokenizer_fingerprint(SlowTokenizer({"b": 2, "a": 1, "<s>": 0}))
    assert a != tokenizer_fingerprint(SlowTokenizer({"<s>": 0, "a": 1, "c": 2}))


# ----------------------------------------------------------------------------- vocabulary


def test_vocab_compat_accepts_padded_embeddings_and_rejects_short_ones(tiny, tmp_path):
    tokenizer = load_tokenizer(tiny["tok"])
    assert vocab_size_of(tokenizer) == len(tokenizer) == 400
    llama, _ = load_causal_lm(tiny["llama"], device="cpu")
    assert check_vocab_compat(tokenizer, llama) == 0
    qwen, _ = load_causal_lm(tiny["qwen_padded"], device="cpu")
    assert check_vocab_compat(tokenizer, qwen) == 48

    tokenizer.add_tokens(["<new-token>"])  # now 401 tokens, the llama has 400 rows
    with pytest.raises(VocabMismatchError, match="401 tokens"):
        check_vocab_compat(tokenizer, llama)
