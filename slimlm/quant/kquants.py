"""Encoders for llama.cpp's super-block types (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS) and IQ4_NL.

Each `quantize_*(W, imatrix=None)` takes W (rows, cols) float32 (numpy or torch; cols a multiple of the
block) and optional per-column importance weights (cols,), and returns uint8 (rows, bytes_per_row) in
llama.cpp's block layout, so gguf-py's decoders (`gguf.quants.dequantize`, the `dequantize` twin) and
llama.cpp read it. Without an importance matrix the search is llama.cpp's `quantize_row_*_ref`, with one
its `quantize_row_*_impl`, exactly as `ggml_quantize_chunk` chooses (see kernels.py for the loops).
"""
from __future__ import annotations

import gguf
import numpy as np

from ..formats import BY_GGML_TYPE
from . import grid, kernels

QK_K = 256
T = gguf.GGMLQuantizationType


def _as_f32(a) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.ascontiguousarray(a, dtype=np.float32)


def _prepare(W, imatrix, qtype) -> tuple[np.ndarray, np.ndarray, int]:
    """(blocks (n, block) float32, importance (cols,) or empty, blocks per row), checked."""
    W = _as_f32(W)
    if W.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {W.shape}")
    cols = W.shape[1]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if cols % block:
        raise ValueError(f"{qtype.name} needs a row length that is a multiple of {block}, got {cols}")
    qw = np.zeros(0, np.float32) if imatrix is None else _as_f32(imatrix).reshape(-1)
    if qw.size not in (0, cols):
        raise ValueError(f"importance has {qw.size} values for rows of {cols}")
    if qw.size and not np.isfinite(qw).all():
        raise ValueError("importance weights contain NaN/Inf")
    return W.reshape(-1, block), qw, cols // block


def store_fp16(blocks: np.ndarray, dh: np.ndarray, qtype) -> None:
    """Write a kernel's fp16 fields (dh: float32 (n, k), already fp16-exact) into blocks (n, type_size) at
    the type's offsets (formats.QuantFormat.fp16_fields, the one table of where they live)."""
    h = dh.astype(np.float16).view(np.uint8)
    for k, off in enumerate(BY_GGML_TYPE[qtype].fp16_fields):
        blocks[:, off:off + 2] = h[:, 2 * k:2 * k + 2]


def as_rows(blocks: np.ndarray, blocks_per_row: int) -> np.ndarray:
    return blocks.reshape(blocks.shape[0] // blocks_per_row, blocks_per_row * blocks.shape[1])


def _run(kernel, W, imatrix, qtype) -> np.ndarray:
    """Blocks of W through `kernel` (which fills every field but the fp16 ones), then the fp16 fields."""
    x, qw, bpr = _prepare(W, imatrix, qtype)
    out = np.zeros((x.shape[0], gguf.GGML_QUANT_SIZES[qtype][1]), np.uint8)
    dh = np.zeros((x.shape[0], len(BY_GGML_TYPE[qtype].fp16_fields)), np.float32)
    kernel(x, qw, bpr, out, dh)
    store_fp16(out, dh, qtype)
    return as_rows(out, bpr)


def quantize_q2_k(W, imatrix=None) -> np.ndarray:
    """Q2_K: 16 groups of 16, 4-bit scales and mins, fp16 d/dmin; 2.625 bits/weight."""
    return _run(kernels.q2_k_blocks, W, imatrix, T.Q2_K)


def quantize_q3_k(W, imatrix=None) -> np.ndarray:
    """Q3_K: 16 groups of 16, 6-bit signed scales, fp16 d; 3.4375 bits/weight."""
    return _run(kernels.q3_k_blocks, W, imatrix, T.Q3_K)


def quantize_q4_k(W, imatrix=None) -> np.ndarray:
    """Q4_K: 8 groups of 32, 6-bit scales and mins, fp16 d/dmin; 4.5 bits/weight."""
    return _pack_q45(W, imatrix, T.Q4_K, 15)


def quantize_q5_k(W, imatrix=None) -> np.ndarray:
    """Q5_K: as Q4_K with a fifth bit per weight in qh; 5.5 bits/weight."""
    return _pack_q45(W, imatrix, T.Q5_K, 31)


def _pack_q45(W, imatrix, qtype, nmax: int) -> np.ndarray:
    x, qw, bpr = _prepare(W, imatrix, qtype)
    work = np.zeros((x.shape[0], 16 + QK_K), np.uint8)      # d, dmin, scales[12], then the 256 levels
    dh = np.zeros((x.shape[0], 2), np.float32)
    kernels.q45_k_blocks(x, qw, bpr, nmax, work, dh)
    blocks = np.zeros((x.shape[0], gguf.GGML_QUANT_SIZES[qtype][1]), np.uint8)
    blocks[:, 4:16] = work[:, 4:16]
    store_fp16(blocks, dh, qtype)
    return as_rows(grid.pack(qtype, blocks, work[:, 16:]), bpr)


def quantize_q6_k(W, imatrix=None) -> np.ndarray:
    """Q6_K: 16 groups of 16, int8 group scales, fp16 super-scale; 6.5625 bits/weight."""
    return _run(kernels.q6_k_blocks, W, imatrix, T.Q6_K)


def quantize_iq4_nl(W, imatrix=None) -> np.ndarray:
    """IQ4_NL: 32-weight blocks on llama.cpp's non-linear 16-value grid, fp16 scale; 4.5 bits/weight."""
    return _run(kernels.iq4_nl_blocks, W, imatrix, T.IQ4_NL)


def quantize_iq4_xs(W, imatrix=None) -> np.ndarray:
    """IQ4_XS: the IQ4_NL grid in 256-weight super-blocks with 6-bit block scales; 4.25 bits/weight."""
    return _run(kernels.iq4_xs_blocks, W, imatrix, T.IQ4_XS)
