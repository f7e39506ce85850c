"""HTTP throughput and latency of ``addons serve`` under a real load generator, against a
bare FastAPI endpoint on the same server settings in the same run (the ceiling).

    python benchmarks/bench_http_load.py [--model DIR] [--workers 2] [--connections 1,8,32]
                                         [--duration 10] [--json out.json]

1. The model: ``--model`` (an artifact folder), else co-occurrence fitted on Complete Journey
   up to week 49 and exported. The server reads it through a symlink, as it reads a
   registry cache's ``current``.
2. ``wrk`` (Debian's package; installed with ``apt-get`` when missing) on loopback, for
   each connection count: ``POST /v1/rank`` with 200 real (household, 5-item cart, k = 5)
   bodies in turn against ``addons serve --workers N``, and the same requests against a
   bare FastAPI app (one async endpoint returning a fixed body of the same size, no
   validation, no model) run by uvicorn with the same workers, host and log settings.
3. The same load at the largest connection count while the symlink flips between two
   copies of the artifact every second (each flip is a hot reload in every worker).

Reports requests/s, p50 / p99 latency, errors (non-2xx answers and socket errors) and the
ratio to the ceiling; checks the goals (>= 50 % of the ceiling's throughput and p99 <= 20 ms
at the largest connection count, 0 errors, also during reloads). Prints a Markdown table;
exits 1 if any request failed. wrk and the servers share the machine's cores: the ratio,
measured in one run, is the number to compare across machines.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: A fixed answer of the size of a real one (5 offers), for the bare endpoint.
FIXED = json.dumps({
    "items": [{"item_id": 1000000 + i, "score": 0.5, "reason": "bought together"}
              for i in range(5)],
    "unknown_user": False, "unknown_items": [], "model_kind": "cooccurrence", "notes": [],
    "why_empty": None,
}).encode()  # fmt: skip

LUA = """
local bodies = {}
for line in io.lines("%s") do bodies[#bodies + 1] = line end
local i = 0
request = function()
  i = i %% #bodies + 1
  return wrk.format("POST", "/v1/rank", {["Content-Type"] = "application/json"}, bodies[i])
end
"""


def bare_app() -> object:
    """The ceiling: FastAPI with one endpoint that returns :data:`FIXED` (uvicorn factory)."""
    from fastapi import FastAPI
    from fastapi.responses import Response

    app = FastAPI()

    @app.post("/v1/rank")
    async def rank() -> Response:
        return Response(FIXED, media_type="application/json")

    @app.get("/readyz")
    async def ready() -> dict:
        return {"ready": True}

    return app


def ensure_wrk() -> str:
    """The path of ``wrk``, installing Debian's package first if it is missing."""
    found = shutil.which("wrk")
    if found:
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "wrk"]
    if subprocess.run(install, env=env, capture_output=True, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, check=False)
        subprocess.run(install, env=env, capture_output=True, check=True)
    found = shutil.which("wrk")
    if not found:
        raise SystemExit("wrk could not be installed (apt-get install wrk)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([0-9.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def parse_wrk(out: str) -> dict:
    """requests/s, p50 / p99 (ms), answers and errors from ``wrk --latency`` output."""

    def grab(pattern: str, default: str = "0") -> str:
        m = re.search(pattern, out)
        return m.group(1) if m else default

    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    )
    errors = int(grab(r"Non-2xx or 3xx responses: (\d+)"))
    errors += sum(int(x) for x in socket_errors.groups()) if socket_errors else 0
    return {
        "requests_per_s": float(grab(r"Requests/sec:\s+([0-9.]+)")),
        "p50_ms": round(_ms(grab(r"\n\s+50%\s+(\S+)", "0us")), 3),
        "p99_ms": round(_ms(grab(r"\n\s+99%\s+(\S+)", "0us")), 3),
        "requests": int(grab(r"(\d+) requests in")),
        "errors": errors,
    }


def run_wrk(wrk: str, port: int, script: Path, connections: int, seconds: int) -> dict:
    threads = min(connections, 2)
    proc = subprocess.run(
        [wrk, "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s", "--latency",
         "--timeout", "5s", "-s", str(script), f"http://127.0.0.1:{port}"],
        capture_output=True, text=True, check=True, timeout=seconds + 60,
    )  # fmt: skip
    return parse_wrk(proc.stdout)


class Server:
    """A server subprocess on loopback, ready when ``/readyz`` answers."""

    def __init__(self, argv: list[str], port: int, log: Path) -> None:
        self.port, self.log = port, log
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'benchmarks'}"}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        with log.open("w") as out:
            self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out,
                                         stderr=subprocess.STDOUT)  # fmt: skip

    def __enter__(self) -> Server:
        import urllib.request

        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=2):
                    return self
            except OSError:
                time.sleep(0.3)
        raise SystemExit("server not ready in 300 s")

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def flip(link: Path, copies: list[Path], stop: threading.Event, flips: list[int]) -> None:
    """Every second until ``stop``, point ``link`` at the other copy (``flips[0]`` counts)."""
    while not stop.wait(1.0):
        tmp = link.with_name(".current.tmp")
        tmp.symlink_to(copies[(flips[0] + 1) % 2])
        os.replace(tmp, link)  # atomic, as the registry cache's `current` moves
        flips[0] += 1


def build_model(folder: Path) -> tuple[Path, list[bytes]]:
    """Co-occurrence on Complete Journey up to week 49, and 200 request bodies."""
    import numpy as np

    from features.loading import DataConfig, load_dataset
    from features.splits import basket_completion_task, global_time_split
    from training.export import export_model
    from training.models import CooccurrenceRecommender

    data = load_dataset(DataConfig())
    split = global_time_split(data, 49, 50, column="week")
    train = split.train
    task = basket_completion_task(train, split.test)
    path = export_model(CooccurrenceRecommender().fit(train), train, folder / "model")
    users = train.user_map.to_external(task.users[:200]).tolist()
    bodies = []
    for r, user in enumerate(users):
        row = np.concatenate([task.carts[r].indices, task.relevant[r].indices])[:5]
        cart = train.item_map.to_external(row).tolist()
        bodies.append(json.dumps({"user_id": user, "cart": cart, "k": 5}).encode())
    return path, bodies


def bodies_for(model: Path) -> list[bytes]:
    """200 bodies for a given artifact: its first users, each with 5 of its items."""
    from serving import Ranker

    a = Ranker.load(model).artifact
    users, items = a.users.ids[:200].tolist(), a.items.ids.tolist()
    return [json.dumps({"user_id": u, "cart": items[i * 5 % len(items):][:5], "k": 5}).encode()
            for i, u in enumerate(users)]  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="artifact folder (default: CJ co-occurrence)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--connections", default="1,8,32")
    parser.add_argument("--duration", type=int, default=10, help="seconds per measurement")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    wrk = ensure_wrk()
    levels = [int(c) for c in args.connections.split(",")]
    from machine import load_note, machine_load  # benchmarks/ is on sys.path as the script's folder

    before = machine_load()
    with tempfile.TemporaryDirectory(prefix="http-load-") as tmp:
        work = Path(tmp)
        if args.model:
            source, bodies = Path(args.model).resolve(), bodies_for(Path(args.model))
        else:
            source, bodies = build_model(work)
        copies = [work / "a", work / "b"]
        for copy in copies:
            shutil.copytree(source, copy)
        link = work / "current"
        link.symlink_to(copies[0])
        (work / "bodies.txt").write_bytes(b"\n".join(bodies) + b"\n")
        script = work / "post.lua"
        script.write_text(LUA % (work / "bodies.txt"))
        n = str(args.workers)
        servers = {
            "ceiling": [sys.executable, "-m", "uvicorn", "--factory", "bench_http_load:bare_app",
                        "--workers", n, "--log-level", "warning", "--no-access-log"],
            "addons": [sys.executable, "-m", "training.cli", "serve", "--model", str(link),
                       "--workers", n, "--reload-interval", "0.5"],
        }  # fmt: skip
        results: dict = {"workers": args.workers, "duration_s": args.duration,
                         "cpus": os.cpu_count(), "runs": []}  # fmt: skip
        for name, argv in servers.items():
            port = free_port()
            argv = [*argv, "--host", "127.0.0.1", "--port", str(port)]
            with Server(argv, port, work / f"{name}.log"):
                run_wrk(wrk, port, script, 8, 2)  # warm-up
                for c in levels:
                    row = {"server": name, "connections": c, "reloads": 0,
                           **run_wrk(wrk, port, script, c, args.duration)}  # fmt: skip
                    results["runs"].append(row)
                    print(json.dumps(row), flush=True)
                if name == "addons":
                    stop, flips = threading.Event(), [0]
                    flipper = threading.Thread(target=flip, args=(link, copies, stop, flips),
                                               daemon=True)  # fmt: skip
                    flipper.start()
                    try:
                        row = run_wrk(wrk, port, script, levels[-1], args.duration)
                    finally:
                        stop.set()
                        flipper.join()
                    row = {"server": "addons during reloads", "connections": levels[-1],
                           "reloads": flips[0], **row}  # fmt: skip
                    results["runs"].append(row)
                    print(json.dumps(row), flush=True)
    results["machine"] = load_note(before, machine_load())
    ceiling = {r["connections"]: r for r in results["runs"] if r["server"] == "ceiling"}
    print(f"\n{results['machine']}; {args.workers} workers each, wrk on the same machine\n")
    print("| server | connections | requests/s | share of ceiling | p50 ms | p99 ms | errors |")
    print("|---|---|---|---|---|---|---|")
    for r in results["runs"]:
        share = r["requests_per_s"] / max(ceiling[r["connections"]]["requests_per_s"], 1e-9)
        r["share_of_ceiling"] = round(share, 3)
        label = r["server"] + (f" ({r['reloads']} reloads)" if r["reloads"] else "")
        print(f"| {label} | {r['connections']} | {r['requests_per_s']:,.0f} | {share:.0%} | {r['p50_ms']} "
              f"| {r['p99_ms']} | {r['errors']} |")  # fmt: skip
    top = levels[-1]
    ours = [
        r for r in results["runs"] if r["server"].startswith("addons") and r["connections"] == top
    ]
    results["goals"] = {
        f"throughput >= 50% of the ceiling at {top} connections":
            all(r["share_of_ceiling"] >= 0.5 for r in ours),
        f"p99 <= 20 ms at {top} connections": all(r["p99_ms"] <= 20 for r in ours),
        "0 errors (also during reloads)": all(r["errors"] == 0 for r in results["runs"]),
    }  # fmt: skip
    for goal, met in results["goals"].items():
        print(f"- {goal}: {'met' if met else 'NOT met'}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 1 if any(r["errors"] for r in results["runs"]) else 0


if __name__ == "__main__":
    sys.exit(main())
