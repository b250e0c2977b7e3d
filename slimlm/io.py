"""Safe output: temp file in the target folder -> fsync -> os.replace -> fsync folder, under a lock.

This is the write protocol of RELIABILITY.md. A reader of the final name sees either the old file, no
file, or the complete new one: never a partial write, whatever kills the process (SIGKILL included). Temp
files left by a killed process are removed by the next run on the same output (their pid is dead).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import OutputError

_TMP_RE = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)-[0-9a-f]+$")


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when both paths exist and are the same inode (hardlinks and symlinks included)."""
    try:
        sa, sb = os.stat(a), os.stat(b)
    except FileNotFoundError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def check_output_path(out: str | os.PathLike, *, overwrite: bool = False,
                      inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Validate an output path before any heavy work: folder exists and is writable, not an input."""
    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"output folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"output folder {parent} is not writable")
    for src in inputs:
        if src is not None and (same_file(out, src) or Path(out).resolve() == Path(src).resolve()):
            raise OutputError(f"output {out} is the input file {src}; choose another output path")
    if out.is_dir():
        raise OutputError(f"output {out} is a folder; give a file name")
    if out.exists() and not overwrite:
        raise OutputError(f"output {out} already exists; pass --overwrite to replace it (atomically)")
    return out


def ensure_free_space(folder: str | os.PathLike, nbytes: int) -> None:
    """Refuse up front when the folder's filesystem obviously cannot hold `nbytes` more."""
    free = shutil.disk_usage(folder).free
    if nbytes > free:
        raise OutputError(f"not enough disk space in {folder}: need about {nbytes / 2**20:.1f} MiB, "
                          f"{free / 2**20:.1f} MiB free")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(out: Path) -> list[Path]:
    """Remove temp files for `out` left by dead processes; returns what was removed."""
    removed = []
    for p in out.parent.glob(f".{out.name}.tmp-*"):
        m = _TMP_RE.match(p.name)
        if m and m["name"] == out.name and not _pid_alive(int(m["pid"])):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
    return removed


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Exclusive lock on `out` (a `.NAME.lock` file beside it); fails fast naming the holder's pid.

    flock locks die with their process, so a lock file left by a killed run is simply re-acquired.
    """
    lock_path = out.parent / f".{out.name}.lock"
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise OutputError(f"output {out} is being written by another slimlm process "
                                  f"(pid {holder}); wait for it or choose another output") from None
            raise
        # the file may have been unlinked by its previous holder between our open and flock: retry
        try:
            if os.fstat(fd).st_ino == os.stat(lock_path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_path)
        os.close(fd)


def fsync_path(path: str | os.PathLike, *, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(out: str | os.PathLike, *, overwrite: bool = False,
                  inputs: Iterable[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield a temp path beside `out`; on normal exit fsync it and rename it to `out`.

    The caller writes the temp file (and validates it) inside the `with` block. Any exception, including
    KeyboardInterrupt and the SystemExit raised by slimlm's SIGTERM handler, removes the temp file and
    leaves `out` untouched. An OSError (disk full at write, fsync or rename) becomes an OutputError.
    """
    out = check_output_path(out, overwrite=overwrite, inputs=list(inputs))
    with output_lock(out):
        clean_stale_temps(out)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            yield tmp
            if not tmp.exists():
                raise OutputError(f"internal error: nothing was written to {tmp}")
            fsync_path(tmp)
            if out.exists() and not overwrite:  # appeared while we worked (not through slimlm)
                raise OutputError(f"output {out} appeared while writing; pass --overwrite to replace it")
            os.replace(tmp, out)
            fsync_path(out.parent, directory=True)
        except OSError as e:
            raise OutputError(f"writing {out} failed: {e.strerror or e}; nothing was written "
                              f"under the final name") from e
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def atomic_write_bytes(out: str | os.PathLike, data: bytes, *, overwrite: bool = False) -> Path:
    """Write a small file (reports, JSON) with the atomic protocol."""
    with atomic_output(out, overwrite=overwrite) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return Path(out)
