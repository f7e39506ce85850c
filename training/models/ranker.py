"""The learned add-on ranker: candidates from four sources, ~30 features, LightGBM lambdarank.

Two stages per query (a user and a cart):

1. **Candidates**: the union of the user's re-buy top ``n_rebuy`` (by recency-decayed
   purchase count), the cart's co-occurrence top ``n_cooccurrence`` (summed association-rule
   confidence), an item-KNN top ``n_cf`` (cosine neighbours of the history and the cart) and
   the ``n_category`` most popular items of the cart items' sub-categories. Cart items, and
   with ``exclude_owned`` the user's items, are removed *before* each source takes its top N,
   so no slot is spent on an item that cannot be offered. The share of held-out items inside
   the pool (:func:`candidate_recall`) is the ceiling of every metric.
2. **Ranking**: a LightGBM lambdarank model scores each (query, candidate) pair on the
   features of :data:`FEATURES`. :meth:`RankerRecommender.score` returns a dense row per
   query as :class:`RecommenderBase` asks: candidates carry the model's raw score, every other
   item ``FLOOR + popularity share`` (far below any candidate, so lists still fill up, with
   the most popular items, when the pool is short).

A query with an empty cart (``next_period``, or a user with no cart yet) is not a basket
completion: the model never saw one in training, so such a row is scored by the re-buy signal
alone (decayed purchase count + the popularity tie-breaker), the re-buy baseline.

**Training data without leakage.** ``train_windows`` windows of ``window_days`` days at the
end of the training data, consecutive, newest last. For each window the feature statistics
(:class:`FeatureState`) are fitted on the rows strictly *before* the window (its history);
its baskets become (cart, held-out) queries exactly as the evaluation builds them
(:func:`features.splits.basket_completion_task`, both with owned items allowed and "new to
user"); label 1 = the candidate is in the held-out part. Queries with no held-out item in
their pool carry no ranking signal and are dropped. A seeded ``valid_fraction`` of the
baskets (both task variants of a basket on the same side) is the validation set: it picks the
number of trees (early stopping on NDCG@10) and is reported in ``validation_``. The final
statistics are then refitted on *all* the training data; the test part is never seen.
``training_log`` records, per window, the history's basket ids and the query basket ids
actually used (the leakage test reads them); ``training_windows_`` is its persisted summary.

**Both tasks, one model**: the feature ``task_new_to_user`` (1 when owned items are
excluded) lets the trees specialise. :meth:`recommend` reads the task from
``CandidateFilter.exclude_owned``; :meth:`score` alone scores the owned-allowed task.

Features: :data:`FEATURES` (name, definition, source of each; the one place they are
documented, in model column order). "History" there is the rows the statistics were fitted on
and "ref" its end; NaN means undefined (LightGBM routes it as missing).

``co(i, j)`` counts history baskets holding both items, kept for each ``i`` only for its
``neighbours`` most frequent partners (what an export ships); the cosine similarities keep
``cf_neighbours`` per item (implicit's ``CosineRecommender``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import polars as pl
import scipy.sparse as sp

from features.dataset import Dataset
from features.splits import RankingTask, basket_completion_task
from training.models.base import CandidateFilter, ParamError, RecommenderBase, top_k
from training.models.baselines import TIE_BREAK, _popularity_share

#: Score of a non-candidate item (plus its popularity share in [0, 1]); candidates' raw model
#: scores are clipped to stay above ``FLOOR + 2``.
FLOOR = -1000.0

_US_PER_DAY = 86_400e6


@dataclass(frozen=True)
class Feature:
    """One model input: its column name, what it is, and the statistics it reads."""

    name: str
    definition: str
    source: str


#: Every feature, in model column order: the one place they are defined. ``co(i, j)``: history
#: baskets holding both i and j; ``conf(i -> j) = co(i, j) / baskets(i)``.
FEATURES: tuple[Feature, ...] = (
    Feature("rebuy_baskets", "history baskets of the user holding the item", "user x item"),
    Feature("rebuy_share", "rebuy_baskets / the user's history baskets", "user x item"),
    Feature("rebuy_decayed", "sum over those baskets of 0.5 ** (age_days / half_life_days), age to ref", "user x item"),
    Feature("rebuy_rank", "rank of the item in the user's list by rebuy_decayed (1 = first; ties: lower item index); NaN if never bought", "user x item"),
    Feature("days_since_last", "days from the user's last purchase of the item to ref; NaN if never bought", "user x item"),
    Feature("mean_interval_days", "(last - first purchase) / (rebuy_baskets - 1), in days; NaN below 2 baskets", "user x item"),
    Feature("due_ratio", "days_since_last / mean_interval_days; NaN if either is undefined", "user x item"),
    Feature("user_baskets", "the user's history baskets; NaN for an unknown user", "user"),
    Feature("user_items", "distinct items the user bought; NaN for an unknown user", "user"),
    Feature("user_subcategory_share", "share of the user's basket lines in the item's sub-category; NaN for an unknown user", "user x category"),
    Feature("user_category_share", "share of the user's basket lines in the item's category; NaN for an unknown user", "user x category"),
    Feature("cooc_sum_conf", "sum over cart items i of conf(i -> j)", "cart x item"),
    Feature("cooc_max_conf", "max over cart items i of conf(i -> j)", "cart x item"),
    Feature("cooc_max_count", "max over cart items i of co(i, j)", "cart x item"),
    Feature("cooc_max_lift", "max over cart items i of conf(i -> j) / (baskets(j) / history baskets)", "cart x item"),
    Feature("cooc_n_cart", "cart items i with a rule i -> j", "cart x item"),
    Feature("cooc_rank", "rank of the item in the query's list by cooc_sum_conf (1 = first) among the items that may be offered; NaN without a rule or beyond RANK_DEPTH", "cart x item"),
    Feature("knn_score", "sum over the user's history items and cart items i of cosine sim(i, j)", "user/cart x item"),
    Feature("knn_rank", "rank of the item in the query's list by knn_score among the items that may be offered; NaN if 0 or beyond RANK_DEPTH", "user/cart x item"),
    Feature("cart_same_subcategory", "share of cart items in the item's sub-category (unknown sub-category: 0)", "cart x item"),
    Feature("cart_same_category", "share of cart items in the item's category", "cart x item"),
    Feature("cart_same_department", "share of cart items in the item's department", "cart x item"),
    Feature("cart_size", "items in the cart", "cart"),
    Feature("item_baskets", "history baskets holding the item", "item"),
    Feature("item_users", "distinct history buyers of the item", "item"),
    Feature("item_repeat_rate", "share of the item's buyers who bought it in >= 2 baskets; NaN without buyers", "item"),
    Feature("item_recent_share", "share of item_baskets in the last window_days before ref; NaN without baskets", "item"),
    Feature("item_subcategory_rank", "rank of the item by item_baskets inside its sub-category (1 = most bought)", "item"),
    Feature("price", "the item's price; NaN if unknown", "item"),
    Feature("price_ratio_cart", "price / mean price of the cart items with a known price; NaN if undefined", "cart x item"),
    Feature("task_new_to_user", "1 when the user's items are excluded (cross-sell task), else 0", "query"),
)  # fmt: skip
FEATURE_NAMES: tuple[str, ...] = tuple(f.name for f in FEATURES)
_COL = {name: k for k, name in enumerate(FEATURE_NAMES)}

#: Queries whose dense item rows are built at once (memory: a few CHUNK x n_items arrays).
CHUNK = 128
#: Ranks (cooc_rank, knn_rank) are positions in the first RANK_DEPTH items of a list, else NaN.
RANK_DEPTH = 200

#: Candidate sources, as bits of a pool entry's value.
SOURCES = {"rebuy": 1, "cooccurrence": 2, "cf": 4, "category": 8}


# -- small vectorised helpers ---------------------------------------------------------------
def _pair_lookup(keys: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Positions of the ``query`` keys in the sorted ``keys`` (-1 where absent)."""
    if keys.size == 0:
        return np.full(query.shape, -1, dtype=np.int64)
    pos = np.minimum(np.searchsorted(keys, query), keys.size - 1)
    return np.where(keys[pos] == query, pos, -1)


def _take(values: np.ndarray, pos: np.ndarray, missing: float) -> np.ndarray:
    """``values[pos]`` as float32, ``missing`` where ``pos`` is -1."""
    out = np.full(pos.shape, missing, dtype=np.float32)
    hit = pos >= 0
    out[hit] = values[pos[hit]]
    return out


def _sample(m: sp.csr_matrix, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``m[rows[k], cols[k]]`` for every k, float32 (0 where nothing is stored)."""
    if rows.size == 0:
        return np.zeros(0, dtype=np.float32)
    return np.asarray(m[rows, cols], dtype=np.float32).ravel()


def _binary(m: sp.csr_matrix) -> sp.csr_matrix:
    out = sp.csr_matrix(m, dtype=np.float32, copy=True)
    out.eliminate_zeros()
    out.data[:] = 1.0
    return out


def _top_counts_per_row(m: sp.csr_matrix, n: int) -> sp.csr_matrix:
    """The ``n`` largest entries of each row of a matrix of whole counts (ties: lower column),
    indices sorted: :func:`~training.models.baselines.keep_top_per_row`'s rule with one
    integer sort key instead of a three-key lexsort (several times faster on co-occurrence)."""
    m = sp.csr_matrix(m)
    m.sum_duplicates()  # also sorts the indices, so a stable sort keeps the lower column first
    lengths = np.diff(m.indptr)
    rows = np.repeat(np.arange(m.shape[0], dtype=np.int64), lengths)
    counts = m.data.astype(np.int64)
    span = int(counts.max()) + 1 if counts.size else 1
    order = np.argsort(rows * span + (span - 1 - counts), kind="stable")
    rank = np.arange(order.size) - np.repeat(m.indptr[:-1], lengths)
    keep = np.sort(order[rank < n])
    out = sp.csr_matrix((m.data[keep], m.indices[keep], np.r_[0, np.cumsum(np.minimum(lengths, n))]),
                        shape=m.shape)  # fmt: skip
    out.sort_indices()
    return out


def _segments(sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For segments of the given sizes laid end to end: each element's segment and its offset
    inside it."""
    seg = np.repeat(np.arange(sizes.size), sizes)
    starts = np.cumsum(sizes) - sizes
    return seg, np.arange(seg.size) - starts[seg]


def candidate_recall(pool: sp.csr_matrix, relevant: sp.csr_matrix) -> dict[str, float]:
    """How much of the truth a candidate pool holds: the ceiling of any ranking of it.

    Parameters
    ----------
    pool : scipy.sparse.csr_matrix, shape (n_queries, n_items)
        Non-zero where the item is a candidate of the query.
    relevant : scipy.sparse.csr_matrix, shape (n_queries, n_items)
        The held-out items.

    Returns
    -------
    dict
        ``micro``: held-out items inside the pool / all held-out items; ``per_query``: the
        mean over queries with a held-out item of that share per query; ``pool_size``: mean
        candidates per query.
    """
    truth = _binary(relevant)
    inside = sp.csr_matrix(truth.multiply(_binary(pool)))
    n_truth = np.diff(truth.indptr)
    n_inside = np.asarray(inside.sum(axis=1)).ravel()
    has = n_truth > 0
    return {
        "micro": float(n_inside.sum() / max(int(n_truth.sum()), 1)),
        "per_query": float((n_inside[has] / n_truth[has]).mean()) if has.any() else 0.0,
        "pool_size": float(np.diff(sp.csr_matrix(pool).indptr).mean()) if pool.shape[0] else 0.0,
    }


def _platt(raw: np.ndarray, y: np.ndarray, iterations: int = 50) -> tuple[float, float]:
    """``(a, b)`` of ``P(y = 1) = 1 / (1 + exp(-(a * raw + b)))`` by Newton's method on the
    log-loss (Platt scaling; a tiny ridge keeps it defined when the classes separate)."""
    a, b = 1.0, 0.0
    x = raw.astype(np.float64)
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(a * x + b)))
        w = p * (1.0 - p)
        grad = np.array([((p - y) * x).sum() + 1e-6 * a, (p - y).sum()])
        hess = np.array(
            [[(w * x * x).sum() + 1e-6, (w * x).sum()], [(w * x).sum(), w.sum() + 1e-9]]
        )
        step = np.linalg.solve(hess, grad)
        a, b = a - step[0], b - step[1]
        if np.abs(step).max() < 1e-9:
            break
    return float(a), float(b)


def expected_calibration_error(prob: np.ndarray, y: np.ndarray, bins: int = 10) -> dict[str, Any]:
    """ECE over ``bins`` equal-count bins of the predicted probability: the size-weighted mean
    of |mean prediction - observed rate| per bin; also each bin's two numbers (the
    reliability curve)."""
    order = np.argsort(prob, kind="stable")
    parts = np.array_split(order, bins)
    curve = [(float(prob[p].mean()), float(y[p].mean()), int(p.size)) for p in parts if p.size]
    ece = sum(n * abs(m - o) for m, o, n in curve) / max(prob.size, 1)
    return {"ece": float(ece), "curve": curve}


def calibrate(raw: np.ndarray, y: np.ndarray, group: np.ndarray, seed: int) -> dict[str, Any]:
    """Platt scaling of the ranker's raw scores into an add probability, fitted on a seeded
    half of the validation queries and measured (ECE, reliability curve) on the other half."""
    query = np.repeat(np.arange(group.size), group)
    fit_half = np.random.default_rng([seed, 1]).random(group.size) < 0.5
    on_fit = fit_half[query]
    a, b = _platt(raw[on_fit], y[on_fit])
    prob = 1.0 / (1.0 + np.exp(-(a * raw[~on_fit] + b)))
    return {"a": a, "b": b, **expected_calibration_error(prob, y[~on_fit])}


# -- the statistics every feature and candidate source reads ------------------------------------
class FeatureState:
    """Statistics of one history: user x item purchase table, co-occurrence, item-KNN,
    category popularity, item table. Fitted on the rows before the queries' time.

    Parameters
    ----------
    data : Dataset
        The history.
    ref : numpy.datetime64
        Reference time of the recency features (the end of the history).
    params : RankerRecommender
        Sizes (neighbours, half-life, candidates per source, ...).
    """

    def __init__(self, data: Dataset, ref: np.datetime64, params: RankerRecommender) -> None:
        self.n_users, self.n_items = n_users, n_items = data.n_users, data.n_items
        self.ref_us = int(np.datetime64(ref, "us").astype(np.int64))
        #: External basket ids of the history (the leakage test reads them).
        self.basket_ids = data.interactions["basket_id"].unique().sort().to_numpy()
        lines = (
            data.interactions.select("user_idx", "item_idx", "basket_id", "timestamp")
            .group_by("user_idx", "basket_id", "item_idx")
            .agg(pl.col("timestamp").cast(pl.Int64).min().alias("t"))
        )
        age = (self.ref_us - pl.col("t")) / _US_PER_DAY
        ui = (
            lines.group_by("user_idx", "item_idx")
            .agg(
                pl.len().alias("n"),
                (0.5 ** (age / params.half_life_days)).sum().alias("decayed"),
                pl.col("t").max().alias("last"),
                pl.col("t").min().alias("first"),
            )
            .sort("user_idx", "item_idx")
        )
        u = ui["user_idx"].to_numpy().astype(np.int64)
        i = ui["item_idx"].to_numpy().astype(np.int64)
        self.ui_keys = u * n_items + i
        self.ui_n = ui["n"].to_numpy().astype(np.float32)
        self.ui_decayed = ui["decayed"].to_numpy().astype(np.float32)
        last = ui["last"].to_numpy().astype(np.float64)
        first = ui["first"].to_numpy().astype(np.float64)
        self.ui_days_since = ((self.ref_us - last) / _US_PER_DAY).astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            interval = (last - first) / _US_PER_DAY / (self.ui_n - 1.0)
        self.ui_interval = np.where(self.ui_n >= 2, interval, np.nan).astype(np.float32)
        order = np.lexsort((i, -self.ui_decayed, u))
        first_of_user = np.searchsorted(u[order], u[order], side="left")
        self.ui_rank = np.empty(order.size, dtype=np.float32)
        self.ui_rank[order] = np.arange(order.size) - first_of_user + 1
        self.decayed = sp.csr_matrix(
            (self.ui_decayed, (u, i)), shape=(n_users, n_items), dtype=np.float32
        )
        self.owned = _binary(self.decayed)
        top = self.ui_rank <= params.n_rebuy
        #: Each user's n_rebuy first items, valued by their rank (>= 1, so all stored).
        self.rebuy_top = sp.csr_matrix(
            (self.ui_rank[top], (u[top], i[top])), shape=(n_users, n_items)
        )

        per_user = lines.group_by("user_idx").agg(
            pl.col("basket_id").n_unique().alias("baskets"),
            pl.col("item_idx").n_unique().alias("items"),
            pl.len().alias("lines"),
        )
        uu = per_user["user_idx"].to_numpy()
        self.user_baskets = np.full(n_users, np.nan, dtype=np.float32)
        self.user_items = np.full(n_users, np.nan, dtype=np.float32)
        self.user_lines = np.full(n_users, np.nan, dtype=np.float32)
        self.user_baskets[uu] = per_user["baskets"].to_numpy()
        self.user_items[uu] = per_user["items"].to_numpy()
        self.user_lines[uu] = per_user["lines"].to_numpy()

        self.department = data.item_categories("department")
        self.category = data.item_categories("category")
        self.subcategory = data.item_categories("subcategory")
        self.price = data.item_prices().astype(np.float32)
        # Basket lines per (user, category code + 1), keyed like the user x item table.
        self.user_level: dict[str, tuple[np.ndarray, np.ndarray, int]] = {}
        line_users = lines["user_idx"].to_numpy().astype(np.int64)
        line_items = lines["item_idx"].to_numpy()
        for level, codes in (("subcategory", self.subcategory), ("category", self.category)):
            width = int(codes.max()) + 2 if codes.size else 1
            keys, counts = np.unique(line_users * width + codes[line_items] + 1, return_counts=True)
            self.user_level[level] = (keys, counts.astype(np.float32), width)

        bm = data.basket_item_matrix()
        baskets = bm.matrix
        self.n_baskets = float(max(baskets.shape[0], 1))
        self.item_baskets = np.asarray(baskets.sum(axis=0)).ravel().astype(np.float32)
        self.item_users = np.bincount(i, minlength=n_items).astype(np.float32)
        repeaters = np.bincount(i[self.ui_n >= 2], minlength=n_items).astype(np.float32)
        recent_cut = self.ref_us - params.window_days * _US_PER_DAY
        recent = bm.times.astype("datetime64[us]").astype(np.int64) >= recent_cut
        recent_baskets = np.asarray(baskets[recent].sum(axis=0)).ravel()
        with np.errstate(divide="ignore", invalid="ignore"):
            self.item_repeat_rate = np.where(
                self.item_users > 0, repeaters / self.item_users, np.nan
            ).astype(np.float32)
            self.item_recent_share = np.where(
                self.item_baskets > 0, recent_baskets / self.item_baskets, np.nan
            ).astype(np.float32)
        order = np.lexsort((np.arange(n_items), -self.item_baskets, self.subcategory))
        sorted_sc = self.subcategory[order]
        self.item_subcategory_rank = np.empty(n_items, dtype=np.float32)
        self.item_subcategory_rank[order] = (
            np.arange(n_items) - np.searchsorted(sorted_sc, sorted_sc, side="left") + 1
        )
        self.popularity = _popularity_share(data, "users")

        # Co-occurrence counts, each item's `neighbours` most frequent partners.
        co = (baskets.T @ baskets).tocsr()
        co.setdiag(0)
        co.eliminate_zeros()
        if params.neighbours > 0:
            co = _top_counts_per_row(co, params.neighbours)
        co_rows = np.repeat(np.arange(n_items, dtype=np.int64), np.diff(co.indptr))
        self.co_keys = co_rows * n_items + co.indices.astype(np.int64)
        self.co_count = co.data.astype(np.float32)
        self.co_conf = self.co_count / np.maximum(self.item_baskets[co_rows], 1.0)
        self.confidence = sp.csr_matrix(
            (self.co_conf, co.indices.copy(), co.indptr.copy()), shape=co.shape
        )

        # Item-KNN (cosine, implicit) for the CF source and the knn features.
        from training.models.implicit_models import ItemKNNRecommender

        knn = ItemKNNRecommender(neighbours=params.cf_neighbours, num_threads=params.num_threads)
        knn.n_users_, knn.n_items_, knn.owned_ = n_users, n_items, self.owned
        knn._fit(data)
        self.similarity = knn.similarity_

        # Category-popular source: row i holds the n_category most bought items of i's
        # sub-category, valued by popularity share, so cart @ it sums over the cart's items.
        top_items = np.flatnonzero(
            (self.item_subcategory_rank <= params.n_category)
            & (self.subcategory >= 0)
            & (self.item_baskets > 0)
        )
        top_items = top_items[np.lexsort((top_items, self.subcategory[top_items]))]
        top_sc = self.subcategory[top_items]
        anchors = np.flatnonzero(self.subcategory >= 0)
        lo = np.searchsorted(top_sc, self.subcategory[anchors], side="left")
        hi = np.searchsorted(top_sc, self.subcategory[anchors], side="right")
        seg, offset = _segments(hi - lo)
        cols = top_items[lo[seg] + offset]
        self.category_popular = sp.csr_matrix(
            (self.popularity[cols] + 1e-6, (anchors[seg], cols)), shape=(n_items, n_items)
        )

    def to_fields(self) -> dict[str, Any]:
        """The statistics as flat arrays, sparse matrices and numbers (what
        :mod:`training.persistence` stores); the history's basket ids are left out."""
        out = {k: v for k, v in vars(self).items() if k not in ("user_level", "basket_ids")}
        for level, (keys, counts, width) in self.user_level.items():
            out[f"user_{level}_keys"], out[f"user_{level}_counts"] = keys, counts
            out[f"user_{level}_width"] = int(width)
        return out

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> FeatureState:
        """The inverse of :meth:`to_fields`."""
        state = cls.__new__(cls)
        state.user_level = {}
        for level in ("subcategory", "category"):
            state.user_level[level] = (
                np.asarray(fields[f"user_{level}_keys"]),
                np.asarray(fields[f"user_{level}_counts"]),
                int(fields[f"user_{level}_width"]),
            )
        for key, value in fields.items():
            if not key.startswith(("user_subcategory_", "user_category_")):
                setattr(state, key, value)
        state.basket_ids = np.zeros(0, dtype=np.int64)
        return state

    def user_share(self, level: str, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Share of each user's basket lines in the item's ``level``; NaN for unknown users."""
        keys, counts, width = self.user_level[level]
        codes = (self.subcategory if level == "subcategory" else self.category)[items] + 1
        pos = _pair_lookup(keys, np.maximum(users, 0) * width + codes)
        pos[users < 0] = -1
        share = _take(counts, pos, 0.0) / self.user_lines[np.maximum(users, 0)]
        share[users < 0] = np.nan
        return share


@dataclass(frozen=True, eq=False)
class QueryBatch:
    """Candidates and features of a batch of queries.

    Attributes
    ----------
    pool : scipy.sparse.csr_matrix, shape (n_queries, n_items)
        Candidates; the value is the OR of the :data:`SOURCES` bits that proposed each.
    rows, cols : numpy.ndarray
        Query and item of each (query, candidate) pair, grouped by query (pool order).
    features : numpy.ndarray, shape (n_pairs, len(FEATURES)), float32
    """

    pool: sp.csr_matrix
    rows: np.ndarray
    cols: np.ndarray
    features: np.ndarray


@dataclass
class RankerRecommender(RecommenderBase):
    """Two-stage learned ranker (see the module docstring).

    Parameters
    ----------
    n_rebuy, n_cooccurrence, n_cf, n_category : int
        Candidates per source: the user's re-buy list, the cart's co-occurrence list, the
        item-KNN list, the cart's sub-categories' best-sellers. 0 turns a source off.
    neighbours : int
        Co-occurrence partners kept per item (0 keeps all).
    cf_neighbours : int
        Cosine neighbours kept per item (item-KNN).
    half_life_days : float
        Recency decay of ``rebuy_decayed``.
    train_windows, window_days : int
        Training windows at the end of train and their length.
    train_queries : int
        Baskets sampled per window (seeded; 0 = all).
    valid_fraction : float
        Share of the training baskets held out to pick the number of trees.
    n_estimators, learning_rate, num_leaves, min_data_in_leaf, early_stopping_rounds :
        LightGBM lambdarank settings (the most trees; early stopping on validation NDCG@10).
    num_threads : int
        LightGBM and implicit threads.
    seed : int
        Seeds the query sample, the validation split and LightGBM.
    """

    n_rebuy: int = 100
    n_cooccurrence: int = 100
    n_cf: int = 30
    n_category: int = 30
    neighbours: int = 200
    cf_neighbours: int = 100
    half_life_days: float = 90.0
    train_windows: int = 1
    window_days: int = 28
    train_queries: int = 5000
    valid_fraction: float = 0.2
    n_estimators: int = 300
    learning_rate: float = 0.05
    num_leaves: int = 63
    min_data_in_leaf: int = 50
    early_stopping_rounds: int = 30
    num_threads: int = 1
    seed: int = 42
    kind = "ranker"

    def __post_init__(self) -> None:
        for name in ("n_rebuy", "n_cooccurrence", "n_cf", "n_category", "neighbours",
                     "train_queries"):  # fmt: skip
            if getattr(self, name) < 0:
                raise ParamError(name, f"must be >= 0, got {getattr(self, name)}")
        for name in ("cf_neighbours", "train_windows", "window_days", "n_estimators",
                     "num_leaves", "min_data_in_leaf", "early_stopping_rounds"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ParamError(name, f"must be >= 1, got {getattr(self, name)}")
        if not self.half_life_days > 0:
            raise ParamError("half_life_days", f"must be > 0, got {self.half_life_days}")
        if not 0 <= self.valid_fraction < 1:
            raise ParamError("valid_fraction", f"must be in [0, 1), got {self.valid_fraction}")
        if not self.learning_rate > 0:
            raise ParamError("learning_rate", f"must be > 0, got {self.learning_rate}")
        if self.num_threads < 0:
            raise ParamError("num_threads", f"must be >= 0 (0 = all cores), got {self.num_threads}")
        self._new_to_user = False
        self._state: FeatureState | None = None
        self._booster: Any = None

    # -- stage 1: candidates --------------------------------------------------------------
    def candidate_pool(
        self,
        users: np.ndarray,
        carts: sp.csr_matrix,
        exclude_owned: bool = False,
        state: FeatureState | None = None,
    ) -> sp.csr_matrix:
        """The candidates of each query (see :class:`QueryBatch`.pool); never a cart item,
        nor with ``exclude_owned`` an item the user has."""
        st = state or self.state_
        users = np.asarray(users, dtype=np.int64)
        carts = sp.csr_matrix(carts)
        pools = [
            self._chunk_parts(users[lo : lo + CHUNK], carts[lo : lo + CHUNK], exclude_owned, st)[0]
            for lo in range(0, len(users), CHUNK)
        ]
        return sp.csr_matrix(sp.vstack(pools)) if pools else sp.csr_matrix((0, st.n_items))

    def _chunk_parts(
        self, users: np.ndarray, carts: sp.csr_matrix, exclude_owned: bool, st: FeatureState
    ) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray, np.ndarray, np.ndarray, sp.csr_matrix]:
        """Candidates of a few queries and the dense per-item signals behind them.

        Returns (pool, co-occurrence scores, its ranks, knn scores, its ranks, cart): scores
        are dense (queries x items) with excluded items at 0; ranks are 1-based positions in
        the query's list by that score, among the first ``RANK_DEPTH``, else 0. Dense rows
        because top-N of long sparse rows (a household's history x 100 neighbours) is the
        slow path; a chunk of ``CHUNK`` rows bounds the memory.
        """
        known = (users >= 0).astype(np.float32)[:, None]
        safe = np.maximum(users, 0)
        cart = _binary(carts)
        owned = sp.csr_matrix(st.owned[safe].multiply(known))
        excluded = (cart + owned if exclude_owned else cart).toarray() > 0
        n = len(users)
        bits = np.zeros((n, st.n_items), dtype=np.int8)
        if self.n_rebuy > 0:
            rebuy = sp.csr_matrix(st.rebuy_top[safe].multiply(known)).tocoo()
            ok = ~excluded[rebuy.row, rebuy.col] & (rebuy.data <= self.n_rebuy)
            bits[rebuy.row[ok], rebuy.col[ok]] |= SOURCES["rebuy"]
        signals = []
        for n_top, product, name in (
            (self.n_cooccurrence, cart @ st.confidence, "cooccurrence"),
            (self.n_cf, (owned + cart) @ st.similarity, "cf"),
        ):
            dense = product.toarray()
            dense[excluded] = 0.0
            depth = min(max(n_top, RANK_DEPTH), st.n_items)
            order, _ = top_k(np.where(dense > 0, dense, -np.inf), depth)
            ranks = np.zeros(dense.shape, dtype=np.float32)
            r, pos = np.nonzero(order >= 0)
            ranks[r, order[r, pos]] = pos + 1
            if n_top > 0:
                take = (order[:, :n_top] >= 0).nonzero()
                bits[take[0], order[:, :n_top][take]] |= SOURCES[name]
            signals += [dense, ranks]
        if self.n_category > 0:
            dense = (cart @ st.category_popular).toarray()
            dense[excluded] = 0.0
            order, _ = top_k(np.where(dense > 0, dense, -np.inf), min(self.n_category, st.n_items))
            take = (order >= 0).nonzero()
            bits[take[0], order[take]] |= SOURCES["category"]
        pool = sp.csr_matrix(bits)
        pool.sort_indices()
        return pool, signals[0], signals[1], signals[2], signals[3], cart

    # -- features -----------------------------------------------------------------------
    def query_batch(
        self,
        users: np.ndarray,
        carts: sp.csr_matrix,
        exclude_owned: bool = False,
        state: FeatureState | None = None,
    ) -> QueryBatch:
        """Candidates of each query and the :data:`FEATURES` of every (query, candidate)."""
        st = state or self.state_
        users = np.asarray(users, dtype=np.int64)
        carts = sp.csr_matrix(carts)
        parts = [
            self._chunk_batch(users[lo : lo + CHUNK], carts[lo : lo + CHUNK], exclude_owned, st)
            for lo in range(0, len(users), CHUNK)
        ]
        if not parts:
            empty = np.zeros(0, dtype=np.int64)
            return QueryBatch(
                sp.csr_matrix((0, st.n_items)), empty, empty,
                np.zeros((0, len(FEATURES)), dtype=np.float32),
            )  # fmt: skip
        offsets = np.cumsum([0] + [p.pool.shape[0] for p in parts[:-1]])
        return QueryBatch(
            sp.csr_matrix(sp.vstack([p.pool for p in parts])),
            np.concatenate([p.rows + o for p, o in zip(parts, offsets, strict=True)]),
            np.concatenate([p.cols for p in parts]),
            np.concatenate([p.features for p in parts]),
        )

    def _chunk_batch(
        self, users: np.ndarray, carts: sp.csr_matrix, exclude_owned: bool, st: FeatureState
    ) -> QueryBatch:
        pool, cooc, cooc_rank, knn, knn_rank, cart = self._chunk_parts(
            users, carts, exclude_owned, st
        )
        rows = np.repeat(np.arange(pool.shape[0]), np.diff(pool.indptr))
        cols = pool.indices.astype(np.int64)
        u = users[rows]
        X = np.full((rows.size, len(FEATURES)), np.nan, dtype=np.float32)

        def put(name: str, values: np.ndarray) -> None:
            X[:, _COL[name]] = values

        # User x item: the purchase table.
        pos = _pair_lookup(st.ui_keys, np.maximum(u, 0) * st.n_items + cols)
        pos[u < 0] = -1
        baskets_u = st.user_baskets[np.maximum(u, 0)]
        baskets_u[u < 0] = np.nan
        n = _take(st.ui_n, pos, 0.0)
        n[u < 0] = np.nan
        put("rebuy_baskets", n)
        put("rebuy_share", n / baskets_u)
        decayed = _take(st.ui_decayed, pos, 0.0)
        decayed[u < 0] = np.nan
        put("rebuy_decayed", decayed)
        put("rebuy_rank", _take(st.ui_rank, pos, np.nan))
        since = _take(st.ui_days_since, pos, np.nan)
        interval = _take(st.ui_interval, pos, np.nan)
        put("days_since_last", since)
        put("mean_interval_days", interval)
        with np.errstate(divide="ignore", invalid="ignore"):
            put("due_ratio", since / interval)
        put("user_baskets", baskets_u)
        items_u = st.user_items[np.maximum(u, 0)]
        items_u[u < 0] = np.nan
        put("user_items", items_u)
        put("user_subcategory_share", st.user_share("subcategory", u, cols))
        put("user_category_share", st.user_share("category", u, cols))

        # Cart x item: each pair against each cart item.
        n_cart = np.diff(cart.indptr)[rows]
        pair, offset = _segments(n_cart)
        cart_item = cart.indices[cart.indptr[rows[pair]] + offset].astype(np.int64)
        item = cols[pair]
        cpos = _pair_lookup(st.co_keys, cart_item * st.n_items + item)
        count = _take(st.co_count, cpos, 0.0)
        conf = _take(st.co_conf, cpos, 0.0)
        lift = conf * st.n_baskets / np.maximum(st.item_baskets[item], 1.0)
        starts = (np.cumsum(n_cart) - n_cart)[n_cart > 0]
        has = n_cart > 0

        def per_pair(values: np.ndarray, reduce: Any, empty: float) -> np.ndarray:
            out = np.full(rows.size, empty, dtype=np.float32)
            if starts.size:
                out[has] = reduce.reduceat(values, starts)
            return out

        put("cooc_sum_conf", cooc[rows, cols])
        put("cooc_max_conf", per_pair(conf, np.maximum, 0.0))
        put("cooc_max_count", per_pair(count, np.maximum, 0.0))
        put("cooc_max_lift", per_pair(lift, np.maximum, 0.0))
        put("cooc_n_cart", per_pair((cpos >= 0).astype(np.float32), np.add, 0.0))
        rank = cooc_rank[rows, cols]
        put("cooc_rank", np.where(rank > 0, rank, np.nan))
        put("knn_score", knn[rows, cols])
        rank = knn_rank[rows, cols]
        put("knn_rank", np.where(rank > 0, rank, np.nan))
        size = np.maximum(n_cart, 1).astype(np.float32)
        for name, codes in (("cart_same_subcategory", st.subcategory),
                            ("cart_same_category", st.category),
                            ("cart_same_department", st.department)):  # fmt: skip
            same = ((codes[cart_item] == codes[item]) & (codes[item] >= 0)).astype(np.float32)
            put(name, per_pair(same, np.add, 0.0) / size)
        put("cart_size", n_cart.astype(np.float32))

        # Item side.
        put("item_baskets", st.item_baskets[cols])
        put("item_users", st.item_users[cols])
        put("item_repeat_rate", st.item_repeat_rate[cols])
        put("item_recent_share", st.item_recent_share[cols])
        put("item_subcategory_rank", st.item_subcategory_rank[cols])
        put("price", st.price[cols])
        known_price = np.isfinite(st.price)
        price_sum = cart @ np.where(known_price, st.price, 0.0)
        price_n = cart @ known_price.astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            mean_price = np.where(price_n > 0, price_sum / price_n, np.nan)
            put("price_ratio_cart", st.price[cols] / mean_price[rows])
        put("task_new_to_user", np.full(rows.size, float(exclude_owned), dtype=np.float32))
        return QueryBatch(pool, rows, cols, X)

    # -- training -----------------------------------------------------------------------
    def _fit(self, data: Dataset) -> None:
        ts = data.interactions["timestamp"]
        end = ts.max()
        bounds = [
            end - timedelta(days=self.window_days * k) for k in range(self.train_windows, 0, -1)
        ]
        rng = np.random.default_rng(self.seed)
        parts: list[dict[str, Any]] = []
        #: Per training window: its bounds, the history's and the queries' external basket
        #: ids actually used, candidate recall per task (not persisted; the leakage test).
        self.training_log: list[dict[str, Any]] = []
        for w, start in enumerate(bounds):
            stop = bounds[w + 1] if w + 1 < len(bounds) else None
            history = data.restrict(pl.col("timestamp") < start)
            keep = pl.col("timestamp") >= start
            window = data.restrict(keep if stop is None else keep & (pl.col("timestamp") < stop))
            if history.interactions.height == 0 or window.interactions.height == 0:
                raise ParamError(
                    "train_windows",
                    f"window {w + 1} (from {start}) leaves an empty history or window",
                )
            state = FeatureState(history, np.datetime64(start, "us"), self)
            log: dict[str, Any] = {
                "start": start, "stop": stop, "history_baskets": state.basket_ids,
                "query_baskets": [], "recall": {},
            }  # fmt: skip
            sample = None
            for new in (False, True):
                task = basket_completion_task(history, window, seed=self.seed, new_to_user=new)
                if task.n_queries == 0:
                    continue
                if sample is None and self.train_queries and task.n_queries > self.train_queries:
                    chosen = rng.choice(task.query_ids, self.train_queries, replace=False)
                    sample = set(chosen.tolist())
                pick = (
                    np.arange(task.n_queries)
                    if sample is None
                    else np.flatnonzero(np.isin(task.query_ids, list(sample)))
                )
                part = self._training_rows(task, pick, state)
                log["recall"][task.name] = part.pop("recall")
                log["query_baskets"].append(part["baskets"])
                parts.append(part)
            log["query_baskets"] = np.unique(np.concatenate(log["query_baskets"]))
            self.training_log.append(log)
        self.training_windows_ = [
            {"start": str(w["start"]), "stop": None if w["stop"] is None else str(w["stop"]),
             "history_baskets": int(w["history_baskets"].size),
             "query_baskets": int(w["query_baskets"].size), "candidate_recall": w["recall"]}
            for w in self.training_log
        ]  # fmt: skip
        booster, self.validation_ = self._train_learner(parts, rng)
        self.booster_model_ = booster.model_to_string()
        self._booster = booster
        self._set_state(FeatureState(data, np.datetime64(end, "us"), self))

    # -- learned state as plain attributes (training.persistence stores them) -------------
    def _set_state(self, state: FeatureState) -> None:
        for key in [k for k in vars(self) if k.startswith("state_") and k.endswith("_")]:
            delattr(self, key)
        for key, value in state.to_fields().items():
            setattr(self, f"state_{key}_", value)
        self._state = state

    @property
    def state_(self) -> FeatureState:
        """The statistics of all of train (rebuilt from the stored attributes after loading)."""
        if self._state is None:
            fields = {k[len("state_") : -1]: v for k, v in vars(self).items()
                      if k.startswith("state_") and k.endswith("_")}  # fmt: skip
            self._state = FeatureState.from_fields(fields)
        return self._state

    @property
    def booster(self) -> Any:
        """The LightGBM booster (rebuilt from ``booster_model_`` after loading)."""
        if self._booster is None:
            import lightgbm as lgb

            self._booster = lgb.Booster(model_str=self.booster_model_)
        return self._booster

    def _training_rows(
        self, task: RankingTask, pick: np.ndarray, state: FeatureState, chunk: int = 2048
    ) -> dict[str, Any]:
        """Features and labels of the chosen queries of ``task``; queries without a held-out
        item in their pool are dropped (no ranking signal)."""
        xs, ys, groups, baskets, n_relevant, recalls = [], [], [], [], [], []
        for lo in range(0, pick.size, chunk):
            q = pick[lo : lo + chunk]
            batch = self.query_batch(task.users[q], task.carts[q], task.exclude_owned, state)
            relevant = task.relevant[q]
            recalls.append((candidate_recall(batch.pool, relevant), relevant.nnz))
            y = _sample(relevant, batch.rows, batch.cols) > 0
            sizes = np.diff(batch.pool.indptr)
            positives = np.bincount(batch.rows, weights=y, minlength=q.size)
            useful = (positives > 0) & (sizes > positives)
            keep = useful[batch.rows]
            xs.append(batch.features[keep])
            ys.append(y[keep].astype(np.float32))
            groups.append(sizes[useful])
            baskets.append(task.query_ids[q][useful])
            n_relevant.append(np.diff(relevant.indptr)[useful])
        total = sum(n for _, n in recalls)
        return {
            "X": np.concatenate(xs), "y": np.concatenate(ys), "group": np.concatenate(groups),
            "baskets": np.concatenate(baskets), "task": task.name,
            "n_relevant": np.concatenate(n_relevant), "all_baskets": task.query_ids[pick],
            "recall": sum(r["micro"] * n for r, n in recalls) / max(total, 1),
        }  # fmt: skip

    def _train_learner(
        self, parts: list[dict[str, Any]], rng: np.random.Generator
    ) -> tuple[Any, dict[str, Any]]:
        import lightgbm as lgb

        all_baskets = np.unique(np.concatenate([p["all_baskets"] for p in parts]))
        valid_baskets = all_baskets[rng.random(all_baskets.size) < self.valid_fraction]
        sets: dict[bool, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {False: [], True: []}
        for p in parts:
            is_valid = np.isin(p["baskets"], valid_baskets)
            row_valid = np.repeat(is_valid, p["group"])
            for side in (False, True):
                sets[side].append((p["X"][row_valid == side], p["y"][row_valid == side],
                                   p["group"][is_valid == side]))  # fmt: skip
        X, y, group = (np.concatenate(c) for c in zip(*sets[False], strict=True))
        if group.size == 0:
            raise ParamError("train_windows", "the training windows hold no usable basket")
        params = {
            "objective": "lambdarank", "metric": "ndcg", "eval_at": [10],
            "learning_rate": self.learning_rate, "num_leaves": self.num_leaves,
            "min_data_in_leaf": self.min_data_in_leaf, "seed": self.seed,
            "deterministic": True, "force_row_wise": True, "num_threads": self.num_threads,
            "verbosity": -1,
        }  # fmt: skip
        train_set = lgb.Dataset(X, y, group=group, feature_name=list(FEATURE_NAMES))
        valid = {"train_queries": int(group.size), "train_rows": int(group.sum())}
        Xv, yv, gv = (np.concatenate(c) for c in zip(*sets[True], strict=True))
        if gv.size:
            valid_set = lgb.Dataset(Xv, yv, group=gv, reference=train_set)
            booster = lgb.train(
                params, train_set, num_boost_round=self.n_estimators, valid_sets=[valid_set],
                valid_names=["valid"],
                callbacks=[lgb.early_stopping(self.early_stopping_rounds, verbose=False)],
            )  # fmt: skip
            valid.update(
                valid_queries=int(gv.size),
                best_iteration=int(booster.best_iteration),
                pool_ndcg_at_10=float(booster.best_score["valid"]["ndcg@10"]),
            )
        else:
            booster = lgb.train(params, train_set, num_boost_round=self.n_estimators)
            valid["best_iteration"] = self.n_estimators
        if gv.size:
            valid.update(self._full_validation(booster, parts, valid_baskets))
            raw = booster.predict(Xv, num_threads=self.num_threads)
            valid["calibration"] = calibrate(raw, yv, gv, self.seed)
        return booster, valid

    def _full_validation(
        self, booster: Any, parts: list[dict[str, Any]], valid_baskets: np.ndarray
    ) -> dict[str, float]:
        """NDCG@10 per task on the validation baskets against the *whole* held-out part: a
        held-out item outside the pool is a miss and a query whose pool holds none scores 0,
        as in the evaluation (the number to compare settings by; LightGBM's own NDCG sees
        only the pool)."""
        out: dict[str, float] = {}
        discount = 1.0 / np.log2(np.arange(2, 12))
        for p in parts:
            n_valid = int(np.isin(p["all_baskets"], valid_baskets).sum())
            if n_valid == 0:
                continue
            is_valid = np.isin(p["baskets"], valid_baskets)
            row_valid = np.repeat(is_valid, p["group"])
            raw_all = booster.predict(p["X"][row_valid], num_threads=self.num_threads)
            labels = p["y"][row_valid]
            sizes = p["group"][is_valid]
            starts = np.cumsum(sizes) - sizes
            total = 0.0
            for g, (lo, n) in enumerate(zip(starts, sizes, strict=True)):
                top = np.argsort(-raw_all[lo : lo + n], kind="stable")[:10]
                dcg = float((labels[lo : lo + n][top] * discount[: top.size]).sum())
                n_rel = int(p["n_relevant"][is_valid][g])
                total += dcg / float(discount[: min(n_rel, 10)].sum())
            key = f"{p['task']}_ndcg_at_10"
            out[key] = out.get(key, 0.0) + total / n_valid / (len(parts) // 2 or 1)
        return out

    # -- scoring ------------------------------------------------------------------------
    def predict_pairs(self, features: np.ndarray) -> np.ndarray:
        """The learner's raw score of feature rows (float64)."""
        best = self.validation_.get("best_iteration") or None
        return self.booster.predict(features, num_iteration=best, num_threads=self.num_threads)

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """Calibrated probability that the shopper adds each candidate (Platt scaling of
        :meth:`predict_pairs`, fitted on validation; ``validation_["calibration"]``)."""
        cal = self.validation_["calibration"]
        return 1.0 / (1.0 + np.exp(-(cal["a"] * self.predict_pairs(features) + cal["b"])))

    def score(self, users: np.ndarray, carts: sp.csr_matrix) -> np.ndarray:
        """Dense scores: candidates get the model's score, other items ``FLOOR`` plus their
        popularity share; an empty cart gets the re-buy score (module docstring)."""
        self._check_fitted()
        users = np.asarray(users, dtype=np.int64)
        carts = sp.csr_matrix(carts)
        st = self.state_
        out = np.broadcast_to(FLOOR + st.popularity, (len(users), self.n_items_)).copy()
        empty = np.diff(carts.indptr) == 0
        if empty.any():
            known = empty & (users >= 0)
            out[empty] = TIE_BREAK * st.popularity
            if known.any():
                out[known] += st.decayed[users[known]].toarray()
        filled = np.flatnonzero(~empty)
        if filled.size:
            batch = self.query_batch(users[filled], carts[filled], self._new_to_user, st)
            raw = self.predict_pairs(batch.features)
            out[filled[batch.rows], batch.cols] = np.maximum(raw, FLOOR + 2.0)
        return out.astype(np.float32)

    def recommend(
        self,
        users: np.ndarray,
        carts: sp.csr_matrix | None = None,
        k: int = 10,
        candidates: CandidateFilter | None = None,
        batch_size: int = 512,
    ) -> tuple[np.ndarray, np.ndarray]:
        """As :meth:`RecommenderBase.recommend`; ``candidates.exclude_owned`` also selects the
        task the model scores for (``task_new_to_user``) and the candidate pool."""
        self._new_to_user = bool(candidates is not None and candidates.exclude_owned)
        try:
            return super().recommend(users, carts, k, candidates, batch_size)
        finally:
            self._new_to_user = False
