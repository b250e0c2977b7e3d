"""Text for calibration and evaluation, with provenance.

Default text when the user gives none: Python's own bundled documentation (`pydoc_data.topics`), present
in every CPython. Topics are sorted by name; every 4th topic (index % 4 == 3) is held out for evaluation,
the rest is calibration text, so the two never overlap and need nothing outside the interpreter.
"""
from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ConfigError

DEFAULT_SOURCE = "pydoc_data.topics (Python {v}), topics sorted by name, {split}: index % 4 {op} 3"


def default_text(split: str = "eval") -> tuple[str, str]:
    """(text, provenance) of the bundled default text; split is 'eval' or 'calib'."""
    if split not in ("eval", "calib"):
        raise ConfigError(f"split must be 'eval' or 'calib', not {split!r}")
    from pydoc_data.topics import topics
    names = sorted(topics)
    keep = [n for i, n in enumerate(names) if (i % 4 == 3) == (split == "eval")]
    text = "\n\n".join(topics[n] for n in keep)
    v = ".".join(map(str, sys.version_info[:3]))
    return text, DEFAULT_SOURCE.format(v=v, split=split, op="==" if split == "eval" else "!=")


def read_text(path: str | Path | None, split: str = "eval", flag: str = "text file") -> tuple[str, str]:
    """A user's text file (UTF-8, not blank), or the default text. Returns (text, provenance). `flag` names
    the option the path came from in the error messages."""
    if path is None:
        return default_text(split)
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{flag} {p}: cannot read it ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{flag} {p} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    if not text.strip():
        raise ConfigError(f"{flag} {p} is empty")
    if "\0" in text:
        raise ConfigError(f"{flag} {p} holds NUL bytes: a binary file, not text")
    return text, f"{p} (sha256 {hashlib.sha256(raw).hexdigest()[:12]}, {len(text)} characters)"


def check_text_file(path: str | Path | None, flag: str) -> None:
    """Refuse a missing, unreadable, non-UTF-8, binary or empty text file before any model is loaded."""
    if path is not None:
        read_text(path, flag=flag)


@dataclass(frozen=True)
class TokenText:
    """A token sequence and where it came from."""
    tokens: torch.Tensor    # (n,) int64
    source: str
    tokenizer: str

    def __len__(self) -> int:
        return int(self.tokens.numel())


def tokenize(tokenizer, text: str, source: str) -> TokenText:
    """Tokenize with the HF tokenizer, no special tokens added (BOS is placed per chunk by the scorer)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return TokenText(torch.tensor(ids, dtype=torch.long), source, type(tokenizer).__name__)


def check_eval_text(model, path: str | Path | None, n_ctx: int) -> None:
    """The evaluation text (--text, or the bundled one) holds at least one chunk of n_ctx tokens of this
    model's tokenizer: checked before the work whose result it would evaluate."""
    from .eval.metrics import make_chunks
    text, source = read_text(path, "eval", "--text")
    make_chunks(tokenize(model.tokenizer, text, source).tokens, n_ctx, None, 1,
                what=f"--text {path}" if path is not None else "the evaluation text")


def calibration_chunks(model, text_path: str | Path | None = None, *, n_ctx: int = 512,
                       max_chunks: int | None = 32, flag: str = "--calib") -> tuple[torch.Tensor, str]:
    """(n_chunks, n_ctx) calibration token chunks (BOS first when the model adds BOS, as llama-imatrix does)
    from a text file or the bundled calibration split, with their provenance."""
    from .eval.metrics import make_chunks
    text, source = read_text(text_path, "calib", flag)
    tt = tokenize(model.tokenizer, text, source)
    chunks = make_chunks(tt.tokens, n_ctx, model.bos_token_id if model.add_bos else None, max_chunks,
                         what=flag if text_path is not None else "the bundled calibration text")
    return chunks, f"{source}; {chunks.shape[0]} chunks x {n_ctx} tokens"
