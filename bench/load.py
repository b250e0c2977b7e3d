#!/usr/bin/env python3
"""Loading a GGUF, and evaluating it: what slimlm's two shortcuts around the libraries save, in one run.

- load: `slimlm.load(GGUF)` (transformers' `gguf_file=` loader: tokenizer, config, weights) with slimlm's shared
  parse (`slimlm.model.gguf_parsed_once`: one parse on a plain-array view, gguf-py's name map built once) and
  without it (the block replaced by a no-op: transformers parses the file three times through numpy's memmap), in
  alternation, each in a fresh child process (imports included) and again warm in the same process.
- logits: one evaluation chunk of --ctx tokens in llama.cpp (the GGUF) and in torch (the loaded model), every
  position's logits against the scored half's only (`runner.logits(chunk, rows)`), checked bit for bit equal.

    python bench/load.py [GGUF] [--reps 2] [--ctx 512] [--threads N]

GGUF defaults to the embedded SmolLM2-135M-Instruct (Q4_1). Prints seconds and ratios, and a JSON line.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time

CHILD = """
import contextlib, json, sys, time, torch
torch.set_num_threads({threads})
t0 = time.perf_counter()
import slimlm, slimlm.model as sm
if not {shared}:
    sm.gguf_parsed_once = lambda p: contextlib.nullcontext()
t1 = time.perf_counter(); slimlm.load({path!r}, progress=False); t2 = time.perf_counter()
slimlm.load({path!r}, progress=False); t3 = time.perf_counter()
print(json.dumps({{"import": t1 - t0, "first": t2 - t1, "warm": t3 - t2}}))
"""


def timed_loads(path: str, shared: bool, threads: int) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD.format(path=path, shared=shared, threads=threads)],
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def logits_times(path: str, ctx: int, threads: int) -> dict:
    import torch

    import slimlm
    from slimlm.eval.metrics import scored_slice
    from slimlm.eval.runtime import LlamaCppRunner, TorchRunner
    torch.set_num_threads(threads)
    m = slimlm.load(path, progress=False)
    chunk = torch.randint(3, int(m.config["vocab_size"]), (ctx,), generator=torch.Generator().manual_seed(0))
    pos, _ = scored_slice(ctx)
    out = {}
    for name, runner in (("llama.cpp", LlamaCppRunner(path, ctx)), ("torch", TorchRunner(m))):
        with contextlib.closing(runner):
            runner.logits(chunk[:16])                                     # warm-up
            full, part = [], []
            for _ in range(3):
                t = time.perf_counter()
                a = runner.logits(chunk)[pos]
                full.append(time.perf_counter() - t)
                t = time.perf_counter()
                b = runner.logits(chunk, pos)
                part.append(time.perf_counter() - t)
            out[name] = {"every_position_s": min(full), "scored_rows_s": min(part), "identical": bool(torch.equal(a, b))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf", nargs="?")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    from slimlm.model import default_model_path
    path = a.gguf or str(default_model_path())
    runs = {True: [], False: []}
    for _ in range(a.reps):
        for shared in (False, True):
            runs[shared].append(timed_loads(path, shared, a.threads))
    res = {"gguf": path, "threads": a.threads, "load": {}}
    print(f"{path}, {a.threads} threads, {a.reps} alternating runs each (median):")
    for shared, label in ((False, "transformers alone"), (True, "slimlm's shared parse")):
        med = {k: statistics.median(r[k] for r in runs[shared]) for k in ("import", "first", "warm")}
        res["load"][label] = med
        print(f"  load, {label:22s} first {med['first']:6.2f} s (after {med['import']:.1f} s of imports), "
              f"warm {med['warm']:6.2f} s")
    a0, b0 = res["load"]["transformers alone"], res["load"]["slimlm's shared parse"]
    print(f"  shared parse / transformers alone: first {b0['first'] / a0['first']:.2f}x, "
          f"warm {b0['warm'] / a0['warm']:.2f}x")
    res["logits"] = logits_times(path, a.ctx, a.threads)
    for name, r in res["logits"].items():
        print(f"  logits of one {a.ctx}-token chunk in {name:9s}: every position {r['every_position_s']:.2f} s, "
              f"scored half only {r['scored_rows_s']:.2f} s ({r['scored_rows_s'] / r['every_position_s']:.2f}x), "
              f"identical: {r['identical']}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
