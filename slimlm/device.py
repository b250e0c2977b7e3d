"""Where torch computes: `--device auto|cpu|cuda[:N]` for the layer passes (importance matrix, GPTQ/AWQ statistics,
structured pruning's scores and statistics) and the torch-side evaluation; weight pruning and the experts' GPTQ,
which solve inside the forward, stay on the host.

A layer pass moves one decoder layer at a time to the device (`on_device`), for as long as the calibration
chunks run through it; the hidden states of all chunks stay in host memory and go over a micro-batch at a time
(`run_layer` moves its input to the layer's device and its output back), so the device holds one layer and one
micro-batch's activations whatever the model's size. A linear's input statistics (X^T X, float64) are summed where
the activations are, and come back to the host with the layer (`InputStats.to_host`); the solvers (GPTQ's numba
kernels, OBS, the surgery) run on the host. The device is a context (`computing_on`) set by the CLI, so library
calls and tests without it run on the CPU exactly as before.
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch

_device: contextvars.ContextVar[torch.device | None] = contextvars.ContextVar("slimlm_device", default=None)


def compute_device() -> torch.device:
    """The device layer passes run on (the CPU unless `computing_on` set another)."""
    return _device.get() or torch.device("cpu")


@contextlib.contextmanager
def computing_on(device: str | torch.device | None) -> Iterator[torch.device]:
    """Run the layer passes inside on `device` (a name as --device takes it: auto, cpu, cuda, cuda:N; None: the
    CPU). Refuses a CUDA device this torch does not have (errors.ConfigError)."""
    from .train.dist import resolve_device
    dev = device if isinstance(device, torch.device) else resolve_device(device or "cpu")
    token = _device.set(dev)
    try:
        yield dev
    finally:
        _device.reset(token)


def to_device(obj, dev: torch.device):
    """obj with every tensor in it (through tuples, lists and dicts) on `dev`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(dev)
    if isinstance(obj, tuple):
        return tuple(to_device(o, dev) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, dev) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, dev) for k, v in obj.items()}
    return obj


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of the module's first parameter that is not on the meta device (the CPU when none is)."""
    for p in module.parameters():
        if not p.is_meta:
            return p.device
    return torch.device("cpu")


@contextlib.contextmanager
def on_device(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """`module` moved to the compute device for the block and back to the host after it (nothing moves when the
    device is the CPU). Its parameters keep their objects (torch moves .data), so whoever holds them sees the
    host copy again afterwards; changes made on the device come back with it."""
    dev = compute_device()
    if dev.type == "cpu" or module_device(module) == dev:
        yield module
        return
    module.to(dev)
    try:
        yield module
    finally:
        module.to("cpu")
        if dev.type == "cuda":
            torch.cuda.empty_cache()      # the next layer may have other shapes: give the cached blocks back
