"""Fused linears split in memory (ArchSpec.fused): Phi-3 holds q/k/v as one `qkv_proj` and gate/up as one
`gate_up_proj`. slimlm's passes work on linears by role (a head's rows of q, k and v; a neuron's rows of gate and
up; AWQ's scale groups; GPTQ per linear), so on load each fused linear becomes its parts, in Llama's layout, and
the attention and MLP modules compute exactly what transformers' fused ones do (tests/test_families.py: the
logits are bit-identical). The checkpoint and the GGUF get the fused tensors back (ArchSpec.to_checkpoint, the
GGUF writer): a fused tensor's rows are its parts' rows in order, so each part's GGUF blocks are the fused
tensor's blocks (llama.cpp's blocks run along a row)."""
from __future__ import annotations

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.phi3 import modeling_phi3 as phi3


class Phi3SplitAttention(phi3.Phi3Attention):
    """Phi3Attention with q_proj, k_proj and v_proj in place of qkv_proj; the widths come from the linears (a
    pruned layer's heads), not from the config."""

    def forward(self, hidden_states, position_embeddings, attention_mask, cache=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        shape = (*input_shape, -1, self.head_dim)
        q, k, v = (lin(hidden_states).view(shape).transpose(1, 2) for lin in (self.q_proj, self.k_proj, self.v_proj))
        q, k = phi3.apply_rotary_pos_emb(q, k, *position_embeddings)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, phi3.eager_attention_forward)
        out, weights = attend(self, q, k, v, attention_mask, dropout=0.0 if not self.training else
                              self.attention_dropout, scaling=self.scaling,
                              sliding_window=getattr(self.config, "sliding_window", None), **kwargs)
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


class Phi3SplitMLP(phi3.Phi3MLP):
    """Phi3MLP with gate_proj and up_proj in place of gate_up_proj: down(act(gate x) * up x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


# the class each fused module becomes, and the names of its parts (row order of the fused weight)
_SPLIT = {phi3.Phi3Attention: (Phi3SplitAttention, "qkv_proj", ("q_proj", "k_proj", "v_proj")),
          phi3.Phi3MLP: (Phi3SplitMLP, "gate_up_proj", ("gate_proj", "up_proj"))}


def _linear(W: torch.Tensor, b: torch.Tensor | None) -> torch.nn.Linear:
    """A linear holding copies of W and b (built on the meta device: no random init of a weight replaced at once)."""
    out = torch.nn.Linear(W.shape[1], W.shape[0], bias=b is not None, dtype=W.dtype, device="meta")
    out.weight = torch.nn.Parameter(W.clone(), requires_grad=False)
    if b is not None:
        out.bias = torch.nn.Parameter(b.clone(), requires_grad=False)
    return out


def split_fused(module: torch.nn.Module) -> None:
    """Split every fused linear of a loaded model into its parts (in place)."""
    for m in list(module.modules()):
        kind = _SPLIT.get(type(m))
        if kind is None:
            continue
        cls, fused_name, names = kind
        fused = getattr(m, fused_name)
        if cls is Phi3SplitAttention:
            q = m.o_proj.in_features
            kv = (fused.out_features - q) // 2
            sizes = (q, kv, kv)
        else:
            sizes = (fused.out_features // 2,) * 2
            m.act_fn = m.activation_fn
        rows = torch.split(torch.arange(fused.out_features), sizes)
        for name, idx in zip(names, rows, strict=True):
            setattr(m, name, _linear(fused.weight.data[idx], None if fused.bias is None else fused.bias.data[idx]))
        delattr(m, fused_name)
        m.__class__ = cls


class StackedLinear(torch.nn.Module):
    """One linear per expert, stacked: weight (experts, out, in) -- llama.cpp's *_exps tensor."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(weight.contiguous(), requires_grad=False)


class SplitExperts(torch.nn.Module):
    """transformers' stacked experts (gate_up_proj: experts x 2I x H, gate rows first; down_proj) as three stacks,
    gate_proj, up_proj and down_proj; the same routing loop. `observer(j, x)`, when set, sees the input rows each
    expert j receives (calibration statistics)."""

    def __init__(self, experts: torch.nn.Module):
        super().__init__()
        gate, up = experts.gate_up_proj.data.chunk(2, dim=1)
        self.gate_proj, self.up_proj = StackedLinear(gate), StackedLinear(up)
        self.down_proj = StackedLinear(experts.down_proj.data)
        self.act_fn = experts.act_fn
        self.num_experts = gate.shape[0]
        self.observer = None

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        out = torch.zeros_like(hidden_states)
        for j in torch.unique(top_k_index).tolist():
            token, pos = torch.where(top_k_index == j)
            x = hidden_states[token]
            if self.observer is not None:
                self.observer(j, x)
            h = self.act_fn(torch.nn.functional.linear(x, self.gate_proj.weight[j])) * \
                torch.nn.functional.linear(x, self.up_proj.weight[j])
            y = torch.nn.functional.linear(h, self.down_proj.weight[j]) * top_k_weights[token, pos, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


def split_experts(module: torch.nn.Module) -> None:
    """Each stacked-experts module of a loaded mixture-of-experts model as three stacks (in place)."""
    for m in list(module.modules()):
        for name, child in list(m.named_children()):
            if hasattr(child, "gate_up_proj") and hasattr(child, "down_proj") and not isinstance(child, SplitExperts):
                setattr(m, name, SplitExperts(child))
