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


def test_layer_stages_follow_the_forward_and_sum_over_micro_batches(sharded):
    """capture_group finds a Llama layer's input groups in forward order (q/k/v, o, gate/up, down), and their
    statistics summed over micro-batches of chunks equal one batch's (float32 products, float64 sums)."""
    from slimlm import load
    from slimlm.arch import decoder_layers
    from slimlm.sequential import capture_group, micro_batches, replay_inputs
    m = load(sharded)
    chunks = torch.randint(0, 1000, (6, 32), generator=torch.Generator().manual_seed(0))
    x, kw = replay_inputs(m.module, chunks)
    layer = decoder_layers(m.module)[0]
    lin = {n for n, mod in layer.named_modules() if isinstance(mod, torch.nn.Linear)}
    seen, pending = [], set(lin)
    while pending:
        names, st = capture_group(layer, x, kw, micro_batches(x, tokens=64), pending)   # 2 chunks at a time
        pending -= set(names)
        seen.append(sorted(names))
        one_names, one = capture_group(layer, x, kw, [slice(None)], set(names))
        assert one_names == names and st.n == one.n == 6 * 32
        a, b = st.mean(), one.mean()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))
    assert seen == [["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                    ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    assert capture_group(layer, x, kw, micro_batches(x), set()) is None


PRUNE_DIMS = dict(hidden_size=128, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4,
                  num_key_value_heads=2)


@pytest.fixture(scope="module")
def sharded_deep(tiny_hf, tmp_path_factory):
    return _bf16_shards(tiny_hf("LlamaForCausalLM", tie=True, **PRUNE_DIMS), tmp_path_factory.mktemp("bf16d") / "m")


@pytest.mark.parametrize("args", [dict(ratio=0.2), dict(ratio=0.2, method="mlp", allocate="uniform",
                                                       importance="activation", heads="2x1")])
def test_streamed_prune_is_bit_identical_to_the_in_memory_one(sharded_deep, tmp_path, args):
    """`prune --stream on` (layers dropped by block influence, per-layer MLP widths from the OBS curves, OBS refit,
    or heads and neurons by activation) writes the same GGUF as `--stream off`, and leaves no spill folder."""
    from slimlm.prune.command import PruneConfig, prune
    outs = {}
    for mode in ("on", "off"):
        out = tmp_path / f"{mode}.gguf"
        rep = prune(sharded_deep, out, PruneConfig(evaluate=False, stream=mode, calib_chunks=4, n_ctx=64, **args),
                    progress=False)
        assert rep.memory["streamed"] is (mode == "on")
        outs[mode] = out.read_bytes()
    assert outs["on"] == outs["off"]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".md") and
                  not p.name.endswith(".json")) == ["off.gguf", "on.gguf"]


def test_streamed_prune_refuses_what_needs_the_whole_model(sharded_deep, tmp_path):
    from slimlm.prune.command import PruneConfig, prune
    with pytest.raises(ConfigError, match="--no-eval"):
        PruneConfig(ratio=0.2, stream="on")
    with pytest.raises(ConfigError, match="--hidden"):
        PruneConfig(hidden=64, stream="on", evaluate=False)
    with pytest.raises(ConfigError, match="weight pruning"):
        PruneConfig(method="wanda", sparsity="0.5", stream="on", evaluate=False)
    with pytest.raises(ConfigError, match="HF folder"):
        prune(sharded_deep, tmp_path / "hf", PruneConfig(ratio=0.2, stream="on", evaluate=False), progress=False)
    assert not (tmp_path / "hf").exists()
