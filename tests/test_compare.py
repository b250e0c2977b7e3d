"""`compress --compare`: llama.cpp's own quantization of the same model, evaluated on the same tokens."""
from __future__ import annotations

import importlib
import json

import pytest

from slimlm.baseline import baseline_path
from slimlm.cli import main
from slimlm.gguf.reader import read_gguf


def _text(tmp_path):
    t = tmp_path / "t.txt"
    t.write_text("The quick brown fox jumps over the lazy dog; a lazy dog sleeps in the sun. " * 60)
    return t


def _same_tensors(a, b) -> bool:
    ga, gb = read_gguf(a), read_gguf(b)
    tb = {t.name: t for t in gb.tensors}
    return len(ga.tensors) == len(tb) and all(
        t.ggml_type == tb[t.name].ggml_type and (ga.raw(t) == gb.raw(tb[t.name])).all() for t in ga.tensors)


@pytest.mark.parametrize("type_, calib", [("Q8_0", False), ("Q4_0", True)])
def test_compare_rtn_matches_llama_cpp_byte_for_byte(tiny_hf, tmp_path, llama_cpp_available, capsys, type_, calib):
    """slimlm's RTN encoders are llama.cpp's: with --compare the two files hold the same tensors (the same
    importance matrix reached llama.cpp when --calib made one), so every measured ratio is exactly 1."""
    text = _text(tmp_path)
    out = tmp_path / "o.gguf"
    args = ["compress", str(tiny_hf("LlamaForCausalLM")), "-o", str(out), "--type", type_, "--compare",
            "--text", str(text), "--ctx", "64", "--chunks", "3", "--no-speed"]
    if calib:
        args += ["--calib", str(text), "--calib-chunks", "4"]
    assert main(["-q", *args]) == 0
    printed = capsys.readouterr().out
    base = baseline_path(out)
    assert base.name == "o.llama-cpp.gguf" and base.is_file()
    assert _same_tensors(out, base)
    rep = json.loads(out.with_suffix(".report.json").read_text())
    b = rep["baseline"]
    assert b["type"] == type_ and b["imatrix"] is calib
    assert b["evaluation"]["kld"] == rep["evaluation"]["kld"] > 0
    assert b["evaluation"]["n_scored_tokens"] == rep["evaluation"]["n_scored_tokens"] == 3 * 31
    assert "slimlm / llama.cpp (same tokens, same run): size 1.000x, KL divergence 1.000x" in printed
    md = out.with_suffix(".report.md").read_text()
    assert f"## Against llama.cpp's own {type_}" in md
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # the F32 intermediate is gone


def test_compare_gptq_differs_from_llama_cpp(tiny_hf, tmp_path, llama_cpp_available):
    """GPTQ writes other levels than llama.cpp's rounding: the files differ, both are evaluated."""
    text = _text(tmp_path)
    out = tmp_path / "g.gguf"
    assert main(["-q", "compress", str(tiny_hf("LlamaForCausalLM")), "-o", str(out), "--type", "Q4_0",
                 "--method", "gptq", "--calib", str(text), "--calib-chunks", "4", "--compare", "--text", str(text),
                 "--ctx", "64", "--chunks", "3", "--no-speed"]) == 0
    rep = json.loads(out.with_suffix(".report.json").read_text())
    assert not _same_tensors(out, baseline_path(out))
    assert rep["baseline"]["imatrix"] is True
    assert rep["baseline"]["evaluation"]["kld"] != rep["evaluation"]["kld"]


@pytest.mark.parametrize("extra, msg", [
    (["--compare", "--no-eval"], "drop --no-eval"),
    (["--compare", "--target-size", "1MiB"], "name the llama.cpp preset"),
    (["--compare", "Q3_X"], "valid types"),
])
def test_compare_refusals_before_loading(tmp_path, capsys, monkeypatch, extra, msg):
    monkeypatch.setattr(importlib.import_module("slimlm.compress"), "load", lambda *a, **k: pytest.fail("loaded the model"))
    assert main(["compress", "-o", str(tmp_path / "o.gguf"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and msg in err


def test_compare_refuses_existing_baseline_before_loading(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(importlib.import_module("slimlm.compress"), "load", lambda *a, **k: pytest.fail("loaded the model"))
    out = tmp_path / "o.gguf"
    baseline_path(out).write_bytes(b"keep")
    assert main(["compress", "-o", str(out), "--compare"]) == 2
    assert "o.llama-cpp.gguf already exists" in capsys.readouterr().err
    assert baseline_path(out).read_bytes() == b"keep" and not out.exists()


def test_f32_intermediate_left_by_a_killed_run_is_removed(tiny_hf, tmp_path, llama_cpp_available):
    """A kill -9 during --compare leaves the F32 scratch folder (named as llama.cpp's file's temp, from a dead
    pid): the next run removes it, and leaves none of its own."""
    out = tmp_path / "o.gguf"
    dead = baseline_path(out).parent / f".{baseline_path(out).name}.tmp-999999999-abcd"
    dead.mkdir()
    (dead / "f32.gguf").write_bytes(b"x" * 1024)
    text = _text(tmp_path)
    assert main(["-q", "compress", str(tiny_hf("LlamaForCausalLM")), "-o", str(out), "--type", "Q8_0", "--compare",
                 "--text", str(text), "--ctx", "64", "--chunks", "1", "--no-speed"]) == 0
    assert not dead.exists() and baseline_path(out).is_file()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
