"""`slimlm prune` on a tiny model of every supported family (Llama, Mistral, Qwen2 with q/k/v biases, Qwen3 with
q/k norms), default method, a --ratio that removes whole layers, attention heads and MLP neurons: the GGUF reads
back with slimlm's reader and llama.cpp computes the pruned torch model's logits; the HF folder loads back in
slimlm and transformers with the same function; the report names the architecture read from the written file."""
from __future__ import annotations

import json

import pytest
import torch
from helpers import ARCH_EXTRA

from slimlm import load
from slimlm.arch import ARCHS as ARCH_SPECS
from slimlm.cli import main
from slimlm.prune.structured import Plan, n_params, planned_config

ARCHS = list(ARCH_EXTRA)
# the families with a dense MLP (neuron pruning); a mixture of experts prunes whole experts (test_families.py)
DENSE = [a for a in ARCHS if not ARCH_SPECS[a].moe]
CALIB = ["--calib-chunks", "2", "--ctx", "32", "--no-eval"]       # the tests compare logits themselves


def _ratio(m, q_per_kv: int | None, ffn: int) -> float:
    """A --ratio whose default split (0.6 of it as whole layers) drops 2 of the 4 layers, after which the heads
    (`q_per_kv` query heads per KV head) and MLP width `ffn` (of 96) reach it."""
    total = n_params(m.config)
    per_layer = total - n_params(planned_config(m.config, Plan(drop_layers=[0])))
    ratio = 1 - n_params(planned_config(m.config, Plan(drop_layers=[0, 1], q_per_kv=q_per_kv, ffn=ffn))) / total
    assert round(0.6 * ratio * total / per_layer) == 2
    return ratio - 1e-6


def _pruned_in_torch(m, ratio: float, heads: str | None, allocate: str | None, gguf_out: bool):
    """The same pruning through the Python API (deterministic): the model the written file must compute."""
    from slimlm.calib import calibration_chunks
    from slimlm.prune.command import PruneConfig, structured_prune
    cfg = PruneConfig(ratio=ratio, heads=heads, type="F32", calib_chunks=2, n_ctx=32, allocate=allocate)
    chunks, _ = calibration_chunks(m, None, n_ctx=32, max_chunks=2)
    return structured_prune(m, chunks, cfg, lambda _msg: None, False, gguf_out)


def _tokens(m) -> torch.Tensor:
    return torch.randint(3, m.config["vocab_size"], (24,), generator=torch.Generator().manual_seed(3))


def _no_calibration(*_a, **_k):
    raise AssertionError("calibration started before the arguments were checked")


def _prune_with_pre_tokenizer(argv: list[str], monkeypatch, capsys) -> None:
    """The tiny Qwen2 model's tokenizer (transformers' Qwen2 tokenizer class over SmolLM2's vocabulary) has a
    check-text hash llama.cpp does not know. `slimlm prune` refuses it right after loading, before calibration;
    with `--pre-tokenizer qwen2` the same run goes through."""
    with monkeypatch.context() as mp:
        mp.setattr("slimlm.calib.calibration_chunks", _no_calibration)
        assert main(["-q", "prune", *argv]) == 2
    err = capsys.readouterr().err
    assert "pre-tokenizer is not one llama.cpp knows" in err and "Traceback" not in err
    assert main(["-q", "prune", *argv, "--pre-tokenizer", "qwen2"]) == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_n_params_counts_every_tensor_of_the_family(tiny_hf, arch):
    """q/k/v biases (Qwen2) and q/k norms (Qwen3) included, before and after a plan."""
    from slimlm.prune.structured import prune_structured
    m = load(tiny_hf(arch, num_hidden_layers=4), progress=False)
    assert n_params(m.config) == m.n_params()
    p, _ = prune_structured(m, None, Plan(drop_layers=[1], n_kv=1), importance="magnitude", progress=False)
    assert n_params(p.config) == p.n_params() == sum(t.numel() for t in p.module.parameters())


@pytest.mark.parametrize("arch", DENSE)
def test_prune_every_family_to_gguf_runs_in_llama_cpp(tiny_hf, tmp_path, arch, monkeypatch, capsys,
                                                       llama_cpp_available):
    from slimlm.eval.runtime import LlamaCppRunner
    from slimlm.gguf.reader import read_gguf
    src = tiny_hf(arch, num_hidden_layers=4)
    m = load(src, progress=False)
    out = tmp_path / "p.gguf"
    heads = not ARCH_SPECS[arch].attn_width_is_hidden
    if not heads:        # llama.cpp's qwen2/phi3 loaders size attn_q n_embd x n_embd: query heads stay
        with monkeypatch.context() as mp:
            mp.setattr("slimlm.calib.calibration_chunks", _no_calibration)
            assert main(["-q", "prune", str(src), "-o", str(out), "--ratio", "0.02", "--heads", "2x1"]) == 2
        err = capsys.readouterr().err
        assert f"{m.spec.gguf_arch} arch needs query heads x head_dim = hidden size" in err and "Traceback" not in err
    ratio = _ratio(m, 1 if heads else None, 64 if heads else 32)
    argv = [str(src), "-o", str(out), "--ratio", repr(ratio), *(["--heads", "2x1"] if heads else []), "--type",
            "F32", *CALIB]
    if arch == "Qwen2ForCausalLM":
        _prune_with_pre_tokenizer(argv, monkeypatch, capsys)
    else:
        assert main(["-q", "prune", *argv]) == 0
    rep = json.loads(out.with_suffix(".report.json").read_text())
    st = rep["steps"][0]
    assert st["removed_fraction"] >= ratio and "layers -2" in st["plan"]
    assert ("heads 2 KV x 1 q" in st["plan"]) == heads
    g = read_gguf(out)
    a = g.architecture
    if m.spec.gguf_arch == "llama":      # per-layer MLP widths (global allocation) are llama.cpp's deci arch
        assert a == ("deci" if "ffn per layer" in st["plan"] else "llama")
    else:                                # llama.cpp has no per-layer variant of qwen2/qwen3: uniform widths
        assert a == m.spec.gguf_arch and f"ffn {64 if heads else 32}" in st["plan"].split(", ")
    ffn, n_head = g.get(f"{a}.feed_forward_length"), g.get(f"{a}.attention.head_count")
    ffn = list(ffn) if a == "deci" else [ffn] * 2
    assert g.get(f"{a}.block_count") == 2 and sum(96 - f for f in ffn) == 2 * (32 if heads else 64)
    assert (list(n_head) if a == "deci" else [n_head] * 2) == [2 if heads else 4] * 2
    assert rep["export"]["n_params"] == st["params_after"] < st["params_before"] and st["arch"] == a
    p, st2 = _pruned_in_torch(m, ratio, "2x1" if heads else None, None, True)
    assert st2["plan"] == st["plan"]
    x = _tokens(m)
    r = LlamaCppRunner(out, 64)
    try:
        got = r.logits(x)
    finally:
        r.close()
    want = p.logits(x[None])[0]
    # Gemma's embedding is scaled by sqrt(hidden): a residual stream ~8x larger, so llama.cpp's F16 KV cache rounding
    # shows more (the KLD stays < 1e-5)
    atol = 1e-2 if m.spec.embed_scale else 2e-3
    assert torch.allclose(got, want, atol=atol, rtol=1e-3), float((got - want).abs().max())
    lp, lq = torch.log_softmax(want.double(), -1), torch.log_softmax(got.double(), -1)
    assert float((lp.exp() * (lp - lq)).sum(-1).mean()) < 1e-5


@pytest.mark.parametrize("arch", DENSE)
def test_prune_every_family_to_hf_folder_loads_back(tiny_hf, tmp_path, arch):
    from transformers import AutoModelForCausalLM
    src = tiny_hf(arch, num_hidden_layers=4)
    m = load(src, progress=False)
    ratio = _ratio(m, 1, 64)
    out = tmp_path / "p"
    assert main(["-q", "prune", str(src), "-o", str(out), "--ratio", repr(ratio), "--heads", "2x1", *CALIB]) == 0
    rep = json.loads((tmp_path / "p.report.json").read_text())
    st = rep["steps"][0]
    assert "layers -2" in st["plan"] and "ffn 64" in st["plan"] and "heads 2 KV x 1 q" in st["plan"]
    back = load(out, progress=False)                    # slimlm's strict loader (shapes against config.json)
    hf = AutoModelForCausalLM.from_pretrained(out)      # and transformers alone
    c = back.config
    assert c["architectures"] == [arch] and c["num_hidden_layers"] == 2 and c["intermediate_size"] == 64
    assert c["num_attention_heads"] == 2 and c["num_key_value_heads"] == 2
    assert back.n_params() == hf.num_parameters() == st["params_after"] == n_params(c) and st["arch"] == arch
    p, st2 = _pruned_in_torch(m, ratio, "2x1", "uniform", False)
    assert st2["plan"] == st["plan"]
    x = _tokens(m)[None]
    assert torch.allclose(back.logits(x), p.logits(x), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert torch.allclose(hf(input_ids=x).logits, p.logits(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch,suffix", [("Qwen3ForCausalLM", ".gguf"), ("Qwen2ForCausalLM", "")])
def test_report_names_the_architecture_of_the_written_file(tiny_hf, tmp_path, arch, suffix):
    """The report's architecture is read back from the output: a GGUF's general.architecture, an HF folder's
    config.json architectures (not a label guessed from the plan)."""
    from slimlm.gguf.reader import read_gguf
    out = tmp_path / f"p{suffix}"
    assert main(["-q", "prune", str(tiny_hf(arch, num_hidden_layers=4)), "-o", str(out), "--ffn", "64",
                 "--type", "F32", "--calib-chunks", "2", "--ctx", "32", "--no-eval"]) == 0
    rep = json.loads(out.with_name(out.name.removesuffix(".gguf") + ".report.json").read_text())
    st = rep["steps"][0]
    if suffix:
        g = read_gguf(out)
        assert st["arch"] == g.architecture == ("deci" if "ffn per layer" in st["plan"] else load(
            tiny_hf(arch, num_hidden_layers=4), progress=False).spec.gguf_arch)
    else:
        assert st["arch"] == json.loads((out / "config.json").read_text())["architectures"][0] == arch
