"""Quantization kernels: tensors in, bytes or tensors out (no modules, files or printing)."""
from gguf import GGMLQuantizationType as T

from .kquants import quantize_q4_k, quantize_q5_k, quantize_q6_k

# slimlm's own encoders by GGML type: f(W (rows, cols) float32, imatrix (cols,) | None) -> uint8 bytes
ENCODERS = {T.Q4_K: quantize_q4_k, T.Q5_K: quantize_q5_k, T.Q6_K: quantize_q6_k}

__all__ = ["ENCODERS", "quantize_q4_k", "quantize_q5_k", "quantize_q6_k"]
