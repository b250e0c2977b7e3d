"""Checks that a structured-pruning plan gives a file its runtime loads (llama.cpp for a GGUF, transformers for an
HF folder), made before any pruning work, and the architecture a written output states."""
from __future__ import annotations

from pathlib import Path

from ..arch import ARCHS, PER_LAYER
from ..errors import ConfigError
from .structured import Plan, planned_config


def check_gguf_plan(cfg: dict, plan: Plan, what: str = "this plan") -> None:
    """Refuse a plan whose GGUF llama.cpp cannot load: for the families whose loader sizes the query projection
    n_embd x n_embd (ArchSpec.attn_width_is_hidden) the query heads x head_dim must stay equal to the hidden size."""
    spec = ARCHS.get((cfg.get("architectures") or [None])[0])
    if spec is None:
        return
    new = planned_config(cfg, plan)
    q = cfg.get("query_pre_attn_scalar")
    if spec.layer_types and q is not None and spec.attn_scalar(new) != q:
        raise ConfigError(f"{what}: llama.cpp's {spec.gguf_arch} graph would scale the pruned model's attention by "
                          f"1/sqrt({spec.attn_scalar(new)}) instead of 1/sqrt({q}) (it depends on the layer count); "
                          f"drop a different number of layers or write an HF folder")
    if not spec.attn_width_is_hidden:
        return
    nh, hd, h = new["num_attention_heads"], new["head_dim"], new["hidden_size"]
    if nh * hd != h:
        raise ConfigError(f"{what}: llama.cpp's {spec.gguf_arch} arch needs query heads x head_dim = hidden size, "
                          f"this gives {nh} x {hd} = {nh * hd} for hidden {h}; keep every query head (no --heads, "
                          f"no --method width) or write an HF folder")


def check_hidden(cfg: dict) -> None:
    """Refuse to shrink the residual stream of a family whose embedding is scaled by sqrt(hidden size) in both
    runtimes: the scale would change with the width."""
    spec = ARCHS.get((cfg.get("architectures") or [None])[0])
    if spec is not None and spec.embed_scale:
        raise ConfigError(f"--hidden: {spec.hf_arch} scales its embedding by sqrt(hidden size), which would change "
                          f"with the width; prune MLP neurons, heads or layers instead")


def check_hf_plan(m, plan: Plan, what: str = "this plan") -> None:
    """Refuse a plan whose HF folder transformers would not load: its config class validates the planned config
    (e.g. a hidden size that is no multiple of the query heads) before any pruning work or file."""
    new = {k: v for k, v in planned_config(m.config, plan).items() if k != PER_LAYER}
    try:
        type(m.module.config).from_dict(new)
    except Exception as e:     # transformers' validators raise ValueError or huggingface_hub's wrapper of one
        cause = e.__cause__ or e
        msg = " ".join(str(cause).split())
        raise ConfigError(f"{what}: transformers would not load the HF folder: {msg}") from None


def per_layer_ok(cfg: dict) -> bool:
    """Whether the model's family can take per-layer MLP widths (llama.cpp has a per-layer arch for it)."""
    spec = ARCHS.get((cfg.get("architectures") or [None])[0])
    return spec is not None and spec.per_layer_arch is not None


def written_arch(out: str | Path) -> str:
    """The architecture the written output states: a GGUF's general.architecture (llama.cpp's name, `deci` for
    per-layer widths), an HF folder's config.json architectures[0]."""
    out = Path(out)
    if out.suffix == ".gguf":
        from ..gguf.reader import read_gguf
        return read_gguf(out).architecture
    from ..hf import load_json
    archs = load_json(out / "config.json").get("architectures") or ["?"]
    return str(archs[0])
