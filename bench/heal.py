#!/usr/bin/env python3
"""Healing benchmark (issue 13): what each healing stage buys back after structured pruning, one run.

Teacher: the dithered SmolLM2-135M-Instruct F32 reference (foundation.py). Student: the teacher with --ratio of its
parameters removed by slimlm's default structured method (mlp+layers). Training text: ../shared/data/brown-calib.txt;
evaluation: ../shared/data/brown-eval.txt (KLD / PPL / top-1 against the teacher in torch, --chunks x 512 tokens).

Rows (each measured on the same evaluation tokens):
- unhealed; + bias compensation; + block-wise reconstruction (torch-side evaluation);
- + end-to-end distillation with a --minutes wall-time budget for the whole healing (preparation included):
  the acceptance row, written as a Q8_0 GGUF and evaluated in llama.cpp, with llama.cpp's generation speed of the
  unpruned, the unhealed and the healed Q8_0 file;
- the teacher's top-k targets (slimlm's default; computed once per training token) vs full logits on the fly,
  both from the block-wise state at the same --compare-tokens (the top-k row is also "one-shot prune + heal" with
  heal_model's default stages at that many tokens);
- iterative: K = 2 and 3 rounds of prune 1/K of the way -> heal (heal_model's default stages; the block-wise rows
  and the end-to-end tokens split over the rounds, so the totals equal the one-shot row's), ending on exactly the
  one-shot shapes;
- training throughput: a plain PyTorch distillation loop (teacher on the fly, full logits, fp32, every parameter,
  AdamW) vs slimlm's trainer with its defaults, the same student, steps and batch, in this run; the plain loop
  runs before and after slimlm's (the machine's speed drifts) and the ratios are to the mean of its two rates.
Writes bench/results/heal.json and docs/heal-loss.png (the acceptance run's loss and held-out KL curves); with
--tag T, heal-T.json and heal-loss-T.png (a variant of one row beside the full run's files).

    python bench/heal.py [--minutes 30] [--compare-tokens 60k] [--ratio 0.25] [--chunks 8] [--skip ...]
    python bench/heal.py --skip stages,cache,iterative,throughput --train from-changed --tag from-changed
    python bench/heal.py --skip stages,cache,iterative,throughput --lr 4e-4 --tag lr4e-4
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from foundation import RESULTS, add_common_args, machine, reference_model  # noqa: E402


def plain_loop_tps(student, teacher, rows, steps: int) -> float:
    """The plain distillation step the issue measured: teacher on the fly, full logits, fp32, all parameters."""
    import torch

    from slimlm.train.losses import kl_full
    m = copy.deepcopy(student.module)
    for p in m.parameters():
        p.requires_grad_(True)
    m.train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-5)
    t = None
    for s in range(steps + 1):
        if s == 1:
            t = time.perf_counter()          # step 0 pays one-time costs
        ids = rows[s % rows.shape[0]:s % rows.shape[0] + 4]
        with torch.no_grad():
            tl = teacher.module(input_ids=ids, use_cache=False).logits
        loss = kl_full(m(input_ids=ids, use_cache=False).logits, tl)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * 4 * rows.shape[1] / (time.perf_counter() - t)


def loss_png(curve, evals, out: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([c[1] for c in curve], [c[2] for c in curve], lw=0.8, label="training loss (KL to the teacher)")
    ax.plot([e[0] * curve[0][1] / curve[0][0] for e in evals], [e[1] for e in evals], "o-", label="held-out KL")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("KL divergence")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)     # a copy of bench/ without docs/ lost a 30-minute run's files
    fig.savefig(out, dpi=110)
    plt.close(fig)


def gguf_rows(files: dict, ref, ev_kw: dict) -> dict:
    """The Q8_0 files evaluated in llama.cpp in one pass (speed rounds interleaved), a row each."""
    from slimlm.eval import evaluate_many
    gg = evaluate_many([str(p) for p in files.values()], ref, **{**ev_kw, "speed": True})
    return {f"llama.cpp Q8_0 {n}": {"kld": e["kld"], "ppl": e["ppl"], "top1": e["top1_agreement"],
                                    "gen_tps": e["model"]["speed"]["gen_tps"], "bytes": files[n].stat().st_size}
            for n, e in zip(files, gg, strict=True)}


def reeval(a) -> int:
    from slimlm import load
    ref = load(reference_model(a.model), progress=False)
    files = {n: RESULTS / "heal" / f"{n}-Q8_0.gguf" for n in ("unpruned", "unhealed", "healed")}
    rows = gguf_rows(files, ref, dict(text_path=a.text, n_ctx=512, max_chunks=a.chunks, progress=False))
    for n, r in rows.items():
        print(f"{n}: KLD {r['kld']:.4f}  PPL {r['ppl']:.2f}  top-1 {r['top1']:.2%}  {r['bytes'] / 2**20:.1f} MiB  "
              f"{r['gen_tps']:.1f} generated tok/s")
    (RESULTS / "heal-gguf.json").write_text(json.dumps(rows, indent=1))
    return 0


def main() -> int:
    from slimlm.train.config import TRAIN_PARAMS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, eval_chunks=8)
    ap.set_defaults(calib_chunks=16)
    ap.add_argument("--ratio", type=float, default=0.25, help="fraction of parameters removed (default 0.25)")
    ap.add_argument("--minutes", type=float, default=30, help="wall-time budget of the acceptance healing run")
    ap.add_argument("--compare-tokens", default="60k", help="training tokens of the cache vs full-logit runs")
    ap.add_argument("--throughput-steps", type=int, default=6)
    ap.add_argument("--skip", default="", help="comma list of: stages, e2e, cache, iterative, throughput")
    ap.add_argument("--train", default=None, choices=TRAIN_PARAMS, help="what trains in the acceptance row (default: "
                    "TrainConfig's)")
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate of the acceptance row (default: "
                    "TrainConfig's)")
    ap.add_argument("--micro-batch", type=int, default=None, help="256-token rows per step in the acceptance row "
                    "(default: TrainConfig's)")
    ap.add_argument("--seq-len", type=int, default=None, help="token rows of the acceptance row's end-to-end stage "
                    "(default: TrainConfig's 256; the evaluation scores positions 256-511 of 512-token chunks)")
    ap.add_argument("--tag", default="", help="suffix of the result files (heal-TAG.json, heal-loss-TAG.png, "
                    "results/heal-TAG/)")
    ap.add_argument("--reeval", action="store_true", help="only evaluate the Q8_0 files an earlier run wrote (unpruned, "
                    "unhealed, healed) in llama.cpp, speed included, into bench/results/heal-gguf.json")
    a = ap.parse_args()
    if a.reeval:
        return reeval(a)
    skip = set(filter(None, a.skip.split(",")))

    import torch

    from slimlm import export_gguf, load
    from slimlm.calib import calibration_chunks, read_text
    from slimlm.eval import evaluate_many
    from slimlm.prune.command import PruneConfig, structured_prune
    from slimlm.train import stages
    from slimlm.train.config import TrainConfig, parse_budget
    from slimlm.train.data import load_train_data
    from slimlm.train.heal import HealConfig, heal_model, heldout_kl
    from slimlm.train.trainer import train

    torch.manual_seed(0)
    sfx = f"-{a.tag}" if a.tag else ""
    out_dir = RESULTS / f"heal{sfx}"
    out_dir.mkdir(parents=True, exist_ok=True)
    ref_path = reference_model(a.model)
    ref = load(ref_path, progress=False)
    eval_text, _ = read_text(a.text, "eval", "--text")
    chunks, prov = calibration_chunks(ref, a.calib, n_ctx=512, max_chunks=a.calib_chunks)
    t = time.perf_counter()
    pruned, st = structured_prune(ref, chunks, PruneConfig(ratio=a.ratio), print, True)
    prune_s = time.perf_counter() - t
    layer_map = stages.infer_layer_map(ref, pruned)
    print(f"pruned {st['params_before'] / 1e6:.1f}M -> {st['params_after'] / 1e6:.1f}M parameters "
          f"({st['removed_fraction']:.1%}) in {prune_s:.0f} s; layer map {layer_map}", flush=True)
    ev_kw = dict(text_path=a.text, n_ctx=512, max_chunks=a.chunks, speed=False, progress=False)
    rows: dict = {}
    out_json = RESULTS / f"heal{sfx}.json"
    mach = machine()
    print(f"machine: {mach}", flush=True)

    def record(name: str, model, **info) -> None:
        """Evaluate a row as soon as it exists, print it and rewrite the JSON (a cut-short run keeps its rows)."""
        e = evaluate_many([model], ref, **ev_kw)[0]
        rows[name] = {**info, "kld": e["kld"], "ppl": e["ppl"], "top1": e["top1_agreement"], "ref_ppl": e["ref_ppl"],
                      "n_scored_tokens": e["n_scored_tokens"]}
        print(f"ROW {name}: KLD {e['kld']:.4f}  PPL {e['ppl']:.2f} (reference {e['ref_ppl']:.2f})  top-1 "
              f"{e['top1_agreement']:.2%}  {info}", flush=True)
        out_json.write_text(json.dumps({"rows": rows, "layer_map": layer_map, "prune": st, "machine": mach}, indent=1,
                                        default=str))

    data = load_train_data(pruned, [a.calib], seq_len=256, n_heldout=8, eval_text=eval_text, progress=False)
    stage_rows = data.train[:HealConfig().stage_rows]          # what slimlm heal gives the cheap stages
    record("unhealed", pruned, seconds=prune_s)
    m2, t_bias, t_bw = pruned, 0.0, 0.0
    if "stages" not in skip:
        m = copy.deepcopy(pruned)
        t = time.perf_counter()
        r = stages.bias_compensation(ref, m, stage_rows, layer_map, holdout=stage_rows.shape[0] // 8, progress=True)
        t_bias = time.perf_counter() - t
        record("+ bias compensation", m, seconds=t_bias, tokens=int(stage_rows.numel()))
        # what heal_model does with it (--bias): undone when the held-out rows of the training text got further
        kl0, kl1 = heldout_kl(pruned, ref, data.heldout), heldout_kl(m, ref, data.heldout)
        print(f"bias compensation: held-out KL {kl0:.4f} -> {kl1:.4f}" + ("; undone for the next rows" if kl1 > kl0
                                                                          else ""), flush=True)
        if kl1 > kl0:
            m, t_bias = pruned, 0.0
        m2 = copy.deepcopy(m)
        t = time.perf_counter()
        r = stages.blockwise_reconstruction(ref, m2, stage_rows, layer_map, progress=True)
        t_bw = time.perf_counter() - t
        record("+ block-wise reconstruction", m2, seconds=t_bw, tokens=int(stage_rows.numel()))

    T = a.compare_tokens
    if "cache" not in skip and "stages" not in skip:
        for kind in ("full", "topk"):
            s = copy.deepcopy(m2)
            cfg = TrainConfig(budget=T, teacher_targets=kind, eval_every=0, checkpoint_every=0)
            t = time.perf_counter()
            r = train(s, ref, data, cfg, folder=out_dir / f"work-{kind}", progress=True, layer_map=layer_map)
            how = f"top-{cfg.topk} targets" if kind == "topk" else "full logits on the fly"
            name = f"+ end-to-end {T} tokens, teacher {how}" + (" (= one-shot + heal)" if kind == "topk" else "")
            record(name, s, seconds=time.perf_counter() - t + t_bw + t_bias, tokens=r["tokens"],
                   tokens_per_s=r["tokens_per_s"], teacher=r["teacher_targets"])

    if "iterative" not in skip:
        from slimlm.arch import layer_dims
        from slimlm.prune.iterative import prune_iteratively
        from slimlm.prune.structured import Plan, block_influence
        bi = block_influence(ref, chunks[:4], progress=False)
        order = sorted(range(len(bi)), key=lambda i: bi[i])
        final = Plan(drop_layers=[i for i in range(ref.config["num_hidden_layers"]) if i not in layer_map],
                     ffn_per_layer=[layer_dims(pruned.config, j)[0] for j in range(len(layer_map))])
        n_tok = parse_budget(T)[1]
        for K in (2, 3):
            def heal(student, lm, k, K=K):
                hc = HealConfig(train=TrainConfig(budget=str(int(n_tok // K)), eval_every=0, checkpoint_every=0),
                                data=(a.calib,), stage_rows=HealConfig().stage_rows // K)
                return heal_model(student, ref, hc, folder=out_dir / f"work-it{K}", layer_map=lm, eval_text=eval_text,
                                  progress=False, say=print)
            t = time.perf_counter()
            s, recs = prune_iteratively(ref, chunks, final, order, K, round_to=32, heal=heal, say=print)
            name = f"iterative K={K}: prune 1/{K}, heal {T}/{K} tokens, repeat"
            record(name, s, seconds=time.perf_counter() - t, params=s.n_params(),
                   tokens=sum(r["heal"]["stages"][-1]["detail"]["tokens"] for r in recs),
                   rounds=[{"round": r["round"], "plan": r["plan"], "params": r["params"],
                            "stages": [{k: v for k, v in x.items() if k != "detail"} for x in r["heal"]["stages"]]}
                           for r in recs])

    if "throughput" not in skip:
        rows_t = data.train[:64]
        # this machine's speed drifts by 10-20% within minutes: the plain loop runs before and after slimlm's
        # two runs, and the ratios are to the mean of its two rates (both printed and recorded)
        plain_before = plain_loop_tps(m2, ref, rows_t, a.throughput_steps)
        sub = type(data)(rows_t, data.heldout[:2], data.sources, data.fingerprint + "-tp")
        rows["throughput"] = {"plain_tps_before": plain_before}
        slimlm_tps = {}
        for comp in ("off", "on"):
            s = copy.deepcopy(m2)
            cfg = TrainConfig(budget=str((a.throughput_steps + 2) * 4 * 256), eval_every=0, checkpoint_every=0,
                              compile=comp)
            r = train(s, ref, sub, cfg, folder=out_dir / "work-tp", progress=False)
            # steady rate: from the end of step 2 (step 1 pays one-time costs: the compile) to the last; the teacher's
            # targets counted in (computed in the steps on the fly, or in the cache's build, spread over the steps)
            c = r["curve"]
            build = r["teacher_targets"]["build_seconds"] * (c[-1][1] - c[1][1]) / c[-1][1]
            tps = (c[-1][1] - c[1][1]) / (c[-1][4] - c[1][4] + build)
            name = "slimlm" if comp == "off" else "slimlm_compiled"
            slimlm_tps[name] = tps
            rows["throughput"] |= {f"{name}_tps": tps, f"{name}_first_steps_s": c[1][4],
                                   "teacher_targets": r["teacher_targets"], "precision": r["precision"],
                                   "trainable_params": r["trainable_params"]}
            print(f"throughput: slimlm (compile {comp}) {tps:.0f} tok/s (its first 2 steps took {c[1][4]:.0f} s; "
                  f"teacher {r['teacher_targets']}, {r['precision']}, {r['trainable_params'] / 1e6:.1f}M trainable)",
                  flush=True)
        plain_after = plain_loop_tps(m2, ref, rows_t, a.throughput_steps)
        plain = (plain_before + plain_after) / 2
        rows["throughput"] |= {"plain_tps_after": plain_after, "plain_tps": plain}
        for name, tps in slimlm_tps.items():
            rows["throughput"][f"{name}_ratio"] = tps / plain
            print(f"throughput: plain loop {plain_before:.0f} tok/s before, {plain_after:.0f} after (mean {plain:.0f}); "
                  f"{name} {tps:.0f} tok/s = {tps / plain:.2f}x", flush=True)

    heal_rec = None
    if "e2e" not in skip:
        s = copy.deepcopy(pruned)
        over = {k: v for k, v in (("train_params", a.train), ("lr", a.lr), ("micro_batch", a.micro_batch),
                                  ("seq_len", a.seq_len)) if v is not None}
        hc = HealConfig(train=TrainConfig(budget=f"{a.minutes:g}m", **over), data=(a.calib,))
        t = time.perf_counter()
        heal_rec = heal_model(s, ref, hc, folder=out_dir / "work-e2e", layer_map=layer_map, eval_text=eval_text,
                              progress=True, say=print)
        name = f"+ end-to-end, {a.minutes:g} min budget (preparation included)"
        e2e = heal_rec["stages"][-1]["detail"]
        print(f"end-to-end: {e2e['train_seconds']:.0f} s of training, of which held-out evaluations "
              f"{e2e.get('eval_seconds', 0):.0f} s and {e2e.get('checkpoints', 0)} checkpoints "
              f"{e2e.get('checkpoint_seconds', 0):.0f} s; teacher targets {e2e['teacher_targets']}", flush=True)
        record(name, s, seconds=time.perf_counter() - t, tokens=e2e["tokens"], tokens_per_s=e2e["tokens_per_s"],
               stages=[{k: v for k, v in x.items() if k != "detail"} for x in heal_rec["stages"]])
        loss_png(e2e["curve"], e2e["evals"], HERE.parent / "docs" / f"heal-loss{sfx}.png",
                 f"SmolLM2-135M -{a.ratio:.0%} params, healing {a.minutes:g} min on brown-calib (2 CPU cores)")
        files = {}
        for n, mm in (("unpruned", ref), ("unhealed", pruned), ("healed", s)):
            files[n] = out_dir / f"{n}-Q8_0.gguf"
            export_gguf(mm, files[n], "Q8_0", overwrite=True, progress=False)
        rows.update(gguf_rows(files, ref, ev_kw))
        out_json.write_text(json.dumps({"rows": rows, "heal": heal_rec, "machine": mach}, indent=1, default=str))

    n_tok = next(iter(rows.values()))["n_scored_tokens"]
    print(f"\nSmolLM2-135M (dithered F32 reference) -{st['removed_fraction']:.1%} parameters ({PruneConfig(ratio=a.ratio).method}); "
          f"eval {a.text}: {n_tok} tokens; training text {a.calib}; {mach['cpu']}, {mach['torch_threads']} threads, "
          f"{'bf16' if mach['fast_bf16'] else 'fp32 (no fast bf16)'}")
    print(f"{'row':<70} {'KLD':>8} {'PPL':>8} {'top-1':>7} {'tokens':>9} {'min':>6}")
    for n, r in rows.items():
        if "kld" in r:
            print(f"{n:<70} {r['kld']:8.4f} {r['ppl']:8.2f} {r['top1']:7.2%} {r.get('tokens', 0):9,} "
                  f"{r.get('seconds', 0) / 60:6.1f}")
    print(f"reference PPL {next(iter(rows.values()))['ref_ppl']:.2f}")
    for n, r in rows.items():
        if n.startswith("llama.cpp"):
            print(f"{n}: {r['bytes'] / 2**20:.1f} MiB, {r['gen_tps']:.1f} generated tok/s")
    out_json.write_text(json.dumps({"rows": rows, "heal": heal_rec, "n_scored_tokens": n_tok,
                                    "layer_map": layer_map, "prune": st, "machine": mach}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
