"""Devices and processes: `--device auto|cpu|cuda[:N]`, and data parallelism through torch.distributed.

A run started by `torchrun` or `accelerate launch` (RANK/WORLD_SIZE/MASTER_ADDR in the environment) joins
the process group (NCCL on GPUs, gloo on CPUs); each process takes its slice of every global batch and DDP
averages the gradients, so N processes follow the same loss curve as one process with N times the gradient
accumulation. Rank 0 alone writes checkpoints, caches and outputs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """auto: the process's GPU when CUDA is available (LOCAL_RANK picks it under torchrun), else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: this torch has no CUDA device ({torch.__version__}); use "
                              f"--device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
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
    if not td.is_initialized():
        td.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return World(td.get_rank(), td.get_world_size())
