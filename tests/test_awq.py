"""AWQ: the scale search against llama.cpp's encoders, and the folding that leaves the float model's function
unchanged while the GGUF needs no extra operation."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from slimlm.quant.awq import awq_search

QT = gguf.GGMLQuantizationType


def test_search_never_scores_worse_than_plain_rounding_and_helps_with_salient_channels():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(4096, 128, generator=g)
    X[:, :4] *= 20                                           # a few salient input channels
    H = (X.T @ X).double() / X.shape[0]
    W = torch.randn(64, 128, generator=g) * 0.05
    r = awq_search([W, W[:32] * 2], [QT.Q4_0, QT.Q5_0], H, X.abs().mean(0))
    assert r.err <= r.err_plain and r.alpha > 0
    assert r.err < 0.9 * r.err_plain, (r.err, r.err_plain)
    assert torch.isclose(r.s.max() * r.s.min(), torch.tensor(1.0), rtol=1e-4)
    assert r.s[:4].min() > r.s[4:].max()                       # the salient channels are scaled up


@pytest.fixture(scope="module")
def tiny(tiny_hf):
    from slimlm import load
    return load(tiny_hf("LlamaForCausalLM", hidden_size=128, intermediate_size=256, num_attention_heads=4,
                        num_key_value_heads=2), progress=False)


def test_folded_scales_keep_the_float_function(tiny):
    from slimlm.calib import calibration_chunks
    from slimlm.gguf.writer import plan_model
    from slimlm.sequential import changed_module, quantize_model
    chunks, _ = calibration_chunks(tiny, None, n_ctx=64, max_chunks=4)
    _, _, types = plan_model(tiny, "Q4_0")
    enc, changed, st = quantize_model(tiny, chunks, types, gptq=False, awq=True, progress=False)
    mod = changed_module(tiny, changed)
    assert enc == {} and len(st["awq_groups"]) == 3 * 2                  # qkv, gate/up, down per layer
    assert any(g["alpha"] > 0 for g in st["awq_groups"])
    assert all(g["err"] <= g["err_plain"] for g in st["awq_groups"])
    assert any(not torch.allclose(s, torch.ones_like(s)) for s in st["awq_scales"].values())
    with torch.no_grad():
        a = tiny.module(input_ids=chunks[0][None]).logits
        b = mod(input_ids=chunks[0][None]).logits
    assert torch.allclose(a, b, atol=1e-4 * float(a.abs().max())), float((a - b).abs().max())
    norm0 = "model.layers.0.input_layernorm.weight"
    assert not torch.equal(mod.state_dict()[norm0], tiny.module.state_dict()[norm0])


def test_awq_gptq_file_decodes_to_the_torch_weights_and_runs_in_llama_cpp(tiny, tmp_path, llama_cpp_available):
    """awq+gptq through compress: every GPTQ'd tensor decodes exactly to the changed torch model's weights, the
    folded norms are in the file, and llama.cpp's logits follow the torch model's."""
    from slimlm import export_gguf
    from slimlm.calib import calibration_chunks
    from slimlm.eval.runtime import LlamaCppRunner
    from slimlm.gguf.reader import read_gguf
    from slimlm.gguf.writer import plan_model
    from slimlm.sequential import changed_module, quantize_model
    chunks, _ = calibration_chunks(tiny, None, n_ctx=64, max_chunks=4)
    _, _, types = plan_model(tiny, "Q4_K_M")
    enc, changed, st = quantize_model(tiny, chunks, types, gptq=True, awq=True, progress=False)
    mod = changed_module(tiny, changed)
    m2 = tiny.with_changes(changed)
    out = tmp_path / "a.gguf"
    export_gguf(m2, out, "Q4_K_M", progress=False, encoded=enc)
    g = read_gguf(out)
    sd = mod.state_dict()
    for t in g.tensors:
        hf = next(k for k in sd if tiny.spec.hf_to_gguf(k) == t.name)
        want = tiny.spec.to_gguf_tensor(hf, sd[hf], tiny.config).numpy()
        got = gguf.quants.dequantize(g.raw(t), t.ggml_type).reshape(want.shape)
        if t.name in enc or t.ggml_type == QT.F32:
            assert np.array_equal(got, want), t.name
    r = LlamaCppRunner(out, 64)
    try:
        got = r.logits(chunks[0])
    finally:
        r.close()
    with torch.no_grad():
        ref = mod(input_ids=chunks[0][None], use_cache=False).logits[0]
    assert torch.corrcoef(torch.stack([got.flatten(), ref.flatten()]))[0, 1] > 0.98


def test_compress_awq_writes_the_folded_model(tiny, tmp_path, llama_cpp_available):
    """--method awq through compress: the imatrix is rescaled for the scaled inputs, the file holds the folded
    norms, and it evaluates close to the original in llama.cpp."""
    from slimlm.compress import CompressConfig, compress
    from slimlm.gguf.reader import read_gguf
    cfg = CompressConfig(type="Q8_0", method="awq", calib="default", calib_chunks=2, n_ctx=64, max_chunks=2,
                         speed=False)
    rep = compress(tiny.source, tmp_path / "a.gguf", cfg, progress=False)
    step = next(s for s in rep.steps if s["step"] == "awq")
    assert step["awq_scaled_tensors"] == 2 * 6 and step["tensors"] == 0          # scaled, not GPTQ'd
    g = read_gguf(tmp_path / "a.gguf")
    t = g.tensor("blk.0.attn_norm.weight")
    norm = gguf.quants.dequantize(g.raw(t), t.ggml_type).reshape(-1)
    assert not np.allclose(norm, tiny.module.state_dict()["model.layers.0.input_layernorm.weight"].numpy())
    assert rep.evaluation["kld"] < 0.05
