"""CPU time of the learned ranker's candidates + features on training batches, per CHUNK.

On Complete Journey (``configs/cj_ranker.yaml``): the statistics of the rows before the last
``window_days`` of train, then :func:`serving.ranker_features.query_features` on the first
``--queries`` basket-completion queries of that window (both tasks; what the fit builds its
training rows from), once per ``serving.ranker_features.CHUNK`` value. With ``--against
FILE.py`` (an older copy of ``serving/ranker_features.py``, e.g. ``git show
HEAD~1:serving/ranker_features.py > /tmp/old.py``) it also times that one and checks the two
give bit-identical candidates, sources and features. Prints JSON.

Usage: ``python benchmarks/bench_ranker_features.py [--queries 1024] [--chunks 32 64 128]
[--against /tmp/old.py]``
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

import serving.ranker_features as rf  # noqa: E402
from features.loading import load_dataset  # noqa: E402
from features.splits import basket_completion_task  # noqa: E402
from training.config import build_model, load_config  # noqa: E402
from training.experiment import make_split  # noqa: E402
from training.models.ranker import FeatureState  # noqa: E402


def _timed(fn: Any, *args: Any) -> tuple[Any, dict]:
    t, cpu = time.perf_counter(), time.process_time()
    out = fn(*args)
    return out, {
        "wall": round(time.perf_counter() - t, 2),
        "cpu": round(time.process_time() - cpu, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "cj_ranker.yaml"))
    parser.add_argument("--queries", type=int, default=1024)
    parser.add_argument("--chunks", type=int, nargs="*", default=[32, 64, 128])
    parser.add_argument("--against", type=Path, help="an older ranker_features.py to compare")
    args = parser.parse_args()
    config = load_config(args.config)
    train = make_split(config, load_dataset(config.data)).train
    model = build_model(config.model)
    start = train.interactions["timestamp"].max() - timedelta(days=model.window_days)
    history = train.restrict(pl.col("timestamp") < start)
    window = train.restrict(pl.col("timestamp") >= start)
    state = FeatureState.fit(history, np.datetime64(start, "us"), model)
    old = None
    if args.against:
        spec = importlib.util.spec_from_file_location("old_ranker_features", args.against)
        old = importlib.util.module_from_spec(spec)
        sys.modules["old_ranker_features"] = old
        spec.loader.exec_module(old)
    out: dict = {"queries": args.queries, "load_average": round(os.getloadavg()[0], 1)}
    default = rf.CHUNK
    for new in (False, True):
        task = basket_completion_task(history, window, seed=model.seed, new_to_user=new)
        q = np.arange(min(args.queries, task.n_queries))
        carts = task.carts[q]
        call = (task.users[q].astype(np.int64), carts.indptr, carts.indices, new)
        row: dict = {}
        for chunk in args.chunks:
            rf.CHUNK = chunk
            ours, row[f"chunk_{chunk}"] = _timed(rf.query_features, state, *call)
        rf.CHUNK = default
        if old is not None:
            theirs, row["against"] = _timed(
                old.query_features, old.RankerState.from_arrays(state.to_arrays()), *call
            )
            row["identical"] = all(
                np.array_equal(getattr(ours, k), getattr(theirs, k))
                for k in ("indptr", "items", "sources")
            ) and np.array_equal(ours.features, theirs.features, equal_nan=True)
        row["pairs"] = int(ours.items.size)
        out[task.name] = row
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
