#!/usr/bin/env python3
"""GPU check and speed-up (issue 15): the CUDA paths end to end on a GPU machine, timed against the CPU.

1. The tests marked `gpu` (tests/test_device.py: imatrix and GPTQ statistics on the GPU give the CPU's file up to
   rounding, structured pruning chooses the same shapes, the torch-side evaluation the same logits).
2. A random Llama-architecture model (bench/memory.py's builder: bf16 safetensors, width 2048 by default) through
   `compress --calib`, `compress --method gptq` and `prune --ratio 0.25`, each with --device cpu and --device cuda,
   streamed (the layer passes then move one layer at a time to the GPU); prints wall time per step and the
   speed-up (CPU seconds / GPU seconds), with the peak resident memory on the host.

    python bench/gpu.py [--layers 4] [--hidden 2048] [--ffn 5632] [--steps calib,gptq,prune] [--work DIR]
                        [--skip-tests]

The solvers (GPTQ's column sweeps, OBS, the surgery) run on the CPU whatever --device says, so the GPTQ and prune
speed-ups are those of the layer passes only; the rows say how much of a step that is.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from memory import STEPS, build_model, run_step  # noqa: E402


def main() -> int:
    import torch
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--steps", default="calib,gptq,prune", help=f"of {', '.join(s for s in STEPS if s != 'whole')}")
    ap.add_argument("--work", type=Path, default=Path("/tmp/slimlm-gpu"))
    ap.add_argument("--skip-tests", action="store_true", help="only the timing")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device here: bench/gpu.py runs on a GPU machine", file=sys.stderr)
        return 2
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, {torch.get_num_threads()} CPU threads",
          flush=True)
    ok = True
    if not a.skip_tests:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu",
                            str(HERE.parent / "tests" / "test_device.py")])
        ok = r.returncode == 0
        print(f"gpu tests: {'PASS' if ok else 'FAIL'}", flush=True)
    a.work.mkdir(parents=True, exist_ok=True)
    d = build_model(a.work / f"llama-{a.hidden}x{a.layers}", a.layers, a.hidden, a.ffn, a.heads, a.kv_heads)
    disk = sum(f.stat().st_size for f in d.glob("*.safetensors"))
    print(f"model: random Llama, {a.layers} layers, width {a.hidden}, MLP {a.ffn}, {disk / 1e9:.2f} GB bf16; "
          f"bundled calibration text", flush=True)
    print(f"{'step':>6} {'cpu s':>8} {'cuda s':>8} {'speed-up':>9} {'cpu RSS':>9} {'cuda RSS':>9}", flush=True)
    rows = []
    for step in (s for s in a.steps.split(",") if s):
        r = {"step": step}
        for dev in ("cpu", "cuda"):
            res = run_step(d, a.work / f"{step}.{dev}.gguf", STEPS[step] + ["--device", dev])
            r[dev] = res
        rows.append(r)
        print(f"{step:>6} {r['cpu']['seconds']:>8.1f} {r['cuda']['seconds']:>8.1f} "
              f"{r['cpu']['seconds'] / r['cuda']['seconds']:>8.2f}x {r['cpu']['peak_rss_bytes'] / 2**30:>7.2f}Gi "
              f"{r['cuda']['peak_rss_bytes'] / 2**30:>7.2f}Gi", flush=True)
    (a.work / "gpu.json").write_text(json.dumps(rows, indent=1))
    print(f"results: {a.work / 'gpu.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
