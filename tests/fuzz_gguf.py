"""GGUF inputs for fuzzing (tests/test_fuzz.py, bench/fuzz.py): a serializer that records where every count,
length, type, dim and offset lies, structure-aware hypothesis strategies, and tiny valid seed files.

A `GSpec` describes a GGUF file (key/values, tensors, alignment); `serialize` turns it into bytes and a list of
`Slot`s (offset, struct format, label) so a strategy can overwrite exactly one field (a count, a string
length, a value type, n_dims, a dim, a tensor type or offset) with an interesting value. A spec built without
corruption is valid by construction: the parser must accept it and give back the same keys, values and
tensors (`expected_fields`).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from hypothesis import strategies as st

V = GGUFValueType
_FMT = {V.UINT8: "<B", V.INT8: "<b", V.UINT16: "<H", V.INT16: "<h", V.UINT32: "<I", V.INT32: "<i",
        V.FLOAT32: "<f", V.BOOL: "<B", V.UINT64: "<Q", V.INT64: "<q", V.FLOAT64: "<d"}
_INT_RANGE = {V.UINT8: (0, 255), V.INT8: (-128, 127), V.UINT16: (0, 2**16 - 1), V.INT16: (-2**15, 2**15 - 1),
              V.UINT32: (0, 2**32 - 1), V.INT32: (-2**31, 2**31 - 1), V.UINT64: (0, 2**64 - 1),
              V.INT64: (-2**63, 2**63 - 1), V.BOOL: (0, 1)}
TENSOR_TYPES = [GGMLQuantizationType[n] for n in ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q5_1", "Q4_K", "Q6_K",
                                                   "IQ4_NL", "I8", "I32", "F64")]


@dataclass
class KV:
    key: str | bytes
    vtype: int
    value: object                     # scalar, str, or (item_type, [items]) for arrays


@dataclass
class Tensor:
    name: str | bytes
    ne: list[int]                     # GGUF order (row length first)
    ttype: int
    data: bytes = b""
    offset: int | None = None         # None: the next aligned offset


@dataclass
class GSpec:
    kvs: list[KV] = field(default_factory=list)
    tensors: list[Tensor] = field(default_factory=list)
    version: int = 3
    align: int = 32


@dataclass(frozen=True)
class Slot:
    offset: int
    fmt: str
    label: str


def _b(s: str | bytes) -> bytes:
    return s.encode() if isinstance(s, str) else s


def pack_value(vtype: int, value, out: bytearray, slots: list[Slot], label: str) -> None:
    """Serialize one value (no type tag) into `out`, recording its length/count/type slots."""
    if vtype == V.STRING:
        b = _b(value)
        slots.append(Slot(len(out), "<Q", f"{label} string length"))
        out += struct.pack("<Q", len(b)) + b
    elif vtype == V.ARRAY:
        itype, items = value
        slots.append(Slot(len(out), "<I", f"{label} item type"))
        out += struct.pack("<I", itype)
        slots.append(Slot(len(out), "<Q", f"{label} array length"))
        out += struct.pack("<Q", len(items))
        for i, it in enumerate(items):
            pack_value(itype, it, out, slots, f"{label}[{i}]")
    else:
        out += struct.pack(_FMT[V(vtype)], value)


def serialize(spec: GSpec) -> tuple[bytes, list[Slot]]:
    out, slots = bytearray(b"GGUF"), []
    slots.append(Slot(4, "<I", "version"))
    out += struct.pack("<I", spec.version)
    slots += [Slot(8, "<Q", "tensor count"), Slot(16, "<Q", "kv count")]
    out += struct.pack("<QQ", len(spec.tensors), len(spec.kvs))
    for i, kv in enumerate(spec.kvs):
        pack_value(V.STRING, kv.key, out, slots, f"key {i}")
        slots.append(Slot(len(out), "<I", f"value type {i}"))
        out += struct.pack("<I", kv.vtype)
        pack_value(kv.vtype, kv.value, out, slots, f"value {i}")
    offs, pos = [], 0
    for t in spec.tensors:
        pos = -(-pos // spec.align) * spec.align
        offs.append(pos if t.offset is None else t.offset)
        pos += len(t.data)
    for i, (t, off) in enumerate(zip(spec.tensors, offs, strict=True)):
        pack_value(V.STRING, t.name, out, slots, f"tensor {i} name")
        slots.append(Slot(len(out), "<I", f"tensor {i} n_dims"))
        out += struct.pack("<I", len(t.ne))
        for d, n in enumerate(t.ne):
            slots.append(Slot(len(out), "<q", f"tensor {i} dim {d}"))
            out += struct.pack("<q", n)
        slots.append(Slot(len(out), "<I", f"tensor {i} type"))
        out += struct.pack("<I", t.ttype)
        slots.append(Slot(len(out), "<Q", f"tensor {i} offset"))
        out += struct.pack("<Q", off)
    out += bytes(-len(out) % spec.align)
    base, pos = len(out), 0
    for t in spec.tensors:
        pad = -pos % spec.align
        out += bytes(pad)
        pos += pad + len(t.data)
        out += t.data
    assert len(out) == base + pos
    return bytes(out), slots


def tensor_nbytes(ne: list[int], ttype: int) -> int:
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
    n = 1
    for x in ne:
        n *= x
    return n // block * size


def interesting(fmt: str, orig: int, file_len: int) -> st.SearchStrategy[int]:
    """Values that break parsers: zero, one, powers of two at type limits, the file length, off-by-one."""
    bits = 8 * struct.calcsize(fmt)
    signed = fmt[-1].islower()
    lo, hi = (-(1 << bits - 1), (1 << bits - 1) - 1) if signed else (0, (1 << bits) - 1)
    cands = {0, 1, 2, 3, 7, 13, 64, 255, 1 << 31, (1 << 31) - 1, 1 << 32, 1 << 62, 1 << 63, (1 << 64) - 1,
             orig - 1, orig + 1, orig * 2, orig + 8, file_len, file_len + 1, -1, -(1 << 63), lo, hi}
    vals = sorted(v for v in cands if lo <= v <= hi)
    return st.one_of(st.sampled_from(vals), st.integers(lo, hi))


def scalar_value(vtype: int) -> st.SearchStrategy:
    if vtype in _INT_RANGE:
        lo, hi = _INT_RANGE[V(vtype)]
        return st.integers(lo, hi)
    if vtype == V.FLOAT32:
        return st.floats(width=32)
    if vtype == V.FLOAT64:
        return st.floats()
    return st.text(max_size=12)


SCALAR_TYPES = [t for t in V if t != V.ARRAY]


@st.composite
def kv_value(draw, vtype: int, depth: int = 0):
    if vtype != V.ARRAY:
        return draw(scalar_value(vtype))
    itype = draw(st.sampled_from(SCALAR_TYPES))
    return itype, draw(st.lists(scalar_value(itype), max_size=6))


keys = st.one_of(st.sampled_from(["general.architecture", "general.name", "general.file_type",
                                  "llama.block_count", "tokenizer.ggml.tokens", "a", "b.c"]),
                 st.text(min_size=1, max_size=10))


@st.composite
def valid_spec(draw) -> GSpec:
    """A GGUF file that is valid by construction (unique non-empty keys, consistent tensors)."""
    spec = GSpec(version=draw(st.sampled_from([3, 3, 2])))
    for k in draw(st.lists(keys, max_size=6, unique=True)):
        vt = draw(st.sampled_from(list(V)))
        spec.kvs.append(KV(k, vt, draw(kv_value(vt))))
    if draw(st.booleans()):
        spec.align = draw(st.sampled_from([1, 8, 16, 32, 64, 4096]))
        spec.kvs = [kv for kv in spec.kvs if kv.key != "general.alignment"]
        spec.kvs.append(KV("general.alignment", V.UINT32, spec.align))
    names = draw(st.lists(st.text(min_size=1, max_size=8).filter(lambda s: len(s.encode()) < 64),
                          max_size=4, unique=True))
    for n in names:
        tt = draw(st.sampled_from(TENSOR_TYPES))
        block = GGML_QUANT_SIZES[tt][0]
        ne = [block * draw(st.integers(0, 2))] + draw(st.lists(st.integers(0, 3), max_size=3))
        nb = tensor_nbytes(ne, tt)
        data = draw(st.sampled_from([bytes(nb), bytes(range(256)) * (nb // 256) + bytes(nb % 256)]))
        spec.tensors.append(Tensor(n, ne, int(tt), data))
    return spec


def expected_fields(spec: GSpec) -> dict[str, bytes]:
    """key -> serialized value, to compare with what the parser returns (NaN-safe: compares bytes)."""
    out = {}
    for kv in spec.kvs:
        b, s = bytearray(), []
        pack_value(kv.vtype, kv.value, b, s, "")
        out[kv.key] = bytes(b)
    return out


def field_bytes(f) -> bytes:
    """Serialize a parsed slimlm.gguf.reader.Field back to GGUF value bytes."""
    b, s = bytearray(), []
    if f.type == V.ARRAY:
        items = f.value.tolist() if isinstance(f.value, np.ndarray) else f.value
        if f.item_type == V.BOOL:
            items = [int(x) for x in items]
        pack_value(V.ARRAY, (f.item_type, items), b, s, "")
    else:
        pack_value(f.type, int(f.value) if f.type == V.BOOL else f.value, b, s, "")
    return bytes(b)


@st.composite
def gguf_struct_case(draw) -> tuple[bytes, GSpec | None]:
    """(file bytes, the spec if the file is valid by construction else None): a valid spec, then 0-3 field
    overwrites (counts, lengths, value types, n_dims, dims, tensor types, offsets) or a structural defect."""
    spec = draw(valid_spec())
    defect = draw(st.sampled_from(["none", "none", "slot", "slot", "slot", "dup_key", "empty_key", "nested",
                                   "bad_align", "long_name", "dup_tensor", "bad_bool", "truncate", "bad_utf8"]))
    if (defect == "dup_key" and not spec.kvs) or (defect == "dup_tensor" and not spec.tensors):
        defect = "none"
    if defect == "dup_key":
        spec.kvs.append(KV(spec.kvs[0].key, V.UINT8, 1))
    elif defect == "empty_key":
        spec.kvs.append(KV("", V.UINT8, 1))
    elif defect == "nested":
        spec.kvs.append(KV("n", V.ARRAY, (V.ARRAY, [])))
    elif defect == "bad_align":
        spec.kvs = [kv for kv in spec.kvs if kv.key != "general.alignment"]
        spec.kvs.append(KV("general.alignment", draw(st.sampled_from([V.UINT32, V.UINT64, V.INT32])),
                           draw(st.sampled_from([0, 3, 24, 32, 1 << 21, (1 << 31) - 1]))))
    elif defect == "long_name":
        spec.tensors.append(Tensor("n" * draw(st.integers(64, 300)), [32], 0, bytes(128)))
    elif defect == "dup_tensor":
        t = spec.tensors[0]
        spec.tensors.append(Tensor(t.name, t.ne, t.ttype, t.data))
    elif defect == "bad_bool":
        spec.kvs.append(KV("b", V.UINT8, draw(st.integers(2, 255))))
        data, slots = serialize(spec)
        buf = bytearray(data)
        buf[[s for s in slots if s.label == f"value type {len(spec.kvs) - 1}"][0].offset] = V.BOOL
        return bytes(buf), None
    elif defect == "bad_utf8":
        spec.kvs.append(KV(draw(st.sampled_from([b"\xff", b"a\xc3", b"\xed\xa0\x80"])), V.UINT8, 1))
    data, slots = serialize(spec)
    if defect == "none":
        return data, spec
    if defect == "truncate":
        return data[:draw(st.integers(0, max(len(data) - 1, 0)))], None
    if defect == "slot":
        buf = bytearray(data)
        for _ in range(draw(st.integers(1, 3))):
            s = draw(st.sampled_from(slots))
            orig = struct.unpack_from(s.fmt, buf, s.offset)[0]
            struct.pack_into(s.fmt, buf, s.offset, draw(interesting(s.fmt, orig, len(buf))))
        return bytes(buf), None
    return data, None


# ---- byte mutations of valid seed files --------------------------------------------------------------
INTERESTING_BYTES = [0, 1, 2, 0x7F, 0x80, 0xFF]
INTERESTING_WORDS = [0, 1, 2**31, 2**32 - 1, 2**32, 2**62, 2**63, 2**64 - 1]


@st.composite
def mutated(draw, seeds: list[bytes], head: int = 512) -> bytes:
    """One of `seeds` after 1-4 byte-level mutations, biased to the first `head` bytes (the header)."""
    buf = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        n = len(buf)
        if n == 0:
            break
        hi = min(n, head) if draw(st.integers(0, 3)) else n
        pos = draw(st.integers(0, hi - 1))
        op = draw(st.sampled_from(["flip", "byte", "word", "word", "insert", "delete", "truncate", "dup"]))
        if op == "flip":
            buf[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte":
            buf[pos] = draw(st.sampled_from(INTERESTING_BYTES) | st.integers(0, 255))
        elif op == "word" and pos + 8 <= n:
            size = draw(st.sampled_from([4, 8]))
            v = draw(st.sampled_from(INTERESTING_WORDS)) % (1 << 8 * size)
            buf[pos:pos + size] = v.to_bytes(size, "little")
        elif op == "insert":
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del buf[pos:pos + draw(st.integers(1, 16))]
        elif op == "truncate":
            del buf[pos:]
        elif op == "dup":
            k = draw(st.integers(1, 32))
            buf[pos:pos] = buf[pos:pos + k]
    return bytes(buf)
