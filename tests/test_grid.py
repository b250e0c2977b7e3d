"""Block grids read from and written into encoded bytes, checked against gguf-py's decoders bit for bit."""
from __future__ import annotations

import gguf
import numpy as np
import pytest

from slimlm.quant import ENCODERS
from slimlm.quant import grid as G

T = gguf.GGMLQuantizationType
TYPES = list(G.TABLES)


def _blocks(qtype, weighted):
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((10, 512)) * 0.03).astype(np.float32)
    x[1] = 0
    x[2, 3] = 2.0
    x[3] = np.abs(x[3])
    imat = rng.gamma(0.5, 2, 512).astype(np.float32) if weighted else None
    size = gguf.GGML_QUANT_SIZES[qtype][1]
    return ENCODERS[qtype](x, imat).reshape(-1, size)


def _decode(qtype, blocks):
    return gguf.quants.dequantize(blocks, qtype).reshape(blocks.shape[0], -1)


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_params_and_levels_reproduce_the_decoder(qtype, weighted):
    blocks = _blocks(qtype, weighted)
    a, b = G.params(qtype, blocks)
    L = G.levels(qtype, blocks)
    tab = G.TABLES[qtype].values
    assert L.min() >= 0 and L.max() < len(tab)
    assert np.array_equal(a * tab[L] + b, _decode(qtype, blocks))          # bit for bit
    assert np.array_equal(G.pack(qtype, blocks, L), blocks)                # levels round-trip into the bytes
    # the value nearest to each decoded weight is that weight itself
    y = a * tab[G.nearest(qtype, a, b, _decode(qtype, blocks), L)] + b
    assert np.array_equal(y, _decode(qtype, blocks))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_any_levels_pack_and_decode(qtype):
    blocks = _blocks(qtype, False)
    tab = G.TABLES[qtype].values
    L = np.random.default_rng(1).integers(0, len(tab), size=(blocks.shape[0], gguf.GGML_QUANT_SIZES[qtype][0]))
    packed = G.pack(qtype, blocks, L)
    assert np.array_equal(G.levels(qtype, packed), L)
    a, b = G.params(qtype, packed)
    assert np.array_equal(a, G.params(qtype, blocks)[0])                   # headers untouched
    assert np.array_equal(a * tab[L] + b, _decode(qtype, packed))
    with pytest.raises(ValueError, match="outside"):
        G.pack(qtype, blocks, L + len(tab))


def test_nearest_picks_the_closest_grid_value():
    a = np.array([[0.5, 0.5, -0.25, 0.0]], np.float32)
    b = np.array([[0.0, 0.1, 0.0, 3.0]], np.float32)
    w = np.array([[0.74, 100.0, 0.6, 1.0]], np.float32)
    L = G.nearest(T.Q4_1, a, b, w, np.array([[0, 0, 0, 9]]))
    assert L.tolist() == [[1, 15, 0, 9]]     # 0.74 -> 0.5*1; clipped to 15; negative scale; a == 0 keeps 9
    Lnl = G.nearest(T.IQ4_NL, np.ones((1, 3), np.float32), np.zeros((1, 3), np.float32),
                    np.array([[-200.0, 0.0, 60.0]], np.float32), np.zeros((1, 3), np.int64))
    assert G.TABLES[T.IQ4_NL].values[Lnl].tolist() == [[-127.0, 1.0, 53.0]]
