"""HF folder and safetensors checks before any weight is read (RELIABILITY.md items 1-9)."""
from __future__ import annotations

import json
import shutil
import struct

import pytest

from slimlm import load
from slimlm.errors import InvalidModelError, InvalidSafetensorsError, UnsafeModelError
from slimlm.hf import read_safetensors_header


def st_bytes(header: dict | bytes, data: bytes = b"") -> bytes:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def one(dtype="F32", shape=(2,), offs=(0, 8)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offs)}


SAFETENSORS_BAD = {
    "empty": b"",
    "7 bytes": b"\x01" * 7,
    "header beyond file": struct.pack("<Q", 1000) + b"{}",
    "header 2^64-1": struct.pack("<Q", 2**64 - 1) + b"{}",
    "not utf8": st_bytes(b"\xff\xfe{}"),
    "not json": st_bytes(b"{nope"),
    "truncated json": st_bytes(b'{"a": {"dtype": "F32"'),
    "deeply nested": st_bytes(b"[" * 100000 + b"]" * 100000),
    "duplicate names": st_bytes(b'{"a": ' + json.dumps(one()).encode() + b', "a": '
                                + json.dumps(one()).encode() + b"}", bytes(8)),
    "overlapping": st_bytes({"a": one(offs=(0, 8)), "b": one(offs=(4, 12))}, bytes(12)),
    "gap": st_bytes({"a": one(offs=(0, 8)), "b": one(offs=(12, 20))}, bytes(20)),
    "reversed": st_bytes({"a": one(offs=(8, 0))}, bytes(8)),
    "out of file": st_bytes({"a": one(offs=(0, 8))}, bytes(4)),
    "trailing bytes": st_bytes({"a": one(offs=(0, 8))}, bytes(16)),
    "length mismatch": st_bytes({"a": one(shape=(3,), offs=(0, 8))}, bytes(8)),
    "shape overflow": st_bytes({"a": one(shape=(2**40, 2**40), offs=(0, 8))}, bytes(8)),
    "negative shape": st_bytes({"a": one(shape=(-2,), offs=(0, 8))}, bytes(8)),
    "unknown dtype": st_bytes({"a": one(dtype="F7", offs=(0, 8))}, bytes(8)),
}


@pytest.mark.parametrize("case", sorted(SAFETENSORS_BAD))
def test_bad_safetensors_rejected(tmp_path, case):
    p = tmp_path / "model.safetensors"
    p.write_bytes(SAFETENSORS_BAD[case])
    with pytest.raises(InvalidSafetensorsError) as e:
        read_safetensors_header(p)
    assert str(p) in str(e.value)


def test_valid_safetensors_header(tmp_path):
    p = tmp_path / "m.safetensors"
    p.write_bytes(st_bytes({"__metadata__": {"format": "pt"}, "a": one(), "b": one("F16", (4,), (8, 16))},
                           bytes(16)))
    h = read_safetensors_header(p)
    assert h["a"].shape == (2,) and h["b"].dtype == "F16"


@pytest.fixture
def model_copy(tiny_hf, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_hf("LlamaForCausalLM"), d)
    return d


def _edit_json(p, fn):
    obj = json.loads(p.read_text())
    fn(obj)
    p.write_text(json.dumps(obj))


def test_tiny_model_loads(model_copy):
    m = load(model_copy)
    assert m.spec.gguf_arch == "llama" and m.n_params() > 0


def test_missing_config(model_copy):
    (model_copy / "config.json").unlink()
    with pytest.raises(InvalidModelError, match="config.json is missing"):
        load(model_copy)


def test_invalid_config_json(model_copy):
    (model_copy / "config.json").write_text("{not json")
    with pytest.raises(InvalidModelError, match="invalid JSON"):
        load(model_copy)


def test_unknown_architecture_lists_supported(model_copy):
    _edit_json(model_copy / "config.json", lambda c: c.update(architectures=["GPTNeoXForCausalLM"]))
    with pytest.raises(InvalidModelError, match="supported: LlamaForCausalLM, MistralForCausalLM"):
        load(model_copy)


def test_config_disagreeing_with_shapes_names_tensor(model_copy):
    _edit_json(model_copy / "config.json", lambda c: c.update(intermediate_size=128))
    with pytest.raises(InvalidModelError, match=r"mlp\.(gate|up|down)_proj\.weight.*shape"):
        load(model_copy)


def test_truncated_shard_rejected_before_reading(model_copy):
    p = model_copy / "model.safetensors"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 1000])
    with pytest.raises(InvalidSafetensorsError, match="truncated"):
        load(model_copy)


@pytest.mark.parametrize("shard", ["../x.safetensors", "/etc/passwd", "missing.safetensors"])
def test_index_shard_names_checked(model_copy, shard):
    (model_copy / "model.safetensors").rename(model_copy / "real.safetensors")
    (model_copy / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {"model.norm.weight": shard}}))
    with pytest.raises(InvalidModelError, match="outside the model folder|is missing"):
        load(model_copy)


def test_hf_cache_symlink_layout_accepted(model_copy, tmp_path):
    """Snapshot files are symlinks into a blobs folder outside the snapshot: that must load."""
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    src = model_copy / "model.safetensors"
    shutil.move(src, blobs / "abc123")
    (model_copy / "real.safetensors").symlink_to(blobs / "abc123")
    from slimlm.hf import read_safetensors_header
    names = read_safetensors_header(model_copy / "real.safetensors")
    (model_copy / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": {n: "real.safetensors" for n in names}}))
    assert load(model_copy).n_params() > 0


def test_pickle_only_checkpoint_refused(model_copy):
    (model_copy / "model.safetensors").unlink()
    marker = model_copy.parent / "pwned"
    # a pickle that would create a marker file if it were ever unpickled
    import pickle

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    (model_copy / "pytorch_model.bin").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(UnsafeModelError, match="pickle"):
        load(model_copy)
    assert not marker.exists()


def test_remote_code_refused_and_never_run(model_copy):
    marker = model_copy.parent / "pwned_remote"
    (model_copy / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    _edit_json(model_copy / "config.json",
               lambda c: c.update(auto_map={"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}))
    with pytest.raises(UnsafeModelError, match="remote code"):
        load(model_copy)
    assert not marker.exists()


def test_missing_tokenizer_refused(model_copy):
    (model_copy / "tokenizer.json").unlink()
    with pytest.raises(InvalidModelError, match="tokenizer.json is missing"):
        load(model_copy)


def test_tokenizer_larger_than_embedding(model_copy):
    def add(t):
        t["added_tokens"].append({"id": 10**6, "content": "<x>", "single_word": False, "lstrip": False,
                                  "rstrip": False, "normalized": False, "special": True})
    _edit_json(model_copy / "tokenizer.json", add)
    with pytest.raises(InvalidModelError, match="does not fit the embedding"):
        load(model_copy)


def test_nan_weight_names_tensor(model_copy):
    from safetensors.torch import load_file, save_file
    p = model_copy / "model.safetensors"
    sd = load_file(p)
    sd["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(sd, p, metadata={"format": "pt"})
    from slimlm.errors import NumericsError
    with pytest.raises(NumericsError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*\(3, 5\)"):
        load(model_copy)


# ---- found by the fuzz suite (tests/test_fuzz.py): each was a library traceback or a silently different model
SAFETENSORS_FUZZ = {
    "dtype not a string": st_bytes({"a": {"dtype": {"x": 1}, "shape": [2], "data_offsets": [0, 8]}}, bytes(8)),
    "__metadata__ not an object": st_bytes({"__metadata__": 5, "a": one()}, bytes(8)),
    "__metadata__ value not a string": st_bytes({"__metadata__": {"format": 1}, "a": one()}, bytes(8)),
    "dim beyond 2^63": st_bytes({"a": one(shape=(0, 2**64), offs=(0, 0))}, b""),
    "dims overflow before a zero": st_bytes({"a": one(shape=(2**40, 2**40, 0), offs=(0, 0))}, b""),
}


@pytest.mark.parametrize("case", sorted(SAFETENSORS_FUZZ))
def test_safetensors_header_the_library_refuses_is_refused(tmp_path, case):
    p = tmp_path / "model.safetensors"
    p.write_bytes(SAFETENSORS_FUZZ[case])
    with pytest.raises(InvalidSafetensorsError) as e:
        read_safetensors_header(p)
    assert str(p) in str(e.value)


def test_safetensors_header_limit_is_the_librarys(tmp_path):
    """100,000,001 header bytes: the safetensors library refuses them; so does slimlm, before reading any."""
    import tracemalloc
    p = tmp_path / "model.safetensors"
    with open(p, "wb") as f:
        f.write(struct.pack("<Q", 100_000_001))
        f.truncate(8 + 100_000_001)  # sparse
    tracemalloc.start()
    try:
        with pytest.raises(InvalidSafetensorsError, match="header length 100000001"):
            read_safetensors_header(p)
        assert tracemalloc.get_traced_memory()[1] < 2**20
    finally:
        tracemalloc.stop()


CONFIG_FUZZ = {
    "architectures holds a list": (dict(architectures=[["LlamaForCausalLM"]]), "'architectures' must be a list"),
    "rope_scaling a number": (dict(rope_scaling=5), "rope_scaling must be an object"),
    "rope_scaling a string": (dict(rope_scaling="linear"), "rope_scaling must be an object"),
    "linear rope without factor": (dict(rope_scaling={"rope_type": "linear"}), "rope factor must be"),
    "model_type of another family": (dict(model_type="qwen2"), "model_type 'qwen2' does not match"),
    "attention_bias without bias tensors": (dict(attention_bias=True), "q_proj.bias. is missing from the checkpoint"),
    "torch_dtype unknown": (dict(torch_dtype="float8"), "torch_dtype 'float8'"),
    "pad_token_id beyond the vocabulary": (dict(pad_token_id=49152), "pad_token_id 49152 is not a token id"),
    "eos_token_id a string": (dict(eos_token_id="x"), "eos_token_id x is not a token id"),
    "hidden_act other than silu": (dict(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
    "rms_norm_eps negative": (dict(rms_norm_eps=-1e-5), "rms_norm_eps must be a finite positive"),
    "max_position_embeddings zero": (dict(max_position_embeddings=0), "max_position_embeddings must be"),
    "per-layer widths of another length": (dict(slimlm_per_layer={"intermediate_size": [96]}),
                                           "must list 2 positive integers"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_FUZZ))
def test_config_values_checked_before_transformers(model_copy, case):
    change, pattern = CONFIG_FUZZ[case]
    _edit_json(model_copy / "config.json", lambda c: c.update(change))
    with pytest.raises(InvalidModelError, match=pattern):
        load(model_copy)


def test_config_layer_count_bounded_by_the_tensors(model_copy):
    """10^9 layers used to build a 10^10-entry shape table (minutes, gigabytes) before failing."""
    import time
    _edit_json(model_copy / "config.json", lambda c: c.update(num_hidden_layers=10**9))
    t0 = time.perf_counter()
    with pytest.raises(InvalidModelError, match="num_hidden_layers=1000000000 but the checkpoint holds only"):
        load(model_copy)
    assert time.perf_counter() - t0 < 1.0


def test_qwen3_config_needs_head_dim(tiny_hf, tmp_path):
    d = tmp_path / "q3"
    shutil.copytree(tiny_hf("Qwen3ForCausalLM"), d)
    _edit_json(d / "config.json", lambda c: c.pop("head_dim"))
    with pytest.raises(InvalidModelError, match="head_dim must be a positive integer for Qwen3ForCausalLM"):
        load(d)


@pytest.mark.parametrize("added", [5, [1, 2], "x", None])
def test_tokenizer_added_tokens_not_a_list_of_objects(model_copy, added):
    _edit_json(model_copy / "tokenizer.json", lambda t: t.update(added_tokens=added))
    with pytest.raises(InvalidModelError, match="added_tokens must be a list of objects"):
        load(model_copy)


@pytest.mark.parametrize("change", ["nan", "pre_tokenizer", "merge"])
def test_tokenizer_the_library_refuses_is_refused_before_weights(model_copy, change):
    """Python's json reads NaN, slimlm does not check every tokenizer component: the tokenizers library does,
    in check_hf_dir (its plain Exception used to reach the user from inside transformers)."""
    from slimlm.hf import check_hf_dir
    p = model_copy / "tokenizer.json"
    if change == "nan":
        p.write_text(p.read_text().replace('"version": "1.0"', '"version": "1.0", "extra": NaN', 1))
    elif change == "pre_tokenizer":
        _edit_json(p, lambda t: t.update(pre_tokenizer={"type": "NoSuchPreTokenizer"}))
    else:
        _edit_json(p, lambda t: t["model"]["merges"].insert(0, "zzzq\u00ff qqqz"))
    with pytest.raises(InvalidModelError, match="the tokenizers library cannot read it"):
        check_hf_dir(model_copy)


def test_load_without_progress_prints_no_bars(tiny_hf, tiny_gguf, capfd):
    """load(progress=False) silences transformers' own bars too, for HF folders and GGUF files alike."""
    from slimlm import load
    capfd.readouterr()
    load(tiny_hf("LlamaForCausalLM"), progress=False)
    load(tiny_gguf, progress=False)
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "%|" not in err, err[-500:]
