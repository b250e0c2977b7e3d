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

from ..arch import SPM_TOKENIZER
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


def spm_vocab(model_dir: Path, tokenizer, vocab_size: int) -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and types by id from a SentencePiece model (tokenizer.model), as llama.cpp's converter reads it
    (`_create_vocab_sentencepiece`): the model's pieces, scores and kinds (unknown, control, unused, byte); added
    tokens (added_tokens.json, the tokenizer's added tokens) as user-defined or, when special, control tokens with
    score -1000; ids up to the embedding's rows that the model lacks as [PAD{i}] UNUSED."""
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError:
        from ..errors import MissingDependencyError
        raise MissingDependencyError("a SentencePiece tokenizer needs the sentencepiece package: pip install "
                                     "'slimlm[spm]'") from None
    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(model_dir / "tokenizer.model"))
    T = gguf.TokenType
    tokens, scores, types = [f"[PAD{i}]" for i in range(vocab_size)], [-10000.0] * vocab_size, [T.UNUSED] * vocab_size
    for i in range(min(sp.vocab_size(), vocab_size)):
        tokens[i], scores[i] = sp.IdToPiece(i), float(sp.GetScore(i))
        types[i] = T.UNKNOWN if sp.IsUnknown(i) else T.CONTROL if sp.IsControl(i) else T.UNUSED if sp.IsUnused(i) \
            else T.BYTE if sp.IsByte(i) else T.NORMAL
    for i, tok in sorted(tokenizer.added_tokens_decoder.items()):
        if i >= vocab_size:
            continue
        text = tok.content
        if tok.special or _looks_special(text):
            types[i] = T.CONTROL
        else:
            text, types[i] = text.replace("\u2581", " "), T.USER_DEFINED
        tokens[i], scores[i] = text, -1000.0
    return tokens, scores, types


def _is_spm(tokenizer) -> bool:
    """A SentencePiece-style tokenizer: BPE with byte fallback or Unigram (not byte-level BPE)."""
    tj = getattr(tokenizer, "backend_tokenizer", None)
    model = tj.model if tj is not None else None
    return model is not None and (type(model).__name__ == "Unigram" or getattr(model, "byte_fallback", False))


def check_hf_tokenizer(tokenizer, model_dir: Path, pre_tokenizer: str | None = None) -> str | None:
    """What add_hf_tokenizer needs, checked before any work: a SentencePiece-style tokenizer's tokenizer.model,
    a byte-level BPE tokenizer's pre-tokenizer (returned; None for SentencePiece)."""
    tj = getattr(tokenizer, "backend_tokenizer", None)
    model = tj.model if tj is not None else None
    kind = type(model).__name__ if model is not None else type(tokenizer).__name__
    if _is_spm(tokenizer):
        if not (Path(model_dir) / "tokenizer.model").is_file():
            raise InvalidModelError(f"{model_dir}: a SentencePiece-style tokenizer ({kind}"
                                    f"{' with byte_fallback' if getattr(model, 'byte_fallback', False) else ''}) needs "
                                    f"its tokenizer.model (the piece scores llama.cpp tokenizes with), as llama.cpp's "
                                    f"converter does; copy it into the model folder")
        return None
    if kind != "BPE":
        raise InvalidModelError(f"{model_dir}: tokenizer model {kind} is not supported yet; slimlm exports "
                                f"byte-level BPE and SentencePiece tokenizers")
    return pre_tokenizer_name(tokenizer, str(model_dir), pre_tokenizer)


def add_hf_tokenizer(w: gguf.GGUFWriter, tokenizer, model_dir: Path, vocab_size: int,
                     pre_tokenizer: str | None = None) -> None:
    """Write tokenizer metadata for an HF tokenizer: byte-level BPE as llama.cpp's `gpt2` model, or a SentencePiece
    model (tokenizer.model) as its `llama` model with the pieces' scores."""
    pre = check_hf_tokenizer(tokenizer, model_dir, pre_tokenizer)
    if pre is None:
        tokens, scores, types = spm_vocab(model_dir, tokenizer, vocab_size)
        w.add_tokenizer_model(SPM_TOKENIZER)
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        # SentencePiece's dummy prefix (llama.cpp's default for this model: on): as the tokenizer does it
        first = tokenizer.tokenize("a")
        w.add_add_space_prefix(bool(first) and first[0].startswith("\u2581"))
        gguf.SpecialVocab(model_dir, load_merges=False, n_vocab=vocab_size).add_to_gguf(w, quiet=True)
        return
    tokens, types = bpe_vocab(tokenizer, vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise InvalidModelError(f"{model_dir}: the BPE tokenizer has no merges")
    special.add_to_gguf(w, quiet=True)
