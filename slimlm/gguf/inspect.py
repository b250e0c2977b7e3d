"""`slimlm inspect`: a GGUF file's metadata, per-tensor types and bits per weight (strictly parsed)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
from gguf import LlamaFileType

from ..presets import plan_types, preset_for_file_type
from .reader import read_gguf

_MAX_ITEMS = 4


def _summarize(v):
    if isinstance(v, np.ndarray):
        v = v.tolist()
    if isinstance(v, list):
        if len(v) > _MAX_ITEMS:
            return {"array_length": len(v), "first": [_short(x) for x in v[:_MAX_ITEMS]]}
        return [_short(x) for x in v]
    return _short(v)


def _short(x):
    if isinstance(x, str) and len(x) > 200:
        return x[:200] + f"... ({len(x)} characters)"
    return x


_CONTROL = {c: f"\\x{c:02x}" for c in [*range(32), 127] if c not in (9, 10)} | {10: "\\n", 9: "\\t"}
_CONTROL.update({c: f"\\u{c:04x}" for c in [*range(0x80, 0xA0), 0x200E, 0x200F, *range(0x202A, 0x202F),
                                               *range(0x2066, 0x206A)]})


def _safe(s: str) -> str:
    """Metadata and tensor names come from the file: escape control characters (C0, DEL, C1) and bidi
    overrides, so a crafted name cannot move the cursor, recolour or reorder the terminal that prints it."""
    return s.translate(_CONTROL)


def _int(g, key: str) -> int | None:
    """An integer scalar metadata value, or None (absent, another type, an array): the file's metadata is
    described as it is, and llama.cpp's rules are re-planned only from values that make sense."""
    v = g.get(key)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _plan_notes(g, file_type: int | None) -> tuple[str | None, dict[str, str]]:
    """(preset name, tensor -> note) from llama.cpp's rules for the file's preset: why a tensor's type
    differs from the preset's main type (rule or row-length fallback), or that it does not follow them."""
    preset = preset_for_file_type(file_type)
    arch = g.get("general.architecture")
    n_layer = _int(g, f"{arch}.block_count") if isinstance(arch, str) else None
    if preset is None or n_layer is None or n_layer < 1:
        return None, {}
    n_head = max(_int(g, f"{arch}.attention.head_count") or 1, 1)
    n_head_kv = _int(g, f"{arch}.attention.head_count_kv") or n_head
    names = {t.name for t in g.tensors}
    plan = plan_types([(t.name, tuple(t.shape)) for t in g.tensors], preset, n_layer=n_layer,
                      tied="output.weight" not in names, arch=arch, n_head=n_head,
                      n_head_kv=n_head_kv if n_head_kv >= 1 else n_head,
                      has_imatrix=g.get("quantize.imatrix.entries_count") is not None)
    notes = {}
    for t in g.tensors:
        fmt, why = plan[t.name]
        notes[t.name] = why if fmt.name == t.ggml_type.name else f"not {preset.name}'s rule (which gives {fmt.name})"
    return preset.name, notes


def describe(path: str | Path) -> dict:
    g = read_gguf(path)
    ft = _int(g, "general.file_type")
    try:
        ft_name = LlamaFileType(ft).name if ft is not None else None
    except ValueError:
        ft_name = f"unknown ({ft})"
    if ft is None and "general.file_type" in g.fields:
        ft_name = f"invalid ({_summarize(g.get('general.file_type'))})"
    preset, notes = _plan_notes(g, ft)
    tensors = [{"name": t.name, "type": t.ggml_type.name, "shape": list(t.shape), "bytes": t.nbytes,
                "bits_per_weight": 8 * t.nbytes / max(t.n_elements, 1), "note": notes.get(t.name, "")}
               for t in g.tensors]
    n = sum(t.n_elements for t in g.tensors)
    data = sum(t.nbytes for t in g.tensors)
    counts = Counter(t["type"] for t in tensors)
    by_type_params = Counter()
    for t in g.tensors:
        by_type_params[t.ggml_type.name] += t.n_elements
    return {"file": str(path), "file_bytes": g.file_size, "gguf_version": g.version,
            "architecture": g.get("general.architecture"), "file_type": ft_name,
            "n_tensors": len(tensors), "n_params": n, "tensor_bytes": data,
            "bits_per_weight": 8 * data / max(n, 1),
            "type_counts": dict(counts), "type_params": dict(by_type_params), "preset": preset,
            "fallbacks": [f"{t['name']}: {t['note']}" for t in tensors if "not a multiple" in t["note"]],
            "metadata": {k: _summarize(f.value) for k, f in g.fields.items()}, "tensors": tensors}


def format_description(d: dict) -> str:
    lines = [f"{d['file']}: GGUF v{d['gguf_version']}, {d['architecture']}, file type {d['file_type']}",
             f"  {d['file_bytes'] / 2**20:.2f} MiB, {d['n_tensors']} tensors, {d['n_params'] / 1e6:.2f}M params, "
             f"{d['bits_per_weight']:.3f} bits/weight",
             "  types: " + ", ".join(f"{t} x{n} ({d['type_params'][t] / 1e6:.2f}M params)"
                                     for t, n in sorted(d["type_counts"].items())),
             ]
    if d["fallbacks"]:
        lines.append(f"  fallbacks ({len(d['fallbacks'])} tensors whose rows do not fit the planned type's block):")
        lines += [f"    {f}" for f in d["fallbacks"]]
    lines += ["", "metadata:"]
    for k, v in d["metadata"].items():
        lines.append(f"  {k} = {v}")
    lines += ["", f"  {'tensor':<32} {'type':<6} {'shape':<16} {'bytes':>12} {'bpw':>7}  why (llama.cpp's "
                  f"{d['preset'] or '?'} rules)"]
    for t in d["tensors"]:
        lines.append(f"  {t['name']:<32} {t['type']:<6} {'x'.join(map(str, t['shape'])):<16} "
                     f"{t['bytes']:>12} {t['bits_per_weight']:>7.3f}  {t['note']}".rstrip())
    return "\n".join(_safe(line) for line in lines)
