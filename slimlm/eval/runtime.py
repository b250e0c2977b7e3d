"""Runners that give logits and speed for a model: in torch, or a GGUF file in the real llama.cpp runtime.

Both take the same token ids. llama.cpp is driven through llama-cpp-python (the `llama` extra). Speed is
measured by each runtime itself: llama.cpp's own perf counters (`llama_perf_context`: prompt and
generation tokens/s), torch by wall clock around a forward pass and greedy decoding with a KV cache.
Both use the same number of threads (torch's thread count).
"""
from __future__ import annotations

import contextlib
import inspect
import os
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, InvalidModelError, MissingDependencyError


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise MissingDependencyError("running GGUF files needs llama-cpp-python: "
                                     "pip install 'slimlm[llama]'") from None
    return llama_cpp


@contextlib.contextmanager
def _quiet_fd2():
    """llama.cpp prints model-loading logs to fd 2 from C; silence them for the duration."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _kv_cache(out):
    cache = out.get("cache") if hasattr(out, "get") else None
    return cache if cache is not None else out.past_key_values


class TorchRunner:
    name = "torch"

    def __init__(self, model):
        """On the compute device (device.py) when it is not the CPU: the whole module is moved there for the
        evaluation and back in close() (a model with pending changes or streamed from disk stays on the CPU)."""
        from ..device import compute_device
        from ..lazy import streamed
        self.model = model
        dev = compute_device()
        self.dev = dev if dev.type != "cpu" and not model.changes and not streamed(model) else torch.device("cpu")
        if self.dev.type != "cpu":
            model.module.to(self.dev)

    @property
    def n_vocab(self) -> int:
        return int(self.model.config["vocab_size"])

    @torch.no_grad()
    def logits(self, chunk: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        """The logits at every position of `chunk`, or at `rows` (a slice with a start) only."""
        if rows is None:
            return self.model.logits(chunk[None].to(self.dev))[0].cpu()
        start, stop, _ = rows.indices(len(chunk))
        return self.model.logits(chunk[None].to(self.dev), last=len(chunk) - start)[0, : stop - start].cpu()

    @torch.no_grad()
    def speed(self, prompt: torch.Tensor, n_gen: int) -> dict:
        m = self.model.module
        # transformers >= 5.x names the KV cache argument `cache`; older versions `past_key_values`
        kv = "cache" if "cache" in inspect.signature(m.forward).parameters else "past_key_values"
        prompt = prompt.to(self.dev)
        m(input_ids=prompt[None, :8], use_cache=False)  # warm-up
        t0 = time.perf_counter()
        out = m(input_ids=prompt[None], use_cache=True)
        self._sync()
        t_prompt = time.perf_counter() - t0
        past, tok = _kv_cache(out), out.logits[0, -1].argmax()
        t0 = time.perf_counter()
        for _ in range(n_gen):
            out = m(input_ids=tok.view(1, 1), use_cache=True, **{kv: past})
            past, tok = _kv_cache(out), out.logits[0, -1].argmax()
        self._sync()
        t_gen = time.perf_counter() - t0
        return {"prompt_tps": prompt.numel() / t_prompt, "gen_tps": n_gen / t_gen,
                "threads": torch.get_num_threads()}

    def _sync(self) -> None:
        if self.dev.type == "cuda":          # kernels run asynchronously: time them once they are done
            torch.cuda.synchronize(self.dev)

    def close(self) -> None:
        if self.dev.type != "cpu":
            self.model.module.to("cpu")


def gpu_offload(lc) -> bool:
    """Whether llama.cpp runs on the GPU here: the compute device is a GPU and llama-cpp-python has offload."""
    from ..device import compute_device
    if compute_device().type == "cpu":
        return False
    try:
        return bool(lc.llama_supports_gpu_offload())
    except AttributeError:
        return False


class LlamaCppRunner:
    name = "llama.cpp"

    def __init__(self, path: str | Path, n_ctx: int, *, logits_all: bool = True):
        """Every layer offloaded to the GPU when the compute device (device.py) is one and the installed
        llama-cpp-python was built with GPU offload; else on the CPU's threads."""
        lc = _llama_cpp()
        self._lc, self.path = lc, path
        self.gpu_layers = -1 if gpu_offload(lc) else 0
        try:
            with _quiet_fd2():
                self.llm = lc.Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=logits_all,
                                    n_threads=torch.get_num_threads(), n_threads_batch=torch.get_num_threads(),
                                    n_gpu_layers=self.gpu_layers, verbose=False)
        except (ValueError, RuntimeError) as e:      # llama-cpp-python's "Failed to load model from file"
            raise InvalidModelError(f"{path}: llama.cpp cannot load this file ({e}); is it a model GGUF of an "
                                    f"architecture llama.cpp supports?") from None
        self.n_ctx = n_ctx

    @property
    def n_vocab(self) -> int:
        return int(self.llm.n_vocab())

    def logits(self, chunk: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        """The logits at every position of `chunk`, or at `rows` only: then llama.cpp computes the output layer for
        those positions alone (the batch's logits flags) and they are copied once."""
        ids = [int(t) for t in chunk]
        llm = self.llm
        if rows is None:
            llm.reset()
            llm.eval(ids)
            return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
        keep = range(len(ids))[rows]                   # one batch: n_batch is the context size (__init__)
        llm.reset()
        llm._ctx.kv_cache_seq_rm(-1, 0, -1)            # as llama-cpp-python's eval() starts
        batch = llm._batch
        batch.set_batch(ids, 0, False)
        for i in range(len(ids)):
            batch.batch.logits[i] = i in keep
        llm._ctx.decode(batch)
        llm.input_ids[: len(ids)] = ids
        llm.n_tokens = len(ids)
        out = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(len(keep), self.n_vocab))
        return torch.from_numpy(out.copy())

    def _last_logits(self) -> np.ndarray:
        ptr = self._lc.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def speed(self, prompt: torch.Tensor, n_gen: int) -> dict:
        lc, ctx = self._lc, self.llm.ctx
        # warm-up with the whole prompt: a decode that needs more logits rows than any before it grows llama.cpp's
        # output buffer, and the perf counters then record a prompt time of ~0 (a fresh context, or one that had
        # computed only the scored rows of chunks, gave 10^6 prompt tok/s after an 8-token warm-up)
        self.llm.reset()
        self.llm.eval([int(t) for t in prompt])
        self.llm.reset()
        lc.llama_perf_context_reset(ctx)
        self.llm.eval([int(t) for t in prompt])
        for _ in range(n_gen):
            self.llm.eval([int(self._last_logits().argmax())])
        p = lc.llama_perf_context(ctx)
        return {"prompt_tps": 1e3 * p.n_p_eval / max(p.t_p_eval_ms, 1e-9),
                "gen_tps": 1e3 * p.n_eval / max(p.t_eval_ms, 1e-9), "threads": torch.get_num_threads(),
                "gpu_layers": self.gpu_layers}

    def generate(self, prompt: str, max_tokens: int, *, chat: bool = False, temperature: float = 0.0,
                 seed: int = 0) -> str:
        try:
            return self._generate(prompt, max_tokens, chat, temperature, seed)
        except ValueError as e:
            if "exceed context window" in str(e):      # llama-cpp-python's check of the prompt's length
                raise ConfigError(f"the prompt does not fit the context: {e}; give a larger --ctx or a shorter "
                                  f"prompt") from None
            raise

    def _generate(self, prompt: str, max_tokens: int, chat: bool, temperature: float, seed: int) -> str:
        if chat:
            import jinja2
            try:  # llama-cpp-python renders the template in jinja2's ImmutableSandboxedEnvironment
                out = self.llm.create_chat_completion([{"role": "user", "content": prompt}], max_tokens=max_tokens,
                                                      temperature=temperature, seed=seed)
            except jinja2.TemplateError as e:  # SecurityError (an injection attempt), syntax and render errors
                raise InvalidModelError(f"the chat template of {self.path} cannot be rendered in the sandbox "
                                        f"({type(e).__name__}: {e}); it was not run. Generate without --chat, "
                                        f"or fix tokenizer.chat_template") from None
            return out["choices"][0]["message"]["content"]
        out = self.llm.create_completion(prompt, max_tokens=max_tokens, temperature=temperature, seed=seed)
        return out["choices"][0]["text"]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.llm.close()


def llama_cpp_ftype(ftype: str) -> int:
    """llama.cpp's file type constant for a preset name such as "Q4_K_M" (refused when this build lacks it)."""
    lc = _llama_cpp()
    const = f"LLAMA_FTYPE_MOSTLY_{ftype.upper()}" if ftype.upper() not in ("F32",) else "LLAMA_FTYPE_ALL_F32"
    if not hasattr(lc, const):
        raise MissingDependencyError(f"llama.cpp has no file type {ftype!r} ({const})")
    return getattr(lc, const)


def llama_cpp_quantize(src: str | Path, dst: str | Path, ftype: str, *, threads: int | None = None,
                       imatrix=None, prune_layers: list[int] | None = None) -> float:
    """llama.cpp's own quantizer (`llama_model_quantize`, as llama-quantize runs it): the baseline every
    benchmark compares against in the same run. `ftype` is a llama.cpp file type name such as "Q8_0" or
    "Q4_K_M". `prune_layers`: block indices llama.cpp drops (its `--prune-layers`; the rest are renumbered).
    Returns the seconds it took. Writes `dst` through a temp file and rename."""
    import ctypes

    from ..io import atomic_output
    lc = _llama_cpp()
    params = lc.llama_model_quantize_default_params()
    params.ftype = llama_cpp_ftype(ftype)
    params.nthread = threads or torch.get_num_threads()
    keep = []  # the arrays must outlive the call
    if imatrix is not None:
        names = sorted(imatrix.sums)
        arr = (lc.llama_model_imatrix_data * (len(names) + 1))()
        for i, n in enumerate(names):
            v = np.ascontiguousarray(imatrix.importance(n), dtype=np.float32)
            keep += [n.encode(), v]
            arr[i].name, arr[i].data, arr[i].size = keep[-2], v.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), v.size
        params.imatrix = arr
        keep.append(arr)
    if prune_layers:
        layers = (ctypes.c_int32 * (len(prune_layers) + 1))(*sorted(int(i) for i in prune_layers), -1)
        params.prune_layers = layers
        keep.append(layers)
    with atomic_output(dst, overwrite=True, inputs=[src]) as tmp:
        t0 = time.perf_counter()
        with _quiet_fd2():
            rc = lc.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        seconds = time.perf_counter() - t0
        if rc != 0:
            raise MissingDependencyError(f"llama_model_quantize({src} -> {ftype}) failed with code {rc}")
    return seconds
