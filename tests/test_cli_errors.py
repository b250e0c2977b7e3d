"""Every user-reachable error of the CLI ends in one `error: ...` line and exit code 2, never a traceback.

Each option of compress, eval, imatrix, kmeans, sensitivity, inspect, generate and heal (prune: test_prune_cli.py)
gets invalid values: negative/zero/huge counts, bad sizes and types, missing/empty/binary/non-UTF-8 text and
importance files, outputs in a missing folder or onto an input. A check that does not need the model must
fail before it is loaded: loading (torch or llama.cpp) raises `_Loaded` in those cases, which would end
the test with a traceback of its own. argparse's own refusals (usage, exit 2) are accepted for values
argparse types or choices reject.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from slimlm.cli import main


class _Loaded(Exception):
    """Raised by the patched loaders: the command loaded a model before refusing its arguments."""


@pytest.fixture(scope="module")
def P(tmp_path_factory, tiny_hf, tiny_gguf) -> dict:
    d = tmp_path_factory.mktemp("cli_errors")
    files = {"empty": b"", "blank": b" \n\t\n", "garbage": bytes(range(256)) * 8,
             "latin1": "caf\xe9 cr\xe8me br\xfbl\xe9e ".encode("latin-1") * 50,
             "short": b"Too short.", "text": b"The quick brown fox jumps over the lazy dog. " * 200}
    p = {k: d / f"{k}.txt" for k in files}
    for k, v in files.items():
        p[k].write_bytes(v)
    p["garbage_gguf"] = d / "garbage.gguf"
    p["garbage_gguf"].write_bytes(b"GGUF" + bytes(range(200)))
    p["folder"] = d / "a_folder"
    p["folder"].mkdir()
    p["missing"] = d / "missing.txt"
    p["out"] = d / "o.gguf"
    p["nodir_out"] = d / "no" / "such" / "o.gguf"
    p["exists"] = d / "exists.gguf"
    p["exists"].write_bytes(b"keep me")
    p["hf"] = tiny_hf("LlamaForCausalLM")
    p["hf4"] = tiny_hf("LlamaForCausalLM", num_hidden_layers=4)
    p["gguf"] = tiny_gguf
    # healing: an output whose work folder holds an interrupted run's checkpoint; one whose unhealed file exists
    p["interrupted"] = d / "interrupted.gguf"
    (d / "interrupted.heal-work").mkdir()
    (d / "interrupted.heal-work" / "checkpoint.pt").write_bytes(b"not read before loading")
    p["has_unhealed"] = d / "u.gguf"
    (d / "u.unhealed.gguf").write_bytes(b"keep me")
    p["jsonl_bad"] = d / "bad.jsonl"
    p["jsonl_bad"].write_text('{"text": "fine"}\n{"text": 5}\n')
    # an importance matrix of a model with other widths: it does not fit the tiny model's tensors
    import numpy as np

    from slimlm.quant.imatrix import ImportanceMatrix
    other = ImportanceMatrix()
    for i in range(2):
        for t in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up"):
            other.add(f"blk.{i}.{t}.weight", np.ones(48), 10)
    p["wrong_imatrix"] = other.save(d / "wrong.imatrix.gguf")
    nan = ImportanceMatrix()
    for i in range(2):
        for t in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up"):
            nan.add(f"blk.{i}.{t}.weight", np.full(64, np.nan), 10)
    p["nan_imatrix"] = nan.save(d / "nan.imatrix.gguf")
    return {k: str(v) for k, v in p.items()}


@pytest.fixture
def no_loading(monkeypatch):
    """Make every model load (HF, GGUF in torch, GGUF in llama.cpp) raise _Loaded."""
    import slimlm.eval.runtime as runtime
    import slimlm.model as model

    def boom(*a, **k):
        raise _Loaded("the model was loaded before the arguments were checked")
    monkeypatch.setattr(model, "_load_hf", boom)
    monkeypatch.setattr(model, "_load_gguf", boom)
    monkeypatch.setattr(runtime.LlamaCppRunner, "__init__", boom)


def _refused(argv: list[str], capsys) -> str:
    """Run the CLI in-process; exit code 2 with one `error: ...` line (or argparse's usage + error). The tiny
    model's context is 256 tokens: a case that is not about --ctx gets --ctx 64, so that the refusal it
    shows is its own."""
    if argv[0] in ("compress", "eval", "imatrix", "kmeans", "sensitivity", "heal") and "--ctx" not in argv:
        argv = [*argv, "--ctx", "64"]
    try:
        rc = main(["-q", *argv])
    except SystemExit as e:                      # argparse's own refusal
        rc = e.code
        err = capsys.readouterr().err
        assert rc == 2 and "error:" in err.strip().splitlines()[-1], err
        return err
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, (rc, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# (id, argv builder, match) -- checks that need no model: they must fail before any model is loaded
_C, _H = "compress", "heal"


def _heal_argv(extra: list[str]):
    """heal of the tiny GGUF (student) from the tiny HF folder it was exported from (teacher), plus `extra`
    (names of P's files stand for their paths)."""
    return lambda p: [_H, p["gguf"], "--teacher", p["hf"], "-o", p["out"], *[p.get(v, v) for v in extra]]


BEFORE_LOAD = [
    # compress: every option
    ("compress-type", lambda p: [_C, p["hf"], "-o", p["out"], "--type", "Q3_X"], "valid types"),
    ("compress-ctx-0", lambda p: [_C, p["hf"], "-o", p["out"], "--ctx", "0"], "--ctx"),
    ("compress-ctx-neg", lambda p: [_C, p["hf"], "-o", p["out"], "--ctx", "-64"], "--ctx"),
    ("compress-ctx-odd", lambda p: [_C, p["hf"], "-o", p["out"], "--ctx", "65"], "--ctx"),
    ("compress-ctx-huge", lambda p: [_C, p["hf"], "-o", p["out"], "--ctx", str(10**12)], "--ctx"),
    ("compress-ctx-beyond-model", lambda p: [_C, p["hf"], "-o", p["out"], "--ctx", "1024"], "context"),
    ("compress-chunks-neg", lambda p: [_C, p["hf"], "-o", p["out"], "--chunks", "-1"], "--chunks"),
    ("compress-calib-chunks-0", lambda p: [_C, p["hf"], "-o", p["out"], "--calib", "--calib-chunks", "0"],
     "--calib-chunks"),
    ("compress-calib-chunks-neg", lambda p: [_C, p["hf"], "-o", p["out"], "--calib-chunks", "-3"], "--calib-chunks"),
    ("compress-gptq-chunks-0", lambda p: [_C, p["hf"], "-o", p["out"], "--method", "gptq", "--gptq-chunks", "0"],
     "--gptq-chunks"),
    ("compress-sens-chunks-0", lambda p: [_C, p["hf"], "-o", p["out"], "--bpw", "8", "--sensitivity-chunks", "0"],
     "--sensitivity-chunks"),
    ("compress-size-abc", lambda p: [_C, p["hf"], "-o", p["out"], "--target-size", "abc"], "--target-size"),
    ("compress-size-neg", lambda p: [_C, p["hf"], "-o", p["out"], "--target-size", "-5MB"], "--target-size"),
    ("compress-size-0", lambda p: [_C, p["hf"], "-o", p["out"], "--target-size", "0"], "--target-size"),
    ("compress-size-unit", lambda p: [_C, p["hf"], "-o", p["out"], "--target-size", "5 parsecs"], "--target-size"),
    ("compress-size-1KB", lambda p: [_C, p["hf"], "-o", p["out"], "--target-size", "1KB"], "smallest"),
    ("compress-size-and-bpw", lambda p: [_C, p["hf"], "-o", p["out"], "--target-size", "1MB", "--bpw", "4"],
     "either"),
    ("compress-bpw-0", lambda p: [_C, p["hf"], "-o", p["out"], "--bpw", "0"], "--bpw"),
    ("compress-bpw-neg", lambda p: [_C, p["hf"], "-o", p["out"], "--bpw", "-1"], "--bpw"),
    ("compress-bpw-nan", lambda p: [_C, p["hf"], "-o", p["out"], "--bpw", "nan"], "--bpw"),
    ("compress-bpw-inf", lambda p: [_C, p["hf"], "-o", p["out"], "--bpw", "inf"], "--bpw"),
    ("compress-bpw-100", lambda p: [_C, p["hf"], "-o", p["out"], "--bpw", "100"], "--bpw"),
    ("compress-bpw-unreachable", lambda p: [_C, p["hf"], "-o", p["out"], "--bpw", "2.5"], "smallest"),
    ("compress-bpw-text", lambda p: [_C, p["hf"], "-o", p["out"], "--bpw", "four"], "--bpw"),
    ("compress-imatrix-missing", lambda p: [_C, p["hf"], "-o", p["out"], "--imatrix", p["missing"]], "--imatrix"),
    ("compress-imatrix-folder", lambda p: [_C, p["hf"], "-o", p["out"], "--imatrix", p["folder"]], "--imatrix"),
    ("compress-imatrix-empty", lambda p: [_C, p["hf"], "-o", p["out"], "--imatrix", p["empty"]], "imatrix"),
    ("compress-imatrix-garbage", lambda p: [_C, p["hf"], "-o", p["out"], "--imatrix", p["garbage"]], "imatrix"),
    ("compress-imatrix-bad-gguf", lambda p: [_C, p["hf"], "-o", p["out"], "--imatrix", p["garbage_gguf"]], ""),
    ("compress-imatrix-model", lambda p: [_C, p["hf"], "-o", p["out"], "--imatrix", p["gguf"]], "imatrix"),
    ("compress-imatrix-nan", lambda p: [_C, p["hf"], "-o", p["out"], "--imatrix", p["nan_imatrix"]], "NaN"),
    ("compress-calib-missing", lambda p: [_C, p["hf"], "-o", p["out"], "--calib", p["missing"]], "--calib"),
    ("compress-calib-folder", lambda p: [_C, p["hf"], "-o", p["out"], "--calib", p["folder"]], "--calib"),
    ("compress-calib-empty", lambda p: [_C, p["hf"], "-o", p["out"], "--calib", p["empty"]], "empty"),
    ("compress-calib-blank", lambda p: [_C, p["hf"], "-o", p["out"], "--calib", p["blank"]], "empty"),
    ("compress-calib-binary", lambda p: [_C, p["hf"], "-o", p["out"], "--calib", p["garbage"]], "UTF-8"),
    ("compress-calib-latin1", lambda p: [_C, p["hf"], "-o", p["out"], "--calib", p["latin1"]], "UTF-8"),
    ("compress-text-missing", lambda p: [_C, p["hf"], "-o", p["out"], "--text", p["missing"]], "--text"),
    ("compress-text-empty", lambda p: [_C, p["hf"], "-o", p["out"], "--text", p["empty"]], "empty"),
    ("compress-text-binary", lambda p: [_C, p["hf"], "-o", p["out"], "--text", p["garbage"]], "UTF-8"),
    ("compress-text-latin1", lambda p: [_C, p["hf"], "-o", p["out"], "--text", p["latin1"]], "UTF-8"),
    ("compress-method", lambda p: [_C, p["hf"], "-o", p["out"], "--method", "magic"], "--method"),
    ("compress-stream", lambda p: [_C, p["hf"], "-o", p["out"], "--stream", "maybe"], "--stream"),
    ("compress-stream-eval", lambda p: [_C, p["hf"], "-o", p["out"], "--stream", "on"], "--no-eval"),
    ("compress-stream-gguf", lambda p: [_C, p["gguf"], "-o", p["out"], "--stream", "on", "--no-eval"], "GGUF file"),
    ("compress-method-float", lambda p: [_C, p["hf"], "-o", p["out"], "--method", "gptq", "--type", "F16"],
     "quantized"),
    ("compress-act-order-rtn", lambda p: [_C, p["hf"], "-o", p["out"], "--act-order"], "--act-order"),
    ("compress-measure-no-budget", lambda p: [_C, p["hf"], "-o", p["out"], "--measure-effects"],
     "--measure-effects"),
    ("compress-weights-only-price-no-budget", lambda p: [_C, p["hf"], "-o", p["out"], "--weights-only-price"],
     "--weights-only-price"),
    ("compress-pre-tokenizer", lambda p: [_C, p["hf"], "-o", p["out"], "--pre-tokenizer", "nonsense"],
     "pre-tokenizer"),
    ("compress-prune-neg", lambda p: [_C, p["hf"], "-o", p["out"], "--prune", "-0.5"], "--prune"),
    ("compress-prune-0", lambda p: [_C, p["hf"], "-o", p["out"], "--prune", "0"], "--prune"),
    ("compress-prune-1", lambda p: [_C, p["hf"], "-o", p["out"], "--prune", "1"], "--prune"),
    ("compress-prune-nan", lambda p: [_C, p["hf"], "-o", p["out"], "--prune", "nan"], "--prune"),
    ("compress-prune-method", lambda p: [_C, p["hf"], "-o", p["out"], "--prune", "0.2", "--prune-method", "x"],
     "--prune-method"),
    ("compress-prune-allocate", lambda p: [_C, p["hf"], "-o", p["out"], "--prune", "0.2", "--prune-allocate",
                                           "x"], "--prune-allocate"),
    ("compress-format-aware-alone", lambda p: [_C, p["hf"], "-o", p["out"], "--format-aware"], "--prune"),
    ("compress-prune-imatrix", lambda p: [_C, p["hf"], "-o", p["out"], "--prune", "0.2", "--imatrix",
                                          p["wrong_imatrix"]], "--imatrix"),
    ("compress-compare-type", lambda p: [_C, p["hf"], "-o", p["out"], "--compare", "Q9_X"], "valid types"),
    ("compress-compare-no-eval", lambda p: [_C, p["hf"], "-o", p["out"], "--compare", "--no-eval"], "--no-eval"),
    ("compress-compare-budget", lambda p: [_C, p["hf"], "-o", p["out"], "--compare", "--bpw", "8"], "--compare"),
    ("compress-model-missing", lambda p: [_C, p["missing"], "-o", p["out"]], "no such"),
    ("compress-model-garbage", lambda p: [_C, p["garbage"], "-o", p["out"]], "GGUF"),
    ("compress-model-empty-folder", lambda p: [_C, p["folder"], "-o", p["out"]], "config.json"),
    ("compress-out-missing-folder", lambda p: [_C, p["hf"], "-o", p["nodir_out"]], "does not exist"),
    ("compress-out-is-input", lambda p: [_C, p["gguf"], "-o", p["gguf"], "--overwrite"], "input"),
    ("compress-out-is-model-folder", lambda p: [_C, p["hf"], "-o", p["hf"], "--overwrite"], ""),
    ("compress-out-is-folder", lambda p: [_C, p["hf"], "-o", p["folder"]], "folder"),
    ("compress-out-exists", lambda p: [_C, p["hf"], "-o", p["exists"]], "--overwrite"),
    ("compress-out-is-text", lambda p: [_C, p["hf"], "-o", p["text"], "--text", p["text"], "--overwrite"], "input"),
    ("compress-out-is-imatrix", lambda p: [_C, p["hf"], "-o", p["wrong_imatrix"], "--imatrix", p["wrong_imatrix"],
                                           "--overwrite"], "input"),
    ("compress-out-is-calib", lambda p: [_C, p["hf"], "-o", p["text"], "--calib", p["text"], "--overwrite"], "input"),
    # eval
    ("eval-file-missing", lambda p: ["eval", p["missing"], "--ref", p["gguf"]], "missing"),
    ("eval-file-garbage", lambda p: ["eval", p["garbage"], "--ref", p["gguf"]], "GGUF"),
    ("eval-file-folder", lambda p: ["eval", p["folder"], "--ref", p["gguf"]], "config.json"),
    ("eval-ref-missing", lambda p: ["eval", p["gguf"], "--ref", p["missing"]], "missing"),
    ("eval-ref-garbage", lambda p: ["eval", p["gguf"], "--ref", p["garbage_gguf"]], "GGUF"),
    ("eval-ctx-0", lambda p: ["eval", p["hf"], "--ref", p["hf"], "--ctx", "0"], "--ctx"),
    ("eval-ctx-odd", lambda p: ["eval", p["hf"], "--ref", p["hf"], "--ctx", "33"], "--ctx"),
    ("eval-ctx-huge", lambda p: ["eval", p["gguf"], "--ref", p["gguf"], "--ctx", str(10**9)], "--ctx"),
    ("eval-ctx-beyond-model", lambda p: ["eval", p["gguf"], "--ref", p["hf"], "--ctx", "512"], "context"),
    ("eval-chunks-neg", lambda p: ["eval", p["hf"], "--ref", p["hf"], "--chunks", "-2"], "--chunks"),
    ("eval-text-missing", lambda p: ["eval", p["hf"], "--ref", p["hf"], "--text", p["missing"]], "--text"),
    ("eval-text-empty", lambda p: ["eval", p["hf"], "--ref", p["hf"], "--text", p["empty"]], "empty"),
    ("eval-text-binary", lambda p: ["eval", p["hf"], "--ref", p["hf"], "--text", p["garbage"]], "UTF-8"),
    ("eval-text-latin1", lambda p: ["eval", p["gguf"], "--text", p["latin1"]], "UTF-8"),
    ("eval-json-missing-folder", lambda p: ["eval", p["hf"], "--ref", p["hf"], "--json", p["nodir_out"]],
     "does not exist"),
    ("eval-json-is-model", lambda p: ["eval", p["gguf"], "--ref", p["hf"], "--json", p["gguf"]], "input"),
    ("eval-json-is-text", lambda p: ["eval", p["gguf"], "--text", p["text"], "--json", p["text"]], "input"),
    ("eval-json-is-folder", lambda p: ["eval", p["gguf"], "--json", p["folder"]], "folder"),
    # imatrix
    ("imatrix-ctx-0", lambda p: ["imatrix", p["hf"], "-o", p["out"], "--ctx", "0"], "--ctx"),
    ("imatrix-ctx-huge", lambda p: ["imatrix", p["hf"], "-o", p["out"], "--ctx", str(10**12)], "--ctx"),
    ("imatrix-chunks-0", lambda p: ["imatrix", p["hf"], "-o", p["out"], "--chunks", "0"], "--chunks"),
    ("imatrix-chunks-neg", lambda p: ["imatrix", p["hf"], "-o", p["out"], "--chunks", "-5"], "--chunks"),
    ("imatrix-calib-missing", lambda p: ["imatrix", p["hf"], "-o", p["out"], "--calib", p["missing"]], "--calib"),
    ("imatrix-calib-empty", lambda p: ["imatrix", p["hf"], "-o", p["out"], "--calib", p["empty"]], "empty"),
    ("imatrix-calib-binary", lambda p: ["imatrix", p["hf"], "-o", p["out"], "--calib", p["garbage"]], "UTF-8"),
    ("imatrix-out-missing-folder", lambda p: ["imatrix", p["hf"], "-o", p["nodir_out"]], "does not exist"),
    ("imatrix-out-is-input", lambda p: ["imatrix", p["gguf"], "-o", p["gguf"], "--overwrite"], "input"),
    ("imatrix-out-is-calib", lambda p: ["imatrix", p["hf"], "-o", p["text"], "--calib", p["text"], "--overwrite"],
     "input"),
    ("imatrix-out-exists", lambda p: ["imatrix", p["hf"], "-o", p["exists"]], "--overwrite"),
    ("imatrix-model-missing", lambda p: ["imatrix", p["missing"], "-o", p["out"]], "no such"),
    # kmeans
    ("kmeans-bits-0", lambda p: ["kmeans", p["hf"], "-o", p["out"], "--bits", "0"], "--bits"),
    ("kmeans-bits-9", lambda p: ["kmeans", p["hf"], "-o", p["out"], "--bits", "9"], "--bits"),
    ("kmeans-bits-neg", lambda p: ["kmeans", p["hf"], "-o", p["out"], "--bits", "-4"], "--bits"),
    ("kmeans-calib-chunks-0", lambda p: ["kmeans", p["hf"], "-o", p["out"], "--calib", "--calib-chunks", "0"],
     "--calib-chunks"),
    ("kmeans-calib-missing", lambda p: ["kmeans", p["hf"], "-o", p["out"], "--calib", p["missing"]], "--calib"),
    ("kmeans-calib-latin1", lambda p: ["kmeans", p["hf"], "-o", p["out"], "--calib", p["latin1"]], "UTF-8"),
    ("kmeans-ctx-0", lambda p: ["kmeans", p["hf"], "-o", p["out"], "--ctx", "0"], "--ctx"),
    ("kmeans-ctx-huge", lambda p: ["kmeans", p["hf"], "-o", p["out"], "--ctx", str(10**12)], "--ctx"),
    ("kmeans-chunks-neg", lambda p: ["kmeans", p["hf"], "-o", p["out"], "--chunks", "-1"], "--chunks"),
    ("kmeans-text-missing", lambda p: ["kmeans", p["hf"], "-o", p["out"], "--text", p["missing"]], "--text"),
    ("kmeans-text-empty", lambda p: ["kmeans", p["hf"], "-o", p["out"], "--text", p["empty"]], "empty"),
    ("kmeans-out-missing-folder", lambda p: ["kmeans", p["hf"], "-o", p["nodir_out"]], "does not exist"),
    ("kmeans-out-is-input", lambda p: ["kmeans", p["hf"], "-o", p["hf"], "--overwrite"], "own folder"),
    ("kmeans-out-is-file", lambda p: ["kmeans", p["hf"], "-o", p["exists"], "--overwrite"], "file"),
    ("kmeans-out-exists", lambda p: ["kmeans", p["hf"], "-o", p["folder"]], "--overwrite"),
    ("kmeans-model-missing", lambda p: ["kmeans", p["missing"], "-o", p["out"]], "no such"),
    # sensitivity
    ("sens-ratios-abc", lambda p: ["sensitivity", p["hf"], "-o", p["out"], "--ratios", "abc"], "--ratios"),
    ("sens-ratios-0", lambda p: ["sensitivity", p["hf"], "-o", p["out"], "--ratios", "0"], "--ratios"),
    ("sens-ratios-1", lambda p: ["sensitivity", p["hf"], "-o", p["out"], "--ratios", "0.5,1"], "--ratios"),
    ("sens-ratios-neg", lambda p: ["sensitivity", p["hf"], "-o", p["out"], "--ratios", "-0.2"], "--ratios"),
    ("sens-ratios-nan", lambda p: ["sensitivity", p["hf"], "-o", p["out"], "--ratios", "nan"], "--ratios"),
    ("sens-ratios-empty", lambda p: ["sensitivity", p["hf"], "-o", p["out"], "--ratios", ","], "--ratios"),
    ("sens-types-bad", lambda p: ["sensitivity", p["hf"], "-o", p["out"], "--types", "Q9_9"], "Q9_9"),
    ("sens-types-garbage", lambda p: ["sensitivity", p["hf"], "-o", p["out"], "--types", "Q8_0,,%%"], "%%"),
    ("sens-calib-chunks-0", lambda p: ["sensitivity", p["hf"], "-o", p["out"], "--calib-chunks", "0"],
     "--calib-chunks"),
    ("sens-ctx-0", lambda p: ["sensitivity", p["hf"], "-o", p["out"], "--ctx", "0"], "--ctx"),
    ("sens-ctx-huge", lambda p: ["sensitivity", p["hf"], "-o", p["out"], "--ctx", str(10**12)], "--ctx"),
    ("sens-calib-missing", lambda p: ["sensitivity", p["hf"], "-o", p["out"], "--calib", p["missing"]], "--calib"),
    ("sens-calib-binary", lambda p: ["sensitivity", p["hf"], "-o", p["out"], "--calib", p["garbage"]], "UTF-8"),
    ("sens-text-missing", lambda p: ["sensitivity", p["hf"], "-o", p["out"], "--text", p["missing"]], "--text"),
    ("sens-text-empty", lambda p: ["sensitivity", p["hf"], "-o", p["out"], "--text", p["empty"]], "empty"),
    ("sens-out-missing-folder", lambda p: ["sensitivity", p["hf"], "-o", p["nodir_out"]], "does not exist"),
    ("sens-out-exists", lambda p: ["sensitivity", p["hf"], "-o", p["exists"]], "--overwrite"),
    ("sens-out-is-text", lambda p: ["sensitivity", p["hf"], "-o", p["text"], "--text", p["text"], "--overwrite"],
     "input"),
    ("sens-model-missing", lambda p: ["sensitivity", p["missing"], "-o", p["out"]], "no such"),
    # inspect
    ("inspect-missing", lambda p: ["inspect", p["missing"]], "not a file"),
    ("inspect-folder", lambda p: ["inspect", p["folder"]], "not a file"),
    ("inspect-empty", lambda p: ["inspect", p["empty"]], "too small"),
    ("inspect-garbage", lambda p: ["inspect", p["garbage"]], "magic"),
    ("inspect-bad-gguf", lambda p: ["inspect", "--json", p["garbage_gguf"]], ""),
    # generate
    ("generate-missing", lambda p: ["generate", p["missing"], "-p", "hi"], "not a file"),
    ("generate-garbage", lambda p: ["generate", p["garbage"], "-p", "hi"], "magic"),
    ("generate-n-0", lambda p: ["generate", p["gguf"], "-p", "hi", "-n", "0"], "-n"),
    ("generate-n-neg", lambda p: ["generate", p["gguf"], "-p", "hi", "-n", "-3"], "-n"),
    ("generate-n-huge", lambda p: ["generate", p["gguf"], "-p", "hi", "-n", str(10**9)], "-n"),
    ("generate-ctx-0", lambda p: ["generate", p["gguf"], "-p", "hi", "--ctx", "0"], "--ctx"),
    ("generate-ctx-neg", lambda p: ["generate", p["gguf"], "-p", "hi", "--ctx", "-1"], "--ctx"),
    ("generate-ctx-huge", lambda p: ["generate", p["gguf"], "-p", "hi", "--ctx", str(10**9)], "--ctx"),
    ("generate-temp-neg", lambda p: ["generate", p["gguf"], "-p", "hi", "--temp", "-1"], "--temp"),
    ("generate-temp-nan", lambda p: ["generate", p["gguf"], "-p", "hi", "--temp", "nan"], "--temp"),
    ("generate-temp-inf", lambda p: ["generate", p["gguf"], "-p", "hi", "--temp", "inf"], "--temp"),
    ("generate-seed-neg", lambda p: ["generate", p["gguf"], "-p", "hi", "--seed", "-1"], "--seed"),
    ("generate-seed-huge", lambda p: ["generate", p["gguf"], "-p", "hi", "--seed", str(2**64)], "--seed"),
    ("generate-prompt-empty", lambda p: ["generate", p["gguf"], "-p", ""], "prompt"),
    ("generate-no-prompt", lambda p: ["generate", p["gguf"]], "-p"),
    # heal: every option (student = the tiny GGUF, teacher = the tiny HF folder it was exported from)
    *[(f"heal-{name}", _heal_argv(extra), match) for name, extra, match in [
          ("budget-abc", ["--heal", "abc"], "--heal"), ("budget-0", ["--heal", "0"], "--heal"),
          ("budget-neg", ["--heal", "-5m"], "--heal"), ("budget-unit", ["--heal", "3 weeks"], "--heal"),
          ("budget-nan", ["--heal", "nan"], "--heal"),
          ("lr-0", ["--lr", "0"], "--lr"), ("lr-neg", ["--lr", "-1e-4"], "--lr"), ("lr-nan", ["--lr", "nan"], "--lr"),
          ("lr-inf", ["--lr", "inf"], "--lr"), ("lr-text", ["--lr", "fast"], "--lr"),
          ("temperature-0", ["--temperature", "0"], "--temperature"),
          ("temperature-nan", ["--temperature", "nan"], "--temperature"),
          ("ce-weight-neg", ["--ce-weight", "-1"], "--ce-weight"), ("ce-weight-inf", ["--ce-weight", "inf"], "--ce-weight"),
          ("hidden-weight-neg", ["--hidden-weight", "-0.5"], "--hidden-weight"),
          ("hidden-weight-topk", ["--hidden-weight", "1", "--teacher-targets", "topk"], "--teacher-targets full"),
          ("seq-len-4", ["--seq-len", "4"], "--seq-len"), ("seq-len-neg", ["--seq-len", "-32"], "--seq-len"),
          ("seq-len-beyond-model", ["--seq-len", "4096"], "--seq-len"),
          ("micro-batch-0", ["--micro-batch", "0"], "--micro-batch"), ("accum-0", ["--accum", "0"], "--accum"),
          ("topk-0", ["--topk", "0"], "--topk"), ("lora-0", ["--lora", "0"], "--lora"),
          ("lora-with-train-all", ["--lora", "8", "--train", "all"], "--lora"),
          ("train-bad", ["--train", "everything"], "invalid choice"),
          ("precision-bad", ["--precision", "fp8"], "invalid choice"),
          ("teacher-targets-bad", ["--teacher-targets", "some"], "invalid choice"),
          ("device-bad", ["--device", "tpu"], "--device"), ("device-cuda-99", ["--device", "cuda:99"], "--device"),
          ("eval-every-neg", ["--eval-every", "-1"], "--eval-every"),
          ("checkpoint-every-neg", ["--checkpoint-every", "-2"], "--checkpoint-every"),
          ("seed-neg", ["--seed", "-1"], "--seed"), ("seed-huge", ["--seed", str(2**40)], "--seed"),
          ("generate-neg", ["--generate", "-10"], "--generate"),
          ("all-stages-off", ["--no-bias", "--no-blockwise", "--no-e2e"], "every healing stage"),
          ("data-missing", ["--data", "missing"], "--data"), ("data-empty", ["--data", "empty"], "empty"),
          ("data-binary", ["--data", "garbage"], "UTF-8"), ("data-folder", ["--data", "folder"], "--data"),
          ("data-jsonl-bad", ["--data", "jsonl_bad"], "line 2"),
          ("data-no-file", ["--data"], "expected at least one"),
          ("resume-without-checkpoint", ["--resume"], "--resume"),
          ("type", ["--type", "Q3_X"], "valid types"), ("ctx-0", ["--ctx", "0"], "--ctx"),
          ("ctx-beyond-model", ["--ctx", "1024"], "context"), ("chunks-neg", ["--chunks", "-1"], "--chunks"),
          ("text-missing", ["--text", "missing"], "--text"), ("text-binary", ["--text", "garbage"], "UTF-8"),
          ("pre-tokenizer", ["--pre-tokenizer", "nonsense"], "pre-tokenizer"),
          ("hf-dtype", ["--hf-dtype", "float8"], "invalid choice")]],
    ("heal-interrupted-run", lambda p: [_H, p["gguf"], "--teacher", p["hf"], "-o", p["interrupted"]], "--resume"),
    ("heal-student-missing", lambda p: [_H, p["missing"], "--teacher", p["hf"], "-o", p["out"]], "no such"),
    ("heal-student-garbage", lambda p: [_H, p["garbage"], "--teacher", p["hf"], "-o", p["out"]], "GGUF"),
    ("heal-teacher-missing", lambda p: [_H, p["gguf"], "--teacher", p["missing"], "-o", p["out"]], "no such"),
    ("heal-teacher-empty-folder", lambda p: [_H, p["gguf"], "--teacher", p["folder"], "-o", p["out"]],
     "config.json"),
    ("heal-teacher-is-student", lambda p: [_H, p["hf"], "--teacher", p["hf"], "-o", p["out"]], "student itself"),
    ("heal-no-student", lambda p: [_H, "--teacher", p["hf"], "-o", p["out"]], "student"),
    ("heal-out-exists", lambda p: [_H, p["gguf"], "--teacher", p["hf"], "-o", p["exists"]], "--overwrite"),
    ("heal-out-is-student", lambda p: [_H, p["gguf"], "--teacher", p["hf"], "-o", p["gguf"], "--overwrite"],
     "input"),
    ("heal-out-is-data", lambda p: [_H, p["gguf"], "--teacher", p["hf"], "-o", p["text"], "--data", p["text"],
                                    "--overwrite"], "input"),
    ("heal-out-missing-folder", lambda p: [_H, p["gguf"], "--teacher", p["hf"], "-o", p["nodir_out"]],
     "does not exist"),
    ("heal-out-hf-is-student", lambda p: [_H, p["hf"], "--teacher", p["gguf"], "-o", p["hf"], "--overwrite"],
     "input"),
    # healing options of prune and compress
    ("prune-heal-weight-method", lambda p: ["prune", p["hf"], "-o", p["out"], "--method", "wanda", "--sparsity",
                                            "0.5", "--heal", "1k"], "--heal"),
    ("prune-lr-without-heal", lambda p: ["prune", p["hf"], "-o", p["out"], "--ffn", "32", "--lr", "1e-3"],
     "--heal BUDGET"),
    ("prune-resume-without-heal", lambda p: ["prune", p["hf"], "-o", p["out"], "--ffn", "32", "--resume"],
     "--heal BUDGET"),
    ("prune-heal-budget", lambda p: ["prune", p["hf"], "-o", p["out"], "--ffn", "32", "--heal", "soon"], "--heal"),
    ("prune-heal-seq-len", lambda p: ["prune", p["hf"], "-o", p["out"], "--ffn", "32", "--heal", "1k",
                                      "--seq-len", "1024"], "--seq-len"),
    ("prune-heal-interrupted", lambda p: ["prune", p["hf"], "-o", p["interrupted"], "--ffn", "32", "--heal", "1k"],
     "--resume"),
    ("compress-heal-without-prune", lambda p: [_C, p["hf"], "-o", p["out"], "--heal", "1k"], "--prune"),
    ("compress-generate-without-heal", lambda p: [_C, p["hf"], "-o", p["out"], "--prune", "0.01", "--generate",
                                                  "100"], "--heal BUDGET"),
    ("compress-heal-data-missing", lambda p: [_C, p["hf"], "-o", p["out"], "--prune", "0.01", "--heal", "1k",
                                              "--data", p["missing"]], "--data"),
    ("compress-heal-unhealed-exists", lambda p: [_C, p["hf"], "-o", p["has_unhealed"], "--prune", "0.01",
                                                 "--heal", "1k"], "--overwrite"),
    ("compress-heal-resume-nothing", lambda p: [_C, p["hf"], "-o", p["out"], "--prune", "0.01", "--heal", "1k",
                                                "--resume"], "--resume"),
    ("missing-output-option", lambda p: [_C, p["hf"]], "-o"),
    ("unknown-command", lambda p: ["compres", p["hf"]], "invalid choice"),
]


@pytest.mark.parametrize("case", BEFORE_LOAD, ids=[c[0] for c in BEFORE_LOAD])
def test_refused_before_loading_the_model(case, P, no_loading, capsys):
    _, argv, match = case
    t0 = time.perf_counter()
    line = _refused(argv(P), capsys)
    assert match.lower() in line.lower(), line
    assert time.perf_counter() - t0 < 5, "refusing an argument must not take long"
    assert not os.path.exists(P["out"])


# checks that need the model (its tokenizer or tensor shapes): refused after loading, before heavy work
AFTER_LOAD = [
    ("compress-text-too-short", lambda p: [_C, p["hf"], "-o", p["out"], "--text", p["short"], "--ctx", "64"],
     "fewer than one chunk"),
    ("compress-calib-too-short", lambda p: [_C, p["hf"], "-o", p["out"], "--calib", p["short"], "--ctx", "64"],
     "fewer than one chunk"),
    ("compress-imatrix-other-model", lambda p: [_C, p["hf"], "-o", p["out"], "--type", "Q4_0", "--imatrix",
                                                p["wrong_imatrix"]], "48"),
    ("eval-text-too-short", lambda p: ["eval", p["hf"], "--ref", p["hf"], "--text", p["short"], "--ctx", "64"],
     "fewer than one chunk"),
    ("imatrix-calib-too-short", lambda p: ["imatrix", p["hf"], "-o", p["out"], "--calib", p["short"], "--ctx",
                                           "64"], "fewer than one chunk"),
    ("sens-text-too-short", lambda p: ["sensitivity", p["hf"], "-o", p["out"], "--text", p["short"], "--ctx",
                                       "64", "--calib-chunks", "1"], "fewer than one chunk"),
    ("kmeans-calib-too-short", lambda p: ["kmeans", p["hf"], "-o", p["out"] + "_km", "--calib", p["short"],
                                          "--ctx", "64"], "fewer than one chunk"),
    ("kmeans-text-too-short", lambda p: ["kmeans", p["hf"], "-o", p["out"] + "_km", "--text", p["short"],
                                         "--ctx", "64"], "fewer than one chunk"),
    ("generate-prompt-too-long", lambda p: ["generate", p["gguf"], "-p", "word " * 300, "--ctx", "32", "-n", "4"],
     "does not fit"),
    ("generate-not-a-model", lambda p: ["generate", p["wrong_imatrix"], "-p", "hi"], "llama.cpp cannot load"),
    ("eval-not-a-model", lambda p: ["eval", p["wrong_imatrix"], "--text", p["text"]], "llama.cpp cannot load"),
    ("heal-data-holds-eval-text", lambda p: [_H, p["gguf"], "--teacher", p["hf"], "-o", p["out"], "--data",
                                             p["text"], "--text", p["text"], "--seq-len", "32", "--ctx", "64"],
     "contains the evaluation text"),
    ("heal-student-bigger-than-teacher", lambda p: [_H, p["hf4"], "--teacher", p["hf"], "-o", p["out"], "--ctx",
                                                    "64"], "more than the teacher"),
]


@pytest.mark.parametrize("case", AFTER_LOAD, ids=[c[0] for c in AFTER_LOAD])
def test_refused_after_loading_without_a_traceback(case, P, capsys, llama_cpp_available):
    _, argv, match = case
    line = _refused(argv(P), capsys)
    assert match in line, line
    assert not os.path.exists(P["out"]) and not os.path.exists(P["out"] + "_km")


def test_subprocess_stderr_has_no_traceback(P, tmp_path):
    """The real entry point: one line on stderr, exit 2, nothing written."""
    r = subprocess.run([sys.executable, "-m", "slimlm", "compress", P["hf"], "-o", str(tmp_path / "o.gguf"),
                        "--bpw", "nan"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: "), r.stderr
    assert not list(tmp_path.iterdir())
