"""GPTQ (Frantar et al., 2022) onto per-block affine level grids: the error-compensating solver that writes
exactly onto llama.cpp's block grids.

The grid is chosen per *unit* of consecutive input columns (a GGUF block: 32 weights for Q4_0/Q8_0/IQ4_NL,
256 for K-quants, whose sub-block scales all hang off the super-block's d/dmin): when the solver reaches a
unit, `fit(W_unit, u)` picks its grid from the weights *as updated by the errors of every column quantized so
far* (as an encoder would on those values) and returns a `UnitGrid`: weight (r, j) of the unit may take the
values a[r, j] * T[l] + b[r, j] for the levels l of table T. Each of the unit's columns is then rounded to the
nearest value of that fixed grid, and the rounding error is spread over the columns not yet quantized through
the Cholesky factor of the inverse Hessian (lazy batch updates, as in the paper).

Rows are independent given the Hessian, so the column loop of a unit runs in a compiled kernel, in parallel
over rows; the lazy-batch update of the remaining columns is one matrix product. Arithmetic is in the dtype of
the grid's a (float32 for GGUF grids, so the rounded values are exactly what llama.cpp decodes).

Hessian: H = 2/n * X^T X over calibration inputs X (n, cols). Dampening adds `damp * mean(diag H)` to the
diagonal; if the Cholesky factorization still fails, the dampening is multiplied by 10 (raised to 1e-6
from 0) up to `max_tries` times and the value used is reported. Columns that never saw an input
(diag H == 0) get H_ii = 1 and are quantized by plain rounding (their error is free). Activation order
(`act_order`) reorders whole units, by the sum of their diag H, never columns across units, so every unit
still maps onto one GGUF block.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from numba import njit, prange

from ..errors import NumericsError


@dataclass
class UnitGrid:
    """The grid of one unit: value of level l for weight (r, j) is a[r, j] * table[l] + b[r, j]."""
    a: np.ndarray          # (rows, unit), the arithmetic dtype
    b: np.ndarray          # (rows, unit), same dtype
    table: np.ndarray      # (levels,) ascending, same dtype
    uniform: bool          # table[l] == table[0] + l (nearest level by rounding instead of search)
    L: np.ndarray          # int64 (rows, unit): chosen levels (where a == 0 every level is b: kept as given)
    extra: Any = None      # whatever the caller needs later (GGUF: the encoder's block bytes)


@dataclass
class GPTQResult:
    Q: torch.Tensor                  # (rows, cols) the quantized weights, dequantized, in the original order
    grids: list[Any]                 # fit()'s result per unit (levels filled in; or what done() made of it), in
                                     # the original unit order
    damp: float                      # the dampening that was used (relative to mean diag H)
    dead_columns: int                # columns whose inputs were all zero
    unit_order: list[int] = field(default_factory=list)   # processing order of units (act_order)


def hessian(X: torch.Tensor) -> torch.Tensor:
    """2/n X^T X in float64 for inputs X (..., cols): the product in float64 for float64 inputs, otherwise in
    float32 (activations: the float64 product would cost several times as much) and then widened."""
    X = X.reshape(-1, X.shape[-1])
    M = X.T @ X if X.dtype == torch.float64 else (X.float().T @ X.float()).double()
    return M.mul_(2.0 / max(X.shape[0], 1))


def all_finite(T: torch.Tensor, rows: int = 256) -> bool:
    """No NaN/Inf in T, checked a slab of rows at a time (torch.isfinite of a whole n x n matrix allocates its
    absolute value beside it)."""
    return all(bool(torch.isfinite(T[r:r + rows]).all()) for r in range(0, T.shape[0], rows))


def _diag(H: torch.Tensor) -> torch.Tensor:
    """The diagonal of a Hessian, or H itself when only its diagonal is kept (1-D: after `factor`, which is all
    the solver still reads)."""
    return H if H.ndim == 1 else torch.diagonal(H)


def _inverse_cholesky(make_JHJ: Callable[[int], torch.Tensor], damp: float, max_tries: int,
                      dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, float]:
    """make_JHJ(try): the (permuted) Hessian in reversed order, J H J, in float64, made again for each dampening
    retry (try 0, 1, ...; it may be the caller's H itself). Every step works in place: the factorization in that
    matrix, the inverse factor written straight into the result, in `dtype` (the solver's working precision), so
    besides J H J only the result is alive (a 14336-wide MLP's Hessian takes 1.6 GB in float64)."""
    # The upper Cholesky factor U of H^-1 (H^-1 = U^T U) without forming H^-1: with J the order reversal and
    # J H J = L L^T, U = J L^-1 J is upper triangular with a positive diagonal and U^T U = J (J H J)^-1 J = H^-1.
    # One factorization and one triangular inverse instead of a factorization, an inverse and a factorization.
    for k in range(max_tries):
        A = make_JHJ(k)
        A.diagonal().add_(damp * float(torch.diagonal(A).mean()))
        info = torch.empty((), dtype=torch.int32)
        # in place, and through the transposed view: LAPACK works column-major, so A.mT (the same symmetric
        # matrix) needs no copy; its upper factor read row-major is L, in A's lower triangle
        torch.linalg.cholesky_ex(A.mT, upper=True, out=(A.mT, info))
        if int(info) == 0:
            U = _reversed_inverse(A, dtype)
            del A
            if all_finite(U) and bool((torch.diagonal(U) > 0).all()):
                return U, damp
            del U
        damp = damp * 10 if damp > 0 else 1e-6
    raise NumericsError(f"the Hessian stays singular with dampening up to {damp / 10:g} x mean(diag H); the "
                        f"calibration inputs are degenerate for this layer")


def _reversed_inverse(L: torch.Tensor, dtype: torch.dtype, width: int = 256) -> torch.Tensor:
    """J L^-1 J in `dtype` for a lower triangular L (its lower triangle is read), solved in L's precision `width`
    columns of L^-1 at a time straight into the result: no identity matrix, no flipped copy and no column-major copy
    of L (the transposed system, L^T read column-major from L's storage) beside L and the result."""
    n = L.shape[0]
    U = torch.empty(n, n, dtype=dtype)
    for c0 in range(0, n, width):
        c1 = min(n, c0 + width)
        E = torch.zeros(n, c1 - c0, dtype=L.dtype)
        E[torch.arange(c0, c1), torch.arange(c1 - c0)] = 1
        X = torch.linalg.solve_triangular(L.mT, E.mT, upper=True, left=False).mT   # columns c0..c1 of L^-1
        U[:, n - c1:n - c0] = X.flip(0, 1)
    return U


def _reverse_in_place(A: torch.Tensor, block: int = 1 << 20) -> torch.Tensor:
    """A := J A J (both orders reversed) for a contiguous square A, in place: reversing a matrix's rows and columns
    reverses its storage, swapped here a block of elements at a time."""
    f = A.view(-1)
    m = f.numel()
    for i in range(0, m // 2, block):
        b = min(block, m // 2 - i)
        lo = f[i:i + b].clone()
        f[i:i + b] = f[m - i - b:m - i].flip(0)
        f[m - i - b:m - i] = lo.flip(0)
    return A


_SUB = 32      # columns per compiled sub-block: the per-column update stays this narrow, the rest is BLAS


@njit(cache=True, nogil=True, parallel=True)
def _solve_sub(W1, U1, s0, s1, a, b, c0, table, uniform, L, Q1, E1):
    """Quantize columns s0 .. s1 - 1 of the lazy block W1 (rows, width) in place: per row, round each column
    to the nearest value of its unit's grid (column j uses a, b, L column j - c0), record the scaled error in
    E1 and push it onto the sub-block's later columns (W1[r, j+1:s1] -= e * U1[j, j+1:s1])."""
    rows = W1.shape[0]
    nv = table.shape[0]
    for r in prange(rows):
        for j in range(s0, s1):
            jj = j - c0
            w = W1[r, j]
            A = a[r, jj]
            B = b[r, jj]
            if A != 0:
                t = (w - B) / A
                if uniform:
                    lv = np.rint(t - table[0])
                    li = 0 if lv < 0 else (nv - 1 if lv > nv - 1 else int(lv))
                else:
                    i = 0
                    while i < nv and table[i] < t:
                        i += 1
                    i = 1 if i < 1 else (nv - 1 if i > nv - 1 else i)
                    li = i - 1 if abs(t - table[i - 1]) <= abs(table[i] - t) else i
                L[r, jj] = li
            q = A * table[L[r, jj]] + B
            Q1[r, j] = q
            e = (w - q) / U1[j, j]
            E1[r, j] = e
            for k in range(j + 1, s1):
                W1[r, k] -= e * U1[j, k]


def gptq(W: torch.Tensor, H: torch.Tensor, *, unit: int, fit: Callable[[np.ndarray, int], UnitGrid],
         block_units: int | None = None, damp: float = 0.01, max_tries: int = 6, act_order: bool = False,
         dtype: torch.dtype = torch.float32, chol: tuple[torch.Tensor, float] | None = None,
         done: Callable[[UnitGrid], Any] | None = None) -> GPTQResult:
    """Quantize W (rows, cols) against Hessian H (cols, cols; or its diagonal (cols,) with `chol`).
    `fit(W_unit (rows, unit) numpy, u)` returns the grid of unit u (its columns are u*unit ... u*unit+unit-1 of
    W); the solver fills in its levels L. Lazy updates are applied every `block_units` units (default: as many
    as fit in 128 columns, at least one); inside a lazy block the columns go through a compiled kernel 32 at a
    time, each group's errors reaching the block's later columns as one matrix product. `dtype` is the solver's
    working precision (the rounded values are computed in the grid's own dtype). `chol`: a (U, damp) from
    `factor()` for this H and act_order, when several weights share one Hessian. `done(grid)`: called once a
    unit's columns are all rounded; its result replaces the grid in the result (the GGUF solver packs the unit's
    bytes there, so the levels and grid arrays of all units are never alive at once)."""
    rows, cols = W.shape
    if cols % unit or H.shape not in ((cols, cols), (cols,)) or (H.ndim == 1 and chol is None):
        raise ValueError(f"W {tuple(W.shape)} and H {tuple(H.shape)} do not fit units of {unit} columns")
    npdt = torch.empty(0, dtype=dtype).numpy().dtype
    order, perm, dead = _order(H, unit, act_order)
    U, used_damp = chol if chol is not None else factor(H, unit, act_order=act_order, damp=damp,
                                                         max_tries=max_tries, dtype=dtype)
    U = np.ascontiguousarray(U.numpy(), dtype=npdt)
    Wn = np.ascontiguousarray(W.detach().cpu().numpy()[:, perm], dtype=npdt)
    Q = np.zeros_like(Wn)
    tW, tU = torch.from_numpy(Wn), torch.from_numpy(U)
    grids: list[Any] = [None] * (cols // unit)
    step = unit * (block_units or max(1, 128 // unit))
    sub = _SUB if unit % _SUB == 0 else unit
    for i1 in range(0, cols, step):
        i2 = min(i1 + step, cols)
        W1 = np.ascontiguousarray(Wn[:, i1:i2])
        U1 = np.ascontiguousarray(U[i1:i2, i1:i2])
        E1 = np.zeros_like(W1)
        Q1 = np.zeros_like(W1)
        tW1, tU1, tE1 = torch.from_numpy(W1), torch.from_numpy(U1), torch.from_numpy(E1)
        for s0 in range(0, i2 - i1, sub):
            c0 = s0 - s0 % unit                                   # the unit's first column in the block
            if s0 == c0:
                u = order[(i1 + c0) // unit]
                g = grids[u] = fit(W1[:, c0:c0 + unit].copy(), u)
                g.a = np.ascontiguousarray(g.a)
                g.b = np.ascontiguousarray(g.b, dtype=g.a.dtype)
                g.table = np.ascontiguousarray(g.table, dtype=g.a.dtype)
                g.L = np.ascontiguousarray(g.L, dtype=np.int64)
            s1 = s0 + sub
            _solve_sub(W1, U1, s0, s1, g.a, g.b, c0, g.table, bool(g.uniform), g.L, Q1, E1)
            if s1 < i2 - i1:       # matrix products through torch: its thread pool, not a second BLAS's
                tW1[:, s1:].sub_(tE1[:, s0:s1] @ tU1[s0:s1, s1:])
        Q[:, i1:i2] = Q1
        if done is not None:
            for c0 in range(0, i2 - i1, unit):
                u = order[(i1 + c0) // unit]
                grids[u] = done(grids[u])
        if i2 < cols:
            tW[:, i2:].sub_(tE1 @ tU[i1:i2, i2:])
    out = np.empty_like(Q)
    out[:, perm] = Q
    return GPTQResult(torch.from_numpy(out), grids, used_damp, int(dead.sum()), order)


def _order(H: torch.Tensor, unit: int, act_order: bool) -> tuple[list[int], np.ndarray, torch.Tensor]:
    n_units = H.shape[0] // unit
    dead = _diag(H) == 0
    order = list(range(n_units))
    if act_order:
        imp = torch.where(dead, 1.0, _diag(H).double()).reshape(n_units, unit).sum(1)
        order = [int(u) for u in torch.argsort(imp, descending=True, stable=True)]
    perm = np.concatenate([np.arange(u * unit, (u + 1) * unit) for u in order])
    return order, perm, dead


def factor(H: torch.Tensor, unit: int, *, act_order: bool = False, damp: float = 0.01,
           max_tries: int = 6, consume: bool = False, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, float]:
    """The upper Cholesky factor (in `dtype`, the solver's working precision) of the dampened inverse Hessian in the
    solver's column order, and the dampening used: computed once for weights that share H (q/k/v, gate/up).

    `consume`: H (float64, contiguous) is the caller's to give away: the factorization runs in its storage, so only
    H and the result are alive (the caller keeps H's diagonal first; H holds garbage after). A dampening retry then
    reads H back from a temporary file written before the first try."""
    import tempfile
    H = H.detach()
    if not all_finite(H):
        raise NumericsError("the Hessian holds NaN/Inf: the calibration activations reaching this layer are not "
                            "finite (a weight or an earlier layer overflows)")
    _, perm, dead = _order(H, unit, act_order)
    q = torch.from_numpy(perm[::-1].copy())                  # the solver's order, reversed (J)
    identity = bool((np.diff(perm) == 1).all())
    consume = consume and identity and H.dtype == torch.float64 and H.is_contiguous()
    dead_r = dead.flip(0) if identity else dead[q]
    saved = tempfile.TemporaryFile() if consume else None

    def reversed_permuted(k: int) -> torch.Tensor:
        if consume:
            if k == 0:
                H.numpy().tofile(saved)
            else:
                saved.seek(0)
                saved.readinto(memoryview(H.numpy()).cast("B"))
            A = _reverse_in_place(H)
        else:                                                # a new matrix, H stays as it is
            A = H.double().flip(0, 1) if identity else H.double().index_select(0, q).index_select(1, q)
        A.diagonal()[dead_r] = 1     # no input, no coupling: such a column is rounded plainly, its weights are kept
        return A
    try:
        return _inverse_cholesky(reversed_permuted, damp, max_tries, dtype)
    finally:
        if saved is not None:
            saved.close()


def gptq_gguf(W: torch.Tensor, H: torch.Tensor, qtype, **kw) -> tuple[np.ndarray, torch.Tensor, GPTQResult]:
    """GPTQ onto llama.cpp block type `qtype`: returns (bytes uint8 (rows, bytes_per_row) in llama.cpp's
    layout, the weights those bytes decode to (float32, exactly), the solver's result).

    When the solver reaches a block it runs slimlm's encoder for the type (llama.cpp's importance-weighted
    scale search, with importance = diag(H) / 2 = the mean squared input, i.e. the importance matrix) on the
    error-updated weights, keeps that block's scales, and rounds each column onto their grid."""
    import gguf

    from . import ENCODERS
    from . import grid as G

    unit, type_size = gguf.GGML_QUANT_SIZES[qtype]
    imp = (_diag(H).double() / 2).float().numpy()
    table = G.TABLES[qtype]

    def fit(Wu: np.ndarray, u: int) -> UnitGrid:
        blocks = ENCODERS[qtype](Wu.astype(np.float32), imp[u * unit:(u + 1) * unit]).reshape(-1, type_size)
        a, b = G.params(qtype, blocks)
        return UnitGrid(a, b, table.values, table.uniform, G.levels(qtype, blocks), blocks)

    res = gptq(W, H, unit=unit, fit=fit, done=lambda g: G.pack(qtype, g.extra, g.L), **kw)
    rows = W.shape[0]
    out = np.concatenate(res.grids, axis=1).reshape(rows, -1)
    return out, res.Q.float(), res
