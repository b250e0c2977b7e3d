"""Iterative pruning (slimlm/prune/iterative.py): K rounds reach the one-shot plan's shapes exactly, each round
in between, a per-layer model loses more neurons and layers, and heal runs after every round."""
from __future__ import annotations

import pytest
import torch

from slimlm import load
from slimlm.arch import layer_dims
from slimlm.errors import ConfigError
from slimlm.prune.iterative import plan_now, prune_iteratively, round_targets
from slimlm.prune.structured import Plan, prune_structured


@pytest.fixture(scope="module")
def four(tiny_hf):
    return load(tiny_hf("LlamaForCausalLM", num_hidden_layers=4, intermediate_size=128), progress=False)


def test_round_targets_move_k_over_k_of_the_way_and_end_exactly_on_the_plan(four):
    final = Plan(drop_layers=[1, 2], ffn_per_layer=[64, 96])
    t = round_targets(final, four.config, order=[2, 1, 0, 3], steps=2, round_to=16)
    assert t[0] == ([2], {0: 96, 1: 128, 3: 112})      # the least influential layer first; widths halfway
    assert t[1] == ([1, 2], {0: 64, 3: 96})
    assert plan_now(t[1], [0, 1, 3]).drop_layers == [1]
    assert plan_now(t[1], [0, 1, 3]).ffn_per_layer == [64, 96]
    with pytest.raises(ConfigError, match="MLP neurons and layers only"):
        round_targets(Plan(n_kv=1), four.config, [0, 1, 2, 3], 2, 16)


def test_k_rounds_give_the_one_shot_shapes_and_heal_after_each(four):
    g = torch.Generator().manual_seed(0)
    chunks = torch.randint(0, 1000, (2, 32), generator=g)
    final = Plan(drop_layers=[2], ffn_per_layer=[64, 96, 80])
    one, _ = prune_structured(four, chunks, final, progress=False)
    calls = []

    def heal(student, layer_map, k):
        calls.append((k, list(layer_map), student.n_params()))
        return {"round": k}

    last, recs = prune_iteratively(four, chunks, final, [2, 0, 1, 3], 3, round_to=16, heal=heal, progress=False)
    assert last.n_params() == one.n_params()
    assert [layer_dims(last.config, j)[0] for j in range(3)] == [64, 96, 80]
    assert [c[0] for c in calls] == [1, 2, 3] and calls[-1][1] == [0, 1, 3]
    sizes = [c[2] for c in calls]
    assert four.n_params() > sizes[0] > sizes[1] > sizes[2] == one.n_params()
    assert four.n_params() == load(four.source, progress=False).n_params()      # the original is unchanged
    assert torch.isfinite(last.logits(chunks)).all()
