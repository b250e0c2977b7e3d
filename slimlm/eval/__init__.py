"""`evaluate()`: a model against a reference on the same tokens: PPL, KLD, top-1, size, bits/weight, speed.

Either side is an in-memory `Model` (run in torch) or a GGUF path (run in llama.cpp). The method of
chunking and scoring is llama.cpp's (see `metrics.py`).
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..arch import SPM_TOKENIZER
from ..calib import TokenText, read_text, tokenize
from ..errors import ConfigError
from ..gguf.reader import read_gguf
from .metrics import Scores, make_chunks, scored_slice
from .runtime import LlamaCppRunner, TorchRunner

__all__ = ["evaluate", "evaluate_many", "gguf_size_info", "model_size_info"]


def gguf_size_info(path: str | Path) -> dict:
    g = read_gguf(path)
    n = sum(t.n_elements for t in g.tensors)
    data = sum(t.nbytes for t in g.tensors)
    return {"file_bytes": g.file_size, "n_params": n, "bits_per_weight": 8 * data / max(n, 1)}


def model_size_info(model) -> dict:
    """Size of a model run in torch, as measured: when its source (HF folder or GGUF) still holds exactly its
    tensors, the bytes they take there (a float16 folder: 16 bits/weight; a k-means folder: codebooks and
    packed indices) and the source's file bytes; otherwise the bytes of its tensors in memory, no file."""
    n = _represented_params(model)
    stored = _stored_bytes(model, n)
    if stored is not None:
        file_bytes, data, where = stored
    else:
        seen, data = set(), 0
        for t in model.module.state_dict().values():
            if t.data_ptr() not in seen:                    # tied weights once
                seen.add(t.data_ptr())
                data += t.numel() * t.element_size()
        file_bytes, where = None, "in memory"
    return {"file_bytes": file_bytes, "n_params": n, "bits_per_weight": 8 * data / max(n, 1), "size_of": where}


def _represented_params(model) -> int:
    """Parameters, counting a codebook linear (quant.kmeans.KMeansLinear) as the weights it decodes to."""
    from ..quant.kmeans import KMeansLinear
    coded = [m for m in model.module.modules() if isinstance(m, KMeansLinear)]
    return model.n_params() + sum(m.out_features * m.in_features for m in coded)


def _stored_bytes(model, n: int) -> tuple[int, int, str] | None:
    """(file bytes, tensor data bytes, where) of the model's source when it holds exactly the model's tensors."""
    src = Path(model.source) if model.source is not None else None
    if src is None:
        return None
    if model.gguf is not None and src.is_file():
        ts = [t for t in model.gguf.tensors if t.name != "rope_freqs.weight"]
        if sum(t.n_elements for t in ts) != n:
            return None
        return model.gguf.file_size, sum(t.nbytes for t in ts), f"{src.name} (GGUF)"
    if not src.is_dir():
        return None
    from ..hf import read_safetensors_header
    files = sorted(src.glob("*.safetensors"))
    entries = {}
    for f in files:
        entries.update(read_safetensors_header(f))
    tied = bool(model.config.get("tie_word_embeddings", False))
    state = {k: tuple(v.shape) for k, v in model.module.state_dict().items()
             if not model.spec.is_ignored(k) and not (tied and k == model.spec.output_name)}
    stored = {k: e for k, e in entries.items() if not model.spec.is_ignored(k)}
    if not files or set(stored) != set(state) or any(stored[k].shape != s for k, s in state.items()):
        return None
    from ..hf import DTYPE_SIZES
    data = sum(math.prod(e.shape) * DTYPE_SIZES[e.dtype] for e in stored.values())
    dtypes = "/".join(sorted({e.dtype for e in stored.values()}))
    return sum(f.stat().st_size for f in files), data, f"{src.name} (safetensors, {dtypes})"


def _context_length(x) -> int | None:
    """The training context of a Model (config) or a GGUF path (metadata), None when it does not say."""
    if isinstance(x, (str, Path)):
        g = read_gguf(x)
        arch = g.get("general.architecture")
        v = g.get(f"{arch}.context_length") if isinstance(arch, str) else None
    else:
        v = x.config.get("max_position_embeddings")
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 else None


def _side(x, n_ctx: int):
    """(runner, size info, bos id or None, tokenizer-or-None) for a Model or a GGUF path."""
    if isinstance(x, (str, Path)):
        g = read_gguf(x)
        bos = g.get("tokenizer.ggml.bos_token_id")
        add_bos = g.get("tokenizer.ggml.add_bos_token")
        if add_bos is None:
            add_bos = g.get("tokenizer.ggml.model") == SPM_TOKENIZER
        return LlamaCppRunner(x, n_ctx), gguf_size_info(x), (int(bos) if add_bos and bos is not None else None), None
    return TorchRunner(x), model_size_info(x), (x.bos_token_id if x.add_bos else None), x.tokenizer


def _tokens(text: str, source: str, tokenizers: list, runners: list) -> TokenText:
    for tok in tokenizers:
        if tok is not None:
            return tokenize(tok, text, source)
    llm = runners[0].llm  # only GGUF files: llama.cpp's own tokenizer
    ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)  # as HF tokenizers do
    return TokenText(torch.tensor(ids, dtype=torch.long), source, "llama.cpp")


def evaluate(model, ref=None, **kwargs) -> dict:
    """Evaluate `model` (a Model or a .gguf path), optionally against `ref`, on the same tokens.

    Returns a dict: ppl, ref_ppl, kld, kld_max, top1_agreement, n_scored_tokens, n_chunks, n_ctx, text
    provenance, size (file bytes, params, bits/weight) and speed (prompt/generation tokens/s) per side.
    Keyword arguments are those of `evaluate_many`.
    """
    return evaluate_many([model], ref, **kwargs)[0]


def evaluate_many(models: list, ref=None, *, text: str | None = None, text_path: str | Path | None = None,
                  n_ctx: int = 512, max_chunks: int | None = 16, speed: bool = True, n_gen: int = 32,
                  progress: bool = True) -> list[dict]:
    """Evaluate several models against one reference in one pass (reference logits computed once)."""
    if n_ctx < 16 or n_ctx % 2:
        raise ConfigError(f"--ctx must be an even number >= 16, got {n_ctx}")
    if max_chunks is not None and max_chunks < 1:
        raise ConfigError(f"--chunks must be >= 1 (or 0 for all), got {max_chunks}")
    if text is None:
        text, source = read_text(text_path, "eval", "--text")
    else:
        source = "text given in memory"
    for m in models + ([ref] if ref is not None else []):      # before any runtime allocates a KV cache
        limit = _context_length(m)
        if limit is not None and n_ctx > limit:
            where = m if isinstance(m, (str, Path)) else (m.source or "the model")
            raise ConfigError(f"--ctx {n_ctx} is beyond the context length of {where} ({limit} tokens); give a "
                              f"smaller --ctx")
    sides = []
    try:
        for m in models + ([ref] if ref is not None else []):
            sides.append(_side(m, n_ctx))
        runners = [s[0] for s in sides]
        ref_runner = runners[-1] if ref is not None else None
        for r in runners:
            if r.n_vocab != runners[-1].n_vocab:
                raise ConfigError(f"vocab sizes differ ({r.n_vocab} vs {runners[-1].n_vocab}); the models "
                                  f"cannot be compared token by token")
        tt = _tokens(text, source, [s[3] for s in reversed(sides)], runners)
        chunks = make_chunks(tt.tokens, n_ctx, sides[-1][2], max_chunks,
                             what=f"--text {text_path}" if text_path is not None else "the evaluation text")
        scores, (pos, tgt) = [Scores() for _ in models], scored_slice(n_ctx)
        t0 = time.perf_counter()
        for chunk in tqdm(chunks, desc="evaluating", unit="chunk", disable=not progress, leave=False):
            ref_logits = ref_runner.logits(chunk, pos) if ref_runner is not None else None
            for r, sc in zip(runners[: len(models)], scores, strict=True):
                sc.add(r.logits(chunk, pos), chunk[tgt], ref_logits)
        seconds = time.perf_counter() - t0
        plen = min(256, n_ctx // 2)
        prompt, n_gen = chunks[0][:plen], min(n_gen, n_ctx - plen)
        ref_info = None
        if ref_runner is not None:
            ref_info = {"runtime": ref_runner.name, **sides[-1][1]}
            if speed:
                ref_info["speed"] = ref_runner.speed(prompt, n_gen)
        results = []
        for r, sc, side in zip(runners[: len(models)], scores, sides[: len(models)], strict=True):
            out = sc.result()
            out.update(n_chunks=int(chunks.shape[0]), n_ctx=n_ctx, text=tt.source, tokenizer=tt.tokenizer,
                       eval_seconds=seconds, model={"runtime": r.name, **side[1]}, ref=ref_info)
            if speed:
                out["model"]["speed"] = r.speed(prompt, n_gen)
            results.append(out)
        return results
    finally:
        for s in sides:
            s[0].close()
