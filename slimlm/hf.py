"""Strict checks of a Hugging Face model folder before any weight is read (RELIABILITY.md items 1-9).

The safetensors header is parsed here (not by the safetensors library) so that lengths, offsets, dtypes
and duplicate names are checked against the bytes actually present: a truncated download fails with a
clear error instead of a SIGBUS from mmap. The folder is checked for pickle-only checkpoints, remote code,
escaping shard names, config/shape mismatches and tokenizer problems.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .arch import (
    ARCHS,
    FULL,
    PER_LAYER,
    PER_LAYER_FIELDS,
    SLIDING,
    ArchSpec,
    check_rope,
    get_arch,
    rope_parameters,
)
from .errors import InvalidModelError, InvalidSafetensorsError, UnsafeModelError

MAX_HEADER = 100_000_000  # the safetensors library's own limit (MAX_HEADER_SIZE)
MAX_DIM = 2**63 - 1       # a dimension the library can hold (usize; shapes beyond it are its JSON error)
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
FLOAT_DTYPES = ("F32", "F16", "BF16")
PICKLE_EXTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class SafetensorsEntry:
    dtype: str
    shape: tuple[int, ...]
    file: Path


def _no_duplicates(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"duplicate key {k!r}")
        d[k] = v
    return d


def load_json(path: Path, *, max_bytes: int = 64 * 2**20) -> dict:
    """Read a JSON object with a size cap; duplicate keys, bad UTF-8 and deep nesting are clear errors."""
    return parse_json(_read_capped(path, max_bytes), str(path))


def _read_capped(path: Path, max_bytes: int) -> bytes:
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise InvalidModelError(f"{path}: {size} bytes is larger than the {max_bytes}-byte limit")
        return path.read_bytes()
    except OSError as e:
        raise InvalidModelError(f"{path}: cannot read ({e.strerror})") from None


def parse_json(raw: bytes, where: str) -> dict:
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError as e:
        raise InvalidModelError(f"{where}: not UTF-8 ({e.reason} at byte {e.start})") from None
    except RecursionError:
        raise InvalidModelError(f"{where}: JSON is nested too deeply") from None
    except ValueError as e:
        raise InvalidModelError(f"{where}: invalid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise InvalidModelError(f"{where}: expected a JSON object, found {type(obj).__name__}")
    return obj


def read_safetensors_header(path: Path) -> dict[str, SafetensorsEntry]:
    """Validate a safetensors file's header against its size; return name -> entry. Reads no tensor data."""
    size = path.stat().st_size
    if size < 8:
        raise InvalidSafetensorsError(f"{path}: {size} bytes is too small for a safetensors file")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8 or n > MAX_HEADER:
            raise InvalidSafetensorsError(f"{path}: header length {n} is beyond the file ({size} bytes)")
        raw = f.read(n)
    try:
        hdr = parse_json(raw, f"{path} header")
    except InvalidModelError as e:
        raise InvalidSafetensorsError(str(e)) from None
    meta = hdr.pop("__metadata__", None)
    if meta is not None and (not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values())):
        raise InvalidSafetensorsError(f"{path}: __metadata__ must map strings to strings, found "
                                      f"{str(meta)[:100]}")
    data_len = size - 8 - n
    spans, out = [], {}
    for name, e in hdr.items():
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise InvalidSafetensorsError(f"{path}: tensor {name!r} entry is malformed: {str(e)[:100]}")
        dt, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
        if not isinstance(dt, str) or dt not in DTYPE_SIZES:
            raise InvalidSafetensorsError(f"{path}: tensor {name!r} has unknown dtype {dt!r}")
        if (not isinstance(shape, list) or len(shape) > 8
                or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= MAX_DIM for s in shape)
                or not _product_fits(shape)):
            raise InvalidSafetensorsError(f"{path}: tensor {name!r} has invalid shape {shape!r}")
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
            raise InvalidSafetensorsError(f"{path}: tensor {name!r} has invalid data_offsets {offs!r}")
        nbytes = math.prod(shape) * DTYPE_SIZES[dt]
        b, end = offs
        if not 0 <= b <= end:
            raise InvalidSafetensorsError(f"{path}: tensor {name!r} data_offsets {offs} are reversed")
        if end - b != nbytes:
            raise InvalidSafetensorsError(f"{path}: tensor {name!r} holds {end - b} bytes but shape "
                                          f"{shape} x {dt} needs {nbytes}")
        spans.append((b, end, name))
        out[name] = SafetensorsEntry(dt, tuple(shape), path)
    pos = 0
    for b, end, name in sorted(spans):
        if b != pos:
            what = "overlaps another tensor" if b < pos else "leaves a gap"
            raise InvalidSafetensorsError(f"{path}: tensor {name!r} at offset {b} {what} (expected {pos})")
        pos = end
    if pos > data_len:
        raise InvalidSafetensorsError(f"{path}: tensor data needs {pos} bytes but the file holds "
                                      f"{data_len}; truncated download?")
    if pos < data_len:
        raise InvalidSafetensorsError(f"{path}: {data_len - pos} trailing bytes after the last tensor")
    return out


def _product_fits(shape: list[int]) -> bool:
    """The element count, multiplied left to right as the safetensors library does, stays below 2^64."""
    n = 1
    for s in shape:
        n *= s
        if n >= 2**64:
            return False
    return True


def _shard_files(d: Path) -> list[Path]:
    index = d / "model.safetensors.index.json"
    if index.is_file():
        idx = load_json(index)
        if not isinstance(idx.get("metadata"), dict):
            raise InvalidModelError(f"{index}: missing 'metadata' object (expected {{'total_size': ...}})")
        wm = idx.get("weight_map")
        if not isinstance(wm, dict) or not wm:
            raise InvalidModelError(f"{index}: missing or empty 'weight_map'")
        shards = []
        for tensor, shard in wm.items():
            p = PurePosixPath(shard) if isinstance(shard, str) else None
            if p is None or p.is_absolute() or ".." in p.parts or "\\" in shard or not shard:
                raise InvalidModelError(f"{index}: tensor {tensor!r} points to shard {shard!r} outside "
                                        f"the model folder")
            if not (d / p).is_file():  # is_file follows the HF cache's snapshot symlinks
                raise InvalidModelError(f"{index}: shard {shard!r} (for {tensor!r}) is missing")
            if d / p not in shards:
                shards.append(d / p)
        return shards
    single = d / "model.safetensors"
    if single.is_file():
        return [single]
    pickles = sorted(p.name for p in d.iterdir() if p.suffix in PICKLE_EXTS)
    if pickles:
        raise UnsafeModelError(f"{d}: only pickle checkpoints found ({', '.join(pickles[:3])}); slimlm does "
                               f"not unpickle (it can run code). Convert them to safetensors first.")
    raise InvalidModelError(f"{d}: no model.safetensors or model.safetensors.index.json")


def refuse_remote_code(d: Path) -> None:
    """`auto_map` in config.json or tokenizer_config.json asks for the folder's own Python code: refused."""
    for p in (d / "config.json", d / "tokenizer_config.json"):
        if p.is_file() and "auto_map" in load_json(p):
            archs = load_json(d / "config.json").get("architectures") if (d / "config.json").is_file() else None
            arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
            hint = (f"transformers has {arch} built in (published folders of some families still carry"
                    f" their original code): delete 'auto_map' from {p.name} to use it") if arch in ARCHS else \
                "Use a model with a built-in architecture"
            raise UnsafeModelError(f"{p}: 'auto_map' asks for custom code from the model folder; slimlm "
                                   f"never runs remote code. {hint}.")


def check_hf_dir(d: str | Path) -> tuple[dict, ArchSpec, list[Path]]:
    """Validate an HF model folder; return (config, arch spec, safetensors files). Reads no weights."""
    d = Path(d)
    if not d.is_dir():
        raise InvalidModelError(f"{d}: not a folder")
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise InvalidModelError(f"{d}: config.json is missing")
    cfg = load_json(cfg_path)
    refuse_remote_code(d)
    spec = check_config(cfg, str(cfg_path))
    files = _shard_files(d)
    entries: dict[str, SafetensorsEntry] = {}
    for f in files:
        for name, e in read_safetensors_header(f).items():
            if name in entries:
                raise InvalidModelError(f"{f}: tensor {name!r} also appears in {entries[name].file}")
            entries[name] = e
    _check_shapes(cfg, spec, entries, cfg_path)
    check_tokenizer_files(d, cfg["vocab_size"])
    return cfg, spec, files


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _positive_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def check_config(cfg: dict, source: str) -> ArchSpec:
    """config.json's fields that slimlm and transformers read, with their types, before get_arch uses them:
    a wrong type would otherwise surface as a TypeError deep in transformers, or build another model."""
    archs = cfg.get("architectures")
    if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
        raise InvalidModelError(f"{source}: 'architectures' must be a list naming the model class, found "
                                f"{str(archs)[:80]}; supported: {', '.join(ARCHS)}")
    for k in ("num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window"):
        if cfg.get(k) is not None and not _positive_int(cfg[k]):
            raise InvalidModelError(f"{source}: {k} must be a positive integer, found {str(cfg[k])[:80]}")
    for k in ("rms_norm_eps", "rope_theta"):
        if k in cfg and not _positive_number(cfg[k]):
            raise InvalidModelError(f"{source}: {k} must be a finite positive number, found {str(cfg[k])[:80]}")
    for k in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
        if cfg.get(k) is not None and not isinstance(cfg[k], bool):
            raise InvalidModelError(f"{source}: {k} must be true or false, found {str(cfg[k])[:80]}")
    for k in ("rope_scaling", "rope_parameters"):
        if cfg.get(k) is not None and not isinstance(cfg[k], dict):
            raise InvalidModelError(f"{source}: {k} must be an object, found {str(cfg[k])[:80]}")
    spec = get_arch(cfg, source)
    act = cfg.get(spec.act_key, spec.acts[0])
    if act not in spec.acts:
        raise InvalidModelError(f"{source}: {spec.act_key} {str(act)[:80]!r} is not supported (llama.cpp runs "
                                f"{spec.hf_arch} with {' or '.join(map(repr, spec.acts))} only)")
    if spec.layer_types:
        _check_layer_types(cfg, spec, source)
    if cfg.get("model_type") != spec.model_type:
        raise InvalidModelError(f"{source}: model_type {str(cfg.get('model_type'))[:80]!r} does not match "
                                f"architecture {spec.hf_arch} (expected {spec.model_type!r}; transformers "
                                f"builds the model from model_type)")
    if spec.refuse_bias_flags and (cfg.get("attention_bias") or cfg.get("mlp_bias")):
        raise InvalidModelError(f"{source}: attention_bias/mlp_bias are not supported for {spec.hf_arch}")
    # a config class's default head_dim is no guide (Qwen3: 128), and some rotary code reads a null head_dim
    if (spec.hf_head_dim == "always" or (spec.hf_head_dim == "if_present" and "head_dim" in cfg)) and \
            not _positive_int(cfg.get("head_dim")):
        raise InvalidModelError(f"{source}: head_dim must be a positive integer for {spec.hf_arch}, found "
                                f"{str(cfg.get('head_dim'))[:80]}")
    for k in ("torch_dtype", "dtype"):
        if cfg.get(k) is not None and cfg[k] not in DTYPE_NAMES:
            raise InvalidModelError(f"{source}: {k} {str(cfg[k])[:80]!r} is not one of {', '.join(DTYPE_NAMES)}")
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = cfg.get(k)
        ids = v if isinstance(v, list) and k == "eos_token_id" else [v]
        if v is not None and not all(isinstance(i, int) and not isinstance(i, bool)
                                     and 0 <= i < cfg["vocab_size"] for i in ids):
            raise InvalidModelError(f"{source}: {k} {str(v)[:80]} is not a token id below vocab_size="
                                    f"{cfg['vocab_size']}")
    rps = [rope_parameters({k: v for k, v in cfg.items() if k in (key, "rope_theta")})
           for key in ("rope_parameters", "rope_scaling") if cfg.get(key)]
    if spec.layer_types:
        rps += [rope_parameters(cfg, SLIDING)]
    for rp in rps or [rope_parameters(cfg)]:  # transformers reads both (rope_scaling is the older name)
        check_rope(rp, source)
    if len({rp["rope_type"] for rp in rps}) > 1:
        raise InvalidModelError(f"{source}: rope_parameters and rope_scaling name different rope types")
    _check_per_layer(cfg, source)
    return spec


DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64", "auto")
def _check_layer_types(cfg: dict, spec: ArchSpec, source: str) -> None:
    """A family with sliding-window layers: the settings llama.cpp's graph of it can run (it scales attention by
    1/sqrt(head_dim) and has no attention-logit soft-capping) and a valid layer pattern."""
    kinds = cfg.get("layer_types")
    if kinds is not None and (not isinstance(kinds, list) or len(kinds) != cfg["num_hidden_layers"]
                              or not set(kinds) <= {FULL, SLIDING}):
        raise InvalidModelError(f"{source}: layer_types must list {FULL!r} or {SLIDING!r} for each of the "
                                f"{cfg['num_hidden_layers']} layers, found {str(kinds)[:80]}")
    q = cfg.get("query_pre_attn_scalar")
    if q is not None and q != spec.attn_scalar(cfg):
        raise InvalidModelError(f"{source}: query_pre_attn_scalar={str(q)[:40]}, but llama.cpp's {spec.gguf_arch} "
                                f"graph scales this model's attention by 1/sqrt({spec.attn_scalar(cfg)})")
    if cfg.get("use_bidirectional_attention"):
        raise InvalidModelError(f"{source}: use_bidirectional_attention is not supported by llama.cpp's "
                                f"{spec.gguf_arch} graph")
    for k, always in (("attn_logit_softcapping", spec.attn_softcap), ("final_logit_softcapping",
                                                                        spec.final_softcap_always)):
        v = cfg.get(k)
        if k == "attn_logit_softcapping" and v is not None and not spec.attn_softcap:
            raise InvalidModelError(f"{source}: {k} is not supported by llama.cpp's {spec.gguf_arch} graph")
        if (v is not None or always) and not _positive_number(v):
            raise InvalidModelError(f"{source}: {k} must be a positive number"
                                    f"{' (llama.cpp always applies it)' if always else ' or null'}, found {v!r}")
    if spec.tied_only and not cfg.get("tie_word_embeddings", True):
        raise InvalidModelError(f"{source}: tie_word_embeddings is false, but llama.cpp's {spec.gguf_arch} graph "
                                f"has no output tensor (the embedding is the output projection)")


def _check_per_layer(cfg: dict, source: str) -> None:
    per = cfg.get(PER_LAYER)
    if per is None:
        return
    n = cfg["num_hidden_layers"]
    if not isinstance(per, dict) or not set(per) <= set(PER_LAYER_FIELDS):
        raise InvalidModelError(f"{source}: {PER_LAYER} must be an object with keys among "
                                f"{', '.join(PER_LAYER_FIELDS)}, found {str(per)[:80]}")
    for k, v in per.items():
        if not isinstance(v, list) or len(v) != n or not all(_positive_int(x) for x in v):
            raise InvalidModelError(f"{source}: {PER_LAYER}.{k} must list {n} positive integers (one per "
                                    f"layer), found {str(v)[:80]}")
        top = cfg.get(k) or cfg["num_attention_heads"]  # only num_key_value_heads may be absent
        if max(v) != top:
            raise InvalidModelError(f"{source}: {k}={top} must be the largest of {PER_LAYER}.{k} ({max(v)})")
    heads = per.get("num_attention_heads", [cfg["num_attention_heads"]] * n)
    kv = per.get("num_key_value_heads", [cfg.get("num_key_value_heads") or cfg["num_attention_heads"]] * n)
    for i, (q, k) in enumerate(zip(heads, kv, strict=True)):
        if q % k:
            raise InvalidModelError(f"{source}: layer {i} has {q} query heads, not a multiple of its {k} KV heads")


def _check_shapes(cfg: dict, spec: ArchSpec, entries: dict[str, SafetensorsEntry], cfg_path: Path) -> None:
    n_layer = cfg["num_hidden_layers"]
    if n_layer * spec.checkpoint_layer_tensors() > len(entries):  # bound the loop below by the tensors present
        raise InvalidModelError(f"{cfg_path}: num_hidden_layers={n_layer} but the checkpoint holds only "
                                f"{len(entries)} tensors")
    expected = spec.expected_shapes(cfg)
    tied = cfg.get("tie_word_embeddings", False)
    for name, shape in expected.items():
        e = entries.get(name)
        if e is None:
            raise InvalidModelError(f"tensor {name!r} is missing from the checkpoint (expected by {cfg_path})")
        if e.shape != shape:
            raise InvalidModelError(f"{e.file}: tensor {name!r} has shape {list(e.shape)} but {cfg_path} "
                                    f"implies {list(shape)}")
        if e.dtype not in FLOAT_DTYPES:
            raise InvalidModelError(f"{e.file}: tensor {name!r} has dtype {e.dtype}; expected one of "
                                    f"{', '.join(FLOAT_DTYPES)}")
    for name, e in entries.items():
        if name in expected or spec.is_ignored(name) or (tied and name == spec.output_name):
            continue
        raise InvalidModelError(f"{e.file}: unexpected tensor {name!r} for {spec.hf_arch} "
                                f"(config and checkpoint disagree)")


def check_tokenizer_files(d: Path, vocab_size: int) -> None:
    tj = d / "tokenizer.json"
    if not tj.is_file():
        raise InvalidModelError(f"{d}: tokenizer.json is missing; slimlm needs the model's own (fast) "
                                f"tokenizer and never substitutes a default one")
    raw = _read_capped(tj, 256 * 2**20)
    tok = parse_json(raw, str(tj))
    model = tok.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("vocab"), dict):
        raise InvalidModelError(f"{tj}: no model.vocab mapping")
    added = tok.get("added_tokens")
    if not isinstance(added, list) or not all(isinstance(a, dict) for a in added):
        raise InvalidModelError(f"{tj}: added_tokens must be a list of objects")
    ids = list(model["vocab"].values()) + [a.get("id", -1) for a in added]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise InvalidModelError(f"{tj}: token ids must be non-negative integers")
    top = max(ids, default=-1)
    if top >= vocab_size:
        raise InvalidModelError(f"{tj}: token id {top} does not fit the embedding of {vocab_size} rows "
                                f"(config.json vocab_size)")
    # the rest of the format (pre-tokenizer, decoder, merges, strict JSON without NaN) is the tokenizers
    # library's: ask it now, before any weight is read, rather than fail in transformers later
    from tokenizers import Tokenizer
    try:
        Tokenizer.from_str(raw.decode("utf-8"))
    except Exception as e:  # the library raises plain Exception
        raise InvalidModelError(f"{tj}: the tokenizers library cannot read it "
                                f"({str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__})"
                                ) from None
