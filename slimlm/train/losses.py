"""Distillation losses, pure tensor math.

Forward KL(teacher || student) on the logits at temperature T, scaled by T^2 (Hinton et al., 2015) — the
best single loss in Minitron's ablation (arXiv:2407.14679): it beat CE, MSE, cosine and reverse KL. The teacher
can be the full distribution (computed on the fly) or its top-k log-probabilities plus the remaining mass
(a cache computed once per training token): then KL is taken over k + 1 outcomes (the k tokens, and
"any other token"), which is exact for the teacher's mass outside its top k lumped into one bucket.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def kl_full(s: torch.Tensor, t: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """s, t: (..., vocab) student and teacher logits -> mean over positions of T^2 KL(p_t || p_s)."""
    ls = F.log_softmax(s.float() / T, dim=-1)
    lt = F.log_softmax(t.float() / T, dim=-1)
    kl = (lt.exp() * (lt - ls)).sum(-1)
    return kl.mean() * T * T


def topk_targets(t: torch.Tensor, k: int, T: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher logits (..., vocab) -> (indices (..., k) int64, log-probabilities at T (..., k) float32)."""
    lt = F.log_softmax(t.float() / T, dim=-1)
    v, i = lt.topk(k, dim=-1)
    return i, v


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, stable on both ends."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def kl_topk(s: torch.Tensor, idx: torch.Tensor, lt: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """s: (..., vocab) student logits; idx, lt: (..., k) the teacher's top-k token ids and log-probabilities at
    T. KL over the k tokens plus one bucket for the rest, mean over positions, times T^2."""
    ls_all = F.log_softmax(s.float() / T, dim=-1)
    ls = ls_all.gather(-1, idx.long())
    lt = lt.float()
    kl = (lt.exp() * (lt - ls)).sum(-1)
    rest_t = _log1mexp(torch.logsumexp(lt, dim=-1))
    rest_s = _log1mexp(torch.logsumexp(ls, dim=-1))
    kl = kl + rest_t.exp() * (rest_t - rest_s)
    return kl.mean() * T * T


# positions per chunk of the fused LM head below: (256, 49152) fp32 logits are 48 MiB, and on 2 AVX2 cores a
# 256-row chunk of the head's matmul ran as fast as the whole 1024-row batch (128 rows: 1.2-1.5x slower)
HEAD_CHUNK = 256


def _lse_inplace(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logsumexp(z, -1), sum(exp(z - max))) with z overwritten by exp(z - max): torch.logsumexp would allocate two
    temporaries of z's size (48 MiB per chunk of the fused head, a page fault storm each time)."""
    m = z.amax(-1, keepdim=True)
    ez = z.sub_(m).exp_()
    s = ez.sum(-1, keepdim=True)
    return m + s.log(), s


def _chunk_kl_grad(zc: torch.Tensor, idx: torch.Tensor, lt: torch.Tensor, T: float, scale: float, out_dtype):
    """One chunk of the fused head's loss: logits zc (n, vocab), any dtype -> (kl_topk's per-position KL, not
    scaled; scale * dKL/dz in out_dtype) at temperature T (dz of the logits before the division by T: the caller
    folds 1/T into scale). zc is only read.
    The gradient, written out: with ls_j = z_j - lse(z) at the k teacher tokens and the "rest" bucket
    rs = 1 - sum_j exp(ls_j), dKL/dls_j = g_j = exp(rt - rs) exp(ls_j) - p_t,j, and dls_j/dz = onehot_j - softmax(z);
    so dKL/dz = softmax(z) * (-sum_j g_j) + scatter(g) (autograd's path: ~10 passes over z). The dense part is one
    elementwise pass over the logits written straight to out_dtype, and the k entries of each row are then
    overwritten with their whole value (top-k ids are distinct): under torch.compile (CHUNK_KERNELS) the pass over
    the logits fuses with the max and the sum of exp. Eager, _chunk_kl_grad_inplace does the same in place."""
    z = zc.float()
    if T != 1:
        z = z / T
    m = z.amax(-1, keepdim=True)
    s = (z - m).exp().sum(-1, keepdim=True)
    zk = z.gather(-1, idx) - m
    ek = zk.exp()                                       # softmax(z) * s at the k teacher tokens
    ls = zk - s.log()
    pt = lt.exp()
    mass_s = torch.logsumexp(ls, -1)
    rt, rs = _log1mexp(torch.logsumexp(lt, -1)), _log1mexp(mass_s)
    kl = (pt * (lt - ls)).sum(-1) + rt.exp() * (rt - rs)
    # _log1mexp clamps the student's top-k log-mass at -1e-7: no gradient through the clamp, as autograd has it
    g = torch.where(mass_s < -1e-7, (rt - rs).exp(), 0.0)[:, None] * ls.exp() - pt
    c = -g.sum(-1, keepdim=True) / s
    gz = ((z - m).exp() * (c * scale)).to(out_dtype)
    return kl, gz.scatter(-1, idx, ((ek * c + g) * scale).to(out_dtype))


def _chunk_kl_grad_inplace(zc: torch.Tensor, idx: torch.Tensor, lt: torch.Tensor, T: float, scale: float,
                           out_dtype):
    """_chunk_kl_grad eager, in place: the logits' fp32 copy (zc itself when it is fp32: then it is overwritten)
    becomes the gradient, with no other temporary of its size (each would be 48 MiB at 256 x 49k, a page-fault
    storm)."""
    z = zc.float()
    if T != 1:
        z.div_(T)
    zk = z.gather(-1, idx)
    lse, s = _lse_inplace(z)                          # z = exp(z - max) = softmax(z) * s
    ls = zk - lse
    pt = lt.exp()
    mass_s = torch.logsumexp(ls, -1)
    rt, rs = _log1mexp(torch.logsumexp(lt, -1)), _log1mexp(mass_s)
    kl = (pt * (lt - ls)).sum(-1) + rt.exp() * (rt - rs)
    g = torch.where(mass_s < -1e-7, (rt - rs).exp(), 0.0)[:, None] * ls.exp() - pt     # as in _chunk_kl_grad
    z.mul_(-g.sum(-1, keepdim=True) / s)
    z.scatter_add_(-1, idx, g)
    return kl, z.mul_(scale).to(out_dtype)


def _chunk_topk_inplace(zc: torch.Tensor, k: int, T: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk of the teacher's top-k: logits zc (n, vocab) -> (ids, log-probabilities at T) of its top k; eager,
    in place (zc is overwritten when it is fp32)."""
    z = zc.float()
    if T != 1:
        z.div_(T)
    v, i = z.topk(k, dim=-1)
    return i, v.sub_(_lse_inplace(z)[0])


def _chunk_lse(zc: torch.Tensor, T: float) -> torch.Tensor:
    """logsumexp(zc / T) over the vocabulary, in fp32 (n, 1): the part of the teacher's top-k that compiles well."""
    z = zc.float()
    return torch.logsumexp(z / T if T != 1 else z, -1, keepdim=True)


class _TopKThen:
    """A chunk of the teacher's top-k for compiled runs: the top k taken in the logits' own dtype (the same k values
    as from their fp32 copy, without writing one; among tied logits it may pick other ids of the same value), the
    logsumexp by `lse` (compiled: one fused read of the logits)."""

    def __init__(self, lse):
        self.lse = lse

    @property
    def ok(self) -> bool | None:                      # as CompiledOrEager.ok: whether the compiled part compiled
        return self.lse.ok

    def __call__(self, zc: torch.Tensor, k: int, T: float) -> tuple[torch.Tensor, torch.Tensor]:
        v, i = zc.topk(k, dim=-1)
        v = v.float()
        return i, (v / T if T != 1 else v) - self.lse(zc, T)


class ChunkKernels:
    """The fused head's per-chunk functions, eager or compiled (torch.compile fuses each chunk's passes over its
    (positions, vocab) logits: the loss's dense gradient becomes one pass, the teacher's logsumexp one read;
    bench/heal_kernels.py times them). The trainer asks for the compiled ones where it compiles the student
    (--compile); a compile that fails runs eager, with a warning, as the student does."""

    def __init__(self):
        # eager: in place (fewest passes and temporaries); compiled: the same math written functionally, which
        # inductor fuses; tests/test_trainer.py checks the two forms against each other and the unfused loss
        self.eager = {"kl_grad": _chunk_kl_grad_inplace, "topk": _chunk_topk_inplace}
        self.compiled: dict = {}

    def __call__(self, name: str, compiled: bool):
        if not compiled:
            return self.eager[name]
        if name not in self.compiled:
            from .parts import CompiledOrEager
            if name == "kl_grad":
                self.compiled[name] = CompiledOrEager(_chunk_kl_grad, eager=_chunk_kl_grad_inplace)
            else:
                # topk itself stays eager (inductor has no faster one), so only the logsumexp is compiled
                self.compiled[name] = _TopKThen(CompiledOrEager(_chunk_lse))
        return self.compiled[name]

    def ok(self, name: str) -> bool | None:
        """Whether the compiled kernel `name` compiled (None: not called yet)."""
        return getattr(self.compiled.get(name), "ok", None)


CHUNK_KERNELS = ChunkKernels()


class _HeadTopKKL(torch.autograd.Function):
    """kl_topk(h @ W.T, ...) without the (positions, vocab) logits: the LM head and the loss run HEAD_CHUNK
    positions at a time, and each chunk's gradient is taken right away (the chunk's logits are not kept for a
    backward pass), so only d/dh (positions x hidden) and, when W trains, d/dW stay. Under autocast the head's
    matmuls run in its dtype (bf16), the loss in fp32, as the unfused path."""

    @staticmethod
    def forward(ctx, h, W, idx, lt, T: float, compiled: bool = False):
        d = h.shape[-1]
        h2, idx2, lt2 = h.reshape(-1, d), idx.reshape(-1, idx.shape[-1]).long(), lt.reshape(-1, lt.shape[-1]).float()
        n = h2.shape[0]
        dev = h.device.type
        cd = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else torch.float32
        w = W.detach().to(cd)
        dh = torch.empty(h2.shape, dtype=h.dtype, device=h.device)
        dw = torch.zeros(W.shape, dtype=torch.float32, device=W.device) if ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        kernel = CHUNK_KERNELS("kl_grad", compiled)
        with torch.no_grad(), torch.autocast(dev, enabled=False):
            for a in range(0, n, HEAD_CHUNK):
                hc = h2[a:a + HEAD_CHUNK].detach().to(cd)
                # d(T^2 * mean KL)/d(logits) = T/n * dKL/dz
                kl, gz = kernel(hc @ w.T, idx2[a:a + HEAD_CHUNK], lt2[a:a + HEAD_CHUNK], T, T / n, cd)
                total += kl.sum()
                dh[a:a + HEAD_CHUNK] = gz @ w
                if dw is not None:
                    dw.addmm_(gz.float().T, hc.float())
        ctx.save_for_backward(dh, dw)
        ctx.w_dtype, ctx.h_shape = W.dtype, h.shape
        return total * (T * T / n)

    @staticmethod
    def backward(ctx, g):
        dh, dw = ctx.saved_tensors
        return (dh.mul(g).reshape(ctx.h_shape), None if dw is None else dw.mul(g).to(ctx.w_dtype), None, None, None,
                None)


def head_kl_topk(h: torch.Tensor, W: torch.Tensor, idx: torch.Tensor, lt: torch.Tensor, T: float = 1.0, *,
                 compiled: bool = False) -> torch.Tensor:
    """kl_topk of the logits h @ W.T (h: (..., hidden) the final hidden states, W: (vocab, hidden) the LM head),
    fused and chunked (_HeadTopKKL): the same loss and gradients without materialising the logits. `compiled`:
    each chunk's loss and gradient run torch.compile'd (CHUNK_KERNELS)."""
    return _HeadTopKKL.apply(h, W, idx, lt, T, compiled)


@torch.no_grad()
def head_topk_targets(h: torch.Tensor, W: torch.Tensor, k: int, T: float = 1.0, *,
                      compiled: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """topk_targets of the logits h @ W.T, HEAD_CHUNK positions at a time (the top k of the logits are those of the
    log-probabilities; each minus its chunk row's logsumexp). `compiled`: each chunk's top-k and logsumexp run
    torch.compile'd (CHUNK_KERNELS)."""
    lead, d = h.shape[:-1], h.shape[-1]
    h2 = h.reshape(-1, d)
    dev = h.device.type
    if torch.is_autocast_enabled(dev):           # cast once, not per chunk (the same values autocast would use)
        W = W.to(torch.get_autocast_dtype(dev))
    kernel = CHUNK_KERNELS("topk", compiled)
    ii, vv = [], []
    for a in range(0, h2.shape[0], HEAD_CHUNK):
        i, v = kernel(F.linear(h2[a:a + HEAD_CHUNK], W), k, T)
        ii.append(i)
        vv.append(v)
    return torch.cat(ii).reshape(*lead, k), torch.cat(vv).reshape(*lead, k)


def ce(s: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of logits s (b, n, vocab) on the token ids (b, n)."""
    return F.cross_entropy(s[:, :-1].float().reshape(-1, s.shape[-1]), ids[:, 1:].reshape(-1))


def hidden_mse(hs: list[torch.Tensor], ht: list[torch.Tensor]) -> torch.Tensor:
    """Mean over matched layers of ||h_s - h_t||^2 / ||h_t - mean||^2 (per-layer normalised residual-stream MSE)."""
    out = [((a.float() - b.float()) ** 2).mean() / b.float().var().clamp_min(1e-12) for a, b in zip(hs, ht, strict=True)]
    return torch.stack(out).mean()
