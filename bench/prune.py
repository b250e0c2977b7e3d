#!/usr/bin/env python3
"""Pruning benchmark (issue 5): weight pruning and structured pruning against llama.cpp's layer pruning, one run.

Reference: the dithered SmolLM2-135M-Instruct F32 model (see foundation.py), evaluated in torch. Every pruned
model is exported as a GGUF and evaluated in llama.cpp on the same tokens of ../shared/data/brown-eval.txt;
calibration: ../shared/data/brown-calib.txt. No healing anywhere.

Rows:
- weight pruning (magnitude / Wanda / SparseGPT) at 50% unstructured and 2:4, written as Q8_0 (zeros stay zeros in
  Q8_0; the file does not shrink: llama.cpp has no sparse format); Wanda and SparseGPT at 50% also with per-layer
  sparsity (OWL, measured sensitivity);
- structured pruning to --ratio fewer parameters at Q8_0: slimlm's methods (mlp+layers at layer shares 0.3, 0.4,
  0.6 = default and 0.8: 3, 4, 6 and 8 layers of SmolLM2 at --ratio 0.25), and llama.cpp's own layer pruning
  (`prune_layers` in llama_model_quantize's parameters, as `llama-quantize --prune-layers`) removing the layer
  count that takes at least as many parameters, with the layers chosen by slimlm's block-influence ranking (the
  most favourable choice we know for llama.cpp; llama-quantize itself leaves the choice to the user) and,
  also, the last layers before the final one (the common manual choice);
- format-aware hidden 576 -> 512 at Q4_K_M: every 2-D weight must be a K-quant.
Speed: llama.cpp prompt and generation tokens/s, median of --repeats runs, files in shuffled round-robin order:
every structured and format-aware file, and the weight-pruned files in WEIGHT_TIMED (zeros in Q8_0: expected at
the dense file's speed, measured here rather than assumed).

Checks: (a) Wanda and SparseGPT KLD < magnitude at 50% and 2:4; (b) for slimlm's default structured method
(mlp+layers) at --ratio: >= 1.25x generation tokens/s of the unpruned Q8_0 (median over rounds of the ratio to
the unpruned file's run in the same round; quartiles printed), KLD below llama.cpp's layer pruning at the same or
larger parameter removal; (c) every 2-D weight of the hidden-512 Q4_K_M file is a K-quant, and it generates;
(d) every weight-pruned file has exactly the unpruned Q8_0 file's size (llama.cpp has no sparse format).

    python bench/prune.py [--ratio 0.25] [--chunks 8] [--calib-chunks 16]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from foundation import RESULTS, add_common_args, reference_model  # noqa: E402

DEFAULT = "slimlm mlp+layers (layer share 0.6, obs, global widths: deci) = default"
ACCURATE = "slimlm mlp (obs, global widths: deci)"
LAYER_SHARES = (0.3, 0.4, 0.8)   # mlp+layers rows besides the default 0.6 (how the default share was chosen)
WEIGHT_TIMED = ("wanda 50%", "sparsegpt 2:4")   # weight-pruned files in the speed rounds (one per pattern)


def speeds(paths: dict, prompt, repeats: int, n_gen: int) -> dict:
    import random

    from slimlm.eval.runtime import LlamaCppRunner
    runs = {n: [] for n in paths}
    rng = random.Random(0)
    for _ in range(repeats):
        order = list(paths.items())
        rng.shuffle(order)                     # no file always first (or last) in a round
        for n, p in order:
            r = LlamaCppRunner(p, 512, logits_all=False)
            try:
                runs[n].append(r.speed(prompt, n_gen))
            finally:
                r.close()
    base = next(iter(paths))          # the first file is the reference of the paired ratios
    out = {}
    for n, v in runs.items():
        ratios = [s["gen_tps"] / b["gen_tps"] for s, b in zip(v, runs[base], strict=True)]
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        out[n] = {"gen_tps": statistics.median(s["gen_tps"] for s in v),
                  "prompt_tps": statistics.median(s["prompt_tps"] for s in v),
                  "gen_ratio": statistics.median(ratios), "gen_ratio_q1": q[0], "gen_ratio_q3": q[2]}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, eval_chunks=8)
    ap.set_defaults(calib_chunks=16)
    ap.add_argument("--ratio", type=float, default=0.25, help="structured: fraction of parameters removed")
    ap.add_argument("--repeats", type=int, default=15, help="speed runs per file (median)")
    ap.add_argument("--n-gen", type=int, default=128, help="generated tokens per speed run")
    ap.add_argument("--skip-weight", action="store_true", help="skip the weight-pruning rows")
    a = ap.parse_args()

    from slimlm import export_gguf, load
    from slimlm.calib import calibration_chunks
    from slimlm.eval import evaluate_many
    from slimlm.eval.runtime import LlamaCppRunner, llama_cpp_quantize
    from slimlm.gguf.reader import read_gguf
    from slimlm.prune.command import PruneConfig, _split_layers, allocate_widths, make_plan
    from slimlm.prune.sensitivity import weight_sparsities
    from slimlm.prune.structured import Plan, block_influence, n_params, planned_config, prune_structured
    from slimlm.prune.weights import parse_sparsity, prune_weights_model

    RESULTS.mkdir(parents=True, exist_ok=True)
    out_dir = RESULTS / "prune"
    out_dir.mkdir(exist_ok=True)
    ref_path = reference_model(a.model)
    ref = load(ref_path, progress=False)
    chunks, prov = calibration_chunks(ref, a.calib, n_ctx=512, max_chunks=a.calib_chunks)
    total = ref.n_params()
    rows: dict[str, dict] = {}      # name -> {path, params, seconds, group}

    def add(name, model, type_, seconds, group):
        p = out_dir / (name.replace(" ", "_").replace("/", "-").replace(":", "-") + f"-{type_}.gguf")
        export_gguf(model, p, type_, overwrite=True, progress=False)
        rows[name] = {"path": p, "params": model.n_params(), "seconds": seconds, "group": group, "type": type_}

    add("unpruned", ref, "Q8_0", 0.0, "base")
    if not a.skip_weight:
        for pattern in ("50%", "2:4"):
            sp, nm = parse_sparsity(pattern)
            for method in ("magnitude", "wanda", "sparsegpt"):
                print(f"{method} {pattern} ...", flush=True)
                m, st = prune_weights_model(ref, chunks, method, sp, nm, progress=True)
                add(f"{method} {pattern}", m, "Q8_0", st["seconds"], f"weight {pattern}")
        for method in ("wanda", "sparsegpt"):        # per-layer sparsity at 50%: OWL, measured sensitivity
            t0 = time.perf_counter()
            m, st = prune_weights_model(ref, chunks, method, 0.5, owl=True, progress=True)
            add(f"{method} 50% OWL", m, "Q8_0", time.perf_counter() - t0, "weight 50%")
            t0 = time.perf_counter()
            per = weight_sparsities(ref, chunks[:-1], chunks[-1], method, 0.5)["sparsities"]
            m, st = prune_weights_model(ref, chunks, method, 0.5, sparsities=per, progress=True)
            add(f"{method} 50% sensitivity", m, "Q8_0", time.perf_counter() - t0, "weight 50%")

    bi = block_influence(ref, chunks[:4], progress=False)
    order = sorted(range(len(bi)), key=lambda i: bi[i])
    structured = {}
    variants = [(DEFAULT, "mlp+layers", "obs", "global", 0.6), (ACCURATE, "mlp", "obs", "global", 0.6)]
    variants += [(f"slimlm mlp+layers (layer share {sh}, obs, global widths: deci)", "mlp+layers", "obs", "global",
                  sh) for sh in LAYER_SHARES]
    variants += [("slimlm mlp (obs, uniform widths)", "mlp", "obs", "uniform", 0.6),
                 ("slimlm mlp (activation, uniform)", "mlp", "activation", "uniform", 0.6),
                 ("slimlm width (obs, uniform)", "width", "obs", "uniform", 0.6),
                 ("slimlm layers (block influence)", "layers", "obs", "uniform", 0.6)]
    for label, method, imp, alloc, share in variants:
        cfg = PruneConfig(ratio=a.ratio, method=method, importance=imp, allocate=alloc, layer_share=share)
        t0 = time.perf_counter()
        if method == "mlp+layers":
            cfg = _split_layers(ref, cfg, order)
            if label != DEFAULT:                       # name the layer count the share gives at this --ratio
                n = len(cfg.drop_layers)
                label = label.replace(f"share {share},", f"share {share} = {n} layer{'s' * (n != 1)},")
        plan = make_plan(ref, cfg, order)
        if cfg.allocation != "uniform":
            allocate_widths(ref, chunks, plan, cfg, print, True)
        print(f"{label}: {plan.describe()} ...", flush=True)
        m, st = prune_structured(ref, chunks, plan, importance=imp, progress=True)
        add(label, m, "Q8_0", time.perf_counter() - t0, "structured")
        structured[label] = {"plan": plan.describe(), "ffn_per_layer": plan.ffn_per_layer,
                             "arch": "deci" if plan.ffn_per_layer else "llama"}
    removed_ours = 1 - rows[DEFAULT]["params"] / total
    k = next(k for k in range(1, len(bi)) if
             1 - n_params(planned_config(ref.config, Plan(drop_layers=list(range(k))))) / total >= removed_ours)
    f32 = RESULTS / "slimlm-F32.gguf"
    export_gguf(ref, f32, "F32", overwrite=True, progress=False)
    n_layer = len(bi)
    for label, layers in ((f"llama.cpp prune_layers {k} (slimlm's block-influence choice)", order[:k]),
                          (f"llama.cpp prune_layers {k} (last before the final)", list(range(n_layer - 1 - k,
                                                                                              n_layer - 1))),
                          (f"llama.cpp prune_layers {k - 1} (slimlm's block-influence choice)", order[:k - 1])):
        p = out_dir / f"llamacpp-prune{len(layers)}-{'bi' if 'influence' in label else 'last'}-Q8_0.gguf"
        s = llama_cpp_quantize(f32, p, "Q8_0", prune_layers=layers)
        params = n_params(planned_config(ref.config, Plan(drop_layers=layers)))
        rows[label] = {"path": p, "params": params, "seconds": s, "group": "structured", "type": "Q8_0",
                       "layers": sorted(layers)}

    # format-aware hidden 512 at Q4_K_M (acceptance c), with the unpruned Q4_K_M beside it
    add("unpruned Q4_K_M", ref, "Q4_K_M", 0.0, "format-aware")
    cfg_c = PruneConfig(hidden=512, format_aware=True, type="Q4_K_M")
    plan_c = make_plan(ref, cfg_c, None)
    t0 = time.perf_counter()
    m, _ = prune_structured(ref, chunks, plan_c, importance="obs", progress=True)
    add(f"slimlm format-aware ({plan_c.describe()})", m, "Q4_K_M", time.perf_counter() - t0, "format-aware")
    c_name = f"slimlm format-aware ({plan_c.describe()})"
    g = read_gguf(rows[c_name]["path"])
    not_k = [f"{t.name}:{t.ggml_type.name}" for t in g.tensors if len(t.shape) == 2 and not t.ggml_type.name.endswith("_K")]
    r = LlamaCppRunner(rows[c_name]["path"], 256, logits_all=False)
    try:
        sample = r.generate("The history of the city", 16)
    finally:
        r.close()

    arch_b = read_gguf(rows[DEFAULT]["path"]).architecture
    r = LlamaCppRunner(rows[DEFAULT]["path"], 256, logits_all=False)
    try:
        sample_b = r.generate("The history of the city", 16)
    finally:
        r.close()

    names = list(rows)
    res = evaluate_many([rows[n]["path"] for n in names], ref, text_path=a.text, n_ctx=512, max_chunks=a.chunks,
                        speed=False, progress=True)
    sp = speeds({n: rows[n]["path"] for n in names
                 if rows[n]["group"] in ("base", "structured", "format-aware") or n in WEIGHT_TIMED},
                chunks[0][:128], a.repeats, a.n_gen)
    r0 = res[0]
    print(f"\nmodel: {ref_path.name} ({total / 1e6:.2f}M params), reference in torch f32 (PPL {r0['ref_ppl']:.4f})")
    print(f"calibration: {prov}")
    print(f"text: {r0['text']}; {r0['n_chunks']} chunks x {r0['n_ctx']} tokens, {r0['n_scored_tokens']} scored")
    import torch
    print(f"speed: llama.cpp, 128-token prompt + {a.n_gen} generated tokens (greedy), median of {a.repeats} runs in "
          f"shuffled round-robin order, {torch.get_num_threads()} threads")
    print("\n| model | type | params (M) | removed | MiB | PPL | KLD | top-1 | prompt tok/s | gen tok/s | "
          "gen x unpruned (paired median) | prune s |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    table = {}
    for n, r in zip(names, res, strict=True):
        row = rows[n]
        s = sp.get(n, {})
        table[n] = {**{k: v for k, v in row.items() if k != "path"}, "file": str(row["path"]), "ppl": r["ppl"],
                    "kld": r["kld"], "top1": r["top1_agreement"], "file_bytes": r["model"]["file_bytes"], **s}
        gen = f"{s['gen_tps']:.1f}" if s else "-"
        ratio = f"{s['gen_ratio']:.2f}x" if s else "-"
        print(f"| {n} | {row['type']} | {row['params'] / 1e6:.2f} | {1 - row['params'] / total:.1%} | "
              f"{r['model']['file_bytes'] / 2**20:.1f} | {r['ppl']:.3f} | {r['kld']:.4f} | "
              f"{100 * r['top1_agreement']:.1f}% | {s['prompt_tps']:.0f} | {gen} | {ratio} | {row['seconds']:.1f} |"
              if s else
              f"| {n} | {row['type']} | {row['params'] / 1e6:.2f} | {1 - row['params'] / total:.1%} | "
              f"{r['model']['file_bytes'] / 2**20:.1f} | {r['ppl']:.3f} | {r['kld']:.4f} | "
              f"{100 * r['top1_agreement']:.1f}% | - | - | - | {row['seconds']:.1f} |")
    checks = []
    if not a.skip_weight:
        for pattern in ("50%", "2:4"):
            mag = table[f"magnitude {pattern}"]["kld"]
            for meth in ("wanda", "sparsegpt"):
                kl = table[f"{meth} {pattern}"]["kld"]
                checks.append((kl < mag, f"(a) {meth} {pattern} KLD {kl:.4f} < magnitude {mag:.4f}"))
    ours = table[DEFAULT]
    lc = table[f"llama.cpp prune_layers {k} (slimlm's block-influence choice)"]
    lc_last = table[f"llama.cpp prune_layers {k} (last before the final)"]
    checks.append((arch_b == ("deci" if structured[DEFAULT]["ffn_per_layer"] else "llama") and bool(sample_b.strip()),
                   f"(b) slimlm default loads in llama.cpp as {arch_b} (per-layer widths: "
                   f"{structured[DEFAULT]['ffn_per_layer']}) and generates: {sample_b!r}"))
    checks.append((1 - ours["params"] / total >= a.ratio,
                   f"(b) slimlm default removes {1 - ours['params'] / total:.1%} >= {a.ratio:.0%} of parameters"))
    for name in (DEFAULT,):
        t = table[name]
        checks.append((t["gen_ratio"] >= 1.25 and t["kld"] < min(lc["kld"], lc_last["kld"]),
                       f"(b) {name}: generation {t['gen_tps']:.1f} tok/s, {t['gen_ratio']:.3f}x unpruned Q8_0 "
                       f"(median of paired ratios, quartiles {t['gen_ratio_q1']:.3f}-{t['gen_ratio_q3']:.3f}; needs >= 1.25x), "
                       f"KLD {t['kld']:.4f}"))
    best_lc = min(lc["kld"], lc_last["kld"])
    checks.append((ours["kld"] < best_lc and lc["params"] <= ours["params"],
                   f"(b) KLD {ours['kld']:.4f} < llama.cpp prune_layers {k} ({lc['params'] / 1e6:.2f}M params <= "
                   f"{ours['params'] / 1e6:.2f}M): best of its two layer choices {best_lc:.4f}"))
    checks.append((not not_k and bool(sample.strip()),
                   f"(c) hidden 512 Q4_K_M: 2-D tensors not K-quant: {not_k or 'none'}; generates: {sample!r}"))
    if not a.skip_weight:
        dense = table["unpruned"]["file_bytes"]
        sizes = {n: t["file_bytes"] for n, t in table.items() if t["group"].startswith("weight")}
        timed = ", ".join(f"{n} {table[n]['gen_ratio']:.2f}x (quartiles {table[n]['gen_ratio_q1']:.2f}-"
                          f"{table[n]['gen_ratio_q3']:.2f})" for n in WEIGHT_TIMED)
        checks.append((set(sizes.values()) == {dense},
                       f"(d) all {len(sizes)} weight-pruned files are {dense:,} bytes like the unpruned Q8_0: "
                       f"{'yes' if set(sizes.values()) == {dense} else sizes}; generation x unpruned: {timed}"))
    print()
    for ok, text in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {text}")
    out = RESULTS / "prune.json"
    out.write_text(json.dumps({"reference": str(ref_path), "calibration": prov, "text": r0["text"],
                               "scored_tokens": r0["n_scored_tokens"], "plans": structured, "table": table,
                               "checks": [{"ok": ok, "text": t} for ok, t in checks]}, indent=1, default=str))
    print(f"\nfull results: {out}")
    return 0 if all(ok for ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
