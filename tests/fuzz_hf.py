"""Hugging Face folder inputs for fuzzing (tests/test_fuzz.py, bench/fuzz.py): a tiny valid folder (config.json,
tokenizer.json, model.safetensors built in memory), structure-aware strategies for the safetensors header, the
config, the tokenizer and the shard index, and JSON-level mutations.

The seed model is 1 layer, hidden 8, 16 tokens (a byte-level BPE that the tokenizers library loads), so a
full `slimlm.load` of it takes tens of milliseconds.
"""
from __future__ import annotations

import json
import struct

import numpy as np
from hypothesis import strategies as st

from slimlm.arch import ARCHS

ARCH_CFG = {
    "LlamaForCausalLM": {"model_type": "llama"},
    "MistralForCausalLM": {"model_type": "mistral", "sliding_window": None},
    "Qwen2ForCausalLM": {"model_type": "qwen2"},
    "Qwen3ForCausalLM": {"model_type": "qwen3", "head_dim": 4},
}
TOKENS = [chr(ord("a") + i) for i in range(13)] + ["ab", "<s>", "</s>"]


def tiny_config(arch: str = "LlamaForCausalLM", **over) -> dict:
    cfg = {"architectures": [arch], "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
           "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": len(TOKENS),
           "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
           "tie_word_embeddings": False, "bos_token_id": 14, "eos_token_id": 15, **ARCH_CFG[arch]}
    cfg.update(over)
    return cfg


def tokenizer_json() -> dict:
    special = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": True} for i, t in ((14, "<s>"), (15, "</s>"))]
    byte_level = {"add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": special, "normalizer": None,
            "pre_tokenizer": {"type": "ByteLevel", **byte_level}, "post_processor": None,
            "decoder": {"type": "ByteLevel", **byte_level},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": False, "vocab": {t: i for i, t in enumerate(TOKENS)},
                      "merges": [["a", "b"]]}}


def st_bytes(header: dict | bytes, data: bytes) -> bytes:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def st_entries(shapes: dict[str, tuple[int, ...]], dtype: str = "F16", seed: int = 0) -> tuple[dict, bytes]:
    """(header dict, data) for tensors of these shapes: small random values, norms 1."""
    rng, hdr, data = np.random.default_rng(seed), {}, b""
    np_dtype = {"F16": "<f2", "F32": "<f4"}[dtype]
    for name, shape in shapes.items():
        a = (rng.standard_normal(shape) * 0.1).astype(np_dtype)
        if len(shape) == 1:
            a[:] = 1
        b = a.tobytes()
        hdr[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [len(data), len(data) + len(b)]}
        data += b
    return hdr, data


def hf_files(arch: str = "LlamaForCausalLM", cfg: dict | None = None) -> dict[str, bytes]:
    """file name -> bytes of a tiny valid HF folder."""
    cfg = cfg or tiny_config(arch)
    spec = ARCHS[arch]
    shapes = {n: s for n, s in spec.expected_shapes(cfg).items()}
    hdr, data = st_entries(shapes)
    return {"config.json": json.dumps(cfg).encode(), "tokenizer.json": json.dumps(tokenizer_json()).encode(),
            "model.safetensors": st_bytes({"__metadata__": {"format": "pt"}, **hdr}, data)}


# ---- JSON values -------------------------------------------------------------------------------------
NUMBERS = st.one_of(st.integers(-2**70, 2**70), st.sampled_from([0, 1, -1, 2**31, 2**63, 2**64, 10**400]),
                    st.floats(allow_nan=True, allow_infinity=True))
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, st.text(max_size=12),
                    st.sampled_from(["silu", "gelu", "llama", "qwen2", "linear", "llama3", "default", ""]))
JSON = st.recursive(SCALARS, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                    max_leaves=8)


def dumps(obj) -> bytes:
    """JSON as Python writes it: NaN/Infinity included (Python's json accepts them; others do not)."""
    return json.dumps(obj).encode()


@st.composite
def json_mutation(draw, obj: dict, keys: list[str]) -> dict:
    """A copy of obj with 1-3 of: a key set to a random JSON value, a key deleted, a random key added."""
    obj = json.loads(json.dumps(obj))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["set", "set", "set", "del", "add"]))
        k = draw(st.sampled_from(keys))
        if op == "set":
            obj[k] = draw(JSON)
        elif op == "del":
            obj.pop(k, None)
        else:
            obj[draw(st.text(max_size=10))] = draw(JSON)
    return obj


@st.composite
def text_mutation(draw, raw: bytes) -> bytes:
    """Byte-level damage to a JSON text: truncation, a replaced span, deep nesting, bad UTF-8."""
    op = draw(st.sampled_from(["truncate", "replace", "nest", "utf8", "bom"]))
    if op == "truncate":
        return raw[:draw(st.integers(0, len(raw)))]
    if op == "replace":
        i = draw(st.integers(0, len(raw)))
        return raw[:i] + draw(st.binary(max_size=8)) + raw[i + draw(st.integers(0, 8)):]
    if op == "nest":
        n = draw(st.sampled_from([10, 1000, 100_000]))
        return b'{"a": ' + b"[" * n + b"]" * n + b"}"
    if op == "utf8":
        return raw[:1] + b'"\xff\xfe": 1, ' + raw[1:]
    return b"\xef\xbb\xbf" + raw


# ---- safetensors ---------------------------------------------------------------------------------------
DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "U16", "U32", "U64", "BOOL",
          "F8_E4M3", "F8_E5M2"]
DTYPE_SIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
              "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


@st.composite
def valid_safetensors(draw) -> tuple[dict, bytes]:
    names = draw(st.lists(st.text(min_size=1, max_size=8).filter(lambda s: s != "__metadata__"),
                          max_size=4, unique=True))
    hdr, data = {}, b""
    for n in names:
        dt = draw(st.sampled_from(DTYPES))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        k = int(np.prod(shape, dtype=np.int64)) * DTYPE_SIZE[dt]
        b = bytes([0x3C if dt != "BOOL" else 1]) * k  # 0x3C3C.. is finite in every float format
        hdr[n] = {"dtype": dt, "shape": shape, "data_offsets": [len(data), len(data) + k]}
        data += b
    if draw(st.booleans()):
        hdr["__metadata__"] = {"format": "pt"}
    return hdr, data


@st.composite
def safetensors_case(draw, seeds: list[bytes]) -> tuple[bytes, dict | None]:
    """(file bytes, the header if valid by construction else None)."""
    from fuzz_gguf import mutated
    kind = draw(st.sampled_from(["valid", "entry", "entry", "header", "length", "mutate", "pad"]))
    if kind == "mutate":
        return draw(mutated(seeds, head=256)), None
    hdr, data = draw(valid_safetensors())
    if kind == "valid":
        return st_bytes(hdr, data), hdr
    if kind == "pad":  # the format allows trailing spaces in the header; a leading space is not allowed
        h = dumps(hdr)
        lead = draw(st.booleans())
        return st_bytes((b" " if lead else b"") + h + b" " * draw(st.integers(1, 7)), data), None if lead else hdr
    if kind == "length":
        raw = st_bytes(hdr, data)
        n = draw(st.sampled_from([0, 1, 2, len(raw) - 8, len(raw) - 7, 2**32, 2**63, 2**64 - 1, 100_000_001]))
        return struct.pack("<Q", n) + raw[8:], None
    if kind == "header":
        h = draw(text_mutation(dumps(hdr)))
        return st_bytes(h, data), None
    names = [n for n in hdr if n != "__metadata__"] or ["x"]
    name = draw(st.sampled_from(names))
    e = hdr.setdefault(name, {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]})
    field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra", "entry", "__metadata__", "dup"]))
    if field == "dtype":
        e["dtype"] = draw(st.sampled_from(DTYPES + ["F7", "f32", "", "I128"]) | JSON)
    elif field == "shape":
        e["shape"] = draw(st.lists(st.sampled_from([-1, 0, 1, 3, 2**32, 2**63, 2**64, 1.0, True, "2"])
                                   | st.integers(0, 9), max_size=9) | JSON)
    elif field == "data_offsets":
        e["data_offsets"] = draw(st.lists(st.sampled_from([-1, 0, 1, 4, len(data), len(data) + 1, 2**64, 2.0])
                                          | st.integers(0, 64), max_size=3) | JSON)
    elif field == "extra":
        e[draw(st.text(max_size=6))] = draw(JSON)
    elif field == "entry":
        hdr[name] = draw(JSON)
    elif field == "__metadata__":
        hdr["__metadata__"] = draw(JSON)
    else:
        h = dumps(hdr)
        dup = dumps({name: e})[1:-1]
        return st_bytes(h[:-1] + b", " + dup + b"}", data), None
    extra = draw(st.sampled_from([b"", b"", b"\0", b"\0" * 8]))
    return st_bytes(hdr, data + extra), None


# ---- HF folder: config, tokenizer, index ----------------------------------------------------------------
CONFIG_KEYS = ["architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "vocab_size", "head_dim", "max_position_embeddings",
               "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters", "hidden_act", "tie_word_embeddings",
               "attention_bias", "mlp_bias", "sliding_window", "slimlm_per_layer", "auto_map", "bos_token_id",
               "eos_token_id", "pad_token_id", "torch_dtype", "layer_types", "use_sliding_window"]


@st.composite
def config_case(draw) -> dict[str, bytes]:
    """A tiny folder whose config.json is damaged (values, types, keys, JSON text, per-layer lists)."""
    arch = draw(st.sampled_from(list(ARCH_CFG)))
    files = hf_files(arch)
    cfg = tiny_config(arch)
    op = draw(st.sampled_from(["json", "json", "json", "plausible", "per_layer", "text", "missing"]))
    if op == "json":
        files["config.json"] = dumps(draw(json_mutation(cfg, CONFIG_KEYS)))
    elif op == "plausible":
        files["config.json"] = dumps(draw(plausible_config(arch)))
    elif op == "per_layer":
        cfg["slimlm_per_layer"] = {draw(st.sampled_from(["intermediate_size", "num_attention_heads",
                                                          "num_key_value_heads", "x"])):
                                   draw(st.lists(st.integers(-1, 32), max_size=3) | JSON)}
        files["config.json"] = dumps(cfg)
    elif op == "text":
        files["config.json"] = draw(text_mutation(dumps(cfg)))
    else:
        del files["config.json"]
    return files


@st.composite
def plausible_config(draw, arch: str) -> dict:
    """Values transformers reads that are near what a real config holds: used for full loads too."""
    cfg = tiny_config(arch)
    for _ in range(draw(st.integers(1, 2))):
        k, v = draw(st.sampled_from([
            ("rms_norm_eps", st.sampled_from([1e-6, 0.0, -1e-5, 1.0, float("nan")])),
            ("rope_theta", st.sampled_from([500000.0, 0, -1, 1, float("inf")])),
            ("max_position_embeddings", st.sampled_from([1, 16, 2**31, 0, -1])),
            ("hidden_act", st.sampled_from(["silu", "gelu", "relu", "swish", 3])),
            ("attention_bias", st.booleans()), ("mlp_bias", st.booleans()),
            ("tie_word_embeddings", st.booleans()),
            ("model_type", st.sampled_from(["llama", "mistral", "qwen2", "qwen3", "gpt2", None])),
            ("head_dim", st.sampled_from([None, 4, 8, 2, 0])),
            ("num_key_value_heads", st.sampled_from([None, 1, 2, 3, 0])),
            ("rope_scaling", st.sampled_from([None, {"rope_type": "linear", "factor": 2.0},
                                              {"rope_type": "linear"}, {"type": "dynamic", "factor": 2.0},
                                              {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
                                              {"rope_type": "llama3", "factor": 8.0}])),
            ("bos_token_id", st.sampled_from([None, 0, 15, 16, -1, 2**40])),
            ("eos_token_id", st.sampled_from([None, [14, 15], 99, "x"])),
            ("pad_token_id", st.sampled_from([None, 0, 16, -5])),
            ("sliding_window", st.sampled_from([None, 4, 0])),
            ("torch_dtype", st.sampled_from(["float16", "bfloat16", "float8", "int4", None])),
        ]))
        cfg[k] = draw(v)
    return cfg


@st.composite
def tokenizer_case(draw) -> dict[str, bytes]:
    files = hf_files("LlamaForCausalLM")
    tok = tokenizer_json()
    op = draw(st.sampled_from(["vocab", "vocab", "added", "model", "json", "text", "missing", "size"]))
    if op == "vocab":
        tok["model"]["vocab"][draw(st.sampled_from(TOKENS + ["new"]))] = draw(
            st.sampled_from([-1, 16, 2**31, 2**70, True, 1.5, "3", None]) | st.integers(0, 20))
    elif op == "added":
        tok["added_tokens"] = draw(st.lists(st.fixed_dictionaries({"id": st.sampled_from([-1, 0, 15, 16, 2**40, True,
                                                                                           "1", None])}) | JSON,
                                            max_size=3) | JSON)
    elif op == "model":
        tok["model"] = draw(JSON | st.fixed_dictionaries({"vocab": JSON}))
    elif op == "json":
        tok = draw(json_mutation(tok, ["model", "added_tokens", "version", "pre_tokenizer", "decoder"]))
    elif op == "size":
        tok["model"]["vocab"] = {f"t{i}": i for i in range(draw(st.sampled_from([0, 1, 16, 17, 5000])))}
    if op == "missing":
        del files["tokenizer.json"]
    elif op == "text":
        files["tokenizer.json"] = draw(text_mutation(dumps(tok)))
    else:
        files["tokenizer.json"] = dumps(tok)
    return files


@st.composite
def index_case(draw) -> dict[str, bytes]:
    """The model split into a shard named by model.safetensors.index.json, whose weight_map is damaged."""
    files = hf_files("LlamaForCausalLM")
    files["shard-1.safetensors"] = files.pop("model.safetensors")
    names = list(json.loads(files["shard-1.safetensors"][8:8 + struct.unpack("<Q", files["shard-1.safetensors"][:8])[0]]))
    wm = {n: "shard-1.safetensors" for n in names if n != "__metadata__"}
    op = draw(st.sampled_from(["valid", "shard", "shard", "map", "meta", "json"]))
    idx = {"metadata": {"total_size": 0}, "weight_map": wm}
    if op == "shard":
        wm[draw(st.sampled_from(sorted(wm)))] = draw(st.sampled_from(
            ["../x.safetensors", "/etc/passwd", "missing.safetensors", "", ".", "a\\b", "shard-1.safetensors/..",
             "config.json", "sub/../shard-1.safetensors"]) | JSON)
    elif op == "map":
        idx["weight_map"] = draw(JSON)
    elif op == "meta":
        idx["metadata"] = draw(JSON)
    elif op == "json":
        idx = draw(json_mutation(idx, ["metadata", "weight_map"]))
    files["model.safetensors.index.json"] = dumps(idx)
    return files
