"""Splits and tasks, including the Complete Journey protocol checked against an independent,
literal implementation of its text on the real data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from features.errors import ConfigError
from features.splits import (
    basket_completion_task,
    global_time_split,
    leave_last_basket_out,
    next_period_task,
)


def _rows(m, r) -> set:
    return set(m.indices[m.indptr[r] : m.indptr[r + 1]].tolist())


def test_global_time_split_windows_and_warm_users(tiny_data) -> None:
    split = global_time_split(tiny_data, 2, 3, 2, column="week")
    assert split.train.interactions["week"].max() <= 2
    assert split.test.interactions["week"].min() >= 3
    assert split.validation is not None and split.train_before_validation is not None
    assert set(split.validation.interactions["week"].unique()) == {2}
    assert set(split.train_before_validation.interactions["week"].unique()) == {1}
    # test users 1, 2 bought in train, user 4 did not
    assert split.stats["test"].warm_users == 2
    assert split.stats["test"].cold_users == 1
    assert split.stats["train"].rows + split.stats["test"].rows == tiny_data.interactions.height


def test_global_time_split_rejects_bad_bounds(tiny_data) -> None:
    with pytest.raises(ConfigError, match=r"split\.test_start"):
        global_time_split(tiny_data, 3, 3, column="week")
    with pytest.raises(ConfigError, match=r"split\.validation_start"):
        global_time_split(tiny_data, 2, 3, 5, column="week")
    with pytest.raises(ConfigError, match="ISO-8601"):
        global_time_split(tiny_data, "not a date", "2024-02-01")
    with pytest.raises(ConfigError, match="empty"):
        global_time_split(tiny_data, "2020-01-01", "2020-01-02")


def test_timestamp_split_with_iso_bounds(tiny_data) -> None:
    split = global_time_split(tiny_data, "2024-01-14T23:59:59", "2024-01-15")
    assert split.train.interactions.height == 7
    assert split.test.interactions.height == 7


def test_leave_last_basket_out(tiny_data) -> None:
    train, test = leave_last_basket_out(tiny_data)
    # user 1: last basket 102, user 2: 202; user 3 and 4 have one basket: stay in train
    assert set(test.interactions["basket_id"].unique()) == {102, 202}
    assert train.interactions.height + test.interactions.height == tiny_data.interactions.height


def test_basket_completion_on_tiny_data(tiny_data) -> None:
    split = global_time_split(tiny_data, 2, 3, column="week")
    task = basket_completion_task(split.train, split.test, seed=0)
    # basket 102 (user 1: items 10, 13, 14 all known) and 202 (user 2: 11, 12); 400 is cold.
    assert task.query_ids.tolist() == [102, 202]
    idx = tiny_data.item_map.to_internal
    for q, items in enumerate([[10, 13, 14], [11, 12]]):
        cart, held = _rows(task.carts, q), _rows(task.relevant, q)
        assert cart | held == set(idx(items).tolist())
        assert not cart & held
        assert len(cart) == max(1, len(items) // 2)
    new = basket_completion_task(split.train, split.test, seed=0, new_to_user=True)
    # both baskets keep a held-out item the user never bought (102: 13 or 14; 202: 11 or 12)
    assert new.query_ids.tolist() == [102, 202]
    owned = {0: set(idx([10, 11, 12]).tolist()), 1: set(idx([10, 13]).tolist())}
    for q in range(new.n_queries):
        user_row = 0 if new.query_ids[q] == 102 else 1
        assert not _rows(new.relevant, q) & owned[user_row]
        assert _rows(new.relevant, q)
    assert new.exclude_owned and not task.exclude_owned


def test_next_period_task(tiny_data) -> None:
    split = global_time_split(tiny_data, 2, 3, column="week")
    task = next_period_task(split.train, split.test)
    idx = tiny_data.item_map.to_internal
    assert tiny_data.user_map.to_external(task.users).tolist() == [1, 2]
    assert _rows(task.relevant, 0) == set(idx([10, 13, 14]).tolist())
    assert task.carts.nnz == 0


def _protocol_reference(tx: pd.DataFrame, new_to_user: bool) -> dict[int, tuple[set, set]]:
    """The Complete Journey protocol, written literally from its text with pandas."""
    tx = tx[tx["quantity"] > 0]
    train, test = tx[tx["week"] <= 49], tx[tx["week"] >= 50]
    train_items = set(train["product_id"])
    train_households = set(train["household_id"])
    owned = train.groupby("household_id")["product_id"].agg(set).to_dict()
    test = test[test["household_id"].isin(train_households) & test["product_id"].isin(train_items)]
    rng = np.random.default_rng(42)
    out = {}
    for basket_id, g in sorted(test.groupby("basket_id"), key=lambda kv: kv[0]):
        products = np.sort(g["product_id"].unique())
        if len(products) < 2:
            continue
        perm = rng.permutation(products)
        n_cart = max(1, len(products) // 2)
        cart, held = set(perm[:n_cart].tolist()), set(perm[n_cart:].tolist())
        if new_to_user:
            held -= owned[g["household_id"].iloc[0]]
            if not held:
                continue
        out[int(basket_id)] = (cart, held)
    return out


@pytest.mark.parametrize("new_to_user", [False, True])
def test_complete_journey_protocol_matches_literal_reference(cj_split, new_to_user) -> None:
    from features.adapters.completejourney import data_dir

    tx = pd.read_parquet(
        data_dir() / "transactions.parquet",
        columns=["household_id", "basket_id", "product_id", "quantity", "week"],
    )
    expected = _protocol_reference(tx, new_to_user)
    task = basket_completion_task(cj_split.train, cj_split.test, seed=42, new_to_user=new_to_user)
    assert task.query_ids.tolist() == sorted(expected)
    ext = cj_split.train.item_map.external_ids
    for q, basket in enumerate(task.query_ids.tolist()):
        cart = set(ext[list(_rows(task.carts, q))].tolist())
        held = set(ext[list(_rows(task.relevant, q))].tolist())
        assert (cart, held) == expected[basket], basket
