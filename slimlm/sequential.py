"""Activation statistics from calibration text: the one place that registers hooks on a model's modules.

`collect_imatrix` runs calibration chunks through the model and accumulates, for every linear layer of the
transformer blocks, the sum of squared inputs per column and the number of rows: llama.cpp's importance
matrix (llama-imatrix, whose default also leaves the output projection out).

Every pass here goes one decoder layer at a time over all chunks (`replay_inputs`, `run_layer`), and asks
lazy.onload for the layer's weights: a streamed model reads them from disk for that layer only, so a model
bigger than RAM is calibrated and quantized in about one layer's memory; an in-memory model runs the same code.
Inside a layer, GPTQ/AWQ (and structured pruning, prune/structured.py) run the chunks in micro-batches of
MICRO_TOKENS, stopped at the input a stage needs (`capture_group`, `capture_input`), its statistics summed over
all of them (`InputStats`): only a micro-batch's activations are alive at once.
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
from .device import module_device, on_device, to_device
from .errors import NumericsError
from .lazy import SpilledArrays, embedding_rows, onload, streamed, trim_heap, weight_row_slabs
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
            im.add(name, (x * x).sum(0).cpu().numpy(), x.shape[0])
        return f

    layers = decoder_layers(module)
    for i in tqdm(range(len(layers)), desc="importance matrix", unit="layer", disable=not progress, leave=False):
        with onload(model, layers[i], f"{spec.layer_prefix}{i}.") as layer, on_device(layer):
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
    keyword arguments. When the layer is on another device than x (device.on_device), x and the keyword arguments
    go there and the output comes back to x's device."""
    dev = module_device(layer)
    if dev == x.device:
        y = layer(x, **layer_kwargs(kw, layer))
        return y[0] if isinstance(y, tuple) else y
    y = layer(x.to(dev), **to_device(layer_kwargs(kw, layer), dev))     # the layer is on the compute device
    return (y[0] if isinstance(y, tuple) else y).to(x.device)


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
    by everything quantized before it, the earlier layers and the earlier linears of its own layer. A layer
    goes stage by stage, one per input group in forward order (q/k/v, o, gate/up, down): the calibration chunks run
    through the layer as it is so far, in micro-batches of about MICRO_TOKENS tokens, each stopped at the group's
    input, whose statistics add up over all chunks (capture_group); then the group's AWQ scales are searched
    (quant/awq.py) and folded into its weights and the input's producer, and its linears are GPTQ'd. A last pass
    computes the layer's output for the next layer. So only a micro-batch's activations are alive at once, not all
    chunks' (a wide MLP's hidden states), and the Hessian is factored in its own storage. Linears reading the same
    tensor share the Hessian and its factorization. With `output`, GPTQ then quantizes the output projection on
    the final normalized hidden states (for a tied embedding that is token_embd: its input side then reads the same quantized
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
    awq_names = {n for names, _ in groups for n in names}

    def quantize_layer(i: int, layer, x: torch.Tensor) -> torch.Tensor:
        mods = dict(layer.named_modules())
        enc: dict = {}                             # GGUF name -> codes (or a fused tensor's / experts' parts)
        gguf_name = {n: spec.hf_to_gguf(f"{spec.layer_prefix}{i}.{n}.weight") for n, m in mods.items()
                     if isinstance(m, torch.nn.Linear)}
        qtype = {n: (None if types[g][0].is_float else types[g][0].ggml_type) for n, g in gguf_name.items()}
        pending = {n for n, t in qtype.items() if t is not None and (gptq or n in awq_names)}
        ex = experts(layer) if gptq else None
        micro = micro_batches(x) if ex is None else [slice(None)]   # an expert's GPTQ sees all its tokens at once

        def search_fold(names, producer, st: InputStats, rows_of=False):
            """AWQ for linears `names` reading the input st describes: search, fold; returns s or None."""
            names = [n for n in names if n in mods]
            quant = [n for n in names if qtype.get(n) is not None]
            if not quant or producer not in mods:
                return None
            t = time.perf_counter()
            res = awq_search([mods[n].weight.data.float() for n in quant], [qtype[n] for n in quant], st.mean(),
                             st.absmean())
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

        def solve(names: list[str], st: InputStats, s) -> None:
            """GPTQ of the linears `names` reading one input, on its Hessian 2/n X^T X (for input X / s after AWQ);
            one factorization for all of them (per block size with act_order)."""
            t = time.perf_counter()
            trim_heap()          # the capture's freed activations: back to the system before the largest step
            H = st.hessian(s)
            diag = torch.diagonal(H).clone()
            chol: dict = {}
            for n in names:
                name = gguf_name[n]
                fmt = types[name][0]
                unit = fmt.block_size if act_order else None    # the column order depends on the unit only
                if unit not in chol:                            # when it is sorted by importance
                    try:               # without act_order one factorization, in H's own storage
                        chol[unit] = factor(H, fmt.block_size, act_order=act_order, damp=damp, consume=not act_order)
                    except NumericsError as err:                # singular after every dampening retry
                        chol[unit] = err
                    if not act_order:
                        H = None                                # spent by the factorization
                if isinstance(chol[unit], NumericsError):
                    rtn_fallbacks[name] = str(chol[unit])       # the writer rounds it as llama.cpp does
                    continue
                hf = f"{spec.layer_prefix}{i}.{n}.weight"
                mod = mods[n]
                data, Q, res = gptq_gguf(mod.weight.data.float(), H if act_order else diag, fmt.ggml_type,
                                         act_order=act_order, chol=chol[unit])
                mod.weight.data = Q.to(mod.weight.dtype)
                touched.add(f"{n}.weight")
                order = spec.to_gguf_tensor(hf, torch.arange(Q.shape[0]), cfg)  # llama.cpp's row order
                # the parts of a fused GGUF tensor (ArchSpec.fused) are joined by rows after the layer
                enc.setdefault(name, {})[n] = data[order.numpy()]
                damps[name] = max(res.damp, damps.get(name, 0.0))
            secs["solve"] += time.perf_counter() - t

        while pending:    # one stage per input group, in forward order: its statistics, then AWQ and GPTQ
            t = time.perf_counter()
            found = capture_group(layer, x, kw, micro, pending, absolute=awq)
            secs["hessian"] += time.perf_counter() - t
            if found is None:
                break
            names, st = found
            pending.difference_update(names)
            st.check(f"layer {i} {names[0]}")
            s = None
            group = next(((g, p) for g, p in groups if names[0] in g), None) if awq else None
            if group is not None:
                s = search_fold(group[0], group[1], st)
                if s is not None and up in group[0]:    # down reads act(gate) * up: 1/s into up's rows
                    t = time.perf_counter()
                    hidden = capture_input(layer, x, kw, micro, names[0], lambda v: mlp_hidden(layer, v))
                    secs["hessian"] += time.perf_counter() - t
                    hidden.check(f"layer {i} {down}")
                    search_fold([down], up, hidden, rows_of=True)
                    del hidden
            if gptq:
                solve([n for n in names if qtype[n] is not None], st, s)
            del st
        if ex is not None:
            ex.observer = _expert_gptq(i, layer, spec, types, enc, damps, rtn_fallbacks, secs, act_order, damp)
        try:                # in place: each micro-batch's output replaces its input
            forward_layer(layer, x, kw, micro, host=ex is not None)
        finally:
            if ex is not None:
                ex.observer = None
        if ex is not None:
            _stack_experts(i, layer, spec, types, enc)
            touched.update(f"{spec.layout.path(r)}.weight" for r in EXPERT_ROLES)
        for name, parts in enc.items():       # this layer's codes (with a spill folder: written to disk)
            encoded[name] = np.concatenate([parts[n] for n in mods if n in parts], 0) \
                if isinstance(parts, dict) else parts
        return x
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


MICRO_TOKENS = 1024      # calibration tokens per micro-batch of a layer pass: bounds the activations alive at once


def micro_batches(x: torch.Tensor, tokens: int = MICRO_TOKENS) -> list[slice]:
    """Slices of the chunks of x (chunks, n_ctx, hidden) holding about `tokens` tokens each (at least one chunk)."""
    n = max(1, tokens // max(1, x.shape[1]))
    return [slice(a, a + n) for a in range(0, x.shape[0], n)]


class InputStats:
    """Sums over calibration tokens of one linear's input X (tokens, cols), added a micro-batch at a time: X^T X in
    float64 (each micro-batch's product in float32, a slab of rows at a time), sum |X| when `absolute` (AWQ), the
    token count. Spent by mean() or hessian(), which turn the sum into the result in its own storage."""

    def __init__(self, absolute: bool = False):
        self.xtx: torch.Tensor | None = None
        self.abssum = torch.zeros(0, dtype=torch.float64) if absolute else None
        self.n = 0
        self._mean = False

    def add(self, x: torch.Tensor, rows: int = 512) -> None:
        X = x.reshape(-1, x.shape[-1]).float()
        c = X.shape[1]
        if self.xtx is None:          # on the activations' device (device.py: the host's copy via to_host)
            self.xtx = torch.zeros(c, c, dtype=torch.float64, device=X.device)
        for r in range(0, c, rows):        # a slab of rows at a time: no c x c product beside the sum
            self.xtx[r:r + rows].add_(X[:, r:r + rows].T @ X)
        if self.abssum is not None:
            a = X.abs().sum(0, dtype=torch.float64)
            self.abssum = a if self.abssum.numel() == 0 else self.abssum.add_(a)
        self.n += X.shape[0]

    def to_host(self) -> InputStats:
        """The sums moved to host memory (after a layer pass on a GPU); self."""
        if self.xtx is not None and self.xtx.device.type != "cpu":
            self.xtx = self.xtx.cpu()
        if self.abssum is not None and self.abssum.device.type != "cpu":
            self.abssum = self.abssum.cpu()
        return self

    def check(self, where: str) -> None:
        if self.xtx is None or not torch.isfinite(torch.diagonal(self.xtx)).all():
            raise NumericsError(f"non-finite calibration activation entering {where}")

    def mean(self) -> torch.Tensor:
        """E[x x^T] (float64; in place of the sum)."""
        if not self._mean:
            self.xtx.div_(max(self.n, 1))
            self._mean = True
        return self.xtx

    def absmean(self) -> torch.Tensor:
        return self.abssum / max(self.n, 1)

    def hessian(self, s: torch.Tensor | None = None) -> torch.Tensor:
        """GPTQ's Hessian 2 E[x x^T], of the input x / s when AWQ scales s divide it; in place, the stats are spent."""
        H = self.mean().mul_(2.0)
        if s is not None:
            sd = s.double()
            H.div_(sd[:, None]).div_(sd[None, :])
        self.xtx = None
        return H


def capture_group(layer, x: torch.Tensor, kw: dict, micro: list[slice], pending: set[str], *,
                  absolute: bool = False) -> tuple[list[str], InputStats] | None:
    """(the linears of `layer` that read the first input reaching a linear still in `pending`, that input's
    statistics over all chunks of x), or None when no pending linear is reached. Each micro-batch of chunks runs
    through the layer as it is now (the linears already quantized, quantized) and stops there: the first one also
    runs the linears sharing the input (q/k/v, gate/up: one tensor, read one after another) to find them."""
    st, names = InputStats(absolute), []

    def hook(n):
        def f(_mod, inputs):
            key = input_key(inputs[0])
            if cur[0] is None:
                if n not in pending or (names and n != names[0]):
                    return None
                cur[0] = key
                held[0] = inputs[0]    # holding it keeps its memory from being reused by a later input (same key)
                st.add(inputs[0])
                if names:                      # a later micro-batch: the group is known
                    raise _Stop
                names.append(n)
            elif key == cur[0]:
                if n in pending and n not in names:
                    names.append(n)
            else:
                raise _Stop
            return None
        return f
    cur: list = [None]
    held: list = [None]
    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layer.named_modules()
               if isinstance(m, torch.nn.Linear)]
    try:
        with on_device(layer):
            for sl in micro:
                cur[0] = held[0] = None
                try:
                    run_layer(layer, x[sl], kw)
                except _Stop:
                    pass
                held[0] = None
                if not names:
                    return None
    finally:
        for h in handles:
            h.remove()
    return names, st.to_host()


def capture_input(layer, x: torch.Tensor, kw: dict, micro: list[slice], at: str, fn) -> InputStats:
    """Statistics (with sum |.|) of fn(input of linear `at`) over all chunks of x, each micro-batch stopped there."""
    st = InputStats(absolute=True)

    def f(_mod, inputs):
        st.add(fn(inputs[0]))
        raise _Stop
    h = layer.get_submodule(at).register_forward_pre_hook(f)
    try:
        with on_device(layer):
            for sl in micro:
                try:
                    run_layer(layer, x[sl], kw)
                except _Stop:
                    pass
    finally:
        h.remove()
    return st.to_host()


def forward_layer(layer, x: torch.Tensor, kw: dict, micro: list[slice], *, host: bool = False,
                  each=None) -> torch.Tensor:
    """x (chunks, n_ctx, hidden) replaced, micro-batch by micro-batch, by the layer's output (in place: one such
    tensor alive), on the compute device (device.py), or on the host with `host` (hooks that solve on the host
    as it runs: the experts' GPTQ). `each(sl, y)` sees each micro-batch's output y while x[sl] is still its input."""
    with contextlib.nullcontext() if host else on_device(layer):
        for sl in micro:
            y = run_layer(layer, x[sl], kw)
            if each is not None:
                each(sl, y)
            x[sl] = y
    return x


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
    the tensor (or the forward does) while the key is in use, so its memory cannot be reused by a different input."""
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
