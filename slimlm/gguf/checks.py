"""Model-level checks of a parsed GGUF before transformers or llama.cpp load it (RELIABILITY.md items 13, 15).

`read_gguf` checks the format; this checks the meaning: the hyper-parameters llama.cpp reads exist with
llama.cpp's exact value types (it refuses a UINT64 block count too), agree with every tensor's shape, and the
tokenizer arrays agree with each other and with the embedding. transformers' GGUF loader would otherwise
fail with its own traceback (a ValueError, an IndexError, a RuntimeError about sizes) or, worse, build a
model that silently differs from the file (a head size it assumes, merges it cannot apply).
"""
from __future__ import annotations

import math

from gguf import MODEL_ARCH_NAMES, GGMLQuantizationType, GGUFValueType

from ..arch import (
    EXTRA_GGUF_ARCH_PREFIXES,
    GGUF_ARCHS,
    GGUF_TOKENIZER_MODELS,
    SPM_TOKENIZER,
    ArchSpec,
    get_arch,
    spec_for_gguf,
)
from ..errors import InvalidGGUFError
from .reader import GGUFFile

V = GGUFValueType
_REQUIRED_INT = ("context_length", "embedding_length", "block_count", "feed_forward_length",
                 "attention.head_count")
_OPTIONAL_INT = ("attention.head_count_kv", "rope.dimension_count", "attention.key_length",
                 "attention.value_length", "vocab_size")
_FLOATS = (("attention.layer_norm_rms_epsilon", True), ("rope.freq_base", False))
_TOKEN_IDS = ("bos", "eos", "unknown", "padding", "seperator", "cls", "mask", "eot", "eom")
EXTRA_TENSORS = ("rope_freqs.weight",)
# tensor types gguf-py dequantizes (transformers' GGUF loader reads weights through it); I8/I32/F64/Q8_1/...
# would fail there. tests/test_gguf_checks.py checks each against the installed gguf-py.
LOADABLE_TYPES = frozenset(GGMLQuantizationType[n] for n in (
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
    "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0",
    "MXFP4"))
# transformers applies a `<prefix>.<key>` of any architecture it knows to the model it builds, whatever the
# file's architecture; llama.cpp ignores them
OTHER_ARCH_PREFIXES = frozenset(MODEL_ARCH_NAMES.values()) | EXTRA_GGUF_ARCH_PREFIXES
MAX_CONTEXT = 1 << 31


def uint32(g: GGUFFile, key: str, *, required: bool, minimum: int = 1) -> int | None:
    """A UINT32 scalar (llama.cpp's type for counts, lengths and token ids) >= minimum, or None if absent."""
    f = g.fields.get(key)
    if f is None:
        if required:
            raise InvalidGGUFError(f"{g.path}: key {key} is missing (llama.cpp requires it)")
        return None
    if f.type != V.UINT32:
        raise InvalidGGUFError(f"{g.path}: key {key} has type {f.type.name}; llama.cpp reads it as a "
                               f"UINT32 scalar")
    if f.value < minimum:
        raise InvalidGGUFError(f"{g.path}: key {key} = {f.value} (expected >= {minimum})")
    return int(f.value)


def _float32(g: GGUFFile, key: str, required: bool) -> float | None:
    f = g.fields.get(key)
    if f is None:
        if required:
            raise InvalidGGUFError(f"{g.path}: key {key} is missing (llama.cpp requires it)")
        return None
    if f.type != V.FLOAT32 or not math.isfinite(f.value) or f.value <= 0:
        raise InvalidGGUFError(f"{g.path}: key {key} must be a finite positive FLOAT32, found "
                               f"{f.type.name} {f.value!r}")
    return float(f.value)


def _head_dim(g: GGUFFile, arch: str, emb: int, nh: int, hp: dict) -> int:
    """The head size transformers will build: its GGUF loader reads rope.dimension_count for some families (else
    embedding/heads), embedding/heads for others; for "key" families slimlm gives it attention.key_length (else
    embedding/heads, as llama.cpp) (ArchSpec.gguf_head_dim). A file whose key/value/rope sizes say otherwise would
    load as a different model, so it is refused."""
    rule = spec_for_gguf(arch).gguf_head_dim
    if rule == "key" and hp["attention.key_length"] is not None:
        hd = hp["attention.key_length"]
    elif rule == "rope" and hp["rope.dimension_count"]:
        hd = hp["rope.dimension_count"]
    elif emb % nh:
        raise InvalidGGUFError(f"{g.path}: {arch}.embedding_length={emb} is not divisible by "
                               f"{arch}.attention.head_count={nh}")
    else:
        hd = emb // nh
    for k in ("attention.key_length", "attention.value_length", "rope.dimension_count"):
        if hp[k] is not None and hp[k] != hd:
            raise InvalidGGUFError(f"{g.path}: {arch}.{k}={hp[k]} but transformers builds {arch} with head "
                                   f"size {hd} (partial rope and other key/value sizes are not supported)")
    return hd


def check_model_gguf(g: GGUFFile) -> tuple[dict, ArchSpec]:
    """Validate hyper-parameters, tensor shapes and tokenizer; return (HF-style config, arch spec)."""
    arch = g.architecture
    if arch not in GGUF_ARCHS:
        raise InvalidGGUFError(f"{g.path}: GGUF architecture {arch!r} is not supported; supported: "
                               f"{', '.join(GGUF_ARCHS)}")
    spec = spec_for_gguf(arch)
    if g.get("general.name") in spec.gguf_refused_names:
        name = g.get("general.name")
        raise InvalidGGUFError(f"{g.path}: general.name is exactly {name!r}: transformers' GGUF loader then "
                               f"builds its {name!r} model, which it cannot read from a GGUF; rename the model")
    for key in g.fields:
        prefix = key.split(".", 1)[0]
        if prefix != arch and prefix in OTHER_ARCH_PREFIXES:
            raise InvalidGGUFError(f"{g.path}: key {key!r} belongs to architecture {prefix!r}, not {arch!r} "
                                   f"(transformers would apply it to the model it builds; llama.cpp ignores it)")
    hp = {k: uint32(g, f"{arch}.{k}", required=True) for k in _REQUIRED_INT}
    hp.update({k: uint32(g, f"{arch}.{k}", required=False) for k in _OPTIONAL_INT})
    if spec.gguf_needs_kv_heads and hp["attention.head_count_kv"] is None:  # transformers' default is 32, not n_head
        raise InvalidGGUFError(f"{g.path}: key {arch}.attention.head_count_kv is missing (transformers would "
                               f"assume 32 KV heads, llama.cpp one per query head)")
    eps, theta = (_float32(g, f"{arch}.{k}", req) for k, req in _FLOATS)
    if hp["context_length"] > MAX_CONTEXT:
        raise InvalidGGUFError(f"{g.path}: {arch}.context_length={hp['context_length']} exceeds {MAX_CONTEXT}")
    emb, nh, n_layer = hp["embedding_length"], hp["attention.head_count"], hp["block_count"]
    by_name = {t.name: t for t in g.tensors}
    embd = by_name.get("token_embd.weight")
    if embd is None or len(embd.shape) != 2:
        raise InvalidGGUFError(f"{g.path}: tensor token_embd.weight is missing or not 2-D")
    n_vocab = embd.shape[0]
    # every layer holds the family's tensors (fused ones once): bound the layer count by the tensors present before
    # iterating over it
    if n_layer * spec.checkpoint_layer_tensors() > len(g.tensors):
        raise InvalidGGUFError(f"{g.path}: {arch}.block_count={n_layer} but the file holds only "
                               f"{len(g.tensors)} tensors")
    cfg = {"architectures": [GGUF_ARCHS[arch]], "hidden_size": emb, "vocab_size": n_vocab,
           "num_hidden_layers": n_layer, "num_attention_heads": nh,
           "num_key_value_heads": hp["attention.head_count_kv"] or nh,
           "intermediate_size": hp["feed_forward_length"], "max_position_embeddings": hp["context_length"],
           "rms_norm_eps": eps, "rope_theta": theta or 10000.0,
           "tie_word_embeddings": "output.weight" not in by_name, "head_dim": _head_dim(g, arch, emb, nh, hp)}
    if uint32(g, f"{arch}.expert_count", required=False):     # llama.cpp always normalizes the top-k weights
        cfg.update(num_experts=uint32(g, f"{arch}.expert_count", required=True),
                   num_experts_per_tok=uint32(g, f"{arch}.expert_used_count", required=True),
                   moe_intermediate_size=uint32(g, f"{arch}.expert_feed_forward_length", required=True),
                   norm_topk_prob=True)
    spec = get_arch(cfg, str(g.path))
    expected = {spec.hf_to_gguf(k): s for k, s in spec.expected_shapes(cfg, stacked=True).items()}
    for name, shape in expected.items():
        t = by_name.get(name)
        if t is None:
            raise InvalidGGUFError(f"{g.path}: tensor {name} is missing (implied by the {arch} hyper-parameters)")
        if t.shape != shape:
            raise InvalidGGUFError(f"{g.path}: tensor {name} has shape {list(t.shape)} but the hyper-parameters "
                                   f"imply {list(shape)}")
    for name, t in by_name.items():
        if t.ggml_type not in LOADABLE_TYPES and name not in EXTRA_TENSORS:
            raise InvalidGGUFError(f"{g.path}: tensor {name} has type {t.ggml_type.name}, which transformers' "
                                   f"GGUF loader cannot read (gguf-py does not dequantize it)")
        if name not in expected and name not in EXTRA_TENSORS:
            raise InvalidGGUFError(f"{g.path}: unexpected tensor {name} for {arch} with "
                                   f"{arch}.block_count={n_layer}")
    if hp["vocab_size"] is not None and hp["vocab_size"] != n_vocab:
        raise InvalidGGUFError(f"{g.path}: {arch}.vocab_size={hp['vocab_size']} but token_embd.weight has "
                               f"{n_vocab} rows")
    check_tokenizer(g, n_vocab, implicit_vocab=hp["vocab_size"] is None)
    return cfg, spec


def _array(g: GGUFFile, key: str, item_types: tuple, n: int | None):
    f = g.fields.get(key)
    if f is None:
        return None
    if f.type != V.ARRAY or f.item_type not in item_types:
        raise InvalidGGUFError(f"{g.path}: key {key} must be an array of "
                               f"{'/'.join(t.name for t in item_types)}, found {f.type.name}"
                               f"{' of ' + f.item_type.name if f.item_type is not None else ''}")
    if n is not None and len(f.value) != n:
        raise InvalidGGUFError(f"{g.path}: key {key} has {len(f.value)} items but there are {n} tokens")
    return f.value


def check_tokenizer(g: GGUFFile, n_vocab: int, *, implicit_vocab: bool) -> None:
    """tokenizer.ggml.*: a model transformers can build, tokens that fit the embedding, parallel arrays of
    the same length, special ids inside the vocabulary, merges whose parts and results are tokens."""
    model = g.get("tokenizer.ggml.model")
    if model not in GGUF_TOKENIZER_MODELS:
        raise InvalidGGUFError(f"{g.path}: tokenizer.ggml.model is {model!r}; supported: "
                               f"{', '.join(GGUF_TOKENIZER_MODELS)} (slimlm needs the model's own tokenizer)")
    tokens = _array(g, "tokenizer.ggml.tokens", (V.STRING,), None)
    if not tokens:
        raise InvalidGGUFError(f"{g.path}: tokenizer.ggml.tokens is missing or empty; slimlm needs the "
                               f"model's tokenizer")
    if len(tokens) > n_vocab or (implicit_vocab and len(tokens) != n_vocab):
        raise InvalidGGUFError(f"{g.path}: tokenizer has {len(tokens)} tokens but token_embd.weight has "
                               f"{n_vocab} rows")
    ints = (V.INT32, V.UINT32, V.INT8, V.UINT8, V.INT16, V.UINT16, V.INT64, V.UINT64)
    _array(g, "tokenizer.ggml.token_type", ints, len(tokens))
    scores = _array(g, "tokenizer.ggml.scores", (V.FLOAT32, V.FLOAT64), len(tokens))
    if model == SPM_TOKENIZER and scores is None:
        raise InvalidGGUFError(f"{g.path}: tokenizer.ggml.scores is missing (a {model!r} tokenizer needs them)")
    for k in ("tokenizer.ggml.pre", "tokenizer.chat_template"):
        f = g.fields.get(k)
        if f is not None and f.type != V.STRING:
            raise InvalidGGUFError(f"{g.path}: key {k} must be a STRING, found {f.type.name}")
    for k in ("add_bos_token", "add_eos_token", "add_space_prefix"):
        f = g.fields.get(f"tokenizer.ggml.{k}")
        if f is not None and f.type != V.BOOL:
            raise InvalidGGUFError(f"{g.path}: key tokenizer.ggml.{k} must be a BOOL, found {f.type.name}")
    for name in _TOKEN_IDS:
        i = uint32(g, f"tokenizer.ggml.{name}_token_id", required=False, minimum=0)
        if i is not None and i >= len(tokens):
            raise InvalidGGUFError(f"{g.path}: tokenizer.ggml.{name}_token_id={i} is not a token id "
                                   f"(the vocabulary has {len(tokens)} tokens)")
    merges = _array(g, "tokenizer.ggml.merges", (V.STRING,), None)
    if merges is None:
        if model == "gpt2":
            raise InvalidGGUFError(f"{g.path}: tokenizer.ggml.merges is missing (a 'gpt2' tokenizer needs them)")
        return
    vocab = set(tokens)
    for i, m in enumerate(merges):
        a, sep, b = m.partition(" ")
        if not sep or not a or not b or " " in b or a not in vocab or b not in vocab or a + b not in vocab:
            raise InvalidGGUFError(f"{g.path}: tokenizer.ggml.merges item {i} {m[:80]!r} is not two tokens "
                                   f"separated by one space whose concatenation is a token")
