#!/usr/bin/env python3
"""Preset parity benchmark: every llama.cpp preset made by slimlm and by llama.cpp, with and without the
same importance matrix, evaluated in llama.cpp against the torch reference in one pass.

Reference: the dithered SmolLM2-135M-Instruct F32 model (../shared/tools/make_dither_reference.py). The
importance matrix is computed by slimlm on ../shared/data/brown-calib.txt and handed to both quantizers.
llama.cpp's files are `llama_model_quantize` applied to slimlm's F32 export of the same reference.
Evaluation text: ../shared/data/brown-eval.txt.

Checks (issue 3): per preset, size within 0.5% of llama.cpp's and KLD <= 1.05x llama.cpp's (same imatrix or
none); Q4_K_M encoding+writing time <= 3x llama.cpp's. Files whose tensor data (names, types, shapes, bytes)
are identical are evaluated once and marked so in the table ("same bytes"): their metrics are necessarily
equal. slimlm's time is export_gguf (plan, encode, write, validate) from the loaded model; llama.cpp's is the
whole llama_model_quantize call (it also reads the F32 file). Both use every core.

    python bench/presets.py [--chunks 4] [--calib-chunks 32] [--presets Q4_K_M,Q8_0]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from foundation import RESULTS, add_common_args, reference_f32_imatrix  # noqa: E402

PRESETS = ["Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_1", "Q4_0", "IQ4_NL",
           "IQ4_XS", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K"]


def tensor_digest(path: Path) -> str:
    """sha256 over every tensor's name, type, shape and data: equal digests mean equal model outputs."""
    from slimlm.gguf.reader import read_gguf
    g, h = read_gguf(path), hashlib.sha256()
    for t in sorted(g.tensors, key=lambda t: t.name):
        h.update(f"{t.name}:{t.ggml_type.name}:{t.shape};".encode())
        h.update(memoryview(g.raw(t)).cast("B"))
    return h.hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, 4)
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--timing-only", action="store_true", help="quantize with both tools and print the times; "
                    "skip evaluation (for a quiet-machine timing run)")
    a = ap.parse_args()

    from slimlm import export_gguf
    from slimlm.eval import evaluate_many
    from slimlm.eval.runtime import llama_cpp_quantize

    ref_path, ref, f32, imatrix, prov, t_im = reference_f32_imatrix(a)

    rows = []  # (preset, imatrix?, ours path, llama path, ours s, llama s)
    for preset in a.presets.split(","):
        for im in (None, imatrix):
            tag = f"{preset}{'-imat' if im else ''}"
            ours, theirs = RESULTS / f"slimlm-{tag}.gguf", RESULTS / f"llamacpp-{tag}.gguf"
            t0 = time.perf_counter()
            export_gguf(ref, ours, preset, overwrite=True, progress=False, imatrix=im)
            t_ours = time.perf_counter() - t0
            t_theirs = llama_cpp_quantize(f32, theirs, preset, imatrix=im)
            rows.append((preset, im is not None, ours, theirs, t_ours, t_theirs))
            print(f"{tag}: slimlm {t_ours:.2f}s, llama.cpp {t_theirs:.2f}s", flush=True)

    if a.timing_only:
        print("\n| preset | imatrix | slimlm s | llama.cpp s | time ratio |\n|---|---|---|---|---|")
        for preset, has_im, _, _, t_o, t_t in rows:
            print(f"| {preset} | {'yes' if has_im else 'no'} | {t_o:.2f} | {t_t:.2f} | {t_o / t_t:.2f} |")
        bad = [r for r in rows if r[0] == "Q4_K_M" and not r[1] and r[4] > 3 * r[5]]
        print("FAIL  Q4_K_M time ratio > 3" if bad else "PASS  Q4_K_M time <= 3x llama.cpp's")
        return 1 if bad else 0
    files = [p for r in rows for p in (r[2], r[3])]
    digest = {p: tensor_digest(p) for p in files}
    unique = list({digest[p]: p for p in reversed(files)}.values())
    print(f"{len(files)} files, {len(unique)} with distinct tensor data: evaluating those", flush=True)
    res = evaluate_many(unique, ref, text_path=a.text, n_ctx=512, max_chunks=a.chunks, speed=False,
                        progress=True)
    by_digest = {digest[p]: r for p, r in zip(unique, res, strict=True)}
    by = {p: by_digest[digest[p]] for p in files}
    r0 = res[0]
    print(f"\nmodel: {ref_path.name}, reference in torch f32 (PPL {r0['ref_ppl']:.4f}); imatrix: {prov} "
          f"({t_im:.1f}s)")
    print(f"text: {r0['text']}; {r0['n_chunks']} chunks x 512, {r0['n_scored_tokens']} scored tokens\n")
    print("| preset | imatrix | slimlm MiB | llama.cpp MiB | size ratio | same bytes | slimlm KLD | llama.cpp KLD "
          "| KLD ratio | slimlm PPL | llama.cpp PPL | slimlm top-1 | llama.cpp top-1 | slimlm s | llama.cpp s "
          "| time ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    fails, table = [], []
    for preset, has_im, ours, theirs, t_o, t_t in rows:
        o, t = by[ours], by[theirs]
        size_r = o["model"]["file_bytes"] / t["model"]["file_bytes"]
        kld_r = o["kld"] / t["kld"] if t["kld"] > 0 else float("nan")
        same = digest[ours] == digest[theirs]
        print(f"| {preset} | {'yes' if has_im else 'no'} | {o['model']['file_bytes'] / 2**20:.2f} | "
              f"{t['model']['file_bytes'] / 2**20:.2f} | {size_r:.4f} | {'yes' if same else 'no'} | {o['kld']:.6f} | "
              f"{t['kld']:.6f} | {kld_r:.4f} | {o['ppl']:.4f} | {t['ppl']:.4f} | {o['top1_agreement']:.4f} | "
              f"{t['top1_agreement']:.4f} | {t_o:.2f} | {t_t:.2f} | {t_o / t_t:.2f} |")
        table.append(dict(preset=preset, imatrix=has_im, same_tensor_bytes=same, slimlm=o, llama_cpp=t,
                          slimlm_s=t_o, llama_cpp_s=t_t))
        if abs(size_r - 1) > 0.005:
            fails.append(f"{preset}{' +imatrix' if has_im else ''}: size ratio {size_r:.4f}")
        if kld_r > 1.05:
            fails.append(f"{preset}{' +imatrix' if has_im else ''}: KLD ratio {kld_r:.4f}")
        if preset == "Q4_K_M" and not has_im and t_o > 3 * t_t:
            fails.append(f"Q4_K_M time ratio {t_o / t_t:.2f} > 3")
    # every file loads in llama.cpp and generates text (greedy, 16 tokens)
    from slimlm.eval.runtime import LlamaCppRunner
    prompt = "The capital of France is"
    print(f"\ngreedy continuations of {prompt!r} in llama.cpp:")
    for p in unique:
        r = LlamaCppRunner(p, 128, logits_all=False)
        try:
            text = r.generate(prompt, 16)
        finally:
            r.close()
        print(f"  {p.name}: {text!r}")
        if not text.strip():
            fails.append(f"{p.name}: generated no text")
    (RESULTS / "presets.json").write_text(json.dumps({"reference": str(ref_path), "imatrix": prov,
                                                      "rows": table}, indent=1, default=str))
    print()
    print("\n".join(f"FAIL  {f}" for f in fails) if fails else "PASS  every preset: size within 0.5%, "
          "KLD <= 1.05x llama.cpp's, Q4_K_M time <= 3x")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
