"""k-means codebook models on disk: `slimlm kmeans` writes them, `load_kmeans` runs them in torch.

Folder layout: the HF `config.json` and tokenizer files, `model.safetensors` in which every linear of the
decoder layers is stored as `NAME.codebook` (rows, 2^bits) float16 and `NAME.packed` (rows, ceil(cols*bits/8))
uint8 (see quant/kmeans.py), every other tensor as float16, and the header's metadata
{"format": "slimlm-kmeans", "bits": ..., "version": "1"}. transformers cannot load it alone (no codebook
support); `load_kmeans` builds the model from the config and puts `KMeansLinear` modules in place.
"""
from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from .errors import InvalidModelError
from .quant.kmeans import KMeansLinear, kmeans_rows, pack

FORMAT = "slimlm-kmeans"


def kmeans_model(model, bits: int, imatrix=None, *, progress: bool = True) -> dict[str, tuple]:
    """HF linear name (without .weight) -> (codebook float16, packed uint8) for every decoder-layer linear."""
    out = {}
    lins = [(n, m) for n, m in model.module.named_modules()
            if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")]
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
        elif name == "lm_head.weight" and model.config.get("tie_word_embeddings"):
            continue
        else:
            tensors[name] = t.detach().half().contiguous() if t.is_floating_point() else t.contiguous()
    return write_hf_folder(model, out, tensors, model.module.config.to_dict(), overwrite=overwrite,
                           metadata={"format": FORMAT, "bits": str(bits), "version": "1"})


def load_kmeans(path: str | Path):
    """A `Model` whose decoder-layer linears are KMeansLinear modules decoded from the folder's codebooks."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .arch import get_arch
    from .model import Model, _frozen, _quiet_transformers
    d = Path(path)
    st = d / "model.safetensors"
    if not st.is_file() or not (d / "config.json").is_file():
        raise InvalidModelError(f"{d}: not a k-means model folder (model.safetensors and config.json needed)")
    with safe_open(str(st), "pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise InvalidModelError(f"{st}: not written by slimlm kmeans (metadata format {meta.get('format')!r})")
        bits = int(meta["bits"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    _quiet_transformers()
    cfg = AutoConfig.from_pretrained(d, trust_remote_code=False)
    module = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain = {k: v.float() for k, v in tensors.items() if not k.endswith((".codebook", ".packed"))}
    missing, unexpected = module.load_state_dict(plain, strict=False)
    if unexpected:
        raise InvalidModelError(f"{st}: unexpected tensors {unexpected[:3]}")
    coded = {k[:-len(".codebook")] for k in tensors if k.endswith(".codebook")}
    for name in coded:
        parent, _, child = name.rpartition(".")
        host = module.get_submodule(parent)
        old = getattr(host, child)
        setattr(host, child, KMeansLinear(tensors[f"{name}.codebook"], tensors[f"{name}.packed"], bits,
                                          old.in_features, None if old.bias is None else old.bias.data))
    if cfg.tie_word_embeddings:
        module.tie_weights()
    left = [k for k in missing if not any(k.startswith(n) for n in coded)
            and not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    if left:
        raise InvalidModelError(f"{st}: missing tensors {left[:3]}")
    _frozen(module)
    tok = AutoTokenizer.from_pretrained(d, trust_remote_code=False)
    return Model(module, tok, get_arch(cfg.to_dict(), str(d / "config.json")), cfg.to_dict(), source=d)
