"""Importance matrix: closed-form check on a tiny model, llama.cpp file formats, use by both quantizers."""
from __future__ import annotations

import struct

import gguf
import numpy as np
import pytest
import torch

from slimlm import export_gguf, load
from slimlm.gguf.reader import read_gguf
from slimlm.quant import ENCODERS
from slimlm.quant.imatrix import ImportanceMatrix
from slimlm.sequential import block_linears, collect_imatrix

K_DIMS = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)


def test_imatrix_equals_direct_computation(tiny_hf):
    m = load(tiny_hf("LlamaForCausalLM"))
    chunks = torch.randint(0, 1000, (3, 24))
    im = collect_imatrix(m, chunks, dataset="random", progress=False)
    assert set(im.sums) == set(block_linears(m)) and len(im.sums) == 2 * 7
    # layer 0's q/k/v see RMSNorm(embeddings): compute that by hand
    emb = m.module.model.embed_tokens.weight[chunks.reshape(-1)].double()
    ln = m.module.model.layers[0].input_layernorm
    x = emb * torch.rsqrt(emb.pow(2).mean(-1, keepdim=True) + ln.variance_epsilon) * ln.weight.double()
    want = (x * x).sum(0).detach().numpy()
    for n in ("blk.0.attn_q.weight", "blk.0.attn_v.weight"):
        np.testing.assert_allclose(im.sums[n], want, rtol=1e-5)
        assert im.counts[n] == chunks.numel()
    np.testing.assert_allclose(im.importance("blk.0.attn_k.weight"), want / chunks.numel(), rtol=1e-5)
    assert im.importance("output.weight") is None


def test_gguf_round_trip_and_legacy_dat(tmp_path):
    rng = np.random.default_rng(0)
    im = ImportanceMatrix(datasets=["t.txt"], chunk_count=3, chunk_size=512)
    im.add("blk.0.ffn_down.weight", rng.random(512) * 100, 1536)
    im.add("blk.0.attn_q.weight", rng.random(256), 1536)
    p = im.save(tmp_path / "im.gguf")
    g = read_gguf(p)
    assert g.get("general.type") == "imatrix" and g.get("imatrix.chunk_count") == 3
    assert {t.name for t in g.tensors} >= {"blk.0.ffn_down.weight.in_sum2", "blk.0.ffn_down.weight.counts"}
    back = ImportanceMatrix.load(p)
    for n in im.sums:
        np.testing.assert_allclose(back.importance(n), im.importance(n), rtol=1e-6)
    # legacy .dat: sums hold mean * ncall
    vals = im.importance("blk.0.attn_q.weight") * 7
    raw = struct.pack("<i", 1) + struct.pack("<i", 19) + b"blk.0.attn_q.weight" + struct.pack("<ii", 7, 256)
    raw += vals.astype("<f4").tobytes() + struct.pack("<i", 3)
    (tmp_path / "im.dat").write_bytes(raw)
    leg = ImportanceMatrix.load(tmp_path / "im.dat")
    np.testing.assert_allclose(leg.importance("blk.0.attn_q.weight"), im.importance("blk.0.attn_q.weight"),
                               rtol=1e-6)
    (tmp_path / "bad.dat").write_bytes(raw[:40])
    from slimlm.errors import InvalidModelError
    with pytest.raises(InvalidModelError, match="legacy imatrix|beyond the file"):
        ImportanceMatrix.load(tmp_path / "bad.dat")


def test_same_imatrix_in_slimlm_and_llama_cpp(tiny_hf, tmp_path, llama_cpp_available):
    """Both quantizers take the same importance matrix and produce the same Q4_K tensor."""
    from slimlm.eval.runtime import llama_cpp_quantize
    m = load(tiny_hf("LlamaForCausalLM", **K_DIMS))
    im = collect_imatrix(m, torch.randint(0, 5000, (2, 64)), progress=False)
    im.save(tmp_path / "im.gguf")
    f32 = tmp_path / "f32.gguf"
    export_gguf(m, f32, "F32", progress=False)
    llama_cpp_quantize(f32, tmp_path / "lc.gguf", "Q4_K_S", imatrix=ImportanceMatrix.load(tmp_path / "im.gguf"))
    llama_cpp_quantize(f32, tmp_path / "lc-noim.gguf", "Q4_K_S")
    ours = tmp_path / "ours.gguf"
    export_gguf(m, ours, "Q4_K_S", progress=False, imatrix=ImportanceMatrix.load(tmp_path / "im.gguf"))
    name = "blk.1.attn_q.weight"
    lc, lc0, us = (read_gguf(p) for p in (tmp_path / "lc.gguf", tmp_path / "lc-noim.gguf", ours))
    t_lc, t_lc0, t_us = lc.tensor(name), lc0.tensor(name), us.tensor(name)
    assert t_lc.ggml_type == t_us.ggml_type == gguf.GGMLQuantizationType.Q4_K
    a, b = np.asarray(lc.raw(t_lc)), np.asarray(us.raw(t_us))
    assert not np.array_equal(a, np.asarray(lc0.raw(t_lc0)))  # llama.cpp really used the matrix
    W = m.named_weights()["model.layers.1.self_attn.q_proj.weight"].numpy()
    W = m.spec.to_gguf_tensor("model.layers.1.self_attn.q_proj.weight", torch.from_numpy(W), m.config).numpy()
    imp = im.importance(name)
    err = lambda q: float((imp * (gguf.quants.dequantize(q, t_us.ggml_type).reshape(W.shape) - W) ** 2).sum())
    assert np.array_equal(a, b) or err(b) <= 1.01 * err(a)
    assert np.array_equal(b.reshape(W.shape[0], -1), ENCODERS[t_us.ggml_type](W, imp))


def test_cli_imatrix_then_compress(tiny_hf, tmp_path):
    from slimlm.cli import main
    src = tiny_hf("LlamaForCausalLM", **K_DIMS)
    text = tmp_path / "calib.txt"
    text.write_text("Calibration text about many things. " * 200)
    im = tmp_path / "im.gguf"
    assert main(["-q", "imatrix", str(src), "-o", str(im), "--calib", str(text), "--ctx", "64", "--chunks", "4"]) == 0
    assert len(ImportanceMatrix.load(im).sums) == 14
    out = tmp_path / "o.gguf"
    assert main(["-q", "compress", str(src), "-o", str(out), "--type", "Q4_K_M", "--imatrix", str(im), "--no-eval"]) == 0
    assert out.exists() and out.with_suffix(".report.json").exists()


# ---- found by the fuzz suite (tests/test_fuzz.py): each was a traceback or a silently accepted bad matrix ----
def _imatrix_gguf(tmp_path, edit=None) -> str:
    from fuzz_gguf import serialize
    from fuzz_inputs import imatrix_spec
    spec = imatrix_spec()
    if edit:
        edit(spec)
    p = tmp_path / "im.gguf"
    p.write_bytes(serialize(spec)[0])
    return p


def _kv(key, vtype, value):
    def edit(spec):
        kv = next(k for k in spec.kvs if k.key == key)
        kv.vtype, kv.value = vtype, value
    return edit


def _tensor_data(name, values):
    def edit(spec):
        t = next(t for t in spec.tensors if t.name == name)
        t.data = np.array(values, dtype="<f4").tobytes()
    return edit


def _sum_shape(spec):
    t = next(t for t in spec.tensors if t.name == "blk.0.attn_q.weight.in_sum2")
    t.ne, t.data = [8, 2], bytes(64)


IMATRIX_GGUF_BAD = {
    "chunk_count a string": (_kv("imatrix.chunk_count", gguf.GGUFValueType.STRING, "3"), "chunk_count must be"),
    "chunk_count an array": (_kv("imatrix.chunk_count", gguf.GGUFValueType.ARRAY,
                                 (gguf.GGUFValueType.UINT32, [3, 4])), "chunk_count must be"),
    "chunk_size negative": (_kv("imatrix.chunk_size", gguf.GGUFValueType.INT32, -1), "chunk_size must be"),
    "datasets numbers": (_kv("imatrix.datasets", gguf.GGUFValueType.ARRAY, (gguf.GGUFValueType.UINT8, [1])),
                         "datasets must be an array of strings"),
    "count NaN": (_tensor_data("blk.0.attn_q.weight.counts", [float("nan")]), r"counts value 0 is nan"),
    "count inf": (_tensor_data("blk.0.attn_q.weight.counts", [float("inf")]), r"counts value 0 is inf"),
    "sum negative": (_tensor_data("blk.0.attn_q.weight.in_sum2", [1, 2, -3, 4, 5, 6, 7, 8]), r"value 2 is -3"),
    "sums for two experts, one count": (_sum_shape, "MoE"),
}


@pytest.mark.parametrize("case", sorted(IMATRIX_GGUF_BAD))
def test_imatrix_gguf_defect_is_one_clear_error(tmp_path, case):
    from slimlm.errors import InvalidModelError
    edit, pattern = IMATRIX_GGUF_BAD[case]
    p = _imatrix_gguf(tmp_path, edit)
    with pytest.raises(InvalidModelError, match=pattern) as e:
        ImportanceMatrix.load(p)
    assert str(p) in str(e.value)


def test_imatrix_gguf_seed_loads(tmp_path):
    im = ImportanceMatrix.load(_imatrix_gguf(tmp_path))
    assert im.chunk_count == 3 and im.chunk_size == 512 and im.datasets == ["calib.txt"]
    assert im.counts == {"blk.0.attn_q.weight": 100, "blk.0.ffn_down.weight": 101}


def test_imatrix_path_that_is_not_a_file(tmp_path):
    from slimlm.errors import InvalidModelError
    for p in (tmp_path, tmp_path / "missing.gguf"):
        with pytest.raises(InvalidModelError, match="importance matrix file not found"):
            ImportanceMatrix.load(p)


def _legacy(entries, chunks=3) -> bytes:
    from fuzz_inputs import legacy_imatrix
    return legacy_imatrix(entries, chunks)[0]


LEGACY_BAD = {
    "duplicate name": (_legacy([(b"a", 1, [1.0]), (b"a", 2, [2.0])]), "'a' appears twice"),
    "NaN value": (_legacy([(b"a", 1, [1.0, float("nan")])]), "a value 1 is nan"),
    "negative value": (_legacy([(b"a", 1, [-1.0])]), "a value 0 is -1"),
    "name not UTF-8": (_legacy([(b"\xff\xfe", 1, [1.0])]), "is not UTF-8"),
}


@pytest.mark.parametrize("case", sorted(LEGACY_BAD))
def test_legacy_imatrix_defect_is_one_clear_error(tmp_path, case):
    from slimlm.errors import InvalidModelError
    data, pattern = LEGACY_BAD[case]
    p = tmp_path / "im.dat"
    p.write_bytes(data)
    with pytest.raises(InvalidModelError, match=pattern):
        ImportanceMatrix.load(p)
