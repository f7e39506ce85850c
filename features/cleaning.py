"""Cleaning steps that are choices, each a setting, each counted in a :class:`CleaningReport`.

Order of steps (each sees the previous step's output):

1. ``anonymous``: rows without a user id (``drop``; with ``error`` they never get here, the
   reader rejects them).
2. ``exclude_items``: rows of items that are not merchandise (postage, bank charges, manual
   adjustments, samples, gift vouchers), matched by id, id pattern or description pattern
   (:class:`ExcludeItems`). Unset, the source's default applies: the Online Retail codes
   for ``shop_transactions``, nothing for the others. The items are also left out of the
   item table, so they can never be offered.
3. ``returns``: rows with negative quantity (returns, cancelled invoices). ``drop`` removes
   them; ``net`` also removes every purchase of a user x item pair whose returns cancel
   (net quantity <= 0) its purchases.
4. ``zero_quantity``: rows with quantity == 0 (``drop`` or ``keep``).
5. ``duplicates``: exact duplicate rows (``drop`` or ``keep``).
6. ``unknown_items``: items missing from the items table (``keep`` or ``drop``; only when an
   items table is given).
7. ``min_item_interactions`` then ``min_user_interactions``: items / users with fewer rows
   than the threshold are removed (one pass each, in that order).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import polars as pl

from features.errors import ConfigError


@dataclass(frozen=True)
class ExcludeItems:
    """Items that are not merchandise, dropped by the ``exclude_items`` cleaning step.

    Attributes
    ----------
    ids : list of str or int
        Item ids, compared as text (``85123`` and ``"85123"`` are the same id).
    id_patterns : list of str
        Regular expressions (Rust ``regex`` syntax, as polars) that must match the *whole*
        item id, case-sensitively: ``gift_0001_.*``.
    description_patterns : list of str
        Regular expressions that must match the whole item description (the items table's
        ``text``, trimmed), case-insensitively: ``.*postage.*``. Ignored without descriptions.
    """

    __pydantic_config__: ClassVar[dict[str, str]] = {"extra": "forbid"}

    ids: list[str | int] = field(default_factory=list)
    id_patterns: list[str] = field(default_factory=list)
    description_patterns: list[str] = field(default_factory=list)

    @property
    def n_rules(self) -> int:
        return len(self.ids) + len(self.id_patterns) + len(self.description_patterns)

    def check(self, key: str = "data.cleaning.exclude_items", source: str | None = None) -> None:
        """Raise :class:`ConfigError` naming the first pattern that is not a valid regex."""
        for name in ("id_patterns", "description_patterns"):
            for i, pattern in enumerate(getattr(self, name)):
                try:
                    pl.Series([""], dtype=pl.String).str.contains(pattern)
                except pl.exceptions.PolarsError as exc:
                    lines = [x.strip() for x in str(exc).splitlines()]
                    problem = next((x for x in lines if x.startswith("error:")), lines[0])[:200]
                    raise ConfigError(
                        f"{key}.{name}[{i}]",
                        f"{pattern[:80]!r} is not a valid regex: {problem}",
                        source,
                    ) from None

    def mask(self, item_ids: pl.Series, items: pl.DataFrame | None = None) -> pl.Series:
        """Boolean per entry of ``item_ids``: True where the item is excluded.

        ``items`` (canonical items table) supplies the descriptions.
        """
        if self.n_rules == 0:
            return pl.Series(np.zeros(len(item_ids), dtype=bool))
        self.check()
        text_ids = item_ids.cast(pl.String)
        ids = text_ids.unique()
        hit = ids.is_in(pl.Series([str(i) for i in self.ids], dtype=pl.String).implode())
        for pattern in self.id_patterns:
            hit = hit | ids.str.contains(f"^(?:{pattern})$")
        if self.description_patterns and items is not None:
            either = "|".join(f"(?:{p})" for p in self.description_patterns)
            described = items.select(
                pl.col("item_id").cast(pl.String),
                pl.col("text").cast(pl.String).str.strip_chars(),
            ).filter(pl.col("text").str.contains(f"(?i)^(?:{either})$"))
            hit = hit | ids.is_in(described["item_id"].implode())
        excluded = ids.filter(hit.fill_null(False))
        return text_ids.is_in(excluded.implode()).fill_null(False)


@dataclass(frozen=True)
class CleaningConfig:
    """Cleaning settings. Defaults keep the data as close to raw as is sensible."""

    __pydantic_config__: ClassVar[dict[str, str]] = {
        "extra": "forbid"
    }  # config validation rejects unknown keys

    anonymous: Literal["error", "drop"] = "error"
    returns: Literal["drop", "net"] = "drop"
    zero_quantity: Literal["drop", "keep"] = "drop"
    duplicates: Literal["drop", "keep"] = "drop"
    unknown_items: Literal["keep", "drop"] = "keep"
    min_item_interactions: int = 1
    min_user_interactions: int = 1
    # None: the source's default (shop_transactions: Online Retail's non-merchandise codes).
    exclude_items: ExcludeItems | None = None


@dataclass(frozen=True)
class StepCount:
    """Counts after one cleaning step."""

    step: str
    setting: str
    rows_before: int
    rows_after: int
    users: int
    items: int
    baskets: int

    @property
    def removed(self) -> int:
        return self.rows_before - self.rows_after


@dataclass
class CleaningReport:
    """What cleaning did: counts before and after each step. Logged with every training run."""

    source: str
    steps: list[StepCount] = field(default_factory=list)

    def add(self, step: str, setting: Any, before: int, df: pl.DataFrame) -> None:
        """Record a step; ``df`` is what remains after it (only its id columns are read)."""
        counts = df.select(
            pl.col("user_id").drop_nulls().n_unique().alias("u"),
            pl.col("item_id").n_unique().alias("i"),
            pl.col("basket_id").n_unique().alias("b"),
        ).row(0)
        self.steps.append(StepCount(step, str(setting), before, df.height, *counts))

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "steps": [{**asdict(s), "removed": s.removed} for s in self.steps],
        }

    def format_table(self) -> str:
        header = f"{'step':<24}{'setting':<10}{'rows before':>13}{'removed':>10}{'rows after':>12}"
        header += f"{'users':>8}{'items':>8}{'baskets':>9}"
        lines = [f"data: {self.source}", header, "-" * len(header)]
        for s in self.steps:
            lines.append(
                f"{s.step:<24}{s.setting:<10}{s.rows_before:>13,}{s.removed:>10,}{s.rows_after:>12,}"
                f"{s.users:>8,}{s.items:>8,}{s.baskets:>9,}"
            )
        return "\n".join(lines)


def clean_interactions(
    interactions: pl.DataFrame,
    config: CleaningConfig,
    source: str,
    items: pl.DataFrame | None = None,
    exclude: ExcludeItems | None = None,
    catalog: pl.Series | None = None,
) -> tuple[pl.DataFrame, CleaningReport]:
    """Apply the cleaning steps in order and count each.

    Parameters
    ----------
    interactions : polars.DataFrame
        Validated interactions (canonical columns, see :mod:`features.schema`).
    config : CleaningConfig
        The choices.
    source : str
        Name of the data, for the report.
    items : polars.DataFrame, optional
        Validated items table, for the ``unknown_items`` step and item descriptions.
    exclude : ExcludeItems, optional
        The effective ``exclude_items`` rules (``config.exclude_items`` resolved against the
        source's default); default: ``config.exclude_items`` or none.
    catalog : polars.Series, optional
        Item ids of the user's own items table, when ``items`` also holds items derived from
        the interactions: ``unknown_items`` checks against it.

    Returns
    -------
    (polars.DataFrame, CleaningReport)
        Cleaned interactions and the report.
    """
    report = CleaningReport(source)
    # Steps narrow one boolean mask over the input; rows are copied once at the end, which
    # keeps peak memory near the size of the input rather than a copy per step.
    ids = interactions.select("user_id", "item_id", "basket_id")
    keep = pl.Series(np.ones(interactions.height, dtype=bool))

    def step(name: str, setting: Any, drop: pl.Series | None) -> None:
        nonlocal keep
        before = int(keep.sum())
        if drop is not None:
            keep = keep & ~drop.fill_null(False)
        if report.steps and int(keep.sum()) == before:  # nothing removed: counts unchanged
            last = report.steps[-1]
            report.steps.append(
                StepCount(name, str(setting), before, before, last.users, last.items, last.baskets)
            )
        else:
            report.add(name, setting, before, ids.filter(keep))

    step("input", "-", None)
    user, qty = interactions["user_id"], interactions["quantity"]
    step("anonymous", config.anonymous, user.is_null() if config.anonymous == "drop" else None)
    rule = exclude if exclude is not None else (config.exclude_items or ExcludeItems())
    step(
        "exclude_items",
        f"{rule.n_rules} rules" if rule.n_rules else "none",
        rule.mask(interactions["item_id"], items) if rule.n_rules else None,
    )
    if config.returns == "net":
        # Net over the rows still kept: a pair whose returns cancel its purchases goes.
        net = (
            interactions.with_columns(
                pl.when(keep).then(pl.col("quantity")).otherwise(0.0).alias("_q")
            )
            .select(pl.col("_q").sum().over("user_id", "item_id"))
            .to_series()
        )
        step("returns", config.returns, (qty < 0) | (net <= 0))
    else:
        step("returns", config.returns, qty < 0)
    step(
        "zero_quantity",
        config.zero_quantity,
        (qty == 0) if config.zero_quantity == "drop" else None,
    )
    if config.duplicates == "drop":
        # Exact duplicates agree on the key columns first: hash those (cheap), compare whole
        # rows only among the candidates. The keep flag is part of the compared row, so only
        # duplicates among kept rows count.
        keys = interactions.select("user_id", "item_id", "basket_id", "timestamp").with_columns(
            keep.alias("_k")
        )
        candidate = keys.is_duplicated()
        duplicate = pl.Series(np.zeros(interactions.height, dtype=bool))
        if candidate.any():
            rows = interactions.with_columns(keep.alias("_keep")).filter(candidate)
            first = rows.select(pl.struct(pl.all()).is_first_distinct()).to_series()
            duplicate = duplicate.scatter(np.flatnonzero(candidate.to_numpy()), ~first)
        step("duplicates", config.duplicates, duplicate & keep)
    else:
        step("duplicates", config.duplicates, None)
    if items is not None:
        known = catalog if catalog is not None else items["item_id"]
        item_ids = interactions["item_id"]
        if known.dtype != item_ids.dtype:  # 7 and "7" are one id: compare as text
            item_ids, known = item_ids.cast(pl.String), known.cast(pl.String)
        unknown = ~item_ids.is_in(known.implode())
        step(
            "unknown_items",
            config.unknown_items,
            unknown if config.unknown_items == "drop" else None,
        )
    for name, column in (
        ("min_item_interactions", "item_id"),
        ("min_user_interactions", "user_id"),
    ):
        threshold = getattr(config, name)
        if threshold > 1:
            n = (
                ids.with_columns(keep.alias("_k"))
                .select(pl.col("_k").cast(pl.Int64).sum().over(column))
                .to_series()
            )
            step(name, threshold, n < threshold)
        else:
            step(name, threshold, None)
    return interactions.filter(keep), report
