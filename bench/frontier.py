#!/usr/bin/env python3
"""Size-KLD frontier: llama.cpp's presets (with an importance matrix) against slimlm's methods and size
budgets, all evaluated in llama.cpp against the torch reference in one pass.

Reference: the dithered SmolLM2-135M-Instruct F32 model (../shared/tools/make_dither_reference.py).
Importance matrix: computed by slimlm on ../shared/data/brown-calib.txt (--calib-chunks x 512 tokens) and
handed to llama.cpp's `llama_model_quantize` and to slimlm alike; slimlm's GPTQ and sensitivity measurement
use the same calibration text. Evaluation: ../shared/data/brown-eval.txt.

slimlm runs go through `slimlm.compress` (the product path); a run's time is the whole call: loading the
reference GGUF, calibration, sensitivity table, quantization and writing (the size-budget runs share one
sensitivity table through slimlm's cache, $SLIMLM_CACHE: the first measures it unless an earlier run left it
there, the others read it; each run prints which):
  - `--method gptq` at the Q4_K_M preset (same per-tensor types as llama.cpp's Q4_K_M);
  - `--target-size` equal to the byte size of llama.cpp's Q4_K_M, Q3_K_M and Q5_K_M files (+ imatrix), and
    0.82 x its Q4_0 file, with --method rtn and gptq (and awq+gptq at the two smallest sizes).

Checks (issue 4): b. at the sizes of llama.cpp's Q4_K_M and Q3_K_M, slimlm's KLD <= 0.5x; c. a slimlm file
<= 0.82x llama.cpp's Q4_0+imatrix with a KLD no higher; d. GPTQ over the whole model <= 120 s (calibration
included, loading excluded). Writes bench/results/frontier.json and frontier.png.

    python bench/frontier.py [--chunks 8] [--calib-chunks 32] [--quick]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from foundation import RESULTS, add_common_args, reference_f32_imatrix  # noqa: E402

LLAMA = ["Q8_0", "Q6_K", "Q5_K_M", "Q5_0", "Q4_K_M", "IQ4_NL", "Q4_0", "IQ4_XS", "Q3_K_M", "Q2_K"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, 8)
    ap.add_argument("--quick", action="store_true", help="only the sizes the acceptance checks need")
    a = ap.parse_args()

    from slimlm.compress import CompressConfig, compress
    from slimlm.eval import evaluate_many
    from slimlm.eval.runtime import llama_cpp_quantize
    from slimlm.quant.imatrix import ImportanceMatrix

    ref_path, ref, f32, _, prov, _ = reference_f32_imatrix(a)
    im_path = RESULTS / "imatrix.gguf"

    runs = []   # dict(name, tool, method, path, seconds, gptq_seconds)
    for p in (["Q4_K_M", "Q3_K_M", "Q4_0"] if a.quick else LLAMA):
        out = RESULTS / f"frontier-llamacpp-{p}.gguf"
        s = llama_cpp_quantize(f32, out, p, imatrix=ImportanceMatrix.load(im_path))
        runs.append(dict(name=f"llama.cpp {p}+imatrix", tool="llama.cpp", method="preset", preset=p, path=out,
                         seconds=s))
        print(f"llama.cpp {p}: {s:.1f}s", flush=True)
    size = {r["preset"]: r["path"].stat().st_size for r in runs}

    def ours(tag, **kw):
        out = RESULTS / f"frontier-slimlm-{tag}.gguf"
        cfg = CompressConfig(imatrix=str(im_path), calib=a.calib, calib_chunks=a.calib_chunks, evaluate=False,
                             **kw)
        t0 = time.perf_counter()
        rep = compress(ref_path, out, cfg, overwrite=True, progress=False)
        steps = {s["step"]: s for s in rep.steps}
        g = steps.get(kw.get("method", "rtn"), {})
        mp = steps.get("mixed precision", {})
        sens = ("" if not mp else "read from the cache" if "cached" in mp["sensitivity"] else "measured")
        runs.append(dict(name=f"slimlm {tag}", tool="slimlm", method=kw.get("method", "rtn"), path=out,
                         seconds=time.perf_counter() - t0, gptq_seconds=g.get("seconds"),
                         calib_tokens=g.get("calib_tokens"), target=kw.get("target_size"),
                         predicted_kld=mp.get("predicted_kld"), sensitivity_table=sens))
        print(f"slimlm {tag}: {runs[-1]['seconds']:.1f}s (model loading included)"
              + (f", GPTQ {g['seconds']:.1f}s on {g['calib_tokens']} tokens" if g else "")
              + (f", sensitivity table {sens}" if sens else ""), flush=True)

    ours("gptq-Q4_K_M", type="Q4_K_M", method="gptq")
    budgets = [("Q4_K_M", size["Q4_K_M"]), ("Q3_K_M", size["Q3_K_M"]), ("0.82xQ4_0", int(0.82 * size["Q4_0"]))]
    if not a.quick:
        budgets.insert(0, ("Q5_K_M", size["Q5_K_M"]))
    for tag, b in budgets:
        for method in ("rtn", "gptq") + (("awq+gptq",) if tag in ("Q3_K_M", "0.82xQ4_0") else ()):
            ours(f"{method}-size-of-{tag}", target_size=str(b), method=method)

    paths = [r["path"] for r in runs]
    res = evaluate_many(paths, ref, text_path=a.text, n_ctx=512, max_chunks=a.chunks, speed=False, progress=True)
    for r, e in zip(runs, res, strict=True):
        r.update(mib=e["model"]["file_bytes"] / 2**20, bytes=e["model"]["file_bytes"], kld=e["kld"],
                 ppl=e["ppl"], top1=e["top1_agreement"], bpw=e["model"].get("bits_per_weight"))
    r0 = res[0]
    print(f"\nmodel: {ref_path.name}, reference in torch f32 (PPL {r0['ref_ppl']:.4f}); imatrix and calibration: "
          f"{prov}")
    print(f"text: {r0['text']}; {r0['n_chunks']} chunks x 512, {r0['n_scored_tokens']} scored tokens\n")
    print("| file | MiB | KLD | PPL | top-1 | predicted KLD | time s |\n|---|---|---|---|---|---|---|")
    for r in sorted(runs, key=lambda r: -r["bytes"]):
        pk = f"{r['predicted_kld']:.4f}" if r.get("predicted_kld") is not None else ""
        print(f"| {r['name']} | {r['mib']:.2f} | {r['kld']:.6f} | {r['ppl']:.4f} | {r['top1']:.4f} | {pk} | "
              f"{r['seconds']:.1f} |")

    by = {r["name"]: r for r in runs}
    fails, lines = [], []

    def check(ok, text):
        lines.append(("PASS  " if ok else "FAIL  ") + text)
        if not ok:
            fails.append(text)

    for p in ("Q4_K_M", "Q3_K_M"):
        base = by[f"llama.cpp {p}+imatrix"]
        best = min((r for r in runs if r["tool"] == "slimlm" and r["bytes"] <= base["bytes"]),
                   key=lambda r: r["kld"])
        ratio = best["kld"] / base["kld"]
        check(ratio <= 0.5, f"b. at llama.cpp {p}'s size ({base['mib']:.2f} MiB): {best['name']} KLD "
              f"{best['kld']:.4f} vs {base['kld']:.4f} = {ratio:.2f}x (<= 0.5x)")
    q40 = by["llama.cpp Q4_0+imatrix"]
    small = [r for r in runs if r["tool"] == "slimlm" and r["bytes"] <= 0.82 * q40["bytes"]]
    best = min(small, key=lambda r: r["kld"]) if small else None
    check(best is not None and best["kld"] <= q40["kld"],
          f"c. {best['name'] if best else 'no slimlm file'} at {best['bytes'] / q40['bytes'] if best else 0:.3f}x "
          f"llama.cpp Q4_0+imatrix's size: KLD {best['kld'] if best else float('nan'):.4f} vs {q40['kld']:.4f}")
    gq = by["slimlm gptq-Q4_K_M"]
    check(gq["gptq_seconds"] <= 120, f"d. GPTQ over the whole model: {gq['gptq_seconds']:.1f} s on "
          f"{gq['calib_tokens']} calibration tokens (<= 120 s, loading excluded)")
    print()
    print("\n".join(lines))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    series = [("llama.cpp presets + imatrix", lambda r: r["tool"] == "llama.cpp", "o-", "tab:gray"),
              ("slimlm budget, rtn", lambda r: r["tool"] == "slimlm" and r["target"] and r["method"] == "rtn",
               "s-", "tab:blue"),
              ("slimlm budget, gptq", lambda r: r["tool"] == "slimlm" and r["target"] and r["method"] == "gptq",
               "D-", "tab:red"),
              ("slimlm budget, awq+gptq", lambda r: r["tool"] == "slimlm" and r["target"]
               and r["method"] == "awq+gptq", "^-", "tab:purple"),
              ("slimlm gptq, Q4_K_M types", lambda r: r["name"] == "slimlm gptq-Q4_K_M", "*", "tab:green")]
    for label, sel, style, color in series:
        pts = sorted((r["mib"], r["kld"]) for r in runs if sel(r))
        if pts:
            ax.plot(*zip(*pts, strict=True), style, label=label, color=color)
    for r in runs:
        if r["tool"] == "llama.cpp":
            ax.annotate(r["preset"], (r["mib"], r["kld"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("file size (MiB)")
    ax.set_ylabel(f"KL divergence to the F32 reference ({r0['n_scored_tokens']} tokens)")
    ax.set_title(f"{ref_path.name}: size vs KLD, llama.cpp vs slimlm (same imatrix)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "frontier.png", dpi=120)
    (RESULTS / "frontier.json").write_text(json.dumps({"reference": str(ref_path), "calibration": prov,
                                                       "text": r0["text"], "tokens": r0["n_scored_tokens"],
                                                       "runs": runs, "checks": lines}, indent=1, default=str))
    print(f"\nwrote {RESULTS / 'frontier.png'} and frontier.json")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
