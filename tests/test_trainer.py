"""The trainer (slimlm/train): losses against closed forms, the schedule, what trains, the best state, NaN stop,
checkpoints that resume to the same weights after kill -9, refusal of a changed setting, and 2 processes on
gloo following the 1-process loss curve."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from slimlm.errors import ConfigError, NumericsError
from slimlm.train import checkpoint, losses
from slimlm.train.config import TrainConfig, parse_budget
from slimlm.train.losses import head_kl_topk, head_topk_targets, kl_full, kl_topk, topk_targets
from slimlm.train.parts import RowOrder, compile_wanted, lr_at, select_parameters

WORKER = Path(__file__).with_name("train_worker.py")


def test_parse_budget_forms_and_errors():
    assert parse_budget("30m") == ("seconds", 1800.0)
    assert parse_budget("1.5h") == ("seconds", 5400.0)
    assert parse_budget("90s") == ("seconds", 90.0)
    assert parse_budget("500k") == ("tokens", 500000.0)
    assert parse_budget("2M") == ("tokens", 2000000.0)
    assert parse_budget("12000") == ("tokens", 12000.0)
    for bad in ("", "0", "-5m", "30x", "nanm", "inf", "m"):
        with pytest.raises(ConfigError, match="--heal"):
            parse_budget(bad)


@pytest.mark.parametrize("kw", [dict(lr=0), dict(lr=float("nan")), dict(warmup=2), dict(micro_batch=0),
                                dict(train_params="some"), dict(precision="fp8"), dict(device="tpu"),
                                dict(teacher_targets="topk", hidden_weight=1.0), dict(topk=0), dict(budget="1y")])
def test_config_refuses_bad_values(kw):
    with pytest.raises(ConfigError):
        TrainConfig(**kw)


def test_kl_topk_equals_full_kl_when_k_is_the_vocabulary_and_bounds_it_below():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 5, 50, generator=g) * 3, torch.randn(3, 5, 50, generator=g) * 3
    for T in (1.0, 2.0):
        full = kl_full(s, t, T)
        i, v = topk_targets(t, 50, T)
        assert torch.allclose(kl_topk(s, i, v, T), full, rtol=1e-4, atol=1e-6)
        i8, v8 = topk_targets(t, 8, T)
        part = kl_topk(s, i8, v8, T)       # lumping outcomes together can only lose information
        assert 0 <= part <= full + 1e-6
    assert kl_full(t, t) < 1e-6
    # closed form: two outcomes
    p, q = torch.tensor([[0.7, 0.3]]).log(), torch.tensor([[0.4, 0.6]]).log()
    want = 0.7 * torch.log(torch.tensor(0.7 / 0.4)) + 0.3 * torch.log(torch.tensor(0.3 / 0.6))
    assert abs(float(kl_full(q, p)) - float(want)) < 1e-6


@pytest.mark.parametrize("w_trains", [False, True])
def test_the_fused_lm_head_loss_equals_kl_topk_of_the_logits_in_value_and_gradients(monkeypatch, w_trains):
    monkeypatch.setattr(losses, "HEAD_CHUNK", 5)     # 14 positions: two whole chunks and a partial one
    g = torch.Generator().manual_seed(1)
    for T in (1.0, 2.0):
        h = torch.randn(2, 7, 16, generator=g).requires_grad_()
        W = torch.randn(50, 16, generator=g).requires_grad_(w_trains)
        i, v = topk_targets(torch.randn(2, 7, 50, generator=g) * 2, 8, T)
        wrt = [h, W] if w_trains else [h]
        want = kl_topk(h @ W.T, i, v, T)
        got = head_kl_topk(h, W, i, v, T)
        assert abs(float(got) - float(want)) < 1e-5 * float(want)
        for a, b in zip(torch.autograd.grad(want * 3, wrt), torch.autograd.grad(got * 3, wrt), strict=True):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
        # the teacher's side: the same top-k ids and log-probabilities as from the whole logits
        ri, rv = topk_targets(h.detach() @ W.detach().T, 8, T)
        fi, fv = head_topk_targets(h.detach(), W.detach(), 8, T)
        assert torch.equal(fi, ri) and torch.allclose(fv, rv, atol=1e-5)


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_the_chunk_kernels_functional_form_equals_the_in_place_one_and_stays_finite_far_from_the_max(T):
    """The form torch.compile gets (losses._chunk_kl_grad, _chunk_topk) against the eager in-place one, on bf16 and
    fp32 logits, with a teacher token whose student logit sits 300 below the row's max (exp underflows to 0 there:
    the log-probability must stay finite, not log(0))."""
    g = torch.Generator().manual_seed(3)
    n, V, k = 6, 300, 8
    z = torch.randn(n, V, generator=g) * 4
    idx, lt = topk_targets(torch.randn(n, V, generator=g) * 3, k, T)
    z[0, idx[0, 0]] = z[0].max() - 300.0
    for dt in (torch.float32, torch.bfloat16):
        zc = z.to(dt)
        kl_a, gz_a = losses._chunk_kl_grad(zc.clone(), idx, lt, T, 0.25, dt)
        kl_b, gz_b = losses._chunk_kl_grad_inplace(zc.clone(), idx, lt, T, 0.25, dt)
        assert torch.isfinite(kl_a).all() and torch.isfinite(gz_a.float()).all()
        assert torch.allclose(kl_a, kl_b, rtol=1e-5, atol=1e-6)
        assert gz_a.dtype == gz_b.dtype == dt
        tol = dict(rtol=1e-5, atol=1e-8) if dt == torch.float32 else dict(rtol=1e-2, atol=1e-6)
        assert torch.allclose(gz_a.float(), gz_b.float(), **tol)
        # and both are kl_topk of these logits, value and gradient (scale = T/n for T^2 * the mean)
        zz = zc.float().requires_grad_()
        want = kl_topk(zz, idx, lt, T)
        (dz,) = torch.autograd.grad(want, zz)
        assert abs(float(kl_a.mean()) * T * T - float(want)) < 1e-5 * float(want)
        kl_c, gz_c = losses._chunk_kl_grad(zc, idx, lt, T, T / n, torch.float32)
        assert torch.allclose(gz_c, dz, rtol=1e-4, atol=1e-7)
        ia, va = losses._TopKThen(losses._chunk_lse)(zc.clone(), k, T)
        ib, vb = losses._chunk_topk_inplace(zc.clone(), k, T)
        assert torch.allclose(va, vb, atol=1e-5) and torch.equal(zc.gather(-1, ia), zc.gather(-1, ib))
    # the far token's term p_t * (log p_t - log p_s) is counted, finitely: log p_s <= -300 / T there
    assert float(kl_a[0]) > 0.5 * float(lt[0, 0].exp()) * 300 / T


@pytest.mark.slow
def test_compiled_chunk_kernels_give_the_eager_loss_gradients_and_targets(monkeypatch):
    """head_kl_topk / head_topk_targets with compiled=True (what a --compile run uses) against the eager path,
    under bf16 autocast as in training, with a partial last chunk."""
    monkeypatch.setattr(losses, "HEAD_CHUNK", 16)     # 40 positions: two whole chunks and a partial one
    g = torch.Generator().manual_seed(2)
    h0 = torch.randn(2, 20, 32, generator=g)
    W = torch.randn(500, 32, generator=g) * 0.5
    i, v = topk_targets(torch.randn(2, 20, 500, generator=g) * 2, 16)
    out = {}
    for compiled in (False, True):
        h = h0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = head_kl_topk(h, W, i, v, compiled=compiled)
            ti, tv = head_topk_targets(h0, W, 16, compiled=compiled)
        (dh,) = torch.autograd.grad(loss, h)
        out[compiled] = (loss, dh, ti, tv)
    assert losses.CHUNK_KERNELS.ok("kl_grad") and losses.CHUNK_KERNELS.ok("topk")
    (la, ga, ia, va), (lb, gb, ib, vb) = out[False], out[True]
    assert abs(float(la) - float(lb)) < 1e-5 * float(la)
    assert torch.allclose(ga, gb, rtol=2e-2, atol=1e-6)          # bf16 gradients, rounded in two orders
    # the same top-k values; among tied bf16 logits the ids may differ, never the logits they point at
    assert torch.allclose(va, vb, atol=1e-5)
    z = (h0.to(torch.bfloat16) @ W.to(torch.bfloat16).T)
    assert torch.equal(z.gather(-1, ia), z.gather(-1, ib))


def test_the_trainer_fuses_the_head_only_where_logits_are_hidden_times_w_and_its_loss_is_the_same(src, calib,
                                                                                                     tmp_path):
    sys.path.insert(0, str(WORKER.parent))
    import train_worker

    from slimlm.train import trainer
    from slimlm.train.teacher import TopKOnTheFly, fused_head
    teacher, student, data = train_worker.make(str(src), str(calib))
    m = student.module
    select_parameters(m, "all-but-embeddings", None)        # what run() does before its first step
    assert fused_head(m) is m.get_output_embeddings().weight
    t = trainer.Trainer(student, teacher, data, TrainConfig(budget="1024", seq_len=32, micro_batch=4),
                        folder=tmp_path, progress=False)
    fwd, rows = trainer._Forward(m), torch.arange(4)
    targets = TopKOnTheFly(teacher, k=16, T=1.0, device=torch.device("cpu"), bf16=False)
    grads = []
    for head in (None, fused_head(m)):
        t.head = None if head is None else (lambda w=head: w)     # the trainer reads the head's weight each step
        loss = t._loss(fwd, targets, rows)
        loss.backward()
        grads.append((float(loss), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
        m.zero_grad(set_to_none=True)
    (l0, g0), (l1, g1) = grads
    assert abs(l0 - l1) < 1e-5 * l0 and g0.keys() == g1.keys() and g0
    assert all(torch.allclose(g0[n], g1[n], rtol=1e-3, atol=1e-6) for n in g0)
    # a head whose output is not hidden @ W.T (a scaled logit, as soft-capping or a logit scale would do) is not fused
    other = train_worker.make(str(src), str(calib))[1].module
    other.get_output_embeddings().register_forward_hook(lambda mod, inp, out: out * 2)
    assert fused_head(other) is None


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(lr=1e-3, warmup=0.1, min_lr=0.1)
    lrs = [lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lrs[-1] == pytest.approx(1e-4)


def test_row_order_is_a_permutation_per_epoch_and_a_function_of_seed():
    o = RowOrder(10, 3)
    rows = torch.cat([o.rows(s, 5) for s in range(4)])           # two epochs
    assert sorted(rows[:10].tolist()) == list(range(10)) and sorted(rows[10:].tolist()) == list(range(10))
    assert rows[:10].tolist() != rows[10:].tolist()
    assert torch.equal(RowOrder(10, 3).rows(3, 5), o.rows(3, 5))
    assert not torch.equal(RowOrder(10, 4).rows(0, 10), RowOrder(10, 3).rows(0, 10))


def _run(src, calib, out, *kv, wait=True, env=None):
    cmd = [sys.executable, str(WORKER), str(src), str(calib), str(out), *kv]
    p = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if wait:
        o, e = p.communicate(timeout=300)
        assert p.returncode == 0, e.decode()[-3000:]
    return p


SETTINGS = ("budget=3072", "seq_len=32", "micro_batch=4", "lr=3e-3", "eval_every=4", "checkpoint_every=3",
            "teacher_targets=full")


def test_kill_9_then_resume_gives_the_same_weights_and_a_changed_setting_is_refused(src, calib, tmp_path):
    ref = tmp_path / "ref"
    _run(src, calib, ref, *SETTINGS)
    res = json.loads((ref / "result.json").read_text())
    assert res["steps"] == 24 and res["evals"][-1][1] < res["evals"][0][1]   # it trained
    run = tmp_path / "killed"
    p = _run(src, calib, run, *SETTINGS, wait=False)
    ck = run / "work" / checkpoint.NAME
    t0 = time.time()
    while time.time() - t0 < 240:                  # kill -9 once a mid-run checkpoint exists
        if ck.exists():
            step = json.loads(torch.load(ck, weights_only=True)["meta"])["state"]["step"]
            if step >= 6:
                break
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert ck.exists() and not (run / "student.safetensors").exists()
    bad = _run(src, calib, run, *SETTINGS[:2], "micro_batch=4", "lr=1e-3", *SETTINGS[4:], "resume=1", wait=False)
    _, err = bad.communicate(timeout=300)
    assert bad.returncode != 0 and b"lr: checkpoint 0.003, now 0.001" in err
    _run(src, calib, run, *SETTINGS, "resume=1")
    a, b = load_file(ref / "student.safetensors"), load_file(run / "student.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the same steps, tokens, losses and learning rates (the 5th column is wall time)
    assert [c[:4] for c in json.loads((run / "result.json").read_text())["curve"]] == [c[:4] for c in res["curve"]]


def test_two_gloo_processes_follow_the_one_process_loss_curve(src, calib, tmp_path):
    one = tmp_path / "one"
    _run(src, calib, one, "budget=4096", "seq_len=32", "micro_batch=2", "accum=2", "eval_every=0",
         "checkpoint_every=0", "teacher_targets=full", "lr=3e-3")
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           str(WORKER), str(src), str(calib), str(two), "budget=4096", "seq_len=32", "micro_batch=2", "accum=1",
           "eval_every=0", "checkpoint_every=0", "teacher_targets=full", "lr=3e-3"]
    r = subprocess.run(cmd, capture_output=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    c1 = json.loads((one / "result.json").read_text())
    c2 = json.loads((two / "result.json").read_text())
    assert c2["world_size"] == 2 and c1["world_size"] == 1
    l1, l2 = [c[2] for c in c1["curve"]], [c[2] for c in c2["curve"]]
    assert len(l1) == len(l2) == 32
    assert l1[-1] < l1[0] * 0.9                          # the curve moves, so agreeing means something
    assert max(abs(a - b) / a for a, b in zip(l1, l2, strict=True)) < 1e-3


def test_a_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(src, calib, tmp_path, monkeypatch):
    sys.path.insert(0, str(WORKER.parent))
    import train_worker

    from slimlm.train import trainer
    teacher, student, data = train_worker.make(str(src), str(calib))
    calls = {"n": 0}
    real = trainer.kl_full

    def poisoned(s, t, T=1.0):
        calls["n"] += 1
        out = real(s, t, T)
        return out * float("nan") if calls["n"] == 7 else out   # the training loss of step 7 (the held-out
                                                                   # evaluation's KL is teacher.heldout_kl's)
    monkeypatch.setattr(trainer, "kl_full", poisoned)
    before = {k: v.clone() for k, v in student.module.state_dict().items()}
    cfg = TrainConfig(budget="3072", seq_len=32, micro_batch=4, eval_every=0, checkpoint_every=3,
                      teacher_targets="full", lr=3e-3)
    with pytest.raises(NumericsError, match="at step 7 is not finite.*last good checkpoint"):
        trainer.train(student, teacher, data, cfg, folder=tmp_path, progress=False)
    ck = torch.load(tmp_path / checkpoint.NAME, weights_only=True)
    assert json.loads(ck["meta"])["state"]["step"] == 6
    assert all(torch.isfinite(v).all() for v in ck["params"].values())
    assert all(torch.isfinite(v).all() for v in student.module.state_dict().values())
    assert any(not torch.equal(before[k], v) for k, v in student.module.state_dict().items())


@pytest.mark.parametrize("mode", ["lora", "norms+pruned", "from-changed", "all-but-embeddings"])
def test_what_trains_changes_only_those_weights_and_lora_merges_back(src, calib, tmp_path, mode):
    sys.path.insert(0, str(WORKER.parent))
    import train_worker

    from slimlm.train.trainer import train
    teacher, student, data = train_worker.make(str(src), str(calib))
    before = {k: v.clone() for k, v in student.module.state_dict().items()}
    cfg = TrainConfig(budget="1024", seq_len=32, micro_batch=4, eval_every=0, checkpoint_every=0, lr=1e-2,
                      teacher_targets="full", train_params=mode, lora_rank=4)
    r = train(student, teacher, data, cfg, folder=tmp_path, changed_layers=[1], progress=False)
    after = student.module.state_dict()
    assert after.keys() == before.keys()            # LoRA merged: the same tensors as before, no adapters
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert "model.embed_tokens.weight" not in changed and "lm_head.weight" not in changed
    if mode == "lora":
        assert changed and all(k.endswith("proj.weight") for k in changed)
        assert r["trainable_params"] < sum(v.numel() for k, v in before.items() if k.endswith("proj.weight")) / 4
    elif mode == "norms+pruned":
        assert any(k.startswith("model.layers.1.") and "proj" in k for k in changed)
        assert not any(k.startswith("model.layers.0.") and "proj" in k for k in changed)
        assert any("layernorm" in k for k in changed)
    elif mode == "from-changed":            # layer 0 comes before the first changed layer: frozen, norms included
        assert any(k.startswith("model.layers.1.") and "proj" in k for k in changed)
        assert not any(k.startswith("model.layers.0.") for k in changed) and "model.norm.weight" in changed
    else:
        assert any(k.startswith("model.layers.0.") for k in changed) and "model.norm.weight" in changed
    assert r["best_heldout_kl"] <= r["initial_heldout_kl"]


def test_the_layers_pruning_changed_are_found_by_comparing_weights_when_the_caller_does_not_say(src, calib,
                                                                                                 tmp_path):
    sys.path.insert(0, str(WORKER.parent))
    import train_worker

    from slimlm.arch import decoder_layers
    from slimlm.train import trainer
    teacher, student, data = train_worker.make(str(src), str(calib))
    n = len(decoder_layers(student.module))
    decoder_layers(student.module)[0].load_state_dict(decoder_layers(teacher.module)[0].state_dict())
    kw = dict(budget="1024", seq_len=32, micro_batch=4, eval_every=0, checkpoint_every=0)
    t = trainer.Trainer(student, teacher, data, TrainConfig(train_params="from-changed", **kw), folder=tmp_path,
                        layer_map=list(range(n)), progress=False)
    assert t.changed_layers == list(range(1, n))            # layer 0 is the teacher's again: unchanged
    t = trainer.Trainer(student, teacher, data, TrainConfig(**kw), folder=tmp_path, layer_map=list(range(n)),
                        progress=False)
    assert t.changed_layers is None                         # the default trains every layer: nothing to look up


def test_auto_teacher_targets_take_top_k_and_cache_it_only_for_rows_seen_twice(src, calib, tmp_path, monkeypatch):
    sys.path.insert(0, str(WORKER.parent))
    import train_worker

    from slimlm.train import trainer
    teacher, student, data = train_worker.make(str(src), str(calib))
    kw = dict(seq_len=32, micro_batch=4, eval_every=0, checkpoint_every=0)
    n = data.train.shape[0]
    once = n // 4                                   # steps that see each row at most once
    t = trainer.Trainer(student, teacher, data, TrainConfig(budget="1024", **kw), folder=tmp_path, progress=False)
    assert t._kind(once) == "topk" and t._kind(once + 1) == "topk"
    no_folder = trainer.Trainer(student, teacher, data, TrainConfig(budget="1024", **kw), folder=None,
                                progress=False)
    assert no_folder._kind(once) == "topk" and no_folder._kind(once + 1) == "full"     # a cache needs a folder
    assert trainer.Trainer(student, teacher, data, TrainConfig(budget="1024", hidden_weight=1.0, **kw),
                           folder=tmp_path, layer_map=[0, 1], progress=False)._kind(once) == "full"
    # the cache of all n rows: n x 32 tokens x 256 logits x 6 bytes; one byte over the limit, the teacher runs on
    # the fly with full logits
    monkeypatch.setattr(trainer, "CACHE_BYTES", n * 32 * 256 * 6 - 1)
    assert t._kind(once + 1) == "full" and t._kind(once) == "topk"
    fly = t._targets(once, "topk")
    assert not fly.cached and not list(tmp_path.glob("*.npy"))                  # nothing on disk
    cache = t._targets(once + 1, "topk")
    assert cache.cached and len(list(tmp_path.glob("*.npy"))) == 2
    rows = RowOrder(n, 0).rows(0, 4)
    a, b = fly(rows, data.train[rows]), cache(rows, data.train[rows])
    assert torch.equal(a["idx"], b["idx"]) and torch.equal(a["lt"], b["lt"])     # the same targets either way


def test_a_time_budget_with_auto_targets_takes_top_k_and_records_it(src, calib, tmp_path):
    sys.path.insert(0, str(WORKER.parent))
    import train_worker

    from slimlm.train.trainer import train
    teacher, student, data = train_worker.make(str(src), str(calib))
    r = train(student, teacher, data, TrainConfig(budget="20s", seq_len=32, micro_batch=4, eval_every=0,
                                                  checkpoint_every=0), folder=tmp_path, progress=False)
    assert r["teacher_targets"]["kind"] == "topk" and r["stopped"] == "budget" and r["steps"] >= 1
    cached = r["total_steps"] * 4 > data.train.shape[0]
    assert r["teacher_targets"]["cached"] == cached and (r["teacher_targets"]["build_seconds"] > 0) == cached


def test_a_time_budget_whose_plan_was_too_optimistic_shrinks_and_still_ends_its_schedule(src, calib, tmp_path,
                                                                                           monkeypatch):
    """The plan from one timed micro-batch leaves costs out; after REPLAN_STEPS real steps the run shrinks to what
    fits, so it ends by its budget with the learning rate decayed (not cut off by the deadline)."""
    sys.path.insert(0, str(WORKER.parent))
    import train_worker

    from slimlm.train import trainer
    teacher, student, data = train_worker.make(str(src), str(calib))
    monkeypatch.setattr(trainer.Trainer, "_plan", lambda self, fwd, order, deadline: (100_000, "full"))
    cfg = TrainConfig(budget="15s", seq_len=32, micro_batch=4, eval_every=0, checkpoint_every=0, lr=1e-3)
    r = trainer.train(student, teacher, data, cfg, folder=tmp_path, progress=False)
    assert r["stopped"] == "budget" and trainer.REPLAN_STEPS < r["steps"] == r["total_steps"] < 100_000
    assert r["curve"][-1][3] == pytest.approx(lr_at(r["steps"] - 1, r["steps"], cfg))
    assert r["curve"][-1][3] < 0.2 * cfg.lr


def _slowed_15s_run(src, calib, tmp_path, monkeypatch, slow) -> tuple[dict, TrainConfig]:
    """A 15-second budgeted run of the tiny worker model whose step n (from 1) sleeps slow(n, seconds since the first
    step) seconds more (another process on the cores); the plan's first guess is far too long, as on a busy machine.
    Asserts what every such run must do: end its schedule (learning rate at its end) by the budget, not the deadline."""
    sys.path.insert(0, str(WORKER.parent))
    import train_worker

    from slimlm.train import trainer
    teacher, student, data = train_worker.make(str(src), str(calib))
    monkeypatch.setattr(trainer.Trainer, "_plan", lambda self, fwd, order, deadline: (100_000, "full"))
    calls, loss, t0 = [0], trainer.Trainer._loss, []

    def slowed(self, *a):
        calls[0] += 1
        t0 or t0.append(time.monotonic())
        time.sleep(slow(calls[0], time.monotonic() - t0[0]))
        return loss(self, *a)

    monkeypatch.setattr(trainer.Trainer, "_loss", slowed)
    cfg = TrainConfig(budget="15s", seq_len=32, micro_batch=4, eval_every=0, checkpoint_every=0, lr=1e-3)
    r = trainer.train(student, teacher, data, cfg, folder=tmp_path, progress=False)
    assert r["stopped"] == "budget" and r["steps"] == r["total_steps"]
    assert r["curve"][-1][3] == pytest.approx(lr_at(r["steps"] - 1, r["steps"], cfg))
    return r, cfg


def test_a_passing_slow_window_does_not_cut_a_time_budget_short(src, calib, tmp_path, monkeypatch):
    """Ten steps slowed by something else on the machine: the plan shrinks for them, then grows back at the
    median rate of the windows, so the run still uses its budget and ends its schedule."""
    # the second window of REPLAN_STEPS steps
    r, _ = _slowed_15s_run(src, calib, tmp_path, monkeypatch, lambda n, t: 0.5 if 10 < n <= 20 else 0.0)
    # a plan kept at the slow window's rate would end at 20 steps + the time left after them at that rate; the run
    # went past it to the budget (rates from the run's own curve: the full suite's other worker slows every step)
    c = r["curve"]
    slow_step_s = (c[19][4] - c[9][4]) / 10
    slow_plan = 20 + (15 - c[19][4]) / slow_step_s
    assert r["steps"] > 1.1 * slow_plan and r["seconds"] > 0.8 * 15, (r["steps"], slow_plan)


def test_a_slow_down_in_the_last_window_shrinks_the_schedule_to_end_on_time(src, calib, tmp_path, monkeypatch):
    """The machine slows in the run's last seconds (after the last whole window's replan): the schedule shrinks step
    by step so it still ends, learning rate at its end, before the deadline rather than being cut by it."""
    # the budget's last ~4 seconds: each step takes 0.4 s more
    r, _ = _slowed_15s_run(src, calib, tmp_path, monkeypatch, lambda n, t: 0.4 if t > 10.5 else 0.0)
    assert [c for c in r["curve"] if c[4] > 11.5], "no step ran in the slowed seconds"
    assert r["curve"][-1][4] < 15 + 1.0                # the last step ends by the deadline (within one slow step)


def test_compiled_training_follows_the_eager_loss_curve_and_says_it_compiled(src, calib, tmp_path):
    sys.path.insert(0, str(WORKER.parent))
    import train_worker

    from slimlm.train.trainer import train
    runs = {}
    for comp in ("off", "on"):
        teacher, student, data = train_worker.make(str(src), str(calib))
        # fp32: float tolerance on any CPU (precision auto picks bf16 autocast where matmuls are fast in bf16,
        # and compiled and eager bf16 kernels round differently)
        cfg = TrainConfig(budget="256", seq_len=32, micro_batch=4, eval_every=0, checkpoint_every=0,
                          teacher_targets="topk", compile=comp, precision="fp32")
        runs[comp] = train(student, teacher, data, cfg, folder=tmp_path / comp, progress=False)
    assert runs["on"]["compiled"] and not runs["off"]["compiled"]
    a, b = [c[2] for c in runs["off"]["curve"]], [c[2] for c in runs["on"]["curve"]]
    assert len(a) == len(b) == 2 and all(abs(x - y) < 1e-4 * x for x, y in zip(a, b, strict=True))
    assert abs(runs["on"]["best_heldout_kl"] - runs["off"]["best_heldout_kl"]) < 1e-4


def test_compile_auto_only_for_runs_that_pay_it_back():
    cpu = torch.device("cpu")
    assert not compile_wanted(TrainConfig(budget="5m"), cpu, fsdp=False, lora=False)
    assert not compile_wanted(TrainConfig(budget="50k"), cpu, fsdp=False, lora=False)
    assert not compile_wanted(TrainConfig(budget="30m"), cpu, fsdp=True, lora=False)
    assert not compile_wanted(TrainConfig(budget="30m", compile="off"), cpu, fsdp=False, lora=False)
    assert compile_wanted(TrainConfig(budget="5m", compile="on"), cpu, fsdp=False, lora=False)
    import shutil
    has_cxx = any(shutil.which(c) for c in ("c++", "g++", "clang++"))
    assert compile_wanted(TrainConfig(budget="30m"), cpu, fsdp=False, lora=False) == has_cxx
    assert compile_wanted(TrainConfig(budget="500k"), cpu, fsdp=False, lora=False) == has_cxx


def test_a_bf16_teacher_gives_the_same_targets_as_autocast_over_fp32_and_gets_its_weights_back(src, calib):
    sys.path.insert(0, str(WORKER.parent))
    import train_worker

    from slimlm.train.teacher import autocast, linears_in_bf16, teacher_topk
    teacher = train_worker.make(str(src), str(calib))[0]
    m, cpu = teacher.module, torch.device("cpu")
    ids = torch.randint(0, m.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    before = {n: p for n, p in m.named_parameters()}
    copies = {n: p.detach().clone() for n, p in before.items()}

    def outputs():
        with torch.no_grad(), autocast(cpu, True):
            logits = m(input_ids=ids, use_cache=False).logits.float()
        return logits, *teacher_topk(teacher, ids, k=8, T=1.0, device=cpu, bf16=True)

    want = outputs()
    with linears_in_bf16(m, True):
        dtypes = {n: p.dtype for n, p in m.named_parameters()}
        got = outputs()
    # every Linear weight but the tied head (the embedding's own tensor) was bf16 inside; the outputs are identical
    assert dtypes["model.layers.0.self_attn.q_proj.weight"] == torch.bfloat16
    assert dtypes["model.embed_tokens.weight"] == torch.float32
    assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
    # on exit the same fp32 tensors are back, unchanged
    after = dict(m.named_parameters())
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
    assert all(torch.equal(after[n], copies[n]) and after[n].dtype == torch.float32 for n in before)


def test_adamw_is_fused_for_plain_parameters_and_steps_like_the_per_tensor_loop():
    from slimlm.train.parts import adamw
    torch.manual_seed(0)
    ws = [torch.nn.Parameter(torch.randn(64, 32)), torch.nn.Parameter(torch.randn(7))]
    ref = [torch.nn.Parameter(w.detach().clone()) for w in ws]
    start = [w.detach().clone() for w in ws]
    fused = adamw([{"params": ws}], lr=1e-2, betas=(0.9, 0.95))
    loop = torch.optim.AdamW([{"params": ref}], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0, foreach=False)
    assert fused.defaults["fused"] and not loop.defaults["fused"]
    for _ in range(5):
        for opt, ps in ((fused, ws), (loop, ref)):
            opt.zero_grad()
            sum((p ** 2).sum() for p in ps).backward()
            opt.step()
    for w, r, w0 in zip(ws, ref, start, strict=True):
        assert (w - w0).abs().mean() > 1e-2                    # the weights moved ...
        torch.testing.assert_close(w, r, rtol=1e-5, atol=1e-6)  # ... as the per-tensor loop moved it
    # a checkpoint holds no step implementation, and a resumed optimizer keeps its own
    from slimlm.train.parts import load_optim_state, optim_state
    sd = optim_state(loop)
    assert all("fused" not in g and "foreach" not in g for g in sd["param_groups"])
    load_optim_state(fused, sd)
    assert fused.param_groups[0]["fused"] and torch.equal(fused.state[ws[0]]["exp_avg"], loop.state[ref[0]]["exp_avg"])
    # not fused where asked not to (FSDP's shards) or where a tensor is not a plain Parameter
    assert not adamw([torch.nn.Parameter(torch.ones(3))], lr=1e-3, fused=False).defaults["fused"]
    assert not adamw([torch.ones(3, requires_grad=True)], lr=1e-3).defaults["fused"]


def test_heldout_kl_keeps_the_teachers_logits_and_gives_the_same_number(src, calib, monkeypatch):
    """The held-out evaluation runs the teacher once per run: later evaluations reuse its logits and equal a fresh
    teacher forward exactly (the teacher is fixed)."""
    sys.path.insert(0, str(WORKER.parent))
    import train_worker

    from slimlm.train import teacher as teacher_mod
    from slimlm.train import trainer
    teacher, student, data = train_worker.make(str(src), str(calib))
    calls = {"n": 0}
    teacher.module.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    cfg = TrainConfig(budget="256", seq_len=32, micro_batch=1, eval_every=0, checkpoint_every=0, precision="fp32")
    t = trainer.Trainer(student, teacher, data, cfg, folder=None, progress=False)
    first = t.heldout_kl(student.module)
    assert calls["n"] == data.heldout.shape[0] == 2           # one teacher forward per held-out micro-batch
    second = t.heldout_kl(student.module)
    assert calls["n"] == 2 and second == first                  # none the second time, the same number
    monkeypatch.setattr(teacher_mod, "HELDOUT_TEACHER_BYTES", 0)  # too big to keep: the teacher runs every time
    fresh = trainer.Trainer(student, teacher, data, cfg, folder=None, progress=False)
    assert fresh.heldout_kl(student.module) == first and fresh.heldout_kl(student.module) == first
    assert calls["n"] == 6
    with torch.no_grad():                                       # a changed student gives a different number
        next(student.module.parameters()).mul_(0.5)
    assert t.heldout_kl(student.module) != first and calls["n"] == 6


@pytest.mark.parametrize("interval, want", [(0.0, [2, 4, 6, 8, 10]), (3600.0, [])])
def test_default_checkpoints_every_n_steps_at_most_once_per_interval(src, calib, tmp_path, monkeypatch,
                                                                      interval, want):
    """Without --checkpoint-every, a checkpoint every AUTO_CHECKPOINT_STEPS steps once AUTO_CHECKPOINT_SECONDS have
    passed since the last: none in a run shorter than the interval; an explicit N keeps its exact meaning."""
    sys.path.insert(0, str(WORKER.parent))
    import train_worker

    from slimlm.train import trainer
    monkeypatch.setattr(trainer, "AUTO_CHECKPOINT_STEPS", 2)
    monkeypatch.setattr(trainer, "AUTO_CHECKPOINT_SECONDS", interval)
    saved = []
    real = trainer.checkpoint.save
    monkeypatch.setattr(trainer.checkpoint, "save", lambda folder, **kw: (saved.append(kw["state"]["step"]),
                                                                          real(folder, **kw))[1])
    teacher, student, data = train_worker.make(str(src), str(calib))
    base = dict(budget="1536", seq_len=32, micro_batch=4, eval_every=0, lr=1e-3, teacher_targets="full")
    trainer.train(student, teacher, data, TrainConfig(**base), folder=tmp_path / "a", progress=False)
    assert saved == want                                         # 12 steps; never after the last
    if interval:                                                 # an explicit N: every N steps, whatever the time
        saved.clear()
        trainer.train(student, teacher, data, TrainConfig(**base, checkpoint_every=5), folder=tmp_path / "b",
                      progress=False)
        assert saved == [5, 10]


def test_heal_stages_heldout_kl_runs_the_teacher_once(src, calib):
    """heal_model evaluates every stage on the same held-out rows: the teacher's logits are computed by the first
    evaluation and reused, with the same number as a fresh forward."""
    sys.path.insert(0, str(WORKER.parent))
    import train_worker

    from slimlm.train.heal import heldout_kl
    teacher, student, data = train_worker.make(str(src), str(calib))
    calls = {"n": 0}
    teacher.module.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    keep: list = []
    first = heldout_kl(student, teacher, data.heldout, batch=1, keep=keep)
    assert calls["n"] == 2 and len(keep) == 2
    assert heldout_kl(student, teacher, data.heldout, batch=1, keep=keep) == first and calls["n"] == 2
    assert heldout_kl(student, teacher, data.heldout, batch=1) == first and calls["n"] == 4
