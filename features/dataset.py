"""The dataset models train on: cleaned interactions, id maps, matrices, features, fingerprint.

Data enters as :class:`~features.adapters.RawData` (validated canonical tables), is cleaned
(:func:`features.cleaning.clean_interactions`) and indexed here; splits
(:mod:`features.splits`) cut a :class:`Dataset` into parts that share its id maps.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import polars as pl
import scipy.sparse as sp

from features.adapters.base import RawData
from features.cleaning import CleaningConfig, CleaningReport, ExcludeItems, clean_interactions
from features.idmap import IdMap
from features.schema import ITEM_CATEGORY_LEVELS
from features.weighting import apply_weighting


@dataclass(frozen=True)
class FeatureMatrix:
    """A sparse one-hot feature matrix with a name per column.

    Attributes
    ----------
    matrix : scipy.sparse.csr_matrix, shape (n_rows, n_features), float32
        Row ``i`` is internal user/item ``i``.
    names : list of str
        ``"<column>=<value>"`` per feature column.
    """

    matrix: sp.csr_matrix
    names: list[str]


@dataclass(frozen=True)
class BasketMatrix:
    """Baskets as rows.

    Attributes
    ----------
    matrix : scipy.sparse.csr_matrix, shape (n_baskets, n_items), float32
        1 where the basket holds the item (distinct items). A basket is a (basket id, user)
        pair, in ascending (basket id, user) order.
    basket_ids : numpy.ndarray, shape (n_baskets,)
        External basket ids (ascending; repeated only if two users share an id).
    users : numpy.ndarray, shape (n_baskets,), int32
        Internal user index of each basket.
    times : numpy.ndarray, shape (n_baskets,), datetime64[us]
        Time of each basket (its earliest line).
    """

    matrix: sp.csr_matrix
    basket_ids: np.ndarray
    users: np.ndarray
    times: np.ndarray


@dataclass(eq=False)
class Dataset:
    """Cleaned interactions indexed by stable id maps.

    Attributes
    ----------
    source : str
        Where the data came from.
    interactions : polars.DataFrame
        Canonical interaction columns plus ``user_idx`` and ``item_idx`` (int32), sorted by
        user, time, basket and item.
    user_map, item_map : IdMap
        External <-> internal ids. Items are the union of interacted items and the items table.
    items : polars.DataFrame
        Item table aligned to ``item_map``: row ``i`` is item ``i`` (nulls where unknown).
    users : polars.DataFrame or None
        User attribute table aligned to ``user_map`` (nulls where unknown).
    report : CleaningReport
        Counts of every cleaning step.
    fingerprint : str
        sha256 of the cleaned data, id maps and config (see :func:`fingerprint`).
    """

    source: str
    interactions: pl.DataFrame
    user_map: IdMap
    item_map: IdMap
    items: pl.DataFrame
    users: pl.DataFrame | None
    report: CleaningReport
    fingerprint: str
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def n_users(self) -> int:
        return len(self.user_map)

    @property
    def n_items(self) -> int:
        return len(self.item_map)

    def restrict(self, keep: pl.Expr | pl.Series) -> Dataset:
        """Same id maps and tables, a subset of the interactions (a split's part)."""
        return replace(self, interactions=self.interactions.filter(keep), _cache={})

    # -- matrices -------------------------------------------------------------------------
    def user_item_counts(self) -> sp.csr_matrix:
        """CSR (n_users, n_items) float32: number of interaction rows (basket lines) per pair."""
        if "counts" not in self._cache:
            df = self.interactions
            self._cache["counts"] = _count_pairs(
                df["user_idx"].to_numpy(), df["item_idx"].to_numpy(), self.n_users, self.n_items
            )
        return self._cache["counts"]

    def user_item_matrix(self, weighting: str = "count") -> sp.csr_matrix:
        """CSR (n_users, n_items) float32 weighted as ``weighting`` (see :mod:`features.weighting`)."""
        return apply_weighting(self.user_item_counts(), weighting)

    def basket_item_matrix(self) -> BasketMatrix:
        """Distinct items of each basket, baskets in ascending external id order."""
        if "baskets" not in self._cache:
            self._cache["baskets"] = _basket_matrix(self.interactions, self.n_items)
        return self._cache["baskets"]

    def item_popularity(self) -> np.ndarray:
        """Number of distinct users per item, shape (n_items,), int64."""
        counts = self.user_item_counts()
        return np.bincount(counts.indices, minlength=self.n_items).astype(np.int64)

    # -- item and user side ---------------------------------------------------------------
    def item_prices(self) -> np.ndarray:
        """Price per item, shape (n_items,), float64; NaN where unknown."""
        return self.items["price"].cast(pl.Float64).fill_null(np.nan).to_numpy()

    def item_categories(self, level: str = "category") -> np.ndarray:
        """Integer code of each item's ``level`` value, shape (n_items,); -1 where unknown."""
        col = self.items[level]
        codes = col.cast(pl.String).rank("dense").fill_null(0).cast(pl.Int64).to_numpy() - 1
        return codes

    def item_features(
        self,
        columns: tuple[str, ...] = (*ITEM_CATEGORY_LEVELS, "brand"),
        price_bands: int = 5,
        tags: bool = True,
    ) -> FeatureMatrix:
        """One-hot item features: category levels, brand, price band, tags.

        Price bands are quantiles of the known prices (``price_band=0`` cheapest), so each
        band holds about the same number of items.
        """
        items = self.items
        parts: list[pl.DataFrame] = []
        for col in columns:
            parts.append(
                items.select(
                    pl.col("item_idx").alias("row"),
                    (pl.lit(f"{col}=") + pl.col(col).cast(pl.String)).alias("feature"),
                ).drop_nulls()
            )
        if price_bands > 0:
            price = items["price"]
            known = price.drop_nulls()
            if len(known):
                edges = np.quantile(known.to_numpy(), np.linspace(0, 1, price_bands + 1)[1:-1])
                band = np.searchsorted(edges, price.fill_null(np.nan).to_numpy(), side="right")
                parts.append(
                    pl.DataFrame({"row": items["item_idx"], "band": band, "price": price})
                    .drop_nulls()
                    .select(
                        "row",
                        (pl.lit("price_band=") + pl.col("band").cast(pl.String)).alias("feature"),
                    )
                )
        if tags:
            parts.append(
                items.select(
                    pl.col("item_idx").alias("row"), pl.col("tags").str.split("|").alias("t")
                )
                .explode("t")
                .drop_nulls()
                .filter(pl.col("t") != "")
                .select("row", (pl.lit("tag=") + pl.col("t")).alias("feature"))
            )
        return _one_hot(parts, self.n_items)

    def user_features(self) -> FeatureMatrix:
        """One-hot user attributes (e.g. demographics); users without attributes get an empty row."""
        if self.users is None:
            return FeatureMatrix(sp.csr_matrix((self.n_users, 0), dtype=np.float32), [])
        users = self.users
        parts = [
            users.select(
                pl.col("user_idx").alias("row"),
                (pl.lit(f"{col}=") + pl.col(col).cast(pl.String)).alias("feature"),
            ).drop_nulls()
            for col in users.columns
            if col not in ("user_id", "user_idx")
        ]
        return _one_hot(parts, self.n_users)


# -- matrix building ------------------------------------------------------------------------
# Both builders write the CSR arrays directly (int32 indices): the counts from the lines as
# they are grouped by user, the baskets from one sort of their keys. Going through scipy's
# COO (row, column and data arrays, a CSR copy, a duplicate sum) and a dense rank of a
# struct column cost several bytes per order line more than the result: the peak of loading
# a 50M-line shop (tests/test_scale_matrices.py keeps the old route as the reference).


def _csr(
    data: np.ndarray, indices: np.ndarray, row_lengths: np.ndarray, shape: tuple
) -> sp.csr_matrix:
    """CSR from rows already laid out one after another, columns ascending and distinct."""
    indptr = np.zeros(shape[0] + 1, dtype=np.int64 if len(indices) >= 2**31 else np.int32)
    np.cumsum(row_lengths, out=indptr[1:])
    m = sp.csr_matrix((data, indices, indptr), shape=shape, copy=False)
    m.has_canonical_format = True  # built from sorted distinct keys: no check pass needed
    return m


def _count_pairs(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int) -> sp.csr_matrix:
    """CSR (n_users, n_items) float32 of how often each (user, item) pair occurs."""
    if len(users) and not (users[1:] >= users[:-1]).all():
        # A dataset's lines are sorted by user (build_dataset, kept by restrict): rarely taken.
        order = np.argsort(users, kind="stable")
        users, items = users[order], items[order]
        del order
    rows = np.bincount(users, minlength=n_users)
    m = _csr(
        np.ones(len(items), dtype=np.float32), items.astype(np.int32), rows, (n_users, n_items)
    )
    m.has_sorted_indices = m.has_canonical_format = False
    m.sum_duplicates()  # in place (scipy's C loop): sorts each row, adds repeats
    # The merged arrays are views of the line-sized ones: copy them out to free the rest.
    m.data = m.data.copy()  # one at a time: the line-sized array goes before the next copy
    m.indices = m.indices.copy()
    return m


def _basket_matrix(interactions: pl.DataFrame, n_items: int) -> BasketMatrix:
    """:class:`BasketMatrix` of ``interactions`` from one sort on (basket id, user, item)."""
    # A basket is (basket id, user): two customers' invoices that reuse an id stay apart.
    lines = interactions.select("basket_id", "user_idx", "item_idx", "timestamp").sort(
        "basket_id", "user_idx", "item_idx"
    )
    same_basket = pl.col("basket_id").eq_missing(pl.col("basket_id").shift(1)) & pl.col(
        "user_idx"
    ).eq_missing(pl.col("user_idx").shift(1))
    flags = lines.select(
        same_basket.fill_null(False).alias("same"),
        (same_basket & (pl.col("item_idx") == pl.col("item_idx").shift(1)))
        .fill_null(False)
        .alias("dup"),
    )
    starts = np.flatnonzero(~flags["same"].to_numpy())
    keep = ~flags["dup"].to_numpy()
    del flags
    n_baskets = len(starts)
    if n_baskets:
        lengths = np.add.reduceat(keep, starts, dtype=np.int64)
        times = np.minimum.reduceat(lines["timestamp"].to_numpy(), starts)
    else:
        lengths = np.zeros(0, dtype=np.int64)
        times = lines["timestamp"].to_numpy()
    indices = lines["item_idx"].to_numpy()[keep].astype(np.int32, copy=False)
    heads = lines.select(pl.col("basket_id", "user_idx").gather(starts))
    del lines, keep
    matrix = _csr(np.ones(len(indices), dtype=np.float32), indices, lengths, (n_baskets, n_items))
    return BasketMatrix(
        matrix,
        heads["basket_id"].to_numpy(),
        heads["user_idx"].to_numpy().astype(np.int32),
        times,
    )


def _one_hot(parts: list[pl.DataFrame], n_rows: int) -> FeatureMatrix:
    parts = [p.with_columns(pl.col("row").cast(pl.Int64)) for p in parts if p.height]
    if not parts:
        return FeatureMatrix(sp.csr_matrix((n_rows, 0), dtype=np.float32), [])
    pairs = pl.concat(parts).unique()
    names = pairs["feature"].unique().sort()
    col = (
        pairs["feature"]
        .to_frame()
        .join(
            pl.DataFrame({"feature": names, "c": np.arange(len(names))}),
            on="feature",
            how="left",
            maintain_order="left",
        )["c"]
    )
    m = sp.csr_matrix(
        (np.ones(pairs.height, dtype=np.float32), (pairs["row"].to_numpy(), col.to_numpy())),
        shape=(n_rows, len(names)),
    )
    return FeatureMatrix(m, names.to_list())


def fingerprint(
    interactions: pl.DataFrame,
    user_map: IdMap,
    item_map: IdMap,
    config: Any,
    items: pl.DataFrame | None = None,
    users: pl.DataFrame | None = None,
) -> str:
    """sha256 over the cleaned interactions, both id maps, the item and user tables and the
    config (as sorted JSON).

    Interactions enter through their sorted internal columns, so the fingerprint does not
    depend on the order rows arrived in. Everything hashed is in a defined order (sorted ids,
    rows sorted on every hashed column, JSON with sorted keys): two processes loading the same
    files with the same config get the same fingerprint.
    """
    h = hashlib.sha256()
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for m in (user_map, item_map):
        ids = m.external_ids
        h.update("\x00".join(ids.tolist()).encode() if m.is_str else ids.astype(np.int64).tobytes())
    # Rows equal on the dataset's sort keys (a repeated line kept by duplicates: keep) would
    # otherwise enter in whatever order a multi-threaded sort left them.
    cols = ["user_idx", "item_idx", "timestamp", "quantity", "value", "week"]
    interactions = interactions.sort(
        "user_idx", "timestamp", "basket_id", "item_idx", "quantity", "value", "week",
        nulls_last=True, maintain_order=True,
    )  # fmt: skip
    for col in cols:
        arr = interactions[col].to_numpy()
        h.update(np.ascontiguousarray(arr).tobytes())
    for table in (items, users):  # prices, categories, stock and demographics matter too
        h.update(b"\x00" if table is None else table.write_csv().encode())
    baskets = interactions["basket_id"]
    if baskets.dtype == pl.Int64:
        h.update(baskets.to_numpy().tobytes())
    else:
        h.update(baskets.cast(pl.String).str.join("\x00").item().encode())
    return h.hexdigest()


def build_dataset(
    raw: RawData, cleaning: CleaningConfig, config: dict[str, Any] | None = None
) -> Dataset:
    """Clean ``raw``, build id maps and aligned tables, and fingerprint the result.

    Parameters
    ----------
    raw : RawData
        Validated canonical tables.
    cleaning : CleaningConfig
        Cleaning choices.
    config : dict, optional
        The data config, hashed into the fingerprint.
    """
    # Unset exclude_items means the source's default (non-merchandise codes of a shop export).
    exclude = cleaning.exclude_items
    if exclude is None:
        exclude = raw.exclude_items or ExcludeItems()
    interactions, report = clean_interactions(
        raw.interactions, cleaning, raw.source, raw.items, exclude, raw.catalog
    )
    table_items = raw.items
    if table_items is not None and exclude.n_rules:  # never offered either
        table_items = table_items.filter(~exclude.mask(table_items["item_id"], table_items))
    user_map = IdMap.from_ids(interactions["user_id"])
    item_cols = [interactions["item_id"]]
    if table_items is not None:
        item_cols.append(table_items["item_id"])
    item_map = IdMap.from_ids(*item_cols)
    if item_map.is_str:
        interactions = interactions.with_columns(pl.col("item_id").cast(pl.String))
    if user_map.is_str:
        interactions = interactions.with_columns(pl.col("user_id").cast(pl.String))

    interactions = (
        interactions.join(user_map.frame("user_id", "user_idx"), on="user_id", how="left")
        .join(item_map.frame("item_id", "item_idx"), on="item_id", how="left")
        .sort("user_idx", "timestamp", "basket_id", "item_idx", maintain_order=True)
    )

    items = item_map.frame("item_id", "item_idx")
    if table_items is not None:
        table = table_items.with_columns(pl.col("item_id").cast(items.schema["item_id"]))
        items = items.join(table, on="item_id", how="left", maintain_order="left")
    else:
        items = items.with_columns(
            *(
                pl.lit(None, pl.String).alias(c)
                for c in (*ITEM_CATEGORY_LEVELS, "brand", "tags", "text")
            ),
            pl.lit(None, pl.Float64).alias("price"),
            pl.lit(None, pl.Float64).alias("margin"),
            pl.lit(True).alias("in_stock"),
        )
    items = items.with_columns(pl.col("in_stock").fill_null(True))

    users = None
    if raw.users is not None:
        table = raw.users.with_columns(pl.col("user_id").cast(interactions.schema["user_id"]))
        users = user_map.frame("user_id", "user_idx").join(
            table, on="user_id", how="left", maintain_order="left"
        )

    digest = fingerprint(
        interactions,
        user_map,
        item_map,
        {"cleaning": {**asdict(cleaning), "exclude_items": asdict(exclude)}, **(config or {})},
        items,
        users,
    )
    return Dataset(raw.source, interactions, user_map, item_map, items, users, report, digest)
