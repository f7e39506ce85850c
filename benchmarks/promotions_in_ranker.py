"""What the stores' weekly promotions add to the learned ranker, on its own validation.

    python benchmarks/promotions_in_ranker.py [--config configs/cj_ranker.yaml] [--seeds 3]
                                              [--out out.json]

``benchmarks/promotions_signal.py`` measures the signal on a proxy (re-ranking a household's
re-buy list). This one measures it where it would be used: it fits the CJ ranker once with
five more columns appended to every feature row of the training window (weeks 46-49 of
train: the fit's training and validation baskets), then trains the trees on those same rows
with and without the five columns, for ``--seeds`` LightGBM seeds, and reports the fit's
own validation NDCG@10 per task (against the whole held-out part, the number
``validation_`` reports; never test). The columns, per (basket, candidate):

- ``promo_mailer`` / ``promo_display``: the item is in the mailer of / on display in the
  basket's store in the basket's week (Complete Journey's ``promotions`` table);
- ``promo_mailer_share`` / ``promo_display_share``: the share of the stores promoting the
  item that week that mail / display it, ``promo_stores``: how many stores promote it.

A probe outside the product: the product does not load promotions (a store and a week in
every request and a promotion calendar in the artifact would be needed). It relies on the
ranker's private ``_training_rows`` / ``_train_learner`` (as tune_ranker_learner.py does).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import training.models.ranker as ranker_module  # noqa: E402
from benchmarks.promotions_signal import chain_promotions, load  # noqa: E402
from benchmarks.tune_ranker_learner import TASKS, learner_inputs  # noqa: E402
from features.io import atomic_write_text  # noqa: E402
from features.loading import load_dataset  # noqa: E402
from training.config import build_model, load_config  # noqa: E402
from training.experiment import make_split  # noqa: E402
from training.models.ranker import FEATURE_NAMES, QueryBatch, RankerRecommender  # noqa: E402

PROMO_NAMES = (
    "promo_mailer", "promo_display", "promo_mailer_share", "promo_display_share", "promo_stores",
)  # fmt: skip


class PromotionTable:
    """(item, store, week) -> mailer / display flags and (item, week) -> chain shares, as
    sorted int64 keys (one ``searchsorted`` per feature row chunk)."""

    def __init__(self, tx: pd.DataFrame, promo: pd.DataFrame) -> None:
        baskets = tx.drop_duplicates("basket_id")
        self.basket_store = dict(zip(baskets.basket_id, baskets.store_id, strict=True))
        self.basket_week = dict(zip(baskets.basket_id, baskets.week, strict=True))
        p = promo.sort_values(["product_id", "store_id", "week"])
        self.store_keys = self._key(p.product_id, p.store_id, p.week)
        order = np.argsort(self.store_keys, kind="stable")
        self.store_keys = self.store_keys[order]
        self.store_flags = p[["mailer", "display"]].to_numpy(np.float32)[order]
        chain = chain_promotions(promo)
        self.chain_keys = self._key(chain.product_id, 0, chain.week)
        order = np.argsort(self.chain_keys, kind="stable")
        self.chain_keys = self.chain_keys[order]
        self.chain_values = chain[["mailer_share", "display_share", "n_stores"]].to_numpy(
            np.float32
        )[order]

    @staticmethod
    def _key(item: Any, store: Any, week: Any) -> np.ndarray:
        return (np.asarray(item, np.int64) * 1000 + np.asarray(store, np.int64)) * 100 + np.asarray(
            week, np.int64
        )

    @staticmethod
    def _lookup(keys: np.ndarray, values: np.ndarray, wanted: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(keys, wanted).clip(max=keys.size - 1)
        found = keys[pos] == wanted
        out = np.zeros((wanted.size, values.shape[1]), np.float32)
        out[found] = values[pos[found]]
        return out

    def features(self, baskets: np.ndarray, items: np.ndarray) -> np.ndarray:
        """float32 [len(baskets), 5]: the PROMO_NAMES columns of each (basket, item)."""
        store = np.fromiter((self.basket_store[b] for b in baskets), np.int64, baskets.size)
        week = np.fromiter((self.basket_week[b] for b in baskets), np.int64, baskets.size)
        items = items.astype(np.int64)
        flags = self._lookup(self.store_keys, self.store_flags, self._key(items, store, week))
        chain = self._lookup(self.chain_keys, self.chain_values, self._key(items, 0, week))
        return np.hstack([flags, chain])


class PromotionProbe(RankerRecommender):
    """The ranker with the promotion columns appended to every training / validation row."""

    promotions: PromotionTable
    item_ids: np.ndarray

    def _training_rows(self, task: Any, pick: np.ndarray, state: Any, valid_baskets: Any,
                       negatives: Any = None, chunk: int = 2048) -> dict[str, Any]:  # fmt: skip
        # query_batch is called once per chunk of ``pick``, in order: its queries are known
        self._probe = (task, iter(range(0, pick.size, chunk)), pick, chunk)
        try:
            return super()._training_rows(task, pick, state, valid_baskets, negatives, chunk)
        finally:
            self._probe = None

    def query_batch(self, users: Any, carts: Any, exclude_owned: bool = False,
                    state: Any = None) -> QueryBatch:  # fmt: skip
        batch = super().query_batch(users, carts, exclude_owned, state)
        probe = getattr(self, "_probe", None)
        if probe is None:
            return batch
        task, starts, pick, chunk = probe
        lo = next(starts)
        q = pick[lo : lo + chunk]
        baskets = task.query_ids[q][batch.rows]
        extra = self.promotions.features(baskets, self.item_ids[batch.cols])
        return QueryBatch(batch.pool, batch.rows, batch.cols, np.hstack([batch.features, extra]))

    def _without_dropped(self, features: np.ndarray) -> np.ndarray:
        return features


def train_trees(model: RankerRecommender, rows: Any, with_promotions: bool, seed: int) -> dict:
    """Validation NDCG@10 per task of trees trained on a copy of ``rows`` (the promotion
    columns kept or cut off)."""
    import copy

    parts, valid_baskets = copy.deepcopy(rows)
    n = len(FEATURE_NAMES)
    for p in parts:
        for key in ("X", "Xv"):
            p[key] = [x if with_promotions else np.ascontiguousarray(x[:, :n]) for x in p[key]]
    names = FEATURE_NAMES + PROMO_NAMES if with_promotions else FEATURE_NAMES
    trial = copy.copy(model)
    trial.seed = seed
    ranker_module.FEATURE_NAMES = tuple(names)  # _train_learner names the columns with it
    try:
        cpu = time.process_time()
        booster, valid = RankerRecommender._train_learner(trial, parts, valid_baskets)
    finally:
        ranker_module.FEATURE_NAMES = FEATURE_NAMES
    out = {task: round(valid[f"{task}_ndcg_at_10"], 4) for task in TASKS}
    out.update(trees=valid["best_iteration"], cpu_seconds=round(time.process_time() - cpu, 1))
    if with_promotions:
        gain = booster.feature_importance("gain")
        out["promotion_gain_share"] = round(float(gain[n:].sum() / gain.sum()), 4)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/cj_ranker.yaml")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    config = load_config(args.config, [])
    if config.data.source != "completejourney":
        parser.error("--config: the promotions table is Complete Journey's (data.source)")
    split = make_split(config, load_dataset(config.data))
    params = build_model(config.model).get_params()
    model = PromotionProbe(**params)
    model.promotions = PromotionTable(*load())
    model.item_ids = np.asarray(split.train.item_map.to_external(np.arange(split.train.n_items)))
    started = time.perf_counter()
    ranker_module.FEATURE_NAMES = FEATURE_NAMES + PROMO_NAMES  # the fit's own learner too
    try:
        rows = learner_inputs(model, split.train)
    finally:
        ranker_module.FEATURE_NAMES = FEATURE_NAMES
    fit_seconds = round(time.perf_counter() - started, 1)
    runs: dict[str, list[dict]] = {"without": [], "with_promotions": []}
    for seed in range(params["seed"], params["seed"] + args.seeds):
        for name in runs:
            runs[name].append(train_trees(model, rows, name == "with_promotions", seed))
            print(name, seed, json.dumps(runs[name][-1]), flush=True)
    means = {
        name: {task: round(sum(r[task] for r in rs) / len(rs), 4) for task in TASKS}
        for name, rs in runs.items()
    }
    out = {"config": args.config, "fit_seconds": fit_seconds, "runs": runs, "means": means}
    print(json.dumps(means))
    if args.out:
        atomic_write_text(args.out, json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
