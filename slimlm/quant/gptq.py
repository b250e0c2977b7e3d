"""GPTQ (Frantar et al., 2022) with a pluggable grid: the error-compensating solver that later writes
exactly onto llama.cpp's block grids.

The grid is chosen per *unit* of consecutive input columns (a GGUF block: 32 weights for Q4_0/Q8_0/IQ4_NL,
256 for K-quants, whose sub-block scales all hang off the super-block's d/dmin): when the solver reaches a
unit, `fit(W_unit)` picks its grid from the weights *as updated by the errors of every column quantized so
far* (as an encoder would on those values), then each of the unit's columns is rounded onto that fixed grid
by `round_col(grid, column, j)`, and the rounding error is spread over the columns not yet quantized through
the Cholesky factor of the inverse Hessian (lazy batch updates, as in the paper).

Hessian: H = 2/n * X^T X over calibration inputs X (n, cols). Dampening adds `damp * mean(diag H)` to the
diagonal; if the Cholesky factorization still fails, the dampening is multiplied by 10 (raised to 1e-6
from 0) up to `max_tries` times and the value used is reported. Columns that never saw an input (diag H == 0) get H_ii = 1 and are
quantized by plain rounding (their error is free). Activation order (`act_order`) reorders whole units, by
the sum of their diag H, never columns across units, so every unit still maps onto one GGUF block.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class GPTQResult:
    Q: torch.Tensor                  # (rows, cols) the quantized weights, dequantized, in the original order
    grids: list[Any]                 # fit()'s result per unit, in the original unit order
    damp: float                      # the dampening that was used (relative to mean diag H)
    dead_columns: int                # columns whose inputs were all zero
    unit_order: list[int] = field(default_factory=list)   # processing order of units (act_order)


def hessian(X: torch.Tensor) -> torch.Tensor:
    """2/n X^T X in float64 for inputs X (n, cols)."""
    X = X.reshape(-1, X.shape[-1]).double()
    return 2.0 / max(X.shape[0], 1) * (X.T @ X)


def _inverse_cholesky(H: torch.Tensor, damp: float, max_tries: int) -> tuple[torch.Tensor, float]:
    mean_diag = float(torch.diagonal(H).mean())
    eye = torch.eye(H.shape[0], dtype=H.dtype)
    for _ in range(max_tries):
        L, info = torch.linalg.cholesky_ex(H + damp * mean_diag * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U, damp
        damp = damp * 10 if damp > 0 else 1e-6
    raise ValueError(f"the Hessian stays singular with dampening up to {damp / 10:g} x mean(diag H); the "
                     f"calibration inputs are degenerate for this layer")


def gptq(W: torch.Tensor, H: torch.Tensor, *, unit: int, fit: Callable[[torch.Tensor, int], Any],
         round_col: Callable[[Any, torch.Tensor, int], torch.Tensor], block_units: int | None = None,
         damp: float = 0.01, max_tries: int = 6, act_order: bool = False,
         dtype: torch.dtype = torch.float32) -> GPTQResult:
    """Quantize W (rows, cols) against Hessian H (cols, cols). `fit(W_unit (rows, unit), u)` returns the grid
    of unit u (its columns are u*unit ... u*unit+unit-1 of W);
    `round_col(grid, w (rows,), j)` returns column j of the unit rounded onto it (dequantized values).
    Lazy updates are applied every `block_units` units (default: as many as fit in 128 columns, at least
    one; the in-block update per column costs rows x block width)."""
    rows, cols = W.shape
    if cols % unit or H.shape != (cols, cols):
        raise ValueError(f"W {tuple(W.shape)} and H {tuple(H.shape)} do not fit units of {unit} columns")
    W = W.detach().to(dtype).clone()
    H = H.detach().double().clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1      # no input, no coupling: such a column is rounded plainly, its weights are kept
    n_units = cols // unit
    order = list(range(n_units))
    if act_order:
        imp = torch.diagonal(H).reshape(n_units, unit).sum(1)
        order = [int(u) for u in torch.argsort(imp, descending=True, stable=True)]
    perm = torch.cat([torch.arange(u * unit, (u + 1) * unit) for u in order])
    W, H = W[:, perm], H[perm][:, perm]
    U, used_damp = _inverse_cholesky(H, damp, max_tries)
    U = U.to(dtype)
    Q = torch.zeros_like(W)
    grids: list[Any] = [None] * n_units
    step = unit * (block_units or max(1, 128 // unit))
    for i1 in range(0, cols, step):
        i2 = min(i1 + step, cols)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if i % unit == 0:
                u = order[(i1 + i) // unit]
                grid = fit(W1[:, i:i + unit].clone(), u)
                grids[u] = grid
            w = W1[:, i]
            q = round_col(grid, w, i % unit).to(dtype)
            Q[:, i1 + i] = q
            err = (w - q) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(cols)
    return GPTQResult(Q[:, inv], grids, used_damp, int(dead.sum()), order)


@dataclass
class _BlockGrid:
    blocks: Any        # uint8 (rows, type_size): the encoder's bytes for this unit
    a: Any             # float32 (rows, unit)
    b: Any
    L: Any             # int64 (rows, unit): chosen levels


def gptq_gguf(W: torch.Tensor, H: torch.Tensor, qtype, **kw) -> tuple[Any, torch.Tensor, GPTQResult]:
    """GPTQ onto llama.cpp block type `qtype`: returns (bytes uint8 (rows, bytes_per_row) in llama.cpp's
    layout, the weights those bytes decode to (float32, exactly), the solver's result).

    When the solver reaches a block it runs slimlm's encoder for the type (llama.cpp's importance-weighted
    scale search, with importance = diag(H) / 2 = the mean squared input, i.e. the importance matrix) on the
    error-updated weights, keeps that block's scales, and rounds each column onto their grid."""
    import gguf
    import numpy as np

    from . import ENCODERS
    from . import grid as G

    unit, type_size = gguf.GGML_QUANT_SIZES[qtype]
    imp = (torch.diagonal(H).double() / 2).float().numpy()
    table = G.TABLES[qtype].values

    def fit(Wu: torch.Tensor, u: int) -> _BlockGrid:
        blocks = ENCODERS[qtype](Wu.float().numpy(), imp[u * unit:(u + 1) * unit]).reshape(-1, type_size)
        a, b = G.params(qtype, blocks)
        return _BlockGrid(blocks, a, b, G.levels(qtype, blocks))

    def round_col(g: _BlockGrid, w: torch.Tensor, j: int) -> torch.Tensor:
        L = G.nearest(qtype, g.a[:, j], g.b[:, j], w.float().numpy(), g.L[:, j])
        g.L[:, j] = L
        return torch.from_numpy(g.a[:, j] * table[L] + g.b[:, j])

    res = gptq(W, H, unit=unit, fit=fit, round_col=round_col, **kw)
    rows = W.shape[0]
    out = np.concatenate([G.pack(qtype, g.blocks, g.L) for g in res.grids], axis=1).reshape(rows, -1)
    return out, res.Q.float(), res
