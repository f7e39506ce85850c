"""Id maps, matrices, weighting, features and the fingerprint."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp

from features.cleaning import CleaningConfig
from features.dataset import build_dataset
from features.errors import DataValidationError
from features.idmap import IdMap
from features.weighting import apply_weighting
from tests.conftest import make_raw


def test_idmap_is_sorted_stable_and_round_trips(tmp_path) -> None:
    a = IdMap.from_ids(pl.Series([30, 10, 20, 10]))
    b = IdMap.from_ids(pl.Series([20, 30, 10]))
    np.testing.assert_array_equal(a.external_ids, [10, 20, 30])
    np.testing.assert_array_equal(a.external_ids, b.external_ids)
    assert a.to_internal([30, 10]).tolist() == [2, 0]
    assert a.to_internal([99, 20], unknown="ignore").tolist() == [-1, 1]
    with pytest.raises(DataValidationError, match="unknown id"):
        a.to_internal([99])
    path = tmp_path / "items.json"
    a.save(path)
    assert json.loads(path.read_text())["ids"] == [10, 20, 30]
    np.testing.assert_array_equal(IdMap.load(path).external_ids, a.external_ids)
    s = IdMap.from_ids(["b", "a"], ["c"])
    assert s.is_str and s.to_internal(["c", "a"]).tolist() == [2, 0]
    s.save(path)
    assert IdMap.load(path).external_ids.tolist() == ["a", "b", "c"]


def test_idmap_load_rejects_foreign_json(tmp_path) -> None:
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"ids": [1, 2]}))
    with pytest.raises(DataValidationError, match="not an addons id map"):
        IdMap.load(path)


def test_user_item_counts_and_baskets(tiny_data) -> None:
    counts = tiny_data.user_item_counts().toarray()
    u = tiny_data.user_map.to_internal([2])[0]
    i = tiny_data.item_map.to_internal([10])[0]
    assert counts[u, i] == 2  # user 2 bought item 10 in baskets 200 and 201
    assert counts.sum() == tiny_data.interactions.height
    bm = tiny_data.basket_item_matrix()
    assert bm.basket_ids.tolist() == sorted(bm.basket_ids.tolist())
    assert bm.matrix.shape == (8, tiny_data.n_items)  # baskets 100-102, 200-202, 300, 400
    assert bm.matrix.max() == 1.0


def _implicit_weight(name, X):
    from implicit.nearest_neighbours import bm25_weight, tfidf_weight

    fn = bm25_weight if name == "bm25" else tfidf_weight
    return sp.csr_matrix(fn(sp.coo_matrix(X)))


@pytest.mark.parametrize("scheme", ["bm25", "tfidf"])
def test_weighting_matches_implicit(scheme) -> None:
    rng = np.random.default_rng(0)
    X = sp.random(60, 40, density=0.2, random_state=1, format="csr")
    X.data = rng.integers(1, 6, X.nnz).astype(float)
    ours = apply_weighting(X, scheme)
    theirs = _implicit_weight(scheme, X)
    np.testing.assert_allclose(ours.toarray(), theirs.toarray(), rtol=1e-5, atol=1e-6)


def test_simple_weightings() -> None:
    X = sp.csr_matrix(np.array([[0, 2, 3], [1, 0, 0]], dtype=float))
    np.testing.assert_array_equal(apply_weighting(X, "binary").toarray(), (X.toarray() > 0) * 1.0)
    np.testing.assert_allclose(apply_weighting(X, "log1p").toarray(), np.log1p(X.toarray()))
    np.testing.assert_array_equal(apply_weighting(X, "count").toarray(), X.toarray())
    with pytest.raises(ValueError, match="unknown weighting"):
        apply_weighting(X, "pagerank")


def test_item_features_one_hot(tiny_data) -> None:
    f = tiny_data.item_features(columns=("category",), price_bands=2, tags=False)
    names = f.names
    assert {"category=a", "category=b", "category=c"} <= set(names)
    assert {"price_band=0", "price_band=1"} == {n for n in names if n.startswith("price_band")}
    m = f.matrix.toarray()
    i = tiny_data.item_map.to_internal([14])[0]
    assert m[i, names.index("category=c")] == 1
    assert m[i, names.index("price_band=1")] == 1  # most expensive item, upper band
    assert (m.sum(axis=1) == 2).all()  # one category and one band per item


def test_fingerprint_ignores_row_order_and_tracks_content_and_config() -> None:
    rows = [(1, 10, 100, 0, 1), (1, 11, 100, 0, 1), (2, 10, 200, 1, 1), (2, 12, 201, 2, 1)]
    a = build_dataset(make_raw(rows), CleaningConfig())
    b = build_dataset(make_raw(rows[::-1]), CleaningConfig())
    c = build_dataset(make_raw(rows[:-1]), CleaningConfig())
    d = build_dataset(make_raw(rows), CleaningConfig(min_item_interactions=1), {"other": 1})
    assert a.fingerprint == b.fingerprint
    assert a.fingerprint != c.fingerprint
    assert a.fingerprint != d.fingerprint


def test_cleaning_report_counts_each_step() -> None:
    rows = [
        (1, 10, 100, 0, 1), (1, 10, 100, 0, 1),  # exact duplicate
        (1, 11, 100, 0, 0),  # zero quantity
        (1, 12, 101, 1, -1),  # a return
        (2, 10, 200, 1, 1), (2, 13, 200, 1, 1),
    ]  # fmt: skip
    data = build_dataset(make_raw(rows), CleaningConfig(min_item_interactions=2))
    steps = {s.step: s for s in data.report.steps}
    assert steps["input"].rows_after == 6
    assert steps["returns"].removed == 1
    assert steps["zero_quantity"].removed == 1
    assert steps["duplicates"].removed == 1
    assert steps["min_item_interactions"].removed == 1  # item 13 seen once
    assert data.interactions.height == 2
    assert "returns" in data.report.format_table()
