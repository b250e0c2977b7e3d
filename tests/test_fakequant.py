"""Fake quantization that is the format (slimlm/quant/fakequant.py): for every block type slimlm writes, the torch
forward equals gguf-py's dequantization of the exported blocks bit for bit, at the encoder's scales and after
training has moved the weights and the fp16 scales (issue 16a)."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize

from slimlm.formats import get_format
from slimlm.gguf.writer import encode
from slimlm.quant.fakequant import FakeQuant

TYPES = ["Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0", "Q3_K", "Q2_K", "IQ4_NL", "IQ4_XS"]


def _setup(name, seed=0, rows=8, cols=512):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * torch.linspace(0.2, 2.0, cols)     # uneven columns
    W[0, :32] = 0                                    # an all-zero block: d == 0, its levels kept
    fmt = get_format(name)
    qt = fmt.ggml_type
    blocks = encode(W.numpy(), fmt, "w").reshape(-1, gguf.GGML_QUANT_SIZES[qt][1])
    return W, qt, blocks, g


def _bits(x) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32)).view(np.uint32)


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("learn", [False, True])
def test_fake_quant_forward_is_the_decoders_output_bit_for_bit(name, learn):
    W, qt, blocks, g = _setup(name)
    fq = FakeQuant(qt, blocks, tuple(W.shape), learn_scales=learn)
    out = fq(W).detach()
    assert np.array_equal(_bits(out), _bits(dequantize(fq.export(W), qt).reshape(W.shape)))
    # starting from the encoder's blocks: its values but where the nearest level on the stored (fp16) grid
    # differs from the encoder's choice (importance-weighted searches, Q8_0's fp32 1/d)
    assert np.mean(out.numpy() == dequantize(blocks, qt).reshape(W.shape)) > 0.98

    # train: the weights through the straight-through estimator, d/dmin (when learned) through their fp16 rounding
    Wp = torch.nn.Parameter(W.clone())
    opt = torch.optim.Adam([Wp, *fq.parameters()], lr=3e-3)
    X = torch.randn(64, W.shape[1], generator=g)
    d0 = fq.d.detach().clone()
    assert len(list(fq.parameters())) == (1 + (fq.dmin0 is not None) if learn else 0)
    losses = []
    for _ in range(8):
        loss = (X @ fq(Wp).T - X @ W.T).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        assert Wp.grad is not None and torch.isfinite(Wp.grad).all() and Wp.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert (fq.d.detach() != d0).any() == learn          # scales move only when learned
    Wt = Wp.detach()
    out = fq(Wt).detach()
    data = fq.export(Wt)
    assert np.array_equal(_bits(out), _bits(dequantize(data, qt).reshape(W.shape)))
    assert not np.array_equal(data, blocks)              # what trained is what ships, not the starting blocks


def test_learned_scales_reduce_the_output_error():
    """30 Adam steps on the scales alone (weights frozen) lower the layer's output error from Q4_0's encoder
    (llama.cpp's d = max / -8 without an importance matrix) by more than 3%."""
    W, qt, blocks, g = _setup("Q4_0", rows=32)
    fq = FakeQuant(qt, blocks, tuple(W.shape))
    X = torch.randn(256, W.shape[1], generator=g)
    with torch.no_grad():
        err0 = float((X @ fq(W).T - X @ W.T).pow(2).mean())
    opt = torch.optim.Adam(fq.parameters(), lr=1e-3)
    for _ in range(30):
        loss = (X @ fq(W).T - X @ W.T).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        err = float((X @ fq(W).T - X @ W.T).pow(2).mean())
    assert err < 0.97 * err0, (err, err0)


def test_blocks_that_do_not_encode_the_shape_are_refused():
    W, qt, blocks, _ = _setup("Q4_0")
    with pytest.raises(ValueError, match="do not encode"):
        FakeQuant(qt, blocks, (W.shape[0] + 1, W.shape[1]))
