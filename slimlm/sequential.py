"""Activation statistics from calibration text: the one place that registers hooks on a model's modules.

`collect_imatrix` runs calibration chunks through the model and accumulates, for every linear layer of the
transformer blocks, the sum of squared inputs per column and the number of rows: llama.cpp's importance
matrix (llama-imatrix, whose default also leaves the output projection out).

Every pass here goes one decoder layer at a time over all chunks (`replay_inputs`, `run_layer`), and asks
lazy.onload for the layer's weights: a streamed model reads them from disk for that layer only, so a model
bigger than RAM is calibrated and quantized in about one layer's memory; an in-memory model runs the same code.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .arch import (
    EXPERT_ROLES,
    attention_kind,
    decoder_layers,
    embedding,
    expert_hidden,
    experts,
    final_norm,
    layer_kwargs,
    mlp_hidden,
    part,
)
from .errors import NumericsError
from .lazy import SpilledArrays, embedding_rows, onload, streamed, weight_row_slabs
from .quant.imatrix import ImportanceMatrix


def block_linears(model) -> dict[str, list[torch.nn.Linear]]:
    """GGUF tensor name -> the nn.Linears it holds (one; a fused tensor's parts in row order, which read one input)
    for every linear inside the transformer blocks."""
    out: dict[str, list[torch.nn.Linear]] = {}
    for i, layer in enumerate(decoder_layers(model.module)):
        out.update(layer_linears(model.spec, i, layer))
    return out


def layer_linears(spec, i: int, layer: torch.nn.Module) -> dict[str, list[torch.nn.Linear]]:
    """block_linears of decoder layer i alone."""
    out: dict[str, list[torch.nn.Linear]] = {}
    for name, mod in layer.named_modules():
        if isinstance(mod, torch.nn.Linear):
            out.setdefault(spec.hf_to_gguf(f"{spec.layer_prefix}{i}.{name}.weight"), []).append(mod)
    return out


@torch.no_grad()
def collect_imatrix(model, chunks: torch.Tensor, *, dataset: str = "", progress: bool = True) -> ImportanceMatrix:
    """chunks: (n_chunks, n_ctx) token ids. Returns the importance matrix over all chunk tokens, gathered one
    decoder layer at a time (each chunk through the layer alone, as a whole-model forward would run it)."""
    im = ImportanceMatrix(datasets=[dataset] if dataset else [], chunk_count=int(chunks.shape[0]),
                          chunk_size=int(chunks.shape[1]))
    module, spec = model.module, model.spec
    cache = _layer_inputs(module, chunks, model)
    xs, kw = [c[0] for c in cache], cache[0][1]
    del cache

    def hook(name):
        def f(_mod, inputs):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()  # (tokens, in)
            if not torch.isfinite(x).all():
                raise NumericsError(f"non-finite calibration activation entering {name}")
            im.add(name, (x * x).sum(0).numpy(), x.shape[0])
        return f

    layers = decoder_layers(module)
    for i in tqdm(range(len(layers)), desc="importance matrix", unit="layer", disable=not progress, leave=False):
        with onload(model, layers[i], f"{spec.layer_prefix}{i}.") as layer:
            handles = [m[0].register_forward_pre_hook(hook(n)) for n, m in layer_linears(spec, i, layer).items()]
            try:
                xs = [run_layer(layer, x, kw) for x in xs]
            finally:
                for h in handles:
                    h.remove()
    return im


class _Stop(Exception):
    pass


def _layer_inputs(module, chunks: torch.Tensor, model=None) -> list[tuple[torch.Tensor, dict]]:
    """(hidden states entering the first decoder layer, the layers' keyword arguments) per calibration chunk. The
    keyword arguments (positions, rotary embeddings, mask) are a map attention kind -> kwargs (`run_layer` picks a
    layer's: sliding-window layers get their own mask and rope), taken from the first chunk and shared by all
    (the chunks share one length). No decoder layer computes anything: each one's forward is replaced, for this
    pass, by one that records its arguments and hands its input on. `model` (the Model of `module`): a streamed
    model's embedding is read for the pass."""
    cache, kinds = [], {}
    layers = decoder_layers(module)

    def recorder(i, layer):
        def forward(*args, **kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            kinds.setdefault(attention_kind(layer), {k: v for k, v in kwargs.items() if k != "hidden_states"})
            if i == 0:
                cache.append(x)
            if i == len(layers) - 1 or i == 0 and len(cache) > 1:     # every kind seen once: stop there
                raise _Stop
            return x
        return forward
    for i, layer in enumerate(layers):
        layer.forward = recorder(i, layer)
    try:
        with embedding_rows(model, embedding(module), chunks) if model is not None else \
                contextlib.nullcontext(chunks) as chunks:
            for chunk in chunks:
                try:
                    module(input_ids=chunk[None], use_cache=False)
                except _Stop:
                    pass
    finally:
        for layer in layers:
            del layer.forward
    return [(x, kinds) for x in cache]


def replay_inputs(module, chunks: torch.Tensor, model=None) -> tuple[torch.Tensor, dict]:
    """(hidden states entering the first decoder layer, (n_chunks, n_ctx, hidden); the keyword arguments every
    layer takes: positions, rotary embeddings, mask), for replaying a model one layer at a time on all chunks at
    once or on any slice of them (the chunks share one length, so the keyword arguments are shared)."""
    cache = _layer_inputs(module, chunks, model)
    return torch.cat([c[0] for c in cache]), cache[0][1]


def run_layer(layer, x: torch.Tensor, kw: dict) -> torch.Tensor:
    """One decoder layer's output (the residual stream after it); kw: replay_inputs' map attention kind ->
    keyword arguments."""
    y = layer(x, **layer_kwargs(kw, layer))
    return y[0] if isinstance(y, tuple) else y


@torch.no_grad()
def gptq_model(model, chunks: torch.Tensor, types: dict, *, act_order: bool = False, damp: float = 0.01,
               output: bool = True, progress: bool = True) -> tuple[dict, torch.nn.Module, dict]:
    """GPTQ alone: `quantize_model(..., gptq=True, awq=False)`."""
    return quantize_model(model, chunks, types, gptq=True, awq=False, act_order=act_order, damp=damp,
                          output=output, progress=progress)


@torch.no_grad()
def quantize_model(model, chunks: torch.Tensor, types: dict, *, gptq: bool = True, awq: bool = False,
                   act_order: bool = False, damp: float = 0.01, output: bool = True,
                   progress: bool = True, spill: Path | None = None) -> tuple[dict, dict, dict]:
    """AWQ scaling and/or GPTQ of every block linear whose planned type (`types`: GGUF name -> (QuantFormat,
    why), as writer.plan_model gives) is a block type, one decoder layer at a time and, inside a layer, one
    linear at a time in forward order ("true sequential"): each linear's Hessian comes from inputs produced
    by everything quantized before it, the earlier layers and the earlier linears of its own layer. The
    calibration chunks go through each layer as one batch, once: a pre-hook on the first linear of each
    input group searches the group's AWQ scales (quant/awq.py) and folds them into the weights and the
    producer of the input; a pre-hook on each linear computes its Hessian from that batch's input and GPTQs
    the weight before the linear runs. Linears reading the same tensor (q/k/v, gate/up) share the Hessian
    and its factorization. With `output`, GPTQ then quantizes the output projection on the final normalized
    hidden states (for a tied embedding that is token_embd: its input side then reads the same quantized
    rows). The caller's model is never modified: each layer is changed in a copy (lazy.onload), one at a time.

    Returns (GGUF name -> bytes (rows, bytes_per_row) in llama.cpp's row order for every GPTQ'd tensor, HF name ->
    changed weight (scaled by AWQ; GPTQ'd weights exactly what those bytes decode to; for a streamed model only the
    changed weights that are not encoded, so memory stays one layer's), stats with "awq_scales": GGUF name -> the
    scales its input columns were multiplied by). `model.with_changes(changed)` is the quantized model. `spill`: an
    empty folder that holds the codes, layer by layer, instead of memory (lazy.SpilledArrays; a streamed model's
    codes would otherwise grow to the whole file's size)."""
    import time

    from .quant.awq import awq_search
    from .quant.gptq import factor, gptq_gguf

    t0 = time.perf_counter()
    module = model.module
    cfg, spec = model.config, model.spec
    cache = _layer_inputs(module, chunks, model)
    x = torch.cat([c[0] for c in cache])                   # (chunks, n_ctx, hidden): every chunk, one batch
    kw = cache[0][1]                                       # same length and positions for every chunk
    del cache
    encoded = {} if spill is None else SpilledArrays(spill)
    damps, secs = {}, {"hessian": 0.0, "solve": 0.0, "awq": 0.0}
    rtn_fallbacks: dict[str, str] = {}   # GGUF name -> why GPTQ could not run (RELIABILITY.md 23)
    awq_scales: dict[str, torch.Tensor] = {}
    awq_log: list[dict] = []
    layers = decoder_layers(module)
    groups = spec.layout.input_groups()
    down, up = (spec.layout.path(r) for r in spec.layout.down_input) if spec.layout.down_input else (None, None)
    desc = "+".join(n for n, on in (("AWQ", awq), ("GPTQ", gptq)) if on)
    touched: set[str] = set()       # the current layer's changed parameters (names inside the layer)
    def quantize_layer(i: int, layer, x: torch.Tensor) -> torch.Tensor:
        mods = dict(layer.named_modules())
        enc: dict = {}                             # GGUF name -> codes (or a fused tensor's / experts' parts)
        gguf_name = {n: spec.hf_to_gguf(f"{spec.layer_prefix}{i}.{n}.weight") for n, m in mods.items()
                     if isinstance(m, torch.nn.Linear)}
        qtype = {n: (None if types[g][0].is_float else types[g][0].ggml_type) for n, g in gguf_name.items()}
        shared: dict[tuple, dict] = {}
        scaled: dict[tuple, torch.Tensor] = {}     # input key -> the input divided by its group's scales

        def search_fold(names, producer, xin, rows_of=False):
            """AWQ for linears `names` reading xin: search, fold; returns s or None."""
            names = [n for n in names if n in mods]
            quant = [n for n in names if qtype.get(n) is not None]
            if not quant or producer not in mods:
                return None
            t = time.perf_counter()
            x2 = xin.reshape(-1, xin.shape[-1]).float()
            H = (x2.T @ x2).double() / x2.shape[0]
            res = awq_search([mods[n].weight.data.float() for n in quant], [qtype[n] for n in quant], H,
                             x2.abs().mean(0))
            s = res.s
            for n in names:
                mods[n].weight.data = (mods[n].weight.data.float() * s[None, :]).to(mods[n].weight.dtype)
                awq_scales[gguf_name[n]] = s
                touched.add(f"{n}.weight")
            touched.add(f"{producer}.weight")
            pw = mods[producer].weight
            if rows_of:
                pw.data = (pw.data.float() / s[:, None]).to(pw.dtype)
            else:          # a norm computes x * (offset + w): offset + w becomes (offset + w) / s
                off = spec.norm_offset
                pw.data = ((pw.data.float() + off) / s - off).to(pw.dtype)
            awq_log.append({"layer": i, "linears": names, "alpha": res.alpha, "err": res.err,
                            "err_plain": res.err_plain})
            secs["awq"] += time.perf_counter() - t
            return s

        def awq_pre(n, x):
            """The input linear n should read: scaled by its group's AWQ scales (searched on first sight)."""
            key = input_key(x)
            if key in scaled:
                return scaled[key][0]
            for names, producer in groups:
                if n in names:
                    s = search_fold(names, producer, x)
                    xs = x if s is None else x / s
                    if s is not None and up in names:       # down reads act(gate) * up: 1/s into up's rows
                        search_fold([down], up, mlp_hidden(layer, xs), rows_of=True)
                    scaled.clear()              # forward order: an earlier input is not read again
                    scaled[key] = (xs, x)       # holding x keeps its memory from being reused
                    return xs
            return x

        def hook(n):
            hf = f"{spec.layer_prefix}{i}.{n}.weight"
            name = gguf_name[n]
            fmt = types[name][0]

            def f(mod, inputs):
                x = inputs[0]
                if awq:
                    x = awq_pre(n, x)
                if gptq and not fmt.is_float:
                    key = input_key(x)
                    if key not in shared:  # holding x keeps its memory from being reused by another input
                        shared.clear()     # forward order (q/k/v, o, gate/up, down): no earlier input comes back
                        t = time.perf_counter()
                        shared[key] = {"x": x, "H": _checked_hessian(x, f"layer {i} {n}"), "chol": {}}
                        secs["hessian"] += time.perf_counter() - t
                    t = time.perf_counter()
                    e = shared[key]
                    unit = fmt.block_size if act_order else None    # the column order depends on the unit only
                    if unit not in e["chol"]:                       # when it is sorted by importance
                        try:
                            e["chol"][unit] = factor(e["H"], fmt.block_size, act_order=act_order, damp=damp)
                        except NumericsError as err:     # singular after every dampening retry
                            e["chol"][unit] = err
                        if not act_order:                # the solver reads only the diagonal from now on
                            e["H"] = torch.diagonal(e["H"]).clone()
                    if isinstance(e["chol"][unit], NumericsError):
                        rtn_fallbacks[name] = str(e["chol"][unit])   # the writer rounds it as llama.cpp does
                    else:
                        data, Q, res = gptq_gguf(mod.weight.data.float(), e["H"], fmt.ggml_type,
                                                 act_order=act_order, chol=e["chol"][unit])
                        mod.weight.data = Q.to(mod.weight.dtype)
                        touched.add(f"{n}.weight")
                        order = spec.to_gguf_tensor(hf, torch.arange(Q.shape[0]), cfg)  # llama.cpp's row order
                        # the parts of a fused GGUF tensor (ArchSpec.fused) are joined by rows after the layer
                        enc.setdefault(name, {})[n] = data[order.numpy()]
                        damps[name] = max(res.damp, damps.get(name, 0.0))
                    secs["solve"] += time.perf_counter() - t
                return (x, *inputs[1:]) if x is not inputs[0] else None
            return f

        handles = [m.register_forward_pre_hook(hook(n)) for n, m in mods.items()
                   if isinstance(m, torch.nn.Linear)]
        ex = experts(layer) if gptq else None
        if ex is not None:
            ex.observer = _expert_gptq(i, layer, spec, types, enc, damps, rtn_fallbacks, secs, act_order, damp)
        try:
            y = run_layer(layer, x, kw)
        finally:
            for h in handles:
                h.remove()
            if ex is not None:
                ex.observer = None
        if ex is not None:
            _stack_experts(i, layer, spec, types, enc)
            touched.update(f"{spec.layout.path(r)}.weight" for r in EXPERT_ROLES)
        for name, parts in enc.items():       # this layer's codes (with a spill folder: written to disk)
            encoded[name] = np.concatenate([parts[n] for n in mods if n in parts], 0) \
                if isinstance(parts, dict) else parts
        shared.clear()
        scaled.clear()
        return y
    changed: dict[str, torch.Tensor] = {}
    for i in tqdm(range(len(layers)), desc=desc, unit="layer", disable=not progress, leave=False):
        prefix = f"{spec.layer_prefix}{i}."
        with onload(model, layers[i], prefix, copy_weights=True) as layer:
            touched.clear()
            x = quantize_layer(i, layer, x)
            for n in sorted(touched):
                if not (streamed(model) and spec.hf_to_gguf(prefix + n) in encoded):
                    changed[prefix + n] = layer.get_parameter(n).data
    if gptq and output:
        _gptq_output(model, x, types, encoded, damps, rtn_fallbacks, secs, act_order, damp, changed)
    stats = {"tensors": len(encoded), "seconds": time.perf_counter() - t0,
             "max_damp": max(damps.values(), default=0.0),
             "raised_damp": {n: d for n, d in damps.items() if d > damp},     # dampening retries, per tensor
             "rtn_fallbacks": rtn_fallbacks,
             "act_order": act_order, "calib_tokens": int(chunks.numel()),
             "hessian_seconds": secs["hessian"], "solve_seconds": secs["solve"], "awq_seconds": secs["awq"],
             "awq_groups": awq_log, "awq_scales": awq_scales}
    return encoded, changed, stats


def changed_module(model, changed: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A copy of an in-memory model's module with quantize_model's changed weights in place (a tied embedding's
    change reaches its output projection too)."""
    import copy
    module = copy.deepcopy(model.module)
    with torch.no_grad():
        for k, v in changed.items():
            module.get_parameter(k).data = v.clone()
    return module


def input_key(x: torch.Tensor) -> tuple:
    """Identifies one tensor fed to several linears (q/k/v, gate/up) within a forward pass; the caller holds
    the tensor while the key is in use, so its memory cannot be reused by a different input."""
    return x.data_ptr(), tuple(x.shape), x.stride()


def _expert_gptq(i, layer, spec, types, encoded, damps, rtn_fallbacks, secs, act_order, damp):
    """An observer for a mixture-of-experts layer (split.SplitExperts.observer): GPTQ of expert j's gate and up
    stacks' rows on the tokens routed to it, then of its down rows on act(gate x) * up x computed with the quantized
    gate and up (as a dense layer's down projection reads the quantized ones); the codes go to encoded[name][j]."""
    import time

    from .quant.gptq import factor, gptq_gguf
    names = {r: spec.hf_to_gguf(f"{spec.layer_prefix}{i}.{spec.layout.path(r)}.weight") for r in EXPERT_ROLES}
    stack = {r: part(layer, r) for r in EXPERT_ROLES}

    def solve(role: str, j: int, xin: torch.Tensor) -> None:
        name, W = names[role], stack[role].weight
        fmt = types[name][0]
        if fmt.is_float:
            return
        t = time.perf_counter()
        H = _checked_hessian(xin, f"layer {i} expert {j} {role}")
        try:
            chol = factor(H, fmt.block_size, act_order=act_order, damp=damp)
        except NumericsError as err:               # singular: this expert's rows are rounded as llama.cpp does
            rtn_fallbacks[f"{name}[{j}]"] = str(err)
            return
        data, Q, res = gptq_gguf(W.data[j].float(), H, fmt.ggml_type, act_order=act_order, chol=chol)
        W.data[j] = Q.to(W.dtype)
        encoded.setdefault(name, {})[j] = data
        damps[name] = max(res.damp, damps.get(name, 0.0))
        secs["solve"] += time.perf_counter() - t

    def observe(j: int, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        solve("gate_exps", j, x)
        solve("up_exps", j, x)
        solve("down_exps", j, expert_hidden(layer, j, x))
    return observe


def _stack_experts(i, layer, spec, types, encoded) -> None:
    """Each expert stack's codes as one (experts, rows, bytes) array; an expert no calibration token reached (or
    whose Hessian stayed singular) is rounded as the writer would."""
    from .gguf.writer import encode
    for role in EXPERT_ROLES:
        mod = part(layer, role)
        name = spec.hf_to_gguf(f"{spec.layer_prefix}{i}.{spec.layout.path(role)}.weight")
        parts = encoded.get(name)
        if not isinstance(parts, dict):
            continue
        fmt = types[name][0]
        encoded[name] = np.stack([parts[j] if j in parts else encode(mod.weight.data[j].float().numpy(), fmt, name)
                                  for j in range(mod.weight.shape[0])])


def _checked_hessian(x: torch.Tensor, where: str) -> torch.Tensor:
    from .quant.gptq import hessian
    H = hessian(x)
    if not torch.isfinite(torch.diagonal(H)).all():
        raise NumericsError(f"non-finite calibration activation entering {where}")
    return H


def _gptq_output(model, x, types, encoded, damps, rtn_fallbacks, secs, act_order, damp, changed) -> None:
    import time

    from .quant.gptq import factor, gptq_gguf
    module, spec = model.module, model.spec
    head = module.get_output_embeddings()
    tied = bool(model.config.get("tie_word_embeddings", False))
    name = "token_embd.weight" if tied else spec.hf_to_gguf(spec.output_name)
    if head is None or name not in types or types[name][0].is_float:
        return
    t = time.perf_counter()
    H = _checked_hessian(final_norm(module)(x), "the output projection")
    secs["hessian"] += time.perf_counter() - t
    t = time.perf_counter()
    fmt = types[name][0]
    try:
        chol = factor(H, fmt.block_size, act_order=act_order, damp=damp)
    except NumericsError as err:                     # singular after every dampening retry: plain rounding
        rtn_fallbacks[name] = str(err)
        return
    H = H if act_order else torch.diagonal(H).clone()
    # the rows are independent given the Hessian's factor: a vocabulary-sized projection goes a slab at a time
    data, Qs = [], []
    for _, W in weight_row_slabs(model, spec.output_name):
        d, Q, res = gptq_gguf(W.float(), H, fmt.ggml_type, act_order=act_order, chol=chol)
        data.append(d)
        if not streamed(model):
            Qs.append(Q)
    if Qs:                                           # a tied embedding: its input side reads the same rows
        changed[spec.embed_name if tied else spec.output_name] = torch.cat(Qs)
    encoded[name] = np.concatenate(data)
    damps[name] = res.damp
    secs["solve"] += time.perf_counter() - t
