"""Lloyd refinement of IQ4_NL block scales on the non-linear grid.

llama.cpp's IQ4_NL search tries a fixed set of scales d around max|x| / T, assigns each weight its nearest
grid value d * T[l], and takes one least-squares step for d. For a fixed assignment the best scale is the
weighted least-squares d = sum w x T[l] / sum w T[l]^2, and for a fixed d the best assignment is the nearest
level: alternating the two (Lloyd) never increases the block's error. `iq4_nl_lloyd` runs that alternation on
encoded blocks with llama.cpp's own error weights (w = x^2 without an importance matrix; importance *
sqrt(sigma^2 + x^2) with one, sigma^2 = 2 * mean x^2 of the block), rounding d to fp16 as stored, and keeps a
block's new scale and levels only where its error went down.
"""
from __future__ import annotations

import gguf
import numpy as np

from . import grid as G

T = gguf.GGMLQuantizationType.IQ4_NL


def _weights(x: np.ndarray, imp: np.ndarray | None) -> np.ndarray:
    if imp is None:
        return x * x
    sigma2 = 2.0 * (x * x).mean(1, keepdims=True)
    return imp * np.sqrt(sigma2 + x * x)


def iq4_nl_lloyd(W: np.ndarray, data: np.ndarray, importance: np.ndarray | None = None, *,
                 iters: int = 10) -> tuple[np.ndarray, dict]:
    """W (rows, cols) float32 and its IQ4_NL bytes (rows, bytes_per_row) -> (refined bytes, stats)."""
    rows, cols = W.shape
    _, type_size = gguf.GGML_QUANT_SIZES[T]
    x = np.ascontiguousarray(W, dtype=np.float32).reshape(-1, 32)
    blocks = np.ascontiguousarray(data).reshape(-1, type_size).copy()
    imp = None if importance is None else np.tile(np.asarray(importance, np.float32).reshape(-1, 32),
                                                  (rows, 1))
    w = _weights(x, imp).astype(np.float64)
    tab = G.TABLES[T].values.astype(np.float64)
    a, _ = G.params(T, blocks)
    d0 = a[:, 0].astype(np.float64)
    L = G.levels(T, blocks)

    def err(d, L):
        return (w * (x - d[:, None] * tab[L]) ** 2).sum(1)

    e0 = err(d0, L)
    best_e, best_d, best_L = e0.copy(), d0.copy(), L.copy()
    d, Lc = d0, L
    for _ in range(iters):
        t = tab[Lc]
        den = (w * t * t).sum(1)
        d = np.where(den > 0, (w * x * t).sum(1) / np.where(den > 0, den, 1), d)
        d = d.astype(np.float16).astype(np.float64)                    # as stored
        d = np.where(np.isfinite(d), d, best_d)
        dd = np.broadcast_to(d[:, None], x.shape).astype(np.float32)
        Lc = G.nearest(T, dd, np.zeros_like(dd), x, Lc)
        e = err(d, Lc)
        better = e < best_e
        best_e[better], best_d[better], best_L[better] = e[better], d[better], Lc[better]
    changed = best_e < e0
    out = blocks.copy()
    out[changed, 0:2] = best_d[changed].astype(np.float16)[:, None].view(np.uint8)
    out[changed] = G.pack(T, out[changed], best_L[changed])
    stats = {"blocks": int(len(blocks)), "improved": int(changed.sum()), "err_before": float(e0.sum()),
             "err_after": float(np.where(changed, best_e, e0).sum())}
    return out.reshape(rows, -1), stats
