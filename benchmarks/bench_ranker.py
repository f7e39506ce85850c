"""The learned add-on ranker (``kind: ranker``) measured end to end on Complete Journey.

One fit of the configured ranker, then:

1. **Calibration**: expected calibration error of the served add probability on validation
   baskets (Platt scaling fitted on one seeded half of the validation queries, ECE over 10
   equal-count bins on the other half; ``RankerRecommender.validation_["calibration"]``),
   and its reliability plot (``--plot``, PNG).
2. **Candidate recall** on the test tasks (share of held-out items inside the pool: the
   ceiling of any ranking of it) and mean pool size.
3. **Artifact**: exported to a temp folder; bytes per file and per ``ranker_state.npz`` array.
4. **Serving**: ``Ranker.rank`` in-process on real test carts, one onnxruntime thread, all
   default rules (cross-sell): p50 / p99 latency; and parity: with rules that let every
   candidate through, the served top-10 against the training-side top-10 (share of slots that
   differ, all of them ties of the training-side score; largest |served probability -
   ``predict_proba``|).
5. ``--ablation``: the fit again with each feature group (``Feature.source``) dropped and
   with each candidate source off; validation NDCG@10 per task (never test) for each.
6. ``--candidate-study``: no fit of the trees; on the ranker's own training window (the
   last ``window_days`` of train, statistics fitted on the rows before it: validation, never
   test), the candidate recall and mean pool size of the configured pool, of each source
   alone, of the pool without each source, and of the pool with one source's N changed
   (``--study-sizes``); the first ``--study-queries`` queries per task.

Usage: ``python benchmarks/bench_ranker.py [--config configs/cj_ranker.yaml] [--model DIR]
[--requests 300] [--plot FILE.png] [--ablation]``; prints JSON. ``--model DIR`` (a folder
written by ``addons train --model-out DIR``) skips the fit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import scipy.sparse as sp  # noqa: E402

from features.loading import load_dataset  # noqa: E402
from serving import Ranker, RuleSettings  # noqa: E402
from serving.ranker_features import FEATURES, SOURCES, query_features  # noqa: E402
from training.config import ModelConfig, build_model, load_config  # noqa: E402
from training.experiment import make_split, make_task  # noqa: E402
from training.export import export_model  # noqa: E402
from training.models.base import CandidateFilter  # noqa: E402
from training.models.ranker import candidate_recall  # noqa: E402

NEUTRAL = RuleSettings(in_stock_only=False, impulse_max_price=float("inf"), max_per_category=20,
                       default_k=10)  # fmt: skip
SOURCE_PARAMS = {"rebuy": "n_rebuy", "cooccurrence": "n_cooccurrence", "cf": "n_cf",
                 "category": "n_category", "popular": "n_popular"}  # fmt: skip


def plot_reliability(curve: list, ece: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pred = [c[0] for c in curve]
    obs = [c[1] for c in curve]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    top = max(max(pred), max(obs)) * 1.05
    ax.plot([0, top], [0, top], color="grey", linestyle="--", label="perfect")
    ax.plot(pred, obs, marker="o", label=f"ranker (ECE {ece:.4f})")
    ax.set_xlabel("predicted add probability (bin mean)")
    ax.set_ylabel("observed add rate")
    ax.set_title("Learned ranker: reliability on validation")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def serving(model, train, test_task, path: Path, n: int) -> dict:
    users = test_task.users[:n].astype(np.int64)
    carts = test_task.carts[:n]
    ext_users = train.user_map.to_external(users)
    ext_carts = [train.item_map.to_external(carts[q].indices).tolist() for q in range(n)]
    ranker = Ranker.load(path, RuleSettings(), threads=1)
    for q in range(min(n, 20)):  # warm-up
        ranker.rank(user_id=ext_users[q], cart=ext_carts[q], k=5)
    times = []
    for q in range(n):
        t = time.perf_counter()
        ranker.rank(user_id=ext_users[q], cart=ext_carts[q], k=5)
        times.append(time.perf_counter() - t)
    ms = np.asarray(times) * 1000
    # parity with neutral rules
    neutral = Ranker.load(path, NEUTRAL, threads=1)
    no_price = np.flatnonzero(~np.isfinite(train.item_prices()))
    ref, _ = model.recommend(users, carts, k=10, candidates=CandidateFilter(block_items=no_price))
    batch = model.query_batch(users, carts)
    raw = model.predict_pairs(batch.features).astype(np.float32)
    prob = model.predict_proba(batch.features)
    pair = {
        (int(q), int(j)): (r, p)
        for q, j, r, p in zip(batch.rows, batch.cols, raw, prob, strict=True)
    }
    differ = untied = total = 0
    worst = 0.0
    for q in range(n):
        result = neutral.rank(user_id=ext_users[q], cart=ext_carts[q], offer="impulse", k=10)
        served = train.item_map.to_internal([i.item_id for i in result.items]).tolist()
        for slot, (s, e) in enumerate(zip(served, ref[q].tolist(), strict=False)):
            total += 1
            if s != e:
                differ += 1
                untied += pair.get((q, s), (None,))[0] != pair.get((q, e), (0,))[0]
            if (q, s) in pair:
                worst = max(worst, abs(result.items[slot].score - float(pair[(q, s)][1])))
    return {
        "requests": n,
        "rank_p50_ms": round(float(np.percentile(ms, 50)), 3),
        "rank_p99_ms": round(float(np.percentile(ms, 99)), 3),
        "parity_slots": total,
        "parity_differing_slots": differ,
        "parity_differing_not_tied": int(untied),
        "parity_max_probability_diff": worst,
    }


def artifact_sizes(path: Path) -> dict:
    files = {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()}
    with np.load(path / "ranker_state.npz", allow_pickle=False) as npz:
        loaded = {k: npz[k] for k in npz.files}
    arrays = {k: int(v.nbytes) for k, v in loaded.items()}
    top = dict(sorted(arrays.items(), key=lambda kv: -kv[1])[:8])
    # The same files zip-compressed (np.savez_compressed), as an artifact could ship them.
    compressed = dict(files)
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("ranker_state.npz", "user_state.npz"):
            with np.load(path / name, allow_pickle=False) as npz:
                np.savez_compressed(Path(tmp) / name, **{k: npz[k] for k in npz.files})
            compressed[name] = (Path(tmp) / name).stat().st_size
    return {"total_mb": round(sum(files.values()) / 1e6, 2),
            "total_mb_npz_compressed": round(sum(compressed.values()) / 1e6, 2),
            "files_mb": {k: round(v / 1e6, 2) for k, v in files.items()},
            "largest_state_arrays_mb": {k: round(v / 1e6, 2) for k, v in top.items()}}  # fmt: skip


def candidate_study(config, train, args: argparse.Namespace) -> dict:
    """Candidate recall per source on the training window (see the module docstring)."""
    from datetime import timedelta

    import polars as pl

    from features.splits import basket_completion_task
    from serving.ranker_features import RankerState
    from training.models.ranker import FeatureState

    params = build_model(config.model)
    start = train.interactions["timestamp"].max() - timedelta(days=params.window_days)
    history = train.restrict(pl.col("timestamp") < start)
    window = train.restrict(pl.col("timestamp") >= start)
    arrays = FeatureState.fit(history, np.datetime64(start, "us"), params).to_arrays()
    sizes = {p: int(arrays[p]) for p in SOURCE_PARAMS.values()}
    variants = {"configured pool": {}}
    variants.update({f"{s} alone": {p: (sizes[p] if q == s else 0) for q, p in SOURCE_PARAMS.items()}
                     for s in SOURCE_PARAMS})  # fmt: skip
    variants.update({f"without {s}": {p: 0} for s, p in SOURCE_PARAMS.items()})
    for change in args.study_sizes:
        name, value = change.split("=")
        variants[change] = {name: int(value)}
    out: dict = {"window_start": str(start), "sizes": sizes}
    for new in (False, True):
        task = basket_completion_task(history, window, seed=params.seed, new_to_user=new)
        n = min(args.study_queries, task.n_queries)
        users, carts = task.users[:n].astype(np.int64), task.carts[:n]
        rows = {}
        for name, change in variants.items():
            st = RankerState.from_arrays(
                {**arrays, **{k: np.asarray(v) for k, v in change.items()}}
            )
            q = query_features(st, users, carts.indptr, carts.indices, new)
            pool = sp.csr_matrix((np.ones(q.items.size, np.float32), q.items, q.indptr),
                                 shape=(n, st.n_items))  # fmt: skip
            r = candidate_recall(pool, task.relevant[:n])
            rows[name] = {"recall": round(r["micro"], 4), "pool_size": round(r["pool_size"], 1)}
            print(json.dumps({task.name: {name: rows[name]}}), file=sys.stderr, flush=True)
        out[task.name] = {"queries": n, **rows}
    return out


def validation_scores(model) -> dict:
    v = model.validation_
    return {k: round(v[k], 4) for k in v if k.endswith("_ndcg_at_10")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "cj_ranker.yaml"))
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--plot", type=Path, default=None, help="reliability plot PNG")
    parser.add_argument("--ablation", action="store_true")
    parser.add_argument(
        "--households",
        type=int,
        default=0,
        help="only the first N households (a quick slice; 0 = all)",
    )
    parser.add_argument("--skip-serving", action="store_true", help="no export / serving part")
    parser.add_argument(
        "--candidate-study",
        action="store_true",
        help="candidate recall per source on the training window, then exit",
    )
    parser.add_argument("--study-queries", type=int, default=2000)
    parser.add_argument("--study-sizes", nargs="*", default=["n_rebuy=200", "n_cooccurrence=400",
                        "n_category=120", "n_cf=100", "n_popular=30", "n_popular=100"],
                        help="PARAM=N pool variants")  # fmt: skip
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help="a fitted ranker folder (addons train --model-out DIR): no fit",
    )
    args = parser.parse_args()

    config = load_config(args.config)
    data = load_dataset(config.data)
    if args.households:
        import polars as pl

        data = data.restrict(pl.col("user_idx") < args.households)
    split = make_split(config, data)
    if args.candidate_study:
        print(json.dumps(candidate_study(config, split.train, args), indent=2))
        return
    load_before = os.getloadavg()[0]  # 1-minute load average: was the machine shared?
    t, cpu = time.perf_counter(), time.process_time()
    if args.model:
        from training.persistence import load_model

        model = load_model(args.model)
        out: dict = {"config": args.config, "model": str(args.model)}
    else:
        model = build_model(config.model).fit(split.train)
        out = {
            "config": args.config,
            "fit_seconds": round(time.perf_counter() - t, 1),
            "fit_cpu_seconds": round(time.process_time() - cpu, 1),
            "fit_stages": model.fit_stages_,  # wall / CPU seconds per stage
            "load_average_before_after": [round(load_before, 1), round(os.getloadavg()[0], 1)],
        }
    cal = model.validation_["calibration"]
    out["calibration"] = {"a": cal["a"], "b": cal["b"], "ece": round(cal["ece"], 4),
                          "curve": [[round(p, 4), round(o, 4), n] for p, o, n in cal["curve"]]}  # fmt: skip
    if args.plot:
        plot_reliability(cal["curve"], cal["ece"], args.plot)
        out["plot"] = str(args.plot)
    out["validation_ndcg_at_10"] = validation_scores(model)
    out["empty_cart"] = model.validation_.get("empty_cart")  # the rule chosen on the window
    if args.households:
        out["households"] = args.households
    tasks = {name: make_task(name, split, config)
             for name in ("basket_completion", "basket_completion_new")}  # fmt: skip
    out["candidate_recall"] = {
        name: {k: round(v, 4) for k, v in candidate_recall(
            model.candidate_pool(task.users, task.carts, name.endswith("_new")), task.relevant
        ).items()}
        for name, task in tasks.items()
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        if args.skip_serving:
            return finish(out, args, config, split)
        path = export_model(model, split.train, Path(tmp) / "artifact")
        out["artifact"] = artifact_sizes(path)
        out["serving"] = serving(model, split.train, tasks["basket_completion"], path,
                                 min(args.requests, tasks["basket_completion"].n_queries))  # fmt: skip
    finish(out, args, config, split)


def finish(out: dict, args: argparse.Namespace, config, split) -> None:
    """The ablation (``--ablation``), then print."""
    if args.ablation:
        rows = {}
        params = dict(config.model.params)
        variants = {f"no {group}": {"drop_features": [f.name for f in FEATURES if f.source == group]}
                    for group in dict.fromkeys(f.source for f in FEATURES) if group != "query"}  # fmt: skip
        variants.update({f"no {s} candidates": {SOURCE_PARAMS[s]: 0} for s in SOURCES})
        for name, change in variants.items():
            cfg = ModelConfig(config.model.kind, {**params, **change})
            t = time.perf_counter()
            m = build_model(cfg).fit(split.train)
            rows[name] = {**validation_scores(m), "fit_seconds": round(time.perf_counter() - t, 1)}
            print(json.dumps({name: rows[name]}), file=sys.stderr, flush=True)
        out["ablation_validation_ndcg_at_10"] = {"full": out["validation_ndcg_at_10"], **rows}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
