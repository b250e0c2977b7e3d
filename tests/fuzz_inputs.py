"""Fuzz inputs and the case runner shared by tests/test_fuzz.py (CI) and bench/fuzz.py (long campaign).

Each input kind is a hypothesis strategy and a target that loads what the strategy made. A case ends as
"accepted" (it loaded; for inputs valid by construction, with the values that were written), "refused" (a
SlimlmError), "crash" (any other exception: a library traceback, or a wrong result) or "hang" (over 2 s).
The runner measures time and the tracemalloc peak of every case: an allocation driven by a crafted count
shows as a peak far above the size of the input.
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import struct
import tempfile
import time
import traceback
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import fuzz_gguf as fg
import fuzz_hf as fh
import numpy as np
from fuzz_gguf import KV, GSpec, Tensor, V
from hypothesis import strategies as st

from slimlm.arch import ARCHS, GGUF_ARCHS
from slimlm.errors import SlimlmError

HANG_S = 2.0


# ---- model GGUF: hyper-parameters and tensors that must agree ---------------------------------------------
def tiny_model_spec(arch: str = "llama", *, tied: bool = False, head_dim: int | None = None) -> GSpec:
    spec = ARCHS[GGUF_ARCHS[arch]]
    nh, hd = (1, 8) if arch == "qwen3" else (2, 4)
    hd = head_dim or hd
    cfg = {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": nh,
           "num_key_value_heads": 1, "vocab_size": len(fh.TOKENS), "tie_word_embeddings": tied, "head_dim": hd}
    kvs = [KV("general.architecture", V.STRING, arch), KV("general.name", V.STRING, "tiny"),
           KV("general.file_type", V.UINT32, 0)]
    u32 = {"context_length": 64, "embedding_length": 8, "block_count": 1, "feed_forward_length": 16,
           "attention.head_count": nh, "attention.head_count_kv": 1, "rope.dimension_count": hd}
    if arch == "qwen3":
        u32.update({"attention.key_length": hd, "attention.value_length": hd})
    kvs += [KV(f"{arch}.{k}", V.UINT32, v) for k, v in u32.items()]
    kvs += [KV(f"{arch}.attention.layer_norm_rms_epsilon", V.FLOAT32, 1e-5),
            KV(f"{arch}.rope.freq_base", V.FLOAT32, 10000.0),
            KV("tokenizer.ggml.model", V.STRING, "gpt2"), KV("tokenizer.ggml.pre", V.STRING, "default"),
            KV("tokenizer.ggml.tokens", V.ARRAY, (V.STRING, list(fh.TOKENS))),
            KV("tokenizer.ggml.token_type", V.ARRAY, (V.INT32, [1] * 14 + [3, 3])),
            KV("tokenizer.ggml.merges", V.ARRAY, (V.STRING, ["a b"])),
            KV("tokenizer.ggml.bos_token_id", V.UINT32, 14), KV("tokenizer.ggml.eos_token_id", V.UINT32, 15)]
    rng, tensors = np.random.default_rng(0), []
    for hf_name, shape in spec.expected_shapes(cfg).items():
        a = (rng.standard_normal(shape) * 0.1).astype("<f4")
        if len(shape) == 1:
            a[:] = 1
        tensors.append(Tensor(spec.hf_to_gguf(hf_name), list(reversed(shape)), 0, a.tobytes()))
    return GSpec(kvs, tensors)


@st.composite
def model_gguf_case(draw, plausible: bool = False) -> tuple[bytes, bool]:
    """(file bytes, valid by construction): a tiny llama/qwen2/qwen3 GGUF with 0-2 disagreements between
    hyper-parameters, tensors and tokenizer arrays (`plausible`: only values and types, for full loads)."""
    spec = tiny_model_spec(draw(st.sampled_from(["llama", "llama", "qwen2", "qwen3"])), tied=draw(st.booleans()))
    n = draw(st.integers(0, 2))
    for _ in range(n):
        ops = ["value", "value", "type", "drop_kv"] + ([] if plausible else ["add_kv", "shape", "drop_t",
                                                                            "add_t", "ttype", "tokens"])
        op = draw(st.sampled_from(ops))
        kv = draw(st.sampled_from(spec.kvs))
        if op == "value" and kv.vtype != V.STRING:
            if kv.vtype == V.ARRAY:
                it, items = kv.value
                same = st.sampled_from(items) if items else fg.scalar_value(it)
                kv.value = (it, draw(st.lists(same | fg.scalar_value(it), max_size=20)))
            else:
                kv.value = draw(st.sampled_from([0, 1, 2, 3, 7, 8, 16, 128, 255, 2**31]) if kv.vtype == V.UINT32
                                else st.sampled_from([0.0, -1.0, 1e-30, float("nan"), float("inf"), 1e6])
                                if kv.vtype == V.FLOAT32 else fg.scalar_value(kv.vtype))
        elif op == "value":
            kv.value = draw(st.sampled_from(["llama", "qwen2", "qwen3", "deci", "gpt2", "mistral", "", "x"]))
        elif op == "type":
            kv.vtype = draw(st.sampled_from(fg.SCALAR_TYPES))
            kv.value = draw(fg.scalar_value(kv.vtype))
        elif op == "drop_kv":
            spec.kvs.remove(kv)
        elif op == "add_kv":
            key = draw(st.sampled_from(["llama.vocab_size", "qwen2.vocab_size", "llama.attention.key_length",
                                        "tokenizer.ggml.scores", "tokenizer.ggml.unknown_token_id",
                                        "tokenizer.ggml.add_bos_token", "tokenizer.chat_template",
                                        "llama.attention.head_count_kv"]))
            vt = draw(st.sampled_from(list(V)))
            spec.kvs = [k for k in spec.kvs if k.key != key] + [KV(key, vt, draw(fg.kv_value(vt)))]
        elif op == "shape":
            t = draw(st.sampled_from(spec.tensors))
            t.ne = draw(st.lists(st.sampled_from([1, 2, 4, 8, 16, 32, 128]), min_size=1, max_size=3))
            t.data = bytes(fg.tensor_nbytes(t.ne, t.ttype))
        elif op == "drop_t":
            spec.tensors.remove(draw(st.sampled_from(spec.tensors)))
        elif op == "add_t":
            name = draw(st.sampled_from(["blk.1.attn_q.weight", "output.weight", "rope_freqs.weight", "x",
                                         "blk.0.attn_q.bias", "blk.99999.ffn_up.weight"]))
            spec.tensors = [t for t in spec.tensors if t.name != name] + [Tensor(name, [8, 8], 0, bytes(256))]
        elif op == "ttype":
            t = draw(st.sampled_from(spec.tensors))
            t.ttype = int(draw(st.sampled_from([1, 30, 24, 26, 8])))  # F16, BF16, I8, I32, Q8_0
            t.data = bytes(fg.tensor_nbytes(t.ne, t.ttype)) if t.ne[0] % 32 == 0 or t.ttype != 8 else t.data
        elif op == "tokens":
            kv = next((k for k in spec.kvs if k.key == "tokenizer.ggml.tokens"), None)
            if kv is None:
                kv = KV("tokenizer.ggml.tokens", V.ARRAY, None)
                spec.kvs.append(kv)
            kv.vtype, kv.value = V.ARRAY, (V.STRING, draw(st.sampled_from([[], fh.TOKENS[:8], fh.TOKENS + ["q"], ["a"] * 16,
                                                        fh.TOKENS[:13] + ["x", "<s>", "</s>"]])))
    return fg.serialize(spec)[0], n == 0


# ---- importance matrices --------------------------------------------------------------------------------
IM_NAMES = ["blk.0.attn_q.weight", "blk.0.ffn_down.weight"]


def imatrix_spec() -> GSpec:
    kvs = [KV("general.type", V.STRING, "imatrix"), KV("imatrix.datasets", V.ARRAY, (V.STRING, ["calib.txt"])),
           KV("imatrix.chunk_count", V.UINT32, 3), KV("imatrix.chunk_size", V.UINT32, 512)]
    tensors = []
    for i, n in enumerate(IM_NAMES):
        tensors.append(Tensor(n + ".in_sum2", [8, 1], 0, np.arange(8, dtype="<f4").tobytes()))
        tensors.append(Tensor(n + ".counts", [1, 1], 0, np.array([100 + i], dtype="<f4").tobytes()))
    return GSpec(kvs, tensors)


@st.composite
def imatrix_gguf_case(draw) -> tuple[bytes, bool]:
    spec = imatrix_spec()
    op = draw(st.sampled_from(["valid", "kv", "kv", "tensor", "values", "mutate"]))
    if op == "mutate":
        return draw(fg.mutated([fg.serialize(spec)[0]], head=400)), False
    if op == "kv":
        kv = draw(st.sampled_from(spec.kvs))
        kv.vtype = draw(st.sampled_from(list(V)))
        kv.value = draw(fg.kv_value(kv.vtype))
    elif op == "tensor":
        t = draw(st.sampled_from(spec.tensors))
        t.ne = draw(st.lists(st.sampled_from([1, 2, 8]), min_size=1, max_size=3))
        t.ttype = int(draw(st.sampled_from([0, 0, 1])))
        t.data = bytes(fg.tensor_nbytes(t.ne, t.ttype))
        if draw(st.booleans()):
            spec.tensors.remove(t)
    elif op == "values":
        t = draw(st.sampled_from(spec.tensors))
        vals = draw(st.lists(st.floats(width=32), min_size=len(t.data) // 4, max_size=len(t.data) // 4))
        t.data = np.array(vals, dtype="<f4").tobytes()
    return fg.serialize(spec)[0], op == "valid"


def legacy_imatrix(entries: list[tuple[bytes, int, list[float]]], chunks: int | None = 3
                   ) -> tuple[bytes, list[fg.Slot]]:
    """llama.cpp's legacy .dat: n, then per entry (len, name, ncall, nval, values); the chunk count."""
    out, slots = bytearray(), [fg.Slot(0, "<i", "entry count")]
    out += struct.pack("<i", len(entries))
    for i, (name, ncall, vals) in enumerate(entries):
        slots.append(fg.Slot(len(out), "<i", f"entry {i} name length"))
        out += struct.pack("<i", len(name)) + name
        slots += [fg.Slot(len(out), "<i", f"entry {i} ncall"), fg.Slot(len(out) + 4, "<i", f"entry {i} nval")]
        out += struct.pack("<ii", ncall, len(vals)) + struct.pack(f"<{len(vals)}f", *vals)
    if chunks is not None:
        out += struct.pack("<i", chunks)
    return bytes(out), slots


@st.composite
def imatrix_dat_case(draw) -> tuple[bytes, list | None]:
    """(bytes, entries if valid by construction): entries, then slot overwrites or byte mutations."""
    names = draw(st.lists(st.sampled_from(IM_NAMES + ["output.weight", "x"]), min_size=1, max_size=3, unique=True))
    entries = [(n.encode(), draw(st.integers(1, 1000)),
                draw(st.lists(st.floats(0, 1e6, width=32), min_size=1, max_size=8))) for n in names]
    data, slots = legacy_imatrix(entries, draw(st.sampled_from([3, None])))
    op = draw(st.sampled_from(["valid", "slot", "slot", "mutate", "values", "dup"]))
    if op == "valid":
        return data, entries
    if op == "slot":
        buf = bytearray(data)
        s = draw(st.sampled_from(slots))
        struct.pack_into("<i", buf, s.offset, draw(fg.interesting("<i", struct.unpack_from("<i", buf, s.offset)[0],
                                                                  len(buf))))
        return bytes(buf), None
    if op == "values":
        entries[0] = (entries[0][0], entries[0][1], draw(st.lists(st.floats(width=32), min_size=1, max_size=4)))
        return legacy_imatrix(entries)[0], None
    if op == "dup":
        return legacy_imatrix(entries + entries[:1])[0], None
    return draw(fg.mutated([data], head=len(data))), None


# ---- the runner ---------------------------------------------------------------------------------------------
@dataclass
class Result:
    kind: str
    status: str            # accepted | refused | crash | hang
    seconds: float
    peak_bytes: int        # tracemalloc peak of the allocations made during the case (0 when not tracing)
    detail: str = ""


class Runner:
    """Runs cases in a scratch folder, one fresh sub-folder per case; tracemalloc when `trace_memory`."""

    def __init__(self, workdir: str | os.PathLike | None = None, *, trace_memory: bool = True):
        self.base = Path(workdir or tempfile.mkdtemp(prefix="slimlm-fuzz-"))
        self.trace = trace_memory
        self.n = 0

    def folder(self) -> Path:
        self.n += 1
        d = self.base / f"c{self.n}"
        d.mkdir(parents=True)
        return d

    def run(self, kind: str, target, case, *, trace: bool = True) -> Result:
        d = self.folder()
        trace = trace and self.trace
        if trace:  # traced during the target only: the generator's own allocations do not count
            tracemalloc.start()
        t0 = time.perf_counter()
        status, detail = "accepted", ""
        try:
            target(case, d)
        except SlimlmError as e:
            status, detail = "refused", str(e)
        except Exception as e:  # noqa: BLE001 -- the point: anything else is a crash
            status, detail = "crash", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
        dt = time.perf_counter() - t0
        peak = 0
        if trace:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        if dt > HANG_S and status != "crash":
            status, detail = "hang", f"{dt:.2f} s; {detail}"
        if status in ("crash", "hang"):
            detail = f"case {repr(case)[:400]}\n{detail}"
        shutil.rmtree(d, ignore_errors=True)
        return Result(kind, status, dt, peak, detail)


def write_files(d: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (d / name).write_bytes(data)
    return d


def write_file(d: Path, name: str, data: bytes) -> Path:
    p = d / name
    p.write_bytes(data)
    return p


@contextlib.contextmanager
def quiet():
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        yield out, err


@contextlib.contextmanager
def quiet_fds():
    """Also silence file descriptors 1 and 2: the tokenizers library (Rust) prints warnings about odd
    tokenizer files straight to them, past Python's sys.stdout."""
    import sys
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        with quiet() as streams:
            yield streams
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved + [null]:
            os.close(fd)


@contextlib.contextmanager
def chdir(d: Path):
    """contextlib.chdir (Python 3.11+) for 3.10."""
    old = os.getcwd()
    os.chdir(d)
    try:
        yield
    finally:
        os.chdir(old)
