"""`compress()`: the end-to-end job. Load -> [prune -> heal] -> quantize [GPTQ/AWQ, or QAT: training on the block
grids] -> export GGUF -> evaluate the GGUF in llama.cpp against the original in torch -> report beside the output.

With --prune and --heal, the unhealed pruned model is quantized the same way too (its own importance matrix,
GPTQ, size budget, on the same calibration text) and written as `OUT.unhealed.gguf`, and both files are
evaluated in one pass against the same reference logits, so the report shows what healing bought. With
--method qat/gptq+qat after --prune --heal, healing trains first (OUT.heal-work/), then QAT for --qat-budget
(OUT.qat-work/); the unhealed file is then quantized by the method's start (GPTQ or rounding) without training.

Every argument is validated before weights are loaded, and the output path before any heavy work.
"""
from __future__ import annotations

import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from .calib import calibration_chunks, check_eval_text
from .errors import ConfigError
from .eval import evaluate_many
from .gguf.writer import export_gguf, plan_model
from .io import check_output_path
from .lazy import decide_stream, peak_rss, refuse_unstreamable
from .mixed import check_reachable, parse_size
from .model import load
from .presets import get_preset
from .quant.imatrix import ImportanceMatrix
from .report import Report
from .sequential import collect_imatrix, quantize_model
from .train.command import FLAGS, QAT_FLAGS
from .train.config import LEARNED_ROUNDING, QAT_WEIGHTS, parse_budget

METHODS = ("rtn", "gptq", "awq", "awq+gptq", "qat", "gptq+qat")
# --method qat's defaults (bench/qat.py, README): learned rounding (qat_weights "round": the float block weights stay,
# an offset per weight at QAT_ROUND_LR level spacings per step), the blocks' fp16 scales at QAT_SCALE_LR (a relative
# step) and what else trains, the norms, at QAT_LR. --qat-weights frozen drops the offsets (the codes follow the
# learned scales only: as good on SmolLM2, worse on the tests' tiny model); --qat-weights ste trains the float
# weights through the straight-through estimator at QAT_STE_LR (healing's 2e-4 made SmolLM2's held-out KL worse
# there), the scales at that rate too.
QAT_SCALE_LR = 1e-3
QAT_LR = 1e-4
QAT_ROUND_LR = 0.01
QAT_STE_LR = 1e-5


def qat_lrs(lr: float | None, scale_lr: float | None, round_lr: float | None, weights: str | None) -> dict:
    """QAT's weight mode and learning rates (TrainConfig fields) with the defaults above where a value is None."""
    weights = weights or QAT_WEIGHTS[0]
    ste = weights == "ste"
    return {"qat_weights": weights, "lr": (QAT_STE_LR if ste else QAT_LR) if lr is None else lr,
            "scale_lr": (None if ste else QAT_SCALE_LR) if scale_lr is None else scale_lr,
            "round_lr": (QAT_ROUND_LR if round_lr is None else round_lr) if weights in LEARNED_ROUNDING else None}


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
    method: str = "rtn"               # rtn: llama.cpp's rounding; gptq: error-compensating, on the same grids;
                                      # awq: activation-aware scales folded into norms/up rows; awq+gptq;
                                      # qat: quantization-aware training on the block grids (budget: --heal)
    act_order: bool = False           # GPTQ: blocks with the largest inputs first
    gptq_chunks: int = 16             # calibration chunks GPTQ's Hessians use (of calib_chunks)
    target_size: str | None = None    # whole-file budget ("70MB", "70MiB"): per-tensor types by sensitivity
    bpw: float | None = None          # or a budget in bits per weight over all parameters
    sensitivity_chunks: int = 8       # calibration chunks the sensitivity measurement uses
    cache: bool = True                # reuse a cached sensitivity table for the same model and text
    measure_effects: bool = False     # budget: measure each tensor's KLD alone with its written weights
    price_activations: bool = True    # budget: price llama.cpp CPU's activation rounding per type (Q8_K vs Q8_0)
    prune: float | None = None        # structured pruning first: fraction of all parameters removed
    prune_method: str = "mlp+layers"  # mlp+layers | mlp | width | layers (slimlm prune --method)
    prune_allocate: str | None = None # uniform | global | sensitivity (default: global; slimlm prune)
    prune_layer_share: float | None = None  # mlp+layers: share of --prune taken as whole layers (default: prune's)
    prune_ffn_multiple: int | None = None   # mlp, mlp+layers: MLP widths a multiple of this (256: K-quant ffn_down)
    format_aware: bool = False        # pruned widths rounded to the type's block size
    prune_hidden: int | None = None   # with --prune: keep this many hidden (embedding) channels; --prune R counts them
    compare: str | None = None        # also make llama.cpp's own quantization of this preset ("same": --type)
                                      # and evaluate both on the same tokens (slimlm.baseline)
    heal: object | None = None        # train.heal.HealConfig: heal the pruned model from the original (--heal);
                                      # with --method qat: the training's settings (and budget, without --prune)
    unhealed: bool = True             # with --heal: also quantize and evaluate the unhealed pruned model
    qat_budget: str | None = None     # --method qat: the training's budget (default: --heal's); with --prune,
                                      # healing takes --heal, then QAT this
    qat_lr: float | None = None       # --method qat after --prune --heal: QAT's learning rate (default: qat_lrs)
    stream: str = "auto"              # auto | on | off: an HF folder's weights read one layer at a time (lazy.py)

    def __post_init__(self):
        from .calib import check_text_file
        from .source import check_ctx_value
        get_preset(self.type)
        check_ctx_value(self.n_ctx)
        if self.max_chunks is not None and self.max_chunks < 1:
            raise ConfigError(f"--chunks must be >= 0 (0 = all), got {self.max_chunks}")
        if self.imatrix is not None and not Path(self.imatrix).is_file():
            raise ConfigError(f"--imatrix {self.imatrix}: no such file")
        check_text_file(self.text, "--text")
        check_text_file(None if self.calib == "default" else self.calib, "--calib")
        if self.pre_tokenizer is not None:
            from .gguf.vocab import KNOWN_PRE_TOKENIZERS
            if self.pre_tokenizer not in KNOWN_PRE_TOKENIZERS:
                raise ConfigError(f"--pre-tokenizer {self.pre_tokenizer!r} is not one llama.cpp knows; known: "
                                  f"{', '.join(KNOWN_PRE_TOKENIZERS)}")
        if self.act_order and "gptq" not in self.method:
            raise ConfigError("--act-order orders GPTQ's blocks: give --method gptq or awq+gptq")
        if not self.price_activations and not self.budgeted:
            raise ConfigError("--weights-only-price changes how a size budget prices each type: give --target-size "
                              "or --bpw")
        if self.measure_effects and not self.budgeted:
            raise ConfigError("--measure-effects measures a size budget's per-tensor choices: give --target-size "
                              "or --bpw")
        if self.method not in METHODS:
            raise ConfigError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.method != "rtn" and get_preset(self.type).default in ("f32", "f16", "bf16") and not self.budgeted:
            raise ConfigError(f"--method {self.method} needs a quantized --type, not {self.type}")
        if self.target_size is not None and self.bpw is not None:
            raise ConfigError("give either --target-size or --bpw, not both")
        if self.target_size is not None:
            parse_size(self.target_size)
        if self.bpw is not None and not 2.0 <= self.bpw <= 16.0:
            raise ConfigError(f"--bpw must be between 2 and 16, got {self.bpw}")
        if self.prune_hidden is not None and self.prune_hidden < 1:
            raise ConfigError(f"--prune-hidden must be >= 1 (the hidden channels kept), got {self.prune_hidden}")
        if self.prune is not None and not 0 < self.prune < 1:      # also NaN
            raise ConfigError(f"--prune must be a fraction between 0 and 1, got {self.prune}")
        if self.prune is not None:
            from .prune.command import STRUCTURED
            if self.prune_method not in STRUCTURED:
                raise ConfigError(f"--prune-method must be one of {', '.join(STRUCTURED)}, got {self.prune_method!r}")
            self.prune_config()                       # validates ratio and allocation
            if self.imatrix:
                raise ConfigError("--imatrix was computed for the unpruned model; with --prune use --calib "
                                  "(the matrix is then computed on the pruned model)")
        elif self.format_aware or self.prune_hidden is not None:
            flag = "--format-aware rounds pruned widths" if self.format_aware else "--prune-hidden removes channels"
            raise ConfigError(f"{flag}: give --prune R too (R counts every parameter removed, the hidden channels' "
                              f"included; the method removes what the channels leave of R)")
        if "qat" in self.method:
            if self.heal is None:
                raise ConfigError("--method qat trains the quantized model by distillation from the original: give "
                                  "--heal BUDGET too (a duration such as 10m or a token count such as 200k)")
            if self.heal.train.train_params == "lora":
                raise ConfigError("--method qat trains the fake-quant weights themselves: --train lora is not "
                                  "supported with it (use all or all-but-embeddings)")
            if self.qat_budget is not None:
                parse_budget(self.qat_budget, "--qat-budget")
            if self.qat_lr is not None and not (math.isfinite(self.qat_lr) and self.qat_lr > 0):
                raise ConfigError(f"--qat-lr must be a number > 0, got {self.qat_lr}")
            self.qat_heal()
        elif (self.qat_budget is not None or self.qat_lr is not None or self.heal is not None and
              any(getattr(self.heal.train, k) not in (None, False) for k in QAT_FLAGS)):
            flags = ["--qat-budget", "--qat-lr", *(FLAGS[k] for k in QAT_FLAGS)]
            raise ConfigError(f"{', '.join(flags[:-1])} and {flags[-1]} set quantization-aware training: give "
                              f"--method qat or gptq+qat")
        elif self.heal is not None and self.prune is None:
            raise ConfigError("--heal heals a pruned model from its original: give --prune R too (or use slimlm heal "
                              "on a model pruned before)")
        if self.compare is not None:
            self.compare_type()
        from .lazy import STREAM_MODES
        if self.stream not in STREAM_MODES:
            raise ConfigError(f"--stream must be one of {', '.join(STREAM_MODES)}, got {self.stream!r}")
        if self.stream == "on":
            self.check_streamable()
        for flag, v in (("--gptq-chunks", self.gptq_chunks), ("--sensitivity-chunks", self.sensitivity_chunks),
                        ("--calib-chunks", self.calib_chunks)):
            if v < 1:
                raise ConfigError(f"{flag} must be >= 1, got {v}")

    def qat_heal(self):
        """The training settings of --method qat: the healing options with --qat-budget as the budget when given,
        QAT's weight mode and learning rates where not given (qat_lrs). After --prune, where
        --heal's budget and options heal the pruned model first, QAT trains for --qat-budget (default: as long as
        --heal) at --qat-lr (default: qat_lrs's), at healing's --precision (auto: bf16 autocast where the device
        is fast at it; bench/qat.py, Q4_0, 30 minutes: 1.7x the tokens of fp32 and its best file; what is written is
        the fake-quant state, exact either way). Without --prune the caller gives --lr (the CLI: qat_lrs's
        default)."""
        import dataclasses
        h = self.heal
        t = h.train
        lr = self.qat_lr if self.qat_lr is not None or self.prune is not None else t.lr    # --lr is healing's after --prune
        train = {"budget": self.qat_budget or t.budget, **qat_lrs(lr, t.scale_lr, t.round_lr, t.qat_weights)}
        return dataclasses.replace(h, train=dataclasses.replace(h.train, **train))

    def check_streamable(self, why: str = "with --stream on") -> None:
        """The steps that hold the whole model (or its whole original, to evaluate against) are refused when the
        model is streamed: `why` says why it is."""
        steps = [(self.prune is not None, "--prune"), (self.heal is not None, "--heal"),
                 ("qat" in self.method, "--method qat (it trains the whole model)"),
                 (self.budgeted, "--target-size/--bpw"), (self.compare is not None, "--compare"),
                 (self.evaluate, "the evaluation (torch-side logits of the whole original)")]
        refuse_unstreamable(why, steps)

    def prune_config(self, model=None):
        """--prune's settings. With a size budget, --format-aware rounds widths to the K-quants' 256 (the budget's
        candidate types); without it (and without --prune-hidden) the MLP widths of mlp/mlp+layers default to
        multiples of 256 when `model`'s are (prune.command.k_quant_ffn_multiple): ffn_down keeps K-quant rows, which
        at 64 MiB for SmolLM2 lowers the budget's predicted KLD from 0.397 to 0.323 (README, "Search results")."""
        from .prune.command import PruneConfig, k_quant_ffn_multiple
        share = {} if self.prune_layer_share is None else {"layer_share": self.prune_layer_share}
        mult = self.prune_ffn_multiple
        if mult is None and model is not None and self.budgeted and not self.format_aware \
                and self.prune_hidden is None and self.prune_method in ("mlp", "mlp+layers"):
            from .arch.spec import layer_dims, n_experts
            if not n_experts(model.config):                     # a mixture of experts loses whole experts
                mult = k_quant_ffn_multiple(layer_dims(model.config, i)[0]
                                            for i in range(int(model.config["num_hidden_layers"])))
        return PruneConfig(ratio=self.prune, method=self.prune_method, allocate=self.prune_allocate, **share,
                           format_aware=self.format_aware, ffn_multiple=mult,
                           hidden=self.prune_hidden,
                           type=self.type if not self.budgeted else ("Q4_K_M" if self.format_aware else "Q8_0"),
                           calib=self.calib, calib_chunks=self.calib_chunks, n_ctx=self.n_ctx)

    def compare_type(self) -> str:
        """The llama.cpp preset of --compare (validated: no budget without an explicit one, evaluation on)."""
        from .baseline import check_compare_type
        if not self.evaluate:
            raise ConfigError("--compare evaluates both files: drop --no-eval")
        if self.compare == "same":
            if self.budgeted:
                raise ConfigError("with --target-size/--bpw name the llama.cpp preset to compare against, "
                                  "e.g. --compare Q4_K_M")
            return check_compare_type(self.type)
        return check_compare_type(self.compare)

    @property
    def budgeted(self) -> bool:
        return self.target_size is not None or self.bpw is not None

    @property
    def calibrated(self) -> bool:
        """Whether the job runs calibration text (and so uses --ctx even without evaluation)."""
        return bool(self.calib) or self.method != "rtn" or self.budgeted or self.prune is not None


def source_bytes(path: Path | None) -> int | None:
    """Bytes of a source GGUF file, or of an HF folder's safetensors files."""
    if path is None:
        return None
    p = Path(path)
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.glob("*.safetensors"))


def unhealed_path(out: str | Path) -> Path:
    """Where compress --heal writes the unhealed pruned model: `x.gguf` -> `x.unhealed.gguf`."""
    out = Path(out)
    return out.with_name(out.stem + ".unhealed" + (out.suffix or ".gguf"))


def compress(model: str | Path | None, out: str | Path, config: CompressConfig = CompressConfig(), *,
             overwrite: bool = False, progress: bool = True, command: str = "", resume: bool = False,
             inspect=None) -> Report | None:
    """Compress `model` (HF folder, GGUF file, or None for the default) into the GGUF `out`.

    Everything that can be checked without the weights is checked first (the output against every input,
    the model's headers, --ctx against its context, the importance matrix's values, a size budget against
    the smallest size the shapes can reach, the healing options and work folder); what needs the loaded model
    right after loading, before any calibration. `resume`: continue an interrupted healing from its checkpoint.
    `inspect(stage, **state)`: called with ("pruned", original=, model=, chunks=) right after structured pruning
    and ("budget", original=, model=, chunks=, predicted_kld=) once a size budget's types are chosen (healing
    done, before GPTQ); slimlm search computes its cheap proxies there and may stop a candidate by raising.
    Returns the Report (None on the non-writing ranks of a torch.distributed launch)."""
    from .source import check_ctx, source_info
    heal = config.heal
    inputs = [p for p in (model, config.imatrix, config.text, config.calib, *(heal.data if heal else ()))
              if p and p != "default"]
    out = check_output_path(out, overwrite=overwrite, inputs=inputs)
    if config.compare is not None:
        from .baseline import baseline_path
        check_output_path(baseline_path(out), overwrite=overwrite, inputs=[model] if model else [])
    qat = "qat" in config.method
    heals = heal is not None and config.prune is not None     # healing the pruned model (then QAT with --method qat)
    side = heals and config.unhealed                           # the unhealed file, side by side
    if heal is not None:
        from .train import command as healing
        if side:
            check_output_path(unhealed_path(out), overwrite=overwrite, inputs=inputs)
        healing.check_work_folder(out, resume)
        if heals and qat:        # a kill during healing leaves no QAT checkpoint: QAT then starts afresh
            healing.check_work_folder(out, resume, work=healing.qat_work_folder(out), need=False)
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    info = source_info(model)
    if config.evaluate or config.calibrated:
        check_ctx(config.n_ctx, info)
    if heal is not None:
        healing.check_models_fit(heal, [info])
    imatrix, steps = None, []
    if config.imatrix:
        imatrix = _load_imatrix(config.imatrix)
        steps.append({"step": "imatrix", "source": config.imatrix, "tensors": len(imatrix.sums)})
    if config.budgeted and config.prune is None:
        check_reachable(info.shapes, target=_target(config), bpw=config.bpw, what=str(info.path))
    stream = _decide_stream(config, model, info)
    say(f"loading {model or 'the embedded SmolLM2-135M-Instruct'}{' (streamed: one layer at a time)' if stream else ''} ...")
    m = load(model, progress=progress, stream=stream)
    if imatrix is not None:
        _check_imatrix_fits(m, imatrix, config.imatrix)
    if config.evaluate:
        check_eval_text(m, config.text, config.n_ctx)
    if config.budgeted and config.prune is None:
        check_budget(m, config, imatrix)
    check_disk_space(m, out, config)
    chunks = prov = None
    if config.calibrated:
        chunks, prov = calibration_chunks(m, None if config.calib in (None, "default") else config.calib,
                                          n_ctx=config.n_ctx, max_chunks=config.calib_chunks)
    original = m
    if config.prune is not None:
        from .prune.command import structured_prune
        m, st = structured_prune(m, chunks, config.prune_config(model=m), say, progress)
        steps.append({"step": "structured pruning", "source": prov, **st})
        if inspect is not None:
            inspect("pruned", original=original, model=m, chunks=chunks)
        if config.budgeted:
            check_budget(m, config, imatrix)
    rec_heal = unhealed = scratch = None
    try:
        if side:
            from .io import clean_stale_temps, temp_name
            clean_stale_temps(unhealed_path(out))      # a scratch folder a killed run left
            scratch = temp_name(unhealed_path(out))
            scratch.mkdir()
            say("quantizing the unhealed pruned model the same way, for the comparison ...")
            unhealed = {"steps": []}
            u_config = config
            if qat:                            # the same types and start, without the training
                import dataclasses
                u_config = dataclasses.replace(config, method="gptq" if "gptq" in config.method else "rtn",
                                               qat_budget=None, qat_lr=None)
                unhealed["method"] = u_config.method
            u_rec, _, _ = encode_and_write(m, scratch / "unhealed.gguf", u_config, imatrix, chunks, prov,
                                           unhealed["steps"], overwrite=False, measure=False, progress=progress,
                                           say=say)
            unhealed["export"] = {k: getattr(u_rec, k) for k in ("type", "n_params", "file_bytes", "bits_per_weight")}
        layer_map = None                 # the original layer each kept layer came from (healing's, QAT's)
        if config.prune is not None:
            from .train.stages import layer_map_from
            layer_map = layer_map_from(original.config, st["drop_layers"])
        if heals:
            rec_heal = healing.heal_step(m, original, healing.float_healing(heal), out, resume=resume,
                                         layer_map=layer_map, text=config.text, progress=progress, say=say,
                                         student_label="the pruned model")
            steps.append(healing.healing_step_record(rec_heal))
            if not healing.is_main_process():
                return None
        rec_qat = {} if qat else None    # the training's record, filled by encode_and_write
        if qat:
            qat_resume = resume and (not heals or healing.has_checkpoint(healing.qat_work_folder(out)))
        hook = None if inspect is None else (lambda stage, **kw: inspect(stage, original=original, chunks=chunks, **kw))
        rec, original_imatrix, label = encode_and_write(m, out, config, imatrix, chunks, prov, steps,
                                                        overwrite=overwrite, measure=config.measure_effects,
                                                        progress=progress, say=say,
                                                        qat=None if not qat else (original, rec_qat, qat_resume,
                                                                                  layer_map),
                                                        inspect=hook)
        if qat and not rec_qat:          # a non-writing rank of a distributed launch
            return None
        if heal is not None:
            healing.clear_work_folder(out)
            healing.clear_work_folder(out, healing.qat_work_folder(out))
        if config.prune is not None:                      # what the file states, not what the plan predicted
            from .prune.checks import written_arch
            next(s for s in steps if s["step"] == "structured pruning")["arch"] = written_arch(out)
        files = [out]
        if unhealed is not None:
            unhealed["path"] = str(_put_in_place(scratch / "unhealed.gguf", unhealed_path(out), overwrite))
            files.append(Path(unhealed["path"]))
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    baseline = None
    if config.compare is not None:
        baseline = _llama_cpp_baseline(original, out, config, original_imatrix if config.prune is None else None,
                                       chunks, prov, overwrite, say, progress)
        files.append(Path(baseline["path"]))
    ev = None
    if config.evaluate:
        say(f"evaluating the GGUF{' files' if len(files) > 1 else ''} in llama.cpp against the original in torch ...")
        evs = evaluate_many(files, original, text_path=config.text, n_ctx=config.n_ctx,
                            max_chunks=config.max_chunks, speed=config.speed, progress=progress)
        ev = evs[0]
        if unhealed is not None:
            unhealed["evaluation"] = evs[1]
        if baseline is not None:
            baseline["evaluation"] = evs[-1]
    rep = Report(command=command or f"compress {model or '(default)'} -o {out} --type {label} "
                                    f"--method {config.method}",
                 source=str(m.source), output=str(out), type=rec.type, export=rec.to_dict(), evaluation=ev,
                 steps=steps + [{"step": "export", "type": rec.type, "seconds": rec.seconds}],
                 source_bytes=source_bytes(m.source), baseline=baseline, healing=rec_heal if heals else rec_qat,
                 qat=rec_qat if heals else None, unhealed=unhealed,
                 memory={"streamed": stream, "fp32_bytes": 4 * info.n_params, "peak_rss_bytes": peak_rss()})
    rep.write(out)
    return rep


def _decide_stream(config: CompressConfig, model, info) -> bool:
    return decide_stream(config.stream, model, info, config.check_streamable)


def _put_in_place(src: Path, dst: Path, overwrite: bool) -> Path:
    """Move a finished file to its final name with the atomic-output protocol (lock, fsync, rename)."""
    import os

    from .io import atomic_output
    with atomic_output(dst, overwrite=overwrite) as tmp:
        os.replace(src, tmp)
    return dst


def encode_and_write(m, out: Path, config: CompressConfig, imatrix, chunks, prov, steps: list, *, overwrite: bool,
                     measure: bool, progress: bool, say, qat: tuple | None = None, inspect=None):
    """Quantize `m` as `config` says (importance matrix from --calib, size budget, GPTQ/AWQ, QAT) and write the GGUF
    `out`, appending each step's record to `steps`. Returns (ExportRecord, the importance matrix before any AWQ
    rescaling, the preset label). `qat`: (teacher, a dict that gets the training's record, resume) for --method
    qat. `inspect("budget", model=, predicted_kld=)`: called once the size budget's types are chosen."""
    if config.calib and imatrix is None:
        say("computing the importance matrix ...")
        imatrix = collect_imatrix(m, chunks, dataset=prov, progress=progress)
        steps.append({"step": "imatrix", "source": prov, "tensors": len(imatrix.sums)})
    from .io import clean_stale_temps, temp_name
    from .lazy import streamed
    unscaled = imatrix                                    # AWQ rescales `imatrix` below
    encoded, label, overrides, spill = None, config.type, None, None
    if config.budgeted:
        say("measuring each tensor's sensitivity to each block type ...")
        label, overrides, st = budget_types(m, chunks[:config.sensitivity_chunks], config, imatrix, progress)
        steps.append({"step": "mixed precision", "source": prov, **st})
        say(f"budget: {st['budget_bytes'] / 2**20:.2f} MiB, predicted file {st['planned_file_bytes'] / 2**20:.2f} "
            f"MiB, predicted KLD {st['predicted_kld']:.4f}")
        if inspect is not None:
            inspect("budget", model=m, predicted_kld=st["predicted_kld"])
    written = m
    if "qat" in config.method:
        teacher, record, resume, layer_map = qat
        _, _, types = plan_model(m, label, has_imatrix=imatrix is not None, pure=config.pure)
        types = {**types, **(overrides or {})}
        start, base = None, m
        if "gptq" in config.method:                  # QAT starts from GPTQ's codes and the weights they decode to
            say(f"GPTQ onto {label}'s block grids (QAT's start), layer by layer ...")
            start, changed, st = quantize_model(m, chunks[:config.gptq_chunks], types, gptq=True,
                                                act_order=config.act_order, progress=progress)
            st.pop("awq_scales")
            steps.append({"step": "gptq", "source": prov, **st})
            base = m.with_changes(changed)
        rec_qat = _train_qat(base, teacher, types, imatrix, out, config, resume, progress, say, start=start,
                             layer_map=layer_map)
        if rec_qat is None:
            return None, None, label
        student, encoded, changed, rec_qat = rec_qat
        if start is not None and config.heal.train.train_params != "all":
            # the output projection (for a tied model the embedding) is GPTQ'd on the final hidden states and stays
            # frozen in training: the student computed with exactly those values, and the file keeps their codes
            encoded.update({n: v for n, v in start.items() if n not in encoded})
        record.update(rec_qat)
        from .train.command import healing_step_record
        steps.append({**healing_step_record(rec_qat), "step": "qat", "tensors": len(encoded)})
        written = student.with_changes(changed)     # its other trained weights (norms...) as trained
    elif config.method != "rtn":
        gptq, awq = "gptq" in config.method, "awq" in config.method
        say(f"{config.method.upper()} onto {label}'s block grids, layer by layer ...")
        _, _, types = plan_model(m, label, has_imatrix=imatrix is not None, pure=config.pure)
        if streamed(m):                       # GPTQ's codes wait on disk beside the output, not in memory
            clean_stale_temps(out)
            spill = temp_name(out)
            spill.mkdir()
        try:
            encoded, changed, st = quantize_model(m, chunks[:config.gptq_chunks], {**types, **(overrides or {})},
                                                  gptq=gptq, awq=awq, act_order=config.act_order,
                                                  progress=progress, spill=spill)
        except BaseException:
            if spill is not None:
                shutil.rmtree(spill, ignore_errors=True)
            raise
        written = m.with_changes(changed)
        scales = st.pop("awq_scales")
        if imatrix is not None and scales:
            imatrix = imatrix.scaled(scales)                  # importance of the scaled inputs: / s^2
        steps.append({"step": config.method, "source": prov, **st, "awq_scaled_tensors": len(scales)})
        for n, why in st["rtn_fallbacks"].items():
            say(f"warning: {n}: GPTQ fell back to llama.cpp's rounding ({why})")
    say(f"writing {out} ({label}{', mixed' if overrides else ''}) ...")
    try:
        rec = export_gguf(written, out, label, overwrite=overwrite, progress=progress,
                          pre_tokenizer=config.pre_tokenizer, imatrix=imatrix, pure=config.pure, encoded=encoded,
                          types=overrides)
    finally:
        if spill is not None:
            shutil.rmtree(spill, ignore_errors=True)
    if measure and overrides:
        say("measuring each tensor's effect alone (one calibration chunk) ...")
        _measure(m, out, chunks[0], steps, progress)
    return rec, unscaled, label


def _train_qat(m, teacher, types: dict, imatrix, out: Path, config: CompressConfig, resume: bool, progress: bool,
               say, start: dict | None = None, layer_map: list[int] | None = None):
    """QAT (quant/qat.py): a copy of `m` with fake-quant block linears, distilled from `teacher` end to end
    (the healing trainer: its budget, data, checkpoints, devices); (the trained copy, encoded, changed weights,
    training record), or None on a non-writing rank of a distributed launch."""
    import copy
    import dataclasses

    import torch

    from .quant import qat
    from .quant.activations import emulate
    from .train import command as healing
    from .train.command import beside
    heal = config.qat_heal()
    heal = dataclasses.replace(heal, bias=False, blockwise=False, e2e=True)
    student = copy.copy(m)
    student.module = copy.deepcopy(m.module)
    with torch.no_grad():                              # pending changes (GPTQ's weights) into the copy
        for hf, W in m.changes.items():
            student.module.get_parameter(hf).copy_(W)
    student.changes = {}
    w = heal.train.qat_weights
    fakes = qat.attach(student, types, imatrix, start=start, learn_round=w in LEARNED_ROUNDING, anchor=w == "codes",
                       freeze=w != "ste", learn_sub_scales=heal.train.sub_scales,
                       embeddings=heal.train.qat_embeddings)
    hooks = emulate(student, {n: f.name for n, (f, _) in types.items()}) if heal.train.runtime_activations else []
    n_emb = sum(f.gguf_name in ("token_embd.weight", "output.weight") for f in fakes)
    say(f"quantization-aware training of {len(fakes) - n_emb} block linears{' and the embedding' if n_emb else ''} "
        f"on their GGUF grids"
        f"{', activations rounded as llama.cpp does' if hooks else ''} ...")
    after_healing = config.prune is not None           # healing's checkpoints stay in its own work folder
    rec = healing.heal_step(student, teacher, heal, out, resume=resume, layer_map=layer_map, text=config.text,
                            progress=progress, say=say, student_label="the quantized model (fake-quant)",
                            work=healing.qat_work_folder(out) if after_healing else None,
                            loss_plot=beside(out, ".qat-loss.png") if after_healing else None,
                            caches=(healing.work_folder(out),) if after_healing else ())
    if not healing.is_main_process():
        return None
    rec["what"] = "QAT"
    for h in hooks:
        h.remove()
    encoded, changed = qat.export(student, fakes)
    return student, encoded, changed, rec       # compress() removes the work folder once the file is written


def check_disk_space(m, out: Path, config: CompressConfig) -> None:
    """Before calibration and GPTQ: refuse when the output folder obviously cannot hold the tensor data of the
    file (the budget, or the preset's plan for the unpruned model: an upper bound when pruning), plus, with
    --compare, llama.cpp's file and the F32 intermediate it is made from."""
    from .gguf.writer import planned_data_bytes
    from .io import ensure_free_space
    if config.target_size is not None:
        need = parse_size(config.target_size)
    elif config.bpw is not None:
        need = int(config.bpw * m.n_params() / 8)
    else:
        need = planned_data_bytes(m, config.type, has_imatrix=bool(config.imatrix or config.calib),
                                  pure=config.pure)
    if config.compare is not None:
        need += planned_data_bytes(m, config.compare_type(), has_imatrix=config.calibrated) + 4 * m.n_params()
    ensure_free_space(out.parent, need)


def _llama_cpp_baseline(original, out, config: CompressConfig, imatrix, chunks, prov, overwrite: bool, say,
                        progress: bool) -> dict:
    """llama.cpp's own quantization of the original (slimlm.baseline), with an importance matrix of the same
    calibration text whenever slimlm used calibration text (computed on the original when slimlm's was not)."""
    from .baseline import quantize_with_llama_cpp
    if imatrix is None and chunks is not None:
        say("computing the importance matrix of the original for llama.cpp's quantizer ...")
        imatrix = collect_imatrix(original, chunks, dataset=prov, progress=progress)
    ctype = config.compare_type()
    say(f"llama.cpp's own {ctype} of the same model (llama_model_quantize) ...")
    return quantize_with_llama_cpp(original, out, ctype, imatrix=imatrix, overwrite=overwrite, progress=progress)


def _target(config: CompressConfig) -> int | None:
    return parse_size(config.target_size) if config.target_size is not None else None


def _load_imatrix(path: str) -> ImportanceMatrix:
    """The --imatrix file, with every value finite and non-negative (a mean of squares)."""
    import numpy as np
    im = ImportanceMatrix.load(path)
    if not im.sums:
        raise ConfigError(f"--imatrix {path}: the file holds no importance entries")
    for name, v in im.sums.items():
        if not np.isfinite(v).all() or (v < 0).any():
            raise ConfigError(f"--imatrix {path}: entry {name} holds NaN, Inf or negative values; an importance "
                              f"matrix holds means of squares")
    return im


def _check_imatrix_fits(m, imatrix: ImportanceMatrix, path: str) -> None:
    """Every entry naming one of the model's tensors has one value per input column; at least one does."""
    from .gguf.writer import _gguf_tensors
    cols = {n: W.shape[-1] for n, _, W in _gguf_tensors(m) if W.ndim == 2}
    hits = [n for n in imatrix.sums if n in cols]
    if not hits:
        raise ConfigError(f"--imatrix {path}: none of its {len(imatrix.sums)} entries names a tensor of this model "
                          f"(e.g. {next(iter(imatrix.sums))!r}); it was computed for another model")
    for n in hits:
        if imatrix.sums[n].shape != (cols[n],):
            raise ConfigError(f"--imatrix {path}: entry {n} has {imatrix.sums[n].size} values but the model's "
                              f"tensor has rows of {cols[n]}; it was computed for another model")


def check_budget(m, config: CompressConfig, imatrix) -> None:
    """Refuse a --target-size/--bpw below the smallest file this (loaded, maybe pruned) model can reach,
    exactly (header and alignment included), before any calibration or sensitivity work. A mixture of experts is
    refused: the sensitivity pass does not price its stacked experts yet (most of its weights)."""
    from .gguf.writer import _gguf_tensors, file_bytes
    if m.spec.moe:
        raise ConfigError("--target-size/--bpw: the size budget cannot price a mixture of experts' stacked experts "
                          "yet; give a preset (--type Q4_K_M, ...) or prune experts (slimlm prune --experts N)")
    tensors = _gguf_tensors(m)
    header = file_bytes(m, {n: 0 for n, _, _ in tensors}, imatrix=imatrix, pre_tokenizer=config.pre_tokenizer)
    check_reachable({n: tuple(W.shape) for n, _, W in tensors}, target=_target(config), bpw=config.bpw,
                    header=header, what=str(m.source or "the model"))


# the preset whose label a mixed file carries: the one whose main type holds most of its weights
_LABEL = {"Q8_0": "Q8_0", "Q6_K": "Q6_K", "Q5_K": "Q5_K_M", "Q5_1": "Q5_1", "Q5_0": "Q5_0", "Q4_K": "Q4_K_M",
          "Q4_1": "Q4_1", "IQ4_NL": "IQ4_NL", "Q4_0": "Q4_0", "IQ4_XS": "IQ4_XS", "Q3_K": "Q3_K_M", "Q2_K": "Q2_K"}


def budget_types(m, chunks, config: CompressConfig, imatrix, progress: bool) -> tuple[str, dict, dict]:
    """(preset label, GGUF name -> (QuantFormat, why) for every 2-D tensor, stats) for the size budget."""
    import time

    from .formats import get_format
    from .gguf.writer import _gguf_tensors, file_bytes
    from .mixed import allocate
    from .sensitivity import sensitivity_table
    t0 = time.perf_counter()
    importance = imatrix.importance if imatrix is not None else None
    tag = imatrix.digest() if imatrix is not None else ""
    table, info = sensitivity_table(m, chunks, importance=importance, importance_tag=tag, cache=config.cache,
                                    activations=config.price_activations, progress=progress)
    tensors = _gguf_tensors(m)
    fixed = {n: 4 * W.numel() for n, _, W in tensors if n not in table}     # norms etc. stay F32
    if config.target_size is not None:
        target = parse_size(config.target_size)
        overhead = file_bytes(m, {**fixed, **{n: 0 for n in table}}, imatrix=imatrix,
                              pre_tokenizer=config.pre_tokenizer)
        budget = target - overhead
    else:
        target = None
        budget = int(config.bpw * sum(W.numel() for _, _, W in tensors) / 8) - sum(fixed.values())
    choice, predicted, used = allocate(table, budget)
    params: dict[str, int] = {}
    for n, _, W in tensors:
        if n in choice:
            params[choice[n]] = params.get(choice[n], 0) + W.numel()
    label = _LABEL[max(params, key=params.get)]
    overrides = {n: (get_format(t), f"budget: predicted dKLD {table[n][t][1]:.3g}") for n, t in choice.items()}
    planned = file_bytes(m, {**fixed, **{n: table[n][t][0] for n, t in choice.items()}}, imatrix=imatrix,
                         pre_tokenizer=config.pre_tokenizer)
    counts: dict[str, int] = {}
    for t in choice.values():
        counts[t] = counts.get(t, 0) + 1
    st = {"target_bytes": target, "bpw": config.bpw, "budget_bytes": budget, "planned_file_bytes": planned,
          "predicted_kld": predicted, "types": counts, "label": label, "seconds": time.perf_counter() - t0,
          "sensitivity": info, "predicted": {n: {"type": t, "bytes": table[n][t][0], "dkld": table[n][t][1]}
                                             for n, t in choice.items()}}
    return label, overrides, st


def _measure(m, out, chunk, steps, progress: bool) -> None:
    """Add each tensor's measured effect (KLD with only its written weights) beside its prediction."""
    import gguf as _gguf
    import torch

    from .gguf.reader import read_gguf
    from .sensitivity import measure_effects
    st = next(s for s in steps if s["step"] == "mixed precision")
    g = read_gguf(out)
    weights = {}
    for t in g.tensors:
        if t.name in st["predicted"]:
            weights[t.name] = torch.from_numpy(_gguf.quants.dequantize(g.raw(t), t.ggml_type).copy())
    got = measure_effects(m, chunk, weights, progress=progress)
    for n, v in got.items():
        st["predicted"][n]["measured_dkld"] = v
    st["measured_on"] = f"1 calibration chunk of {chunk.numel()} tokens, one tensor at a time"
