"""The container every adapter returns."""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl


@dataclass
class RawData:
    """Validated, not yet cleaned, canonical tables (see :mod:`features.schema`).

    Attributes
    ----------
    source : str
        Human-readable name of where the data came from.
    interactions : polars.DataFrame
        Canonical interaction columns.
    items : polars.DataFrame or None
        Canonical item columns, one row per item.
    users : polars.DataFrame or None
        ``user_id`` plus attribute columns, one row per user.
    """

    source: str
    interactions: pl.DataFrame
    items: pl.DataFrame | None = None
    users: pl.DataFrame | None = None
