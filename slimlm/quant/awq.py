"""Activation-aware weight scaling (AWQ, Lin et al., 2023), searched against llama.cpp's own encoders.

Linears that read one input x (q/k/v after the attention norm, gate/up after the MLP norm, down after up's
rows) are rewritten as W' = W diag(s) reading x / s, which is the same function in float arithmetic; the
division is folded into whatever produced x (an RMSNorm's weight, or the rows of up_proj), so the GGUF needs
no extra operation. Large-activation channels get s > 1: their weights take more of the block's range, and
the rounding error that reaches the output, (W' - Q(W')) diag(1/s) x, shrinks where x is large.

s = mean|x|^alpha, normalized so max(s) * min(s) = 1, with alpha searched on a grid (ALPHAS); the score is the output
error of the quantized group on the calibration inputs, computed exactly from their second moment H:
err = sum over the group's weights of tr(dW H dW^T), dW = W - Q(W diag s) diag(1/s). Q is the encoder of each
weight's planned GGUF type with the importance of the scaled inputs (diag(H) / s^2). alpha = 0 (s = 1, plain
rounding) is always on the grid, so the chosen scales never score worse than no scaling.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class AWQResult:
    s: torch.Tensor          # (cols,) float32 per-input-channel scale (weights multiply, inputs divide)
    alpha: float
    err: float               # output error with the chosen scales
    err_plain: float         # ... and without scaling (alpha = 0)


ALPHAS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.7)    # SmolLM2 picks 0.1-0.4 (measured); 0 = no scaling


def awq_search(weights: list[torch.Tensor], qtypes: list, H: torch.Tensor, x_absmean: torch.Tensor, *,
               alphas: tuple[float, ...] = ALPHAS) -> AWQResult:
    """weights: (rows_i, cols) float32 reading the same input; qtypes: each one's GGML block type;
    H: (cols, cols) mean x x^T; x_absmean: (cols,) mean |x|."""
    from . import ENCODERS, dequantize
    Hf = H.float()
    diag = torch.diagonal(H).double()
    base = x_absmean.double().clamp(min=1e-8)
    best = None
    plain = None
    if not alphas or alphas[0] != 0.0:
        raise ValueError("the alpha grid must start at 0 (no scaling)")
    for k, alpha in enumerate(alphas):
        s = base.pow(alpha)
        s = (s / (s.max() * s.min()).sqrt()).clamp(min=1e-4)
        imp = (diag / (s * s)).float().numpy()
        err = 0.0
        for W, qt in zip(weights, qtypes, strict=True):
            Ws = (W.double() * s[None, :]).float()
            Q = torch.from_numpy(dequantize(ENCODERS[qt](np.ascontiguousarray(Ws.numpy()), imp), qt)
                                 .reshape(Ws.shape))
            D = (Ws - Q) / s[None, :].float()
            err += float(((D @ Hf) * D).sum())
        if k == 0:
            plain = err
        if best is None or err < best.err:
            best = AWQResult(s.float(), alpha, err, 0.0)
    best.err_plain = plain
    return best
