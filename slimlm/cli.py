"""Command line: parse arguments, call one library function per subcommand, print the headline numbers.

Errors in the user's input end in one `error: ...` line and exit code 2; Ctrl-C exits 130 and SIGTERM 143,
both after temp files are removed.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
from pathlib import Path

from .errors import ConfigError, SlimlmError
from .presets import PRESETS
from .search import DEFAULT_BASELINES, STUDY
from .train.config import (
    COMPILE,
    PARALLEL,
    PRECISIONS,
    QAT_WEIGHTS,
    TEACHER_TARGETS,
    TRAIN_PARAMS,
    TrainConfig,
)

TYPES = ", ".join(p.name for p in PRESETS.values())
_T = TrainConfig()
HEAL_DESCRIPTION = (
    "Healing distils the pruned model (the student) from the original (the teacher), cheap stages first, each "
    "measured by the held-out KL to the teacher and undone if it raised it: bias compensation of removed neurons, "
    "heads and layers (one pass, no gradient; only with --bias), block-wise reconstruction of each changed layer "
    "alone, then end-to-end distillation (forward KL on the logits). Checkpoints and the teacher's cache go to "
    "OUT.heal-work/ beside the output (removed after success); the report gets a table of the stages and the loss "
    "curve OUT.loss.png.")


def _add_heal_args(p: argparse.ArgumentParser, *, command: bool) -> None:
    """The healing options, shared by heal, prune and compress (dest = the TrainConfig/HealConfig field; None
    means not given, so that prune/compress can refuse them without --heal)."""
    g = p.add_argument_group("healing", None if command else HEAL_DESCRIPTION)
    g.add_argument("--heal", metavar="BUDGET", help=(
        "healing budget: a duration (90s, 30m, 1.5h: wall time of the whole healing, preparation included) or "
        "a token count of end-to-end training (500k, 2M, 120000; lower-case m is minutes, upper-case M millions)"
        + (f" (default {_T.budget})" if command else "; heal the pruned model from the original before it is "
           "written")))
    g.add_argument("--data", nargs="+", metavar="FILE", help="training text: plain text files (one document each) "
                   "or JSONL files (.jsonl/.ndjson: one record a line with \"text\", chat \"messages\" or \"prompt\"+"
                   "\"completion\"); default: the bundled calibration text plus text the teacher generates")
    g.add_argument("--generate", type=int, metavar="N", help="tokens of text the teacher generates itself (sampled "
                   "with --seed, deduplicated) to train on (default: 0 with --data; without it, about a tenth of the "
                   "budget, at most 16384 tokens)")
    g.add_argument("--resume", action="store_true", help="continue an interrupted healing from the checkpoint in "
                   "OUT.heal-work/ (same command and settings: a changed setting, dataset or model is refused); "
                   "ends with the same weights as an uninterrupted run")
    g.add_argument("--bias", dest="bias", action=argparse.BooleanOptionalAction, help="run the bias compensation "
                   "stage first (default: off; on SmolLM2 it raised the held-out KL and was undone, and block-wise "
                   "reconstruction does what it does and more)")
    g.add_argument("--no-blockwise", dest="blockwise", action="store_const", const=False, help="skip block-wise "
                   "reconstruction")
    g.add_argument("--no-e2e", dest="e2e", action="store_const", const=False, help="skip end-to-end distillation")
    g.add_argument("--lr", type=float, metavar="LR", help=f"end-to-end peak learning rate (AdamW, linear warmup "
                   f"then cosine; default {_T.lr:g})")
    g.add_argument("--qat-weights", choices=QAT_WEIGHTS, help="--method qat: what becomes of the float block "
                   "weights. round (default): they stay, and learned rounding (SignRound-style) gives each an offset "
                   "in units of its block's level spacing, at most one level, at --round-lr, while --lr (default "
                   "1e-4) trains the norms; codes: the same offsets move the starting codes (GPTQ's or the "
                   "encoder's) by at most one level, and the learned scales never re-round them; frozen: they stay, "
                   "their codes follow the learned block scales only; ste: they train through the straight-through "
                   "estimator at --lr (default 1e-5)")
    g.add_argument("--scale-lr", type=float, metavar="LR", help="--method qat: peak learning rate of the blocks' "
                   "learned scales (factors on their fp16 d/dmin, so a step is relative; same schedule; default "
                   "1e-3; with --qat-weights ste: the weights' --lr, or --qat-lr after --prune)")
    g.add_argument("--sub-scales", action="store_const", const=True, help="--method qat: the K-quants' and "
                   "IQ4_XS's integer sub-block scales (and mins) train too, at --scale-lr in units of the largest "
                   "value they store, rounded to their stored integers in every forward (default: they stay the "
                   "encoder's; only the fp16 d/dmin train)")
    g.add_argument("--runtime-activations", action="store_const", const=True, help="--method qat: every linear's "
                   "input is rounded as llama.cpp's CPU backend rounds it before its quantized dot products (Q8_K's "
                   "blocks of 256 for K-quants and IQ4_XS, Q8_0's of 32 for the legacy types; straight through), so "
                   "training sees and the held-out KL measures what the file does in llama.cpp on a CPU (default: "
                   "float activations)")
    g.add_argument("--qat-embeddings", action="store_const", const=True, help="--method qat: the token embedding "
                   "(and the LM head, tied to it or not) trains on its GGUF grid too: its block scales and sub-block "
                   "scales (--sub-scales), its codes following the nearest levels; never its float weights or "
                   "learned rounding (default: it is written as the encoder or GPTQ quantized it)")
    g.add_argument("--embedding-scale-lr", type=float, metavar="LR", help="--qat-embeddings: peak learning rate of "
                   "the embedding / LM head's block scales, apart from the block linears' --scale-lr (one tensor read "
                   "by every token on both sides: a lower rate may keep it steadier; default: --scale-lr's)")
    g.add_argument("--round-lr", type=float, metavar="LR", help="--method qat: peak learning rate of learned "
                   "rounding's offsets (a step of LR moves them LR levels; default 0.01)")
    g.add_argument("--train", dest="train_params", choices=TRAIN_PARAMS, help="what trains end to end: all, "
                   "all-but-embeddings (default: the tied embedding/LM head frozen), norms+pruned (norms and the "
                   "changed layers), from-changed (every layer from the first changed one on, so the backward "
                   "pass stops there), lora (LoRA adapters via peft, merged before export)")
    g.add_argument("--lora", dest="lora_rank", type=int, metavar="R", help=f"LoRA rank (implies --train lora; "
                   f"default {_T.lora_rank})")
    g.add_argument("--teacher-targets", choices=TEACHER_TARGETS, help="the teacher's outputs: full (the whole "
                   "distribution, the teacher run at every step), topk (the top --topk log-probabilities plus the "
                   "remaining mass, computed once per training token: with the step while each training row is seen "
                   "once, else cached memory-mapped in the work folder), or auto (default: topk unless "
                   "--hidden-weight is given, or rows are seen twice and the cache would pass 2 GiB; on SmolLM2 top-k "
                   "was within 1%% of full logits' KLD and trained faster, bench/heal.py)")
    g.add_argument("--topk", type=int, metavar="K", help=f"logits kept per token in the teacher cache "
                   f"(default {_T.topk})")
    g.add_argument("--temperature", type=float, metavar="T", help=f"distillation temperature (default "
                   f"{_T.temperature:g})")
    g.add_argument("--ce-weight", type=float, metavar="W", help="add W x cross-entropy on the training text "
                   "(default 0)")
    g.add_argument("--hidden-weight", type=float, metavar="W", help="add W x the normalised MSE of the residual "
                   "stream at the kept layers (with --teacher-targets full; default 0)")
    g.add_argument("--seq-len", type=int, metavar="N", help=f"tokens per training sequence (default {_T.seq_len})")
    g.add_argument("--micro-batch", type=int, metavar="N", help=f"sequences per forward/backward (default "
                   f"{_T.micro_batch})")
    g.add_argument("--accum", type=int, metavar="N", help=f"micro-batches per optimizer step (default {_T.accum})")
    g.add_argument("--precision", choices=PRECISIONS, help="auto (default: bf16 autocast where the device has "
                   "fast bf16 matmuls, else fp32), fp32 or bf16")
    g.add_argument("--grad-checkpointing", action="store_const", const=True, help="recompute activations in the "
                   "backward pass (less memory, slower)")
    g.add_argument("--compile", choices=COMPILE, help="torch.compile the student's forward and backward: auto "
                   "(default: on for a --heal of 15 minutes or 100k tokens and more, where its one-time compile of "
                   "~2 minutes pays back; needs a C++ compiler on a CPU), on or off")
    g.add_argument("--parallel", choices=PARALLEL, help="how several processes (started by torchrun or accelerate "
                   "launch) share the model: ddp (default: each holds the whole model, gradients and AdamW state) "
                   "or fsdp (parameters, gradients and optimizer state sharded across the processes, for a model "
                   "whose training state does not fit one device; not with --train lora); with one process both "
                   "are plain training")
    g.add_argument("--eval-every", type=int, metavar="N", help=f"held-out KL every N steps, the best state kept "
                   f"(default {_T.eval_every}; 0: only at the end)")
    g.add_argument("--checkpoint-every", type=int, metavar="N", help="checkpoint every N steps (0: none; default: "
                   "every 100 steps, at most one per 10 minutes, since a checkpoint of weights, best state and "
                   "AdamW moments takes seconds to write)")
    g.add_argument("--seed", type=int, metavar="N", help="seed of the data order and generation (default 0)")


def _heal_config(a, *, default_budget: str | None = None, qat: bool = False):
    """The HealConfig of the healing options given (None without --heal), validated. --device is every torch
    pass's (not only healing's): it goes to the training config when there is healing. `qat`: the command can run
    quantization-aware training (compress, which checks its options against --method); else they are refused."""
    from .train.command import FLAGS, QAT_FLAGS, heal_options
    budget = a.heal or default_budget
    given = {k: getattr(a, k) for k in FLAGS if getattr(a, k, None) is not None and (k != "device" or budget)}
    if not qat and (named := [FLAGS[k] for k in QAT_FLAGS if k in given]):
        raise ConfigError(f"{', '.join(named)} set quantization-aware training, which runs in slimlm compress "
                          f"--method qat or gptq+qat (this command heals in float)")
    return heal_options(budget, given, resume=a.resume)


def _add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", metavar="DEV", help="where torch computes: auto (default: the GPU when there is "
                   "one), cpu, cuda or cuda:N. The layer passes (importance matrix, GPTQ/AWQ statistics, pruning's "
                   "scores and OBS statistics) move one decoder layer at a time to the device, the calibration "
                   "activations a micro-batch at a time; healing trains there (several processes: start slimlm "
                   "with torchrun, data parallel). The solvers (GPTQ, OBS, surgery) run on the CPU")


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text", metavar="FILE", help="UTF-8 text to evaluate on (default: a held-out part of "
                   "Python's bundled documentation, pydoc_data.topics)")
    p.add_argument("--ctx", type=int, default=512, metavar="N", help="tokens per evaluation chunk (default 512)")
    p.add_argument("--chunks", type=int, default=16, metavar="N",
                   help="evaluate at most N chunks (default 16; 0 = all of the text)")
    p.add_argument("--no-speed", action="store_true", help="skip the tokens/s measurement")


def _add_model_output_args(p: argparse.ArgumentParser, out_help: str) -> None:
    p.add_argument("model", nargs="?", help="HF model folder or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("-o", "--output", required=True, metavar="OUT.gguf", help=out_help)
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (atomically)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="slimlm", description="Compress an LLM into a GGUF that llama.cpp "
                                 "runs, and measure it against the original.")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    p = sub.add_parser("compress", help="model -> GGUF, evaluated against the original, with a report",
                       description="Load MODEL (an HF folder with safetensors, a .gguf file, or nothing for the "
                       "embedded SmolLM2-135M-Instruct), write it as a GGUF of --type, evaluate the GGUF in "
                       "llama.cpp against the original in torch, and write OUT.report.json / OUT.report.md.")
    _add_model_output_args(p, "output GGUF path")
    p.add_argument("--type", default="Q8_0", metavar="TYPE", help=f"llama.cpp preset: {TYPES} (default Q8_0), "
                   f"with llama-quantize's per-tensor rules (output projection, attn_v, ffn_down) and fallbacks")
    p.add_argument("--pure", action="store_true", help="every quantizable tensor at the preset's main type "
                   "(llama-quantize --pure); fallbacks for rows that do not fit still apply")
    p.add_argument("--no-eval", action="store_true", help="write the GGUF and report without evaluating")
    p.add_argument("--imatrix", metavar="FILE", help="importance matrix (llama.cpp imatrix GGUF or legacy .dat) "
                   "that weights the encoders' error where llama.cpp uses one (K-quants, Q4_0/Q4_1/Q5_0/Q5_1)")
    p.add_argument("--calib", metavar="FILE", nargs="?", const="default", help="calibration text (no FILE: the "
                   "bundled calibration text): an importance matrix is computed from it unless --imatrix is "
                   "given; GPTQ and --target-size/--bpw use it too")
    p.add_argument("--method", choices=["rtn", "gptq", "awq", "awq+gptq", "qat", "gptq+qat"], default="rtn", help="rtn: "
                   "llama.cpp's rounding (default); gptq: GPTQ written exactly onto the same block grids, layer "
                   "by layer on calibration text (--calib FILE, else the bundled text); awq: activation-aware "
                   "per-channel scales searched against the encoders and folded into the norms and the up projection's rows "
                   "(no extra operations in the GGUF), then rounding; awq+gptq: both; qat: quantization-aware "
                   "training: the block linears compute with exactly their GGUF values (starting from slimlm's "
                   "encoder, with --calib's importance matrix) while the blocks' fp16 scales and the norms (--qat-weights: "
                   "and the rounding or the float weights) are distilled from the original end to end, for --qat-budget (default: --heal's) with the healing options; the "
                   "file holds the last step's codes (learned rounding at --round-lr 0.01, the scales at --scale-lr "
                   "1e-3, the norms at --lr 1e-4, --precision as healing's: bf16 autocast where the CPU/GPU is fast at it, "
                   "the file exact either way); gptq+qat: QAT starting from GPTQ's "
                   "codes, the output projection GPTQ'd and kept")
    p.add_argument("--qat-budget", metavar="BUDGET", help="--method qat/gptq+qat: QAT's training budget (a "
                   "duration or a token count, as --heal; default: --heal's). With --prune R --heal B the pruned "
                   "model is healed for B first (healing's options and defaults), then QAT trains for this "
                   "(checkpoints in OUT.qat-work/, its loss curve OUT.qat-loss.png)")
    p.add_argument("--qat-lr", type=float, metavar="LR", help="with --prune --heal and --method qat/gptq+qat: "
                   "QAT's learning rate (default 1e-4, the norms'; 1e-5 with --qat-weights ste; --lr is "
                   "healing's; --scale-lr, --round-lr and --qat-weights are QAT's; --precision is both's)")
    p.add_argument("--act-order", action="store_true", help="GPTQ: quantize the blocks with the largest "
                   "inputs first")
    p.add_argument("--target-size", metavar="SIZE", help="size budget for the whole file (70MB = 10^6 bytes, "
                   "70MiB or 70M = 2^20): every 2-D tensor, embedding and output included, gets the block type "
                   "that minimizes the predicted KL divergence within it, measured per tensor and type on "
                   "calibration text (cached); --type is then ignored: the file carries the label of its "
                   "most common type")
    p.add_argument("--bpw", type=float, metavar="BITS", help="size budget in bits per weight over all "
                   "parameters, instead of --target-size")
    p.add_argument("--calib-chunks", type=int, default=32, metavar="N", help="calibration chunks of --ctx "
                   "tokens (default 32; GPTQ uses the first --gptq-chunks, the sensitivity measurement the "
                   "first --sensitivity-chunks)")
    p.add_argument("--gptq-chunks", type=int, default=16, metavar="N", help="chunks for GPTQ's Hessians "
                   "(default 16)")
    p.add_argument("--sensitivity-chunks", type=int, default=8, metavar="N", help="chunks for the "
                   "sensitivity measurement of --target-size/--bpw (default 8)")
    p.add_argument("--measure-effects", action="store_true", help="with --target-size/--bpw: also measure "
                   "each tensor's KL divergence alone with its written weights (one calibration chunk; one partial "
                   "forward pass per tensor) and list it beside the prediction in the report")
    p.add_argument("--weights-only-price", action="store_true", help="with --target-size/--bpw: price each type by "
                   "its weights' rounding alone, not also by the rounding of the activations llama.cpp's CPU backend "
                   "multiplies it with (Q8_K's blocks of 256 for K-quants and IQ4_XS, Q8_0's of 32 for the legacy "
                   "types): for a runtime that multiplies in float (a GPU's f16 path, Metal)")
    p.add_argument("--no-cache", action="store_true", help="measure sensitivity again even when a cached "
                   "table for this model and text exists (cache: $SLIMLM_CACHE or ~/.cache/slimlm)")
    p.add_argument("--pre-tokenizer", metavar="NAME", help="llama.cpp pre-tokenizer name for an HF tokenizer "
                   "whose pre-tokenizer slimlm cannot identify (by default such a model is refused)")
    p.add_argument("--prune", type=float, metavar="R", help="structured pruning first (as slimlm prune --ratio R): "
                   "remove R of all parameters, then quantize the pruned model (calibration, imatrix and GPTQ "
                   "on the pruned model; evaluation against the unpruned original)")
    p.add_argument("--prune-method", default="mlp+layers", choices=["mlp+layers", "mlp", "width", "layers"],
                   help="with --prune: what is removed (default mlp+layers; see slimlm prune --help)")
    p.add_argument("--prune-allocate", choices=["uniform", "global", "sensitivity"], help="with --prune: MLP "
                   "widths per layer (default global: llama.cpp's per-layer architecture) or uniform (the family's own)")
    p.add_argument("--prune-layer-share", type=float, metavar="S", help="with --prune and --prune-method "
                   "mlp+layers: the share of R removed as whole layers (default as slimlm prune's --layer-share)")
    p.add_argument("--no-unhealed", action="store_true", help="with --prune and --heal: do not also quantize and "
                   "evaluate the unhealed pruned model (OUT.unhealed.gguf) for the side-by-side comparison")
    p.add_argument("--prune-ffn-multiple", type=int, metavar="N", help="with --prune and --prune-method mlp or "
                   "mlp+layers: MLP widths a multiple of N (256: ffn_down's rows stay K-quant sized; unlike "
                   "--format-aware the hidden size and heads are not touched). Default with --target-size/--bpw: "
                   "256 when the model's MLP widths are multiples of it (and no --format-aware/--prune-hidden), "
                   "else any multiple of 32; give 32 for the finer widths")
    p.add_argument("--prune-hidden", type=int, metavar="N", help="with --prune: also keep only N hidden (embedding) "
                   "channels (Minitron-style, as slimlm prune --hidden; R counts them and the method removes the "
                   "rest). A hidden size that is a multiple of 256 (512 for SmolLM2's 576) lets a size budget use "
                   "K-quants (Q3_K, Q4_K ...) on every tensor that reads the residual stream; heal afterwards")
    p.add_argument("--format-aware", action="store_true", help="with --prune: round pruned widths to --type's "
                   "block size so that no tensor falls back to another type (with --target-size/--bpw: to the "
                   "K-quants' 256)")
    p.add_argument("--compare", metavar="TYPE", nargs="?", const="same", help="also make llama.cpp's own "
                   "quantization of the same model (F32 GGUF -> llama_model_quantize, with the importance matrix "
                   "of the same calibration text when slimlm uses one) at TYPE (default: --type), write it as "
                   "OUT.llama-cpp.gguf, evaluate both on the same tokens and print slimlm / llama.cpp ratios")
    p.add_argument("--stream", choices=["auto", "on", "off"], default="auto", help="read an HF folder's weights "
                   "one decoder layer at a time (calibration, importance matrix, GPTQ/AWQ and the writer hold about "
                   "one layer, not the model): on, off, or auto (default: when the float32 model and its working "
                   "copies would not fit the memory available). A streamed run cannot --prune, --heal, use a size "
                   "budget, --compare or evaluate (give --no-eval): those need the whole model; they are refused "
                   "before any weight is read")
    _add_eval_args(p)
    _add_heal_args(p, command=False)
    _add_device_arg(p)

    p = sub.add_parser("eval", help="perplexity, KL divergence, top-1 agreement, size and speed",
                       description="Evaluate FILE against --ref on the same tokens. A .gguf runs in llama.cpp; "
                       "an HF folder runs in torch.")
    p.add_argument("file", help=".gguf file (llama.cpp) or HF folder (torch)")
    p.add_argument("--ref", help="reference model: .gguf file (llama.cpp) or HF folder (torch)")
    p.add_argument("--json", metavar="OUT.json", help="also write the full result as JSON")
    _add_eval_args(p)

    p = sub.add_parser("imatrix", help="compute an importance matrix (llama.cpp's imatrix GGUF format)",
                       description="Run calibration text through MODEL and save, for every linear of the "
                       "transformer blocks, the mean squared input per column, as llama-imatrix does. The file "
                       "works with slimlm --imatrix and llama-quantize --imatrix.")
    _add_model_output_args(p, "output imatrix file")
    _add_device_arg(p)
    p.add_argument("--calib", metavar="FILE", help="calibration text (default: the bundled calibration split "
                   "of Python's documentation)")
    p.add_argument("--ctx", type=int, default=512, help="tokens per chunk (default 512)")
    p.add_argument("--chunks", type=int, default=32, help="chunks to run (default 32)")

    p = sub.add_parser("kmeans", help="k-means codebook model (torch/safetensors), evaluated against the original",
                       description="Quantize every decoder-layer linear of MODEL to a per-row codebook of 2^BITS "
                       "values (importance-weighted k-means, SqueezeLLM-style), write OUT_DIR (safetensors with "
                       "codebooks and packed indices, config, tokenizer; other tensors float16) and evaluate it "
                       "in torch against the original. llama.cpp has no codebook format: load it with "
                       "slimlm.codebook.load_kmeans.")
    p.add_argument("model", nargs="?", help="HF model folder or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace the files in OUT_DIR")
    p.add_argument("--bits", type=int, default=4, help="index bits per weight, 2^BITS centroids per row (default 4)")
    p.add_argument("--calib", metavar="FILE", nargs="?", const="default", help="weight the clustering by the "
                   "mean squared input of each column on this text (no FILE: the bundled text; default: "
                   "unweighted)")
    p.add_argument("--calib-chunks", type=int, default=16, metavar="N", help="calibration chunks (default 16)")
    p.add_argument("--no-eval", action="store_true", help="write without evaluating")
    _add_eval_args(p)

    p = sub.add_parser("prune", help="prune: structured (smaller, faster GGUF) or weight pruning (zeros)",
                       description="Remove parameters from MODEL and write OUT: a .gguf of --type, or (any other "
                       "name) an HF folder that transformers loads. Structured methods physically remove MLP "
                       "neurons, attention heads (whole KV groups, then query heads within groups), hidden "
                       "channels and layers, so llama.cpp runs the result faster; weight methods zero weights "
                       "(unstructured or N:M), which helps accuracy-at-sparsity and sparse runtimes but makes a "
                       "GGUF neither smaller nor faster. The result is evaluated against the original "
                       "(llama.cpp for a GGUF, torch for an HF folder) and a report is written next to OUT.")
    p.add_argument("model", nargs="?", help="HF model folder or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="OUT.gguf, or a folder for HF safetensors")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (atomically)")
    p.add_argument("--ratio", type=float, metavar="R", help="structured: fraction of ALL parameters to remove "
                   "(embedding included), e.g. 0.25")
    p.add_argument("--method", default="mlp+layers", choices=["mlp+layers", "mlp", "width", "layers", "magnitude",
                                                              "wanda", "sparsegpt"],
                   help="mlp+layers (default: faster in llama.cpp than neurons alone, at a KLD close to theirs): "
                   "--layer-share of R from the least influential whole layers (block influence), the rest from "
                   "MLP neurons; mlp (most accurate, slower): MLP neurons only, chosen and compensated by OBS on "
                   "calibration activations (the down projection refit by least squares); width: MLP neurons and query heads "
                   "at the same fraction; layers: whole layers only (ShortGPT); magnitude/wanda/sparsegpt: weight "
                   "pruning to --sparsity")
    p.add_argument("--layer-share", type=float, default=0.6, metavar="F", help="mlp+layers: the share of R "
                   "removed as whole layers (default 0.6; more is faster and, past a point, less accurate)")
    p.add_argument("--importance", default="obs", choices=["obs", "activation", "taylor", "magnitude"],
                   help="structured: how neurons/heads are ranked: obs (least-squares error with refit of the "
                   "next matrix; default), activation (Minitron's mean |activation|), magnitude (weight norms)")
    p.add_argument("--sparsity", metavar="S", help="weight pruning: 0.5, 50%% (per layer) or N:M such as 2:4")
    p.add_argument("--hidden", type=int, metavar="N", help="structured: keep N hidden (embedding) channels "
                   "(Minitron-style; RMSNorm then normalizes over fewer channels: heal afterwards)")
    p.add_argument("--ffn", type=int, metavar="N", help="structured: keep N MLP neurons per layer")
    p.add_argument("--experts", type=int, metavar="N", help="structured, mixture of experts: keep N experts per "
                   "layer, those the router gives the most weight on the calibration text (--ratio removes "
                   "experts for a MoE model's MLP share)")
    p.add_argument("--heads", metavar="KVxQ", help="structured: keep KV heads x query heads per KV head, e.g. 2x2")
    p.add_argument("--drop-layers", metavar="I,J,...", help="structured: remove these layers (0-based)")
    p.add_argument("--format-aware", action="store_true", help="round every width (hidden, MLP, attention = "
                   "heads x head_dim) to a multiple of --type's block size (256 for K-quants), so every tensor "
                   "takes the requested type with no fallback; attention heads are cut to fit where needed")
    p.add_argument("--allocate", choices=["uniform", "global", "sensitivity", "owl"],
                   help="MLP widths: global (default for mlp+layers, mlp and width into a GGUF; best measured): "
                   "per layer, the cheapest neurons across all layers by OBS error relative to each layer's residual stream; uniform: the "
                   "same width everywhere (the family's own architecture; default for layers and for an HF folder, which transformers then "
                   "loads alone); sensitivity: "
                   "per layer from the measured KLD of pruning that layer alone at 25/50/75%% (as slimlm "
                   "sensitivity). Per-layer widths export as llama.cpp's per-layer architecture; their HF folder loads with "
                   "slimlm.load. Weight pruning: uniform (default), owl: per-layer sparsity by outlier ratio "
                   "(OWL; layers with more large |W|*|X| scores pruned less, +-0.08 around --sparsity), or "
                   "sensitivity: per-layer sparsity within +-0.08 from the measured KLD of pruning each layer alone "
                   "(the mean stays --sparsity)")
    p.add_argument("--steps", type=int, default=1, metavar="K", help="iterative pruning with --heal: K rounds, "
                   "each removing 1/K of the way to the plan --ratio chooses (layers least influential first, "
                   "every MLP width moved k/K of the way), then healing with 1/K of the --heal budget (default 1: "
                   "prune once, then heal; bench/heal.py compares both at equal tokens)")
    p.add_argument("--type", default="Q8_0", metavar="TYPE", help=f"GGUF output type: {TYPES} (default Q8_0)")
    p.add_argument("--pre-tokenizer", metavar="NAME", help="llama.cpp pre-tokenizer name for an HF tokenizer "
                   "whose pre-tokenizer slimlm cannot identify (by default such a model is refused for a GGUF)")
    p.add_argument("--hf-dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="HF folder output precision (default float32)")
    p.add_argument("--calib", metavar="FILE", help="calibration text (default: the bundled calibration split)")
    p.add_argument("--calib-chunks", type=int, default=16, metavar="N", help="calibration chunks (default 16)")
    p.add_argument("--no-eval", action="store_true", help="write without evaluating")
    p.add_argument("--stream", choices=["auto", "on", "off"], default="auto", help="read an HF folder's weights "
                   "one decoder layer at a time (block influence, MLP curves, OBS and the writer hold about one "
                   "layer; pruned layers wait on disk beside the output): on, off, or auto (default: when the "
                   "float32 model and its working copies would not fit the memory available). A streamed prune "
                   "removes layers, heads and MLP neurons (obs, activation or magnitude importance) into a GGUF; "
                   "weight pruning, --hidden, --experts, taylor importance, --allocate sensitivity, --heal and the "
                   "evaluation (give --no-eval) need the whole model and are refused before any weight is read")
    _add_eval_args(p)
    _add_heal_args(p, command=False)
    _add_device_arg(p)

    p = sub.add_parser("heal", help="heal a pruned model: distil it from the original, cheap stages first",
                       description="Distil STUDENT (a pruned model: HF folder or .gguf) from TEACHER, the model it "
                       "was pruned from, and write OUT: a .gguf of --type (evaluated in llama.cpp against the "
                       "teacher) or, any other name, an HF folder (evaluated in torch). " + HEAL_DESCRIPTION
                       + " Which teacher layer each student layer came from is found from their norm weights.")
    p.add_argument("student", help="the pruned model: HF folder or .gguf file")
    p.add_argument("--teacher", metavar="TEACHER", help="the original model it was pruned from: HF folder or .gguf "
                   "file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="OUT.gguf, or a folder for HF safetensors")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (atomically)")
    p.add_argument("--type", default="Q8_0", metavar="TYPE", help=f"GGUF output type: {TYPES} (default Q8_0)")
    p.add_argument("--hf-dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="HF folder output precision (default float32)")
    p.add_argument("--pre-tokenizer", metavar="NAME", help="llama.cpp pre-tokenizer name for an HF tokenizer "
                   "whose pre-tokenizer slimlm cannot identify (by default such a model is refused for a GGUF)")
    p.add_argument("--no-eval", action="store_true", help="write without evaluating")
    _add_eval_args(p)
    _add_heal_args(p, command=True)
    _add_device_arg(p)

    p = sub.add_parser("sensitivity", help="per-layer KLD when only that layer is pruned or quantized; heatmap",
                       description="For every decoder layer, measure the KL divergence to the original when only "
                       "that layer is changed: its MLP pruned at each --ratios (OBS choice and refit, as slimlm "
                       "prune), k query heads removed from every KV group, the whole layer skipped, and each of its "
                       "tensors quantized alone to each --types. Prints the table, writes OUT.png (heatmap) and "
                       "OUT.json (per layer and per tensor). Each cell is a real forward from that layer's cached "
                       "input on one chunk of --text.")
    p.add_argument("model", nargs="?", help="HF model folder or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("-o", "--output", required=True, metavar="OUT.png", help="heatmap PNG (OUT.json beside it)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT.png / OUT.json if they exist")
    p.add_argument("--ratios", default="0.25,0.5,0.75", metavar="R,R", help="MLP fractions removed (default "
                   "0.25,0.5,0.75)")
    p.add_argument("--types", default="Q8_0,Q4_0", metavar="T,T", help="block types for the quantization columns "
                   "(default Q8_0,Q4_0; a tensor whose rows do not fit a type's blocks is skipped)")
    p.add_argument("--calib", metavar="FILE", help="calibration text for the OBS choice (default: bundled)")
    p.add_argument("--calib-chunks", type=int, default=8, metavar="N", help="calibration chunks (default 8)")
    p.add_argument("--text", metavar="FILE", help="text the KLD is measured on (default: the bundled held-out "
                   "text); its first chunk of --ctx tokens")
    p.add_argument("--ctx", type=int, default=512, metavar="N", help="tokens per chunk (default 512)")

    p = sub.add_parser("inspect", help="metadata, per-tensor types and bits/weight of a GGUF file")
    p.add_argument("file", help=".gguf file")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")

    p = sub.add_parser("search", help="the best file for a size, speed or quality target: pruning x bits x "
                       "healing, every candidate measured in llama.cpp (Optuna; resumable)",
                       description="Search structured pruning (ratio, share of whole layers), healing, the PTQ "
                       "method and (without --target-size) the bits per weight for the file that best meets one "
                       "target. Each trial is a `slimlm compress` recipe whose GGUF is evaluated in llama.cpp "
                       "against the original on the same tokens; llama.cpp's own presets of the original are made "
                       "and measured once for comparison. OUT_DIR gets best.gguf, recipes.json (the Pareto-optimal "
                       "recipes with their commands), search.json, report.md, report.html and plots. The Optuna "
                       "study (OUT_DIR/study.db) is the trial journal: run the same command again to resume a "
                       "killed or finished search (more --trials or --budget extend it).")
    p.add_argument("model", nargs="?", help="HF model folder or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="folder for the results and trials")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--target-size", metavar="SIZE", help="file size budget (64MiB, 70MB, bytes): the lowest KL "
                   "divergence at this size")
    g.add_argument("--min-speedup", type=float, metavar="X", help="llama.cpp generation speed at least X times "
                   "that of llama.cpp's --speed-of preset of the original: the lowest KL divergence")
    g.add_argument("--max-kld", type=float, metavar="K", help="KL divergence at most K: the smallest file")
    p.add_argument("--budget", metavar="TIME", help="wall time of this run (90s, 30m, 2h); no trial starts that "
                   "would end after it (default 2h when --trials is not given)")
    p.add_argument("--trials", type=int, metavar="N", help="stop when the study holds N trials (resumed runs "
                   "included)")
    p.add_argument("--heal", metavar="BUDGET", help="pruned candidates may be healed this much (a duration such "
                   "as 10m, or a token count such as 200k); without it nothing is healed but a pruned gptq+qat candidate (--qat)")
    p.add_argument("--data", nargs="+", metavar="FILE", help="healing and QAT text (default: the calibration "
                   "text)")
    p.add_argument("--methods", default="gptq", metavar="M[,M...]", help="PTQ methods to search: rtn, gptq, awq, "
                   "awq+gptq, gptq+qat (default gptq; gptq+qat needs --qat)")
    p.add_argument("--qat", metavar="BUDGET", help="quantization-aware training budget of a gptq+qat candidate (a "
                   "duration such as 15m, or a token count); a pruned one is always healed first, for --heal (or for "
                   "this without --heal), as compress --prune --heal --method gptq+qat --qat-budget does")
    p.add_argument("--max-prune", type=float, default=0.5, metavar="R", help="largest structured pruning ratio "
                   "(fraction of all parameters; default 0.5)")
    p.add_argument("--prune-step", type=float, default=0.05, metavar="S", help="pruning ratios searched in steps "
                   "of S (default 0.05)")
    p.add_argument("--prune-method", default="mlp+layers", choices=["mlp+layers", "mlp", "width", "layers"],
                   help="what pruning removes (default mlp+layers; the share of whole layers is searched)")
    p.add_argument("--baselines", default=",".join(DEFAULT_BASELINES), metavar="T[,T...]|none",
                   help=f"llama.cpp presets of the original made and measured for comparison (default "
                   f"{','.join(DEFAULT_BASELINES)})")
    p.add_argument("--speed-of", default="Q8_0", metavar="TYPE", help="--min-speedup is relative to llama.cpp's "
                   "TYPE of the original (default Q8_0)")
    p.add_argument("--calib", metavar="FILE", default="default", help="calibration text (importance matrices, "
                   "GPTQ, pruning scores, size budgets; default: the bundled calibration text)")
    p.add_argument("--calib-chunks", type=int, default=32, metavar="N", help="calibration chunks (default 32)")
    _add_eval_args(p)
    p.add_argument("--seed", type=int, default=0, help="the search's seed (default 0)")
    p.add_argument("--storage", metavar="URL", help="Optuna storage: a database URL that several machines can "
                   "share (default sqlite:///OUT_DIR/study.db)")
    p.add_argument("--study", default=STUDY, metavar="NAME", help=f"study name in the storage (default {STUDY})")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="local worker processes sharing the study "
                   "(default 1; the cores are shared, so measured speeds vary more)")

    p = sub.add_parser("report", help="plots and an HTML report from compress/prune/heal/eval JSON reports",
                       description="Draw the size-KLD and speed-KLD frontiers of every file the reports measured "
                       "(llama.cpp's files of --compare included), the per-layer widths of pruned files, each "
                       "report's tensor type map and healing curves; write DIR/report.md and a self-contained "
                       "DIR/report.html.")
    p.add_argument("reports", nargs="+", metavar="RUN.json", help="OUT.report.json files (compress, prune, heal), "
                   "a search's search.json, or slimlm eval --json results")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="folder for report.md, report.html and "
                   "the plots")

    p = sub.add_parser("generate", help="generate text from a GGUF file in llama.cpp")
    p.add_argument("file", help=".gguf file")
    p.add_argument("-p", "--prompt", required=True, help="prompt text")
    p.add_argument("-n", "--max-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template "
                   "(rendered by llama-cpp-python in a sandboxed Jinja environment)")
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--ctx", type=int, default=2048, help="context size (default 2048)")
    return ap


def _eval_kwargs(a) -> dict:
    return dict(text_path=a.text, n_ctx=a.ctx, max_chunks=a.chunks or None, speed=not a.no_speed,
                progress=not a.quiet)


def _inputs(*paths) -> list[str]:
    return [p for p in paths if p and p != "default"]


def _check_args(a, *, models: tuple = (), text: str | None = None, calib: str | None = None,
                chunks: str | None = None, calib_chunks: bool = False) -> None:
    """The checks every command shares, before any model is loaded: --ctx, the chunk counts (`chunks`: how
    --chunks may be, "all" when 0 means all of the text, "count" when it must be >= 1), the text files, and
    the headers of `models` (strict folder/GGUF checks, --ctx within the context; None: the default model)."""
    from .calib import check_text_file
    from .source import check_ctx, check_ctx_value, source_info
    check_ctx_value(a.ctx)
    if chunks == "all" and a.chunks < 0:
        raise ConfigError(f"--chunks must be >= 0 (0 = all of the text), got {a.chunks}")
    if chunks == "count" and a.chunks < 1:
        raise ConfigError(f"--chunks must be >= 1, got {a.chunks}")
    if calib_chunks and a.calib_chunks < 1:
        raise ConfigError(f"--calib-chunks must be >= 1, got {a.calib_chunks}")
    check_text_file(text, "--text")
    check_text_file(None if calib == "default" else calib, "--calib")
    for model in models:
        check_ctx(a.ctx, source_info(model))


def compress_config(a):
    """The CompressConfig of parsed `compress` arguments (slimlm search builds its trials through this too)."""
    from .compress import CompressConfig, qat_lrs
    if "qat" in a.method and a.heal and a.prune is None:   # QAT's defaults where the healing options are not
        # given (after --prune they are healing's, and QAT takes --qat-lr: CompressConfig.qat_heal)
        a.lr = qat_lrs(a.lr, a.scale_lr, a.round_lr, a.qat_weights)["lr"]
    return CompressConfig(type=a.type, text=a.text, n_ctx=a.ctx, max_chunks=a.chunks or None,
                         speed=not a.no_speed, evaluate=not a.no_eval, pre_tokenizer=a.pre_tokenizer,
                         imatrix=a.imatrix, calib=a.calib, pure=a.pure, method=a.method,
                         act_order=a.act_order, target_size=a.target_size, bpw=a.bpw,
                         calib_chunks=a.calib_chunks, gptq_chunks=a.gptq_chunks,
                         sensitivity_chunks=a.sensitivity_chunks, cache=not a.no_cache,
                         measure_effects=a.measure_effects, price_activations=not a.weights_only_price,
                         prune=a.prune, prune_method=a.prune_method,
                         prune_allocate=a.prune_allocate, prune_layer_share=a.prune_layer_share,
                         prune_ffn_multiple=a.prune_ffn_multiple, prune_hidden=a.prune_hidden,
                         format_aware=a.format_aware, compare=a.compare, heal=_heal_config(a, qat=True),
                         stream=a.stream,
                         unhealed=not a.no_unhealed, qat_budget=a.qat_budget, qat_lr=a.qat_lr)


def cmd_compress(a) -> int:
    from .compress import compress
    cfg = compress_config(a)
    rep = compress(a.model, a.output, cfg, overwrite=a.overwrite, progress=not a.quiet,
                   command="slimlm " + shlex.join(sys.argv[1:]), resume=a.resume)
    if rep is None:                     # a non-writing rank of a distributed launch
        return 0
    print("\n".join(rep.summary_lines()))
    out = Path(a.output)
    print(f"report: {out.with_suffix('.report.md')} (and .report.json)")
    return 0


def _eval_side(path: str | None):
    if path is None:
        return None
    p = Path(path)
    if p.is_dir():
        from .model import load
        return load(p)
    return p


def cmd_eval(a) -> int:
    from .eval import evaluate
    from .gguf.reader import read_gguf
    from .io import atomic_write_bytes, check_output_path
    _check_args(a, text=a.text, chunks="all")
    if a.json:
        check_output_path(a.json, overwrite=True, inputs=_inputs(a.file, a.ref, a.text))
    for side in (a.file, a.ref):       # strict checks (and --ctx) before loading either side
        if side is not None and Path(side).is_dir():
            _check_args(a, models=(side,))
        elif side is not None:
            read_gguf(side)
    r = evaluate(_eval_side(a.file), _eval_side(a.ref), **_eval_kwargs(a))
    m = r["model"]
    print(f"{a.file}: {m['n_params'] / 1e6:.1f}M params, {m['bits_per_weight']:.3f} bits/weight"
          + (f", {m['file_bytes'] / 2**20:.2f} MiB" if m["file_bytes"] else ""))
    print(f"  perplexity {r['ppl']:.4f} on {r['n_scored_tokens']} scored tokens of {r['text']}")
    if a.ref:
        print(f"  reference perplexity {r['ref_ppl']:.4f}; KL divergence {r['kld']:.6f} (max {r['kld_max']:.4f}); "
              f"top-1 agreement {100 * r['top1_agreement']:.2f}%")
    for side in ("model", "ref"):
        s = (r.get(side) or {}).get("speed")
        if s:
            print(f"  {side} ({r[side]['runtime']}): {s['prompt_tps']:.1f} prompt tok/s, {s['gen_tps']:.1f} "
                  f"generation tok/s, {s['threads']} threads")
    if a.json:
        atomic_write_bytes(a.json, (json.dumps(r, indent=1) + "\n").encode(), overwrite=True)
        print(f"wrote {a.json}")
    return 0


def cmd_imatrix(a) -> int:
    from .calib import calibration_chunks
    from .io import check_output_path
    from .model import load
    from .sequential import collect_imatrix
    check_output_path(a.output, overwrite=a.overwrite, inputs=_inputs(a.model, a.calib))
    _check_args(a, models=(a.model,), calib=a.calib, chunks="count")
    m = load(a.model, progress=not a.quiet)
    chunks, prov = calibration_chunks(m, a.calib, n_ctx=a.ctx, max_chunks=a.chunks)
    im = collect_imatrix(m, chunks, dataset=prov, progress=not a.quiet)
    im.save(a.output, overwrite=a.overwrite)
    print(f"wrote {a.output}: {len(im.sums)} tensors, {int(chunks.numel())} tokens of {prov}")
    return 0


def cmd_kmeans(a) -> int:
    from .codebook import kmeans_model, load_kmeans, save_kmeans
    from .errors import OutputError
    from .model import load
    if not 1 <= a.bits <= 8:
        raise ConfigError(f"--bits must be 1..8, got {a.bits}")
    out = Path(a.output)
    if a.model and Path(a.model).resolve() == out.resolve():
        raise ConfigError(f"{out} is the model's own folder; give another output folder")
    if not out.parent.is_dir():
        raise OutputError(f"output folder {out.parent} does not exist; create it first")
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out} is a file; give a folder for the k-means model")
    if out.exists() and not a.overwrite:
        raise ConfigError(f"{out} exists; pass --overwrite to replace its files")
    _check_args(a, models=(a.model,) if a.calib or not a.no_eval else (), text=a.text, calib=a.calib,
                chunks="all", calib_chunks=True)
    m = load(a.model, progress=not a.quiet)
    if not a.no_eval:
        from .calib import check_eval_text
        check_eval_text(m, a.text, a.ctx)
    im = None
    if a.calib:
        from .calib import calibration_chunks
        from .sequential import collect_imatrix
        chunks, prov = calibration_chunks(m, None if a.calib == "default" else a.calib, n_ctx=a.ctx,
                                          max_chunks=a.calib_chunks)
        im = collect_imatrix(m, chunks, dataset=prov, progress=not a.quiet)
    books = kmeans_model(m, a.bits, im, progress=not a.quiet)
    save_kmeans(m, out, books, a.bits, overwrite=a.overwrite)
    size = (out / "model.safetensors").stat().st_size
    print(f"wrote {out}: model.safetensors {size / 2**20:.2f} MiB ({8 * size / m.n_params():.3f} bits/weight "
          f"over {m.n_params() / 1e6:.1f}M params; {a.bits}-bit indices, float16 codebooks and other tensors)")
    if not a.no_eval:
        from .eval import evaluate
        r = evaluate(load_kmeans(out), m, **_eval_kwargs(a))
        print(f"  perplexity {r['ref_ppl']:.4f} (original) -> {r['ppl']:.4f} (k-means, torch); KL divergence "
              f"{r['kld']:.6f}; top-1 agreement {100 * r['top1_agreement']:.2f}% on {r['n_scored_tokens']} tokens")
    return 0


def cmd_prune(a) -> int:
    from .prune.command import PruneConfig, prune
    try:
        drop = tuple(int(v) for v in a.drop_layers.split(",")) if a.drop_layers else ()
    except ValueError:
        raise ConfigError(f"--drop-layers {a.drop_layers!r}: give comma-separated layer indices") from None
    cfg = PruneConfig(ratio=a.ratio, method=a.method, importance=a.importance, sparsity=a.sparsity,
                      hidden=a.hidden, ffn=a.ffn, heads=a.heads, experts=a.experts, drop_layers=drop,
                      format_aware=a.format_aware,
                      allocate=a.allocate, layer_share=a.layer_share,
                      type=a.type, pre_tokenizer=a.pre_tokenizer, hf_dtype=a.hf_dtype, calib=a.calib,
                      calib_chunks=a.calib_chunks, n_ctx=a.ctx,
                      text=a.text, max_chunks=a.chunks or None, speed=not a.no_speed, evaluate=not a.no_eval,
                      heal=_heal_config(a), steps=a.steps, stream=a.stream)
    rep = prune(a.model, a.output, cfg, overwrite=a.overwrite, progress=not a.quiet,
                command="slimlm " + shlex.join(sys.argv[1:]), resume=a.resume)
    return _print_report(rep)


def _print_report(rep) -> int:
    """The headline numbers and where the report went (nothing on a non-writing rank of a distributed launch)."""
    if rep is not None:
        print("\n".join(rep.summary_lines()))
        print(f"report: {rep.written[1]} (and .report.json)")
    return 0


def cmd_heal(a) -> int:
    from .train.command import DEFAULT_BUDGET, HealJob, heal
    job = HealJob(heal=_heal_config(a, default_budget=DEFAULT_BUDGET), type=a.type, hf_dtype=a.hf_dtype,
                  pre_tokenizer=a.pre_tokenizer, text=a.text, n_ctx=a.ctx, max_chunks=a.chunks or None,
                  speed=not a.no_speed, evaluate=not a.no_eval)
    rep = heal(a.student, a.output, job, teacher=a.teacher, resume=a.resume, overwrite=a.overwrite,
               progress=not a.quiet, command="slimlm " + shlex.join(sys.argv[1:]))
    return _print_report(rep)


def cmd_sensitivity(a) -> int:
    import json

    from .calib import calibration_chunks, read_text, tokenize
    from .eval.metrics import make_chunks
    from .formats import get_format
    from .io import atomic_write_bytes, check_output_path
    from .model import load
    from .prune.sensitivity import heatmap, measure
    try:
        ratios = tuple(float(v) for v in a.ratios.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"--ratios {a.ratios!r}: give comma-separated fractions, e.g. 0.25,0.5") from None
    if not ratios or not all(0 < r < 1 for r in ratios):                   # NaN fails too
        raise ConfigError(f"--ratios {a.ratios!r}: give fractions between 0 and 1, e.g. 0.25,0.5")
    types = tuple(v.strip().upper() for v in a.types.split(",") if v.strip())
    for t in types:
        get_format(t)
    out = check_output_path(a.output, overwrite=a.overwrite, inputs=_inputs(a.model, a.calib, a.text))
    js = out.with_suffix(".json")
    check_output_path(js, overwrite=a.overwrite, inputs=_inputs(a.model, a.calib, a.text))
    _check_args(a, models=(a.model,), text=a.text, calib=a.calib, calib_chunks=True)
    m = load(a.model, progress=not a.quiet)
    calib, prov = calibration_chunks(m, a.calib, n_ctx=a.ctx, max_chunks=a.calib_chunks)
    text, source = read_text(a.text, "eval", "--text")
    ev = make_chunks(tokenize(m.tokenizer, text, source).tokens, a.ctx, m.bos_token_id if m.add_bos else None, 1,
                     what=f"--text {a.text}" if a.text else "the evaluation text")
    t = measure(m, calib, ev[0], ratios=ratios, types=types, progress=not a.quiet)
    t.update(calibration=prov, text=source, model=str(m.source))
    cols = t["columns"]
    print("| layer | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols))
    for i, row in enumerate(t["layers"]):
        print(f"| {i} | " + " | ".join(f"{row[c]:.4g}" for c in cols) + " |")
    heatmap(t, out, f"{Path(str(m.source)).name}: KLD when only one layer changes ({t['eval_tokens']} tokens)")
    atomic_write_bytes(js, json.dumps({k: v for k, v in t.items() if k != "mlp_order"}, indent=1).encode(),
                       overwrite=True)
    print(f"KLD on {t['eval_tokens']} tokens of {source}; OBS choice from {prov}")
    print(f"wrote {out} and {js}")
    return 0


def cmd_inspect(a) -> int:
    from .gguf.inspect import describe, format_description
    d = describe(a.file)
    print(json.dumps(d, indent=1) if a.json else format_description(d))
    return 0


def cmd_generate(a) -> int:
    import math

    from .eval.runtime import LlamaCppRunner
    from .gguf.reader import read_gguf
    from .source import MAX_CTX
    if not a.prompt:
        raise ConfigError("-p/--prompt is empty; give the text to continue")
    if not 16 <= a.ctx <= MAX_CTX:
        raise ConfigError(f"--ctx must be a number of tokens from 16 to {MAX_CTX}, got {a.ctx}")
    if not 1 <= a.max_tokens <= a.ctx:
        raise ConfigError(f"-n/--max-tokens must be from 1 to --ctx ({a.ctx}), got {a.max_tokens}")
    if not (math.isfinite(a.temp) and a.temp >= 0):
        raise ConfigError(f"--temp must be a finite number >= 0, got {a.temp}")
    if not 0 <= a.seed < 2**32 - 1:
        raise ConfigError(f"--seed must be from 0 to {2**32 - 2}, got {a.seed}")
    g = read_gguf(a.file)  # strict validation before llama.cpp parses it
    arch = g.get("general.architecture")
    limit = g.get(f"{arch}.context_length") if isinstance(arch, str) else None
    if isinstance(limit, int) and 0 < limit < a.ctx:
        raise ConfigError(f"--ctx {a.ctx} is beyond the context length of {a.file} ({limit} tokens); give a "
                          f"smaller --ctx")
    r = LlamaCppRunner(a.file, a.ctx, logits_all=False)
    try:
        print(r.generate(a.prompt, a.max_tokens, chat=a.chat, temperature=a.temp, seed=a.seed))
    finally:
        r.close()
    return 0


def _csv(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip()) if text.strip().lower() != "none" else ()


def cmd_search(a) -> int:
    from .search import SearchConfig, search
    cfg = SearchConfig(target_size=a.target_size, min_speedup=a.min_speedup, max_kld=a.max_kld,
                       budget=a.budget or (None if a.trials else "2h"), trials=a.trials, heal=a.heal,
                       data=tuple(a.data or ()), methods=_csv(a.methods), qat=a.qat, max_prune=a.max_prune,
                       prune_step=a.prune_step, prune_method=a.prune_method, speed_of=a.speed_of,
                       baselines=_csv(a.baselines), calib=a.calib, calib_chunks=a.calib_chunks, text=a.text,
                       n_ctx=a.ctx, max_chunks=a.chunks or None, speed=not a.no_speed, seed=a.seed,
                       storage=a.storage, study=a.study, workers=a.workers)
    s = search(a.model, a.output, cfg, progress=not a.quiet, command="slimlm " + shlex.join(sys.argv[1:]))
    out = Path(a.output)
    b = s["best"]
    print(f"search: {s['target']}; " + ", ".join(f"{v} {k}" for k, v in s["trials"].items() if v))
    if b is None:
        print(f"no trial met the target; see {out / 'report.md'}", file=sys.stderr)
        return 1
    print(f"wrote {out / 'best.gguf'} (trial {b['trial']}): {b['file_bytes'] / 2**20:.2f} MiB, KL divergence "
          f"{b['kld']:.6f}, perplexity {b['ppl']:.4f}, top-1 {100 * b['top1']:.2f}%"
          + (f", {b['gen_tps']:.1f} generation tok/s" if b.get("gen_tps") else ""))
    for p in s["baselines"]:
        print(f"  llama.cpp {p['type']:7s} {p['file_bytes'] / 2**20:8.2f} MiB, KL divergence {p['kld']:.6f}"
              f" ({p['kld'] / b['kld'] if b['kld'] > 0 else float('nan'):.2f}x this file's)")
    print(f"  rebuild: {b['command']}")
    print(f"report: {out / 'report.md'} and {out / 'report.html'}; Pareto-optimal recipes: {out / 'recipes.json'}")
    return 0


def cmd_report(a) -> int:
    from .visual import report_files
    r = report_files(a.reports, a.output)
    print(f"wrote {r['markdown']} and {r['html']} ({len(r['plots'])} plots, {len(r['points'])} files measured)")
    return 0


COMMANDS = {"compress": cmd_compress, "search": cmd_search, "report": cmd_report, "eval": cmd_eval, "imatrix": cmd_imatrix, "inspect": cmd_inspect,
            "kmeans": cmd_kmeans, "prune": cmd_prune, "heal": cmd_heal,
            "sensitivity": cmd_sensitivity,
            "generate": cmd_generate}


def _on_sigterm(signum, frame):
    raise SystemExit(143)


def _no_progress_bars() -> None:
    """-q: also silence the Hugging Face libraries' own bars ("Loading weights"), which ignore slimlm's flag."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"          # read when huggingface_hub is imported
    if "transformers" in sys.modules:                          # already imported (in-process callers)
        from transformers.utils import logging as tlog
        tlog.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.quiet:
        _no_progress_bars()
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        from .device import computing_on
        with computing_on(getattr(a, "device", None) or "auto"):
            return COMMANDS[a.cmd](a)
    except SlimlmError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted; no partial output was left", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
