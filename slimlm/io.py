"""Safe output: temp file (or folder) in the target folder -> fsync -> os.replace -> fsync folder, under a lock.

This is the write protocol of RELIABILITY.md. A reader of the final name sees either the old output, no
output, or the complete new one: never a partial write, whatever kills the process (SIGKILL included). Temp
files and folders left by a killed process are removed by the next run on the same output (their pid is
dead); its lock file is simply taken again (flock locks die with their process).

Whether the output folder is writable is tried, not asked: `os.access` says yes to root in a read-only
folder and knows nothing of read-only mounts, so `check_output_path` creates and removes a temp file there.
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


def temp_name(out: Path) -> Path:
    """`.NAME.tmp-PID-RAND` beside `out`: the one pattern `clean_stale_temps` recognizes."""
    return out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"


def _why(e: OSError) -> str:
    return e.strerror or str(e)


def probe_writable(folder: Path, out: Path) -> None:
    """Create and remove a temp file in `folder`: a read-only mount (EROFS), a folder without write permission
    (EACCES, also for root on some filesystems) or a full inode table is an OutputError now, before heavy work."""
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"output folder {folder} is not writable")
    probe = folder / temp_name(out).name
    with _signals_deferred():      # a Ctrl-C or SIGTERM between create and unlink would leave the probe behind
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as e:
            raise OutputError(f"output folder {folder} is not writable: {_why(e)} (creating {probe.name})") from None
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(probe)


@contextlib.contextmanager
def _signals_deferred():
    """SIGINT and SIGTERM held back (delivered on exit) where the platform can block signals."""
    import signal
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _check_not_input(out: Path, inputs: Iterable[str | os.PathLike | None]) -> None:
    for src in inputs:
        if src is not None and (same_file(out, src) or out.resolve() == Path(src).resolve()):
            raise OutputError(f"output {out} is the input {src}; choose another output path")


def check_output_path(out: str | os.PathLike, *, overwrite: bool = False,
                      inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Validate an output file path before any heavy work: folder exists and is writable, not an input."""
    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"output folder {parent} does not exist; create it first")
    _check_not_input(out, inputs)
    if out.is_dir():
        raise OutputError(f"output {out} is a folder; give a file name")
    if out.exists() and not overwrite:
        raise OutputError(f"output {out} already exists; pass --overwrite to replace it (atomically)")
    probe_writable(parent, out)
    return out


def check_output_folder(out: str | os.PathLike, *, overwrite: bool = False,
                        inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Validate an output folder (an HF model) before heavy work: not a file, not an input, empty or
    --overwrite, and its parent writable (missing parents are created when the folder is written)."""
    out = Path(out)
    _check_not_input(out, inputs)
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"output folder {out} exists and is not empty; pass --overwrite to replace it "
                          f"(atomically)")
    parent = out.parent if str(out.parent) else Path(".")
    existing = next(p for p in [parent, *parent.parents] if p.exists())
    if not existing.is_dir():
        raise OutputError(f"{existing} is a file; cannot create the output folder {out} under it")
    probe_writable(existing, out)
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


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def clean_stale_temps(out: Path) -> list[Path]:
    """Remove temp files and folders for `out` left by dead processes; returns what was removed."""
    removed = []
    for p in out.parent.glob(f".{out.name}.tmp-*"):
        m = _TMP_RE.match(p.name)
        if m and m["name"] == out.name and not _pid_alive(int(m["pid"])):
            _remove(p)
            removed.append(p)
    return removed


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Exclusive lock on `out` (a `.NAME.lock` file beside it); fails fast naming the holder's pid.

    flock locks die with their process, so a lock file left by a killed run is simply re-acquired.
    """
    lock_path = out.parent / f".{out.name}.lock"
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutputError(f"cannot create the lock file {lock_path}: {_why(e)}") from None
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
        with contextlib.suppress(OSError):
            os.unlink(lock_path)
        os.close(fd)


def fsync_path(path: str | os.PathLike, *, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _failed(out: Path, e: OSError) -> OutputError:
    why = _why(e)
    if e.errno is None:          # numpy's tofile: "N requested and M written", no errno
        with contextlib.suppress(OSError):
            why += f" ({shutil.disk_usage(out.parent).free / 2**20:.1f} MiB free in {out.parent})"
    return OutputError(f"writing {out} failed: {why}; nothing was written under the final name")


def _fsync_renamed(out: Path) -> None:
    """fsync the folder after the rename; a failure now leaves a complete output whose rename may not be durable."""
    try:
        fsync_path(out.parent, directory=True)
    except OSError as e:
        raise OutputError(f"{out} is complete, but the fsync of its folder {out.parent} failed: {_why(e)}; the "
                          f"rename may not survive a power loss") from e


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
        tmp = temp_name(out)
        try:
            yield tmp
            if not tmp.exists():
                raise OutputError(f"internal error: nothing was written to {tmp}")
            fsync_path(tmp)
            if out.exists() and not overwrite:  # appeared while we worked (not through slimlm)
                raise OutputError(f"output {out} appeared while writing; pass --overwrite to replace it")
            os.replace(tmp, out)
        except OSError as e:
            raise _failed(out, e) from e
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
        _fsync_renamed(out)


@contextlib.contextmanager
def atomic_folder(out: str | os.PathLike, *, overwrite: bool = False,
                  inputs: Iterable[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield an empty temp folder beside `out`; on normal exit fsync its files and rename it to `out`.

    The caller writes every file of the folder (and validates them) inside the `with` block, so a reader sees
    the old folder, none, or the complete new one: never a folder with some files missing. An existing
    non-empty `out` (only with `overwrite`) is first renamed to a temp name and removed after the new one is in
    place; a kill between the two renames leaves no `out` and two temp folders that the next run removes.
    """
    out = check_output_folder(out, overwrite=overwrite, inputs=list(inputs))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _failed(out, e) from e
    with output_lock(out):
        clean_stale_temps(out)
        tmp, old = temp_name(out), None
        try:
            tmp.mkdir()
            yield tmp
            for f in tmp.iterdir():
                fsync_path(f, directory=f.is_dir())
            fsync_path(tmp, directory=True)
            if out.is_dir() and any(out.iterdir()):
                if not overwrite:
                    raise OutputError(f"output folder {out} was filled while writing; pass --overwrite to "
                                      f"replace it")
                old = temp_name(out)
                os.rename(out, old)
            try:
                os.rename(tmp, out)          # replaces an empty folder
            except OSError:
                if old is not None:
                    os.rename(old, out)      # put the old folder back
                    old = None
                raise
        except OSError as e:
            raise _failed(out, e) from e
        finally:
            for p in (tmp, old):
                if p is not None:
                    shutil.rmtree(p, ignore_errors=True)
        _fsync_renamed(out)


def atomic_write_bytes(out: str | os.PathLike, data: bytes, *, overwrite: bool = False) -> Path:
    """Write a small file (reports, JSON) with the atomic protocol."""
    with atomic_output(out, overwrite=overwrite) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return Path(out)
