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
    module: torch.nn.Module
    fake: FakeQuant
    tied: tuple = ()          # further modules whose parametrization reads this one's value (a tied LM head: _TiedTo)


def attach(model, types: dict, imatrix=None, *, start: dict | None = None, learn_scales: bool = True,
           learn_round: bool = False, anchor: bool = False, freeze: bool = False,
           learn_sub_scales: bool = False, embeddings: bool = False) -> list[Fake]:
    """FakeQuant parametrizations on the block linears of `model` (in memory) whose type in `types` (GGUF name ->
    (QuantFormat, why), as writer.plan_model gives) is a block type; returns them in forward order. `start`: GGUF
    name -> encoded rows in llama.cpp's row order (GPTQ's codes) to start from instead of the encoder's; the
    module's weight should then be what they decode to (sequential.quantize_model's changed weights), so that the
    nearest levels of the first forward are those codes. `learn_round`: learned rounding offsets train and the float
    weights are frozen (`anchor`: the offsets move the starting codes themselves, which the learned scales then
    never re-round: quant/fakequant.py); `freeze`: the float weights are frozen (their codes then change only where
    a learned scale moves the nearest level); `learn_sub_scales`: the integer sub-block scales and mins of K-quants / IQ4_XS train
    too (quant/fakequant.py); `embeddings`: the token embedding (and the LM head: tied, reading the embedding's) get
    one too, their float weights frozen whatever the mode (_attach_embeddings). Frozen: marked `FROZEN`, which the
    trainer's parameter selection honours."""
    from ..lazy import streamed
    from ..sequential import block_linears
    if streamed(model):
        raise ConfigError("quantization-aware training trains the whole model: it cannot run streamed "
                          "(--stream off, and the memory for the model in float32 with its training state)")
    spec = model.spec
    out = []
    hf_of = {id(m): n for n, m in model.module.named_modules()}
    kw = dict(learn_scales=learn_scales, learn_round=learn_round, learn_sub_scales=learn_sub_scales, anchor=anchor)
    for name, mods in block_linears(model).items():
        fmt = types[name][0] if name in types else None
        if fmt is None or fmt.is_float:
            continue
        if len(mods) != 1:
            raise ConfigError(f"{name}: quantization-aware training does not cover fused tensors yet "
                              f"({spec.gguf_arch})")
        out.append(_attach(model, name, f"{hf_of[id(mods[0])]}.weight", [mods[0]], fmt, imatrix, start,
                           frozen=learn_round or freeze, **kw))
    if embeddings:
        out += _attach_embeddings(model, types, imatrix, start, hf_of, kw)
    return out


def _attach(model, name: str, hf: str, mods: list, fmt, imatrix, start: dict | None, *, frozen: bool,
            **kw) -> Fake:
    """One FakeQuant on the weight of `mods[0]`; further modules (an LM head tied to the token embedding) read its
    value (_TiedTo), so both compute with the same fake-quant weight and one set of learned scales."""
    from ..gguf.writer import ENCODERS, encode
    spec = model.spec
    mod = mods[0]
    for m in mods:
        if parametrize.is_parametrized(m, "weight"):
            raise ConfigError(f"{name} already has a parametrization")
    W = mod.weight.detach().float()
    if start is not None and name in start:
        order = spec.to_gguf_tensor(hf, torch.arange(W.shape[0]), model.config).numpy()
        blocks = np.ascontiguousarray(np.asarray(start[name])[np.argsort(order)])      # back to HF rows
    else:       # as the writer encodes it (writer.encode_slabs)
        imp = imatrix.importance(name) if imatrix is not None and fmt.ggml_type in ENCODERS else None
        blocks = encode(W.numpy(), fmt, name, imp)
    blocks = blocks.reshape(-1, gguf.GGML_QUANT_SIZES[fmt.ggml_type][1])
    fq = FakeQuant(fmt.ggml_type, blocks, tuple(W.shape), **kw)
    parametrize.register_parametrization(mod, "weight", fq, unsafe=True)
    for m in mods[1:]:
        parametrize.register_parametrization(m, "weight", _TiedTo(mod), unsafe=True)
    if frozen:
        orig = mod.parametrizations.weight.original
        orig.requires_grad_(False)
        setattr(orig, FROZEN, True)
    return Fake(name, hf, mod, fq, tuple(mods[1:]))


class _TiedTo(torch.nn.Module):
    """The parametrization of a weight tied to another module's parametrized one (an LM head tied to the token
    embedding): its value is that module's, so under parametrize.cached() (the trainer's micro-batches) the fake-quant
    weight is computed once for both sides, with one set of learned scales."""

    def __init__(self, owner: torch.nn.Module):
        super().__init__()
        self._owner = [owner]          # not a submodule: state dicts and optimizers see the owner's parameters once

    def forward(self, _W: torch.Tensor) -> torch.Tensor:
        return self._owner[0].weight


def _attach_embeddings(model, types: dict, imatrix, start: dict | None, hf_of: dict, kw: dict) -> list[Fake]:
    """FakeQuants on the token embedding (with the LM head when it is tied to it) and an untied LM head, where the
    plan gives them a block type, from `start`'s codes where it has them (GPTQ's output projection). Their float
    weights never train (the trainer freezes the embeddings; here too under --qat-weights ste), nor does their
    rounding: their block scales (and with learn_sub_scales their sub-block scales) do, and the codes follow the
    nearest levels of the trained scales (learned rounding offsets on the embedding cost memory and time and did
    no better: README, "Training the tied embedding")."""
    from .grid import TABLES, T
    spec = model.spec
    emb, head = model.module.get_input_embeddings(), model.module.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    groups = [[emb, head]] if tied else [[emb]] + ([[head]] if head is not None else [])
    out = []
    for mods in groups:
        hf = f"{hf_of[id(mods[0])]}.weight"
        name = spec.hf_to_gguf(hf)
        fmt = types[name][0] if name in types else None
        if fmt is None or fmt.is_float or not fmt.fits(mods[0].weight.shape[-1]) or \
                T(fmt.ggml_type) not in TABLES:
            continue
        out.append(_attach(model, name, hf, mods, fmt, imatrix, start, frozen=True,
                           **{**kw, "learn_round": False}))
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
        for m in (f.module, *f.tied):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
    return encoded, changed
