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


@pytest.mark.parametrize("name", TYPES)
def test_learned_rounding_ships_what_trained_bit_for_bit(name):
    """learn_round: per-weight offsets (in level spacings, clipped to one level) move the nearest level; the forward
    still equals gguf-py's dequantization of the export bit for bit, the weight W itself never changes, and the
    trained offsets flip levels (the file differs from the start)."""
    from slimlm.quant.fakequant import ROUND_CLIP
    W, qt, blocks, g = _setup(name)
    fq = FakeQuant(qt, blocks, tuple(W.shape), learn_round=True)
    assert fq.round_offset is not None and not fq.round_offset.any()
    start = fq.export(W)
    opt = torch.optim.Adam([fq.round_offset], lr=0.1)
    X = torch.randn(64, W.shape[1], generator=g)
    for _ in range(8):
        loss = (X @ fq(W).T - X @ (1.01 * W).T).pow(2).mean()     # a target off the grid: levels must move
        opt.zero_grad()
        loss.backward()
        assert torch.isfinite(fq.round_offset.grad).all() and fq.round_offset.grad.abs().sum() > 0
        opt.step()
    with torch.no_grad():
        fq.round_offset[0, 0] = 5.0                  # beyond the clip: counts as ROUND_CLIP
    out = fq(W).detach()
    data = fq.export(W)
    assert np.array_equal(_bits(out), _bits(dequantize(data, qt).reshape(W.shape)))
    assert not np.array_equal(data, start)
    assert float(fq.round_offset.detach().clamp(-ROUND_CLIP, ROUND_CLIP).abs().max()) <= ROUND_CLIP


def test_learned_rounding_reduces_the_output_error_from_the_encoders_rounding():
    """30 Adam steps at lr 0.003 on the rounding offsets alone (scales and weights fixed) lower a Q4_0 layer's output
    error on its inputs by more than 10% (AdaRound/SignRound's point: the nearest level is not the best one for the
    output). Larger steps flip too many levels at once: at lr 0.02 the error rises (measured 1.17x)."""
    W, qt, blocks, g = _setup("Q4_0", rows=32)
    fq = FakeQuant(qt, blocks, tuple(W.shape), learn_scales=False, learn_round=True)
    X = torch.randn(256, W.shape[1], generator=g) * torch.linspace(3.0, 0.1, W.shape[1])    # uneven inputs
    with torch.no_grad():
        err0 = float((X @ fq(W).T - X @ W.T).pow(2).mean())
    opt = torch.optim.Adam([fq.round_offset], lr=0.003)
    for _ in range(30):
        loss = (X @ fq(W).T - X @ W.T).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        err = float((X @ fq(W).T - X @ W.T).pow(2).mean())
    assert err < 0.9 * err0, (err, err0)


SUB_TYPES = ["Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K", "IQ4_XS"]


@pytest.mark.parametrize("name", SUB_TYPES)
def test_sub_block_scales_written_are_read_back(name):
    """grid.with_sub_scales writes any in-range integer sub-block scales (and mins) that header() then reads back,
    leaving every other byte alone; out-of-range values are refused."""
    from slimlm.quant import grid
    _, qt, blocks, _ = _setup(name)
    (lo, hi), mr = grid.SUB_SCALE_RANGE[qt]
    h = grid.header(qt, blocks)
    rng = np.random.default_rng(1)
    sc = rng.integers(lo, hi + 1, size=h.sc.shape)
    sc[0, :2] = lo, hi                                   # both ends of the range
    m = None if mr is None else rng.integers(mr[0], mr[1] + 1, size=h.m.shape)
    out = grid.with_sub_scales(qt, blocks, sc, m)
    h2 = grid.header(qt, out)
    assert np.array_equal(h2.sc, sc) and (m is None or np.array_equal(h2.m, m))
    assert np.array_equal(h2.d, h.d) and np.array_equal(grid.levels(qt, out), grid.levels(qt, blocks))
    assert np.array_equal(grid.with_sub_scales(qt, blocks, h.sc, h.m), blocks)
    with pytest.raises(ValueError, match="must lie in"):
        grid.with_sub_scales(qt, blocks, sc + (hi - lo + 1), m)


@pytest.mark.parametrize("name", SUB_TYPES)
def test_learned_sub_block_scales_ship_what_trained_bit_for_bit(name):
    """learn_sub_scales: the K-quants' / IQ4_XS's integer sub-block scales and mins train (straight-through, rounded
    to integers in the type's range in every forward); the forward equals gguf-py's dequantization of the export bit
    for bit, and the exported header holds the moved integers (d unchanged: only the sub-block scales learned)."""
    from slimlm.quant import grid
    W, qt, blocks, g = _setup(name)
    fq = FakeQuant(qt, blocks, tuple(W.shape), learn_scales=False, learn_sub_scales=True)
    names = {n for n, _ in fq.named_parameters()}
    assert names == {"sc_shift"} | ({"m_shift"} if fq.m is not None else set())
    X = torch.randn(128, W.shape[1], generator=g)
    target = X @ (W * torch.linspace(0.9, 1.1, W.shape[1])).T          # a target the stored scales do not fit
    opt = torch.optim.Adam(fq.parameters(), lr=0.02)
    for _ in range(20):
        loss = (X @ fq(W).T - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        assert torch.isfinite(fq.sc_shift.grad).all() and fq.sc_shift.grad.abs().sum() > 0
        opt.step()
    with torch.no_grad():
        fq.sc_shift[1, 0] = 5.0                           # far beyond the range: the largest stored value
        out = fq(W)
    data = fq.export(W)
    assert np.array_equal(_bits(out), _bits(dequantize(data, qt).reshape(W.shape)))
    h0, h = grid.header(qt, blocks), grid.header(qt, data)
    assert h.sc[1, 0] == grid.SUB_SCALE_RANGE[qt][0][1]
    assert (h.sc != h0.sc).mean() > 0.05 and np.array_equal(h.d, h0.d)
    assert h.m is None or (h.m != h0.m).any()


@pytest.mark.parametrize("name", TYPES)
def test_anchored_rounding_starts_at_the_codes_and_scales_never_re_round_them(name):
    """anchor (--qat-weights codes): the first forward is the starting blocks' dequantization bit for bit whatever W
    is; training only the scales keeps every code (their values scale); the offsets move codes by at most one level;
    the export ships the forward bit for bit."""
    from slimlm.quant import grid
    W, qt, blocks, g = _setup(name)
    fq = FakeQuant(qt, blocks, tuple(W.shape), learn_round=True, anchor=True)
    assert np.array_equal(_bits(fq(W * 3).detach()), _bits(dequantize(blocks, qt).reshape(W.shape)))
    X = torch.randn(64, W.shape[1], generator=g)
    params = dict(fq.named_parameters())
    scales = [p for n, p in params.items() if n != "round_offset"]
    opt = torch.optim.Adam(scales, lr=0.02)              # scales alone, far enough to re-round a W on a moved grid
    for _ in range(5):
        loss = (X @ fq(W).T - X @ (1.05 * W).T).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (fq.d.detach() != fq.d0).any()
    assert np.array_equal(grid.levels(qt, fq.export(W)), grid.levels(qt, blocks))
    opt = torch.optim.Adam([params["round_offset"]], lr=0.2)
    for _ in range(5):
        loss = (X @ fq(W).T - X @ (1.05 * W).T).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        out = fq(W)
    data = fq.export(W)
    moved = grid.levels(qt, data) - grid.levels(qt, blocks)
    assert np.abs(moved).max() == 1 and (moved != 0).mean() > 0.01
    assert np.array_equal(_bits(out), _bits(dequantize(data, qt).reshape(W.shape)))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["Q4_1", "Q4_K", "IQ4_NL"])
def test_compiled_fake_quant_is_the_eager_one_bit_for_bit(name):
    """QAT --compile runs the fake-quant forward through torch.compile with the casts kept (CompiledOrEager's
    exact_casts): its output equals the eager forward (so the file) bit for bit, one graph with no break, and the
    gradients of the rounding offsets are equal too. Without exact casts inductor skips the scales' fp16 rounding
    (what this test would catch): the forward would not be the file."""
    from slimlm.train.parts import CompiledOrEager
    W, qt, blocks, g = _setup(name, rows=16)
    fq = FakeQuant(qt, blocks, tuple(W.shape), learn_round=True)
    with torch.no_grad():
        fq.round_offset.uniform_(-0.6, 0.6, generator=g)
        fq.d_factor.mul_(1.0 + 0.01 * torch.rand(fq.d_factor.shape, generator=g))
    torch._dynamo.reset()
    comp = CompiledOrEager(fq, exact_casts=True)
    outs = []
    for f in (fq, comp):
        fq.zero_grad(set_to_none=True)
        q = f(W)
        (q * q).sum().backward()
        outs.append((q.detach().clone(), fq.round_offset.grad.clone(), fq.d_factor.grad.clone()))
    assert comp.ok
    assert torch._dynamo.explain(fq)(W).graph_break_count == 0
    (qe, re, de), (qc, rc, dc) = outs
    assert np.array_equal(_bits(qe), _bits(qc))
    assert torch.equal(re, rc)
    assert torch.allclose(de, dc, rtol=1e-5, atol=1e-7)
    assert np.array_equal(_bits(qc), _bits(dequantize(fq.export(W), qt).reshape(W.shape)))
