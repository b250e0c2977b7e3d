"""k-means codebook models on disk: `slimlm kmeans` writes them, `load_kmeans` runs them in torch.

Folder layout: the HF `config.json` and tokenizer files, `model.safetensors` in which every linear of the
decoder layers is stored as `NAME.codebook` (rows, 2^bits) float16 and `NAME.packed` (rows, ceil(cols*bits/8))
uint8 (see quant/kmeans.py), every other tensor as float16, and the header's metadata
{"format": "slimlm-kmeans", "bits": ..., "version": "1"}. transformers cannot load it alone (no codebook
support); `load_kmeans` checks the folder as strictly as `hf.check_hf_dir` checks an HF folder (config,
safetensors header against the bytes, every tensor's shape and dtype against the config, tokenizer), then
builds the model from the config and puts `KMeansLinear` modules in place.
"""
from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from .arch import prepare
from .errors import InvalidModelError
from .quant.kmeans import KMeansLinear, kmeans_rows, pack

FORMAT = "slimlm-kmeans"


def kmeans_model(model, bits: int, imatrix=None, *, progress: bool = True) -> dict[str, tuple]:
    """HF linear name (without .weight) -> (codebook float16, packed uint8) for every decoder-layer linear."""
    out = {}
    lins = [(n, m) for n, m in model.module.named_modules()
            if isinstance(m, torch.nn.Linear) and model.spec.layer_of(n) is not None]
    for n, m in tqdm(lins, desc=f"k-means ({1 << bits} centroids per row)", unit="tensor", disable=not progress,
                     leave=False):
        imp = imatrix.importance(model.spec.hf_to_gguf(f"{n}.weight")) if imatrix is not None else None
        books, idx = kmeans_rows(m.weight.data, bits, None if imp is None else torch.from_numpy(imp))
        out[n] = (books.half(), pack(idx, bits))
    return out


def save_kmeans(model, out: str | Path, codebooks: dict, bits: int, *, overwrite: bool = False) -> Path:
    from .hfout import write_hf_folder
    tensors = {}
    for name, t in model.module.state_dict().items():
        base = name[:-len(".weight")] if name.endswith(".weight") else None
        if base in codebooks:
            tensors[f"{base}.codebook"], tensors[f"{base}.packed"] = codebooks[base]
        elif name == model.spec.output_name and model.config.get("tie_word_embeddings"):
            continue
        else:
            tensors[name] = t.detach().half().contiguous() if t.is_floating_point() else t.contiguous()
    return write_hf_folder(model, out, tensors, model.module.config.to_dict(), overwrite=overwrite,
                           metadata={"format": FORMAT, "bits": str(bits), "version": "1"})


def _header_metadata(st: Path) -> dict:
    """The `__metadata__` of a safetensors file whose header `hf.read_safetensors_header` has validated."""
    import struct

    from .hf import parse_json
    with open(st, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        meta = parse_json(f.read(n), f"{st} header").get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise InvalidModelError(f"{st}: header __metadata__ must map names to strings")
    return meta


def check_kmeans_dir(d: Path) -> tuple[dict, object, int, dict]:
    """The strict checks of `hf.check_hf_dir` for a k-means folder, whose decoder-layer linears are stored as
    NAME.codebook (rows, 2^bits) float and NAME.packed (rows, ceil(cols*bits/8)) uint8: config.json (strict
    JSON, no remote code, a supported architecture), the safetensors header against the file's bytes, every
    tensor's name, shape and dtype against the config, the tokenizer files. Returns (config, arch spec, bits,
    safetensors entries). Reads no tensor data."""
    from .hf import (
        FLOAT_DTYPES,
        check_config,
        check_tokenizer_files,
        load_json,
        read_safetensors_header,
        refuse_remote_code,
    )
    if not d.is_dir():
        raise InvalidModelError(f"{d}: not a folder")
    cfg_path, st = d / "config.json", d / "model.safetensors"
    if not cfg_path.is_file() or not st.is_file():
        raise InvalidModelError(f"{d}: not a k-means model folder (model.safetensors and config.json needed)")
    cfg = load_json(cfg_path)
    refuse_remote_code(d)
    spec = check_config(cfg, str(cfg_path))     # field types, model_type, rope and token ids, as load() does
    entries = read_safetensors_header(st)
    n_layer = cfg["num_hidden_layers"]
    if n_layer * len(spec.layer_suffixes()) > len(entries):   # bounds expected_shapes by the tensors present
        raise InvalidModelError(f"{cfg_path}: num_hidden_layers={n_layer} but {st} holds only {len(entries)} "
                                f"tensors")
    meta = _header_metadata(st)
    if meta.get("format") != FORMAT:
        raise InvalidModelError(f"{st}: not written by slimlm kmeans (metadata format {meta.get('format')!r})")
    bits = meta.get("bits", "")
    if not bits.isdigit() or not 1 <= int(bits) <= 8:
        raise InvalidModelError(f"{st}: metadata bits {bits!r} is not a number from 1 to 8")
    bits = int(bits)
    tied = bool(cfg.get("tie_word_embeddings", False))
    seen = set()

    def need(name: str, shape: tuple, dtypes: tuple) -> None:
        e = entries.get(name)
        if e is None:
            raise InvalidModelError(f"{st}: tensor {name!r} is missing (expected by {cfg_path})")
        if e.shape != tuple(shape) or e.dtype not in dtypes:
            raise InvalidModelError(f"{st}: tensor {name!r} is {e.dtype} {list(e.shape)}; {cfg_path} and "
                                    f"{bits}-bit codebooks imply {'/'.join(dtypes)} {list(shape)}")
        seen.add(name)
    for name, shape in spec.expected_shapes(cfg, in_memory=True).items():
        base = name[:-len(".weight")]
        if spec.layer_of(name) is not None and len(shape) == 2 and f"{base}.codebook" in entries:
            need(f"{base}.codebook", (shape[0], 1 << bits), FLOAT_DTYPES)
            need(f"{base}.packed", (shape[0], -(-shape[1] * bits // 8)), ("U8",))
        elif not (tied and name == spec.output_name):
            need(name, shape, FLOAT_DTYPES)
    extra = sorted(n for n in entries if n not in seen and not spec.is_ignored(n))
    if extra:
        raise InvalidModelError(f"{st}: unexpected tensor {extra[0]!r} for {spec.hf_arch} with {bits}-bit "
                                f"codebooks (config and checkpoint disagree)")
    check_tokenizer_files(d, cfg["vocab_size"])
    return cfg, spec, bits, entries


def load_kmeans(path: str | Path):
    """A `Model` whose decoder-layer linears are KMeansLinear modules decoded from the folder's codebooks.
    The folder goes through `check_kmeans_dir` (strict) before any tensor data is read."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .model import Model, _frozen, _quiet_transformers
    d = Path(path)
    cfg_dict, spec, bits, _ = check_kmeans_dir(d)
    st = d / "model.safetensors"
    with safe_open(str(st), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for k, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            idx = tuple(int(i) for i in (~torch.isfinite(t)).nonzero()[0])
            raise InvalidModelError(f"{st}: tensor {k} has a non-finite value at index {idx}")
    _quiet_transformers()
    try:
        cfg = AutoConfig.from_pretrained(d, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        raise InvalidModelError(f"{d / 'config.json'}: transformers cannot read it ({e})") from None
    module = prepare(AutoModelForCausalLM.from_config(cfg, dtype=torch.float32))   # in-memory names, as saved
    plain = {k: v.float() for k, v in tensors.items() if not k.endswith((".codebook", ".packed"))}
    module.load_state_dict(plain, strict=False)            # names and shapes were checked above
    coded = {k[:-len(".codebook")] for k in tensors if k.endswith(".codebook")}
    for name in coded:
        parent, _, child = name.rpartition(".")
        host = module.get_submodule(parent)
        old = getattr(host, child)
        setattr(host, child, KMeansLinear(tensors[f"{name}.codebook"], tensors[f"{name}.packed"], bits,
                                          old.in_features, None if old.bias is None else old.bias.data))
    if cfg.tie_word_embeddings:
        module.tie_weights()
    _frozen(module)
    tok = AutoTokenizer.from_pretrained(d, trust_remote_code=False)
    return Model(module, tok, spec, cfg.to_dict(), source=d)
