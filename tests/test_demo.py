"""`make demo`'s own recipe, run from an empty folder (no `out/`), as a new user runs it after `git clone`."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def test_demo_recipe_runs_from_an_empty_folder(tmp_path, llama_cpp_available):
    if shutil.which("make") is None:
        pytest.fail("make is needed for the README's commands")
    venv = Path(sys.executable).parent.parent  # the venv running the tests: setup is not redone here
    r = subprocess.run(["make", "--no-print-directory", "-f", str(ROOT / "Makefile"), "-o", "setup", "demo",
                        f"VENV={venv}"], cwd=tmp_path, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    args = (ROOT / "demo.args").read_text().split()
    gguf = tmp_path / args[args.index("-o") + 1]
    assert gguf.is_file() and gguf.with_suffix(".report.md").is_file()
    assert f"wrote {gguf.relative_to(tmp_path)}" in out
    # slimlm's file next to llama.cpp's own quantization of the same model, measured in the same run
    assert "llama.cpp's own" in out and "same importance matrix" in out
    m = re.search(r"slimlm / llama.cpp \(same tokens, same run\): size ([\d.]+)x, KL divergence ([\d.]+)x", out)
    assert m, out
    size_ratio, kld_ratio = float(m[1]), float(m[2])
    assert 0.95 < size_ratio <= 1.0 and kld_ratio > 0
