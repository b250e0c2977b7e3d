"""The value grid of llama.cpp's block types, read from and written into encoded bytes.

Every block type slimlm writes decodes weight j of a block as `a_j * T[l_j] + b_j`: `l_j` is the stored
level (an index into the type's level table T), and `a_j`, `b_j` come from the block's header (d, dmin and
sub-block scales). `params()` reads a and b exactly as llama.cpp's `dequantize_row_*` computes them (same
float32 operations, so `a * T[L] + b` equals the decoder's output bit for bit), `levels()` reads L and
`pack()` writes L into encoded blocks, leaving the headers alone. This is what lets an error-compensating
solver (GPTQ) pick levels on a block's fixed grid and write them without re-running the scale search.

Arrays are per block: `blocks` uint8 (n, type_size); a, b float32 (n, block); L int64 (n, block).
"""
from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np

from .kernels import KVALUES_IQ4NL

T = gguf.GGMLQuantizationType


@dataclass(frozen=True)
class LevelTable:
    values: np.ndarray       # float32, ascending
    uniform: bool            # values[l] == values[0] + l


def _arange(lo: int, hi: int) -> LevelTable:
    return LevelTable(np.arange(lo, hi, dtype=np.float32), True)


# Q8_0 stops at -127: llama.cpp's SIMD dot products take |q| with a sign trick that breaks on -128
TABLES = {T.Q8_0: _arange(-127, 128), T.Q4_0: _arange(-8, 8), T.Q5_0: _arange(-16, 16),
          T.Q4_1: _arange(0, 16), T.Q5_1: _arange(0, 32), T.Q2_K: _arange(0, 4), T.Q3_K: _arange(-4, 4),
          T.Q4_K: _arange(0, 16), T.Q5_K: _arange(0, 32), T.Q6_K: _arange(-32, 32),
          T.IQ4_NL: LevelTable(KVALUES_IQ4NL.astype(np.float32), False),
          T.IQ4_XS: LevelTable(KVALUES_IQ4NL.astype(np.float32), False)}


def _f16(blocks: np.ndarray, off: int) -> np.ndarray:
    return blocks[:, off:off + 2].copy().view(np.float16).astype(np.float32)     # (n, 1)


def _k4_scales(sc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """get_scale_min_k4 for the 8 sub-blocks: 6-bit scales and mins (n, 8)."""
    sc = sc.astype(np.int64)
    s = np.empty((sc.shape[0], 8), np.int64)
    m = np.empty_like(s)
    s[:, :4], m[:, :4] = sc[:, :4] & 63, sc[:, 4:8] & 63
    s[:, 4:] = (sc[:, 8:12] & 0xF) | ((sc[:, 0:4] >> 6) << 4)
    m[:, 4:] = (sc[:, 8:12] >> 4) | ((sc[:, 4:8] >> 6) << 4)
    return s, m


def _q3_scales(sc: np.ndarray) -> np.ndarray:
    sc = sc.astype(np.int64)
    j = np.arange(16)
    low = np.where(j < 8, sc[:, j % 8] & 0xF, sc[:, j % 8] >> 4)
    high = (sc[:, 8 + j % 4] >> (2 * (j // 4))) & 3
    return (low | (high << 4)) - 32                                                  # (n, 16)


def _iq4xs_scales(blocks: np.ndarray) -> np.ndarray:
    h = blocks[:, 2:4].copy().view(np.uint16).astype(np.int64)                       # (n, 1)
    lo = blocks[:, 4:8].astype(np.int64)
    g = np.arange(8)
    ls = ((lo[:, g // 2] >> (4 * (g % 2))) & 0xF) | (((h >> (2 * g)) & 3) << 4)
    return ls - 32                                                                    # (n, 8)


# byte offsets of the fp16 block scale d and (types with a minimum) dmin / m in a block
D_OFFSET = {T.Q8_0: 0, T.Q4_0: 0, T.Q5_0: 0, T.IQ4_NL: 0, T.Q4_1: 0, T.Q5_1: 0, T.Q2_K: 80, T.Q3_K: 108,
            T.Q4_K: 0, T.Q5_K: 0, T.Q6_K: 208, T.IQ4_XS: 0}
MIN_OFFSET = {T.Q4_1: 2, T.Q5_1: 2, T.Q2_K: 82, T.Q4_K: 2, T.Q5_K: 2}


@dataclass(frozen=True)
class Header:
    """A block's scales as stored: d and dmin (fp16 values as float32, (n, 1)), the integer sub-block scales and
    mins ((n, sub-blocks); legacy types: one sub-block of scale 1). The decoder's value of weight j of sub-block k
    is a * T[level] + b with a = d * sc[k] and b = -(dmin * m[k]) (K-quants), b = dmin (Q4_1/Q5_1: y = d*q + m),
    else 0 -- float32 products in this order, as llama.cpp's dequantize_row_* computes them."""
    d: np.ndarray
    dmin: np.ndarray | None
    sc: np.ndarray            # int64
    m: np.ndarray | None      # int64, K-quants with mins
    sub: int                  # weights per sub-block


def header(qtype, blocks: np.ndarray) -> Header:
    n = blocks.shape[0]
    d = _f16(blocks, D_OFFSET[qtype]) if qtype in D_OFFSET else None
    dmin = _f16(blocks, MIN_OFFSET[qtype]) if qtype in MIN_OFFSET else None
    one = np.ones((n, 1), np.int64)
    if qtype in (T.Q8_0, T.Q4_0, T.Q5_0, T.IQ4_NL, T.Q4_1, T.Q5_1):
        return Header(d, dmin, one, None, 32)
    if qtype == T.Q2_K:
        sc = blocks[:, :16].astype(np.int64)
        return Header(d, dmin, sc & 0xF, sc >> 4, 16)
    if qtype == T.Q3_K:
        return Header(d, None, _q3_scales(blocks[:, 96:108]), None, 16)
    if qtype in (T.Q4_K, T.Q5_K):
        s, m = _k4_scales(blocks[:, 4:16])
        return Header(d, dmin, s, m, 32)
    if qtype == T.Q6_K:
        return Header(d, None, blocks[:, 192:208].view(np.int8).astype(np.int64), None, 16)
    if qtype == T.IQ4_XS:
        return Header(d, None, _iq4xs_scales(blocks), None, 32)
    raise ValueError(f"no grid for {qtype.name}")


def params(qtype, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) per weight, float32 (n, block), such that value = a * T[level] + b."""
    h = header(qtype, blocks)
    a = h.d * h.sc.astype(np.float32)
    if h.m is not None:
        b = -(h.dmin * h.m.astype(np.float32))
    elif h.dmin is not None:
        b = np.broadcast_to(h.dmin, a.shape)
    else:
        b = np.zeros_like(a)
    return np.repeat(a, h.sub, axis=1), np.repeat(b, h.sub, axis=1)


def with_scales(qtype, blocks: np.ndarray, d: np.ndarray, dmin: np.ndarray | None = None) -> np.ndarray:
    """A copy of `blocks` with d (and dmin) replaced: (n,) or (n, 1) values stored as fp16."""
    out = blocks.copy()
    out[:, D_OFFSET[qtype]:D_OFFSET[qtype] + 2] = np.asarray(d, np.float32).reshape(-1, 1).astype(np.float16) \
        .view(np.uint8)
    if dmin is not None:
        o = MIN_OFFSET[qtype]
        out[:, o:o + 2] = np.asarray(dmin, np.float32).reshape(-1, 1).astype(np.float16).view(np.uint8)
    return out


# the integer sub-block scales (and mins) a block type stores, as Header's sc / m values: (lo, hi) of each
SUB_SCALE_RANGE = {T.Q2_K: ((0, 15), (0, 15)), T.Q3_K: ((-32, 31), None), T.Q4_K: ((0, 63), (0, 63)),
                   T.Q5_K: ((0, 63), (0, 63)), T.Q6_K: ((-128, 127), None), T.IQ4_XS: ((-32, 31), None)}


def with_sub_scales(qtype, blocks: np.ndarray, sc: np.ndarray, m: np.ndarray | None = None) -> np.ndarray:
    """A copy of `blocks` with the integer sub-block scales (and mins) replaced: (n, sub-blocks) values as
    header() reads them (Q3_K / IQ4_XS signed, stored + 32), each within SUB_SCALE_RANGE's bounds."""
    (lo, hi), mr = SUB_SCALE_RANGE[T(qtype)]
    sc = np.asarray(sc).astype(np.int64)
    if sc.min(initial=lo) < lo or sc.max(initial=hi) > hi:
        raise ValueError(f"{T(qtype).name} sub-block scales must lie in [{lo}, {hi}]")
    if (m is None) != (mr is None) or (m is not None and (np.min(m) < mr[0] or np.max(m) > mr[1])):
        raise ValueError(f"{T(qtype).name} sub-block mins: {'none stored' if mr is None else f'{mr[0]}..{mr[1]}'}")
    out = blocks.copy()
    if qtype == T.Q2_K:
        out[:, :16] = (sc | (np.asarray(m, np.int64) << 4)).astype(np.uint8)
    elif qtype == T.Q3_K:
        u = sc + 32
        out[:, 96:104] = ((u[:, :8] & 0xF) | ((u[:, 8:] & 0xF) << 4)).astype(np.uint8)
        hb = (u >> 4) & 3                                   # j = 4 q + i: byte 8 + i, bits 2 q
        out[:, 104:108] = sum(hb[:, 4 * q:4 * q + 4] << (2 * q) for q in range(4)).astype(np.uint8)
    elif qtype in (T.Q4_K, T.Q5_K):
        mm = np.asarray(m, np.int64)
        out[:, 4:8] = (sc[:, :4] | ((sc[:, 4:] >> 4) << 6)).astype(np.uint8)
        out[:, 8:12] = (mm[:, :4] | ((mm[:, 4:] >> 4) << 6)).astype(np.uint8)
        out[:, 12:16] = ((sc[:, 4:] & 0xF) | ((mm[:, 4:] & 0xF) << 4)).astype(np.uint8)
    elif qtype == T.Q6_K:
        out[:, 192:208] = sc.astype(np.int8).view(np.uint8)
    else:                                                   # IQ4_XS
        u = sc + 32
        out[:, 4:8] = ((u[:, 0::2] & 0xF) | ((u[:, 1::2] & 0xF) << 4)).astype(np.uint8)
        h = sum(((u[:, g] >> 4) & 3) << (2 * g) for g in range(8)).astype(np.uint16)
        out[:, 2:4] = h.reshape(-1, 1).view(np.uint8)
    return out


# ---- levels <-> bytes ---------------------------------------------------------------------------------
def _nibbles_32(q: np.ndarray) -> np.ndarray:        # 16 bytes -> 32 levels: low nibbles first
    return np.concatenate([q & 0xF, q >> 4], axis=1)


def _fifth_bits(qh: np.ndarray) -> np.ndarray:       # uint32 little-endian -> bit j for weight j
    v = qh.copy().view("<u4").astype(np.int64)
    return (v >> np.arange(32)) & 1


def _unpack_2bit(qs: np.ndarray) -> np.ndarray:      # Q2_K/Q3_K: qs[64] -> 256 low-bit pairs
    L = np.empty((qs.shape[0], 256), np.int64)
    q = qs.astype(np.int64)
    for half in range(2):
        for shift in range(4):
            L[:, 128 * half + 32 * shift:128 * half + 32 * shift + 32] = (q[:, 32 * half:32 * half + 32] >> (2 * shift)) & 3
    return L


def _pack_2bit(L: np.ndarray) -> np.ndarray:
    qs = np.zeros((L.shape[0], 64), np.int64)
    for half in range(2):
        for shift in range(4):
            qs[:, 32 * half:32 * half + 32] |= L[:, 128 * half + 32 * shift:128 * half + 32 * shift + 32] << (2 * shift)
    return qs.astype(np.uint8)


def levels(qtype, blocks: np.ndarray) -> np.ndarray:
    """The stored level index of every weight (n, block), in [0, len(T))."""
    b = blocks.astype(np.int64)
    if qtype == T.Q8_0:
        return blocks[:, 2:34].view(np.int8).astype(np.int64) + 127
    if qtype in (T.Q4_0, T.IQ4_NL):
        return _nibbles_32(b[:, 2:18])
    if qtype == T.Q4_1:
        return _nibbles_32(b[:, 4:20])
    if qtype == T.Q5_0:
        return _nibbles_32(b[:, 6:22]) | (_fifth_bits(blocks[:, 2:6]) << 4)
    if qtype == T.Q5_1:
        return _nibbles_32(b[:, 8:24]) | (_fifth_bits(blocks[:, 4:8]) << 4)
    if qtype == T.Q2_K:
        return _unpack_2bit(b[:, 16:80])
    if qtype == T.Q3_K:
        low = _unpack_2bit(b[:, 32:96])
        j = np.arange(256)
        high = (b[:, j % 32] >> (j // 32)) & 1
        return low | (high << 2)
    if qtype in (T.Q4_K, T.Q5_K, T.IQ4_XS):
        qs = b[:, 16:144] if qtype == T.Q4_K else b[:, 48:176] if qtype == T.Q5_K else b[:, 8:136]
        width = 16 if qtype == T.IQ4_XS else 32
        q = qs.reshape(-1, 128 // width, width)
        L = np.stack([q & 0xF, q >> 4], axis=2).reshape(-1, 256)
        if qtype == T.Q5_K:
            qh = b[:, 16:48]                                       # bit 2c (+1) of qh[j]: chunk c's halves
            hi = np.stack([(qh >> (2 * c)) & 1 for c in range(4)] + [(qh >> (2 * c + 1)) & 1 for c in range(4)], 1)
            hi = hi.reshape(-1, 2, 4, 32).transpose(0, 2, 1, 3).reshape(-1, 256)
            L |= hi << 4
        return L
    if qtype == T.Q6_K:
        ql, qh = b[:, :128], b[:, 128:192]
        L = np.empty((b.shape[0], 256), np.int64)
        for half in range(2):
            lo, hh = ql[:, 64 * half:64 * half + 64], qh[:, 32 * half:32 * half + 32]
            base = 128 * half
            L[:, base:base + 32] = (lo[:, :32] & 0xF) | (((hh >> 0) & 3) << 4)
            L[:, base + 32:base + 64] = (lo[:, 32:] & 0xF) | (((hh >> 2) & 3) << 4)
            L[:, base + 64:base + 96] = (lo[:, :32] >> 4) | (((hh >> 4) & 3) << 4)
            L[:, base + 96:base + 128] = (lo[:, 32:] >> 4) | (((hh >> 6) & 3) << 4)
        return L
    raise ValueError(f"no grid for {qtype.name}")


def pack(qtype, blocks: np.ndarray, L: np.ndarray) -> np.ndarray:
    """A copy of `blocks` with its levels replaced by L (n, block); headers unchanged."""
    out = blocks.copy()
    L = np.asarray(L)              # kept in its integer dtype: encoders hand over uint8 levels by the million
    if L.dtype.kind not in "iu":
        raise ValueError(f"levels must be integers, got {L.dtype}")
    if L.min(initial=0) < 0 or L.max(initial=0) >= len(TABLES[qtype].values):
        raise ValueError(f"levels outside {qtype.name}'s table")

    def nib(L32):
        return (L32[:, :16] & 0xF) | ((L32[:, 16:] & 0xF) << 4)

    def fifth(L32):
        bits = ((L32 >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)
        return bits.sum(1, dtype=np.uint32).astype("<u4").view(np.uint8).reshape(-1, 4)

    if qtype == T.Q8_0:
        out[:, 2:34] = (L.astype(np.int64) - 127).astype(np.int8).view(np.uint8)
    elif qtype in (T.Q4_0, T.IQ4_NL):
        out[:, 2:18] = nib(L)
    elif qtype == T.Q4_1:
        out[:, 4:20] = nib(L)
    elif qtype == T.Q5_0:
        out[:, 2:6], out[:, 6:22] = fifth(L), nib(L)
    elif qtype == T.Q5_1:
        out[:, 4:8], out[:, 8:24] = fifth(L), nib(L)
    elif qtype == T.Q2_K:
        out[:, 16:80] = _pack_2bit(L)
    elif qtype == T.Q3_K:
        out[:, 32:96] = _pack_2bit(L & 3)
        hm = np.zeros((L.shape[0], 32), np.int64)               # bit k of hmask[m]: weight 32k + m
        for k in range(8):
            hm |= ((L[:, 32 * k:32 * k + 32] >> 2) & 1) << k
        out[:, :32] = hm.astype(np.uint8)
    elif qtype in (T.Q4_K, T.Q5_K, T.IQ4_XS):
        width = 16 if qtype == T.IQ4_XS else 32
        q = L.reshape(-1, 128 // width, 2, width)
        qs = ((q[:, :, 0] & 0xF) | ((q[:, :, 1] & 0xF) << 4)).reshape(-1, 128).astype(np.uint8)
        if qtype == T.Q4_K:
            out[:, 16:144] = qs
        elif qtype == T.IQ4_XS:
            out[:, 8:136] = qs
        else:
            hi = (L >> 4).reshape(-1, 4, 2, 32)
            qh = np.zeros((L.shape[0], 32), np.int64)
            for c in range(4):
                qh |= (hi[:, c, 0] << (2 * c)) | (hi[:, c, 1] << (2 * c + 1))
            out[:, 16:48], out[:, 48:176] = qh.astype(np.uint8), qs
    elif qtype == T.Q6_K:
        for half in range(2):
            base = 128 * half
            l1, l2 = L[:, base:base + 32], L[:, base + 32:base + 64]
            l3, l4 = L[:, base + 64:base + 96], L[:, base + 96:base + 128]
            out[:, 64 * half:64 * half + 32] = ((l1 & 0xF) | ((l3 & 0xF) << 4)).astype(np.uint8)
            out[:, 64 * half + 32:64 * half + 64] = ((l2 & 0xF) | ((l4 & 0xF) << 4)).astype(np.uint8)
            out[:, 128 + 32 * half:128 + 32 * half + 32] = ((l1 >> 4) | ((l2 >> 4) << 2) | ((l3 >> 4) << 4)
                                                            | ((l4 >> 4) << 6)).astype(np.uint8)
    else:
        raise ValueError(f"no grid for {qtype.name}")
    return out


def nearest(qtype, a: np.ndarray, b: np.ndarray, w: np.ndarray, current: np.ndarray) -> np.ndarray:
    """The level of the grid value a * T[l] + b nearest to w (elementwise); where a == 0 every level gives
    b, and `current` is kept."""
    tab = TABLES[qtype]
    safe = np.where(a != 0, a, 1)
    t = (w - b) / safe
    if tab.uniform:
        L = np.clip(np.rint(t - tab.values[0]), 0, len(tab.values) - 1).astype(np.int64)
    else:
        v = tab.values
        i = np.clip(np.searchsorted(v, t), 1, len(v) - 1)
        L = np.where(np.abs(t - v[i - 1]) <= np.abs(v[i] - t), i - 1, i)
    return np.where(a != 0, L, current)
