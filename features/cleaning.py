"""Cleaning steps that are choices, each a setting, each counted in a :class:`CleaningReport`.

Order of steps (each sees the previous step's output):

1. ``anonymous``: rows without a user id (``drop``; with ``error`` they never get here, the
   reader rejects them).
2. ``returns``: rows with negative quantity (returns, cancelled invoices). ``drop`` removes
   them; ``net`` also removes every purchase of a user x item pair whose returns cancel
   (net quantity <= 0) its purchases.
3. ``zero_quantity``: rows with quantity == 0 (``drop`` or ``keep``).
4. ``duplicates``: exact duplicate rows (``drop`` or ``keep``).
5. ``unknown_items``: items missing from the items table (``keep`` or ``drop``; only when an
   items table is given).
6. ``min_item_interactions`` then ``min_user_interactions``: items / users with fewer rows
   than the threshold are removed (one pass each, in that order).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import polars as pl


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
        Validated items table, for the ``unknown_items`` step.

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
        unknown = ~interactions["item_id"].is_in(items["item_id"].implode())
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
