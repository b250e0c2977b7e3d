"""Writing an HF model folder: `model.safetensors`, `config.json` and the tokenizer files, each through a temp
file, fsync and rename (RELIABILITY's write protocol). `save_hf` writes a model transformers loads again;
`write_hf_folder` is the shared part (the k-means writer uses it with its own tensors)."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from .errors import ConfigError, InvalidModelError
from .io import atomic_output

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def check_folder(model, out: str | Path, *, overwrite: bool = False) -> Path:
    out = Path(out)
    if model.source is not None and Path(model.source).resolve() == out.resolve():
        raise ConfigError(f"{out} is the model's own folder; give another output folder")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file; give a folder for an HF model")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out} exists; pass --overwrite to replace its files")
    return out


def write_hf_folder(model, out: str | Path, tensors: dict[str, torch.Tensor], config: dict, *,
                    metadata: dict | None = None, overwrite: bool = False) -> Path:
    from safetensors.torch import save_file
    out = check_folder(model, out, overwrite=overwrite)
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise InvalidModelError(f"{name} has non-finite values at its stored precision; refusing to write it")
    out.mkdir(parents=True, exist_ok=True)
    with atomic_output(out / "model.safetensors", overwrite=True) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", **(metadata or {})})
    with atomic_output(out / "config.json", overwrite=True) as tmp:
        Path(tmp).write_text(json.dumps(config, indent=1, default=str))
    with tempfile.TemporaryDirectory(dir=out, prefix=".tokenizer-") as d:    # each file: temp, fsync, rename
        for f in model.tokenizer.save_pretrained(d):
            f = Path(f)
            if f.is_file():
                with atomic_output(out / f.name, overwrite=True) as tmp:
                    shutil.copyfile(f, tmp)
    return out


def save_hf(model, out: str | Path, *, dtype: str = "float32", overwrite: bool = False) -> Path:
    """The model as an HF folder (safetensors at `dtype`, tied output projection stored once)."""
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    tied = bool(model.config.get("tie_word_embeddings", False))
    tensors = {n: t.detach().to(DTYPES[dtype]).contiguous() for n, t in model.module.state_dict().items()
               if not (tied and n == "lm_head.weight")}
    cfg = model.module.config.to_dict()
    cfg["torch_dtype"] = dtype
    cfg.pop("quantization_config", None)
    return write_hf_folder(model, out, tensors, cfg, overwrite=overwrite)
