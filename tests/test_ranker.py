"""The learned ranker (training/models/ranker.py) on small generated data: no leakage from
test or from a training window into its own history, reproducible fits, candidate recall,
the feature definitions against an independent pandas computation, persistence."""

from __future__ import annotations

import numpy as np
import pandas as pd
import polars as pl
import pytest
import scipy.sparse as sp

from features.cleaning import CleaningConfig
from features.dataset import build_dataset
from features.splits import basket_completion_task, global_time_split
from tests.conftest import make_raw
from training.models.base import CandidateFilter
from training.models.ranker import (
    FEATURE_NAMES,
    FEATURES,
    FLOOR,
    RankerRecommender,
    calibrate,
    candidate_recall,
    expected_calibration_error,
)
from training.persistence import load_model, save_model

SMALL = {"n_rebuy": 10, "n_cooccurrence": 10, "n_cf": 5, "n_category": 5, "n_popular": 3,
         "neighbours": 20,
         "cf_neighbours": 10, "train_windows": 2, "window_days": 14, "train_queries": 0,
         "n_estimators": 20, "min_data_in_leaf": 5, "num_leaves": 7}  # fmt: skip


def _shop(seed: int = 3):
    """40 households, 30 items in 2 departments / 6 categories / 10 sub-categories, 12
    weeks; each household shops from its own favourites, so there is something to learn."""
    rng = np.random.default_rng(seed)
    rows, basket = [], 1000
    for user in range(1, 41):
        favourites = rng.choice(30, size=8, replace=False)
        for day in np.sort(rng.choice(84, size=rng.integers(6, 14), replace=False)):
            basket += 1
            size = int(rng.integers(2, 6))
            items = set(rng.choice(favourites, size=size - 1).tolist())
            items.add(int(rng.integers(0, 30)))
            rows += [(user, 100 + i, basket, int(day), 1) for i in sorted(items)]
    items = [
        {"item_id": 100 + i, "department": f"d{i % 2}", "category": f"c{i % 6}",
         "subcategory": f"s{i % 10}", "price": float(1 + i % 7)}
        for i in range(30)
    ]  # fmt: skip
    return build_dataset(make_raw(rows, items), CleaningConfig())


@pytest.fixture(scope="module")
def shop():
    data = _shop()
    return data, global_time_split(data, 10, 11, column="week")


@pytest.fixture(scope="module")
def fitted(shop):
    _, split = shop
    return RankerRecommender(**SMALL).fit(split.train)


def _baskets(data) -> set:
    return set(data.interactions["basket_id"].unique().to_list())


def test_no_leakage_from_test_or_a_window_into_its_history(shop, fitted) -> None:
    data, split = shop
    test_baskets = _baskets(split.test)
    assert test_baskets, "the fixture must have a test part"
    times = data.interactions.group_by("basket_id").agg(pl.col("timestamp").min())
    basket_time = dict(zip(times["basket_id"].to_list(), times["timestamp"].to_list(), strict=True))
    assert len(fitted.training_log) == 2
    for window in fitted.training_log:
        history = set(window["history_baskets"].tolist())
        queries = set(window["query_baskets"].tolist())
        assert history and queries, "each window trained on something"
        assert not history & test_baskets and not queries & test_baskets
        assert not history & queries, "a window's baskets must not be in its own history"
        assert max(basket_time[b] for b in history) < window["start"]
        assert min(basket_time[b] for b in queries) >= window["start"]
    # the final statistics: all of train, never test
    assert set(fitted.state_.basket_ids.tolist()) == _baskets(split.train)


def test_two_fits_with_the_same_seed_score_identically(shop, fitted) -> None:
    _, split = shop
    again = RankerRecommender(**SMALL).fit(split.train)
    task = basket_completion_task(split.train, split.test)
    a = fitted.score(task.users, task.carts)
    b = again.score(task.users, task.carts)
    assert np.array_equal(a, b)
    assert again.booster_model_ == fitted.booster_model_


def test_candidate_recall_hand_checked() -> None:
    pool = sp.csr_matrix(np.array([[1, 0, 1, 0, 0], [0, 0, 0, 4, 0], [2, 2, 0, 0, 0]], np.float32))
    relevant = sp.csr_matrix(
        np.array([[1, 1, 0, 0, 0], [0, 0, 0, 1, 1], [0, 0, 0, 0, 0]], np.float32)
    )
    r = candidate_recall(pool, relevant)
    assert r["micro"] == pytest.approx(2 / 4)  # item 0 of query 0, item 3 of query 1
    assert r["per_query"] == pytest.approx((1 / 2 + 1 / 2) / 2)  # query 2 has no truth
    assert r["pool_size"] == pytest.approx(5 / 3)


def test_pool_never_holds_the_cart_nor_owned_items_when_excluded(shop, fitted) -> None:
    _, split = shop
    task = basket_completion_task(split.train, split.test, new_to_user=True)
    pool = fitted.candidate_pool(task.users, task.carts, exclude_owned=True)
    assert pool.nnz > 0
    assert sp.csr_matrix(pool.multiply(task.carts)).nnz == 0
    owned = split.train.user_item_counts()[task.users]
    assert sp.csr_matrix(pool.multiply(owned)).nnz == 0
    owned_pool = fitted.candidate_pool(task.users, task.carts, exclude_owned=False)
    assert sp.csr_matrix(owned_pool.multiply(owned)).nnz > 0, "re-buy candidates when allowed"


def test_features_match_an_independent_pandas_computation(shop, fitted) -> None:
    _, split = shop
    task = basket_completion_task(split.train, split.test)
    batch = fitted.query_batch(task.users, task.carts)
    X = pd.DataFrame(batch.features, columns=list(FEATURE_NAMES))
    X["u"], X["j"] = task.users[batch.rows], batch.cols
    X["q"] = batch.rows
    train = split.train
    lines = train.interactions.to_pandas()[["user_idx", "item_idx", "basket_id", "timestamp"]]
    lines = lines.groupby(["user_idx", "basket_id", "item_idx"], as_index=False).timestamp.min()
    ref = train.interactions["timestamp"].max()
    ui = lines.groupby(["user_idx", "item_idx"]).agg(
        n=("basket_id", "nunique"), last=("timestamp", "max"), first=("timestamp", "min")
    )
    items = train.items.to_pandas().set_index("item_idx").sort_index()
    price = items["price"].to_numpy()
    subcat = items["subcategory"].to_numpy()
    pair_baskets = lines.groupby("basket_id").item_idx.apply(set)
    # co(i, j) with each i's `neighbours` most frequent partners (ties: lower j) kept
    pairs = lines.merge(lines, on="basket_id").query("item_idx_x != item_idx_y")
    co = pairs.groupby(["item_idx_x", "item_idx_y"]).size().rename("co").reset_index()
    co = co.sort_values(["item_idx_x", "co", "item_idx_y"], ascending=[True, False, True])
    co = co[co.groupby("item_idx_x").cumcount() < SMALL["neighbours"]]
    co = co.set_index(["item_idx_x", "item_idx_y"]).co.to_dict()
    checked = rebuy_hits = co_hits = 0
    for row in X.sample(n=min(len(X), 150), random_state=0).itertuples():
        u, j, q = int(row.u), int(row.j), int(row.q)
        cart = task.carts[q].indices.tolist()
        if (u, j) in ui.index:
            rebuy_hits += 1
            rec = ui.loc[(u, j)]
            assert row.rebuy_baskets == rec.n
            days = (ref - rec["last"]).total_seconds() / 86400
            assert row.days_since_last == pytest.approx(days, rel=1e-5)
            if rec.n >= 2:
                interval = (rec["last"] - rec["first"]).total_seconds() / 86400 / (rec.n - 1)
                assert row.mean_interval_days == pytest.approx(interval, rel=1e-5)
        else:
            assert row.rebuy_baskets == 0 and np.isnan(row.days_since_last)
        assert row.cooc_max_count == max(co.get((i, j), 0) for i in cart)
        co_hits += row.cooc_max_count > 0
        assert row.cart_same_subcategory == pytest.approx(
            np.mean([subcat[i] == subcat[j] for i in cart])
        )
        assert row.price_ratio_cart == pytest.approx(price[j] / np.mean(price[cart]), rel=1e-5)
        assert row.item_baskets == sum(1 for s in pair_baskets if j in s)
        assert row.cart_size == len(cart)
        checked += 1
    assert checked > 0 and rebuy_hits > 0 and co_hits > 0, "the sample exercises each feature"


def test_features_documented_once_and_scores_keep_candidates_first(shop, fitted) -> None:
    assert len(set(FEATURE_NAMES)) == len(FEATURES) and all(f.definition for f in FEATURES)
    _, split = shop
    task = basket_completion_task(split.train, split.test)
    scores = fitted.score(task.users, task.carts)
    pool = fitted.candidate_pool(task.users, task.carts)
    candidate = pool.toarray() > 0
    assert (scores[candidate] > FLOOR + 1).all() and (scores[~candidate] < FLOOR + 1.5).all()


def test_task_follows_the_candidate_filter_and_persistence_round_trip(
    shop, fitted, tmp_path
) -> None:
    _, split = shop
    task = basket_completion_task(split.train, split.test, new_to_user=True)
    flt = CandidateFilter(exclude_owned=True)
    items, _ = fitted.recommend(task.users, task.carts, k=5, candidates=flt)
    owned = split.train.user_item_counts()[task.users].toarray() > 0
    assert not np.take_along_axis(owned, np.maximum(items, 0), axis=1)[items >= 0].any()
    loaded = load_model(save_model(fitted, tmp_path / "ranker"))
    again, _ = loaded.recommend(task.users, task.carts, k=5, candidates=flt)
    assert np.array_equal(items, again)


def test_platt_calibration_recovers_a_known_probability() -> None:
    rng = np.random.default_rng(0)
    raw = rng.normal(size=40_000)
    y = (rng.random(raw.size) < 1 / (1 + np.exp(-(2.0 * raw - 1.0)))).astype(np.float32)
    cal = calibrate(raw, y, np.full(400, 100), seed=1)
    assert cal["a"] == pytest.approx(2.0, abs=0.1) and cal["b"] == pytest.approx(-1.0, abs=0.1)
    assert cal["ece"] < 0.02
    # an uncalibrated score (the raw sigmoid, twice too flat) has a visible ECE
    flat = expected_calibration_error(1 / (1 + np.exp(-raw)), y)
    assert flat["ece"] > 0.05


def test_ece_hand_checked() -> None:
    prob = np.array([0.1, 0.1, 0.9, 0.9])
    y = np.array([0.0, 1.0, 1.0, 1.0])
    # two bins: {0.1, 0.1} observed 0.5 -> |0.1 - 0.5|; {0.9, 0.9} observed 1 -> |0.9 - 1|
    assert expected_calibration_error(prob, y, bins=2)["ece"] == pytest.approx((0.4 + 0.1) / 2)
