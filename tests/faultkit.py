"""Fault injection for the write-path tests (test_faults.py).

- `file_size_limit(n)`: RLIMIT_FSIZE, so the kernel fails every write past byte n with EFBIG, whatever writes
  (Python, numpy's tofile, safetensors' Rust); Python ignores SIGXFSZ, so the write returns the error.
- `FailingFile` / `failing_open`: a real buffered file that raises ENOSPC once it would pass `limit` bytes, or
  at close (the flush of its last buffer), for the temp files of the write protocol only.
- `failing_fsync`: os.fsync raising ENOSPC for temp files or for folders.
- `small_tmpfs` / `readonly_mount`: a real small filesystem and a read-only bind mount, where this machine lets
  the test mount (root with CAP_SYS_ADMIN); `mount_error()` says why not otherwise.
- `tree_hashes` and `leftovers`: inputs byte-identical, no temp or lock file left.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import resource
import subprocess
from collections.abc import Iterator
from pathlib import Path

TMP_MARK = ".tmp-"


@contextlib.contextmanager
def file_size_limit(n: int) -> Iterator[None]:
    """Writes past byte `n` of any file fail with EFBIG in this process (and in children it starts)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (n, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


class FailingFile(io.BufferedWriter):
    """A real file (numpy's tofile writes through its descriptor) whose write raises ENOSPC once the file would
    pass `limit` bytes (the bytes that fit are written first, as a short write does), or whose close does."""

    def __init__(self, path, limit: int | None, at_close: bool):
        super().__init__(io.FileIO(path, "wb"))
        self.limit, self.at_close = limit, at_close

    def write(self, b) -> int:
        n = memoryview(b).nbytes
        if self.limit is not None and self.tell() + n > self.limit:
            room = max(self.limit - self.tell(), 0)
            super().write(bytes(memoryview(b).cast("B")[:room]))
            super().flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(b)

    def seek(self, pos: int, whence: int = 0) -> int:
        """numpy's tofile writes through the descriptor, then seeks this object to the new end: past `limit`,
        keep the bytes that fit and fail as the write would have."""
        at = super().seek(pos, whence)
        if self.limit is not None and at > self.limit:
            self.truncate(self.limit)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return at

    def close(self) -> None:
        if self.closed:
            return
        super().close()
        if self.at_close:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def failing_open(*, limit: int | None = None, at_close: bool = False, calls: list | None = None):
    """A replacement for `open` (patch it into a module's globals) that fails only for the protocol's temp files."""
    real_open = open

    def fake_open(file, mode="r", *args, **kwargs):
        if TMP_MARK in Path(file).name and "w" in mode and "b" in mode:
            if calls is not None:
                calls.append(str(file))
            return FailingFile(file, limit, at_close)
        return real_open(file, mode, *args, **kwargs)
    return fake_open


def failing_fsync(on: str, calls: list):
    """os.fsync that raises ENOSPC for the temp file ('temp') or for any folder ('folder'); others pass."""
    real_fsync = os.fsync

    def fake_fsync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        is_dir = os.path.isdir(path)
        if (on == "temp" and TMP_MARK in Path(path).name and not is_dir) or (on == "folder" and is_dir):
            calls.append(path)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)
    return fake_fsync


def tree_hashes(*paths: Path) -> dict[str, str]:
    """sha256 of every file under `paths` (files or folders), with mode and size: inputs byte-identical."""
    out = {}
    for p in paths:
        files = sorted(f for f in Path(p).rglob("*") if f.is_file()) if Path(p).is_dir() else [Path(p)]
        for f in files:
            st = f.stat()
            out[str(f)] = f"{hashlib.sha256(f.read_bytes()).hexdigest()} {st.st_size} {oct(st.st_mode)}"
    return out


def leftovers(folder: Path) -> list[str]:
    """Temp files/folders and lock files of the write protocol in `folder`."""
    return sorted(p.name for p in folder.iterdir() if TMP_MARK in p.name or p.name.endswith(".lock"))


# ---- real filesystems (mount) -------------------------------------------------------------------------
def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True)


def mount_error(scratch: Path) -> str | None:
    """None when this process may mount a tmpfs (tried on `scratch`), else why not."""
    if os.geteuid() != 0:
        return f"not root (uid {os.geteuid()})"
    scratch.mkdir(parents=True, exist_ok=True)
    r = _run("mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(scratch))
    if r.returncode != 0:
        return f"mount -t tmpfs failed: {r.stderr.strip() or r.returncode}"
    _run("umount", str(scratch))
    return None


def _umount(path: Path) -> None:
    if _run("umount", str(path)).returncode != 0:
        _run("umount", "-l", str(path))


@contextlib.contextmanager
def small_tmpfs(path: Path, size: int) -> Iterator[Path]:
    """A tmpfs of `size` bytes (rounded up to pages by the kernel) mounted on `path`."""
    path.mkdir(parents=True, exist_ok=True)
    r = _run("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
    assert r.returncode == 0, r.stderr
    try:
        yield path
    finally:
        _umount(path)


@contextlib.contextmanager
def readonly_mount(path: Path) -> Iterator[Path]:
    """`path` bind-mounted onto itself read-only: writes fail with EROFS even for root."""
    path.mkdir(parents=True, exist_ok=True)
    r = _run("mount", "--bind", str(path), str(path))
    assert r.returncode == 0, r.stderr
    try:
        r = _run("mount", "-o", "remount,bind,ro", str(path))
        assert r.returncode == 0, r.stderr
        yield path
    finally:
        _umount(path)
