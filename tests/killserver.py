"""kill -9 harness for test_kill.py: run slimlm commands in child processes and SIGKILL them at random moments.

Run as `python tests/killserver.py < config.json`. The server imports slimlm, torch and numba once and runs
every command once in-process (compiled kernels loaded, lazy imports done); then each run is a child made by
fork(): a separate process with its own pid, temp files and lock, killed with SIGKILL like any other. Only the
~3 s of interpreter and library start-up are shared, so 30+ kills with a rerun after each fit in CI time. All
threads are 1 (set before the imports), so nothing is half-way through a parallel region at a fork.

Per command: one timed run measures its duration T and when its output lock and its temp file appear (the
write phase, and the bytes being written; refined by every later complete run, as the machine's load varies).
Then `kills` times: the outputs are removed (every other time, so kills land both on a fresh output and on the
replacement of an existing one), the command starts and is killed after a delay drawn from a seeded RNG: in
turn uniform over (0, 0.9 T), or, once the lock (or the temp file) appears, uniform over 0.9 of the rest of a
run. The output folder is inspected, and the same command runs again to completion. One JSON line per kill
goes to stdout (after `KILLREC `); a run that ends before its delay is not counted as a kill.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import shutil
import signal
import statistics
import sys
import time
import traceback
from pathlib import Path

for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_v] = "1"

import torch  # noqa: E402

torch.set_num_threads(1)

from slimlm import cli  # noqa: E402
from slimlm.gguf.reader import read_gguf  # noqa: E402
from slimlm.gguf.writer import check_tensor_finite  # noqa: E402
from slimlm.hf import check_hf_dir  # noqa: E402

TIMEOUT = 300.0
MARK = "KILLREC "


def emit(record: dict) -> None:
    """One record on stdout, marked (the warm-up runs print their own summaries there too)."""
    print(MARK + json.dumps(record), flush=True)


def digest(path: Path) -> str:
    """sha256 of a file, or of every file of a folder (names included)."""
    h = hashlib.sha256()
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def inputs_digest(paths: list[str]) -> str:
    return hashlib.sha256("".join(digest(Path(p)) for p in paths).encode()).hexdigest()


def check_output(out: Path, kind: str, ref: str | None) -> str:
    """'absent', 'valid' (complete: strict read-back, and the bytes of the reference run), or what is wrong."""
    if not out.exists():
        return "absent"
    try:
        if kind == "gguf":
            g = read_gguf(out)
            for t in g.tensors:
                check_tensor_finite(g.raw(t), t.ggml_type, t.shape, t.name)
        else:
            check_hf_dir(out)
    except Exception as e:  # noqa: BLE001 - any failure to read back is a partial output
        return f"INVALID: {type(e).__name__}: {e}"
    if ref is not None and digest(out) != ref:
        return "INVALID: readable, but not the bytes of a complete run"
    return "valid"


def reports_ok(paths: list[Path]) -> str:
    for p in paths:
        if p.exists():
            try:
                json.loads(p.read_text()) if p.suffix == ".json" else p.read_text()
            except ValueError as e:
                return f"INVALID report {p.name}: {e}"
    return "ok"


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or p.name.endswith(".lock"))


def start(argv: list[str], log: int) -> int:
    pid = os.fork()
    if pid == 0:                                    # the child: one slimlm run, then exit with its status
        rc = 99
        try:
            os.dup2(log, 1)
            os.dup2(log, 2)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            rc = cli.main(["-q", *argv])
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
        except BaseException:  # noqa: BLE001
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc)
    return pid


def wait(pid: int, watches: dict, *, until: float | None = None,
         stop_at: str | None = None) -> tuple[int | None, dict[str, float]]:
    """Wait for the child: to its end, to `until` (monotonic clock) or until watch `stop_at` is seen. Returns (exit
    status, or None while it runs; the first moment each watch, a () -> bool, held)."""
    seen: dict[str, float] = {}
    deadline = time.monotonic() + TIMEOUT
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        now = time.monotonic()
        for k, held in watches.items():
            if k not in seen and held():
                seen[k] = now
        if done:
            return os.waitstatus_to_exitcode(status), seen
        if (until is not None and now >= until) or (stop_at is not None and stop_at in seen) or now > deadline:
            return None, seen
        time.sleep(0.001)


def run_command(c: dict, rng: random.Random, kills: int, log: int, inputs: list[str], in0: str) -> None:
    out, kind = Path(c["out"]), c["kind"]
    argv = c["argv"] + ["--overwrite"]
    reports = [Path(p) for p in c["reports"]]
    lock = out.parent / f".{out.name}.lock"
    # the write phase: from the output lock; the bytes: from the temp file (or folder) while the lock is held
    watches = {"lock": lock.exists, "temp": lambda: lock.exists() and any(out.parent.glob(f".{out.name}.tmp-*"))}

    def timed_run() -> tuple[int | None, dict[str, float]]:
        t0 = time.monotonic()
        rc, seen = wait(start(argv, log), watches)
        return rc, {"end": time.monotonic() - t0, **{k: v - t0 for k, v in seen.items()}}

    assert cli.main(["-q", *argv]) == 0                                  # warm: kernels, lazy imports
    rc, timing = timed_run()
    ref = digest(out)
    assert rc == 0, f"{c['name']}: timed run exit status {rc}"
    history = [timing]                          # every complete run refines the timing (the load varies)
    emit({"timing": c["name"], **{k: round(v, 3) for k, v in timing.items()}})
    done = attempts = 0
    while done < kills and attempts < 4 * kills:
        attempts += 1
        T = statistics.median(h["end"] for h in history[-5:])
        fresh, phase = done % 2 == 0, ("run", "lock", "temp")[done % 3]
        if fresh:
            for p in [out, *reports]:
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
        t0 = time.monotonic()
        pid = start(argv, log)
        if phase == "run":
            delay = rng.uniform(0.0, 0.9 * T)
            rc, _ = wait(pid, {}, until=t0 + delay)
        else:       # anchored where the phase begins: the machine's load moves it around
            rest = statistics.median(h["end"] - h.get(phase, 0.0) for h in history[-5:])
            rc, seen = wait(pid, watches, stop_at=phase)
            delay = rng.uniform(0.0, 0.9 * max(rest, 0.01))
            if rc is None:
                rc, _ = wait(pid, {}, until=time.monotonic() + delay)
            delay += seen.get(phase, 0.0) - t0 if phase in seen else 0.0
        if rc is None:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
        if rc is not None or not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL):
            continue                                # it ended before the kill: not a kill
        rec = {"cmd": c["name"], "phase": phase, "delay": round(delay, 3), "T": round(T, 3), "fresh": fresh,
               "after_kill": check_output(out, kind, ref), "reports_after_kill": reports_ok(reports),
               "temps_after_kill": [n for n in leftovers(out.parent) if ".tmp-" in n],
               "lock_after_kill": lock.exists()}
        rec["rerun_rc"], timing = timed_run()
        history.append(timing)
        rec["rerun_s"] = round(timing["end"], 3)
        rec["after_rerun"] = check_output(out, kind, ref)
        rec["reports_after_rerun"] = reports_ok(reports) if all(p.exists() for p in reports) else "missing"
        rec["leftovers_after_rerun"] = leftovers(out.parent)
        rec["inputs_identical"] = inputs_digest(inputs) == in0
        emit(rec)
        done += 1


def main() -> None:
    cfg = json.loads(sys.stdin.readline())
    rng = random.Random(cfg["seed"])
    log = os.open(cfg["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    in0 = inputs_digest(cfg["inputs"])
    for c in cfg["commands"]:
        run_command(c, rng, cfg["kills"], log, cfg["inputs"], in0)
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    emit({"done": True, "cpu_server_s": round(me.ru_utime + me.ru_stime, 1),
          "cpu_runs_s": round(kids.ru_utime + kids.ru_stime, 1)})


if __name__ == "__main__":
    main()
