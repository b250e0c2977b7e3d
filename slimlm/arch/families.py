"""The family descriptions: one `ArchSpec` per transformers architecture slimlm loads, the GGUF architectures
transformers' GGUF loader builds, config validation, rope settings, and the family facts llama.cpp's own rules
depend on. Adding a family: its ArchSpec here (and a Layout in spec.py if its modules sit elsewhere), its
tests, nothing outside `slimlm/arch/`."""
from __future__ import annotations

import math

import torch

from ..errors import InvalidModelError
from .spec import GEMMA_LAYOUT, MOE_LAYOUT, ArchSpec, n_experts

ARCHS: dict[str, ArchSpec] = {
    "LlamaForCausalLM": ArchSpec("LlamaForCausalLM", "llama", "llama", "LlamaDecoderLayer", permute_qk=True,
                                 output_biases=True, hf_bias_flags=True, per_layer_arch="deci",
                                 gguf_head_dim="rope", gguf_needs_kv_heads=False, gguf_refused_names=("mistral",),
                                 gguf_rope_freqs=True),
    "MistralForCausalLM": ArchSpec("MistralForCausalLM", "mistral", "llama", "MistralDecoderLayer", permute_qk=True,
                                   output_biases=True, refuse_bias_flags=True, per_layer_arch="deci",
                                   gguf_head_dim="rope", gguf_needs_kv_heads=False,
                                   gguf_refused_names=("mistral",)),
    "Qwen2ForCausalLM": ArchSpec("Qwen2ForCausalLM", "qwen2", "qwen2", "Qwen2DecoderLayer", permute_qk=False,
                                 qkv_bias=True, attn_width_is_hidden=True, hf_head_dim="if_present"),
    # transformers' GGUF loader reads no head size for qwen3 (it builds its config class's default, 128): slimlm
    # gives it attention.key_length (model.py, gguf_config_overrides)
    "Qwen3ForCausalLM": ArchSpec("Qwen3ForCausalLM", "qwen3", "qwen3", "Qwen3DecoderLayer", permute_qk=False,
                                 qk_norm=True, gguf_head_dim="key", hf_head_dim="always"),
    # Gemma 3 text models (270M, 1B; the text part of 4B+): (1 + w) RMSNorm, sandwich norms, q/k norm, embedding
    # x sqrt(hidden), GELU-tanh, sliding-window layers with their own rope base. transformers' GGUF loader reads
    # attention.key_length as head_dim. llama.cpp scales attention by 1/sqrt(head_dim) (27B: hidden/heads):
    # query_pre_attn_scalar must be head_dim (hf.check_config)
    "Gemma3ForCausalLM": ArchSpec("Gemma3ForCausalLM", "gemma3_text", "gemma3", "Gemma3DecoderLayer",
                                  permute_qk=False, qk_norm=True, layout=GEMMA_LAYOUT, gguf_head_dim="key",
                                  hf_head_dim="always", post_norms=True, norm_offset=1.0, embed_scale=True,
                                  act_key="hidden_activation", acts=("gelu_pytorch_tanh",), layer_types=True,
                                  gguf_swa=(0, 6, True), gguf_hidden_scaled_layers=62),
    # Gemma 2: as Gemma 3 without q/k norm, with attention-logit soft-capping and a final soft-cap (llama.cpp's
    # graph applies both always), one rope base for all layers, and no output tensor (tied only)
    "Gemma2ForCausalLM": ArchSpec("Gemma2ForCausalLM", "gemma2", "gemma2", "Gemma2DecoderLayer",
                                  permute_qk=False, layout=GEMMA_LAYOUT, gguf_head_dim="key", hf_head_dim="always",
                                  post_norms=True, norm_offset=1.0, embed_scale=True, act_key="hidden_activation",
                                  acts=("gelu_pytorch_tanh",), layer_types=True, attn_softcap=True,
                                  final_softcap_always=True, tied_only=True, gguf_swa=(4096, 2, False),
                                  gguf_hidden_scaled_layers=46),
    # Phi-3 (mini 4k, medium, Phi-4): Llama's computation with q/k/v fused into qkv_proj and gate/up into
    # gate_up_proj (split in memory: spec.fused, split.py; llama.cpp's phi3 takes attn_qkv and a 2 x n_ff ffn_up
    # holding gate then up), neox rope, attention width = hidden size. llama.cpp disables its sliding window
    # ("Phi SWA is currently disabled"): the runtimes agree up to the window (2047 in Phi-3-mini-4k)
    "Phi3ForCausalLM": ArchSpec("Phi3ForCausalLM", "phi3", "phi3", "Phi3DecoderLayer", permute_qk=False,
                                attn_width_is_hidden=True,
                                fused=(("self_attn.qkv_proj", ("q", "k", "v"), "attn_qkv"),
                                       ("mlp.gate_up_proj", ("gate", "up"), "ffn_up"))),
    # Qwen3-MoE: Qwen3's attention (q/k norm) and in every layer a router over stacked experts (llama.cpp's
    # qwen3moe: ffn_gate_inp, ffn_{gate,up,down}_exps; softmax, top-k, weights always renormalized)
    "Qwen3MoeForCausalLM": ArchSpec("Qwen3MoeForCausalLM", "qwen3_moe", "qwen3moe", "Qwen3MoeDecoderLayer",
                                    permute_qk=False, qk_norm=True, layout=MOE_LAYOUT, gguf_head_dim="key",
                                    hf_head_dim="always", moe=True),
}
# GGUF general.architecture -> the HF class transformers builds for it
GGUF_ARCHS = {"phi3": "Phi3ForCausalLM", "qwen3moe": "Qwen3MoeForCausalLM", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
              "gemma3": "Gemma3ForCausalLM", "gemma2": "Gemma2ForCausalLM"}
# attention kinds of config "layer_types" (each with its own rope where the family has layer types)
FULL, SLIDING = "full_attention", "sliding_attention"
# transformers applies a `<prefix>.<key>` of any architecture it knows to the model it builds, whatever the file's
# architecture (a qwen3 file's `llama.block_count` would set its layer count): prefixes beyond gguf-py's arch names
EXTRA_GGUF_ARCH_PREFIXES = frozenset({"mistral", "qwen2_moe", "qwen3_moe", "gpt_oss"})
# tokenizer.ggml.model values transformers can build a tokenizer from for these families; SentencePiece's name
GGUF_TOKENIZER_MODELS = ("gpt2", "llama")
SPM_TOKENIZER = "llama"
# llama.cpp's LLM_TYPE_70B (one attn_v rule of its quantizer depends on it): 80 layers, and for these archs
# grouped-query attention too (without it, the 65B)
_70B_ARCHS = {"llama": True, "qwen2": False}


def is_70b(gguf_arch: str, n_layer: int, n_gqa: int) -> bool:
    needs_gqa = _70B_ARCHS.get(gguf_arch)
    return n_layer == 80 and needs_gqa is not None and (n_gqa > 1 or not needs_gqa)


def gguf_config_overrides(spec: ArchSpec, get, arch: str, cfg: dict, tensor=lambda name: None) -> dict:
    """Config fields transformers' GGUF loader gets wrong or leaves at its defaults for this family, from the keys
    llama.cpp's graph reads (`get`: a GGUF key's value or None; `cfg`: the config transformers parsed; `tensor`: a
    tensor of the file by name, or None)."""
    out = {}
    freqs = tensor("rope_freqs.weight") if spec.gguf_rope_freqs else None
    if freqs is not None:
        out["rope_parameters"] = llama3_rope_from_factors(torch.as_tensor(freqs, dtype=torch.float32).flatten(), cfg)
    if spec.moe:                           # transformers' loader reads no expert size (its default is 768)
        out["moe_intermediate_size"] = int(get(f"{arch}.expert_feed_forward_length"))
    if spec.gguf_head_dim == "key":        # llama.cpp: key_length, else embedding / heads
        out["head_dim"] = int(get(f"{arch}.attention.key_length") or cfg["hidden_size"] // cfg["num_attention_heads"])
    if spec.layer_types:
        out.update(sliding_layer_config(spec, get, arch, {**cfg, **out}))
    return out


def sliding_layer_config(spec: ArchSpec, get, arch: str, cfg: dict) -> dict:
    """The config fields of a family with sliding-window layers (ArchSpec.layer_types) that transformers' GGUF
    loader leaves at its config class's defaults, read from the keys llama.cpp's graph reads (`get`: a GGUF key's
    value or None; `cfg`: the config transformers parsed). llama.cpp: without sliding_window, the family's default
    window (ArchSpec.gguf_swa; 0: no sliding layers); sliding_window_pattern is a bool per layer (true = sliding)
    or a period n (every n-th layer full; default the family's); freq_base_swa defaults to 10000 or to the full
    layers' base; attention is scaled as ArchSpec.attn_scalar says (transformers: query_pre_attn_scalar); the
    soft-caps default to 50 (attention) and 30 (final) where the graph always applies them."""
    window, period, own_base = spec.gguf_swa
    n_layer = cfg["num_hidden_layers"]
    n_swa, pattern = get(f"{arch}.attention.sliding_window"), get(f"{arch}.attention.sliding_window_pattern")
    n_swa = window if n_swa is None else n_swa
    if not n_swa:
        kinds = [FULL] * n_layer
    elif pattern is not None and not isinstance(pattern, (int, float)):       # an array
        kinds = [SLIDING if bool(b) else FULL for b in pattern]
    else:
        n = period if pattern is None else int(pattern)
        kinds = [SLIDING if n == 0 or i % n < n - 1 else FULL for i in range(n_layer)]
    base = float(get(f"{arch}.rope.freq_base") or 10000.0)
    full = {"rope_type": "default", "rope_theta": base}
    if get(f"{arch}.rope.scaling.type") == "linear":
        full.update(rope_type="linear", factor=float(get(f"{arch}.rope.scaling.factor")))
    final = float(get(f"{arch}.final_logit_softcapping") or (30.0 if spec.final_softcap_always else 0))
    out = {"layer_types": kinds, "query_pre_attn_scalar": spec.attn_scalar(cfg), "final_logit_softcapping": final or None}
    if own_base:
        out["rope_parameters"] = {FULL: full, SLIDING: {"rope_type": "default", "rope_theta": float(
            get(f"{arch}.rope.freq_base_swa") or 10000.0)}}
    else:
        out["rope_parameters"] = full
    if spec.attn_softcap:
        out["attn_logit_softcapping"] = float(get(f"{arch}.attn_logit_softcapping") or 50.0)
    if n_swa:
        out["sliding_window"] = int(n_swa)
    return out


def spec_for_gguf(gguf_arch: str) -> ArchSpec | None:
    return ARCHS.get(GGUF_ARCHS.get(gguf_arch, ""))


_REQUIRED_KEYS = ("hidden_size", "vocab_size", "num_hidden_layers", "num_attention_heads",
                  "intermediate_size")
ROPE_TYPES = ("default", "linear", "llama3")


def get_arch(cfg: dict, source: str = "config.json") -> ArchSpec:
    """Validate a config dict and return its ArchSpec; errors list the supported architectures."""
    archs = cfg.get("architectures") or []
    if not isinstance(archs, list) or not archs:
        raise InvalidModelError(f"{source}: no 'architectures' entry; supported: {', '.join(ARCHS)}")
    spec = ARCHS.get(archs[0])
    if spec is None:
        raise InvalidModelError(f"{source}: architecture {archs[0]!r} is not supported; "
                                f"supported: {', '.join(ARCHS)}")
    for k in _REQUIRED_KEYS:
        v = cfg.get(k)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise InvalidModelError(f"{source}: {k} must be a positive integer, found {v!r}")
    nh, nkv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    if not isinstance(nkv, int) or nh % nkv:
        raise InvalidModelError(f"{source}: num_attention_heads={nh} is not a multiple of "
                                f"num_key_value_heads={nkv}")
    if not cfg.get("head_dim") and cfg["hidden_size"] % nh:
        raise InvalidModelError(f"{source}: hidden_size={cfg['hidden_size']} is not divisible by "
                                f"num_attention_heads={nh} and no head_dim is given")
    if spec.moe:
        _check_moe(cfg, source)
    for kind in (FULL, SLIDING) if spec.layer_types else (FULL,):
        rope = rope_parameters(cfg, kind)
        if rope.get("rope_type", "default") not in ROPE_TYPES:
            raise InvalidModelError(f"{source}: rope type {rope.get('rope_type')!r} is not supported yet; "
                                    f"supported: {', '.join(ROPE_TYPES)}")
        partial = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
        if partial != 1.0:
            raise InvalidModelError(f"{source}: partial rotary embeddings (partial_rotary_factor "
                                    f"{str(partial)[:40]}) are not supported yet")
    return spec


def _check_moe(cfg: dict, source: str) -> None:
    """A mixture-of-experts config llama.cpp's graph computes: experts in every layer, top-k weights renormalized."""
    ne, k, eff = n_experts(cfg), cfg.get("num_experts_per_tok"), cfg.get("moe_intermediate_size")
    for name, v in (("num_experts", ne), ("num_experts_per_tok", k), ("moe_intermediate_size", eff)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise InvalidModelError(f"{source}: {name} must be a positive integer, found {str(v)[:40]}")
    if k > ne:
        raise InvalidModelError(f"{source}: num_experts_per_tok={k} exceeds num_experts={ne}")
    if cfg.get("norm_topk_prob") is not True:
        raise InvalidModelError(f"{source}: norm_topk_prob must be true: llama.cpp's graph always renormalizes the "
                                f"top-k routing weights")
    if cfg.get("mlp_only_layers") or cfg.get("decoder_sparse_step", 1) != 1:
        raise InvalidModelError(f"{source}: layers without experts (mlp_only_layers, decoder_sparse_step) are not "
                                f"supported: llama.cpp's graph has experts in every layer")


_ROPE_KEYS = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                                 "original_max_position_embeddings")}


def check_rope(rp: dict, source: str) -> None:
    """A config's rope settings (rope_parameters()): a supported type with finite positive parameters."""
    t = rp.get("rope_type")
    if not isinstance(t, str) or t not in ROPE_TYPES:
        raise InvalidModelError(f"{source}: rope type {str(t)[:80]!r} is not supported yet; supported: "
                                f"{', '.join(ROPE_TYPES)}")
    for k in ("rope_theta",) + _ROPE_KEYS.get(t, ()):
        if not _positive_number(rp.get(k)):
            raise InvalidModelError(f"{source}: rope {k} must be a finite positive number, found "
                                    f"{str(rp.get(k))[:80]}")
    if t == "llama3" and not rp["low_freq_factor"] < rp["high_freq_factor"]:
        raise InvalidModelError(f"{source}: llama3 rope needs low_freq_factor < high_freq_factor, found "
                                f"{rp['low_freq_factor']} and {rp['high_freq_factor']}")


def _positive_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def rope_freqs(cfg: dict) -> torch.Tensor | None:
    """The per-frequency factors llama.cpp reads from a `rope_freqs` tensor for this config's rope, or None."""
    return llama3_rope_factors(cfg) if rope_parameters(cfg).get("rope_type") == "llama3" else None


def rope_parameters(cfg: dict, kind: str = FULL) -> dict:
    """Rope settings across transformers versions (`rope_parameters` in v5, `rope_scaling` before), of the layers
    of attention kind `kind` where a config gives one per kind (Gemma 3: {"full_attention": ..., "sliding_attention":
    ...}; its older configs: rope_theta / rope_scaling for full attention, rope_local_base_freq for sliding)."""
    raw = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if isinstance(raw, dict) and (FULL in raw or SLIDING in raw):
        rp = dict(raw.get(kind) or raw.get(FULL) or {})
    elif kind == SLIDING and "rope_local_base_freq" in cfg:
        rp = {"rope_type": "default", "rope_theta": cfg["rope_local_base_freq"]}
    else:
        rp = dict(raw)
    if "type" in rp and "rope_type" not in rp:
        rp["rope_type"] = rp["type"]
    rp.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    rp.setdefault("rope_type", "default")
    return rp


# Llama 3.x's rope scaling: factor 8 (3.1) or 32 (3.2) over an original 8192 context, low/high frequency factors
# 1 and 4; searched in this order when a GGUF holds only the per-frequency factors (rope_freqs)
_LLAMA3_FACTORS, _LLAMA3_CONTEXTS = (8.0, 32.0, 16.0, 4.0, 2.0), tuple(2 ** k for k in range(10, 18))


def llama3_rope_from_factors(freqs: torch.Tensor, cfg: dict) -> dict:
    """The llama3 rope parameters whose per-frequency factors (llama3_rope_factors) are exactly `freqs`, as llama.cpp
    stores them in a GGUF's rope_freqs tensor; an error if no usual setting gives them (transformers would run
    the model without that scaling)."""
    base = float(cfg.get("rope_theta") or rope_parameters(cfg)["rope_theta"])
    for factor in _LLAMA3_FACTORS:
        for n_old in _LLAMA3_CONTEXTS:
            rp = {"rope_type": "llama3", "rope_theta": base, "factor": factor, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": n_old}
            got = llama3_rope_factors({**cfg, "rope_parameters": rp})
            if got.shape == freqs.shape and torch.allclose(got, freqs, rtol=1e-6, atol=0):
                return rp
    raise InvalidModelError(f"rope_freqs.weight holds per-frequency rope factors that no usual Llama 3 setting gives "
                            f"(factor {'/'.join(map(str, _LLAMA3_FACTORS))}, low/high 1/4, an original context of "
                            f"1024..131072); transformers would run the model without them")


def llama3_rope_factors(cfg: dict) -> torch.Tensor:
    """Per-frequency factors of Llama 3.1's rope scaling, as llama.cpp stores them in `rope_freqs`.

    Ref: Llama 3.1 `apply_scaling`; wavelengths shorter than high_freq_wavelen keep factor 1, longer than
    low_freq_wavelen get `factor`, and a smooth blend lies between.
    """
    rp = rope_parameters(cfg)
    dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    base = rp["rope_theta"]
    factor = rp.get("factor", 8.0)
    lo, hi = rp.get("low_freq_factor", 1.0), rp.get("high_freq_factor", 4.0)
    n_old = rp.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < n_old / hi:
            out.append(1.0)
        elif wavelen > n_old / lo:
            out.append(factor)
        else:
            smooth = (n_old / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)
