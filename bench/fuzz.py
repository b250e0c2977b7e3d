"""A time-boxed, seeded fuzz campaign over every input slimlm reads (the long run of tests/test_fuzz.py).

    .venv/bin/python bench/fuzz.py [--seconds 300] [--seed 0] [--kinds gguf-struct,cli-args] [--no-full-loads]

The same hypothesis strategies and targets as the CI fuzz suite (tests/fuzz_*.py): structure-aware GGUF,
safetensors, config.json, tokenizer.json, shard index, imatrix (GGUF and legacy .dat), `slimlm inspect` on
damaged files and random `slimlm` argument lists, plus full model loads through transformers. The time is
split evenly between the kinds. Per kind it prints cases, accepted, refused, crashes (any exception that is not
a SlimlmError, or a valid input refused or read back wrong), hangs (a case over 2 s), the slowest case and the
largest tracemalloc peak of one case; then the process's peak RSS. "(late)" counts the refusals that came
from transformers or tokenizers after slimlm's own checks passed (slimlm reports them as one error too). Exit status 1 on any crash or hang, and the
first crashes are printed with their traceback.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from hypothesis import HealthCheck, Phase, Verbosity, given, seed, settings  # noqa: E402

LATE = "transformers could not load it"  # slimlm.model's message for an input a library refused


class _TimeUp(Exception):
    pass


def run_kind(kind: str, strategy, target, runner, seconds: float, seed_value: int) -> tuple[Counter, list]:
    """Cases of one kind until `seconds` pass; returns (counts, results)."""
    import warnings

    from fuzz_targets import UNTRACED
    from hypothesis.errors import HypothesisWarning
    warnings.simplefilter("ignore", HypothesisWarning)  # the time-box ends hypothesis with an exception
    counts, results = Counter(), []
    end = time.monotonic() + seconds
    attempt = 0
    while time.monotonic() < end:
        @settings(max_examples=10**9, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck), verbosity=Verbosity.quiet, derandomize=False)
        @seed(seed_value * 1000 + attempt)
        @given(strategy)
        def loop(case):
            if time.monotonic() >= end:
                raise _TimeUp
            r = runner.run(kind, target, case, trace=kind not in UNTRACED)
            counts[r.status] += 1
            results.append(r)
        try:
            loop()
        except _TimeUp:
            break
        attempt += 1  # hypothesis stopped on its own (search space exhausted): go on with another seed
    return counts, results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=300.0, help="total time budget (default 300)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the campaign (default 0)")
    ap.add_argument("--kinds", help="comma-separated input kinds (default: all)")
    ap.add_argument("--no-full-loads", action="store_true", help="skip the full transformers loads")
    ap.add_argument("--show", type=int, default=3, help="print the first N crashes in full (default 3)")
    a = ap.parse_args()

    import fuzz_inputs as fi
    import fuzz_targets as ft
    kinds = dict(ft.KINDS) | ({} if a.no_full_loads else dict(ft.FULL_LOADS))
    if a.kinds:
        want = a.kinds.split(",")
        unknown = [k for k in want if k not in kinds]
        if unknown:
            ap.error(f"unknown kinds {unknown}; known: {', '.join(kinds)}")
        kinds = {k: kinds[k] for k in want}
    runner = fi.Runner()
    ft.warm_up(runner.base / "warm-up")
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    per = a.seconds / len(kinds)
    print(f"fuzz campaign: seed {a.seed}, {a.seconds:.0f} s over {len(kinds)} kinds ({per:.0f} s each)")
    head = f"{'kind':<15} {'cases':>7} {'accepted':>9} {'refused':>8} {'(late)':>7} {'crashes':>8} " \
           f"{'hangs':>6} {'slowest s':>10} {'peak MiB':>9}"
    print(head)
    print("-" * len(head))
    total, bad = Counter(), []
    t0 = time.monotonic()
    for kind, (strategy, target) in kinds.items():
        counts, results = run_kind(kind, strategy, target, runner, per, a.seed)
        n = sum(counts.values())
        total.update(counts)
        total["cases"] += n
        bad += [r for r in results if r.status in ("crash", "hang")]
        slowest = max((r.seconds for r in results), default=0.0)
        peak = max((r.peak_bytes for r in results), default=0) / 2**20
        peak_s = f"{peak:>9.2f}" if kind not in ft.UNTRACED else f"{'-':>9}"
        late = sum(r.status == "refused" and LATE in r.detail for r in results)
        total["late"] += late
        print(f"{kind:<15} {n:>7} {counts['accepted']:>9} {counts['refused']:>8} {late:>7} {counts['crash']:>8} "
              f"{counts['hang']:>6} {slowest:>10.3f} {peak_s}", flush=True)
    print("-" * len(head))
    print(f"{'total':<15} {total['cases']:>7} {total['accepted']:>9} {total['refused']:>8} {total['late']:>7} "
          f"{total['crash']:>8} {total['hang']:>6}   in {time.monotonic() - t0:.0f} s")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print("(late): refused by transformers/tokenizers behind slimlm's checks, reported as one slimlm error")
    print(f"process peak RSS {rss / 1024:.0f} MiB (+{(rss - rss0) / 1024:.0f} MiB during the campaign); "
          f"'peak MiB' is the largest tracemalloc peak of one case ('-': not traced)")
    for r in bad[:a.show]:
        print(f"\n{r.kind}: {r.status} after {r.seconds:.2f} s\n{r.detail}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
