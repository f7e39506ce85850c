"""The model interface, candidate filters, exact top-k, and the baselines."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from features.splits import basket_completion_task, global_time_split
from training.models import (
    CooccurrenceRecommender,
    PersonalPopularityRecommender,
    PopularityRecommender,
)
from training.models.base import CandidateFilter, top_k
from training.models.baselines import keep_top_per_row


def test_top_k_is_exact_with_ties_and_padding() -> None:
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=(50, 700)).astype(np.float32)  # many ties
    scores[3, :] = -np.inf
    scores[4, :] = -np.inf
    scores[4, [9, 600]] = [1.0, 2.0]
    scores[5, 10] = np.nan
    idx, vals = top_k(scores, 7)
    for r in range(50):
        s = np.where(np.isnan(scores[r]), -np.inf, scores[r])
        order = sorted((i for i in range(700) if np.isfinite(s[i])), key=lambda i: (-s[i], i))[:7]
        expected = order + [-1] * (7 - len(order))
        assert idx[r].tolist() == expected, r
    assert idx[4].tolist()[:3] == [600, 9, -1]
    assert np.isneginf(vals[3]).all()


def test_keep_top_per_row() -> None:
    m = sp.csr_matrix(np.array([[0, 3, 1, 3, 2], [5, 0, 0, 0, 0]], dtype=np.float32))
    out = keep_top_per_row(m, 2).toarray()
    np.testing.assert_array_equal(out, [[0, 3, 0, 3, 0], [5, 0, 0, 0, 0]])


def test_popularity_and_filters(tiny_data) -> None:
    split = global_time_split(tiny_data, 2, 3, column="week")
    model = PopularityRecommender().fit(split.train)
    idx = tiny_data.item_map.to_internal
    users = tiny_data.user_map.to_internal([1, 2])
    items, scores = model.recommend(users, k=5)
    # train buyers: item 10 -> users 1, 2; 11, 12 -> user 1; 13 -> user 2; 14 -> user 3
    assert items[0, 0] == idx([10])[0]
    assert (np.diff(scores[0]) <= 0).all()
    carts = sp.csr_matrix((np.ones(1), ([0], [idx([10])[0]])), shape=(2, tiny_data.n_items))
    items, _ = model.recommend(users, carts, k=5)
    assert idx([10])[0] not in items[0] and idx([10])[0] in items[1]
    items, _ = model.recommend(users, k=5, candidates=CandidateFilter(exclude_owned=True))
    owned_by_1 = set(idx([10, 11, 12]).tolist())
    assert not owned_by_1 & set(items[0].tolist())
    assert (items[0] == -1).sum() == 3  # only items 13, 14 remain for user 1
    allow = idx([12, 14])
    items, _ = model.recommend(users, k=3, candidates=CandidateFilter(allow_items=allow))
    assert set(items[0].tolist()) == {*allow.tolist(), -1}
    items, _ = model.recommend(users, k=5, candidates=CandidateFilter(block_items=idx([10])))
    assert idx([10])[0] not in items


def test_personal_popularity_rebuys_first_with_decay(tiny_data) -> None:
    split = global_time_split(tiny_data, 2, 3, column="week")
    idx = tiny_data.item_map.to_internal
    user2 = tiny_data.user_map.to_internal([2])
    model = PersonalPopularityRecommender().fit(split.train)
    items, scores = model.recommend(user2, k=2)
    assert items[0].tolist() == idx([10, 13]).tolist()  # bought 10 twice, 13 once
    assert scores[0, 0] == pytest.approx(2.0, rel=1e-4)
    decayed = PersonalPopularityRecommender(half_life_days=1.0).fit(split.train)
    s = decayed.score(user2, sp.csr_matrix((1, tiny_data.n_items)))
    # basket 201 (day 8) is the last train basket: weight 1; basket 200 (day 1): 0.5**7
    assert s[0, idx([10])[0]] == pytest.approx(1 + 0.5**7, rel=1e-4)
    anonymous = model.score(np.array([-1]), sp.csr_matrix((1, tiny_data.n_items)))
    assert anonymous.max() < 1e-5  # popularity tie-breaker only
    with pytest.raises(ValueError, match="half_life_days"):
        PersonalPopularityRecommender(half_life_days=0)


def test_cooccurrence_confidence_by_hand(tiny_data) -> None:
    split = global_time_split(tiny_data, 2, 3, column="week")
    model = CooccurrenceRecommender().fit(split.train)
    idx = tiny_data.item_map.to_internal
    i10, i11, i13 = idx([10, 11, 13])
    # baskets holding 10: 100, 200, 201 -> conf(10 -> 11) = 1/3, conf(10 -> 13) = 1/3
    conf = model.confidence_.toarray()
    assert conf[i10, i11] == pytest.approx(1 / 3)
    assert conf[i11, i10] == pytest.approx(1.0)
    assert conf[i10, i10] == 0
    cart = sp.csr_matrix((np.ones(2), ([0, 0], [i11, i13])), shape=(1, tiny_data.n_items))
    s = model.score(np.array([0]), cart)
    assert s[0, i10] == pytest.approx(2.0, abs=1e-5)  # 1 (from 11) + 1 (from 13)


def test_not_fitted_and_bad_arguments(tiny_data) -> None:
    with pytest.raises(RuntimeError, match="not fitted"):
        PopularityRecommender().recommend(np.array([0]))
    model = PopularityRecommender().fit(tiny_data)
    with pytest.raises(ValueError, match="carts must have shape"):
        model.recommend(np.array([0]), sp.csr_matrix((2, 3)))
    with pytest.raises(ValueError, match="k must be"):
        model.recommend(np.array([0]), k=0)


def test_baselines_are_reproducible_on_real_data(cj_split) -> None:
    task = basket_completion_task(cj_split.train, cj_split.test)
    users, carts = task.users[:300], task.carts[:300]
    for make in (PersonalPopularityRecommender, lambda: CooccurrenceRecommender(neighbours=50)):
        a = make().fit(cj_split.train).recommend(users, carts, k=10)
        b = make().fit(cj_split.train).recommend(users, carts, k=10)
        np.testing.assert_array_equal(a[0], b[0])
        assert (a[0] >= 0).all()  # lists are full
        cart_hit = carts.multiply(
            sp.csr_matrix(
                (np.ones(a[0].size), (np.repeat(np.arange(300), 10), a[0].ravel())),
                shape=carts.shape,
            )
        )
        assert cart_hit.nnz == 0  # never the cart


def test_exclude_owned_leaves_an_unknown_user_every_item(tiny_data) -> None:
    """An unknown user (index -1) owns nothing: the owned items of user index 0 (which the
    -1 row is read from before being zeroed) must not be masked for it."""
    split = global_time_split(tiny_data, 2, 3, column="week")
    model = PopularityRecommender().fit(split.train)
    assert model.owned_[0].nnz > 0  # the row an unknown user would wrongly borrow
    users = np.array([-1, 0])
    plain, _ = model.recommend(users, k=tiny_data.n_items)
    owned, _ = model.recommend(
        users, k=tiny_data.n_items, candidates=CandidateFilter(exclude_owned=True)
    )
    assert set(owned[0][owned[0] >= 0].tolist()) == set(plain[0][plain[0] >= 0].tolist())
    assert (owned[1] >= 0).sum() == (plain[1] >= 0).sum() - model.owned_[0].nnz


@pytest.mark.parametrize("params", [{}, {"damping": 0.3, "min_support": 2, "neighbours": 5},
                                    {"neighbours": 0}])  # fmt: skip
def test_cooccurrence_in_item_blocks_equals_one_block(cj_slice, monkeypatch, params) -> None:
    """The bounded-memory blocked product gives exactly the one-product rules."""
    from training.models import baselines

    one = CooccurrenceRecommender(**params).fit(cj_slice.train).confidence_
    monkeypatch.setattr(baselines, "PAIR_BUDGET", 2_000)  # hundreds of blocks
    blocks = list(baselines.cooccurrence_blocks(cj_slice.train.basket_item_matrix().matrix, 2_000))
    assert len(blocks) > 100
    many = CooccurrenceRecommender(**params).fit(cj_slice.train).confidence_
    assert many.shape == one.shape and many.dtype == one.dtype == np.float32
    assert (many != one).nnz == 0 and many.nnz == one.nnz > 0
    assert np.array_equal(many.indptr, one.indptr) and np.array_equal(many.indices, one.indices)
