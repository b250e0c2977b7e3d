"""slimlm prune end to end on a tiny model: HF folder output that transformers reloads, GGUF output that llama.cpp
runs, weight pruning with the asked pattern, the model-level Wanda/SparseGPT driver, clear errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from slimlm.cli import main


def test_prune_to_hf_folder_reloads_in_transformers(tiny_hf, tmp_path, capsys):
    from transformers import AutoModelForCausalLM
    out = tmp_path / "pruned"
    assert main(["-q", "prune", str(tiny_hf("LlamaForCausalLM")), "-o", str(out), "--ffn", "64", "--heads", "1x2",
                 "--calib-chunks", "2", "--ctx", "64", "--chunks", "2", "--no-speed"]) == 0
    text = capsys.readouterr().out
    assert "KL divergence" in text and str(out) in text
    m = AutoModelForCausalLM.from_pretrained(out)
    assert m.config.intermediate_size == 64 and m.config.num_attention_heads == 2
    assert m.config.num_key_value_heads == 1
    rep = json.loads((tmp_path / "pruned.report.json").read_text())
    step = rep["steps"][0]
    assert step["step"] == "structured pruning" and step["params_after"] == m.num_parameters()
    assert np.isfinite(rep["evaluation"]["kld"])
    # a second run without --overwrite is refused, the folder untouched
    before = (out / "model.safetensors").stat().st_mtime_ns
    assert main(["-q", "prune", str(tiny_hf("LlamaForCausalLM")), "-o", str(out), "--ffn", "64", "--no-eval"]) == 2
    assert (out / "model.safetensors").stat().st_mtime_ns == before


def test_weight_pruning_cli_writes_the_nm_pattern(tiny_hf, tmp_path, llama_cpp_available):
    from slimlm.gguf.reader import read_gguf
    out = tmp_path / "w.gguf"
    assert main(["-q", "prune", str(tiny_hf("LlamaForCausalLM")), "-o", str(out), "--method", "sparsegpt",
                 "--sparsity", "2:4", "--type", "F32", "--calib-chunks", "2", "--ctx", "64", "--chunks", "1",
                 "--no-speed"]) == 0
    import gguf
    r = gguf.GGUFReader(str(out))
    checked = 0
    for t in r.tensors:
        if t.name.startswith("blk.") and len(t.shape) == 2:
            W = np.asarray(t.data).reshape(-1, 4)
            assert ((W == 0).sum(1) >= 2).all(), t.name
            checked += 1
        elif len(t.shape) == 2:
            assert (np.asarray(t.data) != 0).mean() > 0.99          # embedding / output stay dense
    assert checked == 14 and read_gguf(out).get("llama.block_count") == 2


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_first_linear_is_pruned_on_its_real_input(tiny_hf, method):
    """Layer 0's q_proj sees input_layernorm(embeddings): the driver's result equals the kernel applied to it."""
    from slimlm import load
    from slimlm.prune.weights import prune_weights_model, sparsegpt, wanda_mask
    from slimlm.quant.gptq import hessian
    m = load(tiny_hf("LlamaForCausalLM"), progress=False)
    chunks = torch.randint(3, m.config["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(0))
    p, st = prune_weights_model(m, chunks, method, 0.5, progress=False)
    assert st["sparsity"] == pytest.approx(0.5, abs=1e-3)
    l0 = m.module.model.layers[0]
    with torch.no_grad():
        x = l0.input_layernorm(m.module.model.embed_tokens(chunks))
    W = l0.self_attn.q_proj.weight.data
    H = hessian(x)
    want = W.masked_fill(wanda_mask(W, torch.diagonal(H), 0.5), 0.0) if method == "wanda" else sparsegpt(W, H, 0.5).W
    assert torch.allclose(p.module.model.layers[0].self_attn.q_proj.weight, want.float(), atol=1e-5)
    assert torch.equal(m.module.model.layers[0].self_attn.q_proj.weight, W)         # the input model is unchanged


@pytest.mark.parametrize("args,msg", [
    (["--method", "wanda"], "--sparsity"),
    (["--ratio", "0.3", "--sparsity", "0.5"], "--sparsity is for weight pruning"),
    (["--method", "magnitude", "--sparsity", "3:2"], "N:M"),
    (["--ratio", "2"], "--ratio"),
    ([], "--ratio"),
    (["--heads", "two"], "KVxQ"),
])
def test_bad_prune_arguments_are_one_clear_line(tmp_path, capsys, args, msg):
    assert main(["-q", "prune", str(tmp_path / "nothing"), "-o", str(tmp_path / "o.gguf"), *args]) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1
    assert not (tmp_path / "o.gguf").exists()


@pytest.mark.slow
def test_format_aware_hidden_512_is_all_k_quants_in_llama_cpp(smollm2, tmp_path, llama_cpp_available):
    """Acceptance c: SmolLM2 hidden 576 -> 512 format-aware, then Q4_K_M: every 2-D weight a K-quant, runs."""
    from slimlm import export_gguf
    from slimlm.eval.runtime import LlamaCppRunner
    from slimlm.gguf.reader import read_gguf
    from slimlm.prune.command import PruneConfig, make_plan
    from slimlm.prune.structured import prune_structured
    plan = make_plan(smollm2, PruneConfig(hidden=512, format_aware=True, type="Q4_K_M"), None)
    assert (plan.hidden, plan.n_kv, plan.q_per_kv) == (512, 2, 2)       # 4 heads x 64 = 256
    chunks = torch.randint(3, 49152, (2, 64), generator=torch.Generator().manual_seed(0))
    p, _ = prune_structured(smollm2, chunks, plan, importance="activation", progress=False)
    out = tmp_path / "h512.gguf"
    rec = export_gguf(p, out, "Q4_K_M", progress=False)
    assert not rec.fallbacks
    two_d = [t for t in read_gguf(out).tensors if len(t.shape) == 2]
    assert two_d and all(t.ggml_type.name.endswith("_K") for t in two_d), \
        [(t.name, t.ggml_type.name) for t in two_d if not t.ggml_type.name.endswith("_K")]
    r = LlamaCppRunner(out, 128, logits_all=False)
    try:
        text = r.generate("The capital of France is", 8)
    finally:
        r.close()
    assert isinstance(text, str) and text.strip()


def test_sensitivity_cli_writes_table_heatmap_and_json(tiny_hf, tmp_path, capsys):
    out = tmp_path / "sens.png"
    assert main(["-q", "sensitivity", str(tiny_hf("LlamaForCausalLM")), "-o", str(out), "--ratios", "0.5",
                 "--types", "Q8_0", "--calib-chunks", "2", "--ctx", "32"]) == 0
    text = capsys.readouterr().out
    assert "| layer | mlp 50% | heads -1/2 | layer | Q8_0 |" in text
    t = json.loads(out.with_suffix(".json").read_text())
    assert len(t["layers"]) == 2 and all(r["layer"] > 0 for r in t["layers"])
    assert out.read_bytes()[:4] == b"\x89PNG"


def _with_quiet_mlp(src, dst, layer: int, scale: float):
    """A copy of the HF folder `src` whose layer `layer` MLP writes `scale` times less into the residual stream
    (down_proj scaled): removing its neurons costs little, so an allocation by cost must cut it the most."""
    import shutil

    from safetensors.torch import load_file, save_file
    shutil.copytree(src, dst)
    w = load_file(dst / "model.safetensors")
    w[f"model.layers.{layer}.mlp.down_proj.weight"] *= scale
    save_file(w, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_prune_allocate_sensitivity_writes_deci(tiny_hf, tmp_path, llama_cpp_available):
    """Layer 1's MLP barely matters: the measured-sensitivity allocation removes the most neurons there (64, the
    most it allows in a layer) and the rest elsewhere, so the widths differ and the GGUF is llama.cpp's deci arch
    with per-layer arrays; llama.cpp runs it (the evaluation)."""
    from slimlm.gguf.reader import read_gguf
    src = _with_quiet_mlp(tiny_hf("LlamaForCausalLM", num_hidden_layers=3), tmp_path / "src", 1, 0.02)
    out = tmp_path / "s.gguf"
    assert main(["-q", "prune", str(src), "-o", str(out), "--ffn", "64", "--allocate", "sensitivity", "--type",
                 "F32", "--calib-chunks", "3", "--ctx", "64", "--chunks", "1", "--no-speed"]) == 0
    g = read_gguf(out)
    assert g.get("general.architecture") == "deci"
    ffn = [int(v) for v in g.get("deci.feed_forward_length")]
    assert len(ffn) == 3 and sum(96 - f for f in ffn) == 3 * 32
    assert ffn[1] == 32 < min(ffn[0], ffn[2])
    assert [int(v) for v in g.get("deci.attention.head_count")] == [4, 4, 4]
    rep = json.loads(out.with_suffix(".report.json").read_text())
    assert rep["steps"][0]["arch"] == "deci" and np.isfinite(rep["evaluation"]["kld"])


def test_compress_prunes_then_quantizes_and_evaluates_against_the_original(tiny_hf, tmp_path, llama_cpp_available):
    from slimlm.gguf.reader import read_gguf
    out = tmp_path / "c.gguf"
    assert main(["-q", "compress", str(tiny_hf("LlamaForCausalLM")), "-o", str(out), "--prune", "0.003",
                 "--method", "gptq", "--type", "Q8_0", "--calib-chunks", "2", "--ctx", "64", "--chunks", "1",
                 "--no-speed"]) == 0
    rep = json.loads(out.with_suffix(".report.json").read_text())
    st = rep["steps"][0]
    assert st["step"] == "structured pruning" and st["removed_fraction"] >= 0.003
    assert rep["export"]["n_params"] == st["params_after"] < st["params_before"]
    assert rep["evaluation"]["ref"]["n_params"] == st["params_before"]       # scored against the unpruned model
    assert read_gguf(out).architecture == st["arch"]
    assert main(["-q", "compress", str(tiny_hf("LlamaForCausalLM")), "-o", str(tmp_path / "x.gguf"), "--prune",
                 "0.1", "--imatrix", str(out)]) == 2


def test_owl_prunes_outlier_heavy_layers_less_at_the_same_total(tiny_hf):
    from slimlm import load
    from slimlm.prune.weights import owl_sparsities, prune_weights_model
    m = load(tiny_hf("LlamaForCausalLM", num_hidden_layers=3), progress=False)
    with torch.no_grad():                       # give layer 1 large outliers
        W = m.module.model.layers[1].mlp.gate_proj.weight
        W[:, :8] *= 10.0
    chunks = torch.randint(3, m.config["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(0))
    sp = owl_sparsities(m, chunks, 0.5, progress=False)
    assert sp[1] == pytest.approx(min(sp)) and max(sp) - min(sp) == pytest.approx(0.16)
    assert sum(sp) / 3 == pytest.approx(0.5)
    p, st = prune_weights_model(m, chunks, "wanda", 0.5, owl=True, progress=False)
    for layer, s in zip(p.module.model.layers, sp, strict=True):
        z = (layer.mlp.up_proj.weight == 0).float().mean()
        assert float(z) == pytest.approx(s, abs=0.02)


def test_default_method_drops_the_least_influential_layers_then_neurons(tiny_hf, tmp_path, llama_cpp_available):
    """The default structured method (mlp+layers): --layer-share of the ratio as whole layers, lowest block
    influence first, the rest MLP neurons with per-layer widths; the GGUF runs in llama.cpp."""
    from slimlm import load
    from slimlm.calib import calibration_chunks
    from slimlm.gguf.reader import read_gguf
    from slimlm.prune.structured import Plan, block_influence, n_params, planned_config
    src = tiny_hf("LlamaForCausalLM", tie=True, num_hidden_layers=6)
    m = load(src, progress=False)
    total = n_params(m.config)
    per_layer = total - n_params(planned_config(m.config, Plan(drop_layers=[0])))
    ratio = 1.6 / 0.6 * per_layer / total          # the default share 0.6 of it: 1.6 layers -> 2 whole layers
    out = tmp_path / "d.gguf"
    assert main(["-q", "prune", str(src), "-o", str(out), "--ratio", f"{ratio:.6f}", "--type", "F32",
                 "--calib-chunks", "4", "--ctx", "64", "--chunks", "1", "--no-speed"]) == 0
    rep = json.loads(out.with_suffix(".report.json").read_text())
    st = rep["steps"][0]
    assert st["removed_fraction"] >= ratio - 1e-6
    chunks, _ = calibration_chunks(m, None, n_ctx=64, max_chunks=4)
    bi = block_influence(m, chunks[:4], progress=False)
    least = sorted(sorted(range(6), key=lambda i: bi[i])[:2])
    assert f"layers -2 {least}" in st["plan"]
    g = read_gguf(out)
    assert g.get(f"{g.architecture}.block_count") == 4
    assert rep["evaluation"]["kld"] > 0 and np.isfinite(rep["evaluation"]["kld"])   # llama.cpp ran it
    assert main(["-q", "prune", str(src), "-o", str(tmp_path / "x.gguf"), "--ratio", "0.1", "--layer-share",
                 "1.5"]) == 2


def test_sensitivity_allocation_of_weight_sparsity_spares_the_sensitive_layer(tiny_hf, tmp_path):
    from slimlm import load
    from slimlm.prune.sensitivity import weight_sparsities
    from slimlm.prune.weights import prune_weights_model
    m = load(tiny_hf("LlamaForCausalLM", num_hidden_layers=3), progress=False)
    with torch.no_grad():                       # layer 1 writes 8x more into the residual stream
        m.module.model.layers[1].mlp.down_proj.weight *= 8.0
        m.module.model.layers[1].self_attn.o_proj.weight *= 8.0
    chunks = torch.randint(3, m.config["vocab_size"], (3, 32), generator=torch.Generator().manual_seed(0))
    r = weight_sparsities(m, chunks[:2], chunks[2], "wanda", 0.5, progress=False)
    sp = r["sparsities"]
    assert r["kld"][1][0] < r["kld"][1][1] < r["kld"][1][2]  # measured: more sparsity, more divergence
    assert sp[1] == pytest.approx(0.42) and sum(sp) / 3 == pytest.approx(0.5)
    assert all(0.42 - 1e-9 <= s <= 0.58 + 1e-9 for s in sp)
    p, st = prune_weights_model(m, chunks, "wanda", 0.5, sparsities=sp, progress=False)
    for layer, s in zip(p.module.model.layers, sp, strict=True):
        assert float((layer.mlp.up_proj.weight == 0).float().mean()) == pytest.approx(s, abs=0.02)
    assert st["layer_sparsities"] == [round(s, 4) for s in sp]
    # the CLI path, and the N:M refusal
    out = tmp_path / "s"
    assert main(["-q", "prune", str(tiny_hf("LlamaForCausalLM", num_hidden_layers=3)), "-o", str(out), "--method",
                 "sparsegpt", "--sparsity", "50%", "--allocate", "sensitivity", "--calib-chunks", "3", "--ctx", "32",
                 "--no-eval"]) == 0
    rep = json.loads((tmp_path / "s.report.json").read_text())
    assert sum(rep["steps"][0]["layer_sparsities"]) / 3 == pytest.approx(0.5)
    assert main(["-q", "prune", "-o", str(tmp_path / "x"), "--method", "wanda", "--sparsity", "2:4", "--allocate",
                 "sensitivity"]) == 2
    assert main(["-q", "prune", "-o", str(tmp_path / "x"), "--method", "wanda", "--sparsity", "5%", "--allocate",
                 "sensitivity"]) == 2       # refused before any model is loaded
    assert not (tmp_path / "x").exists()
