"""llama.cpp's own quantization of the same model, made and measured in the same run (`compress --compare`).

Users ship with `convert_hf_to_gguf.py` + `llama-quantize`; that pair is what slimlm has to beat. Here the
original is written as an F32 GGUF (the converter's role; float32 so that nothing is rounded twice), then
llama.cpp's `llama_model_quantize` makes the requested preset from it, with the importance matrix of the same
calibration text when slimlm used one (so llama.cpp gets its strongest setting, not a strawman). Both files are
then evaluated on the same token ids against the same reference logits (`evaluate_many`, one pass).

The baseline is written beside slimlm's output as `OUT.llama-cpp.gguf`; the F32 intermediate goes to a temp
folder named as that file's temp (`.OUT.llama-cpp.gguf.tmp-PID-RAND`), removed afterwards, and removed by the
next run if a kill left it behind.
"""
from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

from .presets import get_preset


def baseline_path(out: str | Path) -> Path:
    """Where llama.cpp's file for `out` goes: `x.gguf` -> `x.llama-cpp.gguf`."""
    out = Path(out)
    return out.with_name(out.stem + ".llama-cpp" + (out.suffix or ".gguf"))


def check_compare_type(name: str) -> str:
    """The llama.cpp preset to compare against, validated before any weight is loaded."""
    preset = get_preset(name)
    from .eval.runtime import llama_cpp_ftype
    llama_cpp_ftype(preset.name)  # refuses a preset this llama.cpp build cannot make
    return preset.name


def quantize_with_llama_cpp(original, out: str | Path, type: str, *, imatrix=None, overwrite: bool = False,
                            progress: bool = True) -> dict:
    """llama.cpp's `type` of `original` (a loaded Model), written to baseline_path(out).

    Returns {"path", "type", "imatrix", "quantize_seconds"} for the report."""
    from .io import check_output_path
    dst = check_output_path(baseline_path(out), overwrite=overwrite)
    seconds = _quantize(original, {type: dst}, imatrix, progress)[type]
    return {"path": str(dst), "type": type, "imatrix": imatrix is not None, "quantize_seconds": seconds}


def quantize_presets_with_llama_cpp(original, outs: dict[str, Path], *, imatrix=None, progress: bool = True
                                    ) -> dict[str, Path]:
    """llama.cpp's presets of `original` (preset -> output path, replaced if there), from one F32 file."""
    from .io import check_output_path
    for p in outs.values():
        check_output_path(p, overwrite=True)
    _quantize(original, outs, imatrix, progress)
    return dict(outs)


def _quantize(original, outs: dict[str, Path], imatrix, progress: bool) -> dict[str, float]:
    """The original as F32 in a temp folder named as the first output's temp (removed afterwards, and by the
    next run if a kill left it), then llama_model_quantize per preset. Returns preset -> seconds."""
    from .eval.runtime import llama_cpp_quantize
    from .gguf.writer import export_gguf
    from .io import clean_stale_temps
    first = Path(next(iter(outs.values())))
    clean_stale_temps(first)      # an F32 folder left by a killed run (it is named as the output's temp)
    scratch = first.parent / f".{first.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    scratch.mkdir()
    try:
        f32 = scratch / "f32.gguf"
        export_gguf(original, f32, "F32", progress=progress)
        return {t: llama_cpp_quantize(f32, Path(dst), t, imatrix=imatrix) for t, dst in outs.items()}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def comparison_lines(ours: dict, theirs: dict, baseline: dict) -> list[str]:
    """Side-by-side lines for the CLI: llama.cpp's file, then slimlm / llama.cpp ratios (same tokens)."""
    om, tm = ours["model"], theirs["model"]
    lines = [f"llama.cpp's own {baseline['type']} of the same model (llama_model_quantize"
             f"{', same importance matrix' if baseline['imatrix'] else ', no importance matrix'}): "
             f"{baseline['path']}",
             f"  size          {tm['file_bytes'] / 2**20:.2f} MiB  ({tm['bits_per_weight']:.3f} bits/weight)",
             f"  perplexity    {theirs['ppl']:.4f}   KL divergence {theirs['kld']:.6f}   top-1 agreement "
             f"{100 * theirs['top1_agreement']:.2f}%"]
    if tm.get("speed"):
        lines.append(f"  llama.cpp     {tm['speed']['prompt_tps']:.1f} prompt tok/s, "
                     f"{tm['speed']['gen_tps']:.1f} generation tok/s")
    kld = ours["kld"] / theirs["kld"] if theirs["kld"] > 0 else float("nan")
    lines.append(f"slimlm / llama.cpp (same tokens, same run): size {om['file_bytes'] / tm['file_bytes']:.3f}x, "
                 f"KL divergence {kld:.3f}x, top-1 agreement {100 * ours['top1_agreement']:.2f}% vs "
                 f"{100 * theirs['top1_agreement']:.2f}%, perplexity {ours['ppl']:.4f} vs {theirs['ppl']:.4f}")
    return lines
