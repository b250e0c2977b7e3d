#!/usr/bin/env python3
"""Encoder speed: slimlm's block encoders (slimlm.quant.ENCODERS, what export_gguf calls per tensor) against
llama.cpp's own (`ggml_quantize_chunk` through ctypes, slimlm.quant.ggml_ref), both on one thread.

Input: seeded random float32 tensors with the shapes of one SmolLM2-135M decoder layer (q/o 576x576, k/v
192x576, gate/up 1536x576, down 576x1536) x --layers; a type gets the tensors whose rows fit its block (the
256-weight types only ffn_down, as on the real model). Importance matrix: a seeded gamma(0.5, 2) vector per
row length (Q8_0 has no weighted variant: both encoders ignore it). Per type and imatrix on/off: the median
wall time of --repeats runs over all those tensors for each encoder (the two alternate within a round, after
one untimed warm-up round, which also loads numba's cached machine code), their ratio (slimlm / llama.cpp: below 1 is faster), and whether
every output byte agreed. slimlm's kernels run on one numba thread here (numba.set_num_threads(1));
`ggml_quantize_chunk` is single-threaded. In export_gguf slimlm's kernels use every core.

--lloyd also prints what the IQ4_NL Lloyd scale refinement (slimlm/quant/refine.py, used by no command) gains
over llama.cpp's search on the same tensors: the summed weighted error before and after, plain and weighted.

    python bench/encoders.py [--layers 1] [--repeats 5] [--types Q4_K,Q4_0] [--lloyd]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

LAYER = {"attn_q": (576, 576), "attn_k": (192, 576), "attn_v": (192, 576), "attn_output": (576, 576),
         "ffn_gate": (1536, 576), "ffn_up": (1536, 576), "ffn_down": (576, 1536)}


def _median_seconds(encoders, qtype, pairs, repeats: int) -> list[float]:
    """Median wall time of each encoder f(x, qtype, w) over all (x, w) pairs; the encoders alternate within a
    round (so load from other processes hits both alike), after one untimed warm-up round."""
    times: list[list[float]] = [[] for _ in encoders]
    for r in range(repeats + 1):
        for i, enc in (enumerate(encoders) if r % 2 else reversed(list(enumerate(encoders)))):
            t0 = time.perf_counter()
            for x, w in pairs:
                enc(x, qtype, w)
            if r:                                         # round 0 warms up (numba cache load), not timed
                times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def _slimlm(x, qtype, w):
    from slimlm.quant import ENCODERS
    return ENCODERS[qtype](x, w)


def main() -> int:
    import gguf
    import numba

    from slimlm.quant import ENCODERS
    from slimlm.quant.ggml_ref import ggml_quantize
    T = gguf.GGMLQuantizationType

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=1, help="SmolLM2 decoder layers' worth of tensors per type")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per encoder (median)")
    ap.add_argument("--types", default=",".join(t.name for t in ENCODERS), help="comma-separated GGML types")
    ap.add_argument("--lloyd", action="store_true", help="also the IQ4_NL Lloyd refinement's error reduction")
    a = ap.parse_args()
    types = [T[n] for n in a.types.split(",")]
    numba.set_num_threads(1)

    rng = np.random.default_rng(0)
    tensors = [(rng.standard_normal(shape) * 0.02).astype(np.float32)
               for _ in range(a.layers) for shape in LAYER.values()]
    imat = {c: rng.gamma(0.5, 2, c).astype(np.float32) for c in {s[1] for s in LAYER.values()}}

    print(f"{a.layers} SmolLM2-shaped layer(s) of random weights, median of {a.repeats} runs, one thread each "
          f"(numba threads: {numba.get_num_threads()})\n")
    print("| type | imatrix | tensors | weights | slimlm ms | llama.cpp ms | ratio | bytes identical |\n"
          "|---|---|---|---|---|---|---|---|")
    ratios = []
    for qtype in types:
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        xs = [x for x in tensors if x.shape[1] % block == 0]
        for weighted in (False, True):
            pairs = [(x, imat[x.shape[1]] if weighted else None) for x in xs]
            ours, ref = _median_seconds((_slimlm, ggml_quantize), qtype, pairs, a.repeats)
            same = all(np.array_equal(_slimlm(x, qtype, w), ggml_quantize(x, qtype, w)) for x, w in pairs)
            ratios.append(ours / ref)
            print(f"| {qtype.name} | {'yes' if weighted else 'no'} | {len(xs)} | {sum(x.size for x in xs):,} | "
                  f"{1e3 * ours:.1f} | {1e3 * ref:.1f} | {ours / ref:.2f} | {'yes' if same else 'NO'} |", flush=True)
    print(f"\nratio slimlm / llama.cpp: min {min(ratios):.2f}, median {statistics.median(ratios):.2f}, "
          f"max {max(ratios):.2f}")
    if a.lloyd:
        from slimlm.quant.refine import iq4_nl_lloyd
        for weighted in (False, True):
            before = after = 0.0
            for x in tensors:
                w = imat[x.shape[1]] if weighted else None
                st = iq4_nl_lloyd(x, ENCODERS[T.IQ4_NL](x, w), w)[1]
                before, after = before + st["err_before"], after + st["err_after"]
            print(f"IQ4_NL Lloyd refinement, {'with' if weighted else 'without'} imatrix: weighted error "
                  f"{before:.6g} -> {after:.6g} ({100 * (1 - after / before):.3f}% lower)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
