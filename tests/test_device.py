"""--device (slimlm/device.py): the layer passes move one decoder layer at a time to the compute device.

The tests marked `gpu` run the CUDA paths (skipped without a CUDA device; bench/gpu.py runs them end to end and
times them against the CPU); the others check the option itself on any machine."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from slimlm.compress import CompressConfig, compress
from slimlm.device import compute_device, computing_on, on_device, to_device

DIMS = dict(hidden_size=128, intermediate_size=384, num_attention_heads=4, num_key_value_heads=2)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_the_compute_device_is_the_cpu_unless_a_context_sets_it():
    assert compute_device() == torch.device("cpu")
    with computing_on("cpu") as dev:
        assert dev == compute_device() == torch.device("cpu")
    with computing_on(None):
        assert compute_device().type == "cpu"
    assert compute_device().type == "cpu"


def test_on_the_cpu_nothing_moves():
    lin = torch.nn.Linear(4, 3)
    w = lin.weight
    with on_device(lin) as m:
        assert m is lin and lin.weight is w and lin.weight.device.type == "cpu"
    x = {"a": (torch.ones(2), [torch.zeros(1)]), "b": None}
    y = to_device(x, torch.device("cpu"))
    assert y["a"][0] is x["a"][0] and y["b"] is None and isinstance(y["a"][1], list)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_cuda_device_is_refused_before_loading(tmp_path, capsys):
    from slimlm.cli import main
    out = tmp_path / "x.imatrix"
    rc = main(["--quiet", "imatrix", "-o", str(out), "--device", "cuda"])
    err = capsys.readouterr().err
    assert rc != 0 and "--device cuda" in err and "--device cpu" in err
    assert not out.exists()


def test_device_is_an_option_of_every_torch_command_not_only_healing():
    """--device without --heal is not refused as a healing option; with --heal it reaches the training config."""
    from slimlm.cli import _heal_config, build_parser
    p = build_parser()
    for cmd in (["compress", "-o", "x.gguf"], ["prune", "-o", "x.gguf"], ["imatrix", "-o", "x.imatrix"]):
        a = p.parse_args(cmd + ["--device", "cpu"])
        assert a.device == "cpu"
        if cmd[0] != "imatrix":
            assert _heal_config(a) is None
    a = p.parse_args(["prune", "-o", "x.gguf", "--device", "cpu", "--heal", "1000"])
    assert _heal_config(a).train.device == "cpu"


# ---------------------------------------------------------------------------------------------------- CUDA
def _gguf_weights(path) -> dict[str, np.ndarray]:
    from gguf import GGUFReader
    from gguf.quants import dequantize
    return {t.name: dequantize(t.data, t.tensor_type) for t in GGUFReader(str(path)).tensors if t.n_dims == 2}


@pytest.mark.parametrize("method", ["calib", "gptq"])
@pytest.mark.gpu
@needs_cuda
def test_cuda_compress_matches_the_cpu(tiny_hf, tmp_path, method):
    """The importance matrix and GPTQ's statistics gathered on the GPU give the CPU's file up to rounding: the
    same codes for almost every weight."""
    src = tiny_hf("LlamaForCausalLM", **DIMS)
    cfg = dict(type="Q4_K_M", calib_chunks=4, gptq_chunks=3, n_ctx=64, evaluate=False)
    cfg.update(calib="default") if method == "calib" else cfg.update(method="gptq")
    files = {}
    for dev in ("cpu", "cuda"):
        files[dev] = tmp_path / f"{dev}.gguf"
        with computing_on(dev):
            compress(src, files[dev], CompressConfig(**cfg), progress=False)
    a, b = _gguf_weights(files["cpu"]), _gguf_weights(files["cuda"])
    assert a.keys() == b.keys()
    same = np.mean([np.mean(a[k] == b[k]) for k in a])
    assert same > 0.95, same
    assert torch.cuda.memory_allocated() < 64 << 20          # the layers went back to the host


@pytest.mark.gpu
@needs_cuda
def test_cuda_structured_prune_matches_the_cpu(tiny_hf, tmp_path):
    """block influence and the OBS curves measured on the GPU choose the CPU's widths and layers."""
    from slimlm.prune.command import PruneConfig, prune
    src = tiny_hf("LlamaForCausalLM", num_hidden_layers=4, **DIMS)
    shapes = {}
    for dev in ("cpu", "cuda"):
        out = tmp_path / f"{dev}.gguf"
        with computing_on(dev):
            prune(src, out, PruneConfig(ratio=0.25, type="Q8_0", n_ctx=64, calib_chunks=4, evaluate=False),
                  progress=False)
        from gguf import GGUFReader
        shapes[dev] = {t.name: tuple(t.shape) for t in GGUFReader(str(out)).tensors}
    assert shapes["cpu"] == shapes["cuda"]


@pytest.mark.gpu
@needs_cuda
def test_cuda_torch_evaluation_matches_the_cpu(tiny_hf):
    from slimlm import load
    from slimlm.eval.runtime import TorchRunner
    m = load(tiny_hf("LlamaForCausalLM", **DIMS))
    chunk = torch.arange(1, 65)
    ref = TorchRunner(m).logits(chunk)
    with computing_on("cuda"):
        r = TorchRunner(m)
        assert r.dev.type == "cuda"
        got = r.logits(chunk)
        r.close()
    assert got.device.type == "cpu" and torch.allclose(got, ref, atol=1e-3, rtol=1e-3)
    assert all(p.device.type == "cpu" for p in m.module.parameters())
