"""k-means codebooks: weighted Lloyd against an independent 1-D computation, bit packing, and the saved model
loading back in torch with exactly the codebook weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from slimlm.quant.kmeans import decode, kmeans_rows, pack, unpack


def _lloyd_1d(x, w, c, iters=200):
    """Plain weighted Lloyd in numpy, one row."""
    for _ in range(iters):
        a = np.abs(x[:, None] - c[None, :]).argmin(1)
        new = np.array([(w[a == j] * x[a == j]).sum() / w[a == j].sum() if (a == j).any() else c[j]
                        for j in range(len(c))])
        if np.array_equal(new, c):
            break
        c = new
    return c


def test_weighted_kmeans_is_a_lloyd_fixed_point_and_beats_uniform_rounding():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(8, 256, generator=g) * torch.linspace(0.5, 2, 256)
    imp = torch.rand(256, generator=g) ** 4 * 10
    books, idx = kmeans_rows(W, 3, imp, iters=200)
    Q = decode(books, idx)
    for r in range(8):                           # every centroid is the weighted mean of its members
        c = _lloyd_1d(W[r].double().numpy(), imp.double().numpy(), books[r].double().numpy(), iters=1)
        assert np.allclose(c, books[r].double().numpy(), rtol=1e-4, atol=1e-6)
    err = float(((W - Q) ** 2 * imp).sum())
    lo, hi = W.amin(1, keepdim=True), W.amax(1, keepdim=True)    # uniform 8-level grid per row
    U = lo + ((W - lo) / (hi - lo) * 7).round() / 7 * (hi - lo)
    assert err < 0.7 * float(((W - U) ** 2 * imp).sum())
    assert torch.all(books[:, 1:] >= books[:, :-1])


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_round_trips(bits):
    idx = torch.randint(0, 1 << bits, (5, 77), dtype=torch.uint8)
    p = pack(idx, bits)
    assert p.shape == (5, (77 * bits + 7) // 8)
    assert torch.equal(unpack(p, bits, 77), idx)


def test_saved_kmeans_model_loads_and_runs(tiny_hf, tmp_path):
    from slimlm import load
    from slimlm.codebook import kmeans_model, load_kmeans, save_kmeans
    from slimlm.errors import ConfigError, InvalidModelError
    from slimlm.quant.kmeans import KMeansLinear
    m = load(tiny_hf("LlamaForCausalLM", tie=True, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                     num_key_value_heads=2), progress=False)
    books = kmeans_model(m, 4, progress=False)
    save_kmeans(m, tmp_path / "km", books, 4)
    with pytest.raises(ConfigError, match="exists"):
        save_kmeans(m, tmp_path / "km", books, 4)
    with pytest.raises(ConfigError, match="own folder"):
        save_kmeans(m, m.source, books, 4, overwrite=True)               # never onto the input
    assert not list((tmp_path / "km").glob(".*"))                        # no temp files left behind
    assert (tmp_path / "km" / "tokenizer.json").is_file()
    k = load_kmeans(tmp_path / "km")
    lin = k.module.model.layers[0].self_attn.q_proj
    assert isinstance(lin, KMeansLinear)
    b, p = books["model.layers.0.self_attn.q_proj"]
    assert torch.equal(lin.weight, decode(b.float(), unpack(p, 4, lin.in_features)))
    assert len(torch.unique(lin.weight[0])) <= 16
    ids = torch.randint(0, 1000, (1, 32))
    with torch.no_grad():
        a, c = m.module(input_ids=ids).logits, k.module(input_ids=ids).logits
    assert torch.corrcoef(torch.stack([a.flatten(), c.flatten()]))[0, 1] > 0.95
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{}")
    with pytest.raises(InvalidModelError):
        load_kmeans(tmp_path / "bad")


@pytest.fixture(scope="module")
def km_folder(tiny_hf, tmp_path_factory):
    from slimlm import load
    from slimlm.codebook import kmeans_model, save_kmeans
    m = load(tiny_hf("LlamaForCausalLM"), progress=False)
    out = tmp_path_factory.mktemp("km") / "km"
    save_kmeans(m, out, kmeans_model(m, 3, progress=False), 3)
    return out


def _resave(d, edit, metadata=None):
    """Rewrite d/model.safetensors with `edit(tensors)` applied and the given header metadata."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    st = d / "model.safetensors"
    with safe_open(str(st), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    save_file(tensors, str(st), metadata=meta if metadata is None else metadata)


def _shrink(t, name):
    t[name] = t[name][:-1].contiguous()


BAD_KMEANS = {
    "header length beyond the file": lambda d: (d / "model.safetensors").write_bytes(
        (2**40).to_bytes(8, "little") + (d / "model.safetensors").read_bytes()[8:]),
    "header cut": lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:200]),
    "data truncated": lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-64]),
    "config.json missing": lambda d: (d / "config.json").unlink(),
    "config.json not JSON": lambda d: (d / "config.json").write_text("{"),
    "config.json remote code": lambda d: (d / "config.json").write_text(
        (d / "config.json").read_text()[:-2] + ', "auto_map": {"AutoModelForCausalLM": "x.Y"}}'),
    "config.json other architecture": lambda d: (d / "config.json").write_text(
        (d / "config.json").read_text().replace("LlamaForCausalLM", "GPT2LMHeadModel")),
    "tokenizer.json missing": lambda d: (d / "tokenizer.json").unlink(),
    "bits not a number": lambda d: _resave(d, lambda t: None, {"format": "slimlm-kmeans", "bits": "x"}),
    "bits out of range": lambda d: _resave(d, lambda t: None, {"format": "slimlm-kmeans", "bits": "12"}),
    "no metadata": lambda d: _resave(d, lambda t: None, {}),
    "codebook rows": lambda d: _resave(d, lambda t: _shrink(t, "model.layers.0.mlp.up_proj.codebook")),
    "codebook size": lambda d: _resave(d, lambda t: t.update({"model.layers.0.mlp.up_proj.codebook":
                                                             t["model.layers.0.mlp.up_proj.codebook"][:, :4].contiguous()})),
    "packed width": lambda d: _resave(d, lambda t: t.update({"model.layers.0.mlp.up_proj.packed":
                                                            t["model.layers.0.mlp.up_proj.packed"][:, :5].contiguous()})),
    "packed dtype": lambda d: _resave(d, lambda t: t.update({"model.layers.0.mlp.up_proj.packed":
                                                            t["model.layers.0.mlp.up_proj.packed"].float()})),
    "codebook without packed": lambda d: _resave(d, lambda t: t.pop("model.layers.1.self_attn.o_proj.packed")),
    "plain tensor shape": lambda d: _resave(d, lambda t: _shrink(t, "model.embed_tokens.weight")),
    "plain tensor missing": lambda d: _resave(d, lambda t: t.pop("model.norm.weight")),
    "unexpected tensor": lambda d: _resave(d, lambda t: t.update({"model.extra.weight": torch.zeros(3)})),
    "NaN in a codebook": lambda d: _resave(d, lambda t: t["model.layers.0.mlp.up_proj.codebook"].__setitem__(
        (0, 0), float("nan"))),
}


@pytest.mark.parametrize("defect", list(BAD_KMEANS))
def test_load_kmeans_refuses_a_bad_folder_with_slimlm_errors(defect, km_folder, tmp_path):
    """load_kmeans goes through the strict folder and safetensors checks (hf.py): every defect is an
    InvalidModelError naming the file, never a library exception (or a SIGBUS from a truncated mmap)."""
    import shutil

    from slimlm.codebook import load_kmeans
    from slimlm.errors import InvalidModelError
    d = tmp_path / "km"
    shutil.copytree(km_folder, d)
    load_kmeans(d)                               # the copy itself loads
    BAD_KMEANS[defect](d)
    with pytest.raises(InvalidModelError) as e:
        load_kmeans(d)
    assert str(d) in str(e.value)
