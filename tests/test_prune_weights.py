"""Weight pruning on a tiny layer: SparseGPT against an independent OBS computation, the mask patterns, and
the output error ordering SparseGPT < Wanda < magnitude that the methods exist for."""
from __future__ import annotations

import pytest
import torch

from slimlm.errors import ConfigError
from slimlm.prune.weights import magnitude_mask, sparsegpt, wanda_mask
from slimlm.quant.gptq import hessian


def _layer(seed=0, rows=16, cols=64, n=512):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g, dtype=torch.float64) / cols ** 0.5
    X = torch.randn(n, cols, generator=g, dtype=torch.float64) @ (torch.eye(cols, dtype=torch.float64) + 2 * mix)
    X[:, 10:14] *= 8                                        # strong input channels
    W = torch.randn(rows, cols, generator=g, dtype=torch.float64) * 0.05
    return W, X


def _naive_obs(W, H, mask, damp):
    """OBS one column at a time with the explicit inverse Hessian (Gaussian elimination per column)."""
    cols = W.shape[1]
    W, H = W.double().clone(), H.double().clone()
    H += damp * torch.diagonal(H).mean() * torch.eye(cols, dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    for c in range(cols):
        q = torch.where(mask[:, c], torch.zeros_like(W[:, c]), W[:, c])
        err = (W[:, c] - q) / Hinv[c, c]
        W[:, c + 1:] -= err[:, None] * Hinv[c, c + 1:][None, :]
        W[:, c] = q
        Hinv = Hinv - torch.outer(Hinv[:, c], Hinv[c, :]) / Hinv[c, c]
    return W


@pytest.mark.parametrize("pattern", [dict(sparsity=0.5), dict(nm=(2, 4))])
def test_sparsegpt_matches_independent_obs(pattern):
    W, X = _layer()
    H = hessian(X)
    r = sparsegpt(W, H, block=32, dtype=torch.float64, **pattern)
    ref = _naive_obs(W, H, r.mask, r.damp)
    assert torch.allclose(r.W, ref, atol=1e-10), (r.W - ref).abs().max()
    assert torch.all(r.W[r.mask] == 0)
    if "nm" in pattern:
        assert torch.all(r.mask.reshape(16, -1, 4).sum(-1) == 2)
    else:
        assert torch.all(r.mask.reshape(16, 2, 32).sum((0, 2)) == 16 * 32 // 2)   # 50% of every block


def test_masks_have_the_asked_pattern_and_agree_with_brute_force():
    W, X = _layer(1)
    sq = (X ** 2).sum(0)
    m = wanda_mask(W, sq, sparsity=0.25)
    score = W.abs() * sq.sqrt()
    for r in range(W.shape[0]):                             # per row: the 16 lowest scores, nothing else
        lowest = sorted(range(64), key=lambda j: float(score[r, j]))[:16]
        assert set(torch.nonzero(m[r]).flatten().tolist()) == set(lowest)
    mm = magnitude_mask(W, sparsity=0.5)
    assert int(mm.sum()) == W.numel() // 2 and float(W.abs()[mm].max()) <= float(W.abs()[~mm].min())
    assert torch.all(magnitude_mask(W, nm=(4, 8)).reshape(16, -1, 8).sum(-1) == 4)
    with pytest.raises(ConfigError, match="either a sparsity"):
        magnitude_mask(W)
    with pytest.raises(ConfigError, match="N:M"):
        wanda_mask(W, sq, nm=(4, 4))
    with pytest.raises(ConfigError, match="64 inputs do not split into groups of 5"):
        wanda_mask(W, sq, nm=(2, 5))


def test_nm_group_that_does_not_divide_the_block_is_pruned():
    """2:3 on 96 inputs: SparseGPT's default block of 128 is no multiple of 3; blocks of whole groups are used."""
    W, X = _layer(3, cols=96)
    r = sparsegpt(W, hessian(X), nm=(2, 3))
    assert (r.mask.reshape(16, -1, 3).sum(-1) == 2).all() and (r.W[r.mask] == 0).all()
    with pytest.raises(ConfigError, match="96 inputs do not split into groups of 5"):
        sparsegpt(W, hessian(X), nm=(2, 5))


@pytest.mark.parametrize("pattern", [dict(sparsity=0.5), dict(nm=(2, 4))])
def test_output_error_sparsegpt_below_wanda_below_magnitude(pattern):
    W, X = _layer(2)
    H = hessian(X)

    def loss(Wp):
        D = W - Wp
        return float(torch.einsum("ri,ij,rj->", D, H, D))

    l_mag = loss(W.masked_fill(magnitude_mask(W, **pattern), 0))
    l_wanda = loss(W.masked_fill(wanda_mask(W, (X ** 2).sum(0), **pattern), 0))
    l_sgpt = loss(sparsegpt(W, H, block=32, **pattern).W.double())
    assert l_sgpt < l_wanda < l_mag, (l_sgpt, l_wanda, l_mag)
