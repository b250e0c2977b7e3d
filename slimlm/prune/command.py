"""`slimlm prune`: structured pruning (a smaller, faster model) or weight pruning (zeros), written as a GGUF or
an HF folder, evaluated against the original, with a report."""
from __future__ import annotations

import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..arch import layer_dims, n_experts
from ..errors import ConfigError
from ..lazy import STREAM_MODES, refuse_unstreamable
from .checks import check_gguf_plan, check_hf_plan, check_hidden, per_layer_ok, written_arch
from .structured import IMPORTANCE, Plan, dims, plan_for_ratio
from .weights import WEIGHT_METHODS, parse_sparsity

STRUCTURED = ("mlp", "width", "layers", "mlp+layers")
ALLOCATE = ("uniform", "global", "sensitivity", "owl")
METHODS = STRUCTURED + WEIGHT_METHODS
DEFAULT_METHOD = "mlp+layers"  # measured on SmolLM2 at 25% (bench/prune.py): the least influential layers plus
                                # OBS-refit MLP neurons with per-layer widths: faster in llama.cpp than neurons
                                # alone (per-layer work goes too) at a KLD close to theirs
LAYER_SHARE = 0.6               # mlp+layers: share of --ratio taken as whole layers (bench/prune.py: 4, 6, 8
                                # layers of SmolLM2 at 25%: KLD 1.15, 1.08, 1.25; generation 1.25x, 1.36x, 1.33x)


@dataclass(frozen=True)
class PruneConfig:
    ratio: float | None = None         # fraction of all parameters removed (structured)
    method: str = DEFAULT_METHOD
    importance: str = "obs"
    sparsity: str | None = None        # weight methods: "0.5", "50%", "2:4"
    hidden: int | None = None          # explicit widths (override what --ratio would choose)
    ffn: int | None = None
    heads: str | None = None           # "KVxQ": KV heads kept x query heads per KV head
    experts: int | None = None         # mixture of experts: experts kept per layer (by routing mass)
    drop_layers: tuple[int, ...] = ()
    layer_share: float = LAYER_SHARE   # mlp+layers: share of --ratio removed as whole layers
    format_aware: bool = False         # round every width to the output type's block size
    ffn_multiple: int | None = None    # mlp, mlp+layers: MLP widths a multiple of this (256: K-quant rows for
                                       # ffn_down) without format_aware's demands on the hidden size and heads
    allocate: str | None = None        # MLP widths: uniform (llama), global (per layer by OBS cost: deci) or
                                       # sensitivity (measured KLD); None: global for mlp+layers/mlp/width, else uniform
    type: str = "Q8_0"                 # GGUF output type
    hf_dtype: str = "float32"          # HF output precision
    calib: str | None = None
    pre_tokenizer: str | None = None   # llama.cpp's pre-tokenizer name for an HF tokenizer it cannot identify
    calib_chunks: int = 16
    n_ctx: int = 512
    text: str | None = None
    max_chunks: int | None = 16
    speed: bool = True
    evaluate: bool = True
    heal: object | None = None         # train.heal.HealConfig: heal the pruned model from the original (--heal)
    steps: int = 1                     # iterative: K rounds of prune k/K of the way -> heal with 1/K of the budget
    stream: str = "auto"               # auto | on | off: an HF folder's weights read one layer at a time (lazy.py)

    def __post_init__(self):
        """Every check that needs no model, so a bad value is refused before anything is loaded."""
        from ..presets import get_preset
        get_preset(self.type)
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
            raise ConfigError(f"--steps must be an integer >= 1, got {self.steps!r}")
        if self.steps > 1:
            if self.heal is None:
                raise ConfigError("--steps K prunes in K rounds with healing after each: give --heal BUDGET too")
            if self.method not in ("mlp", "layers", "mlp+layers") or self.hidden is not None or \
                    self.heads is not None:
                raise ConfigError("--steps (iterative pruning) removes MLP neurons and layers only: use --method "
                                  "mlp, layers or mlp+layers, without --hidden/--heads")
        if self.heal is not None and self.method in WEIGHT_METHODS:
            raise ConfigError(f"--heal trains the pruned model, and training would fill {self.method}'s zeros "
                              f"again: heal a structured method ({', '.join(STRUCTURED)})")
        for flag, v in (("--hidden", self.hidden), ("--ffn", self.ffn), ("--calib-chunks", self.calib_chunks),
                        ("--chunks", self.max_chunks)):
            if v is not None and v < 1:
                raise ConfigError(f"{flag} must be >= 1, got {v}")
        if self.n_ctx < 4:
            raise ConfigError(f"--ctx must be >= 4 tokens, got {self.n_ctx}")
        for flag, v in (("--text", self.text), ("--calib", None if self.calib == "default" else self.calib)):
            if v is not None and not Path(v).is_file():
                raise ConfigError(f"{flag} {v}: no such file")
        if self.pre_tokenizer is not None:
            from ..gguf.vocab import KNOWN_PRE_TOKENIZERS
            if self.pre_tokenizer not in KNOWN_PRE_TOKENIZERS:
                raise ConfigError(f"--pre-tokenizer {self.pre_tokenizer!r} is not one llama.cpp knows; known: "
                                  f"{', '.join(KNOWN_PRE_TOKENIZERS)}")
        if any(i < 0 for i in self.drop_layers) or len(set(self.drop_layers)) != len(self.drop_layers):
            raise ConfigError(f"--drop-layers {','.join(map(str, self.drop_layers))}: give distinct layer "
                              f"indices >= 0")
        if self.method not in METHODS:
            raise ConfigError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.importance not in IMPORTANCE:
            raise ConfigError(f"--importance must be one of {', '.join(IMPORTANCE)}, got {self.importance!r}")
        if self.method in WEIGHT_METHODS:
            if self.sparsity is None:
                raise ConfigError(f"--method {self.method} is weight pruning: give --sparsity (0.5, 50% or 2:4)")
            if self.ratio is not None or self.explicit:
                raise ConfigError("--ratio/--hidden/--ffn/--heads/--drop-layers are for structured methods")
            parse_sparsity(self.sparsity)
            if self.format_aware:
                raise ConfigError("--format-aware rounds structured widths; weight pruning keeps every shape")
        else:
            if self.sparsity is not None:
                raise ConfigError(f"--sparsity is for weight pruning ({', '.join(WEIGHT_METHODS)})")
            if self.ratio is None and not self.explicit:
                raise ConfigError("give --ratio R (fraction of parameters to remove) or explicit widths")
            if self.ratio is not None and not 0.0 < self.ratio < 1.0:
                raise ConfigError(f"--ratio must be between 0 and 1, got {self.ratio}")
        if self.heads is not None:
            self.parsed_heads()
        if self.stream not in STREAM_MODES:
            raise ConfigError(f"--stream must be one of {', '.join(STREAM_MODES)}, got {self.stream!r}")
        if self.stream == "on":
            self.check_streamable()
        if not 0.0 <= self.layer_share <= 1.0:
            raise ConfigError(f"--layer-share must be between 0 and 1, got {self.layer_share}")
        if self.ffn_multiple is not None:
            if self.ffn_multiple < 32 or self.ffn_multiple % 32:
                raise ConfigError(f"--ffn-multiple must be a positive multiple of 32, got {self.ffn_multiple}")
            if self.method not in ("mlp", "mlp+layers") or self.format_aware:
                raise ConfigError("--ffn-multiple rounds MLP widths: use it with --method mlp or mlp+layers, "
                                  "without --format-aware")
        if self.allocate is not None and self.allocate not in ALLOCATE:
            raise ConfigError(f"--allocate must be one of {', '.join(ALLOCATE)}, got {self.allocate!r}")
        if self.allocate == "owl" and self.method not in WEIGHT_METHODS:
            raise ConfigError("--allocate owl sets per-layer weight sparsity: use it with magnitude, wanda or "
                              "sparsegpt")
        if self.allocate == "global" and self.method not in ("mlp", "width", "mlp+layers"):
            raise ConfigError("--allocate global sets per-layer MLP widths: use it with --method mlp+layers, mlp "
                              "or width (weight pruning: --allocate owl or sensitivity)")
        if self.allocate in ("owl", "sensitivity") and self.method in WEIGHT_METHODS and \
                parse_sparsity(self.sparsity)[1] is not None:
            raise ConfigError(f"--allocate {self.allocate} sets unstructured sparsity per layer; an N:M pattern "
                              f"({self.sparsity}) is the same in every layer")
        if self.allocate == "sensitivity" and self.calib_chunks < 2:
            raise ConfigError("--allocate sensitivity holds out one calibration chunk: give --calib-chunks 2 or more")
        if self.allocate == "sensitivity" and self.method in WEIGHT_METHODS:
            from .sensitivity import WEIGHT_SPAN
            if not WEIGHT_SPAN < parse_sparsity(self.sparsity)[0] < 1.0 - WEIGHT_SPAN:
                raise ConfigError(f"--allocate sensitivity varies each layer's sparsity by +-{WEIGHT_SPAN}: give a "
                                  f"--sparsity between {WEIGHT_SPAN} and {1 - WEIGHT_SPAN:g}")

    def check_streamable(self, why: str = "with --stream on") -> None:
        """What needs the whole model in memory is refused when the model is streamed: `why` says why it is."""
        steps = [(self.method in WEIGHT_METHODS, f"--method {self.method} (weight pruning)"),
                 (self.heal is not None, "--heal"), (self.steps > 1, "--steps"),
                 (self.importance == "taylor", "--importance taylor"),
                 (self.allocate == "sensitivity", "--allocate sensitivity"), (self.hidden is not None, "--hidden"),
                 (self.experts is not None, "--experts"),
                 (self.evaluate, "the evaluation (torch-side logits of the whole original)")]
        refuse_unstreamable(why, steps)

    @property
    def allocation(self) -> str:
        if self.allocate is not None:
            return self.allocate
        return "global" if self.method in ("mlp", "width", "mlp+layers") else "uniform"

    def check_model(self, cfg: dict, gguf_out: bool = True) -> None:
        """The checks that need the model's shapes (its config), run right after loading, before calibration."""
        d = dims(cfg)
        if self.allocate in ("global", "sensitivity") and self.method in STRUCTURED and not per_layer_ok(cfg):
            raise ConfigError(f"--allocate {self.allocate} gives per-layer MLP widths, which llama.cpp has no "
                              f"architecture for in this family; {cfg['architectures'][0]} takes --allocate "
                              f"uniform")
        moe = n_experts(cfg) > 0
        if moe and self.steps > 1:
            raise ConfigError("--steps: iterative pruning of a mixture of experts is not supported yet; prune in "
                              "one step (--steps 1) and heal")
        if moe and self.method in STRUCTURED and (self.ffn is not None or self.hidden is not None):
            raise ConfigError("--ffn/--hidden: a mixture of experts has no dense MLP neurons to prune, and its hidden "
                              "size is in every expert; prune experts (--experts N), heads or layers")
        if self.experts is not None and (not moe or not cfg["num_experts_per_tok"] <= self.experts <= n_experts(cfg)):
            raise ConfigError(f"--experts {self.experts}: " + (
                f"keep between the {cfg['num_experts_per_tok']} experts each token uses and the model's "
                f"{n_experts(cfg)}" if moe else "the model has no experts"))
        bad = [i for i in self.drop_layers if i >= d["n_layer"]]
        if bad:
            raise ConfigError(f"--drop-layers {','.join(map(str, bad))}: the model has layers 0..{d['n_layer'] - 1}")
        if len(self.drop_layers) >= d["n_layer"]:
            raise ConfigError(f"--drop-layers removes all {d['n_layer']} layers; keep at least one")
        for flag, v, top in (("--ffn", self.ffn, d["ffn"]), ("--hidden", self.hidden, d["hidden"])):
            if v is not None and v > top:
                raise ConfigError(f"{flag} {v}: the model has {top}; give at most {top}")
        if self.heads is not None:
            kv, q = self.parsed_heads()
            q0 = d["n_head"] // d["n_kv"]
            if kv > d["n_kv"] or q > q0:
                raise ConfigError(f"--heads {self.heads}: the model has {d['n_kv']} KV heads x {q0} query heads "
                                  f"per KV head; give at most {d['n_kv']}x{q0}")
        if self.method in WEIGHT_METHODS:
            nm = parse_sparsity(self.sparsity)[1]
            widths = {d["hidden"], d["n_head"] * d["head_dim"]} | {layer_dims(cfg, i)[0] for i in range(d["n_layer"])}
            if nm is not None and any(w % nm[1] for w in widths):
                raise ConfigError(f"--sparsity {self.sparsity}: the model's linears have {sorted(widths)} inputs, "
                                  f"which do not all split into groups of {nm[1]}")
        if self.hidden is not None and self.method in STRUCTURED:
            check_hidden(cfg)
        if gguf_out and (self.heads is not None or self.hidden is not None) and self.method in STRUCTURED:
            kv, q = self.parsed_heads() if self.heads is not None else (None, None)
            check_gguf_plan(cfg, Plan(hidden=self.hidden, n_kv=kv, q_per_kv=q), "--heads/--hidden")

    def for_model(self, cfg: dict) -> PruneConfig:
        """This config with the default allocation resolved for the model's family: per-layer MLP widths
        (global) for the Llama family, uniform widths for families llama.cpp has no per-layer variant of."""
        import dataclasses
        if self.allocate is None and self.method in STRUCTURED and not per_layer_ok(cfg):
            return dataclasses.replace(self, allocate="uniform")
        return self

    @property
    def explicit(self) -> bool:
        return any(v is not None for v in (self.hidden, self.ffn, self.heads, self.experts)) or bool(self.drop_layers)

    def parsed_heads(self) -> tuple[int, int]:
        try:
            kv, q = (int(v) for v in self.heads.lower().split("x"))
            if kv < 1 or q < 1:
                raise ValueError
            return kv, q
        except ValueError:
            raise ConfigError(f"--heads {self.heads!r}: give KVxQ, e.g. 2x2 (KV heads kept x query heads "
                              f"per KV head)") from None


def k_quant_ffn_multiple(widths) -> int | None:
    """QK_K (256, the K-quants' and IQ4_XS's super-block) when every MLP width in `widths` is a multiple of it and
    at least twice it (pruning can then keep ffn_down's rows K-quant sized and still remove neurons), else None.
    `slimlm search` and `compress --prune` with a size budget round pruned MLP widths to it."""
    from ..quant.kquants import QK_K
    widths = [int(w) for w in widths]
    if widths and all(w % QK_K == 0 and w >= 2 * QK_K for w in widths):
        return QK_K
    return None


def round_multiple(config: PruneConfig) -> int:
    """Widths are multiples of 32 (every GGUF block type's row unit short of K-quants); format-aware: of the
    output type's main block size (256 for K-quants), so no tensor needs a fallback type; --ffn-multiple N:
    the MLP widths of N."""
    from ..formats import FORMATS
    from ..presets import get_preset
    if config.ffn_multiple is not None:          # mlp, mlp+layers: only MLP widths are rounded
        return config.ffn_multiple
    if not config.format_aware:
        return 32
    return max(32, FORMATS[get_preset(config.type).default].block_size)


def _heads_for(cfg: dict, multiple: int, at_most: tuple[int, int] | None) -> tuple[int, int] | None:
    """The largest (KV heads, query heads per KV) within the model's (and `at_most`) whose attention width is a
    multiple of `multiple`; None when the model's own already is."""
    d = dims(cfg)
    q0 = d["n_head"] // d["n_kv"]
    kv_max, q_max = at_most or (d["n_kv"], q0)
    if at_most is None and (d["n_head"] * d["head_dim"]) % multiple == 0:
        return None
    best = None
    for kv in range(1, min(kv_max, d["n_kv"]) + 1):
        for q in range(1, min(q_max, q0) + 1):
            if (kv * q * d["head_dim"]) % multiple == 0 and (best is None or (kv * q, kv) > (best[0] * best[1], best[0])):
                best = (kv, q)
    if best is None:
        raise ConfigError(f"no head count within {d['n_kv']}x{q0} gives an attention width that is a multiple of "
                          f"{multiple} (head_dim {d['head_dim']})")
    return best


def explicit_plan(cfg: dict, config: PruneConfig) -> Plan:
    """The widths given explicitly (--hidden, --ffn, --heads, --drop-layers, --experts; with --format-aware the
    heads rounded to the type's block size): what --ratio counts before its method removes the rest."""
    d = dims(cfg)
    mult = round_multiple(config)
    heads = config.parsed_heads() if config.heads else None
    if config.format_aware:
        heads = _heads_for(cfg, mult, heads) or heads
        if config.hidden is not None and config.hidden % mult:
            raise ConfigError(f"--hidden {config.hidden} is not a multiple of {mult} ({config.type}'s block size)")
        if config.ffn is not None and config.ffn % mult:
            raise ConfigError(f"--ffn {config.ffn} is not a multiple of {mult} ({config.type}'s block size)")
        if config.hidden is None and d["hidden"] % mult:
            raise ConfigError(f"the hidden size {d['hidden']} is not a multiple of {mult}: give --hidden "
                              f"{d['hidden'] // mult * mult} (or less) for format-aware pruning")
    return Plan(hidden=config.hidden, ffn=config.ffn, drop_layers=sorted(config.drop_layers),
                n_kv=heads[0] if heads else None, q_per_kv=heads[1] if heads else None, experts=config.experts)


def make_plan(model, config: PruneConfig, layer_order: list[int] | None) -> Plan:
    cfg = model.config
    d = dims(cfg)
    mult = round_multiple(config)
    base = explicit_plan(cfg, config)
    moe = n_experts(cfg) > 0
    if config.ratio is None:
        return base
    from .structured import planned_config
    pre = planned_config(cfg, Plan(hidden=base.hidden, n_kv=base.n_kv, q_per_kv=base.q_per_kv,
                                   drop_layers=base.drop_layers))
    from .structured import n_params
    left = 1.0 - (1.0 - config.ratio) * n_params(cfg) / n_params(pre)     # what the method still has to remove
    if left <= 0:
        if config.ffn is None and config.method == "mlp" and d["ffn"] % mult and not moe:
            base.ffn = d["ffn"] // mult * mult
        return base
    p = plan_for_ratio(pre, left, method=config.method, round_to=mult,
                       layer_order=None if layer_order is None else
                       [i - sum(1 for j in base.drop_layers if j < i) for i in layer_order if i not in base.drop_layers])
    if p.drop_layers:          # indices in the model after base's drops -> original indices
        kept = [i for i in range(d["n_layer"]) if i not in base.drop_layers]
        base.drop_layers = sorted(base.drop_layers + [kept[i] for i in p.drop_layers])
    if config.ffn is None and p.ffn is not None:
        base.ffn = p.ffn
    if config.experts is None and p.experts is not None:
        base.experts = p.experts
    if p.q_per_kv is not None and base.q_per_kv is None:
        base.q_per_kv = p.q_per_kv
    return base


def allocate_widths(m, chunks, plan: Plan, config: PruneConfig, say, progress: bool) -> None:
    """Replace the plan's uniform MLP width by per-layer widths removing as many neurons (for --ratio: the fewest,
    in whole multiples, that reach it; see neurons_for_ratio)."""
    from .structured import allocate_ffn
    d = dims(m.config)
    kept = [i for i in range(d["n_layer"]) if i not in plan.drop_layers]
    n_rm, mult = (d["ffn"] - plan.ffn) * len(kept), round_multiple(config)
    if config.ratio is not None and config.ffn is None:
        n_rm = min(n_rm, neurons_for_ratio(m.config, plan, config.ratio, mult))
    if config.allocation == "global":
        say("measuring every layer's MLP pruning curve (OBS) ...")
        plan.ffn_per_layer = allocate_ffn(m, chunks, n_rm, round_to=mult, layers=kept, progress=progress)
    else:
        from .sensitivity import allocate_from, measure
        if chunks.shape[0] < 2:
            raise ConfigError("--allocate sensitivity needs at least 2 calibration chunks")
        say("measuring each layer's MLP sensitivity (KLD on a held-out calibration chunk) ...")
        table = measure(m, chunks[:-1], chunks[-1], round_to=mult, mlp_only=True, progress=progress)
        table["layers"] = [table["layers"][i] for i in kept]
        plan.ffn_per_layer = allocate_from(table, d["ffn"], n_rm, mult)
    plan.ffn = None
    if len(set(plan.ffn_per_layer)) == 1:
        plan.ffn, plan.ffn_per_layer = plan.ffn_per_layer[0], None


def neurons_for_ratio(cfg: dict, plan: Plan, ratio: float, mult: int) -> int:
    """The fewest MLP neurons, a multiple of `mult` in all, whose removal from the layers `plan` keeps (with the
    rest of `plan`) leaves at most (1 - ratio) of `cfg`'s parameters. The uniform plan rounds every layer's width
    down to `mult`, which at SmolLM2's 25% removed 7,680 neurons where 7,200 reach it (25.7% instead of 25.0%);
    per-layer widths only need the total rounded."""
    import dataclasses

    from .structured import n_params, planned_config
    d = dims(cfg)
    ffn, n_kept = d["ffn"], d["n_layer"] - len(plan.drop_layers)
    full = n_params(planned_config(cfg, dataclasses.replace(plan, ffn=ffn)))
    per = full - n_params(planned_config(cfg, dataclasses.replace(plan, ffn=ffn - 1)))   # one neuron in every kept layer
    excess = full - math.floor(n_params(cfg) * (1.0 - ratio))
    return max(0, -(-excess * n_kept // (per * mult))) * mult


def _split_layers(m, config: PruneConfig, order: list[int]) -> PruneConfig:
    """mlp+layers: --layer-share of --ratio from whole layers (least block influence first; the nearest whole
    number of layers), the rest from MLP neurons. Dropping layers also drops llama.cpp's per-layer work, so at the
    same parameter count it runs faster than neurons alone (bench/prune.py)."""
    import dataclasses

    from .structured import Plan, n_params, planned_config
    if config.ratio is None or config.drop_layers:
        return dataclasses.replace(config, method="mlp")
    fixed = explicit_plan(m.config, config)
    pre = planned_config(m.config, Plan(hidden=fixed.hidden, n_kv=fixed.n_kv, q_per_kv=fixed.q_per_kv))
    total = n_params(m.config)
    per_layer = total - n_params(planned_config(m.config, Plan(drop_layers=[0])))
    k = round(config.layer_share * config.ratio * total / per_layer)
    # never more layers than the explicit --hidden/--heads leave of --ratio (it counts them: make_plan)
    n_pre = n_params(pre)
    left, per_layer_pre = n_pre - (1.0 - config.ratio) * total, n_pre - n_params(planned_config(pre, Plan(drop_layers=[0])))
    k = min(k, max(0, int(left // per_layer_pre)), len(order) - 1)
    return dataclasses.replace(config, method="mlp", drop_layers=tuple(sorted(order[:k])))


def structured_prune(m, chunks, config: PruneConfig, say, progress: bool, gguf_out: bool = True,
                     heal_rounds=None, spill: Path | None = None):
    """Plan (widths for --ratio, per-layer allocation) and apply structured pruning; (pruned model, stats).
    `gguf_out`: the result is written as a GGUF (the plan must be one llama.cpp loads). `heal_rounds`: with
    config.steps > 1, the healing of each round (see _iterative). `spill`: a streamed model's pruned layers
    (prune_structured)."""
    from .structured import block_influence, prune_structured
    config.check_model(m.config, gguf_out)
    config = config.for_model(m.config)
    order = None
    if config.method in ("layers", "mlp+layers"):
        bi = block_influence(m, chunks[:4], progress=progress)
        order = sorted(range(len(bi)), key=lambda i: bi[i])
    if config.method == "mlp+layers":
        config = _split_layers(m, config, order)
    plan = make_plan(m, config, order)
    if gguf_out:
        check_gguf_plan(m.config, plan)
    else:
        check_hf_plan(m, plan)
    if config.allocation != "uniform" and plan.ffn is not None:
        allocate_widths(m, chunks, plan, config, say, progress)
    if heal_rounds is not None:
        return _iterative(m, chunks, plan, order, config, say, progress, heal_rounds)
    say(f"structured pruning: {plan.describe()} ({config.importance} importance) ...")
    pruned, st = prune_structured(m, chunks, plan, importance=config.importance, progress=progress, spill=spill)
    return pruned, _finish_stats(m, pruned, st, plan, say)


def _finish_stats(m, pruned, st: dict, plan: Plan, say) -> dict:
    st["drop_layers"] = sorted(plan.drop_layers)    # healing's layer map: which original layer each kept one is
    st["removed_fraction"] = 1 - st["params_after"] / st["params_before"]
    from ..arch import gguf_arch
    st["arch"] = gguf_arch(m.spec, pruned.config)   # what the GGUF writer will name it; prune() reads it back
    say(f"parameters {st['params_before'] / 1e6:.2f}M -> {st['params_after'] / 1e6:.2f}M "
        f"({st['removed_fraction']:.1%} removed)")
    return st


def _iterative(m, chunks, plan: Plan, order, config: PruneConfig, say, progress: bool, heal_rounds):
    """--steps K: K rounds of prune -> heal towards `plan` (prune/iterative.py); `heal_rounds(student,
    layer_map, k)` heals round k. Returns (the last round's model, stats with one record per round)."""
    from .iterative import prune_iteratively
    if order is None:                        # mlp only: no layers to order
        order = list(range(m.config["num_hidden_layers"]))
    say(f"iterative structured pruning in {config.steps} rounds towards {plan.describe()} ...")
    pruned, rounds = prune_iteratively(m, chunks, plan, order, config.steps, round_to=round_multiple(config),
                                       heal=heal_rounds, importance=config.importance, progress=progress, say=say)
    st = {"plan": plan.describe(), "params_before": m.n_params(), "params_after": pruned.n_params(),
          "importance": config.importance, "rounds": rounds}
    return pruned, _finish_stats(m, pruned, st, plan, say)


def _heal_rounds(original, out, config: PruneConfig, resume: bool, progress: bool, say):
    """Round k's healing for --steps K: the --heal budget split K ways, the work folder cleared between rounds."""
    import dataclasses

    from ..train import command as healing
    from ..train.config import parse_budget
    kind, v = parse_budget(config.heal.train.budget)
    per = f"{v / config.steps:g}s" if kind == "seconds" else str(max(1, int(v // config.steps)))
    heal = dataclasses.replace(config.heal, train=dataclasses.replace(config.heal.train, budget=per))

    def run(student, layer_map, k):
        rec = healing.heal_step(student, original, heal, out, resume=False, layer_map=layer_map, text=config.text,
                                progress=progress, say=say, student_label=f"round {k}'s pruned model")
        healing.clear_work_folder(out)
        return rec
    return run


def prune(model, out: str | Path, config: PruneConfig, *, overwrite: bool = False, progress: bool = True,
          command: str = "", resume: bool = False):
    """Prune `model` (path or None for the default) and write `out` (.gguf: a GGUF of config.type; otherwise an
    HF folder); with config.heal, heal the pruned model from the original first (`resume`: continue an interrupted
    healing from its checkpoint). Returns the Report (None on the non-writing ranks of a distributed launch)."""
    from ..calib import calibration_chunks
    from ..compress import source_bytes
    from ..io import check_output_path
    from ..model import load
    from ..report import Report
    from ..train import command as healing
    from .weights import prune_weights_model
    gguf_out = str(out).endswith(".gguf")
    if resume and config.steps > 1:
        raise ConfigError("--resume continues one healing run; with --steps each round heals anew: rerun without "
                          "--resume (and delete the work folder)")
    if not gguf_out and config.allocate is None and config.method in STRUCTURED:
        import dataclasses  # an HF folder that transformers loads alone needs uniform widths
        config = dataclasses.replace(config, allocate="uniform")
    inputs = [p for p in (model, config.text, None if config.calib == "default" else config.calib,
                          *(config.heal.data if config.heal else ())) if p]
    if gguf_out:
        out = check_output_path(out, overwrite=overwrite, inputs=inputs)
    else:                                # refused before loading: a read-only, non-empty or input folder
        from ..hfout import check_folder
        from ..io import check_output_folder
        out = check_folder(model, out, overwrite=overwrite)
        check_output_folder(out, overwrite=overwrite, inputs=inputs)
    from ..lazy import decide_stream, peak_rss
    from ..source import source_info
    info = source_info(model)              # checked once: healing's memory check and the stream decision
    if config.heal is not None:
        healing.check_work_folder(out, resume)
        healing.check_models_fit(config.heal, [info])
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    stream = decide_stream(config.stream, model, info, config.check_streamable)
    if stream and not gguf_out:
        raise ConfigError("a streamed prune writes a GGUF (out ending in .gguf); an HF folder output holds the "
                          "whole model: give --stream off on a machine with the memory")
    say(f"loading {model or 'the embedded SmolLM2-135M-Instruct'}{' (streamed: one layer at a time)' if stream else ''} ...")
    m = load(model, progress=progress, stream=stream)
    config.check_model(m.config, gguf_out)
    if gguf_out and m.gguf is None:      # an HF tokenizer llama.cpp must know: refused now, not after the work
        from ..gguf.vocab import check_hf_tokenizer
        check_hf_tokenizer(m.tokenizer, m.source, config.pre_tokenizer)
    if not gguf_out and config.method in STRUCTURED and (config.hidden is not None or config.heads is not None):
        kv, q = config.parsed_heads() if config.heads is not None else (None, None)
        check_hf_plan(m, Plan(hidden=config.hidden, n_kv=kv, q_per_kv=q), "--hidden/--heads")
    if config.evaluate and config.heal is not None:
        from ..calib import check_eval_text
        check_eval_text(m, config.text, config.n_ctx)
    chunks, prov = calibration_chunks(m, None if config.calib in (None, "default") else config.calib,
                                      n_ctx=config.n_ctx, max_chunks=config.calib_chunks)
    spill = None
    if stream:                             # the pruned layers wait on disk beside the output, not in memory
        from ..io import clean_stale_temps, temp_name
        clean_stale_temps(out)
        spill = temp_name(out)
        spill.mkdir()
    try:
        t0 = time.perf_counter()
        if config.method in WEIGHT_METHODS:
            sp, nm = parse_sparsity(config.sparsity)
            say(f"{config.method} weight pruning at {config.sparsity} ...")
            per = None
            if config.allocate == "sensitivity":
                from .sensitivity import weight_sparsities
                if chunks.shape[0] < 2:
                    raise ConfigError("--allocate sensitivity needs at least 2 calibration chunks")
                say("measuring each layer's sensitivity to weight pruning (KLD on a held-out calibration chunk) ...")
                per = weight_sparsities(m, chunks[:-1], chunks[-1], config.method, sp, progress=progress)["sparsities"]
            pruned, st = prune_weights_model(m, chunks, config.method, sp, nm, owl=config.allocate == "owl",
                                             sparsities=per, progress=progress)
            step = {"step": "weight pruning", "source": prov, **st}
            say(f"pruned {st['pruned_weights']} weights ({st['sparsity']:.1%} of the decoder-layer linears); "
                f"note: zeros make a GGUF neither smaller nor faster in llama.cpp")
        else:
            rounds = _heal_rounds(m, out, config, resume, progress, say) if config.steps > 1 else None
            pruned, st = structured_prune(m, chunks, config, say, progress, gguf_out, heal_rounds=rounds,
                                          spill=spill)
            step = {"step": "structured pruning", "source": prov, **st}
        step["seconds"] = time.perf_counter() - t0
        steps, rec_heal = [step], None
        if config.steps > 1:
            rec_heal = dict(st["rounds"][-1]["heal"], rounds=[{k: v for k, v in r.items() if k != "heal"} | {
                "heldout_kl": r["heal"]["heldout_kl"], "heldout_kl_unhealed": r["heal"]["stages"][0]["heldout_kl"],
                "seconds": r["heal"]["seconds"]} for r in st["rounds"]])
            for r in st["rounds"]:
                r.pop("heal")
            steps.append(healing.healing_step_record(rec_heal))
            if not healing.is_main_process():
                return None
        elif config.heal is not None:
            from ..train.stages import layer_map_from
            rec_heal = healing.heal_step(pruned, m, config.heal, out, resume=resume,
                                         layer_map=layer_map_from(m.config, st["drop_layers"]), text=config.text,
                                         progress=progress, say=say, student_label="the pruned model")
            steps.append(healing.healing_step_record(rec_heal))
            if not healing.is_main_process():
                return None
        rec, ev = healing.write_and_evaluate(pruned, m, out, gguf_out, config, healed=config.heal is not None,
                                             ref_name="original", overwrite=overwrite, progress=progress, say=say)
        step["arch"] = written_arch(out)
        rep = Report(command=command or f"prune {model or '(default)'} -o {out} --method {config.method}",
                     source=str(m.source), output=str(out), type=rec["type"], export=rec, evaluation=ev,
                     steps=steps + [{"step": "export", "type": rec["type"], "seconds": rec["seconds"]}],
                     source_bytes=source_bytes(m.source), healing=rec_heal,
                     memory={"streamed": stream, "fp32_bytes": 4 * info.n_params, "peak_rss_bytes": peak_rss()})
        rep.written = rep.write(out)
        return rep
    finally:
        if spill is not None:
            shutil.rmtree(spill, ignore_errors=True)
