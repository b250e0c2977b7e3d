"""GGUF export of tiny random models of every supported family: tensors, metadata, and llama.cpp parity."""
from __future__ import annotations

import struct

import gguf
import numpy as np
import pytest
import torch
from helpers import ARCH_EXTRA, SAMPLE_TOKENS, llama_cpp_logits

from slimlm import export_gguf, load
from slimlm.errors import ConfigError, OutputError
from slimlm.eval.runtime import LlamaCppRunner
from slimlm.gguf.reader import read_gguf

ARCHS = list(ARCH_EXTRA)
LEGACY = ["F16", "BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0"]


@pytest.mark.parametrize("arch", ARCHS)
def test_f32_export_is_exact_and_matches_llama_cpp(tiny_hf, tmp_path, arch, llama_cpp_available):
    m = load(tiny_hf(arch))
    out = tmp_path / "m.gguf"
    # transformers 5 gives Qwen models their own tokenizer class (Qwen2's pre-tokenizer over SmolLM2's
    # vocabulary here): its hash is unknown to llama.cpp, so slimlm refuses unless one is named
    pre = "qwen2" if arch.startswith("Qwen") else None
    rec = export_gguf(m, out, "F32", progress=False, pre_tokenizer=pre)
    g = read_gguf(out)
    assert g.architecture == m.spec.gguf_arch
    assert g.get(f"{g.architecture}.block_count") == 2
    assert g.get("tokenizer.ggml.pre") == (pre or "smollm")
    sd = m.spec.to_checkpoint(m.named_weights(), unstack=False)   # Phi-3's q/k/v and gate/up joined, as the GGUF
    for hf_name, W in sd.items():
        if hf_name == m.spec.output_name and m.config.get("tie_word_embeddings"):
            continue
        t = g.tensor(m.spec.hf_to_gguf(hf_name))
        got = gguf.quants.dequantize(np.asarray(g.raw(t)), t.ggml_type).reshape(t.shape)
        assert np.array_equal(got, m.spec.to_gguf_tensor(hf_name, W, m.config).numpy()), hf_name
    assert rec.fallbacks == [] and rec.n_params == m.n_params()      # a tied output projection counted once
    # llama.cpp runs the file and gives torch's logits
    tokens = torch.tensor(SAMPLE_TOKENS)
    ref = m.logits(tokens[None])[0]
    got = llama_cpp_logits(out, tokens)
    rel = float((got - ref).abs().max() / ref.abs().max())
    # Gemma: embedding x sqrt(hidden), a residual stream ~8x larger, so llama.cpp's F16 KV cache rounds more
    assert rel < (5e-3 if m.spec.embed_scale else 1e-3), f"{arch}: max relative logit error {rel:.2e}"


@pytest.mark.parametrize("qtype", LEGACY)
def test_legacy_types_bit_exact_with_gguf_py(tiny_hf, tmp_path, qtype, llama_cpp_available):
    m = load(tiny_hf("LlamaForCausalLM", tie=True))
    out = tmp_path / f"m-{qtype}.gguf"
    rec = export_gguf(m, out, qtype, progress=False)
    g = read_gguf(out)
    types = {t.name: t.ggml_type.name for t in g.tensors}
    assert "output.weight" not in types  # tied embedding written once
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert types["blk.1.ffn_down.weight"] == qtype
    expect_out = qtype if qtype in ("F16", "BF16", "Q8_0") else "Q8_0"
    assert types["token_embd.weight"] == expect_out
    W = m.named_weights()["model.layers.1.mlp.down_proj.weight"].numpy()
    t = g.tensor("blk.1.ffn_down.weight")
    want = gguf.quants.quantize(W, gguf.GGMLQuantizationType[qtype]) if qtype != "F16" else W.astype(np.float16)
    assert np.asarray(g.raw(t)).tobytes() == np.ascontiguousarray(want).tobytes()
    assert rec.file_bytes == out.stat().st_size
    assert g.get("general.file_type") == int(gguf.LlamaFileType[f"MOSTLY_{qtype}"])
    r = LlamaCppRunner(out, 64)
    try:
        assert torch.isfinite(r.logits(torch.arange(1, 17))).all()
    finally:
        r.close()


def test_fallback_for_row_lengths():
    """A row length that does not fit the block goes to the first fitting fallback (F16 for legacy types)."""
    from slimlm.formats import FORMATS, fallback_for
    assert fallback_for(FORMATS["q4_0"], 48) is FORMATS["f16"]
    assert fallback_for(FORMATS["q4_0"], 64) is FORMATS["q4_0"]
    assert fallback_for(FORMATS["f16"], 7) is FORMATS["f16"]


def test_unknown_pre_tokenizer_refused(tiny_hf, tmp_path):
    from slimlm.errors import InvalidModelError
    m = load(tiny_hf("Qwen2ForCausalLM"))
    with pytest.raises(InvalidModelError, match="pre-tokenizer is not one llama.cpp knows"):
        export_gguf(m, tmp_path / "x.gguf", "F32", progress=False)
    with pytest.raises(InvalidModelError, match="known: "):
        export_gguf(m, tmp_path / "x.gguf", "F32", progress=False, pre_tokenizer="made-up")
    assert list(tmp_path.iterdir()) == []


def test_unknown_type_lists_valid(tiny_hf, tmp_path):
    m = load(tiny_hf("LlamaForCausalLM"))
    with pytest.raises(ConfigError, match="valid types: F32, F16, BF16, Q8_0"):
        export_gguf(m, tmp_path / "x.gguf", "Q4_K_X")
    assert not (tmp_path / "x.gguf").exists()


def test_output_equal_to_input_refused(tmp_path, tiny_hf):
    m = load(tiny_hf("LlamaForCausalLM"))
    src = tmp_path / "src.gguf"
    export_gguf(m, src, "Q8_0", progress=False)
    g_model = load(src)
    before = src.read_bytes()
    link = tmp_path / "hard.gguf"
    link.hardlink_to(src)
    sym = tmp_path / "sym.gguf"
    sym.symlink_to(src)
    for target in (src, link, sym):
        with pytest.raises(OutputError, match="is the input"):
            export_gguf(g_model, target, "F32", overwrite=True, progress=False)
    assert src.read_bytes() == before


def test_same_inputs_give_identical_bytes(tiny_hf, tmp_path):
    m = load(tiny_hf("Qwen2ForCausalLM"))
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    export_gguf(m, a, "Q4_0", progress=False, pre_tokenizer="qwen2")
    export_gguf(m, b, "Q4_0", progress=False, pre_tokenizer="qwen2")
    assert a.read_bytes() == b.read_bytes()


def test_gguf_to_gguf_round_trip_tiny(tiny_hf, tmp_path):
    """HF -> GGUF F32 -> load through transformers -> GGUF F32 gives back the same tensors and tokenizer."""
    m = load(tiny_hf("LlamaForCausalLM"))
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    export_gguf(m, a, "F32", progress=False)
    export_gguf(load(a), b, "F32", progress=False)
    ga, gb = read_gguf(a), read_gguf(b)
    for t in ga.tensors:
        assert np.asarray(ga.raw(t)).tobytes() == np.asarray(gb.raw(gb.tensor(t.name))).tobytes(), t.name
    for k, f in ga.fields.items():
        if k.startswith("tokenizer."):
            v, w = f.value, gb.fields[k].value
            assert (np.array_equal(v, w) if isinstance(v, np.ndarray) else v == w), k


@pytest.mark.parametrize("qtype", LEGACY)
def test_zero_rows_encode_to_exact_zeros(qtype):
    from slimlm.formats import get_format
    from slimlm.gguf.writer import encode
    fmt = get_format(qtype)
    x = np.zeros((3, 64), dtype=np.float32)
    x[1] = np.linspace(-1, 1, 64)
    q = encode(x, fmt, "t")
    y = q.astype(np.float32) if qtype == "F16" else gguf.quants.dequantize(q, fmt.ggml_type)
    assert np.isfinite(y).all() and (y[0] == 0).all() and (y[2] == 0).all()


def test_f16_overflow_is_refused_and_bad_scale_is_named():
    from slimlm.errors import NumericsError
    from slimlm.formats import get_format
    from slimlm.gguf.writer import check_tensor_finite, encode
    x = np.ones((2, 32), dtype=np.float32)
    x[1, 3] = 1e6
    with pytest.raises(NumericsError, match="beyond F16's range"):
        encode(x, get_format("F16"), "blk.0.ffn_up.weight")
    q = encode(np.ones((2, 64), dtype=np.float32), get_format("Q8_0"), "t")
    q[1, 34:36] = np.frombuffer(np.float16(np.inf).tobytes(), dtype=np.uint8)  # scale of block 3
    with pytest.raises(NumericsError, match=r"blk\.0\.attn_q\.weight .*\(block 3\)"):
        check_tensor_finite(q, gguf.GGMLQuantizationType.Q8_0, (2, 64), "blk.0.attn_q.weight")


def test_bulk_metadata_packing_is_byte_identical_to_gguf_py():
    from slimlm.gguf.writer import Writer
    V = gguf.GGUFValueType
    base, ours = gguf.GGUFWriter("/dev/null", "llama"), Writer("/dev/null", "llama")
    cases = [(["a", "é", "", "<|im_start|>", "Ġthe"], None), ([1, -2, 3], V.INT32), ([0.5, -1e-3, 3.14159], V.FLOAT32),
             ([7, 8], V.UINT32), ([1.5, 2.5], None), (["x"], V.STRING),
             ([True, False], None), ([1, 2], V.UINT8)]
    for val, sub in cases:
        assert ours._pack_val(val, V.ARRAY, True, sub) == base._pack_val(val, V.ARRAY, True, sub), (val, sub)
    with pytest.raises(struct.error):  # out of range still refused, as gguf-py does
        ours._pack_val([2**40], V.ARRAY, True, V.INT32)
