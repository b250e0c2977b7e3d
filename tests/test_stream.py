"""Models bigger than RAM (slimlm/lazy.py): a streamed model keeps its matrices on disk and every pass reads one
layer at a time; its files are bit-identical to the in-memory path's."""
from __future__ import annotations

import shutil

import pytest
import torch

from slimlm.compress import CompressConfig, compress
from slimlm.errors import ConfigError, InvalidModelError

DIMS = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)


def _bf16_shards(src, d):
    """`src` re-saved in bfloat16 over several safetensors shards (as big checkpoints come)."""
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    m.save_pretrained(d, max_shard_size="400KB")
    for f in src.iterdir():
        if f.suffix not in (".safetensors", ".json") or f.name.startswith("tokenizer"):
            shutil.copy(f, d / f.name)
    assert len(list(d.glob("*.safetensors"))) > 2
    return d


@pytest.fixture(scope="module")
def sharded(tiny_hf, tmp_path_factory):
    return _bf16_shards(tiny_hf("LlamaForCausalLM", **DIMS), tmp_path_factory.mktemp("bf16") / "model")


@pytest.fixture(scope="module")
def sharded_tied(tiny_hf, tmp_path_factory):
    return _bf16_shards(tiny_hf("LlamaForCausalLM", tie=True, **DIMS), tmp_path_factory.mktemp("bf16t") / "model")


def test_a_streamed_model_holds_no_matrix(sharded):
    from slimlm import load
    from slimlm.arch import decoder_layers
    from slimlm.lazy import onload
    m = load(sharded, stream=True)
    mats = [p for p in m.module.parameters() if p.ndim == 2]
    assert mats and all(p.is_meta for p in mats)
    assert all(not p.is_meta for p in m.module.parameters() if p.ndim == 1)     # norms are read
    full = load(sharded)
    layer = decoder_layers(m.module)[1]
    with onload(m, layer, "model.layers.1.") as l1:
        for n, p in l1.named_parameters():
            assert not p.is_meta and torch.equal(p, full.module.get_parameter(f"model.layers.1.{n}")), n
    assert all(p.is_meta for p in layer.parameters() if p.ndim == 2)            # put back after use


@pytest.mark.parametrize("method,fixture", [("gptq", "sharded"), ("rtn", "sharded"), ("awq+gptq", "sharded_tied")])
def test_streamed_file_is_bit_identical_to_the_in_memory_one(request, tmp_path, method, fixture):
    """`--stream on` and `--stream off` write the same bytes: imatrix (--calib), GPTQ with the output projection,
    AWQ's folded norms, a tied embedding."""
    src = request.getfixturevalue(fixture)
    outs = {}
    for mode in ("on", "off"):
        outs[mode] = tmp_path / f"{mode}.gguf"
        rep = compress(src, outs[mode], CompressConfig(type="Q4_K_M", method=method, calib="default", calib_chunks=4,
                                                       gptq_chunks=3, n_ctx=64, evaluate=False, stream=mode),
                       progress=False)
        assert rep.memory["streamed"] is (mode == "on") and rep.memory["peak_rss_bytes"] > 0
    assert outs["on"].read_bytes() == outs["off"].read_bytes()


def test_streaming_refuses_what_needs_the_whole_model_before_loading(sharded, tmp_path, monkeypatch):
    import slimlm.model
    monkeypatch.setattr(slimlm.model, "_load_hf_streamed", lambda d: pytest.fail("loaded"))
    with pytest.raises(ConfigError, match="the evaluation"):
        CompressConfig(type="Q4_K_M", stream="on")
    with pytest.raises(ConfigError, match="--prune"):
        CompressConfig(type="Q4_K_M", stream="on", evaluate=False, prune=0.2)
    # auto: a model that does not fit the memory available is streamed, and evaluation refused with the numbers
    monkeypatch.setenv("SLIMLM_MEMORY", str(10_000))
    with pytest.raises(ConfigError, match=r"GiB in float32 .* GiB are available.*--no-eval"):
        compress(sharded, tmp_path / "x.gguf", CompressConfig(type="Q8_0", n_ctx=64), progress=False)
    assert not (tmp_path / "x.gguf").exists()


def test_auto_streams_when_memory_is_short(sharded, tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMLM_MEMORY", str(10_000))
    rep = compress(sharded, tmp_path / "x.gguf", CompressConfig(type="Q8_0", evaluate=False), progress=False)
    assert rep.memory["streamed"] and "streamed" in "\n".join(rep.summary_lines())
    monkeypatch.setenv("SLIMLM_MEMORY", str(2**40))
    rep = compress(sharded, tmp_path / "y.gguf", CompressConfig(type="Q8_0", evaluate=False), progress=False)
    assert not rep.memory["streamed"]
    assert (tmp_path / "x.gguf").read_bytes() == (tmp_path / "y.gguf").read_bytes()


def test_stream_on_needs_an_hf_folder(tiny_gguf, tmp_path):
    with pytest.raises(ConfigError, match="GGUF file"):
        compress(tiny_gguf, tmp_path / "x.gguf", CompressConfig(type="Q8_0", evaluate=False, stream="on"),
                 progress=False)


def test_a_fused_model_is_not_streamed_yet(tiny_hf):
    from slimlm import load
    with pytest.raises(InvalidModelError, match="cannot be streamed yet"):
        load(tiny_hf("Phi3ForCausalLM"), stream=True)
