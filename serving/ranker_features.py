"""The learned add-on ranker's candidates and features: the ONE module training and serving share.

``training/models/ranker.py`` (``kind: ranker``) fits a :class:`RankerState` and trains its
trees on :func:`query_features`' output; the exported artifact ships the same state
(``ranker_state.npz``) and the serving scorer calls the same function, so a (query,
candidate) pair gets bit-identical features on both sides (tested). numpy only: serving
never imports training, scipy, implicit, lightfm or mlflow.

**Candidates** per query (a user, who may be unknown = -1, and a cart): the union of

- ``rebuy``: the user's first ``n_rebuy`` items by recency-decayed purchase count;
- ``cooccurrence``: the first ``n_cooccurrence`` items by summed confidence of the cart's
  co-occurrence rules (``cooc_sum_conf``);
- ``cf``: the first ``n_cf`` items by summed cosine similarity to the user's items and the
  cart (``knn_score``);
- ``category``: the ``n_category`` best-sellers of the cart items' sub-categories;
- ``popular``: the ``n_popular`` items with the most history baskets in the last
  ``window_days`` before ref (``item_baskets * item_recent_share``; ties: the lower item
  index): a fixed list, the only source that needs neither history nor categories (new
  items to a household on data without sub-categories or re-buys, e.g. MovieLens).

The cart, and with ``exclude_owned`` the user's items, are removed *before* each source takes
its top N, so no slot goes to an item that cannot be offered. Ties: the lower item index.

**Features**: :data:`FEATURES` is the one place each is defined (name, definition, source),
in the model's column order. "History" is the rows the state was fitted on, "ref" its end
(``days_since_last`` is relative to the end of train, also when serving); NaN means
undefined (the trees route it as missing). With the state's ``count_shares`` (model parameter
``count_features: shares``; 0 = raw counts, the default and what an older state means) the
counts named in :data:`COUNT_SHARES` are divided by the history's total, so their scale does
not depend on how much history the state was fitted on.

**State** (:class:`RankerState`): plain arrays, int32 item indices, float32 values, CSR
layout (``*_indptr`` int64 rows, ``*_items`` int32 columns); the cosine similarities and
their per-user sums are float16 (half the bytes; training reads the same rounded values, so
parity is exact):

- user x item table by user: ``ui_n`` (baskets), ``ui_decayed``, ``ui_rank``,
  ``ui_days_since``, ``ui_interval``; per-user basket lines per sub-category / category;
- per item: category codes (int32, -1 = unknown), price (NaN = unknown), basket and buyer
  counts, repeat rate, recent share, rank in its sub-category, popularity share;
- neighbour lists: each item's ``neighbours`` most frequent co-occurrence partners with the
  basket count (``co_*``), each item's cosine neighbours (``sim_*``);
- the per-user item-KNN table (``knn_user_depth`` > 0): the summed cosine rows of the user's
  history at the user's own items (``ui_knn``) and at its ``knn_user_depth`` best other items
  (``uk_*``), so a request reads a few hundred entries instead of history x neighbours
  (:func:`_knn_entries`; an older state has none and sums the rows per query).

Everything else (lookup keys, confidences, the category best-seller lists) is derived from
these arrays by :meth:`RankerState.__post_init__`, identically on both sides.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from serving.scorers import best_allowed
from serving.sorted_arrays import csr_entries, in_sorted, lookup_sorted, segments
from serving.topk import top_k

__all__ = [
    "FEATURES",
    "FEATURE_NAMES",
    "FLOOR",
    "POPULARITY_TASK_BITS",
    "SOURCES",
    "Feature",
    "QueryCandidates",
    "QueryFeatures",
    "RankerState",
    "StateError",
    "candidate_features",
    "popularity_fill",
    "query_candidates",
    "query_features",
    "reasons",
    "rebuy_ranking",
]


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
    Feature("user_baskets", "the user's history baskets (count_shares: / history baskets); NaN for an unknown user", "user"),
    Feature("user_items", "distinct items the user bought (count_shares: / history baskets); NaN for an unknown user", "user"),
    Feature("user_subcategory_share", "share of the user's basket lines in the item's sub-category; NaN for an unknown user", "user x category"),
    Feature("user_category_share", "share of the user's basket lines in the item's category; NaN for an unknown user", "user x category"),
    Feature("cooc_sum_conf", "sum over cart items i of conf(i -> j)", "cart x item"),
    Feature("cooc_max_conf", "max over cart items i of conf(i -> j)", "cart x item"),
    Feature("cooc_max_count", "max over cart items i of co(i, j) (count_shares: / history baskets)", "cart x item"),
    Feature("cooc_max_lift", "max over cart items i of conf(i -> j) / (baskets(j) / history baskets)", "cart x item"),
    Feature("cooc_n_cart", "cart items i with a rule i -> j", "cart x item"),
    Feature("cooc_rank", "rank of the item in the query's list by cooc_sum_conf (1 = first) among the items that may be offered; NaN without a rule or beyond RANK_DEPTH", "cart x item"),
    Feature("knn_score", "sum over the user's history items and cart items i of cosine sim(i, j); with knn_user_depth > 0 the history part counts only at the user's items and its knn_user_depth best others (the state's table), else 0", "user/cart x item"),
    Feature("knn_rank", "rank of the item in the query's list by knn_score among the items that may be offered; NaN if 0 or beyond RANK_DEPTH", "user/cart x item"),
    Feature("cart_same_subcategory", "share of cart items in the item's sub-category (unknown sub-category: 0)", "cart x item"),
    Feature("cart_same_category", "share of cart items in the item's category", "cart x item"),
    Feature("cart_same_department", "share of cart items in the item's department", "cart x item"),
    Feature("cart_size", "items in the cart", "cart"),
    Feature("item_baskets", "history baskets holding the item (count_shares: / history baskets)", "item"),
    Feature("item_users", "distinct history buyers of the item (count_shares: / users with a history basket)", "item"),
    Feature("item_repeat_rate", "share of the item's buyers who bought it in >= 2 baskets; NaN without buyers", "item"),
    Feature("item_recent_share", "share of item_baskets in the last window_days before ref; NaN without baskets", "item"),
    Feature("item_subcategory_rank", "rank of the item by item_baskets inside its sub-category (1 = most bought)", "item"),
    Feature("price", "the item's price; NaN if unknown", "item"),
    Feature("price_ratio_cart", "price / mean price of the cart items with a known price; NaN if undefined", "cart x item"),
    Feature("task_new_to_user", "1 when the user's items are excluded (cross-sell task), else 0", "query"),
)  # fmt: skip
FEATURE_NAMES: tuple[str, ...] = tuple(f.name for f in FEATURES)
_COL = {name: k for k, name in enumerate(FEATURE_NAMES)}

#: Candidate sources, as bits of a candidate's ``sources`` value.
SOURCES = {"rebuy": 1, "cooccurrence": 2, "cf": 4, "category": 8, "popular": 16}
#: Ranks (cooc_rank, knn_rank) are positions in the first RANK_DEPTH items of a list, else NaN.
RANK_DEPTH = 200
#: Queries whose dense item rows are built at once (memory: a few CHUNK x touched-items
#: arrays). Fewer queries touch fewer items (the rows span only those, see _chunk): on Complete
#: Journey training batches 32 took 0.72x the CPU of 128 (benchmarks/bench_ranker_features.py).
CHUNK = 32
#: Up to this many queries (a request) the candidates and features are kept as short lists of
#: the touched items, ranked per query by partial sorts; above it, as dense (queries x items)
#: rows (a training batch). Both give the same values bit for bit (same float64 sums in the
#: same order, same tie rule; tested).
SPARSE_MAX_QUERIES = 4
#: A request's per-source sums go through np.unique (a sort of the entries) instead of a
#: catalog-wide bincount when entries * UNIQUE_SUM_RATIO < queries * n_items: a few hundred
#: co-occurrence entries then cost ~20 us instead of ~400 (the same float64 sums, in input
#: order per item either way, so bit-identical).
UNIQUE_SUM_RATIO = 30


class StateError(ValueError):
    """A ranker state array is missing or of the wrong dtype / shape."""


# Array fields of the state and their dtypes; a leading "n" dimension is checked in
# RankerState.__post_init__ (users / items / entries of the CSR it belongs to).
_ARRAYS: dict[str, Any] = {
    "ui_indptr": np.int64, "ui_items": np.int32, "ui_n": np.float32, "ui_decayed": np.float32,
    "ui_rank": np.float32, "ui_days_since": np.float32, "ui_interval": np.float32,
    "user_baskets": np.float32, "user_items": np.float32, "user_lines": np.float32,
    "usub_indptr": np.int64, "usub_codes": np.int32, "usub_counts": np.float32,
    "ucat_indptr": np.int64, "ucat_codes": np.int32, "ucat_counts": np.float32,
    "department": np.int32, "category": np.int32, "subcategory": np.int32,
    "price": np.float32, "item_baskets": np.float32, "item_users": np.float32,
    "item_repeat_rate": np.float32, "item_recent_share": np.float32,
    "item_subcategory_rank": np.float32, "popularity": np.float32,
    "co_indptr": np.int64, "co_items": np.int32, "co_count": np.float32,
    "sim_indptr": np.int64, "sim_items": np.int32, "sim_values": np.float16,
    "ui_knn": np.float16, "uk_indptr": np.int64, "uk_items": np.int32, "uk_values": np.float16,
}  # fmt: skip
_SCALARS = ("n_users", "n_items", "n_baskets", "n_rebuy", "n_cooccurrence", "n_cf", "n_category",
            "n_popular", "empty_cart_counts", "count_shares", "knn_user_depth",
            "popularity_tasks")  # fmt: skip
#: Scalars added after the first exported artifacts, with the value an older state means.
_SCALAR_DEFAULTS = {"n_popular": 0, "empty_cart_counts": 0, "count_shares": 0,
                    "knn_user_depth": 0, "popularity_tasks": 0}  # fmt: skip
#: Bits of ``popularity_tasks``: the tasks whose carts the model ranks by popularity instead of
#: by its trees, because on its own validation queries popularity ranked them better.
POPULARITY_TASK_BITS = {False: 1, True: 2}  # keyed by exclude_owned
#: Score of an item outside the candidate pool (plus its popularity share in [0, 1]); the
#: model's scores of candidates are clipped to stay above ``FLOOR + 2``.
FLOOR = -1000.0
#: Arrays added later (the per-user item-KNN table): an older state has none (its
#: knn_user_depth is 0), so they are empty / zero, sized from the arrays it has.
_ARRAY_DEFAULTS = {
    "ui_knn": lambda a: np.zeros(np.asarray(a["ui_items"]).size, dtype=np.float16),
    "uk_indptr": lambda a: np.zeros(np.asarray(a["ui_indptr"]).size, dtype=np.int64),
    "uk_items": lambda a: np.zeros(0, dtype=np.int32),
    "uk_values": lambda a: np.zeros(0, dtype=np.float16),
}
#: With ``count_shares`` (the model parameter ``count_features: shares``) these count features
#: are divided by the total of the history they come from ("history_baskets": the state's
#: n_baskets; "history_users": users with a history basket), so that a window's history (a
#: fraction of train, where the trees learn) and all of train (where they score) give them the
#: same scale. rebuy_baskets stays a count: its share is rebuy_share, and reasons() reads it.
COUNT_SHARES = {"item_baskets": "history_baskets", "item_users": "history_users",
                "cooc_max_count": "history_baskets", "user_baskets": "history_baskets",
                "user_items": "history_baskets"}  # fmt: skip
_PER_USER = ("user_baskets", "user_items", "user_lines")
_PER_ITEM = ("department", "category", "subcategory", "price", "item_baskets", "item_users",
             "item_repeat_rate", "item_recent_share", "item_subcategory_rank", "popularity")  # fmt: skip
#: CSR groups: (indptr, rows it spans, column array, value arrays).
_CSR = (
    ("ui_indptr", "n_users", "ui_items", ("ui_n", "ui_decayed", "ui_rank", "ui_days_since", "ui_interval", "ui_knn")),
    ("uk_indptr", "n_users", "uk_items", ("uk_values",)),
    ("usub_indptr", "n_users", "usub_codes", ("usub_counts",)),
    ("ucat_indptr", "n_users", "ucat_codes", ("ucat_counts",)),
    ("co_indptr", "n_items", "co_items", ("co_count",)),
    ("sim_indptr", "n_items", "sim_items", ("sim_values",)),
)  # fmt: skip


def popularity_fill(popularity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The score and the order of the items outside a query's pool, and of every item of a
    task ranked by popularity (``popularity_tasks``).

    Parameters
    ----------
    popularity : numpy.ndarray, shape (n_items,), float32
        :attr:`RankerState.popularity`.

    Returns
    -------
    key : numpy.ndarray, shape (n_items,), float32
        ``FLOOR + popularity``: far below any candidate's score.
    order : numpy.ndarray, shape (n_items,), int64
        The items by ``key`` descending, ties the lower index.
    """
    key = (FLOOR + popularity).astype(np.float32)
    return key, np.lexsort((np.arange(key.size), -key))


def rebuy_ranking(
    state: RankerState, user: int, allowed: Callable[[np.ndarray], np.ndarray], k: int,
    key: np.ndarray, order: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """An empty cart's best ``k`` items, the same in training (``RankerRecommender.recommend``)
    and serving (``LearnedScorer``): the user's items that ``allowed`` accepts, keyed ``key``
    plus their re-buy score (:meth:`RankerState.rebuy_scores`), and the first ``k`` other
    allowed items of ``order``, keyed ``key``; best first, ties the lower item. O(history + k).

    Parameters
    ----------
    key : numpy.ndarray, shape (n_items,), float32
        ``TIE_BREAK x popularity``: every item's score without a re-buy score.
    order : numpy.ndarray, shape (n_items,)
        The catalog by ``key`` descending, ties the lower index.

    Returns
    -------
    items, scores, rebought : numpy.ndarray
        At most ``k`` each; ``rebought``: whether the item is one of the user's.
    """
    bought, value = state.rebuy_scores(user)
    bought = np.asarray(bought, dtype=np.int64)
    bought_key = key[bought] + np.asarray(value, dtype=np.float32)
    keep = allowed(bought)
    others = best_allowed(order, allowed, np.unique(bought), k, 4 * k)
    pool = np.concatenate([bought[keep], others])
    pool_key = np.concatenate([bought_key[keep], key[others]])
    pick = np.lexsort((pool, -pool_key))[:k]
    return pool[pick], pool_key[pick], pick < int(keep.sum())


@dataclass(eq=False)
class RankerState:
    """The statistics every candidate source and feature reads (see the module docstring).

    Built by the training side (``training.models.ranker.FeatureState``), shipped as
    ``ranker_state.npz`` (:meth:`to_arrays` / :meth:`from_arrays`), checked on construction.
    """

    n_users: int
    n_items: int
    n_baskets: float
    n_rebuy: int
    n_cooccurrence: int
    n_cf: int
    n_category: int
    ui_indptr: np.ndarray
    ui_items: np.ndarray
    ui_n: np.ndarray
    ui_decayed: np.ndarray
    ui_rank: np.ndarray
    ui_days_since: np.ndarray
    ui_interval: np.ndarray
    user_baskets: np.ndarray
    user_items: np.ndarray
    user_lines: np.ndarray
    usub_indptr: np.ndarray
    usub_codes: np.ndarray
    usub_counts: np.ndarray
    ucat_indptr: np.ndarray
    ucat_codes: np.ndarray
    ucat_counts: np.ndarray
    department: np.ndarray
    category: np.ndarray
    subcategory: np.ndarray
    price: np.ndarray
    item_baskets: np.ndarray
    item_users: np.ndarray
    item_repeat_rate: np.ndarray
    item_recent_share: np.ndarray
    item_subcategory_rank: np.ndarray
    popularity: np.ndarray
    co_indptr: np.ndarray
    co_items: np.ndarray
    co_count: np.ndarray
    sim_indptr: np.ndarray
    sim_items: np.ndarray
    sim_values: np.ndarray
    ui_knn: np.ndarray
    uk_indptr: np.ndarray
    uk_items: np.ndarray
    uk_values: np.ndarray
    n_popular: int = 0
    empty_cart_counts: int = 0
    count_shares: int = 0
    knn_user_depth: int = 0
    popularity_tasks: int = 0
    _lookups: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for name in _SCALARS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float | np.number):
                raise StateError(f"{name}: expected a number, got {type(value).__name__}")
            if name != "n_baskets":
                setattr(self, name, int(value))
        self.n_baskets = float(self.n_baskets)
        if self.count_shares not in (0, 1):
            raise StateError(f"count_shares: expected 0 or 1, got {self.count_shares}")
        if self.popularity_tasks not in (0, 1, 2, 3):
            raise StateError(f"popularity_tasks: expected 0-3, got {self.popularity_tasks}")
        if self.knn_user_depth < 0:
            raise StateError(f"knn_user_depth: expected >= 0, got {self.knn_user_depth}")
        for name, dtype in _ARRAYS.items():
            value = getattr(self, name)
            if not isinstance(value, np.ndarray) or value.dtype != dtype or value.ndim != 1:
                got = (
                    f"{value.dtype} {value.shape}"
                    if isinstance(value, np.ndarray)
                    else type(value).__name__
                )
                raise StateError(f"{name}: expected a 1-d {np.dtype(dtype).name} array, got {got}")
        for name in _PER_USER:
            _expect_len(name, getattr(self, name), self.n_users)
        for name in _PER_ITEM:
            _expect_len(name, getattr(self, name), self.n_items)
        for indptr, rows, cols, values in _CSR:
            ptr = getattr(self, indptr)
            _expect_len(indptr, ptr, getattr(self, rows) + 1)
            nnz = int(ptr[-1])
            if ptr[0] != 0 or (np.diff(ptr) < 0).any():
                raise StateError(f"{indptr}: expected a non-decreasing row pointer from 0")
            for name in (cols, *values):
                _expect_len(name, getattr(self, name), nnz)
        for cols in ("ui_items", "co_items", "sim_items", "uk_items"):
            c = getattr(self, cols)
            if c.size and (c.min() < 0 or c.max() >= self.n_items):
                raise StateError(f"{cols}: item indices out of range [0, {self.n_items})")

    # -- derived lookups (the same on both sides, never shipped) -----------------------------
    @property
    def _derived(self) -> dict[str, Any]:
        """The lookups derived from the arrays (sorted int64 keys, confidences, category
        lists), built on first use: a state the fit only stores never holds them (about a
        third of its size, at the fit's memory peak); serving builds them when it loads."""
        if not self._lookups:
            self._derive()
        return self._lookups

    def _derive(self) -> None:
        # Each key array is one int64 per entry, built in place (at 32x, 35-47M entries: a
        # temporary of that size cost seconds and stayed in the peak).
        d: dict[str, Any] = {}
        n_items = self.n_items
        d["ui_keys"] = _row_keys(self.ui_indptr, self.ui_items, n_items)
        for level, ptr, codes, counts in (("subcategory", self.usub_indptr, self.usub_codes,
                                           self.usub_counts),
                                          ("category", self.ucat_indptr, self.ucat_codes,
                                           self.ucat_counts)):  # fmt: skip
            width = int(max(self.subcategory.max(initial=-1), self.category.max(initial=-1))) + 2
            keys = _row_keys(ptr, codes, width)
            if not (keys[1:] >= keys[:-1]).all():  # sorted (as the fit writes them): no copy
                order = np.argsort(keys, kind="stable")
                keys, counts = keys[order], counts[order]
            d[f"user_{level}"] = (keys, counts, width)
        d["co_keys"] = _row_keys(self.co_indptr, self.co_items, n_items)
        # Category best-sellers: per sub-category code, its n_category most bought items
        # (item order), valued by popularity share (+1e-6 so every one counts as proposed).
        sc = self.subcategory
        top = np.flatnonzero(
            (self.item_subcategory_rank <= self.n_category) & (sc >= 0) & (self.item_baskets > 0)
        )
        top = top[np.lexsort((top, sc[top]))]
        n_codes = int(sc.max(initial=-1)) + 1
        d["cat_indptr"] = np.r_[0, np.cumsum(np.bincount(sc[top], minlength=n_codes))].astype(
            np.int64
        )
        d["cat_items"] = top.astype(np.int32)
        d["cat_values"] = (self.popularity[top] + np.float32(1e-6)).astype(np.float32)
        # Popular: the n_popular items with the most recent baskets (a fixed list, best first).
        recent = np.nan_to_num(self.item_baskets * self.item_recent_share)
        n_pop = min(self.n_popular, int((recent > 0).sum()))
        d["pop_items"] = np.lexsort((np.arange(n_items), -recent))[:n_pop].astype(np.int64)
        # The totals count_shares divides by (COUNT_SHARES).
        d["history_baskets"] = np.float32(max(self.n_baskets, 1.0))
        d["history_users"] = np.float32(max(int(np.isfinite(self.user_baskets).sum()), 1))
        self._lookups = d

    # -- (de)serialisation ------------------------------------------------------------------
    def to_arrays(self) -> dict[str, np.ndarray]:
        """Every field as a numpy array (scalars as 0-d arrays): what ``ranker_state.npz`` and
        the training side's model folder store."""
        out = {name: np.asarray(getattr(self, name)) for name in _SCALARS}
        out.update({name: getattr(self, name) for name in _ARRAYS})
        return out

    @classmethod
    def from_arrays(cls, arrays: Any) -> RankerState:
        """The inverse of :meth:`to_arrays` (a dict or an ``np.load`` result); raises
        :class:`StateError` naming a missing or malformed field."""
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name.startswith("_"):
                continue
            if f.name not in arrays and f.name in _SCALAR_DEFAULTS:
                kwargs[f.name] = _SCALAR_DEFAULTS[f.name]
                continue
            if f.name not in arrays and f.name in _ARRAY_DEFAULTS and "ui_items" in arrays:
                kwargs[f.name] = _ARRAY_DEFAULTS[f.name](arrays)
                continue
            if f.name not in arrays:
                raise StateError(f"{f.name}: missing")
            value = np.asarray(arrays[f.name])
            if f.name in _SCALARS:
                if value.ndim != 0 or value.dtype.kind not in "iuf":
                    raise StateError(
                        f"{f.name}: expected a number, got {value.dtype} {value.shape}"
                    )
                value = value.item()
            kwargs[f.name] = value
        return cls(**kwargs)

    def sizes(self) -> dict[str, int]:
        """Bytes per array (what the artifact's ``ranker_state.npz`` holds, uncompressed)."""
        return {name: int(getattr(self, name).nbytes) for name in _ARRAYS}

    # -- single-table lookups -----------------------------------------------------------------
    def co_conf(self, pos: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """The confidence of co-occurrence entries: count / the baskets of the entry's row
        item (at least 1), float32; ``pos``: positions in ``co_items`` (-1: no entry, 0),
        ``rows``: their row (cart) items, the same shape. Computed where used, not stored
        for the whole table (a copy of ``co_count``: 180 MB at 32x)."""
        out = np.zeros(np.shape(pos), dtype=np.float32)
        hit = pos >= 0
        out[hit] = self.co_count[pos[hit]] / np.maximum(self.item_baskets[rows[hit]],
                                                        np.float32(1.0))  # fmt: skip
        return out

    def user_share(self, level: str, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Share of each user's basket lines in the item's ``level``; NaN for unknown users."""
        keys, counts, width = self._derived[f"user_{level}"]
        codes = (self.subcategory if level == "subcategory" else self.category)[items] + 1
        pos = lookup_sorted(keys, np.maximum(users, 0) * width + codes)
        pos[users < 0] = -1
        share = _take(counts, pos, 0.0) / self.user_lines[np.maximum(users, 0)]
        share[users < 0] = np.nan
        return share

    def ranks_by_popularity(self, exclude_owned: bool) -> bool:
        """Whether carts of this task (``exclude_owned``: the cross-sell task) are ranked by
        popularity (the allowed items by ``popularity``, ties the lower index) instead of by
        the trees: the fit's choice on its validation queries (``popularity_tasks``)."""
        return bool(self.popularity_tasks & POPULARITY_TASK_BITS[bool(exclude_owned)])

    def rebuy_scores(self, user: int) -> tuple[np.ndarray, np.ndarray]:
        """The user's items and their re-buy scores (empty for an unknown user): the ranking
        of an empty cart. The decayed purchase counts (``ui_decayed``), or the plain basket
        counts (``ui_n``) when ``empty_cart_counts`` is 1: training picks the better of the
        two on its own window (``RankerRecommender.validation_["empty_cart"]``)."""
        if user < 0:
            return np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.float32)
        lo, hi = self.ui_indptr[user], self.ui_indptr[user + 1]
        values = self.ui_n if self.empty_cart_counts else self.ui_decayed
        return self.ui_items[lo:hi], values[lo:hi]


def _row_keys(indptr: np.ndarray, cols: np.ndarray, width: int) -> np.ndarray:
    """``row x width + col`` of every entry of a CSR (int64, sorted when each row's columns
    are), allocated once."""
    keys = np.repeat(np.arange(indptr.size - 1, dtype=np.int64) * width, np.diff(indptr))
    keys += cols
    return keys


def _expect_len(name: str, value: np.ndarray, n: int) -> None:
    if value.shape != (n,):
        raise StateError(f"{name}: expected {n} entries, got {value.shape[0]}")


# -- small vectorised helpers ---------------------------------------------------------------
def _gather(pos: np.ndarray, *columns: tuple[np.ndarray, float]) -> list[np.ndarray]:
    """:func:`_take` of several ``(values, missing)`` columns at the same positions."""
    hit = pos >= 0
    at = pos[hit]
    out = []
    for values, missing in columns:
        column = np.full(pos.shape, missing, dtype=np.float32)
        column[hit] = values[at]
        out.append(column)
    return out


def _take(values: np.ndarray, pos: np.ndarray, missing: float) -> np.ndarray:
    """``values[pos]`` as float32, ``missing`` where ``pos`` is -1."""
    out = np.full(pos.shape, missing, dtype=np.float32)
    hit = pos >= 0
    out[hit] = values[pos[hit]]
    return out


def _accumulate(
    query: np.ndarray, cols: np.ndarray, values: np.ndarray, n: int, n_items: int
) -> np.ndarray:
    """Dense (n, n_items) float32 sums of ``values`` at (query, col): float64 accumulation in
    input order, so a query's row never depends on the other queries of the batch."""
    flat = np.bincount(
        query.astype(np.int64) * n_items + cols, weights=values, minlength=n * n_items
    )
    return flat.astype(np.float32).reshape(n, n_items)


@dataclass(frozen=True, eq=False)
class QueryFeatures:
    """Candidates and features of a batch of queries.

    Attributes
    ----------
    indptr : numpy.ndarray, int64, shape (n_queries + 1,)
        Query q's candidates are ``items[indptr[q]:indptr[q + 1]]`` (increasing item index).
    items : numpy.ndarray, int64
    sources : numpy.ndarray, int8
        The OR of the :data:`SOURCES` bits that proposed each candidate.
    features : numpy.ndarray, float32, shape (n_candidates, len(FEATURES))
    """

    indptr: np.ndarray
    items: np.ndarray
    sources: np.ndarray
    features: np.ndarray

    @property
    def rows(self) -> np.ndarray:
        """The query of each candidate."""
        return np.repeat(np.arange(self.indptr.size - 1), np.diff(self.indptr))


@dataclass(frozen=True, eq=False)
class QueryCandidates:
    """Candidates of a batch of queries, before their features.

    Attributes
    ----------
    indptr, items, sources :
        As :class:`QueryFeatures`.
    signals : numpy.ndarray, float32, shape (n_candidates, 4)
        Each candidate's co-occurrence sum and rank, item-KNN sum and rank (0 = none), taken
        over its query's whole list.
    users, cart_indptr, cart_items, exclude_owned :
        The queries (carts sorted and duplicate-free).
    """

    indptr: np.ndarray
    items: np.ndarray
    sources: np.ndarray
    signals: np.ndarray
    users: np.ndarray
    cart_indptr: np.ndarray
    cart_items: np.ndarray
    exclude_owned: bool

    @property
    def rows(self) -> np.ndarray:
        """The query of each candidate."""
        return np.repeat(np.arange(self.indptr.size - 1), np.diff(self.indptr))


def _normalise_carts(
    indptr: np.ndarray, items: np.ndarray, n_items: int
) -> tuple[np.ndarray, np.ndarray]:
    """Carts as sorted, duplicate-free CSR rows (what every cart feature assumes)."""
    indptr = np.asarray(indptr, dtype=np.int64)
    items = np.asarray(items, dtype=np.int64)
    n = indptr.size - 1
    rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(indptr))
    keys = np.unique(rows * n_items + items)
    return np.r_[0, np.cumsum(np.bincount(keys // n_items, minlength=n))].astype(np.int64), (
        keys % n_items
    )


def query_candidates(
    state: RankerState,
    users: np.ndarray,
    cart_indptr: np.ndarray,
    cart_items: np.ndarray,
    exclude_owned: bool = False,
) -> QueryCandidates:
    """Candidates of each query, without their features (:func:`candidate_features` computes
    those, for all or some of them: serving computes them only for what the rules allow).

    Parameters
    ----------
    state : RankerState
    users : numpy.ndarray, int, shape (n,)
        User indices, -1 for an unknown (anonymous) shopper.
    cart_indptr, cart_items : numpy.ndarray
        The carts as CSR rows of item indices (query q's cart is
        ``cart_items[cart_indptr[q]:cart_indptr[q + 1]]``; order and repeats do not matter).
    exclude_owned : bool
        The cross-sell task: the user's items are never candidates (``task_new_to_user``).
    """
    users = np.asarray(users, dtype=np.int64)
    if users.size == 1:  # a served request: its cart sorted and duplicate-free, one call
        cart_items = np.unique(
            np.asarray(cart_items, dtype=np.int64)[cart_indptr[0] : cart_indptr[1]]
        )
        return _one_query(state, int(users[0]), np.array([0, cart_items.size]), cart_items,
                          bool(exclude_owned))  # fmt: skip
    cart_indptr, cart_items = _normalise_carts(cart_indptr, cart_items, state.n_items)
    parts = []
    for lo in range(0, users.size, CHUNK):
        hi = min(lo + CHUNK, users.size)
        ptr = cart_indptr[lo : hi + 1]
        chunk = _sparse_chunk if hi - lo <= SPARSE_MAX_QUERIES else _chunk
        parts.append(
            chunk(state, users[lo:hi], ptr - ptr[0], cart_items[ptr[0] : ptr[-1]], exclude_owned)
        )
    sizes = np.concatenate([np.diff(p.indptr) for p in parts]) if parts else np.zeros(0, np.int64)
    return QueryCandidates(
        np.r_[0, np.cumsum(sizes)].astype(np.int64),
        np.concatenate([p.items for p in parts]) if parts else np.zeros(0, dtype=np.int64),
        np.concatenate([p.sources for p in parts]) if parts else np.zeros(0, dtype=np.int8),
        np.concatenate([p.signals for p in parts]) if parts else np.zeros((0, 4), np.float32),
        users, cart_indptr, cart_items, bool(exclude_owned),
    )  # fmt: skip


def candidate_features(
    state: RankerState, candidates: QueryCandidates, select: np.ndarray | None = None
) -> np.ndarray:
    """The :data:`FEATURES` of the candidates at positions ``select`` (default: all).

    Returns
    -------
    numpy.ndarray, float32, shape (len(select), len(FEATURES))
        Each row depends on its (query, candidate) alone (the ranks were taken over the whole
        list by :func:`query_candidates`), so a subset's rows equal the full matrix's rows.
    """
    c = candidates
    rows, cols, signals = c.rows, c.items, c.signals
    if select is not None:
        rows, cols, signals = rows[select], cols[select], signals[select]
    return _features(state, c.users, c.cart_indptr, c.cart_items, c.exclude_owned, rows, cols,
                     tuple(signals.T))  # fmt: skip


def query_features(
    state: RankerState,
    users: np.ndarray,
    cart_indptr: np.ndarray,
    cart_items: np.ndarray,
    exclude_owned: bool = False,
) -> QueryFeatures:
    """Candidates of each query and the :data:`FEATURES` of every (query, candidate):
    :func:`query_candidates` then :func:`candidate_features` (arguments as there), a
    :data:`CHUNK` of queries at a time (bounded memory for training batches)."""
    users = np.asarray(users, dtype=np.int64)
    cart_indptr = np.asarray(cart_indptr, dtype=np.int64)
    cart_items = np.asarray(cart_items, dtype=np.int64)
    parts = []
    for lo in range(0, users.size, CHUNK):
        hi = min(lo + CHUNK, users.size)
        ptr = cart_indptr[lo : hi + 1]
        c = query_candidates(state, users[lo:hi], ptr - ptr[0], cart_items[ptr[0] : ptr[-1]],
                             exclude_owned)  # fmt: skip
        parts.append((c, candidate_features(state, c)))
    if not parts:
        return QueryFeatures(np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.int64),
                             np.zeros(0, dtype=np.int8),
                             np.zeros((0, len(FEATURES)), dtype=np.float32))  # fmt: skip
    sizes = np.concatenate([np.diff(c.indptr) for c, _ in parts])
    return QueryFeatures(
        np.r_[0, np.cumsum(sizes)].astype(np.int64),
        np.concatenate([c.items for c, _ in parts]),
        np.concatenate([c.sources for c, _ in parts]),
        np.concatenate([x for _, x in parts]),
    )


def _candidates(
    users: np.ndarray, cart_ptr: np.ndarray, cart_items: np.ndarray, exclude_owned: bool,
    rows: np.ndarray, cols: np.ndarray, bits: np.ndarray, signals: tuple[np.ndarray, ...],
) -> QueryCandidates:  # fmt: skip
    """A chunk's candidates (``rows`` its queries, ``cols`` the items, in query then item
    order) as :class:`QueryCandidates`."""
    indptr = np.zeros(users.size + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=users.size), out=indptr[1:])
    return QueryCandidates(indptr, cols, bits, np.stack(signals, axis=1).astype(np.float32),
                           users, cart_ptr, cart_items, exclude_owned)  # fmt: skip


def _query_entries(
    st: RankerState, users: np.ndarray, cart_ptr: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The query of each cart entry; the known users' purchase-table entries: their query,
    position in the ``ui_*`` arrays and item."""
    known = np.flatnonzero(users >= 0)
    cart_q = np.repeat(np.arange(users.size, dtype=np.int64), np.diff(cart_ptr))
    own_seg, own_pos = csr_entries(st.ui_indptr, users[known])
    return cart_q, known[own_seg], own_pos, st.ui_items[own_pos].astype(np.int64)


def _knn_entries(
    st: RankerState, users: np.ndarray, own: tuple[np.ndarray, np.ndarray, np.ndarray],
    cart_q: np.ndarray, cart_items: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """(query, item, value) entries whose sum per (query, item) is ``knn_score``: the user
    part, then the cosine rows of the cart items.

    With ``knn_user_depth`` > 0 the user part is the state's per-user table (fitted once:
    the summed cosine rows of the user's history at the user's own items, ``ui_knn``, and at
    the ``knn_user_depth`` best other items, ``uk_*``), a few hundred entries instead of
    history x ``cf_neighbours`` per query; 0 (an older state) reads the cosine rows of every
    history item, as before.
    """
    own_q, own_pos, own_items = own
    if st.knn_user_depth > 0:
        known = np.flatnonzero(users >= 0)
        seg, pos = csr_entries(st.uk_indptr, users[known])
        hit = st.ui_knn[own_pos] > 0
        user_q = np.concatenate([own_q[hit], known[seg]])
        user_items = np.concatenate([own_items[hit], st.uk_items[pos]])
        user_values = np.concatenate([st.ui_knn[own_pos[hit]], st.uk_values[pos]])
    else:
        seg, pos = csr_entries(st.sim_indptr, own_items)
        user_q, user_items, user_values = own_q[seg], st.sim_items[pos], st.sim_values[pos]
    seg, pos = csr_entries(st.sim_indptr, cart_items)
    return (np.concatenate([user_q, cart_q[seg]]),
            np.concatenate([user_items, st.sim_items[pos]]).astype(np.int64),
            np.concatenate([user_values, st.sim_values[pos]]))  # fmt: skip


def _chunk(
    st: RankerState, users: np.ndarray, cart_ptr: np.ndarray, cart_items: np.ndarray,
    exclude_owned: bool,
) -> QueryCandidates:  # fmt: skip
    """Candidates of a batch of queries as dense (queries x touched items) rows.

    Only the items some source of the batch reaches (the users' items, the cart, the cart's
    co-occurrence and category lists, the cosine neighbours, the popular list) can be
    candidates, so the dense rows span those columns alone, in item order (``touched``): the
    same sums in the same order and the same tie rule (lower item first) as catalog-wide rows,
    at a fraction of the cells (training batches: most of the fit's feature time)."""
    n = users.size
    cart_q, own_q, own_pos, own_items = _query_entries(st, users, cart_ptr)
    d = st._derived
    co_seg, co_pos = csr_entries(st.co_indptr, cart_items)
    knn_q, knn_items, knn_values = _knn_entries(st, users, (own_q, own_pos, own_items), cart_q,
                                                cart_items)  # fmt: skip
    sc = st.subcategory[cart_items]
    has_sc = sc >= 0
    cat_seg, cat_pos = (
        csr_entries(d["cat_indptr"], sc[has_sc]) if st.n_category > 0 else (None, None)
    )
    mask = np.zeros(st.n_items, dtype=bool)
    for touched_items in (own_items, cart_items, st.co_items[co_pos], knn_items,
                          d["pop_items"], () if cat_pos is None else d["cat_items"][cat_pos]):  # fmt: skip
        mask[touched_items] = True
    touched = np.flatnonzero(mask)
    column = np.cumsum(mask, dtype=np.int64) - 1  # item -> its column in the dense rows
    m = touched.size
    cart_c, own_c = column[cart_items], column[own_items]

    excluded = np.zeros((n, m), dtype=bool)
    excluded[cart_q, cart_c] = True
    if exclude_owned:
        excluded[own_q, own_c] = True
    # The excluded cells, by index: zeroing them is far cheaper than a row-wide mask.
    ex_q = np.concatenate([cart_q, own_q]) if exclude_owned else cart_q
    ex_c = np.concatenate([cart_c, own_c]) if exclude_owned else cart_c
    bits = np.zeros((n, m), dtype=np.int8)

    # Source 1: the user's first n_rebuy items by decayed count.
    if st.n_rebuy > 0:
        ok = (st.ui_rank[own_pos] <= st.n_rebuy) & ~excluded[own_q, own_c]
        bits[own_q[ok], own_c[ok]] |= SOURCES["rebuy"]

    # Sources 2 and 3 (dense sums, their ranks): co-occurrence of the cart; cosine neighbours
    # of the user's items and the cart (an item in both counts twice).
    cooc = _accumulate(cart_q[co_seg], column[st.co_items[co_pos]],
                       st.co_conf(co_pos, cart_items[co_seg]), n, m)  # fmt: skip
    knn = _accumulate(knn_q, column[knn_items], knn_values, n, m)
    ranks = []
    for dense, n_top, name in ((cooc, st.n_cooccurrence, "cooccurrence"), (knn, st.n_cf, "cf")):
        dense[ex_q, ex_c] = 0.0
        depth = min(max(n_top, RANK_DEPTH), st.n_items)
        order = top_k(np.where(dense > 0, dense, -np.inf), depth)[0]
        # Integer ranks, exact in int16 up to 32767 (half the bytes of float32).
        rank = np.zeros(dense.shape, dtype=np.int16 if depth < 2**15 else np.int32)
        r, p = np.nonzero(order >= 0)
        rank[r, order[r, p]] = p + 1
        if n_top > 0:
            r, p = np.nonzero(order[:, :n_top] >= 0)
            bits[r, order[r, p]] |= SOURCES[name]
        ranks.append(rank)
    # Source 4: the best-sellers of the cart items' sub-categories.
    if cat_pos is not None:
        dense = _accumulate(cart_q[has_sc][cat_seg], column[d["cat_items"][cat_pos]],
                            d["cat_values"][cat_pos], n, m)  # fmt: skip
        dense[ex_q, ex_c] = 0.0
        order = top_k(np.where(dense > 0, dense, -np.inf), min(st.n_category, st.n_items))[0]
        r, p = np.nonzero(order >= 0)
        bits[r, order[r, p]] |= SOURCES["category"]
    # Source 5: the recent best-sellers (the same list for every query), minus the excluded.
    if d["pop_items"].size:
        pop = column[d["pop_items"]]
        ok = ~excluded[:, pop]
        bits[:, pop] |= np.where(ok, np.int8(SOURCES["popular"]), np.int8(0))

    rows, cells = np.nonzero(bits)
    signals = (cooc[rows, cells], ranks[0][rows, cells].astype(np.float32), knn[rows, cells],
               ranks[1][rows, cells].astype(np.float32))  # fmt: skip
    cols = touched[cells].astype(np.int64)
    return _candidates(users, cart_ptr, cart_items, exclude_owned, rows, cols, bits[rows, cells],
                       signals)  # fmt: skip


def _sparse_sums(
    q: np.ndarray, cols: np.ndarray, values: np.ndarray, n: int, n_items: int,
    excluded: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """The positive (query, item) sums of ``values`` that are not ``excluded``, as sorted keys
    ``q * n_items + item`` and float32 sums: :func:`_accumulate`'s numbers (the same bincount),
    kept only where positive."""
    all_keys = q * n_items + cols
    if all_keys.size * UNIQUE_SUM_RATIO < n * n_items:
        unique, inverse = np.unique(all_keys, return_inverse=True)
        flat = np.bincount(inverse.ravel(), weights=values, minlength=unique.size)
        keys = unique[flat > 0]
        sums = flat[flat > 0].astype(np.float32)
    else:
        flat = np.bincount(all_keys, weights=values, minlength=n * n_items)
        keys = np.flatnonzero(flat > 0)
        sums = flat[keys].astype(np.float32)
    keep = (sums > 0) & ~in_sorted(keys, excluded)
    return keys[keep], sums[keep]


def _sparse_ranks(keys: np.ndarray, sums: np.ndarray, n_items: int, depth: int) -> np.ndarray:
    """1-based rank of each key in its query by sum (ties: the lower item), as
    :func:`serving.topk.top_k` gives it, for the first ``depth`` of each query; 0 beyond."""
    rank = np.zeros(keys.size, dtype=np.int64)
    q = keys // n_items
    bounds = np.searchsorted(q, np.arange(q[-1] + 2)) if keys.size else np.zeros(1, np.int64)
    for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
        rank[lo:hi] = _segment_ranks(keys[lo:hi], sums[lo:hi], depth)
    return rank


def _segment_ranks(keys: np.ndarray, sums: np.ndarray, depth: int) -> np.ndarray:
    """1-based rank by sum (ties: the lower key) of the first ``depth`` entries of one query,
    0 beyond (one query's part of :func:`_sparse_ranks`)."""
    rank = np.zeros(keys.size, dtype=np.int64)
    part = np.arange(keys.size)
    if part.size > depth:  # only the values at or above the depth-th largest are sorted
        kth = np.partition(sums, part.size - depth)[part.size - depth]
        part = part[sums >= kth]
    order = part[np.lexsort((keys[part], -sums[part]))][:depth]
    rank[order] = np.arange(1, order.size + 1)
    return rank


def _one_query(
    st: RankerState, user: int, cart_ptr: np.ndarray, cart_items: np.ndarray,
    exclude_owned: bool,
) -> QueryCandidates:  # fmt: skip
    """:func:`_sparse_chunk` for a single query (a served request), the same candidates and
    signals bit for bit: the keys are the item indices themselves (no query offsets, no
    per-query bounds), and the three summed sources (co-occurrence, item-KNN, category) are
    summed in one pass with source ``s``'s keys offset by ``s x n_items`` (the same float64
    sums, in input order per key), so a request makes far fewer numpy calls."""
    n_items, d = st.n_items, st._derived
    lo, hi = (int(st.ui_indptr[user]), int(st.ui_indptr[user + 1])) if user >= 0 else (0, 0)
    own_items = st.ui_items[lo:hi].astype(np.int64)  # sorted: the state's rows are
    excluded = np.union1d(cart_items, own_items) if exclude_owned else cart_items
    found_keys, found_bits = [], []
    if st.n_rebuy > 0 and not exclude_owned:
        ok = (st.ui_rank[lo:hi] <= st.n_rebuy) & ~in_sorted(own_items, excluded)
        found_keys.append(own_items[ok])
        found_bits.append(np.full(found_keys[-1].size, SOURCES["rebuy"], dtype=np.int8))
    co_seg, co = csr_entries(st.co_indptr, cart_items)
    own = (np.zeros(hi - lo, dtype=np.int64), np.arange(lo, hi), own_items)
    zeros = np.zeros(cart_items.size, dtype=np.int64)
    _, knn_items, knn_values = _knn_entries(st, np.array([user]), own, zeros, cart_items)
    sc = st.subcategory[cart_items]
    cat = csr_entries(d["cat_indptr"], sc[sc >= 0])[1] if st.n_category > 0 else zeros[:0]
    keys, sums = _sparse_sums(
        0,
        np.concatenate([st.co_items[co], knn_items + n_items, d["cat_items"][cat].astype(np.int64) + 2 * n_items]),
        np.concatenate([st.co_conf(co, cart_items[co_seg]), knn_values, d["cat_values"][cat]]),
        1, 3 * n_items, np.concatenate([excluded, excluded + n_items, excluded + 2 * n_items]),
    )  # fmt: skip
    bounds = [0, *np.searchsorted(keys, [n_items, 2 * n_items]).tolist(), keys.size]
    rank = np.zeros(keys.size, dtype=np.int64)
    for s, (n_top, depth, name) in enumerate((
        (st.n_cooccurrence, max(st.n_cooccurrence, RANK_DEPTH), "cooccurrence"),
        (st.n_cf, max(st.n_cf, RANK_DEPTH), "cf"),
        (st.n_category, st.n_category, "category"),
    )):  # fmt: skip
        a, b = bounds[s], bounds[s + 1]
        rank[a:b] = _segment_ranks(keys[a:b], sums[a:b], min(depth, n_items))
        top = (rank[a:b] >= 1) & (rank[a:b] <= n_top)
        found_keys.append(keys[a:b][top] - s * n_items)
        found_bits.append(np.full(found_keys[-1].size, SOURCES[name], dtype=np.int8))
    if d["pop_items"].size:
        found_keys.append(d["pop_items"][~in_sorted(d["pop_items"], excluded)])
        found_bits.append(np.full(found_keys[-1].size, SOURCES["popular"], dtype=np.int8))

    items, inv = np.unique(np.concatenate(found_keys), return_inverse=True)
    bits = np.zeros(items.size, dtype=np.int8)
    np.bitwise_or.at(bits, inv, np.concatenate(found_bits))
    # each candidate's co-occurrence and item-KNN sum and rank (0 where its list lacks it)
    at = lookup_sorted(keys, np.concatenate([items, items + n_items])).reshape(2, items.size)
    sum_at, rank_at = _gather(at, (sums, 0.0), (rank, 0.0))
    signals = np.stack([sum_at[0], rank_at[0], sum_at[1], rank_at[1]], axis=1)
    return QueryCandidates(np.array([0, items.size], dtype=np.int64), items, bits, signals,
                           np.array([user], dtype=np.int64), cart_ptr, cart_items,
                           exclude_owned)  # fmt: skip


def _sparse_chunk(
    st: RankerState, users: np.ndarray, cart_ptr: np.ndarray, cart_items: np.ndarray,
    exclude_owned: bool,
) -> QueryCandidates:  # fmt: skip
    """:func:`_chunk` for a few queries: the same candidates, computed over the items the
    sources touch instead of dense catalog-wide rows."""
    n, n_items = users.size, st.n_items
    cart_q, own_q, own_pos, own_items = _query_entries(st, users, cart_ptr)
    own_keys = own_q * n_items + own_items
    excluded = cart_q * n_items + cart_items
    if exclude_owned:
        excluded = np.concatenate([excluded, own_keys])
    excluded = np.unique(excluded)
    found_keys, found_bits = [], []

    if st.n_rebuy > 0:
        ok = (st.ui_rank[own_pos] <= st.n_rebuy) & ~in_sorted(own_keys, excluded)
        found_keys.append(own_keys[ok])
        found_bits.append(np.full(int(ok.sum()), SOURCES["rebuy"], dtype=np.int8))
    d = st._derived
    seg, pos = csr_entries(st.co_indptr, cart_items)
    cooc = _sparse_sums(cart_q[seg], st.co_items[pos].astype(np.int64),
                        st.co_conf(pos, cart_items[seg]), n, n_items, excluded)  # fmt: skip
    knn = _sparse_sums(*_knn_entries(st, users, (own_q, own_pos, own_items), cart_q, cart_items),
                       n, n_items, excluded)  # fmt: skip
    ranks = []
    for (keys, sums), n_top, name in ((cooc, st.n_cooccurrence, "cooccurrence"),
                                      (knn, st.n_cf, "cf")):  # fmt: skip
        rank = _sparse_ranks(keys, sums, n_items, min(max(n_top, RANK_DEPTH), n_items))
        ranks.append(rank.astype(np.float32))
        top = (rank >= 1) & (rank <= n_top)
        found_keys.append(keys[top])
        found_bits.append(np.full(int(top.sum()), SOURCES[name], dtype=np.int8))
    if st.n_category > 0:
        sc = st.subcategory[cart_items]
        has = sc >= 0
        seg, pos = csr_entries(d["cat_indptr"], sc[has])
        keys, sums = _sparse_sums(cart_q[has][seg], d["cat_items"][pos].astype(np.int64),
                                  d["cat_values"][pos], n, n_items, excluded)  # fmt: skip
        top = _sparse_ranks(keys, sums, n_items, min(st.n_category, n_items)) >= 1
        found_keys.append(keys[top])
        found_bits.append(np.full(int(top.sum()), SOURCES["category"], dtype=np.int8))
    if d["pop_items"].size:
        keys = (np.arange(n, dtype=np.int64)[:, None] * n_items + d["pop_items"][None, :]).ravel()
        keys = keys[~in_sorted(keys, excluded)]
        found_keys.append(keys)
        found_bits.append(np.full(keys.size, SOURCES["popular"], dtype=np.int8))

    keys, inv = np.unique(np.concatenate(found_keys), return_inverse=True)
    bits = np.zeros(keys.size, dtype=np.int8)
    np.bitwise_or.at(bits, inv, np.concatenate(found_bits))
    rows, cols = keys // n_items, keys % n_items

    at_cooc, at_knn = lookup_sorted(cooc[0], keys), lookup_sorted(knn[0], keys)
    signals = (_take(cooc[1], at_cooc, 0.0), _take(ranks[0], at_cooc, 0.0),
               _take(knn[1], at_knn, 0.0), _take(ranks[1], at_knn, 0.0))  # fmt: skip
    return _candidates(users, cart_ptr, cart_items, exclude_owned, rows, cols, bits, signals)


def _features(
    st: RankerState, users: np.ndarray, cart_ptr: np.ndarray, cart_items: np.ndarray,
    exclude_owned: bool, rows: np.ndarray, cols: np.ndarray, signals: tuple[np.ndarray, ...],
) -> np.ndarray:  # fmt: skip
    """The feature matrix of the (rows, cols) candidate pairs (definitions: FEATURES);
    ``signals``: each pair's co-occurrence sum and rank, knn sum and rank (0 = none)."""
    d = st._derived
    u = users[rows]
    X = np.full((rows.size, len(FEATURES)), np.nan, dtype=np.float32)

    def put(name: str, values: np.ndarray) -> None:
        X[:, _COL[name]] = values

    # User x item: the purchase table.
    anon = u < 0
    known = np.maximum(u, 0)
    pos = lookup_sorted(d["ui_keys"], known * st.n_items + cols)
    pos[anon] = -1
    n, decayed, rank, since, interval = _gather(
        pos, (st.ui_n, 0.0), (st.ui_decayed, 0.0), (st.ui_rank, np.nan),
        (st.ui_days_since, np.nan), (st.ui_interval, np.nan),
    )  # fmt: skip
    baskets_u, items_u = st.user_baskets[known], st.user_items[known]
    if anon.any():
        for values in (n, decayed, baskets_u, items_u):
            values[anon] = np.nan
    put("rebuy_baskets", n)
    put("rebuy_share", n / baskets_u)
    put("rebuy_decayed", decayed)
    put("rebuy_rank", rank)
    put("days_since_last", since)
    put("mean_interval_days", interval)
    put("user_baskets", baskets_u)
    put("user_items", items_u)
    with np.errstate(divide="ignore", invalid="ignore"):
        put("due_ratio", since / interval)
        put("user_subcategory_share", st.user_share("subcategory", u, cols))
        put("user_category_share", st.user_share("category", u, cols))

    # Cart x item: each pair against each cart item.
    n_cart = np.diff(cart_ptr)[rows]
    cooc_sum, cooc_rank, knn_sum, knn_rank = signals
    put("cooc_sum_conf", cooc_sum)
    put("cooc_rank", np.where(cooc_rank > 0, cooc_rank, np.nan))
    put("knn_score", knn_sum)
    put("knn_rank", np.where(knn_rank > 0, knn_rank, np.nan))
    pairs = _cart_grid if cart_ptr.size == 2 and cart_items.size else _cart_pairs
    for name, values in pairs(st, cart_ptr, cart_items, rows, cols, n_cart).items():
        put(name, values)
    put("cart_size", n_cart.astype(np.float32))

    # Item side.
    for name in ("item_baskets", "item_users", "item_repeat_rate", "item_recent_share",
                 "item_subcategory_rank", "price"):  # fmt: skip
        put(name, getattr(st, name)[cols])
    cart_price = st.price[cart_items].astype(np.float64)  # the cart's only: never catalog-wide
    known_price = np.isfinite(cart_price)
    cart_price[~known_price] = 0.0
    cart_q = np.repeat(np.arange(cart_ptr.size - 1), np.diff(cart_ptr))
    price_sum = np.bincount(cart_q, weights=cart_price, minlength=cart_ptr.size - 1)
    price_n = np.bincount(cart_q, weights=known_price, minlength=cart_ptr.size - 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_price = np.where(price_n > 0, price_sum / price_n, np.nan).astype(np.float32)
        put("price_ratio_cart", st.price[cols] / mean_price[rows])
    put("task_new_to_user", np.full(rows.size, float(exclude_owned), dtype=np.float32))
    if st.count_shares:
        for name, total in COUNT_SHARES.items():
            X[:, _COL[name]] /= d[total]
    return X


def _cart_pairs(
    st: RankerState, cart_ptr: np.ndarray, cart_items: np.ndarray, rows: np.ndarray,
    cols: np.ndarray, n_cart: np.ndarray,
) -> dict[str, np.ndarray]:  # fmt: skip
    """The features of each (query, candidate) against its query's cart items (definitions:
    FEATURES), the pairs laid out candidate by candidate."""
    pair, offset = segments(n_cart)
    cart_item = cart_items[cart_ptr[rows[pair]] + offset]
    item = cols[pair]
    cpos = lookup_sorted(st._derived["co_keys"], cart_item * st.n_items + item)
    (count,) = _gather(cpos, (st.co_count, 0.0))
    conf = st.co_conf(cpos, cart_item)
    lift = conf * np.float32(st.n_baskets) / np.maximum(st.item_baskets[item], np.float32(1.0))
    starts = (np.cumsum(n_cart) - n_cart)[n_cart > 0]
    has = n_cart > 0

    def per_pair(values: np.ndarray, reduce: Any) -> np.ndarray:
        out = np.zeros(rows.size, dtype=np.float32)
        if starts.size:
            out[has] = reduce.reduceat(values, starts)
        return out

    out = {"cooc_max_conf": per_pair(conf, np.maximum),
           "cooc_max_count": per_pair(count, np.maximum),
           "cooc_max_lift": per_pair(lift, np.maximum),
           "cooc_n_cart": per_pair((cpos >= 0).astype(np.float32), np.add)}  # fmt: skip
    size = np.maximum(n_cart, 1).astype(np.float32)
    for name, codes in (("cart_same_subcategory", st.subcategory),
                        ("cart_same_category", st.category),
                        ("cart_same_department", st.department)):  # fmt: skip
        same = ((codes[cart_item] == codes[item]) & (codes[item] >= 0)).astype(np.float32)
        out[name] = per_pair(same, np.add) / size
    return out


def _cart_grid(
    st: RankerState, cart_ptr: np.ndarray, cart_items: np.ndarray, rows: np.ndarray,
    cols: np.ndarray, n_cart: np.ndarray,
) -> dict[str, np.ndarray]:  # fmt: skip
    """:func:`_cart_pairs` of one query with a non-empty cart (a served request), the same
    values bit for bit (maxima, and sums of 0 / 1 counts, do not depend on the order): the
    pairs as a (cart item x candidate) grid, so the co-occurrence keys are searched in
    sorted order (sorted cart, sorted candidates) and each feature is a column reduction."""
    item = cols[None, :]
    cpos = lookup_sorted(st._derived["co_keys"], cart_items[:, None] * st.n_items + item)
    (count,) = _gather(cpos, (st.co_count, 0.0))
    conf = st.co_conf(cpos, np.broadcast_to(cart_items[:, None], cpos.shape))
    lift = conf * np.float32(st.n_baskets) / np.maximum(st.item_baskets[item], np.float32(1.0))
    out = {"cooc_max_conf": conf.max(axis=0), "cooc_max_count": count.max(axis=0),
           "cooc_max_lift": lift.max(axis=0),
           "cooc_n_cart": (cpos >= 0).sum(axis=0, dtype=np.float32)}  # fmt: skip
    size = np.float32(cart_items.size)
    for name, codes in (("cart_same_subcategory", st.subcategory),
                        ("cart_same_category", st.category),
                        ("cart_same_department", st.department)):  # fmt: skip
        mine = codes[cols]
        same = (codes[cart_items][:, None] == mine[None, :]) & (mine >= 0)[None, :]
        out[name] = same.sum(axis=0, dtype=np.float32) / size
    return out


# -- reasons --------------------------------------------------------------------------------
def _days(value: float) -> str:
    if value >= 10.5:
        weeks = round(value / 7)
        return "week" if weeks == 1 else f"{weeks} weeks"
    days = max(round(value), 1)
    return "day" if days == 1 else f"{days} days"


def reasons(
    state: RankerState, features: np.ndarray, items: np.ndarray, cart_items: np.ndarray
) -> list[tuple[str, int | None]]:
    """Why each candidate is offered, from the features that carry most of the model's gain
    (re-buy cadence, co-occurrence with a cart item, same sub-category as a cart item).

    Parameters
    ----------
    features : numpy.ndarray, shape (m, len(FEATURES))
        The candidates' feature rows; ``items`` their item indices; ``cart_items`` the
        query's cart (and anchor).

    Returns
    -------
    list of (str, int or None)
        Per candidate: the text, with ``{cart}`` standing for a cart item, and that cart
        item's index (None when the text names none); the caller puts in its external id.
        Precedence: a regular re-buy ("you buy this every 2 weeks"; at least 3 baskets), a
        strong rule ("bought with {cart} in 31 % of baskets": the cart item with the highest
        confidence, at least 5 %), a re-buy ("bought before"), the same sub-category ("same
        aisle as {cart}": the first such cart item), a similar item ("similar to what you
        buy", or "similar to your cart" for an unknown shopper), else "popular".
    """
    items = np.asarray(items, dtype=np.int64)
    cart = np.asarray(cart_items, dtype=np.int64)
    f = features
    m, c = items.size, cart.size
    bought = f[:, _COL["rebuy_baskets"]]
    interval = f[:, _COL["mean_interval_days"]]
    # Each candidate's best rule: confidences of (candidate, cart item) pairs, one lookup.
    rows = np.broadcast_to(cart[None, :], (m, c))
    conf = state.co_conf(lookup_sorted(state._derived["co_keys"],
                                       (rows * state.n_items + items[:, None]).ravel()),
                         rows.ravel()).reshape(m, c)  # fmt: skip
    same = state.subcategory[cart][None, :] == state.subcategory[items][:, None]
    same &= state.subcategory[items][:, None] >= 0
    out: list[tuple[str, int | None]] = []
    for r in range(m):
        if bought[r] >= 3 and np.isfinite(interval[r]):
            out.append((f"you buy this every {_days(float(interval[r]))}", None))
        elif c and conf[r].max() >= 0.05:
            best = int(np.argmax(conf[r]))
            out.append((f"bought with {{cart}} in {round(100 * float(conf[r, best]))} % of baskets",
                        int(cart[best])))  # fmt: skip
        elif bought[r] >= 1:
            out.append(("bought before", None))
        elif c and same[r].any():
            out.append(("same aisle as {cart}", int(cart[int(np.argmax(same[r]))])))
        elif f[r, _COL["knn_score"]] > 0:  # an unknown shopper has only the cart to go by
            known = np.isfinite(f[r, _COL["user_baskets"]])
            out.append(("similar to what you buy" if known else "similar to your cart", None))
        else:
            out.append(("popular", None))
    return out
