#!/usr/bin/env python3
"""The fused LM head's per-chunk kernels, eager against compiled (losses.CHUNK_KERNELS), at SmolLM2's shapes.

What a --compile training run (the 30-minute healing row of bench/heal.py) uses on its two hot paths:
- the student's loss: head_kl_topk, forward and backward (the LM head's matmuls, the top-k KL and its gradient);
- the teacher's targets: head_topk_targets (the LM head's matmul, top-k, logsumexp), the top-k cache's build.
Both under bf16 autocast where the CPU is fast at it (fp32 elsewhere), on random hidden states and SmolLM2's tied
head shape (vocab 49,152 x hidden 576), `--rows` sequences of 256 positions per call (8: the 30-minute row's
micro-batch and the cache's 2,048 tokens per teacher forward). Prints milliseconds per call and tokens/s of each,
and the compiled/eager ratio; the first (compiling) calls are timed apart.

    python bench/heal_kernels.py [--rows 8] [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from foundation import RESULTS, machine  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=8, help="256-token sequences per call (default 8)")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls of each (after two untimed ones)")
    a = ap.parse_args()
    import torch

    from slimlm.train.dist import fast_bf16
    from slimlm.train.losses import head_kl_topk, head_topk_targets

    mach = machine()
    bf16 = fast_bf16(torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    W = torch.randn(49152, 576, generator=g) * 0.05
    h_teacher = torch.randn(a.rows, 256, 576, generator=g)
    idx, lt = head_topk_targets(h_teacher, W, 256)
    n_tok = a.rows * 256

    def timed(f) -> float:
        f()
        f()
        t = time.perf_counter()
        for _ in range(a.repeats):
            f()
        return (time.perf_counter() - t) / a.repeats

    res = {}
    for compiled in (False, True):
        h = torch.randn(a.rows, 256, 576, generator=g, requires_grad=True)

        def loss_step(h=h, compiled=compiled):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = head_kl_topk(h, W, idx, lt, compiled=compiled)
            loss.backward()

        def targets(compiled=compiled):
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                head_topk_targets(h_teacher, W, 256, compiled=compiled)

        t0 = time.perf_counter()
        loss_step()
        targets()
        first = time.perf_counter() - t0
        name = "compiled" if compiled else "eager"
        res[name] = {"first_calls_s": first, "loss_s": timed(loss_step), "targets_s": timed(targets)}
        r = res[name]
        print(f"{name:>8}: student loss fwd+bwd {r['loss_s'] * 1e3:6.0f} ms ({n_tok / r['loss_s']:7.0f} tok/s)   "
              f"teacher top-k {r['targets_s'] * 1e3:6.0f} ms ({n_tok / r['targets_s']:7.0f} tok/s)   "
              f"first calls {first:.1f} s", flush=True)
    e, c = res["eager"], res["compiled"]
    print(f"compiled / eager time: student loss {c['loss_s'] / e['loss_s']:.2f}x, teacher top-k "
          f"{c['targets_s'] / e['targets_s']:.2f}x ({n_tok} tokens per call, vocab 49,152 x 576, "
          f"{'bf16' if bf16 else 'fp32'}; {mach['cpu']}, {mach['torch_threads']} threads)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "heal-kernels.json").write_text(json.dumps({"rows": a.rows, "bf16": bf16, "results": res,
                                                          "machine": mach}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
