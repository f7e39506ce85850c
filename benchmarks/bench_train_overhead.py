"""Overhead of ``addons train`` around the library fit, vs calling the library directly.

For ALS (implicit) and the LightFM hybrid, on the Complete Journey train split (weeks <= 49):

- *direct*: the library's own ``fit`` on matrices built beforehand (BLAS pinned to 1 thread);
- *ours*: ``training.train.run_training`` (MLflow run in a temporary SQLite store: params,
  tags, data report, per-epoch curves, model artifact), minus data loading, splitting and
  evaluation, which the direct call does not do.

Reported as ratios ours / direct measured in the same run (best of ``--repeat``); the goal is
<= 1.10. Usage: ``python benchmarks/bench_train_overhead.py [--repeat 2] [--json]``.
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
from threadpoolctl import threadpool_limits  # noqa: E402

from features.loading import DataConfig, load_dataset  # noqa: E402
from features.splits import global_time_split  # noqa: E402
from training.config import config_from_dict  # noqa: E402
from training.models.lightfm_model import _with_identity  # noqa: E402
from training.train import run_training  # noqa: E402

ALS = {"factors": 64, "regularization": 0.01, "alpha": 1.0, "iterations": 15, "weighting": "bm25",
       "random_state": 42, "num_threads": 1}  # fmt: skip
LIGHTFM = {"loss": "warp", "no_components": 64, "epochs": 5, "learning_rate": 0.05,
           "item_features": True, "user_features": True, "random_state": 42, "num_threads": 1}  # fmt: skip


def direct_als(train) -> float:
    from implicit.cpu.als import AlternatingLeastSquares

    matrix = train.user_item_matrix("bm25").tocsr()
    with threadpool_limits(limits=1, user_api="blas"):
        model = AlternatingLeastSquares(
            factors=64,
            regularization=0.01,
            alpha=1.0,
            iterations=15,
            num_threads=1,
            random_state=42,
            calculate_training_loss=True,  # same work as ours: the train/loss curve
        )
        started = time.perf_counter()
        model.fit(matrix, show_progress=False)
        return time.perf_counter() - started


def direct_lightfm(train) -> float:
    from lightfm import LightFM

    items = _with_identity(train.item_features().matrix, train.n_items)
    users = _with_identity(train.user_features().matrix, train.n_users)
    binary = train.user_item_counts().copy()
    binary.data[:] = 1.0
    interactions = binary.tocoo()
    model = LightFM(no_components=64, loss="warp", learning_rate=0.05, random_state=42)
    started = time.perf_counter()
    model.fit(interactions, user_features=users, item_features=items, epochs=5, num_threads=1)
    return time.perf_counter() - started


def ours(kind: str, params: dict, tmp: Path) -> float:
    config = config_from_dict({
        "name": f"overhead_{kind}",
        "split": {"time_column": "week", "train_end": 49, "test_start": 50},
        "model": {"kind": kind, "params": params},
        "evaluation": {"tasks": ["next_period"], "k": [10], "metrics": ["recall"]},
    })  # fmt: skip
    started = time.perf_counter()
    result = run_training(config, f"sqlite:///{tmp / 'mlflow.db'}")
    total = time.perf_counter() - started
    t = result.timings
    return total - t["load"] - t["split"] - t["evaluate"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    data = load_dataset(DataConfig())
    train = global_time_split(data, 49, 50, column="week").train
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        cwd = os.getcwd()
        os.chdir(tmp)  # the embedded MLflow store and its artifacts land in the temp folder
        try:
            ours("popularity", {}, Path(tmp))  # first use of a new store runs migrations
            for name, direct, kind, params in (
                ("als", direct_als, "als", ALS),
                ("lightfm_hybrid", direct_lightfm, "lightfm", LIGHTFM),
            ):
                d = min(direct(train) for _ in range(args.repeat))
                o = min(ours(kind, params, Path(tmp)) for _ in range(args.repeat))
                rows[name] = {
                    "direct_s": round(d, 3),
                    "ours_s": round(o, 3),
                    "ratio": round(o / d, 3),
                }
        finally:
            os.chdir(cwd)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"{'model':<16}{'direct s':>10}{'train s':>10}{'ratio':>8}   (goal <= 1.10)")
        for name, r in rows.items():
            print(f"{name:<16}{r['direct_s']:>10.2f}{r['ours_s']:>10.2f}{r['ratio']:>8.3f}")
    return 0 if all(np.isfinite(r["ratio"]) for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
