"""CLI: complete --help, one-line errors with exit 2, inspect and eval on a tiny GGUF."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from slimlm.cli import build_parser, main


@pytest.mark.parametrize("cmd", ["compress", "eval", "inspect", "generate", "prune", "imatrix", "kmeans", "sensitivity"])
def test_help_is_complete(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for action in build_parser()._subparsers._group_actions[0].choices[cmd]._actions:
        for opt in action.option_strings:
            assert opt in out


def _run(*args):
    return subprocess.run([sys.executable, "-m", "slimlm", *args], capture_output=True, text=True, timeout=600)


def test_bad_type_is_one_clear_line(tmp_path):
    r = _run("compress", str(tmp_path / "nope"), "-o", str(tmp_path / "o.gguf"), "--type", "Q3_X")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "valid types" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "o.gguf").exists()


def test_bad_gguf_is_one_clear_line(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(40))
    r = _run("inspect", str(bad))
    assert r.returncode == 2 and "error:" in r.stderr and "Traceback" not in r.stderr


def test_inspect_tiny(tiny_gguf, capsys):
    assert main(["inspect", str(tiny_gguf)]) == 0
    out = capsys.readouterr().out
    assert "blk.0.attn_q.weight" in out and "32.000 bits/weight" in out and "tokenizer.ggml.pre = smollm" in out
    assert main(["inspect", "--json", str(tiny_gguf)]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["type_counts"]["F32"] == d["n_tensors"]


def test_eval_quantized_gguf_against_the_original(tiny_hf, tiny_gguf, tmp_path, llama_cpp_available):
    """A Q8_0 GGUF of the tiny model against its F32 original, both in llama.cpp: the KL divergence is
    measured, positive and small, the sizes are each file's own. Only the self-evaluation (the same file
    against itself, the same runtime, the same tokens) claims exactly zero."""
    from slimlm import export_gguf, load
    q8 = tmp_path / "tiny-q8_0.gguf"
    export_gguf(load(tiny_hf("LlamaForCausalLM"), progress=False), q8, "Q8_0", progress=False)
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    j = tmp_path / "r.json"
    assert main(["-q", "eval", str(q8), "--ref", str(tiny_gguf), "--text", str(text), "--ctx", "64",
                 "--chunks", "3", "--json", str(j)]) == 0
    r = json.loads(j.read_text())
    assert r["n_scored_tokens"] == 3 * 31
    assert 0 < r["kld"] < 1e-3 and r["kld_max"] >= r["kld"] and r["top1_agreement"] > 0.9
    assert r["ppl"] != r["ref_ppl"]
    assert 8.5 <= r["model"]["bits_per_weight"] < 9 and r["ref"]["bits_per_weight"] == 32.0
    assert r["model"]["file_bytes"] == q8.stat().st_size < r["ref"]["file_bytes"] == tiny_gguf.stat().st_size
    assert r["model"]["speed"]["gen_tps"] > 0
    assert main(["-q", "eval", str(tiny_gguf), "--ref", str(tiny_gguf), "--text", str(text), "--ctx", "64",
                 "--chunks", "3", "--no-speed", "--json", str(j), ]) == 0
    r = json.loads(j.read_text())
    assert r["kld"] == 0.0 and r["kld_max"] == 0.0 and r["top1_agreement"] == 1.0 and r["ppl"] == r["ref_ppl"]
