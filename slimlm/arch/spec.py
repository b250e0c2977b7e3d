"""What a family description is: `ArchSpec` (tensor names HF <-> GGUF, expected shapes, llama.cpp's rotary row
order, the GGUF facts transformers' loader and llama.cpp's graph depend on) and `Layout` (where each part of a
decoder layer lives in the family's transformers modules, by role). The families themselves: `families.py`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InvalidModelError

# role of a per-layer part -> its GGUF tensor name (without "blk.{i}." and ".weight"/".bias"); llama.cpp's
# gguf-py/gguf/tensor_mapping.py
ROLE_GGUF = {"attn_norm": "attn_norm", "q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output",
             "q_norm": "attn_q_norm", "k_norm": "attn_k_norm", "ffn_norm": "ffn_norm", "gate": "ffn_gate",
             "up": "ffn_up", "down": "ffn_down", "attn_post_norm": "post_attention_norm",
             "ffn_post_norm": "post_ffw_norm", "router": "ffn_gate_inp", "gate_exps": "ffn_gate_exps",
             "up_exps": "ffn_up_exps", "down_exps": "ffn_down_exps"}
# a mixture-of-experts layer's stacked expert weights (experts x out x in) and its router (experts x hidden)
EXPERT_ROLES = ("gate_exps", "up_exps", "down_exps")
NORM_ROLES = ("attn_norm", "ffn_norm", "q_norm", "k_norm", "attn_post_norm", "ffn_post_norm")
# transformers' config switches biases on per group (LlamaConfig: attention_bias for q,k,v,o; mlp_bias for
# gate,up,down); llama.cpp's llama/deci graphs add optional biases to attn_output and ffn_gate/up/down
BIAS_FLAGS = {"attention_bias": ("q", "k", "v", "o"), "mlp_bias": ("gate", "up", "down")}
OUTPUT_SIDE_BIASES = ("o", "gate", "up", "down")
# HF checkpoint entries that are buffers, not weights
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

# config.json key of a model whose layers differ in width (slimlm's structured pruning): per-layer lists
# {"intermediate_size": [...], "num_attention_heads": [...], "num_key_value_heads": [...]}; the top-level
# fields then hold the largest width. transformers ignores the key (and cannot build such a model alone:
# slimlm.load does, by shrinking each layer of the widest model before loading the weights). In a GGUF the
# model becomes llama.cpp's per-layer architecture (ArchSpec.per_layer_arch), whose arrays carry the same numbers.
PER_LAYER = "slimlm_per_layer"
PER_LAYER_FIELDS = ("intermediate_size", "num_attention_heads", "num_key_value_heads")


def n_experts(cfg: dict) -> int:
    """A mixture-of-experts config's expert count (transformers saves Qwen3-MoE's as num_local_experts); 0 if dense."""
    return int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0)


def layer_dims(cfg: dict, i: int) -> tuple[int, int, int]:
    """(intermediate size, query heads, KV heads) of layer i."""
    per = cfg.get(PER_LAYER) or {}
    nh = cfg["num_attention_heads"]
    top = (cfg["intermediate_size"], nh, cfg.get("num_key_value_heads") or nh)
    return tuple(int(per[k][i]) if k in per else v for k, v in zip(PER_LAYER_FIELDS, top, strict=True))


def gguf_arch(spec: ArchSpec, cfg: dict) -> str:
    """llama.cpp's architecture name for this model: the family's per-layer arch for a model whose layers differ."""
    if cfg.get(PER_LAYER):
        if spec.per_layer_arch is None:
            raise InvalidModelError(f"per-layer widths are not supported for {spec.hf_arch}: llama.cpp's "
                                    f"{spec.gguf_arch} architecture has one width for every layer")
        return spec.per_layer_arch
    return spec.gguf_arch


def _role_shape(role: str, kind: str, h: int, hd: int, nh: int, nkv: int, ff: int, ne: int = 0,
                eff: int = 0) -> tuple[int, ...]:
    """Shape of a layer part's weight or bias (torch layout: out x in; experts x out x in)."""
    out_in = {"q": (nh * hd, h), "k": (nkv * hd, h), "v": (nkv * hd, h), "o": (h, nh * hd),
              "gate": (ff, h), "up": (ff, h), "down": (h, ff), "router": (ne, h), "gate_exps": (ne, eff, h),
              "up_exps": (ne, eff, h), "down_exps": (ne, h, eff)}
    if role in out_in:
        return out_in[role] if kind == "weight" else out_in[role][:1]
    return (hd,) if role in ("q_norm", "k_norm") else (h,)


@dataclass(frozen=True)
class Layout:
    """Where a family's modules live: paths from the *ForCausalLM module (layers, embedding, final norm, output
    head) and, by role, from a decoder layer (attn, mlp: the sub-blocks; q/k/v/o, gate/up/down: linears;
    attn_norm/ffn_norm/q_norm/k_norm: norms)."""
    layers: str
    embed: str
    norm: str
    head: str
    parts: tuple[tuple[str, str], ...]
    # linears that read one tensor, and the part that produced it (AWQ folds 1/s into it: an RMSNorm's weight, or a
    # linear's rows, so the exported graph is unchanged); the down projection reads act(gate) * up: 1/s into up
    shared_inputs: tuple[tuple[tuple[str, ...], str], ...] = ((("q", "k", "v"), "attn_norm"),
                                                              (("gate", "up"), "ffn_norm"))
    down_input: tuple[str, str] | None = ("down", "up")     # None: no dense MLP (mixture of experts)

    def path(self, role: str) -> str:
        return dict(self.parts)[role]

    def input_groups(self) -> list[tuple[tuple[str, ...], str]]:
        """(paths of the linears that read one tensor, path of its producer), paths relative to a layer."""
        return [(tuple(self.path(r) for r in roles), self.path(p)) for roles, p in self.shared_inputs]


_ATTN_MLP = (("attn", "self_attn"), ("mlp", "mlp"), ("attn_norm", "input_layernorm"), ("q", "self_attn.q_proj"),
             ("k", "self_attn.k_proj"), ("v", "self_attn.v_proj"), ("o", "self_attn.o_proj"),
             ("q_norm", "self_attn.q_norm"), ("k_norm", "self_attn.k_norm"), ("gate", "mlp.gate_proj"),
             ("up", "mlp.up_proj"), ("down", "mlp.down_proj"))
LLAMA_LAYOUT = Layout(layers="model.layers", embed="model.embed_tokens", norm="model.norm", head="lm_head",
                      parts=_ATTN_MLP + (("ffn_norm", "post_attention_layernorm"),))
# Gemma 2/3: "sandwich" norms -- the attention and the MLP outputs are normed before the residual add; the MLP's
# input norm is pre_feedforward_layernorm, and post_attention_layernorm is the attention's output norm
# Qwen3-MoE: the MLP is a router (mlp.gate) and stacked experts, split in memory into gate/up/down stacks
# (split.py); AWQ folds only into the attention's input norm
MOE_LAYOUT = Layout(layers="model.layers", embed="model.embed_tokens", norm="model.norm", head="lm_head",
                    parts=tuple(p for p in _ATTN_MLP if p[0] not in ("gate", "up", "down")) +
                    (("ffn_norm", "post_attention_layernorm"), ("router", "mlp.gate"),
                     ("gate_exps", "mlp.experts.gate_proj"), ("up_exps", "mlp.experts.up_proj"),
                     ("down_exps", "mlp.experts.down_proj")),
                    shared_inputs=((("q", "k", "v"), "attn_norm"),), down_input=None)
GEMMA_LAYOUT = Layout(layers="model.layers", embed="model.embed_tokens", norm="model.norm", head="lm_head",
                      parts=_ATTN_MLP + (("ffn_norm", "pre_feedforward_layernorm"),
                                         ("attn_post_norm", "post_attention_layernorm"),
                                         ("ffn_post_norm", "post_feedforward_layernorm")))


@dataclass(frozen=True)
class ArchSpec:
    hf_arch: str            # config.json "architectures"[0]
    model_type: str         # config.json "model_type"
    gguf_arch: str          # llama.cpp's general.architecture
    layer_class: str        # transformers' decoder-layer class (how a module finds its family: modules.family)
    permute_qk: bool        # llama.cpp's converter permutes q/k rows for its rotary layout (llama arch)
    qkv_bias: bool = False  # q/k/v biases always present (qwen2)
    qk_norm: bool = False   # RMSNorm on each head's q and k (qwen3)
    # llama.cpp's graph adds optional biases to attn_output and ffn_gate/up/down (the llama and deci archs:
    # src/models/llama.cpp, deci.cpp, TENSOR_NOT_REQUIRED); qwen2/qwen3 load no such tensor
    output_biases: bool = False
    # transformers' config switches biases on per group (attention_bias: q,k,v,o; mlp_bias: gate,up,down)
    hf_bias_flags: bool = False
    # config.json's attention_bias / mlp_bias would be ignored by this family's transformers class: refused
    refuse_bias_flags: bool = False
    layout: Layout = LLAMA_LAYOUT
    # llama.cpp's arch for a model whose layers differ in width (per-layer arrays), None where it has none
    per_layer_arch: str | None = None
    # llama.cpp's loader sizes attn_q n_embd x n_embd: query heads x head_dim must stay the hidden size
    attn_width_is_hidden: bool = False
    # the head size a GGUF of this family loads with: "rope" (transformers reads rope.dimension_count, else
    # embedding/heads), "hidden" (embedding/heads), "key" (attention.key_length, else embedding/heads, as llama.cpp;
    # slimlm gives it to transformers: families.gguf_config_overrides)
    gguf_head_dim: str = "hidden"
    # transformers' GGUF loader defaults a missing head_count_kv to 32 for this arch, not to head_count
    gguf_needs_kv_heads: bool = True
    # general.name values transformers' GGUF loader takes for another model type (it then cannot read the file)
    gguf_refused_names: tuple[str, ...] = ()
    # config.json must give head_dim: "always", "if_present" (a null one breaks transformers), or "never"
    hf_head_dim: str = "never"
    # sub-block outputs normed before the residual add (attn_post_norm, ffn_post_norm: Gemma 2/3)
    post_norms: bool = False
    # RMSNorm computes x * (norm_offset + w): transformers holds w, llama.cpp (offset + w) (Gemma: 1)
    norm_offset: float = 0.0
    # the embedding's output is scaled by sqrt(hidden size) in both runtimes (Gemma): the hidden size cannot shrink
    embed_scale: bool = False
    # config.json's key for the MLP activation and the values llama.cpp's graph of this family computes
    act_key: str = "hidden_act"
    acts: tuple[str, ...] = ("silu",)
    # attention kinds per layer (config "layer_types": sliding_attention / full_attention), each with its own
    # rope; llama.cpp reads the pattern as <arch>.attention.sliding_window_pattern (a bool per layer)
    layer_types: bool = False
    # llama.cpp's graph soft-caps the attention logits (attn_logit_softcapping) / always the final logits
    attn_softcap: bool = False
    final_softcap_always: bool = False
    # llama.cpp's graph has no output tensor (the embedding is the output projection): untied models are refused
    tied_only: bool = False
    # llama.cpp's sliding-window defaults for a GGUF without the keys: window (0: no sliding layers), period of the
    # layer pattern (every n-th layer full), and whether sliding layers have their own rope base (10000; else the
    # full layers')
    gguf_swa: tuple[int, int, bool] = (0, 6, True)
    # the layer count of the one size whose attention llama.cpp scales by 1/sqrt(hidden / heads), not by
    # 1/sqrt(head_dim) (transformers: query_pre_attn_scalar)
    gguf_hidden_scaled_layers: int | None = None
    # llama.cpp reads Llama 3's rope scaling from a rope_freqs tensor, which transformers' GGUF loader ignores
    gguf_rope_freqs: bool = False
    # linears the checkpoint and the GGUF hold as one tensor, rows in role order, that slimlm splits in memory so
    # every pass sees q/k/v and gate/up (Phi-3: qkv_proj, gate_up_proj): (checkpoint path in a layer, roles, GGUF
    # name); modules.prepare splits them on load, to_checkpoint and the GGUF writer join them again
    fused: tuple[tuple[str, tuple[str, ...], str], ...] = ()
    # mixture of experts in every layer (router + stacked experts, llama.cpp's *_exps tensors): the checkpoint holds
    # one tensor per expert (experts.{j}.gate_proj ...), memory and the GGUF one stack per role
    moe: bool = False

    def attn_scalar(self, cfg: dict) -> int:
        """The query_pre_attn_scalar llama.cpp's graph of this family implies for this config."""
        n = cfg["num_hidden_layers"]
        return cfg["hidden_size"] // cfg["num_attention_heads"] if n == self.gguf_hidden_scaled_layers else \
            cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]

    # ---- names -------------------------------------------------------------------------------------
    @property
    def layer_prefix(self) -> str:
        return self.layout.layers + "."

    @property
    def output_name(self) -> str:
        """HF name of the output projection's weight (absent from a tied checkpoint)."""
        return self.layout.head + ".weight"

    @property
    def embed_name(self) -> str:
        return self.layout.embed + ".weight"

    def _global_names(self) -> dict[str, str]:
        return {self.embed_name: "token_embd.weight", self.layout.norm + ".weight": "output_norm.weight",
                self.output_name: "output.weight"}

    def layer_of(self, hf_name: str) -> int | None:
        """The decoder layer an HF tensor (or module) name belongs to, None outside the layers."""
        if not hf_name.startswith(self.layer_prefix):
            return None
        head = hf_name[len(self.layer_prefix):].split(".", 1)[0]
        return int(head) if head.isdigit() else None

    def suffix_of(self, hf_name: str) -> str | None:
        """The part of a layer tensor's name after "<layers>.{i}.", None outside the layers."""
        i = self.layer_of(hf_name)
        return None if i is None else hf_name[len(self.layer_prefix) + len(str(i)) + 1:]

    def hf_name(self, i: int, role: str, kind: str = "weight") -> str:
        """HF tensor name of layer i's part `role` (kind: weight or bias)."""
        return f"{self.layer_prefix}{i}.{self.layout.path(role)}.{kind}"

    def role_suffix(self, role: str, kind: str = "weight") -> str:
        return f"{self.layout.path(role)}.{kind}"

    def _suffix_roles(self) -> dict[str, tuple[str, str]]:
        roles = dict(self.layout.parts)
        return {self.role_suffix(r, k): (r, k) for r in ROLE_GGUF if r in roles for k in ("weight", "bias")
                if k == "weight" or r not in NORM_ROLES}

    def layer_suffixes(self) -> list[str]:
        roles = ["attn_norm", "q", "k", "v", "o", "ffn_norm"]
        roles += ["router", *EXPERT_ROLES] if self.moe else ["gate", "up", "down"]
        if self.post_norms:
            roles += ["attn_post_norm", "ffn_post_norm"]
        out = [self.role_suffix(r) for r in roles]
        if self.qkv_bias:
            out += [self.role_suffix(r, "bias") for r in ("q", "k", "v")]
        if self.qk_norm:
            out += [self.role_suffix(r) for r in ("q_norm", "k_norm")]
        return out

    def checkpoint_layer_tensors(self) -> int:
        """How many tensors each layer of a checkpoint or GGUF holds at least (fused parts count once; a stack of
        experts once, though a checkpoint holds one tensor per expert)."""
        return len(self.layer_suffixes()) - sum(len(roles) - 1 for _, roles, _ in self.fused)

    def bias_suffixes(self, cfg: dict) -> list[str]:
        """Per-layer bias tensors a checkpoint with this config holds beyond layer_suffixes (the groups the config's
        attention_bias / mlp_bias switch on, for families whose config has those flags)."""
        if not self.hf_bias_flags:
            return []
        return [self.role_suffix(r, "bias") for flag, group in BIAS_FLAGS.items() if cfg.get(flag)
                for r in group if self.role_suffix(r, "bias") not in self.layer_suffixes()]

    def hf_bias_config(self, names) -> dict[str, bool]:
        """The config flags (attention_bias, mlp_bias) an HF checkpoint holding the tensors `names` needs; the
        partners of a group (q/k/v for o, gate/up for down) are then expected too (zeros if the model has none).
        A bias this family's transformers class cannot hold is an error naming it."""
        suffixes = {self.suffix_of(n) for n in names} - {None}
        extra = sorted(s for s in suffixes if s.endswith(".bias") and s not in self.layer_suffixes())
        if not extra:
            return {}
        if not self.hf_bias_flags:
            raise InvalidModelError(f"transformers' {self.hf_arch} has no {extra[0]} (its config cannot switch "
                                    f"such biases on); write a GGUF instead")
        return {flag: any(self.role_suffix(r, "bias") in extra for r in group) for flag, group in BIAS_FLAGS.items()}

    def hf_to_gguf(self, hf_name: str) -> str:
        """The GGUF tensor holding an HF tensor: a fused one (ArchSpec.fused) for each of its parts and for the
        checkpoint's fused name."""
        g = self._global_names()
        if hf_name in g:
            return g[hf_name]
        i, suffix = self.layer_of(hf_name), self.suffix_of(hf_name)
        rk = self._suffix_roles().get(suffix) if suffix is not None else None
        if rk is not None:
            role, kind = rk
            if kind == "bias" and role in OUTPUT_SIDE_BIASES and not self.output_biases:
                raise InvalidModelError(f"tensor {hf_name!r}: llama.cpp's {self.gguf_arch} graph has no "
                                        f"{ROLE_GGUF[role]}.bias (only the llama family's adds such biases)")
            fused = self.fused_group(role)
            return f"blk.{i}.{fused[2] if fused else ROLE_GGUF[role]}.{kind}"
        for path, _, name in self.fused:
            for kind in ("weight", "bias"):
                if suffix == f"{path}.{kind}":
                    return f"blk.{i}.{name}.{kind}"
        raise InvalidModelError(f"tensor {hf_name!r} has no GGUF name for architecture {self.hf_arch}")

    def fused_group(self, role: str) -> tuple[str, tuple[str, ...], str] | None:
        """The fused tensor (checkpoint path, roles, GGUF name) a role's linear is part of, None if it is its own."""
        return next((f for f in self.fused if role in f[1]), None)

    def to_checkpoint(self, tensors: dict[str, torch.Tensor], *, unstack: bool = True) -> dict[str, torch.Tensor]:
        """In-memory tensors (split, ArchSpec.fused) -> the checkpoint's: each fused group's parts joined by rows,
        stacked experts one tensor per expert (unstack=False: kept stacked, as the GGUF holds them)."""
        if not self.fused and not self.moe:
            return tensors
        out, roles = {}, self._suffix_roles()
        for name, t in tensors.items():
            rk = roles.get(self.suffix_of(name) or "")
            group = self.fused_group(rk[0]) if rk else None
            if rk and rk[0] in EXPERT_ROLES and unstack:   # experts.{j}.<proj>.weight, as transformers saves them
                i, (path, proj) = self.layer_of(name), self.layout.path(rk[0]).rsplit(".", 1)
                out.update({f"{self.layer_prefix}{i}.{path}.{j}.{proj}.weight": t[j] for j in range(t.shape[0])})
            elif group is None:
                out[name] = t
            elif rk[0] == group[1][0]:
                i = self.layer_of(name)
                parts = [tensors[f"{self.layer_prefix}{i}.{self.role_suffix(r, rk[1])}"] for r in group[1]]
                out[f"{self.layer_prefix}{i}.{group[0]}.{rk[1]}"] = torch.cat(parts, 0)
        return out

    # ---- shapes ------------------------------------------------------------------------------------
    def expected_shapes(self, cfg: dict, *, in_memory: bool = False, stacked: bool = False) -> dict[str, tuple[int, ...]]:
        """HF tensor name -> shape implied by config.json (used to check a checkpoint before loading); in_memory:
        with fused linears split (ArchSpec.fused), as a loaded model holds them; stacked: experts kept stacked (the
        names to map to GGUF)."""
        h, V, L = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
        hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
        out = {self.embed_name: (V, h), self.layout.norm + ".weight": (h,)}
        if not cfg.get("tie_word_embeddings", False):
            out[self.output_name] = (V, h)
        roles = self._suffix_roles()
        ne, eff = n_experts(cfg), int(cfg.get("moe_intermediate_size") or 0)
        for i in range(L):
            ff, nh, nkv = layer_dims(cfg, i)
            for s in self.layer_suffixes() + self.bias_suffixes(cfg):
                out[f"{self.layer_prefix}{i}.{s}"] = _role_shape(*roles[s], h, hd, nh, nkv, ff, ne, eff)
        if in_memory:
            return out
        return {k: tuple(v.shape) for k, v in self.to_checkpoint({k: torch.empty(s, device="meta")
                                                                   for k, s in out.items()}, unstack=not stacked).items()}

    @staticmethod
    def is_ignored(hf_name: str) -> bool:
        return hf_name.endswith(_IGNORED_SUFFIXES)

    # ---- llama.cpp's rotary layout --------------------------------------------------------------------
    def to_gguf_tensor(self, hf_name: str, W: torch.Tensor, cfg: dict) -> torch.Tensor:
        """Apply llama.cpp's q/k row permutation where this family needs it (exact reindexing), and its norm
        offset (llama.cpp stores offset + w where transformers holds w)."""
        if self.norm_offset and hf_name.endswith("norm.weight"):
            return W + self.norm_offset
        if not self.permute_qk:
            return W
        i = self.layer_of(hf_name)
        if i is None:
            return W
        _, nh, nkv = layer_dims(cfg, i)
        suffix = self.suffix_of(hf_name)
        if suffix in (self.role_suffix("q"), self.role_suffix("q", "bias")):   # as convert_hf_to_gguf.py
            return _permute_rows(W, nh)
        if suffix in (self.role_suffix("k"), self.role_suffix("k", "bias")):
            return _permute_rows(W, nkv)
        return W


def _permute_rows(W: torch.Tensor, n_head: int) -> torch.Tensor:
    # rows of each head: HF holds [first halves of pairs | second halves]; llama.cpp interleaves pairs
    return W.reshape(n_head, 2, W.shape[0] // n_head // 2, *W.shape[1:]).swapaxes(1, 2).reshape(W.shape)
