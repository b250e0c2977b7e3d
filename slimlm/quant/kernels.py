"""llama.cpp's reference quantizers (ggml-quants.c) ported loop for loop, compiled with numba.

Every search runs in float32 in the C code's operation order (sums accumulate left to right, integer
levels are converted to float where C converts them, uint8 stores wrap as in C), so the bytes match
llama.cpp's `ggml_quantize_chunk` block for block (tests/test_kquants.py asserts every byte, on random tensors
and on every SmolLM2 tensor each type accepts; a fused multiply-add in the C build would show there).
The block kernels run in parallel over 256-weight super-blocks (K-quants, IQ4_XS), 32-weight blocks
(IQ4_NL) or rows (the legacy types, whose importance weighting uses a per-row mean square).

Conventions: `x` is float32 (n_blocks, block) C-contiguous; `qw` is the per-column importance of one row
(n_per_row,) or an empty array for none; `out` is the zeroed uint8 block array the kernel fills except
for its fp16 fields, which it leaves in `dh` (float32, already rounded to fp16) for the caller to store.
Why numba and not torch ops: the searches are dozens of candidate passes with 16- or 32-term sequential
sums per group; as tensor ops that is thousands of tiny kernels per tensor and was 4-8x slower than
llama.cpp, while these loops run at the C code's speed and keep its exact arithmetic.
"""
from __future__ import annotations

import math
import os

import numpy as np
from numba import config as _numba_config
from numba import njit, prange

# numba's OpenMP layer would be a second OpenMP runtime beside torch's, each spinning on the same cores after
# its parallel regions (measured: GPTQ 35% slower); its own work queue does not spin
if "NUMBA_THREADING_LAYER" not in os.environ:
    _numba_config.THREADING_LAYER = "workqueue"

F = np.float32
_0, _1, _2 = F(0), F(1), F(2)
_EPS = F(1e-15)                      # GROUP_MAX_EPS
_MAGIC = F(12582912.0)               # 1.5 * 2**23: nearest_int's rounding constant
_P1, _P05, _M09, _M05, _M1 = F(0.1), F(0.05), F(-0.9), F(-0.5), F(-1.0)
KVALUES_IQ4NL = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
                         dtype=np.int8)

_jit = njit(cache=True, nogil=True)
_pjit = njit(cache=True, nogil=True, parallel=True)


# ---- scalar helpers -----------------------------------------------------------------------------------
@_jit
def nearest_int(v):
    """Round half to even exactly as llama.cpp's float trick does (|v| < 2**22)."""
    return np.int64(v + _MAGIC) - 12582912


@_jit
def f16r(v):
    """The float32 value of GGML_FP32_TO_FP16(v): round to nearest even at fp16 precision (inf beyond)."""
    if v == 0 or not math.isfinite(v):
        return v
    e = math.frexp(v)[1]
    q = math.ldexp(1.0, max(e - 1, -14) - 10)
    r = np.rint(np.float64(v) / q) * q
    if abs(r) > 65504.0:
        return F(math.copysign(math.inf, v))
    return F(r)


@_jit
def best_index_int8(n, val, x):
    if x <= F(val[0]):
        return 0
    if x >= F(val[n - 1]):
        return n - 1
    ml, mu = 0, n - 1
    while mu - ml > 1:
        mav = (ml + mu) // 2
        if x < F(val[mav]):
            mu = mav
        else:
            ml = mav
    return mu - 1 if x - F(val[mu - 1]) < F(val[mu]) - x else mu


# ---- searches -----------------------------------------------------------------------------------------
@_jit
def make_qx_quants(n, nmax, x, L, w):
    """Symmetric scale search (rmse_type 1 with weights w). L (int8) gets levels + nmax."""
    mx, amax = _0, _0
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax, mx = ax, x[i]
    if amax < _EPS:
        for i in range(n):
            L[i] = 0
        return _0
    fn = F(nmax)
    iscale = -fn / mx
    sumlx, suml2 = _0, _0
    for i in range(n):
        li = max(-nmax, min(nmax - 1, nearest_int(iscale * x[i])))
        L[i] = li + nmax
        fl = F(li)
        sumlx += w[i] * x[i] * fl
        suml2 += w[i] * fl * fl
    scale = sumlx / suml2 if suml2 != 0 else _0
    best = scale * sumlx
    for s in range(-9, 10):
        if s == 0:
            continue
        iscale = -(fn + _P1 * F(s)) / mx
        sumlx, suml2 = _0, _0
        for i in range(n):
            fl = F(max(-nmax, min(nmax - 1, nearest_int(iscale * x[i]))))
            sumlx += w[i] * x[i] * fl
            suml2 += w[i] * fl * fl
        if suml2 > 0 and sumlx * sumlx > best * suml2:
            for i in range(n):
                L[i] = nmax + max(-nmax, min(nmax - 1, nearest_int(iscale * x[i])))
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@_jit
def make_q3_quants(n, nmax, x, L):
    """Symmetric search with coordinate refinement, weights x^2 (Q3_K's reference, do_rmse=true)."""
    mx, amax = _0, _0
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax, mx = ax, x[i]
    if amax < _EPS:
        for i in range(n):
            L[i] = 0
        return _0
    iscale = -F(nmax) / mx
    sumlx, suml2 = _0, _0
    for i in range(n):
        li = max(-nmax, min(nmax - 1, nearest_int(iscale * x[i])))
        L[i] = li
        w = x[i] * x[i]
        sumlx += w * x[i] * F(li)
        suml2 += w * F(li) * F(li)
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            w = x[i] * x[i]
            fl = F(L[i])
            slx = sumlx - w * x[i] * fl
            if slx > 0:
                sl2 = suml2 - w * fl * fl
                new_l = max(-nmax, min(nmax - 1, nearest_int(x[i] * sl2 / slx)))
                if new_l != L[i]:
                    slx += w * x[i] * F(new_l)
                    sl2 += w * F(new_l) * F(new_l)
                    if sl2 > 0 and slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l
                        sumlx, suml2 = slx, sl2
                        n_changed += 1
        if n_changed == 0:
            break
    for i in range(n):
        L[i] += nmax
    return sumlx / suml2 if suml2 > 0 else _0


@_jit
def make_qkx_quants(n, nmax, x, w, L, Laux, rmin, rdelta, nstep, use_mad):
    """Scale + min search (make_qkx2_quants / make_qkx3_quants). Returns (scale, the_min) where
    x ~ scale * L - the_min; L (uint8) in [0, nmax]."""
    mn, mx = x[0], x[0]
    sum_w = w[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        if x[i] < mn:
            mn = x[i]
        if x[i] > mx:
            mx = x[i]
        sum_w += w[i]
        sum_x += w[i] * x[i]
    if mn > 0:
        mn = _0
    if mx <= mn:
        for i in range(n):
            L[i] = 0
        return _0, -mn
    fn = F(nmax)
    iscale = fn / (mx - mn)
    scale = _1 / iscale
    best = _0
    for i in range(n):
        li = max(0, min(nmax, nearest_int(iscale * (x[i] - mn))))
        L[i] = li
        diff = scale * F(li) + mn - x[i]
        best += w[i] * (abs(diff) if use_mad else diff * diff)
    if nstep < 1:
        return scale, -mn
    for s in range(nstep + 1):
        iscale = (rmin + rdelta * F(s) + fn) / (mx - mn)
        sum_l, sum_l2, sum_xl = _0, _0, _0
        for i in range(n):
            li = max(0, min(nmax, nearest_int(iscale * (x[i] - mn))))
            Laux[i] = li
            fl = F(li)
            sum_l += w[i] * fl
            sum_l2 += w[i] * fl * fl
            sum_xl += w[i] * fl * x[i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > 0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > 0:
                this_min = _0
                this_scale = sum_xl / sum_l2
            cur = _0
            for i in range(n):
                diff = this_scale * F(Laux[i]) + this_min - x[i]
                cur += w[i] * (abs(diff) if use_mad else diff * diff)
            if cur < best:
                for i in range(n):
                    L[i] = Laux[i]
                best = cur
                scale = this_scale
                mn = this_min
    return scale, -mn


@_jit
def make_qp_quants(n, nmax, x, L, qw):
    """Positive-value scale search with coordinate refinement (super-block scales under an imatrix).
    L is uint8 and, as in C, stores wrap."""
    mx = _0
    for i in range(n):
        mx = max(mx, x[i])
    if mx < _EPS:
        for i in range(n):
            L[i] = 0
        return _0
    fn = F(nmax)
    iscale = fn / mx
    for i in range(n):
        L[i] = nearest_int(iscale * x[i]) & 0xFF
    scale = _1 / iscale
    best = _0
    for i in range(n):
        diff = x[i] - scale * F(L[i])
        best += qw[i] * diff * diff
    for s in range(-4, 5):
        if s == 0:
            continue
        iscale_s = (_P1 * F(s) + fn) / mx
        scale_s = _1 / iscale_s
        mse = _0
        for i in range(n):
            li = min(nmax, nearest_int(iscale_s * x[i]))
            diff = x[i] - scale_s * F(li)
            mse += qw[i] * diff * diff
        if mse < best:
            best = mse
            iscale = iscale_s
    sumlx, suml2 = _0, _0
    for i in range(n):
        li = min(nmax, nearest_int(iscale * x[i]))
        L[i] = li & 0xFF
        sumlx += qw[i] * x[i] * F(li)
        suml2 += qw[i] * F(li) * F(li)
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            w = qw[i]
            fl = F(L[i])
            slx = sumlx - w * x[i] * fl
            sl2 = suml2 - w * fl * fl
            if slx > 0 and sl2 > 0:
                new_l = min(nmax, nearest_int(x[i] * sl2 / slx))
                if new_l != L[i]:
                    slx += w * x[i] * F(new_l)
                    sl2 += w * F(new_l) * F(new_l)
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l & 0xFF
                        sumlx, suml2 = slx, sl2
                        n_changed += 1
        if n_changed == 0:
            break
    return sumlx / suml2 if suml2 > 0 else _0


# ---- shared pieces of the block kernels ---------------------------------------------------------------
@_jit
def _sigma2(x, n, factor):
    s = _0
    for j in range(n):
        s += x[j] * x[j]
    return factor * s / F(n)


@_jit
def _imatrix_weights(xs, qws, sigma2, w):
    for k in range(xs.shape[0]):
        w[k] = qws[k] * np.sqrt(sigma2 + xs[k] * xs[k])


@_jit
def _seq_sum(v):
    s = _0
    for k in range(v.shape[0]):
        s += v[k]
    return s


@_jit
def _pack_2bit(L, qs):
    """Q2_K/Q3_K low bits: qs[j/4 + l] = L[j+l] | L[j+l+32] << 2 | L[j+l+64] << 4 | L[j+l+96] << 6."""
    for j in range(0, 256, 128):
        for k in range(32):
            qs[j // 4 + k] = L[j + k] | (L[j + k + 32] << 2) | (L[j + k + 64] << 4) | (L[j + k + 96] << 6)


@_jit
def _scale_min_k4(j, q):
    if j < 4:
        return q[j] & 63, q[j + 4] & 63
    return (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4)


# ---- K-quants -----------------------------------------------------------------------------------------
@_pjit
def q2_k_blocks(x, qw, bpr, out, dh):
    """block_q2_K: scales[16] (4-bit scale | 4-bit min << 4), qs[64]; dh = (d, dmin) at bytes 80, 82."""
    has_qw = qw.shape[0] > 0
    for i in prange(x.shape[0]):
        xb = x[i]
        o = out[i]
        L = np.zeros(256, np.uint8)
        Laux = np.zeros(16, np.uint8)
        w = np.empty(16, F)
        scales = np.empty(16, F)
        mins = np.empty(16, F)
        if not has_qw:                                           # quantize_row_q2_K_ref
            max_scale, max_min = _0, _0
            for j in range(16):
                xs = xb[16 * j:16 * j + 16]
                for k in range(16):
                    w[k] = abs(xs[k])
                scales[j], mins[j] = make_qkx_quants(16, 3, xs, w, L[16 * j:16 * j + 16], Laux, _M05, _P1, 15,
                                                     True)
                if scales[j] > max_scale:
                    max_scale = scales[j]
                if mins[j] > max_min:
                    max_min = mins[j]
            d, dmin = _0, _0
            if max_scale > 0:
                iscale = F(15) / max_scale
                for j in range(16):
                    o[j] = nearest_int(iscale * scales[j]) & 0xFF
                d = f16r(max_scale / F(15))
            if max_min > 0:
                iscale = F(15) / max_min
                for j in range(16):
                    o[j] = (np.int64(o[j]) | (nearest_int(iscale * mins[j]) << 4)) & 0xFF
                dmin = f16r(max_min / F(15))
        else:                                                    # quantize_row_q2_K_impl
            qwb = qw[(i % bpr) * 256:(i % bpr) * 256 + 256]
            sigma2 = _sigma2(xb, 256, _1)
            sw = np.zeros(16, F)
            Ls = np.zeros(16, np.uint8)
            Lm = np.zeros(16, np.uint8)
            for j in range(16):
                xs = xb[16 * j:16 * j + 16]
                _imatrix_weights(xs, qwb[16 * j:16 * j + 16], sigma2, w)
                sw[j] = _seq_sum(w)
                scales[j], mins[j] = make_qkx_quants(16, 3, xs, w, L[16 * j:16 * j + 16], Laux, _M09, _P05, 36,
                                                     False)
            d = f16r(make_qp_quants(16, 15, scales, Ls, sw))
            dmin = f16r(make_qp_quants(16, 15, mins, Lm, sw))
            for j in range(16):
                o[j] = (np.int64(Ls[j]) | (np.int64(Lm[j]) << 4)) & 0xFF
        for j in range(16):
            dd = d * F(o[j] & 0xF)
            if dd == 0:
                continue
            m = dmin * F(o[j] >> 4)
            for k in range(16):
                L[16 * j + k] = max(0, min(3, nearest_int((xb[16 * j + k] + m) / dd)))
        _pack_2bit(L, o[16:80])
        dh[i, 0] = d
        dh[i, 1] = dmin


@_pjit
def q3_k_blocks(x, qw, bpr, out, dh):
    """block_q3_K: hmask[32], qs[64], scales[12] (6-bit, packed); dh = d at byte 108."""
    has_qw = qw.shape[0] > 0
    for i in prange(x.shape[0]):
        xb = x[i]
        o = out[i]
        sc = o[96:108]
        L = np.zeros(256, np.int8)
        scales = np.empty(16, F)
        d = _0
        if not has_qw:                                           # quantize_row_q3_K_ref
            max_scale, amax = _0, _0
            for j in range(16):
                scales[j] = make_q3_quants(16, 4, xb[16 * j:16 * j + 16], L[16 * j:16 * j + 16])
                a = abs(scales[j])
                if a > amax:
                    amax, max_scale = a, scales[j]
            if max_scale != 0:
                iscale = F(-32) / max_scale
                for j in range(16):
                    li = max(-32, min(31, np.int64(np.int8(nearest_int(iscale * scales[j]))))) + 32
                    if j < 8:
                        sc[j] = li & 0xF
                    else:
                        sc[j - 8] |= (li & 0xF) << 4
                    sc[j % 4 + 8] |= (li >> 4) << (2 * (j // 4))
                d = f16r(_1 / iscale)
        else:                                                    # quantize_row_q3_K_impl
            qwb = qw[(i % bpr) * 256:(i % bpr) * 256 + 256]
            sigma2 = _sigma2(xb, 256, _2)
            w = np.empty(16, F)
            sw = np.empty(16, F)
            Ls = np.zeros(16, np.int8)
            for j in range(16):
                xs = xb[16 * j:16 * j + 16]
                _imatrix_weights(xs, qwb[16 * j:16 * j + 16], sigma2, w)
                sw[j] = _seq_sum(w)
                scales[j] = make_qx_quants(16, 4, xs, L[16 * j:16 * j + 16], w)
            d = f16r(make_qx_quants(16, 32, scales, Ls, sw))
            for j in range(16):
                li = np.int64(Ls[j])
                if j < 8:
                    sc[j] = li & 0xF
                else:
                    sc[j - 8] |= (li & 0xF) << 4
                sc[j % 4 + 8] |= (li >> 4) << (2 * (j // 4))
        for j in range(16):
            s = (np.int64(sc[j]) & 0xF) if j < 8 else (np.int64(sc[j - 8]) >> 4)
            s = (s | (((np.int64(sc[8 + j % 4]) >> (2 * (j // 4))) & 3) << 4)) - 32
            dd = d * F(s)
            if dd == 0:
                continue
            for k in range(16):
                L[16 * j + k] = max(-4, min(3, nearest_int(xb[16 * j + k] / dd))) + 4
        m, hm = 0, 1
        for j in range(256):
            if L[j] > 3:
                o[m] |= hm
                L[j] -= 4
            m += 1
            if m == 32:
                m, hm = 0, hm << 1
        _pack_2bit(L.view(np.uint8), o[32:96])
        dh[i, 0] = d


@_pjit
def q45_k_blocks(x, qw, bpr, nmax, out, dh):
    """block_q4_K / block_q5_K (nmax 15 / 31): scales[12] at byte 4, levels (uint8, 0..nmax) returned in
    `out[:, 16:272]` for the caller to pack; dh = (d, dmin) at bytes 0, 2."""
    has_qw = qw.shape[0] > 0
    rmin, nstep = (_M1, 20) if nmax == 15 else (_M05, 15)
    for i in prange(x.shape[0]):
        xb = x[i]
        o = out[i]
        sc = o[4:16]
        L = o[16:272]
        Laux = np.zeros(32, np.uint8)
        w = np.empty(32, F)
        scales = np.empty(8, F)
        mins = np.empty(8, F)
        if not has_qw:                                           # quantize_row_q{4,5}_K_ref
            max_scale, max_min = _0, _0
            for j in range(8):
                xs = xb[32 * j:32 * j + 32]
                av_x = np.sqrt(_sigma2(xs, 32, _1))
                for k in range(32):
                    w[k] = av_x + abs(xs[k])
                scales[j], mins[j] = make_qkx_quants(32, nmax, xs, w, L[32 * j:32 * j + 32], Laux, rmin, _P1,
                                                     nstep, False)
                if scales[j] > max_scale:
                    max_scale = scales[j]
                if mins[j] > max_min:
                    max_min = mins[j]
            inv_scale = F(63) / max_scale if max_scale > 0 else _0
            inv_min = F(63) / max_min if max_min > 0 else _0
            Ls = np.empty(8, np.int64)
            Lm = np.empty(8, np.int64)
            for j in range(8):
                Ls[j] = min(63, nearest_int(inv_scale * scales[j]) & 0xFF)
                Lm[j] = min(63, nearest_int(inv_min * mins[j]) & 0xFF)
            d = f16r(max_scale / F(63))
            dmin = f16r(max_min / F(63))
        else:                                                    # quantize_row_q{4,5}_K_impl
            qwb = qw[(i % bpr) * 256:(i % bpr) * 256 + 256]
            sigma2 = _sigma2(xb, 256, _2)
            sw = np.empty(8, F)
            for j in range(8):
                xs = xb[32 * j:32 * j + 32]
                _imatrix_weights(xs, qwb[32 * j:32 * j + 32], sigma2, w)
                sw[j] = _seq_sum(w)
                scales[j], mins[j] = make_qkx_quants(32, nmax, xs, w, L[32 * j:32 * j + 32], Laux, _M09, _P05,
                                                     36, False)
            Ls8 = np.zeros(8, np.uint8)
            Lm8 = np.zeros(8, np.uint8)
            d = f16r(make_qp_quants(8, 63, scales, Ls8, sw))
            dmin = f16r(make_qp_quants(8, 63, mins, Lm8, sw))
            Ls = Ls8.astype(np.int64)
            Lm = Lm8.astype(np.int64)
            if nmax == 31:
                for j in range(8):
                    Ls[j] = min(63, Ls[j])
                    Lm[j] = min(63, Lm[j])
        for j in range(8):
            if j < 4:
                sc[j] = Ls[j] & 0xFF
                sc[j + 4] = Lm[j] & 0xFF
            else:
                sc[j + 4] = ((Ls[j] & 0xF) | ((Lm[j] & 0xF) << 4)) & 0xFF
                sc[j - 4] |= ((Ls[j] >> 4) << 6) & 0xFF
                sc[j] |= ((Lm[j] >> 4) << 6) & 0xFF
        for j in range(8):
            s, m = _scale_min_k4(j, sc)
            dd = d * F(s)
            if dd == 0:
                continue
            dm = dmin * F(m)
            for k in range(32):
                L[32 * j + k] = max(0, min(nmax, nearest_int((xb[32 * j + k] + dm) / dd)))
        dh[i, 0] = d
        dh[i, 1] = dmin


@_pjit
def q6_k_blocks(x, qw, bpr, out, dh):
    """block_q6_K: ql[128], qh[64], scales[16] (int8); dh = d at byte 208."""
    has_qw = qw.shape[0] > 0
    for i in prange(x.shape[0]):
        xb = x[i]
        o = out[i]
        L = np.zeros(256, np.int8)
        scales = np.empty(16, F)
        w = np.empty(16, F)
        max_scale, max_abs = _0, _0
        for ib in range(16):
            xs = xb[16 * ib:16 * ib + 16]
            if has_qw:
                base = (i % bpr) * 256 + 16 * ib
                for k in range(16):
                    w[k] = qw[base + k]
            else:
                for k in range(16):
                    w[k] = xs[k] * xs[k]
            scales[ib] = make_qx_quants(16, 32, xs, L[16 * ib:16 * ib + 16], w)
            a = abs(scales[ib])
            if a > max_abs:
                max_abs, max_scale = a, scales[ib]
        if max_abs < _EPS:
            dh[i, 0] = _0
            continue
        iscale = F(-128) / max_scale
        d = f16r(_1 / iscale)
        sc = np.empty(16, np.int64)
        for ib in range(16):
            sc[ib] = np.int64(np.int8(min(127, nearest_int(iscale * scales[ib]))))
            o[192 + ib] = sc[ib] & 0xFF
        for j in range(16):
            dd = d * F(sc[j])
            if dd == 0:
                continue
            for k in range(16):
                L[16 * j + k] = max(-32, min(31, nearest_int(xb[16 * j + k] / dd))) + 32
        for j in range(0, 256, 128):
            for k in range(32):
                q1, q2 = L[j + k] & 0xF, L[j + k + 32] & 0xF
                q3, q4 = L[j + k + 64] & 0xF, L[j + k + 96] & 0xF
                o[j // 2 + k] = q1 | (q3 << 4)
                o[j // 2 + k + 32] = q2 | (q4 << 4)
                o[128 + j // 4 + k] = ((L[j + k] >> 4) | ((L[j + k + 32] >> 4) << 2) | ((L[j + k + 64] >> 4) << 4)
                                       | ((L[j + k + 96] >> 4) << 6))
        dh[i, 0] = d


# ---- IQ4_NL / IQ4_XS ----------------------------------------------------------------------------------
@_jit
def _iq4_block(xb, qwb, has_qw, sbs, L, o_scales, o_qs):
    """quantize_row_iq4_nl_impl with ntry=7 (what quantize_iq4_nl/_xs use). Returns the fp16 d."""
    ntry = 7
    values = KVALUES_IQ4NL
    v0 = F(values[0])
    nb = sbs // 32
    sigma2 = _0
    for j in range(sbs):
        sigma2 += xb[j] * xb[j]
    sigma2 *= _2 / F(sbs)
    w = np.empty(32, F)
    scales = np.zeros(nb, F)
    max_scale, amax_scale = _0, _0
    for ib in range(nb):
        xs = xb[32 * ib:32 * ib + 32]
        if has_qw:
            _imatrix_weights(xs, qwb[32 * ib:32 * ib + 32], sigma2, w)
        else:
            for j in range(32):
                w[j] = xs[j] * xs[j]
        amax, mx = _0, _0
        for j in range(32):
            ax = abs(xs[j])
            if ax > amax:
                amax, mx = ax, xs[j]
        if amax < _EPS:
            scales[ib] = _0
            continue
        d = -mx / v0
        idd = _1 / d
        sumqx, sumq2 = _0, _0
        for j in range(32):
            li = best_index_int8(16, values, idd * xs[j])
            L[32 * ib + j] = li
            q = F(values[li])
            sumqx += w[j] * q * xs[j]
            sumq2 += w[j] * q * q
        d = sumqx / sumq2 if sumq2 > 0 else _0
        best = d * sumqx
        for itry in range(-ntry, ntry + 1):
            idd = F(itry + np.int64(values[0])) / mx
            sumqx, sumq2 = _0, _0
            for j in range(32):
                q = F(values[best_index_int8(16, values, idd * xs[j])])
                sumqx += w[j] * q * xs[j]
                sumq2 += w[j] * q * q
            if sumq2 > 0 and sumqx * sumqx > best * sumq2:
                d = sumqx / sumq2
                best = d * sumqx
        scales[ib] = d
        if abs(d) > amax_scale:
            amax_scale, max_scale = abs(d), d
    if nb > 1:
        d = -max_scale / F(32)
        dh = f16r(d)
        idd = _1 / d if d != 0 else _0
        sh = 0
        for ib in range(nb):
            li = max(-32, min(31, nearest_int(idd * scales[ib])))
            dl = d * F(li)
            idl = _1 / dl if dl != 0 else _0
            for j in range(32):
                L[32 * ib + j] = best_index_int8(16, values, idl * xb[32 * ib + j])
            li += 32
            if ib % 2 == 0:
                o_scales[2 + ib // 2] = li & 0xF
            else:
                o_scales[2 + ib // 2] |= (li & 0xF) << 4
            sh |= (li >> 4) << (2 * (ib % 8))
        o_scales[0] = sh & 0xFF
        o_scales[1] = (sh >> 8) & 0xFF
    else:
        dh = f16r(scales[0])
        idd = _1 / scales[0] if scales[0] != 0 else _0
        for j in range(sbs):
            L[j] = best_index_int8(16, values, idd * xb[j])
    for i in range(sbs // 32):
        for j in range(16):
            o_qs[16 * i + j] = L[32 * i + j] | (L[32 * i + 16 + j] << 4)
    return dh


@_pjit
def iq4_nl_blocks(x, qw, bpr, out, dh):
    """block_iq4_nl (32 weights): d, qs[16]; dh = d at byte 0."""
    has_qw = qw.shape[0] > 0
    for i in prange(x.shape[0]):
        L = np.zeros(32, np.uint8)
        base = (i % bpr) * 32 if has_qw else 0
        dh[i, 0] = _iq4_block(x[i], qw[base:base + 32], has_qw, 32, L, out[i, 0:0], out[i, 2:18])


@_pjit
def iq4_xs_blocks(x, qw, bpr, out, dh):
    """block_iq4_xs (256 weights): d, scales_h (u16), scales_l[4], qs[128]; dh = d at byte 0."""
    has_qw = qw.shape[0] > 0
    for i in prange(x.shape[0]):
        L = np.zeros(256, np.uint8)
        base = (i % bpr) * 256 if has_qw else 0
        dh[i, 0] = _iq4_block(x[i], qw[base:base + 256], has_qw, 256, L, out[i, 2:8], out[i, 8:136])


# ---- legacy 32-weight types under an importance matrix ------------------------------------------------
@_pjit
def legacy_rows(x, qw, nmax, affine, out, dh):
    """quantize_row_q{4,5}_{0,1}_impl for rows x (rows, n_per_row): levels of block b of row r go to
    out[r, b] (uint8, 32); dh[r, b] = (d, m) (m only for the affine types)."""
    rows, n = x.shape
    nb = n // 32
    for r in prange(rows):
        xr = x[r]
        sigma2 = _sigma2(xr, n, _1)
        w = np.empty(32, F)
        L8 = np.zeros(32, np.int8)
        Lu = np.zeros(32, np.uint8)
        Laux = np.zeros(32, np.uint8)
        for b in range(nb):
            xs = xr[32 * b:32 * b + 32]
            _imatrix_weights(xs, qw[32 * b:32 * b + 32], sigma2, w)
            if affine:
                d, the_min = make_qkx_quants(32, nmax, xs, w, Lu, Laux, _M09, _P05, 36, False)
                dh[r, b, 0] = f16r(d)
                dh[r, b, 1] = f16r(-the_min)
                for k in range(32):
                    out[r, b, k] = Lu[k]
            else:
                dh[r, b, 0] = f16r(make_qx_quants(32, nmax, xs, L8, w))
                for k in range(32):
                    out[r, b, k] = L8[k]


@_pjit
def legacy_ref_blocks(x, nmax, affine, L, dh):
    """quantize_row_q{4,5}_{0,1}_ref (no importance matrix) for blocks x (n, 32): levels to L (n, 32),
    (d, m) to dh. nmax as in legacy_rows: 8/16 (symmetric, levels 0..2*nmax-1) or 15/31 (affine). Note the C code scales by 1/d before d is rounded to fp16 and truncates, not rounds."""
    for i in prange(x.shape[0]):
        xb = x[i]
        if affine:
            mn, mx = F(np.inf), F(-np.inf)
            for j in range(32):
                if xb[j] < mn:
                    mn = xb[j]
                if xb[j] > mx:
                    mx = xb[j]
            d = (mx - mn) / F(nmax)
            idd = _1 / d if d != 0 else _0
            for j in range(32):
                L[i, j] = min(nmax, np.int64((xb[j] - mn) * idd + F(0.5)))
            dh[i, 0] = f16r(d)
            dh[i, 1] = f16r(mn)
        else:
            amax, mx = _0, _0
            for j in range(32):
                if amax < abs(xb[j]):
                    amax, mx = abs(xb[j]), xb[j]
            d = mx / F(-nmax)
            idd = _1 / d if d != 0 else _0
            half = F(nmax) + F(0.5)
            for j in range(32):
                L[i, j] = min(2 * nmax - 1, np.int64(np.int8(np.int64(xb[j] * idd + half))))
            dh[i, 0] = f16r(d)


@_pjit
def q8_0_blocks(x, qs, dh):
    """quantize_row_q8_0_ref: d = amax/127, qs = roundf(x/d) (half away from zero)."""
    for i in prange(x.shape[0]):
        xb = x[i]
        amax = _0
        for j in range(32):
            amax = max(amax, abs(xb[j]))
        d = amax / F(127)
        idd = _1 / d if d != 0 else _0
        for j in range(32):
            v = xb[j] * idd
            a = abs(v)
            r = np.int64(a)                 # roundf: half away from zero (a - trunc(a) is exact)
            if a - F(r) >= F(0.5):
                r += 1
            qs[i, j] = r if v >= 0 else -r
        dh[i, 0] = f16r(d)
