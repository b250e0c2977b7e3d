"""Model-level GGUF checks (slimlm.gguf.checks) through `slimlm.load`, and `slimlm inspect` on odd metadata.

Each case was found by the fuzz suite (tests/test_fuzz.py): before the checks, transformers' GGUF loader met
these files first and ended in its own traceback (RuntimeError about sizes, tokenizers' Exception, IndexError,
NotImplementedError) or built a different model than the file describes.
"""
from __future__ import annotations

import json

import pytest
from fuzz_gguf import KV, V, serialize
from fuzz_inputs import tiny_model_spec

from slimlm import load
from slimlm.cli import main
from slimlm.errors import InvalidGGUFError


def _set(spec, key, value, vtype=None):
    kv = next((k for k in spec.kvs if k.key == key), None)
    if kv is None:
        spec.kvs.append(KV(key, vtype, value))
    else:
        kv.value, kv.vtype = value, vtype or kv.vtype
    return spec


def _drop(spec, key):
    spec.kvs = [k for k in spec.kvs if k.key != key]
    return spec


def _ttype(spec, name, ttype):
    t = next(t for t in spec.tensors if t.name == name)
    t.ttype = ttype
    t.data = bytes(t.ne[0] * t.ne[1])  # I8: one byte per element
    return spec


DEFECTS = {
    "block_count disagrees with the tensors": (
        lambda: _set(tiny_model_spec(), "llama.block_count", 2), r"block_count=2 but the file holds only"),
    "embedding_length disagrees with the tensors": (
        lambda: _set(tiny_model_spec(), "llama.embedding_length", 16), r"token_embd.weight has shape \[16, 8\]"),
    "feed_forward_length disagrees": (
        lambda: _set(tiny_model_spec(), "llama.feed_forward_length", 32), r"ffn_\w+\.weight has shape"),
    "qwen3 value size other than its key size": (
        lambda: _set(tiny_model_spec("qwen3"), "qwen3.attention.value_length", 4),
        r"value_length=4 but transformers builds qwen3 with head size 8"),
    "qwen2 without head_count_kv": (
        lambda: _drop(tiny_model_spec("qwen2"), "qwen2.attention.head_count_kv"), r"head_count_kv is missing"),
    "merge whose result is not a token": (
        lambda: _set(tiny_model_spec(), "tokenizer.ggml.merges", (V.STRING, ["a c"])), r"merges item 0 'a c'"),
    "bos id beyond the vocabulary": (
        lambda: _set(tiny_model_spec(), "tokenizer.ggml.bos_token_id", 16), r"bos_token_id=16 is not a token id"),
    "general.name 'mistral'": (
        lambda: _set(tiny_model_spec(), "general.name", "mistral"), r"exactly 'mistral'"),
    "context_length as UINT64": (
        lambda: _set(tiny_model_spec(), "llama.context_length", 64, V.UINT64), r"context_length has type UINT64"),
    "rms epsilon NaN": (
        lambda: _set(tiny_model_spec(), "llama.attention.layer_norm_rms_epsilon", float("nan")),
        r"layer_norm_rms_epsilon must be a finite positive FLOAT32"),
    "token_type shorter than tokens": (
        lambda: _set(tiny_model_spec(), "tokenizer.ggml.token_type", (V.INT32, [1, 1])), r"token_type has 2 items"),
    "weight of type I8": (lambda: _ttype(tiny_model_spec(), "token_embd.weight", 24),
                          r"token_embd.weight has type I8, which transformers' GGUF loader cannot read"),
    "key of another architecture": (lambda: _set(tiny_model_spec("qwen2"), "llama.block_count", 2, V.UINT32),
                                    r"key 'llama.block_count' belongs to architecture 'llama', not 'qwen2'"),
    "unknown tokenizer model": (
        lambda: _set(tiny_model_spec(), "tokenizer.ggml.model", "bert"), r"tokenizer.ggml.model is 'bert'"),
}


@pytest.mark.parametrize("case", sorted(DEFECTS))
def test_model_gguf_defect_is_one_clear_error(tmp_path, case):
    make, pattern = DEFECTS[case]
    p = tmp_path / "m.gguf"
    p.write_bytes(serialize(make())[0])
    with pytest.raises(InvalidGGUFError, match=pattern) as e:
        load(p, progress=False)
    assert str(p) in str(e.value)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_valid_tiny_gguf_loads(tmp_path, arch):
    p = tmp_path / "m.gguf"
    p.write_bytes(serialize(tiny_model_spec(arch, tied=arch == "qwen2"))[0])
    m = load(p, progress=False)
    assert m.spec.gguf_arch == arch and m.config["vocab_size"] == 16
    assert m.logits(m.tokenizer("abc", return_tensors="pt").input_ids).isfinite().all()


def test_loadable_types_are_the_ones_gguf_py_dequantizes():
    import numpy as np
    from gguf import GGML_QUANT_SIZES
    from gguf.quants import dequantize

    from slimlm.gguf.checks import LOADABLE_TYPES
    for t in LOADABLE_TYPES:
        block, size = GGML_QUANT_SIZES[t]
        assert dequantize(np.zeros(size, dtype=np.uint8), t).size == block, t.name


def test_default_model_passes_the_checks():
    from slimlm.gguf.checks import check_model_gguf
    from slimlm.gguf.reader import read_gguf
    from slimlm.model import default_model_path
    cfg, spec = check_model_gguf(read_gguf(default_model_path()))
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["head_dim"]) == (30, 576, 64)


# ---- slimlm inspect ----------------------------------------------------------------------------------------
INSPECT = {
    "file_type array": lambda s: _set(s, "general.file_type", (V.UINT32, [7, 7]), V.ARRAY),
    "file_type inf": lambda s: _set(s, "general.file_type", float("inf"), V.FLOAT32),
    "block_count string": lambda s: _set(_set(s, "general.file_type", 7), "llama.block_count", "x", V.STRING),
    "head_count array": lambda s: _set(_set(s, "general.file_type", 7), "llama.attention.head_count",
                                       (V.UINT32, [2]), V.ARRAY),
    "architecture int": lambda s: _set(_set(s, "general.file_type", 7), "general.architecture", 5, V.UINT32),
}


@pytest.mark.parametrize("case", sorted(INSPECT))
@pytest.mark.parametrize("as_json", [False, True])
def test_inspect_describes_odd_metadata(tmp_path, capsys, case, as_json):
    p = tmp_path / "m.gguf"
    p.write_bytes(serialize(INSPECT[case](tiny_model_spec()))[0])
    assert main(["inspect", str(p)] + (["--json"] if as_json else [])) == 0
    out = capsys.readouterr().out
    if as_json:
        assert json.loads(out)["n_tensors"] == 12
    else:
        assert "tokenizer.ggml.tokens" in out


def test_inspect_escapes_control_characters(tmp_path, capsys):
    spec = _set(tiny_model_spec(), "general.name", "\x1b[2J\x1b]0;owned\x07evil\u202etxt.exe")
    p = tmp_path / "m.gguf"
    p.write_bytes(serialize(spec)[0])
    assert main(["inspect", str(p)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out
    assert "general.name = \\x1b[2J\\x1b]0;owned\\x07evil\\u202etxt.exe" in out
