"""Model-family knowledge lives in `slimlm/arch/` only (issue 14, acceptance b): the rest of the package reaches
a layer's parts through `slimlm.arch` (roles: q, k, v, o, gate, up, down, norms) and never names a family's module
paths or the family itself. The check reads the code (names, attributes, strings; not comments or docstrings)."""
from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import torch
from helpers import save_tiny_hf, word_texts

import slimlm
from slimlm import arch
from slimlm.cli import main
from slimlm.gguf.vocab import _is_spm

PACKAGE = Path(slimlm.__file__).parent

# transformers module names of the supported families' layers and models
MODULE_NAMES = {"self_attn", "mlp", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                "qkv_proj", "gate_up_proj", "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                "post_feedforward_layernorm", "embed_tokens", "lm_head", "q_norm", "k_norm", "act_fn"}
# in strings: every name but "mlp", which is also slimlm's word for the MLP role and pruning method
PATH_RE = re.compile(r"(?<![\w])(?:model\.layers|model\.norm|" + "|".join(sorted(MODULE_NAMES - {"mlp"})) +
                     r")(?![\w])")
FAMILY_RE = re.compile(r"(?<![\w-])(?:llama[0-9]?|mistral|mixtral|qwen[0-9]*(?:_moe)?|gemma[0-9]*|phi[0-9]*|deci)"
                       r"(?![\w-])|(?:Llama|Mistral|Mixtral|Qwen[0-9]*|Gemma[0-9]*|Phi[0-9]*)\w*(?:ForCausalLM|"
                       r"DecoderLayer|Config|Model)", re.IGNORECASE)
# tokenizer knowledge, not model families: llama.cpp's pre-tokenizer names (a table of hashes)
EXEMPT = {"gguf/pretokenizers.py"}
# llama.cpp's own name, its tools, the Python binding and slimlm's pip extra for it are not the llama family
NOT_FAMILY = re.compile(r"llama[.\-_](?:cpp|quantize|imatrix|cli|server|perplexity|bench|model)|llama_cpp|\[llama\]|"
                        r"llama-cpp-python", re.IGNORECASE)


def _docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def family_knowledge(source: str) -> list[tuple[int, str]]:
    """(line, what) for every module path or family name in the code of `source`."""
    tree = ast.parse(source)
    docs = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in MODULE_NAMES:
            found.append((node.lineno, f".{node.attr}"))
        elif isinstance(node, ast.Attribute) and node.attr in ("layers", "norm", "embed_tokens") and \
                isinstance(node.value, ast.Attribute) and node.value.attr == "model":
            found.append((node.lineno, f".model.{node.attr}"))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            text = NOT_FAMILY.sub("", node.value)
            for m in list(PATH_RE.finditer(text)) + list(FAMILY_RE.finditer(text)):
                found.append((node.lineno, repr(m.group(0))))
    return found


def test_the_check_finds_what_it_looks_for():
    code = '''
"""A docstring may say q_proj and Llama."""
x = layer.self_attn.q_proj        # attribute paths
y = "model.layers.0.mlp.down_proj.weight"
v = layer.mlp
if spec.gguf_arch == "qwen2":
    pass
z = module.model.layers
w = "Qwen3ForCausalLM"
ok = "llama.cpp's graph, llama-quantize, llama_cpp"
'''
    got = {what for _, what in family_knowledge(code)}
    assert {".self_attn", ".q_proj", "'model.layers'", ".mlp", "'down_proj'", "'qwen2'", ".model.layers",
            "'Qwen3ForCausalLM'"} <= got
    assert not any("llama" in w.lower() for w in got if w != "'Qwen3ForCausalLM'")


def test_no_module_path_or_family_name_outside_the_family_descriptions():
    bad = []
    for f in sorted(PACKAGE.rglob("*.py")):
        rel = f.relative_to(PACKAGE).as_posix()
        if rel.startswith("arch/") or rel in EXEMPT:
            continue
        bad += [f"{rel}:{line}: {what}" for line, what in family_knowledge(f.read_text())]
    assert not bad, "family knowledge outside slimlm/arch/:\n" + "\n".join(bad)


@pytest.mark.parametrize("name", list(arch.ARCHS))
def test_each_family_module_is_found_by_role(tiny_hf, name):
    """family(), decoder_layers() and part() find every role of a loaded model of each family; q_norm only where
    the family has one; set_part swaps a linear in place."""
    m = slimlm.load(tiny_hf(name), progress=False)
    spec = arch.family(m.module)
    assert spec is m.spec is arch.ARCHS[name]
    layers = arch.decoder_layers(m.module)
    assert len(layers) == m.config["num_hidden_layers"] and arch.family(layers[0]) is spec
    names = dict(m.module.named_parameters())
    mlp = ("router", *arch.EXPERT_ROLES) if spec.moe else ("gate", "up", "down")
    for role in ("q", "k", "v", "o", *mlp, "attn_norm", "ffn_norm"):
        assert part(layers[1], role).weight is names[spec.hf_name(1, role)]
    assert (part(layers[0], "q_norm") is not None) == spec.qk_norm
    assert (arch.experts(layers[0]) is not None) == spec.moe == (part(layers[0], "down") is None)
    assert arch.embedding(m.module).weight is names[spec.embed_name]
    new = torch.nn.Linear(1, 1)
    arch.set_part(layers[0], "o", new)
    assert part(layers[0], "o") is new


def part(layer, role):
    return arch.part(layer, role)


def _kld(ref: torch.Tensor, got: torch.Tensor) -> float:
    lp, lq = torch.log_softmax(ref.double(), -1), torch.log_softmax(got.double(), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


@pytest.mark.parametrize("name", list(arch.ARCHS))
def test_each_family_gguf_runs_in_llama_cpp_as_in_transformers(tiny_hf, tmp_path, name, llama_cpp_available):
    """Issue 14 a: per family, llama.cpp's logits of the F32 GGUF against transformers' KLD < 1e-4, of the Q8_0
    GGUF < 0.01, on a text longer than the tiny Gemma 3's sliding window (8); the F32 GGUF loads back in slimlm
    (transformers' GGUF loader plus the family's fields it leaves at defaults) with the same logits."""
    from slimlm.eval.runtime import LlamaCppRunner
    m = slimlm.load(tiny_hf(name, num_hidden_layers=4), progress=False)
    pre = "qwen2" if m.spec.gguf_arch.startswith("qwen") else None      # see test_export
    x = torch.randint(3, m.config["vocab_size"], (40,), generator=torch.Generator().manual_seed(5))
    ref = m.logits(x[None])[0]
    for t, bound in (("F32", 1e-4), ("Q8_0", 1e-2)):
        out = tmp_path / f"m-{t}.gguf"
        slimlm.export_gguf(m, out, t, progress=False, pre_tokenizer=pre)
        r = LlamaCppRunner(out, 64)
        try:
            got = r.logits(x)
        finally:
            r.close()
        assert _kld(ref, got) < bound, (name, t, _kld(ref, got))
    back = slimlm.load(tmp_path / "m-F32.gguf", progress=False)
    assert torch.allclose(back.logits(x[None])[0], ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", list(arch.ARCHS))
def test_each_family_gptq_q4_k_m_runs_in_llama_cpp(tiny_hf, tmp_path, name, llama_cpp_available,
                                                    sentencepiece_available):
    """Issue 14 a: GPTQ onto Q4_K_M's grids (rows of 256: K-quants apply) for each family: every quantized block
    linear GPTQ'd, and llama.cpp computes what the file decodes to in torch (slimlm's GGUF loader; KLD < 0.01:
    llama.cpp also rounds the activations to 8 bits in its K-quant dot products)."""
    from slimlm.eval.runtime import LlamaCppRunner
    from slimlm.gguf.reader import read_gguf
    # a 400-piece SentencePiece vocabulary keeps the output projection's GPTQ cheap; transformers 5 builds Qwen2's
    # own byte-level tokenizer class over any vocabulary (see test_export): SmolLM2's then
    dims = dict(hidden_size=256, intermediate_size=256, head_dim=64, num_attention_heads=4,
                **({"query_pre_attn_scalar": 64} if arch.ARCHS[name].layer_types else {}))
    tok_dir, tok, _ = _spm_tokenizer_dir(tmp_path / "spm", True)
    src = save_tiny_hf(tmp_path / "m", name, tok_dir, vocab_size=len(tok), bos_token_id=2, eos_token_id=1, **dims)
    m = slimlm.load(src, progress=False)
    pre = []
    if not _is_spm(m.tokenizer):
        src, pre = tiny_hf(name, **dims), ["--pre-tokenizer", "qwen2"]
        m = slimlm.load(src, progress=False)
    out = tmp_path / "gptq.gguf"
    assert main(["-q", "compress", str(src), "-o", str(out), "--type", "Q4_K_M", "--method", "gptq",
                 "--calib", "--calib-chunks", "2", "--ctx", "32", "--no-eval", *pre]) == 0
    g = read_gguf(out)
    types = {t.name: t.ggml_type.name for t in g.tensors}
    assert "Q4_K" in types.values()
    step = next(s for s in json.loads(out.with_suffix(".report.json").read_text())["steps"] if s["step"] == "gptq")
    quantized = [n for n, t in types.items() if n.startswith("blk.") and t not in ("F32", "F16")]
    assert step["tensors"] >= len(quantized) and not step["rtn_fallbacks"]
    x = torch.randint(3, m.config["vocab_size"], (48,), generator=torch.Generator().manual_seed(6))
    want = slimlm.load(out, progress=False).logits(x[None])[0]
    r = LlamaCppRunner(out, 64)
    try:
        got = r.logits(x)
    finally:
        r.close()
    assert _kld(want, got) < 1e-2 and _kld(m.logits(x[None])[0], got) < 1.0


@pytest.mark.parametrize("name", list(arch.ARCHS))
def test_each_family_replays_layer_by_layer_as_its_forward(tiny_hf, name):
    """What GPTQ, pruning, sensitivity and healing replay one layer at a time (replay_inputs, run_layer; each layer
    its attention kind's mask and rope) and the sub-block split (attention_out, mlp_out: post norms included) give
    the model's own logits, on a text longer than the tiny Gemma 3's sliding window."""
    from slimlm.sequential import replay_inputs, run_layer
    m = slimlm.load(tiny_hf(name, num_hidden_layers=4), progress=False)
    chunks = torch.randint(3, m.config["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(7))
    x, kw = replay_inputs(m.module, chunks)
    y = x
    for layer in arch.decoder_layers(m.module):
        h = y + arch.attention_out(layer, y, kw)
        split = h + arch.mlp_out(layer, h)
        y = run_layer(layer, y, kw)
        assert torch.allclose(split, y, atol=1e-5, rtol=1e-5)
    with torch.no_grad():          # the final hidden states (normed), before the head and any soft-cap
        want = m.module(input_ids=chunks, use_cache=False, output_hidden_states=True).hidden_states[-1]
    assert torch.allclose(arch.final_norm(m.module)(y), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", list(arch.ARCHS))
def test_each_family_awq_folds_its_scales_exactly(tiny_hf, name):
    """AWQ scales folded into each family's producers (its input norms, with the family's norm offset: Gemma's
    (1 + w); the up projection's rows) leave the float model's function unchanged."""
    from slimlm.gguf.writer import plan_model
    from slimlm.sequential import changed_module, quantize_model
    m = slimlm.load(tiny_hf(name), progress=False)
    chunks = torch.randint(3, m.config["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(8))
    _, _, types = plan_model(m, "Q4_0", pure=True)
    _, changed, st = quantize_model(m, chunks, types, gptq=False, awq=True, progress=False)
    module = changed_module(m, changed)
    per_layer = len(m.spec.layout.shared_inputs) + (m.spec.layout.down_input is not None)   # q/k/v, gate/up, down
    assert len(st["awq_groups"]) == per_layer * m.config["num_hidden_layers"]
    assert any(not torch.equal(a, b) for a, b in zip(module.parameters(), m.module.parameters(), strict=True))
    with torch.no_grad():
        got = module(input_ids=chunks, use_cache=False).logits
    assert torch.allclose(got, m.logits(chunks), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", list(arch.ARCHS))
def test_each_family_prunes_and_heals_into_a_gguf(tiny_hf, tmp_path, name, llama_cpp_available):
    """`slimlm prune` (MLP neurons and a layer, uniform widths) then `slimlm heal` from the original for each
    family: every stage runs, healing lowers the held-out KL, and llama.cpp evaluates the healed GGUF."""
    train, held = tmp_path / "train.txt", tmp_path / "eval.txt"
    for path, text in zip((train, held), word_texts(), strict=True):
        path.write_text(text)
    teacher = tiny_hf(name, num_hidden_layers=4)
    pre = ["--pre-tokenizer", "qwen2"] if arch.ARCHS[name].gguf_arch.startswith("qwen") else []
    student = tmp_path / "student"
    mlp = ["--experts", "6"] if arch.ARCHS[name].moe else ["--ffn", "48"]          # a mixture of experts: experts
    assert main(["-q", "prune", str(teacher), "-o", str(student), *mlp, "--drop-layers", "2",
                 "--allocate", "uniform", "--no-eval", "--calib", str(train), "--calib-chunks", "4",
                 "--ctx", "64"]) == 0
    out = tmp_path / "healed.gguf"
    assert main(["-q", "heal", str(student), "--teacher", str(teacher), "-o", str(out), "--heal", "1024",
                 "--data", str(train), "--text", str(held), "--seq-len", "32", "--ctx", "64", "--chunks", "2",
                 "--no-speed", *pre]) == 0
    rep = json.loads(out.with_suffix(".report.json").read_text())
    kl = [s["heldout_kl"] for s in rep["healing"]["stages"] if "heldout_kl" in s]
    assert kl[-1] < kl[0], kl
    assert rep["evaluation"]["model"]["runtime"] == "llama.cpp" and 0 < rep["evaluation"]["kld"] < 5


@pytest.mark.parametrize("name,edit,message", [
    ("Gemma3ForCausalLM", {"query_pre_attn_scalar": 256}, r"scales this model's attention by 1/sqrt\(32\)"),
    ("Gemma3ForCausalLM", {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping is not supported"),
    ("Gemma3ForCausalLM", {"layer_types": ["full_attention"]}, "layer_types must list"),
    ("Gemma3ForCausalLM", {"hidden_activation": "silu"}, "hidden_activation 'silu' is not supported"),
    ("Gemma2ForCausalLM", {"tie_word_embeddings": False}, "has no output tensor"),
    ("Gemma2ForCausalLM", {"final_logit_softcapping": None}, "llama.cpp always applies it"),
    ("LlamaForCausalLM", {"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    # Phi-3 128k / Phi-3.5 / Phi-4-mini: LongRoPE; Phi-4-mini also rotates only part of each head
    ("Phi3ForCausalLM", {"rope_scaling": {"type": "longrope", "long_factor": [1.0] * 8, "short_factor": [1.0] * 8}},
     "rope type 'longrope' is not supported"),
    ("Phi3ForCausalLM", {"partial_rotary_factor": 0.75, "rope_parameters": None}, "partial rotary embeddings"),
    ("Phi3ForCausalLM", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     "partial rotary embeddings"),
])
def test_what_a_familys_llama_cpp_graph_cannot_run_is_refused_on_load(tiny_hf, tmp_path, name, edit, message):
    import shutil
    d = tmp_path / "m"
    shutil.copytree(tiny_hf(name), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(edit)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(slimlm.errors.InvalidModelError, match=message):
        slimlm.load(d, progress=False)


def test_gemma_hidden_pruning_and_a_layer_count_that_changes_the_attention_scale_are_refused(tiny_hf, tmp_path,
                                                                                               capsys):
    """Gemma's embedding is scaled by sqrt(hidden size) in both runtimes: --hidden is refused before any work. A
    Gemma 3 model of 62 layers (the 27B) has its attention scaled by 1/sqrt(hidden/heads) in llama.cpp, others by
    1/sqrt(head_dim): a GGUF plan that changes the layer count across that line is refused."""
    from slimlm.prune.checks import check_gguf_plan
    from slimlm.prune.structured import Plan
    src = tiny_hf("Gemma3ForCausalLM", num_hidden_layers=4)
    assert main(["-q", "prune", str(src), "-o", str(tmp_path / "p.gguf"), "--hidden", "48", "--no-eval"]) == 2
    assert "scales its embedding by sqrt(hidden size)" in capsys.readouterr().err
    cfg = dict(slimlm.load(src, progress=False).config, num_hidden_layers=62, query_pre_attn_scalar=16,
               layer_types=["full_attention"] * 62)
    with pytest.raises(slimlm.errors.ConfigError, match=r"1/sqrt\(32\) instead of 1/sqrt\(16\)"):
        check_gguf_plan(cfg, Plan(drop_layers=[3]))
    check_gguf_plan(cfg, Plan(ffn=64))                              # the same layer count: fine


def test_phi3_fused_linears_are_split_in_memory_and_joined_in_every_file(tiny_hf, tmp_path, monkeypatch,
                                                                         llama_cpp_available):
    """Phi-3's qkv_proj and gate_up_proj: split on load into q/k/v and gate/up (the logits bit-identical to
    transformers' fused model), joined again in the HF folder (transformers loads it, same logits) and in the GGUF
    (llama.cpp's attn_qkv and a 2 x n_ff ffn_up, no attn_q or ffn_gate); a --target-size budget prices and measures
    the fused tensors as one."""
    from transformers import AutoModelForCausalLM

    from slimlm.compress import CompressConfig, compress
    from slimlm.gguf.reader import read_gguf
    from slimlm.gguf.writer import file_bytes, plan_model
    from slimlm.hfout import save_hf
    src = tiny_hf("Phi3ForCausalLM")
    m = slimlm.load(src, progress=False)
    x = torch.randint(3, m.config["vocab_size"], (1, 30), generator=torch.Generator().manual_seed(9))
    fused = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        want = fused(x).logits
    assert torch.equal(m.logits(x), want)
    layer = arch.decoder_layers(m.module)[0]
    assert [part(layer, r).out_features for r in ("q", "k", "v", "gate", "up")] == [64, 32, 32, 96, 96]
    save_hf(m, tmp_path / "hf")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    names = set(back.state_dict())
    assert "model.layers.0.self_attn.qkv_proj.weight" in names and not any("q_proj" in n for n in names)
    with torch.no_grad():
        assert torch.equal(back(x).logits, want)
    monkeypatch.setenv("SLIMLM_CACHE", str(tmp_path / "cache"))
    _, tensors, types = plan_model(m, "Q8_0")
    target = int(0.7 * file_bytes(m, {n: types[n][0].nbytes(tuple(W.shape)) for n, _, W in tensors}))
    cfg = CompressConfig(target_size=str(target), method="gptq", calib_chunks=2, gptq_chunks=2, n_ctx=64,
                         sensitivity_chunks=2, max_chunks=2, speed=False, measure_effects=True)
    rep = compress(src, tmp_path / "b.gguf", cfg, progress=False)
    g = read_gguf(tmp_path / "b.gguf")
    shapes = {t.name: tuple(int(d) for d in t.shape) for t in g.tensors}
    assert shapes["blk.0.attn_qkv.weight"] == (128, 64) and shapes["blk.0.ffn_up.weight"] == (192, 64)
    assert not any(n.endswith(("attn_q.weight", "ffn_gate.weight")) for n in shapes)
    step = next(s for s in rep.steps if s["step"] == "mixed precision")
    assert (tmp_path / "b.gguf").stat().st_size <= target
    assert {"blk.0.attn_qkv.weight", "blk.1.ffn_up.weight"} <= set(step["predicted"])
    assert all(p["measured_dkld"] >= 0 for p in step["predicted"].values())
    assert rep.evaluation["kld"] < 1.0


def test_moe_prunes_experts_by_router_mass_into_a_file_llama_cpp_runs(tmp_path, capsys, llama_cpp_available,
                                                                     sentencepiece_available):
    """Qwen3-MoE, 25% fewer parameters (`slimlm prune --ratio 0.25`: whole layers, then experts by the routing mass
    they carry on calibration text): the GGUF has fewer experts (expert_count and the stacks), llama.cpp computes
    the pruned torch model, and the kept experts are those the router weighted most."""
    from slimlm.eval.runtime import LlamaCppRunner
    from slimlm.gguf.reader import read_gguf
    from slimlm.prune.command import PruneConfig, structured_prune
    from slimlm.prune.structured import n_params
    tok_dir, tok, _ = _spm_tokenizer_dir(tmp_path / "spm", True)   # a small vocabulary: the experts dominate
    src = save_tiny_hf(tmp_path / "m", "Qwen3MoeForCausalLM", tok_dir, vocab_size=len(tok), bos_token_id=2,
                       eos_token_id=1, num_hidden_layers=4)
    calib = tmp_path / "calib.txt"
    calib.write_text(word_texts()[0])
    out = tmp_path / "p.gguf"
    argv = ["--ratio", "0.25", "--type", "F32", "--calib", str(calib), "--calib-chunks", "2", "--ctx", "32"]
    assert main(["-q", "prune", str(src), "-o", str(out), *argv, "--no-eval"]) == 0
    st = json.loads(out.with_suffix(".report.json").read_text())["steps"][0]
    m = slimlm.load(src, progress=False)
    assert st["removed_fraction"] >= 0.25 and "experts" in st["plan"]
    g = read_gguf(out)
    ne = g.get("qwen3moe.expert_count")
    assert ne < 8 and g.get("qwen3moe.expert_used_count") == 2
    assert tuple(int(d) for d in g.tensor("blk.0.ffn_down_exps.weight").shape) == (ne, 64, 32)
    assert all(0.5 < f <= 1.0 for f in st["expert_mass_kept"])        # the heaviest experts carry most of the mass
    from slimlm.calib import calibration_chunks
    chunks, _ = calibration_chunks(m, str(calib), n_ctx=32, max_chunks=2)
    cfg = PruneConfig(ratio=0.25, type="F32", calib_chunks=2, n_ctx=32)
    p, st2 = structured_prune(m, chunks, cfg, lambda _msg: None, False)
    assert st2["plan"] == st["plan"] and n_params(p.config) == p.n_params()
    x = torch.randint(3, len(tok), (24,), generator=torch.Generator().manual_seed(4))
    r = LlamaCppRunner(out, 64)
    try:
        got = r.logits(x)
    finally:
        r.close()
    assert _kld(p.logits(x[None])[0], got) < 1e-5
    # refused before any work: neurons or hidden channels of experts, more experts than it has, fewer than a token uses
    capsys.readouterr()
    for bad, message in ((["--ffn", "16"], "no dense MLP neurons"), (["--experts", "9"], "keep between the 2"),
                         (["--experts", "1"], "keep between the 2")):
        assert main(["-q", "prune", str(src), "-o", str(tmp_path / "x.gguf"), *bad, *argv[2:]]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    # a size budget would leave the stacked experts (most of the weights) unpriced: refused
    assert main(["-q", "compress", str(src), "-o", str(tmp_path / "x.gguf"), "--target-size", "1GiB",
                 "--calib", str(calib), "--ctx", "32"]) == 2
    assert "cannot price a mixture of experts" in capsys.readouterr().err
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("edit,message", [
    ({"norm_topk_prob": False}, "norm_topk_prob must be true"),
    ({"mlp_only_layers": [1]}, "layers without experts"),
    ({"num_experts_per_tok": 9}, "exceeds num_experts"),
])
def test_moe_configs_llama_cpp_cannot_run_are_refused(tiny_hf, tmp_path, edit, message):
    import shutil
    d = tmp_path / "m"
    shutil.copytree(tiny_hf("Qwen3MoeForCausalLM"), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(edit)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(slimlm.errors.InvalidModelError, match=message):
        slimlm.load(d, progress=False)


def test_llama3_rope_scaling_survives_a_gguf_round_trip(tiny_hf, tmp_path, llama_cpp_available):
    """Llama 3.1's rope scaling (factor 8 over 8192, low/high 1/4) goes into the GGUF as llama.cpp's rope_freqs
    tensor: llama.cpp computes transformers' logits, and slimlm loads the GGUF back with the same scaling (the
    parameters recovered from the factors; transformers' GGUF loader alone would drop them)."""
    from slimlm.eval.runtime import LlamaCppRunner
    rp = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    m = slimlm.load(tiny_hf("LlamaForCausalLM", rope_parameters=rp), progress=False)
    x = torch.randint(3, m.config["vocab_size"], (40,), generator=torch.Generator().manual_seed(9))
    ref = m.logits(x[None])[0]
    out = tmp_path / "m.gguf"
    slimlm.export_gguf(m, out, "F32", progress=False)
    r = LlamaCppRunner(out, 64)
    try:
        assert _kld(ref, r.logits(x)) < 1e-4
    finally:
        r.close()
    back = slimlm.load(out, progress=False)
    assert {k: back.config["rope_parameters"][k] for k in rp} == rp
    assert torch.allclose(back.logits(x[None])[0], ref, atol=1e-4, rtol=1e-4)


def _spm_tokenizer_dir(d, dummy_prefix: bool):
    """A SentencePiece BPE model with byte fallback trained on the word texts (plus some non-ASCII text), as an HF
    tokenizer folder (tokenizer.model, tokenizer.json): Llama-2 style (dummy prefix) or Gemma style (none)."""
    import shutil

    import sentencepiece as spm
    from transformers import AutoTokenizer
    d.mkdir()
    corpus = d / "corpus.txt"
    corpus.write_text(word_texts()[0].replace(". ", ".\n") + "\nnaïve café — 日本語 text, numbers 12345 and CamelCase.\n")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(d / "sp"), vocab_size=400, model_type="bpe",
                                   byte_fallback=True, character_coverage=1.0, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
                                   add_dummy_prefix=dummy_prefix, minloglevel=2)
    tok_dir = d / "tok"
    tok_dir.mkdir()
    shutil.copy(d / "sp.model", tok_dir / "tokenizer.model")
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer" if dummy_prefix else "GemmaTokenizer", "bos_token": "<s>",
        "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>", "add_bos_token": True}))
    tok = AutoTokenizer.from_pretrained(tok_dir)
    tok.save_pretrained(tok_dir)
    return tok_dir, tok, spm.SentencePieceProcessor(model_file=str(d / "sp.model"))


@pytest.mark.parametrize("name,dummy_prefix", [("LlamaForCausalLM", True), ("Gemma3ForCausalLM", False)])
def test_sentencepiece_tokenizers_export_as_llama_cpp_tokenizes(tmp_path, name, dummy_prefix, llama_cpp_available,
                                                                  sentencepiece_available):
    """An HF folder with a SentencePiece tokenizer (Llama 2 / Mistral v0.x style, and Gemma style) exports as
    llama.cpp's SentencePiece vocabulary (pieces, scores, types from tokenizer.model): llama.cpp tokenizes texts
    (non-ASCII and byte-fallback ones included) into the ids sentencepiece and the HF tokenizer give, computes the
    model's logits, and the GGUF loads back with the same tokenizer. (Not compared: a leading or doubled space,
    which sentencepiece's normalizer collapses and llama.cpp keeps.)"""
    from llama_cpp import Llama

    from slimlm.eval.runtime import LlamaCppRunner
    from slimlm.gguf.reader import read_gguf
    tok_dir, tok, sp = _spm_tokenizer_dir(tmp_path / "spm", dummy_prefix)
    src = save_tiny_hf(tmp_path / "m", name, tok_dir, bos_token_id=2, eos_token_id=1, vocab_size=len(tok))
    m = slimlm.load(src, progress=False)
    out = tmp_path / "m.gguf"
    slimlm.export_gguf(m, out, "F32", progress=False)
    g = read_gguf(out)
    assert g.get("tokenizer.ggml.model") == arch.SPM_TOKENIZER and g.get("tokenizer.ggml.add_space_prefix") == \
        dummy_prefix and len(g.get("tokenizer.ggml.scores")) == len(tok)
    llm = Llama(str(out), n_ctx=64, verbose=False)
    back = slimlm.load(out, progress=False)
    for t in ("The cat runs greenly.", "naïve café — 日本語 text", "CamelCase 12345 x", "Stoneful rivers, readingly!"):
        want = tok(t)["input_ids"]
        assert want == [2] + sp.encode(t) == llm.tokenize(t.encode(), add_bos=True, special=False), t
        assert back.tokenizer(t)["input_ids"] == want, t
    del llm
    x = torch.tensor(tok("The old town reads. Blue stones run, the river greenly.")["input_ids"])
    r = LlamaCppRunner(out, 64)
    try:
        assert _kld(m.logits(x[None])[0], r.logits(x)) < 1e-4
    finally:
        r.close()


def test_a_sentencepiece_tokenizer_without_its_model_file_is_refused_before_any_work(tmp_path, tiny_hf, capsys,
                                                                                      sentencepiece_available):
    import shutil

    tok_dir, tok, _ = _spm_tokenizer_dir(tmp_path / "spm", True)
    src = save_tiny_hf(tmp_path / "m", "LlamaForCausalLM", tok_dir, vocab_size=len(tok))
    (src / "tokenizer.model").unlink()
    shutil.rmtree(tmp_path / "spm")
    assert main(["-q", "prune", str(src), "-o", str(tmp_path / "p.gguf"), "--ffn", "64", "--no-eval"]) == 2
    assert "needs its tokenizer.model" in capsys.readouterr().err
