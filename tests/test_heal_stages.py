"""The cheap healing stages (slimlm/train/stages.py): bias compensation and block-wise reconstruction bring a
pruned tiny model's logits closer to the original's on held-out text; the biases survive export (llama.cpp's
llama and deci graphs, an HF folder transformers reloads); families whose llama.cpp graph has no such biases
are skipped untouched; block-wise training is deterministic and stops at its deadline.

The tiny teacher's embeddings share a common offset: real LLMs' hidden states have a large mean component,
which is what a bias can carry (on a zero-mean random model the pruned parts' mean output is ~0)."""
from __future__ import annotations

import copy
import time

import pytest
import torch

from slimlm.prune.structured import Plan, prune_structured
from slimlm.train.stages import (
    bias_compensation,
    blockwise_reconstruction,
    changed_layers,
    cosine_lr,
    dropped_after,
    infer_layer_map,
    layer_map_from,
    mean_shift,
    monotone_alignment,
)


@pytest.fixture(scope="module")
def teacher(tiny_hf):
    from slimlm import load
    m = load(tiny_hf("LlamaForCausalLM", num_hidden_layers=4), progress=False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        m.module.model.embed_tokens.weight += 0.1 * torch.randn(m.config["hidden_size"], generator=g)
    return m


@pytest.fixture(scope="module")
def texts(teacher, calib):
    """(calibration chunks, held-out chunks): disjoint slices of the calibration text."""
    from slimlm.calib import calibration_chunks
    c, _ = calibration_chunks(teacher, calib, n_ctx=64, max_chunks=12)
    assert c.shape[0] == 12
    return c[:8], c[8:]


_TEACHER_LOGP: dict = {}


def kld(teacher, student, x: torch.Tensor) -> float:
    """Mean over tokens of KL(teacher || student) of the next-token distributions (the teacher's are cached)."""
    key = (id(teacher), x.data_ptr(), tuple(x.shape))
    if key not in _TEACHER_LOGP:
        _TEACHER_LOGP[key] = torch.log_softmax(teacher.logits(x), -1)
    p = _TEACHER_LOGP[key]
    q = torch.log_softmax(student.logits(x), -1)
    return float((p.exp() * (p - q)).sum(-1).double().mean())


def _student(teacher, cal, plan, importance="obs"):
    s, _ = prune_structured(teacher, cal, plan, importance=importance, progress=False)
    return s, layer_map_from(teacher.config, plan.drop_layers)


# ---------------------------------------------------------------------------------------------- pieces
def test_mean_shift_is_the_least_squares_constant():
    g = torch.Generator().manual_seed(0)
    d = torch.randn(500, 8, generator=g, dtype=torch.float64) + torch.arange(8.0, dtype=torch.float64)
    b, before, after = mean_shift(d.sum(0), (d * d).sum(0), 500)
    assert torch.allclose(b, d.mean(0))
    assert before == pytest.approx(float((d * d).mean())) and after == pytest.approx(float(((d - b) ** 2).mean()))
    for other in (b + 0.01, b * 0.9):          # any other constant leaves a larger error
        assert float(((d - other) ** 2).mean()) > after


def test_layer_maps():
    cfg = {"num_hidden_layers": 6}
    assert layer_map_from(cfg, [4, 1]) == [0, 2, 3, 5]
    assert dropped_after([0, 2, 3, 5], 6) == [[1], [], [4], []]
    assert dropped_after([1, 2], 4) == [[0], [3]]     # before the first kept layer: carried after it
    from slimlm.errors import ConfigError
    for bad in ([6], [1, 1], list(range(6))):
        with pytest.raises(ConfigError):
            layer_map_from(cfg, bad)
    cost = torch.tensor([[0.0, 5, 5, 5], [5, 5, 0, 5], [5, 0, 5, 0.1]])   # row 2's best (1) would go backwards
    assert monotone_alignment(cost) == [0, 2, 3]
    assert [cosine_lr(s, 10, 2) for s in (0, 1, 2)] == [0.5, 1.0, 1.0] and 0 < cosine_lr(9, 10, 2) < 0.05


def test_layer_map_is_recovered_from_a_pruned_model(teacher, texts):
    s, lm = _student(teacher, texts[0], Plan(ffn=64, drop_layers=[0, 2]))
    assert lm == [1, 3] and infer_layer_map(teacher, s) == lm
    # layer 1's successor (2) was dropped; layer 3 is the last: only shapes changed there
    assert changed_layers(teacher, s, lm) == [True, True]
    s, lm = _student(teacher, texts[0], Plan(drop_layers=[2]))
    assert changed_layers(teacher, s, lm) == [False, True, False]


def test_replayed_sub_blocks_add_up_to_the_layer(teacher, texts):
    from slimlm.arch import attention_out, mlp_out
    from slimlm.sequential import replay_inputs, run_layer
    x, kw = replay_inputs(teacher.module, texts[0][:2])
    with torch.no_grad():
        for layer in teacher.module.model.layers:
            h = x + attention_out(layer, x, kw)
            y = h + mlp_out(layer, h)
            assert torch.equal(y, run_layer(layer, x, kw))
            x = y


# ---------------------------------------------------------------------------------------------- bias compensation
@pytest.mark.parametrize("plan,importance,parts", [
    (Plan(drop_layers=[1]), "obs", {"dropped"}),
    (Plan(ffn=48), "magnitude", {"mlp"}),
    (Plan(n_kv=1, q_per_kv=2), "magnitude", {"attn"}),
    (Plan(ffn=48, q_per_kv=1, drop_layers=[2]), "obs", {"attn", "mlp", "dropped"}),
], ids=["dropped", "ffn", "heads", "mixed"])
def test_bias_compensation_lowers_the_kld(teacher, texts, plan, importance, parts):
    cal, ev = texts
    s, lm = _student(teacher, cal, plan, importance)
    before = kld(teacher, s, ev)
    st = bias_compensation(teacher, s, cal, lm, progress=False)
    after = kld(teacher, s, ev)
    assert after < 0.8 * before, (before, after)
    assert st["heldout_kld_after"] < st["heldout_kld_before"] and st["tokens"] == 6 * 64     # 2 chunks held out
    got = {p["part"] for r in st["layers"] for p in r["parts"]}
    assert got == parts
    drops = dropped_after(lm, teacher.config["num_hidden_layers"])
    for r, layer, gone in zip(st["layers"], s.module.model.layers, drops, strict=True):
        for p in r["parts"]:
            assert p["mse_after"] < p["mse_before"] and p["bias_norm"] > 0
        kept = r.get("kept", False)      # biases exactly where something changed and they helped
        assert bool(r["parts"]) == ("mlp" in parts or "attn" in parts or bool(gone))
        assert (layer.mlp.down_proj.bias is not None) == (kept and ("mlp" in parts or bool(gone)))
        assert (layer.self_attn.o_proj.bias is not None) == (kept and "attn" in parts)
    assert any(r.get("kept") for r in st["layers"])


def test_bias_compensation_keeps_only_biases_that_help(teacher, texts, monkeypatch):
    """Biases that raise the held-out KLD are taken back: with every bias made 30x too large none survives and
    the student is unchanged; with the guard off (holdout=0) all are kept."""
    import slimlm.train.stages as stages
    right = stages.mean_shift
    monkeypatch.setattr(stages, "mean_shift", lambda *a: (30 * right(*a)[0], *right(*a)[1:]))
    cal = texts[0]
    s, lm = _student(teacher, cal, Plan(ffn=48, drop_layers=[1]), "magnitude")
    sd = {k: v.clone() for k, v in s.module.state_dict().items()}
    st = bias_compensation(teacher, s, cal, lm, progress=False)
    assert [r["kept"] for r in st["layers"]] == [False, False, False]
    assert all(r["heldout_kld"] > st["heldout_kld_before"] for r in st["layers"])
    assert st["heldout_kld_after"] == st["heldout_kld_before"]
    after = s.module.state_dict()
    assert after.keys() == sd.keys() and all(torch.equal(after[k], sd[k]) for k in sd)
    st = bias_compensation(teacher, s, cal, lm, holdout=0, progress=False)
    assert st["heldout_kld_before"] is None and all(l.mlp.down_proj.bias is not None for l in s.module.model.layers)


def test_qwen2_is_skipped_untouched(tiny_hf, texts):
    from slimlm import load
    m = load(tiny_hf("Qwen2ForCausalLM"), progress=False)
    s, lm = _student(m, texts[0], Plan(ffn=48))
    sd = {k: v.clone() for k, v in s.module.state_dict().items()}
    st = bias_compensation(m, s, texts[0], lm, progress=False)
    assert "qwen2" in st["skipped"] and set(st) == {"skipped"}
    after = s.module.state_dict()
    assert after.keys() == sd.keys() and all(torch.equal(after[k], sd[k]) for k in sd)


# ---------------------------------------------------------------------------------------------- export
def _compensated(teacher, cal, plan):
    """A student with biases on every changed layer (holdout=0: no held-out check takes any back)."""
    s, lm = _student(teacher, cal, plan)
    bias_compensation(teacher, s, cal, lm, holdout=0, progress=False)
    return s


def _llama_cpp_kld(path, model, x) -> float:
    from slimlm.eval.runtime import LlamaCppRunner
    r = LlamaCppRunner(path, 64)
    try:
        got = r.logits(x)
    finally:
        r.close()
    want = model.logits(x[None])[0]
    p, q = torch.log_softmax(want.double(), -1), torch.log_softmax(got.double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.mark.parametrize("per_layer", [False, True], ids=["llama", "deci"])
def test_biases_run_in_llama_cpp_like_torch(teacher, texts, tmp_path, per_layer, llama_cpp_available):
    from slimlm import export_gguf
    from slimlm.gguf.reader import read_gguf
    plan = Plan(ffn_per_layer=[64, 32, 48], drop_layers=[2]) if per_layer else \
        Plan(ffn=48, q_per_kv=1, drop_layers=[2])
    s = _compensated(teacher, texts[0], plan)
    out = tmp_path / "b.gguf"
    export_gguf(s, out, "F32", progress=False)
    g = read_gguf(out)
    assert g.architecture == ("deci" if per_layer else "llama")
    names = {t.name for t in g.tensors}
    assert {f"blk.{i}.ffn_down.bias" for i in range(3)} <= names
    assert ({f"blk.{i}.attn_output.bias" for i in range(3)} <= names) != per_layer
    x = texts[1][0]
    assert _llama_cpp_kld(out, s, x) < 1e-6
    without = copy.deepcopy(s)                      # the biases matter: without them llama.cpp's logits differ
    for l in without.module.model.layers:
        l.mlp.down_proj.bias = None
    assert not torch.allclose(without.logits(x[None]), s.logits(x[None]), atol=1e-3)


def test_qkv_biases_take_llama_cpps_rotary_row_order(teacher, texts, tmp_path, llama_cpp_available):
    """A Llama model with attention biases (LlamaConfig.attention_bias): q/k biases are permuted like their rows."""
    from slimlm import export_gguf
    m = copy.deepcopy(teacher)
    g = torch.Generator().manual_seed(3)
    for layer in m.module.model.layers:
        for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            lin.bias = torch.nn.Parameter(0.3 * torch.randn(lin.out_features, generator=g), requires_grad=False)
    out = tmp_path / "qkv.gguf"
    export_gguf(m, out, "F32", progress=False)
    assert _llama_cpp_kld(out, m, texts[1][0]) < 1e-6      # unpermuted q/k biases: ~1e-4


def test_zero_biases_are_not_written(teacher, texts, tmp_path):
    from slimlm import export_gguf
    from slimlm.gguf.reader import read_gguf
    s = _compensated(teacher, texts[0], Plan(ffn=48))
    up = s.module.model.layers[0].mlp.up_proj
    up.bias = torch.nn.Parameter(torch.zeros(up.out_features), requires_grad=False)
    out = tmp_path / "z.gguf"
    rec = export_gguf(s, out, "Q8_0", progress=False)
    names = {t.name for t in read_gguf(out).tensors}
    assert "blk.0.ffn_up.bias" not in names and "blk.0.ffn_down.bias" in names
    assert next(r for r in rec.tensors if r.name == "blk.0.ffn_down.bias").type == "F32"


def test_hf_folder_reloads_with_the_same_logits(teacher, texts, tmp_path):
    import json

    from transformers import AutoModelForCausalLM

    from slimlm.hfout import save_hf
    s = _compensated(teacher, texts[0], Plan(ffn=48, q_per_kv=1, drop_layers=[2]))
    d = save_hf(s, tmp_path / "hf")
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["mlp_bias"] is True and cfg["attention_bias"] is True
    back = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    x = texts[1][:2]
    with torch.no_grad():
        got = back(input_ids=x, use_cache=False).logits
    assert torch.allclose(got, s.logits(x), atol=1e-5, rtol=1e-5)
    assert not back.model.layers[0].mlp.up_proj.bias.any() and back.model.layers[0].mlp.down_proj.bias.any()
    from slimlm import load  # and slimlm reads its own healed folder back (heal it again)
    again = load(d, progress=False)
    assert torch.allclose(again.logits(x), s.logits(x), atol=1e-5, rtol=1e-5)


def test_hf_export_refuses_biases_its_family_cannot_hold(tiny_hf, tmp_path):
    from slimlm import load
    from slimlm.errors import InvalidModelError
    from slimlm.hfout import save_hf
    m = load(tiny_hf("MistralForCausalLM"), progress=False)
    o = m.module.model.layers[0].self_attn.o_proj
    o.bias = torch.nn.Parameter(torch.ones(o.out_features), requires_grad=False)
    with pytest.raises(InvalidModelError, match="o_proj.bias"):
        save_hf(m, tmp_path / "hf")
    q = load(tiny_hf("Qwen2ForCausalLM"), progress=False)
    with pytest.raises(InvalidModelError, match="ffn_down"):
        q.spec.hf_to_gguf("model.layers.0.mlp.down_proj.bias")


def test_a_gguf_with_biases_is_refused_by_load(teacher, texts, tmp_path):
    """transformers' GGUF loader would build the model without these biases (a different function): slimlm's
    GGUF checks refuse the file, naming the tensor."""
    from slimlm import export_gguf, load
    from slimlm.errors import InvalidModelError
    s = _compensated(teacher, texts[0], Plan(ffn=48))
    out = tmp_path / "b.gguf"
    export_gguf(s, out, "F32", progress=False)
    with pytest.raises(InvalidModelError, match="ffn_down.bias"):
        load(out, progress=False)


# ---------------------------------------------------------------------------------------------- block-wise
def test_blockwise_lowers_layer_losses_and_the_kld(teacher, texts):
    cal, ev = texts
    s, lm = _student(teacher, cal, Plan(ffn=48, drop_layers=[1]))
    before = kld(teacher, s, ev)
    st = blockwise_reconstruction(teacher, s, cal, lm, epochs=4, lr=1e-3, batch=2, progress=False)
    assert [r["trained"] for r in st["layers"]] == [True, True, True]
    for r in st["layers"]:
        assert r["loss_after"] < r["loss_before"] and r["steps"] == 16
    assert st["layers_trained"] == 3 and not st["stopped_by_deadline"]
    assert kld(teacher, s, ev) < 0.8 * before
    assert not any(p.requires_grad for p in s.module.parameters())


def test_blockwise_is_deterministic_and_trains_only_changed_layers(teacher, texts):
    cal = texts[0]
    s, lm = _student(teacher, cal, Plan(drop_layers=[2]))
    a, b = copy.deepcopy(s), copy.deepcopy(s)
    sa = blockwise_reconstruction(teacher, a, cal, lm, epochs=1, batch=4, progress=False)
    blockwise_reconstruction(teacher, b, cal, lm, epochs=1, batch=4, progress=False)
    assert [r["trained"] for r in sa["layers"]] == [False, True, False]
    A, B, S0 = a.module.state_dict(), b.module.state_dict(), s.module.state_dict()
    assert all(torch.equal(A[k], B[k]) for k in A)
    assert all(torch.equal(A[k], S0[k]) for k in A if not k.startswith("model.layers.1."))
    assert not torch.equal(A["model.layers.1.mlp.down_proj.weight"], S0["model.layers.1.mlp.down_proj.weight"])


def test_blockwise_stops_at_the_deadline(teacher, texts):
    """A deadline already past trains nothing; a short one is shared by every layer to train (each gets steps, its
    schedule shortened to fit) and the call returns by it, give or take a step and a forward pass."""
    cal = texts[0]
    s, lm = _student(teacher, cal, Plan(ffn=48))
    sd = {k: v.clone() for k, v in s.module.state_dict().items()}
    st = blockwise_reconstruction(teacher, s, cal, lm, deadline=time.monotonic(), progress=False)
    assert st["stopped_by_deadline"] and st["layers"] == [] and st["layers_to_train"] == 4
    assert all(torch.equal(v, sd[k]) for k, v in s.module.state_dict().items())
    t0 = time.monotonic()
    st = blockwise_reconstruction(teacher, s, cal, lm, epochs=10_000, batch=1, deadline=t0 + 1.0, progress=False)
    took = time.monotonic() - t0
    assert st["stopped_by_deadline"] and st["layers_trained"] == 4 and took < 2.0, took
    assert all(0 < r["steps"] < r["planned_steps"] == 80_000 for r in st["layers"])


def test_hidden_channel_pruning_blockwise_trains_bias_compensation_skips(teacher, texts):
    """Pruned residual channels: the teacher's stream is compared on the channels the student kept (found among
    the teacher's embedding columns); bias compensation cannot feed the student's narrower stream to the
    teacher's sub-blocks and says so."""
    from slimlm.train.stages import hidden_channels
    cal = texts[0]
    s, lm = _student(teacher, cal, Plan(hidden=48, drop_layers=[3]))
    keep = hidden_channels(teacher, s)
    assert keep.shape == (48,) and torch.equal(teacher.module.model.embed_tokens.weight[:, keep],
                                               s.module.model.embed_tokens.weight)
    assert infer_layer_map(teacher, s) == lm == [0, 1, 2]
    assert "hidden" in bias_compensation(teacher, s, cal, lm, progress=False)["skipped"]
    st = blockwise_reconstruction(teacher, s, cal, lm, epochs=2, progress=False)
    assert st["layers_trained"] == 3 and all(r["loss_after"] < r["loss_before"] for r in st["layers"])
