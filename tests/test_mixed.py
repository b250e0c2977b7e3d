"""Size-budgeted mixed precision: the size parser, the knapsack, the Fisher sensitivity prediction against a
measured KL divergence, the exact file-size model, and the budgeted compress end to end."""
from __future__ import annotations

import itertools

import pytest
import torch
from helpers import kl_of_logits

from slimlm.errors import ConfigError
from slimlm.mixed import allocate, parse_size


def test_parse_size_units_and_errors():
    assert parse_size("70MB") == 70_000_000
    assert parse_size("70MiB") == parse_size("70M") == 70 * 2**20
    assert parse_size("1.5 GiB") == 3 * 2**29
    assert parse_size("123456") == 123456
    for bad in ("70 parsecs", "", "-5MB", "0"):
        with pytest.raises(ConfigError):
            parse_size(bad)


def _brute(table, budget):
    names = list(table)
    best = None
    for combo in itertools.product(*[list(table[n].items()) for n in names]):
        b = sum((o[1][0] + 31) // 32 * 32 for o in combo)
        loss = sum(o[1][1] for o in combo)
        if b <= budget and (best is None or loss < best):
            best = loss
    return best


def test_allocate_fits_the_budget_and_matches_exhaustive_search():
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        table = {}
        for i in range(5):          # bytes up, loss down, like real types
            bs = sorted(int(x) for x in torch.randint(1, 100, (4,), generator=g))
            ls = sorted((float(x) for x in torch.rand(4, generator=g)), reverse=True)
            table[f"t{i}"] = {f"T{j}": (32 * bs[j], ls[j]) for j in range(4)}
        budget = int(sum(32 * min(b for b, _ in r.values()) for r in table.values()) * (1.2 + 0.1 * (trial % 8)))
        choice, loss, used = allocate(table, budget)
        assert used <= budget
        assert loss == pytest.approx(sum(table[n][t][1] for n, t in choice.items()))
        assert loss <= _brute(table, budget) * 1.25 + 1e-9        # near-optimal on every instance
    with pytest.raises(ConfigError, match="smallest types"):
        allocate({"a": {"Q4_0": (1000, 1.0)}}, 500)


@pytest.fixture(scope="module")
def tiny(tiny_hf):
    from slimlm import load
    return load(tiny_hf("LlamaForCausalLM", tie=True, hidden_size=128, intermediate_size=256,
                        num_attention_heads=4, num_key_value_heads=2), progress=False)


def test_predicted_kld_tracks_the_measured_one(tiny):
    """The Fisher prediction of each preset's KLD (sum over tensors) is within 2x of the KLD measured in torch
    with those weights, and ranks the presets the same way."""
    from slimlm.calib import calibration_chunks
    from slimlm.formats import get_format
    from slimlm.gguf.writer import _gguf_tensors, encode
    from slimlm.quant import dequantize
    from slimlm.sensitivity import fisher_stats, predict
    chunks, _ = calibration_chunks(tiny, None, n_ctx=64, max_chunks=8)
    stats = fisher_stats(tiny, chunks, progress=False)
    # the weights' term alone (torch does not round activations as llama.cpp does: tests/test_activations.py)
    table = predict(tiny, stats, candidates=("Q8_0", "Q4_0", "Q5_0"), activations=False, progress=False)
    assert set(table) == {n for n, _, W in _gguf_tensors(tiny) if W.ndim == 2}
    with torch.no_grad():
        ref = torch.cat([tiny.module(input_ids=c[None]).logits[0] for c in chunks])
    preds, meas = [], []
    for t in ("Q8_0", "Q5_0", "Q4_0"):
        module = __import__("copy").deepcopy(tiny.module)
        sd = module.state_dict()
        for n, hf, W in _gguf_tensors(tiny):
            if n in table:
                f = get_format(t)
                Q = dequantize(encode(W.float().numpy(), f, n), f.ggml_type).reshape(W.shape)
                back = torch.from_numpy(Q)
                if hf.endswith(("q_proj.weight", "k_proj.weight")):     # GGUF row order -> HF's
                    order = tiny.spec.to_gguf_tensor(hf, torch.arange(W.shape[0]), tiny.config)
                    back = torch.empty_like(back)
                    back[order] = torch.from_numpy(Q)
                sd[hf].copy_(back)
        with torch.no_grad():
            got = torch.cat([module(input_ids=c[None]).logits[0] for c in chunks])
        preds.append(sum(table[n][t][1] for n in table))
        meas.append(kl_of_logits(ref, got))
    assert preds == sorted(preds) and meas == sorted(meas)
    for p, m in zip(preds, meas, strict=True):
        assert 0.5 < p / m < 2.0, (preds, meas)


def test_budgeted_compress_fits_the_target_and_reports_every_tensor(tiny, tmp_path, monkeypatch,
                                                                     llama_cpp_available):
    """--target-size: the file is no larger than asked (the size model is exact), every 2-D tensor has the
    allocated type with its predicted effect in the report, GPTQ writes onto those types, and the
    sensitivity table is cached."""
    import json

    from slimlm.compress import CompressConfig, compress
    from slimlm.gguf.reader import read_gguf
    monkeypatch.setenv("SLIMLM_CACHE", str(tmp_path / "cache"))
    src = tiny.source
    from slimlm.gguf.writer import file_bytes, plan_model
    _, tensors, types = plan_model(tiny, "Q8_0")
    target = int(0.7 * file_bytes(tiny, {n: types[n][0].nbytes(tuple(W.shape)) for n, _, W in tensors}))
    cfg = CompressConfig(target_size=str(target), method="gptq", calib_chunks=4, gptq_chunks=4, n_ctx=128,
                         sensitivity_chunks=4, max_chunks=2, speed=False, measure_effects=True)
    rep = compress(src, tmp_path / "b.gguf", cfg, progress=False)
    size = (tmp_path / "b.gguf").stat().st_size
    step = next(s for s in rep.steps if s["step"] == "mixed precision")
    assert size <= target and size == step["planned_file_bytes"] and size > 0.9 * target
    types = {t.name: t.ggml_type.name for t in read_gguf(tmp_path / "b.gguf").tensors}
    assert {n: p["type"] for n, p in step["predicted"].items()} == {n: types[n] for n in step["predicted"]}
    assert len(set(types[n] for n in step["predicted"])) > 1                       # mixed, really
    md = (tmp_path / "b.report.md").read_text()
    assert "predicted dKLD" in md and "measured dKLD" in md and all(n in md for n in step["predicted"])
    # measured: each tensor alone with its written weights; the bigger predicted effects are measured bigger
    pred = [p["dkld"] for p in step["predicted"].values()]
    meas = [p["measured_dkld"] for p in step["predicted"].values()]
    assert all(v >= 0 for v in meas) and sum(meas) > 0
    rank = torch.corrcoef(torch.stack([torch.tensor(pred).argsort().argsort().double(),
                                       torch.tensor(meas).argsort().argsort().double()]))[0, 1]
    assert rank > 0.5, rank
    assert rep.evaluation["kld"] < 1.0
    assert list((tmp_path / "cache").glob("sensitivity-*.json"))
    rep2 = compress(src, tmp_path / "b2.gguf", CompressConfig(target_size=str(target), calib_chunks=4, n_ctx=128,
                                                              sensitivity_chunks=4, evaluate=False), progress=False)
    assert "cached" in next(s for s in rep2.steps if s["step"] == "mixed precision")["sensitivity"]
    assert json.loads((tmp_path / "b2.report.json").read_text())["export"]["file_bytes"] <= target


def test_budget_config_is_checked_before_loading():
    from slimlm.compress import CompressConfig
    with pytest.raises(ConfigError, match="either --target-size or --bpw"):
        CompressConfig(target_size="70MB", bpw=4.0)
    with pytest.raises(ConfigError, match="--bpw must be"):
        CompressConfig(bpw=1.0)
    with pytest.raises(ConfigError, match="--target-size"):
        CompressConfig(target_size="seventy")


def test_impossible_budget_is_refused_from_the_shapes_before_any_calibration(tiny, tmp_path, monkeypatch):
    """--target-size 1KB and --bpw 2.5: refused before the model is even loaded, naming the smallest reachable
    size (every 2-D tensor at its smallest candidate that fits its rows, the rest F32), computed here
    independently. Right after loading the check is exact (header included): one byte under the smallest
    file is refused, the smallest file itself goes on to calibration."""
    import importlib
    import re

    import gguf

    from slimlm.gguf.writer import _gguf_tensors, file_bytes
    from slimlm.sensitivity import CANDIDATES
    C = importlib.import_module("slimlm.compress")      # the module (slimlm.compress is also the function)

    def never(*a, **k):
        raise AssertionError("calibration ran before the budget was checked")
    monkeypatch.setattr(C, "calibration_chunks", never)
    real_load = C.load
    monkeypatch.setattr(C, "load", lambda *a, **k: never())
    tensors = _gguf_tensors(tiny)
    small, fixed, n = {}, 0, 0
    for name, _, W in tensors:
        n += W.numel()
        if W.ndim == 2:
            sizes = [W.numel() // gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t]][0]
                     * gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t]][1]
                     for t in CANDIDATES if W.shape[1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t]][0] == 0]
            small[name] = (min(sizes) + 31) // 32 * 32
        else:
            fixed += 4 * W.numel()
    data = sum(small.values()) + sum((4 * W.numel() + 31) // 32 * 32 for _, _, W in tensors if W.ndim != 2)
    cfg = dict(n_ctx=64, evaluate=False)
    with pytest.raises(ConfigError, match="--target-size") as e:
        C.compress(tiny.source, tmp_path / "a.gguf", C.CompressConfig(target_size="1KB", **cfg), progress=False)
    assert f"more than {data} bytes" in str(e.value)
    with pytest.raises(ConfigError, match="--bpw 2.5 is below") as e:
        C.compress(tiny.source, tmp_path / "a.gguf", C.CompressConfig(bpw=2.5, **cfg), progress=False)
    least = float(re.search(r"reach: ([0-9.]+) bits/weight", str(e.value))[1])
    assert least == pytest.approx(8 * (sum(small.values()) + fixed) / n, abs=1e-4)
    monkeypatch.setattr(C, "load", real_load)
    exact = file_bytes(tiny, {name: small.get(name, 4 * W.numel()) for name, _, W in tensors})
    assert exact > data
    with pytest.raises(ConfigError, match=f"smallest file .*: {exact} bytes"):
        C.compress(tiny.source, tmp_path / "a.gguf", C.CompressConfig(target_size=str(exact - 1), **cfg),
                   progress=False)
    with pytest.raises(AssertionError, match="calibration ran"):        # the smallest file itself is reachable
        C.compress(tiny.source, tmp_path / "a.gguf", C.CompressConfig(target_size=str(exact), **cfg),
                   progress=False)
    assert not (tmp_path / "a.gguf").exists()


def test_sensitivity_cache_key_covers_every_weight_and_the_config(tiny):
    """The cache key hashes every byte of every weight (it used to sample every (rows/64)-th row, so a model
    changed elsewhere reused a stale table) and the config: one changed weight in a row the old sampling
    skipped, or a changed hyper-parameter, gives another key; restoring it gives the old key back."""
    from slimlm.sensitivity import CANDIDATES, cache_key
    chunks = torch.arange(64).reshape(2, 32)
    key = cache_key(tiny, chunks, CANDIDATES, 0, "")
    W = tiny.module.model.embed_tokens.weight
    assert W.shape[0] // 64 > 1                       # row 1 is one the sampling skipped
    old = float(W[1, 3])
    with torch.no_grad():
        W[1, 3] = old + 1e-3
    try:
        assert cache_key(tiny, chunks, CANDIDATES, 0, "") != key
    finally:
        with torch.no_grad():
            W[1, 3] = old
    assert cache_key(tiny, chunks, CANDIDATES, 0, "") == key
    eps = tiny.config["rms_norm_eps"]
    tiny.config["rms_norm_eps"] = eps * 2
    try:
        assert cache_key(tiny, chunks, CANDIDATES, 0, "") != key
    finally:
        tiny.config["rms_norm_eps"] = eps
    assert cache_key(tiny, chunks, CANDIDATES, 1, "") != key                 # settings: seed, candidates,
    assert cache_key(tiny, chunks, CANDIDATES[:3], 0, "") != key             # importance and text
    assert cache_key(tiny, chunks, CANDIDATES, 0, "im") != key
    assert cache_key(tiny, chunks + 1, CANDIDATES, 0, "") != key
