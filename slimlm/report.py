"""The run report: what was done, sizes, and measured quality/speed against the original -> JSON + Markdown.

Written beside the output (`OUT.report.json`, `OUT.report.md`, and with healing the loss curve `OUT.loss.png`)
with the atomic write protocol. Healing adds its stage table (held-out KL, seconds, tokens per stage), the data
it trained on and the training speed; `compress --prune --heal` adds the unhealed pruned model, quantized the
same way and evaluated in the same pass, side by side with the healed one.
"""
from __future__ import annotations

import json
import math
import platform
from collections import Counter
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

from .io import atomic_write_bytes

_PKGS = ("slimlm", "torch", "transformers", "gguf", "llama_cpp_python", "numpy")


def versions() -> dict:
    out = {"python": platform.python_version()}
    for p in _PKGS:
        try:
            out[p] = metadata.version(p.replace("_", "-"))
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


@dataclass
class Report:
    command: str
    source: str
    output: str
    type: str
    export: dict                       # ExportRecord.to_dict()
    evaluation: dict | None            # evaluate() result (model = the GGUF in llama.cpp, ref = original)
    steps: list[dict] = field(default_factory=list)
    source_bytes: int | None = None    # the source file(s) on disk, for comparison
    baseline: dict | None = None       # compress --compare: llama.cpp's own file and its evaluation (baseline.py)
    healing: dict | None = None        # train.heal.heal_model's record (+ budget, student, teacher, loss_plot)
    unhealed: dict | None = None       # compress --heal: the unhealed pruned model's file and its evaluation
    qat: dict | None = None            # compress --prune --heal --method qat: QAT's record after healing's
    memory: dict | None = None         # compress: streamed or not, the float32 model's bytes, the peak resident set
    versions: dict = field(default_factory=versions)

    # ---- headline ------------------------------------------------------------------------------------
    def headline(self) -> dict:
        e, x = self.evaluation or {}, self.export
        return {"output": self.output, "type": self.type, "file_bytes": x["file_bytes"],
                "bits_per_weight": x["bits_per_weight"], "n_params": x["n_params"],
                "ppl_before": e.get("ref_ppl"), "ppl_after": e.get("ppl"), "kld": e.get("kld"),
                "top1_agreement": e.get("top1_agreement"),
                "gen_tps": (e.get("model") or {}).get("speed", {}).get("gen_tps"),
                "prompt_tps": (e.get("model") or {}).get("speed", {}).get("prompt_tps")}

    def summary_lines(self) -> list[str]:
        h = self.headline()
        lines = [f"wrote {h['output']}",
                 f"  size          {_mib(h['file_bytes'])}  ({h['bits_per_weight']:.3f} bits/weight, "
                 f"{h['n_params'] / 1e6:.1f}M params, type {h['type']}; source {_mib(self.source_bytes)})"]
        if h["ppl_after"] is not None:
            lines += [f"  perplexity    {h['ppl_before']:.4f} (original, torch) -> {h['ppl_after']:.4f} "
                      f"(GGUF, llama.cpp)",
                      f"  KL divergence {h['kld']:.6f}   top-1 agreement {100 * h['top1_agreement']:.2f}%",
                      f"  on {self.evaluation['n_scored_tokens']} scored tokens of {self.evaluation['text']}"]
        if h["gen_tps"] is not None:
            lines.append(f"  llama.cpp     {h['prompt_tps']:.1f} prompt tok/s, {h['gen_tps']:.1f} generation tok/s")
        for f in self.export.get("fallbacks", []):
            lines.append(f"  fallback      {f}")
        if self.memory:
            lines.append(f"  memory        {memory_line(self.memory)}")
        for rec in (self.healing, self.qat):
            if rec:
                lines += healing_lines(rec)
        if self.unhealed and self.unhealed.get("evaluation") and self.evaluation:
            lines += unhealed_lines(self.evaluation, self.unhealed)
        if self.baseline and self.baseline.get("evaluation") and self.evaluation:
            from .baseline import comparison_lines
            lines += comparison_lines(self.evaluation, self.baseline["evaluation"], self.baseline)
        return lines

    # ---- serialisation -------------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(_clean(asdict(self)), indent=1, sort_keys=False) + "\n"

    def to_markdown(self) -> str:
        h, e = self.headline(), self.evaluation
        md = [f"# slimlm report: {Path(self.output).name}", "", f"`{self.command}`", "",
              f"- source: `{self.source}`", f"- output: `{self.output}`", ""]
        md += ["| metric | original | compressed |", "|---|---|---|",
               f"| size on disk | {_mib(self.source_bytes)} | {_mib(h['file_bytes'])} |",
               f"| bits/weight | {e['ref']['bits_per_weight']:.3f} | {h['bits_per_weight']:.3f} |" if e else
               f"| bits/weight | | {h['bits_per_weight']:.3f} |"]
        if self.memory:
            md += [f"| memory (peak resident) | | {memory_line(self.memory)} |"]
        if e:
            md += [f"| perplexity | {e['ref_ppl']:.4f} | {e['ppl']:.4f} |",
                   f"| KL divergence (mean / max) | | {e['kld']:.6f} / {e['kld_max']:.4f} |",
                   f"| top-1 agreement | | {100 * e['top1_agreement']:.2f}% |"]
            ms, rs = e["model"].get("speed"), e["ref"].get("speed")
            if ms and rs:
                md += [f"| prompt tok/s | {rs['prompt_tps']:.1f} ({e['ref']['runtime']}) | "
                       f"{ms['prompt_tps']:.1f} ({e['model']['runtime']}) |",
                       f"| generation tok/s | {rs['gen_tps']:.1f} ({e['ref']['runtime']}) | "
                       f"{ms['gen_tps']:.1f} ({e['model']['runtime']}) |"]
            md += ["", f"Evaluated on {e['n_scored_tokens']} scored tokens ({e['n_chunks']} chunks of "
                       f"{e['n_ctx']}, second half of each scored, llama.cpp's perplexity method) of "
                       f"{e['text']}; both models saw the same token ids."]
        b = (self.baseline or {}).get("evaluation")
        if b and e:
            bm = b["model"]
            md += ["", f"## Against llama.cpp's own {self.baseline['type']}", "",
                   f"`{self.baseline['path']}`: the same original written as F32 and quantized by llama.cpp's "
                   f"`llama_model_quantize` ({'with' if self.baseline['imatrix'] else 'without'} the importance "
                   f"matrix of the same calibration text), evaluated on the same token ids in the same run.", "",
                   "| metric | slimlm | llama.cpp | slimlm / llama.cpp |", "|---|---|---|---|",
                   f"| size on disk | {_mib(h['file_bytes'])} | {_mib(bm['file_bytes'])} | "
                   f"{h['file_bytes'] / bm['file_bytes']:.3f} |",
                   f"| bits/weight | {h['bits_per_weight']:.3f} | {bm['bits_per_weight']:.3f} | |",
                   f"| perplexity | {e['ppl']:.4f} | {b['ppl']:.4f} | {e['ppl'] / b['ppl']:.3f} |",
                   f"| KL divergence | {e['kld']:.6f} | {b['kld']:.6f} | "
                   f"{e['kld'] / b['kld'] if b['kld'] > 0 else float('nan'):.3f} |",
                   f"| top-1 agreement | {100 * e['top1_agreement']:.2f}% | {100 * b['top1_agreement']:.2f}% | |"]
            if e["model"].get("speed") and bm.get("speed"):
                md.append(f"| generation tok/s | {e['model']['speed']['gen_tps']:.1f} | "
                          f"{bm['speed']['gen_tps']:.1f} | |")
        if self.unhealed and self.unhealed.get("evaluation") and e:
            md += unhealed_markdown(h, e, self.unhealed)
        for rec in (self.healing, self.qat):
            if rec:
                md += healing_markdown(rec)
        types = Counter(t["type"] for t in self.export["tensors"])
        if types:
            md += ["", "## Tensor types", "", "| type | tensors |", "|---|---|"]
            md += [f"| {t} | {n} |" for t, n in sorted(types.items())]
        mixed = next((st for st in self.steps if st.get("step") == "mixed precision"), None)
        notes = [t for t in self.export["tensors"] if t["note"] and t["type"] != "F32"]
        if mixed:
            md += ["", f"Size budget: {_mib(mixed['budget_bytes'])} for the weights, planned file "
                       f"{_mib(mixed['planned_file_bytes'])}; predicted KLD (sum over tensors) "
                       f"{mixed['predicted_kld']:.4f}. Per tensor: its type, bytes, predicted effect (Fisher) and, "
                       f"when measured, its KLD alone ({mixed.get('measured_on', 'not measured')}):", "",
                   "| tensor | type | bytes | predicted dKLD | measured dKLD |", "|---|---|---|---|---|"]
            md += [f"| `{n}` | {p['type']} | {p['bytes']} | {p['dkld']:.3g} | "
                   f"{'' if p.get('measured_dkld') is None else format(p['measured_dkld'], '.3g')} |"
                   for n, p in mixed["predicted"].items()]
            notes = [t for t in notes if not t["note"].startswith("budget:")]
        for st in self.steps:
            if st.get("rtn_fallbacks") or st.get("raised_damp"):
                md += ["", f"{st['step'].upper()}: dampening raised (retries) for "
                           f"{', '.join(f'`{n}` ({d:g})' for n, d in st['raised_damp'].items()) or 'no tensor'}; "
                           f"plain rounding instead for "
                           f"{', '.join(f'`{n}` ({w})' for n, w in st['rtn_fallbacks'].items()) or 'no tensor'}."]
        if notes:
            md += ["", "Tensors not at the requested type:", ""]
            md += [f"- `{t['name']}`: {t['type']} ({t['note']})" for t in notes]
        md += ["", "The original is evaluated in torch at float32 (its weights as loaded from the source)."]
        md += ["", "## Versions", "", ", ".join(f"{k} {v}" for k, v in self.versions.items() if v), ""]
        return "\n".join(md)

    def write(self, out: str | Path, *, overwrite: bool = True) -> tuple[Path, Path]:
        out = Path(out)
        j = out.with_name(out.name + ".report.json") if out.suffix != ".gguf" else out.with_suffix(".report.json")
        m = j.with_suffix("").with_suffix(".report.md")
        for rec in (self.healing, self.qat):
            if rec and rec.get("loss_plot"):
                plot_healing(rec, Path(rec["loss_plot"]))
        atomic_write_bytes(j, self.to_json().encode(), overwrite=overwrite)
        atomic_write_bytes(m, self.to_markdown().encode(), overwrite=overwrite)
        return j, m


# ---- healing ---------------------------------------------------------------------------------------------------
def _measured(rec: dict) -> list[dict]:
    return [s for s in rec["stages"] if "heldout_kl" in s]


def _e2e(rec: dict) -> dict | None:
    return next((s["detail"] for s in rec["stages"] if s["stage"] == "end-to-end distillation" and s.get("detail")),
                None)


def memory_line(mem: dict) -> str:
    """The peak resident memory of a run, and whether the model was streamed."""
    how = "streamed, one layer at a time" if mem.get("streamed") else "whole model in memory"
    return (f"peak {mem['peak_rss_bytes'] / 2**30:.2f} GiB resident ({how}; the model takes "
            f"{mem['fp32_bytes'] / 2**30:.2f} GiB in float32)")


def healing_lines(rec: dict) -> list[str]:
    """CLI lines: held-out KL before and after healing, time, training tokens and speed, the loss curve."""
    st = _measured(rec)
    what, before, after = ("QAT     ", "at the start", "trained") if rec.get("what") == "QAT" else \
        ("healing ", "unhealed", "healed")
    line = (f"  {what}      held-out KL {st[0]['heldout_kl']:.4f} ({before}) -> {rec['heldout_kl']:.4f} ({after}), "
            f"{rec['seconds']:.0f} s")
    d = _e2e(rec)
    if d:
        line += f"; {d['tokens']:,} training tokens" + (f" at {d['tokens_per_s']:.0f} tok/s" if d.get("tokens_per_s")
                                                        else "")
    lines = [line]
    if rec.get("loss_plot"):
        lines.append(f"  loss curve    {rec['loss_plot']}")
    return lines


def healing_markdown(rec: dict) -> list[str]:
    """The healing section: one row per stage, the data sources, the end-to-end run, the loss curve."""
    from .train.config import describe_budget
    md = ["", "## Quantization-aware training" if rec.get("what") == "QAT" else "## Healing", "",
          f"Student {_code(rec.get('student', ''))} distilled from the teacher `{rec.get('teacher', '')}`, budget "
          f"{describe_budget(rec['budget']) if rec.get('budget') else '?'}"
          f"{' (resumed from a checkpoint)' if rec.get('resumed') else ''}; each student "
          f"layer came from teacher layer {rec.get('layer_map')}. Held-out KL: KL(teacher || student) at T=1 on "
          f"{rec['data']['heldout_rows']} held-out sequences of the training data's sources (not the evaluation "
          f"text), measured after each stage.", "",
          "| stage | held-out KL to the teacher | seconds | tokens |", "|---|---|---|---|"]
    for s in rec["stages"]:
        if "skipped" in s:
            md.append(f"| {s['stage']} | skipped: {s['skipped']} | | |")
            continue
        tok = (s.get("detail") or {}).get("tokens")
        kl = (f"{s['heldout_kl_tried']:.4f}: higher, undone (stays {s['heldout_kl']:.4f})" if s.get("undone")
              else f"{s['heldout_kl']:.4f}")
        md.append(f"| {s['stage']} | {kl} | {s['seconds']:.1f} | {'' if tok is None else format(tok, ',')} |")
    md += ["", f"Total {rec['seconds']:.0f} s (training data, teacher cache and evaluations included).", "",
           "| training data source | kind | training tokens |", "|---|---|---|"]
    for src in rec["data"]["sources"]:
        cut = f" ({src['removed_tokens']:,} tokens repeating the evaluation text cut)" if src.get("removed_tokens") \
            else ""
        md.append(f"| {src['source']}{cut} | {src['kind']} | {src['tokens']:,} |")
    d = _e2e(rec)
    if d:
        tt = d.get("teacher_targets") or {}
        teach = (f"the teacher's top-{tt['k']} cache (built in {tt.get('build_seconds', 0):.0f} s)"
                 if tt.get("kind") == "topk" else "the full teacher distribution on the fly")
        md += ["", f"End-to-end distillation: {d['tokens']:,} training tokens in {d['steps']} steps"
               + (f", {d['tokens_per_s']:.0f} training tokens/s" if d.get("tokens_per_s") else "")
               + f" ({d['precision']} on {d['device']}, {d['world_size']} process{'es' if d['world_size'] > 1 else ''}, "
               f"{d['trainable_params']:,} trainable parameters, against {teach}); best held-out KL "
               f"{d['best_heldout_kl']:.4f} at step {d['best_step']}, stopped by the {d['stopped']}."]
    if rec.get("loss_plot"):
        md += ["", f"![loss curve]({Path(rec['loss_plot']).name})"]
    return md


def plot_healing(rec: dict, out: Path) -> Path:
    """PNG: held-out KL after each stage (bars) and, when end-to-end training ran, its loss curve and held-out
    KL against training tokens (log scale)."""
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    st, d = _measured(rec), _e2e(rec)
    fig, axes = plt.subplots(1, 2 if d else 1, figsize=(11 if d else 5.5, 4), squeeze=False)
    ax = axes[0][0]
    vals = [max(s["heldout_kl"], 0.0) for s in st]
    ax.bar(range(len(st)), vals, color=["#999999"] + ["#3b75af"] * (len(st) - 1))
    ax.set_xticks(range(len(st)), [s["stage"] for s in st], rotation=20, ha="right", fontsize=8)
    for i, v in enumerate(vals):
        ax.text(i, v, f"{v:.3g}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("held-out KL to the teacher")
    ax.set_title("after each healing stage", fontsize=9)
    if d:
        ax = axes[0][1]
        tokens = {0: 0, **{c[0]: c[1] for c in d["curve"]}}
        if d["curve"]:
            ax.plot([c[1] for c in d["curve"]], [max(c[2], 1e-6) for c in d["curve"]], lw=0.8,
                    label="training loss (per step)")
        ev = [(tokens[s], k) for s, k in d["evals"] if s in tokens]
        ax.plot([t for t, _ in ev], [max(k, 1e-6) for _, k in ev], "o-", ms=3, label="held-out KL")
        ax.axhline(max(st[0]["heldout_kl"], 1e-6), ls="--", color="gray", lw=0.8, label="unhealed held-out KL")
        ax.set_yscale("log")
        ax.set_xlabel("training tokens")
        ax.set_title("end-to-end distillation", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(out, buf.getvalue(), overwrite=True)


def unhealed_lines(ev: dict, unhealed: dict) -> list[str]:
    """CLI lines: the unhealed file, then healed / unhealed ratios on the same tokens."""
    u = unhealed["evaluation"]
    um, hm = u["model"], ev["model"]
    kld = ev["kld"] / u["kld"] if u["kld"] > 0 else float("nan")
    return [f"unhealed pruned model, quantized the same way: {unhealed['path']}",
            f"  size          {_mib(um['file_bytes'])}  ({um['bits_per_weight']:.3f} bits/weight)",
            f"  perplexity    {u['ppl']:.4f}   KL divergence {u['kld']:.6f}   top-1 agreement "
            f"{100 * u['top1_agreement']:.2f}%",
            f"healed / unhealed (same tokens, same run): KL divergence {kld:.3f}x, perplexity {ev['ppl']:.4f} vs "
            f"{u['ppl']:.4f}, top-1 agreement {100 * ev['top1_agreement']:.2f}% vs {100 * u['top1_agreement']:.2f}%"
            + (f", size {hm['file_bytes'] / um['file_bytes']:.3f}x" if hm.get("file_bytes") and um.get("file_bytes")
               else "")]


def unhealed_markdown(h: dict, e: dict, unhealed: dict) -> list[str]:
    """The healed and the unhealed file side by side (same tokens, same reference, same run)."""
    u = unhealed["evaluation"]
    um = u["model"]
    kld = e["kld"] / u["kld"] if u["kld"] > 0 else float("nan")
    md = ["", "## Healed vs unhealed", "",
          f"`{unhealed['path']}`: the pruned model before healing, quantized the same way"
          f"{' (' + unhealed['method'] + ', no training)' if unhealed.get('method') else ''}, evaluated on the same "
          f"token ids against the same original in the same run.", "",
          "| metric | healed | unhealed | healed / unhealed |", "|---|---|---|---|",
          f"| size on disk | {_mib(h['file_bytes'])} | {_mib(um['file_bytes'])} | |",
          f"| bits/weight | {h['bits_per_weight']:.3f} | {um['bits_per_weight']:.3f} | |",
          f"| perplexity | {e['ppl']:.4f} | {u['ppl']:.4f} | {e['ppl'] / u['ppl']:.3f} |",
          f"| KL divergence | {e['kld']:.6f} | {u['kld']:.6f} | {kld:.3f} |",
          f"| top-1 agreement | {100 * e['top1_agreement']:.2f}% | {100 * u['top1_agreement']:.2f}% | |"]
    if e["model"].get("speed") and um.get("speed"):
        md.append(f"| generation tok/s | {e['model']['speed']['gen_tps']:.1f} | {um['speed']['gen_tps']:.1f} | |")
    return md


def _code(name: str) -> str:
    """A path in backticks; a description ("the pruned model") as it is."""
    return name if name.startswith("the ") else f"`{name}`"


def _mib(n) -> str:
    return "?" if n is None else f"{n / 2**20:.2f} MiB"


def _clean(x):
    """JSON has no NaN/Inf: write them as null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x
