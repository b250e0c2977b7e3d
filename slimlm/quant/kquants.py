"""K-quant encoders (Q4_K, Q5_K, Q6_K) in torch, vectorized over blocks, following llama.cpp's reference
quantizers in ggml-quants.c (`quantize_row_q{4,5,6}_K_ref` without an importance matrix, the `_impl`
variants with one) step by step: the same scale/min searches, the same float32 operation order (sums are
accumulated sequentially, as the C loops do) and the same byte layout, so gguf-py's and llama.cpp's
decoders read our bytes. Each `quantize_*` takes W (rows, cols) with cols % 256 == 0 and optional per-column
importance weights (cols,), and returns uint8 (rows, bytes_per_row).

The searches: `make_qx_quants` (symmetric, Q6_K), `make_qkx_quants` (asymmetric scale+min, Q4_K/Q5_K;
llama.cpp's make_qkx2/qkx3 are the same search with different parameters), `make_qp_quants` (the 6-bit
super-block scales when an importance matrix is given).
"""
from __future__ import annotations

import numpy as np
import torch

QK_K = 256
GROUP_MAX_EPS = 1e-15
f32 = np.float32


def _seqsum(t: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim left to right in float32, as a C `for` loop accumulates."""
    s = t[..., 0].clone()
    for i in range(1, t.shape[-1]):
        s += t[..., i]
    return s


def _first_argmax(t: torch.Tensor) -> torch.Tensor:
    return torch.argmax(t, dim=-1, keepdim=True)  # torch returns the first maximal index


# ---- searches -----------------------------------------------------------------------------------------
def make_qx_quants(x: torch.Tensor, nmax: int, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric scale search (rmse_type 1). x, w: (G, n). Returns scale (G,), L (G, n) in [0, 2*nmax)."""
    ax = x.abs()
    i = _first_argmax(ax)
    mx = x.gather(-1, i)[:, 0]
    zero = ax.gather(-1, i)[:, 0] < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)

    def attempt(iscale):
        lq = torch.round(iscale[:, None] * x).clamp(-nmax, nmax - 1)
        wx = w * x
        return lq, _seqsum(wx * lq), _seqsum(w * lq * lq)

    iscale = torch.tensor(f32(-nmax)) / mx
    L, sumlx, suml2 = attempt(iscale)
    scale = torch.where(suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, 1), 0)
    best = scale * sumlx
    for s in range(-9, 10):
        if s == 0:
            continue
        iscale = torch.tensor(-(f32(nmax) + f32(0.1) * f32(s))) / mx
        Lc, slx, sl2 = attempt(iscale)
        take = (sl2 > 0) & (slx * slx > best * sl2)
        L = torch.where(take[:, None], Lc, L)
        scale = torch.where(take, slx / torch.where(sl2 > 0, sl2, 1), scale)
        best = torch.where(take, scale * slx, best)
    L = torch.where(zero[:, None], torch.zeros_like(L), L + nmax)
    return torch.where(zero, 0, scale), L


def make_qkx_quants(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float,
                    nstep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scale + min search (llama.cpp make_qkx2/qkx3_quants, use_mad=false). x, w: (G, n).
    Returns scale (G,), the_min (G,) (the positive offset: x ~ scale*L - the_min), L (G, n) in [0, nmax]."""
    mn = x.min(-1).values.clamp(max=0)
    mx = x.max(-1).values
    degenerate = mx <= mn
    rng = torch.where(degenerate, torch.ones_like(mx), mx - mn)
    sum_w = _seqsum(w)
    sum_x = _seqsum(w * x)

    def err(scale, L, m):
        diff = scale[:, None] * L + m[:, None] - x
        return _seqsum(w * (diff * diff))

    iscale = torch.tensor(f32(nmax)) / rng
    scale = 1 / iscale
    L = torch.round(iscale[:, None] * (x - mn[:, None])).clamp(0, nmax)
    best = err(scale, L, mn)
    for s in range(nstep + 1):
        # llama.cpp's loop reads `min` after each improvement: later steps use the updated min
        rng = torch.where(degenerate, torch.ones_like(mx), mx - mn)
        iscale = torch.tensor(f32(rmin) + f32(rdelta) * f32(s) + f32(nmax)) / rng
        La = torch.round(iscale[:, None] * (x - mn[:, None])).clamp(0, nmax)
        wl = w * La
        sum_l, sum_l2, sum_xl = _seqsum(wl), _seqsum(wl * La), _seqsum(wl * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        Ds = torch.where(ok, D, 1)
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / Ds
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / Ds
        pos = this_min > 0
        this_min = torch.where(pos, 0, this_min)
        this_scale = torch.where(pos, sum_xl / torch.where(sum_l2 != 0, sum_l2, 1), this_scale)
        cur = err(this_scale, La, this_min)
        take = ok & (cur < best)
        L = torch.where(take[:, None], La, L)
        best = torch.where(take, cur, best)
        scale = torch.where(take, this_scale, scale)
        mn = torch.where(take, this_min, mn)
    L = torch.where(degenerate[:, None], torch.zeros_like(L), L)
    return torch.where(degenerate, 0, scale), -mn, L


def make_qp_quants(x: torch.Tensor, nmax: int, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive-value scale search with coordinate refinement (the 6-bit super-block scales). x, w: (B, n).
    Returns scale (B,), L (B, n) in [0, nmax]."""
    mx = x.max(-1).values.clamp(min=0)
    zero = mx < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)

    def mse(iscale, clamp):
        lq = torch.round(iscale[:, None] * x)
        if clamp:
            lq = lq.clamp(max=nmax)
        d = x - (1 / iscale)[:, None] * lq
        return _seqsum(w * d * d)

    iscale = torch.tensor(f32(nmax)) / mx
    best = mse(iscale, False)
    for s in range(-4, 5):
        if s == 0:
            continue
        iscale_s = torch.tensor(f32(0.1) * f32(s) + f32(nmax)) / mx
        m = mse(iscale_s, True)
        take = m < best
        best = torch.where(take, m, best)
        iscale = torch.where(take, iscale_s, iscale)
    L = torch.round(iscale[:, None] * x).clamp(max=nmax)
    wx = w * x
    sumlx, suml2 = _seqsum(wx * L), _seqsum(w * L * L)
    for _ in range(5):
        changed = torch.zeros_like(zero)
        for i in range(x.shape[-1]):
            wi, xi, li = w[:, i], x[:, i], L[:, i]
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            ok = (slx > 0) & (sl2 > 0)
            new_l = torch.round(xi * sl2 / torch.where(ok, slx, 1)).clamp(max=nmax)
            ok &= new_l != li
            slx2 = slx + wi * xi * new_l
            sl22 = sl2 + wi * new_l * new_l
            ok &= slx2 * slx2 * suml2 > sumlx * sumlx * sl22
            L[:, i] = torch.where(ok, new_l, li)
            sumlx = torch.where(ok, slx2, sumlx)
            suml2 = torch.where(ok, sl22, suml2)
            changed |= ok
        if not changed.any():
            break
    scale = torch.where(suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, 1), 0)
    return torch.where(zero, 0, scale), torch.where(zero[:, None], torch.zeros_like(L), L)


# ---- byte helpers -------------------------------------------------------------------------------------
def _f16_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).contiguous().view(torch.uint8).reshape(-1, 2)


def _u8(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.int64).to(torch.uint8)


def _prepare(W, imatrix) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    W = torch.as_tensor(W, dtype=torch.float32)
    rows, cols = W.shape
    if cols % QK_K:
        raise ValueError(f"K-quants need a row length that is a multiple of {QK_K}, got {cols}")
    qw = None
    if imatrix is not None:
        qw = torch.as_tensor(imatrix, dtype=torch.float32).reshape(1, cols).expand(rows, cols).reshape(-1, QK_K)
    return W.reshape(-1, QK_K), qw, rows


# ---- Q6_K ---------------------------------------------------------------------------------------------
def quantize_q6_k(W, imatrix=None) -> np.ndarray:
    """Q6_K: 16 groups of 16 per 256-block, int8 group scales, fp16 super-scale; 6.5625 bits/weight."""
    x, qw, rows = _prepare(W, imatrix)
    B = x.shape[0]
    xg = x.reshape(-1, 16)
    wg = xg * xg if qw is None else qw.reshape(-1, 16)
    scale, L = make_qx_quants(xg, 32, wg)
    scales = scale.reshape(B, 16)
    i = _first_argmax(scales.abs())
    max_scale = scales.gather(-1, i)[:, 0]
    zero = max_scale.abs() < GROUP_MAX_EPS
    iscale = torch.tensor(f32(-128)) / torch.where(zero, torch.ones_like(max_scale), max_scale)
    d = (1 / iscale).to(torch.float16)
    q_sc = torch.round(iscale[:, None] * scales).clamp(max=127)
    deff = (d.float()[:, None] * q_sc).reshape(-1)            # per group of 16
    Lr = torch.round(xg / torch.where(deff != 0, deff, 1)[:, None]).clamp(-32, 31) + 32
    L = torch.where((deff != 0)[:, None], Lr, L).reshape(B, 2, 4, 32).to(torch.int64)
    ql = torch.cat([(L[:, :, 0] & 15) | ((L[:, :, 2] & 15) << 4), (L[:, :, 1] & 15) | ((L[:, :, 3] & 15) << 4)],
                   dim=-1).reshape(B, 128)
    qh = ((L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4) | ((L[:, :, 3] >> 4) << 6))
    out = torch.cat([_u8(ql), _u8(qh.reshape(B, 64)), q_sc.to(torch.int8).view(torch.uint8),
                     _f16_bytes(torch.where(zero, 0, d.float()))], dim=1)
    out[zero] = 0
    return out.reshape(rows, -1).numpy()


# ---- Q4_K / Q5_K --------------------------------------------------------------------------------------
def _scale_min_k(x, qw, nmax: int, rmin_ref: float, nstep_ref: int):
    """Group scales/mins and the 6-bit super-block quantization shared by Q4_K and Q5_K."""
    B = x.shape[0]
    xg = x.reshape(-1, 32)
    if qw is None:  # quantize_row_qX_K_ref
        av_x = torch.sqrt(_seqsum(xg * xg) / f32(32))
        wg = av_x[:, None] + xg.abs()
        scales, mins, L = make_qkx_quants(xg, wg, nmax, rmin_ref, 0.1, nstep_ref)
        scales, mins = scales.reshape(B, 8), mins.reshape(B, 8)
        max_scale, max_min = scales.max(-1).values, mins.max(-1).values
        # C starts its running max at +0.0 and only replaces it with larger values (never with -0.0)
        max_scale = torch.where(max_scale > 0, max_scale, 0)
        max_min = torch.where(max_min > 0, max_min, 0)
        inv_scale = torch.where(max_scale > 0, f32(63) / torch.where(max_scale > 0, max_scale, 1), 0)
        inv_min = torch.where(max_min > 0, f32(63) / torch.where(max_min > 0, max_min, 1), 0)
        ls = (torch.round(inv_scale[:, None] * scales).to(torch.int64) & 0xFF).clamp(max=63)
        lm = (torch.round(inv_min[:, None] * mins).to(torch.int64) & 0xFF).clamp(max=63)
        d, dmin = (max_scale / f32(63)).to(torch.float16), (max_min / f32(63)).to(torch.float16)
    else:  # quantize_row_qX_K_impl with an importance matrix
        sigma2 = f32(2) * _seqsum(x * x) / f32(QK_K)
        xb = xg.reshape(B, 8, 32)
        wg = (qw.reshape(B, 8, 32) * torch.sqrt(sigma2[:, None, None] + xb * xb)).reshape(-1, 32)
        sw = _seqsum(wg).reshape(B, 8)
        scales, mins, L = make_qkx_quants(xg, wg, nmax, -0.9, 0.05, 36)
        d_block, ls = make_qp_quants(scales.reshape(B, 8), 63, sw)
        m_block, lm = make_qp_quants(mins.reshape(B, 8), 63, sw)
        ls, lm = ls.to(torch.int64).clamp(max=63), lm.to(torch.int64).clamp(max=63)
        d, dmin = d_block.to(torch.float16), m_block.to(torch.float16)
    sc = torch.cat([ls[:, :4] | ((ls[:, 4:] >> 4) << 6), lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
                    (ls[:, 4:] & 15) | ((lm[:, 4:] & 15) << 4)], dim=1)
    deff = (d.float()[:, None] * ls.float()).reshape(-1)
    dm = (dmin.float()[:, None] * lm.float()).reshape(-1)
    Lr = torch.round((xg + dm[:, None]) / torch.where(deff != 0, deff, 1)[:, None]).clamp(0, nmax)
    L = torch.where((deff != 0)[:, None], Lr, L).to(torch.int64)
    head = torch.cat([_f16_bytes(d), _f16_bytes(dmin), _u8(sc)], dim=1)
    return head, L.reshape(B, 4, 2, 32)


def quantize_q4_k(W, imatrix=None) -> np.ndarray:
    """Q4_K: 8 groups of 32 per 256-block, 6-bit scales and mins, fp16 d/dmin; 4.5 bits/weight."""
    x, qw, rows = _prepare(W, imatrix)
    head, L = _scale_min_k(x, qw, 15, -1.0, 20)
    qs = (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(x.shape[0], 128)
    return torch.cat([head, _u8(qs)], dim=1).reshape(rows, -1).numpy()


def quantize_q5_k(W, imatrix=None) -> np.ndarray:
    """Q5_K: as Q4_K with a fifth bit per weight in qh; 5.5 bits/weight."""
    x, qw, rows = _prepare(W, imatrix)
    head, L = _scale_min_k(x, qw, 31, -0.5, 15)
    lo, hi = L & 15, L >> 4                                   # (B, 4, 2, 32)
    qs = (lo[:, :, 0] | (lo[:, :, 1] << 4)).reshape(x.shape[0], 128)
    shifts = torch.arange(4).reshape(1, 4, 1) * 2
    qh = ((hi[:, :, 0] << shifts) | (hi[:, :, 1] << (shifts + 1))).sum(1)  # disjoint bits: sum == or
    return torch.cat([head, _u8(qh), _u8(qs)], dim=1).reshape(rows, -1).numpy()
