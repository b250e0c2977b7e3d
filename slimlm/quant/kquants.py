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

from . import kernels

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


def _run(kernel, W, imatrix, qtype, fp16_at: tuple[int, ...]) -> np.ndarray:
    """Blocks of W through `kernel`, then the kernel's fp16 fields stored at byte offsets `fp16_at`."""
    x, qw, bpr = _prepare(W, imatrix, qtype)
    out = np.zeros((x.shape[0], gguf.GGML_QUANT_SIZES[qtype][1]), np.uint8)
    dh = np.zeros((x.shape[0], len(fp16_at)), np.float32)
    kernel(x, qw, bpr, out, dh)
    h = dh.astype(np.float16).view(np.uint8)
    for k, off in enumerate(fp16_at):
        out[:, off:off + 2] = h[:, 2 * k:2 * k + 2]
    return out.reshape(x.shape[0] // bpr, bpr * out.shape[1])


def quantize_q2_k(W, imatrix=None) -> np.ndarray:
    """Q2_K: 16 groups of 16, 4-bit scales and mins, fp16 d/dmin; 2.625 bits/weight."""
    return _run(kernels.q2_k_blocks, W, imatrix, T.Q2_K, (80, 82))


def quantize_q3_k(W, imatrix=None) -> np.ndarray:
    """Q3_K: 16 groups of 16, 6-bit signed scales, fp16 d; 3.4375 bits/weight."""
    return _run(kernels.q3_k_blocks, W, imatrix, T.Q3_K, (108,))


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
    work[:, :4] = dh.astype(np.float16).view(np.uint8)
    L = work[:, 16:].reshape(-1, 4, 2, 32)                  # 4 chunks of 64: (first 32, second 32)
    qs = (L[:, :, 0] & 15) | ((L[:, :, 1] & 15) << 4)
    parts = [work[:, :16]]
    if nmax == 31:
        hi = (L >> 4).astype(np.uint8)
        shifts = (np.arange(4, dtype=np.uint8) * 2).reshape(1, 4, 1)
        qh = ((hi[:, :, 0] << shifts) | (hi[:, :, 1] << (shifts + 1))).sum(1, dtype=np.uint8)
        parts.append(qh)
    parts.append(qs.reshape(-1, 128))
    out = np.concatenate(parts, axis=1)
    return out.reshape(x.shape[0] // bpr, bpr * out.shape[1])


def quantize_q6_k(W, imatrix=None) -> np.ndarray:
    """Q6_K: 16 groups of 16, int8 group scales, fp16 super-scale; 6.5625 bits/weight."""
    return _run(kernels.q6_k_blocks, W, imatrix, T.Q6_K, (208,))


def quantize_iq4_nl(W, imatrix=None) -> np.ndarray:
    """IQ4_NL: 32-weight blocks on llama.cpp's non-linear 16-value grid, fp16 scale; 4.5 bits/weight."""
    return _run(kernels.iq4_nl_blocks, W, imatrix, T.IQ4_NL, (0,))


def quantize_iq4_xs(W, imatrix=None) -> np.ndarray:
    """IQ4_XS: the IQ4_NL grid in 256-weight super-blocks with 6-bit block scales; 4.25 bits/weight."""
    return _run(kernels.iq4_xs_blocks, W, imatrix, T.IQ4_XS, (0,))
