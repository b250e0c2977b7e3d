"""Size-budgeted mixed precision: per-tensor types that minimize the predicted KL divergence within a budget.

The sensitivity table (sensitivity.py) gives, for every 2-D tensor and every block type its rows fit, the
bytes and the predicted dKLD. Predicted losses add over tensors (second order, cross terms neglected), so
the choice is a multiple-choice knapsack. `allocate` solves its Lagrangian relaxation exactly (per tensor,
the type minimizing loss + lambda * bytes, lambda found by bisection to fit the budget: optimal on each
tensor's lower convex hull) and then spends what is left greedily on the upgrades with the best loss
reduction per byte that still fit. The budget is a whole-file size (`--target-size`, measured exactly with
the file's header and alignment) or bits per weight over all parameters (`--bpw`, as llama.cpp reports it).

The smallest reachable size follows from the shapes alone (`smallest_bytes`: every 2-D tensor at its smallest
candidate type that fits its rows, everything else F32), so an impossible budget is refused before any
calibration (`check_reachable`).
"""
from __future__ import annotations

import math
import re

from .errors import ConfigError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
          "K": 2**10, "M": 2**20, "G": 2**30}


def parse_size(text: str) -> int:
    """'70MB' (10^6), '70MiB' or '70M' (2^20), '73400320' (bytes) -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise ConfigError(f"--target-size {text!r}: give a number with an optional unit "
                          f"(B, KB, MB, GB = powers of 10; KiB, MiB, GiB or K, M, G = powers of 2), e.g. 70MB")
    n = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if n <= 0:
        raise ConfigError(f"--target-size {text!r} must be positive")
    return n


def smallest_bytes(shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """name -> the fewest bytes a budget can give the tensor: a 2-D tensor its smallest candidate type whose
    blocks fit its row length (F16 when none does), any other tensor F32 (norms are never quantized)."""
    from .formats import get_format
    from .sensitivity import CANDIDATES
    out = {}
    for name, shape in shapes.items():
        n = 1
        for d in shape:
            n *= int(d)
        if len(shape) == 2:
            fits = [f.nbytes(tuple(shape)) for f in map(get_format, CANDIDATES) if f.fits(shape[1])]
            out[name] = min(fits) if fits else 2 * n
        else:
            out[name] = 4 * n
    return out


def check_reachable(shapes: dict[str, tuple[int, ...]], *, target: int | None = None, bpw: float | None = None,
                    header: int | None = None, what: str = "this model") -> None:
    """ConfigError when the budget is below the smallest size `shapes` can reach. `header`: the exact bytes of
    the file's header and metadata (padded), when known; without it only the tensor data is counted (a lower
    bound, checked before the model is loaded)."""
    small = smallest_bytes(shapes)
    quant = sum(_pad(b) for n, b in small.items() if len(shapes[n]) == 2)
    fixed = sum(b for n, b in small.items() if len(shapes[n]) != 2)
    n_params = sum(b // 4 for n, b in small.items() if len(shapes[n]) != 2)
    n_params += sum(int(shapes[n][0]) * int(shapes[n][1]) for n in small if len(shapes[n]) == 2)
    rule = "every 2-D tensor at its smallest type that fits its rows, the rest F32"
    if bpw is not None:
        least = 8 * (quant + fixed) / max(n_params, 1)
        if int(bpw * n_params / 8) - fixed < quant:
            raise ConfigError(f"--bpw {bpw:g} is below the smallest {what} can reach: {least:.4f} bits/weight "
                              f"({rule}); give --bpw {math.ceil(least * 1000) / 1000:.3f} or more")
    if target is not None:
        data = quant + sum(_pad(b) for n, b in small.items() if len(shapes[n]) != 2)
        least = data + (header or 0)
        if target < least:
            size = (f"{least} bytes ({least / 2**20:.2f} MiB)" if header is not None else
                    f"more than {least} bytes ({least / 2**20:.2f} MiB: its tensors alone, before the header)")
            raise ConfigError(f"--target-size {target} bytes is below the smallest file {what} can reach: {size} "
                              f"({rule})")


def _pad(n: int, align: int = 32) -> int:
    return (n + align - 1) // align * align


def allocate(table: dict[str, dict[str, tuple[int, float]]], budget: int) -> tuple[dict[str, str], float, int]:
    """table: name -> type -> (bytes, predicted loss). Returns (name -> type, predicted total loss, bytes used,
    each tensor's bytes padded to GGUF's 32-byte alignment) with bytes used <= budget. ConfigError when even
    the smallest type of every tensor does not fit."""
    names = list(table)
    opts = {n: sorted(((_pad(b), loss, t) for t, (b, loss) in table[n].items()), key=lambda o: (o[0], o[1]))
            for n in names}
    smallest = sum(min(o[0] for o in opts[n]) for n in names)
    if smallest > budget:
        raise ConfigError(f"the budget leaves {budget / 2**20:.2f} MiB for the weights, but their smallest types "
                          f"take {smallest / 2**20:.2f} MiB: give a larger size")

    def pick(lam: float) -> dict[str, tuple]:
        return {n: min(opts[n], key=lambda o: (o[1] + lam * o[0], o[0])) for n in names}

    def used(ch) -> int:
        return sum(o[0] for o in ch.values())

    lo, hi = 0.0, 1.0
    while used(pick(hi)) > budget:
        hi *= 4
    if used(pick(lo)) <= budget:
        hi = lo
    for _ in range(100):
        mid = (lo + hi) / 2
        if used(pick(mid)) > budget:
            lo = mid
        else:
            hi = mid
    choice = pick(hi)
    left = budget - used(choice)
    while True:                      # spend the rest: best loss reduction per byte that still fits
        best = None
        for n in names:
            b0, l0, _ = choice[n]
            for o in opts[n]:
                db, dl = o[0] - b0, l0 - o[1]
                if 0 < db <= left and dl > 0 and (best is None or dl / db > best[0]):
                    best = (dl / db, n, o)
        if best is None:
            break
        _, n, o = best
        left -= o[0] - choice[n][0]
        choice[n] = o
    return {n: o[2] for n, o in choice.items()}, sum(o[1] for o in choice.values()), used(choice)
