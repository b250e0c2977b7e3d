"""Models bigger than RAM: weights that stay on disk until a pass needs them, one decoder layer at a time.

A streamed model (`load(..., stream=True)`) is the transformers module with its matrices on torch's meta device
(shapes, no memory: accelerate's `init_empty_weights`), its vectors (norms, biases) and buffers (rotary tables) in
memory, and `Model.weights`, an index of the HF folder's safetensors tensors. A pass asks for one part at a time
(`onload(model, layer, prefix)`): its matrices are read as float32, used, and put back on the meta device, so the
peak is one layer plus the activations, whatever the model's size. Each read opens the file, copies the tensors out
and closes it again: a memory map left open keeps every page it touched in the process's resident set.

In-memory models go through the same calls (`onload` hands back the module itself, or a copy of it when the pass
changes weights), so the streamed and the in-memory path run the same arithmetic and write the same bytes
(tests/test_stream.py).
"""
from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from .errors import InvalidModelError, NumericsError

STREAM_MODES = ("auto", "on", "off")
# a whole-model pass holds the float32 model and about as much again (copies, activations, encoded output)
_IN_MEMORY_FACTOR = 2.0
# rows of a big tensor (embedding, output projection) read, converted and encoded at a time
ROWS_PER_READ = 4096


class SafetensorsWeights:
    """Tensor name -> its safetensors file, for an HF folder's (sharded) checkpoint; `read` gives float32 copies."""

    def __init__(self, files: Iterable[Path]):
        self.where: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.stored: dict[str, str] = {}     # name -> its name inside the file, where they differ (renamed())
        self.add(files)

    def add(self, files: Iterable[Path]) -> None:
        """Index more files; a tensor they hold replaces the one of that name indexed before."""
        from safetensors import safe_open
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    self.where[k] = Path(f)
                    self.shapes[k] = tuple(st.get_slice(k).get_shape())
                    self.stored.pop(k, None)

    def renamed(self, names: dict[str, str]) -> SafetensorsWeights:
        """A new index holding the tensors `names` maps to (new name -> name here): a model whose layers were
        dropped reads its layer i from the original's layer it was."""
        out = SafetensorsWeights(())
        for new, old in names.items():
            out.where[new], out.shapes[new] = self.where[old], self.shapes[old]
            if self.stored.get(old, old) != new:
                out.stored[new] = self.stored.get(old, old)
        return out

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """name -> float32 tensor (owned memory), each file opened once and closed after; NaN/Inf is an error."""
        from safetensors import safe_open
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.where[n], []).append(n)
        out = {}
        for f, ns in by_file.items():
            with safe_open(str(f), framework="pt") as st:
                for n in ns:
                    out[n] = _float(n, st.get_tensor(self.stored.get(n, n)))
        return out

    def read_rows(self, name: str, lo: int, hi: int) -> torch.Tensor:
        """Rows lo:hi of a tensor as float32: the rest of the tensor is not read."""
        from safetensors import safe_open
        with safe_open(str(self.where[name]), framework="pt") as st:
            return _float(name, st.get_slice(self.stored.get(name, name))[lo:hi], offset=lo)

    def row_slabs(self, name: str, rows: int = ROWS_PER_READ) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, float32 rows) over the tensor, `rows` at a time (each read opens and closes the file)."""
        n = self.shapes[name][0]
        for lo in range(0, n, rows):
            yield lo, self.read_rows(name, lo, min(n, lo + rows))


class SpilledArrays:
    """A dict of numpy arrays kept in a folder, one .npy file per entry, read back on access (never unpickled):
    what a streamed pass produces for every layer (GPTQ's codes) waits on disk for the writer, not in memory."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.files: dict[str, Path] = {}

    def __setitem__(self, name: str, value: np.ndarray) -> None:
        f = self.folder / f"{len(self.files)}.npy"
        np.save(f, np.ascontiguousarray(value), allow_pickle=False)
        self.files[name] = f

    def __getitem__(self, name: str) -> np.ndarray:
        return np.load(self.files[name], allow_pickle=False)

    def __contains__(self, name: object) -> bool:
        return name in self.files

    def __len__(self) -> int:
        return len(self.files)

    def __iter__(self):
        return iter(self.files)

    def keys(self):
        return self.files.keys()


def _float(name: str, t: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """A float32 copy of a tensor read from a checkpoint (owned memory); NaN/Inf is an error naming the index."""
    t = t.clone() if t.dtype == torch.float32 else t.float()
    if not torch.isfinite(t).all():
        idx = tuple(int(i) for i in (~torch.isfinite(t)).nonzero()[0])
        raise NumericsError(f"weight {name} has a non-finite value {t[idx].item()} at index "
                            f"{(idx[0] + offset, *idx[1:]) if idx else idx}")
    return t


def _libc():
    import ctypes
    import ctypes.util
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def return_freed_memory() -> None:
    """Ask glibc to give freed blocks of 1 MiB and more back to the system at once (mmap'd, not kept in the heap):
    a streamed pass allocates and frees a layer's worth of tensors per layer, and a heap that keeps them grows the
    resident set by the largest layer's worth of fragments. No effect where the C library is not glibc."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 1 << 20)
        libc.mallopt(m_trim_threshold, 1 << 20)


def trim_heap() -> None:
    """Give the memory freed inside glibc's heaps (every thread's arena) back to the system: measured here, a
    streamed layer pass leaves 0.3-0.5 GiB of freed small blocks resident until this runs."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def streamed(model) -> bool:
    """Whether `model`'s matrices stay on disk (read layer by layer)."""
    return getattr(model, "weights", None) is not None


def source_name(model, hf_name: str) -> str:
    """The checkpoint tensor holding module weight `hf_name` (a tied output projection reads the embedding)."""
    if hf_name not in model.weights and hf_name == model.spec.output_name:
        return model.spec.embed_name
    return hf_name


def _set_param(root: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(owner) if owner else root, leaf, torch.nn.Parameter(value, requires_grad=False))


def read_weight(model, hf_name: str) -> torch.Tensor:
    """One module weight by HF name, float32: from disk for a streamed model, else the module's own tensor."""
    if streamed(model):
        p = model.module.get_parameter(hf_name)
        if not p.is_meta:
            return p.data
        src = source_name(model, hf_name)
        return model.weights.read([src])[src]
    return model.module.get_parameter(hf_name).data


def weight_row_slabs(model, hf_name: str, rows: int = ROWS_PER_READ) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, float32 rows) of module weight `hf_name`, `rows` at a time: read from disk for a streamed model's
    matrix (never whole in memory), views of the module's tensor otherwise."""
    p = model.module.get_parameter(hf_name)
    if streamed(model) and p.is_meta:
        yield from model.weights.row_slabs(source_name(model, hf_name), rows)
        return
    for lo in range(0, p.shape[0], rows):
        yield lo, p.data[lo:lo + rows]


@contextlib.contextmanager
def embedding_rows(model, emb: torch.nn.Module, ids: torch.Tensor) -> Iterator[torch.Tensor]:
    """For a pass that only looks tokens `ids` up: the embedding module holding just their rows (read from disk
    a slab at a time), and `ids` renumbered into them. An in-memory model's embedding and `ids` as they are."""
    if not streamed(model):
        yield ids
        return
    name = model.spec.embed_name
    used, local = torch.unique(ids, return_inverse=True)         # used: sorted
    rows = torch.empty(len(used), model.weights.shapes[name][1])
    for lo, slab in model.weights.row_slabs(name):
        sel = (used >= lo) & (used < lo + slab.shape[0])
        if sel.any():
            rows[sel] = slab[used[sel] - lo]
    param, pad = emb.weight, emb.padding_idx          # (padding_idx only shapes gradients; it may lie beyond)
    emb.weight, emb.padding_idx = torch.nn.Parameter(rows, requires_grad=False), None
    try:
        yield local.reshape(ids.shape)
    finally:
        emb.weight, emb.padding_idx = param, pad


@contextlib.contextmanager
def onload(model, module: torch.nn.Module, prefix: str, *, copy_weights: bool = False) -> Iterator[torch.nn.Module]:
    """`module` (the submodule of model.module at `prefix`, e.g. "model.layers.3.") with every weight in memory
    as float32. For a streamed model its matrices are read from disk and put back on the meta device on exit;
    with `copy_weights` (the caller changes weights) its in-memory vectors are copies and are restored on exit.
    For an in-memory model: the module itself, or a deep copy with `copy_weights`."""
    if not streamed(model):
        yield copy.deepcopy(module) if copy_weights else module
        return
    params = dict(module.named_parameters(remove_duplicate=False))
    meta = {n: p for n, p in params.items() if p.is_meta}
    kept = {n: p for n, p in params.items() if not p.is_meta} if copy_weights else {}
    srcs = {n: source_name(model, prefix + n) for n in meta}
    values = model.weights.read(set(srcs.values()))
    try:
        for n in meta:
            _set_param(module, n, values[srcs[n]])
        for n, p in kept.items():
            _set_param(module, n, p.data.clone())
        yield module
    finally:
        for n, p in {**meta, **kept}.items():
            owner, _, leaf = n.rpartition(".")
            setattr(module.get_submodule(owner) if owner else module, leaf, p)
        del values
        trim_heap()


def available_memory() -> int | None:
    """Bytes of memory available now: SLIMLM_MEMORY when set (tests, containers whose limit /proc does not show),
    else MemAvailable from /proc/meminfo; None where neither says."""
    env = os.environ.get("SLIMLM_MEMORY")
    if env:
        return int(env)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def should_stream(mode: str, fp32: int) -> bool:
    """--stream auto|on|off: auto streams when the float32 model and its working copies would not fit the memory
    available now (`available_memory`)."""
    if mode not in STREAM_MODES:
        raise ValueError(mode)
    if mode != "auto":
        return mode == "on"
    avail = available_memory()
    return avail is not None and _IN_MEMORY_FACTOR * fp32 > avail


def decide_stream(mode: str, model, info, check_streamable) -> bool:
    """--stream auto|on|off against the source (`model`: its path, `info`: source.source_info's): `on` needs an HF
    folder; `auto` streams an HF folder whose float32 weights and working copies would not fit the memory
    available, and then refuses through `check_streamable(why)` (with the memory it would need) the steps that
    cannot stream, before any weight is read."""
    from .errors import ConfigError
    hf_dir = model is not None and Path(model).is_dir()
    if mode == "on" and not hf_dir:
        raise ConfigError(f"--stream on reads an HF folder's safetensors one layer at a time; {info.path} is a "
                          f"GGUF file, loaded whole (give --stream off)")
    if not hf_dir:
        return False
    need = 4 * info.n_params
    stream = should_stream(mode, need)
    if stream and mode == "auto":
        avail = available_memory()
        check_streamable(f"the model takes {need / 2**30:.2f} GiB in float32 (about twice that to work on whole) "
                         f"and {(avail or 0) / 2**30:.2f} GiB are available, so")
    return stream


def refuse_unstreamable(why: str, steps: list[tuple[bool, str]]) -> None:
    """steps: (asked for, its name) of what needs the whole model in memory; those asked for are refused (a streamed
    model), `why` saying why the model is streamed."""
    from .errors import ConfigError
    bad = [name for on, name in steps if on]
    if bad:
        raise ConfigError(f"{why}, slimlm reads the model one layer at a time, and {', '.join(bad)} "
                          f"need{'s' if len(bad) == 1 else ''} the whole model in memory: give --no-eval and "
                          f"no {', '.join(b for b in bad if b.startswith('--')) or 'such step'}, or --stream off "
                          f"on a machine with the memory")


def peak_rss() -> int:
    """This process's peak resident set so far, in bytes (Linux reports ru_maxrss in KiB)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def empty_module(config):
    """The *ForCausalLM of `config` with its parameters on the meta device and its buffers computed in memory."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    with init_empty_weights(include_buffers=False):
        module = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if getattr(config, "tie_word_embeddings", False):
        module.tie_weights()
    return module


def load_vectors(module: torch.nn.Module, weights: SafetensorsWeights, d: Path, tied_output: str | None) -> None:
    """Every parameter of the meta module checked against the checkpoint (name and shape), and its vectors
    (norms, biases) read into memory; the matrices stay on disk."""
    missing, wrong, vectors = [], [], []
    for n, p in module.named_parameters(remove_duplicate=False):
        if n == tied_output:
            continue
        if n not in weights:
            missing.append(n)
        elif weights.shapes[n] != tuple(p.shape):
            wrong.append(f"{n} {list(weights.shapes[n])} (config says {list(p.shape)})")
        elif p.ndim < 2:
            vectors.append(n)
    if missing or wrong:
        bad = missing + wrong
        raise InvalidModelError(f"{d}: config.json describes a model with weights the checkpoint does not hold or "
                                f"holds in another shape: {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}")
    for n, t in weights.read(vectors).items():
        _set_param(module, n, t)
