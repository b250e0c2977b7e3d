"""kill -9 at >= 30 random moments of `slimlm compress` (RTN with an importance matrix; GPTQ) and `slimlm prune`
(to a GGUF; to an HF folder) on a tiny random model (RELIABILITY.md item 27).

After every kill: nothing under the final name unless it is complete (strict read-back, and the very bytes a
complete run writes), reports absent or whole; then the same command runs again and succeeds, its stale temp
files and lock recovered, no `.tmp-`/`.lock` file left, the inputs byte-identical. The runs are forked children
of a warmed interpreter (tests/killserver.py: a real process each, killed by SIGKILL; only start-up is shared),
two commands at a time on the 2 cores, so the 32 kills and 32 reruns take about a minute.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

KILLS = 8                      # per command, 4 commands
SERVER = Path(__file__).with_name("killserver.py")


def _lanes(src: Path, calib: Path, tmp: Path) -> list[list[dict]]:
    common = ["--calib", str(calib), "--ctx", "64", "--calib-chunks", "2", "--no-eval"]
    prune = ["--method", "mlp", "--ffn", "64", *common]

    def cmd(name: str, argv: list[str], out: Path, kind: str) -> dict:
        out.parent.mkdir()
        j = out.with_suffix(".report.json") if kind == "gguf" else out.with_name(out.name + ".report.json")
        return {"name": name, "argv": [str(a) for a in argv], "out": str(out), "kind": kind,
                "reports": [str(j), str(j.with_suffix("").with_suffix(".report.md"))]}
    return [[cmd("compress rtn+imatrix", ["compress", src, "-o", tmp / "rtn" / "o.gguf", "--type", "Q4_0", *common],
                 tmp / "rtn" / "o.gguf", "gguf"),
             cmd("compress gptq", ["compress", src, "-o", tmp / "gptq" / "o.gguf", "--type", "Q4_0", "--method",
                                   "gptq", "--gptq-chunks", "2", *common], tmp / "gptq" / "o.gguf", "gguf")],
            [cmd("prune gguf", ["prune", src, "-o", tmp / "pg" / "p.gguf", "--type", "Q8_0", *prune],
                 tmp / "pg" / "p.gguf", "gguf"),
             cmd("prune hf", ["prune", src, "-o", tmp / "ph" / "hf", *prune], tmp / "ph" / "hf", "hf")]]


def test_kill9_at_random_moments_never_leaves_a_partial_output(tiny_hf, tmp_path):
    src = tiny_hf("LlamaForCausalLM")
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"word{i % 89} text{i % 11} and the model" for i in range(2000)))
    procs = []
    for i, lane in enumerate(_lanes(src, calib, tmp_path)):
        cfg = {"seed": 1234 + i, "kills": KILLS, "inputs": [str(src), str(calib)], "commands": lane,
               "log": str(tmp_path / f"lane{i}.log")}
        p = subprocess.Popen([sys.executable, str(SERVER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=open(tmp_path / f"lane{i}.err", "w"), text=True,
                             env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
        p.stdin.write(json.dumps(cfg) + "\n")
        p.stdin.close()
        procs.append(p)
    lines = []
    for i, p in enumerate(procs):
        lines += [json.loads(ln[len("KILLREC "):]) for ln in p.stdout.read().splitlines() if ln.startswith("KILLREC ")]
        assert p.wait(600) == 0, (tmp_path / f"lane{i}.err").read_text()[-3000:] + \
            (tmp_path / f"lane{i}.log").read_text()[-3000:]
    kills = [r for r in lines if "cmd" in r]
    if os.environ.get("SLIMLM_KILL_RECORDS"):          # every kill's record, for a report
        Path(os.environ["SLIMLM_KILL_RECORDS"]).write_text(json.dumps(lines, indent=1))
    timing = {r["timing"]: r for r in lines if "timing" in r}
    print("\nCPU seconds:", [(r["cpu_server_s"], r["cpu_runs_s"]) for r in lines if "done" in r])
    print("\ntimed runs (s: end, lock, temp):", {k: (v["end"], v.get("lock"), v.get("temp")) for k, v in timing.items()})
    partial = [r for r in kills if r["after_kill"].startswith("INVALID") or r["reports_after_kill"] != "ok"]
    failed_rerun = [r for r in kills if r["rerun_rc"] != 0 or r["after_rerun"] != "valid"
                    or r["reports_after_rerun"] != "ok"]
    left = [r for r in kills if r["leftovers_after_rerun"]]
    touched = [r for r in kills if not r["inputs_identical"]]
    print(f"kill -9: {len(kills)} kills ({dict(Counter(r['cmd'] for r in kills))}); output after the kill: "
          f"{dict(Counter(r['after_kill'].split(':')[0] for r in kills))}; by phase "
          f"{dict(Counter(r['phase'] for r in kills))}; temp files left by the kill (cleaned by "
          f"the rerun): {sum(bool(r['temps_after_kill']) for r in kills)}; stale locks recovered: "
          f"{sum(r['lock_after_kill'] for r in kills)}; partial outputs: {len(partial)}; failed reruns: "
          f"{len(failed_rerun)}; leftover temp/lock files after reruns: {len(left)}; inputs changed: {len(touched)}")
    assert len(kills) >= 30
    assert partial == [] and failed_rerun == [] and left == [] and touched == []
    # the kills covered the write itself, not only the computation before it
    assert sum(bool(r["temps_after_kill"]) or r["lock_after_kill"] for r in kills) >= 8
    assert {r["after_kill"] for r in kills} >= {"absent", "valid"}
