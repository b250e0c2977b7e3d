"""Measured sensitivity: the KL divergence to the original when only one part of the model is pruned or
quantized, per layer (and per tensor for quantization). `slimlm sensitivity` prints it and draws a heatmap;
`--allocate sensitivity` turns the MLP columns into per-layer widths.

Every number is a real forward pass: the hidden states entering each decoder layer are cached once for the
evaluation chunk, and each variant runs from its layer's cached input to the logits. MLP variants remove the
neurons OBS chooses (the same greedy order and least-squares refit as `prune`, from the unpruned model's
activations on calibration text), heads variants remove query heads from every KV group (OBS on o_proj),
"layer" skips the whole block; quantization variants encode one tensor with a block type (slimlm's encoders)
and decode it back.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..arch import decoder_layers, part
from ..errors import ConfigError
from ..sensitivity import LayerReplay
from .structured import _obs_heads, dims, greedy_widths, input_moments, obs_remove

RATIOS = (0.25, 0.5, 0.75)
WEIGHT_SPAN = 0.08          # weight_sparsities: each layer's sparsity within +- this of the asked one


def _swap(weights: dict, run):
    """run() with each linear of `weights` ({linear: weight}) holding that weight; the old ones restored after."""
    keep = {lin: lin.weight.data for lin in weights}
    try:
        for lin, W in weights.items():
            lin.weight.data = W.to(keep[lin].dtype)
        return run()
    finally:
        for lin, W in keep.items():
            lin.weight.data = W


@torch.no_grad()
def measure(model, calib: torch.Tensor, chunk: torch.Tensor, *, ratios=RATIOS, round_to: int = 32,
            types: tuple[str, ...] = (), mlp_only: bool = False, damp: float = 0.01, progress: bool = True) -> dict:
    """{"columns": [...], "layers": [{column: KLD}], "tensors": {gguf name: {type: KLD}}, "mlp_order": [...]}.
    MLP columns "mlp R" (R of the layer's neurons removed, rounded to `round_to`), heads columns "heads -k/g"
    (k query heads of every KV group of g), "layer" (block skipped), and per type T "T" (the layer's tensors
    each at T alone, KLDs summed; per tensor in "tensors")."""
    import gguf

    from ..formats import get_format
    from ..gguf.writer import encode
    if not ratios or not all(0 < r < 1 for r in ratios):
        raise ConfigError(f"ratios must be in (0, 1), got {ratios}")
    for t in types:
        get_format(t)
    module, spec, cfg = model.module, model.spec, model.config
    d = dims(cfg)
    q0 = d["n_head"] // d["n_kv"]
    layers = decoder_layers(module)
    sums, n = input_moments(module, calib, [part(l, "down") for l in layers] + [part(l, "o") for l in layers],
                            "calibration activations", progress)
    C_down, C_o = sums[:len(layers)], sums[len(layers):]
    replay = LayerReplay(module, chunk)

    def kld(i: int, skip: bool = False) -> float:
        return max(0.0, replay.kld(i, skip))
    columns = [f"mlp {r:.0%}" for r in ratios]
    if not mlp_only:
        columns += [f"heads -{k}/{q0}" for k in range(1, q0)] + ["layer"] + list(types)
    rows, tensors, orders = [], {}, []
    for i, layer in enumerate(tqdm(layers, desc="sensitivity", unit="layer", disable=not progress,
                                   leave=False)):
        row = {}
        down = part(layer, "down")
        W = down.weight.data.double()
        n_max = max(int(round(max(ratios) * d["ffn"] / round_to)) * round_to, round_to)
        _, order = obs_remove(W, C_down[i] / n, min(n_max, d["ffn"] - round_to), per_round=round_to, damp=damp)
        orders.append(order)
        Ci = torch.linalg.inv(C_down[i] / n + damp * float(torch.diagonal(C_down[i] / n).mean()) *
                              torch.eye(d["ffn"], dtype=torch.float64))
        for r in ratios:
            k = min(max(int(round(r * d["ffn"] / round_to)) * round_to, round_to), len(order))
            S = torch.tensor(order[:k])
            Wr = W - W[:, S] @ torch.linalg.solve(Ci[S][:, S], Ci[S, :])     # least-squares refit for the set
            Wr[:, S] = 0.0
            row[f"mlp {r:.0%}"] = _swap({down: Wr}, lambda i=i: kld(i))
        if mlp_only:
            rows.append(row)
            continue
        o = part(layer, "o")
        for k in range(1, q0):
            Wo, _ = _obs_heads(o.weight.data, C_o[i] / n, d["n_kv"], q0, d["n_kv"], q0 - k, d["head_dim"], damp)
            row[f"heads -{k}/{q0}"] = _swap({o: Wo}, lambda i=i: kld(i))
        row["layer"] = kld(i, skip=True)
        for t in types:
            fmt = get_format(t)
            total = 0.0
            for name, lin in layer.named_modules():
                if not isinstance(lin, torch.nn.Linear):
                    continue
                g = spec.hf_to_gguf(f"{spec.layer_prefix}{i}.{name}.weight")
                if not fmt.fits(lin.weight.shape[1]):
                    continue
                raw = encode(lin.weight.data.float().numpy(), fmt, g)
                Wq = torch.from_numpy(gguf.quants.dequantize(raw, fmt.ggml_type).reshape(lin.weight.shape).copy())
                v = _swap({lin: Wq}, lambda i=i: kld(i))
                row_t = tensors.setdefault(g, {})
                row_t[t] = row_t.get(t, 0.0) + v       # a fused tensor's parts (ArchSpec.fused) add up
                total += v
            row[t] = total
        rows.append(row)
    return {"columns": columns, "layers": rows, "tensors": tensors, "mlp_order": orders, "ratios": list(ratios),
            "round_to": round_to, "calib_tokens": n, "eval_tokens": int(chunk.numel())}


def allocate_from(table: dict, ffn: int, n_remove: int, round_to: int) -> list[int]:
    """Per-layer MLP widths removing `n_remove` neurons in all, from measured KLD at each ratio: each layer's
    curve (0 at 0 removed) is interpolated linearly per `round_to` neurons, made non-decreasing in marginal
    cost, and the cheapest steps across layers are taken."""
    curves = []
    ratios = table["ratios"]
    for row in table["layers"]:
        xs = [0] + [min(max(int(round(r * ffn / round_to)) * round_to, round_to), ffn - round_to) for r in ratios]
        ys = [0.0] + [row[f"mlp {r:.0%}"] for r in ratios]
        costs = []
        for step in range(round_to, xs[-1] + 1, round_to):
            j = next(j for j in range(1, len(xs)) if xs[j] >= step)
            slope = (ys[j] - ys[j - 1]) / max(xs[j] - xs[j - 1], 1)
            costs.append(max(slope, 0.0))
        curves.append(costs)
    return greedy_widths(curves, ffn, n_remove, round_to)


def heatmap(table: dict, out, title: str) -> None:
    """PNG: layers x variants, color = log10 KLD."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ..io import atomic_output
    cols = table["columns"]
    M = np.array([[max(r[c], 1e-6) for c in cols] for r in table["layers"]])
    fig, ax = plt.subplots(figsize=(1.1 * len(cols) + 2, 0.28 * len(M) + 1.5))
    im = ax.imshow(np.log10(M), aspect="auto", cmap="magma_r")
    ax.set_xticks(range(len(cols)), cols, rotation=35, ha="right")
    ax.set_yticks(range(len(M)), [str(i) for i in range(len(M))])
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="log10 KL divergence to the original")
    fig.tight_layout()
    with atomic_output(out, overwrite=True) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _input_of(spec, name: str) -> str:
    """Linears of a decoder layer that read the same tensor (the family's input groups: q/k/v, gate/up) share one
    input statistic: the group's first name; any other linear its own."""
    return next((names[0] for names, _ in spec.layout.input_groups() if name in names), name)


@torch.no_grad()
def weight_sparsities(model, calib: torch.Tensor, chunk: torch.Tensor, method: str, sparsity: float, *,
                      lam: float = WEIGHT_SPAN, step: float = 0.01, damp: float = 0.01, progress: bool = True) -> dict:
    """Per-layer unstructured sparsities from measured sensitivity: each decoder layer alone is weight-pruned by
    `method` at sparsity - lam, sparsity and sparsity + lam (its linears pruned on the unpruned model's
    calibration inputs) and the KL divergence on `chunk` measured from that layer on; each layer's curve is
    interpolated per `step`, made convex, and the cheapest steps across layers raise the sparsities from
    sparsity - lam until their mean is `sparsity` (decoder layers have equal parameter counts in this family).
    Returns {"sparsities": [...], "levels": [...], "kld": [[per level] per layer]}."""
    from .weights import prune_linear
    if not (lam < sparsity < 1.0 - lam):
        raise ConfigError(f"sensitivity allocation varies sparsity by +-{lam}: give a sparsity between {lam} and "
                          f"{1 - lam}, got {sparsity}")
    layers = decoder_layers(model.module)
    lins = [{n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)} for layer in layers]
    readers = {}                                     # (layer, input) -> the first linear reading it
    for i, per in enumerate(lins):
        for n, m in per.items():
            readers.setdefault((i, _input_of(model.spec, n)), m)
    H = {}
    if method != "magnitude":
        sums, count = input_moments(model.module, calib, list(readers.values()), "sensitivity: activations",
                                    progress)
        H = {k: 2.0 * v / count for k, v in zip(readers, sums, strict=True)}
    replay = LayerReplay(model.module, chunk)
    levels = [sparsity - lam, sparsity, sparsity + lam]
    kld = []
    for i, per in enumerate(tqdm(lins, desc="sensitivity", unit="layer", disable=not progress, leave=False)):
        row = []
        for s in levels:
            pruned = {m: prune_linear(method, m.weight.data, H.get((i, _input_of(model.spec, n))), s, None, damp)[0]
                      for n, m in per.items()}
            row.append(_swap(pruned, lambda i=i: max(0.0, replay.kld(i))))
        kld.append(row)
    n_steps = 2 * round(lam / step)
    half = n_steps // 2
    curves = [[(r[1] - r[0]) / half] * half + [(r[2] - r[1]) / half] * half for r in kld]
    left = greedy_widths(curves, n_steps, len(layers) * half, 1)          # steps not taken, per layer
    return {"sparsities": [levels[0] + (n_steps - t) * step for t in left], "levels": levels, "kld": kld}
