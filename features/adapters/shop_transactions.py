"""A point-of-sale export: one row per invoice line (the "Online Retail" layout).

Expected columns (names configurable through ``FileSpec.columns``, keys below):

========== ============== ===================================================
key        default name   meaning
========== ============== ===================================================
invoice    InvoiceNo      invoice number; a leading ``C`` marks a cancellation
stock_code StockCode      product code
description Description   product text
quantity   Quantity       units (negative on cancellations and returns)
invoice_date InvoiceDate  date/time (set ``timestamp_format`` if not ISO-8601)
unit_price UnitPrice      price per unit
customer_id CustomerID    customer; empty for anonymous sales
country    Country        customer's country
========== ============== ===================================================

Cancelled invoice lines are turned into negative quantities (if not already) so the
``returns`` cleaning setting decides what happens to them; rows without a customer are
anonymous and follow the ``anonymous`` setting.
"""

from __future__ import annotations

import polars as pl

from features import schema
from features.adapters.base import RawData
from features.errors import DataValidationError
from features.readers import FileSpec, read_raw

DEFAULT_COLUMNS = {
    "invoice": "InvoiceNo",
    "stock_code": "StockCode",
    "description": "Description",
    "quantity": "Quantity",
    "invoice_date": "InvoiceDate",
    "unit_price": "UnitPrice",
    "customer_id": "CustomerID",
    "country": "Country",
}
_OPTIONAL = ("description", "unit_price", "country")


def load_shop_transactions(spec: FileSpec, allow_anonymous: bool = True) -> RawData:
    """Read a shop export and derive interactions, items (text, median price) and users (country)."""
    names = {**DEFAULT_COLUMNS, **dict(spec.columns)}
    unknown = set(spec.columns) - set(DEFAULT_COLUMNS)
    if unknown:
        raise DataValidationError(
            spec.path,
            f"unknown column key(s) {sorted(unknown)} in the mapping; expected keys: {sorted(DEFAULT_COLUMNS)}",
        )
    raw = read_raw(spec)
    missing = [
        f"'{names[k]}' ({k})" for k in names if k not in _OPTIONAL and names[k] not in raw.columns
    ]
    if missing:
        raise DataValidationError(
            spec.path,
            f"missing required column(s) {', '.join(missing)}; found columns: {', '.join(raw.columns)}",
        )
    df = raw.select(
        pl.col(names["customer_id"]).alias("user_id"),
        pl.col(names["stock_code"]).alias("item_id"),
        pl.col(names["invoice_date"]).alias("timestamp"),
        pl.col(names["invoice"]).alias("basket_id"),
        pl.col(names["quantity"]).alias("quantity"),
        *(
            pl.col(names[c]).alias(c)
            if names[c] in raw.columns
            else pl.lit(None, pl.String).alias(c)
            for c in ("unit_price", "description", "country")
        ),
    )
    canon = {
        "user_id": names["customer_id"],
        "item_id": names["stock_code"],
        "timestamp": names["invoice_date"],
        "basket_id": names["invoice"],
        "quantity": names["quantity"],
        "unit_price": names["unit_price"],
    }
    df = schema.coerce_float(df, "unit_price", spec.path, canon)
    df = schema.coerce_float(df, "quantity", spec.path, canon)
    cancelled = pl.col("basket_id").cast(pl.String).str.strip_chars().str.starts_with("C")
    df = df.with_columns(
        pl.when(cancelled)
        .then(-pl.col("quantity").abs())
        .otherwise(pl.col("quantity"))
        .alias("quantity"),
    ).with_columns((pl.col("quantity") * pl.col("unit_price")).alias("value"))

    interactions = schema.validate_interactions(
        df.select("user_id", "item_id", "timestamp", "basket_id", "quantity", "value"),
        spec.path,
        canon,
        allow_anonymous=allow_anonymous,
        timestamp_format=spec.timestamp_format,
        timestamp_unit=spec.timestamp_unit,
    )
    lines = df.select("item_id", "description", "unit_price", "quantity", "user_id", "country")
    lines = schema.coerce_id(lines, "item_id", spec.path, canon)
    items = (
        lines.group_by("item_id")
        .agg(
            pl.col("description").drop_nulls().mode().first().alias("text"),
            pl.col("unit_price")
            .filter((pl.col("quantity") > 0) & (pl.col("unit_price") > 0))
            .median()
            .alias("price"),
        )
        .sort("item_id")
    )
    items = schema.validate_items(items, spec.path, canon)
    users = None
    known = schema.coerce_id(lines, "user_id", spec.path, canon, allow_null=True).filter(
        pl.col("user_id").is_not_null()
    )
    if known.height:
        users = (
            known.group_by("user_id")
            .agg(pl.col("country").drop_nulls().mode().first().alias("country"))
            .sort("user_id")
        )
        users = schema.validate_users(users, spec.path, canon)
    return RawData(f"shop transactions ({spec.path})", interactions, items, users)
