"""What a model source holds, read from its headers only: tensor shapes and context length, no weights.

`source_info(path)` runs the same strict checks as `load()` (hf.check_hf_dir for a folder, the GGUF reader
for a file) and returns every tensor's shape under its GGUF name (rows, row length: the layout the writer
holds), so that commands can refuse arguments that depend on the model (a --ctx beyond its context, a size
budget below its smallest file) before minutes of loading and calibration. `check_ctx` is that --ctx check.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError, InvalidModelError

MAX_CTX = 1 << 20       # no model slimlm runs has a longer context; a larger --ctx is a typo


@dataclass(frozen=True)
class SourceInfo:
    path: Path
    shapes: dict[str, tuple[int, ...]]      # GGUF tensor name -> shape (rows, row length for 2-D)
    context_length: int | None              # the model's training context (None when it does not say)

    @property
    def n_params(self) -> int:
        return sum(math.prod(s) for s in self.shapes.values())


def source_info(path: str | os.PathLike | None) -> SourceInfo:
    """Validate a model source (HF folder, .gguf file, or None for the embedded default) without reading
    weights; InvalidModelError (or a subclass) for anything `load()` would refuse at this stage."""
    from .model import default_model_path
    p = default_model_path() if path is None else Path(path)
    if p.is_dir():
        from .hf import check_hf_dir
        cfg, spec, _ = check_hf_dir(p)
        tied = bool(cfg.get("tie_word_embeddings", False))
        shapes = {spec.hf_to_gguf(n): s for n, s in spec.expected_shapes(cfg, stacked=True).items()
                  if not spec.is_ignored(n) and not (tied and n == spec.output_name)}
        ctx = cfg.get("max_position_embeddings")
    elif p.is_file():
        from .gguf.checks import check_model_gguf
        from .gguf.reader import read_gguf
        g = read_gguf(p)
        check_model_gguf(g)          # the same checks load() runs: shapes and context from a file it accepts
        shapes = {t.name: tuple(t.shape) for t in g.tensors}
        ctx = g.get(f"{g.architecture}.context_length")
    else:
        raise InvalidModelError(f"{p}: no such file or folder (give an HF model folder or a .gguf file)")
    ctx = int(ctx) if isinstance(ctx, (int, float)) and not isinstance(ctx, bool) and ctx > 0 else None
    return SourceInfo(p, shapes, ctx)


def check_ctx_value(n_ctx: int, flag: str = "--ctx") -> None:
    """An even number of tokens >= 16 and <= MAX_CTX (llama.cpp's scoring needs two halves)."""
    if not 16 <= n_ctx <= MAX_CTX or n_ctx % 2:
        raise ConfigError(f"{flag} must be an even number of tokens from 16 to {MAX_CTX}, got {n_ctx}")


def check_ctx(n_ctx: int, info: SourceInfo, flag: str = "--ctx") -> None:
    """--ctx within the model's training context: beyond it the numbers measure nothing the model learned
    (and llama.cpp would allocate a KV cache for it)."""
    if info.context_length is not None and n_ctx > info.context_length:
        raise ConfigError(f"{flag} {n_ctx} is beyond the context length of {info.path} ({info.context_length} "
                          f"tokens); give a smaller {flag}")
