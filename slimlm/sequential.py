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
