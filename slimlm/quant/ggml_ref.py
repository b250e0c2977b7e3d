"""llama.cpp's own encoders, called through ctypes: the reference our encoders are tested against.

`ggml_quantize_chunk(type, src, dst, start_row, n_rows, n_per_row, imatrix)` is exported by the
`libggml-base` shared library that llama-cpp-python installs. This is what llama-quantize calls per tensor,
importance matrix included. Used by tests and benchmarks only; slimlm's encoders never depend on it.
"""
from __future__ import annotations

import ctypes
import importlib.util
from functools import cache
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import MissingDependencyError


@cache
def _lib() -> ctypes.CDLL:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise MissingDependencyError("llama.cpp's reference encoders need llama-cpp-python: "
                                     "pip install 'slimlm[llama]'")
    libdir = Path(spec.origin).parent / "lib"
    cands = sorted(libdir.glob("libggml-base.*"))
    if not cands:
        raise MissingDependencyError(f"libggml-base not found in {libdir}")
    lib = ctypes.CDLL(str(cands[0]))
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    return lib


def ggml_quantize(x: np.ndarray, qtype: GGMLQuantizationType, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Encode float32 rows (n_rows, n_per_row) with llama.cpp; returns uint8 (n_rows, bytes_per_row).

    `imatrix` is the per-column importance (n_per_row,), as llama-quantize passes it."""
    lib = _lib()
    x = np.ascontiguousarray(x, dtype=np.float32)
    n_rows, n_per_row = x.shape
    block, type_size = GGML_QUANT_SIZES[qtype]
    out = np.zeros((n_rows, n_per_row // block * type_size), dtype=np.uint8)
    qw = None
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
        assert imatrix.shape == (n_per_row,)
        qw = imatrix.ctypes.data
    lib.ggml_quantize_init(int(qtype))
    n = lib.ggml_quantize_chunk(int(qtype), x.ctypes.data, out.ctypes.data, 0, n_rows, n_per_row, qw)
    assert n == out.nbytes, (n, out.nbytes)
    return out
