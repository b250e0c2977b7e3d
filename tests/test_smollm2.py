"""Real-model tests on the embedded SmolLM2-135M-Instruct (slow: skip locally with -m 'not slow')."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch

from slimlm import export_gguf, load
from slimlm.eval.runtime import LlamaCppRunner
from slimlm.gguf.reader import read_gguf

pytestmark = pytest.mark.slow

PROBE = ("Hello, world! It's 3.14159 -- or 22/7? Prices: $1,234.56 (approx.) on 2024-01-31.\n\n"
         "   Indented\ttabs\t\tand   runs of spaces    here.\n"
         "Unicode: naïve café, Zürich, 日本語のテキスト, Ελληνικά, emoji 🚀🦙 ✅.\n"
         "Code: def f(x):\n    return x**2 + 1  # comment\n<|im_start|>user\nhi<|im_end|>")


def _equal(a, b) -> bool:
    return np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b


def test_gguf_round_trip_f32_is_bit_exact(smollm2, tmp_path):
    out = tmp_path / "rt.gguf"
    export_gguf(smollm2, out, "F32", progress=False)
    src, dst = read_gguf(smollm2.source), read_gguf(out)
    assert [t.name for t in dst.tensors] == [t.name for t in src.tensors]
    for t in src.tensors:
        want = gguf.quants.dequantize(np.asarray(src.raw(t)), t.ggml_type).reshape(t.shape).astype(np.float32)
        d = dst.tensor(t.name)
        assert d.ggml_type == gguf.GGMLQuantizationType.F32
        got = np.asarray(dst.raw(d)).view(np.float32).reshape(d.shape)
        assert np.array_equal(got, want), t.name
    tok_keys = [k for k in src.fields if k.startswith("tokenizer.")]
    assert len(tok_keys) >= 10
    for k in tok_keys:
        assert dst.fields[k].type == src.fields[k].type and _equal(dst.fields[k].value, src.fields[k].value), k
    for k in src.fields:  # every other key too, except the file type that changed
        if not k.startswith("GGUF.") and k != "general.file_type":
            assert _equal(dst.fields[k].value, src.fields[k].value), k


def test_hf_dir_export_tokenizes_and_computes_like_torch(smollm2_hf_dir, tmp_path, llama_cpp_available):
    m = load(smollm2_hf_dir)
    out = tmp_path / "hf.gguf"
    export_gguf(m, out, "F32", progress=False)
    g = read_gguf(out)
    assert g.get("tokenizer.ggml.pre") == "smollm" and g.get("tokenizer.ggml.model") == "gpt2"
    assert g.get("tokenizer.chat_template") == m.tokenizer.chat_template
    r = LlamaCppRunner(out, 256)
    try:
        ids_cpp = r.llm.tokenize(PROBE.encode(), add_bos=False, special=True)  # HF parses specials too
        ids_hf = m.tokenizer(PROBE, add_special_tokens=False)["input_ids"]
        assert ids_cpp == ids_hf
        tokens = torch.tensor(ids_hf[:128])
        got, ref = r.logits(tokens), m.logits(tokens[None])[0]
    finally:
        r.close()
    rel = float((got - ref).abs().max() / ref.abs().max())
    print(f"max relative logit error llama.cpp vs torch (F32): {rel:.3e}")
    assert rel < 2e-3
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.99


def test_default_compress_cli_runs_in_llama_cpp(tmp_path, llama_cpp_available):
    out = tmp_path / "smollm2.gguf"
    r = subprocess.run([sys.executable, "-m", "slimlm", "-q", "compress", "-o", str(out), "--chunks", "4"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"wrote {out}" in r.stdout
    m = re.search(r"perplexity\s+([\d.]+) \(original, torch\) -> ([\d.]+)", r.stdout)
    assert m and 1 < float(m[1]) < 100 and abs(float(m[2]) / float(m[1]) - 1) < 0.05
    kld = float(re.search(r"KL divergence ([\d.]+)", r.stdout)[1])
    assert 0 < kld < 0.02
    rep = json.loads(out.with_suffix(".report.json").read_text())
    assert rep["export"]["type"] == "Q8_0" and rep["evaluation"]["kld"] == pytest.approx(kld, rel=1e-3)
    assert out.with_suffix(".report.md").read_text().startswith("# slimlm report")
    g = subprocess.run([sys.executable, "-m", "slimlm", "generate", str(out), "--chat", "-n", "40",
                        "-p", "Tell me about the sun."], capture_output=True, text=True, timeout=600)
    assert g.returncode == 0, g.stderr[-2000:]
    print(g.stdout)
    words = [w.lower() for w in re.findall(r"[A-Za-z]+", g.stdout)]
    assert "sun" in words and len(words) >= 15
    assert sum(w in _COMMON for w in words) >= 0.3 * len(words)  # English function words, not gibberish
    g = subprocess.run([sys.executable, "-m", "slimlm", "generate", str(out), "-n", "8",
                        "-p", "The capital of France is"], capture_output=True, text=True, timeout=600)
    assert "Paris" in g.stdout


_COMMON = {"the", "is", "of", "and", "a", "an", "it", "its", "it's", "s", "that", "with", "in", "on", "to",
           "as", "by", "for", "sun", "star", "earth", "light", "our", "which", "this", "are", "was", "at",
           "from", "has", "be", "about", "around", "but", "or", "hot", "gas", "massive", "ball", "solar",
           "system", "center", "energy", "i", "you", "glowing", "warm", "golden", "celestial", "body", "orbits",
           "shines", "we", "very", "large", "big", "bright", "heat", "called", "made", "so", "also"}
