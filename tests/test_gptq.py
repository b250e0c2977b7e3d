"""GPTQ solver: the Cholesky/lazy-batch implementation against an independent naive computation (explicit
inverse Hessian, one Gaussian elimination per column, float64), and its error against round-to-nearest."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from slimlm.quant.gptq import UnitGrid, gptq, hessian


def _scale(Wu):  # symmetric 4-bit, one scale per row and unit (a stand-in for a GGUF block grid)
    return (torch.as_tensor(Wu).abs().amax(1) / 7).clamp(min=1e-8)


def _fit(Wu, u=0):
    s = _scale(Wu).numpy()
    a = np.repeat(s[:, None], Wu.shape[1], 1)
    return UnitGrid(a, np.zeros_like(a), np.arange(-8, 8, dtype=a.dtype), True, np.zeros(a.shape, np.int64))


def _round(scale, w, j):
    return torch.clamp(torch.round(w / scale), -8, 7) * scale


def _naive(W, H, unit, damp, order):
    """Optimal Brain Quantization one column at a time, in the given unit order."""
    cols = W.shape[1]
    perm = torch.cat([torch.arange(u * unit, (u + 1) * unit) for u in order])
    W, H = W.double()[:, perm].clone(), H.double()[perm][:, perm].clone()
    H[torch.diagonal(H) == 0, torch.diagonal(H) == 0] = 1
    H += damp * torch.diagonal(H).mean() * torch.eye(cols, dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    Q = torch.zeros_like(W)
    for c in range(cols):
        if c % unit == 0:
            grid = _scale(W[:, c:c + unit])
        Q[:, c] = _round(grid, W[:, c], c % unit)
        err = (W[:, c] - Q[:, c]) / Hinv[c, c]
        W[:, c + 1:] -= err[:, None] * Hinv[c, c + 1:][None, :]
        Hinv = Hinv - torch.outer(Hinv[:, c], Hinv[c, :]) / Hinv[c, c]
    out = torch.empty_like(Q)
    out[:, perm] = Q
    return out


def _layer(seed=0, rows=24, cols=128, n=512):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g, dtype=torch.float64) / cols ** 0.5
    X = torch.randn(n, cols, generator=g, dtype=torch.float64) @ (torch.eye(cols, dtype=torch.float64) + 3 * mix)
    X[:, 5] = 0                                            # a column that never sees input
    X[:, 40:44] *= 10                                      # a few strong channels
    W = torch.randn(rows, cols, generator=g, dtype=torch.float64) * 0.05
    return W, hessian(X)


@pytest.mark.parametrize("act_order", [False, True])
def test_matches_independent_computation(act_order):
    W, H = _layer()
    r = gptq(W, H, unit=32, fit=_fit, block_units=2, act_order=act_order, dtype=torch.float64)
    ref = _naive(W, H, 32, r.damp, r.unit_order)
    assert r.dead_columns == 1
    if act_order:
        assert r.unit_order[0] == 1                        # the unit holding the strong channels goes first
    assert torch.allclose(r.Q, ref, atol=1e-10), (r.Q - ref).abs().max()


def test_beats_round_to_nearest_and_stays_on_grid():
    W, H = _layer(seed=1)
    W32, H32 = W.float(), H
    r = gptq(W32, H32, unit=32, fit=_fit)
    rtn = torch.cat([_round(_scale(W32[:, u:u + 32])[:, None], W32[:, u:u + 32], 0) for u in range(0, 128, 32)], 1)

    def loss(Q):
        D = (W - Q.double())
        return float(torch.einsum("ri,ij,rj->", D, H, D))

    assert loss(r.Q) < 0.7 * loss(rtn)
    for u, g in enumerate(r.grids):                        # every weight is its unit's grid value at its level
        assert np.array_equal(r.Q[:, 32 * u:32 * u + 32].numpy(), g.a * g.table[g.L] + g.b)
        levels = r.Q[:, 32 * u:32 * u + 32] / torch.from_numpy(g.a)
        assert torch.allclose(levels, levels.round(), atol=1e-4) and levels.abs().max() <= 8


def test_singular_hessian_raises_dampening_and_bad_shapes_are_refused():
    W = torch.randn(4, 64, dtype=torch.float64)
    X = torch.randn(3, 64, dtype=torch.float64)            # rank 3: H singular, damped until Cholesky holds
    r = gptq(W, hessian(X), unit=32, fit=_fit, damp=0.0, dtype=torch.float64)
    assert r.damp >= 1e-6 and torch.isfinite(r.Q).all()
    with pytest.raises(ValueError, match="do not fit units"):
        gptq(W, hessian(X), unit=48, fit=_fit)


def test_non_finite_or_hopeless_hessian_is_a_numerics_error():
    """A NaN in the calibration activations, or a Hessian no dampening repairs, is slimlm's NumericsError (one
    `error:` line in the CLI), not a plain ValueError traceback."""
    from slimlm.errors import NumericsError
    W = torch.randn(4, 64, dtype=torch.float64)
    H = hessian(torch.randn(128, 64, dtype=torch.float64))
    H[3, 5] = float("nan")
    with pytest.raises(NumericsError, match="NaN/Inf"):
        gptq(W, H, unit=32, fit=_fit)
    with pytest.raises(NumericsError, match="stays singular"):
        gptq(W, -torch.eye(64, dtype=torch.float64), unit=32, fit=_fit, max_tries=2)


@pytest.mark.parametrize("qtype", ["Q4_K", "Q3_K", "Q4_0", "Q5_1", "IQ4_NL", "IQ4_XS", "Q6_K", "Q8_0", "Q2_K"])
def test_gptq_onto_gguf_grid_decodes_exactly_and_beats_the_encoder(qtype):
    import gguf

    from slimlm.quant import ENCODERS
    from slimlm.quant.gptq import gptq_gguf
    qt = gguf.GGMLQuantizationType[qtype]
    W, H = _layer(seed=2, rows=32, cols=512, n=2048)
    W = W.float()
    data, Q, res = gptq_gguf(W, H, qt)
    # the weights GPTQ computed with are exactly what gguf-py decodes from the bytes
    assert np.array_equal(gguf.quants.dequantize(data, qt), Q.numpy())
    imp = (torch.diagonal(H) / 2).float().numpy()
    rtn = torch.from_numpy(gguf.quants.dequantize(ENCODERS[qt](W.numpy(), imp), qt))

    def loss(Qx):
        D = (W.double() - Qx.double())
        return float(torch.einsum("ri,ij,rj->", D, H, D))

    assert loss(Q) < 0.9 * loss(rtn), (loss(Q), loss(rtn))


def test_gptq_model_export_decodes_to_the_quantized_torch_weights(tiny_hf, tmp_path, llama_cpp_available):
    """Sequential GPTQ over a whole (tiny) model: every GPTQ'd tensor in the written GGUF decodes exactly to
    the weights of the quantized torch copy, in llama.cpp's row order; the caller's model is untouched; and
    llama.cpp's logits from the file match the quantized torch model's."""
    import gguf

    from slimlm import export_gguf, load
    from slimlm.calib import calibration_chunks
    from slimlm.eval.runtime import LlamaCppRunner
    from slimlm.gguf.reader import read_gguf
    from slimlm.gguf.writer import plan_model
    from slimlm.sequential import changed_module, gptq_model

    m = load(tiny_hf("LlamaForCausalLM", hidden_size=256, intermediate_size=512, num_attention_heads=4,
                     num_key_value_heads=2))
    before = {k: v.clone() for k, v in m.named_weights().items()}
    chunks, _ = calibration_chunks(m, None, n_ctx=64, max_chunks=8)
    _, _, types = plan_model(m, "Q4_K_M")
    encoded, changed, stats = gptq_model(m, chunks, types, progress=False)
    qmod = changed_module(m, changed)
    assert stats["tensors"] == 2 * 7 + 1 and "output.weight" in encoded and all(torch.equal(v, m.named_weights()[k]) for k, v in before.items())
    out = tmp_path / "g.gguf"
    export_gguf(m, out, "Q4_K_M", progress=False, encoded=encoded)
    g = read_gguf(out)
    qsd = qmod.state_dict()
    for t in g.tensors:
        if t.name in encoded:
            hf = next(k for k in qsd if m.spec.hf_to_gguf(k) == t.name)
            want = m.spec.to_gguf_tensor(hf, qsd[hf], m.config).numpy()
            assert np.array_equal(gguf.quants.dequantize(g.raw(t), t.ggml_type).reshape(want.shape), want), t.name
    r = LlamaCppRunner(out, 64)
    try:
        got = r.logits(chunks[0])
    finally:
        r.close()
    ref = qmod(input_ids=chunks[0][None], use_cache=False).logits[0]
    # the input embedding of an untied model stays llama.cpp-rounded in the file but float in the torch copy
    assert torch.corrcoef(torch.stack([got.flatten(), ref.flatten()]))[0, 1] > 0.98


def test_compress_config_checks_the_method():
    from slimlm.compress import CompressConfig
    from slimlm.errors import ConfigError
    assert CompressConfig(type="Q4_K_M", method="gptq").method == "gptq"
    assert CompressConfig(type="Q4_K_M", method="awq+gptq").method == "awq+gptq"
    with pytest.raises(ConfigError, match="must be one of rtn, gptq, awq, awq"):
        CompressConfig(type="Q4_K_M", method="smoothquant")
    with pytest.raises(ConfigError, match="needs a quantized --type"):
        CompressConfig(type="F16", method="gptq")


def test_singular_hessian_falls_back_to_rounding_and_is_reported(tiny_hf, tmp_path, monkeypatch):
    """RELIABILITY.md 23: when a Hessian stays singular after every dampening retry, that tensor is rounded
    as llama.cpp rounds it (exactly RTN's bytes), the run goes on, and the report names the tensor and why."""
    import json

    import slimlm.quant.gptq as gq
    from slimlm.cli import main
    from slimlm.errors import NumericsError
    from slimlm.gguf.reader import read_gguf

    src = tiny_hf("LlamaForCausalLM")
    text = tmp_path / "t.txt"
    text.write_text("Calibration text about rivers, mountains and the weather in spring. " * 80)
    real = gq.factor

    def factor(H, unit, **kw):           # the MLP's gate/up input of layer 1 is hopeless
        if H.shape[0] == 64 and factor.calls == 6:
            raise NumericsError("the Hessian stays singular with dampening up to 10 x mean(diag H)")
        factor.calls += 1
        return real(H, unit, **kw)
    factor.calls = 0
    monkeypatch.setattr(gq, "factor", factor)
    common = ["--type", "Q4_0", "--calib", str(text), "--calib-chunks", "2", "--gptq-chunks", "2", "--ctx", "64",
              "--no-eval"]
    assert main(["-q", "compress", str(src), "-o", str(tmp_path / "g.gguf"), "--method", "gptq", *common]) == 0
    assert main(["-q", "compress", str(src), "-o", str(tmp_path / "r.gguf"), *common]) == 0
    rep = json.loads((tmp_path / "g.report.json").read_text())
    fb = next(s for s in rep["steps"] if s["step"] == "gptq")["rtn_fallbacks"]
    assert sorted(fb) == ["blk.1.ffn_gate.weight", "blk.1.ffn_up.weight"]
    assert all("singular" in why for why in fb.values())
    assert "plain rounding instead for `blk.1.ffn_gate.weight`" in (tmp_path / "g.report.md").read_text()
    g, r = read_gguf(tmp_path / "g.gguf"), read_gguf(tmp_path / "r.gguf")
    rt = {t.name: t for t in r.tensors}
    gptqd = [t for t in g.tensors if t.ggml_type.name != "F32" and (t.name.startswith("blk.") or t.name == "output.weight")]
    assert len(gptqd) == 2 * 7 + 1
    for t in gptqd:  # exactly the fallen-back tensors carry RTN's bytes, every other one GPTQ's
        assert np.array_equal(g.raw(t), r.raw(rt[t.name])) == (t.name in fb), t.name


def test_factor_in_the_hessians_own_storage_equals_the_copying_one():
    """factor(consume=True) runs in H's storage (only H and the result alive) and gives the very same factor and
    dampening, also when the first tries fail and H has to be read back for a stronger dampening."""
    from slimlm.quant.gptq import all_finite, factor
    _, H = _layer()
    U, d = factor(H, 32)
    U2, d2 = factor(H.clone(), 32, consume=True)
    assert U.dtype == torch.float32 and torch.equal(U, U2) and d == d2 == 0.01
    bad = torch.eye(96, dtype=torch.float64)              # eigenvalues 2.05 and -0.05: 0.01 x mean(diag) is too
    bad[0, 1] = bad[1, 0] = 1.05                          # little, 0.1 x is enough
    U, d = factor(bad, 32)
    Hc = bad.clone()
    U2, d2 = factor(Hc, 32, consume=True)
    assert d == d2 == pytest.approx(0.1) and torch.equal(U, U2)
    assert not torch.equal(Hc, bad)                       # it was consumed
    assert all_finite(U) and not all_finite(torch.tensor([[1.0, float("nan")]] * 300))


def test_gptq_packs_units_as_they_finish():
    """done(grid) replaces each unit's grid once its columns are rounded, in the original unit order."""
    W, H = _layer()
    seen = []
    r = gptq(W, H, unit=32, fit=_fit, block_units=2, act_order=True,
             done=lambda g: seen.append(g) or ("unit", g.L.copy()))
    plain = gptq(W, H, unit=32, fit=_fit, block_units=2, act_order=True)
    assert len(seen) == len(r.grids) == 4 and torch.equal(r.Q, plain.Q)
    for u, g in enumerate(r.grids):
        assert g[0] == "unit" and np.array_equal(g[1], plain.grids[u].L)
