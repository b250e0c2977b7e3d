"""Quantization-aware training onto llama.cpp's block formats (issue 16).

`attach(model, types, imatrix)` puts a FakeQuant (quant/fakequant.py) on the weight of every linear inside the
transformer blocks whose planned type is a block type, as a torch parametrization: the module's forward then
computes with exactly the values the GGUF will hold, its float weight stays the trained parameter (straight-through
estimator), and the blocks' fp16 scales train beside it. The starting blocks are slimlm's encoder's (with the
importance matrix when there is one). `export(model, fakes)` turns the trained state into the writer's `encoded`
bytes (llama.cpp's row order) and the changed float weights, and takes the parametrizations off: gguf-py's
dequantization of every written tensor equals the fake-quant weight of the last forward bit for bit.

Fused GGUF tensors (one GGUF tensor from several linears) and mixture-of-experts stacks are not covered yet.
"""
from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np
import torch
from torch.nn.utils import parametrize

from ..errors import ConfigError
from .fakequant import FakeQuant

FROZEN = "_slimlm_frozen"      # attribute on a parameter that never trains (train/parts.select_parameters)


@dataclass
class Fake:
    gguf_name: str
    hf_name: str
    module: torch.nn.Linear
    fake: FakeQuant


def attach(model, types: dict, imatrix=None, *, start: dict | None = None, learn_scales: bool = True,
           learn_round: bool = False, anchor: bool = False, freeze: bool = False,
           learn_sub_scales: bool = False) -> list[Fake]:
    """FakeQuant parametrizations on the block linears of `model` (in memory) whose type in `types` (GGUF name ->
    (QuantFormat, why), as writer.plan_model gives) is a block type; returns them in forward order. `start`: GGUF
    name -> encoded rows in llama.cpp's row order (GPTQ's codes) to start from instead of the encoder's; the
    module's weight should then be what they decode to (sequential.quantize_model's changed weights), so that the
    nearest levels of the first forward are those codes. `learn_round`: learned rounding offsets train and the float
    weights are frozen (`anchor`: the offsets move the starting codes themselves, which the learned scales then
    never re-round: quant/fakequant.py); `freeze`: the float weights are frozen (their codes then change only where
    a learned scale moves the nearest level); `learn_sub_scales`: the integer sub-block scales and mins of K-quants / IQ4_XS train
    too (quant/fakequant.py). Frozen: marked `FROZEN`, which the trainer's parameter selection honours."""
    from ..gguf.writer import encode
    from ..lazy import streamed
    from ..sequential import block_linears
    if streamed(model):
        raise ConfigError("quantization-aware training trains the whole model: it cannot run streamed "
                          "(--stream off, and the memory for the model in float32 with its training state)")
    spec = model.spec
    out = []
    hf_of = {id(m): n for n, m in model.module.named_modules()}
    for name, mods in block_linears(model).items():
        fmt = types[name][0] if name in types else None
        if fmt is None or fmt.is_float:
            continue
        if len(mods) != 1:
            raise ConfigError(f"{name}: quantization-aware training does not cover fused tensors yet "
                              f"({spec.gguf_arch})")
        mod = mods[0]
        if parametrize.is_parametrized(mod, "weight"):
            raise ConfigError(f"{name} already has a parametrization")
        W = mod.weight.detach().float()
        hf = f"{hf_of[id(mod)]}.weight"
        if start is not None and name in start:
            order = spec.to_gguf_tensor(hf, torch.arange(W.shape[0]), model.config).numpy()
            blocks = np.ascontiguousarray(np.asarray(start[name])[np.argsort(order)])      # back to HF rows
        else:
            imp = imatrix.importance(name) if imatrix is not None else None
            blocks = encode(W.numpy(), fmt, name, imp)
        blocks = blocks.reshape(-1, gguf.GGML_QUANT_SIZES[fmt.ggml_type][1])
        fq = FakeQuant(fmt.ggml_type, blocks, tuple(W.shape), learn_scales=learn_scales, learn_round=learn_round,
                       learn_sub_scales=learn_sub_scales, anchor=anchor)
        parametrize.register_parametrization(mod, "weight", fq, unsafe=True)
        if learn_round or freeze:
            orig = mod.parametrizations.weight.original
            orig.requires_grad_(False)
            setattr(orig, FROZEN, True)
        out.append(Fake(name, hf, mod, fq))
    return out


@torch.no_grad()
def export(model, fakes: list[Fake]) -> tuple[dict[str, np.ndarray], dict[str, torch.Tensor]]:
    """(GGUF name -> encoded rows (rows, bytes per row) in llama.cpp's row order, HF name -> the fake-quant weight)
    of the current state; the parametrizations are removed (each module's weight is its trained float weight)."""
    spec, cfg = model.spec, model.config
    encoded, changed = {}, {}
    for f in fakes:
        W = f.module.parametrizations.weight.original.detach().float()
        blocks = f.fake.export(W)
        rows = W.shape[0]
        order = spec.to_gguf_tensor(f.hf_name, torch.arange(rows), cfg)      # llama.cpp's row order
        encoded[f.gguf_name] = blocks.reshape(rows, -1)[order.numpy()]
        changed[f.hf_name] = f.fake(W).detach().clone()
        parametrize.remove_parametrizations(f.module, "weight", leave_parametrized=False)
    return encoded, changed
