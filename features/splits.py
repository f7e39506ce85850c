"""Time-based splits and the ranking tasks evaluated on them.

- :func:`global_time_split`: train / validation / test windows by time (or the shop's week).
- :func:`leave_last_basket_out`: each user's last basket is the test.
- :func:`basket_completion_task`: the add-on task. Test baskets become (cart, held-out) pairs.
- :func:`next_period_task`: per warm user, everything bought in the test window.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, time
from typing import Any

import numpy as np
import polars as pl
import scipy.sparse as sp

from features.dataset import Dataset
from features.errors import ConfigError

_DATE_ONLY = re.compile(r"^\d{4}-?\d{2}-?\d{2}$")  # fromisoformat reads 20240531 too


@dataclass(frozen=True)
class PartStats:
    """Counts for one part of a split."""

    rows: int
    users: int
    items: int
    baskets: int
    warm_users: int
    cold_users: int


@dataclass(eq=False)
class TimeSplit:
    """Parts of a global time split; all share the full dataset's id maps.

    Attributes
    ----------
    train : Dataset
        Rows up to and including ``train_end``.
    test : Dataset
        Rows from ``test_start`` on.
    validation : Dataset or None
        Rows from ``validation_start`` to ``train_end``: the end of train, for tuning.
    train_before_validation : Dataset or None
        Rows before ``validation_start``: what a tuned model is fitted on.
    stats : dict of str to PartStats
        Counts per part; warm users are those with a row in the part that precedes it
        (train for test, train_before_validation for validation).
    """

    train: Dataset
    test: Dataset
    validation: Dataset | None
    train_before_validation: Dataset | None
    stats: dict[str, PartStats]


def _bound(value: Any, column: str, key: str) -> Any:
    """A split bound as the column's type: int weeks, or datetimes (ISO-8601 strings).

    A date without a time means the whole day: as ``train_end`` (an inclusive upper bound)
    its last microsecond, as ``test_start`` / ``validation_start`` its first, so
    ``train_end: 2024-05-31`` and ``test_start: 2024-06-01`` leave no gap and no overlap.
    """
    if column == "week":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"split.{key}", f"expected a whole week number, got {value!r}")
        return value
    if isinstance(value, datetime):
        return value
    day: date | None = None
    if isinstance(value, date):  # YAML reads an unquoted 2024-05-31 as a date
        day = value
    elif isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            parsed = None
        if parsed is not None and _DATE_ONLY.match(value.strip()):
            day = parsed.date()
        elif parsed is not None:
            return parsed
    if day is not None:
        # Timestamps are microseconds, so 23:59:59.999999 is the day's last instant.
        return datetime.combine(day, time.max if key == "train_end" else time.min)
    raise ConfigError(
        f"split.{key}", f"expected an ISO-8601 date/time for the timestamp column, got {value!r}"
    )


def _stats(part: Dataset, before: Dataset | None) -> PartStats:
    df = part.interactions
    users = df["user_idx"].unique()
    warm = users.is_in(before.interactions["user_idx"].unique().implode()).sum() if before else 0
    return PartStats(
        rows=df.height,
        users=len(users),
        items=df["item_idx"].n_unique(),
        baskets=df["basket_id"].n_unique(),
        warm_users=int(warm),
        cold_users=len(users) - int(warm),
    )


def global_time_split(
    data: Dataset,
    train_end: Any,
    test_start: Any,
    validation_start: Any | None = None,
    column: str = "timestamp",
) -> TimeSplit:
    """Cut ``data`` into time windows on ``column`` (``timestamp`` or ``week``).

    Bounds are inclusive: train = ``column <= train_end``, test = ``column >= test_start``,
    validation = ``validation_start <= column <= train_end``. Rows between ``train_end`` and
    ``test_start`` (a gap) are in no part. Timestamp bounds may be ISO-8601 strings; a date
    alone means the whole day (``train_end`` to its end, the starts from its beginning).
    """
    if column not in ("timestamp", "week"):
        raise ConfigError("split.time_column", f"expected 'timestamp' or 'week', got {column!r}")
    if column == "week" and data.interactions["week"].null_count():
        raise ConfigError("split.time_column", "this data has no 'week' column; use 'timestamp'")
    train_end = _bound(train_end, column, "train_end")
    test_start = _bound(test_start, column, "test_start")
    if test_start <= train_end:
        raise ConfigError(
            "split.test_start", f"must be after train_end ({train_end}), got {test_start}"
        )
    c = pl.col(column)
    train = data.restrict(c <= train_end)
    test = data.restrict(c >= test_start)
    validation = before = None
    if validation_start is not None:
        validation_start = _bound(validation_start, column, "validation_start")
        if validation_start > train_end:
            raise ConfigError(
                "split.validation_start",
                f"must be <= train_end ({train_end}), got {validation_start}",
            )
        validation = data.restrict((c >= validation_start) & (c <= train_end))
        before = data.restrict(c < validation_start)
    for name, part in (("train", train), ("test", test)):
        if part.interactions.height == 0:
            raise ConfigError(
                f"split.{'train_end' if name == 'train' else 'test_start'}",
                f"the {name} window is empty",
            )
    stats = {"train": _stats(train, None), "test": _stats(test, train)}
    if validation is not None and before is not None:
        stats["train_before_validation"] = _stats(before, None)
        stats["validation"] = _stats(validation, before)
    return TimeSplit(train, test, validation, before, stats)


def leave_last_basket_out(data: Dataset) -> tuple[Dataset, Dataset]:
    """Each user's last basket (latest time, then largest basket id) is test; the rest is train.

    Users with a single basket stay wholly in train.
    """
    df = data.interactions
    last = (
        df.group_by("user_idx")
        .agg(
            pl.col("basket_id").sort_by("timestamp", "basket_id").last().alias("_last"),
            pl.col("basket_id").n_unique().alias("_n"),
        )
        .filter(pl.col("_n") >= 2)
    )
    marked = df.join(last, on="user_idx", how="left").with_columns(
        (pl.col("basket_id") == pl.col("_last")).fill_null(False).alias("_test")
    )
    is_test = marked["_test"]
    return data.restrict(~is_test), data.restrict(is_test)


@dataclass(frozen=True, eq=False)
class RankingTask:
    """Queries to rank items for, and the truth to score them against.

    Attributes
    ----------
    name : str
        ``basket_completion``, ``basket_completion_new`` or ``next_period``.
    query_ids : numpy.ndarray, shape (n_queries,)
        External basket ids (basket tasks) or user ids (next period).
    users : numpy.ndarray, shape (n_queries,), int32
        Internal user index of each query.
    carts : scipy.sparse.csr_matrix, shape (n_queries, n_items), float32
        Items already in the cart (binary); empty rows when the task has no cart.
    relevant : scipy.sparse.csr_matrix, shape (n_queries, n_items), float32
        Held-out items to find (binary).
    exclude_owned : bool
        Whether items the user bought in train must not be recommended.
    """

    name: str
    query_ids: np.ndarray
    users: np.ndarray
    carts: sp.csr_matrix
    relevant: sp.csr_matrix
    exclude_owned: bool

    @property
    def n_queries(self) -> int:
        return int(self.users.shape[0])


def basket_completion_task(
    train: Dataset,
    test: Dataset,
    seed: int = 42,
    min_known_items: int = 2,
    new_to_user: bool = False,
) -> RankingTask:
    """Turn the test baskets of warm users into (cart, held-out) pairs.

    Exactly the Complete Journey protocol:

    1. items never seen in ``train`` are dropped from test baskets;
    2. only baskets of users with a train row and with >= ``min_known_items`` distinct items
       remain;
    3. baskets are taken in ascending basket id order; within a basket the distinct items are
       sorted by item id and permuted by one ``numpy.random.default_rng(seed)`` shared across
       baskets; the cart is the first ``max(1, n // 2)`` of that permutation, the rest is
       held out;
    4. ``new_to_user``: items the user bought in train are removed from the held-out items
       (and will be excluded from the ranking); baskets left with none are dropped.
    """
    owned = train.user_item_counts()
    known = np.asarray(owned.sum(axis=0)).ravel() > 0
    warm = np.diff(owned.indptr) > 0
    bm = test.basket_item_matrix()
    baskets = bm.matrix.multiply(known[None, :].astype(np.float32)).tocsr()
    baskets.eliminate_zeros()
    baskets.sort_indices()
    sizes = np.diff(baskets.indptr)
    keep = warm[bm.users] & (sizes >= min_known_items)
    rows = np.flatnonzero(keep)
    rng = np.random.default_rng(seed)
    cart_parts, held_parts = [], []
    indptr, indices = baskets.indptr, baskets.indices
    for r in rows:  # sequential by design: one generator shared across baskets, in basket order
        items = indices[indptr[r] : indptr[r + 1]]
        perm = rng.permutation(items.shape[0])
        n_cart = max(1, items.shape[0] // 2)
        cart_parts.append(items[perm[:n_cart]])
        held_parts.append(items[perm[n_cart:]])
    carts = _rows_to_csr(cart_parts, train.n_items)
    held = _rows_to_csr(held_parts, train.n_items)
    users = bm.users[rows]
    query_ids = bm.basket_ids[rows]
    if new_to_user:
        owned_rows = owned[users]
        owned_rows.data[:] = 1.0
        held = (held - held.multiply(owned_rows)).tocsr()
        held.eliminate_zeros()
        nonempty = np.diff(held.indptr) > 0
        carts, held = carts[nonempty], held[nonempty]
        users, query_ids = users[nonempty], query_ids[nonempty]
    return RankingTask(
        "basket_completion_new" if new_to_user else "basket_completion",
        query_ids,
        users.astype(np.int32),
        carts,
        held,
        exclude_owned=new_to_user,
    )


def next_period_task(train: Dataset, test: Dataset, exclude_owned: bool = False) -> RankingTask:
    """One query per warm user: every item (seen in train) the user bought in the test window."""
    owned = train.user_item_counts()
    known = np.asarray(owned.sum(axis=0)).ravel() > 0
    warm = np.diff(owned.indptr) > 0
    truth = test.user_item_counts().multiply(known[None, :].astype(np.float32)).tocsr()
    truth.eliminate_zeros()
    if exclude_owned:
        truth = (truth - truth.multiply(owned > 0)).tocsr()
        truth.eliminate_zeros()
    truth.data[:] = 1.0
    users = np.flatnonzero(warm & (np.diff(truth.indptr) > 0)).astype(np.int32)
    relevant = truth[users]
    carts = sp.csr_matrix((len(users), train.n_items), dtype=np.float32)
    return RankingTask(
        "next_period", train.user_map.to_external(users), users, carts, relevant, exclude_owned
    )


def _rows_to_csr(rows: list[np.ndarray], n_cols: int) -> sp.csr_matrix:
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    indices = np.concatenate(rows) if rows else np.array([], dtype=np.int32)
    m = sp.csr_matrix(
        (np.ones(len(indices), dtype=np.float32), indices.astype(np.int32), indptr),
        shape=(len(rows), n_cols),
    )
    m.sort_indices()
    return m
