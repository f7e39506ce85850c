"""HTTP throughput and latency of ``addons serve`` under a real load generator, against a
bare FastAPI endpoint on the same server settings in the same run (the ceiling).

    python benchmarks/bench_http_load.py [--model DIR] [--workers 2] [--connections 1,8,32]
                                         [--duration 10] [--rounds 2] [--json out.json]
                                         [--stock-ceiling] [--baseline DIR]
    python benchmarks/bench_http_load.py --summary out.json [more.json ...]

1. The model: ``--model`` (an artifact folder), else co-occurrence fitted on Complete Journey
   up to week 49 and exported. The server reads it through a symlink, as it reads a
   registry cache's ``current``.
2. In one process, without sockets: milliseconds per request of the bare app, of the
   ``addons serve`` app (and, with ``--baseline``, of the app built by that checkout's
   ``serving/http.py``) and of ``Ranker.rank`` alone (what the HTTP layer costs, and what
   the ranker does), and the time of one reload candidate.
3. ``wrk`` (Debian's package; installed with ``apt-get`` when missing) on loopback:
   ``POST /v1/rank`` with 200 real (household, 5-item cart, k = 5) bodies in turn against
   ``addons serve --workers N`` and against a bare FastAPI app (one async endpoint returning
   a fixed body of the same size, no validation, no model) run by uvicorn with the same
   workers, host and log settings (the ceiling). Both servers run side by side and are
   loaded in turn, the ceiling right before ``addons serve`` at each connection count, then
   the ceiling again and ``addons serve`` at the largest connection count while the symlink
   flips between two copies of the artifact every second (each flip is a hot reload in every
   worker). All of it ``--rounds`` times. With ``--baseline DIR`` (another checkout of the
   project, e.g. ``git archive COMMIT | tar -x -C DIR``), that checkout's ``addons serve``
   is measured in the same rounds, right after this one: a before/after in one run. With
   ``--stock-ceiling``, the ceiling also runs on uvicorn's pure-Python loop and HTTP parser
   (``--loop asyncio --http h11``: what uvicorn uses without uvloop and httptools).

Reports requests/s, p50 / p99 latency, errors (non-2xx answers and socket errors) and the
ratio to the ceiling measured just before; checks the goals (>= 50 % of the ceiling's
throughput and p99 <= 20 ms at the largest connection count, 0 errors, also during reloads).
Prints a Markdown table, the machine's other CPU use and load average; exits 1 if any request
failed. wrk and the servers share the machine's cores: the ratio, measured in neighbouring
runs, is the number to compare across machines.
"""

from __future__ import annotations

import argparse
import contextlib
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

    def __init__(self, argv: list[str], port: int, log: Path, root: Path = ROOT) -> None:
        self.port, self.log = port, log
        # the project at `root` (this checkout, or --baseline's) comes first on the path
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(ROOT / "benchmarks")])}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        with log.open("w") as out:
            self.proc = subprocess.Popen(argv, cwd=root, env=env, stdout=out,
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


def _baseline_http(baseline: Path) -> object | None:
    """The baseline checkout's ``serving/http.py``, imported under another module name beside
    this checkout's (it then runs on this checkout's ranker: the difference is the HTTP
    layer's alone); None if it does not import with this checkout's other modules."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("baseline_serving_http",
                                                  baseline / "serving" / "http.py")  # fmt: skip
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic resolves the module's annotations through it
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # another layout of the project: no in-process comparison
        print(f"baseline serving/http.py does not import here ({exc!r}): not compared in process")
        return None
    return module


def inprocess_costs(model: Path, bodies: list[bytes], requests: int = 2000,
                    baseline: Path | None = None) -> dict:  # fmt: skip
    """Milliseconds per request inside one process, without sockets or a load generator: the
    bare app (the ceiling's ASGI app), the ``addons serve`` app (every layer: middleware,
    validation, ranker, metrics, access log), with ``baseline`` the same app built by that
    checkout's ``serving/http.py``, and the ranker alone (``Ranker.rank``), one request of
    each in turn, ``requests`` times; the median time of each is kept (the machine is shared:
    a median ignores the requests another process preempted). The addons app minus the
    ranker is what the HTTP layer costs."""
    import asyncio
    import logging
    import statistics

    from serving.http import configure_json_logging, create_app

    configure_json_logging()
    logging.getLogger().handlers[0].setStream(open(os.devnull, "w"))
    apps = {"ceiling app": bare_app(), "addons app": create_app(model, reload_interval=None)}
    old = _baseline_http(baseline) if baseline else None
    if old is not None:
        apps["addons app, baseline http.py"] = old.create_app(model, reload_interval=None)  # type: ignore[attr-defined]
    ranker = apps["addons app"].state.holder.ranker
    parsed = [json.loads(b) for b in bodies]

    async def call(app: object, body: bytes) -> None:
        headers = [(b"host", b"bench"), (b"content-type", b"application/json"),
                   (b"content-length", str(len(body)).encode())]  # fmt: skip
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                 "method": "POST", "scheme": "http", "path": "/v1/rank", "raw_path": b"/v1/rank",
                 "root_path": "", "query_string": b"", "headers": headers,
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}  # fmt: skip
        status = []

        async def receive() -> dict:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])

        await app(scope, receive, send)  # type: ignore[operator]
        if status != [200]:
            raise SystemExit(f"in-process request answered {status}: {body[:200]!r}")

    async def measure() -> dict:
        for i in range(50):  # warm-up
            for app in apps.values():
                await call(app, bodies[i % len(bodies)])
        times: dict[str, list[float]] = {name: [] for name in [*apps, "ranker alone"]}
        # one request of each in turn: a burst of other work on the machine hits all three
        for i in range(requests):
            for name, app in apps.items():
                started = time.perf_counter()
                await call(app, bodies[i % len(bodies)])
                times[name].append(time.perf_counter() - started)
            started = time.perf_counter()
            ranker.rank(**parsed[i % len(parsed)])
            times["ranker alone"].append(time.perf_counter() - started)
        out = {name: round(statistics.median(t) * 1000, 4) for name, t in times.items()}
        # what each worker does on every hot reload: load, verify and probe a candidate
        holder = apps["addons app"].state.holder
        wall, cpu = time.perf_counter(), time.process_time()
        holder._candidate()
        out["reload candidate wall"] = round((time.perf_counter() - wall) * 1000, 1)
        out["reload candidate cpu"] = round((time.process_time() - cpu) * 1000, 1)
        return out

    return asyncio.run(measure())


def summary(files: list[Path]) -> str:
    """A Markdown table over every round of the given ``--json`` results: per server and
    connection count, the lowest and highest requests/s, share of the ceiling, p50 and p99, and
    the errors summed (a range, not a mean: on a shared machine the spread is the finding)."""
    rows: dict[tuple[str, int], list[dict]] = {}
    for n, file in enumerate(files):
        runs = json.loads(file.read_text())["runs"]
        pairs = {(r["round"], r["server"], r["connections"]): r for r in runs}
        for r in runs:
            # addons over the baseline checkout measured in the same round (paired: the
            # machine's load drifts less within a round than between rounds)
            base = pairs.get((r["round"], r["server"].replace("addons", "addons baseline", 1),
                              r["connections"]))  # fmt: skip
            if r["server"].startswith("addons") and "baseline" not in r["server"] and base:
                r = {**r, "vs_baseline": r["requests_per_s"] / max(base["requests_per_s"], 1e-9)}
            rows.setdefault((r["server"], r["connections"]), []).append({**r, "file": n})

    def span(group: list[dict], key: str, fmt: str) -> str:
        low, high = min(r[key] for r in group), max(r[key] for r in group)
        return fmt.format(low) if fmt.format(low) == fmt.format(high) else \
            f"{fmt.format(low)}-{fmt.format(high)}"  # fmt: skip

    lines = ["| server | connections | rounds | requests/s | share of ceiling | p50 ms | p99 ms "
             "| errors | requests/s vs baseline, same round |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for (server, c), group in rows.items():
        reloads = sum(r["reloads"] for r in group)
        label = server + (f" ({reloads} reloads in all)" if reloads else "")
        paired = [r for r in group if "vs_baseline" in r]
        versus = span(paired, "vs_baseline", "{:.2f}x") if paired else ""
        lines.append(f"| {label} | {c} | {len(group)} | {span(group, 'requests_per_s', '{:,.0f}')} "
                     f"| {span(group, 'share_of_ceiling', '{:.0%}')} | {span(group, 'p50_ms', '{:.2f}')} "
                     f"| {span(group, 'p99_ms', '{:.0f}')} | {sum(r['errors'] for r in group)} "
                     f"| {versus} |")  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="artifact folder (default: CJ co-occurrence)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--connections", default="1,8,32")
    parser.add_argument("--duration", type=int, default=10, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=2, help="times every row is measured")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--stock-ceiling", action="store_true", help="also measure the ceiling "
                        "on uvicorn's pure-Python loop and parser (asyncio, h11)")  # fmt: skip
    parser.add_argument("--baseline", default=None, help="another checkout of the project (e.g. "
                        "`git archive COMMIT | tar -x -C DIR`): its `addons serve` is measured "
                        "too, in the same rounds")  # fmt: skip
    parser.add_argument("--summary", nargs="+", default=None, metavar="JSON",
                        help="only print the table over every round of these --json files")  # fmt: skip
    args = parser.parse_args()
    if args.summary:
        print(summary([Path(f) for f in args.summary]))
        return 0
    wrk = ensure_wrk()
    levels = [int(c) for c in args.connections.split(",")]
    top = levels[-1]
    from machine import load_note, machine_load  # benchmarks/ is on sys.path as the script's folder

    before, loadavg_before = machine_load(), os.getloadavg()
    baseline = Path(args.baseline).resolve() if args.baseline else None
    with tempfile.TemporaryDirectory(prefix="http-load-") as tmp:
        work = Path(tmp)
        if args.model:
            source, bodies = Path(args.model).resolve(), bodies_for(Path(args.model))
        else:
            source, bodies = build_model(work)
        (work / "bodies.txt").write_bytes(b"\n".join(bodies) + b"\n")
        script = work / "post.lua"
        script.write_text(LUA % (work / "bodies.txt"))
        results: dict = {"workers": args.workers, "duration_s": args.duration,
                         "rounds": args.rounds, "cpus": os.cpu_count(), "runs": [],
                         "in_process_ms": inprocess_costs(source, bodies, baseline=baseline)}  # fmt: skip
        print(json.dumps({"in_process_ms": results["in_process_ms"]}), flush=True)
        n = str(args.workers)
        servers: dict[str, dict] = {"ceiling": {
            "argv": [sys.executable, "-m", "uvicorn", "--factory", "bench_http_load:bare_app",
                     "--workers", n, "--log-level", "warning", "--no-access-log"], "root": ROOT}}  # fmt: skip
        if args.stock_ceiling:  # what uvicorn uses without uvloop / httptools
            servers["ceiling, asyncio + h11"] = {
                "argv": [*servers["ceiling"]["argv"], "--loop", "asyncio", "--http", "h11"],
                "root": ROOT}  # fmt: skip
        roots = {"addons": ROOT}
        if baseline is not None:
            roots["addons baseline"] = baseline
        for name, root in roots.items():
            # each addons server has its own link and copies: a flip reloads only the server
            # under load, not an idle one beside it
            folder = work / name.replace(" ", "_")
            copies = [folder / "a", folder / "b"]
            for copy in copies:
                shutil.copytree(source, copy)
            link = folder / "current"
            link.symlink_to(copies[0])
            argv = [sys.executable, "-m", "training.cli", "serve", "--model", str(link),
                    "--workers", n, "--reload-interval", "0.5"]  # fmt: skip
            servers[name] = {"argv": argv, "root": root, "link": link, "copies": copies}
        for name, server in servers.items():
            server["port"] = free_port()
            server["process"] = Server([*server["argv"], "--host", "127.0.0.1", "--port",
                                        str(server["port"])], server["port"],
                                       work / f"{name.replace(' ', '_')}.log", server["root"])  # fmt: skip

        def load(rnd: int, name: str, c: int, reloads: bool = False) -> None:
            server, flips = servers[name], [0]
            stop = threading.Event()
            if reloads:
                flipper = threading.Thread(target=flip, daemon=True,
                                           args=(server["link"], server["copies"], stop, flips))  # fmt: skip
                flipper.start()
            try:
                row = run_wrk(wrk, server["port"], script, c, args.duration)
            finally:
                if reloads:
                    stop.set()
                    flipper.join()
            label = f"{name} during reloads" if reloads else name
            row = {"round": rnd, "server": label, "connections": c, "reloads": flips[0], **row}
            results["runs"].append(row)
            print(json.dumps(row), flush=True)

        # The servers run side by side for the whole benchmark and are loaded in turn, the
        # ceiling right before the servers compared with it: on a shared machine the load of
        # other work drifts within minutes, so each ratio comes from neighbouring measurements.
        with contextlib.ExitStack() as running:
            for server in servers.values():
                running.enter_context(server["process"])
                run_wrk(wrk, server["port"], script, 8, 2)  # warm-up
            for rnd in range(1, args.rounds + 1):
                for c in levels:
                    for name in servers:
                        load(rnd, name, c)
                for name in servers:
                    load(rnd, name, top, reloads=name.startswith("addons"))
    results["machine"] = load_note(before, machine_load())
    results["loadavg"] = {"before": [round(x, 2) for x in loadavg_before],
                          "after": [round(x, 2) for x in os.getloadavg()]}  # fmt: skip
    ip = results["in_process_ms"]
    print(f"\n{results['machine']}\nload average (1, 5, 15 min) {results['loadavg']['before']} "
          f"before, {results['loadavg']['after']} after; {args.workers} workers each, wrk on the "
          "same machine\n")  # fmt: skip
    old = ip.get("addons app, baseline http.py")
    print(f"In one process, no sockets (median of 2,000 requests each, in turn), ms per request: "
          f"ceiling app {ip['ceiling app']}, addons app {ip['addons app']}"
          + (f", addons app with the baseline's serving/http.py {old}" if old else "")
          + f", ranker alone {ip['ranker alone']} ({ip['ranker alone'] / ip['addons app']:.0%} of "
          f"the addons app); one reload candidate (load, verify, probe) "
          f"{ip['reload candidate wall']} ms, {ip['reload candidate cpu']} ms of CPU, in every "
          "worker\n")  # fmt: skip
    print(
        "| round | server | connections | requests/s | share of ceiling | p50 ms | p99 ms | errors |"
    )
    print("|---|---|---|---|---|---|---|---|")
    ceiling: dict = {}
    for r in results["runs"]:
        if r["server"] == "ceiling":
            ceiling[r["round"], r["connections"]] = r  # the latest: the one right before
        base = ceiling[r["round"], r["connections"]]["requests_per_s"]
        r["share_of_ceiling"] = round(r["requests_per_s"] / max(base, 1e-9), 3)
        label = r["server"] + (f" ({r['reloads']} reloads)" if r["reloads"] else "")
        print(f"| {r['round']} | {label} | {r['connections']} | {r['requests_per_s']:,.0f} "
              f"| {r['share_of_ceiling']:.0%} | {r['p50_ms']} | {r['p99_ms']} | {r['errors']} |")  # fmt: skip
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
        print(f"\nOver the rounds:\n\n{summary([Path(args.json)])}")
    return 1 if any(r["errors"] for r in results["runs"]) else 0


if __name__ == "__main__":
    sys.exit(main())
