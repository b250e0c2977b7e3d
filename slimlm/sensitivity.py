"""How much each tensor's quantization costs, per candidate type: the input to size-budgeted mixed precision.

Measured on calibration text with the Fisher information of the model's own predictions (the second-order
term of the KL divergence to the original): for a linear layer y = W x the per-token KLD from a weight
error D is, to second order and with the Fisher's Kronecker factorization (K-FAC) kept diagonal over output
rows,

    dKLD ~= 1/2 * sum_r g_r * D_r A D_r^T,   A = E[x x^T] (the layer's inputs), g_r = E[(d log p(y) / d o_r)^2]

where o = W x and y is sampled from the original model (so E over y gives the true Fisher, not the
empirical one). A is what GPTQ's Hessian and llama.cpp's importance matrix are built from (its diagonal
*is* the importance matrix); g says how much each output row matters downstream, which neither has. The
token embedding's input side is D[token] . S[token], with S the mean squared gradient reaching each used
token's embedding; a tied embedding adds the output projection's term. A type's price also holds what llama.cpp's
CPU runtime adds to it: the rounding of the activations each quantized weight is multiplied with (Q8_K's blocks
of 256 for the K-quants cost several times Q8_0's blocks of 32; `slimlm.quant.activations`).

`predict()` encodes every quantizable tensor with each candidate type (the same encoders and importance
weights the export uses) and evaluates that formula: a table name -> type -> (bytes, predicted dKLD).
Results are cached on disk, keyed by every byte of the model's weights, its config, the calibration tokens
and the settings.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .arch import decoder_layers, final_norm
from .errors import NumericsError, OutputError
from .formats import get_format
from .quant.activations import KINDS, activation_kind, fits, runtime_activations

# block types a tensor may get, most bytes first (each only where its block size divides the row length)
CANDIDATES = ("Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "IQ4_NL", "Q4_0", "IQ4_XS", "Q3_K", "Q2_K")
_VERSION = 3          # 2: the key hashes every weight and the config; 3: llama.cpp's activation rounding


@dataclass
class FisherStats:
    A: dict[str, torch.Tensor]           # input id -> (cols, cols) float64 mean x x^T
    g: dict[str, torch.Tensor]           # HF module name -> (rows,) float64 mean squared output gradient
    inputs: dict[str, str]               # HF module name -> input id (linears reading one tensor share A)
    emb: torch.Tensor | None = None      # (vocab, hidden) mean squared gradient at each token's embedding
    tokens: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)
    # input id -> activation kind -> (cols,) float64 mean squared rounding error of llama.cpp's activations
    act: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


def fisher_stats(model, chunks: torch.Tensor, *, seed: int = 0, progress: bool = True) -> FisherStats:
    """One forward and backward pass per calibration chunk with labels sampled from the model itself."""
    import time

    from .sequential import input_key
    t0 = time.perf_counter()
    module, spec = model.module, model.spec
    lins = {n: m for n, m in module.named_modules()
            if isinstance(m, torch.nn.Linear) and (spec.layer_of(n) is not None or n == spec.layout.head)}
    A: dict[str, torch.Tensor] = {}
    g: dict[str, torch.Tensor] = {}
    inputs: dict[str, str] = {}
    act: dict[str, dict[str, torch.Tensor]] = {}
    live: dict[tuple, tuple] = {}
    emb_mod = module.get_input_embeddings()
    emb = torch.zeros(emb_mod.weight.shape, dtype=torch.float32)

    def fwd(name):
        def f(_mod, args, out):
            x = args[0].detach()
            first, _ = live.setdefault(input_key(x), (name, x))   # holding x keeps its memory from being reused
            inputs[name] = first
            if first == name:
                x2 = x.reshape(-1, x.shape[-1]).float()
                a = (x2.T @ x2).double()
                A[name] = A[name] + a if name in A else a
                acc = act.setdefault(name, {})
                for kind in [k for k in KINDS if fits(k, x2.shape[1])]:
                    e = (runtime_activations(x2, kind) - x2).double().pow(2).sum(0)
                    acc[kind] = acc[kind] + e if kind in acc else e

            def grad_hook(gr, name=name):
                s = gr.detach().reshape(-1, gr.shape[-1]).double().pow(2).sum(0)
                g[name] = g[name] + s if name in g else s
            if out.requires_grad:
                out.register_hook(grad_hook)
        return f

    def emb_hook(_mod, args, out):
        out = out.detach().requires_grad_(True)
        ids = args[0].reshape(-1)

        def grad_hook(gr):
            emb.index_add_(0, ids, gr.detach().reshape(-1, gr.shape[-1]).float().pow(2))
        out.register_hook(grad_hook)
        return out

    gen = torch.Generator().manual_seed(seed)
    handles = [m.register_forward_hook(fwd(n)) for n, m in lins.items()]
    handles.append(emb_mod.register_forward_hook(emb_hook))
    n_tok = 0
    try:
        with torch.enable_grad():
            for chunk in tqdm(chunks, desc="sensitivity (Fisher)", unit="chunk", disable=not progress,
                              leave=False):
                live.clear()
                logits = module(input_ids=chunk[None], use_cache=False).logits[0].float()
                logp = torch.log_softmax(logits, -1)
                if not torch.isfinite(logp).all():
                    raise NumericsError("non-finite logits on calibration text")
                y = torch.multinomial(logp.detach().exp(), 1, generator=gen)
                (-logp.gather(1, y).sum()).backward()
                n_tok += chunk.numel()
    finally:
        for h in handles:
            h.remove()
        live.clear()
    return FisherStats({k: v / n_tok for k, v in A.items()}, {k: v / n_tok for k, v in g.items()}, inputs,
                       emb / n_tok, n_tok, time.perf_counter() - t0,
                       act={k: {t: e / n_tok for t, e in v.items()} for k, v in act.items()})


def _weight_terms(model, stats: FisherStats) -> dict[str, list[tuple]]:
    """GGUF name -> [(A, g in GGUF row order, activation errors)] for the output-side terms of each quantizable
    2-D tensor."""
    spec, cfg = model.spec, model.config
    tied = bool(cfg.get("tie_word_embeddings", False))
    out: dict[str, list[tuple]] = {}
    for name in [n for n in stats.inputs if n in stats.g]:     # forward order: a fused tensor's parts in row order
        gsq = stats.g[name]
        hf = f"{name}.weight"
        rows = torch.arange(gsq.shape[0])
        if name == spec.layout.head:
            gg = "token_embd.weight" if tied else spec.hf_to_gguf(hf)
        else:
            gg = spec.hf_to_gguf(hf)
            rows = spec.to_gguf_tensor(hf, rows, cfg)
        A, act = stats.A[stats.inputs[name]], stats.act.get(stats.inputs[name], {})
        terms = out.setdefault(gg, [])
        if terms and terms[-1][0] is A and spec.layer_of(hf) is not None:   # the next part of a fused tensor
            terms[-1] = (A, torch.cat([terms[-1][1], gsq[rows]]), act)
        else:
            terms.append((A, gsq[rows], act))
    return out


def predict(model, stats: FisherStats, *, candidates=CANDIDATES, importance=None, activations: bool = True,
            progress: bool = True) -> dict[str, dict[str, tuple[int, float]]]:
    """name -> type -> (bytes, predicted dKLD) for every 2-D tensor of the model and every candidate type
    its rows fit. `importance(name)` gives the encoder's importance weights (as the export will use them).

    With `activations` a type's price includes llama.cpp's rounding of the activations it multiplies
    (`slimlm.quant.activations`: Q8_K's blocks of 256 for the K-quants, Q8_0's of 32 for the legacy types): an
    output error W dx with dx independent per input channel, 1/2 sum_r g_r sum_j W_rj^2 E[dx_j^2]."""
    from .gguf.writer import _gguf_tensors, encode
    from .quant import dequantize
    terms = _weight_terms(model, stats)
    fmts = [get_format(c) for c in candidates]
    table: dict[str, dict[str, tuple[int, float]]] = {}
    tensors = [(n, W) for n, _, W in _gguf_tensors(model) if W.ndim == 2 and n in terms or n == "token_embd.weight"]
    for name, W in tqdm(tensors, desc="sensitivity (types)", unit="tensor", disable=not progress, leave=False):
        Wn = W.float().numpy()
        Wt = W.float()
        imp = importance(name) if importance is not None else None
        row = {}
        # a row length no block type fits stays F16 (as the writer's last fallback): still a choice to price
        for f in [f for f in fmts if f.fits(Wn.shape[1])] or [get_format("F16")]:
            D = Wt - torch.from_numpy(dequantize(encode(Wn, f, name, imp), f.ggml_type).reshape(Wn.shape))
            loss = 0.0
            kind = activation_kind(f.name)
            for Am, gsq, act in terms.get(name, []):
                loss += 0.5 * float(((D @ Am.float()) * D).sum(1).double() @ gsq)
                if activations and kind in act:
                    loss += 0.5 * float(((Wt * Wt) @ act[kind].float()).double() @ gsq)
            if name == "token_embd.weight" and stats.emb is not None:
                loss += 0.5 * float((stats.emb * D * D).sum())
            row[f.name] = (f.nbytes(tuple(Wn.shape)), loss)
        table[name] = row
    return table


def cache_key(model, chunks: torch.Tensor, candidates, seed: int, importance_tag: str) -> str:
    """A hash of everything the table depends on: every byte of every weight (with its name, dtype and
    shape), the model's config, the calibration tokens and the settings (candidates, seed, importance).
    Hashing all weights costs about a second per 500 MB, against minutes of measurement."""
    h = hashlib.sha256()
    h.update(json.dumps([_VERSION, list(candidates), seed, importance_tag]).encode())
    h.update(json.dumps(model.config, sort_keys=True, default=str).encode())
    for name, W in sorted(model.named_weights().items()):
        a = np.ascontiguousarray(W.detach().cpu().numpy())
        h.update(json.dumps([name, str(a.dtype), list(a.shape)]).encode())
        h.update(memoryview(a).cast("B"))
    h.update(np.ascontiguousarray(chunks.numpy()).tobytes())
    return h.hexdigest()[:24]


def cache_dir() -> Path:
    return Path(os.environ.get("SLIMLM_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or
                                                          Path.home() / ".cache") / "slimlm")


def sensitivity_table(model, chunks: torch.Tensor, *, candidates=CANDIDATES, importance=None,
                      importance_tag: str = "", seed: int = 0, cache: bool = True, activations: bool = True,
                      progress: bool = True) -> tuple[dict, dict]:
    """(table as predict() gives it, info) — from the cache when this model, text and candidates were
    measured before."""
    from .io import atomic_output
    key = cache_key(model, chunks, candidates, seed, importance_tag + ("" if activations else "/weights-only"))
    path = cache_dir() / f"sensitivity-{key}.json"
    if cache and path.is_file():
        try:
            d = json.loads(path.read_text())
            return ({n: {t: (int(b), float(v)) for t, (b, v) in r.items()} for n, r in d["table"].items()},
                    {**d["info"], "cached": str(path)})
        except (OSError, ValueError, KeyError, TypeError):
            pass                                            # unreadable cache: measure again
    stats = fisher_stats(model, chunks, seed=seed, progress=progress)
    table = predict(model, stats, candidates=candidates, importance=importance, activations=activations,
                    progress=progress)
    info = {"tokens": stats.tokens, "fisher_seconds": round(stats.seconds, 2), "seed": seed,
            "priced": "weights and llama.cpp's activation rounding" if activations else "weights"}
    if cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_output(path, overwrite=True) as tmp:
                Path(tmp).write_text(json.dumps({"table": table, "info": info}))
        except (OSError, OutputError):
            pass                                            # a cache that cannot be written is no error
    return table, info


class LayerReplay:
    """One chunk through the model once: the reference log-probabilities and every decoder layer's input
    (hidden states and keyword arguments) are kept, so that `kld(i)` re-runs only layers i.. after a change
    to layer i (or to a later one) and gives the KL divergence to the reference."""

    def __init__(self, module, chunk: torch.Tensor):
        self.module, self.layers, self.ins = module, decoder_layers(module), []

        def catch(_mod, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            self.ins.append((x, {k: v for k, v in kwargs.items() if k != "hidden_states"}))

        hs = [layer.register_forward_pre_hook(catch, with_kwargs=True) for layer in self.layers]
        try:
            ref = torch.log_softmax(module(input_ids=chunk[None], use_cache=False).logits[0].double(), -1)
        finally:
            for h in hs:
                h.remove()
        self.p_ref = ref.exp()
        self.neg_entropy = float((self.p_ref * ref).sum(-1).mean())

    def kld_of(self, logits: torch.Tensor) -> float:
        return self.neg_entropy - float((self.p_ref * torch.log_softmax(logits[0].double(), -1)).sum(-1).mean())

    def kld(self, start: int, skip: bool = False) -> float:
        """KLD when the model runs from layer `start`'s cached input (skipping that layer with `skip`)."""
        x = self.ins[start][0]
        for k in range(start + (1 if skip else 0), len(self.layers)):
            y = self.layers[k](x, **self.ins[k][1])     # each layer its own kwargs (mask and rope of its kind)
            x = y[0] if isinstance(y, tuple) else y
        return self.kld_of(self.module.get_output_embeddings()(final_norm(self.module)(x)))


@torch.no_grad()
def measure_effects(model, chunk: torch.Tensor, weights: dict[str, torch.Tensor], *,
                    progress: bool = True) -> dict[str, float]:
    """The KL divergence to the original model when only tensor `name` takes `weights[name]` (GGUF name ->
    weight in GGUF layout, e.g. decoded from a written file), on one calibration chunk. A decoder layer's
    tensor is measured from that layer's cached input onward; the embedding with a full forward."""
    module, spec, cfg = model.module, model.spec, model.config
    replay = LayerReplay(module, chunk)

    params = dict(module.named_parameters(remove_duplicate=False))
    hf_of: dict[str, list[str]] = {}                       # a fused tensor's parts in row order (spec.fused)
    for n in params:
        if n.endswith(".weight"):
            hf_of.setdefault(spec.hf_to_gguf(n), []).append(n)
    out = {}
    for name, Wg in tqdm(weights.items(), desc="measuring each tensor's effect", unit="tensor",
                         disable=not progress, leave=False):
        hfs = hf_of.get(name)
        if hfs is None:
            continue
        ps = [params[hf] for hf in hfs]
        keep = [p.data.clone() for p in ps]
        Wg = Wg.reshape(sum(p.shape[0] for p in ps), -1)
        for hf, p, Wp in zip(hfs, ps, torch.split(Wg, [p.shape[0] for p in ps]), strict=True):
            order = spec.to_gguf_tensor(hf, torch.arange(p.shape[0]), cfg)
            W = torch.empty_like(p)
            W[order] = Wp.reshape(p.shape).to(p.dtype)      # GGUF row order -> HF's
            p.data.copy_(W)
        try:
            if spec.layer_of(hfs[0]) is not None:
                out[name] = replay.kld(spec.layer_of(hfs[0]))
            else:
                out[name] = replay.kld_of(module(input_ids=chunk[None], use_cache=False).logits)
        finally:
            for p, k in zip(ps, keep, strict=True):
                p.data.copy_(k)
    return out
