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


def _distil_steps(student, teacher, steps: int = 6, seed: int = 0) -> list[float]:
    """A few steps of forward-KL distillation on random token rows: weights and scales train."""
    g = torch.Generator().manual_seed(seed)
    params = [p for p in student.module.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-3)
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


@pytest.mark.parametrize("preset", ["Q4_K_M", "Q4_0", "IQ4_XS"])
def test_what_trains_is_what_ships(tiny_hf, tmp_path, preset, llama_cpp_available):
    """After distillation steps through the fake-quant forward, every block linear in the GGUF dequantizes (gguf-py)
    to the fake-quant weight bit for bit, and llama.cpp's logits match torch's fake-quant model's."""
    teacher = load(tiny_hf("LlamaForCausalLM"))
    m = copy.deepcopy(teacher)
    _, _, types = plan_model(m, preset)
    fakes = qat.attach(m, types)
    assert len(fakes) == 7 * m.config["num_hidden_layers"]
    scales0 = [f.fake.d.detach().clone() for f in fakes]
    losses = _distil_steps(m, teacher)
    assert all(np.isfinite(losses))
    assert any((f.fake.d.detach() != s).any() for f, s in zip(fakes, scales0, strict=True))  # scales trained
    tokens = torch.tensor(SAMPLE_TOKENS)
    with torch.no_grad():
        fq_weights = {f.hf_name: f.module.weight.detach().clone() for f in fakes}     # the last forward's
    encoded, changed = qat.export(m, fakes)
    assert not any(torch.nn.utils.parametrize.is_parametrized(f.module) for f in fakes)
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
    # llama.cpp rounds activations to 8 bits in its CPU dot products: ~1e-2 here, 0.13-0.2 to the float model
    assert rel < 2e-2 and rel < 0.5 * rel_plain, (rel, rel_plain)


def test_attach_refuses_a_streamed_model(tiny_hf, tmp_path):
    m = load(tiny_hf("LlamaForCausalLM"), stream=True)
    _, _, types = plan_model(m, "Q4_K_M")
    with pytest.raises(ConfigError, match="streamed"):
        qat.attach(m, types)


def test_compress_method_qat_end_to_end_beats_rounding_in_llama_cpp(tiny_hf, tmp_path, capsys, llama_cpp_available):
    """`slimlm compress --method qat --heal N` trains the fake-quant model from the original and writes its codes:
    in llama.cpp, on held-out text, its KL divergence to the original is below the same type's plain rounding
    with the same importance matrix (same tokens, same run)."""
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
                 "--lr", "2e-4"] \
            if method == "qat" else []
        assert main(["-q", "compress", str(teacher), "-o", str(out), "--method", method, *common, *extra]) == 0
        rep = json.loads(out.with_suffix(".report.json").read_text())
        kld[method] = rep["evaluation"]["kld"]
    qat_step = next(s for s in rep["steps"] if s["step"] == "qat")
    assert qat_step["tensors"] == 7 * 4 and qat_step["heldout_kl"] < qat_step["heldout_kl_unhealed"]
    assert "QAT" in capsys.readouterr().out
    assert not (tmp_path / "qat.heal-work").exists()
    assert kld["qat"] < 0.9 * kld["rtn"], kld


def test_method_qat_needs_a_budget_and_no_prune():
    from slimlm.compress import CompressConfig
    with pytest.raises(ConfigError, match="--heal BUDGET"):
        CompressConfig(type="Q4_K_M", method="qat")


def test_qat_can_start_from_gptq_codes(tiny_hf):
    """attach(start=GPTQ's encoded rows) on the weights GPTQ decoded to: the first forward reproduces GPTQ's codes
    (its weights exactly), and exporting untrained gives GPTQ's bytes back."""
    from slimlm.calib import calibration_chunks
    from slimlm.sequential import quantize_model
    m = load(tiny_hf("LlamaForCausalLM"))
    _, _, types = plan_model(m, "Q4_K_M")
    chunks, _ = calibration_chunks(m, None, n_ctx=64, max_chunks=3)
    encoded, changed, _ = quantize_model(m, chunks, types, output=False, progress=False)
    student = copy.deepcopy(m)
    with torch.no_grad():
        for hf, W in changed.items():
            student.module.get_parameter(hf).copy_(W)
    fakes = qat.attach(student, types, start=encoded)
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
