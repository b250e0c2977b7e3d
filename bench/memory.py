#!/usr/bin/env python3
"""Memory benchmark (issue 15): peak resident memory and time of `slimlm compress` and `slimlm prune` against the
model's size.

Builds random Llama-architecture HF folders (bfloat16 safetensors, one shard per decoder layer, SmolLM2's
tokenizer from the embedded model) of growing depth at one width, tensor by tensor: no model is ever whole in
memory, here or in slimlm. Each step runs slimlm as a child process and reads the child's peak resident set from
the kernel (wait4's ru_maxrss: file pages it mapped count too), with its wall time:

- gptq:   compress --method gptq --type Q4_K_M --stream on --no-eval (GPTQ on the bundled calibration text)
- calib:  compress --type Q4_K_M --calib --stream on --no-eval (importance matrix, then llama.cpp's rounding)
- prune:  prune --ratio 0.25 --stream on --no-eval (the default mlp+layers: block influence, OBS curves, OBS
          refit; a Q8_0 GGUF)
- whole:  the gptq step with --stream off on the smallest model (the in-memory path, for comparison)

Acceptance (a, c): the largest model (>= 2.7 GB on disk by default: 28 layers of width 2048) stays <= 1.5 GB (10^9
bytes) in the gptq, calib and prune steps, while time grows about linearly with the layers. Prints one row per
model and step, and a JSON file.

    python bench/memory.py [--layers 2,8,28] [--hidden 2048] [--ffn 5632] [--heads 32] [--kv-heads 4]
                           [--steps gptq,calib,prune,whole] [--work DIR] [--limit-gb 1.5]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
STEPS = {"gptq": ["compress", "--method", "gptq", "--type", "Q4_K_M", "--stream", "on", "--no-eval"],
         "calib": ["compress", "--type", "Q4_K_M", "--calib", "--stream", "on", "--no-eval"],
         "prune": ["prune", "--ratio", "0.25", "--stream", "on", "--no-eval"],
         "whole": ["compress", "--method", "gptq", "--type", "Q4_K_M", "--stream", "off", "--no-eval"]}


def build_model(d: Path, n_layers: int, hidden: int, ffn: int, heads: int, kv_heads: int, seed: int = 0) -> Path:
    """A random Llama HF folder written one tensor group (a layer, the embedding, the output) at a time."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from slimlm.model import default_model_path
    if (d / "config.json").is_file():
        return d
    tmp = d.with_name(d.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    p = default_model_path()
    tok = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
    tok.save_pretrained(tmp)
    vocab = len(tok)
    hd = hidden // heads
    g = torch.Generator().manual_seed(seed)

    def mat(rows, cols):
        return (torch.randn(rows, cols, generator=g) / cols ** 0.5).to(torch.bfloat16)

    def vec(n):
        return (1 + 0.1 * torch.randn(n, generator=g)).to(torch.bfloat16)

    weight_map = {}

    def shard(name: str, tensors: dict) -> None:
        save_file(tensors, str(tmp / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
    n_shards = n_layers + 2
    shard(f"model-00001-of-{n_shards:05d}.safetensors", {"model.embed_tokens.weight": mat(vocab, hidden)})
    for i in range(n_layers):
        pre = f"model.layers.{i}."
        shard(f"model-{i + 2:05d}-of-{n_shards:05d}.safetensors", {
            pre + "self_attn.q_proj.weight": mat(heads * hd, hidden),
            pre + "self_attn.k_proj.weight": mat(kv_heads * hd, hidden),
            pre + "self_attn.v_proj.weight": mat(kv_heads * hd, hidden),
            pre + "self_attn.o_proj.weight": mat(hidden, heads * hd),
            pre + "mlp.gate_proj.weight": mat(ffn, hidden),
            pre + "mlp.up_proj.weight": mat(ffn, hidden),
            pre + "mlp.down_proj.weight": mat(hidden, ffn),
            pre + "input_layernorm.weight": vec(hidden),
            pre + "post_attention_layernorm.weight": vec(hidden)})
    shard(f"model-{n_shards:05d}-of-{n_shards:05d}.safetensors",
          {"model.norm.weight": vec(hidden), "lm_head.weight": mat(vocab, hidden)})
    total = sum(f.stat().st_size for f in tmp.glob("*.safetensors"))
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}, indent=1))
    (tmp / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": ffn, "num_hidden_layers": n_layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": hd, "vocab_size": vocab, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu",
        "torch_dtype": "bfloat16", "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}, indent=1))
    tmp.rename(d)
    return d


def run_step(model: Path, out: Path, args: list[str]) -> dict:
    """`slimlm compress|prune` in a child process: its peak resident set (kernel's ru_maxrss) and wall time."""
    cmd = [sys.executable, "-m", "slimlm", "-q", args[0], str(model), "-o", str(out), "--overwrite", *args[1:]]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    text = proc.stdout.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{text}")
    report = json.loads(out.with_suffix(".report.json").read_text())
    return {"peak_rss_bytes": usage.ru_maxrss * 1024, "seconds": seconds,
            "reported_peak_bytes": report["memory"]["peak_rss_bytes"], "file_bytes": out.stat().st_size}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", default="2,8,28", help="decoder layers of each model (default 2,8,28)")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--steps", default="gptq,calib,prune,whole", help=f"of {', '.join(STEPS)}")
    ap.add_argument("--work", type=Path, default=Path("/tmp/slimlm-memory"), help="models and outputs (kept)")
    ap.add_argument("--limit-gb", type=float, default=1.5, help="acceptance: peak of the largest model, GB (10^9 bytes)")
    a = ap.parse_args()
    layers = sorted(int(x) for x in a.layers.split(","))
    steps = [s for s in a.steps.split(",") if s]
    a.work.mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"random Llama models, width {a.hidden}, MLP {a.ffn}, {a.heads} heads ({a.kv_heads} KV), bf16 safetensors; "
          f"slimlm compress and prune on the bundled calibration text (32 chunks of 512 tokens; GPTQ and pruning on 16)", flush=True)
    print(f"{'layers':>6} {'params':>8} {'on disk':>10} {'step':>6} {'peak RSS':>10} {'minutes':>8} {'s/layer':>8}",
          flush=True)
    for n in layers:
        d = build_model(a.work / f"llama-{a.hidden}x{n}", n, a.hidden, a.ffn, a.heads, a.kv_heads)
        disk = sum(f.stat().st_size for f in d.glob("*.safetensors"))
        for step in steps:
            if step == "whole" and n != layers[0]:
                continue                       # the in-memory path only where it fits: the smallest model
            r = run_step(d, a.work / f"llama-{a.hidden}x{n}.{step}.gguf", STEPS[step])
            r.update(layers=n, params=disk // 2, disk_bytes=disk, step=step)
            rows.append(r)
            print(f"{n:>6} {disk / 2 / 1e9:>7.2f}B {disk / 1e9:>8.2f}GB {step:>6} "
                  f"{r['peak_rss_bytes'] / 2**30:>8.2f}GiB {r['seconds'] / 60:>8.1f} {r['seconds'] / n:>8.1f}",
                  flush=True)
    (a.work / "memory.json").write_text(json.dumps(rows, indent=1))
    big = [r for r in rows if r["layers"] == layers[-1] and r["step"] in ("gptq", "calib", "prune")]
    ok = all(r["peak_rss_bytes"] <= a.limit_gb * 1e9 for r in big)
    for r in big:
        print(f"check (a) {r['step']}: {r['disk_bytes'] / 1e9:.2f} GB model, peak {r['peak_rss_bytes'] / 2**30:.2f} GiB "
              f"<= {a.limit_gb} GB: {'PASS' if r['peak_rss_bytes'] <= a.limit_gb * 1e9 else 'FAIL'}")
    print(f"results: {a.work / 'memory.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
