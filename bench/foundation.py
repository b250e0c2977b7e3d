#!/usr/bin/env python3
"""Foundation benchmark: slimlm's GGUF export against llama.cpp's quantizer, in one run.

Reference: the dithered SmolLM2-135M-Instruct F32 model built by ../shared/tools/make_dither_reference.py
(the packaged Q4_1 weights plus +-half-step dither, so no format's grid is flattered), evaluated in torch.
slimlm exports F32, Q8_0 and Q4_0 from it; llama.cpp's `llama_model_quantize` makes Q8_0 and Q4_0 from
slimlm's F32 export (same source). All files are evaluated in llama.cpp on the same tokens of
../shared/data/brown-eval.txt against the torch reference, in one pass.

Checks (issue 2, acceptance e): the F32 export's llama.cpp perplexity is within 1% of torch's, and the
Q8_0 export's KLD is < 0.01.

    python bench/foundation.py [--chunks 40] [--model REF.gguf] [--text FILE]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"
RESULTS = HERE / "results"


def reference_model(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    from slimlm.model import default_model_path
    out = RESULTS / "smollm2-135m-dither-f32.gguf"
    if not out.exists():
        tool = SHARED / "tools" / "make_dither_reference.py"
        if not tool.exists():
            print(f"note: {tool} not found; using the packaged Q4_1 model as reference (flatters Q4_x)")
            return default_model_path()
        print(f"building the dithered reference {out} ...", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)            # a fresh clone has no results folder yet
        subprocess.run([sys.executable, str(tool), str(default_model_path()), str(out), "--seed", "0"], check=True)
    return out


def machine() -> dict:
    """What the numbers were measured on: training speed on a CPU differs ~4x between one with fast bf16 matmuls
    (AVX512-BF16/AMX: bf16 autocast) and one with AVX2 only (fp32), so every training bench records it."""
    import os
    import platform

    import torch

    from slimlm.train.dist import fast_bf16
    name = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": name, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "fast_bf16": fast_bf16(torch.device("cpu")), "torch": torch.__version__}


def add_common_args(ap, eval_chunks: int) -> None:
    """--model, --text, --calib, --chunks, --calib-chunks: what the preset and frontier benches share."""
    ap.add_argument("--model", help="reference GGUF (default: the dithered SmolLM2 reference)")
    ap.add_argument("--text", default=str(SHARED / "data" / "brown-eval.txt"))
    ap.add_argument("--calib", default=str(SHARED / "data" / "brown-calib.txt"))
    ap.add_argument("--chunks", type=int, default=eval_chunks,
                    help=f"evaluation chunks of 512 tokens (default {eval_chunks})")
    ap.add_argument("--calib-chunks", type=int, default=32, help="imatrix chunks of 512 tokens (default 32)")


def reference_f32_imatrix(a):
    """(reference path, loaded reference, its F32 export for llama.cpp's quantizer, importance matrix from
    --calib saved as results/imatrix.gguf, provenance, seconds the imatrix took)."""
    from slimlm import export_gguf, load
    from slimlm.calib import calibration_chunks
    from slimlm.sequential import collect_imatrix
    RESULTS.mkdir(parents=True, exist_ok=True)
    ref_path = reference_model(a.model)
    ref = load(ref_path, progress=False)
    f32 = RESULTS / "slimlm-F32.gguf"
    export_gguf(ref, f32, "F32", overwrite=True, progress=False)
    t0 = time.perf_counter()
    chunks, prov = calibration_chunks(ref, a.calib, n_ctx=512, max_chunks=a.calib_chunks)
    imatrix = collect_imatrix(ref, chunks, dataset=prov, progress=True)
    t_im = time.perf_counter() - t0
    imatrix.save(RESULTS / "imatrix.gguf", overwrite=True)
    return ref_path, ref, f32, imatrix, prov, t_im


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="reference GGUF (default: the dithered SmolLM2 reference)")
    ap.add_argument("--text", default=str(SHARED / "data" / "brown-eval.txt"), help="evaluation text")
    ap.add_argument("--chunks", type=int, default=40, help="chunks of --ctx tokens to evaluate (default 40)")
    ap.add_argument("--ctx", type=int, default=512)
    a = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)

    from slimlm import export_gguf, load
    from slimlm.eval import evaluate_many
    from slimlm.eval.runtime import llama_cpp_quantize

    ref_path = reference_model(a.model)
    ref = load(ref_path, progress=False)
    files, seconds = {}, {}
    for t in ("F32", "Q8_0", "Q4_0"):
        files[f"slimlm {t}"] = RESULTS / f"slimlm-{t}.gguf"
        t0 = time.perf_counter()
        export_gguf(ref, files[f"slimlm {t}"], t, overwrite=True, progress=False)
        seconds[f"slimlm {t}"] = time.perf_counter() - t0
    for t in ("Q8_0", "Q4_0"):
        files[f"llama.cpp {t}"] = RESULTS / f"llamacpp-{t}.gguf"
        seconds[f"llama.cpp {t}"] = llama_cpp_quantize(files["slimlm F32"], files[f"llama.cpp {t}"], t)

    names = list(files)
    res = evaluate_many([files[n] for n in names], ref, text_path=a.text, n_ctx=a.ctx, max_chunks=a.chunks,
                        progress=True)
    r0 = res[0]
    print(f"\nmodel: {ref_path.name} ({ref.n_params() / 1e6:.1f}M params), reference in torch f32 "
          f"(PPL {r0['ref_ppl']:.4f})")
    print(f"text: {r0['text']}; {r0['n_chunks']} chunks x {r0['n_ctx']} tokens, {r0['n_scored_tokens']} scored")
    print("\n| file | MiB | bits/w | PPL | KLD | top-1 | quantize s | gen tok/s | size / llama.cpp | "
          "KLD / llama.cpp |\n|---|---|---|---|---|---|---|---|---|---|")
    rows = dict(zip(names, res, strict=True))
    for n, r in rows.items():
        base = rows.get(f"llama.cpp {n.split()[-1]}")
        ratio_size = r["model"]["file_bytes"] / base["model"]["file_bytes"] if base else float("nan")
        ratio_kld = r["kld"] / base["kld"] if base and base["kld"] > 0 else float("nan")
        print(f"| {n} | {r['model']['file_bytes'] / 2**20:.2f} | {r['model']['bits_per_weight']:.3f} | "
              f"{r['ppl']:.4f} | {r['kld']:.6f} | {100 * r['top1_agreement']:.2f}% | {seconds[n]:.2f} | "
              f"{r['model']['speed']['gen_tps']:.1f} | {ratio_size:.4f} | {ratio_kld:.4f} |")
    f32_gap = abs(rows["slimlm F32"]["ppl"] / r0["ref_ppl"] - 1)
    q8_kld = rows["slimlm Q8_0"]["kld"]
    checks = {"F32 llama.cpp PPL within 1% of torch": (f32_gap < 0.01, f"{100 * f32_gap:.4f}%"),
              "Q8_0 KLD < 0.01": (q8_kld < 0.01, f"{q8_kld:.6f}")}
    print()
    for k, (ok, v) in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {k}: {v}")
    out = RESULTS / "foundation.json"
    out.write_text(json.dumps({"reference": str(ref_path), "seconds": seconds,
                               "results": dict(zip(names, res, strict=True))}, indent=1))
    print(f"\nfull results: {out}")
    return 0 if all(ok for ok, _ in checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
