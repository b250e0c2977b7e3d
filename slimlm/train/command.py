"""`slimlm heal`, and the healing step `slimlm prune --heal` and `slimlm compress --heal` share.

`heal()` distils a pruned model (the student: an HF folder or a GGUF file) from the model it was pruned from
(the teacher; by default the embedded SmolLM2), writes it as a GGUF or an HF folder, evaluates the result
against the teacher and writes a report with the healing record (each stage's held-out KL, the data, the
training speed) and the loss curve as `OUT.loss.png`.

Everything that needs no weights is refused before any model is loaded: the options (`heal_options` builds the
frozen, self-validating HealConfig/TrainConfig), the output against every input, the model headers, --ctx and
--seq-len against both models' context, the text and --data files, the device, and the work folder.

The work folder `OUT.heal-work/` (beside the output, named as the report is) holds the training checkpoints
and the teacher's top-k cache. `--resume` continues an interrupted run from its checkpoint (the trainer refuses
a changed setting, dataset, student or teacher); without `--resume` a checkpoint there is refused rather than
silently discarded. It is removed once healing has succeeded.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, OutputError
from .config import TEACHER_TARGETS, TrainConfig, parse_budget

DEFAULT_BUDGET = TrainConfig.budget

# healing options: TrainConfig / HealConfig field -> the flag that sets it (argparse dest = field name)
TRAIN_FLAGS = {"lr": "--lr", "scale_lr": "--scale-lr", "round_lr": "--round-lr", "qat_weights": "--qat-weights",
               "sub_scales": "--sub-scales", "runtime_activations": "--runtime-activations",
               "qat_embeddings": "--qat-embeddings", "embedding_scale_lr": "--embedding-scale-lr",
               "train_params": "--train", "lora_rank": "--lora", "teacher_targets": "--teacher-targets",
               "topk": "--topk", "temperature": "--temperature", "ce_weight": "--ce-weight",
               "hidden_weight": "--hidden-weight", "seq_len": "--seq-len", "micro_batch": "--micro-batch",
               "accum": "--accum", "precision": "--precision", "grad_checkpointing": "--grad-checkpointing",
               "compile": "--compile",
               "device": "--device", "parallel": "--parallel", "eval_every": "--eval-every",
               "checkpoint_every": "--checkpoint-every", "seed": "--seed"}
HEAL_FLAGS = {"data": "--data", "generate": "--generate", "bias": "--bias", "blockwise": "--no-blockwise",
              "e2e": "--no-e2e"}
FLAGS = {**TRAIN_FLAGS, **HEAL_FLAGS}
QAT_FLAGS = ("scale_lr", "round_lr", "qat_weights", "sub_scales", "runtime_activations", "qat_embeddings",
             "embedding_scale_lr")      # quantization-aware training's own
MAX_SEED = 2**32 - 1


def heal_options(budget: str | None, given: dict, *, resume: bool = False):
    """The HealConfig of the healing options the user gave (`given`: field -> value, only those given), or None
    when there is no --heal budget (then no other healing option may be given)."""
    from .heal import HealConfig
    unknown = set(given) - set(FLAGS)
    if unknown:
        raise ConfigError(f"unknown healing option(s): {', '.join(sorted(unknown))}")
    if budget is None:
        named = [FLAGS[k] for k in given] + (["--resume"] if resume else [])
        if named:
            raise ConfigError(f"{', '.join(named)}: {'these are healing options' if len(named) > 1 else 'a healing option'}"
                              f"; give --heal BUDGET too (a duration such as 30m or a token count such as 500k)")
        return None
    parse_budget(budget)
    train = {k: v for k, v in given.items() if k in TRAIN_FLAGS}
    if "lora_rank" in train:                   # --lora R means LoRA training
        if train.setdefault("train_params", "lora") != "lora":
            raise ConfigError(f"--lora R trains LoRA adapters; it cannot go with --train {train['train_params']}")
    elif train.get("train_params") == "lora":
        train["lora_rank"] = TrainConfig.lora_rank
    seed = train.get("seed", 0)
    if not (isinstance(seed, int) and 0 <= seed <= MAX_SEED):
        raise ConfigError(f"--seed must be an integer from 0 to {MAX_SEED}, got {seed}")
    targets = train.get("teacher_targets", TrainConfig.teacher_targets)
    if targets not in TEACHER_TARGETS:
        raise ConfigError(f"--teacher-targets must be one of {', '.join(TEACHER_TARGETS)}, got {targets!r}")
    if train.get("hidden_weight", 0) > 0 and targets == "topk":     # named by this command's flag
        raise ConfigError("--hidden-weight needs the teacher's hidden states: add --teacher-targets full (the top-k "
                          "cache holds logits only)")
    heal = {k: v for k, v in given.items() if k in HEAL_FLAGS}
    if "data" in heal:
        heal["data"] = tuple(str(p) for p in heal["data"])
    return HealConfig(train=TrainConfig(budget=budget, **train), **heal)


def float_healing(config):
    """`config` (a HealConfig) with quantization-aware training's own settings at their defaults: healing before
    QAT trains in float and never reads them, so its checkpoints (whose fingerprint holds the settings) resume
    whatever QAT's settings are on the next run."""
    import dataclasses
    default = {k: getattr(TrainConfig, k) for k in QAT_FLAGS}
    return dataclasses.replace(config, train=dataclasses.replace(config.train, **default))


# ---- paths beside the output ----------------------------------------------------------------------------------
def beside(out: str | Path, suffix: str) -> Path:
    """A file named after the output, as the report is: `x.gguf` -> `x<suffix>`, a folder `x` -> `x<suffix>`."""
    out = Path(out)
    return out.with_suffix(suffix) if out.suffix == ".gguf" else out.with_name(out.name + suffix)


def work_folder(out: str | Path) -> Path:
    return beside(out, ".heal-work")


def qat_work_folder(out: str | Path) -> Path:
    """compress --prune --heal --method qat: QAT's checkpoints, apart from healing's (which trains first)."""
    return beside(out, ".qat-work")


def clear_work_folder(out: str | Path, work: Path | None = None) -> None:
    """After the healed model is written: its checkpoint and teacher cache are no longer needed."""
    from .heal import clear_work
    clear_work(work or work_folder(out))


def has_checkpoint(work: Path) -> bool:
    from . import checkpoint
    return (work / checkpoint.NAME).is_file()


def check_work_folder(out: str | Path, resume: bool, *, work: Path | None = None, need: bool = True) -> Path:
    """Before loading: --resume needs the interrupted run's checkpoint (`need`: a training that may not have
    started before the kill, as QAT after healing, needs none); without --resume a checkpoint there is refused
    (continuing or discarding it is the user's choice)."""
    from . import checkpoint
    w = work or work_folder(out)
    ck = w / checkpoint.NAME
    if w.exists() and not w.is_dir():
        raise OutputError(f"{w} is a file; slimlm keeps healing checkpoints in a folder of that name: move it away")
    if resume and need and not has_checkpoint(w):
        raise ConfigError(f"--resume: no checkpoint {ck} (a run writes one every --checkpoint-every steps of "
                          f"end-to-end training); start without --resume")
    if not resume and has_checkpoint(w):
        raise ConfigError(f"{ck} is the checkpoint of an interrupted run for this output: add --resume to "
                          f"continue it, or delete {w} to start over")
    return w


def check_models_fit(config, infos) -> None:
    """--seq-len within every model's context, and the --device this torch can use, before any loading."""
    from ..source import check_ctx
    from .dist import resolve_device
    for info in infos:
        check_ctx(config.train.seq_len, info, "--seq-len")
    resolve_device(config.train.device)


def is_main_process() -> bool:
    """Rank 0 of a torch.distributed launch (or a single process): the one that writes outputs."""
    return int(os.environ.get("RANK", "0")) == 0


# ---- the healing step -----------------------------------------------------------------------------------------
def heal_step(student, teacher, config, out: str | Path, *, resume: bool, layer_map: list[int] | None,
              text: str | None, progress: bool, say, student_label: str | None = None, work: Path | None = None,
              loss_plot: Path | None = None, caches: tuple[Path, ...] = ()) -> dict:
    """Heal `student` (changed in place) from `teacher` with its work folder beside `out` (`work`: another one;
    `caches`: earlier stages' work folders whose teacher cache it may reuse);
    the healing record (heal.heal_model's, with the budget, the models and where the loss curve goes: `loss_plot`,
    default OUT.loss.png). `text`: the evaluation text file (None: the bundled one); training text that repeats it
    is cut or refused. `student_label`: how the report names the student (default: its source)."""
    from ..calib import read_text
    from .config import describe_budget
    from .heal import heal_model
    eval_text, _ = read_text(text, "eval", "--text")
    say(f"healing ({describe_budget(config.train.budget)}) against {teacher.source or 'the teacher'} ...")
    rec = heal_model(student, teacher, config, folder=work or work_folder(out), resume=resume, layer_map=layer_map,
                     eval_text=eval_text, progress=progress, say=say, caches=caches)
    rec.update(budget=config.train.budget, resumed=resume, student=student_label or str(student.source or ""),
               teacher=str(teacher.source or ""), loss_plot=str(loss_plot or beside(out, ".loss.png")))
    return rec


def healing_step_record(rec: dict) -> dict:
    """The short entry of the report's steps list (the full record is Report.healing)."""
    st = [s for s in rec["stages"] if "heldout_kl" in s]
    return {"step": "healing", "budget": rec["budget"], "seconds": rec["seconds"],
            "heldout_kl_unhealed": st[0]["heldout_kl"], "heldout_kl": rec["heldout_kl"],
            "stages": [s["stage"] for s in rec["stages"]]}


# ---- slimlm heal ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HealJob:
    """`slimlm heal`'s settings besides the healing itself: output and evaluation."""
    heal: object                       # HealConfig
    type: str = "Q8_0"                 # GGUF output type
    hf_dtype: str = "float32"          # HF folder output precision
    pre_tokenizer: str | None = None   # llama.cpp's pre-tokenizer for an HF tokenizer it cannot identify
    text: str | None = None            # evaluation text (default: the bundled held-out text)
    n_ctx: int = 512
    max_chunks: int | None = 16
    speed: bool = True
    evaluate: bool = True

    def __post_init__(self):
        from ..calib import check_text_file
        from ..hfout import DTYPES
        from ..presets import get_preset
        from ..source import check_ctx_value
        from .heal import HealConfig
        if not isinstance(self.heal, HealConfig):
            raise ConfigError("HealJob.heal must be a HealConfig")
        get_preset(self.type)
        if self.hf_dtype not in DTYPES:
            raise ConfigError(f"--hf-dtype must be one of {', '.join(DTYPES)}, got {self.hf_dtype!r}")
        if self.pre_tokenizer is not None:
            from ..gguf.vocab import KNOWN_PRE_TOKENIZERS
            if self.pre_tokenizer not in KNOWN_PRE_TOKENIZERS:
                raise ConfigError(f"--pre-tokenizer {self.pre_tokenizer!r} is not one llama.cpp knows; known: "
                                  f"{', '.join(KNOWN_PRE_TOKENIZERS)}")
        check_ctx_value(self.n_ctx)
        if self.max_chunks is not None and self.max_chunks < 1:
            raise ConfigError(f"--chunks must be >= 0 (0 = all of the text), got {self.max_chunks}")
        check_text_file(self.text, "--text")


def _check_output(student, teacher, out: Path, job: HealJob, *, overwrite: bool) -> bool:
    """Output checks before loading; whether it is a GGUF (else an HF folder)."""
    from ..io import check_output_folder, check_output_path
    inputs = [p for p in (student, teacher, job.text, *job.heal.data) if p]
    if str(out).endswith(".gguf"):
        check_output_path(out, overwrite=overwrite, inputs=inputs)
        return True
    from ..hfout import check_folder
    check_output_folder(out, overwrite=overwrite, inputs=inputs)
    check_folder(student, out, overwrite=overwrite)
    return False


def heal(student: str | Path, out: str | Path, job: HealJob, *, teacher: str | Path | None = None,
         resume: bool = False, overwrite: bool = False, progress: bool = True, command: str = ""):
    """Heal the pruned model `student` from `teacher` (None: the embedded SmolLM2) and write `out` (.gguf: a GGUF
    of job.type, evaluated in llama.cpp; otherwise an HF folder, evaluated in torch) with its report. Returns the
    Report (None on the non-writing ranks of a torch.distributed launch)."""
    from ..compress import source_bytes
    from ..model import load
    from ..report import Report
    from ..source import check_ctx, source_info
    out = Path(out)
    if teacher is not None and Path(teacher).resolve() == Path(student).resolve():
        raise ConfigError(f"--teacher {teacher} is the student itself; give the model the student was pruned from")
    gguf_out = _check_output(student, teacher, out, job, overwrite=overwrite)
    check_work_folder(out, resume)
    infos = [source_info(student), source_info(teacher)]
    if job.evaluate:
        for info in infos:
            check_ctx(job.n_ctx, info)
    check_models_fit(job.heal, infos)
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    say(f"loading the teacher {teacher or 'the embedded SmolLM2-135M-Instruct'} and the student {student} ...")
    t_model = load(teacher, progress=progress)
    s_model = load(student, progress=progress)
    _check_pair(s_model, t_model, job, gguf_out)
    rec = heal_step(s_model, t_model, job.heal, out, resume=resume, layer_map=None, text=job.text,
                    progress=progress, say=say)
    if not is_main_process():
        return None
    export, ev = write_and_evaluate(s_model, t_model, out, gguf_out, job, healed=True, ref_name="teacher",
                                    overwrite=overwrite, progress=progress, say=say)
    rep = Report(command=command or f"heal {student} --teacher {teacher or '(default)'} -o {out}",
                 source=str(t_model.source), output=str(out), type=export["type"], export=export, evaluation=ev,
                 steps=[healing_step_record(rec), {"step": "export", "type": export["type"],
                                                   "seconds": export["seconds"]}],
                 source_bytes=source_bytes(t_model.source), healing=rec)
    rep.written = rep.write(out)
    return rep


def _check_pair(student, teacher, job: HealJob, gguf_out: bool) -> None:
    """After loading, before any work: the two models share a vocabulary, the evaluation text holds a chunk, and
    llama.cpp knows the student's pre-tokenizer when it becomes a GGUF."""
    from ..calib import check_eval_text
    sv, tv = student.config.get("vocab_size"), teacher.config.get("vocab_size")
    if sv != tv:
        raise ConfigError(f"the student ({student.source}) has a vocabulary of {sv} tokens, the teacher "
                          f"({teacher.source}) {tv}: distillation compares them token by token")
    if job.evaluate:
        check_eval_text(teacher, job.text, job.n_ctx)
    if gguf_out and student.gguf is None:
        from ..gguf.vocab import check_hf_tokenizer
        check_hf_tokenizer(student.tokenizer, student.source, job.pre_tokenizer)


def write_and_evaluate(model, ref, out: str | Path, gguf_out: bool, opts, *, healed: bool, ref_name: str,
                       overwrite: bool, progress: bool, say) -> tuple[dict, dict | None]:
    """Write `model` to `out` (write_model), remove the healing work folder once it is written (`healed`), and
    evaluate the result against `ref` when opts.evaluate. `opts`: a job or config with type, hf_dtype,
    pre_tokenizer, evaluate, text, n_ctx, max_chunks and speed. Returns (the export record, the evaluation)."""
    export, target = write_model(model, Path(out), gguf_out, type=opts.type, hf_dtype=opts.hf_dtype,
                                 pre_tokenizer=opts.pre_tokenizer, overwrite=overwrite, progress=progress, say=say)
    if healed:
        clear_work_folder(out)
    ev = None
    if opts.evaluate:
        from ..eval import evaluate
        say(f"evaluating against the {ref_name} ...")
        ev = evaluate(target, ref, text_path=opts.text, n_ctx=opts.n_ctx, max_chunks=opts.max_chunks,
                      speed=opts.speed, progress=progress)
    return export, ev


def write_model(model, out: Path, gguf_out: bool, *, type: str, hf_dtype: str, pre_tokenizer: str | None,
                overwrite: bool, progress: bool, say) -> tuple[dict, object]:
    """Write `model` as a GGUF of `type` or an HF folder; (the export record, what evaluate() takes for it)."""
    if gguf_out:
        from ..gguf.writer import export_gguf
        say(f"writing {out} ({type}) ...")
        rec = export_gguf(model, out, type, overwrite=overwrite, progress=progress, pre_tokenizer=pre_tokenizer)
        return rec.to_dict(), out
    from ..hfout import save_hf
    from ..model import load
    say(f"writing the HF folder {out} ...")
    t = time.perf_counter()
    save_hf(model, out, dtype=hf_dtype, overwrite=overwrite)
    size = (out / "model.safetensors").stat().st_size
    n = model.n_params()
    rec = {"path": str(out), "type": hf_dtype, "n_params": n, "file_bytes": size, "tensor_bytes": size,
           "bits_per_weight": 8 * size / n, "seconds": time.perf_counter() - t, "tensors": [], "fallbacks": []}
    return rec, load(out, progress=False)              # reloaded by transformers: the check that it loads
