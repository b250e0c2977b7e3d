"""Importance-weighted encoders for llama.cpp's legacy 32-weight blocks (Q4_0, Q4_1, Q5_0, Q5_1), following
`quantize_row_q{4,5}_{0,1}_impl` in ggml-quantize.c: per-weight importance qw * sqrt(sigma2 + x^2) (sigma2 =
the row's mean square), then the symmetric (`make_qx_quants`) or scale+min (`make_qkx3_quants`) search.
Without an importance matrix llama.cpp uses its plain reference encoders, which gguf-py reproduces
bit-exactly, so these functions hand over to gguf-py then. Q8_0 has no weighted variant in llama.cpp.
"""
from __future__ import annotations

import gguf
import numpy as np
import torch

from .kquants import _f16_bytes, _seqsum, _u8, f32, make_qkx_quants, make_qx_quants

T = gguf.GGMLQuantizationType
QK = 32


def _weighted_blocks(W, imatrix):
    x = torch.as_tensor(np.ascontiguousarray(W), dtype=torch.float32)
    rows, cols = x.shape
    if cols % QK:
        raise ValueError(f"legacy types need a row length that is a multiple of {QK}, got {cols}")
    sigma2 = _seqsum(x * x) / f32(cols)                               # (rows,)
    qw = torch.as_tensor(imatrix, dtype=torch.float32).reshape(1, cols)
    w = qw * torch.sqrt(sigma2[:, None] + x * x)
    return x.reshape(-1, QK), w.reshape(-1, QK), rows


def _nibbles(L: torch.Tensor) -> torch.Tensor:
    L = L.to(torch.int64)
    return _u8((L[:, :16] & 15) | ((L[:, 16:] & 15) << 4))


def _qh(L: torch.Tensor) -> torch.Tensor:
    """The fifth bits of 32 weights as a little-endian uint32 (bit j for weight j)."""
    bits = (L.to(torch.int64) >> 4) & 1
    v = (bits << torch.arange(32)).sum(-1)
    return _u8(torch.stack([(v >> (8 * i)) & 0xFF for i in range(4)], dim=-1))


def _symmetric(W, imatrix, nmax: int, qtype) -> np.ndarray:
    if imatrix is None:
        return gguf.quants.quantize(np.ascontiguousarray(W, dtype=np.float32), qtype)
    xb, wb, rows = _weighted_blocks(W, imatrix)
    d, L = make_qx_quants(xb, nmax, wb)
    parts = [_f16_bytes(d)] + ([_qh(L)] if nmax == 16 else []) + [_nibbles(L)]
    return torch.cat(parts, dim=1).reshape(rows, -1).numpy()


def _affine(W, imatrix, nmax: int, qtype) -> np.ndarray:
    if imatrix is None:
        return gguf.quants.quantize(np.ascontiguousarray(W, dtype=np.float32), qtype)
    xb, wb, rows = _weighted_blocks(W, imatrix)
    d, the_min, L = make_qkx_quants(xb, wb, nmax, -0.9, 0.05, 36)
    parts = [_f16_bytes(d), _f16_bytes(-the_min)] + ([_qh(L)] if nmax == 31 else []) + [_nibbles(L)]
    return torch.cat(parts, dim=1).reshape(rows, -1).numpy()


def quantize_q4_0(W, imatrix=None) -> np.ndarray:
    return _symmetric(W, imatrix, 8, T.Q4_0)


def quantize_q5_0(W, imatrix=None) -> np.ndarray:
    return _symmetric(W, imatrix, 16, T.Q5_0)


def quantize_q4_1(W, imatrix=None) -> np.ndarray:
    return _affine(W, imatrix, 15, T.Q4_1)


def quantize_q5_1(W, imatrix=None) -> np.ndarray:
    return _affine(W, imatrix, 31, T.Q5_1)
