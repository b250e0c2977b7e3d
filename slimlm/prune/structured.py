"""Structured pruning that physically shrinks a Llama-family model: MLP neurons, attention heads (GQA-aware),
hidden channels and whole layers. Zeroed weights make a GGUF neither smaller nor faster; removed rows,
columns, heads and layers do.

How widths are pruned (`prune_structured`), one decoder layer at a time on calibration activations that already
went through the pruned earlier layers ("sequential", as SparseGPT/GPTQ do):
- MLP neurons: the intermediate activations h = act(gate x) * up x feed down_proj. With C = h^T h / n, the
  output error of dropping a set S of down_proj's input columns and refitting the rest by least squares is
  that of OBS (Optimal Brain Surgeon) on columns; neurons are removed greedily in rounds (those whose removal
  raises the error least), and down_proj's remaining columns take the OBS update
  W <- W - W[:, S] Cinv[S, S]^-1 Cinv[S, :] (ZipLM / SlimGPT style). gate/up lose the same rows. C is the
  input Hessian GPTQ uses (2/n X^T X: OBS is invariant to its scale).
  `importance="activation"` ranks by Minitron's mean |h_j| (no update), `"taylor"` by the first-order Taylor
  estimate of the loss change |sum_t h_j dL/dh_j| (LM loss on the calibration text, per chunk, averaged; no
  update), `"magnitude"` by the weights' norms.
- attention heads: the same on o_proj's input, 64 columns (a head) at a time, with GQA kept valid: whole KV
  groups go first (all their query heads, and k/v rows), then the same number of query heads from every
  remaining group, so the result is again a plain `llama` layout.
- hidden channels (Minitron's embedding channels): scored by the mean square of every RMSNorm output that
  reads the residual stream (the inputs of q/k/v, gate/up and the output projection), removed from the
  embedding, every norm and every linear that reads or writes the residual stream. RMSNorm then normalizes
  over fewer channels, which no weight update can undo exactly: this step wants healing.
- layers: block influence (ShortGPT): 1 - mean cosine similarity between a block's input and output hidden
  states on calibration text; the least influential blocks are removed.

Widths are uniform across layers (the `llama` arch) or, for MLPs, per layer (`Plan.ffn_per_layer`, chosen by
`allocate_ffn`; llama.cpp's `deci` arch); `round_to` (format-aware pruning) rounds each width down to a
multiple that keeps every matrix in the target type's blocks, e.g. 256 for K-quants, which also forces the
attention width (heads x head_dim) to such a multiple.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..arch import (
    ARCHS,
    PER_LAYER,
    decoder_layers,
    embedding,
    experts,
    final_norm,
    hidden_norms,
    hidden_readers,
    hidden_writers,
    keep_experts,
    layer_dims,
    n_experts,
    part,
    set_decoder_layers,
    set_part,
)
from ..errors import ConfigError, InvalidModelError, NumericsError

IMPORTANCE = ("obs", "activation", "taylor", "magnitude")


@dataclass
class Plan:
    """Target shape; None keeps a dimension."""
    ffn: int | None = None                 # intermediate size
    n_kv: int | None = None                # KV heads kept
    q_per_kv: int | None = None            # query heads kept per KV head
    hidden: int | None = None              # residual-stream width
    drop_layers: list[int] = field(default_factory=list)
    ffn_per_layer: list[int] | None = None # per remaining layer (llama.cpp's `deci` arch); overrides ffn
    experts: int | None = None             # experts kept per layer (mixture of experts), by router statistics

    def describe(self) -> str:
        parts = []
        if self.drop_layers:
            parts.append(f"layers -{len(self.drop_layers)} {sorted(self.drop_layers)}")
        if self.ffn_per_layer is not None:
            parts.append(f"ffn per layer {min(self.ffn_per_layer)}..{max(self.ffn_per_layer)} "
                         f"(mean {sum(self.ffn_per_layer) / len(self.ffn_per_layer):.0f})")
        elif self.ffn is not None:
            parts.append(f"ffn {self.ffn}")
        if self.n_kv is not None or self.q_per_kv is not None:
            parts.append(f"heads {'all' if self.n_kv is None else self.n_kv} KV x "
                         f"{'all' if self.q_per_kv is None else self.q_per_kv} q")
        if self.hidden is not None:
            parts.append(f"hidden {self.hidden}")
        if self.experts is not None:
            parts.append(f"experts {self.experts}")
        return ", ".join(parts) or "nothing"


# ---------------------------------------------------------------------------------------------- shapes
def dims(cfg: dict) -> dict:
    h, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    return {"hidden": h, "ffn": cfg["intermediate_size"], "n_head": nh,
            "n_kv": cfg.get("num_key_value_heads") or nh, "head_dim": cfg.get("head_dim") or h // nh,
            "n_layer": cfg["num_hidden_layers"], "vocab": cfg["vocab_size"],
            "tied": bool(cfg.get("tie_word_embeddings", False))}


def planned_config(cfg: dict, plan: Plan) -> dict:
    """The config after `plan` (head_dim written out: it no longer follows from hidden / heads)."""
    d = dims(cfg)
    out = dict(cfg)
    n_kv = plan.n_kv if plan.n_kv is not None else d["n_kv"]
    q_per = plan.q_per_kv if plan.q_per_kv is not None else d["n_head"] // d["n_kv"]
    out.update(hidden_size=d["hidden"] if plan.hidden is None else plan.hidden,
               intermediate_size=d["ffn"] if plan.ffn is None else plan.ffn,
               num_attention_heads=n_kv * q_per, num_key_value_heads=n_kv, head_dim=d["head_dim"],
               num_hidden_layers=d["n_layer"] - len(plan.drop_layers))
    ffn_per_layer = plan.ffn_per_layer
    if ffn_per_layer is None and plan.ffn is None and cfg.get(PER_LAYER):   # per-layer widths stay with their layers
        ffn_per_layer = [layer_dims(cfg, i)[0] for i in range(d["n_layer"]) if i not in set(plan.drop_layers)]
    out.pop(PER_LAYER, None)
    if plan.experts is not None:
        out["num_local_experts" if "num_local_experts" in cfg else "num_experts"] = plan.experts
    if isinstance(cfg.get("layer_types"), list):          # per-layer attention kinds: those of the kept layers
        out["layer_types"] = [t for i, t in enumerate(cfg["layer_types"]) if i not in set(plan.drop_layers)]
    if ffn_per_layer is not None:
        if len(ffn_per_layer) != out["num_hidden_layers"]:
            raise ConfigError(f"{len(ffn_per_layer)} per-layer widths for {out['num_hidden_layers']} layers")
        if len(set(ffn_per_layer)) == 1:
            out["intermediate_size"] = ffn_per_layer[0]
        else:
            out["intermediate_size"] = max(ffn_per_layer)
            out[PER_LAYER] = {"intermediate_size": [int(v) for v in ffn_per_layer]}
    return out


def n_params(cfg: dict) -> int:
    """Parameters of a model with this config (tied embedding counted once): the sum over the tensors its family
    has (arch.ArchSpec.expected_shapes, the shapes the loader checks), so q/k/v biases (Qwen2) and q/k norms
    (Qwen3) count."""
    arch = (cfg.get("architectures") or [None])[0]
    if arch not in ARCHS:
        raise InvalidModelError(f"architecture {arch!r} is not supported; supported: {', '.join(ARCHS)}")
    return sum(math.prod(shape) for shape in ARCHS[arch].expected_shapes(cfg).values())


def plan_for_ratio(cfg: dict, ratio: float, *, method: str = "mlp", round_to: int = 32,
                   layer_order: list[int] | None = None) -> Plan:
    """The uniform plan that removes at least `ratio` of all parameters with `method`:
    - "mlp": MLP neurons only;
    - "layers": whole layers only (`layer_order`: least influential first);
    - "width": MLP neurons and attention query heads at the same fraction of each (attention rounded to
      whole heads per KV group; the MLP takes up what rounding left)."""
    if not 0.0 < ratio < 1.0:
        raise ConfigError(f"--ratio must be between 0 and 1 (a fraction of the parameters), got {ratio}")
    d = dims(cfg)
    total = n_params(cfg)
    goal = total * (1.0 - ratio)
    if method == "layers":
        if layer_order is None:
            raise ConfigError("layer pruning needs layer scores (calibration)")
        for k in range(1, d["n_layer"]):
            p = Plan(drop_layers=sorted(layer_order[:k]))
            if n_params(planned_config(cfg, p)) <= goal:
                return p
        raise ConfigError(f"removing layers cannot reach {ratio:.0%} fewer parameters while keeping one")
    plan = Plan()
    if ARCHS[cfg["architectures"][0]].moe and method in ("mlp", "width"):   # no dense MLP: whole experts go
        return _experts_for_ratio(cfg, goal, ratio)
    if method == "width":
        q_per = d["n_head"] // d["n_kv"]
        frac = ratio * total / (total - d["vocab"] * d["hidden"] * (1 if d["tied"] else 2))
        keep = max(1, round(q_per * (1 - frac)))
        if keep < q_per:
            plan.q_per_kv = keep
    elif method != "mlp":
        raise ConfigError(f"unknown structured method {method!r}; choose mlp, width or layers")
    base = n_params(planned_config(cfg, Plan(q_per_kv=plan.q_per_kv, ffn=0)))
    per_neuron = 3 * d["hidden"] * d["n_layer"]
    ffn = int((goal - base) // per_neuron) // round_to * round_to
    if ffn < round_to:
        raise ConfigError(f"{method} pruning cannot remove {ratio:.0%} of the parameters: the MLPs would vanish; "
                          f"use a smaller --ratio or add layer pruning")
    plan.ffn = min(ffn, d["ffn"] // round_to * round_to)
    return plan


def _experts_for_ratio(cfg: dict, goal: float, ratio: float) -> Plan:
    """The most experts per layer that leave at most `goal` parameters (at least the experts each token uses)."""
    ne, k = n_experts(cfg), int(cfg["num_experts_per_tok"])
    for keep in range(ne - 1, k - 1, -1):
        if n_params(planned_config(cfg, Plan(experts=keep))) <= goal:
            return Plan(experts=keep)
    raise ConfigError(f"removing experts cannot reach {ratio:.0%} fewer parameters while keeping the {k} each token "
                      f"uses; use a smaller --ratio or add layer pruning")


@torch.no_grad()
def router_mass(module, chunks: torch.Tensor, *, progress: bool = True) -> list[torch.Tensor]:
    """Per mixture-of-experts layer, each expert's routing mass on calibration text: the sum over tokens of the
    (renormalized top-k) weight the router gives it -- how much of the layer's output each expert carries."""
    layers = decoder_layers(module)
    mass = [torch.zeros(experts(l).num_experts, dtype=torch.float64) for l in layers]

    def hook(i):
        def f(_mod, _inp, out):
            _, scores, idx = out
            mass[i].index_add_(0, idx.reshape(-1), scores.reshape(-1).double())
        return f
    hs = [part(l, "router").register_forward_hook(hook(i)) for i, l in enumerate(layers)]
    try:
        for c in tqdm(chunks, desc="router statistics", unit="chunk", disable=not progress, leave=False):
            module(input_ids=c[None], use_cache=False)
    finally:
        for h in hs:
            h.remove()
    return mass


# ---------------------------------------------------------------------------------------------- scores
def _layer_pass(model, chunks: torch.Tensor, last: int, desc: str, progress: bool):
    """The calibration chunks through decoder layers 0..last one layer at a time (lazy.onload: a streamed model
    reads one layer), in micro-batches: yields (i, layer, micro-batches, x, kw, later) with x the layer's input for
    every chunk, which the caller replaces by the layer's output while the layer is loaded
    (sequential.forward_layer, with its own hooks: in place, one such tensor alive); the callables it appends
    to `later` run once the layer is put back (work on a tensor taken from it, in less memory)."""
    from ..lazy import onload, trim_heap
    from ..sequential import micro_batches, replay_inputs
    x, kw = replay_inputs(model.module, chunks, model)
    layers = decoder_layers(model.module)
    for i in tqdm(range(last + 1), desc=desc, unit="layer", disable=not progress, leave=False):
        later: list = []
        with onload(model, layers[i], f"{model.spec.layer_prefix}{i}.") as layer:
            yield i, layer, micro_batches(x), x, kw, later
        if later:
            while later:           # each dropped once it ran: what it holds (a Hessian's storage) goes with it
                later.pop(0)()
            trim_heap()            # the freed second moment back to the system before the next layer is read


@torch.no_grad()
def block_influence(model, chunks: torch.Tensor, *, progress: bool = True) -> list[float]:
    """Per layer: 1 - mean over tokens of cos(block input, block output) (ShortGPT's block influence), one layer
    at a time over all chunks."""
    from ..sequential import forward_layer
    out = []
    for _, layer, micro, x, kw, _ in _layer_pass(model, chunks, len(decoder_layers(model.module)) - 1,
                                                 "block influence", progress):
        s = torch.zeros((), dtype=torch.float64)
        forward_layer(layer, x, kw, micro, each=lambda sl, y, s=s, x=x: s.add_(
            (1.0 - torch.nn.functional.cosine_similarity(x[sl].double(), y.double(), dim=-1)).sum()))
        out.append(float(s / chunks.numel()))
    return out


def obs_remove(W: torch.Tensor, C: torch.Tensor, n_remove: int, group: int = 1, *, damp: float = 0.01,
               allowed=None, steps: int = 64, per_round: int | None = None,
               trace: list | None = None, consume: bool = False) -> tuple[torch.Tensor, list[int]]:
    """Greedy OBS removal of `n_remove` groups of `group` consecutive input columns of W (rows, cols) given the
    input second moment C (cols, cols). Returns (W with the removed columns zero and the rest refit by least
    squares on C, removed group indices in order). At most `steps` rounds: each removes the ceil(n / steps)
    groups whose removal (judged one at a time) costs least, then updates W and the inverse for all of them at
    once (exact for the set; only the choice within a round ignores their interaction). `allowed(removed, g)`
    can veto a group (then one group per round). `per_round` fixes the groups per round; `trace` receives
    (groups removed so far, output error added by the round) after every round. `consume`: C (float64) is the
    caller's to give away (its storage holds the inverse's factorization), so only one n x n matrix besides it is
    alive: a 14336-wide MLP's takes 1.6 GB in float64."""
    W = W.detach().double().clone()
    Cd = C.double() if consume else C.double().clone()
    n = Cd.shape[0]
    d = torch.diagonal(Cd)
    dead = d <= 0
    scale = float(d[~dead].mean()) if (~dead).any() else 1.0
    d.add_(damp * scale)
    d[dead] = 1.0                   # never-active inputs: free to remove, nothing to refit
    Ci = _spd_inverse(Cd)
    del Cd, d
    G = n // group
    removed: list[int] = []
    alive = torch.ones(G, dtype=torch.bool)
    if per_round is None:
        per_round = 1 if allowed is not None else max(1, math.ceil(n_remove / steps))
    while len(removed) < n_remove:
        if group == 1:
            score = (W * W).sum(0) / torch.diagonal(Ci)
        else:
            blocks = Ci.reshape(G, group, G, group)[torch.arange(G), :, torch.arange(G), :]   # (G, g, g)
            blocks[~alive] = torch.eye(group, dtype=C.dtype)       # removed groups: any invertible block
            Wg = W.reshape(W.shape[0], G, group).transpose(0, 1)   # (G, rows, g)
            score = torch.einsum("grk,gkl,grl->g", Wg, torch.linalg.inv(blocks), Wg)
        score = torch.where(alive, score, torch.full_like(score, math.inf))
        if allowed is not None:
            ok = torch.tensor([bool(alive[g]) and allowed(removed, g) for g in range(G)])
            score = torch.where(ok, score, torch.full_like(score, math.inf))
        k = min(per_round, n_remove - len(removed))
        pick = torch.argsort(score)[:k]
        if not torch.isfinite(score[pick]).all():
            raise ConfigError("no group left that may be removed")
        cols = (pick[:, None] * group + torch.arange(group)[None, :]).flatten()
        B = torch.linalg.inv(Ci[cols][:, cols])
        if trace is not None:    # output error the round adds: tr(W_S B W_S^T)
            trace.append((len(removed) + k, float(torch.einsum("rk,kl,rl->", W[:, cols], B, W[:, cols]))))
        R = Ci[cols, :].clone()
        W.addmm_(W[:, cols] @ B, R, alpha=-1)          # in place: no (rows, n) or n x n temporary
        Ci.addmm_(Ci[:, cols] @ B, R, alpha=-1)
        W[:, cols] = 0.0
        Ci[cols, :] = 0.0
        Ci[:, cols] = 0.0
        alive[pick] = False
        removed += pick.tolist()
    if not torch.isfinite(W).all():
        raise NumericsError("structured pruning produced non-finite weights (calibration activations degenerate)")
    return W, removed


def _spd_inverse(A: torch.Tensor, block: int = 256) -> torch.Tensor:
    """The inverse of a symmetric positive definite A (a dampened second moment), in A's own storage: the sweep
    operator (Goodnight 1979) over blocks of `block` pivots, each an in-place rank-`block` update, so nothing of
    A's size is allocated beside it. Sweeping every pivot leaves -A^-1; a pivot block that is not positive
    definite means the calibration activations are degenerate."""
    n = A.shape[0]
    for k0 in range(0, n, block):
        K = slice(k0, min(n, k0 + block))
        R = A[K, :].clone()                                   # rows K: (b, n)
        L, info = torch.linalg.cholesky_ex(R[:, K])
        if int(info) != 0:
            raise NumericsError("the input second moment is not positive definite: the calibration activations "
                                "are degenerate for this layer (give more calibration text)")
        Dinv = torch.cholesky_inverse(L)
        B = A[:, K] @ Dinv                                    # A_IK D^-1
        A.addmm_(B, R, alpha=-1)                              # A_IJ - A_IK D^-1 A_KJ
        A[:, K] = B
        A[K, :] = B.T
        A[K, K] = -Dinv
    return A.neg_()


@torch.no_grad()
def allocate_ffn(model, chunks: torch.Tensor, n_remove: int, *, round_to: int = 32, max_frac: float = 0.75,
                 layers: list[int] | None = None, damp: float = 0.01, progress: bool = True) -> list[int]:
    """Per-layer MLP widths that remove `n_remove` neurons in all (each layer's a multiple of `round_to`, at most
    `max_frac` of a layer): every layer's OBS removal curve is measured on the unpruned model in rounds of
    `round_to` neurons, each round's output error divided by the mean square of the residual stream that the
    layer writes into (an error's weight relative to the signal it perturbs), made non-decreasing along the
    layer, and the cheapest rounds across all layers are taken (global ranking; FLAP/ZipLM style). `layers`:
    only these layers (by index; the others are to be dropped) get widths, in that order."""
    from ..sequential import InputStats, forward_layer
    which = list(range(len(decoder_layers(model.module)))) if layers is None else list(layers)
    ff = dims(model.config)["ffn"]
    n_max = int(ff * max_frac) // round_to * round_to
    curves = {}
    for i, layer, micro, x, kw, later in _layer_pass(model, chunks, max(which), "MLP curves (OBS)", progress):
        if i not in which:
            forward_layer(layer, x, kw, micro)
            continue
        st, resid = InputStats(), torch.zeros((), dtype=torch.float64)
        down = part(layer, "down")
        h = down.register_forward_pre_hook(lambda _m, inputs, st=st: st.add(inputs[0]))
        try:
            forward_layer(layer, x, kw, micro, each=lambda _sl, y, resid=resid: resid.add_(
                y.double().pow(2).mean(-1).sum()))
        finally:
            h.remove()
        st.to_host().check(f"layer {i} MLP down projection")
        r = float(resid / chunks.numel())

        def curve(i=i, W=down.weight.data, st=st, resid=r):
            trace: list = []
            obs_remove(W, st.mean(), n_max, per_round=round_to, damp=damp, trace=trace, consume=True)
            curves[i] = [err / round_to / resid for _, err in trace]
        later.append(curve)           # once the layer is put back: only its down projection stays
        del st, curve                 # the list holds the only reference: the second moment goes once it ran
    return greedy_widths([curves[i] for i in which], ff, n_remove, round_to)


def greedy_widths(curves: list[list[float]], ffn: int, n_remove: int, round_to: int) -> list[int]:
    """curves[layer][step]: marginal cost of removing the step-th group of `round_to` neurons of a layer.
    Costs are made non-decreasing along each layer (so a layer's steps are taken in order), then the cheapest
    steps over all layers are taken until `n_remove` neurons are removed."""
    steps = []
    for i, costs in enumerate(curves):
        worst = 0.0
        for s, c in enumerate(costs):
            worst = max(worst, c if math.isfinite(c) else math.inf)
            steps.append((worst, i, s))
    removed, total = [0] * len(curves), 0
    for _, i, _ in sorted(steps):
        if total >= n_remove:
            break
        removed[i] += round_to
        total += round_to
    if total < n_remove:
        raise ConfigError(f"cannot remove {n_remove} MLP neurons within the range allowed per layer")
    return [ffn - r for r in removed]


def input_moments(module, chunks: torch.Tensor, linears: list, desc: str,
                  progress: bool) -> tuple[list[torch.Tensor], int]:
    """Run the calibration chunks through `module` once; returns, per linear in `linears`, the sum over all
    tokens of x x^T of its input (float32 products, accumulated in float64), and the token count."""
    sums: list = [None] * len(linears)

    def acc(k):
        def f(_mod, inputs):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            c = (x.T @ x).double()
            sums[k] = c if sums[k] is None else sums[k] + c
        return f
    hs = [lin.register_forward_pre_hook(acc(k)) for k, lin in enumerate(linears)]
    count = 0
    try:
        for c in tqdm(chunks, desc=desc, unit="chunk", disable=not progress, leave=False):
            module(input_ids=c[None], use_cache=False)
            count += c.numel()
    finally:
        for h in hs:
            h.remove()
    return sums, count


# ---------------------------------------------------------------------------------------------- surgery
def _linear(W: torch.Tensor, b: torch.Tensor | None, like: torch.nn.Linear) -> torch.nn.Linear:
    out = torch.nn.Linear(W.shape[1], W.shape[0], bias=b is not None, dtype=like.weight.dtype, device="meta")
    out.weight = torch.nn.Parameter(W.to(like.weight.dtype).contiguous(), requires_grad=False)
    if b is not None:
        out.bias = torch.nn.Parameter(b.to(like.weight.dtype).contiguous(), requires_grad=False)
    return out


def _rows(lin: torch.nn.Linear, idx: torch.Tensor) -> torch.nn.Linear:
    return _linear(lin.weight.data[idx], None if lin.bias is None else lin.bias.data[idx], lin)


def _cols(lin: torch.nn.Linear, idx: torch.Tensor, W: torch.Tensor | None = None) -> torch.nn.Linear:
    W = lin.weight.data if W is None else W
    return _linear(W[:, idx], None if lin.bias is None else lin.bias.data, lin)


def keep_mlp(layer, keep: torch.Tensor, down: torch.Tensor | None = None) -> None:
    """Keep MLP neurons `keep` (gate/up rows, down columns; `down`: the down projection's refit weight)."""
    for role in ("gate", "up"):
        set_part(layer, role, _rows(part(layer, role), keep))
    set_part(layer, "down", _cols(part(layer, "down"), keep, down))
    mlp = part(layer, "mlp")
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = int(keep.numel())


def keep_heads(layer, q_heads: list[int], kv_heads: list[int], head_dim: int, o: torch.Tensor | None = None) -> None:
    """Keep query heads `q_heads` (sorted, grouped by KV head) and KV heads `kv_heads`."""
    qi = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in q_heads])
    ki = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in kv_heads])
    for role, idx in (("q", qi), ("k", ki), ("v", ki)):
        set_part(layer, role, _rows(part(layer, role), idx))
    set_part(layer, "o", _cols(part(layer, "o"), qi, o))
    part(layer, "attn").num_key_value_groups = len(q_heads) // len(kv_heads)


def drop_layers(module, drop: list[int]) -> None:
    keep = [l for i, l in enumerate(decoder_layers(module)) if i not in set(drop)]
    set_decoder_layers(module, keep)
    for i, l in enumerate(keep):
        part(l, "attn").layer_idx = i
        if hasattr(l, "layer_idx"):
            l.layer_idx = i


def keep_hidden(module, keep: torch.Tensor) -> None:
    """Keep residual-stream channels `keep` everywhere (embedding, norms, every linear that reads or writes it)."""
    emb = embedding(module)
    head = module.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    emb.weight = torch.nn.Parameter(emb.weight.data[:, keep].contiguous(), requires_grad=False)
    emb.embedding_dim = int(keep.numel())
    layers = decoder_layers(module)
    norms = [final_norm(module)] + [n for l in layers for n in hidden_norms(l)]
    for n in norms:
        n.weight = torch.nn.Parameter(n.weight.data[keep].contiguous(), requires_grad=False)
    for l in layers:
        for role in hidden_readers(l):
            set_part(l, role, _cols(part(l, role), keep))
        for role in hidden_writers(l):
            set_part(l, role, _rows(part(l, role), keep))
    if tied:
        head.weight = emb.weight                  # the same (pruned) parameter
    elif head is not None:
        module.set_output_embeddings(_cols(head, keep))


def _set_config(module, cfg: dict) -> None:
    for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
              "num_hidden_layers"):
        setattr(module.config, k, cfg[k])
    if cfg.get(PER_LAYER):
        setattr(module.config, PER_LAYER, cfg[PER_LAYER])
    elif hasattr(module.config, PER_LAYER):
        delattr(module.config, PER_LAYER)
    if cfg.get("layer_types") is not None:
        module.config.layer_types = list(cfg["layer_types"])
    if n_experts(cfg):
        module.config.num_experts = n_experts(cfg)


def shape_layers(module, cfg: dict) -> None:
    """Shrink each layer of a model built at the widest config to its own widths (the per-layer config key),
    so that a per-layer checkpoint's weights load into it."""
    hd = dims(cfg)["head_dim"]
    for i, layer in enumerate(decoder_layers(module)):
        ff, nh, nkv = layer_dims(cfg, i)
        if ff != part(layer, "down").in_features:
            keep_mlp(layer, torch.arange(ff))
        if nh * hd != part(layer, "o").in_features or nkv * hd != part(layer, "k").out_features:
            keep_heads(layer, list(range(nh)), list(range(nkv)), hd)


# ---------------------------------------------------------------------------------------------- driver
def _hidden_scores(model, chunks: torch.Tensor) -> torch.Tensor:
    """Per residual channel: sum over every RMSNorm output of its mean square (each norm's sum scaled to 1)."""
    score = torch.zeros(model.config["hidden_size"], dtype=torch.float64)
    norms = [n for l in decoder_layers(model.module) for n in hidden_norms(l)] + [final_norm(model.module)]
    acc = [torch.zeros_like(score) for _ in norms]

    def hook(i):
        def f(_mod, _inp, out):
            acc[i] += out.reshape(-1, out.shape[-1]).double().pow(2).sum(0)
        return f
    hs = [n.register_forward_hook(hook(i)) for i, n in enumerate(norms)]
    try:
        with torch.no_grad():
            for c in chunks:
                model.module(input_ids=c[None], use_cache=False)
    finally:
        for h in hs:
            h.remove()
    for a in acc:
        score += a / a.sum().clamp(min=1e-30)
    return score


@torch.no_grad()
def prune_structured(model, chunks: torch.Tensor | None, plan: Plan, *, importance: str = "obs",
                     damp: float = 0.01, progress: bool = True, spill: Path | None = None):
    """Apply `plan` to a copy of `model`; returns (the pruned Model, stats). The caller's model is unchanged.
    Order: layers are dropped first (their scores come from the unpruned model), then hidden channels, then
    every remaining layer's heads and neurons, sequentially on calibration activations, one layer at a time.
    A streamed model (lazy.py) stays streamed: its pruned layers are written to `spill` (a folder that must
    outlive the pruned model) and its other tensors are read from the original's files."""
    from ..lazy import streamed
    if importance not in IMPORTANCE:
        raise ConfigError(f"unknown importance {importance!r}; choose {', '.join(IMPORTANCE)}")
    d = dims(model.config)
    new_cfg = planned_config(model.config, plan)
    n_kv = plan.n_kv if plan.n_kv is not None else d["n_kv"]
    q_per0 = d["n_head"] // d["n_kv"]
    q_per = plan.q_per_kv if plan.q_per_kv is not None else q_per0
    if not (1 <= n_kv <= d["n_kv"] and 1 <= q_per <= q_per0):
        raise ConfigError(f"heads {n_kv}x{q_per} is not a subset of the model's {d['n_kv']}x{q_per0}")
    if plan.ffn is not None and not 1 <= plan.ffn <= d["ffn"]:
        raise ConfigError(f"ffn {plan.ffn} must be between 1 and {d['ffn']}")
    if plan.hidden is not None and not 1 <= plan.hidden <= d["hidden"]:
        raise ConfigError(f"hidden {plan.hidden} must be between 1 and {d['hidden']}")
    if model.spec.moe and (plan.ffn not in (None, d["ffn"]) or plan.ffn_per_layer is not None or
                           plan.hidden not in (None, d["hidden"])):
        raise ConfigError("a mixture of experts has no dense MLP neurons to prune, and its hidden size is in every "
                          "expert: prune experts (--experts N), attention heads or layers")
    if plan.experts is not None and not (model.spec.moe and
                                         int(model.config["num_experts_per_tok"]) <= plan.experts <= n_experts(model.config)):
        raise ConfigError(f"--experts {plan.experts}: " + (
            f"keep between the {model.config['num_experts_per_tok']} experts each token uses and the model's "
            f"{n_experts(model.config)}" if model.spec.moe else "the model has no experts"))
    if plan.hidden not in (None, d["hidden"]) and model.spec.embed_scale:
        from .checks import check_hidden
        check_hidden(model.config)
    if any(not 0 <= i < d["n_layer"] for i in plan.drop_layers) or len(set(plan.drop_layers)) >= d["n_layer"]:
        raise ConfigError(f"layers to drop {plan.drop_layers} must be distinct, in 0..{d['n_layer'] - 1}, "
                          f"and leave one")
    kept = [i for i in range(d["n_layer"]) if i not in set(plan.drop_layers)]
    now = [layer_dims(model.config, i)[0] for i in kept]        # the kept layers' MLP widths today
    per = model.config.get(PER_LAYER) or {}
    if per and (set(per) != {"intermediate_size"} or plan.ffn is not None or plan.hidden is not None
                or n_kv != d["n_kv"] or q_per != q_per0):
        raise ConfigError("this model already has per-layer widths: it can lose layers and MLP neurons per layer "
                          "(iterative pruning), nothing else; prune the original instead")
    if plan.ffn_per_layer is not None and not all(1 <= f <= w for f, w in zip(plan.ffn_per_layer, now, strict=True)):
        raise ConfigError(f"per-layer ffn widths must be between 1 and each layer's width today ({now})")
    width = plan.ffn not in (None, d["ffn"]) or n_kv != d["n_kv"] or q_per != q_per0 or \
        (plan.ffn_per_layer is not None and plan.ffn_per_layer != now)
    drop_experts = plan.experts is not None and plan.experts < n_experts(model.config)
    if chunks is None and (plan.hidden not in (None, d["hidden"]) or (width and importance != "magnitude")
                           or drop_experts):
        raise ConfigError("this plan needs calibration text (chunks)")
    if streamed(model) and (spill is None or plan.hidden not in (None, d["hidden"]) or drop_experts
                            or importance == "taylor"):
        raise ConfigError("a streamed model (read one layer at a time) is pruned by layers, heads and MLP neurons "
                          "with obs, activation or magnitude importance, into a spill folder; --hidden, --experts "
                          "and taylor importance need the whole model in memory (--stream off)")
    out = copy.copy(model)
    out.module = module = copy.deepcopy(model.module)         # a streamed model's matrices are on the meta device
    out.config = new_cfg
    out.history = list(model.history)
    stats: dict = {"plan": plan.describe(), "params_before": model.n_params(), "importance": importance}
    if drop_experts:                 # router statistics of the original model, before anything else changes
        mass = router_mass(module, chunks, progress=progress)
        kept = [i for i in range(d["n_layer"]) if i not in set(plan.drop_layers)]
        for layer, i in zip(decoder_layers(module), range(d["n_layer"]), strict=True):
            keep_experts(layer, torch.sort(torch.argsort(mass[i], descending=True)[:plan.experts]).values)
        stats["expert_mass_kept"] = [round(float(mass[i].sort(descending=True).values[:plan.experts].sum()
                                                 / mass[i].sum().clamp(min=1e-12)), 4) for i in kept]
    if plan.drop_layers:
        drop_layers(module, plan.drop_layers)
        if streamed(model):
            out.weights = model.weights.renamed(_renumbered(model, plan.drop_layers))
    if plan.hidden not in (None, d["hidden"]):
        tmp = copy.copy(out)
        tmp.config = dict(model.config, num_hidden_layers=d["n_layer"] - len(plan.drop_layers))
        keep = torch.sort(torch.argsort(_hidden_scores(tmp, chunks), descending=True)[:plan.hidden]).values
        keep_hidden(module, keep)
    if width:
        _prune_widths(out, chunks, d, plan, n_kv, q_per, q_per0, importance, damp, progress, stats, spill)
    _set_config(module, new_cfg)
    got = out.n_params()
    # output biases that healing's bias compensation added (o_proj/down_proj: over the hidden size, which a plan
    # for such a model keeps) are not in the family's config; they are counted, not checked
    expected = ARCHS[new_cfg["architectures"][0]].expected_shapes(new_cfg)
    extra = sum(p.numel() for n, p in module.named_parameters() if n.endswith(".bias") and n not in expected)
    if got - extra != n_params(new_cfg):
        raise NumericsError(f"pruned model has {got - extra} parameters, its config implies {n_params(new_cfg)}")
    stats["params_after"] = got
    out.history.append({"step": "prune", **stats})
    return out, stats


def _renumbered(model, drop: list[int]) -> dict[str, str]:
    """New tensor name -> the original's, once layers `drop` are gone (the kept layers renumbered from 0)."""
    import re
    pre = model.spec.layer_prefix
    kept = {old: new for new, old in enumerate(i for i in range(model.config["num_hidden_layers"]) if i not in drop)}
    pat = re.compile(re.escape(pre) + r"(\d+)\.(.*)")
    out = {}
    for name in model.weights.where:
        m = pat.fullmatch(name)
        if m is None:
            out[name] = name
        elif int(m.group(1)) in kept:
            out[f"{pre}{kept[int(m.group(1))]}.{m.group(2)}"] = name
    return out


def _taylor_scores(module, chunks: torch.Tensor, hd: int, progress: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer: (|sum_t h_j dL/dh_j| per MLP neuron, the same summed over each head's o_proj inputs), the LM loss
    of the calibration chunks, averaged over chunks. Gradients flow from the input embeddings; weights stay
    frozen (no parameter gradients are kept)."""
    layers = decoder_layers(module)
    acts: list = [None] * (2 * len(layers))
    sums = [torch.zeros(part(l, "down").in_features, dtype=torch.float64) for l in layers] + \
        [torch.zeros(part(l, "o").in_features, dtype=torch.float64) for l in layers]

    def keep(k):
        def f(_mod, inputs):
            inputs[0].retain_grad()
            acts[k] = inputs[0]
        return f
    hs = [part(l, "down").register_forward_pre_hook(keep(i)) for i, l in enumerate(layers)]
    hs += [part(l, "o").register_forward_pre_hook(keep(len(layers) + i)) for i, l in enumerate(layers)]
    try:
        for c in tqdm(chunks, desc="Taylor scores", unit="chunk", disable=not progress, leave=False):
            with torch.enable_grad():
                emb = embedding(module)(c[None]).detach().requires_grad_(True)
                out = module(inputs_embeds=emb, labels=c[None], use_cache=False)
                out.loss.backward()
            for k, a in enumerate(acts):
                sums[k] += (a.detach() * a.grad).reshape(-1, a.shape[-1]).sum(0).abs().double()
            for k in range(len(acts)):
                acts[k] = None
    finally:
        for h in hs:
            h.remove()
    n = max(len(chunks), 1)
    L = len(layers)
    return [(sums[i] / n, (sums[L + i] / n).reshape(-1, hd).sum(1)) for i in range(L)]


def _prune_widths(out, chunks, d, plan, n_kv, q_per, q_per0, importance, damp, progress, stats,
                  spill: Path | None = None) -> None:
    """Prune every layer's heads and MLP neurons, one layer at a time (lazy.onload): for activation-based
    importance the calibration chunks go through the layer in micro-batches, the attention output's input
    statistics first (heads removed, o refit), then the down projection's (through the pruned attention), then the
    layer's output for the next layer. The pruned layer replaces the module's; for a streamed model (`out.weights`)
    its matrices go to a safetensors file in `spill`, which the model reads them from from then on."""
    from ..lazy import _set_param, onload, streamed
    from ..sequential import capture_input, forward_layer, micro_batches, replay_inputs
    module = out.module
    hd, nkv0 = d["head_dim"], d["n_kv"]
    layers = decoder_layers(module)
    ffns = plan.ffn_per_layer or [plan.ffn if plan.ffn is not None else d["ffn"]] * len(layers)
    do_heads = n_kv != nkv0 or q_per != q_per0
    x = kw = None
    taylor = _taylor_scores(module, chunks, hd, progress) if importance == "taylor" else None
    if chunks is not None and importance not in ("magnitude", "taylor"):
        x, kw = replay_inputs(module, chunks, out)
    on_disk = streamed(out)
    keeps, files = [], []
    for li in tqdm(range(len(layers)), desc=f"pruning widths ({importance})", unit="layer", disable=not progress,
                   leave=False):
        ffn, prefix = ffns[li], f"{out.spec.layer_prefix}{li}."
        res: dict = {}
        with onload(out, layers[li], prefix, copy_weights=True) as layer:
            do_mlp = part(layer, "down") is not None and ffn != part(layer, "down").weight.shape[1]
            micro = None if x is None else micro_batches(x)

            def stats_of(role, layer=layer, x=x, micro=micro):     # a linear's input statistics, every chunk
                return capture_input(layer, x, kw, micro, out.spec.layout.path(role), lambda v: v)

            if do_heads:
                mod = part(layer, "o")
                W = mod.weight.data
                if importance == "obs":
                    st = stats_of("o")
                    st.check(f"layer {li} attention output")
                    Wn, gone = _obs_heads(W, st.hessian(), nkv0, q_per0, n_kv, q_per, hd, damp)
                else:
                    if importance == "activation":
                        s = stats_of("o").absmean().reshape(-1, hd).norm(dim=1)
                    elif importance == "taylor":
                        s = taylor[li][1]
                    else:
                        s = W.double().reshape(W.shape[0], -1, hd).norm(dim=(0, 2))
                    gone = _rank_heads(s, nkv0, q_per0, n_kv, q_per)
                    Wn = W.clone()
                    for h in gone:
                        Wn[:, h * hd:(h + 1) * hd] = 0
                mod.weight.data = Wn.to(W.dtype)
                res["heads"] = sorted(set(range(nkv0 * q_per0)) - set(gone))
            if do_mlp:
                mod = part(layer, "down")
                W = mod.weight.data
                n_rm = W.shape[1] - ffn
                if importance == "obs":
                    st = stats_of("down")
                    st.check(f"layer {li} MLP down projection")
                    Wn, gone = obs_remove(W, st.hessian(), n_rm, damp=damp, consume=True)
                else:
                    if importance == "activation":
                        s = stats_of("down").absmean()
                    elif importance == "taylor":
                        s = taylor[li][0]
                    else:   # |down column| x geometric mean of |gate row| and |up row|
                        g, u = part(layer, "gate").weight.double(), part(layer, "up").weight.double()
                        s = W.double().norm(dim=0) * (g.norm(dim=1) * u.norm(dim=1)).sqrt()
                    gone = torch.argsort(s)[:n_rm].tolist()
                    Wn = W.clone()
                    Wn[:, gone] = 0
                mod.weight.data = Wn.to(W.dtype)
                res["ffn"] = torch.tensor(sorted(set(range(W.shape[1])) - set(gone)))
            if x is not None:           # the next layer's input, through the pruned layer (in place)
                forward_layer(layer, x, kw, micro)
            if "heads" in res:
                heads = res["heads"]
                keep_heads(layer, heads, sorted({h // q_per0 for h in heads}), hd, part(layer, "o").weight.data)
            if "ffn" in res:
                keep_mlp(layer, res["ffn"], part(layer, "down").weight.data)
            pruned = {n: p.data for n, p in layer.named_parameters()}
            if on_disk and res:
                from safetensors.torch import save_file
                f = Path(spill) / f"layer-{li:05d}.safetensors"
                save_file({prefix + n: t.contiguous() for n, t in pruned.items() if t.ndim >= 2}, str(f))
                files.append(f)
        if on_disk:                     # the layer's new shapes on the meta device, its vectors in memory
            for n, t in pruned.items():
                _set_param(layers[li], n, t.to("meta") if t.ndim >= 2 else t)
        else:
            layers[li] = layer
        del pruned
        keeps.append(res)
    if files:
        out.weights.add(files)
    stats["kept"] = [{k: (v.tolist() if torch.is_tensor(v) else v) for k, v in r.items()} for r in keeps]


def _head_constraint(nkv0: int, q_per0: int, n_kv: int, q_per: int):
    """allowed(removed, head) for greedy head removal that ends in n_kv groups of q_per query heads: whole
    groups are removed first (a group is 'chosen' when one of its heads goes while groups must still go),
    then q_per0 - q_per heads from each kept group."""
    def allowed(removed: list[int], h: int) -> bool:
        g = h // q_per0
        by_group = [sum(1 for r in removed if r // q_per0 == k) for k in range(nkv0)]
        dying = [k for k in range(nkv0) if by_group[k] > q_per0 - q_per]   # past the per-group quota
        if len(dying) < nkv0 - n_kv:   # groups still have to go: only a dying group, or start a new one
            return by_group[g] < q_per0
        return g in dying and by_group[g] < q_per0 or g not in dying and by_group[g] < q_per0 - q_per
    return allowed


def _obs_heads(W, C, nkv0, q_per0, n_kv, q_per, hd, damp):
    n_rm = nkv0 * q_per0 - n_kv * q_per
    return obs_remove(W, C, n_rm, group=hd, damp=damp, allowed=_head_constraint(nkv0, q_per0, n_kv, q_per))


def _rank_heads(score: torch.Tensor, nkv0, q_per0, n_kv, q_per) -> list[int]:
    allowed = _head_constraint(nkv0, q_per0, n_kv, q_per)
    gone: list[int] = []
    for _ in range(nkv0 * q_per0 - n_kv * q_per):
        h = min((h for h in range(nkv0 * q_per0) if h not in gone and allowed(gone, h)), key=lambda h: score[h])
        gone.append(h)
    return gone
