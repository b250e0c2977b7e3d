"""Weight pruning of one linear layer: magnitude, Wanda, SparseGPT, unstructured or N:M.

What it buys: at a given sparsity, accuracy (SparseGPT > Wanda > magnitude at 50% and 2:4 on LLMs), and
speed only in runtimes with sparse kernels (2:4 on NVIDIA sparse tensor cores). A GGUF does not shrink and
llama.cpp does not run faster from zeros: it has no sparse format or kernel. Structured pruning is what
makes a llama.cpp model smaller and faster.

Masks are True where a weight is *removed*. Conventions follow the papers:
- magnitude: the smallest |W| of the whole layer (unstructured), or of each group of M inputs (N:M);
- Wanda (Sun et al., 2023): score |W_ij| * ||X_j||_2 (the input column's norm over calibration tokens, i.e.
  sqrt of the importance matrix's sum), compared within each output row (or each group of M);
- SparseGPT (Frantar & Alistarh, 2023): OBS with the GPTQ machinery (same Hessian, dampening and Cholesky
  factor of the inverse as quant/gptq.py): per block of `block` columns the mask takes the smallest
  w^2 / U_jj^2 over the block's entries (or per row and group of M for N:M), then each column's removed
  weights are zeroed and the error spread over the columns not yet processed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def _nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Remove the n smallest scores of every group of m consecutive inputs in each row."""
    rows, cols = score.shape
    if cols % m:
        raise ValueError(f"{cols} inputs do not split into groups of {m}")
    g = score.reshape(rows, cols // m, m)
    idx = g.argsort(dim=-1, stable=True)[..., :n]
    mask = torch.zeros_like(g, dtype=torch.bool)
    mask.scatter_(-1, idx, True)
    return mask.reshape(rows, cols)


def _check(sparsity: float | None, nm: tuple[int, int] | None) -> None:
    if (sparsity is None) == (nm is None):
        raise ValueError("give either a sparsity or an N:M pattern")
    if sparsity is not None and not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if nm is not None and not 0 < nm[0] < nm[1]:
        raise ValueError(f"N:M needs 0 < N < M, got {nm[0]}:{nm[1]}")


def magnitude_mask(W: torch.Tensor, sparsity: float | None = None, nm: tuple[int, int] | None = None):
    _check(sparsity, nm)
    score = W.detach().abs().float()
    if nm is not None:
        return _nm_mask(score, *nm)
    k = int(score.numel() * sparsity)
    mask = torch.zeros(score.numel(), dtype=torch.bool)
    mask[score.flatten().argsort(stable=True)[:k]] = True
    return mask.reshape(score.shape)


def wanda_mask(W: torch.Tensor, x_sqsum: torch.Tensor, sparsity: float | None = None,
               nm: tuple[int, int] | None = None):
    """x_sqsum: (cols,) sum of squared inputs per column over the calibration tokens."""
    _check(sparsity, nm)
    score = W.detach().abs().float() * x_sqsum.float().clamp(min=0).sqrt()[None, :]
    if nm is not None:
        return _nm_mask(score, *nm)
    k = int(score.shape[1] * sparsity)
    idx = score.argsort(dim=1, stable=True)[:, :k]
    mask = torch.zeros_like(score, dtype=torch.bool)
    mask.scatter_(1, idx, True)
    return mask


@dataclass
class SparseGPTResult:
    W: torch.Tensor          # (rows, cols) pruned and updated weights (zeros where mask)
    mask: torch.Tensor       # True where removed
    damp: float


def sparsegpt(W: torch.Tensor, H: torch.Tensor, sparsity: float | None = None, nm: tuple[int, int] | None = None,
              *, block: int = 128, damp: float = 0.01, dtype: torch.dtype = torch.float32) -> SparseGPTResult:
    """W (rows, cols), H = 2/n X^T X (cols, cols)."""
    from ..quant.gptq import factor
    _check(sparsity, nm)
    rows, cols = W.shape
    if nm is not None and (cols % nm[1] or block % nm[1]):
        raise ValueError(f"{cols} inputs / block {block} do not split into groups of {nm[1]}")
    U, used = factor(H, 1, damp=damp)        # unit 1, no reordering: U is upper Cholesky of the inverse
    U = U.to(dtype)
    W = W.detach().to(dtype).clone()
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        d = torch.diagonal(U1)
        score = W1 ** 2 / (d ** 2)[None, :]
        if nm is not None:
            m1 = _nm_mask(score, *nm)
        else:
            k = int(score.numel() * sparsity)
            m1 = torch.zeros(score.numel(), dtype=torch.bool)
            m1[score.flatten().argsort(stable=True)[:k]] = True
            m1 = m1.reshape(score.shape)
        for j in range(i2 - i1):
            w = W1[:, j]
            q = torch.where(m1[:, j], torch.zeros_like(w), w)
            err = (w - q) / U1[j, j]
            W1[:, j:] -= err[:, None] * U1[j, j:][None, :]
            W1[:, j] = q
            E1[:, j] = err
        W[:, i1:i2] = W1
        mask[:, i1:i2] = m1
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return SparseGPTResult(W, mask, used)
