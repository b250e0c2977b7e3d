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

from ..arch import decoder_layers
from ..errors import ConfigError


def _nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Remove the n smallest scores of every group of m consecutive inputs in each row."""
    rows, cols = score.shape
    if cols % m:
        raise ConfigError(f"N:M {n}:{m}: {cols} inputs do not split into groups of {m}")
    g = score.reshape(rows, cols // m, m)
    idx = g.argsort(dim=-1, stable=True)[..., :n]
    mask = torch.zeros_like(g, dtype=torch.bool)
    mask.scatter_(-1, idx, True)
    return mask.reshape(rows, cols)


def _check(sparsity: float | None, nm: tuple[int, int] | None) -> None:
    if (sparsity is None) == (nm is None):
        raise ConfigError("give either a sparsity or an N:M pattern")
    if sparsity is not None and not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"sparsity must be in [0, 1), got {sparsity}")
    if nm is not None and not 0 < nm[0] < nm[1]:
        raise ConfigError(f"N:M needs 0 < N < M, got {nm[0]}:{nm[1]}")


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
    if nm is not None:
        if cols % nm[1]:
            raise ConfigError(f"N:M {nm[0]}:{nm[1]}: {cols} inputs do not split into groups of {nm[1]}")
        block = max(nm[1], block // nm[1] * nm[1])        # a block holds whole groups
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


WEIGHT_METHODS = ("magnitude", "wanda", "sparsegpt")


def parse_sparsity(text: str) -> tuple[float | None, tuple[int, int] | None]:
    """'0.5' or '50%' -> (0.5, None); '2:4' -> (None, (2, 4))."""
    t = str(text).strip()
    try:
        if ":" in t:
            n, m = (int(v) for v in t.split(":"))
            _check(None, (n, m))
            return None, (n, m)
        v = float(t[:-1]) / 100 if t.endswith("%") else float(t)
        _check(v, None)
        return v, None
    except (ValueError, ConfigError) as e:
        raise ConfigError(f"sparsity {text!r}: give a fraction (0.5), a percentage (50%) or N:M (2:4); {e}") from None


@torch.no_grad()
def owl_sparsities(model, chunks: torch.Tensor, sparsity: float, *, lam: float = 0.08, m: float = 5.0,
                   progress: bool = True) -> list[float]:
    """OWL (Yin et al., 2023): per-layer sparsity from each decoder layer's outlier ratio, the fraction of its
    Wanda scores |W_ij| ||X_j|| (all its linears together, dense model) above `m` x their mean. The ratios are
    scaled to [0, 2 lam], centred, and layers with more outliers are pruned less: s_l = s - (r_l - mean r)."""
    from ..sequential import block_linears, collect_imatrix
    im = collect_imatrix(model, chunks, progress=progress)
    per_layer: dict[int, list[torch.Tensor]] = {}
    for name, lins in block_linears(model).items():
        x2 = torch.from_numpy(im.sums[name]).float()
        score = torch.cat([lin.weight.detach().abs().float() for lin in lins]) * x2.clamp(min=0).sqrt()[None, :]
        per_layer.setdefault(int(name.split(".")[1]), []).append(score.flatten())
    ratios = []
    for i in sorted(per_layer):
        a = torch.cat(per_layer[i])
        ratios.append(float((a > m * a.mean()).float().mean()))
    r = torch.tensor(ratios, dtype=torch.float64)
    span = float(r.max() - r.min())
    r = (r - r.min()) * (2 * lam / span) if span > 0 else torch.zeros_like(r)
    out = (sparsity - (r - r.mean())).clamp(0.0, 0.99)
    return out.tolist()


def prune_linear(method: str, W: torch.Tensor, H: torch.Tensor | None, sparsity: float | None,
                 nm: tuple[int, int] | None, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One linear's weight pruned by `method` given its input Hessian H (2/n X^T X; unused by magnitude):
    (new weight, mask of removed weights, SparseGPT's dampening or 0)."""
    W = W.float()
    if method == "magnitude":
        mask = magnitude_mask(W, sparsity, nm)
    elif method == "wanda":
        mask = wanda_mask(W, torch.diagonal(H), sparsity, nm)
    else:
        r = sparsegpt(W, H, sparsity, nm, damp=damp)
        return r.W, r.mask, r.damp
    return W.masked_fill(mask, 0.0), mask, 0.0


def prune_weights_model(model, chunks: torch.Tensor | None, method: str, sparsity: float | None = None,
                        nm: tuple[int, int] | None = None, *, owl: bool = False,
                        sparsities: list[float] | None = None, damp: float = 0.01, progress: bool = True):
    """Weight-prune every linear of the decoder layers of a copy of `model` (embedding and output projection
    are left dense, as in the Wanda and SparseGPT papers). Wanda and SparseGPT run one decoder layer at a
    time on calibration chunks that went through the already-pruned earlier layers, and inside a layer in
    forward order, each linear seeing the pruned earlier linears' outputs (pre-hooks, as GPTQ's driver);
    q/k/v and gate/up share one input statistic. `owl`: per-layer sparsities by outlier ratio (unstructured
    only). Returns (the pruned Model, stats with the achieved sparsity)."""
    import copy
    import time

    from tqdm.auto import tqdm

    from ..sequential import _checked_hessian, _layer_inputs, input_key, run_layer
    if method not in WEIGHT_METHODS:
        raise ConfigError(f"unknown weight-pruning method {method!r}; choose {', '.join(WEIGHT_METHODS)}")
    _check(sparsity, nm)
    if (method != "magnitude" or owl) and chunks is None:
        raise ConfigError(f"{method}{' with OWL' if owl else ''} needs calibration text")
    if owl and nm is not None:
        raise ConfigError("OWL allocates unstructured sparsity per layer; N:M patterns are the same everywhere")
    n_layer = len(decoder_layers(model.module))
    if sparsities is not None and (nm is not None or owl or len(sparsities) != n_layer):
        raise ConfigError("per-layer sparsities: unstructured only, one per decoder layer, not with OWL")
    per_layer = list(sparsities) if sparsities is not None else \
        owl_sparsities(model, chunks, sparsity, progress=progress) if owl else [sparsity] * n_layer
    t0 = time.perf_counter()
    out = copy.copy(model)
    out.module = module = copy.deepcopy(model.module)
    counts = {"removed": 0, "total": 0, "damp": 0.0}

    def apply(mod, W_new, mask):
        mod.weight.data = W_new.to(mod.weight.dtype)
        counts["removed"] += int(mask.sum())
        counts["total"] += mask.numel()

    layers = decoder_layers(module)
    if method == "magnitude":
        for layer, sp in zip(layers, per_layer, strict=True):
            for mod in layer.modules():
                if isinstance(mod, torch.nn.Linear):
                    mask = magnitude_mask(mod.weight.data, sp if nm is None else None, nm)
                    apply(mod, mod.weight.data.masked_fill(mask, 0.0), mask)
    else:
        cache = _layer_inputs(module, chunks)
        x, kw = torch.cat([c[0] for c in cache]), cache[0][1]
        del cache
        for i, layer in enumerate(tqdm(layers, desc=f"{method} pruning", unit="layer", disable=not progress,
                                       leave=False)):
            shared: dict = {}

            sp = per_layer[i] if nm is None else None

            def hook(name, i=i, shared=shared, sp=sp):
                def f(mod, inputs):
                    key = input_key(inputs[0])
                    if key not in shared:       # holding the input keeps its memory from being reused
                        shared[key] = (inputs[0], _checked_hessian(inputs[0], f"layer {i} {name}"))
                    W_new, mask, used = prune_linear(method, mod.weight.data, shared[key][1], sp, nm, damp)
                    counts["damp"] = max(counts["damp"], used)
                    apply(mod, W_new, mask)
                return f

            hs = [m.register_forward_pre_hook(hook(n)) for n, m in layer.named_modules()
                  if isinstance(m, torch.nn.Linear)]
            try:
                x = run_layer(layer, x, kw)
            finally:
                for h in hs:
                    h.remove()
            shared.clear()
    stats = {"method": method, "pattern": f"{nm[0]}:{nm[1]}" if nm else f"{sparsity:.0%}",
             "sparsity": counts["removed"] / max(counts["total"], 1), "pruned_weights": counts["removed"],
             "seconds": time.perf_counter() - t0}
    if owl or sparsities is not None:
        stats["layer_sparsities"] = [round(v, 4) for v in per_layer]
    if method == "sparsegpt":
        stats["max_damp"] = counts["damp"]
    out.history = list(model.history) + [{"step": "weight pruning", **stats}]
    return out, stats
