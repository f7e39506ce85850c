"""Serving speed on the full Complete Journey catalog, as ratios measured in one run.

1. In-process ``Ranker.rank`` for one household with a 5-item cart, k = 5 (all rules on),
   one onnxruntime thread (the serving default): p50 / p99 latency (goal p50 <= 1 ms) for
   ALS (a factor graph), co-occurrence (neighbour lists) and the add-on scorer (the model
   the README's main job serves; its fit takes about two minutes, ``--no-addon`` skips it);
   beside them, the request preparation time, the share of the catalog the rules exclude,
   the size of ``model.onnx`` and, for ALS, the share of requests its head does not settle.
2. Our ONNX graph vs implicit's own ``recommend`` on the *same* ALS factors, no filters, at
   batch 1 and batch 256 (implicit on every core, the graph on one): time ratio
   implicit / ours (goal >= 1) and the share of identical ids (scores equal up to float
   rounding; ties may swap).
3. HTTP on loopback: ``addons serve`` in a subprocess, a bounded load generator (threads x
   requests, keep-alive): requests/s, p50, p99 and errors, then the same while the artifact is
   replaced (hot reload) mid-run.

4. The learned ranker (``kind: ranker``, configs/cj_ranker.yaml) in-process beside them, and
   where one of its requests spends its time (``ranker_breakdown``: medians per stage of the
   same requests: validation and rules' mask, candidates, feature matrix, onnxruntime trees,
   ordering, reasons, offers). ``--ranker-artifact DIR`` uses an exported ranker artifact
   (``addons train --config configs/cj_ranker.yaml --export DIR``) instead of a fit;
   ``--no-ranker`` skips it; ``--ranker-only`` measures the ranker and the add-on scorer alone
   (no ALS, no co-occurrence, no HTTP part).

5. ``--artifacts NAME=DIR ...``: only part 1 (and the ranker's breakdown) on already exported
   artifacts, no fit. An item x item artifact that ships its neighbour rows runs on the
   candidate-wise scorer (``serving.neighbour_scorer``); it is also measured on the dense
   ONNX graph (``NAME_dense_graph``: the scorer every request used before), same run. Run
   the same command from a checkout of an older commit to measure that code on the same
   artifacts (docs/serving.md, "Candidate-wise serving").

Usage: ``python benchmarks/bench_serving.py [--no-addon] [--no-ranker] [--ranker-only]
[--ranker-artifact DIR] [--artifacts NAME=DIR ...]``; prints JSON; exits 1 if any HTTP
request failed.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
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

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

from features.loading import DataConfig, load_dataset  # noqa: E402
from features.splits import basket_completion_task, global_time_split  # noqa: E402
from serving import Ranker  # noqa: E402
from training.config import build_model, load_config  # noqa: E402
from training.export import export_model  # noqa: E402
from training.models import (  # noqa: E402
    AddonScorer,
    ALSRecommender,
    CooccurrenceRecommender,
    PopularityRecommender,
)


def percentiles(samples: list[float]) -> dict[str, float]:
    a = np.asarray(samples) * 1000
    return {
        "p50_ms": round(float(np.percentile(a, 50)), 3),
        "p99_ms": round(float(np.percentile(a, 99)), 3),
    }


def request_facts(ranker: Ranker, users: list, carts: list) -> dict:
    """What the requests cost before the graph and what the rules leave: ``_prepare`` (ids,
    rules mask, history row) p50 in microseconds, the share of the catalog the rules exclude,
    and for a pruned factor graph the share of requests its head does not settle (read from
    the graph's own NonZero output)."""
    import onnx

    times, prepared = [], []
    for user, cart in zip(users, carts, strict=True):
        t = time.perf_counter()
        prepared.append(ranker._prepare(user_id=user, cart=cart, k=5))
        times.append(time.perf_counter() - t)
    facts = {
        "prepare_p50_us": round(float(np.median(times)) * 1e6, 1),
        "excluded_share": round(float(np.mean([p.mask.mean() for p in prepared])), 3),
        "model_onnx_mb": round((ranker.artifact.path / "model.onnx").stat().st_size / 1e6, 1),
    }
    model = onnx.load(str(ranker.artifact.path / "model.onnx"))
    nonzero = [n for n in model.graph.node if n.op_type == "NonZero"]
    if nonzero:
        model.graph.output.append(
            onnx.helper.make_tensor_value_info(nonzero[0].output[0], onnx.TensorProto.INT64, None)
        )
        probe = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        cart = np.full((len(prepared), max(p.cart.size for p in prepared)), -1, np.int64)
        for row, p in enumerate(prepared):
            cart[row, : p.cart.size] = p.cart
        feeds = {"user": np.array([p.user for p in prepared]), "cart": cart,
                 "exclude": np.stack([p.mask for p in prepared]), "k": np.array([50])}  # fmt: skip
        names = {i.name for i in probe.get_inputs()}
        unsettled = probe.run(None, {k: v for k, v in feeds.items() if k in names})[2]
        facts["unsettled_share"] = round(unsettled.shape[1] / len(prepared), 3)
    return facts


def in_process(ranker: Ranker, users: list, carts: list, n: int = 500) -> dict:
    times = []
    for i in range(n):
        t = time.perf_counter()
        ranker.rank(user_id=users[i % len(users)], cart=carts[i % len(carts)], k=5)
        times.append(time.perf_counter() - t)
    return percentiles(times)


def ranker_breakdown(ranker: Ranker, users: list, carts: list, n: int = 500) -> dict:
    """Where a learned-ranker request spends its time: per stage, the median over ``n``
    requests (microseconds), and the candidate pool's median size. Stages: ``prepare``
    (validation, ids, the rules' exclusion mask over the catalog, the scorer's batch),
    ``candidates`` (:func:`serving.ranker_features.query_candidates`), ``features``
    (:func:`~serving.ranker_features.candidate_features`: the matrix of the candidates the
    rules allow), ``trees`` (onnxruntime),
    ``order`` (the rest of ``LearnedScorer.score``: the rules' drop, the sort, the fill),
    ``reasons`` and ``offers`` (the rules' selection and the result objects). The stage
    timers add a few microseconds each, so the total is a little above ``rank``'s own p50."""
    from serving import ranker_features, ranker_scorer

    scorer = ranker.scorer
    spent: dict[str, float] = {}

    def timed(name: str, fn):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - t

        return wrapper

    patches = [(ranker_scorer, "candidate_features"), (ranker_scorer, "query_candidates"),
               (scorer, "predict"), (scorer, "_reasons")]  # fmt: skip
    saved = [(obj, name, getattr(obj, name)) for obj, name in patches]
    stages: dict[str, list[float]] = {
        s: []
        for s in (
            "prepare",
            "candidates",
            "features",
            "trees",
            "order",
            "reasons",
            "offers",
            "total",
        )
    }
    pool, allowed = [], []
    try:
        for (obj, name, fn), label in zip(saved, ("features", "query", "trees", "reasons"),
                                          strict=True):  # fmt: skip
            setattr(obj, name, timed(label, fn))
        for i in range(n):
            spent.clear()
            t0 = time.perf_counter()
            p = ranker._prepare(user_id=users[i % len(users)], cart=carts[i % len(carts)], k=5)
            batch = ranker._batch([p])
            t1 = time.perf_counter()
            scored = scorer.score(batch)
            t2 = time.perf_counter()
            in_score = spent.get("reasons", 0.0)  # reasons may be computed lazily, in _offers
            ranker._offers(scored, 0, p)
            t3 = time.perf_counter()
            reasons = spent.get("reasons", 0.0)
            stages["prepare"].append(t1 - t0)
            stages["candidates"].append(spent["query"])
            stages["features"].append(spent["features"])
            stages["trees"].append(spent["trees"])
            stages["reasons"].append(reasons)
            stages["order"].append(
                t2 - t1 - spent["query"] - spent["features"] - spent["trees"] - in_score
            )
            stages["offers"].append(t3 - t2 - (reasons - in_score))
            stages["total"].append(t3 - t0)
            if i < 50:  # the pool and what the rules let reach the trees (outside the timing)
                q = ranker_features.query_candidates(scorer.state, batch.user,
                                                     np.array([0, p.cart.size]), p.cart,
                                                     batch.exclude_owned)  # fmt: skip
                pool.append(int(q.items.size))
                allowed.append(int(batch.rules[0].allowed(q.items).sum()))
    finally:
        for obj, name, fn in saved:
            if obj is scorer:
                delattr(obj, name)  # back to the class's method
            else:
                setattr(obj, name, fn)
    out = {f"{k}_us": round(float(np.median(v)) * 1e6, 1) for k, v in stages.items()}
    out["candidates_per_request_p50"] = int(np.median(pool))
    out["allowed_candidates_per_request_p50"] = int(np.median(allowed))
    return out


def graph_vs_implicit(model: ALSRecommender, train, path: Path) -> dict:
    # the artifact lists its items in graph order; implicit answers in training order
    ids = json.loads((path / "items.json").read_text())["ids"]
    order = train.item_map.to_internal(ids)
    from implicit.cpu.als import AlternatingLeastSquares

    lib = AlternatingLeastSquares(factors=model.factors)
    lib.user_factors, lib.item_factors = model.user_factors_, model.item_factors_
    user_items = train.user_item_counts().tocsr()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(
        str(path / "model.onnx"), options, providers=["CPUExecutionProvider"]
    )
    out = {}
    rng = np.random.default_rng(0)
    for batch in (1, 256):
        users = rng.choice(
            np.flatnonzero(np.diff(user_items.indptr) > 0), size=batch, replace=False
        )
        feeds = {"user": users.astype(np.int64), "cart": np.full((batch, 1), -1, np.int64),
                 "exclude": np.zeros((batch, train.n_items), bool), "k": np.array([5], np.int64)}  # fmt: skip
        reps = 200 if batch == 1 else 10
        t = time.perf_counter()
        for _ in range(reps):
            our_scores, ours = session.run(None, feeds)
        ours = order[ours]
        ours_s = (time.perf_counter() - t) / reps
        t = time.perf_counter()
        for _ in range(reps):
            theirs, their_scores = lib.recommend(
                users, user_items[users], N=5, filter_already_liked_items=False
            )
        theirs_s = (time.perf_counter() - t) / reps
        out[f"batch_{batch}"] = {"ours_ms": round(ours_s * 1000, 3), "implicit_ms": round(theirs_s * 1000, 3),
                                 "ratio_implicit_over_ours": round(theirs_s / ours_s, 2),
                                 "same_ids": round(float((ours == theirs).mean()), 4),
                # rank by rank: where ids differ, the two items' scores tie to float rounding
                "max_score_diff": float(np.abs(our_scores - their_scores).max())}  # fmt: skip
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load(port: int, bodies: list[bytes], threads: int, per_thread: int, during=None) -> dict:
    times: list[float] = []
    errors = [0]
    lock = threading.Lock()

    def worker(offset: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        for i in range(per_thread):
            body = bodies[(offset + i) % len(bodies)]
            t = time.perf_counter()
            try:
                conn.request("POST", "/v1/rank", body, {"content-type": "application/json"})
                resp = conn.getresponse()
                resp.read()
                ok = resp.status == 200
            except OSError:
                ok = False
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            with lock:
                times.append(time.perf_counter() - t)
                errors[0] += 0 if ok else 1
        conn.close()

    started = time.perf_counter()
    pool = [threading.Thread(target=worker, args=(i * 7,)) for i in range(threads)]
    for th in pool:
        th.start()
    if during:
        during()
    for th in pool:
        th.join()
    elapsed = time.perf_counter() - started
    return {
        "requests": len(times),
        "errors": errors[0],
        "rps": round(len(times) / elapsed, 1),
        **percentiles(times),
    }


def _requests(train, task) -> tuple[list, list]:
    """200 households of the test task, each with five items of a real test basket."""
    users = train.user_map.to_external(task.users[:200]).tolist()
    carts = []
    for r in range(200):  # five items of a real test basket (cart + held-out)
        row = np.concatenate([task.carts[r].indices, task.relevant[r].indices])[:5]
        carts.append(train.item_map.to_external(row).tolist())
    return users, carts


def measure_artifacts(paths: dict[str, str], train, task) -> int:
    """Part 5 of the module docstring: in-process p50 / p99 of exported artifacts."""
    users, carts = _requests(train, task)
    results: dict = {"load_average": os.getloadavg(), "in_process": {}}
    for name, path in paths.items():
        ranker = Ranker.load(path)
        variants = [(name, ranker)]
        if hasattr(ranker.scorer, "sources"):  # candidate-wise: also the dense graph
            from serving.scorers import GraphScorer

            dense = Ranker.load(path)
            dense.scorer = GraphScorer.load(dense.artifact)
            variants.append((f"{name}_dense_graph", dense))
        for label, r in variants:
            r.rank(user_id=users[0], cart=carts[0], k=5)  # warm-up
            cpu = time.process_time()
            results["in_process"][label] = in_process(r, users, carts, n=1000)
            results["in_process"][label]["cpu_ms_per_request"] = round(
                (time.process_time() - cpu) / 1000 * 1000, 3
            )
            if r.manifest.get("scorer") == "ranker":
                results["in_process"][label]["breakdown"] = ranker_breakdown(r, users, carts)
    print(json.dumps(results, indent=2))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-addon", action="store_true", help="skip the add-on scorer")
    parser.add_argument("--no-ranker", action="store_true", help="skip the learned ranker")
    parser.add_argument(
        "--ranker-only",
        action="store_true",
        help="the learned ranker and the add-on scorer alone, no HTTP part",
    )
    parser.add_argument("--ranker-artifact", type=Path, default=None,
                        help="an exported ranker artifact (no ranker fit)")  # fmt: skip
    parser.add_argument("--artifacts", nargs="+", default=None, metavar="NAME=DIR",
                        help="measure these exported artifacts in-process only (no fit)")  # fmt: skip
    args = parser.parse_args()
    data = load_dataset(DataConfig())
    split = global_time_split(data, 49, 50, column="week")
    train = split.train
    task = basket_completion_task(train, split.test)
    if args.artifacts:
        return measure_artifacts(dict(a.split("=", 1) for a in args.artifacts), train, task)
    models: dict = {}
    if not args.ranker_only:
        als = ALSRecommender(factors=64, iterations=15).fit(train)
        models = {"als": als, "cooccurrence": CooccurrenceRecommender().fit(train)}
    if not args.no_addon:
        models["addon"] = AddonScorer().fit(train)
    if not args.no_ranker and args.ranker_artifact is None:
        models["ranker"] = build_model(load_config(ROOT / "configs" / "cj_ranker.yaml").model)
        models["ranker"].fit(train)
    results: dict = {"n_items": train.n_items, "load_average": os.getloadavg(), "in_process": {}}
    with tempfile.TemporaryDirectory() as tmp:
        users = train.user_map.to_external(task.users[:200]).tolist()
        carts = []
        for r in range(200):  # five items of a real test basket (cart + held-out)
            row = np.concatenate([task.carts[r].indices, task.relevant[r].indices])[:5]
            carts.append(train.item_map.to_external(row).tolist())
        paths = {name: export_model(model, train, Path(tmp) / name)
                 for name, model in models.items()}  # fmt: skip
        if not args.no_ranker and args.ranker_artifact is not None:
            paths["ranker"] = args.ranker_artifact
        for name, path in paths.items():
            ranker = Ranker.load(path)
            ranker.rank(user_id=users[0], cart=carts[0], k=5)  # warm-up
            if name == "ranker":  # no graph inputs to probe: its own stage breakdown instead
                results["in_process"][name] = {**in_process(ranker, users, carts),
                                               "breakdown": ranker_breakdown(ranker, users, carts)}  # fmt: skip
                continue
            results["in_process"][name] = {
                "scored_first": ranker.manifest["scored_first"],
                **in_process(ranker, users, carts),
                **request_facts(ranker, users, carts),
            }
        if args.ranker_only:
            print(json.dumps(results, indent=2))
            return 0
        art = Path(tmp) / "als"
        results["graph_vs_implicit"] = graph_vs_implicit(als, train, art)

        port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "training.cli", "serve", "--model", str(art), "--port", str(port),
             "--reload-interval", "0.5"],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            for _ in range(200):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    time.sleep(0.1)
            bodies = [
                json.dumps({"user_id": u, "cart": c, "k": 5}).encode()
                for u, c in zip(users, carts, strict=True)
            ]
            load(port, bodies, 2, 50)  # warm-up
            results["http"] = load(port, bodies, threads=4, per_thread=250)
            popular = export_model(PopularityRecommender().fit(train), train, Path(tmp) / "pop")

            def swap() -> None:
                time.sleep(0.5)
                shutil.rmtree(art)
                shutil.copytree(popular, art)  # the watcher picks it up within 0.5 s

            results["http_during_reload"] = load(
                port, bodies, threads=4, per_thread=250, during=swap
            )
        finally:
            server.terminate()
            server.wait(timeout=10)
    print(json.dumps(results, indent=2))
    failed = results["http"]["errors"] + results["http_during_reload"]["errors"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
