"""Fake quantization that is the format: a torch forward equal, bit for bit, to llama.cpp's dequantization of the
blocks it exports (issue 16's quantization-aware training).

`FakeQuant(qtype, blocks)` starts from encoded blocks (slimlm's encoder: its imatrix/GPTQ result) of a weight
(rows, cols), in the weight's own row order. Its state is the block header as stored: the fp16 block scale d and
(for types with a minimum) dmin, trainable through a factor on each (1 at the start, so that an optimizer's steps
are relative to the scale), rounded to fp16 in every forward; the integer sub-block scales and mins of
K-quants/IQ4_XS, fixed or (`learn_sub_scales`) moved by trained shifts and rounded to integers within the type's
range in every forward (straight-through), written back into the header's packed bits. A forward takes the float
weight W and returns

    a * T[L] + b,   a = fp16(d) * sc,  b = -(fp16(dmin) * m) | fp16(dmin) | 0   (float32, llama.cpp's order)

with L the level of the type's table T nearest to W on that grid (grid.nearest), recomputed every forward.
Gradients: W gets the output's gradient unchanged (straight-through estimator), d and dmin get the gradient of
the formula with L fixed (through their fp16 rounding as identity). `export(W)` writes the levels and
scales of exactly that forward: gguf-py's dequantization of its bytes equals the forward's output bit for bit.

Learned rounding (`learn_round=True`, SignRound/AdaRound-style): a per-weight offset v, in units of its sub-block's
level spacing and clipped to [-ROUND_CLIP, ROUND_CLIP], is added to W before the nearest level is taken, and v trains
through the straight-through estimator (its gradient: the output's times the spacing). An optimizer's step on v is
then a fraction of a level whatever the block's scale, so a few dozen steps can move a weight to a neighbouring level,
where a step on W itself (an absolute learning rate) would need hundreds; W stays as it was (the caller freezes it).
Anchored (`anchor=True`, --qat-weights codes): the offsets move the starting levels themselves (level = start + v,
rounded), so the learned scales scale the codes instead of re-rounding W on a moved grid: a start from GPTQ's codes
is then exactly GPTQ's file, and the held-levels gradient of a scale is the forward's own (at Q4_K_M's size it did
as well as re-rounding, not better: README, bench/qat.py).
"""
from __future__ import annotations

import gguf
import numpy as np
import torch

from . import grid

F16_MAX = 65504.0
ROUND_CLIP = 1.0        # learned rounding moves a weight at most this many level spacings from W


class _ThroughF16(torch.autograd.Function):
    """x rounded to fp16 (as float32) in the forward; the gradient passes unchanged."""

    @staticmethod
    def forward(ctx, x):
        return x.clamp(-F16_MAX, F16_MAX).half().float()

    @staticmethod
    def backward(ctx, g):
        return g


class _RoundInRange(torch.autograd.Function):
    """x clamped to [lo, hi] and rounded to an integer (an integer sub-block scale as stored); the gradient passes
    unchanged (straight-through)."""

    @staticmethod
    def forward(ctx, x, lo, hi):
        return x.clamp(lo, hi).round() + 0.0          # + 0.0: an integer is never -0.0 (d * -0.0 would flip a sign)

    @staticmethod
    def backward(ctx, g):
        return g, None, None


class _OnGrid(torch.autograd.Function):
    """q = a * t (+ b) per weight, as (blocks, sub-blocks, sub) with a, b per sub-block broadcast over its weights
    (never repeated per weight) and t the table values of the chosen levels: the forward is the decoder's float32
    arithmetic. Backward: w gets the output's gradient unchanged (straight-through estimator), a and b the
    formula's with the levels held (sum over the sub-block of g * t, of g). Only t is kept for the backward, as int8
    (every level table holds integers in [-127, 127]): one byte per weight."""

    @staticmethod
    def forward(ctx, w, a, b, t8):
        """w: (blocks, sub-blocks, sub); a, b: (blocks, sub-blocks); t8: the levels' table values, int8, as w."""
        q = a.unsqueeze(-1) * t8
        if b is not None:
            q = q + b.unsqueeze(-1)
        ctx.save_for_backward(t8)
        ctx.has_b = b is not None
        return q

    @staticmethod
    def backward(ctx, g):
        (t8,) = ctx.saved_tensors
        ga = gb = None
        if ctx.needs_input_grad[1]:
            ga = (g * t8).sum(-1)
        if ctx.has_b and ctx.needs_input_grad[2]:
            gb = g.sum(-1)
        return g, ga, gb, None


class FakeQuant(torch.nn.Module):
    """The dequantized value of a weight (rows, cols) in block type `qtype` as a differentiable torch forward.
    blocks: uint8 (rows * cols / block, type_size) encoded rows in order; `learn_scales`: d and dmin are
    parameters (else buffers); `learn_round`: a trained per-weight offset `round_offset` (see the module's docstring)."""

    def __init__(self, qtype, blocks: np.ndarray, shape: tuple[int, int], *, learn_scales: bool = True,
                 learn_round: bool = False, learn_sub_scales: bool = False,
                 anchor: bool = False):
        super().__init__()
        self.anchor = anchor and learn_round
        qtype = grid.T(qtype)
        rows, cols = shape
        tab = grid.TABLES[qtype]
        self.qtype, self.shape = qtype, (rows, cols)
        self.block, size = gguf.GGML_QUANT_SIZES[qtype]
        if cols % self.block or blocks.shape != (rows * cols // self.block, size):
            raise ValueError(f"{blocks.shape} {qtype.name} blocks do not encode a {rows} x {cols} weight")
        h = grid.header(qtype, blocks)
        self.sub = h.sub
        # the stored scales, and factors on them that train (1 at the start: an optimizer's step is then relative,
        # whatever the scale's magnitude, and a zero scale stays zero)
        self.register_buffer("d0", torch.from_numpy(h.d.copy()))
        self.register_buffer("dmin0", None if h.dmin is None else torch.from_numpy(h.dmin.copy()))
        factor = torch.nn.Parameter if learn_scales else (lambda t: t)
        for name, base in (("d_factor", self.d0), ("dmin_factor", self.dmin0)):
            if base is None:
                self.register_buffer(name, None)
            elif learn_scales:
                setattr(self, name, factor(torch.ones_like(base)))
            else:
                self.register_buffer(name, torch.ones_like(base))
        self.register_buffer("sc", torch.from_numpy(h.sc.astype(np.float32)))
        self.register_buffer("m", None if h.m is None else torch.from_numpy(h.m.astype(np.float32)))
        # K-quants' and IQ4_XS's integer sub-block scales (and mins): shifts that train, in units of the largest
        # value the type stores (an optimizer's step is then the same fraction of the range for every type), added
        # to the stored integers and rounded back to integers within the type's range in every forward
        ranges = grid.SUB_SCALE_RANGE.get(qtype) if learn_sub_scales else None
        self.sub_ranges = ranges
        for name, base, r in (("sc_shift", self.sc, ranges and ranges[0]), ("m_shift", self.m, ranges and ranges[1])):
            if r is None or base is None:
                setattr(self, name, None)
            else:
                setattr(self, name, torch.nn.Parameter(torch.zeros_like(base)))
        self.register_buffer("table", torch.from_numpy(tab.values.copy()))
        # every table holds integers in [-127, 127]: the forward keeps the chosen values as int8
        assert torch.equal(self.table.to(torch.int8).float(), self.table), qtype.name
        self.uniform = tab.uniform
        self.table0 = float(tab.values[0])      # the lowest level's value (a Python float: no .item() when compiled)
        self.spacing = float(tab.values[-1] - tab.values[0]) / (len(tab.values) - 1)    # mean level spacing
        self.round_offset = (torch.nn.Parameter(torch.zeros(rows * cols // self.block, self.block))
                             if learn_round else None)
        self.register_buffer("levels0", torch.from_numpy(grid.levels(qtype, blocks).astype(np.int64)))
        self._blocks = blocks            # headers and layout the export starts from

    @property
    def d(self) -> torch.Tensor:
        """The block scales (float32 values, before their fp16 rounding)."""
        return self.d0 * self.d_factor

    @property
    def dmin(self) -> torch.Tensor | None:
        return None if self.dmin0 is None else self.dmin0 * self.dmin_factor

    def sub_scales(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The integer sub-block scales and mins (blocks, sub-blocks) as float32: the stored ones, moved by their
        learned shifts where those train."""
        out = []
        for base, shift, k in ((self.sc, self.sc_shift, 0), (self.m, self.m_shift, 1)):
            if shift is None:
                out.append(base)
            else:
                lo, hi = self.sub_ranges[k]
                out.append(_RoundInRange.apply(base + shift * float(hi), float(lo), float(hi)))
        return out[0], out[1]

    def sub_grid(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(a, b) per sub-block (blocks, sub-blocks) float32, through the scales' fp16 storage; b None for the types
        without a minimum (their value is a * T[L]: adding a zero would turn the decoder's -0.0 into +0.0)."""
        sc, m = self.sub_scales()
        a = _ThroughF16.apply(self.d) * sc
        dmin = self.dmin
        if m is not None:
            return a, -(_ThroughF16.apply(dmin) * m)
        if dmin is not None:
            return a, _ThroughF16.apply(dmin).expand_as(a)
        return a, None

    def _split(self, W: torch.Tensor) -> torch.Tensor:
        """W as (blocks, sub-blocks, sub), float32 (a view where it already is)."""
        return W.float().reshape(self._blocks.shape[0], -1, self.sub)

    @torch.no_grad()
    def nearest(self, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        """grid.nearest in torch: the level of a * T[l] + b nearest to w (blocks, sub-blocks, sub), a and b per
        sub-block; where a == 0 the starting level. Uniform tables: the levels as float32 (integers), computed in
        place in one buffer (this runs on every weight every step); the others: int64."""
        v = self.table
        # compiled (QAT --compile): no data-dependent branch (a graph break in every linear); the where is exact
        zero = torch.compiler.is_compiling() or bool((a == 0).any())
        a3 = (torch.where(a != 0, a, torch.ones_like(a)) if zero else a).unsqueeze(-1)
        t = (w - b.unsqueeze(-1)) if b is not None else w.clone()
        t.div_(a3)
        if self.uniform:
            L = t.sub_(v[0]).round_().clamp_(0, len(v) - 1)
            keep = self.levels0.view_as(L).to(L.dtype) if zero else None
        else:
            i = torch.clamp(torch.searchsorted(v, t.reshape(-1)).view_as(t), 1, len(v) - 1)
            L = torch.where((t - v[i - 1]).abs() <= (v[i] - t).abs(), i - 1, i)
            keep = self.levels0.view_as(L) if zero else None
        return torch.where((a != 0).unsqueeze(-1), L, keep) if zero else L

    def rounded(self, w: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """w (blocks, sub-blocks, sub) plus the learned rounding offset in level spacings of its sub-block's scale
        a (the forward's and the export's one expression); w itself without learned rounding."""
        if self.round_offset is None:
            return w
        step = a.detach().abs().mul(self.spacing).unsqueeze(-1)
        return w + self.round_offset.view_as(w).clamp(-ROUND_CLIP, ROUND_CLIP) * step

    def anchored(self) -> torch.Tensor:
        """Anchored learned rounding: the starting level of every weight moved by its offset (in levels, clipped to
        ROUND_CLIP), (blocks, sub-blocks, sub) int64; the scales then never re-round a weight."""
        v = self.round_offset.detach().view(self._blocks.shape[0], -1, self.sub).clamp(-ROUND_CLIP, ROUND_CLIP)
        return (self.levels0.view_as(v) + v).round().clamp(0, len(self.table) - 1).long()

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        a, b = self.sub_grid()
        if self.anchor:
            with torch.no_grad():
                t8 = self.table[self.anchored()].to(torch.int8)
            # the offsets' straight-through path: a level up adds a * spacing to the value
            v = self.round_offset.view_as(t8).clamp(-ROUND_CLIP, ROUND_CLIP)
            return _OnGrid.apply(v * (a.detach() * self.spacing).unsqueeze(-1), a, b, t8).reshape(self.shape)
        w = self.rounded(self._split(W), a)
        with torch.no_grad():
            L = self.nearest(w, a.detach(), None if b is None else b.detach())
            t8 = (L.add_(self.table0) if self.uniform else self.table[L]).to(torch.int8)
        return _OnGrid.apply(w, a, b, t8).reshape(self.shape)

    @torch.no_grad()
    def export(self, W: torch.Tensor) -> np.ndarray:
        """The blocks of forward(W): its levels and the fp16 scales it used."""
        a, b = self.sub_grid()
        L = (self.anchored() if self.anchor else self.nearest(self.rounded(self._split(W), a), a, b)) \
            .reshape(-1, self.block).long()
        d = _ThroughF16.apply(self.d).numpy()
        dmin = None if self.dmin0 is None else _ThroughF16.apply(self.dmin).numpy()
        blocks = grid.with_scales(self.qtype, self._blocks, d, dmin)
        if self.sc_shift is not None:
            sc, m = self.sub_scales()
            blocks = grid.with_sub_scales(self.qtype, blocks, sc.numpy().astype(np.int64),
                                          None if m is None else m.numpy().astype(np.int64))
        return grid.pack(self.qtype, blocks, L.numpy())
