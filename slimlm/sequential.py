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
               progress: bool = True) -> tuple[dict, torch.nn.Module, dict]:
    """GPTQ every block linear whose planned type (`types`: GGUF name -> (QuantFormat, why), as
    writer.plan_model gives) is a block type, one
    decoder layer at a time: each layer's Hessians come from inputs produced by the already-quantized
    layers before it (the caller's model is never modified; a copy is quantized).

    Returns (GGUF name -> bytes (rows, bytes_per_row) in llama.cpp's row order, the quantized module whose
    weights are exactly what those bytes decode to, stats)."""
    import copy
    import time

    from .quant.gptq import gptq_gguf

    t0 = time.perf_counter()
    module = copy.deepcopy(model.module)
    cfg, spec = model.config, model.spec
    cache = _layer_inputs(module, chunks)
    encoded, damps = {}, []
    layers = module.model.layers
    for i, layer in enumerate(tqdm(layers, desc="GPTQ", unit="layer", disable=not progress, leave=False)):
        lins = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
        # linears that read the same tensor (q/k/v, gate/up) share one Hessian: computed once per forward
        H: dict[str, torch.Tensor] = {}
        rows: dict[str, int] = {}
        alias: dict[str, str] = {}
        seen: dict[int, str] = {}

        def hook(n, H=H, rows=rows, alias=alias, seen=seen, i=i):
            def f(_mod, inputs):
                x = inputs[0]
                first = seen.setdefault(x.data_ptr(), n)
                if first != n:
                    alias[n] = first
                    return
                x = x.reshape(-1, x.shape[-1]).float()
                if not torch.isfinite(x).all():
                    raise NumericsError(f"non-finite calibration activation entering layer {i} {n}")
                h = (x.T @ x).double()
                H[n] = H[n] + h if n in H else h
                rows[n] = rows.get(n, 0) + x.shape[0]
            return f

        handles = [m.register_forward_pre_hook(hook(n)) for n, m in lins.items()]
        try:
            for x, kw in cache:
                seen.clear()
                layer(x, **kw)
        finally:
            for h in handles:
                h.remove()
        for n, m in lins.items():
            hf = f"model.layers.{i}.{n}.weight"
            name = spec.hf_to_gguf(hf)
            fmt = types[name][0]
            if fmt.is_float:
                continue
            src = alias.get(n, n)
            data, Q, res = gptq_gguf(m.weight.data.float(), 2.0 / max(rows[src], 1) * H[src], fmt.ggml_type,
                                     act_order=act_order, damp=damp)
            m.weight.data = Q.to(m.weight.dtype)
            order = spec.to_gguf_tensor(hf, torch.arange(Q.shape[0]), cfg)      # llama.cpp's row order
            encoded[name] = data[order.numpy()]
            damps.append(res.damp)
        outs = [layer(x, **kw) for x, kw in cache]
        cache = [(y[0] if isinstance(y, tuple) else y, kw) for y, (_, kw) in zip(outs, cache, strict=True)]
    stats = {"tensors": len(encoded), "seconds": time.perf_counter() - t0, "max_damp": max(damps, default=0.0),
             "act_order": act_order, "calib_tokens": int(chunks.numel())}
    return encoded, module, stats
