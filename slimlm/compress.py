"""`compress()`: the end-to-end job. Load -> (prune/quantize steps, as they land) -> export GGUF -> evaluate
the GGUF in llama.cpp against the original in torch -> report beside the output.

Every argument is validated before weights are loaded, and the output path before any heavy work.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from .calib import calibration_chunks
from .errors import ConfigError
from .eval import evaluate
from .gguf.writer import export_gguf, plan_model
from .io import check_output_path
from .model import load
from .presets import get_preset
from .quant.imatrix import ImportanceMatrix
from .report import Report
from .sequential import collect_imatrix, gptq_model


@dataclass(frozen=True)
class CompressConfig:
    type: str = "Q8_0"
    text: str | None = None        # evaluation text file (default: bundled held-out text)
    n_ctx: int = 512
    max_chunks: int | None = 16
    speed: bool = True
    evaluate: bool = True
    pre_tokenizer: str | None = None  # llama.cpp pre-tokenizer name, when an HF tokenizer's is unknown
    imatrix: str | None = None        # importance matrix file (llama.cpp GGUF or legacy .dat)
    calib: str | None = None          # compute an importance matrix from this text (or "default")
    calib_chunks: int = 32
    pure: bool = False                # every quantizable tensor at the preset's main type
    method: str = "rtn"               # rtn: llama.cpp's rounding; gptq: error-compensating, on the same grids
    act_order: bool = False           # GPTQ: blocks with the largest inputs first

    def __post_init__(self):
        get_preset(self.type)
        if self.n_ctx < 16 or self.n_ctx % 2:
            raise ConfigError(f"--ctx must be an even number >= 16, got {self.n_ctx}")
        if self.max_chunks is not None and self.max_chunks < 1:
            raise ConfigError(f"--chunks must be >= 1, got {self.max_chunks}")
        for flag, v in (("--text", self.text), ("--imatrix", self.imatrix)):
            if v is not None and not Path(v).is_file():
                raise ConfigError(f"{flag} {v}: no such file")
        if self.calib not in (None, "default") and not Path(self.calib).is_file():
            raise ConfigError(f"--calib {self.calib}: no such file")
        if self.imatrix and self.calib:
            raise ConfigError("give either --imatrix or --calib, not both")
        if self.method not in ("rtn", "gptq"):
            raise ConfigError(f"--method must be rtn or gptq, got {self.method!r}")
        if self.method == "gptq" and get_preset(self.type).default in ("f32", "f16", "bf16"):
            raise ConfigError(f"--method gptq needs a quantized --type, not {self.type}")


def source_bytes(path: Path | None) -> int | None:
    """Bytes of a source GGUF file, or of an HF folder's safetensors files."""
    if path is None:
        return None
    p = Path(path)
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.glob("*.safetensors"))


def compress(model: str | Path | None, out: str | Path, config: CompressConfig = CompressConfig(), *,
             overwrite: bool = False, progress: bool = True, command: str = "") -> Report:
    """Compress `model` (HF folder, GGUF file, or None for the default) into the GGUF `out`."""
    out = check_output_path(out, overwrite=overwrite, inputs=[model] if model else [])
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    say(f"loading {model or 'the embedded SmolLM2-135M-Instruct'} ...")
    m = load(model, progress=progress)
    imatrix, steps = None, []
    if config.imatrix:
        imatrix = ImportanceMatrix.load(config.imatrix)
        steps.append({"step": "imatrix", "source": config.imatrix, "tensors": len(imatrix.sums)})
    chunks = prov = None
    if config.calib or config.method == "gptq":
        chunks, prov = calibration_chunks(m, None if config.calib in (None, "default") else config.calib,
                                          n_ctx=config.n_ctx, max_chunks=config.calib_chunks)
    if config.calib:
        say("computing the importance matrix ...")
        imatrix = collect_imatrix(m, chunks, dataset=prov, progress=progress)
        steps.append({"step": "imatrix", "source": prov, "tensors": len(imatrix.sums)})
    encoded = None
    if config.method == "gptq":
        say(f"GPTQ onto {config.type}'s block grids, layer by layer ...")
        _, _, types = plan_model(m, config.type, has_imatrix=imatrix is not None, pure=config.pure)
        encoded, _, st = gptq_model(m, chunks, types, act_order=config.act_order, progress=progress)
        steps.append({"step": "gptq", "source": prov, **st})
    say(f"writing {out} ({config.type}) ...")
    rec = export_gguf(m, out, config.type, overwrite=overwrite, progress=progress,
                      pre_tokenizer=config.pre_tokenizer, imatrix=imatrix, pure=config.pure, encoded=encoded)
    ev = None
    if config.evaluate:
        say("evaluating the GGUF in llama.cpp against the original in torch ...")
        ev = evaluate(out, m, text_path=config.text, n_ctx=config.n_ctx, max_chunks=config.max_chunks,
                      speed=config.speed, progress=progress)
    rep = Report(command=command or f"compress {model or '(default)'} -o {out} --type {config.type} "
                                    f"--method {config.method}",
                 source=str(m.source), output=str(out), type=rec.type, export=rec.to_dict(), evaluation=ev,
                 steps=steps + [{"step": "export", "type": rec.type, "seconds": rec.seconds}],
                 source_bytes=source_bytes(m.source))
    rep.write(out)
    return rep
