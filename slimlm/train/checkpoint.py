"""Training checkpoints: written atomically, resumed only into the same run.

A checkpoint is one file `checkpoint.pt` in the run's folder: the trainable parameters, the best state kept
so far, the optimizer state, the step (the schedule and the data position follow from it), the loss curve,
RNG states, and a fingerprint of everything that decides the result (settings, dataset, the student's
starting weights, the global batch). It is written to a temp file, fsynced and renamed, so a kill leaves the
previous checkpoint whole. It is read with `torch.load(weights_only=True)`: tensors and plain containers,
never arbitrary pickled objects. `--resume` with any fingerprint difference is refused and says what differs.
Under FSDP the trainer gathers the shards before saving (dist.gather_full) and slices them again on resume, so a
checkpoint holds the same whole tensors, in the same layout, however the processes split the model.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import ConfigError
from ..io import fsync_path

NAME = "checkpoint.pt"
VERSION = 1


def save(folder: Path, *, fingerprint: dict, state: dict, params: dict, best: dict | None, optim: dict) -> Path:
    """Write the checkpoint atomically. `state`: JSON-able progress (step, tokens, curve, ...)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / NAME
    tmp = folder / f".{NAME}.tmp-{os.getpid()}"
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    blob = {"meta": json.dumps({"version": VERSION, "fingerprint": fingerprint, "state": state}),
            "params": {k: v.detach().cpu() for k, v in params.items()},
            "best": None if best is None else {k: v.detach().cpu() for k, v in best.items()},
            "optim": optim, "rng": rng}
    try:
        with open(tmp, "wb") as f:
            torch.save(blob, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
        fsync_path(folder, directory=True)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: checkpoint {va!r}, now {vb!r}")
    return out


def load(folder: Path, fingerprint: dict) -> dict:
    """The checkpoint in `folder`, refused unless it was made by the same run (ConfigError says what differs)."""
    p = folder / NAME
    if not p.is_file():
        raise ConfigError(f"--resume: no checkpoint {p} (a run writes one every --checkpoint-every steps); "
                          f"start without --resume")
    try:
        blob = torch.load(p, map_location="cpu", weights_only=True)
        meta = json.loads(blob["meta"])
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same answer for the user
        raise ConfigError(f"--resume: {p} is not a readable slimlm checkpoint ({type(e).__name__}: {e})") from None
    if meta.get("version") != VERSION:
        raise ConfigError(f"--resume: {p} is a version {meta.get('version')} checkpoint, this slimlm writes "
                          f"version {VERSION}")
    diff = _diff(meta["fingerprint"], fingerprint)
    if diff:
        raise ConfigError(f"--resume: {p} was made by a different run; refusing to mix them:\n  "
                          + "\n  ".join(diff[:12]) + "\nrerun with the checkpoint's settings, or start over "
                          "without --resume")
    blob["meta"] = meta
    return blob


def remove(folder: Path) -> None:
    """Delete the checkpoint once the run has finished and its output is written."""
    p = folder / NAME
    if p.exists():
        p.unlink()
