"""Memory of ``POST /v1/rank/batch`` under concurrent max-size batches (issue 8, goal: 8
concurrent max-size batches stay under 1 GB above idle).

Serves an artifact exported from the full Complete Journey data (92k items; ALS by default,
whose graph takes the cart and the user) with ``addons serve`` in a subprocess, fires
``--concurrent`` batches at once, each of ``--requests`` requests (the limit, 1,000) with
``--cart``-item carts (the limit, 100) of real item ids and real households, and samples the
server's resident set size (RSS, psutil) every 10 ms. Reports, in MiB: RSS when idle (after a
warm-up request), the peak above idle, and the RSS above idle 2 s after the last response,
and the peak's ratio to the 1 GiB goal. Every response must be a 200 (exit 1 otherwise).

Modes (``--mode``; ``both`` runs ``after`` then ``before``):

- ``after``: the server as shipped, ``addons serve`` (batch chunks of
  ``serving.http.BATCH_CHUNK`` rows, at most ``BATCH_CONCURRENCY`` chunks at once in the
  process, the heap trimmed after the last batch, malloc arenas capped at 2);
- ``before``: the same app with the old batch path (the whole batch through ``rank_many`` in
  chunks of 256 rows, no limiter, no trim) under plain uvicorn without the arena cap, as
  ``addons serve`` was before;
- ``no-arena-cap``: the shipped batch path under plain uvicorn (chunks, limiter and trim,
  without the arena cap).

Usage::

    python benchmarks/bench_batch_memory.py [--mode both|after|before|no-arena-cap] [--artifact DIR]
        [--kind als] [--concurrent 8] [--requests 1000] [--cart 100] [--rounds 2]

``--artifact DIR`` reuses an exported artifact (else one is exported to a temp folder, ~1 min).
Prints JSON. Not a test: the numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import psutil  # noqa: E402

GOAL_MB = 1024.0
MODES = ("after", "before", "no-arena-cap")
#: The old batch path, as a server script: the shipped app with the old constants.
BEFORE_SERVER = """
import sys, threading, uvicorn
import serving.http as http
http.BATCH_CHUNK = 256                                   # rank_many(batch_size=256) ...
http._BATCH_SLOTS = threading.BoundedSemaphore(10_000)    # ... with no limiter
http._malloc_trim = lambda: None                          # ... and no trim
app = http.create_app(sys.argv[1], reload_interval=None)
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
"""


#: The shipped batch path without the malloc arena cap of ``addons serve`` (plain uvicorn):
#: what the chunks, the limiter and the trim do on their own.
NO_ARENA_CAP_SERVER = """
import sys, uvicorn
import serving.http as http
app = http.create_app(sys.argv[1], reload_interval=None)
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
"""


def export_artifact(kind: str, out: Path) -> Path:
    from features.loading import DataConfig, load_dataset
    from features.splits import global_time_split
    from training.config import ModelConfig, build_model
    from training.export import export_model

    data = load_dataset(DataConfig())
    train = global_time_split(data, 49, 50, column="week").train
    params = {"factors": 64, "iterations": 5} if kind == "als" else {}
    return export_model(build_model(ModelConfig(kind, params)).fit(train), train, out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def batch_bodies(artifact: Path, n: int, requests: int, cart: int) -> list[bytes]:
    users = json.loads((artifact / "users.json").read_text())["ids"]
    items = json.loads((artifact / "items.json").read_text())["ids"]
    rng = random.Random(0)
    bodies = []
    for _ in range(n):
        batch = [{"user_id": rng.choice(users), "cart": rng.sample(items, cart), "k": 5}
                 for _ in range(requests)]  # fmt: skip
        bodies.append(json.dumps({"requests": batch}, separators=(",", ":")).encode())
    return bodies


class Sampler:
    """RSS of one process every ``every`` seconds in a thread; the peak since ``reset``."""

    def __init__(self, pid: int, every: float = 0.01) -> None:
        self.proc, self.every, self.peak = psutil.Process(pid), every, 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def rss(self) -> int:
        return self.proc.memory_info().rss

    def run(self) -> None:
        while not self.stop.wait(self.every):
            try:
                self.peak = max(self.peak, self.rss())
            except psutil.Error:
                return


def measure(mode: str, artifact: Path, bodies: list[bytes], rounds: int) -> dict[str, Any]:
    port = free_port()
    if mode == "after":
        cmd = [sys.executable, "-m", "training.cli", "serve", "--model", str(artifact),
               "--port", str(port), "--reload-interval", "0"]  # fmt: skip
    else:
        script = BEFORE_SERVER if mode == "before" else NO_ARENA_CAP_SERVER
        cmd = [sys.executable, "-c", script, str(artifact), str(port)]
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    server = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            if server.poll() is not None:
                raise RuntimeError(server.stderr.read().decode()[-3000:])
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        httpx.post(f"{url}/v1/rank/batch", json={"requests": [{"cart": []}]}, timeout=60)
        time.sleep(1.0)
        sampler = Sampler(server.pid)
        idle = sampler.rss()
        out: dict[str, Any] = {"idle_mb": round(idle / 2**20, 1), "rounds": []}
        statuses: list[int] = []
        for _ in range(rounds):
            sampler.peak = sampler.rss()
            started = time.perf_counter()

            def fire(body: bytes) -> None:
                r = httpx.post(f"{url}/v1/rank/batch", content=body, timeout=600,
                               headers={"content-type": "application/json"})  # fmt: skip
                statuses.append(r.status_code)

            threads = [threading.Thread(target=fire, args=(b,)) for b in bodies]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            seconds = time.perf_counter() - started
            time.sleep(2.0)
            peak, after = sampler.peak - idle, sampler.rss() - idle
            out["rounds"].append({
                "seconds": round(seconds, 1),
                "peak_above_idle_mb": round(peak / 2**20, 1),
                "after_above_idle_mb": round(after / 2**20, 1),
                "peak_over_goal": round(peak / 2**20 / GOAL_MB, 3),
            })  # fmt: skip
        sampler.stop.set()
        out["statuses"] = sorted(set(statuses))
        out["responses"] = len(statuses)
        return out
    finally:
        server.kill()
        server.wait(timeout=10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("both", *MODES), default="both",
                        help="both = after and before")  # fmt: skip
    parser.add_argument("--artifact", type=Path, help="an exported artifact to reuse")
    parser.add_argument("--kind", default="als", help="model kind to export (default als)")
    parser.add_argument("--concurrent", type=int, default=8)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--cart", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        artifact = args.artifact or export_artifact(args.kind, Path(tmp) / args.kind)
        bodies = batch_bodies(artifact, args.concurrent, args.requests, args.cart)
        manifest = json.loads((artifact / "manifest.json").read_text())
        results: dict[str, Any] = {
            "model_kind": manifest["model_kind"], "n_items": manifest["n_items"],
            "concurrent": args.concurrent, "requests_per_batch": args.requests,
            "cart_items": args.cart, "body_kb": round(max(map(len, bodies)) / 1000, 1),
            "goal_mb": GOAL_MB,
        }  # fmt: skip
        modes = ("after", "before") if args.mode == "both" else (args.mode,)
        for mode in modes:
            results[mode] = measure(mode, artifact, bodies, args.rounds)
    print(json.dumps(results, indent=2))
    failed = any(results[m]["statuses"] != [200] for m in modes)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
