"""Ranking metrics on the real Complete Journey basket-completion task: ours vs RecTools.

Setup (not timed): the default dataset, ``global_time_split(ds, 49, 50, 46, column="week")``,
``basket_completion_task(split.train, split.test)``, ``CooccurrenceRecommender()`` fitted on
``split.train`` and its top 10 per query (``recommend(task.users, task.carts, k=10)``, the
default ``CandidateFilter`` keeps cart items out).

Then Precision, Recall, NDCG, MAP, MRR and HitRate at k = 3, 5, 10, plus novelty at the same k,
are computed on the same recommendation lists by

- ours: ``training.evaluation.metrics.build_context`` + ``compute_metrics`` (averaged over
  queries);
- RecTools: ``rectools.metrics.calc_metrics`` with ``Precision(k)``, ``Recall(k)``,
  ``NDCG(k, divide_by_achievable=True)``, ``MAP(k)``, ``MRR(k)``, ``HitRate(k)`` and
  ``MeanInvUserFreq(k)``. Each query (basket) is a RecTools "user" (the query index); the
  interactions are the held-out items of each query; ``prev_interactions`` are the distinct
  (train user, item) pairs of ``split.train``.

Correctness (exit status 1 on failure): every metric agrees within 1e-9 (absolute), both the
mean and every per-query value (RecTools' ``calc_per_user``); a mismatch says how many queries
differ and by how much.

Timing: metric computation only, best of ``--repeats`` for each library in the same run, from
each library's natural input (ours: the (n_queries, 10) item array and the held-out CSR matrix;
RecTools: the reco / interactions DataFrames). For novelty, ours also counts each item's train
users from the same (user, item) pairs RecTools gets, so both do the same work. Converting the
arrays into RecTools' DataFrames is timed apart and not in the ratio.

Usage::

    python benchmarks/bench_metrics.py [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from machine import load_note, machine_load

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
import pandas as pd
import scipy.sparse as sp
from rectools import Columns
from rectools import metrics as rm

from features.adapters import load_complete_journey
from features.cleaning import CleaningConfig
from features.dataset import build_dataset
from features.splits import basket_completion_task, global_time_split
from training.evaluation import metrics as om
from training.models.baselines import CooccurrenceRecommender

KS = (3, 5, 10)
TOL = 1e-9
ACCURACY = ("precision", "recall", "ndcg", "map", "mrr", "hit_rate")

# Our metric class and the RecTools metric for each name (RecTools names are ours here).
OURS: dict[str, type[om.Metric]] = {
    "precision": om.Precision,
    "recall": om.Recall,
    "ndcg": om.NDCG,
    "map": om.MAP,
    "mrr": om.MRR,
    "hit_rate": om.HitRate,
    "novelty": om.Novelty,
}
RECTOOLS: dict[str, Callable[[int], Any]] = {
    "precision": lambda k: rm.Precision(k),
    "recall": lambda k: rm.Recall(k),
    "ndcg": lambda k: rm.NDCG(k, divide_by_achievable=True),
    "map": lambda k: rm.MAP(k),
    "mrr": lambda k: rm.MRR(k),
    "hit_rate": lambda k: rm.HitRate(k),
    "novelty": lambda k: rm.MeanInvUserFreq(k),
}
# Why a metric may legitimately differ, printed on a mismatch.
DEFINITIONS = {
    "precision": "hits / k (RecTools r_precision=False)",
    "recall": "hits / |held-out| per query",
    "ndcg": "IDCG over min(k, |held-out|) (divide_by_achievable=True); log base 2",
    "map": "sum of precision@i at hits / |held-out| (RecTools divide_by_k=False)",
    "mrr": "1 / rank of first hit within k",
    "hit_rate": "1 if any hit within k",
    "novelty": "mean over the list of -log2(train users of item / train users); unseen item = 1 user",
}


def setup() -> dict[str, Any]:
    """Dataset, split, task, fitted model, recommendations (not timed)."""
    t0 = time.perf_counter()
    ds = build_dataset(load_complete_journey(), CleaningConfig())
    split = global_time_split(ds, 49, 50, 46, column="week")
    task = basket_completion_task(split.train, split.test)
    model = CooccurrenceRecommender().fit(split.train)
    t1 = time.perf_counter()
    recommended, _ = model.recommend(task.users, task.carts, k=max(KS))
    t2 = time.perf_counter()
    prev = split.train.user_item_counts().tocoo()
    return {
        "task": task,
        "recommended": recommended,
        "prev_users": prev.row.astype(np.int64),
        "prev_items": prev.col.astype(np.int64),
        "n_items": ds.n_items,
        "n_train_users_dataset": int(split.train.interactions["user_idx"].n_unique()),
        "item_users_dataset": split.train.item_popularity(),
        "setup_seconds": t1 - t0,
        "recommend_seconds": t2 - t1,
    }


def to_rectools(s: dict[str, Any]) -> dict[str, pd.DataFrame]:
    """RecTools' input tables: reco, interactions (held-out items), prev_interactions."""
    rec = s["recommended"]
    n_q, k = rec.shape
    reco = pd.DataFrame(
        {
            Columns.User: np.repeat(np.arange(n_q), k),
            Columns.Item: rec.ravel().astype(np.int64),
            Columns.Rank: np.tile(np.arange(1, k + 1), n_q),
        }
    )
    reco = reco[reco[Columns.Item] >= 0].reset_index(drop=True)  # -1 pads short lists
    rel = sp.csr_matrix(s["task"].relevant)
    interactions = pd.DataFrame(
        {
            Columns.User: np.repeat(np.arange(n_q), np.diff(rel.indptr)),
            Columns.Item: rel.indices.astype(np.int64),
        }
    )
    prev = pd.DataFrame({Columns.User: s["prev_users"], Columns.Item: s["prev_items"]})
    return {"reco": reco, "interactions": interactions, "prev_interactions": prev}


def ours_metrics(s: dict[str, Any], names: tuple[str, ...]) -> dict[str, float]:
    """Our metrics from the arrays; novelty counts train users per item from the pairs."""
    item_users, n_train_users = None, 0
    if "novelty" in names:
        item_users = np.bincount(s["prev_items"], minlength=s["n_items"])
        n_train_users = int(np.count_nonzero(np.bincount(s["prev_users"])))
    ctx = om.build_context(
        s["recommended"], s["task"].relevant, item_users=item_users, n_train_users=n_train_users
    )
    metrics = [OURS[n](k) for n in names for k in KS]
    return om.compute_metrics(metrics, ctx)


def rectools_metrics(t: dict[str, pd.DataFrame], names: tuple[str, ...]) -> dict[str, float]:
    metrics = {f"{n}@{k}": RECTOOLS[n](k) for n in names for k in KS}
    return rm.calc_metrics(
        metrics,
        reco=t["reco"],
        interactions=t["interactions"],
        prev_interactions=t["prev_interactions"] if "novelty" in names else None,
    )


def best_of(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def per_query_diff(s: dict[str, Any], t: dict[str, pd.DataFrame], label: str) -> dict[str, Any]:
    """Where one metric disagrees: per-query comparison with RecTools' calc_per_user."""
    name, k = label.split("@")
    k = int(k)
    ctx = om.build_context(
        s["recommended"],
        s["task"].relevant,
        item_users=np.bincount(s["prev_items"], minlength=s["n_items"]),
        n_train_users=int(np.unique(s["prev_users"]).size),
    )
    ours = OURS[name](k).per_query(ctx)
    metric = RECTOOLS[name](k)
    if name == "novelty":
        theirs = metric.calc_per_user(t["reco"], t["prev_interactions"])
    else:
        theirs = metric.calc_per_user(t["reco"], t["interactions"])
    theirs = theirs.reindex(np.arange(len(ours))).to_numpy(dtype=np.float64)
    diff = np.abs(ours - np.nan_to_num(theirs, nan=0.0))
    return {
        "queries_rectools_scores": int(np.isfinite(theirs).sum()),
        "queries_differing": int((diff > TOL).sum()),
        "max_per_query_diff": float(diff.max()) if diff.size else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="timing repetitions (best is kept)")
    ap.add_argument("--json", action="store_true", help="print machine-readable results only")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")

    def log(msg: str) -> None:
        if not args.json:
            print(msg, file=sys.stderr, flush=True)

    load_before = machine_load()
    log("setup: dataset, split, task, CooccurrenceRecommender, top 10 ...")
    s = setup()
    task = s["task"]
    t_conv, t = best_of(lambda: to_rectools(s), args.repeats)
    n_rel = np.diff(task.relevant.indptr)
    log(
        f"  {task.n_queries:,} queries, {int(n_rel.sum()):,} held-out items, "
        f"setup {s['setup_seconds']:.1f} s, recommend {s['recommend_seconds']:.1f} s"
    )

    checks: list[dict[str, Any]] = []

    def check(name: str, ok: bool, detail: str) -> None:
        checks.append({"name": name, "ok": bool(ok), "detail": detail})

    # Inputs: every query has held-out items (RecTools averages over users with interactions,
    # ours over all queries: equal only then), lists are full, and the novelty inputs built
    # from the pairs equal the Dataset's own (what the harness uses).
    check("queries_have_truth", bool((n_rel > 0).all()), f"min |held-out| = {int(n_rel.min())}")
    n_pad = int((s["recommended"] < 0).sum())  # short lists: -1 in ours, absent in RecTools
    same_pop = (
        np.array_equal(
            np.bincount(s["prev_items"], minlength=s["n_items"]), s["item_users_dataset"]
        )
        and int(np.unique(s["prev_users"]).size) == (s["n_train_users_dataset"])
    )
    check("novelty_inputs", same_pop, "item users from pairs == Dataset.item_popularity()")

    timings: dict[str, dict[str, float]] = {}
    values: dict[str, dict[str, float]] = {}
    for group, names in (("accuracy", ACCURACY), ("accuracy+novelty", (*ACCURACY, "novelty"))):
        t_ours, v_ours = best_of(lambda names=names: ours_metrics(s, names), args.repeats)
        t_rt, v_rt = best_of(lambda names=names: rectools_metrics(t, names), args.repeats)
        timings[group] = {
            "n_metrics": len(names) * len(KS),
            "ours_seconds": t_ours,
            "rectools_seconds": t_rt,
            "ratio_rectools_over_ours": t_rt / t_ours,
        }
        values = {"ours": v_ours, "rectools": {k: float(v) for k, v in v_rt.items()}}

    log("comparing per-query values ...")
    mismatches: dict[str, Any] = {}
    per_query: dict[str, dict[str, Any]] = {}
    for label, ours_v in values["ours"].items():
        diff = abs(ours_v - values["rectools"][label])
        per_query[label] = per_query_diff(s, t, label)
        if not diff < TOL or per_query[label]["queries_differing"]:
            mismatches[label] = {
                "diff": diff,
                "definition_ours": DEFINITIONS[label.split("@")[0]],
                **per_query[label],
            }
    max_diff = max(abs(values["ours"][k] - values["rectools"][k]) for k in values["ours"])
    check(
        "metrics_agree", max_diff < TOL, f"{len(values['ours'])} means, max |diff| {max_diff:.2g}"
    )
    max_q = max(m["max_per_query_diff"] for m in per_query.values())
    n_q = sum(m["queries_differing"] for m in per_query.values())
    check(
        "per_query_agree",
        n_q == 0,
        f"{len(per_query)} metrics x {task.n_queries:,} queries, max |diff| {max_q:.2g}",
    )
    ok = all(c["ok"] for c in checks)
    load_after = machine_load()

    result = {
        "benchmark": "metrics",
        "repeats": args.repeats,
        "cpu_count": os.cpu_count(),
        "other_cpu_use": {"before": load_before, "after": load_after},
        "task": {
            "n_queries": task.n_queries,
            "n_held_out": int(n_rel.sum()),
            "k_max": max(KS),
            "padded_slots": n_pad,
            "setup_seconds": s["setup_seconds"],
            "recommend_seconds": s["recommend_seconds"],
            "to_rectools_frames_seconds": t_conv,
        },
        "values": values,
        "mismatches": mismatches,
        "timings": timings,
        "checks": checks,
        "ok": ok,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0 if ok else 1

    print(
        f"\nBasket completion, Complete Journey (train weeks <= 49, test >= 50): "
        f"{task.n_queries:,} queries, CooccurrenceRecommender top {max(KS)}\n"
    )
    head = f"{'metric':<18}{'ours':>12}{'RecTools':>12}{'|diff|':>10}"
    print(head)
    print("-" * len(head))
    for label, v in values["ours"].items():
        r = values["rectools"][label]
        print(f"{label:<18}{v:>12.6f}{r:>12.6f}{abs(v - r):>10.1e}")
    print(f"\nmetric computation, best of {args.repeats}:\n")
    head = f"{'metrics':<18}{'n':>4}{'ours s':>10}{'RecTools s':>12}{'RecTools/ours':>15}"
    print(head)
    print("-" * len(head))
    for group, tm in timings.items():
        print(
            f"{group:<18}{tm['n_metrics']:>4}{tm['ours_seconds']:>10.3f}"
            f"{tm['rectools_seconds']:>12.3f}{tm['ratio_rectools_over_ours']:>14.1f}x"
        )
    print(f"(arrays -> RecTools DataFrames, not in the ratio: {t_conv:.3f} s)")
    print(load_note(load_before, load_after))
    print("\nchecks:")
    for c in checks:
        print(f"  {'ok  ' if c['ok'] else 'FAIL'} {c['name']:<20} {c['detail']}")
    for label, m in mismatches.items():
        print(
            f"  mismatch {label}: |diff| {m['diff']:.3g}; {m['queries_differing']:,} queries differ "
            f"(max {m['max_per_query_diff']:.3g}); ours: {m['definition_ours']}"
        )
    if not ok:
        print("\nFAILED: see the checks above", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
