"""The healing job (slimlm/train/heal.py) on a tiny pruned model: every stage runs in order and is measured, the
held-out KL ends below the unhealed one, the work folder is gone afterwards, and the config refuses bad values."""
from __future__ import annotations

import pytest
import torch

from slimlm import load
from slimlm.errors import ConfigError
from slimlm.prune.structured import Plan, prune_structured
from slimlm.train.config import TrainConfig
from slimlm.train.heal import HealConfig, heal_model


def test_heal_runs_every_stage_in_order_and_lowers_the_heldout_kl(tiny_hf, calib, tmp_path):
    teacher = load(tiny_hf("LlamaForCausalLM", num_hidden_layers=3), progress=False)
    chunks = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
    student, _ = prune_structured(teacher, chunks, Plan(drop_layers=[1], ffn=64), progress=False)
    cfg = HealConfig(train=TrainConfig(budget="2048", seq_len=32, lr=3e-3, eval_every=4), data=(str(calib),),
                     stage_rows=8, n_heldout=2, bias=True)
    work = tmp_path / "work"
    rec = heal_model(student, teacher, cfg, folder=work, layer_map=[0, 2])
    names = [s["stage"] for s in rec["stages"]]
    assert names == ["unhealed", "bias compensation", "block-wise reconstruction", "end-to-end distillation"]
    kls = [s["heldout_kl"] for s in rec["stages"]]
    assert kls[-1] < kls[0] and min(kls[1:]) < kls[0]
    assert rec["stages"][-1]["detail"]["tokens"] == 2048
    assert rec["data"]["train_tokens"] > 0 and rec["data"]["sources"][0]["kind"] == "file"
    assert rec["stages"][-1]["detail"]["teacher_targets"]["kind"] == "topk"    # auto: top-k
    from slimlm.train.heal import clear_work
    clear_work(work)                      # the caller's step once the healed model is written
    assert not work.exists()
    assert all(torch.isfinite(p).all() for p in student.module.parameters())


def test_heal_config_refuses_bad_values_before_loading(tmp_path):
    with pytest.raises(ConfigError, match="every healing stage"):
        HealConfig(bias=False, blockwise=False, e2e=False)
    with pytest.raises(ConfigError, match="--generate"):
        HealConfig(generate=-1)
    with pytest.raises(ConfigError):
        HealConfig(data=(str(tmp_path / "missing.txt"),))


def test_a_stage_that_raises_the_heldout_kl_is_undone(tiny_hf, calib, tmp_path, monkeypatch):
    """A cheap stage is kept only if the held-out KL does not rise: one that damages the student is taken back."""
    from slimlm.train import stages
    teacher = load(tiny_hf("LlamaForCausalLM", num_hidden_layers=3), progress=False)
    chunks = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
    student, _ = prune_structured(teacher, chunks, Plan(drop_layers=[1], ffn=64), progress=False)
    before = {n: p.clone() for n, p in student.module.state_dict().items()}

    def damage(teacher, student, chunks, layer_map, **kw):
        with torch.no_grad():
            for p in student.module.model.layers.parameters():
                p.add_(torch.randn_like(p))
        return {"seconds": 0.0}
    monkeypatch.setattr(stages, "blockwise_reconstruction", damage)
    cfg = HealConfig(train=TrainConfig(budget="256", seq_len=32), data=(str(calib),), bias=False, e2e=False,
                     stage_rows=8, n_heldout=2)
    rec = heal_model(student, teacher, cfg, folder=tmp_path / "w", layer_map=[0, 2])
    bw = rec["stages"][-1]
    assert bw["undone"] and bw["heldout_kl_tried"] > bw["heldout_kl"] == rec["stages"][0]["heldout_kl"]
    after = student.module.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_an_undone_bias_compensation_leaves_no_bias_behind(tiny_hf, calib, tmp_path, monkeypatch):
    from slimlm.train import stages
    teacher = load(tiny_hf("LlamaForCausalLM", num_hidden_layers=3), progress=False)
    chunks = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
    student, _ = prune_structured(teacher, chunks, Plan(drop_layers=[1], ffn=64), progress=False)

    def bad_biases(teacher, student, chunks, layer_map, **kw):
        for layer in student.module.model.layers:
            lin = layer.mlp.down_proj
            lin.bias = torch.nn.Parameter(10 * torch.ones(lin.out_features), requires_grad=False)
        return {"seconds": 0.0}
    monkeypatch.setattr(stages, "bias_compensation", bad_biases)
    cfg = HealConfig(train=TrainConfig(budget="256", seq_len=32), data=(str(calib),), bias=True, blockwise=False,
                     e2e=False, stage_rows=8, n_heldout=2)
    rec = heal_model(student, teacher, cfg, folder=tmp_path / "w", layer_map=[0, 2])
    assert rec["stages"][-1]["undone"]
    assert all(layer.mlp.down_proj.bias is None for layer in student.module.model.layers)


def test_a_duration_budget_covers_the_evaluations_after_the_last_step(tiny_hf, calib, tmp_path, monkeypatch):
    """`--heal 10s` returns within 10 s: the trainer's last held-out evaluation and the stage's own one after it
    fit in the budget. Each evaluation here sleeps 1 s more (a big model's evaluation takes seconds: a 30-minute
    SmolLM2 run once ended 2.4 s late); without the reservation this run ends ~2 s late."""
    import time

    from slimlm.train import teacher as teacher_mod
    from slimlm.train import trainer
    real = teacher_mod.heldout_kl

    def slow(*a, **kw):
        time.sleep(1.0)
        return real(*a, **kw)
    monkeypatch.setattr(teacher_mod, "heldout_kl", slow)
    monkeypatch.setattr(trainer, "heldout_kl", slow)
    teacher = load(tiny_hf("LlamaForCausalLM", num_hidden_layers=3), progress=False)
    chunks = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
    student, _ = prune_structured(teacher, chunks, Plan(drop_layers=[1], ffn=64), progress=False)
    cfg = HealConfig(train=TrainConfig(budget="10s", seq_len=32, eval_every=0, checkpoint_every=0),
                     data=(str(calib),), blockwise=False, stage_rows=8, n_heldout=2)
    t = time.monotonic()
    rec = heal_model(student, teacher, cfg, folder=tmp_path / "work", layer_map=[0, 2], progress=False)
    took = time.monotonic() - t
    e2e = rec["stages"][-1]
    assert e2e["detail"]["stopped"] == "budget" and e2e["detail"]["steps"] > 10
    assert rec["seconds"] <= 10.3 and took <= 10.5, (rec["seconds"], took)
