"""Importance matrix: per input column of every linear, the sum of squared activations and the token count,
as llama.cpp's `llama-imatrix` defines it (importance = in_sum2 / counts). Saved and loaded in llama.cpp's
imatrix GGUF format (`NAME.in_sum2` (ncols x 1) and `NAME.counts` (1 x 1) F32 tensors, `imatrix.datasets`,
`imatrix.chunk_count`, `imatrix.chunk_size`), and read from its legacy `.dat` format. Names are GGUF tensor
names (`blk.0.attn_q.weight`), so one file serves slimlm and llama-quantize alike.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from ..errors import InvalidModelError

SUM_SUFFIX, COUNT_SUFFIX = ".in_sum2", ".counts"


@dataclass
class ImportanceMatrix:
    sums: dict[str, np.ndarray] = field(default_factory=dict)   # name -> sum of x^2 per column (float64)
    counts: dict[str, int] = field(default_factory=dict)        # name -> activation rows seen
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    source: str = ""            # the file it was loaded from ("" when computed in this process)

    def add(self, name: str, x2_sum: np.ndarray, rows: int) -> None:
        if name in self.sums:
            self.sums[name] += x2_sum
            self.counts[name] += rows
        else:
            self.sums[name] = np.asarray(x2_sum, dtype=np.float64).copy()
            self.counts[name] = rows

    def importance(self, name: str) -> np.ndarray | None:
        """Mean squared activation per input column (float32), or None when the tensor was not seen."""
        if name not in self.sums:
            return None
        c = self.counts[name]
        if c <= 0:
            return np.ones_like(self.sums[name], dtype=np.float32)
        return (self.sums[name] / c).astype(np.float32)

    def scaled(self, scales: dict) -> ImportanceMatrix:
        """A copy for weights whose input columns were multiplied by `scales[name]` (AWQ): their inputs are
        divided by the scales, so the mean squares are divided by s^2."""
        out = ImportanceMatrix({k: v.copy() for k, v in self.sums.items()}, dict(self.counts),
                               list(self.datasets), self.chunk_count, self.chunk_size, self.source)
        for name, s in scales.items():
            if name in out.sums:
                out.sums[name] = out.sums[name] / np.asarray(s, dtype=np.float64) ** 2
        return out

    def digest(self) -> str:
        """A short hash of the values (for cache keys)."""
        import hashlib
        h = hashlib.sha256()
        for n in sorted(self.sums):
            h.update(n.encode())
            h.update(self.sums[n].tobytes())
            h.update(str(self.counts[n]).encode())
        return h.hexdigest()[:16]

    # ---- llama.cpp's GGUF format ----------------------------------------------------------------------
    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        from ..io import atomic_output
        with atomic_output(path, overwrite=overwrite) as tmp:
            w = gguf.GGUFWriter(tmp, "imatrix")
            w.add_type("imatrix")
            w.add_array("imatrix.datasets", self.datasets or ["(unknown)"])
            w.add_uint32("imatrix.chunk_count", self.chunk_count)
            w.add_uint32("imatrix.chunk_size", self.chunk_size)
            for name in sorted(self.sums):
                w.add_tensor(name + SUM_SUFFIX, self.sums[name].astype(np.float32).reshape(1, -1))
                w.add_tensor(name + COUNT_SUFFIX, np.array([[self.counts[name]]], dtype=np.float32))
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> ImportanceMatrix:
        p = Path(path)
        if not p.is_file():
            raise InvalidModelError(f"{p}: importance matrix file not found")
        with open(p, "rb") as f:
            magic = f.read(4)
        im = cls._load_gguf(p) if magic == b"GGUF" else cls._load_legacy(p)
        im.source = str(p)
        return im

    @classmethod
    def _load_gguf(cls, p: Path) -> ImportanceMatrix:
        from ..gguf.reader import read_gguf
        g = read_gguf(p)
        count, size = _int_key(g, p, "imatrix.chunk_count", True), _int_key(g, p, "imatrix.chunk_size", False)
        datasets = g.fields.get("imatrix.datasets")
        if datasets is not None and datasets.item_type != gguf.GGUFValueType.STRING:
            raise InvalidModelError(f"{p}: imatrix.datasets must be an array of strings, found "
                                    f"{datasets.type.name}")
        im = cls(datasets=list(datasets.value) if datasets else [], chunk_count=count, chunk_size=size or 0)
        by_name = {t.name: t for t in g.tensors}
        for tname, t in by_name.items():
            if not tname.endswith(SUM_SUFFIX):
                continue
            name = tname[: -len(SUM_SUFFIX)]
            c = by_name.get(name + COUNT_SUFFIX)
            if c is None or t.ggml_type != gguf.GGMLQuantizationType.F32 or c.ggml_type != t.ggml_type:
                raise InvalidModelError(f"{p}: {name} needs F32 {SUM_SUFFIX} and {COUNT_SUFFIX} tensors")
            counts = np.asarray(g.raw(c)).view(np.float32)
            if counts.size != 1 or t.n_elements != t.shape[-1]:
                raise InvalidModelError(f"{p}: {name} has {counts.size} counts for {SUM_SUFFIX} of shape "
                                        f"{list(t.shape)}; MoE (per-expert) imatrix files are not supported")
            im.sums[name] = _checked(p, tname, np.asarray(g.raw(t)).view(np.float32).astype(np.float64))
            im.counts[name] = round(float(_checked(p, name + COUNT_SUFFIX, counts.astype(np.float64))[0]))
        return im

    @classmethod
    def _load_legacy(cls, p: Path) -> ImportanceMatrix:
        """llama.cpp's old `.dat`: n, then per entry (len, name, ncall, nval, nval floats of mean*ncall)."""
        data = p.read_bytes()
        pos = 0

        def take(fmt: str, what: str):
            nonlocal pos
            n = struct.calcsize(fmt)
            if pos + n > len(data):
                raise InvalidModelError(f"{p}: truncated legacy imatrix while reading {what} at byte {pos}")
            v = struct.unpack_from(fmt, data, pos)
            pos += n
            return v

        (n_entries,) = take("<i", "entry count")
        if not 1 <= n_entries <= len(data) // 12:
            raise InvalidModelError(f"{p}: legacy imatrix claims {n_entries} entries")
        im = cls()
        for i in range(n_entries):
            (ln,) = take("<i", f"name length of entry {i}")
            if not 0 < ln <= 4096:
                raise InvalidModelError(f"{p}: entry {i} name length {ln} is invalid")
            raw = take(f"<{ln}s", f"name of entry {i}")[0]
            try:
                name = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidModelError(f"{p}: entry {i} name {raw[:80]!r} is not UTF-8") from None
            if name in im.sums:
                raise InvalidModelError(f"{p}: entry {name!r} appears twice")
            ncall, nval = take("<ii", f"sizes of {name}")
            if nval < 1 or pos + 4 * nval > len(data):
                raise InvalidModelError(f"{p}: entry {name} claims {nval} values beyond the file")
            vals = _checked(p, name, np.frombuffer(data, dtype="<f4", count=nval, offset=pos).astype(np.float64))
            pos += 4 * nval
            # legacy sums hold mean * ncall; keep importance = sums / counts identical
            im.sums[name], im.counts[name] = vals, max(ncall, 0)
            if ncall <= 0:
                im.sums[name], im.counts[name] = np.ones(nval), 1
        if pos + 4 <= len(data):
            (im.chunk_count,) = take("<i", "chunk count")
        return im


def _int_key(g, p: Path, key: str, required: bool) -> int | None:
    f = g.fields.get(key)
    if f is None:
        if required:
            raise InvalidModelError(f"{p}: not an imatrix file (no {key})")
        return None
    if f.type not in _INT_TYPES or f.value < 0:
        raise InvalidModelError(f"{p}: {key} must be a non-negative integer, found {f.type.name} {f.value!r}")
    return int(f.value)


_INT_TYPES = {gguf.GGUFValueType[n] for n in ("UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "UINT64",
                                              "INT64")}


def _checked(p: Path, name: str, v: np.ndarray) -> np.ndarray:
    """Sums of squares and counts are finite and non-negative; anything else would steer the quantizers."""
    bad = np.flatnonzero(~np.isfinite(v) | (v < 0))
    if bad.size:
        raise InvalidModelError(f"{p}: {name} value {bad[0]} is {v[bad[0]]} (expected a finite number >= 0)")
    return v
