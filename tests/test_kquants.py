"""Our encoders (K-quants, IQ4_NL/IQ4_XS, Q8_0 and the legacy types, plain and importance-weighted) against
llama.cpp's own (ggml_quantize_chunk through ctypes): every block must be byte-identical (the README's
"Formats and rules" claim; no tolerance, so any difference fails)."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from slimlm import export_gguf, load
from slimlm.eval.runtime import LlamaCppRunner
from slimlm.gguf.reader import read_gguf
from slimlm.quant import ENCODERS

T = gguf.GGMLQuantizationType
KTYPES = [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_XS]      # 256-weight super-blocks
ALL = KTYPES + [T.IQ4_NL, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]


def _differing_blocks(ours: np.ndarray, ref: np.ndarray, qtype) -> int:
    """How many blocks differ in any byte (the shapes must already agree)."""
    bs = gguf.GGML_QUANT_SIZES[qtype][1]
    assert ours.shape == ref.shape and ours.dtype == ref.dtype == np.uint8
    return int((ours.reshape(-1, bs) != ref.reshape(-1, bs)).any(1).sum())


def _test_tensor(seed=0, rows=12, cols=768):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, cols)) * 0.03).astype(np.float32)
    x[1] = 0                                  # a zero row
    x[2, :256] = 0                            # a zero super-block
    x[3, 5] = 4.0                             # outliers
    x[4, 300:320] *= 50
    x[5] = np.abs(x[5])                       # all positive (min clamps to 0)
    x[6] = -np.abs(x[6])                      # all negative
    return x


@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "imatrix"])
def test_bytes_identical_to_llama_cpp_on_random_tensors(qtype, weighted, llama_cpp_available):
    """A tensor with zero rows, a zero super-block, outliers and one-signed rows, and an ordinary one (64 x
    1024): every block byte-identical to llama.cpp's (Q8_0 has no weighted variant: both ignore the imatrix)."""
    from slimlm.quant.ggml_ref import ggml_quantize
    edge = _test_tensor()
    typical = (np.random.default_rng(3).standard_normal((64, 1024)) * 0.02).astype(np.float32)
    imats = ((np.random.default_rng(1).random(edge.shape[1]) ** 2 * 5).astype(np.float32),
             np.random.default_rng(4).gamma(0.5, 2, 1024).astype(np.float32))
    for x, imat in zip((edge, typical), imats, strict=True):
        w = imat if weighted else None
        ours = ENCODERS[qtype](x, w)
        assert _differing_blocks(ours, ggml_quantize(x, qtype, w), qtype) == 0
    y = gguf.quants.dequantize(ENCODERS[qtype](edge, imats[0] if weighted else None), qtype)
    assert np.isfinite(y).all() and (y[1] == 0).all() and (y[2, :256] == 0).all()


def test_row_length_and_importance_must_fit():
    with pytest.raises(ValueError, match="multiple of 256"):
        ENCODERS[T.Q4_K](np.zeros((2, 576), np.float32), None)
    with pytest.raises(ValueError, match="multiple of 32"):
        ENCODERS[T.IQ4_NL](np.zeros((2, 48), np.float32), None)
    with pytest.raises(ValueError, match="importance has 100 values"):
        ENCODERS[T.Q3_K](np.zeros((2, 256), np.float32), np.ones(100, np.float32))
    with pytest.raises(ValueError, match="NaN"):
        ENCODERS[T.Q5_1](np.zeros((2, 256), np.float32), np.full(256, np.nan, np.float32))


@pytest.mark.parametrize("preset,qtype", [("Q4_K_S", "Q4_K"), ("Q5_K_S", "Q5_K"), ("Q6_K", "Q6_K"),
                                          ("Q3_K_S", "Q3_K"), ("Q2_K", "Q2_K"), ("IQ4_XS", "IQ4_XS"),
                                          ("IQ4_NL", "IQ4_NL")])
def test_k_quant_export_runs_in_llama_cpp(tiny_hf, tmp_path, preset, qtype, llama_cpp_available):
    m = load(tiny_hf("LlamaForCausalLM", hidden_size=256, intermediate_size=512, num_attention_heads=4,
                     num_key_value_heads=2))
    out = tmp_path / "k.gguf"
    rec = export_gguf(m, out, preset, progress=False)
    types = {t.name: t.ggml_type.name for t in read_gguf(out).tensors}
    assert types["blk.0.attn_q.weight"] == qtype
    assert types["blk.1.ffn_down.weight"] == ("Q3_K" if preset == "Q2_K" else qtype)  # Q2_K's ffn_down rule
    assert rec.fallbacks == []
    # llama.cpp's own quantizer on the same weights writes the same tensor bytes
    from slimlm.eval.runtime import llama_cpp_quantize
    export_gguf(m, tmp_path / "f32.gguf", "F32", progress=False)
    llama_cpp_quantize(tmp_path / "f32.gguf", tmp_path / "lc.gguf", preset)
    ours_g, theirs_g = read_gguf(out), read_gguf(tmp_path / "lc.gguf")
    theirs_t = {t.name: t for t in theirs_g.tensors}
    for t in ours_g.tensors:
        assert t.ggml_type == theirs_t[t.name].ggml_type
        assert np.array_equal(ours_g.raw(t), theirs_g.raw(theirs_t[t.name])), t.name
    tokens = torch.arange(100, 164)
    r = LlamaCppRunner(out, 64)
    try:
        got = r.logits(tokens)
    finally:
        r.close()
    ref = m.logits(tokens[None])[0]
    assert torch.isfinite(got).all()
    # quantization noise only: logits stay strongly correlated with the float model's
    corr = float(torch.corrcoef(torch.stack([got.flatten(), ref.flatten()]))[0, 1])
    # on random weights: 0.72 at Q2_K (2.6 bits), 0.86 at Q3_K_S; the bytes equal llama.cpp's either way
    assert corr > {"Q2_K": 0.65, "Q3_K_S": 0.8}.get(preset, 0.9), corr


def test_k_quant_fallback_is_reported(tiny_hf, tmp_path):
    m = load(tiny_hf("LlamaForCausalLM"))  # hidden 64: no row fits a 256-block
    rec = export_gguf(m, tmp_path / "f.gguf", "Q4_K_S", progress=False)
    fb = dict(f.split(": ", 1) for f in rec.fallbacks)
    assert fb["blk.0.attn_q.weight"].endswith("Q4_K's block 256: Q5_0")
    assert fb["blk.0.attn_v.weight"].endswith("Q5_K's block 256: Q5_1")     # Q4_K_S's attn_v rule first
    assert "output.weight" not in fb  # the output rule itself picks Q8_0 when the row does not fit
    assert {r.name: r.type for r in rec.tensors}["output.weight"] == "Q8_0"
    assert len(fb) == 2 * 7 + 1  # every block linear and token_embd
    # `inspect` recovers the same list from the file alone (llama.cpp's rules re-planned from its metadata)
    from slimlm.gguf.inspect import describe
    d = describe(tmp_path / "f.gguf")
    assert d["preset"] == "Q4_K_S" and sorted(d["fallbacks"]) == sorted(rec.fallbacks)
    assert {t["name"]: t["note"] for t in d["tensors"]}["output.weight"].startswith("output projection")


@pytest.fixture(scope="module")
def smollm2_weights(smollm2) -> list[np.ndarray]:
    """Every 2-D SmolLM2 weight as exported (converted once for all types)."""
    from slimlm.gguf.writer import _gguf_tensors
    return [W.numpy() for _, _, W in _gguf_tensors(smollm2) if W.ndim == 2]


@pytest.mark.slow
@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
def test_smollm2_every_tensor_bytes_identical_to_llama_cpp(smollm2_weights, qtype, llama_cpp_available):
    """Every SmolLM2 weight the type accepts, as exported (256-blocks: the 30 ffn_down, whole; 32-blocks:
    all 211, every 8th row to bound the time), plain and importance-weighted (Q8_0: plain only, llama.cpp
    has no weighted variant): every block byte-identical to llama.cpp's."""
    from slimlm.quant.ggml_ref import ggml_quantize
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    mats = [x if block == 256 else x[::8] for x in smollm2_weights if x.shape[1] % block == 0]
    assert len(mats) == (30 if block == 256 else 211)
    rng = np.random.default_rng(0)
    differing, n_blocks = {}, 0
    for i, x in enumerate(mats):
        imat = rng.gamma(0.5, 2, x.shape[1]).astype(np.float32)
        for w in ((None,) if qtype == T.Q8_0 else (None, imat)):
            ours = ENCODERS[qtype](x, w)
            n_blocks += ours.size // gguf.GGML_QUANT_SIZES[qtype][1]
            if n := _differing_blocks(ours, ggml_quantize(x, qtype, w), qtype):
                differing[(i, w is not None)] = n
    assert n_blocks == (30 * 2 * 3456 if block == 256 else (1 if qtype == T.Q8_0 else 2) * 525312)
    assert differing == {}, f"(tensor, imatrix) -> differing blocks, of {n_blocks}: {differing}"
