"""Iterative pruning: reach a structured plan in K rounds, healing after each (`--steps K`).

The final plan (layers dropped, per-layer MLP widths) is chosen once on the original model, as one-shot pruning
would choose it. Round k of K then removes k/K of the way there: the first ceil(k/K * |dropped|) layers of the
drop list in the order they were ranked (least influential first), and each kept layer's MLP width moved k/K of
the way from the original width to its final one (rounded to the width multiple; exact in the last round).
Each round prunes the model the previous round healed (OBS refit on its own activations), then heals it.
Only MLP neurons and whole layers: a plan that also removes heads or hidden channels is refused.
"""
from __future__ import annotations

import math
from collections.abc import Callable

from ..arch import layer_dims
from ..errors import ConfigError
from .structured import Plan, dims


def round_targets(final: Plan, cfg0: dict, order: list[int], steps: int, round_to: int) -> list[tuple[list[int], dict]]:
    """Per round: (original layers dropped so far, {original layer: MLP width}) — cumulative targets."""
    if steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {steps}")
    if final.hidden is not None or final.n_kv is not None or final.q_per_kv is not None:
        raise ConfigError("--steps (iterative pruning) removes MLP neurons and layers only; this plan also removes "
                          "heads or hidden channels: use --method mlp, layers or mlp+layers")
    d = dims(cfg0)
    drop = [i for i in order if i in set(final.drop_layers)]
    kept = [i for i in range(d["n_layer"]) if i not in set(final.drop_layers)]
    widths = final.ffn_per_layer or [final.ffn if final.ffn is not None else d["ffn"]] * len(kept)
    final_w = dict(zip(kept, widths, strict=True))
    out = []
    for k in range(1, steps + 1):
        gone = sorted(drop[:math.ceil(len(drop) * k / steps)])
        w = {}
        for i in range(d["n_layer"]):
            if i in gone:
                continue
            w0 = layer_dims(cfg0, i)[0]
            target = final_w.get(i, w0)
            w[i] = target if k == steps else w0 - int(round((w0 - target) * k / steps / round_to)) * round_to
        out.append((gone, w))
    return out


def plan_now(target: tuple[list[int], dict], layer_map: list[int]) -> Plan:
    """A cumulative target in original-layer terms as a plan for today's model (`layer_map`: original index of
    each of its layers)."""
    gone, w = target
    drop = [j for j, t in enumerate(layer_map) if t in set(gone)]
    return Plan(drop_layers=drop, ffn_per_layer=[w[t] for t in layer_map if t not in set(gone)])


def prune_iteratively(model, chunks, final: Plan, order: list[int], steps: int, *, round_to: int,
                      heal: Callable[[object, list[int], int], dict], importance: str = "obs",
                      progress: bool = True, say=lambda m: None) -> tuple[object, list[dict]]:
    """K rounds of prune -> heal from `model` (unchanged) towards `final`. `heal(student, layer_map, round)`
    heals in place and returns its record. Returns (the last round's model, one record per round)."""
    from .structured import prune_structured
    cur, layer_map = model, list(range(dims(model.config)["n_layer"]))
    records = []
    for k, target in enumerate(round_targets(final, model.config, order, steps, round_to), start=1):
        plan = plan_now(target, layer_map)
        say(f"round {k}/{steps}: {plan.describe()} ...")
        cur, st = prune_structured(cur, chunks, plan, importance=importance, progress=progress)
        layer_map = [t for t in layer_map if t not in set(target[0])]
        rec = {"round": k, "plan": plan.describe(), "params": st["params_after"], "layer_map": layer_map}
        rec["heal"] = heal(cur, layer_map, k)
        records.append(rec)
    return cur, records
