"""llama.cpp's activation rounding (slimlm/quant/activations.py): the values, that they reproduce llama.cpp's
logits, and the sensitivity table's price for them."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers import kl_of_logits

from slimlm.quant.activations import activation_kind, emulate, runtime_activations

K_DIMS = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)


def test_q8_0_activations_are_gguf_py_q8_0_blocks_and_q8_k_keeps_its_largest_value():
    gguf = pytest.importorskip("gguf")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 512, generator=g) * torch.rand(1, 512, generator=g) * 3
    got = runtime_activations(x, "Q8_0")
    ref = gguf.quants.dequantize(gguf.quants.quantize(x.numpy(), gguf.GGMLQuantizationType.Q8_0),
                                 gguf.GGMLQuantizationType.Q8_0)
    # gguf-py multiplies by 1/d where x86 multiplies by 127/amax, and rounds ties away from zero: a rounding of a
    # value within an ulp of a half may differ by one step
    d = np.abs(got.numpy() - ref)
    step = np.repeat(np.abs(x.numpy()).reshape(-1, 32).max(1) / 127, 32).reshape(x.shape)
    assert (d <= 1.01 * step).all() and (d == 0).mean() > 0.999
    k = runtime_activations(x, "Q8_K").reshape(-1, 256)
    xb = x.reshape(-1, 256)
    i = xb.abs().argmax(1, keepdim=True)
    assert torch.allclose(k.gather(1, i), xb.gather(1, i))
    steps = (xb.abs().amax(1, keepdim=True) / 127)
    assert ((k - xb).abs() <= 0.5 * steps * 1.0001).all()
    # 256-wide blocks round coarser than 32-wide ones
    assert (runtime_activations(x, "Q8_K") - x).pow(2).mean() > 1.5 * (got - x).pow(2).mean()
    assert activation_kind("Q5_1") == "Q8_0" and activation_kind("Q4_K") == "Q8_K" and activation_kind("F32") == "F32"


@pytest.mark.parametrize("preset", ["Q8_0", "Q4_K_M"])
def test_emulated_activation_rounding_moves_the_logits_as_much_as_llama_cpp_does(tiny_hf, tmp_path, preset):
    """llama.cpp's logits differ from the GGUF's dequantized weights in torch by what its quantized dot products
    add; the emulated activations move torch's logits by as much (KL within 2x), which is what the sensitivity
    table prices. (Not the same values: on this tiny model the emulated and llama.cpp's changes are mostly
    uncorrelated, so the test asks for the size of the change only.)"""
    from gguf import GGUFReader

    from slimlm import export_gguf, load
    from slimlm.eval.runtime import LlamaCppRunner
    out = tmp_path / "m.gguf"
    export_gguf(load(tiny_hf("LlamaForCausalLM", **K_DIMS), progress=False), out, preset, progress=False)
    types = {t.name: t.tensor_type.name for t in GGUFReader(str(out)).tensors}
    m = load(str(out), progress=False)
    chunk = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(1))
    runner = LlamaCppRunner(out, 64)
    try:
        want = torch.as_tensor(runner.logits(chunk))
    finally:
        runner.close()
    with torch.no_grad():
        plain = m.module(input_ids=chunk[None]).logits[0]
        handles = emulate(m, types)
        emulated = m.module(input_ids=chunk[None]).logits[0]
    for h in handles:
        h.remove()
    assert len(handles) == 7 * m.config["num_hidden_layers"] + 1
    assert 0.5 < kl_of_logits(plain, emulated) / kl_of_logits(plain, want) < 2.0, (kl_of_logits(plain, emulated), kl_of_logits(plain, want))


def test_predicted_activation_cost_tracks_the_emulated_one(tiny_hf):
    """The sensitivity table's price for llama.cpp's activation rounding (with the weights left exact) is within
    2x of the KL divergence the emulated rounding causes in torch, for Q8_0's and Q8_K's blocks, and ranks them."""
    from slimlm import load
    from slimlm.calib import calibration_chunks
    from slimlm.sensitivity import fisher_stats, predict
    m = load(tiny_hf("LlamaForCausalLM", tie=True, **K_DIMS), progress=False)
    chunks, _ = calibration_chunks(m, None, n_ctx=64, max_chunks=8)
    stats = fisher_stats(m, chunks, progress=False)
    cands = ("Q8_0", "Q6_K")
    with_act = predict(m, stats, candidates=cands, progress=False)
    without = predict(m, stats, candidates=cands, activations=False, progress=False)
    with torch.no_grad():
        ref = torch.cat([m.module(input_ids=c[None]).logits[0] for c in chunks])
    preds, meas = [], []
    for t in cands:
        preds.append(sum(with_act[n][t][1] - without[n][t][1] for n in with_act))
        e = copy.deepcopy(m)
        handles = emulate(e, dict.fromkeys(with_act, t))
        with torch.no_grad():
            got = torch.cat([e.module(input_ids=c[None]).logits[0] for c in chunks])
        for h in handles:
            h.remove()
        meas.append(kl_of_logits(ref, got))
    assert preds[1] > preds[0] and meas[1] > meas[0], (preds, meas)
    for p, q in zip(preds, meas, strict=True):
        assert 0.5 < p / q < 2.0, (preds, meas)


def test_the_fused_lm_head_sees_the_emulated_rounding_of_its_input(tiny_hf):
    """Under emulate()'s hooks (QAT --runtime-activations) the fused LM head (the trainer's top-k loss without the
    (positions, vocab) logits) stays on, and computes the logits of the module with the head's input rounded: the
    trainer's head=False path then equals the module's logits, hook included; without applying the hook it would
    not. Removing the hooks is checked again (the cached check is per set of head hooks)."""
    from slimlm import load
    from slimlm.train.teacher import fused_head, head_input
    from slimlm.train.trainer import _Forward
    m = load(tiny_hf("LlamaForCausalLM", tie=True, **K_DIMS), progress=False)
    ids = torch.arange(3, 40)[None]
    W = fused_head(m.module)
    assert W is not None
    handles = emulate(m, {"token_embd.weight": "Q8_0"})          # the tied head reads Q8_0-rounded activations
    assert len(handles) == 1
    with torch.no_grad():
        want = m.module(input_ids=ids, use_cache=False).logits
        h, _ = _Forward(m.module)(ids, False, head=False)
        raw = m.module.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
        assert fused_head(m.module) is W
        assert torch.equal(torch.nn.functional.linear(h, W), want)
        assert not torch.allclose(torch.nn.functional.linear(raw, W), want, rtol=1e-4, atol=1e-4)
        assert torch.equal(head_input(m.module, raw), h)
    for hd in handles:
        hd.remove()
    assert fused_head(m.module) is W and torch.equal(head_input(m.module, raw), raw)
