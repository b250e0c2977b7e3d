"""A training run on a tiny model in its own process, for tests that kill it (resume) or start two of it
(torch.distributed on gloo). Usage: python train_worker.py MODEL_DIR TEXT OUT_DIR [key=value ...]

Teacher = the tiny model; student = the same model with seeded noise (deterministic). Writes, on rank 0,
OUT_DIR/result.json (loss curve, evaluations) and OUT_DIR/student.safetensors (final weights).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from slimlm import load
from slimlm.train.config import TrainConfig
from slimlm.train.data import load_train_data
from slimlm.train.trainer import train


def make(model_dir: str, text: str, **kw):
    torch.set_num_threads(1)
    teacher = load(model_dir, progress=False)
    student = load(model_dir, progress=False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in student.module.parameters():
            p.add_(0.03 * torch.randn(p.shape, generator=g))
    data = load_train_data(student, [text], seq_len=int(kw.get("seq_len", 32)), n_heldout=2, progress=False)
    return teacher, student, data


def main(argv: list[str]) -> None:
    model_dir, text, out = argv[:3]
    kw = dict(a.split("=", 1) for a in argv[3:])
    resume = kw.pop("resume", "0") == "1"
    teacher, student, data = make(model_dir, text, **kw)
    ints = ("seq_len", "micro_batch", "accum", "checkpoint_every", "eval_every", "topk", "seed")
    floats = ("lr", "warmup", "min_lr", "temperature", "ce_weight")
    cfg = TrainConfig(**{k: (int(v) if k in ints else float(v) if k in floats else v) for k, v in kw.items()})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    r = train(student, teacher, data, cfg, folder=out / "work", resume=resume, progress=False)
    import os
    if int(os.environ.get("RANK", "0")) == 0:
        save_file({k: v.clone().contiguous() for k, v in student.module.state_dict().items()},
                  str(out / "student.safetensors"))
        (out / "result.json").write_text(json.dumps({k: r[k] for k in ("curve", "evals", "steps", "tokens",
                                                                       "world_size", "best_step")}))


if __name__ == "__main__":
    main(sys.argv[1:])
