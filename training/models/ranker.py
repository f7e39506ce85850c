"""The learned add-on ranker: candidates from four sources, ~30 features, LightGBM lambdarank.

Two stages per query (a user and a cart):

1. **Candidates**: the union of the user's re-buy top ``n_rebuy`` (by recency-decayed
   purchase count), the cart's co-occurrence top ``n_cooccurrence`` (summed association-rule
   confidence), an item-KNN top ``n_cf`` (cosine neighbours of the history and the cart) and
   the ``n_category`` most popular items of the cart items' sub-categories, plus the shop's
   ``n_popular`` recent best-sellers (the one source that needs neither history nor
   categories). Cart items, and
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
With ``train_split: stratified`` (data split per user at random, e.g. MovieLens) the one
"window" is instead a seeded per-user random ``1 - train_ratio`` of the training rows (the
split's own rule, :func:`features.splits.stratified_split`) and its history the rest, so the
training queries are held out the way the evaluation's are.
``training_log`` records, per window, the history's basket ids and the query basket ids
actually used (the leakage test reads them); ``training_windows_`` is its persisted summary.

**Both tasks, one model**: the feature ``task_new_to_user`` (1 when owned items are
excluded) lets the trees specialise. :meth:`recommend` reads the task from
``CandidateFilter.exclude_owned``; :meth:`score` alone scores the owned-allowed task.

Candidates and features are computed by :mod:`serving.ranker_features`, the module the
served model runs too (one code path, parity tested); its :data:`FEATURES` is the one place
each feature is documented (name, definition, source), in model column order. "History"
there is the rows the statistics were fitted on and "ref" its end; NaN means undefined
(LightGBM routes it as missing).

``co(i, j)`` counts history baskets holding both items, kept for each ``i`` only for its
``neighbours`` most frequent partners (what an export ships); the cosine similarities keep
``cf_neighbours`` per item (implicit's ``CosineRecommender``).
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, ClassVar, Literal

import numpy as np
import polars as pl
import scipy.sparse as sp

from features.dataset import Dataset
from features.splits import RankingTask, basket_completion_task
from serving.ranker_features import (
    FEATURE_NAMES,
    FEATURES,
    FLOOR,
    POPULARITY_TASK_BITS,
    SOURCES,
    Feature,
    RankerState,
    popularity_fill,
    query_features,
    rebuy_ranking,
)
from serving.sorted_arrays import lookup_sorted
from training.models.base import CandidateFilter, ParamError, RecommenderBase, owned_rows
from training.models.baselines import TIE_BREAK, _popularity_share, cooccurrence_blocks

__all__ = ["FEATURES", "FEATURE_NAMES", "SOURCES", "Feature", "FeatureState", "RankerRecommender"]

_US_PER_DAY = 86_400e6


# -- small vectorised helpers ---------------------------------------------------------------
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


#: Products (history item x cosine neighbour) per block of users in :func:`user_knn_table`:
#: the block's sum matrix holds at most this many entries, and its sort and selection take
#: about 80 bytes each (5M: ~0.4 GB, whatever the shop's size).
USER_KNN_BUDGET = 5_000_000


def user_knn_table(
    ui_indptr: np.ndarray, ui_items: np.ndarray, sim: sp.csr_matrix, depth: int,
    budget: int = USER_KNN_BUDGET, dtype: Any = np.float32,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """Each user's summed cosine rows of the history items, fitted once (the user part of
    ``knn_score``, ``serving.ranker_features._knn_entries``).

    Parameters
    ----------
    ui_indptr, ui_items : numpy.ndarray
        The users' distinct history items as CSR rows (items sorted within a row).
    sim : scipy.sparse.csr_matrix, shape (n_items, n_items)
        Cosine similarities, the values the state ships (float16-rounded).
    depth : int
        Other (not owned) items kept per user.
    budget : int
        Products (history item x neighbour) per block of users: the memory of one block.
    dtype : numpy dtype
        Of the returned sums (the state ships float16); the ``depth`` best are chosen on the
        float32 sums either way.

    Returns
    -------
    ui_knn : numpy.ndarray, ``dtype``, aligned with ``ui_items``
        The sum at each of the user's own items (0 where no history item is similar).
    uk_indptr, uk_items, uk_values : numpy.ndarray
        Per user (CSR rows, items sorted), its ``depth`` best other items by the float32 sum
        (ties: the lower item), sums > 0 only; ``uk_items`` int32, ``uk_values`` ``dtype``.
        Written into arrays of the largest possible size (users x ``depth`` entries, only
        the used part ever touched) and returned as views of their used part: no per-entry
        row ids and no joined copy (a 2M-household shop keeps 400M entries).
    """
    n_users, n_items = ui_indptr.size - 1, sim.shape[0]
    sim = sp.csr_matrix((sim.data.astype(np.float64), sim.indices, sim.indptr), shape=sim.shape)
    owned = sp.csr_matrix((np.ones(ui_items.size), ui_items, ui_indptr), shape=(n_users, n_items))
    # products per user, to cut the users into blocks of about `budget` products
    cost = np.cumsum(owned @ np.diff(sim.indptr).astype(np.float64))
    ui_knn = np.zeros(ui_items.size, dtype=dtype)
    # the largest possible table; pages never written are never resident
    uk_items = np.empty(n_users * min(depth, n_items), dtype=np.int32)
    uk_values = np.empty(uk_items.size, dtype=dtype)
    uk_counts = np.zeros(n_users, dtype=np.int64)
    lo = filled = 0
    while lo < n_users:
        start = cost[lo - 1] if lo else 0.0
        hi = max(int(np.searchsorted(cost, start + budget, side="right")), lo + 1)
        hi = min(hi, n_users)
        prod = sp.csr_matrix(owned[lo:hi] @ sim)
        prod.sum_duplicates()  # sorted indices: keys below are sorted
        rows = np.repeat(np.arange(lo, hi, dtype=np.int64), np.diff(prod.indptr))
        keys = rows * n_items + prod.indices
        values = prod.data.astype(np.float32)
        own_rows = np.repeat(np.arange(lo, hi, dtype=np.int64),
                             np.diff(ui_indptr[lo : hi + 1]))  # fmt: skip
        own_keys = own_rows * n_items + ui_items[ui_indptr[lo] : ui_indptr[hi]]
        pos = lookup_sorted(keys, own_keys)
        ui_knn[ui_indptr[lo] : ui_indptr[hi]] = np.where(pos >= 0, values[pos], 0.0)
        other = np.ones(keys.size, dtype=bool)
        other[pos[pos >= 0]] = False
        other &= values > 0
        rows, cols, values = rows[other], prod.indices[other], values[other]
        # the first `depth` per row by value, ties the lower item: positive float32 values
        # order as their bit patterns, so one stable integer sort does it
        key = rows * 2**31 + (2**31 - 1 - values.view(np.int32).astype(np.int64))
        order = np.argsort(key, kind="stable")
        starts = np.searchsorted(rows[order], np.arange(lo, hi + 1))
        rank = np.arange(order.size) - np.repeat(starts[:-1], np.diff(starts))
        keep = np.sort(order[rank < depth])  # back to (row, item) order
        uk_items[filled : filled + keep.size] = cols[keep]
        uk_values[filled : filled + keep.size] = values[keep]
        uk_counts[lo:hi] = np.bincount(rows[keep] - lo, minlength=hi - lo)
        filled += keep.size
        lo = hi
    uk_indptr = np.r_[0, np.cumsum(uk_counts)].astype(np.int64)
    return ui_knn, uk_indptr, uk_items[:filled], uk_values[:filled]


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


def sample_negatives(
    X: np.ndarray, y: np.ndarray, group: np.ndarray, fraction: float,
    seed: int | np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """Training rows with every positive and a seeded uniform ``fraction`` of the negatives.

    Parameters
    ----------
    X, y : numpy.ndarray
        Feature rows and labels (> 0 = positive), grouped by query.
    group : numpy.ndarray
        Rows per query, in row order.
    fraction : float
        Chance that each negative row is kept (draws of ``numpy.random.default_rng([seed,
        2])``, one per row in row order: the same rows give the same sample).
    seed : int or numpy.random.Generator
        A generator is drawn from as it stands: rows sampled in chunks with one generator
        are the rows sampled all at once from the seed's.

    Returns
    -------
    tuple
        ``(X, y, group)`` of the kept rows, queries in the same order (a query keeps at
        least its positives).
    """
    query = np.repeat(np.arange(group.size), group)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng([seed, 2])
    keep = (y > 0) | (rng.random(y.size) < fraction)
    return X[keep], y[keep], np.bincount(query[keep], minlength=group.size).astype(group.dtype)


# -- the statistics every feature and candidate source reads ------------------------------------
class FeatureState(RankerState):
    """:class:`~serving.ranker_features.RankerState` fitted on one history, plus the history's
    external basket ids (``basket_ids``, training only: the leakage test reads them).

    Build it with :meth:`fit`; the arrays are what the artifact ships.
    """

    basket_ids: np.ndarray = np.zeros(0, dtype=np.int64)

    @classmethod
    def from_arrays(cls, arrays: Any) -> FeatureState:
        state = super().from_arrays(arrays)
        state.basket_ids = np.zeros(0, dtype=np.int64)
        return state  # type: ignore[return-value]

    @classmethod
    def fit(cls, data: Dataset, ref: np.datetime64, params: RankerRecommender) -> FeatureState:
        """The statistics of ``data`` (the history), recency measured to ``ref`` (its end).

        Parameters
        ----------
        data : Dataset
            The history.
        ref : numpy.datetime64
            Reference time of the recency features.
        params : RankerRecommender
            Sizes (neighbours, half-life, candidates per source, ...).
        """
        n_users, n_items = data.n_users, data.n_items
        ref_us = int(np.datetime64(ref, "us").astype(np.int64))
        lines = (
            data.interactions.select("user_idx", "item_idx", "basket_id", "timestamp")
            .group_by("user_idx", "basket_id", "item_idx")
            .agg(pl.col("timestamp").cast(pl.Int64).min().alias("t"))
        )
        age = (ref_us - pl.col("t")) / _US_PER_DAY
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
        a: dict[str, Any] = {
            "n_users": n_users, "n_items": n_items, "n_rebuy": params.n_rebuy,
            "n_cooccurrence": params.n_cooccurrence, "n_cf": params.n_cf,
            "n_category": params.n_category, "n_popular": params.n_popular,
            "empty_cart_counts": int(getattr(params, "empty_cart_counts_", 0)),
            "popularity_tasks": int(getattr(params, "popularity_tasks_", 0)),
            "count_shares": int(params.count_features == "shares"),
        }  # fmt: skip
        a["ui_indptr"] = _indptr(u, n_users)
        a["ui_items"] = i.astype(np.int32)
        a["ui_n"] = ui_n = ui["n"].to_numpy().astype(np.float32)
        a["ui_decayed"] = ui_decayed = ui["decayed"].to_numpy().astype(np.float32)
        last = ui["last"].to_numpy().astype(np.float64)
        first = ui["first"].to_numpy().astype(np.float64)
        a["ui_days_since"] = ((ref_us - last) / _US_PER_DAY).astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            interval = (last - first) / _US_PER_DAY / (ui_n - 1.0)
        a["ui_interval"] = np.where(ui_n >= 2, interval, np.nan).astype(np.float32)
        order = np.lexsort((i, -ui_decayed, u))
        first_of_user = np.searchsorted(u[order], u[order], side="left")
        a["ui_rank"] = np.empty(order.size, dtype=np.float32)
        a["ui_rank"][order] = np.arange(order.size) - first_of_user + 1

        per_user = lines.group_by("user_idx").agg(
            pl.col("basket_id").n_unique().alias("baskets"),
            pl.col("item_idx").n_unique().alias("items"),
            pl.len().alias("lines"),
        )
        uu = per_user["user_idx"].to_numpy()
        for name, column in (("user_baskets", "baskets"), ("user_items", "items"),
                             ("user_lines", "lines")):  # fmt: skip
            a[name] = np.full(n_users, np.nan, dtype=np.float32)
            a[name][uu] = per_user[column].to_numpy()

        for level in ("department", "category", "subcategory"):
            a[level] = data.item_categories(level).astype(np.int32)
        a["price"] = data.item_prices().astype(np.float32)
        # Basket lines per (user, category code + 1), as CSR rows by user.
        line_users = lines["user_idx"].to_numpy().astype(np.int64)
        line_items = lines["item_idx"].to_numpy()
        for prefix, level in (("usub", "subcategory"), ("ucat", "category")):
            width = int(a[level].max(initial=-1)) + 2
            keys, counts = np.unique(line_users * width + a[level][line_items] + 1,
                                     return_counts=True)  # fmt: skip
            a[f"{prefix}_indptr"] = _indptr(keys // width, n_users)
            a[f"{prefix}_codes"] = (keys % width).astype(np.int32)
            a[f"{prefix}_counts"] = counts.astype(np.float32)

        bm = data.basket_item_matrix()
        baskets = bm.matrix
        a["n_baskets"] = float(max(baskets.shape[0], 1))
        item_baskets = np.asarray(baskets.sum(axis=0)).ravel().astype(np.float32)
        a["item_baskets"] = item_baskets
        a["item_users"] = item_users = np.bincount(i, minlength=n_items).astype(np.float32)
        repeaters = np.bincount(i[ui_n >= 2], minlength=n_items).astype(np.float32)
        recent_cut = ref_us - params.window_days * _US_PER_DAY
        recent = bm.times.astype("datetime64[us]").astype(np.int64) >= recent_cut
        recent_baskets = np.asarray(baskets[recent].sum(axis=0)).ravel()
        with np.errstate(divide="ignore", invalid="ignore"):
            a["item_repeat_rate"] = np.where(item_users > 0, repeaters / item_users, np.nan).astype(
                np.float32
            )
            a["item_recent_share"] = np.where(
                item_baskets > 0, recent_baskets / item_baskets, np.nan
            ).astype(np.float32)
        sc = a["subcategory"]
        order = np.lexsort((np.arange(n_items), -item_baskets, sc))
        sorted_sc = sc[order]
        a["item_subcategory_rank"] = np.empty(n_items, dtype=np.float32)
        a["item_subcategory_rank"][order] = (
            np.arange(n_items) - np.searchsorted(sorted_sc, sorted_sc, side="left") + 1
        )
        a["popularity"] = _popularity_share(data, "users").astype(np.float32)

        # Co-occurrence counts, each item's `neighbours` most frequent partners, in item
        # blocks (the full pair matrix is never held).
        blocks = [_top_counts_per_row(block, params.neighbours) if params.neighbours > 0 else block
                  for _, block in cooccurrence_blocks(baskets)]  # fmt: skip
        co = sp.csr_matrix(sp.vstack(blocks, format="csr"))
        a["co_indptr"] = co.indptr.astype(np.int64)
        a["co_items"] = co.indices.astype(np.int32)
        a["co_count"] = co.data.astype(np.float32)

        # Item-KNN (cosine, implicit) for the CF source and the knn features.
        from training.models.implicit_models import ItemKNNRecommender

        knn = ItemKNNRecommender(neighbours=params.cf_neighbours, num_threads=params.num_threads)
        owned = sp.csr_matrix((np.ones(i.size, dtype=np.float32), (u, i)), shape=(n_users, n_items))
        knn.n_users_, knn.n_items_, knn.owned_ = n_users, n_items, owned
        knn._fit(data)
        sim = sp.csr_matrix(knn.similarity_)
        sim.sort_indices()
        a["sim_indptr"] = sim.indptr.astype(np.int64)
        a["sim_items"] = sim.indices.astype(np.int32)
        a["sim_values"] = sim.data.astype(np.float16)  # what the artifact ships (size)
        # The user part of knn_score, once per user instead of per query (serving latency).
        a["knn_user_depth"] = params.knn_user_depth
        rounded = sp.csr_matrix((a["sim_values"], sim.indices, sim.indptr), shape=sim.shape)
        # float16 as the similarities: 3.6 MB less on Complete Journey (artifact <= 60 MB)
        a["ui_knn"], a["uk_indptr"], a["uk_items"], a["uk_values"] = (
            user_knn_table(a["ui_indptr"], a["ui_items"], rounded, params.knn_user_depth,
                           dtype=np.float16)
            if params.knn_user_depth > 0
            else (np.zeros(i.size, dtype=np.float16), np.zeros(n_users + 1, dtype=np.int64),
                  np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.float16))
        )  # fmt: skip

        state = cls.from_arrays(a)
        state.basket_ids = data.interactions["basket_id"].unique().sort().to_numpy()
        return state


def _empty_cart_choice(state: FeatureState, window: Dataset, k: int = 10) -> dict[str, Any]:
    """Next-period NDCG@k on the last training window (its history's state against each
    known user's distinct window items, as ``features.splits.next_period_task``) of the two
    empty-cart rankings: decayed purchase counts (``half_life_days``) and plain basket counts.
    Both rank only the user's own items (the popularity fill below them is the same)."""
    truth = window.user_item_counts().tocsr()
    known = state.item_baskets > 0
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    totals = {"decayed": 0.0, "counts": 0.0}
    users = [u for u in np.flatnonzero(np.diff(truth.indptr) > 0)
             if u < state.n_users and state.ui_indptr[u + 1] > state.ui_indptr[u]]  # fmt: skip
    for u in users:
        relevant = truth.indices[truth.indptr[u] : truth.indptr[u + 1]]
        relevant = relevant[known[relevant]]
        if relevant.size == 0:
            continue
        lo, hi = state.ui_indptr[u], state.ui_indptr[u + 1]
        items = state.ui_items[lo:hi]
        ideal = float(discount[: min(relevant.size, k)].sum())
        for name, values in (("decayed", state.ui_decayed), ("counts", state.ui_n)):
            key = values[lo:hi] + TIE_BREAK * state.popularity[items]
            top = items[np.lexsort((items, -key))[:k]]
            totals[name] += float(discount[: top.size][np.isin(top, relevant)].sum()) / ideal
    n = max(len(users), 1)
    out = {f"{name}_ndcg_at_{k}": total / n for name, total in totals.items()}
    out["counts_wins"] = bool(totals["counts"] > totals["decayed"])
    return out


def _popularity_ndcg(
    task: RankingTask, pick: np.ndarray, state: FeatureState, valid_baskets: np.ndarray,
    k: int = 10,
) -> float:  # fmt: skip
    """NDCG@k of the chosen queries ``pick`` of ``task`` that are validation baskets, each
    ranked by popularity (the allowed items in :func:`~serving.ranker_features.popularity_fill`
    order of the window ``state``: what a cart gets with ``popularity_tasks``), against the
    whole held-out part, as :meth:`RankerRecommender._full_validation` scores the trees."""
    pick = pick[np.isin(task.query_ids[pick], valid_baskets)]
    if pick.size == 0:
        return 0.0
    _, order = popularity_fill(state.popularity)
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    total = 0.0
    for q in pick.tolist():
        skip = task.carts[q].indices
        user = int(task.users[q])
        if task.exclude_owned and user >= 0:
            own = state.ui_items[state.ui_indptr[user] : state.ui_indptr[user + 1]]
            skip = np.concatenate([skip, own])
        head = order[: k + skip.size]
        top = head[~np.isin(head, skip)][:k]
        relevant = task.relevant[q].indices
        if relevant.size:
            hits = np.isin(top, relevant)
            total += float(discount[: top.size][hits].sum()) / float(
                discount[: min(relevant.size, k)].sum()
            )
    return total / pick.size


def _popularity_tasks(validation: dict[str, Any]) -> int:
    """The :data:`~serving.ranker_features.POPULARITY_TASK_BITS` of the tasks where popularity
    scored a higher validation NDCG@10 than the trees."""
    bits = 0
    for exclude_owned, name in ((False, "basket_completion"), (True, "basket_completion_new")):
        trees = validation.get(f"{name}_ndcg_at_10")
        popular = validation.get(f"{name}_popularity_ndcg_at_10")
        if trees is not None and popular is not None and popular > trees:
            bits |= POPULARITY_TASK_BITS[exclude_owned]
    return bits


def _round_thresholds_down(model: Any, booster: Any) -> None:
    """Make the ONNX trees split float32 inputs exactly as LightGBM does.

    LightGBM tests ``x <= t`` with a float64 threshold ``t``; onnxmltools stores ``t``
    rounded to the *nearest* float32, so a float32 ``x`` equal to that rounded value goes
    the other way when the rounding went up (seen on real data: 2 of 8,647 pairs off by
    0.02). For float32 ``x``, ``x <= t`` holds exactly when ``x <= `` the largest float32
    not above ``t``: each threshold is replaced by that value (a threshold whose float32
    value several float64 thresholds share, from both sides, is left as it is).
    """
    below: dict[float, set[bool]] = {}

    def walk(node: dict[str, Any]) -> None:
        if "threshold" in node and isinstance(node["threshold"], int | float):
            t = float(node["threshold"])
            below.setdefault(float(np.float32(t)), set()).add(float(np.float32(t)) > t)
        for side in ("left_child", "right_child"):
            if side in node:
                walk(node[side])

    for tree in booster.dump_model()["tree_info"]:
        walk(tree["tree_structure"])
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.name == "nodes_values":
                values = np.asarray(attr.floats, dtype=np.float32)
                for k, v in enumerate(values):
                    if below.get(float(v)) == {True}:
                        values[k] = np.nextafter(v, np.float32(-np.inf))
                attr.floats[:] = values.tolist()


log = logging.getLogger("addons.training.ranker")


def _max_rss_mb() -> float | None:
    """The process's peak resident memory so far (MB), where the OS reports it."""
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)  # bytes on macOS


class _StageClock:
    """Wall and CPU (all threads of the process) seconds per named stage, summed over laps,
    and the process's peak resident memory when the stage last ended (``max_rss_mb``: a
    stage that raised it holds the fit's peak)."""

    def __init__(self) -> None:
        self.stages: dict[str, dict[str, float | None]] = {}
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def lap(self, name: str) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        stage = self.stages.setdefault(name, {"wall": 0.0, "cpu": 0.0})
        stage["wall"] = round(float(stage["wall"] or 0.0) + wall - self._wall, 2)
        stage["cpu"] = round(float(stage["cpu"] or 0.0) + cpu - self._cpu, 2)
        stage["max_rss_mb"] = _max_rss_mb()
        log.info("ranker fit: %s done, %.1f s, peak RSS so far %s MB", name, wall - self._wall,
                 stage["max_rss_mb"])  # fmt: skip
        self._wall, self._cpu = wall, cpu


def _indptr(rows: np.ndarray, n: int) -> np.ndarray:
    """CSR row pointer of entries already sorted by ``rows``."""
    return np.r_[0, np.cumsum(np.bincount(rows, minlength=n))].astype(np.int64)


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
    n_rebuy, n_cooccurrence, n_cf, n_category, n_popular : int
        Candidates per source: the user's re-buy list, the cart's co-occurrence list, the
        item-KNN list, the cart's sub-categories' best-sellers, the recent best-sellers of
        the whole shop. 0 turns a source off.
    neighbours : int
        Co-occurrence partners kept per item (0 keeps all).
    cf_neighbours : int
        Cosine neighbours kept per item (item-KNN).
    knn_user_depth : int
        The user part of ``knn_score`` (the summed cosine rows of the user's history) is
        fitted once per user and kept at the user's own items and at its ``knn_user_depth``
        best other items (elsewhere it counts 0): a request then reads a few hundred entries
        instead of history x ``cf_neighbours``. 0 sums every history row per query (exact;
        what states before this parameter did).
    half_life_days : float
        Recency decay of ``rebuy_decayed``.
    train_windows, window_days : int
        Training windows at the end of train and their length.
    train_split : {"time", "stratified"}
        How the training queries' baskets are held out, as the data's own split does it:
        ``time``, the last ``train_windows`` windows of ``window_days`` (a time split);
        ``stratified``, a seeded per-user random ``1 - train_ratio`` of the rows (a
        stratified split, e.g. MovieLens: its held-out items are a random part of a user's
        ratings over all time, not the latest).
    count_features : {"raw", "shares"}
        ``raw``: the count features (item baskets and buyers, co-occurrence count, the user's
        baskets and items) as counts; ``shares``: divided by the history's baskets (buyers:
        its users), scale-free, since the trees learn them on a window's history (part of
        train) but score them on all of train (``serving.ranker_features.COUNT_SHARES``).
    train_ratio : float
        The history's share of each user's rows with ``train_split: stratified``.
    train_queries : int
        Baskets sampled per window (seeded; 0 = all).
    valid_fraction : float
        Share of the training baskets held out to pick the number of trees.
    negative_fraction : float
        Share of each training query's negatives (candidates not added) the trees learn
        from: a seeded uniform sample, every positive kept (:func:`sample_negatives`); the
        validation queries keep all their rows (early stopping and calibration see the true
        pool). 1 keeps all (fit time: rows are the learner's cost).
    max_bin, truncation_level :
        LightGBM's ``max_bin`` (histogram bins per feature) and
        ``lambdarank_truncation_level`` (positions of a query's ranking whose pairs the
        gradient looks at).
    n_estimators, learning_rate, num_leaves, min_data_in_leaf, early_stopping_rounds :
        LightGBM lambdarank settings (the most trees; early stopping on validation NDCG@10).
    feature_fraction, bagging_fraction, lambda_l2, min_sum_hessian_in_leaf :
        LightGBM's regularisation: the share of features each tree sees, the share of
        training rows each tree sees (a seeded sample per tree), the L2 penalty on leaf values
        and the least summed hessian of a leaf. The defaults are LightGBM's (none of them).
    num_threads : int
        LightGBM and implicit threads.
    seed : int
        Seeds the query sample, the validation split and LightGBM.
    drop_features : list of str
        Features the learner never sees (set to missing in training and scoring: trees
        cannot split on an all-missing column, so serving needs no change). For ablations.
    """

    n_rebuy: int = 100
    n_cooccurrence: int = 100
    n_cf: int = 30
    n_category: int = 30
    n_popular: int = 30
    neighbours: int = 200
    cf_neighbours: int = 100
    knn_user_depth: int = 200
    half_life_days: float = 90.0
    train_windows: int = 1
    window_days: int = 28
    train_split: Literal["time", "stratified"] = "time"
    count_features: Literal["raw", "shares"] = "raw"
    train_ratio: float = 0.75
    train_queries: int = 5000
    valid_fraction: float = 0.2
    negative_fraction: float = 1.0
    max_bin: int = 255
    truncation_level: int = 30
    n_estimators: int = 300
    learning_rate: float = 0.05
    num_leaves: int = 63
    min_data_in_leaf: int = 50
    early_stopping_rounds: int = 30
    feature_fraction: float = 1.0
    bagging_fraction: float = 1.0
    lambda_l2: float = 0.0
    min_sum_hessian_in_leaf: float = 1e-3
    num_threads: int = 1
    seed: int = 42
    drop_features: list[str] = field(default_factory=list)
    kind = "ranker"
    exportable: ClassVar[bool] = True

    def __post_init__(self) -> None:
        for name in ("n_rebuy", "n_cooccurrence", "n_cf", "n_category", "n_popular",
                     "neighbours", "train_queries", "knn_user_depth"):  # fmt: skip
            if getattr(self, name) < 0:
                raise ParamError(name, f"must be >= 0, got {getattr(self, name)}")
        for name in ("cf_neighbours", "train_windows", "window_days", "n_estimators",
                     "num_leaves", "min_data_in_leaf", "early_stopping_rounds", "max_bin",
                     "truncation_level"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ParamError(name, f"must be >= 1, got {getattr(self, name)}")
        if not self.half_life_days > 0:
            raise ParamError("half_life_days", f"must be > 0, got {self.half_life_days}")
        if self.train_split not in ("time", "stratified"):
            raise ParamError(
                "train_split", f"must be 'time' or 'stratified', got {self.train_split!r}"
            )
        if self.count_features not in ("raw", "shares"):
            raise ParamError(
                "count_features", f"must be 'raw' or 'shares', got {self.count_features!r}"
            )
        if not 0 < self.train_ratio < 1:
            raise ParamError("train_ratio", f"must be in (0, 1), got {self.train_ratio}")
        if not 0 < self.negative_fraction <= 1:
            raise ParamError(
                "negative_fraction", f"must be in (0, 1], got {self.negative_fraction}"
            )
        if not 0 <= self.valid_fraction < 1:
            raise ParamError("valid_fraction", f"must be in [0, 1), got {self.valid_fraction}")
        for name in ("feature_fraction", "bagging_fraction"):
            if not 0 < getattr(self, name) <= 1:
                raise ParamError(name, f"must be in (0, 1], got {getattr(self, name)}")
        for name in ("lambda_l2", "min_sum_hessian_in_leaf"):
            if not getattr(self, name) >= 0:
                raise ParamError(name, f"must be >= 0, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ParamError("learning_rate", f"must be > 0, got {self.learning_rate}")
        if self.num_threads < 0:
            raise ParamError("num_threads", f"must be >= 0 (0 = all cores), got {self.num_threads}")
        unknown = sorted(set(self.drop_features) - set(FEATURE_NAMES))
        if unknown:
            raise ParamError("drop_features", f"unknown features {unknown}; see FEATURES")
        self._dropped = [FEATURE_NAMES.index(name) for name in self.drop_features]
        self._new_to_user = False
        self._state: FeatureState | None = None
        self._booster: Any = None

    # -- stage 1 and features: serving.ranker_features, shared with the serving scorer ---------
    def candidate_pool(
        self,
        users: np.ndarray,
        carts: sp.csr_matrix,
        exclude_owned: bool = False,
        state: FeatureState | None = None,
    ) -> sp.csr_matrix:
        """The candidates of each query (see :class:`QueryBatch`.pool); never a cart item,
        nor with ``exclude_owned`` an item the user has."""
        return self.query_batch(users, carts, exclude_owned, state).pool

    def query_batch(
        self,
        users: np.ndarray,
        carts: sp.csr_matrix,
        exclude_owned: bool = False,
        state: FeatureState | None = None,
    ) -> QueryBatch:
        """Candidates of each query and the :data:`FEATURES` of every (query, candidate):
        :func:`serving.ranker_features.query_features`, the code the served model runs."""
        st = state or self.state_
        carts = sp.csr_matrix(carts)
        carts.sum_duplicates()
        q = query_features(st, np.asarray(users, dtype=np.int64), carts.indptr, carts.indices,
                           exclude_owned)  # fmt: skip
        pool = sp.csr_matrix((q.sources, q.items, q.indptr), shape=(len(users), st.n_items))
        return QueryBatch(pool, q.rows, q.items, q.features)

    # -- training -----------------------------------------------------------------------
    def _fit(self, data: Dataset) -> None:
        ts = data.interactions["timestamp"]
        end = ts.max()
        rng = np.random.default_rng(self.seed)
        #: Per training window: its bounds, the history's and the queries' external basket
        #: ids actually used, candidate recall per task (not persisted; the leakage test).
        self.training_log: list[dict[str, Any]] = []
        clock = _StageClock()
        windows = self._training_windows(data, end)
        # Every window's queries (and so the validation baskets) before any feature row: the
        # training rows are then negative-sampled chunk by chunk as they are built, so the rows
        # of all the windows' baskets (GBs at 4x a CJ-sized shop) never exist at once.
        chosen: list[list[tuple[RankingTask, np.ndarray]]] = []
        for _, _, history, window in windows:
            chosen.append([])
            sample = None
            for new in (False, True):
                task = basket_completion_task(history, window, seed=self.seed, new_to_user=new)
                if task.n_queries == 0:
                    continue
                if sample is None and self.train_queries and task.n_queries > self.train_queries:
                    picked = rng.choice(task.query_ids, self.train_queries, replace=False)
                    sample = set(picked.tolist())
                pick = (
                    np.arange(task.n_queries)
                    if sample is None
                    else np.flatnonzero(np.isin(task.query_ids, list(sample)))
                )
                chosen[-1].append((task, pick))
        if not any(chosen):
            raise ParamError("train_windows", "the training windows hold no usable basket")
        all_baskets = np.unique(np.concatenate([t.query_ids[k] for c in chosen for t, k in c]))
        valid_baskets = all_baskets[rng.random(all_baskets.size) < self.valid_fraction]
        # one stream over the training rows in order: the rows sample_negatives would keep
        negatives = np.random.default_rng([self.seed, 2]) if self.negative_fraction < 1 else None
        clock.lap("queries")
        parts, empty_cart = self._window_rows(windows, chosen, valid_baskets, negatives, clock)
        # The windows' histories (near-copies of train, with their matrices), states and
        # queries are done with: not held through the learner and the final statistics.
        del windows, chosen
        self.training_windows_ = [
            {"start": str(w["start"]), "stop": None if w["stop"] is None else str(w["stop"]),
             "history_baskets": int(w["history_baskets"].size),
             "query_baskets": int(w["query_baskets"].size), "candidate_recall": w["recall"]}
            for w in self.training_log
        ]  # fmt: skip
        booster, self.validation_ = self._train_learner(parts, valid_baskets)
        clock.lap("learner")
        self.validation_["empty_cart"] = empty_cart
        #: 1: an empty cart is ranked by plain basket counts, 0: by decayed counts.
        self.empty_cart_counts_ = int(self.validation_["empty_cart"]["counts_wins"])
        #: Bits (serving.ranker_features.POPULARITY_TASK_BITS) of the tasks whose carts are
        #: ranked by popularity: it beat the trees on the validation queries.
        self.popularity_tasks_ = _popularity_tasks(self.validation_)
        self.booster_model_ = booster.model_to_string()
        self._booster = booster
        self._set_state(FeatureState.fit(data, np.datetime64(end, "us"), self))
        clock.lap("final_statistics")
        #: Wall and CPU seconds of each stage of the last fit (where the fit time goes).
        self.fit_stages_ = clock.stages

    def _window_rows(
        self,
        windows: list[tuple[Any, Any, Dataset, Dataset]],
        chosen: list[list[tuple[RankingTask, np.ndarray]]],
        valid_baskets: np.ndarray,
        negatives: np.random.Generator | None,
        clock: _StageClock,
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The training rows of each window's chosen queries (:meth:`_training_rows`, one
        part per task, appended to ``training_log``), each part's validation NDCG@10 when
        ranked by popularity (:func:`_popularity_ndcg`), and the last window's empty-cart
        choice (:func:`_empty_cart_choice`). Each window's statistics live only while its
        rows are built: everything that reads them is done here."""
        parts: list[dict[str, Any]] = []
        empty_cart: dict[str, Any] = {}
        for w, ((start, stop, history, window), tasks) in enumerate(
            zip(windows, chosen, strict=True)
        ):
            state = FeatureState.fit(history, np.datetime64(start, "us"), self)
            clock.lap("window_statistics")
            log: dict[str, Any] = {
                "start": start, "stop": stop, "history_baskets": state.basket_ids,
                "query_baskets": [], "recall": {},
            }  # fmt: skip
            for task, pick in tasks:
                part = self._training_rows(task, pick, state, valid_baskets, negatives)
                clock.lap("candidates_features")
                part["popularity_ndcg"] = _popularity_ndcg(task, pick, state, valid_baskets)
                clock.lap("popularity_validation")
                log["recall"][task.name] = part.pop("recall")
                log["query_baskets"].append(part["baskets"])
                parts.append(part)
            log["query_baskets"] = np.unique(np.concatenate(log["query_baskets"]))
            self.training_log.append(log)
            if w == len(windows) - 1:  # the newest window's, while its statistics exist
                empty_cart = _empty_cart_choice(state, window)
        return parts, empty_cart

    def _training_windows(self, data: Dataset, end: Any) -> list[tuple[Any, Any, Dataset, Dataset]]:
        """``(start, stop, history, window)`` of each training window (module docstring): the
        last ``train_windows`` x ``window_days`` of ``data`` (``train_split: time``), or one
        seeded per-user random ``train_ratio`` split of it, the rule of a stratified split
        (``train_split: stratified``; ``start`` = the history's last time, ``stop`` None)."""
        if self.train_split == "stratified":
            from features.splits import stratified_split

            split = stratified_split(data, self.train_ratio, seed=self.seed)
            history, window = split.train, split.test
            return [(history.interactions["timestamp"].max(), None, history, window)]
        bounds = [
            end - timedelta(days=self.window_days * k) for k in range(self.train_windows, 0, -1)
        ]
        out = []
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
            out.append((start, stop, history, window))
        return out

    # -- learned state as plain attributes (training.persistence stores them) -------------
    def _set_state(self, state: FeatureState) -> None:
        for key in [k for k in vars(self) if k.startswith("state_") and k.endswith("_")]:
            delattr(self, key)
        for key, value in state.to_arrays().items():
            setattr(self, f"state_{key}_", value)
        self._state = state

    @property
    def state_(self) -> FeatureState:
        """The statistics of all of train (rebuilt from the stored attributes after loading)."""
        if self._state is None:
            fields = {k[len("state_") : -1]: v for k, v in vars(self).items()
                      if k.startswith("state_") and k.endswith("_")}  # fmt: skip
            self._state = FeatureState.from_arrays(fields)
        return self._state

    @property
    def booster(self) -> Any:
        """The LightGBM booster (rebuilt from ``booster_model_`` after loading)."""
        if self._booster is None:
            import lightgbm as lgb

            self._booster = lgb.Booster(model_str=self.booster_model_)
        return self._booster

    def _training_rows(
        self,
        task: RankingTask,
        pick: np.ndarray,
        state: FeatureState,
        valid_baskets: np.ndarray,
        negatives: np.random.Generator | None = None,
        chunk: int = 2048,
    ) -> dict[str, Any]:
        """Features and labels of the chosen queries of ``task``, split into the training
        queries (``X``, ``y``, ``group``) and those of ``valid_baskets`` (``Xv``, ``yv``,
        ``gv``, ``nv_relevant``: held-out items per query); queries without a held-out item in
        their pool are dropped (no ranking signal). With ``negatives`` (a generator drawn once
        per training row, in order) each training negative is kept with chance
        ``negative_fraction``: the rows :func:`sample_negatives` keeps from them all."""
        keys = ("X", "Xv", "y", "group", "yv", "gv", "nv_relevant", "baskets")
        out: dict[str, list[np.ndarray]] = {key: [] for key in keys}
        recalls = []
        for lo in range(0, pick.size, chunk):
            q = pick[lo : lo + chunk]
            batch = self.query_batch(task.users[q], task.carts[q], task.exclude_owned, state)
            relevant = task.relevant[q]
            recalls.append((candidate_recall(batch.pool, relevant), relevant.nnz))
            y = _sample(relevant, batch.rows, batch.cols) > 0
            sizes = np.diff(batch.pool.indptr)
            positives = np.bincount(batch.rows, weights=y, minlength=q.size)
            useful = (positives > 0) & (sizes > positives)
            is_valid = np.isin(task.query_ids[q], valid_baskets)
            out["baskets"].append(task.query_ids[q][useful])
            for side, queries in ((False, useful & ~is_valid), (True, useful & is_valid)):
                keep = queries[batch.rows]
                xs, ys, group = batch.features[keep], y[keep].astype(np.float32), sizes[queries]
                if not side and negatives is not None:
                    xs, ys, group = sample_negatives(xs, ys, group, self.negative_fraction,
                                                     negatives)  # fmt: skip
                out["Xv" if side else "X"].append(xs)
                out["yv" if side else "y"].append(ys)
                out["gv" if side else "group"].append(group)
            out["nv_relevant"].append(np.diff(relevant.indptr)[useful & is_valid])
        total = sum(n for _, n in recalls)
        # the feature rows stay chunks: LightGBM bins a list of arrays without joining them
        part: dict[str, Any] = {key: np.concatenate(out[key]) for key in keys[2:]}
        part["X"] = [self._without_dropped(x) for x in out.pop("X") if x.shape[0]]
        part["Xv"] = [self._without_dropped(x) for x in out.pop("Xv") if x.shape[0]]
        part.update(task=task.name, all_baskets=task.query_ids[pick],
                    recall=sum(r["micro"] * n for r, n in recalls) / max(total, 1))  # fmt: skip
        return part

    def _train_learner(
        self, parts: list[dict[str, Any]], valid_baskets: np.ndarray
    ) -> tuple[Any, dict[str, Any]]:
        import lightgbm as lgb

        y, group = (np.concatenate([p.pop(key) for p in parts]) for key in ("y", "group"))
        if group.size == 0:
            raise ParamError("train_windows", "the training windows hold no usable basket")
        params = {
            "objective": "lambdarank", "metric": "ndcg", "eval_at": [10],
            "learning_rate": self.learning_rate, "num_leaves": self.num_leaves,
            "min_data_in_leaf": self.min_data_in_leaf, "seed": self.seed,
            "deterministic": True, "force_row_wise": True, "num_threads": self.num_threads,
            "max_bin": self.max_bin, "lambdarank_truncation_level": self.truncation_level,
            "feature_fraction": self.feature_fraction, "lambda_l2": self.lambda_l2,
            "min_sum_hessian_in_leaf": self.min_sum_hessian_in_leaf, "verbosity": -1,
        }  # fmt: skip
        if self.bagging_fraction < 1:  # LightGBM bags only with a frequency; seeded by ``seed``
            params.update(bagging_fraction=self.bagging_fraction, bagging_freq=1)
        # The Dataset holds the only reference to the feature rows (chunks, never joined):
        # LightGBM drops them once it has binned them (free_raw_data), before the trees grow.
        train_set = lgb.Dataset([x for p in parts for x in p.pop("X")], y, group=group,
                                feature_name=list(FEATURE_NAMES))  # fmt: skip
        valid = {"train_queries": int(group.size), "train_rows": int(group.sum())}
        Xv = [x for p in parts for x in p.pop("Xv")]
        yv, gv = (np.concatenate([p[key] for p in parts]) for key in ("yv", "gv"))
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
            raw = np.concatenate([booster.predict(x, num_threads=self.num_threads) for x in Xv])
            valid.update(self._full_validation(raw, parts, valid_baskets))
            valid["calibration"] = calibrate(raw, yv, gv, self.seed)
        return booster, valid

    def _full_validation(
        self, raw: np.ndarray, parts: list[dict[str, Any]], valid_baskets: np.ndarray
    ) -> dict[str, float]:
        """NDCG@10 per task on the validation baskets against the *whole* held-out part: a
        held-out item outside the pool is a miss and a query whose pool holds none scores 0,
        as in the evaluation (the number to compare settings by; LightGBM's own NDCG sees
        only the pool); beside it the same queries ranked by popularity (each part's
        ``popularity_ndcg``). ``raw``: the model's scores of the parts' validation rows, in
        order."""
        out: dict[str, float] = {}
        discount = 1.0 / np.log2(np.arange(2, 12))
        windows = len(parts) // 2 or 1
        offset = 0
        for p in parts:
            sizes = p["gv"]
            raw_all, labels = raw[offset : offset + sizes.sum()], p["yv"]
            offset += int(sizes.sum())
            n_valid = int(np.isin(p["all_baskets"], valid_baskets).sum())
            if n_valid == 0:
                continue
            starts = np.cumsum(sizes) - sizes
            total = 0.0
            for g, (lo, n) in enumerate(zip(starts, sizes, strict=True)):
                top = np.argsort(-raw_all[lo : lo + n], kind="stable")[:10]
                dcg = float((labels[lo : lo + n][top] * discount[: top.size]).sum())
                n_rel = int(p["nv_relevant"][g])
                total += dcg / float(discount[: min(n_rel, 10)].sum())
            key = f"{p['task']}_ndcg_at_10"
            out[key] = out.get(key, 0.0) + total / n_valid / windows
            key = f"{p['task']}_popularity_ndcg_at_10"
            out[key] = out.get(key, 0.0) + p["popularity_ndcg"] / windows
        return out

    # -- export: the state arrays + the trees as ONNX (serving.ranker_scorer runs them) ------
    def tree_onnx(self) -> Any:
        """The trees (up to the best iteration) and the calibration as one ONNX model.

        Input ``features`` float32 [N, len(FEATURES)] (NaN = missing); outputs ``raw``
        float32 [N, 1] (:meth:`predict_pairs`) and ``probability`` float32 [N, 1]
        (:meth:`predict_proba`: ``sigmoid(a * raw + b)``, the Platt parameters of
        ``validation_["calibration"]``). The trees are an ``ai.onnx.ml`` TreeEnsembleRegressor
        written by onnxmltools; onnxruntime runs it.
        """
        import lightgbm as lgb
        import onnx
        from onnx import TensorProto, helper
        from onnxmltools import convert_lightgbm
        from onnxmltools.convert.common.data_types import FloatTensorType

        best = self.validation_.get("best_iteration") or None
        booster = lgb.Booster(model_str=self.booster.model_to_string(num_iteration=best))
        # target_opset 15: the newest onnxmltools 1.16 accepts.
        model = convert_lightgbm(
            booster, initial_types=[("features", FloatTensorType([None, len(FEATURES)]))],
            target_opset=15, zipmap=False,
        )  # fmt: skip
        graph = model.graph
        tree_out = graph.output[0].name
        cal = self.validation_.get("calibration") or {"a": 1.0, "b": 0.0}
        graph.initializer.extend([
            helper.make_tensor("platt_a", TensorProto.FLOAT, [], [cal["a"]]),
            helper.make_tensor("platt_b", TensorProto.FLOAT, [], [cal["b"]]),
        ])  # fmt: skip
        graph.node.extend([
            helper.make_node("Identity", [tree_out], ["raw"], name="raw_out"),
            helper.make_node("Mul", ["raw", "platt_a"], ["platt_ax"], name="platt_mul"),
            helper.make_node("Add", ["platt_ax", "platt_b"], ["platt_z"], name="platt_add"),
            helper.make_node("Sigmoid", ["platt_z"], ["probability"], name="platt_sigmoid"),
        ])  # fmt: skip
        del graph.output[:]
        graph.output.extend([
            helper.make_tensor_value_info("raw", TensorProto.FLOAT, [None, 1]),
            helper.make_tensor_value_info("probability", TensorProto.FLOAT, [None, 1]),
        ])  # fmt: skip
        from training.onnx_graph import OPSET

        # onnxmltools declares the default domain at opset 8; the nodes it and we use are the
        # same in the exporter's opset, which the manifest's "onnx_opset" then states truly.
        for entry in model.opset_import:
            if entry.domain in ("", "ai.onnx"):
                entry.version = OPSET
        _round_thresholds_down(model, booster)
        onnx.checker.check_model(model, full_check=True)
        return model

    def export_parts(self, head: int | None = None) -> Any:
        """The ranker's artifact parts (scorer ``ranker``): the trees (:meth:`tree_onnx`) as
        ``model.onnx``, the statistics of all of train as ``ranker_state.npz``
        (:meth:`serving.ranker_features.RankerState.to_arrays`), the feature names and the
        calibration in the manifest. Items keep the training order."""
        from training.artifact_writer import ArtifactParts

        self._check_fitted()
        cal = self.validation_.get("calibration") or {"a": 1.0, "b": 0.0}
        return ArtifactParts(
            onnx=self.tree_onnx(), order=np.arange(self.n_items_), head=self.n_items_,
            scorer="ranker", arrays={"ranker_state.npz": self.state_.to_arrays()},
            manifest={"ranker": {"features": list(FEATURE_NAMES),
                                 "calibration": {"a": cal["a"], "b": cal["b"]},
                                 "popularity_fallback": True}},
        )  # fmt: skip

    # -- scoring ------------------------------------------------------------------------
    def _without_dropped(self, features: np.ndarray) -> np.ndarray:
        """``features`` with the ``drop_features`` columns missing (NaN)."""
        if not self._dropped:
            return features
        out = features.copy()
        out[:, self._dropped] = np.nan
        return out

    def predict_pairs(self, features: np.ndarray) -> np.ndarray:
        """The learner's raw score of feature rows (float64)."""
        if features.shape[0] == 0:
            return np.zeros(0, dtype=np.float64)
        best = self.validation_.get("best_iteration") or None
        return self.booster.predict(
            self._without_dropped(features), num_iteration=best, num_threads=self.num_threads
        )

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
            for q in np.flatnonzero(known):
                items, decayed = st.rebuy_scores(int(users[q]))
                out[q, items] += decayed
        filled = np.flatnonzero(~empty)
        if filled.size and not st.ranks_by_popularity(self._new_to_user):
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
        task the model scores for (``task_new_to_user``) and the candidate pool.

        Queries with a cart are ranked from their pool alone (:meth:`_recommend_pools`), and
        those without one from the household's re-buy items and the catalog's tie-break order
        (:meth:`_recommend_empty`), not from dense catalog-wide rows: the same items and
        scores as the base class's ``top_k`` of :meth:`score` (tested), without a (queries x
        catalog) array per batch."""
        self._new_to_user = bool(candidates is not None and candidates.exclude_owned)
        try:
            users = np.asarray(users, dtype=np.int64)
            if carts is None or k < 1 or carts.shape != (users.size, self.n_items_):
                return super().recommend(users, carts, k, candidates, batch_size)
            carts = sp.csr_matrix(carts)
            filled = np.diff(carts.indptr) > 0
            items = np.full((users.size, k), -1, dtype=np.int32)
            scores = np.full((users.size, k), -np.inf, dtype=np.float32)
            for rows, rank in ((np.flatnonzero(~filled), self._recommend_empty),
                               (np.flatnonzero(filled), self._recommend_pools)):  # fmt: skip
                if rows.size:
                    items[rows], scores[rows] = rank(
                        users[rows], carts[rows], k, candidates, batch_size
                    )
            return items, scores
        finally:
            self._new_to_user = False

    def _recommend_empty(
        self,
        users: np.ndarray,
        carts: sp.csr_matrix,
        k: int,
        candidates: CandidateFilter | None,
        batch_size: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`recommend` of queries whose carts are all empty, O(history + k) each: the
        household's allowed re-buy items (``TIE_BREAK x popularity`` plus their re-buy score,
        :meth:`RankerState.rebuy_scores`) and the first allowed others in
        ``TIE_BREAK x popularity`` order (:func:`serving.ranker_features.rebuy_ranking`, what
        serving runs) — exactly :meth:`score`'s empty-cart row through ``top_k`` (ties: the
        lower item index)."""
        self._check_fitted()
        st = self.state_
        cand = candidates or CandidateFilter()
        n, n_items = users.size, self.n_items_
        k_eff = min(k, n_items)
        blocked = cand.static_mask(n_items)
        key = (TIE_BREAK * st.popularity).astype(np.float32)  # score()'s empty-cart row
        order = np.lexsort((np.arange(n_items), -key))
        owned = owned_rows(self.owned_, users) if cand.exclude_owned else None
        none = np.zeros(0, dtype=np.int64)
        out_items = np.full((n, k), -1, dtype=np.int32)
        out_scores = np.full((n, k), -np.inf, dtype=np.float32)
        for q, user in enumerate(users.tolist()):
            # the cross-sell task: nothing the household bought
            mine = none if owned is None else owned.indices[owned.indptr[q] : owned.indptr[q + 1]]

            def allowed(items: np.ndarray, mine: np.ndarray = mine) -> np.ndarray:
                return ~blocked[items] & ~np.isin(items, mine)

            best, scores, _ = rebuy_ranking(st, int(user), allowed, k_eff, key, order)
            out_items[q, : best.size], out_scores[q, : best.size] = best, scores
        return out_items, out_scores

    def _recommend_pools(
        self,
        users: np.ndarray,
        carts: sp.csr_matrix,
        k: int,
        candidates: CandidateFilter | None,
        batch_size: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`recommend` of queries whose carts are all non-empty: each query's allowed
        candidates by model score, then (a short pool) the allowed non-candidates by
        ``FLOOR + popularity`` — exactly the order of :meth:`score` (candidates sit above
        ``FLOOR + 2``, every other item at most ``FLOOR + 1``; ties: the lower item index)."""
        from training.progress import bar

        self._check_fitted()
        st = self.state_
        cand = candidates or CandidateFilter()
        n, n_items = users.size, self.n_items_
        k_eff = min(k, n_items)
        blocked = cand.static_mask(n_items)
        fill_score, fill = popularity_fill(st.popularity)  # score()'s non-candidates
        fill = fill[~blocked[fill]]
        out_items = np.full((n, k), -1, dtype=np.int32)
        out_scores = np.full((n, k), -np.inf, dtype=np.float32)
        pbar = bar(total=n, desc="ranking", unit="query")
        for lo in range(0, n, batch_size):
            hi = min(lo + batch_size, n)
            u, c = users[lo:hi], carts[lo:hi]
            if st.ranks_by_popularity(self._new_to_user):  # no candidates: the popular fill
                none = np.zeros(0, dtype=np.int64)
                batch = QueryBatch(sp.csr_matrix((hi - lo, n_items), dtype=np.int8), none, none,
                                   np.zeros((0, len(FEATURES)), dtype=np.float32))  # fmt: skip
            else:
                batch = self.query_batch(u, c, self._new_to_user, st)
            value = np.maximum(self.predict_pairs(batch.features), FLOOR + 2.0).astype(np.float32)
            ok = ~blocked[batch.cols]  # the pool never holds the cart nor, if excluded, owned items
            rows, cols, value = batch.rows[ok], batch.cols[ok], value[ok]
            order = np.lexsort((cols, -value, rows))
            rows, cols, value = rows[order], cols[order], value[order]
            rank = np.arange(rows.size) - np.searchsorted(rows, rows, side="left")
            top = rank < k_eff
            out_items[lo + rows[top], rank[top]] = cols[top]
            out_scores[lo + rows[top], rank[top]] = value[top]
            have = np.bincount(rows, minlength=hi - lo)
            short = np.flatnonzero(have < k_eff)
            if short.size:
                skip = [batch.pool[short].tocsr()]
                if cand.exclude_cart:
                    skip.append(c[short])
                if cand.exclude_owned:
                    skip.append(owned_rows(self.owned_, u[short]))
                skip_rows = sp.csr_matrix(sum(sp.csr_matrix(m, dtype=np.float32) != 0
                                              for m in skip))  # fmt: skip
                for j, q in enumerate(short):
                    taken = skip_rows.indices[skip_rows.indptr[j] : skip_rows.indptr[j + 1]]
                    need = k_eff - int(have[q])
                    head = fill[: need + taken.size]
                    head = head[~np.isin(head, taken)][:need]
                    slots = np.arange(have[q], have[q] + head.size)
                    out_items[lo + q, slots] = head
                    out_scores[lo + q, slots] = fill_score[head]
            pbar.update(hi - lo)
        pbar.close()
        return out_items, out_scores
