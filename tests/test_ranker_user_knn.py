"""The ranker's per-user item-KNN table (``knn_user_depth``): the user part of ``knn_score``
fitted once per user instead of summed from the history's cosine rows in every query."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from features.splits import global_time_split
from serving.ranker_features import FEATURE_NAMES, RankerState, query_features
from tests.test_ranker import SMALL, _shop
from training.models.ranker import FeatureState, RankerRecommender, user_knn_table

KNN = FEATURE_NAMES.index("knn_score")
NEW_FIELDS = ("ui_knn", "uk_indptr", "uk_items", "uk_values", "knn_user_depth")


def _random_history(seed: int = 0, n_users: int = 9, n_items: int = 14):
    rng = np.random.default_rng(seed)
    owned = rng.random((n_users, n_items)) < 0.3
    owned[0] = False  # a user without history
    # similarities on a coarse grid, so that sums tie
    sim = np.where(
        rng.random((n_items, n_items)) < 0.4, rng.integers(1, 4, (n_items, n_items)) / 4, 0
    )
    ui = sp.csr_matrix(owned.astype(np.float64))
    return ui.indptr.astype(np.int64), ui.indices.astype(np.int32), sp.csr_matrix(sim), owned, sim


@pytest.mark.parametrize("depth", [1, 3, 50])
def test_user_knn_table_matches_a_dense_sum(depth: int) -> None:
    indptr, items, sim, owned, dense_sim = _random_history()
    ui_knn, uk_indptr, uk_items, uk_values = user_knn_table(indptr, items, sim, depth)
    sums = (owned.astype(np.float64) @ dense_sim).astype(np.float32)
    for user in range(owned.shape[0]):
        own = items[indptr[user] : indptr[user + 1]]
        assert np.array_equal(ui_knn[indptr[user] : indptr[user + 1]], sums[user, own])
        others = np.flatnonzero(~owned[user] & (sums[user] > 0))
        best = others[np.lexsort((others, -sums[user, others]))][:depth]
        got = uk_items[uk_indptr[user] : uk_indptr[user + 1]]
        assert np.array_equal(got, np.sort(best)), user
        assert np.array_equal(uk_values[uk_indptr[user] : uk_indptr[user + 1]], sums[user, got])
    # blocks of users (a tiny budget: one user a block) give the same table
    again = user_knn_table(indptr, items, sim, depth, budget=1)
    assert all(np.array_equal(a, b) for a, b in
               zip((ui_knn, uk_indptr, uk_items, uk_values), again, strict=True))  # fmt: skip


@pytest.fixture(scope="module")
def history():
    split = global_time_split(_shop(), 10, 11, column="week")
    data = split.train
    return data, np.datetime64(data.interactions["timestamp"].max(), "us")


def _state(history, depth: int) -> FeatureState:
    data, ref = history
    return FeatureState.fit(data, ref, RankerRecommender(**SMALL, knn_user_depth=depth))


def _queries(state: RankerState, n: int = 30, seed: int = 1):
    rng = np.random.default_rng(seed)
    users = rng.integers(-1, state.n_users, size=n)
    sizes = rng.integers(1, 4, size=n)
    items = rng.integers(0, state.n_items, size=int(sizes.sum()))
    return users, np.r_[0, np.cumsum(sizes)], items


@pytest.mark.parametrize("exclude_owned", [False, True])
def test_a_deep_table_gives_the_per_query_sums(history, exclude_owned: bool) -> None:
    """Deep enough to keep every item, the table's knn_score is the per-query sum (depth 0),
    up to the float16 rounding of the stored user part; every other feature is identical."""
    exact, table = _state(history, 0), _state(history, 10_000)
    assert table.uk_items.size > 0 and exact.uk_items.size == 0
    for batch in (3, 30):  # the request path and the dense training path
        args = _queries(exact, batch)
        a = query_features(exact, *args, exclude_owned)
        b = query_features(table, *args, exclude_owned)
        np.testing.assert_allclose(b.features[:, KNN], a.features[:, KNN], rtol=1e-3)
        rest = [k for k in range(len(FEATURE_NAMES)) if FEATURE_NAMES[k] not in
                ("knn_score", "knn_rank")]  # fmt: skip
        if np.array_equal(a.items, b.items):  # rounding may reorder a near tie
            np.testing.assert_array_equal(b.features[:, rest], a.features[:, rest])


def test_a_shallow_table_keeps_the_user_part_at_the_top_items_only(history) -> None:
    """knn_score = the user's table value (own items: ui_knn; others: its `depth` best, else 0)
    + the cart items' cosine rows, checked against the arrays by brute force."""
    state = _state(history, 2)
    sim = sp.csr_matrix((state.sim_values.astype(np.float64), state.sim_items, state.sim_indptr),
                        shape=(state.n_items, state.n_items)).toarray()  # fmt: skip
    users, ptr, items = _queries(state, 3)
    q = query_features(state, users, ptr, items)
    rows = q.rows
    for r, (user, item, value) in enumerate(zip(users[rows], q.items, q.features[:, KNN],
                                                strict=True)):  # fmt: skip
        cart = np.unique(items[ptr[rows[r]] : ptr[rows[r] + 1]])
        part = 0.0
        if user >= 0:
            lo, hi = state.ui_indptr[user], state.ui_indptr[user + 1]
            own = dict(
                zip(state.ui_items[lo:hi].tolist(), state.ui_knn[lo:hi].tolist(), strict=True)
            )
            lo, hi = state.uk_indptr[user], state.uk_indptr[user + 1]
            top = dict(
                zip(state.uk_items[lo:hi].tolist(), state.uk_values[lo:hi].tolist(), strict=True)
            )
            assert len(top) <= 2
            part = own.get(int(item), top.get(int(item), 0.0))
        assert value == pytest.approx(part + sim[cart, item].sum(), rel=1e-6)


def test_a_state_without_the_table_reads_as_per_query_sums(history) -> None:
    """An artifact's state from before the table (no knn_user_depth, no ui_knn / uk_*) loads
    and gives exactly the features it was trained with (depth 0)."""
    exact = _state(history, 0)
    arrays = {k: v for k, v in exact.to_arrays().items() if k not in NEW_FIELDS}
    old = RankerState.from_arrays(arrays)
    assert old.knn_user_depth == 0 and old.ui_knn.size == old.ui_items.size
    args = _queries(exact, 30)
    np.testing.assert_array_equal(query_features(old, *args).features,
                                  query_features(exact, *args).features)  # fmt: skip
