"""The strict GGUF parser against crafted bad files (RELIABILITY.md items 11-19)."""
from __future__ import annotations

import struct
import time

import pytest
from helpers import build_gguf, gstr, kv_str, kv_u32, tensor_info, valid_gguf_bytes

from slimlm.errors import InvalidGGUFError
from slimlm.gguf.reader import read_gguf

ARCH = kv_str("general.architecture", "llama")
F32_2x32 = struct.pack("<64f", *range(64))


def _write(tmp_path, data: bytes, name="x.gguf"):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_valid_file_parses_with_zero_size_tensor(tmp_path):
    g = read_gguf(_write(tmp_path, valid_gguf_bytes()))
    assert [t.name for t in g.tensors] == ["a.weight", "empty"]
    assert g.tensors[0].shape == (2, 32) and g.tensors[1].nbytes == 0
    assert list(g.raw(g.tensors[0]).view("<f4")[:3]) == [0.0, 1.0, 2.0]
    assert g.get("general.alignment") == 32


BAD = {
    "empty file": b"",
    "bad magic": b"GGUX" + bytes(40),
    "version 0": b"GGUF" + struct.pack("<IQQ", 0, 0, 0),
    "version 1": b"GGUF" + struct.pack("<IQQ", 1, 0, 0),
    "version 4": b"GGUF" + struct.pack("<IQQ", 4, 0, 0),
    "big-endian": b"GGUF" + struct.pack(">IQQ", 3, 0, 0),
    "2^63 tensors": b"GGUF" + struct.pack("<IQQ", 3, 2**63, 0) + bytes(19),
    "2^63 kvs": b"GGUF" + struct.pack("<IQQ", 3, 0, 2**63) + bytes(19),
    "string length beyond file": build_gguf([gstr("k") + struct.pack("<I", 8) + struct.pack("<Q", 2**62)], [], b""),
    "key length beyond file": b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 2**40) + bytes(8),
    "array length beyond file": build_gguf([gstr("k") + struct.pack("<IIQ", 9, 4, 2**60)], [], b""),
    "empty key": build_gguf([kv_u32("", 1)], [], b""),
    "duplicate key": build_gguf([kv_u32("a", 1), kv_u32("a", 2)], [], b""),
    "invalid value type": build_gguf([gstr("a") + struct.pack("<II", 99, 0)], [], b""),
    "nested array": build_gguf([gstr("a") + struct.pack("<IIQ", 9, 9, 1) + struct.pack("<IQ", 4, 0)], [], b""),
    "non-utf8 key": build_gguf([gstr(b"\xff\xfe") + struct.pack("<II", 4, 1)], [], b""),
    "alignment 0": build_gguf([ARCH, kv_u32("general.alignment", 0)], [], b""),
    "alignment not power of two": build_gguf([ARCH, kv_u32("general.alignment", 24)], [], b""),
    "alignment huge": build_gguf([ARCH, kv_u32("general.alignment", 1 << 30)], [], b""),
    "tensor name 64 bytes": build_gguf([ARCH], [tensor_info("n" * 64, [32], 0, 0)], bytes(128)),
    "duplicate tensor": build_gguf([ARCH], [tensor_info("a", [32], 0, 0), tensor_info("a", [32], 0, 128)],
                                   bytes(256)),
    "n_dims 5": build_gguf([ARCH], [tensor_info("a", [1, 1, 1, 1, 32], 0, 0)], bytes(128)),
    "n_dims 0": build_gguf([ARCH], [tensor_info("a", [], 0, 0)], bytes(128)),
    "negative dim": build_gguf([ARCH], [tensor_info("a", [32, -1], 0, 0)], bytes(128)),
    "overflowing dims": build_gguf([ARCH], [tensor_info("a", [2**31, 2**31, 2**31], 0, 0)], bytes(128)),
    "unknown type": build_gguf([ARCH], [tensor_info("a", [32], 77, 0)], bytes(128)),
    "row not multiple of block": build_gguf([ARCH], [tensor_info("a", [33, 2], 8, 0)], bytes(128)),
    "overlapping tensors": build_gguf([ARCH], [tensor_info("a", [32, 2], 0, 0), tensor_info("b", [32], 0, 128)],
                                      F32_2x32 + bytes(128)),
    "gap between tensors": build_gguf([ARCH], [tensor_info("a", [32], 0, 0), tensor_info("b", [32], 0, 256)],
                                      bytes(512)),
    "offset past end": build_gguf([ARCH], [tensor_info("a", [32], 0, 2**40)], bytes(128)),
    "wrapping offset": build_gguf([ARCH], [tensor_info("a", [32], 0, 2**64 - 64)], bytes(128)),
    "truncated data": build_gguf([ARCH], [tensor_info("a", [32, 2], 0, 0)], F32_2x32[:100]),
    "bool value 2": build_gguf([gstr("b") + struct.pack("<IB", 7, 2)], [], b""),
    "bool value 255": build_gguf([gstr("b") + struct.pack("<IB", 7, 255)], [], b""),
    "bool array item 2": build_gguf([gstr("b") + struct.pack("<IIQ", 9, 7, 3) + bytes([0, 1, 2])], [], b""),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_gguf_is_rejected_quickly(tmp_path, case):
    p = _write(tmp_path, BAD[case])
    t0 = time.perf_counter()
    with pytest.raises(InvalidGGUFError) as e:
        read_gguf(p)
    assert time.perf_counter() - t0 < 2.0
    assert str(p) in str(e.value)


def test_bool_values_0_and_1_parse_as_bools(tmp_path):
    kvs = [gstr("t") + struct.pack("<IB", 7, 1), gstr("f") + struct.pack("<IB", 7, 0),
           gstr("a") + struct.pack("<IIQ", 9, 7, 3) + bytes([1, 0, 1])]
    g = read_gguf(_write(tmp_path, build_gguf(kvs, [], b"")))
    assert g.get("t") is True and g.get("f") is False
    assert g.get("a").dtype == bool and g.get("a").tolist() == [True, False, True]


def test_bool_error_names_key_value_and_offset(tmp_path):
    p = _write(tmp_path, BAD["bool array item 2"])
    with pytest.raises(InvalidGGUFError, match=r"array 'b' item 2 is a BOOL of value 2 \(expected 0 or 1\).*byte offset"):
        read_gguf(p)


def test_every_truncation_of_a_valid_file_is_a_clean_error(tmp_path):
    data = valid_gguf_bytes()
    for n in range(len(data)):
        p = _write(tmp_path, data[:n], f"t{n}.gguf")
        with pytest.raises(InvalidGGUFError):
            read_gguf(p)
        p.unlink()


def test_error_names_field_and_offset(tmp_path):
    p = _write(tmp_path, BAD["array length beyond file"])
    with pytest.raises(InvalidGGUFError, match=r"array 'k' claims .* items .*byte offset"):
        read_gguf(p)
