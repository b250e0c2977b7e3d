"""Scoring against closed-form values; chunking as llama.cpp's perplexity tool does it."""
from __future__ import annotations

import math
import statistics

import pytest
import torch

from slimlm.calib import default_text
from slimlm.errors import ConfigError
from slimlm.eval.metrics import Scores, make_chunks, scored_slice


def test_chunks_replace_first_token_with_bos_and_drop_remainder():
    t = torch.arange(10, 35)
    c = make_chunks(t, 8, bos_id=1, max_chunks=None)
    assert c.shape == (3, 8) and c[:, 0].tolist() == [1, 1, 1] and c[1, 1:].tolist() == list(range(19, 26))
    assert make_chunks(t, 8, None, 2)[:, 0].tolist() == [10, 18]
    with pytest.raises(ConfigError, match="fewer than one chunk"):
        make_chunks(t[:5], 8, None, None)


def test_scored_positions_are_second_half():
    pos, tgt = scored_slice(8)
    assert list(range(8))[pos] == [4, 5, 6] and list(range(8))[tgt] == [5, 6, 7]


def test_uniform_logits_give_vocab_perplexity_and_zero_kld():
    V, T = 50, 7
    s = Scores()
    logits = torch.zeros(T, V)
    s.add(logits, torch.randint(0, V, (T,)), logits.clone())
    r = s.result()
    assert r["ppl"] == pytest.approx(V) and r["kld"] == pytest.approx(0, abs=1e-12)
    assert r["top1_agreement"] == 1.0


def test_kld_matches_closed_form():
    p = torch.tensor([[0.7, 0.2, 0.1]])
    q = torch.tensor([[0.2, 0.5, 0.3]])
    s = Scores()
    s.add(q.log(), torch.tensor([0]), p.log())
    want = sum(pi * math.log(pi / qi) for pi, qi in zip(p[0].tolist(), q[0].tolist(), strict=True))
    r = s.result()
    assert r["kld"] == pytest.approx(want, rel=1e-6)
    assert r["ppl"] == pytest.approx(1 / 0.2, rel=1e-6) and r["ref_ppl"] == pytest.approx(1 / 0.7, rel=1e-6)
    assert r["top1_agreement"] == 0.0


def test_default_texts_are_disjoint_and_deterministic():
    ev, src = default_text("eval")
    ca, _ = default_text("calib")
    assert len(ev) > 50_000 and len(ca) > 200_000 and "index % 4 == 3" in src
    assert ev == default_text("eval")[0]
    from pydoc_data.topics import topics
    assert all((topics[k] in ev) != (topics[k] in ca) for k in topics)  # each topic in exactly one split


def test_eval_reports_the_bits_per_weight_measured_on_disk(tiny_hf, tmp_path, capsys):
    """`slimlm eval` of HF folders reports the bytes of the parameters as stored (16 for a float16 folder, 32
    for float32, the folder's safetensors size), not a constant 32; a model that no longer matches its folder
    reports its in-memory dtypes and no file size."""
    import json

    from slimlm import load
    from slimlm.cli import main
    from slimlm.eval import model_size_info
    from slimlm.hfout import save_hf
    src = tiny_hf("LlamaForCausalLM")
    m = load(src, progress=False)
    f16 = save_hf(m, tmp_path / "f16", dtype="float16")
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    j = tmp_path / "r.json"
    assert main(["-q", "eval", str(f16), "--ref", str(src), "--text", str(text), "--ctx", "64", "--chunks", "1",
                 "--no-speed", "--json", str(j)]) == 0
    r = json.loads(j.read_text())
    assert r["model"]["bits_per_weight"] == 16.0 and r["ref"]["bits_per_weight"] == 32.0
    assert r["model"]["file_bytes"] == (f16 / "model.safetensors").stat().st_size
    assert r["model"]["n_params"] == r["ref"]["n_params"] == m.n_params()
    assert "16.000 bits/weight" in capsys.readouterr().out
    assert model_size_info(load(save_hf(m, tmp_path / "bf16", dtype="bfloat16")))["bits_per_weight"] == 16.0
    changed = load(f16, progress=False)
    changed.module.model.layers = changed.module.model.layers[:1]      # no longer the folder's model
    info = model_size_info(changed)
    assert info["file_bytes"] is None and info["bits_per_weight"] == 32.0 and info["n_params"] < m.n_params()


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Gemma2ForCausalLM"])
def test_logits_of_the_scored_rows_only_equal_the_full_logits_there(tiny_hf, tmp_path, arch, llama_cpp_available):
    """The evaluation asks each runtime for the scored half of a chunk only (the output layer then runs on those
    rows alone); the logits are those of the whole chunk's at the same rows, in torch and in llama.cpp."""
    import slimlm
    from slimlm.eval.runtime import LlamaCppRunner, TorchRunner
    m = slimlm.load(tiny_hf(arch, num_hidden_layers=2), progress=False)
    out = tmp_path / "m.gguf"
    slimlm.export_gguf(m, out, "Q8_0", progress=False)
    chunk = torch.randint(3, m.config["vocab_size"], (64,), generator=torch.Generator().manual_seed(3))
    pos, _ = scored_slice(64)
    t = TorchRunner(m)
    full, part = t.logits(chunk), t.logits(chunk, pos)
    assert part.shape == (31, m.config["vocab_size"]) and torch.allclose(part, full[pos], atol=1e-5, rtol=1e-5)
    r = LlamaCppRunner(out, 64)
    try:
        part, full = r.logits(chunk, pos), r.logits(chunk)
        again = r.logits(chunk, pos)
        assert part.shape == (31, r.n_vocab) and torch.equal(part, again)
        assert torch.allclose(part, full[pos], atol=1e-4, rtol=1e-4), (part - full[pos]).abs().max()
        assert r.speed(chunk[:16], 4)["gen_tps"] > 0             # the context is usable after a partial batch
    finally:
        r.close()


def test_prompt_speed_of_a_fresh_llama_cpp_context_is_measured_like_a_warm_ones(tiny_hf, tmp_path, llama_cpp_available):
    """A decode that needs more logits rows than any before it grows llama.cpp's output buffer, which left its perf
    counters a prompt time of ~0: the demo printed 10^6 prompt tok/s once the evaluation computed only the scored
    rows. speed() warms up with the whole prompt; the first measurement then agrees with later ones."""
    import slimlm
    from slimlm.eval.runtime import LlamaCppRunner
    m = slimlm.load(tiny_hf("LlamaForCausalLM", num_hidden_layers=2), progress=False)
    out = tmp_path / "m.gguf"
    slimlm.export_gguf(m, out, "Q8_0", progress=False)
    chunk = torch.randint(3, m.config["vocab_size"], (64,), generator=torch.Generator().manual_seed(3))
    r = LlamaCppRunner(out, 64)
    try:
        first = r.speed(chunk[:48], 2)["prompt_tps"]
        r.logits(chunk, scored_slice(64)[0])                        # 31 rows: fewer than the prompt's 48
        rest = [r.speed(chunk[:48], 2)["prompt_tps"] for _ in range(3)]
    finally:
        r.close()
    assert all(0.1 < x / statistics.median(rest) < 10 for x in [first, *rest]), (first, rest)
