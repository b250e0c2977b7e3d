"""Structured pruning: OBS column removal against least squares, GQA-valid head choice, surgery that matches the
masked full-size model exactly, and pruned models (layers, heads, neurons, hidden channels) in llama.cpp."""
from __future__ import annotations

import copy

import pytest
import torch

from slimlm.prune.structured import (
    Plan,
    _rank_heads,
    n_params,
    obs_remove,
    plan_for_ratio,
    planned_config,
    prune_structured,
)


def _data(n=400, cols=24, rows=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, cols, generator=g, dtype=torch.float64) @ torch.randn(cols, cols, generator=g,
                                                                             dtype=torch.float64) * 0.3
    W = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    return X, W, X.T @ X / n


@pytest.mark.parametrize("group,steps", [(1, 64), (1, 1), (4, 64)])
def test_obs_remove_refits_the_rest_by_least_squares(group, steps):
    X, W, C = _data()
    n_rm = 12 // group
    Wn, gone = obs_remove(W, C, n_rm, group=group, damp=0.0, steps=steps)
    cols = sorted(c for g in gone for c in range(g * group, (g + 1) * group))
    keep = [c for c in range(W.shape[1]) if c not in cols]
    assert len(set(gone)) == n_rm and (Wn[:, cols] == 0).all()
    # the refit is the least-squares solution of X W^T ~ X[:, keep] W'^T
    ls = torch.linalg.lstsq(X[:, keep], X @ W.T).solution.T
    assert torch.allclose(Wn[:, keep], ls, atol=1e-8, rtol=1e-8)


def test_obs_first_choice_is_the_cheapest_single_removal():
    X, W, C = _data(seed=1)
    _, gone = obs_remove(W, C, 1, damp=0.0)
    def err(j):
        keep = [c for c in range(W.shape[1]) if c != j]
        ls = torch.linalg.lstsq(X[:, keep], X @ W.T).solution
        return float(((X @ W.T - X[:, keep] @ ls) ** 2).sum())
    errs = [err(j) for j in range(W.shape[1])]
    assert gone[0] == min(range(len(errs)), key=errs.__getitem__)


@pytest.mark.parametrize("n_kv,q_per", [(2, 2), (3, 1), (1, 3), (2, 3), (3, 2)])
def test_head_choice_keeps_a_valid_gqa_layout(n_kv, q_per):
    for seed in range(20):
        score = torch.rand(9, generator=torch.Generator().manual_seed(seed))
        gone = _rank_heads(score, 3, 3, n_kv, q_per)
        kept = sorted(set(range(9)) - set(gone))
        groups = {}
        for h in kept:
            groups.setdefault(h // 3, []).append(h)
        assert len(groups) == n_kv and all(len(v) == q_per for v in groups.values())


@pytest.mark.parametrize("tie", [False, True])
def test_n_params_and_plan_for_ratio(tiny_hf, tie):
    from slimlm import load
    m = load(tiny_hf("LlamaForCausalLM", tie=tie), progress=False)
    assert n_params(m.config) == m.n_params()
    total = m.n_params()
    p = plan_for_ratio(m.config, 0.002, method="mlp", round_to=8)   # the embedding is most of it
    assert n_params(planned_config(m.config, p)) <= 0.998 * total
    assert n_params(planned_config(m.config, Plan(ffn=p.ffn + 8))) > 0.998 * total    # the largest that fits
    lp = plan_for_ratio(m.config, 0.002, method="layers", layer_order=[1, 0])
    assert lp.drop_layers == [1]


def _follows_in_llama_cpp(path, model, x):
    """llama.cpp's logits of the GGUF at `path` equal the torch model's on tokens x; returns torch's."""
    from slimlm.eval.runtime import LlamaCppRunner
    r = LlamaCppRunner(path, 64)
    try:
        got = r.logits(x)
    finally:
        r.close()
    want = model.logits(x[None])[0]
    assert torch.allclose(got, want, atol=2e-3, rtol=1e-3), float((got - want).abs().max())
    return want


def _chunks(m, n=2, ctx=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, m.config["vocab_size"], (n, ctx), generator=g)


@pytest.mark.parametrize("importance", ["obs", "activation", "taylor", "magnitude"])
def test_physical_pruning_equals_the_masked_full_model(tiny_hf, importance):
    """Removing rows/columns/heads gives exactly the function of the full-size model whose removed o_proj and
    down_proj input columns are zero (and the rest as pruning refit them): the surgery, GQA mapping included."""
    from slimlm import load
    m = load(tiny_hf("LlamaForCausalLM"), progress=False)       # 4 heads, 2 KV heads, head_dim 16, ffn 96
    plan = Plan(ffn=40, n_kv=1, q_per_kv=1)
    p, st = prune_structured(m, _chunks(m), plan, importance=importance, progress=False)
    assert p.config["intermediate_size"] == 40 and p.config["num_attention_heads"] == 1
    assert p.module.config.num_key_value_heads == 1 and p.n_params() == n_params(p.config)
    full = copy.deepcopy(m.module)
    for lf, lp, kept in zip(full.model.layers, p.module.model.layers, st["kept"], strict=True):
        qi = torch.cat([torch.arange(h * 16, h * 16 + 16) for h in kept["heads"]])
        o = torch.zeros_like(lf.self_attn.o_proj.weight)
        o[:, qi] = lp.self_attn.o_proj.weight
        lf.self_attn.o_proj.weight.data = o
        d = torch.zeros_like(lf.mlp.down_proj.weight)
        d[:, kept["ffn"]] = lp.mlp.down_proj.weight
        lf.mlp.down_proj.weight.data = d
    x = _chunks(m, 1, 24, seed=5)
    with torch.no_grad():
        a = full(input_ids=x, use_cache=False).logits
    assert torch.allclose(p.logits(x), a, atol=1e-5, rtol=1e-5)
    assert torch.equal(m.logits(x), load(tiny_hf("LlamaForCausalLM"), progress=False).logits(x))  # input untouched


def test_taylor_scores_match_a_finite_difference(tiny_hf):
    """The Taylor score of a neuron is |dL/d(scale of that neuron)| at 1: check against central differences."""
    from slimlm import load
    from slimlm.prune.structured import _taylor_scores
    m = load(tiny_hf("LlamaForCausalLM"), progress=False)
    m.module.double()                           # finite differences need float64
    c = _chunks(m, 1, 32)
    ffn_scores, _ = _taylor_scores(m.module, c, 16, False)[1]
    down = m.module.model.layers[1].mlp.down_proj
    W0 = down.weight.data.clone()

    def loss(j, eps):
        down.weight.data = W0.clone()
        down.weight.data[:, j] *= 1 + eps
        with torch.no_grad():            # the LM loss in float64 (transformers computes it in float32)
            logits = m.module(input_ids=c, use_cache=False).logits[0, :-1].double()
            return float(torch.nn.functional.cross_entropy(logits, c[0, 1:]))
    for j in (0, 7, 50):
        fd = (loss(j, 1e-2) - loss(j, -1e-2)) / 2e-2      # RMSNorm runs in float32: no smaller step
        assert float(ffn_scores[j]) == pytest.approx(abs(fd), rel=1e-2)
    down.weight.data = W0


def test_obs_beats_activation_on_calibration_error(tiny_hf):
    """OBS with refit has a smaller output error than Minitron's activation ranking without refit."""
    from slimlm import load
    m = load(tiny_hf("LlamaForCausalLM"), progress=False)
    c = _chunks(m, 4, 32)
    ref = m.logits(c)
    err = {}
    for imp in ("obs", "activation"):
        p, _ = prune_structured(m, c, Plan(ffn=48), importance=imp, progress=False)
        err[imp] = float(((p.logits(c) - ref) ** 2).mean())
    assert err["obs"] < err["activation"]


@pytest.mark.parametrize("tie", [False, True])
def test_pruned_gguf_runs_in_llama_cpp_like_torch(tiny_hf, tmp_path, tie, llama_cpp_available):
    """Layers, heads, neurons and hidden channels removed at once: llama.cpp's logits follow torch's."""
    from slimlm import export_gguf, load
    from slimlm.gguf.reader import read_gguf
    m = load(tiny_hf("LlamaForCausalLM", tie=tie), progress=False)
    plan = Plan(ffn=64, n_kv=1, q_per_kv=2, hidden=48, drop_layers=[0])
    p, _ = prune_structured(m, _chunks(m), plan, progress=False)
    out = tmp_path / "p.gguf"
    export_gguf(p, out, "F32", progress=False)
    g = read_gguf(out)
    assert g.get("llama.block_count") == 1 and g.get("llama.embedding_length") == 48
    assert g.get("llama.feed_forward_length") == 64 and g.get("llama.attention.head_count") == 2
    assert g.get("llama.attention.head_count_kv") == 1
    x = _chunks(m, 1, 24, seed=3)[0]
    _follows_in_llama_cpp(out, p, x)


def test_bad_plans_are_refused_before_work(tiny_hf):
    from slimlm import load
    from slimlm.errors import ConfigError
    m = load(tiny_hf("LlamaForCausalLM"), progress=False)
    for plan in (Plan(ffn=200), Plan(n_kv=3), Plan(q_per_kv=5), Plan(drop_layers=[0, 1]), Plan(drop_layers=[7])):
        with pytest.raises(ConfigError):
            prune_structured(m, _chunks(m), plan, progress=False)
    with pytest.raises(ConfigError):
        plan_for_ratio(m.config, 1.5)
    with pytest.raises(ConfigError):
        prune_structured(m, None, Plan(ffn=32), importance="obs", progress=False)


@pytest.mark.parametrize("need,drop", [(40, [1]), (40, []), (20, [0, 2])])
def test_per_layer_widths_remove_the_fewest_neurons_that_reach_the_ratio(tiny_hf, need, drop):
    """The uniform plan rounds every layer's width down to 32 (SmolLM2 at 25%: 25.7% removed); per-layer widths
    need only the total rounded: neurons_for_ratio's count, in 32s, reaches the ratio and one 32 fewer does not.
    `need`: the ratio is what removing that many neurons (after the dropped layers) removes."""
    from slimlm import load
    from slimlm.prune.command import neurons_for_ratio
    m = load(tiny_hf("LlamaForCausalLM", num_hidden_layers=4), progress=False)
    cfg, total, kept = m.config, n_params(m.config), 4 - len(drop)

    def removed(n):            # n neurons off the kept layers, spread in 32s: the fraction of parameters removed
        widths = [96 - 32 * (n // 32 // kept + (j < n // 32 % kept)) for j in range(kept)]
        return 1 - n_params(planned_config(cfg, Plan(drop_layers=drop, ffn_per_layer=widths))) / total

    full = n_params(planned_config(cfg, Plan(drop_layers=drop)))
    per = (full - n_params(planned_config(cfg, Plan(drop_layers=drop, ffn=95)))) // kept
    ratio = 1 - (full - need * per) / total
    uniform = plan_for_ratio(planned_config(cfg, Plan(drop_layers=drop)), 1 - (1 - ratio) * total / full)
    n = neurons_for_ratio(cfg, Plan(drop_layers=drop, ffn=uniform.ffn), ratio, 32)
    assert n % 32 == 0 and removed(n) >= ratio - 1e-12 > removed(n - 32)
    assert n == -(-need // 32) * 32 < (96 - uniform.ffn) * kept      # the uniform plan removes more


def test_per_layer_widths_export_as_deci_and_reload(tiny_hf, tmp_path, llama_cpp_available):
    """Globally allocated MLP widths differ per layer: layer 1's MLP writes 50x less into the residual stream, so
    its neurons cost least and the global allocation cuts it to the floor (a quarter of its width) and the others
    less. The GGUF is llama.cpp's deci arch with per-layer arrays and its logits follow torch's; the HF folder
    (per-layer config key) reloads through slimlm.load identically."""
    from slimlm import export_gguf, load
    from slimlm.arch import PER_LAYER
    from slimlm.gguf.reader import read_gguf
    from slimlm.hfout import save_hf
    from slimlm.prune.structured import allocate_ffn
    m = load(tiny_hf("LlamaForCausalLM", num_hidden_layers=3), progress=False)
    with torch.no_grad():
        m.module.model.layers[1].mlp.down_proj.weight *= 0.02
    c = _chunks(m, 2, 32)
    widths = allocate_ffn(m, c, 3 * 40, round_to=8, progress=False)
    assert sum(96 - w for w in widths) == 120 and all(w % 8 == 0 and w >= 24 for w in widths)
    assert widths[1] == 24 < min(widths[0], widths[2])       # max_frac 0.75 of 96 removed from layer 1
    p, st = prune_structured(m, c, Plan(ffn_per_layer=widths, q_per_kv=1), progress=False)
    assert p.config[PER_LAYER]["intermediate_size"] == widths and p.n_params() == n_params(p.config)
    out = tmp_path / "deci.gguf"
    export_gguf(p, out, "F32", progress=False)
    g = read_gguf(out)
    assert g.architecture == "deci" and list(g.get("deci.feed_forward_length")) == widths
    assert list(g.get("deci.attention.head_count")) == [2, 2, 2]
    x = _chunks(m, 1, 24, seed=3)[0]
    want = _follows_in_llama_cpp(out, p, x)
    d = save_hf(p, tmp_path / "hf")
    back = load(d, progress=False)
    assert back.config[PER_LAYER]["intermediate_size"] == widths
    assert torch.allclose(back.logits(x[None]), want, atol=1e-6)


def test_sensitivity_measures_real_forwards_and_drives_allocation(tiny_hf, tmp_path):
    """Each cell is the KLD of an actual forward: the 'layer' column equals a full forward without that layer;
    more neurons removed costs more; the allocation from the table removes exactly what was asked."""
    from slimlm import load
    from slimlm.prune.sensitivity import allocate_from, heatmap, measure
    m = load(tiny_hf("LlamaForCausalLM", num_hidden_layers=3), progress=False)
    c = _chunks(m, 2, 32)
    ev = _chunks(m, 1, 32, seed=9)[0]
    t = measure(m, c, ev, ratios=(0.25, 0.75), round_to=8, types=("Q8_0",), progress=False)
    assert t["columns"] == ["mlp 25%", "mlp 75%", "heads -1/2", "layer", "Q8_0"]
    ref = torch.log_softmax(m.logits(ev[None])[0].double(), -1)
    for i, row in enumerate(t["layers"]):
        full = copy.deepcopy(m.module)
        full.model.layers = torch.nn.ModuleList([l for j, l in enumerate(full.model.layers) if j != i])
        with torch.no_grad():
            q = torch.log_softmax(full(input_ids=ev[None], use_cache=False).logits[0].double(), -1)
        want = float((ref.exp() * (ref - q)).sum(-1).mean())
        assert row["layer"] == pytest.approx(want, rel=1e-6, abs=1e-9)
        assert 0 < row["mlp 25%"] < row["mlp 75%"] and 0 <= row["Q8_0"] < row["mlp 25%"]
    widths = allocate_from(t, 96, 3 * 24, 8)
    assert sum(96 - w for w in widths) == 72 and all(w % 8 == 0 for w in widths)
    heatmap(t, tmp_path / "h.png", "tiny")
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_planned_config_keeps_the_layer_types_of_the_kept_layers(tiny_hf):
    """Dropping layers keeps each remaining layer's attention kind (not the first n of the list), in the config
    and in the pruned module's config that transformers saves."""
    from helpers import tiny_config

    from slimlm import load
    kinds = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    cfg = tiny_config("Qwen2ForCausalLM", 100, num_hidden_layers=4, layer_types=kinds)
    assert planned_config(cfg, Plan(drop_layers=[0]))["layer_types"] == kinds[1:]
    m = load(tiny_hf("Qwen2ForCausalLM", num_hidden_layers=4), progress=False)
    m.module.config.layer_types = list(kinds)
    m.config["layer_types"] = list(kinds)
    p, _ = prune_structured(m, None, Plan(drop_layers=[0, 2]), progress=False)
    assert p.config["layer_types"] == p.module.config.layer_types == ["sliding_attention"] * 2
