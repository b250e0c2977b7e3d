"""The cheap healing stages that come before end-to-end distillation: bias compensation, then block-wise
reconstruction. Neither backpropagates through the LM head or through more than one decoder layer.

Both replay the student one decoder layer at a time on calibration chunks, every layer fed the student's own
hidden states (sequential, as GPTQ/SparseGPT do: a layer also makes up for the error the layers before it left),
and compare it with the teacher (the original model) at the matching point of the teacher's residual stream.
`layer_map[j]` is the teacher layer that student layer j came from; teacher layers it skips were dropped.

- `bias_compensation` (FLAP, An et al. 2024, arXiv:2312.11983, generalised to refit weights and dropped layers):
  each sub-block that pruning changed gets, as the bias of its output linear (o_proj, down_proj), the mean over
  calibration tokens of what the teacher's sub-block outputs minus what the student's outputs, on the same
  (student's) input: the constant that minimises the output's mean squared error. The mean contribution of
  teacher layers dropped after a kept layer goes into that layer's down_proj bias too. No gradient, one pass.
  A layer's biases stay only if they lower the final-logit KLD on held-out chunks: measured on SmolLM2, OBS-refit
  MLPs leave almost no mean to compensate, and the mean contribution of most dropped layers raises the KLD.
- `blockwise_reconstruction`: each changed layer is trained alone (AdamW, warmup + cosine) to map the student's
  own inputs to the teacher's residual stream where the next kept teacher layer starts (so it also learns what
  dropped layers after it did); the loss is the MSE divided by the target's variance (or each token's error
  relative to its own norm, `loss="token"`).
"""
from __future__ import annotations

import math
import time
from functools import partial

import torch
from tqdm.auto import tqdm

from ..arch import attention_out, decoder_layers, embedding, final_norm, hidden_norms, mlp_out, part
from ..errors import ConfigError, NumericsError
from ..sequential import replay_inputs, run_layer
from .parts import adamw


# ---------------------------------------------------------------------------------------------- layer maps
def layer_map_from(teacher_cfg: dict, dropped: list[int]) -> list[int]:
    """The teacher layer each student layer came from, after removing the teacher layers `dropped`."""
    n = int(teacher_cfg["num_hidden_layers"])
    bad = [i for i in dropped if not 0 <= i < n]
    if bad or len(set(dropped)) != len(dropped) or len(dropped) >= n:
        raise ConfigError(f"dropped layers {list(dropped)} must be distinct, in 0..{n - 1}, and leave one")
    gone = set(dropped)
    return [i for i in range(n) if i not in gone]


def check_layer_map(layer_map: list[int], n_teacher: int, n_student: int) -> None:
    if len(layer_map) != n_student or any(not 0 <= t < n_teacher for t in layer_map) or \
            any(b <= a for a, b in zip(layer_map, layer_map[1:], strict=False)):
        raise ConfigError(f"layer_map {list(layer_map)} must list, for each of the student's {n_student} layers, "
                          f"the teacher layer (0..{n_teacher - 1}) it came from, in increasing order")


def dropped_after(layer_map: list[int], n_teacher: int) -> list[list[int]]:
    """Per student layer: the teacher layers dropped between it and the next kept one (after the last: up to
    the end). Teacher layers dropped before the first kept one are listed with student layer 0: their mean
    contribution can only be carried after it."""
    ends = list(layer_map[1:]) + [n_teacher]
    out = [list(range(t + 1, e)) for t, e in zip(layer_map, ends, strict=True)]
    out[0] = list(range(layer_map[0])) + out[0]
    return out


def infer_layer_map(teacher, student, *, tol: float = 0.05) -> list[int]:
    """layer_map of a student whose plan is unknown (a pruned file): every kept layer carries its teacher layer's
    norm weights (on the kept hidden channels), so student layer j is matched to the teacher layer whose norms are
    nearest, in increasing order (dynamic programming over monotone alignments). A match further than `tol`
    (relative distance) is refused: the student does not come from this teacher."""
    keep = hidden_channels(teacher, student)

    def sig(layer, k=None):
        v = torch.stack([n.weight for n in hidden_norms(layer)]).double()
        return (v if k is None else v[:, k]).flatten()
    T = [sig(l, keep) for l in decoder_layers(teacher.module)]
    S = [sig(l) for l in decoder_layers(student.module)]
    cost = torch.tensor([[float((s - t).norm() / t.norm().clamp(min=1e-12)) for t in T] for s in S])
    path = monotone_alignment(cost)
    worst = max(float(cost[j, t]) for j, t in enumerate(path))
    if worst > tol:
        raise ConfigError(f"the student's layers do not match the teacher's (norm weights differ by {worst:.3g} "
                          f"relative at best): is the teacher the model the student was pruned from?")
    return path


def monotone_alignment(cost: torch.Tensor) -> list[int]:
    """cost: (J, L), J <= L. The strictly increasing t_0 < ... < t_{J-1} minimising sum_j cost[j, t_j]."""
    J, L = cost.shape
    if J > L:
        raise ConfigError(f"the student has {J} layers, more than the teacher's {L}")
    best = cost[0].clone()
    back = []
    for j in range(1, J):
        prev = torch.cummin(best, 0)               # best over t' <= t: shifted to t' < t below
        pv = torch.cat([torch.tensor([math.inf], dtype=cost.dtype), prev.values[:-1]])
        pi = torch.cat([torch.tensor([-1]), prev.indices[:-1]])
        best = cost[j] + pv
        back.append(pi)
    t = int(torch.argmin(best))
    path = [t]
    for pi in reversed(back):
        t = int(pi[t])
        path.append(t)
    return path[::-1]


def hidden_channels(teacher, student) -> torch.Tensor | None:
    """Residual-stream channels of the teacher the student kept (None: all). Structured pruning copies the kept
    embedding columns unchanged, so each student column is found among the teacher's by value."""
    Et, Es = embedding(teacher.module).weight, embedding(student.module).weight
    if Es.shape[1] == Et.shape[1]:
        return None
    keep = match_columns(Et, Es)
    if keep is None:
        raise ConfigError("the student's residual stream is narrower than the teacher's and its embedding columns "
                          "are not columns of the teacher's: cannot tell which channels it kept")
    return keep


def match_columns(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor | None:
    """Index i with B[:, k] == A[:, i[k]] exactly for every column k of B, or None."""
    key = {tuple(A[:16, i].tolist()): i for i in range(A.shape[1])}
    idx = [key.get(tuple(B[:16, k].tolist())) for k in range(B.shape[1])]
    if any(i is None for i in idx):
        return None
    out = torch.tensor(idx)
    return out if torch.equal(A[:, out], B) else None


def changed_layers(teacher, student, layer_map: list[int]) -> list[bool]:
    """Per student layer: its weights (names, shapes or values) differ from its teacher layer's, or teacher layers
    after it (or, for layer 0, before it) were dropped."""
    T, S = decoder_layers(teacher.module), decoder_layers(student.module)
    drops = dropped_after(layer_map, len(T))
    out = []
    for j, layer in enumerate(S):
        a, b = layer.state_dict(), T[layer_map[j]].state_dict()
        same = a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)
        out.append(not same or bool(drops[j]))
    return out


# ---------------------------------------------------------------------------------------------- tensor math
def mean_shift(s1: torch.Tensor, s2: torch.Tensor, n: int) -> tuple[torch.Tensor, float, float]:
    """From the sums over n tokens of d and d*d (per channel) of a difference d = target - output: (the bias b
    minimising mean ||d - b||^2, i.e. the mean of d; MSE per element before; after adding b)."""
    b = s1 / n
    before = float(s2.sum() / (n * s1.numel()))
    after = float((s2.sum() - n * (b * b).sum()) / (n * s1.numel()))
    return b, before, max(after, 0.0)


def cosine_lr(step: int, total: int, warmup: int) -> float:
    """Learning-rate multiplier: linear warmup over `warmup` steps, then cosine decay towards 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * p))


def normalized_mse(y: torch.Tensor, target: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Mean squared error divided by the target's variance (1.0: as bad as predicting the target's mean)."""
    return ((y - target) ** 2).mean() / var


def token_relative_mse(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ||y - target||^2 / ||target||^2: every token's error relative to its own size, as the
    RMSNorm of every reader of the residual stream sees it (a token with massive activations does not dominate)."""
    return (((y - target) ** 2).sum(-1) / (target * target).sum(-1).clamp(min=1e-12)).mean()


LOSSES = {"variance": lambda y, t, var: normalized_mse(y, t, var),
          "token": lambda y, t, var: token_relative_mse(y, t)}


# ---------------------------------------------------------------------------------------------- plumbing
def _batches(n: int, batch: int) -> list[slice]:
    return [slice(i, min(i + batch, n)) for i in range(0, n, batch)]


def _apply(fn, x: torch.Tensor, batch: int) -> torch.Tensor:
    """fn over the chunks of x, `batch` chunks at a time (bounds the attention's memory)."""
    return torch.cat([fn(x[s]) for s in _batches(x.shape[0], batch)])


def _moments(pair, x: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """pair(x) -> (teacher's residual stream, student's) over x's chunks. Sums over tokens of their difference d and
    of d*d per channel, and the token count."""
    s1 = s2 = None
    for s in _batches(x.shape[0], batch):
        t, y = pair(x[s])
        d = (t - y).reshape(-1, x.shape[-1]).double()                 # (tokens, hidden)
        s1 = d.sum(0) if s1 is None else s1 + d.sum(0)
        s2 = (d * d).sum(0) if s2 is None else s2 + (d * d).sum(0)
    if not (torch.isfinite(s1).all() and torch.isfinite(s2).all()):
        raise NumericsError("non-finite activations while measuring the bias compensation")
    return s1, s2, x.shape[0] * x.shape[1]


def _add_bias(lin: torch.nn.Linear, b: torch.Tensor) -> None:
    old = lin.bias.data if lin.bias is not None else torch.zeros(lin.out_features, dtype=lin.weight.dtype)
    lin.bias = torch.nn.Parameter((old.double() + b).to(lin.weight.dtype), requires_grad=False)


def _shapes(module) -> dict:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _skip_reason(teacher, student) -> str | None:
    if not student.spec.output_biases:
        return (f"llama.cpp's {student.spec.gguf_arch} graph has no attn_output/ffn_down bias to carry a "
                f"compensation ({student.spec.hf_arch})")
    if student.config["hidden_size"] != teacher.config["hidden_size"]:
        return "hidden channels were pruned: the teacher's sub-blocks cannot read the student's residual stream"
    return None


@torch.no_grad()
def bias_compensation(teacher, student, chunks: torch.Tensor, layer_map: list[int], *, holdout: int = 2,
                      batch: int = 4, progress: bool = True) -> dict:
    """Add, in place, the mean teacher-minus-student output of every sub-block pruning changed (and the mean
    contribution of dropped teacher layers) to the student's o_proj / down_proj biases, measured on chunks
    (n, n_ctx) but the last `holdout`. A layer's biases are kept only if they lower the final-logit KL divergence to
    the teacher on those held-out chunks (greedily, layer after layer; 0: keep all): a smaller residual-stream error
    does not always mean closer logits (on SmolLM2 the mean contribution of some dropped layers raises the KLD).

    Returns per-layer records ({"layer", "teacher_layer", "parts": [{"part": "attn" | "mlp" | "dropped",
    "bias_norm", "mse_before", "mse_after"}], "kept", "heldout_kld"}), "heldout_kld_before"/"_after", "seconds",
    "tokens"; or {"skipped": why} with the student unchanged where its output cannot carry such biases."""
    why = _skip_reason(teacher, student)
    if why is not None:
        return {"skipped": why}
    T, S = decoder_layers(teacher.module), decoder_layers(student.module)
    check_layer_map(layer_map, len(T), len(S))
    if not 0 <= holdout < chunks.shape[0]:
        raise ConfigError(f"holdout {holdout} must leave calibration chunks (there are {chunks.shape[0]})")
    t0 = time.perf_counter()
    drops = dropped_after(layer_map, len(T))
    fit = chunks[:chunks.shape[0] - holdout]
    x, kw = replay_inputs(student.module, fit)
    guard = _HeldOut(teacher, student, chunks[fit.shape[0]:], batch) if holdout else None
    first = guard.kld if guard else None
    records = []
    for j, layer in enumerate(tqdm(S, desc="bias compensation", unit="layer", disable=not progress, leave=False)):
        saved = [(lin, lin.bias) for lin in (part(layer, "o"), part(layer, "down"))]
        y, rec = _compensate_layer(layer, T, layer_map[j], drops[j], x, kw, batch)
        if guard is not None and rec["parts"]:
            rec["heldout_kld"] = guard.try_layer(j)
            rec["kept"] = rec["heldout_kld"] < guard.kld
            if rec["kept"]:
                guard.kld = rec["heldout_kld"]
            else:
                for lin, bias in saved:
                    lin.bias = bias
                y = _apply(partial(run_layer, layer, kw=kw), x, batch)
        if guard is not None:
            guard.advance(layer)
        x = y
        records.append({"layer": j, **rec})
    return {"layers": records, "heldout_kld_before": first, "heldout_kld_after": guard.kld if guard else None,
            "seconds": time.perf_counter() - t0, "tokens": int(fit.numel())}


class _HeldOut:
    """The student's final-logit KL divergence to the teacher on held-out chunks, re-measured from layer j on
    (the held-out stream entering layer j is kept, so a try costs the layers after j and the LM head)."""

    def __init__(self, teacher, student, chunks: torch.Tensor, batch: int):
        self.module, self.batch = student.module, batch
        self.ref = [torch.log_softmax(teacher.logits(c[None])[0], -1) for c in chunks]   # (n_ctx, vocab) each
        self.x, self.kw = replay_inputs(student.module, chunks)
        self.kld = self.try_layer(0)

    def try_layer(self, j: int) -> float:
        layers = decoder_layers(self.module)
        y = _apply(partial(_run, layers, range(j, len(layers)), kw=self.kw), self.x, self.batch)
        head = self.module.get_output_embeddings()
        total = 0.0
        for yc, ref in zip(y, self.ref, strict=True):
            logp = torch.log_softmax(head(final_norm(self.module)(yc)).float(), -1)
            total += float((ref.exp() * (ref - logp)).sum(-1).double().sum())
        return total / (y.shape[0] * y.shape[1])

    def advance(self, layer) -> None:
        self.x = _apply(partial(run_layer, layer, kw=self.kw), self.x, self.batch)


def _compensate_layer(layer, T, t: int, drops: list[int], x: torch.Tensor, kw: dict,
                      batch: int) -> tuple[torch.Tensor, dict]:
    """Bias compensation of one student layer (teacher layer T[t], teacher layers `drops` dropped after it) on its
    input x; returns (its output, the record)."""
    tl = T[t]
    rec: dict = {"teacher_layer": t, "parts": []}

    def compensate(part, lin, pair, inp):
        b, before, after = mean_shift(*_moments(pair, inp, batch))
        _add_bias(lin, b)
        rec["parts"].append({"part": part, "bias_norm": float(b.norm()), "mse_before": before, "mse_after": after})
        return b.to(inp.dtype)

    if _shapes(part(tl, "attn")) != _shapes(part(layer, "attn")):    # heads pruned (output projection refit)
        compensate("attn", part(layer, "o"),
                   lambda xb: (attention_out(tl, xb, kw), attention_out(layer, xb, kw)), x)
    h = x + _apply(lambda xb: attention_out(layer, xb, kw), x, batch)
    if _shapes(part(tl, "mlp")) != _shapes(part(layer, "mlp")):      # neurons pruned (down projection refit)
        compensate("mlp", part(layer, "down"), lambda hb: (mlp_out(tl, hb), mlp_out(layer, hb)), h)
    y = h + _apply(lambda hb: mlp_out(layer, hb), h, batch)
    if drops:
        y = y + compensate("dropped", part(layer, "down"), lambda yb: (_run(T, drops, yb, kw), yb), y)
    return y, rec


def _run(layers, which, x: torch.Tensor, kw: dict) -> torch.Tensor:
    """x through layers[i] for i in `which`, in order."""
    for i in which:
        x = run_layer(layers[i], x, kw)
    return x


def blockwise_reconstruction(teacher, student, chunks: torch.Tensor, layer_map: list[int], *, epochs: int = 4,
                             lr: float = 3e-3, batch: int = 2, deadline: float | None = None,
                             layers: str = "changed", loss: str = "token", seed: int = 0,
                             progress: bool = True) -> dict:
    """Train, in place, each student layer alone to reproduce the teacher's residual stream where the next kept
    teacher layer starts (for the last layer: where the final norm reads it), from the student's own inputs; the
    trained layer's outputs become the next layer's inputs. `layers`: "changed" (see `changed_layers`) or "all";
    `loss`: "token" (each token's squared error relative to its norm) or "variance" (MSE / the target's variance).
    AdamW with a 10% warmup and cosine decay over `epochs` passes of the chunks, `batch` chunks a step.

    With a `deadline` (a time.monotonic() value) each layer still to train gets an equal share of the time left,
    and its schedule is shortened to the steps that fit (measured after its first step), so every layer gets some
    training and the call returns by the deadline (give or take a step and a forward pass). A layer whose loss did
    not fall keeps its weights. Defaults measured on SmolLM2 pruned 25% by the default method (16 chunks of 512
    calibration tokens, KLD on 8 held-out chunks: unhealed 0.92): lr 1e-4 / 1e-3 / 3e-3 / 1e-2 gave 0.84 / 0.67 /
    0.61 / 1.01 (2 epochs, batch 4); the "token" loss 0.59 where "variance" gave 0.61; more steps keep helping
    (4 epochs at batch 2: 0.45 in 72 s; 16 epochs: 0.37 in 215 s) and more text more (64 chunks, 4 epochs: 0.29);
    training every layer instead of the changed ones only: the same KLD for twice the time.

    Returns per-layer records ({"layer", "teacher_layer", "trained", "loss_before", "loss_after", "steps",
    "planned_steps", "seconds"}) and totals."""
    if loss not in LOSSES:
        raise ConfigError(f"unknown loss {loss!r}; choose {', '.join(LOSSES)}")
    lossf = LOSSES[loss]
    if layers not in ("changed", "all"):
        raise ConfigError(f"layers must be 'changed' or 'all', got {layers!r}")
    if epochs < 1 or batch < 1 or not lr > 0:
        raise ConfigError(f"epochs ({epochs}) and batch ({batch}) must be >= 1 and lr ({lr}) > 0")
    T, S = decoder_layers(teacher.module), decoder_layers(student.module)
    check_layer_map(layer_map, len(T), len(S))
    t0 = time.perf_counter()
    keep = hidden_channels(teacher, student)
    train = [c or layers == "all" for c in changed_layers(teacher, student, layer_map)]
    gen = torch.Generator().manual_seed(seed)
    ends = list(layer_map[1:]) + [len(T)]
    with torch.no_grad():
        xs, kw = replay_inputs(student.module, chunks)
        xt, kwt = replay_inputs(teacher.module, chunks)
    ti, records, stopped = 0, [], False
    for j, layer in enumerate(tqdm(S, desc="block-wise reconstruction", unit="layer", disable=not progress,
                                   leave=False)):
        if deadline is not None and time.monotonic() >= deadline:
            stopped = True
            break
        with torch.no_grad():
            xt = _apply(partial(_run, T, range(ti, ends[j]), kw=kwt), xt, batch)
        ti = ends[j]
        target = xt if keep is None else xt[..., keep]
        rec = {"layer": j, "teacher_layer": layer_map[j], "trained": train[j]}
        t1 = time.perf_counter()
        if train[j]:
            now = time.monotonic()
            stop_at = None if deadline is None else now + (deadline - now) / sum(train[j:])
            original, rec["steps"], rec["planned_steps"], rec["loss_before"] = _fit_layer(
                layer, xs, target, kw, lossf, epochs=epochs, lr=lr, batch=batch, gen=gen, stop_at=stop_at)
            stopped |= rec["steps"] < rec["planned_steps"]
        with torch.no_grad():
            ys = _apply(partial(run_layer, layer, kw=kw), xs, batch)
            if train[j]:
                rec["loss_after"] = float(lossf(ys, target, target.var()))
                if not rec["loss_after"] < rec["loss_before"]:              # no better: keep what it was
                    layer.load_state_dict(original)
                    ys = _apply(partial(run_layer, layer, kw=kw), xs, batch)
                    rec["loss_after"], rec["reverted"] = rec["loss_before"], True
        xs = ys
        rec["seconds"] = time.perf_counter() - t1
        records.append(rec)
    done = [r for r in records if r["trained"]]
    return {"layers": records, "seconds": time.perf_counter() - t0, "tokens": int(chunks.numel()),
            "layers_trained": len(done), "layers_to_train": sum(train), "steps": sum(r["steps"] for r in done),
            "stopped_by_deadline": stopped, "loss_before": sum(r["loss_before"] for r in done),
            "loss_after": sum(r["loss_after"] for r in done)}


def _fit_layer(layer, x: torch.Tensor, target: torch.Tensor, kw: dict, lossf, *, epochs: int, lr: float, batch: int,
               gen: torch.Generator, stop_at: float | None) -> tuple[dict, int, int, float]:
    """Train `layer` in place to map x to target (both (n_chunks, n_ctx, hidden), no graph behind them), until
    time.monotonic() reaches `stop_at` at the latest. Returns (its weights before, steps taken, steps planned, the
    loss before)."""
    var = target.var()
    t = time.monotonic()
    with torch.no_grad():
        before = float(lossf(_apply(partial(run_layer, layer, kw=kw), x, batch), target, var))
    forward = time.monotonic() - t                      # the forward pass after training will cost as much
    original = {k: v.clone() for k, v in layer.state_dict().items()}
    n = x.shape[0]
    planned = total = epochs * math.ceil(n / batch)
    warm = max(1, total // 10)
    opt = adamw(list(layer.parameters()), lr=lr)
    step = 0
    layer.requires_grad_(True)
    try:
        with torch.enable_grad():
            for idx in _shuffled(n, batch, epochs, gen):
                if step >= total or (stop_at is not None and time.monotonic() >= stop_at):
                    break
                t = time.monotonic()
                for g in opt.param_groups:
                    g["lr"] = lr * cosine_lr(step, total, warm)
                loss = lossf(run_layer(layer, x[idx], kw), target[idx], var)
                if not torch.isfinite(loss):
                    raise NumericsError(f"block-wise reconstruction: non-finite loss at step {step}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                if step == 1 and stop_at is not None:      # the steps that fit in this layer's share of the time
                    fit = int((stop_at - time.monotonic() - forward) / max(time.monotonic() - t, 1e-9))
                    total = min(planned, 1 + max(0, fit))
                    warm = max(1, total // 10)
    finally:
        layer.requires_grad_(False)
    return original, step, planned, before


def _shuffled(n: int, batch: int, epochs: int, gen: torch.Generator):
    """Chunk indices, `batch` at a time, a fresh permutation every epoch."""
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for k in range(0, n, batch):
            yield order[k:k + batch]
