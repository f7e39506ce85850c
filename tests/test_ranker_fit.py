"""The learned ranker's fit-time levers and training-query rules (issue 10, RANKFIT10):
seeded negative sampling of the training rows (validation rows never sampled) and training
queries held out with the data's own split rule (``train_split: stratified``)."""

from __future__ import annotations

import numpy as np
import pytest

from features.errors import ConfigError
from features.splits import basket_completion_task, global_time_split, stratified_split
from tests.test_ranker import SMALL, _baskets, _shop
from training.config import ModelConfig, build_model
from training.models.ranker import FeatureState, RankerRecommender, sample_negatives


def _rows(seed: int = 0):
    rng = np.random.default_rng(seed)
    group = rng.integers(5, 40, size=50)
    y = (rng.random(group.sum()) < 0.1).astype(np.float32)
    X = rng.random((group.sum(), 3)).astype(np.float32)
    return X, y, group


def test_sample_negatives_keeps_every_positive_and_is_seeded() -> None:
    X, y, group = _rows()
    Xs, ys, gs = sample_negatives(X, y, group, 0.3, seed=7)
    assert gs.size == group.size and gs.sum() == ys.size == Xs.shape[0]
    query = np.repeat(np.arange(group.size), group)
    kept_query = np.repeat(np.arange(gs.size), gs)
    # every query keeps all of its positives
    assert np.array_equal(np.bincount(query, weights=y, minlength=group.size),
                          np.bincount(kept_query, weights=ys, minlength=gs.size))  # fmt: skip
    negatives, kept = int((y == 0).sum()), int((ys == 0).sum())
    assert 0.2 * negatives < kept < 0.4 * negatives
    # kept rows are original rows, in order
    assert np.isin(Xs[:, 0], X[:, 0]).all()
    assert np.all(np.diff(np.flatnonzero(np.isin(X[:, 0], Xs[:, 0]))) > 0)
    again = sample_negatives(X, y, group, 0.3, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip((Xs, ys, gs), again, strict=True))
    other = sample_negatives(X, y, group, 0.3, seed=8)
    assert not np.array_equal(other[1], ys) or other[0].shape != Xs.shape


@pytest.fixture(scope="module")
def shop():
    data = _shop()
    return data, global_time_split(data, 10, 11, column="week")


def test_negative_sampling_cuts_training_rows_only(shop) -> None:
    _, split = shop
    full = RankerRecommender(**SMALL).fit(split.train)
    sampled = RankerRecommender(**SMALL, negative_fraction=0.3).fit(split.train)
    v, s = full.validation_, sampled.validation_
    assert s["train_queries"] == v["train_queries"]
    assert s["train_rows"] < 0.6 * v["train_rows"]
    # validation (early stopping, calibration) still sees every row of its queries
    assert s["valid_queries"] == v["valid_queries"]
    assert sum(n for *_, n in s["calibration"]["curve"]) == sum(
        n for *_, n in v["calibration"]["curve"]
    )
    again = RankerRecommender(**SMALL, negative_fraction=0.3).fit(split.train)
    assert again.booster_model_ == sampled.booster_model_


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_negatives_sampled_as_the_rows_are_built_equal_the_sample_of_all_rows(
    shop, chunk: int
) -> None:
    """The fit samples each chunk of training rows as it is built (memory at scale); the rows
    it keeps are the ones sample_negatives keeps from all the rows joined, whatever the
    chunking, and validation rows are never sampled."""
    _, split = shop
    model = RankerRecommender(**SMALL, negative_fraction=0.3)
    end = split.train.interactions["timestamp"].max()
    start, _, history, window = model._training_windows(split.train, end)[-1]
    state = FeatureState.fit(history, np.datetime64(start, "us"), model)
    task = basket_completion_task(history, window, seed=model.seed)
    pick = np.arange(task.n_queries)
    valid = task.query_ids[::4]  # every fourth basket validates
    whole = model._training_rows(task, pick, state, valid)
    built = model._training_rows(task, pick, state, valid, np.random.default_rng([7, 2]), chunk)
    X, y, group = sample_negatives(np.concatenate(whole["X"]), whole["y"], whole["group"], 0.3, 7)
    assert 0 < y.size < whole["y"].size
    assert np.array_equal(np.concatenate(built["X"]), X, equal_nan=True)
    assert np.array_equal(built["y"], y) and np.array_equal(built["group"], group)
    for key in ("yv", "gv", "nv_relevant", "baskets"):
        assert np.array_equal(built[key], whole[key])
    assert np.array_equal(np.concatenate(built["Xv"]), np.concatenate(whole["Xv"]), equal_nan=True)
    # the validation queries are the kept baskets of `valid`, the training ones the rest
    is_valid = np.isin(whole["baskets"], valid)
    assert whole["gv"].size == is_valid.sum() > 0 and whole["group"].size == (~is_valid).sum()


def test_bagged_trees_are_seeded(shop) -> None:
    """Row and feature sampling per tree change the trees, and are reproducible: the
    sampling is seeded by ``seed``."""
    _, split = shop
    params = {**SMALL, "feature_fraction": 0.7, "bagging_fraction": 0.8}

    def trees(model: RankerRecommender) -> str:  # the model string without its parameters
        return model.booster_model_.split("parameters:")[0]

    bagged = trees(RankerRecommender(**params).fit(split.train))
    assert bagged != trees(RankerRecommender(**SMALL).fit(split.train))
    assert trees(RankerRecommender(**params).fit(split.train)) == bagged


def test_stratified_training_queries_follow_the_split_rule(shop) -> None:
    _, split = shop
    params = {**SMALL, "train_windows": 1}
    model = RankerRecommender(**params, train_split="stratified", train_ratio=0.6).fit(split.train)
    rule = stratified_split(split.train, 0.6, seed=model.seed)
    [window] = model.training_log
    queries = set(window["query_baskets"].tolist())
    assert queries and queries <= _baskets(rule.test)
    # the history is the rule's train part: every basket of it, not the rows before a date
    assert set(window["history_baskets"].tolist()) == _baskets(rule.train)
    # a time window would hold only the last window_days of baskets; these span the data
    timed = RankerRecommender(**params).fit(split.train)
    assert len(queries) > len(timed.training_log[0]["query_baskets"])


def test_bad_training_split_settings_name_the_key() -> None:
    for key, value in (("train_split", "random"), ("train_ratio", 1.0),
                       ("negative_fraction", 0.0), ("feature_fraction", 0.0),
                       ("bagging_fraction", 1.5), ("lambda_l2", -1.0),
                       ("min_sum_hessian_in_leaf", -0.1)):  # fmt: skip
        with pytest.raises(ConfigError, match=f"model.params.{key}"):
            build_model(ModelConfig("ranker", {key: value}))


def test_pool_recommend_equals_the_dense_top_k(shop) -> None:
    """The ranker's recommend ranks carts from their pools and empty carts from the re-buy
    items and the tie-break order; the base class ranks dense score() rows: the same items
    and scores for every filter, short pools, empty carts and unknown users."""
    import scipy.sparse as sp

    from features.splits import basket_completion_task
    from training.models.base import CandidateFilter, RecommenderBase

    _, split = shop
    model = RankerRecommender(**{**SMALL, "n_cooccurrence": 3, "n_cf": 2, "n_category": 2,
                                 "n_rebuy": 4, "n_popular": 0})  # fmt: skip
    model.fit(split.train)
    task = basket_completion_task(split.train, split.test)
    users = task.users.astype(np.int64).copy()
    users[::4] = -1
    cart_rows = task.carts.toarray()
    cart_rows[1::3] = 0  # empty carts (known and unknown users): the re-buy ranking
    carts = sp.csr_matrix(cart_rows)
    rng = np.random.default_rng(0)
    filters = [
        CandidateFilter(),
        CandidateFilter(exclude_owned=True),
        CandidateFilter(exclude_cart=False),
        CandidateFilter(block_items=rng.choice(model.n_items_, 8, replace=False)),
        CandidateFilter(allow_items=rng.choice(model.n_items_, 12, replace=False)),
    ]
    short = 0
    for cand in filters:
        for k in (5, 25):
            ours = model.recommend(users, carts, k=k, candidates=cand, batch_size=7)
            model._new_to_user = cand.exclude_owned
            dense = RecommenderBase.recommend(model, users, carts, k, cand, batch_size=7)
            model._new_to_user = False
            assert np.array_equal(ours[0], dense[0]), (cand, k)
            assert np.array_equal(ours[1], dense[1]), (cand, k)
            short += int((dense[1] < -900).sum())
    assert short > 0, "some lists must be filled beyond the pool (the popularity fill)"
    empty = np.flatnonzero(cart_rows.sum(axis=1) == 0)
    assert empty.size > 10 and (users[empty] < 0).any() and (users[empty] >= 0).any()


def test_count_shares_divide_the_count_features_by_the_history_totals(shop) -> None:
    """``count_features: shares`` stores count_shares in the state, and the features then hold
    the COUNT_SHARES counts divided by the history's baskets (item buyers: its users), every
    other column unchanged; the default (raw) is an older state's meaning."""
    from features.splits import basket_completion_task
    from serving.ranker_features import COUNT_SHARES, FEATURE_NAMES, RankerState, StateError
    from serving.ranker_features import query_features as qf

    _, split = shop
    raw = RankerRecommender(**SMALL).fit(split.train)
    shares = RankerRecommender(**SMALL, count_features="shares").fit(split.train)
    assert raw.state_.count_shares == 0 and shares.state_.count_shares == 1
    # Totals counted here from the rows, not read from the state.
    totals = {"history_baskets": len(_baskets(split.train)),
              "history_users": split.train.interactions["user_idx"].n_unique()}  # fmt: skip
    task = basket_completion_task(split.train, split.test, new_to_user=True)
    users = task.users.astype(np.int64).copy()
    users[::5] = -1  # unknown users: their user counts stay NaN
    as_shares = RankerState.from_arrays({**raw.state_.to_arrays(), "count_shares": np.asarray(1)})
    old = RankerState.from_arrays({k: v for k, v in raw.state_.to_arrays().items()
                                   if k != "count_shares"})  # fmt: skip
    assert old.count_shares == 0
    for exclude_owned in (False, True):
        args = (users, task.carts.indptr, task.carts.indices, exclude_owned)
        base, got, before = qf(raw.state_, *args), qf(as_shares, *args), qf(old, *args)
        np.testing.assert_array_equal(before.features, base.features)  # an old state: raw
        np.testing.assert_array_equal(got.items, base.items)  # the same candidates
        for k, name in enumerate(FEATURE_NAMES):
            expected = base.features[:, k]
            if name in COUNT_SHARES:
                expected = expected / np.float32(totals[COUNT_SHARES[name]])
            np.testing.assert_allclose(got.features[:, k], expected, rtol=1e-6, equal_nan=True,
                                       err_msg=name)  # fmt: skip
        assert np.isfinite(base.features[:, FEATURE_NAMES.index("item_baskets")]).all()
        assert (base.features[:, FEATURE_NAMES.index("item_baskets")] > 1).any()
    with pytest.raises(StateError, match="count_shares"):
        RankerState.from_arrays({**raw.state_.to_arrays(), "count_shares": np.asarray(2)})
    with pytest.raises(ConfigError, match=r"model\.params\.count_features"):
        build_model(ModelConfig("ranker", {"count_features": "log"}))


def test_count_shares_are_served_as_trained(shop, tmp_path) -> None:
    """A ``count_features: shares`` model exported and served: the artifact's state carries
    count_shares, so the served top-k is the training side's (ties aside)."""
    from features.splits import basket_completion_task
    from serving.ranker_features import RankerState
    from tests.test_ranker_serving import _served_equals_training
    from training.export import export_model

    _, split = shop
    model = RankerRecommender(**SMALL, count_features="shares").fit(split.train)
    path = export_model(model, split.train, tmp_path / "artifact")
    with np.load(path / "ranker_state.npz") as arrays:
        assert RankerState.from_arrays(arrays).count_shares == 1
    task = basket_completion_task(split.train, split.test, new_to_user=True)
    users = task.users.astype(np.int64)
    assert _served_equals_training(model, split.train, path, users, task.carts, True) < 0.05
