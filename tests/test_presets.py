"""llama.cpp's presets: slimlm's per-tensor type plan equals what llama_model_quantize chooses."""
from __future__ import annotations

import numpy as np
import pytest

from slimlm import export_gguf, load
from slimlm.gguf.reader import read_gguf
from slimlm.presets import PRESETS, get_preset, plan_types, use_more_bits
from slimlm.quant.imatrix import ImportanceMatrix

DEEP = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
            num_hidden_layers=16)
QUANTIZED = [p.name for p in PRESETS.values() if p.default not in ("f32", "f16", "bf16")]


def test_use_more_bits_pattern():
    assert [i for i in range(16) if use_more_bits(i, 16)] == [0, 1, 4, 7, 10, 13, 14, 15]


# presets whose llama.cpp rules depend on having an importance matrix / on n_head / n_head_kv
IMATRIX_RULES = ("Q4_0", "Q5_0", "IQ4_NL", "IQ4_XS")
GQA_RULES = ("Q2_K", "IQ4_NL", "IQ4_XS")
VARIANTS = {"untied": dict(tie=False), "tied": dict(tie=True),
            "gqa4": dict(tie=False, num_attention_heads=4, num_key_value_heads=1)}  # n_head/n_head_kv rules


@pytest.fixture(scope="module")
def deep_f32(tiny_hf, tmp_path_factory):
    out = {}
    for name, kw in VARIANTS.items():
        m = load(tiny_hf("LlamaForCausalLM", **{**DEEP, **kw}))
        p = tmp_path_factory.mktemp("deep") / f"f32-{name}.gguf"
        export_gguf(m, p, "F32", progress=False)
        out[name] = p
    return out


def _imatrix(g) -> ImportanceMatrix:
    im = ImportanceMatrix(chunk_count=1, chunk_size=1)
    rng = np.random.default_rng(0)
    for t in g.tensors:
        if t.name.startswith("blk.") and len(t.shape) == 2:
            im.add(t.name, rng.random(t.shape[1]) + 0.1, 1)
    return im


@pytest.mark.slow
@pytest.mark.parametrize("variant,with_imatrix", [("untied", False), ("tied", False), ("gqa4", False),
                                                  ("untied", True)], ids=["untied", "tied", "gqa4", "imatrix"])
@pytest.mark.parametrize("preset", QUANTIZED)
def test_plan_matches_llama_cpp(deep_f32, tmp_path, preset, variant, with_imatrix, llama_cpp_available):
    from slimlm.eval.runtime import llama_cpp_quantize
    if with_imatrix and preset not in IMATRIX_RULES:
        pytest.skip("no rule of this preset depends on an importance matrix")
    if variant == "gqa4" and preset not in GQA_RULES:
        pytest.skip("no rule of this preset depends on n_head / n_head_kv")
    src = read_gguf(deep_f32[variant])
    tie, kw = VARIANTS[variant]["tie"], {**DEEP, **VARIANTS[variant]}
    im = _imatrix(src) if with_imatrix else None
    out = tmp_path / "lc.gguf"
    llama_cpp_quantize(deep_f32[variant], out, preset, imatrix=im)
    theirs = {t.name: t.ggml_type.name for t in read_gguf(out).tensors}
    # in lexicographic name order (blk.0, blk.1, blk.10, ...), as many GGUF files list them: the plan must
    # follow llama.cpp's (layer, name) visiting order regardless
    plan = plan_types(sorted((t.name, t.shape) for t in src.tensors), get_preset(preset), n_layer=16, tied=tie,
                      has_imatrix=with_imatrix, n_head=kw["num_attention_heads"], n_head_kv=kw["num_key_value_heads"])
    ours = {n: f.name for n, (f, _) in plan.items()}
    assert ours == theirs
    assert read_gguf(out).get("general.file_type") == int(get_preset(preset).file_type)


def test_pure_and_small_rows():
    tensors = [("token_embd.weight", (100, 576)), ("blk.0.attn_v.weight", (192, 576)),
               ("blk.0.ffn_down.weight", (576, 1536)), ("blk.0.attn_norm.weight", (576,))]
    plan = plan_types(tensors, get_preset("Q4_K_M"), n_layer=1, tied=True)
    assert plan["token_embd.weight"][0].name == "Q8_0"       # output projection, 576 does not fit Q6_K
    assert plan["blk.0.attn_v.weight"][0].name == "Q8_0"     # Q6_K (more bits) -> fallback Q8_0
    assert plan["blk.0.ffn_down.weight"][0].name == "Q6_K"   # 1536 fits
    assert plan["blk.0.attn_norm.weight"][0].name == "F32"
    pure = plan_types(tensors, get_preset("Q4_K_M"), n_layer=1, tied=True, pure=True)
    assert pure["blk.0.ffn_down.weight"][0].name == "Q4_K" and pure["blk.0.attn_v.weight"][0].name == "Q5_0"


@pytest.fixture(scope="module")
def deep_phi3_f32(tiny_hf, tmp_path_factory):
    m = load(tiny_hf("Phi3ForCausalLM", **DEEP), progress=False)
    p = tmp_path_factory.mktemp("deep_phi3") / "f32.gguf"
    export_gguf(m, p, "F32", progress=False)
    return p


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["Q2_K", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_M", "IQ4_XS"])
def test_plan_of_fused_tensors_matches_llama_cpp(deep_phi3_f32, tmp_path, preset, llama_cpp_available):
    """Phi-3's fused attn_qkv takes llama.cpp's attn_v rules (its category_is_attn_v), its 2 x n_ff ffn_up the
    ffn_up ones: the plan equals llama_model_quantize's on the presets whose attn_v rules differ."""
    from slimlm.eval.runtime import llama_cpp_quantize
    src = read_gguf(deep_phi3_f32)
    out = tmp_path / "lc.gguf"
    llama_cpp_quantize(deep_phi3_f32, out, preset)
    theirs = {t.name: t.ggml_type.name for t in read_gguf(out).tensors}
    plan = plan_types([(t.name, t.shape) for t in src.tensors], get_preset(preset), n_layer=16, tied=False,
                      arch="phi3", n_head=DEEP["num_attention_heads"], n_head_kv=DEEP["num_key_value_heads"])
    assert {n: f.name for n, (f, _) in plan.items()} == theirs
    assert "blk.0.attn_qkv.weight" in theirs
