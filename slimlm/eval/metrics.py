"""Perplexity, KL divergence and top-1 agreement, computed the way llama.cpp's `llama-perplexity` does.

Method (same as llama.cpp's tools/perplexity, `perplexity()` and `kl_divergence()`):
- the token sequence is cut into non-overlapping chunks of `n_ctx` tokens; each chunk is evaluated
  independently from an empty context; when the model's tokenizer adds BOS, the first token of each chunk
  is replaced by BOS (llama.cpp does the same);
- only the second half of each chunk is scored: logits at positions first..n_ctx-2 predict tokens
  first+1..n_ctx-1 with first = n_ctx // 2, so every scored token has at least n_ctx/2 tokens of context;
- PPL = exp(mean NLL) over all scored tokens; KLD = mean over scored tokens of
  KL(P_ref || P_model) = sum_v P_ref(v) (log P_ref(v) - log P_model(v)); top-1 agreement = share of scored
  tokens where both models' argmax agree. Computed in float64 from float32 logits.
Where we differ: llama.cpp tokenizes with its own tokenizer; slimlm tokenizes once (with the HF
tokenizer) and feeds the *same* token ids to every model and runtime, so comparisons are on equal tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError


def make_chunks(tokens: torch.Tensor, n_ctx: int, bos_id: int | None, max_chunks: int | None,
                what: str = "the text") -> torch.Tensor:
    """(n,) tokens -> (n_chunks, n_ctx); BOS replaces each chunk's first token when bos_id is given.
    `what` names the text in the error when it holds less than one chunk."""
    if n_ctx < 4:
        raise ConfigError(f"n_ctx must be >= 4, got {n_ctx}")
    if max_chunks is not None and max_chunks < 1:
        raise ConfigError(f"the number of chunks must be >= 1 (or all), got {max_chunks}")
    n = tokens.numel() // n_ctx
    if max_chunks is not None:
        n = min(n, max_chunks)
    if n < 1:
        raise ConfigError(f"{what} has {tokens.numel()} tokens, fewer than one chunk of {n_ctx}; "
                          f"give a longer text or a smaller --ctx")
    chunks = tokens[: n * n_ctx].reshape(n, n_ctx).clone()
    if bos_id is not None:
        chunks[:, 0] = bos_id
    return chunks


@dataclass
class Scores:
    """Running sums over scored tokens."""
    nll: float = 0.0
    ref_nll: float = 0.0
    kld: float = 0.0
    kld_max: float = 0.0
    top1: int = 0
    n: int = 0
    has_ref: bool = False

    def add(self, logits: torch.Tensor, targets: torch.Tensor, ref_logits: torch.Tensor | None = None) -> None:
        """logits/ref_logits: (t, vocab) at the scored positions; targets: (t,) next tokens."""
        logp = torch.log_softmax(logits.double(), dim=-1)
        self.nll -= float(logp.gather(1, targets[:, None]).sum())
        self.n += int(targets.numel())
        if ref_logits is not None:
            self.has_ref = True
            ref_logp = torch.log_softmax(ref_logits.double(), dim=-1)
            self.ref_nll -= float(ref_logp.gather(1, targets[:, None]).sum())
            kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
            self.kld += float(kl.sum())
            self.kld_max = max(self.kld_max, float(kl.max()))
            self.top1 += int((ref_logits.argmax(-1) == logits.argmax(-1)).sum())

    def result(self) -> dict:
        out = {"n_scored_tokens": self.n, "ppl": math.exp(self.nll / self.n)}
        if self.has_ref:
            out.update(ref_ppl=math.exp(self.ref_nll / self.n), kld=self.kld / self.n, kld_max=self.kld_max,
                       top1_agreement=self.top1 / self.n)
        return out


def scored_slice(n_ctx: int) -> tuple[slice, slice]:
    """(positions whose logits are scored, positions of their target tokens)."""
    first = n_ctx // 2
    return slice(first, n_ctx - 1), slice(first + 1, n_ctx)
