"""FSDP in the trainer (`--parallel fsdp`): 2 gloo processes holding shards of the parameters, gradients and AdamW
state follow the 1-process loss curve and end with its weights, write checkpoints of the same format (whole
tensors, as one process writes them) and resume from them to the same weights, tied embeddings included; one
process with the setting trains plainly; bad values are refused before any weight is loaded."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from slimlm.errors import ConfigError
from slimlm.train import checkpoint
from slimlm.train.config import TrainConfig

WORKER = Path(__file__).with_name("train_worker.py")
BASE = ("seq_len=32", "micro_batch=2", "teacher_targets=full", "lr=3e-3", "precision=fp32")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _one(src, calib, out: Path, *kv) -> dict:
    r = subprocess.run([sys.executable, str(WORKER), str(src), str(calib), str(out), *kv], capture_output=True,
                       timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    return json.loads((out / "result.json").read_text())


def _two(src, calib, out: Path, *kv) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
           str(src), str(calib), str(out), *kv]
    r = subprocess.run(cmd, capture_output=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    return json.loads((out / "result.json").read_text())


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    """Same shape and dtype, and equal up to `tol` relative to b's norm (float reduction order differs)."""
    return a.shape == b.shape and a.dtype == b.dtype and float((a - b).norm()) <= tol * float(b.norm()) + 1e-12


def test_two_fsdp_processes_follow_the_one_process_run_and_write_the_same_checkpoint(src, calib, tmp_path):
    common = (*BASE, "budget=4096", "eval_every=4", "checkpoint_every=5")
    one = _one(src, calib, tmp_path / "one", *common, "accum=4")                   # global batch 8
    two = _two(src, calib, tmp_path / "two", *common, "accum=2", "parallel=fsdp")  # 2 x 2 x 2 = 8
    assert one["world_size"] == 1 and two["world_size"] == 2
    l1, l2 = [c[2] for c in one["curve"]], [c[2] for c in two["curve"]]
    assert len(l1) == len(l2) == 16
    assert l1[-1] < l1[0] * 0.9                          # the curve moves, so agreeing means something
    assert max(abs(a - b) / a for a, b in zip(l1, l2, strict=True)) < 1e-3
    assert [e[0] for e in one["evals"]] == [e[0] for e in two["evals"]] and one["best_step"] == two["best_step"]
    a, b = load_file(tmp_path / "one" / "student.safetensors"), load_file(tmp_path / "two" / "student.safetensors")
    assert a.keys() == b.keys() and all(_close(b[k], a[k], 1e-3) for k in a)

    # both runs left their step-15 checkpoint: the same tensors, whole, under the same keys
    c1 = torch.load(tmp_path / "one" / "work" / checkpoint.NAME, weights_only=True)   # weights_only: no DTensor
    c2 = torch.load(tmp_path / "two" / "work" / checkpoint.NAME, weights_only=True)
    s1, s2 = json.loads(c1["meta"])["state"], json.loads(c2["meta"])["state"]
    assert s1["step"] == s2["step"] == 15 and s1["best"][0] == s2["best"][0]
    for part in ("params", "best"):
        assert c1[part].keys() == c2[part].keys()
        assert all(_close(c2[part][k], c1[part][k], 1e-3) for k in c1[part])
    o1, o2 = c1["optim"], c2["optim"]
    assert o1["param_groups"] == o2["param_groups"] and o1["state"].keys() == o2["state"].keys()
    for i, st in o1["state"].items():
        assert st.keys() == o2["state"][i].keys() and float(st["step"]) == float(o2["state"][i]["step"]) == 15
        assert _close(o2["state"][i]["exp_avg"], st["exp_avg"], 1e-2)
        assert _close(o2["state"][i]["exp_avg_sq"], st["exp_avg_sq"], 1e-2)


def test_fsdp_resumes_its_checkpoint_to_the_same_weights_with_a_tied_embedding_training(tiny_hf, calib, tmp_path):
    sys.path.insert(0, str(WORKER.parent))
    import train_worker

    src = tiny_hf("LlamaForCausalLM", tie=True)
    common = (*BASE, "budget=4096", "accum=1", "eval_every=4", "checkpoint_every=5", "train_params=all",
              "parallel=fsdp")                                                    # 32 steps of 2 x 2 rows
    ref = _two(src, calib, tmp_path / "ref", *common)
    ck = tmp_path / "ref" / "work" / checkpoint.NAME
    assert json.loads(torch.load(ck, weights_only=True)["meta"])["state"]["step"] == 30
    run = tmp_path / "resumed"
    (run / "work").mkdir(parents=True)
    shutil.copy(ck, run / "work" / checkpoint.NAME)
    res = _two(src, calib, run, *common, "resume=1")
    a, b = load_file(tmp_path / "ref" / "student.safetensors"), load_file(run / "student.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [c[:4] for c in res["curve"]] == [c[:4] for c in ref["curve"]]
    _, start, _ = train_worker.make(str(src), str(calib))
    emb = "model.embed_tokens.weight"
    assert not torch.equal(a[emb], start.module.state_dict()[emb])        # the tied embedding trained ...
    assert torch.equal(a[emb], a["lm_head.weight"])                      # ... and is still the LM head


def test_one_process_with_parallel_fsdp_trains_plainly(src, calib, tmp_path):
    sys.path.insert(0, str(WORKER.parent))
    import train_worker

    from slimlm.train.trainer import train
    runs = {}
    for mode in ("ddp", "fsdp"):
        teacher, student, data = train_worker.make(str(src), str(calib))
        cfg = TrainConfig(budget="1024", seq_len=32, micro_batch=4, eval_every=0, checkpoint_every=0, lr=3e-3,
                          teacher_targets="full", parallel=mode)
        r = train(student, teacher, data, cfg, folder=tmp_path / mode, progress=False)
        runs[mode] = r, student.module.state_dict()
    (r1, w1), (r2, w2) = runs["ddp"], runs["fsdp"]
    assert r1["parallel"] is None and r2["parallel"] is None and [c[:4] for c in r1["curve"]] == [c[:4] for c in r2["curve"]]
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)


@pytest.mark.parametrize("kw,msg", [
    (dict(parallel="zero3"), "--parallel must be one of ddp, fsdp, got 'zero3'"),
    (dict(parallel="FSDP"), "--parallel must be one of ddp, fsdp, got 'FSDP'"),
    (dict(parallel="fsdp", train_params="lora"), "--parallel fsdp cannot go with --train lora"),
])
def test_bad_parallel_settings_are_refused(kw, msg):
    with pytest.raises(ConfigError, match=re.escape(msg)):
        TrainConfig(**kw)


def test_parallel_is_a_healing_option_and_a_checkpoint_resumes_under_either():
    from slimlm.train.command import FLAGS, heal_options
    assert FLAGS["parallel"] == "--parallel"
    assert heal_options("500k", {"parallel": "fsdp"}).train.parallel == "fsdp"
    assert heal_options("500k", {}).train.parallel == "ddp"
    with pytest.raises(ConfigError, match="--parallel fsdp cannot go with --train lora"):
        heal_options("500k", {"parallel": "fsdp", "lora_rank": 8})
    with pytest.raises(ConfigError, match="--parallel: a healing option; give --heal"):
        heal_options(None, {"parallel": "fsdp"})
    # DDP and FSDP average the same gradients and write the same whole tensors: not part of the fingerprint
    assert TrainConfig(parallel="fsdp").fingerprint() == TrainConfig().fingerprint()
