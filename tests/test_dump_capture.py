"""teacher_dump.capture: every captured signal against an independent recomputation on a
tiny local model (unpadded, one sample at a time), sampled draws against the teacher's
distribution, and the bitsandbytes 4-bit / 8-bit paths on the CPU."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from logitstore.hf import load_causal_lm  # noqa: E402
from logitstore.reader import StoreReader  # noqa: E402
from logitstore.verify import verify_store  # noqa: E402
from teacher_dump.capture import (CaptureSpec, _draw, capture_batch, make_batch,  # noqa: E402
                                  sample_uniforms)
from teacher_dump.config import resolve_config  # noqa: E402
from teacher_dump.dump import RankContext, run_dump  # noqa: E402
from tiny_hf import make_tiny_llama, make_tiny_qwen2, make_tokenizer  # noqa: E402

VOCAB = 400


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("capture")
    tok = make_tokenizer(root / "tok")
    llama_dir = make_tiny_llama(root / "llama", tok)
    qwen_dir = make_tiny_qwen2(root / "qwen", tok, vocab_size=VOCAB + 48)  # padded like Qwen2
    llama, _ = load_causal_lm(llama_dir, device="cpu", need_attentions=True)
    qwen, _ = load_causal_lm(qwen_dir, device="cpu")
    return {"llama_dir": llama_dir, "llama": llama, "qwen": qwen}


def _samples(lengths, seed=0):
    rng = np.random.default_rng(seed)
    ids = [np.concatenate([[1], rng.integers(4, VOCAB, n - 1)]).astype(np.int64) for n in lengths]
    masks = [np.arange(n) >= n // 3 for n in lengths]  # a prompt, then targets
    masks[-1][:] = False  # one sample without any target ("mean" falls back to all tokens)
    return [f"s{i}" for i in range(len(lengths))], ids, masks


def _reference(model, ids, **kwargs):
    with torch.no_grad():
        return model(torch.tensor(ids)[None], **kwargs)


LENGTHS = [9, 3, 17, 1, 12]


def test_topk_and_tail_equal_an_independent_log_softmax(tiny):
    names, ids, masks = _samples(LENGTHS)
    spec = CaptureSpec(vocab_size=VOCAB, top_k=7, logits_chunk=5)  # chunks cut across samples
    out = capture_batch(tiny["llama"], make_batch(names, ids, masks, pad_id=0, device="cpu"), spec)
    for x, data in zip(ids, out):
        logp = torch.log_softmax(_reference(tiny["llama"], x).logits[0].double(), -1)
        want_lp, want_ids = torch.topk(logp, 7, dim=-1)
        assert data.topk.ids.shape == (len(x), 7)
        assert np.array_equal(np.sort(data.topk.ids, 1), np.sort(want_ids.numpy(), 1))
        assert np.allclose(np.sort(data.topk.logprobs, 1), np.sort(want_lp.numpy(), 1), atol=1e-5)
        # tail = log(1 - sum p) of the k stored ids, exactly (not derived later)
        want_tail = np.log1p(-np.exp(want_lp.numpy()).sum(1))
        assert np.allclose(data.topk.tail_logprob, want_tail, atol=1e-5)


def test_padded_vocabulary_is_dropped_before_the_softmax(tiny):
    names, ids, masks = _samples([6, 4])
    spec = CaptureSpec(vocab_size=VOCAB, top_k=VOCAB // 2, n_draws=50)
    out = capture_batch(tiny["qwen"], make_batch(names, ids, masks, pad_id=0, device="cpu"), spec)
    for x, data in zip(ids, out):
        assert data.topk.ids.max() < VOCAB and data.sampled.ids.max() < VOCAB
        total = np.logaddexp(np.logaddexp.reduce(data.topk.logprobs.astype(np.float64), 1),
                             data.topk.tail_logprob)
        assert np.allclose(total, 0.0, atol=1e-5)  # normalised over the tokenizer's 400 ids
        logits = _reference(tiny["qwen"], x).logits[0, :, :VOCAB].double()
        want = torch.topk(torch.log_softmax(logits, -1), VOCAB // 2, -1).values.numpy()
        assert np.allclose(np.sort(data.topk.logprobs, 1), np.sort(want, 1), atol=1e-5)


@pytest.mark.parametrize("pool", ["mean", "mean-all", "last"])
def test_hidden_pools_equal_an_independent_recomputation(tiny, pool):
    names, ids, masks = _samples(LENGTHS, seed=1)
    layers = (-1, 0)
    spec = CaptureSpec(vocab_size=VOCAB, hidden_layers=layers, hidden_pool=pool)
    out = capture_batch(tiny["llama"], make_batch(names, ids, masks, pad_id=0, device="cpu"), spec)
    for x, mask, data in zip(ids, masks, out):
        states = _reference(tiny["llama"], x, output_hidden_states=True).hidden_states[1:]
        assert data.hidden.shape == (len(layers), 64)
        for row, layer in enumerate(layers):
            h = states[layer][0].double().numpy()  # [L, d]
            if pool == "last":
                want = h[-1]
            elif pool == "mean" and mask.any():
                want = h[mask].mean(0)
            else:
                want = h.mean(0)
            assert np.allclose(data.hidden[row], want, atol=1e-5), (layer, pool)


def test_hidden_layer_minus_one_is_the_final_normed_block_output(tiny):
    names, ids, masks = _samples([5])
    spec = CaptureSpec(vocab_size=VOCAB, hidden_layers=(-1,), hidden_pool="last")
    data = capture_batch(tiny["llama"], make_batch(names, ids, masks, pad_id=0, device="cpu"),
                         spec)[0]
    with torch.no_grad():
        last = tiny["llama"].model(torch.tensor(ids[0])[None]).last_hidden_state[0, -1]
    assert np.allclose(data.hidden[0], last.numpy(), atol=1e-6)


@pytest.mark.parametrize("heads", ["mean", "all"])
def test_attention_grids_equal_an_independent_recomputation(tiny, heads):
    names, ids, masks = _samples(LENGTHS, seed=2)
    spec = CaptureSpec(vocab_size=VOCAB, attention_layers=(-1, 0), attention_grid=4,
                       attention_heads=heads)
    out = capture_batch(tiny["llama"], make_batch(names, ids, masks, pad_id=0, device="cpu"), spec)
    for x, data in zip(ids, out):
        maps = _reference(tiny["llama"], x, output_attentions=True).attentions
        assert data.attention.shape == (2, 1 if heads == "mean" else 4, 4, 4)
        for row, layer in enumerate((-1, 0)):
            a = maps[layer][0].double()  # [H, L, L]
            if heads == "mean":
                a = a.mean(0, keepdim=True)
            want = F.adaptive_avg_pool2d(a, 4).numpy()
            assert np.allclose(data.attention[row], want, atol=1e-6), (layer, len(x))


# ----------------------------------------------------------------------------- sampling


def _g_test_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    """G-test of observed counts against probabilities; bins expecting < 5 are merged."""
    n = counts.sum()
    expected = probs * n
    keep = expected >= 5
    obs = np.append(counts[keep], counts[~keep].sum())
    exp = np.append(expected[keep], expected[~keep].sum())
    if exp[-1] == 0:
        assert obs[-1] == 0
        obs, exp = obs[:-1], exp[:-1]
    nz = obs > 0
    g = 2.0 * float((obs[nz] * np.log(obs[nz] / exp[nz])).sum())
    df = len(obs) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(g / 2, dtype=torch.float64)))


def _dense_counts(data, t: int) -> np.ndarray:
    ids, counts, _ = data.sampled.position(t)
    dense = np.zeros(VOCAB, dtype=np.int64)
    dense[ids] = counts
    return dense


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_sampled_counts_follow_the_teacher_distribution(tiny, temperature):
    n = 20000
    names, ids, masks = _samples([6, 4], seed=3)
    spec = CaptureSpec(vocab_size=VOCAB, n_draws=n, temperature=temperature, seed=11)
    out = capture_batch(tiny["llama"], make_batch(names, ids, masks, pad_id=0, device="cpu"), spec)
    for x, data in zip(ids, out):
        logits = _reference(tiny["llama"], x).logits[0].double()
        logp = torch.log_softmax(logits, -1).numpy()
        probs = torch.softmax(logits / temperature, -1).numpy()
        for t in range(len(x)):
            ids_t, counts_t, lps_t = data.sampled.position(t)
            assert counts_t.sum() == n and len(np.unique(ids_t)) == len(ids_t)
            assert np.allclose(lps_t, logp[t, ids_t], atol=1e-5)  # log p at T=1
            assert _g_test_pvalue(_dense_counts(data, t), probs[t]) > 1e-4, (t, temperature)


def test_draw_matches_a_peaked_distribution_and_never_draws_impossible_ids():
    # A known distribution with exact zeros (-inf logits) at both ends and in the middle.
    logits = torch.full((3, 50), float("-inf"))
    logits[:, 1:20] = torch.linspace(4, -4, 19)
    logits[:, 25:49] = torch.linspace(0, -6, 24)
    logp = torch.log_softmax(logits, -1)
    u = torch.rand(3, 40000, generator=torch.Generator().manual_seed(5))
    rows, ids, counts = _draw(logits, logp, u, 1.0)
    assert torch.isfinite(logp[rows, ids]).all()  # only ids with p > 0
    for r in range(3):
        dense = np.zeros(50, dtype=np.int64)
        dense[ids[rows == r].numpy()] = counts[rows == r].numpy()
        assert dense.sum() == 40000
        assert _g_test_pvalue(dense, logp[r].exp().double().numpy()) > 1e-4


def test_draws_depend_on_seed_and_sample_id_only(tiny):
    names, ids, masks = _samples([8, 5, 11], seed=4)
    spec = CaptureSpec(vocab_size=VOCAB, n_draws=64, seed=3)
    together = capture_batch(tiny["llama"], make_batch(names, ids, masks, pad_id=0, device="cpu"),
                             spec)
    alone = capture_batch(tiny["llama"], make_batch(names[1:2], ids[1:2], masks[1:2], pad_id=0,
                                                    device="cpu"), spec)[0]
    for key in ("offsets", "ids", "counts"):
        assert np.array_equal(getattr(together[1].sampled, key), getattr(alone.sampled, key))
    assert torch.equal(sample_uniforms(3, "s1", 5, 4), sample_uniforms(3, "s1", 5, 4))
    assert not torch.equal(sample_uniforms(3, "s1", 5, 4), sample_uniforms(4, "s1", 5, 4))
    assert not torch.equal(sample_uniforms(3, "s1", 5, 4), sample_uniforms(3, "s2", 5, 4))


# ----------------------------------------------------------------------------- bitsandbytes


@pytest.mark.parametrize("quantize", ["4bit", "8bit"])
def test_bitsandbytes_dump_on_cpu_writes_a_valid_store(tiny, tmp_path, quantize):
    pytest.importorskip("bitsandbytes")
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"The patient reports chest pain {i}."})
                              for i in range(4)) + "\n")
    cfg = resolve_config(None, dict(model=str(tiny["llama_dir"]), data=[str(data)],
                                    out=str(tmp_path / "store"), quantize=quantize, device="cpu",
                                    top_k=4, samples=8, hidden_layers="-1"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CPU quantization is slow"
        report = run_dump(cfg, ranks=RankContext(), progress=False)
    assert report.samples_written == 4
    assert verify_store(str(tmp_path / "store")) == []
    store = StoreReader(str(tmp_path / "store"))
    assert store.settings.signals["llama"].teacher["quantization"] == quantize
    sample = store.sample(0)
    lps = sample.signals["llama"].topk.logprobs
    assert np.isfinite(lps).all() and (lps <= 0).all()
