"""In-process ``rank-batch`` vs ``rank-batch --engine spark --master local[2]`` (issue 12).

Both rank the same Parquet of requests with the same artifact into Parquet, each as an
``addons rank-batch`` subprocess; the peak memory is the largest sum of the resident sets of
the whole process tree (driver, JVM, Python workers), sampled every 0.1 s with psutil. The
outputs are checked identical (same rows, same order). Reports users/s, seconds, peak MB and
the Spark / in-process time ratio.

Usage::

    python benchmarks/bench_spark_batch.py --artifact DIR [--users 100000] [--cart-every 3]

The requests are the artifact's own households in id order, repeated up to ``--users``,
every ``--cart-every``-th with a 3-item cart of artifact items. ``--artifact`` is e.g. the
co-occurrence artifact ``benchmarks/bench_scale.py`` exports (``/tmp/bench_scale/1x/artifact``).
Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run(cmd: list[str]) -> dict:
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})  # fmt: skip
    ps, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(ps))
        time.sleep(0.1)
    seconds = time.perf_counter() - t
    out, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err.decode()[-3000:]}")
    return {"seconds": round(seconds, 2), "peak_mb": round(peak / 2**20),
            "report": json.loads(out.decode())}  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--artifact", required=True)
    p.add_argument("--users", type=int, default=100_000)
    p.add_argument("--cart-every", type=int, default=3)
    p.add_argument("--master", default="local[2]")
    p.add_argument("--work", default=None)
    args = p.parse_args()
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    art = Path(args.artifact)
    users = json.loads((art / "users.json").read_text())["ids"]
    items = json.loads((art / "items.json").read_text())["ids"]
    rng = np.random.default_rng(0)
    ids = [str(users[n % len(users)]) for n in range(args.users)]
    carts = [[str(items[i]) for i in rng.integers(0, len(items), 3)] if n % args.cart_every == 0
             else [] for n in range(args.users)]  # fmt: skip
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-spark-"))
    work.mkdir(parents=True, exist_ok=True)
    requests = work / "requests.parquet"
    # One file in row groups of 10,000 requests: Spark cuts it into ~2 x slots splits at
    # row-group boundaries (serving.spark_batch), so every core gets work, in input order.
    pq.write_table(pa.table({"user_id": ids, "cart": carts}), requests, row_group_size=10_000)
    addons = str(Path(sys.executable).with_name("addons"))
    base = [addons, "rank-batch", "--model", str(art), "--users", str(requests), "--k", "10",
            "--quiet", "--json"]  # fmt: skip
    local = run([*base, "--out", str(work / "local.parquet")])
    spark = run([*base, "--out", str(work / "spark"), "--engine", "spark", "--master", args.master])
    expected = pq.read_table(work / "local.parquet")
    parts = sorted((work / "spark").glob("part-*.parquet"))
    got = pa.concat_tables([pq.read_table(f) for f in parts])
    identical = got.to_pylist() == expected.to_pylist()
    result = {
        "users": args.users, "artifact": str(art), "master": args.master,
        "in_process": {**local, "users_per_s": round(args.users / local["seconds"])},
        "spark": {**spark, "users_per_s": round(args.users / spark["seconds"]), "parts": len(parts)},
        "spark_over_in_process_time": round(spark["seconds"] / local["seconds"], 2),
        "identical_output": identical, "cpus": os.cpu_count(),
    }  # fmt: skip
    print(json.dumps(result, indent=1))
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
