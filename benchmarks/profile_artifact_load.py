"""Where an artifact's load goes: ``serving.Ranker.load`` (the call of ``addons rank-batch``
and of every server worker) under cProfile, with its wall seconds and the process's peak
and current memory (anonymous vs mapped file pages).

Usage::

    python benchmarks/profile_artifact_load.py /tmp/bench_scale/32x/artifact_ranker

Prints the load's seconds and memory, then the profile's top functions by cumulative and by
own time (``--out FILE`` also keeps the raw profile for ``pstats``/snakeviz).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serving import Ranker  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime threads")
    parser.add_argument("--top", type=int, default=30, help="functions listed per ordering")
    parser.add_argument("--out", type=Path, help="also write the raw profile here")
    args = parser.parse_args(argv)

    profile = cProfile.Profile()
    started = time.perf_counter()
    profile.enable()
    Ranker.load(args.artifact, threads=args.threads)
    profile.disable()
    seconds = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"load {seconds:.1f} s, peak RSS {peak_mb:,.0f} MB")
    with open("/proc/self/status") as fh:  # Linux: anonymous memory vs mapped file pages
        print("".join(line for line in fh if line.startswith(("VmRSS", "RssAnon", "RssFile"))))
    if args.out:
        profile.dump_stats(args.out)
    stats = pstats.Stats(profile)
    stats.sort_stats("cumulative").print_stats(args.top)
    stats.sort_stats("tottime").print_stats(args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
