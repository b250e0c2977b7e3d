"""Devices and processes: `--device auto|cpu|cuda[:N]`, and data parallelism through torch.distributed.

A run started by `torchrun` or `accelerate launch` (RANK/WORLD_SIZE/MASTER_ADDR in the environment) joins
the process group (NCCL on GPUs, gloo on CPUs); each process takes its slice of every global batch and the
gradients are averaged, so N processes follow the same loss curve as one process with N times the gradient
accumulation. Rank 0 alone writes checkpoints, caches and outputs.

Two ways to spread the model (`--parallel`): DDP keeps the whole model, its gradients and AdamW's moments in
every process and all-reduces the gradients. FSDP (PyTorch's `fully_shard`, "FSDP2": per-parameter sharding
over a 1-D device mesh, https://pytorch.org/docs/stable/distributed.fsdp.fully_shard.html) keeps 1/N of each
parameter, gradient and moment per process: every decoder layer, then the rest (embeddings, final norm, LM
head), is all-gathered just for its forward and backward, and its gradients are reduce-scattered into the
shards, so the training state of a model N times larger than one device holds fits. The trainer shards a
*training copy* (`training_copy`: new module objects over the student's own weight storage, no tensor copied),
and at the end copies the gathered full weights back into the student (`unshard_into`), which never stops
being a plain module. Checkpoints hold full tensors in both modes (`gather_full` / `shard_like`): one format.
"""
from __future__ import annotations

import copy
import itertools
import os
import re
from dataclasses import dataclass

import torch

from ..errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """auto: the process's GPU when CUDA is available (LOCAL_RANK picks it under torchrun), else the CPU.
    `cuda` without an index under a launcher (WORLD_SIZE > 1) is the process's own GPU too."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", name):
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    local = int(os.environ.get("LOCAL_RANK", 0))
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local % torch.cuda.device_count())
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: this torch has no CUDA device ({torch.__version__}); use "
                              f"--device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
        if dev.index is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            dev = torch.device("cuda", local % torch.cuda.device_count())
    return dev


def fast_bf16(dev: torch.device) -> bool:
    """Whether bf16 autocast speeds up matmuls here: CUDA with bf16 support, or a CPU with AVX512-BF16/AMX
    (bench/heal.py: 2.2x tokens/s for a SmolLM2 distillation step on this project's CPU)."""
    if dev.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            torch.distributed.barrier()

    def mean(self, x: float, device: torch.device) -> float:
        """The mean of a number over the processes."""
        if self.size == 1:
            return x
        t = torch.tensor([x], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return float(t.item()) / self.size

    def all_true(self, flag: bool, device: torch.device) -> bool:
        if self.size == 1:
            return flag
        t = torch.tensor([0 if flag else 1], dtype=torch.int64, device=device)
        torch.distributed.all_reduce(t)
        return int(t.item()) == 0


def init_world(device: torch.device) -> World:
    """Join the process group a launcher set up (WORLD_SIZE > 1); a single process otherwise."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    import torch.distributed as td
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)           # NCCL and fully_shard use the current device
    if not td.is_initialized():
        td.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return World(td.get_rank(), td.get_world_size())


# ------------------------------------------------------------------------------------------ FSDP
def training_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A structural copy of `module` whose parameters and buffers are new tensor objects over the same storage:
    nothing is copied but Python objects, and `fully_shard` can take the copy apart (it replaces each parameter
    with its shard) while `module` stays a whole, plain module. Tied parameters stay tied in the copy."""
    memo = {}
    for t in itertools.chain(module.parameters(), module.buffers()):
        if isinstance(t, torch.nn.Parameter):                 # fully_shard needs contiguous parameters
            memo[id(t)] = torch.nn.Parameter(t.detach().contiguous(), requires_grad=t.requires_grad)
        else:
            memo[id(t)] = t.detach()
    return copy.deepcopy(module, memo)


def fully_shard_model(module: torch.nn.Module, layers: torch.nn.ModuleList, device: torch.device) -> None:
    """Shard `module` across the processes: each decoder layer is one FSDP unit (all-gathered for its forward
    and backward only), the root takes the rest. Parameters keep their requires_grad; frozen ones are sharded
    too and get no gradient. After this the module's parameters are DTensors: build the optimizer on them."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    units = [*layers, module]
    for m in units:
        fully_shard(m, mesh=mesh)
    if device.type == "cpu":
        # gloo's ReduceOp.AVG in reduce-scatter summed instead of averaging in some releases
        # (pytorch/pytorch#162338): reduce with SUM and divide by the world size here, on every unit
        for m in units:
            m.set_force_sum_reduction_for_comms(True)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor is all-gathered (every process must call this), anything else is itself."""
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t


def gather_full(tree, keep: bool = True):
    """`tree` (nested dicts/lists of tensors: a state dict, an optimizer's state dict) with every tensor whole and
    on the CPU. Every process must call it (sharded tensors are all-gathered); with keep=False (the processes
    that do not write) each gathered tensor is dropped at once and None stands in its place."""
    if isinstance(tree, dict):
        return {k: gather_full(v, keep) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(gather_full(v, keep) for v in tree)
    if isinstance(tree, torch.Tensor):
        t = full(tree.detach())
        return t.cpu() if keep else None
    return tree


def shard_like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """The whole tensor `t` laid out as `ref`: this process's shard when `ref` is a DTensor (every process holds
    `t`, so each slices its own and nothing is sent), else `t` on ref's device."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    if isinstance(ref, DTensor):
        return distribute_tensor(t.to(ref.device), ref.device_mesh, ref.placements, src_data_rank=None)
    return t.to(ref.device)


def load_full_state(module: torch.nn.Module, state: dict) -> None:
    """Load a whole state dict (a checkpoint's) into a sharded module; strict, as load_state_dict."""
    now = module.state_dict()
    module.load_state_dict({k: shard_like(v, now[k]) if k in now else v for k, v in state.items()}, strict=True)


def load_full_optim(opt: torch.optim.Optimizer, state: dict) -> None:
    """Load an optimizer state dict of whole tensors (as `gather_full(parts.optim_state(opt))` writes it, the same
    format as an unsharded optimizer's) into an optimizer over sharded parameters."""
    params = [p for g in opt.param_groups for p in g["params"]]
    st = {i: {k: shard_like(v, params[i]) if isinstance(v, torch.Tensor) and v.dim() > 0 else v
              for k, v in s.items()} for i, s in state["state"].items()}
    opt.load_state_dict({"state": st, "param_groups": state["param_groups"]})


@torch.no_grad()
def unshard_into(module: torch.nn.Module, target: torch.nn.Module) -> None:
    """Copy the whole weights of the sharded `module` into `target` (the module it is a training copy of), one
    tensor at a time. Every process takes part in the gathering and every process's `target` gets them."""
    src, dst = module.state_dict(), target.state_dict()
    if src.keys() != dst.keys():
        raise AssertionError(f"the training copy's tensors differ from the student's: "
                             f"{sorted(set(src) ^ set(dst))[:8]}")
    for k, v in src.items():
        dst[k].copy_(full(v))
