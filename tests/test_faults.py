"""Faults in the write path (RELIABILITY.md items 29, 30): disk full mid-write and at fsync/close, a read-only
output folder. Each: one `error: ...` line naming the path, exit code 2, nothing under the final name, no temp
or lock file left, inputs byte-identical.

Writers covered: the GGUF writer (export_gguf, `slimlm compress`), the HF folder writer (`slimlm prune` to a
folder: safetensors' Rust writer included) and the small files (reports, JSON: atomic_write_bytes). Faults come
from the kernel where possible: a file-size limit (EFBIG past byte N, in-process), a small tmpfs (ENOSPC) and a
read-only bind mount when this machine lets the test mount; otherwise and in addition, ENOSPC/EACCES injected
at write, close, fsync and create. kill -9 is in test_kill.py.
"""
from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import gguf.gguf_writer
import pytest
from faultkit import (
    failing_fsync,
    failing_open,
    file_size_limit,
    leftovers,
    mount_error,
    readonly_mount,
    small_tmpfs,
    tree_hashes,
)

import slimlm.calib
import slimlm.io
import slimlm.model
from slimlm import cli
from slimlm.errors import OutputError
from slimlm.gguf.reader import read_gguf
from slimlm.hf import check_hf_dir

compress_module = sys.modules["slimlm.compress"]  # `slimlm.compress` is the function

PRUNE = ["--method", "mlp", "--ffn", "64", "--ctx", "64", "--calib-chunks", "2", "--no-eval"]


@pytest.fixture(scope="module")
def can_mount(tmp_path_factory) -> bool:
    why = mount_error(tmp_path_factory.mktemp("mountprobe") / "m")
    print(f"real mounts: {'yes' if why is None else 'no, ' + why}")
    return why is None


@pytest.fixture(scope="module")
def gguf_bytes(src, tmp_path_factory) -> int:
    """Size of the Q8_0 file `compress` writes for the tiny model (also warms the encoders' compiled code)."""
    out = tmp_path_factory.mktemp("ref") / "ref.gguf"
    assert cli.main(_compress(src, out)) == 0
    return out.stat().st_size


def _compress(src: Path, out: Path, *extra: str) -> list[str]:
    return ["-q", "compress", str(src), "-o", str(out), "--type", "Q8_0", "--ctx", "64", "--no-eval", *extra]


def _one_error_line(capsys, *needles: str) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    for n in needles:
        assert n in err[0], (n, err[0])
    return err[0]


def _nothing_written(folder: Path, *names: str) -> None:
    for n in names:
        assert not (folder / n).exists(), f"{n} exists after a failed write"
    assert leftovers(folder) == []


# ---- GGUF: disk full at a byte, at close, at fsync --------------------------------------------------------
@pytest.mark.parametrize("where", ["header", "tokenizer", "tensor data", "last byte"])
def test_compress_write_fails_at_byte(src, tmp_path, capsys, gguf_bytes, where):
    """The kernel refuses every byte past N (EFBIG), in gguf-py's header writes or numpy's tofile."""
    n = {"header": 16, "tokenizer": 1 << 20, "tensor data": gguf_bytes // 2, "last byte": gguf_bytes - 1}[where]
    before = tree_hashes(src)
    out = tmp_path / "o.gguf"
    with file_size_limit(n):
        rc = cli.main(_compress(src, out))
    assert rc == 2
    _one_error_line(capsys, f"writing {out} failed", "nothing was written")
    _nothing_written(tmp_path, "o.gguf", "o.report.json", "o.report.md")
    assert tree_hashes(src) == before


@pytest.mark.parametrize("fault", ["write ENOSPC", "close ENOSPC"])
def test_compress_enospc_injected(src, tmp_path, capsys, gguf_bytes, monkeypatch, fault):
    calls: list[str] = []
    fake = failing_open(limit=gguf_bytes // 3 if fault.startswith("write") else None,
                        at_close=fault.startswith("close"), calls=calls)
    monkeypatch.setattr(gguf.gguf_writer, "open", fake, raising=False)
    before = tree_hashes(src)
    out = tmp_path / "o.gguf"
    assert cli.main(_compress(src, out)) == 2
    assert calls, "the fault was not injected"
    _one_error_line(capsys, f"writing {out} failed", "No space left on device")
    _nothing_written(tmp_path, "o.gguf", "o.report.json")
    assert tree_hashes(src) == before


def test_compress_fsync_of_temp_fails(src, tmp_path, capsys, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(os, "fsync", failing_fsync("temp", calls))
    out = tmp_path / "o.gguf"
    assert cli.main(_compress(src, out)) == 2
    assert calls and ".o.gguf.tmp-" in calls[0]
    _one_error_line(capsys, f"writing {out} failed", "No space left on device")
    _nothing_written(tmp_path, "o.gguf", "o.report.json")


def test_folder_fsync_failure_after_rename_says_the_file_is_complete(src, tmp_path, capsys, monkeypatch):
    """The rename happened; only its durability is in doubt: the message must not claim nothing was written."""
    calls: list[str] = []
    monkeypatch.setattr(os, "fsync", failing_fsync("folder", calls))
    out = tmp_path / "o.gguf"
    assert cli.main(_compress(src, out)) == 2
    assert calls == [str(tmp_path)]
    _one_error_line(capsys, f"{out} is complete", "fsync of its folder", "No space left on device")
    read_gguf(out)
    assert leftovers(tmp_path) == []


# ---- HF folder (prune): safetensors' Rust writer, fsync of a file, of the folder -----------------------
def _prune_hf(src: Path, out: Path, calib: Path) -> list[str]:
    return ["-q", "prune", str(src), "-o", str(out), "--calib", str(calib), *PRUNE]


def test_prune_hf_folder_disk_full_in_safetensors(src, calib, tmp_path, capsys):
    before = tree_hashes(src, calib)
    out = tmp_path / "pruned"
    with file_size_limit(1 << 20):     # model.safetensors is ~25 MB; the Rust writer gets EFBIG
        rc = cli.main(_prune_hf(src, out, calib))
    assert rc == 2
    _one_error_line(capsys, f"writing {out} failed", "File too large")
    _nothing_written(tmp_path, "pruned", "pruned.report.json")
    assert tree_hashes(src, calib) == before


def test_prune_hf_folder_fsync_of_a_file_fails(src, calib, tmp_path, capsys, monkeypatch):
    """Before: each file was renamed into the folder on its own, so a failure left model.safetensors alone."""
    calls: list[str] = []
    real_fsync = os.fsync

    def fsync_fails_at_config(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        if "config.json" in path and ".tmp-" in path:
            calls.append(path)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync_fails_at_config)
    out = tmp_path / "pruned"
    assert cli.main(_prune_hf(src, out, calib)) == 2
    assert calls
    _one_error_line(capsys, f"writing {out} failed", "No space left on device")
    _nothing_written(tmp_path, "pruned", "pruned.report.json")


def test_prune_hf_folder_fsync_of_folder_fails_after_rename(src, calib, tmp_path, capsys, monkeypatch):
    calls: list[str] = []
    real_fsync = os.fsync

    def only_parent(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}") == str(tmp_path):
            calls.append(str(tmp_path))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", only_parent)
    out = tmp_path / "pruned"
    assert cli.main(_prune_hf(src, out, calib)) == 2
    _one_error_line(capsys, f"{out} is complete", "fsync of its folder")
    check_hf_dir(out)
    assert leftovers(tmp_path) == []


def test_hf_folder_short_write_is_caught_before_the_rename(src, tmp_path, monkeypatch):
    """A write that 'succeeded' but left the file short (a lying disk, a truncation) is read back and refused."""
    import slimlm.hfout as hfout
    from slimlm import load
    real = hfout._save_safetensors

    def short(tensors, path, metadata):
        real(tensors, path, metadata)
        os.truncate(path, path.stat().st_size - 100)
    monkeypatch.setattr(hfout, "_save_safetensors", short)
    with pytest.raises(OutputError, match="does not read back.*truncated"):
        hfout.save_hf(load(src, progress=False), tmp_path / "hf")
    _nothing_written(tmp_path, "hf")


# ---- reports and JSON (atomic_write_bytes) ---------------------------------------------------------------
@pytest.mark.parametrize("fault", ["write", "close", "fsync"])
def test_atomic_write_bytes_faults(tmp_path, monkeypatch, fault):
    calls: list[str] = []
    if fault == "fsync":
        monkeypatch.setattr(os, "fsync", failing_fsync("temp", calls))
    else:
        monkeypatch.setattr(slimlm.io, "open", failing_open(limit=10 if fault == "write" else None,
                                                           at_close=fault == "close", calls=calls), raising=False)
    out = tmp_path / "r.json"
    with pytest.raises(OutputError, match=f"writing {out} failed: No space left on device"):
        slimlm.io.atomic_write_bytes(out, b"{" + b'"k": 1, ' * 100 + b"}")
    assert calls
    _nothing_written(tmp_path, "r.json")


def test_compress_report_disk_full(src, tmp_path, capsys, monkeypatch):
    """The GGUF is complete under its name; the report that failed is absent, and so are its temp files."""
    monkeypatch.setattr(slimlm.io, "open", failing_open(limit=100), raising=False)
    out = tmp_path / "o.gguf"
    assert cli.main(_compress(src, out)) == 2
    _one_error_line(capsys, f"writing {tmp_path / 'o.report.json'} failed")
    read_gguf(out)
    _nothing_written(tmp_path, "o.report.json", "o.report.md")


# ---- a real small filesystem -------------------------------------------------------------------------------
def test_small_filesystem(src, calib, tmp_path, capsys, can_mount, gguf_bytes):
    """A tmpfs too small for the output: the up-front check passes (the tensor data fits), the header does
    not: a real ENOSPC mid-write. Without mount rights, the same sizes as a file-size limit (EFBIG)."""
    before = tree_hashes(src, calib)
    room = gguf_bytes - (1 << 20)
    for name, argv in (("o.gguf", _compress(src, tmp_path / "fs" / "o.gguf")),
                       ("pruned", _prune_hf(src, tmp_path / "fs" / "pruned", calib))):
        fs = tmp_path / "fs"
        if can_mount:
            with small_tmpfs(fs, room):
                assert cli.main(argv) == 2
                _one_error_line(capsys, f"writing {fs / name} failed", "No space left on device")
                _nothing_written(fs, name)
        else:
            fs.mkdir(exist_ok=True)
            with file_size_limit(room):
                assert cli.main(argv) == 2
            _one_error_line(capsys, f"writing {fs / name} failed", "File too large")
            _nothing_written(fs, name)
    assert tree_hashes(src, calib) == before


def test_obviously_short_space_is_refused_before_writing(src, tmp_path, capsys, can_mount, monkeypatch):
    out = tmp_path / "fs" / "o.gguf"
    if can_mount:
        with small_tmpfs(tmp_path / "fs", 1 << 20):
            assert cli.main(_compress(src, out)) == 2
    else:
        (tmp_path / "fs").mkdir()
        monkeypatch.setattr(slimlm.io.shutil, "disk_usage", lambda p: SimpleNamespace(free=1 << 20))
        assert cli.main(_compress(src, out)) == 2
    _one_error_line(capsys, "not enough disk space", str(tmp_path / "fs"))


# ---- read-only output folder --------------------------------------------------------------------------------
def _no_heavy_work(monkeypatch, *, allow_load: bool) -> None:
    def boom(*a, **k):
        raise AssertionError("heavy work started before the output folder was checked")
    monkeypatch.setattr(compress_module, "calibration_chunks", boom)
    monkeypatch.setattr(slimlm.calib, "calibration_chunks", boom)
    if not allow_load:
        monkeypatch.setattr(compress_module, "load", boom)
        monkeypatch.setattr(slimlm.model, "load", boom)


def _inject_readonly(monkeypatch, folder: Path, err: int) -> None:
    """os.access says yes (as for root, or over NFS), but creating anything in `folder` fails."""
    real_open, real_mkdir = os.open, os.mkdir

    def fake_open(path, flags, *a, **k):
        if Path(path).parent == folder and flags & os.O_CREAT:
            raise OSError(err, os.strerror(err), str(path))
        return real_open(path, flags, *a, **k)

    def fake_mkdir(path, *a, **k):
        if Path(path).parent == folder:
            raise OSError(err, os.strerror(err), str(path))
        return real_mkdir(path, *a, **k)
    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)


@pytest.mark.parametrize("kind", ["compress gptq", "prune gguf", "prune hf"])
@pytest.mark.parametrize("backend", ["injected EACCES", "injected EROFS", "read-only mount"])
def test_readonly_output_folder(src, calib, tmp_path, capsys, monkeypatch, can_mount, kind, backend):
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "keep.txt").write_text("x")
    out = ro / ("pruned" if kind == "prune hf" else "o.gguf")
    argv = {"compress gptq": _compress(src, out, "--type", "Q4_0", "--method", "gptq", "--calib", str(calib)),
            "prune gguf": ["-q", "prune", str(src), "-o", str(out), "--calib", str(calib), *PRUNE],
            "prune hf": _prune_hf(src, out, calib)}[kind]
    before = tree_hashes(src, calib, ro)
    _no_heavy_work(monkeypatch, allow_load=kind == "prune hf")
    if backend == "read-only mount":
        if not can_mount:
            backend = "injected EROFS"       # the same check, reached through os.open instead of the kernel
        else:
            with readonly_mount(ro):
                assert cli.main(argv) == 2
    if backend.startswith("injected"):
        _inject_readonly(monkeypatch, ro, errno.EACCES if backend.endswith("EACCES") else errno.EROFS)
        assert cli.main(argv) == 2
    _one_error_line(capsys, f"output folder {ro} is not writable")
    assert tree_hashes(src, calib, ro) == before and leftovers(ro) == []


def test_readonly_folder_exit_code_of_the_process(src, tmp_path):
    """The real process: exit status 2 and exactly one line on stderr (os.open refuses, as on a read-only mount)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    code = ("import errno, os, sys\n"
            f"ro, real = {str(ro)!r}, os.open\n"
            "def fake(p, flags, *a, **k):\n"
            "    if os.path.dirname(str(p)) == ro and flags & os.O_CREAT:\n"
            "        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(p))\n"
            "    return real(p, flags, *a, **k)\n"
            "os.open = fake\n"
            "from slimlm.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    r = subprocess.run([sys.executable, "-c", code, *_compress(src, ro / "o.gguf")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: output folder {ro} is not writable: Read-only file "
                                                   f"system"), lines
    assert list(ro.iterdir()) == []


@pytest.mark.parametrize("extra", [["--method", "gptq", "--type", "Q4_0"], ["--target-size", "6MiB"],
                                   ["--compare"]])
def test_short_space_is_refused_before_calibration(src, calib, tmp_path, capsys, monkeypatch, extra):
    """compress sizes the output from the model's plan right after loading: a folder that obviously cannot hold
    it is refused before calibration, GPTQ or the sensitivity measurement (was: only at the write)."""
    _no_heavy_work(monkeypatch, allow_load=True)
    free = 1 << 20  # the tiny model's Q8_0 tensor data alone is ~6 MiB
    monkeypatch.setattr(slimlm.io.shutil, "disk_usage", lambda p: SimpleNamespace(free=free))
    out = tmp_path / "o.gguf"
    argv = ["-q", "compress", str(src), "-o", str(out), "--calib", str(calib), "--ctx", "64", "--text", str(calib),
            *extra]
    assert cli.main(argv) == 2
    _one_error_line(capsys, "not enough disk space", str(tmp_path))
    assert not out.exists() and not list(tmp_path.glob(".o.gguf*"))
