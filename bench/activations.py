#!/usr/bin/env python3
"""What llama.cpp's runtime adds to a file's KL divergence, and what pricing it in the size budget's type choice gains.

llama.cpp's CPU backend multiplies a block-quantized weight with activations rounded to the type's vec_dot type
(Q8_K: blocks of 256 for the K-quants and IQ4_XS; Q8_0/Q8_1: blocks of 32 for the legacy types;
slimlm/quant/activations.py). Reference: the dithered SmolLM2-135M-Instruct F32 model; imatrix and calibration:
brown-calib; evaluation: brown-eval, --chunks x 512 tokens, every row against the reference in torch. Three tables:

1. slimlm rtn / gptq at llama.cpp Q4_K_M+imatrix's file size, the types priced by the weights alone (as before) and
   with the activations' rounding (the default since), next to llama.cpp's file.
2. The GPTQ file (weights-only price): its dequantized weights in torch, by group (the rest of the model exact),
   then all of them, all of them with the emulated activations, and the file in llama.cpp.
3. The activations' rounding alone on the reference's f32 weights.

    python bench/activations.py [--chunks 8] [--calib-chunks 32]
"""
from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from foundation import RESULTS, add_common_args, machine, reference_f32_imatrix  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, 8)
    a = ap.parse_args()

    import torch
    from gguf import GGUFReader

    import slimlm
    from slimlm.compress import CompressConfig, compress
    from slimlm.eval import evaluate_many
    from slimlm.eval.runtime import llama_cpp_quantize
    from slimlm.quant.activations import emulate
    from slimlm.quant.imatrix import ImportanceMatrix

    ref_path, ref, f32, _, prov, _ = reference_f32_imatrix(a)
    im = RESULTS / "imatrix.gguf"
    lc = RESULTS / "act-llamacpp-Q4_K_M.gguf"
    llama_cpp_quantize(f32, lc, "Q4_K_M", imatrix=ImportanceMatrix.load(im))
    files = {"llama.cpp Q4_K_M+imatrix": lc}
    for method in ("rtn", "gptq"):
        for price in (False, True):
            out = RESULTS / f"act-{method}-{'act' if price else 'weights'}.gguf"
            compress(ref_path, out, CompressConfig(imatrix=str(im), calib=a.calib, calib_chunks=a.calib_chunks,
                                                   evaluate=False, method=method, target_size=str(lc.stat().st_size),
                                                   price_activations=price), overwrite=True, progress=False)
            files[f"slimlm {method}, size of Q4_K_M, priced: {'weights + activations' if price else 'weights'}"] = out

    def kinds(path):
        return {t.name: t.tensor_type.name for t in GGUFReader(str(path)).tensors}

    start = files["slimlm gptq, size of Q4_K_M, priced: weights"]
    q = slimlm.load(str(start), progress=False)
    qs = dict(q.module.named_parameters())
    # by GGUF tensor name (llama.cpp's roles, any family)
    groups = {"token embedding / output (tied)": r"^(token_embd|output)\.", "attn_q, attn_k": r"\.attn_(q|k)\.",
              "attn_v": r"\.attn_v\.", "attn_output": r"\.attn_output\.", "ffn_gate, ffn_up": r"\.ffn_(gate|up)\.",
              "ffn_down": r"\.ffn_down\.", "all": ""}
    models, names = [], []
    for k, f in groups.items():
        m = copy.deepcopy(ref)
        with torch.no_grad():
            for n, p in m.module.named_parameters():
                if re.search(f, q.spec.hf_to_gguf(n)) and n in qs and qs[n].shape == p.shape:
                    p.copy_(qs[n])
        models.append(m)
        names.append(f"dequantized weights in torch: {k}")
    m = copy.deepcopy(models[-1])
    emulate(m, kinds(start))
    models.append(m)
    names.append("dequantized weights in torch: all, activations rounded as llama.cpp does")
    alone = {"every linear's inputs as Q8_0 (32-wide blocks)": lambda n: "Q8_0",
             "ffn_down's inputs as Q8_0 (a legacy-type ffn_down)": lambda n: "Q8_0" if "ffn_down" in n else "F32",
             "ffn_down's inputs as Q8_K (a K-quant ffn_down)": lambda n: "Q4_K" if "ffn_down" in n else "F32"}
    ref_types = kinds(f32)
    for k, f in alone.items():
        m = copy.deepcopy(ref)
        emulate(m, {n: f(n) for n in ref_types})
        models.append(m)
        names.append(f"f32 weights, {k}")
    ev = [*files.values(), *models]
    res = evaluate_many([str(x) if isinstance(x, Path) else x for x in ev], ref, text_path=a.text, n_ctx=512,
                        max_chunks=a.chunks, speed=False, progress=True)
    rows = dict(zip([*files, *names], res, strict=True))
    r0 = res[0]
    print(f"\nmodel: {ref_path.name}, reference in torch f32; imatrix and calibration: {prov}")
    print(f"text: {r0['text']}; {r0['n_chunks']} chunks x 512, {r0['n_scored_tokens']} scored tokens; "
          f"machine: {machine()['cpu']}\n")
    base = r0["kld"]
    print("| file (llama.cpp) | MiB | KLD | x llama.cpp | PPL |\n|---|---|---|---|---|")
    for k in files:
        r = rows[k]
        print(f"| {k} | {r['model']['file_bytes'] / 2**20:.2f} | {r['kld']:.6f} | {r['kld'] / base:.3f}x | "
              f"{r['ppl']:.4f} |")
    print("\n| the GPTQ file (weights-only price), by group | KLD |\n|---|---|")
    for k in names[:len(groups) + 1]:
        print(f"| {k} | {rows[k]['kld']:.6f} |")
    print(f"| the file in llama.cpp | {rows['slimlm gptq, size of Q4_K_M, priced: weights']['kld']:.6f} |")
    print("\n| llama.cpp's activation rounding alone | KLD |\n|---|---|")
    for k in names[len(groups) + 1:]:
        print(f"| {k} | {rows[k]['kld']:.6f} |")
    print()
    for k, path in files.items():
        down = Counter(t for n, t in kinds(path).items() if "ffn_down" in n)
        print(f"{k}: ffn_down types {dict(sorted(down.items()))}")
    (RESULTS / "activations.json").write_text(json.dumps(
        {"rows": {k: {"kld": r["kld"], "ppl": r["ppl"], "bytes": r["model"]["file_bytes"]} for k, r in rows.items()},
         "machine": machine()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
