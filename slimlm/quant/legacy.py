"""Importance-weighted encoders for llama.cpp's legacy 32-weight blocks (Q4_0, Q4_1, Q5_0, Q5_1), following
`quantize_row_q{4,5}_{0,1}_impl` in ggml-quants.c (loops in kernels.py): per-weight importance
qw * sqrt(sigma2 + x^2) (sigma2 = the row's mean square), then the symmetric (`make_qx_quants`) or
scale+min (`make_qkx3_quants`) search. Without an importance matrix, llama.cpp's plain reference encoders
(`quantize_row_*_ref`; also what gguf-py reproduces, in slower numpy). Q8_0 has no weighted variant in
llama.cpp: its encoder ignores the importance.
"""
from __future__ import annotations

import gguf
import numpy as np

from . import kernels
from .kquants import _prepare

T = gguf.GGMLQuantizationType


def _weighted(W, imatrix, qtype, nmax: int, affine: bool) -> np.ndarray:
    x, qw, nb = _prepare(W, imatrix, qtype)
    rows = x.shape[0] // nb
    L = np.zeros((rows, nb, 32), np.uint8)
    dh = np.zeros((rows, nb, 2), np.float32)
    if imatrix is None:
        kernels.legacy_ref_blocks(x, nmax, affine, L.reshape(-1, 32), dh.reshape(-1, 2))
    else:
        kernels.legacy_rows(x.reshape(rows, nb * 32), qw, nmax, affine, L, dh)
    h = dh.astype(np.float16).view(np.uint8).reshape(rows * nb, 4)
    L = L.reshape(rows * nb, 32)
    parts = [h if affine else h[:, :2]]
    if nmax >= 16:                                        # the fifth bits as a little-endian uint32
        bits = ((L >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)
        parts.append(bits.sum(1, dtype=np.uint32).astype("<u4").view(np.uint8).reshape(-1, 4))
    parts.append((L[:, :16] & 15) | ((L[:, 16:] & 15) << 4))
    out = np.concatenate(parts, axis=1)
    return out.reshape(rows, nb * out.shape[1])


def quantize_q8_0(W, imatrix=None) -> np.ndarray:
    x, _, nb = _prepare(W, None, T.Q8_0)
    qs = np.zeros((x.shape[0], 32), np.int8)
    dh = np.zeros((x.shape[0], 1), np.float32)
    kernels.q8_0_blocks(x, qs, dh)
    out = np.concatenate([dh.astype(np.float16).view(np.uint8), qs.view(np.uint8)], axis=1)
    return out.reshape(x.shape[0] // nb, nb * 34)


def quantize_q4_0(W, imatrix=None) -> np.ndarray:
    return _weighted(W, imatrix, T.Q4_0, 8, False)


def quantize_q5_0(W, imatrix=None) -> np.ndarray:
    return _weighted(W, imatrix, T.Q5_0, 16, False)


def quantize_q4_1(W, imatrix=None) -> np.ndarray:
    return _weighted(W, imatrix, T.Q4_1, 15, True)


def quantize_q5_1(W, imatrix=None) -> np.ndarray:
    return _weighted(W, imatrix, T.Q5_1, 31, True)
