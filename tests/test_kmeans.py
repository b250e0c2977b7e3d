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
