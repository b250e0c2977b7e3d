"""Training settings: `TrainConfig`, checked before any weight is loaded, and budgets ("30m", "500k").

A budget is a duration (`90s`, `30m`, `1.5h`: wall time, preparation included) or a token count (`500k`,
`2M`, `120000`: training tokens of the end-to-end stage). Lower-case `m` is minutes, upper-case `M` millions.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

from ..errors import ConfigError

QAT_WEIGHTS = ("round", "codes", "frozen", "ste")
LEARNED_ROUNDING = ("round", "codes")      # the QAT weight modes whose rounding offsets train (at round_lr)
TRAIN_PARAMS = ("all", "all-but-embeddings", "norms+pruned", "from-changed", "lora")
PRECISIONS = ("auto", "fp32", "bf16")
TEACHER_TARGETS = ("auto", "full", "topk")
PARALLEL = ("ddp", "fsdp")
COMPILE = ("auto", "on", "off")

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(s|sec|m|min|h)$")
_TOKENS = re.compile(r"^(\d+(?:\.\d+)?)(k|K|M|tok|tokens)?$")
_UNIT = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, None: 1, "tok": 1, "tokens": 1, "k": 1e3, "K": 1e3,
         "M": 1e6}


def parse_budget(text: str, flag: str = "--heal") -> tuple[str, float]:
    """'30m' -> ('seconds', 1800.0); '500k' -> ('tokens', 500000). A bad value names the flag and the forms."""
    s = str(text).strip()
    for kind, rx in (("seconds", _DURATION), ("tokens", _TOKENS)):
        mt = rx.match(s)
        if mt:
            v = float(mt.group(1)) * _UNIT[mt.group(2)]
            if not math.isfinite(v) or v <= 0:
                break
            return kind, (v if kind == "seconds" else float(int(v)))
    raise ConfigError(f"{flag} {text!r}: give a duration (90s, 30m, 1.5h) or a token count (500k, 2M, 120000); "
                      f"lower-case m is minutes, upper-case M millions of tokens")


def describe_budget(text: str) -> str:
    kind, v = parse_budget(text)
    return f"{v / 60:g} minutes" if kind == "seconds" else f"{int(v):,} tokens"


@dataclass(frozen=True)
class TrainConfig:
    """End-to-end distillation (and, next, QAT) settings. Defaults are what bench/heal.py measured best on
    SmolLM2 on 2 CPU cores."""
    budget: str = "500k"                    # duration or training tokens (parse_budget)
    lr: float = 2e-4                        # AdamW peak learning rate
    scale_lr: float | None = None           # QAT: peak learning rate of the blocks' learned scale factors (None: lr)
    round_lr: float | None = None           # QAT: peak learning rate of learned rounding (per-weight offsets in level
                                            # spacings; qat_weights "round")
    qat_weights: str | None = None          # QAT: what becomes of the float block weights (QAT_WEIGHTS): round (learned
                                            # rounding), frozen (their codes follow the learned scales), ste (trained
                                            # through the straight-through estimator); None: round (compress.qat_lrs)
    sub_scales: bool = False                # QAT: the K-quants' / IQ4_XS's integer sub-block scales and mins train too
                                            # (at scale_lr, in units of their largest stored value)
    runtime_activations: bool = False       # QAT: the linears' inputs rounded as llama.cpp's CPU backend rounds them
                                            # (quant/activations.py; straight through)
    qat_embeddings: bool = False            # QAT: the token embedding / LM head's block scales train too
    embedding_scale_lr: float | None = None  # QAT with qat_embeddings: peak learning rate of the embedding / LM
                                            # head's block scales (None: scale_lr, as the block linears')
    min_lr: float = 0.1                     # cosine floor, as a fraction of lr
    warmup: float = 0.05                    # fraction of the steps with a linear warmup
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    temperature: float = 1.0                # forward KL at temperature T (Minitron: T=1 is best)
    ce_weight: float = 0.0                  # + w * cross-entropy on the text
    hidden_weight: float = 0.0              # + w * normalised MSE of the residual stream at the kept layers
    seq_len: int = 256
    micro_batch: int = 4                    # sequences per forward/backward (per process)
    accum: int = 1                          # micro-batches per optimizer step (per process)
    clip: float = 1.0                       # gradient-norm clipping (0: off)
    train_params: str = "all-but-embeddings"  # all | all-but-embeddings | norms+pruned | from-changed | lora
    lora_rank: int = 16                     # with train_params="lora" (peft; merged before export)
    precision: str = "auto"                 # auto: bf16 autocast where the device has fast bf16 matmuls
    grad_checkpointing: bool = False
    compile: str = "auto"                   # torch.compile the student's forward and backward: auto = on for runs long
                                            # enough to pay its minutes back (parts.compile_wanted), on, off
    teacher_targets: str = "auto"           # auto: topk unless --hidden-weight or a cache over 2 GiB (trainer.
                                            # CACHE_BYTES); full: the teacher on the fly every step; topk: once per
                                            # training token into a memory-mapped cache (top-k + remaining mass)
    topk: int = 256                         # logits kept per token in the cache (+ the remaining mass)
    eval_every: int = 50                    # held-out KL every N steps; the best state is kept (0: only at the end)
    checkpoint_every: int | None = None     # steps between checkpoints (0: none; None: every 100 steps, at most
                                            # one per 10 minutes: trainer.AUTO_CHECKPOINT_*)
    seed: int = 0
    device: str = "auto"                    # auto | cpu | cuda | cuda:N
    parallel: str = "ddp"                   # several processes: ddp (each holds the whole training state) | fsdp
                                            # (parameters, gradients and AdamW state sharded across them)

    def __post_init__(self):
        parse_budget(self.budget)
        for name, v, lo in (("lr", self.lr, 0.0), ("temperature", self.temperature, 0.0),
                            *((("scale-lr", self.scale_lr, 0.0),) if self.scale_lr is not None else ()),
                            *((("round-lr", self.round_lr, 0.0),) if self.round_lr is not None else ()),
                            *((("embedding-scale-lr", self.embedding_scale_lr, 0.0),)
                              if self.embedding_scale_lr is not None else ())):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > lo):
                raise ConfigError(f"--{name} must be a number > {lo}, got {v}")
        if self.qat_weights is not None and self.qat_weights not in QAT_WEIGHTS:
            raise ConfigError(f"--qat-weights must be one of {', '.join(QAT_WEIGHTS)}, got {self.qat_weights!r}")
        if self.embedding_scale_lr is not None and not self.qat_embeddings:
            raise ConfigError("--embedding-scale-lr is the learning rate of the embedding's block scales, which "
                              "train only with --qat-embeddings: give both, or leave --embedding-scale-lr out")
        if self.round_lr is not None and self.qat_weights not in (None, *LEARNED_ROUNDING):
            raise ConfigError(f"--round-lr is learned rounding's learning rate: it does not go with --qat-weights "
                              f"{self.qat_weights} (give --qat-weights {' or '.join(LEARNED_ROUNDING)}, or leave --round-lr out)")
        for name, v in (("min-lr", self.min_lr), ("warmup", self.warmup)):
            if not (math.isfinite(v) and 0 <= v <= 1):
                raise ConfigError(f"--{name} must be between 0 and 1, got {v}")
        for name, v in (("weight-decay", self.weight_decay), ("ce-weight", self.ce_weight),
                        ("hidden-weight", self.hidden_weight), ("clip", self.clip)):
            if not (math.isfinite(v) and v >= 0):
                raise ConfigError(f"--{name} must be a number >= 0, got {v}")
        if not all(0 <= b < 1 for b in self.betas) or len(self.betas) != 2:
            raise ConfigError(f"betas must be two numbers in [0, 1), got {self.betas}")
        for name, v, lo in (("seq-len", self.seq_len, 8), ("micro-batch", self.micro_batch, 1),
                            ("accum", self.accum, 1), ("lora", self.lora_rank, 1), ("topk", self.topk, 1),
                            ("eval-every", self.eval_every, 0),
                            *((("checkpoint-every", self.checkpoint_every, 0),) if self.checkpoint_every is not None
                              else ())):
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ConfigError(f"--{name} must be an integer >= {lo}, got {v!r}")
        for name, v, ok in (("train", self.train_params, TRAIN_PARAMS), ("precision", self.precision, PRECISIONS),
                            ("teacher-targets", self.teacher_targets, TEACHER_TARGETS),
                            ("parallel", self.parallel, PARALLEL), ("compile", self.compile, COMPILE)):
            if v not in ok:
                raise ConfigError(f"--{name} must be one of {', '.join(ok)}, got {v!r}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.parallel == "fsdp" and self.train_params == "lora":
            raise ConfigError("--parallel fsdp cannot go with --train lora: LoRA trains small adapters on frozen "
                              "weights, so its training state is small; use --parallel ddp with LoRA")
        if self.hidden_weight > 0 and self.teacher_targets == "topk":
            raise ConfigError("--hidden-weight needs the teacher's hidden states: use --teacher-targets full (the "
                              "top-k cache holds logits only)")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**32:
            raise ConfigError(f"--seed must be an integer in 0..{2**32 - 1}, got {self.seed!r}")

    @property
    def budget_kind(self) -> str:
        return parse_budget(self.budget)[0]

    @property
    def budget_value(self) -> float:
        return parse_budget(self.budget)[1]

    def fingerprint(self) -> dict:
        """The settings a checkpoint must share to be resumed (what does not change the result is left out: the
        device, and how the processes split the model, since DDP and FSDP average the same gradients and write
        checkpoints of the same full tensors)."""
        d = asdict(self)
        for k in ("checkpoint_every", "device", "parallel"):
            d.pop(k)
        for k in ("sub_scales", "runtime_activations", "qat_embeddings", "embedding_scale_lr"):
            if not d[k]:                       # as before the option: checkpoints from then resume
                d.pop(k)
        d["betas"] = list(d["betas"])
        return d
