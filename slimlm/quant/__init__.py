"""Quantization kernels: tensors in, bytes or tensors out (no modules, files or printing)."""
from gguf import GGMLQuantizationType as T

from . import kquants as K
from . import legacy as L

# encoders by GGML type: f(W (rows, cols) float32, importance (cols,) | None) -> uint8 (rows, bytes_per_row).
# Float types are converted by numpy; every block type slimlm writes has an encoder here.
ENCODERS = {T.Q2_K: K.quantize_q2_k, T.Q3_K: K.quantize_q3_k, T.Q4_K: K.quantize_q4_k, T.Q5_K: K.quantize_q5_k,
            T.Q6_K: K.quantize_q6_k, T.IQ4_NL: K.quantize_iq4_nl, T.IQ4_XS: K.quantize_iq4_xs,
            T.Q8_0: L.quantize_q8_0, T.Q4_0: L.quantize_q4_0, T.Q4_1: L.quantize_q4_1, T.Q5_0: L.quantize_q5_0,
            T.Q5_1: L.quantize_q5_1}


def dequantize(data, qtype):
    """The decoder twin of every encoder: gguf-py's reference decoders (llama.cpp's dequantize_row_*), which
    the tests use to check our bytes. data: uint8 (rows, bytes_per_row) -> float32 (rows, cols)."""
    import gguf
    return gguf.quants.dequantize(data, qtype)


def warmup() -> None:
    """Compile every encoder's kernels now (numba caches the machine code on disk, so this is paid once
    per installation instead of on the first quantization)."""
    import numpy as np
    x = np.linspace(-1, 1, 2 * 256, dtype=np.float32).reshape(2, 256)
    for encode in ENCODERS.values():
        encode(x, None)
        encode(x, np.ones(256, np.float32))
    import torch

    from .gptq import gptq_gguf
    for qtype in (T.Q4_0, T.IQ4_NL):      # the GPTQ kernel, for uniform and non-uniform level tables
        gptq_gguf(torch.from_numpy(x[:, :32].copy()), torch.eye(32, dtype=torch.float64), qtype)


__all__ = ["ENCODERS", "dequantize", "warmup"]
