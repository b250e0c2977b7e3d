"""A strict GGUF parser: validates every count, length, offset and type against the bytes present.

Model files come from strangers (RELIABILITY.md items 11-19). This parser checks sizes before it reads or
allocates, so a 43-byte file claiming 2^63 tensors fails instantly with an `InvalidGGUFError` naming the
offset and field. It reads metadata into Python values and exposes tensor data as read-only memmaps.
Every GGUF slimlm opens goes through here first, before gguf-py or transformers see it.

Spec: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from ..errors import InvalidGGUFError

MAGIC = b"GGUF"
MAX_NAME_BYTES = 63  # GGML_MAX_NAME is 64 including the terminating NUL
MAX_DIMS = 4
MAX_ALIGNMENT = 1 << 20
MAX_KEY_BYTES = 1 << 16
DEFAULT_ALIGNMENT = 32

# scalar value types: struct format (keep in sync with gguf_type in ggml/include/gguf.h)
_SCALAR = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<B", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
_NP = {
    GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1", GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2", GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4", GGUFValueType.UINT64: "<u8", GGUFValueType.INT64: "<i8",
    GGUFValueType.FLOAT64: "<f8",
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]          # numpy order (rows, cols): GGUF's ne reversed
    ggml_type: GGMLQuantizationType
    offset: int                     # absolute offset of the data in the file
    nbytes: int

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


@dataclass
class Field:
    type: GGUFValueType
    value: object                   # int/float/bool/str, or a list (strings) / numpy array (numbers)
    item_type: GGUFValueType | None = None  # for arrays


@dataclass
class GGUFFile:
    path: Path
    version: int
    fields: dict[str, Field]
    tensors: list[TensorInfo]
    alignment: int
    data_offset: int
    file_size: int

    def get(self, key: str, default=None):
        f = self.fields.get(key)
        return default if f is None else f.value

    @property
    def architecture(self) -> str:
        arch = self.get("general.architecture")
        if not isinstance(arch, str):
            raise InvalidGGUFError(f"{self.path}: missing string key general.architecture")
        return arch

    def tensor(self, name: str) -> TensorInfo:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    def raw(self, t: TensorInfo) -> np.ndarray:
        """Read-only raw bytes of a tensor (a memmap; nothing is read until used)."""
        if t.nbytes == 0:
            return np.zeros(0, dtype=np.uint8)
        return np.memmap(self.path, dtype=np.uint8, mode="r", offset=t.offset, shape=(t.nbytes,))


class _Cursor:
    def __init__(self, buf: memoryview, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def fail(self, what: str) -> InvalidGGUFError:
        return InvalidGGUFError(f"{self.path}: {what} (at byte offset {self.pos})")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > len(self.buf):
            raise self.fail(f"{what} needs {n} bytes but only {len(self.buf) - self.pos} remain")

    def scalar(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return v

    def string(self, what: str, max_len: int | None = None) -> str:
        n = self.scalar("<Q", f"{what} length")
        if max_len is not None and n > max_len:
            raise self.fail(f"{what} is {n} bytes, more than the limit of {max_len}")
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        try:
            s = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(f"{what} is not valid UTF-8 ({e.reason})") from None
        self.pos += n
        return s


    def strings(self, n: int, what: str) -> list[str]:
        """n length-prefixed UTF-8 strings (a tokenizer's vocabulary: one tight loop, same checks)."""
        buf, pos, end, out = self.buf, self.pos, len(self.buf), []
        unpack = _U64.unpack_from
        for i in range(n):
            if pos + 8 > end:
                self.pos = pos
                raise self.fail(f"item {i} of {what} length needs 8 bytes but only {end - pos} remain")
            k = unpack(buf, pos)[0]
            pos += 8
            if pos + k > end:
                self.pos = pos
                raise self.fail(f"item {i} of {what} needs {k} bytes but only {end - pos} remain")
            try:
                out.append(str(buf[pos:pos + k], "utf-8"))
            except UnicodeDecodeError as e:
                self.pos = pos
                raise self.fail(f"item {i} of {what} is not valid UTF-8 ({e.reason})") from None
            pos += k
        self.pos = pos
        return out


_U64 = struct.Struct("<Q")


def _read_value(c: _Cursor, vtype: int, key: str) -> Field:
    try:
        vt = GGUFValueType(vtype)
    except ValueError:
        raise c.fail(f"key {key!r} has unknown value type {vtype} (expected 0-12)") from None
    if vt == GGUFValueType.STRING:
        return Field(vt, c.string(f"value of {key!r}"))
    if vt in _SCALAR:
        v = c.scalar(_SCALAR[vt], f"value of {key!r}")
        if vt == GGUFValueType.BOOL:
            if v > 1:  # ggml's gguf reader refuses these too; a bool byte is 0 or 1
                c.pos -= 1
                raise c.fail(f"key {key!r} is a BOOL of value {v} (expected 0 or 1)")
            v = bool(v)
        return Field(vt, v)
    # array
    itype_raw = c.scalar("<I", f"array type of {key!r}")
    try:
        it = GGUFValueType(itype_raw)
    except ValueError:
        raise c.fail(f"array {key!r} has unknown item type {itype_raw}") from None
    if it == GGUFValueType.ARRAY:
        raise c.fail(f"array {key!r} is nested (arrays of arrays are not supported)")
    n = c.scalar("<Q", f"array length of {key!r}")
    remaining = len(c.buf) - c.pos
    min_item = 8 if it == GGUFValueType.STRING else struct.calcsize(_SCALAR[it])
    if n > remaining // min_item:
        raise c.fail(f"array {key!r} claims {n} items but only {remaining} bytes remain")
    if it == GGUFValueType.STRING:
        items = c.strings(n, repr(key))
        return Field(vt, items, it)
    if it == GGUFValueType.BOOL:
        raw = np.frombuffer(c.buf, dtype=np.uint8, count=n, offset=c.pos)
        bad = np.flatnonzero(raw > 1)
        if bad.size:
            i = int(bad[0])
            c.pos += i
            raise c.fail(f"array {key!r} item {i} is a BOOL of value {int(raw[i])} (expected 0 or 1)")
        c.pos += n
        return Field(vt, raw.astype(bool), it)
    dt = np.dtype(_NP[it])
    arr = np.frombuffer(c.buf, dtype=dt, count=n, offset=c.pos).copy()
    c.pos += n * dt.itemsize
    return Field(vt, arr, it)


def _read_tensor_info(c: _Cursor, i: int, seen: set[str]) -> tuple[str, tuple[int, ...], int, int]:
    name = c.string(f"name of tensor {i}", max_len=1 << 16)
    if len(name.encode()) > MAX_NAME_BYTES:
        raise c.fail(f"tensor name {name[:80]!r} is {len(name.encode())} bytes (max {MAX_NAME_BYTES})")
    if not name:
        raise c.fail(f"tensor {i} has an empty name")
    if name in seen:
        raise c.fail(f"tensor name {name!r} appears twice")
    seen.add(name)
    n_dims = c.scalar("<I", f"n_dims of {name!r}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise c.fail(f"tensor {name!r} has n_dims={n_dims} (expected 1..{MAX_DIMS})")
    ne = [c.scalar("<q", f"dim {d} of {name!r}") for d in range(n_dims)]
    for d, v in enumerate(ne):
        if v < 0:
            raise c.fail(f"tensor {name!r} dim {d} is negative ({v})")
    if math.prod(ne) >= 1 << 62:
        raise c.fail(f"tensor {name!r} shape {ne} overflows")
    ttype = c.scalar("<I", f"type of {name!r}")
    offset = c.scalar("<Q", f"offset of {name!r}")
    return name, tuple(ne), ttype, offset


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse and validate a GGUF file. Raises InvalidGGUFError with the offset and field on any defect."""
    path = Path(path)
    if not path.is_file():
        raise InvalidGGUFError(f"{path}: not a file")
    size = path.stat().st_size
    if size < 24:
        raise InvalidGGUFError(f"{path}: {size} bytes is too small for a GGUF header (24 bytes)")
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    c = _Cursor(memoryview(mm), path)
    magic = bytes(c.buf[:4])
    if magic != MAGIC:
        raise InvalidGGUFError(f"{path}: bad magic {magic!r} (expected b'GGUF'); not a GGUF file")
    c.pos = 4
    version = c.scalar("<I", "version")
    if version not in (2, 3):
        if struct.unpack(">I", struct.pack("<I", version))[0] in (2, 3):
            raise InvalidGGUFError(f"{path}: big-endian GGUF is not supported (convert it on a "
                                   f"little-endian machine)")
        raise InvalidGGUFError(f"{path}: GGUF version {version} is not supported (expected 2 or 3)")
    n_tensors = c.scalar("<Q", "tensor count")
    n_kv = c.scalar("<Q", "metadata key/value count")
    # each kv needs >= 8 (key len) + 4 (type) + 1 bytes; each tensor info >= 8 + 4 + 8 + 4 + 8
    if n_kv > (size - c.pos) // 13:
        raise c.fail(f"metadata count {n_kv} cannot fit in a {size}-byte file")
    if n_tensors > (size - c.pos) // 32:
        raise c.fail(f"tensor count {n_tensors} cannot fit in a {size}-byte file")

    fields: dict[str, Field] = {}
    for i in range(n_kv):
        key = c.string(f"key {i}", max_len=MAX_KEY_BYTES)
        if not key:
            raise c.fail(f"metadata key {i} is empty")
        if key in fields:
            raise c.fail(f"metadata key {key!r} appears twice")
        vtype = c.scalar("<I", f"value type of {key!r}")
        fields[key] = _read_value(c, vtype, key)

    alignment = DEFAULT_ALIGNMENT
    if "general.alignment" in fields:
        f = fields["general.alignment"]
        if f.type != GGUFValueType.UINT32:
            raise InvalidGGUFError(f"{path}: general.alignment must be UINT32, found {f.type.name}")
        alignment = int(f.value)
        if alignment == 0 or alignment & (alignment - 1) or alignment > MAX_ALIGNMENT:
            raise InvalidGGUFError(f"{path}: general.alignment={alignment} must be a power of two "
                                   f"<= {MAX_ALIGNMENT}")

    raw_infos, seen = [], set()
    for i in range(n_tensors):
        raw_infos.append(_read_tensor_info(c, i, seen))
    data_offset = -(-c.pos // alignment) * alignment

    tensors, expect = [], 0
    for name, ne, ttype, offset in raw_infos:
        try:
            qt = GGMLQuantizationType(ttype)
            block, type_size = GGML_QUANT_SIZES[qt]
        except (ValueError, KeyError):
            raise InvalidGGUFError(f"{path}: tensor {name!r} has unknown type {ttype}") from None
        if ne[0] % block:
            raise InvalidGGUFError(f"{path}: tensor {name!r} row length {ne[0]} is not a multiple of "
                                   f"{qt.name}'s block size {block}")
        nbytes = math.prod(ne) // block * type_size
        if offset != expect:
            what = "overlaps the previous tensor" if offset < expect else "leaves a gap"
            raise InvalidGGUFError(f"{path}: tensor {name!r} data offset {offset} {what} "
                                   f"(expected {expect})")
        if data_offset + offset + nbytes > size:
            raise InvalidGGUFError(f"{path}: tensor {name!r} data [{offset}, {offset + nbytes}) runs past "
                                   f"the end of the file ({size - data_offset} data bytes); truncated?")
        tensors.append(TensorInfo(name, tuple(reversed(ne)), qt, data_offset + offset, nbytes))
        expect = -(-(offset + nbytes) // alignment) * alignment
    del c, mm
    return GGUFFile(path, version, fields, tensors, alignment, data_offset, size)
