"""The healing commands on tiny models: `slimlm heal` (to a GGUF evaluated in llama.cpp, and to an HF folder),
`slimlm prune --heal`, `slimlm compress --prune --heal` (the healed and the unhealed file side by side), and
kill -9 during `slimlm heal` followed by `--resume` (the same weights as a run that never stopped).

The teacher is a tiny random 4-layer Llama; the student is it pruned by `slimlm prune` into an HF folder with
per-layer MLP widths (64 of 96 neurons on average, layer 2 dropped). Training and evaluation texts are different sentences drawn from one word list, so what the
student learns on one shows on the other.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import kill_at_checkpoint, word_texts
from safetensors.torch import load_file

from slimlm.cli import main

FAST = ["--seq-len", "32", "--ctx", "64", "--chunks", "2", "--no-speed"]
STAGES = ["unhealed", "bias compensation", "block-wise reconstruction", "end-to-end distillation"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny layers: one thread is ~10x faster than two on a busy 2-core machine (no OpenMP spin-waiting)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def teacher(tiny_hf) -> Path:
    return tiny_hf("LlamaForCausalLM", num_hidden_layers=4)


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> dict:
    """Training and evaluation text: disjoint random sentences over the same 120 words."""
    d = tmp_path_factory.mktemp("heal_texts")
    p = {"train": d / "train.txt", "eval": d / "eval.txt"}
    for path, text in zip(p.values(), word_texts(), strict=True):
        path.write_text(text)
    return {k: str(v) for k, v in p.items()}


@pytest.fixture(scope="module")
def student(teacher, texts, tmp_path_factory) -> Path:
    """The teacher pruned by the CLI into an HF folder with per-layer MLP widths (64 of 96 neurons on average),
    layer 2 dropped. (A per-layer GGUF is llama.cpp's deci arch, which transformers cannot load.)"""
    out = tmp_path_factory.mktemp("heal_student") / "student"
    assert main(["-q", "prune", str(teacher), "-o", str(out), "--ffn", "64", "--drop-layers", "2", "--allocate",
                 "global", "--no-eval", "--calib", texts["train"], "--calib-chunks", "4", "--ctx", "64"]) == 0
    widths = json.loads((out / "config.json").read_text())["slimlm_per_layer"]["intermediate_size"]
    assert len(widths) == 3 and len(set(widths)) > 1 and sum(widths) == 3 * 64
    return out


def _kl(rep: dict) -> list[float]:
    return [s["heldout_kl"] for s in rep["healing"]["stages"] if "heldout_kl" in s]


def test_heal_to_gguf_reports_every_stage_the_kl_drop_and_the_loss_curve(teacher, student, texts, tmp_path, capsys,
                                                                          llama_cpp_available):
    from slimlm.gguf.reader import read_gguf
    out = tmp_path / "healed.gguf"
    assert main(["-q", "heal", str(student), "--teacher", str(teacher), "-o", str(out), "--heal", "4096",
                 "--bias", "--data", texts["train"], "--text", texts["eval"], "--eval-every", "4", *FAST]) == 0
    rep = json.loads(out.with_suffix(".report.json").read_text())
    h = rep["healing"]
    assert [s["stage"] for s in h["stages"]] == STAGES
    assert h["layer_map"] == [0, 1, 3]                            # inferred from the norms: layer 2 was dropped
    kl = _kl(rep)
    assert kl[-1] <= kl[2] and kl[-1] < 0.7 * kl[0], kl           # e2e keeps its best state; healing helped
    e2e = h["stages"][-1]["detail"]
    assert e2e["tokens"] == 4096 and e2e["steps"] == 32 and len(e2e["curve"]) == 32 and e2e["tokens_per_s"] > 0
    (src,) = h["data"]["sources"]
    assert src["kind"] == "file" and src["name"] == "train.txt" and src["tokens"] == h["data"]["train_tokens"] > 0
    assert rep["steps"][0]["step"] == "healing" and rep["steps"][0]["heldout_kl"] == kl[-1]
    ev = rep["evaluation"]                                        # the GGUF in llama.cpp against the teacher
    assert ev["model"]["runtime"] == "llama.cpp" and 0 < ev["kld"] < 1 and "eval.txt" in ev["text"]
    assert read_gguf(out).get("general.file_type") is not None and rep["export"]["type"] == "Q8_0"
    png = out.with_suffix(".loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and h["loss_plot"] == str(png)
    md = out.with_suffix(".report.md").read_text()
    assert "## Healing" in md and f"| end-to-end distillation | {kl[-1]:.4f} |" in md and "![loss curve](" \
        "healed.loss.png)" in md and "| unhealed | " in md
    assert not (tmp_path / "healed.heal-work").exists()          # checkpoints and cache removed after success
    o = capsys.readouterr().out
    assert f"held-out KL {kl[0]:.4f} (unhealed) -> {kl[-1]:.4f} (healed)" in o


def test_heal_to_an_hf_folder_with_lora(teacher, student, texts, tmp_path):
    """(--no-bias, the default said out loud: slimlm.load refuses an HF Llama folder whose config switches biases on,
    hf.check_hf_dir.)"""
    out = tmp_path / "healed_hf"
    assert main(["-q", "heal", str(student), "--teacher", str(teacher), "-o", str(out), "--heal", "1024", "--lora",
                 "4", "--lr", "3e-3", "--no-bias", "--data", texts["train"], "--text", texts["eval"], *FAST]) == 0
    rep = json.loads((tmp_path / "healed_hf.report.json").read_text())
    assert [s["stage"] for s in rep["healing"]["stages"]] == [STAGES[0], STAGES[2], STAGES[3]]
    kl = _kl(rep)
    assert kl[-1] <= kl[1] < kl[0], kl
    d = rep["healing"]["stages"][-1]["detail"]
    assert rep["healing"]["config"]["train"]["train_params"] == "lora"
    assert 0 < d["trainable_params"] < 0.02 * rep["export"]["n_params"]       # adapters only, merged back
    w = load_file(out / "model.safetensors")
    assert not any("lora" in k for k in w) and w.keys() == load_file(student / "model.safetensors").keys()
    assert json.loads((out / "config.json").read_text())["slimlm_per_layer"]["intermediate_size"] == \
        json.loads((student / "config.json").read_text())["slimlm_per_layer"]["intermediate_size"]
    assert rep["evaluation"]["model"]["runtime"] == "torch" and rep["evaluation"]["kld"] > 0
    assert (tmp_path / "healed_hf.loss.png").is_file() and not (tmp_path / "healed_hf.heal-work").exists()


def test_prune_heal_end_to_end(teacher, texts, tmp_path, capsys, llama_cpp_available):
    out = tmp_path / "p.gguf"
    assert main(["-q", "prune", str(teacher), "-o", str(out), "--ffn", "64", "--drop-layers", "1", "--allocate",
                 "global", "--heal", "512", "--generate", "256", "--calib", texts["train"], "--calib-chunks", "4",
                 "--text", texts["eval"], *FAST]) == 0
    rep = json.loads(out.with_suffix(".report.json").read_text())
    assert [s["step"] for s in rep["steps"]] == ["structured pruning", "healing", "export"]
    assert rep["steps"][0]["arch"] == "deci"                      # per-layer widths, healed and written
    assert rep["steps"][0]["drop_layers"] == [1] and rep["healing"]["layer_map"] == [0, 2, 3]
    src = rep["healing"]["data"]["sources"]                       # no --data: bundled text + the teacher's own
    assert [x["kind"] for x in src] == ["bundled", "generated"] and all(x["tokens"] > 0 for x in src)
    md = out.with_suffix(".report.md").read_text()
    assert all(f"| {x['kind']} | {x['tokens']:,} |" in md for x in src)
    kl = _kl(rep)
    assert rep["steps"][1]["heldout_kl_unhealed"] == kl[0] and rep["steps"][1]["heldout_kl"] == kl[-1] < kl[0]
    ev = rep["evaluation"]                                        # against the unpruned original
    assert ev["ref"]["n_params"] == rep["steps"][0]["params_before"] > ev["model"]["n_params"]
    assert "healing       held-out KL" in capsys.readouterr().out


def test_compress_prune_heal_writes_the_healed_and_the_unhealed_file_side_by_side(teacher, texts, tmp_path, capsys,
                                                                                   llama_cpp_available):
    from slimlm.gguf.reader import read_gguf
    out = tmp_path / "c.gguf"
    assert main(["-q", "compress", str(teacher), "-o", str(out), "--prune", "0.01", "--heal", "1024", "--type",
                 "Q8_0", "--data", texts["train"], "--calib", texts["train"], "--calib-chunks", "4", "--text",
                 texts["eval"], *FAST]) == 0
    unhealed = tmp_path / "c.unhealed.gguf"
    rep = json.loads(out.with_suffix(".report.json").read_text())
    e, u = rep["evaluation"], rep["unhealed"]["evaluation"]
    assert rep["unhealed"]["path"] == str(unhealed) and u["n_scored_tokens"] == e["n_scored_tokens"] > 0
    assert e["kld"] < u["kld"], (e["kld"], u["kld"])                  # healing shows in llama.cpp, same tokens
    assert _kl(rep)[-1] < _kl(rep)[0]
    g, gu = read_gguf(out), read_gguf(unhealed)                   # the same pruned shapes, quantized the same way
    shapes = {t.name: (tuple(t.shape), t.ggml_type) for t in gu.tensors}
    assert all(shapes[t.name] == (tuple(t.shape), t.ggml_type) for t in g.tensors if t.name in shapes)
    assert len(shapes) >= 0.8 * len(g.tensors)
    md = out.with_suffix(".report.md").read_text()
    assert "## Healed vs unhealed" in md and f"| KL divergence | {e['kld']:.6f} | {u['kld']:.6f} |" in md
    o = capsys.readouterr().out
    assert f"healed / unhealed (same tokens, same run): KL divergence {e['kld'] / u['kld']:.3f}x, perplexity " \
           f"{e['ppl']:.4f} vs {u['ppl']:.4f}" in o
    assert not list(tmp_path.glob(".*tmp*")) and not (tmp_path / "c.heal-work").exists()
    # --no-unhealed (slimlm search's trials): the same healed file, no unhealed one and no comparison
    alone = tmp_path / "d.gguf"
    assert main(["-q", "compress", str(teacher), "-o", str(alone), "--prune", "0.01", "--heal", "1024", "--type",
                 "Q8_0", "--data", texts["train"], "--calib", texts["train"], "--calib-chunks", "4", "--text",
                 texts["eval"], "--no-unhealed", *FAST]) == 0
    assert not (tmp_path / "d.unhealed.gguf").exists()
    rep2 = json.loads(alone.with_suffix(".report.json").read_text())
    assert rep2["unhealed"] is None and rep2["evaluation"]["kld"] == pytest.approx(e["kld"], rel=1e-6)


def test_kill_9_then_resume_at_the_command_line_gives_the_same_weights(teacher, student, texts, tmp_path, capsys):
    """F32 GGUF outputs: byte-identical files mean identical weights."""
    args = ["heal", str(student), "--teacher", str(teacher), "--heal", "2048", "--no-blockwise", "--data",
            texts["train"], "--checkpoint-every", "2", "--eval-every", "3", "--no-eval", "--type", "F32", *FAST]
    ref = tmp_path / "ref.gguf"
    assert main(["-q", *args, "-o", str(ref)]) == 0
    run = tmp_path / "run.gguf"
    ck = tmp_path / "run.heal-work" / "checkpoint.pt"          # beside the output, named as its report
    kill_at_checkpoint([*args, "-o", str(run)], ck, 4)
    assert ck.exists() and not run.exists()
    capsys.readouterr()
    assert main(["-q", *args, "-o", str(run)]) == 2                            # not silently started over
    assert "--resume" in capsys.readouterr().err
    assert main(["-q", *args, "--lr", "1e-3", "--resume", "-o", str(run)]) == 2   # a changed setting
    assert "lr: checkpoint 0.0002, now 0.001" in capsys.readouterr().err
    assert main(["-q", *args, "--resume", "-o", str(run)]) == 0
    assert run.read_bytes() == ref.read_bytes()
    r1 = json.loads((tmp_path / "ref.report.json").read_text())["healing"]
    r2 = json.loads((tmp_path / "run.report.json").read_text())["healing"]
    assert r2["resumed"] and [c[:4] for c in r2["stages"][-1]["detail"]["curve"]] == [c[:4] for c in r1["stages"][-1]["detail"]["curve"]]
    assert not ck.parent.exists()


def test_heal_help_names_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["heal", "--help"])
    h = " ".join(capsys.readouterr().out.split())
    from slimlm.train.command import FLAGS
    from slimlm.train.heal import GENERATE_MAX
    for flag in [*FLAGS.values(), "--teacher", "--heal", "--resume", "--type", "--text", "--overwrite",
                 "--no-blockwise", "--no-e2e"]:
        assert flag in h, flag
    assert f"at most {GENERATE_MAX} tokens" in h


def test_prune_steps_k_prunes_in_rounds_and_heals_after_each(teacher, texts, tmp_path, capsys, llama_cpp_available):
    one, it = tmp_path / "one.gguf", tmp_path / "it.gguf"
    common = [str(teacher), "--ffn", "64", "--drop-layers", "1,2", "--data", texts["train"], "--calib",
              texts["train"], "--calib-chunks", "4", "--text", texts["eval"], "--no-blockwise", *FAST]
    assert main(["-q", "prune", *common, "-o", str(one), "--heal", "600"]) == 0
    assert main(["-q", "prune", *common, "-o", str(it), "--heal", "600", "--steps", "2"]) == 0
    r1, r2 = (json.loads(p.with_suffix(".report.json").read_text()) for p in (one, it))
    p1, p2 = r1["steps"][0], r2["steps"][0]
    from slimlm.gguf.reader import read_gguf
    shapes = [{t.name: tuple(t.shape) for t in read_gguf(p).tensors if t.name.endswith(".weight")} for p in (one, it)]
    assert shapes[0] == shapes[1] and p1["drop_layers"] == p2["drop_layers"] == [1, 2]   # the same end shapes
    rounds = r2["healing"]["rounds"]
    assert [r["round"] for r in rounds] == [1, 2] and rounds[0]["params"] > rounds[1]["params"]
    assert all(r["heldout_kl"] < r["heldout_kl_unhealed"] for r in rounds)
    tok = [s["detail"]["tokens"] for s in r2["healing"]["stages"] if s["stage"] == "end-to-end distillation"]
    assert tok and tok[0] <= 300 + 4 * 32                  # each round got half of the --heal tokens
    assert not (tmp_path / "it.gguf.heal-work").exists()
    capsys.readouterr()
    assert main(["-q", "prune", str(teacher), "-o", str(tmp_path / "x.gguf"), "--ffn", "64", "--steps", "2"]) == 2
    assert "--steps K prunes in K rounds" in capsys.readouterr().err


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_heal_under_torchrun_with_two_gloo_processes_writes_one_model(teacher, student, texts, tmp_path, parallel):
    """`torchrun --nproc-per-node 2 -m slimlm heal ...`: both processes train, rank 0 alone writes the output and
    its report (world size 2, the parallel mode), and the work folder is gone."""
    out = tmp_path / "h"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "slimlm",
           "-q", "heal", str(student), "--teacher", str(teacher), "-o", str(out), "--heal", "1024", "--data",
           texts["train"], "--text", texts["eval"], "--no-blockwise", "--no-bias", "--micro-batch", "2",
           "--parallel", parallel, "--device", "cpu", *FAST]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((tmp_path / "h.report.json").read_text())
    e2e = rep["healing"]["stages"][-1]["detail"]
    assert e2e["world_size"] == 2 and e2e["parallel"] == parallel and e2e["tokens"] >= 1024
    assert (out / "config.json").exists() and not (tmp_path / "h.heal-work").exists()
    assert _kl(rep)[-1] < _kl(rep)[0]


@pytest.mark.parametrize("cmd", ["heal", "prune"])
def test_quantization_aware_training_options_are_refused_where_nothing_is_quantized(cmd, tmp_path, capsys):
    """--scale-lr, --round-lr, --qat-weights, --sub-scales, --runtime-activations, --qat-embeddings,
    --embedding-scale-lr train fake-quant grids: slimlm heal and prune train in float,
    so they refuse them (exit 2, naming compress --method qat) before loading anything."""
    args = ["--teacher", "t"] if cmd == "heal" else ["--ffn", "64"]
    for extra in (["--scale-lr", "1e-4"], ["--sub-scales"], ["--qat-weights", "codes"], ["--runtime-activations"],
                  ["--qat-embeddings"], ["--embedding-scale-lr", "1e-5"]):
        assert main(["-q", cmd, str(tmp_path / "missing"), *args, "-o", str(tmp_path / "o"), "--heal", "1024",
                     *extra]) == 2
        err = capsys.readouterr().err
        assert extra[0] in err and "compress --method qat" in err, err
