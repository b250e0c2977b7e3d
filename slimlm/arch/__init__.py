"""Model-family knowledge: the ONLY place that knows model families and their module paths.

Every other module asks it: `ArchSpec` for tensor names (HF <-> GGUF, mirroring llama.cpp's
`gguf-py/gguf/tensor_mapping.py`), shapes and GGUF facts (`spec.py`, families in `families.py`), and the
functions of `modules.py` for a loaded transformers model (its layers, a layer's q/k/v/o, gate/up/down and
norms by role, the sub-blocks' forward). tests/test_families.py greps the rest of the package for module
paths and family names.
"""
from .families import (
    ARCHS,
    EXTRA_GGUF_ARCH_PREFIXES,
    FULL,
    GGUF_ARCHS,
    GGUF_TOKENIZER_MODELS,
    ROPE_TYPES,
    SLIDING,
    SPM_TOKENIZER,
    check_rope,
    get_arch,
    gguf_config_overrides,
    is_70b,
    llama3_rope_factors,
    rope_freqs,
    rope_parameters,
    sliding_layer_config,
    spec_for_gguf,
)
from .modules import (
    attention_kind,
    attention_out,
    decoder_layers,
    embedding,
    expert_hidden,
    experts,
    family,
    final_norm,
    hidden_norms,
    hidden_readers,
    hidden_writers,
    keep_experts,
    layer_kwargs,
    mlp_hidden,
    mlp_out,
    part,
    prepare,
    set_decoder_layers,
    set_part,
    unwrap,
)
from .spec import (
    EXPERT_ROLES,
    PER_LAYER,
    PER_LAYER_FIELDS,
    ArchSpec,
    Layout,
    gguf_arch,
    layer_dims,
    n_experts,
)

__all__ = ["ARCHS", "EXPERT_ROLES", "ArchSpec", "EXTRA_GGUF_ARCH_PREFIXES", "FULL", "GGUF_ARCHS", "GGUF_TOKENIZER_MODELS", "Layout",
           "PER_LAYER", "PER_LAYER_FIELDS", "ROPE_TYPES", "SLIDING", "SPM_TOKENIZER", "attention_kind",
           "attention_out", "check_rope", "decoder_layers", "embedding", "expert_hidden", "experts", "family", "final_norm", "get_arch",
           "gguf_arch", "gguf_config_overrides", "hidden_norms", "hidden_readers", "hidden_writers", "is_70b", "keep_experts",
           "layer_dims", "layer_kwargs", "n_experts", "llama3_rope_factors", "mlp_hidden", "mlp_out", "part", "prepare", "rope_freqs",
           "rope_parameters", "set_decoder_layers", "set_part", "sliding_layer_config", "spec_for_gguf", "unwrap"]
