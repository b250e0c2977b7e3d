"""`slimlm prune` refuses every invalid argument value with one `error:` line and exit code 2, no traceback:
values that need no model before the model is loaded, values that need the model's shapes right after loading
and before any calibration work."""
from __future__ import annotations

import pytest

from slimlm.cli import main


def _no_load(*_a, **_k):
    raise AssertionError("the model was loaded before the arguments were checked")


def _no_calibration(*_a, **_k):
    raise AssertionError("calibration work started before the arguments were checked")


def _run(capsys, argv: list[str]) -> str:
    rc = main(["-q", "prune", *argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err     # one line, the last one
    assert "Traceback" not in err
    return errors[0]


@pytest.mark.parametrize("args,msg", [
    (["--ratio", "0.3", "--hidden", "0"], "--hidden"),
    (["--hidden", "-4"], "--hidden"),
    (["--ffn", "0"], "--ffn"),
    (["--ffn", "-1"], "--ffn"),
    (["--ratio", "0.3", "--calib-chunks", "0"], "--calib-chunks"),
    (["--ratio", "0.3", "--calib-chunks", "-2"], "--calib-chunks"),
    (["--ratio", "0.3", "--text", "MISSING"], "--text"),
    (["--ratio", "0.3", "--calib", "MISSING"], "--calib"),
    (["--ratio", "0.3", "--calib", "DIR"], "--calib"),
    (["--ratio", "-0.2"], "--ratio"),
    (["--ratio", "nan"], "--ratio"),
    (["--ratio", "inf"], "--ratio"),
    (["--ratio", "0"], "--ratio"),
    (["--ratio", "1"], "--ratio"),
    (["--heads", "0x2"], "--heads"),
    (["--heads", "2x0"], "--heads"),
    (["--heads", "2x2x2"], "--heads"),
    (["--heads", "x"], "--heads"),
    (["--heads=-1x2"], "--heads"),
    (["--drop-layers", "-1"], "--drop-layers"),
    (["--drop-layers", "1,1"], "--drop-layers"),
    (["--drop-layers", "a,b"], "--drop-layers"),
    (["--drop-layers", "1,,2"], "--drop-layers"),
    (["--method", "wanda", "--sparsity", "1.5"], "sparsity"),
    (["--method", "wanda", "--sparsity", "-0.1"], "sparsity"),
    (["--method", "wanda", "--sparsity", "nan"], "sparsity"),
    (["--method", "wanda", "--sparsity", "3:2"], "sparsity"),
    (["--method", "wanda", "--sparsity", "2:0"], "sparsity"),
    (["--method", "wanda", "--sparsity", "0:4"], "sparsity"),
    (["--method", "wanda", "--sparsity", "2:4:8"], "sparsity"),
    (["--method", "sparsegpt", "--sparsity", "half"], "sparsity"),
    (["--ratio", "0.3", "--type", "Q9_Z"], "Q9_Z"),
    (["--ratio", "0.3", "--layer-share", "nan"], "--layer-share"),
    (["--ratio", "0.3", "--layer-share", "-0.5"], "--layer-share"),
    (["--ratio", "0.3", "--ctx", "0"], "--ctx"),
    (["--ratio", "0.3", "--ctx", "-64"], "--ctx"),
    (["--ratio", "0.3", "--chunks", "-1"], "--chunks"),
    (["--method", "wanda", "--sparsity", "0.5", "--format-aware"], "--format-aware"),
    (["--method", "layers", "--ratio", "0.3", "--allocate", "global"], "--allocate"),
    (["--ratio", "0.3", "--steps", "0"], "--steps"),
    (["--ratio", "0.3", "--steps", "-2"], "--steps"),
    (["--ratio", "0.3", "--steps", "2"], "--steps K prunes in K rounds"),
    (["--ratio", "0.3", "--steps", "2", "--heal", "1k", "--method", "width"], "MLP neurons and layers only"),
    (["--ratio", "0.3", "--steps", "2", "--heal", "1k", "--heads", "2x2"], "MLP neurons and layers only"),
    (["--ratio", "0.3", "--steps", "2", "--heal", "1k", "--resume"], "each round heals anew"),
])
def test_invalid_prune_value_is_one_error_line_before_loading(tmp_path, capsys, monkeypatch, args, msg):
    monkeypatch.setattr("slimlm.model.load", _no_load)
    monkeypatch.setattr("slimlm.calib.calibration_chunks", _no_calibration)
    (tmp_path / "DIR").mkdir()
    args = [str(tmp_path / a) if a in ("MISSING", "DIR") else a for a in args]
    line = _run(capsys, [str(tmp_path / "model"), "-o", str(tmp_path / "o.gguf"), *args])
    assert msg in line
    assert not (tmp_path / "o.gguf").exists()


@pytest.mark.parametrize("args,msg", [
    (["--drop-layers", "2"], "--drop-layers"),           # the model has layers 0 and 1
    (["--drop-layers", "0,1"], "--drop-layers"),         # no layer left
    (["--ratio", "0.1", "--drop-layers", "7"], "--drop-layers"),
    (["--ffn", "200"], "--ffn"),                         # wider than the model's 96
    (["--hidden", "65"], "--hidden"),                    # wider than the model's 64
    (["--heads", "3x1"], "--heads"),                     # the model has 2 KV heads
    (["--heads", "1x3"], "--heads"),                     # ... of 2 query heads each
    (["--method", "wanda", "--sparsity", "2:7"], "2:7"),  # 64 inputs do not split into groups of 7
    (["--method", "magnitude", "--sparsity", "1:128"], "1:128"),
])
def test_values_that_need_the_model_are_refused_before_calibration(tiny_hf, tmp_path, capsys, monkeypatch, args,
                                                                    msg):
    monkeypatch.setattr("slimlm.calib.calibration_chunks", _no_calibration)
    line = _run(capsys, [str(tiny_hf("LlamaForCausalLM")), "-o", str(tmp_path / "o.gguf"), *args])
    assert msg in line
    assert not (tmp_path / "o.gguf").exists()


def test_sparsegpt_with_a_group_of_3_runs_through_the_cli(tiny_hf, tmp_path):
    """2:3 on a model whose widths are multiples of 3 (hidden 48, ffn 96): accepted and applied."""
    import json
    out = tmp_path / "w"
    assert main(["-q", "prune", str(tiny_hf("LlamaForCausalLM", hidden_size=48)), "-o", str(out), "--method",
                 "sparsegpt", "--sparsity", "2:3", "--calib-chunks", "1", "--ctx", "32", "--no-eval"]) == 0
    st = json.loads((tmp_path / "w.report.json").read_text())["steps"][0]
    assert st["pattern"] == "2:3" and st["sparsity"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("args", [["--hidden", "1"], ["--hidden", "30", "--heads", "2x2"]])
def test_hf_folder_transformers_would_refuse_is_refused_before_calibration(tiny_hf, tmp_path, capsys, monkeypatch,
                                                                           args):
    """An HF folder is only useful if transformers loads it: a hidden size that is no multiple of the query heads
    is refused right after loading, and no folder is written (it used to be written, then fail to reload)."""
    monkeypatch.setattr("slimlm.calib.calibration_chunks", _no_calibration)
    out = tmp_path / "o"
    line = _run(capsys, [str(tiny_hf("LlamaForCausalLM")), "-o", str(out), *args])
    assert "transformers" in line and "--hidden" in line and "not a multiple" in line
    assert not out.exists() and not (tmp_path / "o.report.json").exists()


@pytest.mark.parametrize("allocate", ["global", "sensitivity"])
def test_per_layer_widths_for_a_qwen_model_are_refused_before_calibration(tiny_hf, tmp_path, capsys, monkeypatch,
                                                                           allocate):
    """Per-layer MLP widths are llama.cpp's deci arch, Llama family only: asked for explicitly on Qwen3 they are
    refused right after loading (the default for Qwen is uniform widths)."""
    monkeypatch.setattr("slimlm.calib.calibration_chunks", _no_calibration)
    line = _run(capsys, [str(tiny_hf("Qwen3ForCausalLM")), "-o", str(tmp_path / "o.gguf"), "--ratio", "0.01",
                         "--allocate", allocate])
    assert f"--allocate {allocate}" in line and "Qwen3ForCausalLM takes --allocate uniform" in line


@pytest.mark.parametrize("case", ["non-empty", "a file", "the model's own folder"])
def test_hf_output_folder_is_refused_before_loading(tiny_hf, tmp_path, capsys, monkeypatch, case):
    """An HF-folder output that cannot be written is refused before the model is loaded (was: after)."""
    monkeypatch.setattr("slimlm.model.load", _no_load)
    monkeypatch.setattr("slimlm.prune.command.load", _no_load, raising=False)
    src = tiny_hf("LlamaForCausalLM")
    out = tmp_path / "out"
    if case == "non-empty":
        out.mkdir()
        (out / "keep.txt").write_text("keep")
    elif case == "a file":
        out.write_text("keep")
    else:
        out = src
    msg = _run(capsys, [str(src), "-o", str(out), "--ratio", "0.2"])
    assert {"non-empty": "--overwrite", "a file": "is a file", "the model's own folder": "own folder"}[case] in msg
    if case != "the model's own folder":
        assert (out / "keep.txt" if case == "non-empty" else out).read_text() == "keep"
