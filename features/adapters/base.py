"""The container every adapter returns."""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from features.cleaning import ExcludeItems


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
    exclude_items : ExcludeItems or None
        The source's default for the ``exclude_items`` cleaning step (its known
        non-merchandise codes); None: exclude nothing unless configured.
    catalog : polars.Series or None
        Ids of the user's own items table when ``items`` also holds items derived from the
        interactions (the ``unknown_items`` step checks against it); None: ``items``' ids.
    """

    source: str
    interactions: pl.DataFrame
    items: pl.DataFrame | None = None
    users: pl.DataFrame | None = None
    exclude_items: ExcludeItems | None = None
    catalog: pl.Series | None = None
