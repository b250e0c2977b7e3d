"""Importance-weighted k-means codebook quantization (SqueezeLLM-style, Kim et al., 2023).

Every output row of a weight gets its own codebook of 2^bits values; each weight stores the index of its
centroid. Centroids minimize sum_j w_j (W_rj - c[idx_rj])^2 with w_j the importance of input column j (the mean
squared activation, i.e. the importance matrix: under the Fisher's Kronecker factorization a weight's
sensitivity is g_r * E[x_j^2], and g_r is constant within a row, so only E[x_j^2] changes the clustering).
Weighted Lloyd iterations, all rows at once, from weighted-quantile initialization.

llama.cpp has no codebook format, so this is a torch/safetensors path (`slimlm kmeans`): `KMeansLinear`
keeps the packed indices and codebooks and decodes in forward.
"""
from __future__ import annotations

import torch


def kmeans_rows(W: torch.Tensor, bits: int, importance: torch.Tensor | None = None, *, iters: int = 25,
                chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """W (rows, cols) -> (codebook (rows, 2^bits) float32 ascending, indices (rows, cols) uint8)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1..8, got {bits}")
    k = 1 << bits
    W = W.detach().float()
    rows, cols = W.shape
    w = (torch.ones(cols) if importance is None else torch.as_tensor(importance, dtype=torch.float32)).clamp(min=0)
    w = w + 1e-8 * (w.mean() + 1e-30)           # no zero weight: every column still belongs to a cluster
    books = torch.empty(rows, k)
    idx = torch.empty(rows, cols, dtype=torch.uint8)
    for r0 in range(0, rows, chunk):
        X = W[r0:r0 + chunk]
        # init: weighted quantiles of each row at the k mid-levels
        order = X.argsort(1)
        xs = X.gather(1, order)
        cw = w[order].cumsum(1)
        cw = cw / cw[:, -1:]
        q = (torch.arange(k, dtype=torch.float32) + 0.5) / k
        pos = torch.searchsorted(cw.contiguous(), q.expand(X.shape[0], k).contiguous()).clamp(max=cols - 1)
        C = xs.gather(1, pos)
        for _ in range(iters):
            a = (X[:, :, None] - C[:, None, :]).abs().argmin(2)                 # (n, cols)
            oh = torch.nn.functional.one_hot(a, k).float() * w[None, :, None]    # (n, cols, k)
            num = torch.einsum("nck,nc->nk", oh, X)
            den = oh.sum(1)
            newC = torch.where(den > 0, num / den.clamp(min=1e-30), C)
            if torch.equal(newC, C):
                break
            C = newC
        C = C.sort(1).values
        a = (X[:, :, None] - C[:, None, :]).abs().argmin(2)
        books[r0:r0 + chunk] = C
        idx[r0:r0 + chunk] = a.to(torch.uint8)
    return books, idx


def decode(books: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return books.gather(1, idx.long())


def pack(idx: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 indices (rows, cols) -> (rows, ceil(cols * bits / 8)) bytes, little-endian bit order."""
    rows, cols = idx.shape
    bitsarr = ((idx[:, :, None].long() >> torch.arange(bits)) & 1).reshape(rows, cols * bits)
    pad = (-bitsarr.shape[1]) % 8
    bitsarr = torch.nn.functional.pad(bitsarr, (0, pad)).reshape(rows, -1, 8)
    return (bitsarr << torch.arange(8)).sum(2).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    rows = packed.shape[0]
    b = ((packed[:, :, None].long() >> torch.arange(8)) & 1).reshape(rows, -1)[:, :cols * bits]
    return (b.reshape(rows, cols, bits) << torch.arange(bits)).sum(2).to(torch.uint8)


class KMeansLinear(torch.nn.Module):
    """A linear layer whose weight is a per-row codebook and packed indices, decoded in forward."""

    def __init__(self, books: torch.Tensor, packed: torch.Tensor, bits: int, in_features: int,
                 bias: torch.Tensor | None = None):
        super().__init__()
        self.bits, self.in_features, self.out_features = bits, in_features, books.shape[0]
        self.register_buffer("codebook", books)
        self.register_buffer("packed", packed)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        return decode(self.codebook.float(), unpack(self.packed, self.bits, self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight.to(x.dtype), self.bias)
