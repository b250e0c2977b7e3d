"""The tensor formats slimlm writes, as a data table mirroring llama.cpp's GGML types.

`FORMATS` maps a lower-case name to a `QuantFormat`; `get_format()` accepts any case and lists the valid
names when the lookup fails. Which encoder serves a format is recorded here: gguf-py's for float types
and Q8_0; slimlm's for K-quants, IQ4_NL/IQ4_XS and the legacy 4/5-bit types (which hand over to gguf-py's
bit-exact reference encoder when no importance matrix is given). File types belong to presets (`presets.py`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .errors import ConfigError

T = GGMLQuantizationType


@dataclass(frozen=True)
class QuantFormat:
    name: str                   # llama.cpp's name, e.g. "Q4_0"
    ggml_type: GGMLQuantizationType

    @property
    def encoder(self) -> str:
        """"slimlm" where slimlm has its own encoder (quant.ENCODERS), else "gguf-py"."""
        from .quant import ENCODERS
        return "slimlm" if self.ggml_type in ENCODERS else "gguf-py"

    @property
    def block_size(self) -> int:
        return GGML_QUANT_SIZES[self.ggml_type][0]

    @property
    def type_size(self) -> int:
        return GGML_QUANT_SIZES[self.ggml_type][1]

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.type_size / self.block_size

    @property
    def is_float(self) -> bool:
        return self.ggml_type in (T.F32, T.F16, T.BF16)

    @property
    def fp16_fields(self) -> tuple[int, ...]:
        """Byte offsets of the fp16 scale fields inside one block: the only place a block type can hold a
        NaN/Inf (its other fields are small integers)."""
        return _FP16_FIELDS[self.ggml_type]

    def nbytes(self, shape: tuple[int, ...]) -> int:
        return int(np.prod(shape)) // self.block_size * self.type_size

    def fits(self, row_length: int) -> bool:
        return row_length % self.block_size == 0


# ggml-common.h block layouts: where each block type keeps its fp16 scales (d, dmin / m)
_FP16_FIELDS = {T.Q8_0: (0,), T.Q4_0: (0,), T.Q5_0: (0,), T.Q4_1: (0, 2), T.Q5_1: (0, 2), T.Q2_K: (80, 82),
                T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,), T.IQ4_NL: (0,), T.IQ4_XS: (0,),
                T.F32: (), T.F16: (), T.BF16: ()}

# keep in sync with ggml_type in ggml.h and GGML_QUANT_SIZES in gguf-py
FORMATS: dict[str, QuantFormat] = {f.name.lower(): f for f in [
    QuantFormat("F32", T.F32),
    QuantFormat("F16", T.F16),
    QuantFormat("BF16", T.BF16),
    QuantFormat("Q8_0", T.Q8_0),
    QuantFormat("Q5_1", T.Q5_1),
    QuantFormat("Q5_0", T.Q5_0),
    QuantFormat("Q4_1", T.Q4_1),
    QuantFormat("Q4_0", T.Q4_0),
    QuantFormat("Q6_K", T.Q6_K),
    QuantFormat("Q5_K", T.Q5_K),
    QuantFormat("Q4_K", T.Q4_K),
    QuantFormat("Q3_K", T.Q3_K),
    QuantFormat("Q2_K", T.Q2_K),
    QuantFormat("IQ4_NL", T.IQ4_NL),
    QuantFormat("IQ4_XS", T.IQ4_XS),
]}
BY_GGML_TYPE = {f.ggml_type: f for f in FORMATS.values()}

# When a row length does not fit a format's block, use the first of these that fits (reported); mirrors
# llama.cpp's tensor_type_fallback() in src/llama-quant.cpp (keep in sync): K-quants fall back to the legacy
# type of similar size, and anything that still does not fit becomes F16.
FALLBACKS: dict[str, tuple[str, ...]] = {
    "q8_0": ("f16",), "q5_1": ("f16",), "q5_0": ("f16",), "q4_1": ("f16",), "q4_0": ("f16",),
    "q6_k": ("q8_0", "f16"), "q5_k": ("q5_1", "f16"), "q4_k": ("q5_0", "f16"),
    "q3_k": ("q4_0", "f16"), "q2_k": ("q4_0", "f16"), "iq4_xs": ("iq4_nl", "f16"), "iq4_nl": ("f16",),
    "bf16": (), "f16": (), "f32": (),
}


def get_format(name: str) -> QuantFormat:
    f = FORMATS.get(str(name).lower())
    if f is None:
        raise ConfigError(f"unknown type {name!r}; valid types: {', '.join(x.name for x in FORMATS.values())}")
    return f


def fallback_for(fmt: QuantFormat, row_length: int) -> QuantFormat:
    """The format actually used for a row length `fmt` cannot take (F32 as the last resort)."""
    if fmt.fits(row_length):
        return fmt
    for name in FALLBACKS.get(fmt.name.lower(), ()):
        if FORMATS[name].fits(row_length):
            return FORMATS[name]
    return FORMATS["f32"]
