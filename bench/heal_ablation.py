#!/usr/bin/env python3
"""Healing ablations (issue 13): which pruning shape heals best, and does a longer training context help.

Teacher: the dithered SmolLM2-135M-Instruct F32 reference (foundation.py); training text brown-calib.txt, evaluation
brown-eval.txt (torch, --chunks x 512 tokens). Two questions, each row measured in this run:

- layer share (`--shares`): slimlm's default structured method (mlp+layers) at --ratio, with that share of the
  removed parameters taken as whole layers; each pruned model then gets heal_model's cheap stage (block-wise
  reconstruction on 128 x 256 training tokens, at most --bw-seconds) and --e2e of end-to-end distillation.
  Minitron found width pruning heals better than depth pruning after long retraining; on a CPU budget the
  question is what heals best in minutes.
- block-wise reconstruction's text (`--bw-rows`): from the default share's pruned model, block-wise reconstruction
  alone (4 epochs, no time limit) on that many 256-token training rows; is more text worth its time?
- training context (`--seq-lens`): from the default share's block-wise state, --e2e of end-to-end distillation
  at each sequence length (the same tokens per step: 1024 / seq_len sequences). The evaluation scores 512-token
  windows: does training on 256-token rows leave the later positions behind?
- other end-to-end settings (`--variants`): from the same block-wise state, --e2e of end-to-end distillation with
  TrainConfig fields changed, one variant per `;`-separated item of `field=value[,field=value]` (for example
  `train_params=all;hidden_weight=1;lr=4e-4`), next to the defaults (seq_len 256).

    python bench/heal_ablation.py [--shares 0.3,0.6,0.8] [--seq-lens 256,512] [--bw-rows 128,256] [--e2e 240s]
                                [--bw-seconds 360] [--variants 'train_params=all;lr=4e-4']
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from foundation import RESULTS, add_common_args, machine, reference_model  # noqa: E402


def parse_variants(text: str) -> list[tuple[str, dict]]:
    """--variants: ';'-separated items of field=value[,field=value] of TrainConfig, each value parsed as its field's
    type (bool: 1/0/true/false)."""
    from slimlm.train.config import TrainConfig
    kinds = {f.name: str(f.type) for f in dataclasses.fields(TrainConfig)}
    variants = []
    for item in (x.strip() for x in text.split(";")):
        if not item:
            continue
        over = {}
        for kv in item.split(","):
            k, _, v = kv.partition("=")
            if k not in kinds or not v:
                raise SystemExit(f"--variants: {kv!r} is not field=value of a TrainConfig field")
            if k == "seq_len":                         # the rows are loaded at 256 tokens
                raise SystemExit(f"--variants: {k} is not a variant here; compare training contexts with --seq-lens")
            kind = kinds[k]
            try:
                if kind.startswith("bool"):
                    if v.lower() not in ("1", "0", "true", "false"):
                        raise ValueError(v)
                    over[k] = v.lower() in ("1", "true")
                elif kind.startswith("str"):
                    over[k] = v
                elif kind.startswith("float"):
                    over[k] = float(v)
                elif kind.startswith("int"):
                    over[k] = int(v)
                else:
                    raise SystemExit(f"--variants: {k} ({kind}) cannot be given here")
            except ValueError:
                raise SystemExit(f"--variants: {k}={v!r} is not a {kind}") from None
        variants.append((item, over))
    return variants


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, eval_chunks=4)
    ap.set_defaults(calib_chunks=16)
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--shares", default="0.3,0.6,0.8", help="layer shares to compare (comma list; '' skips)")
    ap.add_argument("--seq-lens", default="256,512", help="end-to-end sequence lengths to compare ('' skips)")
    ap.add_argument("--bw-rows", default="128,256", help="block-wise reconstruction's training rows to compare ('' "
                    "skips)")
    ap.add_argument("--variants", default="", help="end-to-end TrainConfig variants from the block-wise state: "
                    "';'-separated items of field=value[,field=value] ('' skips)")
    ap.add_argument("--e2e", default="240s", help="end-to-end budget of every row (duration or tokens)")
    ap.add_argument("--bw-seconds", type=float, default=360, help="block-wise reconstruction's time limit")
    a = ap.parse_args()
    variants = parse_variants(a.variants)         # refused before minutes of loading and pruning

    import torch

    from slimlm import load
    from slimlm.calib import calibration_chunks, read_text
    from slimlm.eval import evaluate_many
    from slimlm.prune.command import LAYER_SHARE, PruneConfig, structured_prune
    from slimlm.train import stages
    from slimlm.train.config import TrainConfig
    from slimlm.train.data import load_train_data
    from slimlm.train.heal import HealConfig, heldout_kl
    from slimlm.train.trainer import train

    ref = load(reference_model(a.model), progress=False)
    eval_text, _ = read_text(a.text, "eval", "--text")
    chunks, _ = calibration_chunks(ref, a.calib, n_ctx=512, max_chunks=a.calib_chunks)
    ev_kw = dict(text_path=a.text, n_ctx=512, max_chunks=a.chunks, speed=False, progress=False)
    rows: dict = {}
    out_json = RESULTS / "heal-ablation.json"
    RESULTS.mkdir(parents=True, exist_ok=True)

    def kld(m) -> dict:
        e = evaluate_many([m], ref, **ev_kw)[0]
        return {"kld": e["kld"], "ppl": e["ppl"], "n_scored_tokens": e["n_scored_tokens"]}

    def save() -> None:
        out_json.write_text(json.dumps({"rows": rows, "machine": machine(), "args": vars(a)}, indent=1, default=str))

    def e2e(m, data, layer_map, seq_len: int = 256, **over) -> dict:
        over = {"micro_batch": max(1, 1024 // seq_len), **over}      # 1024 tokens per step unless a variant says
        cfg = TrainConfig(budget=a.e2e, seq_len=seq_len, eval_every=0, checkpoint_every=0, compile="off", **over)
        t = time.perf_counter()
        r = train(m, ref, data, cfg, folder=RESULTS / "heal-ablation-work", progress=False, layer_map=layer_map)
        return {"e2e_seconds": time.perf_counter() - t, "e2e_tokens": r["tokens"], "e2e_tps": r["tokens_per_s"]}

    asked = [float(x) for x in a.shares.split(",") if x]
    shares = list(asked)
    seq_lens = [int(x) for x in a.seq_lens.split(",") if x]
    if variants and 256 not in seq_lens:
        seq_lens.append(256)          # the defaults' row, for comparison
    bw_rows = [int(x) for x in a.bw_rows.split(",") if x]
    if (seq_lens or bw_rows) and LAYER_SHARE not in shares:
        shares.append(LAYER_SHARE)
    base = None
    for share in shares:
        torch.manual_seed(0)
        t = time.perf_counter()
        m, st = structured_prune(ref, chunks, PruneConfig(ratio=a.ratio, layer_share=share), print, False)
        row = {"prune_seconds": time.perf_counter() - t, "layers_removed": st["drop_layers"],
               "params_after": st["params_after"]}
        layer_map = stages.infer_layer_map(ref, m)
        data = load_train_data(m, [a.calib], seq_len=256, n_heldout=8, eval_text=eval_text, progress=False)
        row["heldout_kl_unhealed"] = heldout_kl(m, ref, data.heldout)
        if share == LAYER_SHARE and bw_rows:
            unhealed = (copy.deepcopy(m), data, layer_map)
        if share not in asked and not seq_lens:
            continue
        t = time.perf_counter()
        stages.blockwise_reconstruction(ref, m, data.train[:HealConfig().stage_rows], layer_map, progress=False,
                                        deadline=time.monotonic() + a.bw_seconds)
        row["blockwise_seconds"] = time.perf_counter() - t
        row["blockwise"] = kld(m)
        if share == LAYER_SHARE and seq_lens:
            base = (copy.deepcopy(m), layer_map)
        if share in asked:
            row.update(e2e(m, data, layer_map))
            row["healed"] = kld(m)
            rows[f"layer share {share:g}"] = row
            print(f"ROW layer share {share:g}: {st['params_after'] / 1e6:.1f}M params; block-wise KLD "
                  f"{row['blockwise']['kld']:.4f}; + e2e {a.e2e} ({row['e2e_tokens']:,} tokens) KLD "
                  f"{row['healed']['kld']:.4f} PPL {row['healed']['ppl']:.2f}", flush=True)
            save()
    for n in bw_rows:
        m0, data, layer_map = unhealed
        m = copy.deepcopy(m0)
        t = time.perf_counter()
        r = stages.blockwise_reconstruction(ref, m, data.train[:n], layer_map, progress=False)
        row = {"blockwise_seconds": time.perf_counter() - t, "steps": r["steps"], "tokens": int(data.train[:n].numel()),
               "heldout_kl": heldout_kl(m, ref, data.heldout), "healed": kld(m)}
        rows[f"block-wise {n} rows"] = row
        print(f"ROW layer share {LAYER_SHARE:g}, block-wise on {n} x 256 tokens: {row['blockwise_seconds']:.0f} s, "
              f"held-out KL {row['heldout_kl']:.4f}, KLD {row['healed']['kld']:.4f}", flush=True)
        save()
    for L in seq_lens:
        m0, layer_map = base
        m = copy.deepcopy(m0)
        data = load_train_data(m, [a.calib], seq_len=L, n_heldout=8, eval_text=eval_text, progress=False)
        row = e2e(m, data, layer_map, seq_len=L)
        row["healed"] = kld(m)
        rows[f"seq_len {L}"] = row
        print(f"ROW layer share {LAYER_SHARE:g}, e2e at seq_len {L}: {row['e2e_tokens']:,} tokens at "
              f"{row['e2e_tps']:.0f} tok/s, KLD {row['healed']['kld']:.4f} PPL {row['healed']['ppl']:.2f}", flush=True)
        save()
    for name, over in variants:
        m0, layer_map = base
        m = copy.deepcopy(m0)
        data = load_train_data(m, [a.calib], seq_len=256, n_heldout=8, eval_text=eval_text, progress=False)
        row = e2e(m, data, layer_map, **over)
        row["healed"] = kld(m)
        rows[f"e2e {name}"] = row
        print(f"ROW layer share {LAYER_SHARE:g}, e2e with {name}: {row['e2e_tokens']:,} tokens at "
              f"{row['e2e_tps']:.0f} tok/s, KLD {row['healed']['kld']:.4f} PPL {row['healed']['ppl']:.2f}", flush=True)
        save()
    n_tok = next(iter(rows.values()))["healed"]["n_scored_tokens"] if rows else 0
    print(f"\nSmolLM2-135M (dithered F32 reference) -{a.ratio:.0%}, healed on {Path(a.calib).name}, evaluated on "
          f"{Path(a.text).name} ({n_tok:,} scored tokens), machine {machine()}; results in {out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
