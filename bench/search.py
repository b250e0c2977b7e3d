#!/usr/bin/env python3
"""`slimlm search` at a size below what quantization alone can reach (issue 17, acceptance a), one run.

Reference: the dithered SmolLM2-135M-Instruct F32 model (../shared/tools/make_dither_reference.py). Calibration
(importance matrices, GPTQ, pruning scores, size budgets) and healing text: ../shared/data/brown-calib.txt;
evaluation: brown-eval.txt, every file in llama.cpp against the reference in torch on the same tokens, llama.cpp's
own presets of the reference (with the importance matrix of the same calibration text) made and measured in the
same search.

The dense SmolLM2 cannot go below ~66 MiB in llama.cpp's formats, so a 64 MiB file needs pruning, and pruning
needs bits and healing to stay accurate: the search combines them. Check a: the chosen file is <= the target
and its KLD <= llama.cpp Q4_0+imatrix's (87.6 MiB) from the same run; goal KLD <= 0.12.

Runs `slimlm search` (resumable: rerunning with the same --out continues the study; --budget is per run) and
prints the chosen file against llama.cpp's files, the trial counts and the proxies' Spearman; writes
OUT/bench.json.

    python bench/search.py [--target 64MiB] [--budget 2h] [--heal 6m] [--max-prune 0.3] [--chunks 8]
                           [--methods gptq,gptq+qat --qat 15m] [--out bench/results/search-64mib]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from foundation import RESULTS, SHARED, machine, reference_model  # noqa: E402

GOAL = 0.12


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="reference GGUF (default: the dithered SmolLM2 reference)")
    ap.add_argument("--text", default=str(SHARED / "data" / "brown-eval.txt"))
    ap.add_argument("--calib", default=str(SHARED / "data" / "brown-calib.txt"))
    ap.add_argument("--chunks", type=int, default=8, help="evaluation chunks of 512 tokens (default 8)")
    ap.add_argument("--target", default="64MiB")
    ap.add_argument("--budget", default="2h")
    ap.add_argument("--heal", default="6m", help="healing a pruned candidate may get ('' for none)")
    ap.add_argument("--max-prune", default="0.3")
    ap.add_argument("--methods", default="gptq", help="PTQ methods searched (slimlm search --methods; gptq+qat "
                    "needs --qat)")
    ap.add_argument("--qat", default="", help="QAT budget of a gptq+qat candidate (slimlm search --qat)")
    ap.add_argument("--baselines", default="Q8_0,Q4_K_M,Q4_0,Q3_K_M")
    ap.add_argument("--out", default=str(RESULTS / "search-64mib"))
    ap.add_argument("--no-run", action="store_true", help="only summarize the search already in --out")
    a = ap.parse_args()
    ref = reference_model(a.model)
    cmd = [sys.executable, "-m", "slimlm", "-q", "search", str(ref), "-o", a.out, "--target-size", a.target,
           "--budget", a.budget, "--max-prune", a.max_prune, "--calib", a.calib, "--text", a.text,
           "--chunks", str(a.chunks), "--baselines", a.baselines, "--methods", a.methods]
    if a.heal or a.qat:
        cmd += ["--data", a.calib]
    if a.heal:
        cmd += ["--heal", a.heal]
    if a.qat:
        cmd += ["--qat", a.qat]
    print("$ " + " ".join(cmd[2:]), flush=True)
    t0 = time.time()
    rc = None if a.no_run else subprocess.run(cmd).returncode
    s = json.loads((Path(a.out) / "search.json").read_text())
    best, base = s["best"], {p["type"]: p for p in s["baselines"]}
    run = "summary of the search in --out" if a.no_run else f"this run {(time.time() - t0) / 60:.1f} min"
    print(f"\nmodel {ref.name}; evaluation {a.chunks} x 512 tokens of {Path(a.text).name}; {run}; trials: " + ", ".join(f"{v} {k}" for k, v in s["trials"].items() if v))
    print(f"{'file':34s} {'MiB':>8s} {'KLD':>9s} {'PPL':>8s} {'top-1':>7s} {'gen tok/s':>9s}")
    for p in ([best] if best else []) + sorted(base.values(), key=lambda p: p["file_bytes"]):
        name = f"slimlm trial {best['trial']}" if p is best else p["label"]
        print(f"{name:34s} {p['file_bytes'] / 2**20:8.2f} {p['kld']:9.5f} {p['ppl']:8.3f} {100 * p['top1']:6.2f}% "
              f"{p['gen_tps'] or 0:9.1f}")
    if best:
        print(f"chosen: {best['command']}")
    for k, v in s["proxy_spearman"].items():
        print(f"proxy {k}: Spearman {v['spearman'] if v['spearman'] is None else round(v['spearman'], 3)} "
              f"over {v['n']} measured files")
    q4 = base.get("Q4_0")
    ok = bool(best and q4 and best["feasible"] and best["kld"] <= q4["kld"])
    if best and q4:
        print(f"a. {best['file_bytes'] / 2**20:.2f} MiB <= {a.target}, KLD {best['kld']:.4f} vs llama.cpp Q4_0+imatrix "
              f"{q4['kld']:.4f} ({q4['file_bytes'] / 2**20:.1f} MiB): {best['kld'] / q4['kld']:.3f}x -> "
              f"{'PASS' if ok else 'FAIL'}; goal KLD <= {GOAL}: {'met' if best['kld'] <= GOAL else 'not met'}")
    else:
        print("a. FAIL: " + ("no trial met the target" if not best else "no llama.cpp Q4_0 baseline in this run"))
    (Path(a.out) / "bench.json").write_text(json.dumps({"machine": machine(), "command": cmd[2:], "rc": rc,
                                                        "pass": ok, "best": best, "baselines": s["baselines"],
                                                        "trials": s["trials"]}, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
