#!/usr/bin/env python3
"""Quantization-aware training against llama.cpp's quantizer and slimlm's post-training methods (issue 16), one run.

Reference: the dithered SmolLM2-135M-Instruct F32 model (../shared/tools/make_dither_reference.py). Importance
matrix: slimlm's, on ../shared/data/brown-calib.txt (--calib-chunks x 512 tokens), handed to llama.cpp's
`llama_model_quantize` and to slimlm alike. QAT trains on brown-calib.txt (distillation from the reference, the
CLI's QAT defaults: learned rounding, compress.qat_lrs, bf16 autocast where fast; --minutes of wall time each, preparation included). Evaluation: brown-eval.txt, every
file in llama.cpp against the reference in torch, on the same tokens.

Rows, at the size of llama.cpp's Q4_K_M file (slimlm: --target-size, per-tensor types by measured sensitivity;
--size-of) and at the Q4_0 preset's types (every block linear Q4_0, the embedding and output as llama.cpp picks):
llama.cpp + imatrix; slimlm rtn + imatrix; GPTQ; QAT (--qat: from the encoder's rounding
and/or from GPTQ's codes). Checks: b. QAT at Q4_K_M: KLD <= 0.25x
llama.cpp Q4_K_M + imatrix; c. QAT at Q4_0: KLD <= 0.5x llama.cpp Q4_0 + imatrix. Writes bench/results/qat.json.

    python bench/qat.py [--minutes 30] [--presets Q4_K_M,Q4_0] [--chunks 8] [--calib-chunks 32]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from foundation import RESULTS, add_common_args, machine, reference_f32_imatrix  # noqa: E402

from slimlm.compress import QAT_ROUND_LR, QAT_SCALE_LR, qat_lrs  # noqa: E402
from slimlm.train.config import QAT_WEIGHTS  # noqa: E402

TARGETS = {"Q4_K_M": 0.25, "Q4_0": 0.5}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, 8)
    ap.add_argument("--minutes", type=float, default=30.0, help="QAT wall time per preset (default 30)")
    ap.add_argument("--presets", default="Q4_K_M,Q4_0")
    ap.add_argument("--lr", type=float, help="QAT learning rate of what trains besides the scales and rounding "
                    "offsets (default: the CLI's, compress.qat_lrs)")
    ap.add_argument("--scale-lr", type=float, help=f"learning rate of the learned block scales (default {QAT_SCALE_LR:g}; "
                    "with --qat-weights ste: --lr)")
    ap.add_argument("--qat-weights", choices=QAT_WEIGHTS, help="the float block weights: round (learned rounding, "
                    "default), codes (learned rounding of the starting codes), frozen or ste (the straight-through "
                    "estimator), as the CLI's --qat-weights")
    ap.add_argument("--round-lr", type=float, help=f"learned rounding's learning rate (default {QAT_ROUND_LR:g})")
    ap.add_argument("--teacher-targets", choices=("auto", "full", "topk"), default="auto",
                    help="the teacher's outputs QAT trains on (the CLI's --teacher-targets; default auto: top-k)")
    ap.add_argument("--sub-scales", action="store_true", help="the K-quants' / IQ4_XS's integer sub-block scales and "
                    "mins train too (the CLI's --sub-scales)")
    ap.add_argument("--runtime-activations", action="store_true", help="QAT's linears see llama.cpp CPU's "
                    "activation rounding (the CLI's --runtime-activations)")
    ap.add_argument("--qat-embeddings", action="store_true", help="the tied token embedding / LM head trains on its "
                    "grid too (the CLI's --qat-embeddings)")
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto", help="QAT's training "
                    "precision (default auto, the CLI's: bf16 autocast where the CPU has fast bf16 matmuls; fp32 for "
                    "the ablation: 136 vs 231 tok/s here, 2026-12-06)")
    ap.add_argument("--micro-batch", type=int, help="QAT's rows of --seq-len tokens per step (the CLI's --micro-batch; "
                    "default the trainer's)")
    ap.add_argument("--size-of", default="Q4_K_M", help="presets whose slimlm rows get llama.cpp's file size as "
                    "--target-size (per-tensor types by sensitivity) instead of the preset's types (default Q4_K_M; "
                    "'' for none)")
    ap.add_argument("--qat", default="gptq+qat", help="QAT methods to run (qat: from the encoder's rounding; "
                    "gptq+qat: from GPTQ's codes; default gptq+qat)")
    ap.add_argument("--ptq", default="rtn,gptq", help="post-training rows to run beside QAT (default rtn,gptq; '' "
                    "for none, as in an ablation of QAT settings)")
    a = ap.parse_args()

    from slimlm.compress import CompressConfig, compress
    from slimlm.eval import evaluate_many
    from slimlm.eval.runtime import llama_cpp_quantize
    from slimlm.quant.imatrix import ImportanceMatrix
    from slimlm.train.command import heal_options

    lrs = qat_lrs(a.lr, a.scale_lr, a.round_lr, a.qat_weights)
    ref_path, ref, f32, _, prov, _ = reference_f32_imatrix(a)
    im_path = RESULTS / "imatrix.gguf"
    runs = []
    for p in a.presets.split(","):
        out = RESULTS / f"qat-llamacpp-{p}.gguf"
        s = llama_cpp_quantize(f32, out, p, imatrix=ImportanceMatrix.load(im_path))
        runs.append(dict(name=f"llama.cpp {p}+imatrix", preset=p, method="llama.cpp", path=out, seconds=s))
        sized = p in a.size_of.split(",")
        kind = dict(target_size=str(out.stat().st_size)) if sized else dict(type=p)
        for method in (*filter(None, a.ptq.split(",")), *a.qat.split(",")):
            out = RESULTS / f"qat-slimlm-{method}-{p}.gguf"
            qat = "qat" in method
            opts = {"data": (a.calib,), "precision": a.precision, "teacher_targets": a.teacher_targets, **lrs,
                    **({"sub_scales": True} if a.sub_scales else {}),
                    **({"runtime_activations": True} if a.runtime_activations else {}),
                    **({"qat_embeddings": True} if a.qat_embeddings else {}),
                    **({"micro_batch": a.micro_batch} if a.micro_batch else {})}
            heal = heal_options(f"{a.minutes:g}m", opts) if qat else None
            cfg = CompressConfig(imatrix=str(im_path), calib=a.calib, calib_chunks=a.calib_chunks,
                                 evaluate=False, method=method, heal=heal, text=a.text, **kind)
            t0 = time.perf_counter()
            rep = compress(ref_path, out, cfg, overwrite=True, progress=qat)
            r = dict(name=f"slimlm {method} {'size of ' if sized else ''}{p}", preset=p, method=method, path=out,
                     seconds=time.perf_counter() - t0)
            if qat:
                st = next(s for s in rep.steps if s["step"] == "qat")
                e2e = next((s.get("detail") or {} for s in rep.healing["stages"]
                            if s.get("stage") == "end-to-end distillation"), {})
                r.update(heldout_kl_start=st["heldout_kl_unhealed"], heldout_kl=st["heldout_kl"],
                         train_tokens=e2e.get("tokens"), tokens_per_s=e2e.get("tokens_per_s"),
                         heldout_evals=e2e.get("evals"))
                print(f"  held-out KL at [step, KL]: {e2e.get('evals')}", flush=True)
            runs.append(r)
            print(f"{r['name']}: {r['seconds']:.0f} s", flush=True)

    res = evaluate_many([r["path"] for r in runs], ref, text_path=a.text, n_ctx=512, max_chunks=a.chunks,
                        speed=False, progress=True)
    for r, e in zip(runs, res, strict=True):
        r.update(mib=e["model"]["file_bytes"] / 2**20, kld=e["kld"], ppl=e["ppl"], top1=e["top1_agreement"])
        r["path"] = str(r["path"])
    r0 = res[0]
    print(f"\nmodel: {ref_path.name}, reference in torch f32 (PPL {r0['ref_ppl']:.4f}); imatrix and QAT text: {prov}")
    print(f"text: {r0['text']}; {r0['n_chunks']} chunks x 512, {r0['n_scored_tokens']} scored tokens; QAT "
          f"{a.minutes:g} min per preset; machine: {machine()['cpu']}\n")
    print("| file | MiB | KLD | x llama.cpp | PPL | top-1 | minutes |\n|---|---|---|---|---|---|---|")
    base = {r["preset"]: r for r in runs if r["method"] == "llama.cpp"}
    for r in runs:
        print(f"| {r['name']} | {r['mib']:.2f} | {r['kld']:.6f} | {r['kld'] / base[r['preset']]['kld']:.3f}x | "
              f"{r['ppl']:.4f} | {r['top1']:.4f} | {r['seconds'] / 60:.1f} |")
    lines, ok = [], True
    for p, target in TARGETS.items():
        qs = [r for r in runs if r["preset"] == p and "qat" in r["method"]]
        if not qs:
            continue
        q = min(qs, key=lambda r: r["kld"])
        ratio = q["kld"] / base[p]["kld"]
        ok &= ratio <= target
        lines.append(f"{'PASS' if ratio <= target else 'FAIL'}  {'b' if p == 'Q4_K_M' else 'c'}. {q['name']}: KLD "
                     f"{q['kld']:.4f} vs llama.cpp {base[p]['kld']:.4f} = {ratio:.3f}x (<= {target}x)")
    print("\n" + "\n".join(lines))
    (RESULTS / "qat.json").write_text(json.dumps({"runs": runs, "minutes": a.minutes, "precision": a.precision, **lrs,
                                                  "sub_scales": a.sub_scales,
                                                  "runtime_activations": a.runtime_activations,
                                                  "qat_embeddings": a.qat_embeddings, "micro_batch": a.micro_batch,
                                                  "teacher_targets": a.teacher_targets, "machine": machine()}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
