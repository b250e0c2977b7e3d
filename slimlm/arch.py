"""Model-family knowledge as data: HF <-> GGUF tensor names, hyper-parameters, expected shapes.

The ONLY place that knows model families. Every other module asks an `ArchSpec`. Names mirror llama.cpp's
`gguf-py/gguf/tensor_mapping.py` and `constants.py` (keep in sync when adding a family).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import InvalidModelError

# HF per-layer tensor suffix -> GGUF per-layer name (without the "blk.{i}." prefix)
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.bias": "attn_output.bias",
    "mlp.gate_proj.bias": "ffn_gate.bias",
    "mlp.up_proj.bias": "ffn_up.bias",
    "mlp.down_proj.bias": "ffn_down.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
# the linears that write into the residual stream (a bias there shifts a sub-block's output: bias compensation)
ATTN_OUT, MLP_OUT = "self_attn.o_proj", "mlp.down_proj"
# biases transformers' LlamaConfig switches on together: attention_bias (q, k, v, o) and mlp_bias (gate, up, down)
_HF_BIAS_FLAGS = {"attention_bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias",
                                     "self_attn.o_proj.bias"),
                  "mlp_bias": ("mlp.gate_proj.bias", "mlp.up_proj.bias", "mlp.down_proj.bias")}
_OUTPUT_SIDE_BIASES = ("self_attn.o_proj.bias", "mlp.gate_proj.bias", "mlp.up_proj.bias", "mlp.down_proj.bias")
# HF checkpoint entries that are buffers, not weights
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

# config.json key of a model whose layers differ in width (slimlm's structured pruning): per-layer lists
# {"intermediate_size": [...], "num_attention_heads": [...], "num_key_value_heads": [...]}; the top-level
# fields then hold the largest width. transformers ignores the key (and cannot build such a model alone:
# slimlm.load does, by shrinking each layer of the widest model before loading the weights). In a GGUF the
# model becomes llama.cpp's `deci` architecture, whose per-layer arrays carry the same numbers.
PER_LAYER = "slimlm_per_layer"
PER_LAYER_FIELDS = ("intermediate_size", "num_attention_heads", "num_key_value_heads")


def layer_dims(cfg: dict, i: int) -> tuple[int, int, int]:
    """(intermediate size, query heads, KV heads) of layer i."""
    per = cfg.get(PER_LAYER) or {}
    nh = cfg["num_attention_heads"]
    top = (cfg["intermediate_size"], nh, cfg.get("num_key_value_heads") or nh)
    return tuple(int(per[k][i]) if k in per else v for k, v in zip(PER_LAYER_FIELDS, top, strict=True))


def gguf_arch(spec: ArchSpec, cfg: dict) -> str:
    """llama.cpp's architecture name for this model: `deci` for a Llama-family model whose layers differ."""
    if cfg.get(PER_LAYER):
        if spec.gguf_arch != "llama":
            raise InvalidModelError(f"per-layer widths are supported for Llama-family models only, not "
                                    f"{spec.hf_arch}")
        return "deci"
    return spec.gguf_arch


def _layer_of(hf_name: str) -> int | None:
    parts = hf_name.split(".", 3)
    return int(parts[2]) if len(parts) == 4 and parts[:2] == ["model", "layers"] else None


@dataclass(frozen=True)
class ArchSpec:
    hf_arch: str            # config.json "architectures"[0]
    model_type: str         # config.json "model_type"
    gguf_arch: str          # llama.cpp's general.architecture
    permute_qk: bool        # llama.cpp's converter permutes q/k rows for its rotary layout (llama arch)
    qkv_bias: bool = False  # qwen2
    qk_norm: bool = False   # qwen3
    # llama.cpp's graph adds optional biases to attn_output and ffn_gate/up/down (the llama and deci archs:
    # src/models/llama.cpp, deci.cpp, TENSOR_NOT_REQUIRED); qwen2/qwen3 load no such tensor
    output_biases: bool = False
    # transformers' config switches biases on per group (attention_bias: q,k,v,o; mlp_bias: gate,up,down): LlamaConfig
    hf_bias_flags: bool = False

    # ---- names -------------------------------------------------------------------------------------
    def layer_suffixes(self) -> list[str]:
        out = ["input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
               "self_attn.v_proj.weight", "self_attn.o_proj.weight", "post_attention_layernorm.weight",
               "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"]
        if self.qkv_bias:
            out += ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"]
        if self.qk_norm:
            out += ["self_attn.q_norm.weight", "self_attn.k_norm.weight"]
        return out

    def bias_suffixes(self, cfg: dict) -> list[str]:
        """Per-layer bias tensors a checkpoint with this config holds beyond layer_suffixes (the groups the config's
        attention_bias / mlp_bias switch on, for families whose config has those flags)."""
        if not self.hf_bias_flags:
            return []
        return [s for flag, group in _HF_BIAS_FLAGS.items() if cfg.get(flag) for s in group
                if s not in self.layer_suffixes()]

    def hf_bias_config(self, names) -> dict[str, bool]:
        """The config flags (attention_bias, mlp_bias) an HF checkpoint holding the tensors `names` needs; the
        partners of a group (q/k/v for o, gate/up for down) are then expected too (zeros if the model has none).
        A bias this family's transformers class cannot hold is an error naming it."""
        suffixes = {n.split(".", 3)[3] for n in names if _layer_of(n) is not None}
        extra = sorted(s for s in suffixes if s.endswith(".bias") and s not in self.layer_suffixes())
        if not extra:
            return {}
        if not self.hf_bias_flags:
            raise InvalidModelError(f"transformers' {self.hf_arch} has no {extra[0]} (its config cannot switch "
                                    f"such biases on); write a GGUF instead")
        return {flag: any(s in group for s in extra) for flag, group in _HF_BIAS_FLAGS.items()}

    def hf_to_gguf(self, hf_name: str) -> str:
        if hf_name in _GLOBAL_NAMES:
            return _GLOBAL_NAMES[hf_name]
        parts = hf_name.split(".", 3)  # model.layers.{i}.suffix
        if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _LAYER_NAMES:
            if parts[3] in _OUTPUT_SIDE_BIASES and not self.output_biases:
                raise InvalidModelError(f"tensor {hf_name!r}: llama.cpp's {self.gguf_arch} graph has no "
                                        f"{_LAYER_NAMES[parts[3]]} (only the llama family's adds such biases)")
            return f"blk.{int(parts[2])}.{_LAYER_NAMES[parts[3]]}"
        raise InvalidModelError(f"tensor {hf_name!r} has no GGUF name for architecture {self.hf_arch}")

    # ---- shapes ------------------------------------------------------------------------------------
    def expected_shapes(self, cfg: dict) -> dict[str, tuple[int, ...]]:
        """HF tensor name -> shape implied by config.json (used to check a checkpoint before loading)."""
        h, V, L = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
        hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
        out = {"model.embed_tokens.weight": (V, h), "model.norm.weight": (h,)}
        if not cfg.get("tie_word_embeddings", False):
            out["lm_head.weight"] = (V, h)
        for i in range(L):
            ff, nh, nkv = layer_dims(cfg, i)
            per_layer = {
                "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
                "self_attn.q_proj.weight": (nh * hd, h), "self_attn.k_proj.weight": (nkv * hd, h),
                "self_attn.v_proj.weight": (nkv * hd, h), "self_attn.o_proj.weight": (h, nh * hd),
                "self_attn.q_proj.bias": (nh * hd,), "self_attn.k_proj.bias": (nkv * hd,),
                "self_attn.v_proj.bias": (nkv * hd,), "self_attn.o_proj.bias": (h,),
                "mlp.gate_proj.bias": (ff,), "mlp.up_proj.bias": (ff,), "mlp.down_proj.bias": (h,),
                "self_attn.q_norm.weight": (hd,), "self_attn.k_norm.weight": (hd,),
                "mlp.gate_proj.weight": (ff, h), "mlp.up_proj.weight": (ff, h), "mlp.down_proj.weight": (h, ff),
            }
            for s in self.layer_suffixes() + self.bias_suffixes(cfg):
                out[f"model.layers.{i}.{s}"] = per_layer[s]
        return out

    @staticmethod
    def is_ignored(hf_name: str) -> bool:
        return hf_name.endswith(_IGNORED_SUFFIXES)

    # ---- llama.cpp's rotary layout --------------------------------------------------------------------
    def to_gguf_tensor(self, hf_name: str, W: torch.Tensor, cfg: dict) -> torch.Tensor:
        """Apply llama.cpp's q/k row permutation where this family needs it (exact reindexing)."""
        if not self.permute_qk:
            return W
        i = _layer_of(hf_name)
        if i is None:
            return W
        _, nh, nkv = layer_dims(cfg, i)
        if hf_name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):   # as convert_hf_to_gguf.py
            return _permute_rows(W, nh)
        if hf_name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
            return _permute_rows(W, nkv)
        return W


def _permute_rows(W: torch.Tensor, n_head: int) -> torch.Tensor:
    # rows of each head: HF holds [first halves of pairs | second halves]; llama.cpp interleaves pairs
    return W.reshape(n_head, 2, W.shape[0] // n_head // 2, *W.shape[1:]).swapaxes(1, 2).reshape(W.shape)


ARCHS: dict[str, ArchSpec] = {
    "LlamaForCausalLM": ArchSpec("LlamaForCausalLM", "llama", "llama", permute_qk=True, output_biases=True,
                                 hf_bias_flags=True),
    "MistralForCausalLM": ArchSpec("MistralForCausalLM", "mistral", "llama", permute_qk=True, output_biases=True),
    "Qwen2ForCausalLM": ArchSpec("Qwen2ForCausalLM", "qwen2", "qwen2", permute_qk=False, qkv_bias=True),
    "Qwen3ForCausalLM": ArchSpec("Qwen3ForCausalLM", "qwen3", "qwen3", permute_qk=False, qk_norm=True),
}
# GGUF general.architecture -> the HF class transformers builds for it
GGUF_ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

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
    rope = rope_parameters(cfg)
    if rope.get("rope_type", "default") not in ROPE_TYPES:
        raise InvalidModelError(f"{source}: rope type {rope.get('rope_type')!r} is not supported yet; "
                                f"supported: {', '.join(ROPE_TYPES)}")
    return spec


def rope_parameters(cfg: dict) -> dict:
    """Rope settings across transformers versions (`rope_parameters` in v5, `rope_scaling` before)."""
    rp = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    if "type" in rp and "rope_type" not in rp:
        rp["rope_type"] = rp["type"]
    rp.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    rp.setdefault("rope_type", "default")
    return rp


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
