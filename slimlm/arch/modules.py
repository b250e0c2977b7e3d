"""A loaded transformers model, navigated by role: its decoder layers, embedding, final norm, and in each layer
the parts (q/k/v/o, gate/up/down, norms) and sub-blocks (attention, MLP) of its family's `Layout`. The family is
found from the module's class (a decoder layer or the *ForCausalLM; also through torch.compile, peft and FSDP
wrappers), so callers that hold only a layer need no spec."""
from __future__ import annotations

import torch

from ..errors import InvalidModelError
from .families import ARCHS, FULL
from .spec import EXPERT_ROLES, ArchSpec

_BY_CLASS = {name: spec for spec in ARCHS.values() for name in (spec.hf_arch, spec.layer_class)}
_CACHE: dict[type, ArchSpec] = {}


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The transformers module inside torch.compile's, DDP's and peft's wrappers."""
    while True:
        if hasattr(module, "_orig_mod"):                         # torch.compile
            module = module._orig_mod
        elif isinstance(module, torch.nn.parallel.DistributedDataParallel):
            module = module.module
        elif callable(getattr(module, "get_base_model", None)) and hasattr(module, "peft_config"):
            module = module.get_base_model()                       # peft
        else:
            return module


def family(obj: torch.nn.Module) -> ArchSpec:
    """The family of a *ForCausalLM module or one of its decoder layers."""
    obj = unwrap(obj)
    t = type(obj)
    if t not in _CACHE:
        spec = next((_BY_CLASS[c.__name__] for c in t.__mro__ if c.__name__ in _BY_CLASS), None)
        if spec is None:
            raise InvalidModelError(f"{t.__name__} is not a model or decoder layer of a supported family "
                                    f"({', '.join(ARCHS)})")
        _CACHE[t] = spec
    return _CACHE[t]


def prepare(module: torch.nn.Module) -> torch.nn.Module:
    """What every loaded model goes through before slimlm's passes: its fused linears split by role
    (ArchSpec.fused; split.py). In place; returns the module."""
    spec = family(module)
    if spec.fused:
        from .split import split_fused
        split_fused(unwrap(module))
    if spec.moe:
        from .split import split_experts
        split_experts(unwrap(module))
    return module


def decoder_layers(module: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers of a causal LM."""
    m = unwrap(module)
    return m.get_submodule(family(m).layout.layers)


def _set(root: torch.nn.Module, path: str, new) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


def set_decoder_layers(module: torch.nn.Module, new: list[torch.nn.Module]) -> None:
    m = unwrap(module)
    _set(m, family(m).layout.layers, torch.nn.ModuleList(new))


def embedding(module: torch.nn.Module) -> torch.nn.Embedding:
    m = unwrap(module)
    return m.get_submodule(family(m).layout.embed)


def final_norm(module: torch.nn.Module) -> torch.nn.Module:
    m = unwrap(module)
    return m.get_submodule(family(m).layout.norm)


def part(layer: torch.nn.Module, role: str) -> torch.nn.Module | None:
    """A decoder layer's part by role (q, k, v, o, gate, up, down, attn_norm, ffn_norm, q_norm, k_norm; attn and
    mlp: the sub-blocks); None where this layer has none (q_norm outside Qwen3)."""
    layer = unwrap(layer)
    path = dict(family(layer).layout.parts).get(role)
    try:
        return None if path is None else layer.get_submodule(path)
    except AttributeError:
        return None


def set_part(layer: torch.nn.Module, role: str, new: torch.nn.Module) -> None:
    layer = unwrap(layer)
    _set(layer, family(layer).layout.path(role), new)


def experts(layer: torch.nn.Module) -> torch.nn.Module | None:
    """A mixture-of-experts layer's experts module (split.SplitExperts: gate_proj/up_proj/down_proj stacks, act_fn,
    observer), None in a dense layer."""
    layer = unwrap(layer)
    spec = family(layer)
    return layer.get_submodule(spec.layout.path("gate_exps").rsplit(".", 1)[0]) if spec.moe else None


def expert_hidden(layer: torch.nn.Module, j: int, x: torch.Tensor) -> torch.Tensor:
    """The input of expert j's down projection for its input rows x: act(gate_j x) * up_j x."""
    g, u = part(layer, "gate_exps").weight[j], part(layer, "up_exps").weight[j]
    return experts(layer).act_fn(torch.nn.functional.linear(x, g)) * torch.nn.functional.linear(x, u)


def keep_experts(layer: torch.nn.Module, keep: torch.Tensor) -> None:
    """Keep experts `keep` (sorted indices) of a mixture-of-experts layer: their router rows and stacks."""
    ex, router = experts(layer), part(layer, "router")
    router.weight = torch.nn.Parameter(router.weight.data[keep].contiguous(), requires_grad=False)
    router.num_experts = int(keep.numel())
    for lin in (part(layer, r) for r in EXPERT_ROLES):
        lin.weight = torch.nn.Parameter(lin.weight.data[keep].contiguous(), requires_grad=False)
    ex.num_experts = int(keep.numel())


def attention_kind(layer: torch.nn.Module) -> str:
    """The layer's attention kind (config layer_types: full_attention, or sliding_attention with its own mask and
    rope), as transformers' attention module records it."""
    return getattr(part(layer, "attn"), "layer_type", None) or FULL


def layer_kwargs(kw: dict, layer: torch.nn.Module) -> dict:
    """A layer's keyword arguments from a map attention kind -> kwargs (sequential.replay_inputs)."""
    return kw[attention_kind(layer)]


def hidden_norms(layer: torch.nn.Module) -> list[torch.nn.Module]:
    """The layer's norms over the residual stream (whose weights follow its channels)."""
    return [n for r in ("attn_norm", "ffn_norm", "attn_post_norm", "ffn_post_norm") if (n := part(layer, r)) is not None]


def hidden_readers(layer: torch.nn.Module) -> list[str]:
    """Roles of the linears that read the residual stream (their input columns follow its channels)."""
    return ["q", "k", "v", "gate", "up"]


def hidden_writers(layer: torch.nn.Module) -> list[str]:
    """Roles of the linears that write into the residual stream (output rows follow its channels)."""
    return ["o", "down"]


# A decoder layer as two residual sub-blocks, y = h + mlp_out(h) with h = x + attention_out(x): the layers of the
# families in families.py, whose forward is exactly this (tests/test_heal_stages.py, tests/test_families.py).
def attention_out(layer: torch.nn.Module, x: torch.Tensor, kw: dict) -> torch.Tensor:
    """What the attention sub-block adds to the residual stream x: the output projection's output (normed, in
    families with post norms); kw: a map attention kind -> keyword arguments (sequential.replay_inputs)."""
    y = part(layer, "attn")(hidden_states=part(layer, "attn_norm")(x), **layer_kwargs(kw, layer))[0]
    post = part(layer, "attn_post_norm")
    return y if post is None else post(y)


def mlp_out(layer: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    """What the MLP sub-block adds to the residual stream h: the down projection's output (normed, in families
    with post norms)."""
    y = part(layer, "mlp")(part(layer, "ffn_norm")(h))
    post = part(layer, "ffn_post_norm")
    return y if post is None else post(y)


def mlp_hidden(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The down projection's input for MLP input x (already normed): act(gate x) * up x."""
    g, u = part(layer, "gate"), part(layer, "up")
    return part(layer, "mlp").act_fn(torch.nn.functional.linear(x, g.weight, g.bias)) * \
        torch.nn.functional.linear(x, u.weight, u.bias)

