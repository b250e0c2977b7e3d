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

from . import grid, kernels
from .kquants import _prepare, as_rows, store_fp16

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
    blocks = np.zeros((x.shape[0], gguf.GGML_QUANT_SIZES[qtype][1]), np.uint8)
    store_fp16(blocks, dh.reshape(-1, 2)[:, :2 if affine else 1], qtype)
    return as_rows(grid.pack(qtype, blocks, L.reshape(-1, 32)), nb)


def quantize_q8_0(W, imatrix=None) -> np.ndarray:
    x, _, nb = _prepare(W, None, T.Q8_0)
    blocks = np.zeros((x.shape[0], gguf.GGML_QUANT_SIZES[T.Q8_0][1]), np.uint8)
    qs = blocks[:, 2:34].view(np.int8)
    dh = np.zeros((x.shape[0], 1), np.float32)
    kernels.q8_0_blocks(x, qs, dh)
    store_fp16(blocks, dh, T.Q8_0)
    return as_rows(blocks, nb)


def quantize_q4_0(W, imatrix=None) -> np.ndarray:
    return _weighted(W, imatrix, T.Q4_0, 8, False)


def quantize_q5_0(W, imatrix=None) -> np.ndarray:
    return _weighted(W, imatrix, T.Q5_0, 16, False)


def quantize_q4_1(W, imatrix=None) -> np.ndarray:
    return _weighted(W, imatrix, T.Q4_1, 15, True)


def quantize_q5_1(W, imatrix=None) -> np.ndarray:
    return _weighted(W, imatrix, T.Q5_1, 31, True)
