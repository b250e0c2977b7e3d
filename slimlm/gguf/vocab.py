"""Tokenizer metadata for GGUF: carried over exactly from a GGUF source, or built from an HF tokenizer.

For HF sources this follows llama.cpp's converter (`get_vocab_base` / `_set_vocab_gpt2`): tokens by id,
token types (CONTROL for special added tokens, USER_DEFINED for other added tokens, UNUSED for holes),
the pre-tokenizer named by hashing the tokenization of llama.cpp's check text (an unknown hash is refused,
never guessed), merges / special ids / add-bos flags / chat template through gguf-py's `SpecialVocab`.
The chat template is copied verbatim and never rendered.
"""
from __future__ import annotations

from hashlib import sha256
from pathlib import Path

import gguf
import numpy as np

from ..errors import InvalidModelError
from .pretokenizers import CHECK_TEXT, PRE_TOKENIZERS
from .reader import GGUFFile


def copy_tokenizer_fields(src: GGUFFile, w: gguf.GGUFWriter) -> int:
    """Copy every `tokenizer.*` key of a GGUF source with its exact value type. Returns the count."""
    n = 0
    for key, f in src.fields.items():
        if not key.startswith("tokenizer."):
            continue
        v = f.value.tolist() if isinstance(f.value, np.ndarray) else f.value
        if f.type == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, v, f.type, sub_type=f.item_type)
        else:
            w.add_key_value(key, v, f.type)
        n += 1
    return n


KNOWN_PRE_TOKENIZERS = sorted(set(PRE_TOKENIZERS.values()) | {"default"})


def pre_tokenizer_name(tokenizer, where: str, override: str | None = None) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer; `override` names one explicitly (validated)."""
    if override is not None:
        if override not in KNOWN_PRE_TOKENIZERS:
            raise InvalidModelError(f"pre-tokenizer {override!r} is not one llama.cpp knows; known: "
                                    f"{', '.join(KNOWN_PRE_TOKENIZERS)}")
        return override
    chkhsh = sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    name = PRE_TOKENIZERS.get(chkhsh)
    if name is None:
        raise InvalidModelError(f"{where}: the tokenizer's pre-tokenizer is not one llama.cpp knows "
                                f"(check-text hash {chkhsh[:16]}...); slimlm will not guess one, since a wrong "
                                f"pre-tokenizer silently changes tokenization in llama.cpp. If you know which one it is, "
                                f"name it with --pre-tokenizer")
    return name


def _looks_special(token: str) -> bool:
    return token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))


def bpe_vocab(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens and token types by id, padded to the embedding's row count as llama.cpp's converter does."""
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tok = reverse[i]
        if tok in added:
            if not decoder[i].normalized:
                tok = tokenizer.decode(tokenizer.encode(tok, add_special_tokens=False))
            if decoder[i].special or _looks_special(tok):
                types.append(gguf.TokenType.CONTROL)
            else:
                tok = tok.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(tok)
    return tokens, types


def add_hf_tokenizer(w: gguf.GGUFWriter, tokenizer, model_dir: Path, vocab_size: int,
                     pre_tokenizer: str | None = None) -> None:
    """Write tokenizer metadata for an HF tokenizer (byte-level BPE, llama.cpp's `gpt2` model)."""
    tj = getattr(tokenizer, "backend_tokenizer", None)
    model = tj.model if tj is not None else None
    kind = type(model).__name__ if model is not None else type(tokenizer).__name__
    if kind != "BPE" or getattr(model, "byte_fallback", False):
        raise InvalidModelError(f"{model_dir}: tokenizer model {kind}"
                                f"{' with byte_fallback' if getattr(model, 'byte_fallback', False) else ''} "
                                f"is not supported yet; slimlm exports byte-level BPE tokenizers "
                                f"(as most current models have)")
    pre = pre_tokenizer_name(tokenizer, str(model_dir), pre_tokenizer)
    tokens, types = bpe_vocab(tokenizer, vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise InvalidModelError(f"{model_dir}: the BPE tokenizer has no merges")
    special.add_to_gguf(w, quiet=True)
