"""Writing an HF model folder: `model.safetensors`, `config.json` and the tokenizer files, all into one temp
folder beside the output, fsynced, checked, then renamed into place (io.atomic_folder). A reader, or the next
run after a kill or a full disk, sees the old folder, none, or the complete new one: never a folder with the
weights but no config. `save_hf` writes a model transformers loads again (biases that bias compensation added
switch on LlamaConfig's attention_bias / mlp_bias, their partners written as zeros); `write_hf_folder` is the
shared part (the k-means writer uses it with its own tensors)."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from .errors import ConfigError, InvalidModelError, OutputError
from .io import atomic_folder, check_output_folder

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def check_folder(source: str | Path | None, out: str | Path, *, overwrite: bool = False) -> Path:
    """Before loading or any heavy work: `out` is not the model's (`source`) folder, not a file, empty or
    --overwrite, and writable."""
    out = Path(out)
    if source is not None and Path(source).resolve() == out.resolve():
        raise ConfigError(f"{out} is the model's own folder; give another output folder")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file; give a folder for an HF model")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out} exists; pass --overwrite to replace its files (atomically)")
    return check_output_folder(out, overwrite=overwrite, inputs=[source] if source else [])


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """safetensors' Rust writer reports a failed write (disk full) as SafetensorError, not OSError."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as e:
        msg = str(e)
        if "I/O error" not in msg:
            raise InvalidModelError(f"cannot write the tensors as safetensors: {msg}") from None
        code = re.search(r"os error (\d+)", msg)
        if code is None:
            raise OSError(None, msg.split("I/O error: ")[-1]) from None
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from None


_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


def check_written(d: Path, tensors: dict[str, torch.Tensor], config: dict, tokenizer_files: list[str]) -> None:
    """Read back what was written before it is renamed into place: the safetensors header strictly (offsets,
    sizes against the file: a short write shows) with every tensor's name, dtype and shape; config.json as
    written; the tokenizer files present and non-empty."""
    from .hf import parse_json, read_safetensors_header
    st = d / "model.safetensors"
    got = read_safetensors_header(st)
    want = {n: (_ST_DTYPES.get(t.dtype, str(t.dtype)), tuple(t.shape)) for n, t in tensors.items()}
    if {n: (e.dtype, e.shape) for n, e in got.items()} != want:
        raise InvalidModelError(f"{st}: the tensors read back differ from those written")
    if parse_json((d / "config.json").read_bytes(), str(d / "config.json")) != json.loads(
            json.dumps(config, default=str)):
        raise InvalidModelError(f"{d / 'config.json'}: reads back differently")
    for f in tokenizer_files:
        if not (d / f).is_file() or (d / f).stat().st_size == 0:
            raise InvalidModelError(f"{d / f}: tokenizer file missing or empty")


def write_hf_folder(model, out: str | Path, tensors: dict[str, torch.Tensor], config: dict, *,
                    metadata: dict | None = None, overwrite: bool = False) -> Path:
    """Write the folder atomically; what was written is read back (check_written) before the rename."""
    out = check_folder(model.source, out, overwrite=overwrite)
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise InvalidModelError(f"{name} has non-finite values at its stored precision; refusing to write it")
    with atomic_folder(out, overwrite=overwrite, inputs=[model.source] if model.source else []) as tmp:
        _save_safetensors(tensors, tmp / "model.safetensors", {"format": "pt", **(metadata or {})})
        with open(tmp / "config.json", "w") as f:
            f.write(json.dumps(config, indent=1, default=str))
        written = [Path(f).name for f in model.tokenizer.save_pretrained(tmp) if Path(f).is_file()]
        try:
            check_written(tmp, tensors, config, written)
        except InvalidModelError as e:
            raise OutputError(f"the folder written for {out} does not read back, nothing was written under "
                              f"that name: {e}") from None
    return out


def save_hf(model, out: str | Path, *, dtype: str = "float32", overwrite: bool = False) -> Path:
    """The model as an HF folder (safetensors at `dtype`, tied output projection stored once)."""
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    tied = bool(model.config.get("tie_word_embeddings", False))
    tensors = model.spec.to_checkpoint({n: t.detach().to(DTYPES[dtype]).contiguous()
                                        for n, t in model.module.state_dict().items()
                                        if not (tied and n == model.spec.output_name)})
    cfg = model.module.config.to_dict()
    cfg.update(_with_bias_partners(model.spec, cfg, tensors))
    cfg["torch_dtype"] = dtype
    cfg.pop("quantization_config", None)
    return write_hf_folder(model, out, tensors, cfg, overwrite=overwrite)


def _with_bias_partners(spec, cfg: dict, tensors: dict[str, torch.Tensor]) -> dict[str, bool]:
    """Biases beyond the family's own (bias compensation's o_proj/down_proj biases) need the config flags that
    switch them on in transformers (LlamaConfig: attention_bias for q/k/v/o, mlp_bias for gate/up/down); the
    partners the model does not have are added to `tensors` as zeros, so that transformers builds and fills
    exactly this function. Returns the flags to set."""
    flags = spec.hf_bias_config(tensors)
    if flags:
        dtype = next(iter(tensors.values())).dtype
        for name, shape in spec.expected_shapes({**cfg, **flags}).items():
            if name not in tensors:
                tensors[name] = torch.zeros(shape, dtype=dtype)
    return flags
