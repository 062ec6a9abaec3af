"""logitstore.toolkit.pooling: hidden-state pools and attention grids against plain recomputations,
with right and left padding."""

from __future__ import annotations

import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from logitstore.toolkit.pooling import pool_attention, pool_hidden  # noqa: E402


def _padded(lengths, width, left: bool):
    """attention_mask [B, width] with each sample's real tokens first (right pad) or last."""
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for b, n in enumerate(lengths):
        if left:
            mask[b, width - n:] = 1
        else:
            mask[b, :n] = 1
    return mask


@pytest.mark.parametrize("left", [False, True])
def test_pool_hidden_matches_per_sample_recomputation(left):
    g = torch.Generator().manual_seed(0)
    lengths, width, d = [5, 1, 3, 7], 7, 6
    hidden = torch.randn(4, width, d, generator=g)
    am = _padded(lengths, width, left)
    loss = (torch.rand(4, width, generator=g) > 0.4) & am.bool()
    loss[2] = False  # no target: "mean" falls back to all real tokens
    for b, n in enumerate(lengths):
        real = am[b].bool()
        h = hidden[b, real]  # [n, d]
        targets = loss[b, real]
        want_mean = h[targets].mean(0) if targets.any() else h.mean(0)
        assert torch.allclose(pool_hidden(hidden, loss, am, "mean")[b], want_mean, atol=1e-6)
        assert torch.allclose(pool_hidden(hidden, loss, am, "mean-all")[b], h.mean(0), atol=1e-6)
        assert torch.equal(pool_hidden(hidden, loss, am, "last")[b], h[-1])


def test_pool_hidden_edge_cases():
    hidden = torch.randn(2, 3, 4, dtype=torch.float16)
    empty = torch.zeros(2, 3, dtype=torch.long)
    for kind in ("mean", "mean-all", "last"):
        out = pool_hidden(hidden, empty.bool(), empty, kind)
        assert out.dtype == torch.float32 and (out == 0).all()
    with pytest.raises(ValueError, match="pooling"):
        pool_hidden(hidden, empty.bool(), empty, "max")
    with pytest.raises(ValueError, match=r"\[B, S, d\]"):
        pool_hidden(hidden[0], empty.bool(), empty, "mean")


@pytest.mark.parametrize("grid", [1, 3, 4, 8])
@pytest.mark.parametrize("left", [False, True])
def test_pool_attention_is_adaptive_avg_pool_of_the_real_block(grid, left):
    g = torch.Generator().manual_seed(grid)
    lengths, width, heads = [6, 1, 4, 2], 6, 3  # lengths below, at and above the grid
    attn = torch.rand(4, heads, width, width, generator=g)
    am = _padded(lengths, width, left)
    got = pool_attention(attn, torch.tensor(lengths), grid, attention_mask=am)
    assert got.shape == (4, heads, grid, grid) and got.dtype == torch.float32
    for b, n in enumerate(lengths):
        real = am[b].bool()
        block = attn[b][:, real][:, :, real]  # [H, n, n]
        want = F.adaptive_avg_pool2d(block, grid)
        assert torch.allclose(got[b], want, atol=1e-6), (b, n)
    if not left:  # lengths alone mean right padding
        assert torch.allclose(pool_attention(attn, torch.tensor(lengths), grid), got, atol=1e-7)


def test_pool_attention_checks_its_inputs():
    attn = torch.rand(2, 1, 4, 4)
    with pytest.raises(ValueError, match="lengths"):
        pool_attention(attn, torch.tensor([5, 1]), 2)
    with pytest.raises(ValueError, match="grid"):
        pool_attention(attn, torch.tensor([4, 1]), 0)
    with pytest.raises(ValueError, match="contiguous"):
        pool_attention(attn, None, 2, attention_mask=torch.tensor([[1, 0, 1, 0], [1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="disagree"):
        pool_attention(attn, torch.tensor([3, 4]), 2, attention_mask=_padded([2, 4], 4, False))
    assert (pool_attention(attn, torch.tensor([0, 4]), 2)[0] == 0).all()


def test_store_core_does_not_import_pooling_or_torch():
    code = ("import sys, logitstore, logitstore.writer, logitstore.reader;"
            "sys.exit('torch' in sys.modules or 'logitstore.toolkit.pooling' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
