"""Activation statistics from calibration text: the one place that registers hooks on a model's modules.

`collect_imatrix` runs calibration chunks through the model and accumulates, for every linear layer of the
transformer blocks, the sum of squared inputs per column and the number of rows: llama.cpp's importance
matrix (llama-imatrix, whose default also leaves the output projection out).
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .errors import NumericsError
from .quant.imatrix import ImportanceMatrix


def block_linears(model) -> dict[str, torch.nn.Linear]:
    """GGUF tensor name -> nn.Linear for every linear inside the transformer blocks."""
    out = {}
    for name, mod in model.module.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.startswith("model.layers."):
            out[model.spec.hf_to_gguf(f"{name}.weight")] = mod
    return out


@torch.no_grad()
def collect_imatrix(model, chunks: torch.Tensor, *, dataset: str = "", progress: bool = True) -> ImportanceMatrix:
    """chunks: (n_chunks, n_ctx) token ids. Returns the importance matrix over all chunk tokens."""
    im = ImportanceMatrix(datasets=[dataset] if dataset else [], chunk_count=int(chunks.shape[0]),
                          chunk_size=int(chunks.shape[1]))

    def hook(name):
        def f(_mod, inputs):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()  # (tokens, in)
            if not torch.isfinite(x).all():
                raise NumericsError(f"non-finite calibration activation entering {name}")
            im.add(name, (x * x).sum(0).numpy(), x.shape[0])
        return f

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in block_linears(model).items()]
    try:
        for chunk in tqdm(chunks, desc="importance matrix", unit="chunk", disable=not progress, leave=False):
            model.module(input_ids=chunk[None], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return im


class _Stop(Exception):
    pass


def _layer_inputs(module, chunks: torch.Tensor) -> list[tuple[torch.Tensor, dict]]:
    """(hidden states, keyword arguments) entering the first decoder layer, per calibration chunk."""
    cache = []

    def catch(_mod, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        cache.append((x, {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _Stop

    h = module.model.layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for chunk in chunks:
            try:
                module(input_ids=chunk[None], use_cache=False)
            except _Stop:
                pass
    finally:
        h.remove()
    return cache


@torch.no_grad()
def gptq_model(model, chunks: torch.Tensor, types: dict, *, act_order: bool = False, damp: float = 0.01,
               output: bool = True, progress: bool = True) -> tuple[dict, torch.nn.Module, dict]:
    """GPTQ every block linear whose planned type (`types`: GGUF name -> (QuantFormat, why), as
    writer.plan_model gives) is a block type, one decoder layer at a time and, inside a layer, one linear
    at a time in forward order ("true sequential"): each linear's Hessian comes from inputs produced by
    everything quantized before it, the earlier layers and the earlier linears of its own layer. The
    calibration chunks go through each layer as one batch, once: a pre-hook on each linear computes its
    Hessian from that batch's input and quantizes the weight before the linear runs. Linears reading the
    same tensor (q/k/v, gate/up) share the Hessian and its factorization. With `output`, the output
    projection follows, on the final normalized hidden states (for a tied embedding that is token_embd:
    its input side then reads the same quantized rows). The caller's model is never modified; a copy is
    quantized.

    Returns (GGUF name -> bytes (rows, bytes_per_row) in llama.cpp's row order, the quantized module whose
    weights are exactly what those bytes decode to, stats)."""
    import copy
    import time

    from .quant.gptq import factor, gptq_gguf

    t0 = time.perf_counter()
    module = copy.deepcopy(model.module)
    cfg, spec = model.config, model.spec
    cache = _layer_inputs(module, chunks)
    x = torch.cat([c[0] for c in cache])                   # (chunks, n_ctx, hidden): every chunk, one batch
    kw = cache[0][1]                                       # same length and positions for every chunk
    del cache
    encoded, damps, secs = {}, [], {"hessian": 0.0, "solve": 0.0}
    layers = module.model.layers
    for i, layer in enumerate(tqdm(layers, desc="GPTQ", unit="layer", disable=not progress, leave=False)):
        shared: dict[tuple, dict] = {}

        def hook(n, i=i, shared=shared):
            hf = f"model.layers.{i}.{n}.weight"
            name = spec.hf_to_gguf(hf)
            fmt = types[name][0]

            def f(mod, inputs):
                if fmt.is_float:
                    return
                x = inputs[0]
                key = (x.data_ptr(), tuple(x.shape), x.stride())
                if key not in shared:      # holding x keeps its memory from being reused by another input
                    t = time.perf_counter()
                    x2 = x.reshape(-1, x.shape[-1]).float()
                    H = (x2.T @ x2).double() * (2.0 / x2.shape[0])
                    if not torch.isfinite(torch.diagonal(H)).all():
                        raise NumericsError(f"non-finite calibration activation entering layer {i} {n}")
                    shared[key] = {"x": x, "H": H, "chol": {}}
                    secs["hessian"] += time.perf_counter() - t
                t = time.perf_counter()
                e = shared[key]
                qt = fmt.ggml_type
                unit = qt_unit(qt)
                if unit not in e["chol"]:
                    e["chol"][unit] = factor(e["H"], unit, act_order=act_order, damp=damp)
                data, Q, res = gptq_gguf(mod.weight.data.float(), e["H"], qt, act_order=act_order,
                                         chol=e["chol"][unit])
                mod.weight.data = Q.to(mod.weight.dtype)
                order = spec.to_gguf_tensor(hf, torch.arange(Q.shape[0]), cfg)      # llama.cpp's row order
                encoded[name] = data[order.numpy()]
                damps.append(res.damp)
                secs["solve"] += time.perf_counter() - t
            return f

        handles = [m.register_forward_pre_hook(hook(n)) for n, m in layer.named_modules()
                   if isinstance(m, torch.nn.Linear)]
        try:
            y = layer(x, **kw)
        finally:
            for h in handles:
                h.remove()
        shared.clear()
        x = y[0] if isinstance(y, tuple) else y
    if output:
        _gptq_output(module, model, x, types, encoded, damps, secs, act_order, damp)
    stats = {"tensors": len(encoded), "seconds": time.perf_counter() - t0, "max_damp": max(damps, default=0.0),
             "act_order": act_order, "calib_tokens": int(chunks.numel()),
             "hessian_seconds": secs["hessian"], "solve_seconds": secs["solve"]}
    return encoded, module, stats


def qt_unit(qtype) -> int:
    import gguf
    return gguf.GGML_QUANT_SIZES[qtype][0]


def _gptq_output(module, model, x, types, encoded, damps, secs, act_order, damp) -> None:
    import time

    from .quant.gptq import gptq_gguf
    head = module.get_output_embeddings()
    tied = bool(model.config.get("tie_word_embeddings", False))
    name = "token_embd.weight" if tied else model.spec.hf_to_gguf("lm_head.weight")
    if head is None or name not in types or types[name][0].is_float:
        return
    t = time.perf_counter()
    h = module.model.norm(x).reshape(-1, x.shape[-1]).float()
    H = (h.T @ h).double() * (2.0 / h.shape[0])
    if not torch.isfinite(torch.diagonal(H)).all():
        raise NumericsError("non-finite final hidden state on calibration text")
    secs["hessian"] += time.perf_counter() - t
    t = time.perf_counter()
    data, Q, res = gptq_gguf(head.weight.data.float(), H, types[name][0].ggml_type, act_order=act_order,
                             damp=damp)
    head.weight.data = Q.to(head.weight.dtype)       # a tied embedding shares this parameter
    encoded[name] = data
    damps.append(res.damp)
    secs["solve"] += time.perf_counter() - t
