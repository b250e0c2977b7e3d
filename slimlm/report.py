"""The run report: what was done, sizes, and measured quality/speed against the original -> JSON + Markdown.

Written beside the output (`OUT.report.json`, `OUT.report.md`) with the atomic write protocol.
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
        types = Counter(t["type"] for t in self.export["tensors"])
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
        atomic_write_bytes(j, self.to_json().encode(), overwrite=overwrite)
        atomic_write_bytes(m, self.to_markdown().encode(), overwrite=overwrite)
        return j, m


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
