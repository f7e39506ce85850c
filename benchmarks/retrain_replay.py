"""Replay weekly retraining on Complete Journey with serving following the champion alias.

    python benchmarks/retrain_replay.py [--config configs/cj_addon.yaml] [--steps 40,43,46,49]
                                        [--sabotage-at 51] [--work DIR]

1. ``addons retrain --as-of <first step>`` into a fresh SQLite store: no champion yet, so the
   challenger is promoted (above the baseline floor).
2. ``addons serve --model models:/NAME@champion --reload-interval 1`` starts, and a client
   thread fires ``POST /v1/rank`` requests (real households, a cart of their items) until
   the end, counting every non-200 answer or error.
3. Each next step retrains as of that week; when it promotes, the time from the end of
   the retrain (the alias move is its last write) to the server answering ``/v1/model``
   with the new artifact is the promotion latency.
4. A step as of ``--sabotage-at`` retrains a deliberately broken config (the model
   replaced by global popularity) that must be refused, and a last one is fed stale data
   (as of the first step again: nothing newer than the champion's) and must fail the
   ``newer_than_champion`` data gate with exit 3, before anything is trained.

Prints one row per step (Markdown) and writes ``replay.json`` into the work folder.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAME = "cj-replay"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def retrain(config: str, uri: str, as_of: int, env: dict, *extra: str) -> tuple[int, dict, float]:
    """One ``addons retrain --json``: (exit code, report, wall seconds)."""
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "training.cli", "retrain", "--config", config, "--model-name",
         NAME, "--tracking-uri", uri, "--as-of", str(as_of), "--json", *extra],
        capture_output=True, text=True, env=env, cwd=ROOT, check=False,
    )  # fmt: skip
    seconds = time.monotonic() - started
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        report = {}
    if "decision" not in report:  # a crash, or bad input (exit 2: {"error": ...})
        raise SystemExit(
            f"retrain as of {as_of} failed ({proc.returncode}): {report.get('error', '')}\n"
            f"{proc.stderr[-3000:]}"
        )
    return proc.returncode, report, seconds


class Client(threading.Thread):
    """Fires rank requests in a loop; counts answers and failures."""

    def __init__(self, base: str, households: list[int], carts: list[list[int]]) -> None:
        super().__init__(daemon=True)
        self.base, self.households, self.carts = base, households, carts
        self.ok, self.failed, self.errors = 0, 0, []
        self.stop = threading.Event()

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            body = json.dumps({"user_id": self.households[i % len(self.households)],
                               "cart": self.carts[i % len(self.carts)], "k": 5}).encode()  # fmt: skip
            i += 1
            request = urllib.request.Request(f"{self.base}/v1/rank", body,
                                             {"content-type": "application/json"})  # fmt: skip
            try:
                with urllib.request.urlopen(request, timeout=30) as r:
                    r.read()
                    self.ok += r.status == 200
                    self.failed += r.status != 200
            except Exception as exc:  # every failure counts, whatever it is
                self.failed += 1
                self.errors.append(repr(exc)[:200])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/cj_addon.yaml")
    parser.add_argument("--steps", default="40,43,46,49")
    parser.add_argument("--sabotage-at", type=int, default=51)
    parser.add_argument("--work", default=None)
    parser.add_argument(
        "--resume", action="store_true",
        help="the store in --work has a champion already: skip the first step's retrain",
    )  # fmt: skip
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="retrain-replay-"))
    work.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    steps = [int(s) for s in args.steps.split(",")]
    metric = "basket_completion/ndcg@10"
    rows: list[dict] = []

    def row(as_of: int, label: str, code: int, report: dict, seconds: float,
            latency: float | None, failed: int) -> dict:  # fmt: skip
        champ = next((v for k, v in report.get("metrics", {}).items()
                      if k.startswith("champion")), {})  # fmt: skip
        out = {"as_of": as_of, "challenger": label, "exit": code, "decision": report["decision"],
               "challenger_metric": report.get("metrics", {}).get("challenger", {}).get(metric),
               "champion_metric": champ.get(metric), "queries": report["holdout"]["queries"],
               "holdout": f"{report['holdout']['start']}..{report['holdout']['end']}",
               "retrain_s": round(seconds, 1),
               "promotion_latency_s": None if latency is None else round(latency, 2),
               "failed_requests": failed, "versions": report["versions"]}  # fmt: skip
        print(json.dumps(out), flush=True)
        rows.append(out)
        return out

    if not args.resume:
        code, report, seconds = retrain(args.config, uri, steps[0], env)
        row(steps[0], "config", code, report, seconds, None, 0)
        if report["decision"] != "promoted":
            raise SystemExit("the first step must promote (no champion yet)")

    import polars as pl

    from features.adapters import load_complete_journey

    tx = load_complete_journey().interactions.filter(pl.col("week") == steps[0])
    baskets = tx.group_by("basket_id").agg(pl.col("user_id").first(), pl.col("item_id").head(2))
    households = baskets["user_id"].head(200).to_list()
    carts = baskets["item_id"].head(200).to_list()
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "training.cli", "serve", "--model", f"models:/{NAME}@champion",
         "--tracking-uri", uri, "--cache", str(work / "cache"), "--port", str(port),
         "--reload-interval", "1"],
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    client = Client(base, households, carts)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                _get(f"{base}/readyz")
                break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the server did not start") from None
                time.sleep(0.5)
        client.start()
        plan = [(s, "config", ()) for s in steps[1:]]
        plan.append((args.sabotage_at, "sabotaged (popularity)",
                     ("--set", "model.kind=popularity", "--set", "model.params={}",
                      "--set", "tune=null")))  # fmt: skip
        plan.append((steps[0], "stale data (as of the first step)", ()))
        for as_of, label, extra in plan:
            served = _get(f"{base}/v1/model")["created_at"]
            failed_before = client.failed
            code, report, seconds = retrain(args.config, uri, as_of, env, *extra)
            done, latency = time.monotonic(), None
            if report["decision"] == "promoted":
                while _get(f"{base}/v1/model")["created_at"] == served:
                    if time.monotonic() - done > 120:
                        raise SystemExit("the server never picked up the promoted version")
                    time.sleep(0.05)
                latency = time.monotonic() - done
            time.sleep(2.0)  # keep firing on whatever is served now
            row(as_of, label, code, report, seconds, latency, client.failed - failed_before)
    finally:
        client.stop.set()
        client.join(timeout=60)
        server.terminate()
        server.wait(timeout=60)
    summary = {"requests_ok": client.ok, "requests_failed": client.failed,
               "errors": client.errors[:10], "steps": rows}  # fmt: skip
    (work / "replay.json").write_text(json.dumps(summary, indent=2, default=str))
    print(
        f"\n| as of | challenger | holdout (weeks) | queries | decision | exit | challenger "
        f"{metric} | champion | retrain s | promotion latency s | failed requests |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:

        def f(x: float | None) -> str:
            return "-" if x is None else f"{x:.4f}"

        print(f"| {r['as_of']} | {r['challenger']} | {r['holdout']} | {r['queries']:,} | "
              f"{r['decision']} | {r['exit']} | {f(r['challenger_metric'])} | "
              f"{f(r['champion_metric'])} | {r['retrain_s']} | "
              f"{'-' if r['promotion_latency_s'] is None else r['promotion_latency_s']} | "
              f"{r['failed_requests']} |")  # fmt: skip
    print(f"\nrequests: {client.ok:,} answered 200, {client.failed} failed")


if __name__ == "__main__":
    main()
