"""Reports people look at: frontier plots, per-layer widths, per-tensor type maps, and a self-contained HTML page.

`slimlm report RUN.json... -o DIR` draws them from the JSON reports that compress, prune and heal write
(`OUT.report.json`) and from `slimlm eval --json` results; `slimlm search` draws the same from its trials. Every
point is a file measured in llama.cpp against the original: its size on disk, its KL divergence to the original
on the evaluation text, its generation speed. llama.cpp's own files (`compress --compare`, the search's
baselines) are drawn on the same axes.

The HTML page embeds its images as data URIs and has no script and no external link, so it opens offline.
"""
from __future__ import annotations

import base64
import html
import io
import json
import re
from pathlib import Path

from .errors import ConfigError
from .io import atomic_write_bytes

SLIMLM, LLAMA_CPP, UNHEALED = "slimlm", "llama.cpp", "unhealed"
_KINDS = ("attn_q", "attn_k", "attn_v", "attn_qkv", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "ffn_gate_up")


# ---- points ----------------------------------------------------------------------------------------------------
def _point(label: str, group: str, ev: dict, file_bytes=None, bpw=None, **extra) -> dict:
    m = ev.get("model") or {}
    speed = m.get("speed") or {}
    return {"label": label, "group": group, "file_bytes": file_bytes or m.get("file_bytes"),
            "bits_per_weight": bpw or m.get("bits_per_weight"), "kld": ev.get("kld"), "ppl": ev.get("ppl"),
            "top1": ev.get("top1_agreement"), "gen_tps": speed.get("gen_tps"), "prompt_tps": speed.get("prompt_tps"),
            "n_tokens": ev.get("n_scored_tokens"), "text": ev.get("text"), **extra}


def points_from_report(d: dict, label: str) -> list[dict]:
    """The measured files of one JSON report: a compress/prune/heal report (its output, plus llama.cpp's file of
    --compare and the unhealed pruned file when present), a search's search.json (every measured trial and
    llama.cpp's presets) or an `eval --json` result. Files without a KL
    divergence (evaluated without a reference, or --no-eval) are left out."""
    pts = []
    if "export" in d:                                     # slimlm's Report
        ev = d.get("evaluation") or {}
        x = d["export"]
        pts.append(_point(label, SLIMLM, ev, x.get("file_bytes"), x.get("bits_per_weight"), type=d.get("type"),
                          command=d.get("command")))
        b = d.get("baseline") or {}
        if b.get("evaluation"):
            pts.append(_point(f"llama.cpp {b['type']}", LLAMA_CPP, b["evaluation"], type=b["type"]))
        u = d.get("unhealed") or {}
        if u.get("evaluation"):
            pts.append(_point(f"{label} (unhealed)", UNHEALED, u["evaluation"]))
    elif "all" in d and "baselines" in d:                 # slimlm search's search.json
        pts += [{**p, "label": f"{label} {p['label']}"} for p in d["all"]]
        pts += list(d["baselines"])
    elif "kld" in d and "model" in d:                     # slimlm eval --json
        pts.append(_point(label, SLIMLM, d))
    else:
        raise ConfigError(f"{label}: not a slimlm report (compress/prune/heal OUT.report.json, a search's "
                          f"search.json, or eval --json)")
    return [p for p in pts if p["kld"] is not None and p["file_bytes"]]


def load_reports(paths: list[str | Path]) -> list[tuple[str, dict]]:
    """(label, parsed JSON) per report file; a missing or unreadable file is a clear error, before any drawing."""
    out = []
    for p in map(Path, paths):
        if not p.is_file():
            raise ConfigError(f"{p}: no such report file")
        try:
            d = json.loads(p.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{p}: not a JSON report ({e})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{p}: not a slimlm report (a JSON object is expected)")
        name = p.name.removesuffix(".json").removesuffix(".report")
        out.append((name, d))
    return out


def pareto(points: list[dict], keys=(("file_bytes", 1), ("kld", 1))) -> list[dict]:
    """The points no other point beats on every key (sign 1: smaller is better, -1: larger), sorted by the
    first key. Points missing a key are left out."""
    pts = [p for p in points if all(p.get(k) is not None for k, _ in keys)]

    def beats(a, b):
        le = all(s * a[k] <= s * b[k] for k, s in keys)
        return le and any(s * a[k] < s * b[k] for k, s in keys)
    front = [p for p in pts if not any(beats(q, p) for q in pts if q is not p)]
    return sorted(front, key=lambda p: keys[0][1] * p[keys[0][0]])


# ---- plots -----------------------------------------------------------------------------------------------------
def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, out: Path) -> Path:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    _plt().close(fig)
    return atomic_write_bytes(out, buf.getvalue(), overwrite=True)


_STYLE = {SLIMLM: dict(color="#3b75af", marker="o"), LLAMA_CPP: dict(color="#c0392b", marker="X"),
          UNHEALED: dict(color="#999999", marker="s")}


def plot_frontier(points: list[dict], out: Path, *, x: str = "file_bytes", chosen: dict | None = None,
                  title: str = "") -> Path:
    """KL divergence (log) against file size (MiB) or llama.cpp generation speed (tokens/s): every file as a
    point, slimlm's Pareto front as a line, llama.cpp's files labelled with their preset, the chosen file
    starred."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    scale = (lambda v: v / 2**20) if x == "file_bytes" else (lambda v: v)
    usable = [p for p in points if p.get(x) is not None and p.get("kld") is not None]
    for group, style in _STYLE.items():
        g = [p for p in usable if p["group"] == group]
        if g:
            ax.scatter([scale(p[x]) for p in g], [max(p["kld"], 1e-6) for p in g], s=28, alpha=0.8,
                       label={SLIMLM: "slimlm", LLAMA_CPP: "llama.cpp (same run)", UNHEALED: "unhealed"}[group],
                       **style)
    for p in usable:
        if p["group"] == LLAMA_CPP:
            ax.annotate(p.get("type") or p["label"], (scale(p[x]), max(p["kld"], 1e-6)), fontsize=7,
                        xytext=(4, 3), textcoords="offset points")
    sense = ("file_bytes", 1) if x == "file_bytes" else ("gen_tps", -1)
    front = pareto([p for p in usable if p["group"] == SLIMLM], (sense, ("kld", 1)))
    if len(front) > 1:
        ax.plot([scale(p[x]) for p in front], [max(p["kld"], 1e-6) for p in front], "-", color="#3b75af", lw=1,
                label="slimlm Pareto front")
    if chosen is not None and chosen.get(x) is not None:
        ax.scatter([scale(chosen[x])], [max(chosen["kld"], 1e-6)], marker="*", s=220, color="#f1c40f",
                   edgecolors="black", zorder=5, label="chosen")
    ax.set_yscale("log")
    ax.set_xlabel("file size (MiB)" if x == "file_bytes" else "llama.cpp generation speed (tokens/s)")
    ax.set_ylabel("KL divergence to the original (log)")
    ax.set_title(title or ("size vs quality" if x == "file_bytes" else "speed vs quality"), fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, out)


def gguf_layer_widths(path: str | Path) -> dict | None:
    """Per-layer MLP width and attention heads as a GGUF states them (`deci` files carry arrays), or None."""
    from .gguf.reader import read_gguf
    g = read_gguf(path)
    a = g.architecture
    n = g.get(f"{a}.block_count")
    if not n:
        return None

    def per_layer(key):
        v = g.get(f"{a}.{key}")
        if v is None:
            return None
        return [int(t) for t in v] if hasattr(v, "__len__") else [int(v)] * int(n)
    return {"ffn": per_layer("feed_forward_length"), "heads": per_layer("attention.head_count"),
            "kv_heads": per_layer("attention.head_count_kv")}


def plot_widths(files: dict[str, dict], out: Path) -> Path:
    """Per-layer MLP width and attention heads of each file (label -> gguf_layer_widths); a removed layer is a
    gap in the written file's numbering, so layers are drawn by their index in the file."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, (label, w) in enumerate(files.items()):
        for ax, key, name in ((axes[0], "ffn", "MLP width (neurons)"), (axes[1], "heads", "attention heads")):
            v = w.get(key)
            if v:
                ax.step(range(len(v)), v, where="mid", label=f"{label} ({len(v)} layers)", lw=1.4,
                        alpha=0.85, zorder=3 - i * 0.1)
                ax.set_ylabel(name)
                ax.set_xlabel("layer (in the written file)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_ylim(bottom=0)
    axes[0].set_title("per-layer widths", fontsize=10)
    return _save(fig, out)


def _bits(t: dict) -> float:
    n = 1
    for d in t["shape"]:
        n *= int(d)
    return 8 * t["nbytes"] / max(n, 1)


def plot_type_map(tensors: list[dict], out: Path, title: str = "") -> Path:
    """The per-tensor type map of a written file: one row per layer, one column per weight kind, each cell the
    type's name coloured by its bits per weight; the embedding and output on a row of their own."""
    plt = _plt()
    rx = re.compile(r"^blk\.(\d+)\.(\w+)\.weight$")
    cells, kinds, top = {}, [], {}
    for t in tensors:
        if len(t["shape"]) < 2:
            continue
        mt = rx.match(t["name"])
        if mt:
            k = mt.group(2)
            cells[(int(mt.group(1)), k)] = t
            if k not in kinds:
                kinds.append(k)
        elif t["name"].endswith(".weight"):
            top[t["name"].removesuffix(".weight")] = t
    kinds.sort(key=lambda k: _KINDS.index(k) if k in _KINDS else len(_KINDS))
    layers = sorted({i for i, _ in cells})
    rows = [("other", None)] + [(f"blk.{i}", i) for i in layers]
    import numpy as np
    cols = max(len(kinds), len(top), 1)
    grid = np.full((len(rows), cols), np.nan)
    fig, ax = plt.subplots(figsize=(1.2 + 1.05 * cols, 0.9 + 0.28 * len(rows)))
    for c, (name, t) in enumerate(top.items()):
        grid[0, c] = _bits(t)
        ax.text(c, 0, f"{name}\n{t['type']}", ha="center", va="center", fontsize=5.5)
    for r, (_, i) in enumerate(rows[1:], start=1):
        for c, k in enumerate(kinds):
            t = cells.get((i, k))
            if t is not None:
                grid[r, c] = _bits(t)
                ax.text(c, r, t["type"], ha="center", va="center", fontsize=6)
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=2, vmax=9)
    ax.set_xticks(range(len(kinds)), kinds, rotation=30, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), [r for r, _ in rows], fontsize=6)
    ax.set_xlabel("weight")
    ax.set_ylabel("layer")
    ax.set_title(title or "tensor types", fontsize=9)
    fig.colorbar(im, ax=ax, label="bits per weight")
    return _save(fig, out)


# ---- markdown / HTML -------------------------------------------------------------------------------------------
def points_table(points: list[dict], *, with_command: bool = False) -> list[str]:
    """Markdown rows: every file with size, bits/weight, KLD, perplexity, top-1 and speed."""
    md = ["| file | from | size | bits/weight | KL divergence | perplexity | top-1 | gen tok/s |" +
          (" command |" if with_command else ""),
          "|---|---|---|---|---|---|---|---|" + ("---|" if with_command else "")]
    for p in sorted(points, key=lambda p: p["file_bytes"]):
        def f(v, fmt):
            return "" if v is None else format(v, fmt)
        md.append(f"| {p['label']} | {p['group']} | {p['file_bytes'] / 2**20:.2f} MiB | {f(p['bits_per_weight'], '.3f')} | "
                  f"{p['kld']:.6f} | {f(p['ppl'], '.4f')} | {f(None if p['top1'] is None else 100 * p['top1'], '.2f')}"
                  f"{'' if p['top1'] is None else '%'} | {f(p['gen_tps'], '.1f')} |"
                  + (f" `{p.get('command') or ''}` |" if with_command else ""))
    return md


def _inline(s: str) -> str:
    """Escape, then the inline markdown slimlm writes: `code` and **bold**."""
    s = html.escape(s, quote=False)
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", s)


def markdown_to_html(md: str, folder: Path, title: str) -> str:
    """The subset of markdown slimlm's reports use (headings, pipe tables, lists, paragraphs, images, `code`,
    **bold**) as one self-contained page: images are read from `folder` and embedded as data URIs."""
    out, para, table, items = [], [], [], []

    def flush():
        if para:
            out.append(f"<p>{_inline(' '.join(para))}</p>")
            para.clear()
        if items:
            out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in items) + "</ul>")
            items.clear()
        if table:
            rows = [r for r in table if not re.fullmatch(r"\|?(\s*:?-+:?\s*\|)+\s*", r)]
            cells = [[c.strip() for c in r.strip().strip("|").split("|")] for r in rows]
            head, body = cells[0], cells[1:]
            out.append("<table><thead><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr></thead><tbody>"
                       + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in body)
                       + "</tbody></table>")
            table.clear()
    for line in md.splitlines():
        img = re.fullmatch(r"!\[([^\]]*)\]\(([^)]+)\)", line.strip())
        if img:
            flush()
            f = folder / img.group(2)
            if f.is_file() and f.suffix == ".png":
                data = base64.b64encode(f.read_bytes()).decode()
                out.append(f'<figure><img alt="{html.escape(img.group(1))}" src="data:image/png;base64,{data}">'
                           f"<figcaption>{html.escape(img.group(1))}</figcaption></figure>")
            continue
        h = re.match(r"^(#{1,4}) (.*)", line)
        if h:
            flush()
            n = len(h.group(1))
            out.append(f"<h{n}>{_inline(h.group(2))}</h{n}>")
        elif line.startswith("|"):
            if para or items:
                flush()
            table.append(line)
        elif line.startswith("- "):
            if para or table:
                flush()
            items.append(line[2:])
        elif not line.strip():
            flush()
        else:
            if table:
                flush()
            para.append(line.strip())
    flush()
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}td,th{border:1px solid #ccc;"
             "padding:3px 8px;text-align:left}th{background:#f2f2f2}code{background:#f6f6f6;padding:0 3px;"
             "font-size:0.9em;word-break:break-all}img{max-width:100%}figure{margin:1em 0}"
             "figcaption{font-size:0.8em;color:#666}")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{style}</style></head><body>\n" + "\n".join(out) + "\n</body></html>\n")


def write_report(folder: Path, md: list[str], title: str) -> tuple[Path, Path]:
    """report.md and report.html (self-contained) in `folder`, written atomically."""
    text = "\n".join(md) + "\n"
    m = atomic_write_bytes(folder / "report.md", text.encode(), overwrite=True)
    h = atomic_write_bytes(folder / "report.html", markdown_to_html(text, folder, title).encode(), overwrite=True)
    return m, h


# ---- slimlm report ---------------------------------------------------------------------------------------------
def report_files(paths: list[str | Path], out_dir: str | Path) -> dict:
    """`slimlm report`: the frontier plots of every file the reports measured, per-layer widths of the pruned
    files, the type map and healing curves of each report, report.md and report.html in `out_dir`."""
    from .report import plot_healing
    runs = load_reports(paths)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"-o {out}: a file is there; give a folder")
    out.mkdir(parents=True, exist_ok=True)
    points = [p for label, d in runs for p in points_from_report(d, label)]
    md = ["# slimlm report", "", f"{len(runs)} report(s): " + ", ".join(f"`{label}`" for label, _ in runs), ""]
    plots = []
    if points:
        md += ["## Files measured", "", *points_table(points, with_command=False), ""]
        texts = sorted({f"{p['text']} ({p['n_tokens']} tokens)" for p in points if p.get("text")})
        if len(texts) > 1:
            md += ["Note: these files were evaluated on different texts or token counts, so their KL divergences "
                   "are not directly comparable: " + "; ".join(texts), ""]
        plots.append(plot_frontier(points, out / "size-kld.png"))
        md += ["![size vs KL divergence](size-kld.png)", ""]
        if any(p["gen_tps"] for p in points):
            plots.append(plot_frontier(points, out / "speed-kld.png", x="gen_tps"))
            md += ["![speed vs KL divergence](speed-kld.png)", ""]
    else:
        md += ["No file in these reports was evaluated against its original (no KL divergence), so there is no "
               "frontier to draw.", ""]
    widths = {}
    for label, d in runs:
        path = Path(d.get("output") or "")
        if any(s.get("step") == "structured pruning" for s in d.get("steps", [])) and path.suffix == ".gguf" \
                and path.is_file():
            w = gguf_layer_widths(path)
            if w:
                widths[label] = w
    if widths:
        plots.append(plot_widths(widths, out / "widths.png"))
        md += ["## Per-layer widths", "", "![per-layer widths](widths.png)", ""]
    for i, (label, d) in enumerate(runs):
        tensors = (d.get("export") or {}).get("tensors")
        if tensors:
            name = f"types-{i}.png"
            plots.append(plot_type_map(tensors, out / name, title=f"tensor types: {label}"))
            md += [f"## Tensor types: {label}", "", f"![tensor types of {label}]({name})", ""]
        for key in ("healing", "qat"):                   # compress --prune --heal --method qat: both trainings
            rec = d.get(key)
            if rec and rec.get("stages"):
                what = "QAT" if rec.get("what") == "QAT" else "Healing"
                name = f"{key}-{i}.png"
                plots.append(plot_healing(rec, out / name))
                md += [f"## {what}: {label}", "", f"![{what} of {label}]({name})", ""]
    m, h = write_report(out, md, "slimlm report")
    return {"markdown": m, "html": h, "plots": plots, "points": points}
