"""Test helpers: tiny random HF models, and a raw GGUF byte builder for crafting bad files."""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import torch

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)
ARCH_EXTRA = {
    "LlamaForCausalLM": dict(model_type="llama", rope_theta=10000.0),
    "MistralForCausalLM": dict(model_type="mistral", rope_theta=10000.0, sliding_window=None),
    "Qwen2ForCausalLM": dict(model_type="qwen2", rope_theta=10000.0),
    "Qwen3ForCausalLM": dict(model_type="qwen3", rope_theta=10000.0, head_dim=32),
    # sliding-window layers every other one (window 8: shorter than the tests' texts), their own rope base;
    # head_dim != hidden / heads; llama.cpp's attention scale needs query_pre_attn_scalar = head_dim
    "Gemma3ForCausalLM": dict(model_type="gemma3_text", head_dim=32, query_pre_attn_scalar=32, sliding_window=8,
                              sliding_window_pattern=2, hidden_activation="gelu_pytorch_tanh",
                              rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                               "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
    # Gemma 2: tied only (llama.cpp has no output tensor); soft-caps low enough to bite in a tiny random model
    "Gemma2ForCausalLM": dict(model_type="gemma2", head_dim=32, query_pre_attn_scalar=32, sliding_window=8,
                              hidden_activation="gelu_pytorch_tanh", attn_logit_softcapping=3.0,
                              final_logit_softcapping=2.0, tie_word_embeddings=True,
                              rope_parameters={"rope_type": "default", "rope_theta": 1e4}),
    # Phi3Config's default pad id (32000) is beyond a tiny vocabulary
    "Phi3ForCausalLM": dict(model_type="phi3", rope_theta=10000.0, sliding_window=None, pad_token_id=None),
    # 8 experts, 2 per token, expert width 32 (the MLP width of a dense model of this size would be 96)
    "Qwen3MoeForCausalLM": dict(model_type="qwen3_moe", rope_theta=10000.0, head_dim=16, num_experts=8,
                                num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True),
}


def tiny_config(arch: str, vocab_size: int, *, tie: bool = False, **dims) -> dict:
    cfg = dict(TINY, architectures=[arch], vocab_size=vocab_size, tie_word_embeddings=tie,
               bos_token_id=1, eos_token_id=2)
    cfg.update(ARCH_EXTRA[arch])
    cfg.update(dims)
    return cfg


def save_tiny_hf(d: Path, arch: str, tokenizer_dir: Path, *, tie: bool = False, seed: int = 0, **dims) -> Path:
    """A tiny random model of `arch` with the given tokenizer files, saved as safetensors."""
    from transformers import AutoConfig, AutoModelForCausalLM
    vocab = json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"]
    n_vocab = dims.pop("vocab_size", max(vocab.values()) + 1)       # more rows for added tokens
    cfg_dict = tiny_config(arch, n_vocab, tie=tie, **dims)
    cfg = AutoConfig.for_model(cfg_dict["model_type"], **{k: v for k, v in cfg_dict.items() if k != "model_type"})
    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim == 1:  # norms: around 1, not exactly 1, so that a wrong mapping shows
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.05)
    d.mkdir(parents=True, exist_ok=True)
    m.save_pretrained(d)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, d / f.name)
    return d


def word_texts(n_train: int = 260, n_eval: int = 40, seed: int = 0) -> tuple[str, str]:
    """Training and evaluation text: disjoint random sentences over the same 120 words (what a student learns on
    one shows on the other)."""
    import random
    rng = random.Random(seed)
    words = [f"{a}{b}" for a in ("the", "cat", "sun", "run", "blue", "stone", "light", "river", "green", "old",
                                 "town", "read") for b in ("", "s", "ed", "ing", "er", "ly", "ness", "ful", "ish",
                                                            "y")]

    def sentences(n: int) -> str:
        return " ".join(" ".join(rng.choice(words) for _ in range(rng.randint(5, 12))).capitalize() + "."
                        for _ in range(n))
    return sentences(n_train), sentences(n_eval)


# ---- raw GGUF builder ---------------------------------------------------------------------------------
def gstr(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def kv_u32(key: str, v: int) -> bytes:
    return gstr(key) + struct.pack("<II", 4, v)


def kv_str(key: str, v: str) -> bytes:
    return gstr(key) + struct.pack("<I", 8) + gstr(v)


def tensor_info(name: str, ne: list[int], ttype: int, offset: int) -> bytes:
    return gstr(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<q", x) for x in ne) + \
        struct.pack("<IQ", ttype, offset)


def build_gguf(kvs: list[bytes], infos: list[bytes], data: bytes, *, version: int = 3,
               n_tensors: int | None = None, n_kv: int | None = None, align: int = 32) -> bytes:
    head = b"GGUF" + struct.pack("<IQQ", version, len(infos) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(infos)
    pad = (-len(body)) % align
    return body + b"\0" * pad + data


def valid_gguf_bytes() -> bytes:
    """A small valid GGUF: one F32 (2x32) tensor and one zero-size tensor."""
    data = struct.pack("<64f", *[float(i) for i in range(64)])
    infos = [tensor_info("a.weight", [32, 2], 0, 0), tensor_info("empty", [0], 0, 256)]
    return build_gguf([kv_str("general.architecture", "llama"), kv_u32("general.alignment", 32)], infos, data)


SAMPLE_TOKENS = [1, 504, 3120, 28, 905, 2384, 30, 17, 260, 11, 314, 1543, 4327, 5, 9, 42]


def llama_cpp_logits(path, tokens, n_ctx: int = 64):
    """The logits llama.cpp computes for `tokens` with the GGUF at `path` (the runner closed after)."""
    from slimlm.eval.runtime import LlamaCppRunner
    r = LlamaCppRunner(path, n_ctx)
    try:
        return r.logits(tokens)
    finally:
        r.close()


def kill_at_checkpoint(args: list[str], ck: Path, step: int, timeout: float = 240.0) -> None:
    """Run `python -m slimlm -q ARGS` with one thread (as the test process), SIGKILL it once the healing
    checkpoint `ck` is at `step` or later, and wait for it; fails if it ended first."""
    import os
    import signal
    import subprocess
    import sys
    import time
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "slimlm", "-q", *args], env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    t0 = time.time()
    while time.time() - t0 < timeout and p.poll() is None:
        if ck.exists():
            try:
                if json.loads(torch.load(ck, weights_only=True)["meta"])["state"]["step"] >= step:
                    break
            except Exception:                                # being replaced
                pass
        time.sleep(0.05)
    assert p.poll() is None, p.stderr.read().decode()[-2000:]
    p.send_signal(signal.SIGKILL)
    p.wait()


def kl_of_logits(ref_logits, logits) -> float:
    """Mean KL divergence KL(ref || model) over the rows of two logit tensors (float64)."""
    import torch
    p = torch.log_softmax(ref_logits.double(), -1)
    q = torch.log_softmax(logits.double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())
