"""RELIABILITY.md catalogue items that no other test file covers: a chat template carrying a template-injection
payload (10) and non-finite calibration activations (24)."""
from __future__ import annotations

import shutil

import pytest
import torch

from slimlm.cli import main
from slimlm.errors import NumericsError
from slimlm.gguf.reader import read_gguf


def _payload(marker) -> str:
    return ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
            f"{{{{ cycler.__init__.__globals__.os.system('touch {marker}') }}}}"
            f"{{{{ self._TemplateReference__context.joiner.__init__.__globals__.os.popen('touch {marker}') }}}}")


def test_template_injection_is_copied_verbatim_and_never_run(tiny_hf, tmp_path, llama_cpp_available, capsys):
    src = tmp_path / "model"
    shutil.copytree(tiny_hf("LlamaForCausalLM"), src)
    marker = tmp_path / "PWNED"
    payload = _payload(marker)
    (src / "chat_template.jinja").write_text(payload)
    out = tmp_path / "m.gguf"
    assert main(["-q", "compress", str(src), "-o", str(out), "--type", "F32", "--no-eval"]) == 0
    assert read_gguf(out).get("tokenizer.chat_template") == payload        # byte for byte
    capsys.readouterr()
    # llama.cpp renders chat templates in a sandboxed Jinja environment: the payload is refused, not run
    code = main(["-q", "generate", str(out), "--chat", "-p", "hi", "-n", "2", "--ctx", "128"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and "chat template" in err and "SecurityError" in err
    assert not marker.exists()


def test_non_finite_calibration_activation_stops_with_the_cause(tiny_hf):
    from slimlm import load
    from slimlm.sequential import collect_imatrix
    m = load(tiny_hf("LlamaForCausalLM"), progress=False)
    with torch.no_grad():
        next(p for n, p in m.module.named_parameters() if n.endswith("layers.0.mlp.up_proj.weight")).fill_(1e38)
    chunks = torch.randint(0, 100, (2, 32))
    with pytest.raises(NumericsError, match="non-finite calibration activation entering"):
        collect_imatrix(m, chunks, dataset="random tokens", progress=False)
