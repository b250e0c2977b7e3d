"""The write protocol: atomic rename, locks, stale temps, SIGKILL/SIGTERM/SIGINT during export."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slimlm.errors import OutputError
from slimlm.gguf.reader import read_gguf
from slimlm.gguf.writer import check_tensor_finite
from slimlm.io import atomic_folder, atomic_output, atomic_write_bytes, output_lock


def _temps(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if ".tmp-" in p.name or p.name.endswith(".lock")]


def test_exception_leaves_nothing(tmp_path):
    out = tmp_path / "o.bin"
    with pytest.raises(RuntimeError), atomic_output(out) as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("boom")
    assert not out.exists() and _temps(tmp_path) == []


def test_existing_output_needs_overwrite(tmp_path):
    out = tmp_path / "o.bin"
    out.write_bytes(b"old")
    with pytest.raises(OutputError, match="--overwrite"):
        atomic_write_bytes(out, b"new")
    assert out.read_bytes() == b"old"
    atomic_write_bytes(out, b"new", overwrite=True)
    assert out.read_bytes() == b"new" and _temps(tmp_path) == []


def test_missing_or_readonly_folder(tmp_path):
    """Writability is tried, not asked: a user without write permission is refused up front; root, whom the kernel
    lets write there, writes (read-only mounts and injected EACCES/EROFS: test_faults.py)."""
    with pytest.raises(OutputError, match="does not exist"):
        atomic_write_bytes(tmp_path / "nope" / "o.bin", b"x")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.geteuid() != 0:
            with pytest.raises(OutputError, match="not writable"):
                atomic_write_bytes(ro / "o.bin", b"x")
            assert list(ro.iterdir()) == []
        else:
            atomic_write_bytes(ro / "o.bin", b"x")
            assert (ro / "o.bin").read_bytes() == b"x" and _temps(ro) == []
    finally:
        ro.chmod(0o700)


def test_second_writer_fails_fast_naming_holder(tmp_path):
    out = tmp_path / "o.bin"
    with output_lock(out):
        t0 = time.perf_counter()
        with pytest.raises(OutputError, match=f"pid {os.getpid()}"):
            with output_lock(out):
                pass
        assert time.perf_counter() - t0 < 1
    with output_lock(out):  # released: can be taken again
        pass
    assert _temps(tmp_path) == []


def test_stale_temp_from_dead_process_is_cleaned(tmp_path):
    out = tmp_path / "o.bin"
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    stale = tmp_path / f".o.bin.tmp-{p.pid}-deadbeef"
    stale.write_bytes(b"junk")
    alive = tmp_path / f".o.bin.tmp-{os.getpid()}-cafe0000"  # ours, alive: kept
    alive.write_bytes(b"x")
    atomic_write_bytes(out, b"ok")
    assert not stale.exists() and alive.exists() and out.read_bytes() == b"ok"


def test_atomic_folder_is_all_or_nothing(tmp_path):
    """A folder output appears whole: an exception after some files leaves no folder; --overwrite replaces the
    whole folder (a file only the old one had is gone); without it, a non-empty folder is refused."""
    out = tmp_path / "hf"
    with pytest.raises(RuntimeError), atomic_folder(out) as tmp:
        (tmp / "model.safetensors").write_bytes(b"w")
        raise RuntimeError("killed before config.json")
    assert not out.exists() and _temps(tmp_path) == []
    with atomic_folder(out) as tmp:
        (tmp / "a").write_bytes(b"1")
        (tmp / "old-only").write_bytes(b"1")
    with pytest.raises(OutputError, match="--overwrite"), atomic_folder(out):
        pass
    with atomic_folder(out, overwrite=True) as tmp:
        (tmp / "a").write_bytes(b"2")
    assert sorted(p.name for p in out.iterdir()) == ["a"] and (out / "a").read_bytes() == b"2"
    assert _temps(tmp_path) == []


def test_stale_temp_folder_from_dead_process_is_cleaned(tmp_path):
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    stale = tmp_path / f".hf.tmp-{p.pid}-deadbeef"
    (stale / "sub").mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"partial")
    with atomic_folder(tmp_path / "hf") as tmp:
        (tmp / "config.json").write_text("{}")
    assert not stale.exists() and (tmp_path / "hf" / "config.json").exists() and _temps(tmp_path) == []


_EXPORT_LOOP = """
import sys
from slimlm import load, export_gguf
m = load(sys.argv[1])
print("READY", flush=True)
while True:
    export_gguf(m, sys.argv[2], "Q8_0", overwrite=True, progress=False)
    print("WROTE", flush=True)
"""


def _check_valid_or_absent(out: Path) -> bool:
    if not out.exists():
        return False
    g = read_gguf(out)
    for t in g.tensors:
        check_tensor_finite(g.raw(t), t.ggml_type, t.shape, t.name)
    return True


def test_sigkill_during_export_never_leaves_partial_file(tmp_path, tiny_hf):
    src = tiny_hf("LlamaForCausalLM")
    out = tmp_path / "out.gguf"
    rng = random.Random(0)
    seen_valid = 0
    for i in range(4):
        p = subprocess.Popen([sys.executable, "-c", _EXPORT_LOOP, str(src), str(out)],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert p.stdout.readline().strip() == "READY"
        if i > 0:  # later kills land while a complete file exists and is being replaced
            assert p.stdout.readline().strip() == "WROTE"
        time.sleep(rng.uniform(0.0, 1.0))
        p.kill()
        p.wait()
        seen_valid += _check_valid_or_absent(out)
    assert seen_valid >= 3  # a complete earlier file stays valid whatever the kill interrupted
    # the next run cleans the dead processes' temp files
    from slimlm import export_gguf, load
    export_gguf(load(src), out, "Q8_0", overwrite=True, progress=False)
    assert _check_valid_or_absent(out) and _temps(tmp_path) == []


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_during_cli_export_cleans_up(tmp_path, tiny_hf, sig, code):
    out = tmp_path / "out.gguf"
    # ~110 MB of F32, so writing and checking last a while after the temp file appears
    src = tiny_hf("LlamaForCausalLM", hidden_size=256, intermediate_size=1024)
    # a shell that starts jobs in the background (CI runners, `cmd &`) makes them ignore SIGINT, and Python then
    # keeps ignoring it: give the child Ctrl-C's default disposition, as an interactive terminal does
    p = subprocess.Popen([sys.executable, "-m", "slimlm", "-q", "compress", str(src), "-o", str(out),
                          "--type", "F32", "--no-eval"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and not any(".tmp-" in x.name for x in tmp_path.iterdir()):
        if p.poll() is not None:
            pytest.fail(f"export finished before the signal: {p.stderr.read().decode()[-500:]}")
        time.sleep(0.002)
    p.send_signal(sig)
    assert p.wait(60) == code
    assert not out.exists() and _temps(tmp_path) == []
