"""The activations llama.cpp's CPU backend really multiplies a quantized weight with.

A matrix product with a block-quantized weight does not see the float activations: ggml's CPU backend first
quantizes each activation row to the weight type's `vec_dot_type` (ggml-cpu's type traits) and multiplies
integers: Q8_0 (blocks of 32, one fp16 scale) for Q4_0/Q5_0/Q8_0/IQ4_NL, Q8_1 (the same values and a block
sum) for Q4_1/Q5_1, and Q8_K (blocks of 256, one float scale) for the K-quants and IQ4_XS; F16/BF16 weights
take their own type. That rounding is part of every file's KL divergence in llama.cpp: the dequantized weights
of slimlm's GPTQ file at Q4_K_M's size give KLD 0.0184 against the dithered SmolLM2 reference in torch, 0.0227
with these activations, 0.0225 in llama.cpp; on the reference's own f32 weights, ffn_down's inputs rounded as
Q8_K (a K-quant ffn_down) cost KLD 0.0024, as Q8_0 0.0005 (`python bench/activations.py`). `runtime_activations`
computes that rounding as ggml's x86 code does it (half to even), so that the size-budgeted type choice prices it
(`slimlm.sensitivity`). What is matched is the size of what it adds (tests/test_activations.py: the emulated
rounding moves torch's logits by as much as llama.cpp's runtime does), not the values token by token: on a tiny
test model the two changes are mostly uncorrelated (not explained yet).
"""
from __future__ import annotations

import torch

_K = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS")
VEC_DOT = {"Q4_0": "Q8_0", "Q5_0": "Q8_0", "Q8_0": "Q8_0", "IQ4_NL": "Q8_0", "Q4_1": "Q8_1", "Q5_1": "Q8_1",
           **{t: "Q8_K" for t in _K}, "F16": "F16", "BF16": "BF16", "F32": "F32"}
# the distinct activation values a sensitivity candidate (or its F16 fallback) is multiplied with: Q8_1 holds Q8_0's
# values (its block sum only serves the weight's minimum)
KINDS = ("Q8_0", "Q8_K", "F16")
BLOCK = {"Q8_0": 32, "Q8_1": 32, "Q8_K": 256}


def activation_kind(weight_type: str) -> str:
    """The activation values a weight of `weight_type` is multiplied with (a KINDS entry, or F32: exact)."""
    v = VEC_DOT.get(weight_type, "F32")
    return "Q8_0" if v == "Q8_1" else v


def fits(kind: str, cols: int) -> bool:
    return cols % BLOCK.get(kind, 1) == 0


@torch.no_grad()
def runtime_activations(x: torch.Tensor, kind: str) -> torch.Tensor:
    """x (..., cols) as llama.cpp's dot product uses it when quantized to `kind` (float32 out)."""
    xf = x.float()
    if kind == "F32":
        return xf
    if kind == "F16":
        return xf.half().float()
    if kind == "BF16":
        return xf.bfloat16().float()
    block = BLOCK[kind]
    xb = xf.reshape(-1, block)
    if kind in ("Q8_0", "Q8_1"):
        # quantize_row_q8_0 (x86): q = round(x * 127/amax), d = fp16(amax / 127)
        amax = xb.abs().amax(1, keepdim=True)
        mult = torch.where(amax > 0, 127.0 / torch.where(amax > 0, amax, 1.0), 0.0)
        q = torch.round(xb * mult)
        return (q * (amax / 127).half().float()).reshape(xf.shape)
    # quantize_row_q8_K: the signed value of largest magnitude maps to -127; d = 1/iscale, a float
    mx = xb.gather(1, xb.abs().argmax(1, keepdim=True))
    iscale = torch.where(mx != 0, -127.0 / torch.where(mx != 0, mx, 1.0), 0.0)
    q = torch.round(iscale * xb).clamp(max=127)
    return (q * torch.where(iscale != 0, 1.0 / torch.where(iscale != 0, iscale, 1.0), 0.0)).reshape(xf.shape)


def emulate(model, types: dict[str, str]) -> list:
    """Forward pre-hooks on `model`'s linears that give each the activations llama.cpp multiplies its GGUF type
    with (`types`: GGUF tensor name -> type name, as a file or a plan holds them; a tied output projection takes
    the token embedding's type), straight through for training (the gradient is the identity). Returns the
    hooks' handles (`.remove()` each to take them off)."""
    spec = model.spec
    tied = "output.weight" not in types
    handles = []
    for name, mod in model.module.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        hf = f"{name}.weight"
        gg = "token_embd.weight" if name == spec.layout.head and tied else spec.hf_to_gguf(hf)
        kind = activation_kind(types.get(gg, "F32"))
        if kind == "F32" or not fits(kind, mod.in_features):
            continue

        def hook(_mod, args, kind=kind):
            x = args[0]
            return (x + (runtime_activations(x, kind).to(x.dtype) - x).detach(), *args[1:])
        handles.append(mod.register_forward_pre_hook(hook))
    return handles
