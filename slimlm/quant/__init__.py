"""Quantization kernels: tensors in, bytes or tensors out (no modules, files or printing)."""
from gguf import GGMLQuantizationType as T

from .kquants import quantize_q4_k, quantize_q5_k, quantize_q6_k
from .legacy import quantize_q4_0, quantize_q4_1, quantize_q5_0, quantize_q5_1

# encoders by GGML type: f(W (rows, cols) float32, importance (cols,) | None) -> uint8 (rows, bytes_per_row).
# Types not listed (Q8_0) use gguf-py's reference encoder; llama.cpp has no weighted variant for them either.
ENCODERS = {T.Q4_K: quantize_q4_k, T.Q5_K: quantize_q5_k, T.Q6_K: quantize_q6_k,
            T.Q4_0: quantize_q4_0, T.Q4_1: quantize_q4_1, T.Q5_0: quantize_q5_0, T.Q5_1: quantize_q5_1}

__all__ = ["ENCODERS"]
