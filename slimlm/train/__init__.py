"""Training: the one trainer that healing (distillation after pruning) and, next, QAT use.

- `config`: TrainConfig (a frozen dataclass checked before any weight is loaded) and budgets ("30m", "500k").
- `data`: training text (files, JSONL, the bundled text, text the teacher generates), held-out split, overlap check.
- `losses`: forward KL on logits at temperature T (full or against cached top-k), CE, hidden-state MSE.
- `teacher`: the teacher's targets, computed on the fly or once per token into a memory-mapped top-k cache.
- `trainer`: the loop (AdamW, warmup + cosine, clipping, accumulation, bf16 autocast, checkpointing, held-out
  evaluation with the best state kept, NaN stop, progress bar), data-parallel through torch.distributed.
- `checkpoint`: atomic checkpoints and `--resume` that refuses a changed setting, dataset or student.
- `stages`: the cheap stages before end-to-end training (bias compensation, block-wise reconstruction).
- `heal`: the healing job: stages in order, each optional and measured.
"""
