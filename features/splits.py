"""Splits (the evaluation protocols) and the ranking tasks evaluated on them.

- :func:`global_time_split`: train / validation / test windows by time (or the shop's week).
- :func:`rolling_time_folds`: consecutive validation windows at the end of train (tuning).
- :func:`stratified_split`: each user's rows split by ratio at random (seeded), per user.
- :func:`leave_last_basket_out` / :func:`leave_last_basket_split`: each user's last basket is
  the test.
- :func:`basket_completion_task`: the add-on task. Test baskets become (cart, held-out) pairs.
- :func:`next_period_task`: per warm user, everything bought in the test window.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
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
    """Parts of a split (any protocol, the name is historical); all share the full dataset's
    id maps. ``validation`` and ``train_before_validation`` are both carved from train.

    Attributes
    ----------
    train : Dataset
        What the model is fitted on (time split: rows up to and including ``train_end``).
    test : Dataset
        What it is scored on (time split: rows from ``test_start`` on).
    validation : Dataset or None
        The part of train held out for tuning (time split: ``validation_start`` ..
        ``train_end``).
    train_before_validation : Dataset or None
        The rest of train: what a tuned model is fitted on.
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
    return _with_stats(train, test, validation, before)


def _with_stats(
    train: Dataset, test: Dataset, validation: Dataset | None, before: Dataset | None
) -> TimeSplit:
    stats = {"train": _stats(train, None), "test": _stats(test, train)}
    if validation is not None and before is not None:
        stats["train_before_validation"] = _stats(before, None)
        stats["validation"] = _stats(validation, before)
    return TimeSplit(train, test, validation, before, stats)


def week_fold_bounds(start: int, end: int, n_folds: int, source: str | None = None) -> list[int]:
    """Boundaries ``b_0 .. b_n`` of ``n_folds`` equal windows of whole weeks covering
    ``start .. end`` (inclusive): window ``i`` is ``b_i <= week < b_{i+1}``.

    Raises :class:`ConfigError` (``split.validation_folds``) when the span does not divide.
    """
    span = end - start + 1
    if span % n_folds:
        raise ConfigError(
            "split.validation_folds",
            f"the {span}-week validation span {start}..{end} does not divide into "
            f"{n_folds} windows of whole weeks",
            source,
        )
    return [start + i * (span // n_folds) for i in range(n_folds)] + [end + 1]


def rolling_time_folds(
    data: Dataset,
    validation_start: Any,
    train_end: Any,
    n_folds: int = 1,
    column: str = "timestamp",
) -> list[TimeSplit]:
    """Consecutive validation windows of equal length covering ``validation_start`` ..
    ``train_end``, oldest first; each fold is fitted on every row before its window.

    In fold ``i`` (0-based) ``train`` is ``column < b_i`` and ``test`` (its validation
    window) is ``b_i <= column < b_{i+1}``, the last window ending at ``train_end``
    inclusive. Weeks: the span ``train_end - validation_start + 1`` must divide into
    ``n_folds`` whole weeks, ``b_i = validation_start + i * span / n_folds``. Timestamps:
    ``b_i = validation_start + i * L / n_folds`` with ``L`` the time from
    ``validation_start`` to just after ``train_end`` (to the microsecond). No row after
    ``train_end`` is in any fold, so the test window is never seen.
    """
    if isinstance(n_folds, bool) or not isinstance(n_folds, int) or n_folds < 1:
        raise ConfigError("split.validation_folds", f"must be a whole number >= 1, got {n_folds!r}")
    start = _bound(validation_start, column, "validation_start")
    end = _bound(train_end, column, "train_end")
    if start > end:
        raise ConfigError("split.validation_start", f"must be <= train_end ({end}), got {start}")
    if column == "week":
        bounds = week_fold_bounds(start, end, n_folds)
    else:
        stop = end + timedelta(microseconds=1)  # train_end is inclusive
        step = (stop - start) / n_folds
        bounds = [start + i * step for i in range(n_folds)] + [stop]
    c = pl.col(column)
    folds = []
    for i in range(n_folds):
        fit = data.restrict(c < bounds[i])
        window = data.restrict((c >= bounds[i]) & (c < bounds[i + 1]))
        for part, what in ((fit, "fitting part (rows before it)"), (window, "window")):
            if part.interactions.height == 0:
                raise ConfigError(
                    "split.validation_folds" if n_folds > 1 else "split.validation_start",
                    f"validation fold {i + 1} of {n_folds} (from {bounds[i]}): its {what} is empty",
                )
        folds.append(
            TimeSplit(
                fit, window, None, None, {"train": _stats(fit, None), "test": _stats(window, fit)}
            )
        )
    return folds


def _user_key(user_id: Any) -> int:
    """A user's external id as a 64-bit number, the same in every process (``hash`` is not)."""
    digest = hashlib.blake2b(str(user_id).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _stratified_mask(data: Dataset, ratio: float, seed: int, part: int) -> np.ndarray:
    """Boolean mask over ``data.interactions`` rows: True = train (see :func:`stratified_split`)."""
    # Fully ordered, so the permutation applies to the same rows whatever order they came in.
    df = data.interactions.with_row_index("_row").sort(
        "user_idx", "timestamp", "basket_id", "item_idx", "quantity", "value", "week",
        nulls_last=True, maintain_order=True,
    )  # fmt: skip
    users = df["user_idx"].to_numpy()
    rows = df["_row"].to_numpy()
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]]) if len(users) else []
    ends = np.r_[starts[1:], len(users)] if len(users) else []
    external = data.user_map.external_ids
    in_train = np.zeros(df.height, dtype=bool)
    n_train: dict[int, int] = {}
    for s0, e0 in zip(starts, ends, strict=True):
        n = int(e0 - s0)
        if n not in n_train:
            # Recommenders' rule exactly: the row at 1-based rank r is train iff r / n <= ratio
            n_train[n] = int(np.count_nonzero(np.arange(1, n + 1) / n <= ratio))
        rng = np.random.default_rng([seed, _user_key(external[users[s0]]), part])
        in_train[rows[s0 + rng.permutation(n)[: n_train[n]]]] = True
    return in_train


def stratified_split(data: Dataset, ratio: float, seed: int = 42) -> TimeSplit:
    """Each user's rows split at random by ``ratio``: the per-user stratified split of
    Microsoft Recommenders' ``python_stratified_split`` (``filter_by="user"``).

    For each user with ``n`` rows: the rows in canonical order (timestamp, basket id, item,
    quantity, value, week) are permuted by ``numpy.random.default_rng([seed, key, 0])``,
    where ``key`` is the first 8 bytes (little-endian) of the BLAKE2b digest of the external
    user id as text; the row at 1-based rank ``r`` of that order goes to train iff
    ``r / n <= ratio`` (float64), i.e. ``floor(ratio * n)`` rows, the rest to test. So a user
    with 8 rows at 0.75 has 6 in train, and one with a single row has it in test (a cold
    user, scored by no task), as in Recommenders. Each user's split depends only on the
    seed, the user's id and rows: adding or removing other users changes nothing.
    (Recommenders draws one random stream over the whole frame instead, so the rows chosen
    differ; the per-user counts are the same.)

    Validation (for tuning) is the same rule applied to the train part with
    ``default_rng([seed, key, 1])``: ``train_before_validation`` / ``validation``.
    """
    if not 0.0 < float(ratio) < 1.0:
        raise ConfigError("split.ratio", f"must be between 0 and 1 (exclusive), got {ratio!r}")
    in_train = _stratified_mask(data, ratio, seed, 0)
    train, test = data.restrict(pl.Series(in_train)), data.restrict(pl.Series(~in_train))
    for name, part in (("train", train), ("test", test)):
        if part.interactions.height == 0:
            raise ConfigError(
                "split.ratio",
                f"the {name} part is empty at ratio {ratio} (users have too few rows)",
            )
    in_before = _stratified_mask(train, ratio, seed, 1)
    validation = before = None
    if in_before.any() and not in_before.all():
        before = train.restrict(pl.Series(in_before))
        validation = train.restrict(pl.Series(~in_before))
    return _with_stats(train, test, validation, before)


def leave_last_basket_out(data: Dataset) -> tuple[Dataset, Dataset]:
    """Each user's last basket is test; the rest is train.

    The last basket is the one holding the user's latest row by ``timestamp``; when several
    baskets share that latest timestamp, the largest basket id wins (numeric order for int
    ids, text order for str ids). Users with a single basket stay wholly in train.
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


def leave_last_basket_split(data: Dataset) -> TimeSplit:
    """:func:`leave_last_basket_out` as a split: test = each user's last basket; validation
    (for tuning) = the same rule on train, i.e. each user's second-to-last basket.

    The basket tasks run on it as on a time split: a user's test basket becomes a
    (cart, held-out) query when the user has train rows (every user with two baskets does).
    """
    train, test = leave_last_basket_out(data)
    if test.interactions.height == 0:
        raise ConfigError(
            "split.kind", "leave_last_basket: no user has two baskets, so the test part is empty"
        )
    before, validation = leave_last_basket_out(train)
    if validation.interactions.height == 0:
        return _with_stats(train, test, None, None)
    return _with_stats(train, test, validation, before)


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
    """One query per warm user: every item (seen in train) the user bought in the test part.

    A warm user has a row in ``train``; relevant items are the user's distinct test items
    that some train row has (an item the model never saw cannot be ranked). With
    ``exclude_owned`` (the standard MovieLens protocol on a stratified split), items the user
    has in ``train`` are removed from the relevant items and are never recommended (the
    ranking is over every item the user has not got in train); users left with no relevant
    item are not queries.
    """
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
