"""llama.cpp's quantization presets (`llama-quantize` file types) and their per-tensor type rules.

Mirrors `llama_tensor_get_type_impl` and `tensor_type_fallback` in llama.cpp's src/llama-quant.cpp for the
file types slimlm can encode (dense Llama-family models; no Falcon, no experts) — keep in sync:
- the output projection (output.weight, or token_embd.weight when tied) goes to Q6_K unless the preset is
  Q8_0, or to Q8_0 when its row length does not fit the preset's block;
- attn_v (and a fused attn_qkv, which llama.cpp counts as attn_v): Q2_K -> Q3_K (Q4_K when n_head/n_head_kv >= 4); Q3_K_M -> Q5_K in the first 2 layers, then
  Q4_K; Q3_K_L -> Q5_K; IQ4_NL/IQ4_XS -> Q5_K when n_head/n_head_kv >= 4; Q4_K_S -> Q5_K for the first
  4 layers; Q4_K_M/Q5_K_M -> Q6_K where `use_more_bits`; a 70B model's Q3_K/Q4_K attn_v -> Q5_K;
- ffn_down: Q2_K -> Q3_K; Q3_K_M -> Q5_K in the first n/16 layers, then Q4_K; Q3_K_L -> Q5_K;
  Q4_K_M/Q5_K_M -> Q6_K where `use_more_bits`; IQ4_NL/IQ4_XS without an importance matrix -> Q5_K in the
  first n/8 layers; Q4_K_S -> Q5_K in the first n/8 layers; Q4_0/Q5_0 with an importance matrix ->
  Q4_1/Q5_1 in the first n/8 layers;
- attn_output: Q2_K -> Q3_K; Q3_K_M -> Q4_K; Q3_K_L -> Q5_K;
- then a row length that does not fit the chosen block falls back (Q4_K->Q5_0, Q5_K->Q5_1, Q6_K->Q8_0,
  Q2_K/Q3_K->Q4_0, IQ4_XS->IQ4_NL, then F16). `pure=True` skips the rules (llama-quantize --pure) but not
  the fallback.
Norms and other 1-D tensors stay F32, and so does a mixture of experts' router (ffn_gate_inp); the stacked experts
(ffn_*_exps) take the ffn_* rules.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from gguf import LlamaFileType

from .arch import is_70b as gguf_is_70b
from .errors import ConfigError
from .formats import FORMATS, QuantFormat, fallback_for


@dataclass(frozen=True)
class Preset:
    name: str
    default: str                 # the main tensor type (a FORMATS key)
    file_type: LlamaFileType


PRESETS: dict[str, Preset] = {p.name.lower(): p for p in [
    Preset("F32", "f32", LlamaFileType.ALL_F32),
    Preset("F16", "f16", LlamaFileType.MOSTLY_F16),
    Preset("BF16", "bf16", LlamaFileType.MOSTLY_BF16),
    Preset("Q8_0", "q8_0", LlamaFileType.MOSTLY_Q8_0),
    Preset("Q6_K", "q6_k", LlamaFileType.MOSTLY_Q6_K),
    Preset("Q5_K_M", "q5_k", LlamaFileType.MOSTLY_Q5_K_M),
    Preset("Q5_K_S", "q5_k", LlamaFileType.MOSTLY_Q5_K_S),
    Preset("Q5_1", "q5_1", LlamaFileType.MOSTLY_Q5_1),
    Preset("Q5_0", "q5_0", LlamaFileType.MOSTLY_Q5_0),
    Preset("Q4_K_M", "q4_k", LlamaFileType.MOSTLY_Q4_K_M),
    Preset("Q4_K_S", "q4_k", LlamaFileType.MOSTLY_Q4_K_S),
    Preset("Q4_1", "q4_1", LlamaFileType.MOSTLY_Q4_1),
    Preset("Q4_0", "q4_0", LlamaFileType.MOSTLY_Q4_0),
    Preset("IQ4_NL", "iq4_nl", LlamaFileType.MOSTLY_IQ4_NL),
    Preset("IQ4_XS", "iq4_xs", LlamaFileType.MOSTLY_IQ4_XS),
    Preset("Q3_K_L", "q3_k", LlamaFileType.MOSTLY_Q3_K_L),
    Preset("Q3_K_M", "q3_k", LlamaFileType.MOSTLY_Q3_K_M),
    Preset("Q3_K_S", "q3_k", LlamaFileType.MOSTLY_Q3_K_S),
    Preset("Q2_K", "q2_k", LlamaFileType.MOSTLY_Q2_K),
]}

_LAYER = re.compile(r"^blk\.(\d+)\.")


def get_preset(name: str) -> Preset:
    p = PRESETS.get(str(name).lower())
    if p is None:
        raise ConfigError(f"unknown type {name!r}; valid types: {', '.join(x.name for x in PRESETS.values())}")
    return p


def preset_for_file_type(file_type: int | None) -> Preset | None:
    for p in PRESETS.values():
        if file_type is not None and int(p.file_type) == int(file_type):
            return p
    return None


def _visit_order(t: tuple[str, tuple[int, ...]]) -> tuple[int, str]:
    m = _LAYER.match(t[0])
    return (int(m[1]) if m else -1, t[0])


def use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _quantizable(name: str, shape: tuple[int, ...]) -> bool:
    return len(shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name


def plan_types(tensors: list[tuple[str, tuple[int, ...]]], preset: Preset, *, n_layer: int, tied: bool,
               has_imatrix: bool = False, pure: bool = False, arch: str = "", n_head: int = 1,
               n_head_kv: int | None = None) -> dict[str, tuple[QuantFormat, str]]:
    """GGUF tensor name -> (format, why it differs from the preset's default) for (name, shape) pairs.
    `arch` (the GGUF architecture), `n_head` and `n_head_kv` feed the rules that depend on grouped-query
    attention (n_head // n_head_kv) and on llama.cpp's LLM_TYPE_70B."""
    n_gqa = n_head // (n_head_kv or n_head)
    is_70b = gguf_is_70b(arch, n_layer, n_gqa)
    default = FORMATS[preset.default]
    p = preset.name
    F = FORMATS
    out, i_wv, i_down = {}, 0, 0
    # llama.cpp visits tensors sorted by (layer number, name) -- its loader's weight_name_comparer -- and the
    # attn_v / ffn_down counters below follow that order, whatever the order in the file
    for name, shape in sorted(tensors, key=_visit_order):
        if name.endswith("ffn_gate_inp.weight"):       # a router: llama.cpp's converter and quantizer keep it F32
            out[name] = (F["f32"], "router: F32")
            continue
        if not _quantizable(name, shape) or default.is_float:
            out[name] = (F["f32"] if len(shape) < 2 else default, "1-D tensors stay F32" if len(shape) < 2 else "")
            continue
        t, why = default, ""
        if not pure:
            if name == "output.weight" or (tied and name == "token_embd.weight"):
                if shape[-1] % default.block_size:
                    t, why = F["q8_0"], "output projection: Q8_0 (row does not fit the preset's block)"
                elif default is not F["q8_0"]:
                    t, why = F["q6_k"], "output projection: Q6_K"
            elif name.endswith(("attn_v.weight", "attn_qkv.weight")):   # llama.cpp: category_is_attn_v
                t, why = _attn_v(p, i_wv, n_layer, n_gqa), "attn_v"
                if is_70b and t in (F["q3_k"], F["q4_k"]):
                    t, why = F["q5_k"], "attn_v: 70B model"
                i_wv += 1
            elif name.endswith(("ffn_down.weight", "ffn_down_exps.weight")):
                # llama.cpp's layer_info() is the running count for dense models
                t, why = _ffn_down(p, i_down, n_layer, has_imatrix), "ffn_down"
                i_down += 1
            elif name.endswith("attn_output.weight"):
                t, why = {"Q2_K": F["q3_k"], "Q3_K_M": F["q4_k"], "Q3_K_L": F["q5_k"]}.get(p), "attn_output"
            if t is None or t is default:
                t, why = default, ""
            elif why in ("attn_v", "ffn_down", "attn_output"):
                why = f"{why}: {t.name} by {p}'s rule for this layer"
        got = fallback_for(t, shape[-1])
        if got is not t:
            why = f"row length {shape[-1]} is not a multiple of {t.name}'s block {t.block_size}: {got.name}"
        out[name] = (got, why)
    return out


def _attn_v(p: str, i: int, n: int, n_gqa: int) -> QuantFormat | None:
    F = FORMATS
    if p == "Q2_K":
        return F["q4_k"] if n_gqa >= 4 else F["q3_k"]
    if p == "Q3_K_M":
        return F["q5_k"] if i < 2 else F["q4_k"]
    if p == "Q3_K_L":
        return F["q5_k"]
    if p in ("IQ4_NL", "IQ4_XS") and n_gqa >= 4:
        return F["q5_k"]
    if p in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n):
        return F["q6_k"]
    if p == "Q4_K_S" and i < 4:
        return F["q5_k"]
    return None


def _ffn_down(p: str, i: int, n: int, has_imatrix: bool) -> QuantFormat | None:
    F = FORMATS
    if p == "Q2_K":
        return F["q3_k"]
    if p == "Q3_K_M":
        return F["q5_k"] if i < n // 16 else F["q4_k"]
    if p == "Q3_K_L":
        return F["q5_k"]
    if p in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n):
        return F["q6_k"]
    if p in ("IQ4_NL", "IQ4_XS") and not has_imatrix and i < n // 8:
        return F["q5_k"]
    if p == "Q4_K_S" and i < n // 8:
        return F["q5_k"]
    if p in ("Q4_0", "Q5_0") and has_imatrix and i < n // 8:
        return F["q4_1" if p == "Q4_0" else "q5_1"]
    return None
