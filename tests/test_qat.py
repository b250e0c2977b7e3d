"""Quantization-aware training (slimlm/quant/qat.py): what trains is what ships (issue 16, deliverable 2)."""
from __future__ import annotations

import copy

import gguf
import numpy as np
import pytest
import torch
from helpers import SAMPLE_TOKENS, llama_cpp_logits

from slimlm import load
from slimlm.errors import ConfigError
from slimlm.gguf.reader import read_gguf
from slimlm.gguf.writer import export_gguf, plan_model
from slimlm.quant import qat
from slimlm.train.parts import embedding_prefixes, param_groups, select_parameters


def _distil_steps(student, teacher, steps: int = 6, seed: int = 0, sub_lr: float = 1e-3) -> list[float]:
    """A few steps of forward-KL distillation on random token rows: what the trainer would train (all but the
    embeddings: block weights, norms, learned scales and rounding offsets) trains; the sub-block scales' shifts at
    `sub_lr`."""
    g = torch.Generator().manual_seed(seed)
    names = set(select_parameters(student.module, "all-but-embeddings", None))
    params = [(n, p) for n, p in student.module.named_parameters() if n in names]
    is_sub = [n.endswith(("sc_shift", "m_shift")) for n, _ in params]
    opt = torch.optim.Adam([{"params": [p for (_, p), s in zip(params, is_sub, strict=True) if not s]},
                            {"params": [p for (_, p), s in zip(params, is_sub, strict=True) if s], "lr": sub_lr}],
                           lr=1e-3)
    losses = []
    for _ in range(steps):
        ids = torch.randint(1, int(student.config["vocab_size"]), (2, 32), generator=g)
        with torch.no_grad():
            ref = torch.log_softmax(teacher.module(input_ids=ids).logits.float(), -1)
        got = torch.log_softmax(student.module(input_ids=ids).logits.float(), -1)
        loss = torch.nn.functional.kl_div(got, ref, log_target=True, reduction="batchmean")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("preset,weights", [("Q4_K_M", "ste"), ("Q4_0", "ste"), ("IQ4_XS", "ste"),
                                            ("Q4_K_M", "round"), ("Q4_0", "frozen"), ("Q4_K_M", "round+sub"), ("Q4_K_M", "codes"),
                                            ("Q3_K_M", "ste+sub"), ("Q4_0", "round+emb"), ("Q4_K_M", "ste+emb+tie")])
def test_what_trains_is_what_ships(tiny_hf, tmp_path, preset, weights, llama_cpp_available):
    """After distillation steps through the fake-quant forward, every block linear in the GGUF dequantizes (gguf-py)
    to the fake-quant weight bit for bit, and llama.cpp's logits match torch's fake-quant model's; with the
    float weights frozen or under learned rounding too (they then never move; the rounding offsets do), with the
    K-quants' integer sub-block scales and mins learned (+sub: they move and ship), and with the token embedding and
    LM head on their grids too (+emb, --qat-embeddings; +tie: the head tied to the embedding, one parametrization for
    both, the tie kept after export; their float weights never move, even under ste)."""
    weights, tie = weights.removesuffix("+tie"), weights.endswith("+tie")
    weights, emb = weights.removesuffix("+emb"), weights.endswith("+emb")
    weights, learn_sub = weights.removesuffix("+sub"), weights.endswith("+sub")
    # +sub: rows of 256 weights, so that the K-quant types hold (the default tiny model's fall back to Q5_0/Q8_0)
    dims = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2) if learn_sub \
        else {}
    teacher = load(tiny_hf("LlamaForCausalLM", tie=tie, **dims))
    m = copy.deepcopy(teacher)
    _, _, types = plan_model(m, preset)
    fakes = qat.attach(m, types, learn_round=weights in ("round", "codes"), anchor=weights == "codes",
                       freeze=weights != "ste", learn_sub_scales=learn_sub, embeddings=emb)
    n_emb = (1 if tie else 2) if emb else 0
    assert len(fakes) == 7 * m.config["num_hidden_layers"] + n_emb
    assert [f.gguf_name for f in fakes[len(fakes) - n_emb:]] == ["token_embd.weight", "output.weight"][:n_emb]
    scales0 = [f.fake.d.detach().clone() for f in fakes]
    w0 = [f.module.parametrizations.weight.original.detach().clone() for f in fakes]
    losses = _distil_steps(m, teacher, sub_lr=0.05)
    assert all(np.isfinite(losses))
    assert any((f.fake.d.detach() != s).any() for f, s in zip(fakes, scales0, strict=True))  # scales trained
    moved = [not torch.equal(f.module.parametrizations.weight.original, w) for f, w in zip(fakes, w0, strict=True)]
    assert moved[len(fakes) - n_emb:] == [False] * n_emb          # the embeddings' float weights never train
    moved = moved[:len(fakes) - n_emb]
    assert all(moved) if weights == "ste" else not any(moved)
    if emb:                                          # the embedding's grid trained: its scales moved
        assert all((f.fake.d.detach() != s).any() for f, s in zip(fakes[-n_emb:], scales0[-n_emb:], strict=True))
    if weights in ("round", "codes"):        # the embeddings' rounding never trains (their scales do)
        assert all(f.fake.round_offset.abs().sum() > 0 for f in fakes[:len(fakes) - n_emb])
        assert all(f.fake.round_offset is None for f in fakes[len(fakes) - n_emb:])
    subs = [f for f in fakes if f.fake.sub_ranges is not None]
    assert bool(subs) == learn_sub
    if learn_sub:                                    # some integer sub-block scale moved in every such tensor
        assert all((f.fake.sub_scales()[0] != f.fake.sc).any() for f in subs)
    tokens = torch.tensor(SAMPLE_TOKENS)
    with torch.no_grad():
        fq_weights = {f.hf_name: f.module.weight.detach().clone() for f in fakes}     # the last forward's
    encoded, changed = qat.export(m, fakes)
    assert not any(torch.nn.utils.parametrize.is_parametrized(f.module) for f in fakes)
    head = m.module.get_output_embeddings()
    assert (head.weight is m.module.get_input_embeddings().weight) == tie and not \
        torch.nn.utils.parametrize.is_parametrized(head)
    for f in fakes:
        assert torch.equal(changed[f.hf_name], fq_weights[f.hf_name])
    out = tmp_path / "qat.gguf"
    export_gguf(m.with_changes(changed), out, preset, progress=False, encoded=encoded)
    g = read_gguf(out)
    for f in fakes:
        t = g.tensor(f.gguf_name)
        assert t.ggml_type == types[f.gguf_name][0].ggml_type
        got = gguf.quants.dequantize(np.asarray(g.raw(t)), t.ggml_type).reshape(t.shape)
        want = m.spec.to_gguf_tensor(f.hf_name, fq_weights[f.hf_name], m.config).numpy()
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), f.gguf_name
    # torch with the file's values everywhere (the writer also quantized the embedding and output) vs llama.cpp
    shipped = m.with_changes(changed)
    module = copy.deepcopy(m.module)
    with torch.no_grad():
        for hf, W in shipped.named_weights().items():
            module.get_parameter(hf).copy_(W)
        for name, hf in (("token_embd.weight", m.spec.embed_name), ("output.weight", m.spec.output_name)):
            if name in {t.name for t in g.tensors}:
                t = g.tensor(name)
                module.get_parameter(hf).copy_(torch.from_numpy(
                    gguf.quants.dequantize(np.asarray(g.raw(t)), t.ggml_type).reshape(t.shape).copy()))
        ref = module(input_ids=tokens[None]).logits[0].float()
        plain = teacher.module(input_ids=tokens[None]).logits[0].float()
    got = llama_cpp_logits(out, tokens)
    rel = float((got - ref).abs().max() / ref.abs().max())
    rel_plain = float((got - plain).abs().max() / plain.abs().max())
    # llama.cpp rounds activations to 8 bits in its CPU dot products: ~1e-2 here, 0.13-0.2 to the float model; the
    # 256-wide model's K-quant rows take theirs in blocks of 256 (Q8_K): ~2.5e-2, its float model 0.5-0.7 away
    assert rel < (4e-2 if learn_sub else 2e-2) and rel < 0.5 * rel_plain, (rel, rel_plain)


def test_attach_refuses_a_streamed_model(tiny_hf, tmp_path):
    m = load(tiny_hf("LlamaForCausalLM"), stream=True)
    _, _, types = plan_model(m, "Q4_K_M")
    with pytest.raises(ConfigError, match="streamed"):
        qat.attach(m, types)


@pytest.mark.parametrize("weights", ["round", "ste"])
def test_compress_method_qat_end_to_end_beats_rounding_in_llama_cpp(tiny_hf, tmp_path, capsys, weights,
                                                                    llama_cpp_available):
    """`slimlm compress --method qat --heal N` trains the fake-quant model from the original and writes its codes:
    in llama.cpp, on held-out text, its KL divergence to the original is below the same type's plain rounding
    with the same importance matrix (same tokens, same run); with learned rounding (the default) and with the float
    weights through the straight-through estimator. (With them frozen, only the scales and norms training, it does not
    beat rounding on this tiny random model: 1.02x rtn's KLD; on SmolLM2 it matched learned rounding, README.)"""
    import json

    from helpers import word_texts

    from slimlm.cli import main
    teacher = tiny_hf("LlamaForCausalLM", num_hidden_layers=4)
    texts = {}
    for k, text in zip(("train", "eval"), word_texts(), strict=True):
        texts[k] = tmp_path / f"{k}.txt"
        texts[k].write_text(text)
    common = ["--type", "Q3_K_M", "--calib", str(texts["train"]), "--calib-chunks", "4", "--text", str(texts["eval"]),
              "--ctx", "64", "--chunks", "4", "--no-speed"]
    kld = {}
    for method in ("rtn", "qat"):
        out = tmp_path / f"{method}.gguf"
        extra = ["--heal", "4096", "--data", str(texts["train"]), "--seq-len", "32", "--precision", "fp32",
                 "--lr", "2e-4", "--qat-weights", weights] \
            if method == "qat" else []
        assert main(["-q", "compress", str(teacher), "-o", str(out), "--method", method, *common, *extra]) == 0
        rep = json.loads(out.with_suffix(".report.json").read_text())
        kld[method] = rep["evaluation"]["kld"]
    qat_step = next(s for s in rep["steps"] if s["step"] == "qat")
    assert qat_step["tensors"] == 7 * 4 and qat_step["heldout_kl"] < qat_step["heldout_kl_unhealed"]
    assert "QAT" in capsys.readouterr().out
    assert not (tmp_path / "qat.heal-work").exists()
    assert kld["qat"] < 0.9 * kld["rtn"], kld


def test_method_qat_settings_are_checked_and_after_pruning_qat_has_its_own_budget_and_lr():
    from slimlm.compress import QAT_LR, QAT_ROUND_LR, QAT_SCALE_LR, QAT_STE_LR, CompressConfig
    from slimlm.train.command import heal_options
    with pytest.raises(ConfigError, match="--heal BUDGET"):
        CompressConfig(type="Q4_K_M", method="qat")
    heal = heal_options("30m", {})
    with pytest.raises(ConfigError, match="--qat-budget, --qat-lr"):
        CompressConfig(type="Q4_K_M", method="gptq", prune=0.25, heal=heal, qat_budget="10m")
    for flag, v in (("scale_lr", 1e-3), ("round_lr", 1e-3), ("sub_scales", True),   # QAT's own settings without QAT
                    ("runtime_activations", True), ("qat_embeddings", True)):
        with pytest.raises(ConfigError, match="--qat-embeddings and --embedding-scale-lr set quantization-aware "
                                              "training"):
            CompressConfig(type="Q4_K_M", method="gptq", prune=0.25, heal=heal_options("30m", {flag: v}))
    with pytest.raises(ConfigError, match="--round-lr"):
        heal_options("1024", {"round_lr": 0.0})
    with pytest.raises(ConfigError, match="--qat-weights round"):
        heal_options("1024", {"round_lr": 0.01, "qat_weights": "ste"})
    with pytest.raises(ConfigError, match="--qat-budget"):
        CompressConfig(type="Q4_K_M", method="qat", prune=0.25, heal=heal, qat_budget="ten minutes")
    with pytest.raises(ConfigError, match="--qat-lr"):
        CompressConfig(type="Q4_K_M", method="qat", prune=0.25, heal=heal, qat_lr=float("nan"))
    # prune -> heal (--heal, healing's defaults) -> QAT (--qat-budget, QAT's learning rate, healing's precision)
    c = CompressConfig(type="Q4_K_M", method="gptq+qat", prune=0.25, heal=heal, qat_budget="10m")
    assert (c.heal.train.budget, c.heal.train.lr, c.heal.train.precision) == ("30m", 2e-4, "auto")
    q = c.qat_heal().train
    assert (q.budget, q.lr, q.precision) == ("10m", QAT_LR, "auto")
    assert (q.qat_weights, q.round_lr, q.scale_lr) == ("round", QAT_ROUND_LR, QAT_SCALE_LR)  # learned rounding
    def qat_train(opts):
        return CompressConfig(type="Q4_K_M", method="qat", prune=0.25, heal=heal_options("30m", opts)).qat_heal().train
    q = qat_train({"round_lr": 0.02})
    assert (q.qat_weights, q.round_lr, q.lr, q.scale_lr) == ("round", 0.02, QAT_LR, QAT_SCALE_LR)
    q = qat_train({"qat_weights": "frozen"})        # no offsets: the codes follow the learned scales
    assert (q.qat_weights, q.round_lr, q.lr, q.scale_lr) == ("frozen", None, QAT_LR, QAT_SCALE_LR)
    q = qat_train({"qat_weights": "ste"})           # the float weights through the STE, the scales at their lr
    assert (q.round_lr, q.lr, q.scale_lr) == (None, QAT_STE_LR, None)
    assert CompressConfig(type="Q4_K_M", method="qat", prune=0.25, heal=heal).qat_heal().train.budget == "30m"
    # healing before QAT trains in float: its checkpoints' fingerprint leaves QAT's own settings out (a resume
    # that changes them keeps healing's work); QAT's run keeps them
    from slimlm.train.command import float_healing
    given = {"lr": 1e-4, "scale_lr": 1e-3, "round_lr": 0.02, "sub_scales": True, "runtime_activations": True,
             "qat_embeddings": True, "embedding_scale_lr": 1e-4}
    assert float_healing(heal_options("30m", given)).train.fingerprint() == \
        heal_options("30m", {"lr": 1e-4}).train.fingerprint()
    c = CompressConfig(type="Q4_K_M", method="gptq+qat", prune=0.25, heal=heal_options("30m", given))
    assert (c.qat_heal().train.qat_embeddings, c.qat_heal().train.embedding_scale_lr) == (True, 1e-4)
    # without --prune --heal is QAT's own budget, --qat-budget overrides it
    assert CompressConfig(type="Q4_K_M", method="qat", heal=heal, qat_budget="5m").qat_heal().train.budget == "5m"


def test_prune_heal_qat_in_one_command_reports_the_unhealed_and_llama_cpps_dense_file(tiny_hf, tmp_path, capsys,
                                                                                      llama_cpp_available):
    """compress --prune R --heal B --method gptq+qat --qat-budget Q --compare: structured pruning, healing, then
    QAT from GPTQ's codes; the report puts the file next to the unhealed pruned file (GPTQ'd to the same types,
    no training) and llama.cpp's own dense file, with both trainings' records and loss curves."""
    import json

    from helpers import word_texts

    from slimlm.cli import main
    from slimlm.gguf.reader import read_gguf
    teacher = tiny_hf("LlamaForCausalLM", num_hidden_layers=4)
    texts = {}
    for k, text in zip(("train", "eval"), word_texts(), strict=True):
        texts[k] = tmp_path / f"{k}.txt"
        texts[k].write_text(text)
    out = tmp_path / "pq.gguf"
    assert main(["-q", "compress", str(teacher), "-o", str(out), "--prune", "0.01", "--heal", "4096",
                 "--method", "gptq+qat", "--qat-budget", "1024", "--qat-lr", "1e-4", "--type", "Q4_0",
                 "--compare", "Q4_0", "--data", str(texts["train"]), "--calib", str(texts["train"]),
                 "--calib-chunks", "4", "--gptq-chunks", "4", "--text", str(texts["eval"]), "--seq-len", "32",
                 "--ctx", "64", "--chunks", "4", "--no-speed"]) == 0
    rep = json.loads(out.with_suffix(".report.json").read_text())
    assert [s["step"] for s in rep["steps"]] == ["structured pruning", "healing", "imatrix", "gptq", "qat", "export"]
    heal, q = rep["healing"], rep["qat"]
    assert heal.get("what") is None and heal["budget"] == "4096" and heal["heldout_kl"] < heal["stages"][0]["heldout_kl"]
    assert q["what"] == "QAT" and q["budget"] == "1024"
    d = q["stages"][-1]["detail"]
    from slimlm.train.dist import fast_bf16
    assert d["precision"] == ("bf16" if fast_bf16(torch.device("cpu")) else "fp32") and d["tokens"] == 1024
    assert next(s for s in rep["steps"] if s["step"] == "qat")["tensors"] >= 7 * len(heal["layer_map"])
    # healing saw its rows twice, so its teacher top-k were cached; QAT (each row once) reads that cache (same
    # teacher, rows and k) instead of running the teacher again
    ht, qt = heal["stages"][-1]["detail"]["teacher_targets"], d["teacher_targets"]
    assert ht["cached"] and qt["cached"] and ht["path"] and "pq.heal-work" in ht["path"]
    assert qt["path"] == ht["path"], (qt, ht)
    e, u, b = rep["evaluation"], rep["unhealed"]["evaluation"], rep["baseline"]["evaluation"]
    assert rep["unhealed"]["method"] == "gptq" and u["n_scored_tokens"] == e["n_scored_tokens"] == b["n_scored_tokens"]
    assert e["kld"] < u["kld"], (e["kld"], u["kld"])                       # healing + QAT show in llama.cpp
    assert rep["export"]["file_bytes"] < rep["baseline"]["evaluation"]["model"]["file_bytes"]   # pruned: smaller
    g, gu = read_gguf(out), read_gguf(tmp_path / "pq.unhealed.gguf")       # same pruned shapes, same types
    assert {t.name: (tuple(t.shape), t.ggml_type) for t in g.tensors} == \
        {t.name: (tuple(t.shape), t.ggml_type) for t in gu.tensors}
    md = out.with_suffix(".report.md").read_text()
    for section in ("## Healing", "## Quantization-aware training", "## Healed vs unhealed", "(gptq, no training)",
                    "## Against llama.cpp's own Q4_0"):
        assert section in md, section
    assert (tmp_path / "pq.loss.png").stat().st_size > 0 and (tmp_path / "pq.qat-loss.png").stat().st_size > 0
    o = capsys.readouterr().out
    assert "healing       held-out KL" in o and "QAT           held-out KL" in o
    assert not (tmp_path / "pq.heal-work").exists() and not (tmp_path / "pq.qat-work").exists()


@pytest.mark.parametrize("embeddings", [False, True])
def test_qat_can_start_from_gptq_codes(tiny_hf, embeddings):
    """attach(start=GPTQ's encoded rows) on the weights GPTQ decoded to: the first forward reproduces GPTQ's codes
    (its weights exactly), and exporting untrained gives GPTQ's bytes back; with the embeddings on their grids too,
    the tied embedding starts from the codes GPTQ gave the output projection."""
    from slimlm.calib import calibration_chunks
    from slimlm.sequential import quantize_model
    m = load(tiny_hf("LlamaForCausalLM", tie=embeddings))
    _, _, types = plan_model(m, "Q4_K_M")
    chunks, _ = calibration_chunks(m, None, n_ctx=64, max_chunks=3)
    encoded, changed, _ = quantize_model(m, chunks, types, output=embeddings, progress=False)
    assert ("token_embd.weight" in encoded) == embeddings
    student = copy.deepcopy(m)
    with torch.no_grad():
        for hf, W in changed.items():
            student.module.get_parameter(hf).copy_(W)
    fakes = qat.attach(student, types, start=encoded, embeddings=embeddings)
    assert (fakes[-1].gguf_name == "token_embd.weight") == embeddings
    with torch.no_grad():
        for f in fakes:
            assert torch.equal(f.module.weight, changed[f.hf_name]), f.gguf_name
    out, _ = qat.export(student, fakes)
    for f in fakes:
        assert np.array_equal(out[f.gguf_name], encoded[f.gguf_name]), f.gguf_name


def test_gptq_qat_keeps_gptqs_output_projection(tiny_hf, tmp_path):
    """gptq+qat writes the output projection GPTQ computed on the final hidden states (frozen in training), byte
    for byte what --method gptq writes."""
    from slimlm.compress import CompressConfig, compress
    from slimlm.train.command import heal_options
    src = tiny_hf("LlamaForCausalLM")
    base = dict(type="Q4_K_M", calib="default", calib_chunks=3, gptq_chunks=3, n_ctx=64, evaluate=False)
    compress(src, tmp_path / "g.gguf", CompressConfig(method="gptq", **base), progress=False)
    heal = heal_options("512", {"seq_len": 32, "lr": 1e-3, "precision": "fp32"})
    rep = compress(src, tmp_path / "q.gguf", CompressConfig(method="gptq+qat", heal=heal, **base), progress=False)
    assert [s["step"] for s in rep.steps][:3] == ["imatrix", "gptq", "qat"]
    g, q = read_gguf(tmp_path / "g.gguf"), read_gguf(tmp_path / "q.gguf")
    raw = {n: {t.name: np.asarray(f.raw(t)).tobytes() for t in f.tensors} for n, f in (("g", g), ("q", q))}
    assert raw["q"]["output.weight"] == raw["g"]["output.weight"]


def test_runtime_activations_put_llama_cpps_activation_rounding_into_qat(tiny_hf, tmp_path):
    """--runtime-activations: QAT's forward rounds every linear's input as llama.cpp's CPU backend does (K-quant rows
    of 256: Q8_K), so the held-out KL it starts from and trains is higher than with float activations (the same
    weights, rows and tokens: 1.2% here, where the Q4_K weights dominate), and a checkpoint of one setting does not resume
    the other (the training's fingerprint holds it)."""
    from slimlm.compress import CompressConfig, compress
    from slimlm.train.command import heal_options
    src = tiny_hf("LlamaForCausalLM", hidden_size=256, intermediate_size=512, num_attention_heads=4,
                  num_key_value_heads=2)
    base = dict(type="Q4_K_M", calib="default", calib_chunks=3, n_ctx=64, evaluate=False)
    start = {}
    for on in (False, True):
        opts = {"seq_len": 32, "lr": 1e-4, "precision": "fp32", **({"runtime_activations": True} if on else {})}
        heal = heal_options("256", opts)
        assert ("runtime_activations" in heal.train.fingerprint()) == on
        rep = compress(src, tmp_path / f"q{on}.gguf", CompressConfig(method="qat", heal=heal, **base), progress=False)
        step = next(s for s in rep.steps if s["step"] == "qat")
        start[on] = step["heldout_kl_unhealed"]
        assert read_gguf(tmp_path / f"q{on}.gguf").tensor("blk.0.ffn_down.weight").ggml_type in (12, 13, 14)
    assert start[True] > start[False], start          # deterministic: equal would mean no rounding was applied


@pytest.mark.slow
def test_qat_compiles_its_student_with_the_fp16_roundings_kept(tiny_hf, tmp_path, monkeypatch):
    """compress --method qat with --compile on (auto: runs of 15 minutes / 100k tokens and more) compiles the
    fake-quant student with inductor's exact casts (tests/test_fakequant.py: without them the scales' fp16
    rounding is skipped), with --runtime-activations through the fused LM head, and trains it down."""
    from slimlm.compress import CompressConfig, compress
    from slimlm.train import trainer
    from slimlm.train.command import heal_options
    made = []

    class Spy(trainer.CompiledOrEager):
        def __init__(self, fwd, eager=None, **kw):
            made.append(kw)
            super().__init__(fwd, eager, **kw)
    monkeypatch.setattr(trainer, "CompiledOrEager", Spy)
    src = tiny_hf("LlamaForCausalLM", tie=True, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                  num_key_value_heads=2)
    heal = heal_options("1024", {"seq_len": 32, "lr": 1e-4, "precision": "fp32", "compile": "on",
                                 "runtime_activations": True})
    rep = compress(src, tmp_path / "q.gguf", CompressConfig(method="qat", heal=heal, type="Q4_K_M", calib="default",
                                                            calib_chunks=3, n_ctx=64, evaluate=False), progress=False)
    assert made == [{"exact_casts": True}]
    e2e = next(s["detail"] for s in rep.healing["stages"] if s.get("stage") == "end-to-end distillation")
    assert e2e["compiled"] is True
    step = next(s for s in rep.steps if s["step"] == "qat")
    assert step["heldout_kl"] < step["heldout_kl_unhealed"], step


def test_qat_embeddings_train_the_tied_embedding_through_the_trainers_fused_head(tiny_hf, tmp_path):
    """--qat-embeddings in compress --method qat: the tied token embedding / LM head trains on its grid through the
    trainer (whose LM head runs fused with the top-k loss, reading the parametrized weight every step), so the file's
    token_embd differs from the one written without it; the held-out KL starts higher (the file's embedding values,
    not the float ones) and trains down."""
    from slimlm.compress import CompressConfig, compress
    from slimlm.train.command import heal_options
    src = tiny_hf("LlamaForCausalLM", tie=True)
    base = dict(type="Q4_0", calib="default", calib_chunks=3, n_ctx=64, evaluate=False)
    emb, steps = {}, {}
    for on in (False, True):
        opts = {"seq_len": 32, "lr": 1e-4, "precision": "fp32", **({"qat_embeddings": True} if on else {})}
        heal = heal_options("512", opts)
        assert ("qat_embeddings" in heal.train.fingerprint()) == on
        out = tmp_path / f"q{on}.gguf"
        rep = compress(src, out, CompressConfig(method="qat", heal=heal, **base), progress=False)
        steps[on] = next(s for s in rep.steps if s["step"] == "qat")
        g = read_gguf(out)
        t = g.tensor("token_embd.weight")
        assert "output.weight" not in {t.name for t in g.tensors}          # tied: one tensor
        emb[on] = (t.ggml_type, np.asarray(g.raw(t)).copy())
    assert emb[True][0] == emb[False][0] and not np.array_equal(emb[True][1], emb[False][1])
    assert steps[True]["tensors"] == steps[False]["tensors"] + 1
    # the held-out KL it starts from now sees the embedding's rounding (without, torch trains a float embedding)
    assert steps[True]["heldout_kl_unhealed"] > steps[False]["heldout_kl_unhealed"], steps
    assert steps[True]["heldout_kl"] < steps[True]["heldout_kl_unhealed"], steps[True]


def test_qat_killed_with_sigkill_resumes_to_the_same_file(tiny_hf, tmp_path, capsys, llama_cpp_available):
    """kill -9 during QAT, then --resume: the fake-quant parametrizations, their learned scales and the optimizer
    come back from the checkpoint and the GGUF is byte-identical to an uninterrupted run's."""
    import json

    from helpers import kill_at_checkpoint, word_texts

    from slimlm.cli import main
    teacher = tiny_hf("LlamaForCausalLM", num_hidden_layers=2)
    train = tmp_path / "train.txt"
    train.write_text(word_texts()[0])
    args = ["compress", str(teacher), "--method", "qat", "--type", "Q4_0", "--heal", "2048", "--data", str(train),
            "--seq-len", "32", "--precision", "fp32", "--checkpoint-every", "2", "--eval-every", "3", "--no-eval",
            "--calib", str(train), "--calib-chunks", "2", "--ctx", "64"]
    ref = tmp_path / "ref.gguf"
    assert main(["-q", *args, "-o", str(ref)]) == 0
    run = tmp_path / "run.gguf"
    ck = tmp_path / "run.heal-work" / "checkpoint.pt"
    kill_at_checkpoint([*args, "-o", str(run)], ck, 4)
    assert ck.exists() and not run.exists()
    capsys.readouterr()
    assert main(["-q", *args, "--resume", "-o", str(run)]) == 0
    assert run.read_bytes() == ref.read_bytes()
    assert json.loads((tmp_path / "run.report.json").read_text())["healing"]["resumed"]


def test_prune_heal_qat_killed_during_qat_resumes_to_the_same_file(tiny_hf, tmp_path, capsys):
    """kill -9 during the QAT that follows healing, then --resume: healing comes back from its own checkpoint
    (OUT.heal-work), QAT from its (OUT.qat-work), and the GGUF is byte-identical to an uninterrupted run's."""
    from helpers import kill_at_checkpoint, word_texts

    from slimlm.cli import main
    teacher = tiny_hf("LlamaForCausalLM", num_hidden_layers=4)
    train = tmp_path / "train.txt"
    train.write_text(word_texts()[0])
    args = ["compress", str(teacher), "--prune", "0.01", "--heal", "1024", "--method", "qat", "--qat-budget", "2048",
            "--type", "Q4_0", "--data", str(train), "--seq-len", "32", "--checkpoint-every", "2", "--eval-every", "3",
            "--no-eval", "--no-unhealed", "--calib", str(train), "--calib-chunks", "2", "--ctx", "64"]
    ref = tmp_path / "ref.gguf"
    assert main(["-q", *args, "-o", str(ref)]) == 0
    run = tmp_path / "run.gguf"
    ck = tmp_path / "run.qat-work" / "checkpoint.pt"
    kill_at_checkpoint([*args, "-o", str(run)], ck, 4)
    assert ck.exists() and (tmp_path / "run.heal-work" / "checkpoint.pt").exists() and not run.exists()
    capsys.readouterr()
    assert main(["-q", *args, "-o", str(run)]) == 2                    # not silently started over
    assert "--resume" in capsys.readouterr().err
    assert main(["-q", *args, "--resume", "-o", str(run)]) == 0
    assert run.read_bytes() == ref.read_bytes()
    assert not (tmp_path / "run.qat-work").exists() and not (tmp_path / "run.heal-work").exists()


def test_scale_lr_puts_the_learned_block_scales_in_their_own_adamw_group(tiny_hf):
    """--scale-lr: the fake-quant d/dmin factors train at their own learning rate (a multiple of the schedule's),
    every other trainable parameter at --lr; without it one group, as before."""
    import dataclasses

    from slimlm.train.command import heal_options
    m = load(tiny_hf("LlamaForCausalLM"))
    _, _, types = plan_model(m, "Q4_K_M")
    fakes = qat.attach(m, types)
    names = select_parameters(m.module, "all-but-embeddings", None)
    params = dict(m.module.named_parameters())
    cfg = heal_options("1024", {"lr": 1e-5, "scale_lr": 1e-3}).train
    g = param_groups(params, names, cfg)
    scales = {id(p) for f in fakes for p in (f.fake.d_factor, f.fake.dmin_factor) if p is not None}
    assert len(g) == 2 and {id(p) for p in g[1]["params"]} == scales and g[1]["lr_mult"] == pytest.approx(100)
    assert not scales & {id(p) for p in g[0]["params"]} and g[0]["lr_mult"] == 1.0
    assert len(g[0]["params"]) + len(g[1]["params"]) == len(names)
    one = param_groups(params, names, dataclasses.replace(cfg, scale_lr=None))
    assert len(one) == 1 and len(one[0]["params"]) == len(names)
    with pytest.raises(ConfigError, match="--scale-lr"):
        heal_options("1024", {"scale_lr": -1.0})


def test_embedding_scale_lr_puts_the_embeddings_block_scales_in_a_group_of_their_own(tiny_hf):
    """--embedding-scale-lr (with --qat-embeddings): the tied embedding / LM head's block scales train at their own
    rate, apart from the block linears' (--scale-lr); without it they sit in the block linears' scale group, as
    before; without --qat-embeddings it is refused."""
    import dataclasses

    from slimlm.train.command import heal_options
    m = load(tiny_hf("LlamaForCausalLM", tie=True))
    _, _, types = plan_model(m, "Q4_K_M")
    fakes = qat.attach(m, types, embeddings=True)
    emb_fakes = [f for f in fakes if f.gguf_name == "token_embd.weight"]
    assert len(emb_fakes) == 1
    names = select_parameters(m.module, "all-but-embeddings", None)
    params = dict(m.module.named_parameters())
    cfg = heal_options("1024", {"lr": 1e-5, "scale_lr": 1e-3, "qat_embeddings": True,
                                "embedding_scale_lr": 1e-4}).train
    assert cfg.fingerprint()["embedding_scale_lr"] == 1e-4
    def ids(fs):
        return {id(p) for f in fs for p in (f.fake.d_factor, f.fake.dmin_factor) if p is not None}
    g = param_groups(params, names, cfg, embedding_prefixes(m.module))
    assert [x["lr_mult"] for x in g] == [1.0, pytest.approx(10), pytest.approx(100)]
    assert {id(p) for p in g[1]["params"]} == ids(emb_fakes)
    assert {id(p) for p in g[2]["params"]} == ids(fakes) - ids(emb_fakes)
    assert sum(len(x["params"]) for x in g) == len(names)
    same = param_groups(params, names, dataclasses.replace(cfg, embedding_scale_lr=None), embedding_prefixes(m.module))
    assert len(same) == 2 and {id(p) for p in same[1]["params"]} == ids(fakes)
    assert "embedding_scale_lr" not in dataclasses.replace(cfg, embedding_scale_lr=None).fingerprint()
    with pytest.raises(ConfigError, match="--qat-embeddings"):
        heal_options("1024", {"embedding_scale_lr": 1e-4})
    with pytest.raises(ConfigError, match="--embedding-scale-lr"):
        heal_options("1024", {"qat_embeddings": True, "embedding_scale_lr": 0.0})


def test_round_lr_trains_rounding_offsets_in_their_own_group_and_freezes_the_float_weights(tiny_hf):
    """--round-lr: learned rounding. Every fake-quant linear gets a per-weight offset that trains at its own
    learning rate; the float weights under the fake quantization are frozen (what moves a level is the offset),
    the norms still train at --lr."""
    from slimlm.train.command import heal_options
    m = load(tiny_hf("LlamaForCausalLM"))
    _, _, types = plan_model(m, "Q4_K_M")
    fakes = qat.attach(m, types, learn_round=True)
    names = select_parameters(m.module, "all-but-embeddings", None)
    params = dict(m.module.named_parameters())
    originals = {id(f.module.parametrizations.weight.original) for f in fakes}
    offsets = {id(f.fake.round_offset) for f in fakes}
    assert len(offsets) == len(fakes) > 0
    assert not originals & {id(params[n]) for n in names}
    assert all(not params[n].requires_grad for n in params if id(params[n]) in originals)
    assert any("norm" in n for n in names)
    cfg = heal_options("1024", {"lr": 1e-4, "round_lr": 2e-3, "scale_lr": 1e-3}).train
    g = param_groups(params, names, cfg)
    assert len(g) == 3 and g[2]["lr_mult"] == pytest.approx(20) and {id(p) for p in g[2]["params"]} == offsets
    assert sum(len(x["params"]) for x in g) == len(names)
    # without learned rounding the float weights train (straight-through estimator) and there is no offset
    m2 = load(tiny_hf("LlamaForCausalLM"))
    f2 = qat.attach(m2, types)
    n2 = select_parameters(m2.module, "all-but-embeddings", None)
    assert f2[0].fake.round_offset is None and any(n.endswith("parametrizations.weight.original") for n in n2)
