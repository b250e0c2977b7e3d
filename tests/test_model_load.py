"""Loading a GGUF through transformers parses it once, on a plain-array view (slimlm.model.gguf_parsed_once)."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

import slimlm
from slimlm.model import _array_gguf_reader, gguf_parsed_once


@pytest.fixture(scope="module")
def tiny_gguf(tiny_hf, tmp_path_factory):
    m = slimlm.load(tiny_hf("LlamaForCausalLM", num_hidden_layers=2), progress=False)
    out = tmp_path_factory.mktemp("load") / "m.gguf"
    slimlm.export_gguf(m, out, "F32", progress=False)
    return out


def test_the_array_reader_parses_the_same_fields_and_tensors_as_gguf_pys(tiny_gguf):
    out = tiny_gguf
    stock, fast = gguf.GGUFReader(out), _array_gguf_reader()(out)
    assert list(stock.fields) == list(fast.fields) and "tokenizer.ggml.tokens" in fast.fields
    assert len(fast.fields["tokenizer.ggml.tokens"].data) > 1000
    for name, a in stock.fields.items():
        b = fast.fields[name]
        assert (a.offset, a.data, a.types, len(a.parts)) == (b.offset, b.data, b.types, len(b.parts)), name
        assert all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(a.parts, b.parts, strict=True)), name
    assert [(t.name, t.tensor_type, list(t.shape)) for t in stock.tensors] == \
        [(t.name, t.tensor_type, list(t.shape)) for t in fast.tensors]
    assert all(np.array_equal(a.data, b.data) for a, b in zip(stock.tensors, fast.tensors, strict=True))
    assert type(fast.data) is np.ndarray and type(stock.data) is np.memmap


def test_load_parses_the_file_once_and_gives_what_transformers_alone_gives(tiny_gguf, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = tiny_gguf
    stock_reader, stock_map = gguf.GGUFReader, gguf.get_tensor_name_map
    inits = []
    cls = _array_gguf_reader()
    stock_init = cls.__init__
    monkeypatch.setattr(cls, "__init__", lambda self, *a, **k: (inits.append(a), stock_init(self, *a, **k))[1])
    m = slimlm.load(out, progress=False)
    assert len(inits) == 1                                    # tokenizer, config and weights: one parse
    assert gguf.GGUFReader is stock_reader and gguf.get_tensor_name_map is stock_map   # restored after
    # the same tokenizer and weights as transformers' own loading, without slimlm's block
    tok = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    ref = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32)
    assert tok.get_vocab() == m.tokenizer.get_vocab()
    got, want = m.module.state_dict(), ref.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert len(inits) == 1


def test_other_files_in_the_block_are_read_by_gguf_pys_own_reader(tiny_gguf, tmp_path):
    out = tiny_gguf
    other = tmp_path / "copy.gguf"
    other.write_bytes(out.read_bytes())
    with gguf_parsed_once(out):
        a, b = gguf.GGUFReader(out), gguf.GGUFReader(out)
        c = gguf.GGUFReader(other)
        assert a is b and type(a.data) is np.ndarray
        assert c is not a and type(c.data) is np.memmap
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
