"""teacher_dump.capture and teacher_dump.token_signals: every captured signal against an
independent recomputation on a tiny local model (unpadded, one sample at a time), the tail
on extreme rows, sampled draws against the teacher's distribution and against a float64
inverse-CDF reference, the LM head computed by chunks against the full forward, the
compiled group statistics against eager ones, and the bitsandbytes 4-bit / 8-bit paths
on the CPU."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from logitstore.toolkit.hf import load_causal_lm  # noqa: E402
from logitstore.reader import StoreReader  # noqa: E402
from logitstore.verify import verify_store  # noqa: E402
from teacher_dump.capture import (CaptureSpec, capture_batch, capture_outputs,  # noqa: E402
                                  lm_head_of, make_batch, run_model)
from teacher_dump.logit_stats import group_stats, resolve_kernel  # noqa: E402
from teacher_dump.token_signals import (_logsumexp, _topk_and_tail, draw,  # noqa: E402
                                        plan_chunks, sample_uniforms)
from teacher_dump.config import resolve_config  # noqa: E402
from teacher_dump.dump import run_dump  # noqa: E402
from teacher_dump.ranks import RankContext  # noqa: E402
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


def _synthetic_batch(logits: torch.Tensor):
    """A Batch whose every position is real, for logits [B, S, V] built by hand."""
    b, s, _ = logits.shape
    return make_batch([f"x{i}" for i in range(b)], [np.ones(s, dtype=np.int64)] * b,
                      [np.ones(s, dtype=bool)] * b, pad_id=0, device="cpu")


def test_tail_is_exact_on_very_peaked_rows():
    # Rows whose mass outside the top k is 1e-12, 1e-30 and 1e-50 (where every fp32
    # probability outside underflows to 0), and a flat row; V = 5000 is not a multiple of
    # the top-k's column groups, k = 4 small enough for the two-stage top-k.
    vocab, k = 5000, 4
    logits = torch.zeros(1, 4, vocab)
    for row, mass in enumerate([1e-12, 1e-30, 1e-50]):
        # k ids at logit 0 and V - k at b: the outside mass is (V-k) e^b / (k + (V-k) e^b)
        b = float(np.log(mass * k / ((vocab - k) * (1 - mass))))
        logits[0, row] = b
        logits[0, row, [7, 300, 4100, 4999]] = 0.0
    logits[0, 3] = torch.linspace(-1, 1, vocab)
    data = capture_outputs(logits, None, None, _synthetic_batch(logits),
                           CaptureSpec(vocab_size=vocab, top_k=k))[0]
    exact = torch.log_softmax(logits[0].double(), -1)  # [4, V]
    want_lp, want_ids = torch.topk(exact, k, -1)
    outside = exact.scatter(-1, want_ids, float("-inf")).logsumexp(-1).numpy()
    assert np.allclose(outside[:3], np.log([1e-12, 1e-30, 1e-50]), atol=1e-9)
    assert np.array_equal(np.sort(data.topk.ids[:3], 1), [[7, 300, 4100, 4999]] * 3)
    assert np.array_equal(np.sort(data.topk.ids, 1), np.sort(want_ids.numpy(), 1))
    assert np.allclose(data.topk.logprobs, want_lp.numpy(), atol=1e-6)
    # log(1 - sum p) in fp32 would give log(0) or noise on the first three rows
    assert np.allclose(data.topk.tail_logprob, outside, rtol=1e-6, atol=1e-5)


def test_top_k_of_the_whole_vocabulary_has_no_tail(tiny):
    names, ids, masks = _samples([5, 2])
    spec = CaptureSpec(vocab_size=VOCAB, top_k=VOCAB, n_draws=4)
    out = capture_batch(tiny["llama"], make_batch(names, ids, masks, pad_id=0, device="cpu"), spec)
    for x, data in zip(ids, out):
        assert data.topk.ids.shape == (len(x), VOCAB)
        assert (np.sort(data.topk.ids, 1) == np.arange(VOCAB)).all()
        assert np.isneginf(data.topk.tail_logprob).all()
        total = np.logaddexp.reduce(data.topk.logprobs.astype(np.float64), 1)
        assert np.allclose(total, 0.0, atol=1e-5)


@pytest.mark.parametrize("vocab,k", [(32000, 32), (32003, 5), (5000, 1), (400, 7)])
def test_two_stage_topk_finds_the_values_of_torch_topk(vocab, k):
    g = torch.Generator().manual_seed(vocab + k)
    rows = torch.randn(40, vocab, generator=g) * 3
    rows[:20] = rows[:20].to(torch.bfloat16).float()  # many exact ties, as bf16 logits have
    rows[20, :] = 1.0  # all tied
    stats = group_stats(rows)
    lse = _logsumexp(stats)
    ids, lps, _ = _topk_and_tail(rows, stats, lse, k)
    want = torch.topk(rows, k, dim=-1).values
    assert torch.equal(rows.gather(1, ids), want)  # ids of the same values, largest first
    assert torch.allclose(lps, want - rows.double().logsumexp(-1, keepdim=True).float(),
                          atol=1e-5)
    assert (ids.sort(1).values.diff(dim=1) > 0).all()
    ties = rows[21:]  # without ties the very same ids
    assert torch.equal(ids[21:].sort(1).values, torch.topk(ties, k, -1).indices.sort(1).values)


def test_chunking_never_changes_a_result(tiny):
    # Over given logits, short samples are packed (copied) together, long ones read in
    # place, in chunks of any size: every array must be the same bit for bit. With the LM
    # head computed by chunks, the matmul's shape follows the chunk, so values may move by
    # fp32 rounding (hence logits_chunk is a content key of the dump config).
    names, ids, masks = _samples([9, 3, 17, 1, 12, 2, 30], seed=5)
    batch = make_batch(names, ids, masks, pad_id=0, device="cpu")
    specs = [CaptureSpec(vocab_size=VOCAB, top_k=5, n_draws=32, seed=1, logits_chunk=c)
             for c in (1, 5, 16, 64, 4096)]
    with torch.inference_mode():
        logits = run_model(tiny["llama"], batch, specs[0]).logits
    outs = [capture_outputs(logits, None, None, batch, spec) for spec in specs]
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            for key in ("ids", "logprobs", "tail_logprob"):
                assert np.array_equal(getattr(a.topk, key), getattr(b.topk, key)), key
            for key in ("offsets", "ids", "counts", "logprobs"):
                assert np.array_equal(getattr(a.sampled, key), getattr(b.sampled, key)), key
    heads = [capture_batch(tiny["llama"], batch, spec) for spec in specs]
    for other in heads:
        for a, b in zip(outs[0], other):
            assert np.array_equal(np.sort(a.topk.ids, 1), np.sort(b.topk.ids, 1))
            assert np.allclose(a.topk.logprobs, b.topk.logprobs, atol=1e-5)
    again = capture_batch(tiny["llama"], batch, specs[1])
    for a, b in zip(heads[1], again):  # the same chunking: the same bits
        assert np.array_equal(a.topk.logprobs, b.topk.logprobs)
        assert np.array_equal(a.sampled.ids, b.sampled.ids)
    chunks = plan_chunks([9, 3, 17, 1, 12, 2, 30], 16)
    assert chunks == [[(0, 0, 9)], [(1, 0, 3)], [(2, 0, 16)], [(2, 16, 17)],
                      [(3, 0, 1)], [(4, 0, 12)], [(5, 0, 2)], [(6, 0, 16)], [(6, 16, 30)]]
    assert plan_chunks([3, 1, 2, 3, 20], 32) == [[(0, 0, 3), (1, 0, 1), (2, 0, 2), (3, 0, 3)],
                                                   [(4, 0, 20)]]


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


def test_attention_maps_are_pooled_by_hooks_without_output_attentions(tiny, monkeypatch):
    # The forward is not asked for output_attentions (which would keep every layer's map
    # until it returns); the hooked grids equal those pooled from output.attentions.
    import teacher_dump.capture as capture

    names, ids, masks = _samples(LENGTHS, seed=3)
    batch = make_batch(names, ids, masks, pad_id=0, device="cpu")
    spec = CaptureSpec(vocab_size=VOCAB, top_k=2, attention_layers=(-1, 1, 0), attention_grid=3,
                       attention_heads="all")
    asked = []
    real_run = capture.run_model

    def spy(*args, **kwargs):
        asked.append(kwargs.get("output_attentions"))
        return real_run(*args, **kwargs)

    monkeypatch.setattr(capture, "run_model", spy)
    hooked = capture_batch(tiny["llama"], batch, spec)
    assert asked == [False]
    monkeypatch.setattr(capture, "attention_modules", lambda model: None)  # the fallback
    kept = capture_batch(tiny["llama"], batch, spec)
    assert asked == [False, True]
    for a, b in zip(hooked, kept):
        assert a.attention.shape == (3, 4, 3, 3)
        assert np.array_equal(a.attention, b.attention)
    for layer in tiny["llama"].model.layers:  # our hooks are removed (transformers' stay)
        assert all(h.__name__ != "keep" for h in layer.self_attn._forward_hooks.values())


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
    rows, ids, counts = draw(logits, group_stats(logits), u)
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


def _reference_draws(logits: torch.Tensor, u: torch.Tensor, temperature: float):
    """The inverse-CDF rule in float64 over the whole row: the first id whose cumulative
    probability exceeds u -> drawn ids [L, N], and how far u is from the nearest boundary."""
    probs = torch.softmax(logits.double() / temperature, -1)
    cdf = probs.cumsum(-1)
    cdf = cdf / cdf[:, -1:]
    u = u.double()
    drawn = torch.searchsorted(cdf, u, right=True).clamp(max=cdf.shape[-1] - 1)
    upper = cdf.gather(1, drawn)
    lower = torch.where(drawn > 0, cdf.gather(1, (drawn - 1).clamp(min=0)), 0.0)
    return drawn, torch.minimum(upper - u, u - lower)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_draws_follow_the_inverse_cdf_rule(tiny, temperature):
    # The two-level draw (group, then column) picks the id the single-level rule picks,
    # except where the uniform lies within fp32 rounding of a CDF boundary.
    n = 20000
    names, ids, masks = _samples([9, 3, 17, 1, 12], seed=6)
    spec = CaptureSpec(vocab_size=VOCAB, top_k=3, n_draws=n, temperature=temperature, seed=9,
                       logits_chunk=8)
    batch = make_batch(names, ids, masks, pad_id=0, device="cpu")
    with torch.inference_mode():
        logits = run_model(tiny["llama"], batch, spec).logits  # [B, S, V]: the same numbers
        out = capture_outputs(logits, None, None, batch, spec)
    moved, total = 0, 0
    for b, (name, x, data) in enumerate(zip(names, ids, out)):
        drawn, margin = _reference_draws(logits[b, :len(x)], sample_uniforms(9, name, len(x), n),
                                         temperature)
        for t in range(len(x)):
            got_ids, got_counts, _ = data.sampled.position(t)
            got = np.zeros(VOCAB, dtype=np.int64)
            got[got_ids] = got_counts
            want = np.bincount(drawn[t].numpy(), minlength=VOCAB)
            # A draw may move to a neighbouring id only when its uniform is this close.
            close = int((margin[t] < 1e-5).sum())
            assert np.abs(got - want).sum() <= 2 * close, (name, t)
            moved += np.abs(got - want).sum() // 2
            total += n
    print(f"{moved} of {total} draws moved by rounding")
    assert moved <= total * 1e-4  # 840,000 draws


# ----------------------------------------------------------------------------- LM head by chunks


@pytest.mark.parametrize("which", ["llama", "qwen"])
def test_head_by_chunks_equals_the_full_forward(tiny, which):
    # capture_batch computes the logits chunk by chunk from the decoder's output; the
    # same capture over the logits of a full forward must agree (Qwen2: padded vocabulary).
    model = tiny[which]
    assert lm_head_of(model) is not None
    names, ids, masks = _samples([9, 3, 17, 1, 12], seed=8)
    spec = CaptureSpec(vocab_size=VOCAB, top_k=6, n_draws=64, seed=2, logits_chunk=8,
                       hidden_layers=(-1,))
    batch = make_batch(names, ids, masks, pad_id=0, device="cpu")
    chunked = capture_batch(model, batch, spec)
    with torch.inference_mode():
        output = run_model(model, batch, spec)
        full = capture_outputs(output.logits, [output.hidden_states[-1]], None, batch, spec)
    for a, b in zip(chunked, full):
        assert np.array_equal(np.sort(a.topk.ids, 1), np.sort(b.topk.ids, 1))
        assert np.allclose(a.topk.logprobs, b.topk.logprobs, atol=1e-5)
        assert np.allclose(a.topk.tail_logprob, b.topk.tail_logprob, atol=1e-5)
        assert np.allclose(a.hidden, b.hidden, atol=1e-6)
        ids_a, ids_b = set(a.sampled.ids.tolist()), set(b.sampled.ids.tolist())
        assert len(ids_a ^ ids_b) <= 2  # a draw may move only at a rounding boundary


def test_models_with_a_transform_after_the_head_take_the_full_forward(tiny):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                          head_dim=16, final_logit_softcapping=30.0)
    gemma = Gemma2ForCausalLM(config).eval()
    assert lm_head_of(gemma) is None  # logits = 30 tanh(head(h) / 30): not the head alone
    names, ids, masks = _samples([7, 4], seed=2)
    batch = make_batch(names, ids, masks, pad_id=0, device="cpu")
    spec = CaptureSpec(vocab_size=VOCAB, top_k=5)
    out = capture_batch(gemma, batch, spec)
    for x, data in zip(ids, out):
        logp = torch.log_softmax(_reference(gemma, x).logits[0].double(), -1)
        want = torch.topk(logp, 5, dim=-1).values.numpy()
        assert np.allclose(data.topk.logprobs, want, atol=1e-5)


# ----------------------------------------------------------------------------- kernels


def test_compiled_group_statistics_equal_eager_ones():
    if resolve_kernel("auto", "cpu") != "compiled":
        pytest.skip("torch.compile is not usable here")
    g = torch.Generator().manual_seed(0)
    for rows, vocab in [(7, 5000), (1, 32000), (33, 640)]:
        x = torch.randn(rows, vocab, generator=g) * 4
        x[0, :64] = float("-inf")  # a group the model masks out
        for temperature in (1.0, 0.6):
            a = group_stats(x, temperature, "compiled")
            b = group_stats(x, temperature, "eager")
            assert torch.equal(a.maxima, b.maxima)
            for s_a, s_b in [(a.sums, b.sums), (a.sums_t, b.sums_t)]:
                if s_b is not None:
                    assert torch.allclose(s_a, s_b, rtol=1e-5)
    assert resolve_kernel("eager", "cpu") == "eager"
    assert resolve_kernel("auto", "cuda:0") == "eager"
    with pytest.raises(ValueError, match="one of auto, compiled, eager"):
        resolve_kernel("fast", "cpu")


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
