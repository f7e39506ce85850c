"""Metrics: hand-computed cases and agreement with a plain per-query implementation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp

from training.evaluation.metrics import (
    MAP,
    MRR,
    NDCG,
    AddonRevenue,
    CatalogCoverage,
    CategoryDiversity,
    HitRate,
    MeanPopularity,
    Novelty,
    Precision,
    Recall,
    aggregate,
    build_context,
    compute_metrics,
    hit_matrix,
)


def csr(rows: list[list[int]], n_items: int) -> sp.csr_matrix:
    data = [(r, c) for r, cols in enumerate(rows) for c in cols]
    r = [x[0] for x in data]
    c = [x[1] for x in data]
    return sp.csr_matrix((np.ones(len(r)), (r, c)), shape=(len(rows), n_items))


# Query 0: relevant {1, 4}; list [1, 2, 4] -> hits at ranks 1 and 3.
# Query 1: relevant {0}; list [3, 0, -1] (padded) -> hit at rank 2.
# Query 2: relevant {2, 3, 5}; list [0, 1, 4] -> no hit.
REC = np.array([[1, 2, 4], [3, 0, -1], [0, 1, 4]])
REL = csr([[1, 4], [0], [2, 3, 5]], 6)


def test_hit_matrix_marks_relevant_items_and_never_padding() -> None:
    hits = hit_matrix(REC, REL)
    expected = np.array([[1, 0, 1], [0, 1, 0], [0, 0, 0]], dtype=bool)
    np.testing.assert_array_equal(hits, expected)


def test_accuracy_metrics_by_hand() -> None:
    ctx = build_context(REC, REL)
    d1, d2, d3 = 1.0, 1 / math.log2(3), 0.5  # 1/log2(i+1) for ranks 1..3
    cases = {
        Precision(3): [2 / 3, 1 / 3, 0.0],
        Recall(3): [1.0, 1.0, 0.0],
        HitRate(3): [1.0, 1.0, 0.0],
        NDCG(3): [(d1 + d3) / (d1 + d2), d2 / d1, 0.0],
        MAP(3): [(1 / 1 + 2 / 3) / 2, (1 / 2) / 1, 0.0],
        MRR(3): [1.0, 0.5, 0.0],
        Precision(1): [1.0, 0.0, 0.0],
        NDCG(2): [d1 / (d1 + d2), d2 / d1, 0.0],
    }
    for metric, expected in cases.items():
        np.testing.assert_allclose(metric.per_query(ctx), expected, err_msg=metric.label)


def test_beyond_accuracy_metrics_by_hand() -> None:
    item_users = np.array([8, 4, 2, 1, 0, 8])  # item 4 never bought in train
    category = np.array([0, 0, 1, -1, 1, 2])
    price = np.array([1.0, 2.0, np.nan, 4.0, 5.0, 6.0])
    ctx = build_context(REC, REL, item_users, 8, category, price)
    # Novelty: -log2(users/8), cold item counts as 1 user.
    nov = [(-math.log2(4 / 8) - math.log2(2 / 8) - math.log2(1 / 8)) / 3,
           (-math.log2(1 / 8) - math.log2(8 / 8)) / 2,
           (0 + 1 + 3) / 3]  # fmt: skip
    np.testing.assert_allclose(Novelty(3).per_query(ctx), nov)
    np.testing.assert_allclose(
        MeanPopularity(3).per_query(ctx), [(4 + 2 + 0) / 24, (1 + 8) / 16, (8 + 4 + 0) / 24]
    )
    # Diversity: q0 cats [0,1,1] -> pairs (0,1) diff, (0,2) diff, (1,2) same = 2/3;
    # q1 cats [-1, 0] one pair, unknown differs = 1; q2 cats [0, 0, 1] = 2/3.
    np.testing.assert_allclose(CategoryDiversity(3).per_query(ctx), [2 / 3, 1.0, 2 / 3])
    # Revenue: q0 hits items 1 (2.0) and 4 (5.0); q1 hits item 0 (1.0).
    np.testing.assert_allclose(AddonRevenue(3).per_query(ctx), [7.0, 1.0, 0.0])
    assert CatalogCoverage(3).value(ctx) == pytest.approx(5 / 6)
    assert CatalogCoverage(1).value(ctx) == pytest.approx(3 / 6)


def test_aggregate_by_user_weights_users_equally() -> None:
    values = np.array([1.0, 0.0, 0.0, 0.5])
    users = np.array([7, 7, 7, 9])
    assert aggregate(values, users, "query") == pytest.approx(0.375)
    assert aggregate(values, users, "user") == pytest.approx((1 / 3 + 0.5) / 2)
    with pytest.raises(ValueError, match="averaging"):
        aggregate(values, users, "basket")


def test_k_larger_than_list_is_rejected() -> None:
    ctx = build_context(REC, REL)
    with pytest.raises(ValueError, match="k must be"):
        Precision(4).per_query(ctx)


def _reference(rec: np.ndarray, rel: sp.csr_matrix, k: int) -> dict[str, float]:
    """Plain per-query implementation, written from the textbook definitions."""
    out = {"precision": [], "recall": [], "ndcg": [], "map": [], "mrr": [], "hit_rate": []}
    for q in range(rec.shape[0]):
        truth = set(rel.indices[rel.indptr[q] : rel.indptr[q + 1]].tolist())
        top = [i for i in rec[q, :k].tolist()]
        hits = [1 if (i >= 0 and i in truth) else 0 for i in top]
        n_hit = sum(hits)
        out["precision"].append(n_hit / k)
        out["recall"].append(n_hit / len(truth) if truth else 0.0)
        out["hit_rate"].append(1.0 if n_hit else 0.0)
        dcg = sum(h / math.log2(i + 2) for i, h in enumerate(hits))
        idcg = sum(1 / math.log2(i + 2) for i in range(min(k, len(truth))))
        out["ndcg"].append(dcg / idcg if idcg else 0.0)
        ap, seen = 0.0, 0
        for i, h in enumerate(hits):
            if h:
                seen += 1
                ap += seen / (i + 1)
        out["map"].append(ap / len(truth) if truth else 0.0)
        first = next((i for i, h in enumerate(hits) if h), None)
        out["mrr"].append(1 / (first + 1) if first is not None else 0.0)
    return {name: float(np.mean(v)) for name, v in out.items()}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_metrics_agree_with_plain_implementation(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_q, n_items, k_max = 300, 40, 10
    rec = np.array([rng.permutation(n_items)[:k_max] for _ in range(n_q)])
    rec[rng.random(rec.shape) < 0.05] = -1  # some padding
    rel_rows = [
        rng.choice(n_items, size=rng.integers(1, 8), replace=False).tolist() for _ in range(n_q)
    ]
    rel = csr(rel_rows, n_items)
    ctx = build_context(rec, rel)
    for k in (1, 3, 5, 10):
        ours = compute_metrics([m(k) for m in (Precision, Recall, NDCG, MAP, MRR, HitRate)], ctx)
        ref = _reference(rec, rel, k)
        for name, value in ref.items():
            assert ours[f"{name}@{k}"] == pytest.approx(value, abs=1e-12), f"{name}@{k}"
