"""GGUF export: llama.cpp's tensor names and metadata, gguf-py's encoders, the atomic write protocol.

`export_gguf(model, out, "Q8_0")` plans a type for every tensor (norms and 1-D tensors stay F32; a row
length that does not fit the type's block falls back and is reported), encodes, writes to a temp file in
the target folder, validates the written file (structure, names, types, shapes, no NaN/Inf anywhere,
quantized block scales included) and only then renames it into place.
"""
from __future__ import annotations

import struct
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch
from tqdm.auto import tqdm

from ..arch import PER_LAYER, SLIDING, gguf_arch, layer_dims, n_experts, rope_freqs, rope_parameters
from ..errors import ConfigError, NumericsError, OutputError
from ..formats import BY_GGML_TYPE, QuantFormat
from ..io import atomic_output, check_output_path, ensure_free_space
from ..presets import Preset, get_preset, plan_types
from ..quant import ENCODERS
from .reader import read_gguf
from .vocab import add_hf_tokenizer, copy_tokenizer_fields

QUANTIZATION_VERSION = 2
_F16_MAX = 65504.0
# general.* keys that describe the file itself and are rewritten, never copied from a GGUF source
_OWN_GENERAL = {"general.architecture", "general.file_type", "general.quantization_version",
                "general.alignment"}


@dataclass
class TensorRecord:
    name: str
    shape: tuple[int, ...]
    type: str
    requested: str
    nbytes: int
    note: str = ""


@dataclass
class ExportRecord:
    path: str
    type: str
    n_params: int
    file_bytes: int
    tensor_bytes: int
    bits_per_weight: float          # over every tensor's data bytes / every parameter
    seconds: float
    tensors: list[TensorRecord] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


_V = gguf.GGUFValueType
_BULK = {_V.STRING: None, _V.INT32: "<i4", _V.UINT32: "<u4", _V.FLOAT32: "<f4"}


class Writer(gguf.GGUFWriter):
    """gguf-py's writer, with metadata arrays of strings, int32, uint32 and float32 packed in bulk: the same
    bytes (a test compares them), but a tokenizer's ~100k strings and scores took ~0.8 s item by item."""

    def _pack_val(self, val, vtype, add_vtype, sub_type=None):
        ltype = sub_type
        if (vtype == _V.ARRAY and self.endianess == gguf.GGUFEndian.LITTLE and isinstance(val, (list, tuple))
                and len(val) > 0 and ltype is None):
            ltype = _V.get_type(val[0])
        if vtype != _V.ARRAY or ltype not in _BULK or self.endianess != gguf.GGUFEndian.LITTLE or not len(val):
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        head = (struct.pack("<I", vtype) if add_vtype else b"") + struct.pack("<IQ", ltype, len(val))
        if ltype == _V.STRING:
            if not all(isinstance(v, (str, bytes)) for v in val):
                return super()._pack_val(val, vtype, add_vtype, sub_type)
            enc = [v.encode("utf-8") if isinstance(v, str) else v for v in val]
            return head + b"".join(struct.pack("<Q", len(e)) + e for e in enc)
        arr = np.asarray(val)
        if arr.ndim != 1 or (ltype != _V.FLOAT32 and arr.dtype.kind not in "iu") or (
                ltype == _V.FLOAT32 and arr.dtype.kind not in "fiu"):
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        info = np.iinfo(_BULK[ltype]) if ltype != _V.FLOAT32 else None
        if info is not None and arr.size and (arr.min() < info.min or arr.max() > info.max):
            return super()._pack_val(val, vtype, add_vtype, sub_type)  # gguf-py raises the range error
        return head + arr.astype(_BULK[ltype]).tobytes()

    def write_streamed(self, produce, *, desc: str = "", progress: bool = False) -> None:
        """Tensor data made one tensor at a time, after the header and tensor directory (`add_tensor_info` for
        every tensor, then `write_header_to_file`, `write_kv_data_to_file`): `produce` yields each tensor's data
        in directory order (an array, or an iterator of arrays: consecutive row slabs), so only one tensor, or
        one slab of a big one, is in memory at a time (the same bytes as `add_tensor` + write_tensors_to_file).
        Written through the file object: a full disk raises OSError(ENOSPC) (numpy's `tofile` would report
        "N requested and M written" without the errno)."""
        self.write_ti_data_to_file()
        fout = self.fout[0]
        self.write_padding(fout, fout.tell())
        infos = list(self.tensors[0].items())
        for (name, ti), data in tqdm(zip(infos, produce, strict=True), total=len(infos), desc=desc, unit="tensor",
                                     disable=not progress, leave=False):
            n = 0
            for part in (data,) if isinstance(data, np.ndarray) else data:
                if part.nbytes:
                    fout.write(memoryview(np.ascontiguousarray(part)).cast("B"))
                n += part.nbytes
            if n != ti.nbytes:
                raise OutputError(f"{name}: {n} bytes of data for a tensor of {ti.nbytes}")
            self.write_padding(fout, ti.nbytes)
        self.state = gguf.gguf_writer.WriterState.WEIGHTS


def _stored(f: QuantFormat, shape: tuple[int, ...]) -> tuple[tuple[int, ...], np.dtype, object]:
    """(shape, numpy dtype, raw ggml type) of a tensor's encoded data as gguf-py's add_tensor records it."""
    if f.name == "F32":
        return shape, np.dtype(np.float32), None
    if f.name == "F16":
        return shape, np.dtype(np.float16), None
    block, type_size = gguf.GGML_QUANT_SIZES[f.ggml_type]
    return (*shape[:-1], shape[-1] // block * type_size), np.dtype(np.uint8), f.ggml_type


def tensor_value(model, hf_name: str, W: torch.Tensor) -> torch.Tensor:
    """A `_gguf_tensors` entry's values: W itself, or for a streamed model's matrix (a meta tensor) the weight read
    from disk in llama.cpp's layout."""
    if not W.is_meta:
        return W
    from ..lazy import read_weight
    return model.spec.to_gguf_tensor(hf_name, read_weight(model, hf_name), model.config)


def row_slabs(model, hf_name: str, W: torch.Tensor):
    """(first row, float32 rows in llama.cpp's layout) over a 2-D tensor, a slab at a time: the embedding and
    the output projection (no layout change) of a streamed model are read slab by slab, every other tensor whole
    (a slab of a tensor in memory is a view)."""
    from ..lazy import ROWS_PER_READ, weight_row_slabs
    spec = model.spec
    if W.is_meta and hf_name in (spec.embed_name, spec.output_name):
        yield from weight_row_slabs(model, hf_name)
        return
    W = tensor_value(model, hf_name, W)
    for lo in range(0, W.shape[0], ROWS_PER_READ):
        yield lo, W[lo:lo + ROWS_PER_READ]


def encode_slabs(model, name: str, hf_name: str, W: torch.Tensor, fmt: QuantFormat, imatrix):
    """A tensor's encoded data, slab by slab of rows (every format encodes rows independently: the slabs join to
    the whole tensor's encoding, byte for byte)."""
    imp = imatrix.importance(name) if imatrix is not None and fmt.ggml_type in ENCODERS else None
    if W.ndim != 2:
        yield encode(tensor_value(model, hf_name, W).float().numpy(), fmt, name, imp)
        return
    for _, rows in row_slabs(model, hf_name, W):
        yield encode(rows.float().numpy(), fmt, name, imp)


def _gguf_tensors(model) -> list[tuple[str, str, torch.Tensor]]:
    """(gguf name, hf name, tensor in llama.cpp layout) in the source's order when it was a GGUF."""
    cfg, spec = model.config, model.spec
    tied = bool(cfg.get("tie_word_embeddings", False))
    out = []
    for hf_name, W in model.named_weights().items():
        if spec.is_ignored(hf_name) or (tied and hf_name == spec.output_name):
            continue
        if spec.output_biases and hf_name.endswith(".bias") and not W.any():
            continue     # optional in llama.cpp's llama/deci graph: a zero bias would only cost an add per matmul
        out.append((spec.hf_to_gguf(hf_name), hf_name, spec.to_gguf_tensor(hf_name, W.detach(), cfg)))
    out = _join_fused(out)
    freqs = rope_freqs(cfg)
    if freqs is not None:
        out.append(("rope_freqs.weight", "", freqs))
    if model.gguf is not None:
        order = {t.name: i for i, t in enumerate(model.gguf.tensors)}
        out.sort(key=lambda x: order.get(x[0], len(order)))
    return out


def _join_fused(tensors: list[tuple[str, str, torch.Tensor]]) -> list[tuple[str, str, torch.Tensor]]:
    """Parts that one GGUF tensor holds (ArchSpec.fused: Phi-3's attn_qkv, ffn_up), joined by rows in their order,
    at the first part's place (hf name: the first part's)."""
    parts: dict[str, list] = {}
    for g, hf, W in tensors:
        parts.setdefault(g, []).append((hf, W))
    out = []
    for g, hf, W in tensors:
        if g in parts:
            p = parts.pop(g)
            out.append((g, hf, W if len(p) == 1 else torch.cat([w for _, w in p], 0)))
    return out


def encode(x: np.ndarray, fmt: QuantFormat, name: str, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Encode a float32 array (rows, cols) into `fmt`: numpy for F32/F16, gguf-py for BF16, slimlm's encoders
    (ports of llama.cpp's, optional importance weights) for every block type."""
    if fmt.ggml_type == gguf.GGMLQuantizationType.F32:
        return np.ascontiguousarray(x, dtype=np.float32)
    if fmt.ggml_type == gguf.GGMLQuantizationType.F16:
        amax = float(np.abs(x).max()) if x.size else 0.0
        if amax > _F16_MAX:
            raise NumericsError(f"tensor {name} has |value| {amax:.4g} beyond F16's range ({_F16_MAX}); "
                                f"use BF16 or F32")
        return x.astype(np.float16)
    if x.ndim == 3 and fmt.ggml_type in ENCODERS:     # stacked experts: each expert's rows, its own importance
        per = imatrix.reshape(x.shape[0], -1) if imatrix is not None and imatrix.size == x.shape[0] * x.shape[2] \
            else [imatrix] * x.shape[0]
        return np.stack([encode(e, fmt, name, imp) for e, imp in zip(x, per, strict=True)])
    if fmt.ggml_type in ENCODERS:
        return ENCODERS[fmt.ggml_type](np.ascontiguousarray(x, dtype=np.float32), imatrix)
    return gguf.quants.quantize(np.ascontiguousarray(x, dtype=np.float32), fmt.ggml_type)


def _add_hparams(w: gguf.GGUFWriter, model) -> None:
    cfg, spec = model.config, model.spec
    h, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    hd = cfg.get("head_dim") or h // nh
    w.add_context_length(int(cfg.get("max_position_embeddings") or 2048))
    w.add_embedding_length(h)
    w.add_block_count(cfg["num_hidden_layers"])
    per = cfg.get(PER_LAYER)
    if per:       # deci: per-layer arrays
        dims = [layer_dims(cfg, i) for i in range(cfg["num_hidden_layers"])]
        w.add_feed_forward_length([d[0] for d in dims])
        w.add_head_count([d[1] for d in dims])
        w.add_head_count_kv([d[2] for d in dims])
    else:
        w.add_feed_forward_length(cfg["intermediate_size"])
        w.add_head_count(nh)
        w.add_head_count_kv(cfg.get("num_key_value_heads") or nh)
    if spec.moe:
        w.add_expert_count(n_experts(cfg))
        w.add_expert_used_count(int(cfg["num_experts_per_tok"]))
        w.add_expert_feed_forward_length(int(cfg["moe_intermediate_size"]))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    rp = rope_parameters(cfg)
    w.add_rope_freq_base(float(rp["rope_theta"]))
    w.add_rope_dimension_count(hd)
    if hd != h // nh or spec.qk_norm or per:
        w.add_key_length(hd)
        w.add_value_length(hd)
    if rp.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rp["factor"]))
    kinds = cfg.get("layer_types") or []
    if spec.layer_types and cfg.get("sliding_window") and SLIDING in kinds:
        # llama.cpp: sliding layers use the swa rope base unscaled; the pattern (true = sliding) per layer
        w.add_sliding_window(int(cfg["sliding_window"]))
        w.add_sliding_window_pattern([k == SLIDING for k in kinds])
        w.add_rope_freq_base_swa(float(rope_parameters(cfg, SLIDING)["rope_theta"]))
    if cfg.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(float(cfg["final_logit_softcapping"]))
    if spec.attn_softcap and cfg.get("attn_logit_softcapping"):
        w.add_attn_logit_softcapping(float(cfg["attn_logit_softcapping"]))
    w.add_vocab_size(cfg["vocab_size"])


def _add_imatrix_info(w: gguf.GGUFWriter, imatrix) -> None:
    """The keys llama-quantize records when it used an importance matrix (tools/quantize/quantize.cpp)."""
    w.add_string("quantize.imatrix.file", imatrix.source or "(computed by slimlm)")
    if imatrix.datasets:
        w.add_string("quantize.imatrix.dataset", imatrix.datasets[0])
    w.add_int32("quantize.imatrix.entries_count", len(imatrix.sums))
    if imatrix.chunk_count > 0:
        w.add_int32("quantize.imatrix.chunks_count", imatrix.chunk_count)


def _add_general(w: gguf.GGUFWriter, model, preset: Preset) -> None:
    if model.gguf is not None:
        for key, f in model.gguf.fields.items():
            if key.startswith("general.") and key not in _OWN_GENERAL:
                v = f.value.tolist() if isinstance(f.value, np.ndarray) else f.value
                w.add_key_value(key, v, f.type, sub_type=f.item_type)
    elif model.source is not None:
        w.add_name(Path(model.source).name)
    w.add_file_type(preset.file_type)
    w.add_quantization_version(QUANTIZATION_VERSION)


def plan_model(model, type: str, *, has_imatrix: bool = False, pure: bool = False):
    """(preset, [(gguf name, hf name, tensor in llama.cpp layout)], gguf name -> (QuantFormat, why)): the
    per-tensor types llama.cpp's rules give this model under preset `type`."""
    preset = get_preset(type)
    tensors = _gguf_tensors(model)
    cfg = model.config
    types = plan_types([(n, tuple(W.shape)) for n, _, W in tensors], preset, n_layer=cfg["num_hidden_layers"],
                       tied=bool(cfg.get("tie_word_embeddings", False)), has_imatrix=has_imatrix, pure=pure,
                       arch=model.spec.gguf_arch, n_head=cfg["num_attention_heads"],
                       n_head_kv=cfg.get("num_key_value_heads"))
    return preset, tensors, types


def planned_data_bytes(model, type: str, *, has_imatrix: bool = False, pure: bool = False) -> int:
    """Bytes of tensor data a GGUF of `model` at preset `type` holds (llama.cpp's per-tensor rules)."""
    _, tensors, types = plan_model(model, type, has_imatrix=has_imatrix, pure=pure)
    return sum(types[n][0].nbytes(tuple(W.shape)) for n, _, W in tensors)


def _metadata(w: Writer, model, preset: Preset, imatrix, pre_tokenizer: str | None) -> None:
    _add_general(w, model, preset)
    _add_hparams(w, model)
    if imatrix is not None:
        _add_imatrix_info(w, imatrix)
    if model.gguf is not None:
        copy_tokenizer_fields(model.gguf, w)
    else:
        add_hf_tokenizer(w, model.tokenizer, Path(model.source), model.config["vocab_size"], pre_tokenizer)


def file_bytes(model, tensor_bytes: dict[str, int], type: str = "Q8_0", *, imatrix=None,
               pre_tokenizer: str | None = None) -> int:
    """The exact size of the GGUF export_gguf writes when tensor `name` takes `tensor_bytes[name]` bytes:
    the header, metadata and tensor directory are written to a scratch file and measured, then every tensor's
    data is added with llama.cpp's alignment."""
    import tempfile
    preset = get_preset(type)
    tensors = _gguf_tensors(model)
    with tempfile.TemporaryDirectory() as d:
        w = Writer(Path(d) / "h.gguf", gguf_arch(model.spec, model.config))
        _metadata(w, model, preset, imatrix, pre_tokenizer)
        for name, _hf, W in tensors:
            w.add_tensor_info(name, tuple(W.shape), np.dtype(np.float32), tensor_bytes[name])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        w.close()
        head = (Path(d) / "h.gguf").stat().st_size
    align = gguf.GGUF_DEFAULT_ALIGNMENT
    return gguf.GGUFWriter.ggml_pad(head, align) + sum(gguf.GGUFWriter.ggml_pad(tensor_bytes[n], align)
                                                       for n, _, _ in tensors)


def export_gguf(model, out: str | Path, type: str = "Q8_0", *, overwrite: bool = False,
                progress: bool = True, pre_tokenizer: str | None = None, imatrix=None,
                pure: bool = False, encoded: dict | None = None, types: dict | None = None) -> ExportRecord:
    """Write `model` as a GGUF file llama.cpp runs. Returns what was written, per tensor.

    `pre_tokenizer` names llama.cpp's pre-tokenizer for an HF tokenizer whose check-text hash is unknown
    (by default such a tokenizer is refused, never guessed). `imatrix` (an ImportanceMatrix) weights the
    encoders' error wherever llama.cpp uses one (K-quants and Q4_0/Q4_1/Q5_0/Q5_1; not Q8_0).
    `type` is a llama.cpp preset (Q4_K_M, Q8_0, ...) with its per-tensor rules; `pure` gives every
    quantizable tensor the preset's main type (llama-quantize --pure). `encoded` maps GGUF tensor names to
    bytes already encoded for their planned type (GPTQ's), written as they are. `types` overrides the plan:
    GGUF name -> (QuantFormat, why) (a size-budgeted allocation's types)."""
    t0 = time.perf_counter()
    out = check_output_path(out, overwrite=overwrite, inputs=[model.source] if model.source else [])
    preset, tensors, planned = plan_model(model, type, has_imatrix=imatrix is not None, pure=pure)
    planned = {**planned, **(types or {})}
    for n, _, W in tensors:
        f = planned[n][0]
        if not f.is_float and W.ndim and not f.fits(W.shape[-1]):
            raise ConfigError(f"{n}: rows of {W.shape[-1]} do not fit {f.name}'s blocks of {f.block_size}")
    plan = [(n, hf, W, *planned[n]) for n, hf, W in tensors]
    # obviously short: not even the tensor data fits (a shortage within the header is caught at the write)
    ensure_free_space(out.parent, sum(f.nbytes(tuple(W.shape)) for _, _, W, f, _ in plan))
    records = []

    def data(name, hf, W, f):
        if encoded is not None and name in encoded:
            d = encoded[name]
            if d.dtype != np.uint8 or d.nbytes != f.nbytes(tuple(W.shape)) or d.shape[0] != W.shape[0]:
                raise OutputError(f"pre-encoded {name} does not fit {f.name} {list(W.shape)}")
            return d
        return encode_slabs(model, name, hf, W, f, imatrix)

    with atomic_output(out, overwrite=overwrite, inputs=[model.source] if model.source else []) as tmp:
        w = Writer(tmp, gguf_arch(model.spec, model.config))
        _metadata(w, model, preset, imatrix, pre_tokenizer)
        for name, _hf, W, f, note in plan:       # the directory first: every size is known from the plan
            shape, dtype, raw = _stored(f, tuple(W.shape))
            w.add_tensor_info(name, shape, dtype, f.nbytes(tuple(W.shape)), raw_dtype=raw)
            records.append(TensorRecord(name, tuple(W.shape), f.name, preset.name, f.nbytes(tuple(W.shape)), note))
        try:
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_streamed((data(name, hf, W, f) for name, hf, W, f, _ in plan), desc=f"encoding {preset.name}",
                             progress=progress)
        finally:
            w.close()
        validate_written(tmp, records)
    file_bytes = out.stat().st_size
    n_params = sum(int(np.prod(r.shape)) for r in records)
    tensor_bytes = sum(r.nbytes for r in records)
    fallbacks = [f"{r.name}: {r.note}" for r in records if "not a multiple" in r.note]
    return ExportRecord(str(out), preset.name, n_params, file_bytes, tensor_bytes,
                        8 * tensor_bytes / max(n_params, 1), time.perf_counter() - t0, records, fallbacks)


def validate_written(path: Path, records: list[TensorRecord]) -> None:
    """Re-read a written GGUF strictly; names, shapes and types must match; no NaN/Inf in any value."""
    g = read_gguf(path)
    got = {t.name: t for t in g.tensors}
    if len(got) != len(records):
        raise OutputError(f"{path}: wrote {len(got)} tensors, expected {len(records)}")
    for r in records:
        t = got.get(r.name)
        if t is None or t.shape != r.shape or t.ggml_type.name != r.type:
            raise OutputError(f"{path}: tensor {r.name} was not written as {r.type} {list(r.shape)}")
        check_tensor_finite(g.raw(t), t.ggml_type, t.shape, r.name)


def check_tensor_finite(raw: np.ndarray, qtype, shape, name: str) -> None:
    """NaN/Inf in a tensor's values or in a quantized block's scales -> NumericsError naming the block.

    Block types are checked through their fp16 scale fields (formats.QuantFormat.fp16_fields): the other
    fields are small integers, so a block decodes to finite values exactly when its scales are finite.
    Types slimlm has no layout for are dequantized whole."""
    if raw.size == 0:
        return
    raw = np.asarray(raw)
    fmt = BY_GGML_TYPE.get(qtype)
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if fmt is not None and not fmt.is_float:
        blocks = raw.reshape(-1, type_size)
        fields = np.stack([blocks[:, o:o + 2].copy().view(np.float16)[:, 0] for o in fmt.fp16_fields], 1)
        bad = ~np.isfinite(fields).all(1)
        if bad.any():
            b = int(np.argmax(bad))
            raise NumericsError(f"tensor {name} ({qtype.name}, shape {list(shape)}) has a non-finite scale at "
                                f"flat index {b * block} (block {b})")
        return
    x = gguf.quants.dequantize(raw, qtype).reshape(-1)
    bad = ~np.isfinite(x)
    if bad.any():
        i = int(np.argmax(bad))
        raise NumericsError(f"tensor {name} ({qtype.name}, shape {list(shape)}) has a non-finite value at "
                            f"flat index {i} (block {i // block})")
