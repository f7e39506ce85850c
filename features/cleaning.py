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
        counts = df.select(
            pl.col("user_id").n_unique().alias("u"),
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
    df = interactions
    report.add("input", "-", df.height, df)

    before = df.height
    if config.anonymous == "drop":
        df = df.filter(pl.col("user_id").is_not_null())
    report.add("anonymous", config.anonymous, before, df)

    before = df.height
    if config.returns == "net":
        net = df.group_by("user_id", "item_id").agg(pl.col("quantity").sum().alias("_net"))
        df = df.join(net, on=["user_id", "item_id"], how="left")
        df = df.filter((pl.col("quantity") >= 0) & (pl.col("_net") > 0)).drop("_net")
    else:
        df = df.filter(pl.col("quantity") >= 0)
    report.add("returns", config.returns, before, df)

    before = df.height
    if config.zero_quantity == "drop":
        df = df.filter(pl.col("quantity") != 0)
    report.add("zero_quantity", config.zero_quantity, before, df)

    before = df.height
    if config.duplicates == "drop":
        df = df.unique(maintain_order=True)
    report.add("duplicates", config.duplicates, before, df)

    if items is not None:
        before = df.height
        if config.unknown_items == "drop":
            df = df.filter(pl.col("item_id").is_in(items["item_id"].implode()))
        report.add("unknown_items", config.unknown_items, before, df)

    before = df.height
    if config.min_item_interactions > 1:
        n = pl.len().over("item_id")
        df = df.filter(n >= config.min_item_interactions)
    report.add("min_item_interactions", config.min_item_interactions, before, df)

    before = df.height
    if config.min_user_interactions > 1:
        n = pl.len().over("user_id")
        df = df.filter(n >= config.min_user_interactions)
    report.add("min_user_interactions", config.min_user_interactions, before, df)
    return df, report
