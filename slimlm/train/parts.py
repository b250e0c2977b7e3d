"""The trainer's parts that stand alone: what trains (parameter selection, LoRA), the learning-rate schedule,
the data order, and compiling the student's step."""
from __future__ import annotations

import math

import torch

from ..arch import decoder_layers
from .config import TrainConfig

# --compile auto compiles for runs of at least this long (seconds or tokens). bench/heal.py, SmolLM2 -25%, 2 AVX2
# cores, fp32: the first compiled step took 136 s, then a 1024-token step ran in 5.1 s instead of 7.1 s
COMPILE_MIN_SECONDS, COMPILE_MIN_TOKENS = 900, 100_000


# ------------------------------------------------------------------------------------------ what trains
BY_CHANGED_LAYERS = ("norms+pruned", "from-changed")      # --train modes that follow the layers pruning changed


def select_parameters(module: torch.nn.Module, mode: str, changed_layers: list[int] | None) -> list[str]:
    """Set requires_grad by `mode` (not lora: see add_lora); returns the names of the trainable parameters. A
    parameter marked quant/qat.FROZEN (the float weight under learned rounding) never trains, whatever the mode."""
    frozen = {id(module.get_input_embeddings().weight)}
    out_emb = module.get_output_embeddings()
    if out_emb is not None:
        frozen.add(id(out_emb.weight))
    never = {id(p) for p in module.parameters() if getattr(p, "_slimlm_frozen", False)}    # quant/qat.FROZEN
    train_ids: set[int] | None = None
    if mode in BY_CHANGED_LAYERS:
        layers = decoder_layers(module)
        changed = range(len(layers)) if changed_layers is None else changed_layers
        if mode == "norms+pruned":
            train_ids = {id(p) for j in changed for p in layers[j].parameters()}
            train_ids |= {id(p) for n, p in module.named_parameters() if "norm" in n.rsplit(".", 2)[-2].lower()}
        else:       # every layer from the first changed one on and what follows them (the final norm): the
            # layers before it stay frozen, so the backward pass stops at the first changed layer
            first = min(changed, default=0)
            in_layers = {id(p) for layer in layers for p in layer.parameters()}
            train_ids = {id(p) for j in range(first, len(layers)) for p in layers[j].parameters()}
            train_ids |= {id(p) for p in module.parameters() if id(p) not in in_layers}
    names = []
    for n, p in module.named_parameters():
        on = id(p) not in never and (mode == "all" or (id(p) not in frozen and (train_ids is None or id(p) in train_ids)))
        p.requires_grad_(on)
        if on:
            names.append(n)
    return names


SCALE_PARAMS = ("d_factor", "dmin_factor", "sc_shift", "m_shift")   # quant/fakequant.FakeQuant's learned scales
ROUND_PARAMS = ("round_offset",)                 # its learned rounding offsets


def adamw(params, *, lr: float, betas=(0.9, 0.999), weight_decay: float = 0.0,
          fused: bool = True) -> torch.optim.AdamW:
    """torch's AdamW, fused (one kernel over all tensors) where torch has it for every parameter's device and dtype.
    On a CPU torch otherwise runs the per-tensor loop (its multi-tensor path is CUDA-only), a dozen passes over
    the trained weights and both moments every step, which at healing's or QAT's 70-110M trained parameters is a
    good part of a CPU step. `fused` False: the per-tensor loop (FSDP's sharded DTensors)."""
    flat = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    ok = fused and bool(flat) and all(
        p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and type(p) is torch.nn.Parameter for p in flat)
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, fused=ok or None)


STEP_IMPL = ("fused", "foreach")   # how torch runs an optimizer step: the running process's choice (adamw)


def optim_state(opt: torch.optim.Optimizer) -> dict:
    """opt.state_dict() without STEP_IMPL: a checkpoint holds the training state, not how a process ran the step
    (one process fuses it, FSDP's shards cannot)."""
    sd = opt.state_dict()
    return {**sd, "param_groups": [{k: v for k, v in g.items() if k not in STEP_IMPL} for g in sd["param_groups"]]}


def load_optim_state(opt: torch.optim.Optimizer, state: dict, load=None) -> None:
    """Load `state` (optim_state's) into opt with `load` (default opt.load_state_dict), keeping opt's own STEP_IMPL
    (torch's load takes every group setting from the state, and would run a fused optimizer unfused)."""
    keep = [{k: g[k] for k in STEP_IMPL if k in g} for g in opt.param_groups]
    (load or opt.load_state_dict)(state)
    for g, k in zip(opt.param_groups, keep, strict=True):
        g.update(k)


def embedding_prefixes(module: torch.nn.Module) -> tuple[str, ...]:
    """The parameter-name prefixes of the token embedding and the LM head ("model.embed_tokens.", "lm_head.")."""
    mods = {id(module.get_input_embeddings()), id(module.get_output_embeddings())}
    return tuple(f"{n}." for n, m in module.named_modules() if id(m) in mods)


def param_groups(params: dict, names: list[str], cfg: TrainConfig, embedding: tuple[str, ...] = ()) -> list[dict]:
    """AdamW's parameter groups: one, or with --scale-lr the learned quantization scales and with --round-lr the
    learned rounding offsets apart, their learning rates a multiple (`lr_mult`) of the schedule's; with
    --embedding-scale-lr the scales of the parameters under the `embedding` prefixes (embedding_prefixes: the
    token embedding / LM head's grid under --qat-embeddings) in a group of their own."""
    groups, apart = [], set()
    def anywhere(n):
        return True
    def in_embedding(n):                  # str.startswith(()) is False: no prefixes, no embedding group
        return n.startswith(embedding)
    for kinds, lr, where in ((SCALE_PARAMS, cfg.embedding_scale_lr, in_embedding),
                             (SCALE_PARAMS, cfg.scale_lr, anywhere), (ROUND_PARAMS, cfg.round_lr, anywhere)):
        mine = [n for n in names if n not in apart and n.rsplit(".", 1)[-1] in kinds and where(n)]
        if lr is not None and mine:
            groups.append({"params": [params[n] for n in mine], "lr_mult": lr / cfg.lr})
            apart |= set(mine)
    return [{"params": [params[n] for n in names if n not in apart], "lr_mult": 1.0}, *groups]


def add_lora(module: torch.nn.Module, rank: int) -> torch.nn.Module:
    """peft LoRA adapters on every linear inside the decoder blocks (merged back by `merge_lora`)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        from ..errors import MissingDependencyError
        raise MissingDependencyError("--train lora needs peft: pip install peft") from None
    targets = sorted({n.rsplit(".", 1)[-1] for n, m in decoder_layers(module).named_modules()
                      if isinstance(m, torch.nn.Linear)})
    cfg = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=targets, bias="none")
    return get_peft_model(module, cfg)


def merge_lora(train_module: torch.nn.Module, lora: bool) -> torch.nn.Module:
    return train_module.merge_and_unload() if lora else train_module


# ------------------------------------------------------------------------------------------ schedule, data
def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warmup over cfg.warmup of the steps, then cosine from lr down to min_lr * lr."""
    w = int(round(cfg.warmup * total))
    if step < w:
        return cfg.lr * (step + 1) / w
    frac = (step - w) / max(1, total - w - 1)
    return cfg.lr * (cfg.min_lr + (1 - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


class RowOrder:
    """Global batch b -> row indices: a fresh permutation per epoch, a function of (seed, epoch) only."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self._perm = n, seed, {}

    def perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perm:
            g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            self._perm = {epoch: torch.randperm(self.n, generator=g)}
        return self._perm[epoch]

    def rows(self, step: int, size: int) -> torch.Tensor:
        pos = range(step * size, (step + 1) * size)
        return torch.stack([self.perm(p // self.n)[p % self.n] for p in pos])


def compile_wanted(cfg: TrainConfig, device: torch.device, *, fsdp: bool, lora: bool) -> bool:
    """--compile on, or auto: a run long enough to pay back the one-time compile (COMPILE_MIN_*), not FSDP or LoRA
    (their modules are rebuilt around the student), with the compiler inductor needs (a C++ compiler on a CPU,
    triton on a GPU)."""
    if cfg.compile != "auto":
        return cfg.compile == "on"
    long_run = cfg.budget_value >= (COMPILE_MIN_SECONDS if cfg.budget_kind == "seconds" else COMPILE_MIN_TOKENS)
    if not long_run or fsdp or lora:
        return False
    if device.type == "cuda":
        import importlib.util
        return importlib.util.find_spec("triton") is not None
    import shutil
    return any(shutil.which(c) for c in ("c++", "g++", "clang++"))


class CompiledOrEager:
    """torch.compile(fwd), falling back to the eager module (with a warning) when compiling its first call fails.
    `eager`: what runs then, when not fwd itself (the same math in a form eager runs better). `exact_casts`: keep
    every low-precision rounding the code asks for (inductor's emulate_precision_casts; by default a fused kernel
    may skip a `.half().float()` round trip, which QAT's fake quantization is made of: tests/test_fakequant.py)."""

    def __init__(self, fwd, eager=None, *, exact_casts: bool = False):
        self.eager, self.ok = fwd if eager is None else eager, None
        self.compiled = torch.compile(fwd, options={"emulate_precision_casts": True} if exact_casts else None)

    def __call__(self, *a, **kw):
        if self.ok is None:
            try:
                out, self.ok = self.compiled(*a, **kw), True
                return out
            except Exception as e:                         # noqa: BLE001 (any compiler failure: run eager)
                import warnings
                warnings.warn(f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                              "it runs eager (--compile off skips the attempt)", stacklevel=2)
                self.ok = False
        return (self.compiled if self.ok else self.eager)(*a, **kw)

    def __getattr__(self, name):                          # parameters(), no_sync() of the module
        return getattr(self.eager, name)
