"""Ranking metrics at any k, vectorised over queries (a query is a basket or a user).

Every metric sees the same inputs, built once per evaluation by :func:`build_context`:

- ``recommended``: int array (n_queries, K) of item indices, best first; -1 pads a list that is
  shorter than K (a padded slot is never a hit).
- ``hits``: bool array (n_queries, K), ``hits[q, i]`` = item at rank ``i + 1`` is relevant.
- ``n_relevant``: int array (n_queries,), ``|R_q|``, number of held-out items of query ``q``.

Notation below: ``rel_q(i)`` is 1 if the item at rank ``i`` (1-based) is relevant to query
``q``; ``L_q@k`` the top-k list. Per-query values are averaged over queries, or over users
(first within each user, then across users), see :func:`aggregate`.

Accuracy metrics agree with RecTools' definitions (checked in benchmarks/): NDCG is RecTools'
``NDCG(divide_by_achievable=True)``, MAP its default ``MAP``, novelty its ``MeanInvUserFreq``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import scipy.sparse as sp


@dataclass(frozen=True, eq=False)
class MetricContext:
    """Inputs shared by all metrics of one evaluation (see the module docstring).

    Attributes
    ----------
    recommended : numpy.ndarray, shape (n_queries, K), int
    hits : numpy.ndarray, shape (n_queries, K), bool
    n_relevant : numpy.ndarray, shape (n_queries,), int
    n_items : int
        Catalog size, for coverage.
    item_users : numpy.ndarray, shape (n_items,), optional
        Number of distinct train users per item (novelty, popularity).
    n_train_users : int
        Number of distinct users in train.
    item_category : numpy.ndarray, shape (n_items,), int, optional
        Category code per item, -1 unknown (diversity).
    item_price : numpy.ndarray, shape (n_items,), float, optional
        Price per item, NaN unknown (revenue).
    """

    recommended: np.ndarray
    hits: np.ndarray
    n_relevant: np.ndarray
    n_items: int
    item_users: np.ndarray | None = None
    n_train_users: int = 0
    item_category: np.ndarray | None = None
    item_price: np.ndarray | None = None


def hit_matrix(recommended: np.ndarray, relevant: sp.csr_matrix) -> np.ndarray:
    """``hits[q, i]`` = ``relevant[q, recommended[q, i]] != 0``, without a loop over queries.

    Each (query, item) pair is encoded as one int64 key and looked up by binary search in the
    sorted keys of ``relevant``'s non-zeros.
    """
    relevant = sp.csr_matrix(relevant)
    relevant.sort_indices()
    n_items = np.int64(relevant.shape[1])
    rows = np.repeat(np.arange(relevant.shape[0], dtype=np.int64), np.diff(relevant.indptr))
    truth = rows * n_items + relevant.indices.astype(np.int64)
    if truth.size == 0:
        return np.zeros(recommended.shape, dtype=bool)
    rec = recommended.astype(np.int64)
    keys = np.arange(rec.shape[0], dtype=np.int64)[:, None] * n_items + rec
    pos = np.searchsorted(truth, keys)
    pos = np.minimum(pos, truth.size - 1)
    return (truth[pos] == keys) & (rec >= 0)


def build_context(
    recommended: np.ndarray,
    relevant: sp.csr_matrix,
    item_users: np.ndarray | None = None,
    n_train_users: int = 0,
    item_category: np.ndarray | None = None,
    item_price: np.ndarray | None = None,
) -> MetricContext:
    """Compute hits and relevant counts once for all metrics."""
    return MetricContext(
        recommended=recommended,
        hits=hit_matrix(recommended, relevant),
        n_relevant=np.diff(sp.csr_matrix(relevant).indptr),
        n_items=relevant.shape[1],
        item_users=item_users,
        n_train_users=n_train_users,
        item_category=item_category,
        item_price=item_price,
    )


@dataclass(frozen=True)
class Metric:
    """Base class: a metric at cut-off ``k``."""

    k: int
    name: ClassVar[str] = "metric"
    per_query_defined: ClassVar[bool] = True

    @property
    def label(self) -> str:
        return f"{self.name}@{self.k}"

    def per_query(self, ctx: MetricContext) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def _check(self, ctx: MetricContext) -> None:
        if self.k < 1 or self.k > ctx.recommended.shape[1]:
            raise ValueError(
                f"{self.label}: k must be in 1..{ctx.recommended.shape[1]} (list length)"
            )


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros_like(num, dtype=np.float64), where=den > 0)


@dataclass(frozen=True)
class Precision(Metric):
    """``Precision@k = |L_q@k ∩ R_q| / k``."""

    name: ClassVar[str] = "precision"

    def per_query(self, ctx: MetricContext) -> np.ndarray:
        self._check(ctx)
        return ctx.hits[:, : self.k].sum(axis=1) / self.k


@dataclass(frozen=True)
class Recall(Metric):
    """``Recall@k = |L_q@k ∩ R_q| / |R_q|`` (0 when ``R_q`` is empty)."""

    name: ClassVar[str] = "recall"

    def per_query(self, ctx: MetricContext) -> np.ndarray:
        self._check(ctx)
        return _safe_div(ctx.hits[:, : self.k].sum(axis=1).astype(np.float64), ctx.n_relevant)


@dataclass(frozen=True)
class HitRate(Metric):
    """``HitRate@k = 1 if |L_q@k ∩ R_q| > 0 else 0``."""

    name: ClassVar[str] = "hit_rate"

    def per_query(self, ctx: MetricContext) -> np.ndarray:
        self._check(ctx)
        return ctx.hits[:, : self.k].any(axis=1).astype(np.float64)


@dataclass(frozen=True)
class NDCG(Metric):
    """Binary-gain NDCG.

    ``DCG_q@k = sum_{i=1..k} rel_q(i) / log2(i + 1)``;
    ``IDCG_q@k = sum_{i=1..min(k, |R_q|)} 1 / log2(i + 1)``; ``NDCG = DCG / IDCG`` (0 if
    ``R_q`` is empty).
    """

    name: ClassVar[str] = "ndcg"

    def per_query(self, ctx: MetricContext) -> np.ndarray:
        self._check(ctx)
        discounts = 1.0 / np.log2(np.arange(2, self.k + 2))
        dcg = ctx.hits[:, : self.k] @ discounts
        ideal = np.concatenate([[0.0], np.cumsum(discounts)])
        idcg = ideal[np.minimum(ctx.n_relevant, self.k)]
        return _safe_div(dcg, idcg)


@dataclass(frozen=True)
class MAP(Metric):
    """Mean average precision.

    ``AP_q@k = (1 / |R_q|) * sum_{i=1..k} rel_q(i) * Precision_q@i`` (0 if ``R_q`` is empty).
    The divisor is the number of relevant items, not ``min(k, |R_q|)`` (RecTools' default).
    """

    name: ClassVar[str] = "map"

    def per_query(self, ctx: MetricContext) -> np.ndarray:
        self._check(ctx)
        h = ctx.hits[:, : self.k]
        precision_at_i = np.cumsum(h, axis=1) / np.arange(1, self.k + 1)
        return _safe_div((precision_at_i * h).sum(axis=1), ctx.n_relevant)


@dataclass(frozen=True)
class MRR(Metric):
    """``MRR@k = 1 / rank of the first relevant item in L_q@k`` (0 if none)."""

    name: ClassVar[str] = "mrr"

    def per_query(self, ctx: MetricContext) -> np.ndarray:
        self._check(ctx)
        h = ctx.hits[:, : self.k]
        first = h.argmax(axis=1)
        return np.where(h.any(axis=1), 1.0 / (first + 1), 0.0)


@dataclass(frozen=True)
class Novelty(Metric):
    """Mean inverse user frequency of the recommended items.

    ``Novelty_q@k = mean_{i in L_q@k} -log2(users(i) / n_train_users)`` where ``users(i)`` is
    the number of distinct train users of item ``i``; an item no train user bought counts as
    bought by one user. Higher = less popular items.
    """

    name: ClassVar[str] = "novelty"

    def per_query(self, ctx: MetricContext) -> np.ndarray:
        self._check(ctx)
        if ctx.item_users is None or ctx.n_train_users <= 0:
            raise ValueError("novelty needs item_users and n_train_users")
        rec = ctx.recommended[:, : self.k]
        valid = rec >= 0
        users = np.maximum(ctx.item_users[np.where(valid, rec, 0)], 1)
        inv = -np.log2(users / ctx.n_train_users)
        return _safe_div((inv * valid).sum(axis=1), valid.sum(axis=1).astype(np.float64))


@dataclass(frozen=True)
class MeanPopularity(Metric):
    """``MeanPopularity_q@k = mean_{i in L_q@k} users(i) / n_train_users``: share of train users
    who bought the recommended items, on average. Lower = less obvious recommendations."""

    name: ClassVar[str] = "mean_popularity"

    def per_query(self, ctx: MetricContext) -> np.ndarray:
        self._check(ctx)
        if ctx.item_users is None or ctx.n_train_users <= 0:
            raise ValueError("mean_popularity needs item_users and n_train_users")
        rec = ctx.recommended[:, : self.k]
        valid = rec >= 0
        share = ctx.item_users[np.where(valid, rec, 0)] / ctx.n_train_users
        return _safe_div((share * valid).sum(axis=1), valid.sum(axis=1).astype(np.float64))


@dataclass(frozen=True)
class CategoryDiversity(Metric):
    """Intra-list category diversity.

    ``Diversity_q@k = (number of pairs i < j in L_q@k whose categories differ) / (n(n-1)/2)``
    with ``n`` the list's length; an item of unknown category differs from every other item.
    Lists shorter than 2 score 0.
    """

    name: ClassVar[str] = "category_diversity"

    def per_query(self, ctx: MetricContext) -> np.ndarray:
        self._check(ctx)
        if ctx.item_category is None:
            raise ValueError("category_diversity needs item_category")
        rec = ctx.recommended[:, : self.k]
        valid = rec >= 0
        cat = np.where(valid, ctx.item_category[np.where(valid, rec, 0)], -1)
        same = (cat[:, :, None] == cat[:, None, :]) & (cat[:, :, None] >= 0)
        both = valid[:, :, None] & valid[:, None, :]
        upper = np.triu(np.ones((self.k, self.k), dtype=bool), 1)
        pairs = (both & upper).sum(axis=(1, 2))
        differ = (both & ~same & upper).sum(axis=(1, 2))
        return _safe_div(differ.astype(np.float64), pairs.astype(np.float64))


@dataclass(frozen=True)
class AddonRevenue(Metric):
    """``Revenue_q@k = sum of price(i) over relevant i in L_q@k``: money the add-on block would
    have brought had every hit been bought once (unknown prices count 0)."""

    name: ClassVar[str] = "addon_revenue"

    def per_query(self, ctx: MetricContext) -> np.ndarray:
        self._check(ctx)
        if ctx.item_price is None:
            raise ValueError("addon_revenue needs item_price")
        rec = ctx.recommended[:, : self.k]
        price = np.nan_to_num(ctx.item_price[np.where(rec >= 0, rec, 0)], nan=0.0)
        return (price * ctx.hits[:, : self.k]).sum(axis=1)


@dataclass(frozen=True)
class CatalogCoverage(Metric):
    """``Coverage@k = |union of L_q@k over all queries| / n_items`` (one value, not per query)."""

    name: ClassVar[str] = "coverage"
    per_query_defined: ClassVar[bool] = False

    def value(self, ctx: MetricContext) -> float:
        self._check(ctx)
        rec = ctx.recommended[:, : self.k]
        return float(np.unique(rec[rec >= 0]).size / ctx.n_items)


METRICS: dict[str, type[Metric]] = {
    m.name: m
    for m in (
        Precision,
        Recall,
        NDCG,
        MAP,
        MRR,
        HitRate,
        CatalogCoverage,
        Novelty,
        MeanPopularity,
        CategoryDiversity,
        AddonRevenue,
    )
}


def aggregate(values: np.ndarray, users: np.ndarray | None = None, by: str = "query") -> float:
    """Average per-query values over queries (``by="query"``) or over users (``by="user"``:
    each user's queries are averaged first, then users count equally)."""
    if values.size == 0:
        return float("nan")
    if by == "query":
        return float(values.mean())
    if by == "user":
        if users is None:
            raise ValueError("averaging by user needs the user of each query")
        _, inverse, counts = np.unique(users, return_inverse=True, return_counts=True)
        return float((np.bincount(inverse, weights=values) / counts).mean())
    raise ValueError(f"unknown averaging {by!r}: expected 'query' or 'user'")


def compute_metrics(
    metrics: list[Metric], ctx: MetricContext, users: np.ndarray | None = None, by: str = "query"
) -> dict[str, float]:
    """Value of each metric, keyed by its label (``"ndcg@10"``)."""
    out: dict[str, float] = {}
    for m in metrics:
        if m.per_query_defined:
            out[m.label] = aggregate(m.per_query(ctx), users, by)
        else:
            out[m.label] = m.value(ctx)  # type: ignore[attr-defined]
    return out
