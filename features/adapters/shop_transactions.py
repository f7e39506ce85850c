"""A point-of-sale export: one row per invoice line (the "Online Retail" layout).

Expected columns (names configurable through ``FileSpec.columns``):

============ ============= ============ ================================================
key          canonical key default name meaning
============ ============= ============ ================================================
invoice      basket_id     InvoiceNo    invoice number; a leading ``C`` marks a cancellation
stock_code   item_id       StockCode    product code
description  text          Description  product text
quantity     quantity      Quantity     units (negative on cancellations and returns)
invoice_date timestamp     InvoiceDate  date/time (set ``timestamp_format`` if not ISO-8601)
unit_price   price         UnitPrice    price per unit
customer_id  user_id       CustomerID   customer; empty for anonymous sales
country      country       Country      customer's country
value        value         (none)       line total, for exports without a unit price
============ ============= ============ ================================================

A mapping key may be any of the three spellings of a column: the adapter's key
(``customer_id: Customer ID``), the canonical key of the README (``user_id: Customer ID``) or
the default name (``CustomerID: Customer ID``); naming one column twice is an error.

Cancelled invoice lines are turned into negative quantities (if not already) so the
``returns`` cleaning setting decides what happens to them; rows without a customer are
anonymous and follow the ``anonymous`` setting.

Every choice is deterministic, so one file always gives one fingerprint: an item's
description is its most frequent (trimmed) description, ties going to the
lexicographically smallest; a customer's country likewise; an item's price is the median
unit price of its sales.

A product file (``data.items``, canonical item columns) and a customer file (``data.users``)
may be given too: their values win over the ones derived from the lines (a product file's
price over the median price paid), their extra items and users are added, and
``unknown_items`` checks the lines against the product file.

The source's default for the ``exclude_items`` cleaning step is :data:`NON_MERCHANDISE`:
the postage, fee, adjustment, sample and gift-voucher codes of the Online Retail data.
"""

from __future__ import annotations

import polars as pl

from features import schema
from features.adapters.base import RawData
from features.cleaning import ExcludeItems
from features.errors import DataValidationError
from features.readers import FileSpec, read_items, read_raw, read_users

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
# The README's canonical names for the same columns, accepted as mapping keys.
CANONICAL_KEYS = {
    "basket_id": "invoice",
    "item_id": "stock_code",
    "text": "description",
    "timestamp": "invoice_date",
    "price": "unit_price",
    "user_id": "customer_id",
}
_OPTIONAL = ("description", "unit_price", "country", "value")

# Rows that are not sales of a product in the Online Retail data (UCI): postage (POST, DOT),
# manual entries (M), fees (BANK CHARGES, AMAZONFEE, CRUK commission), samples (S), carriage
# (C2), discounts (D), cushion-pad and bad-debt adjustments (PADS, B), test and adjustment
# codes of Online Retail II, and gift vouchers (gift_0001_10...). Descriptions catch the same
# lines under other codes.
NON_MERCHANDISE = ExcludeItems(
    ids=["POST", "DOT", "M", "m", "BANK CHARGES", "AMAZONFEE", "S", "C2", "CRUK", "D", "PADS", "B"],
    id_patterns=["gift_0001_.*", "ADJUST\\d*", "TEST\\d+"],
    description_patterns=[
        "postage",
        "dotcom postage",
        "manual",
        "discount",
        "carriage",
        "samples?",
        "bank charges",
        "amazon fee",
        "cruk commission",
        "adjust bad debt",
        ".*gift voucher.*",
    ],
)


def resolve_columns(columns: dict[str, str], source: str) -> dict[str, str]:
    """The file's column name for each adapter key, from a mapping in any accepted spelling."""
    by_default_name = {name: key for key, name in DEFAULT_COLUMNS.items()}
    names = dict(DEFAULT_COLUMNS)
    given: dict[str, str] = {}
    for spelled, file_column in columns.items():
        key = (
            spelled
            if spelled in DEFAULT_COLUMNS or spelled == "value"
            else CANONICAL_KEYS.get(spelled, by_default_name.get(spelled))
        )
        if key is None:
            accepted = sorted({*DEFAULT_COLUMNS, "value", *CANONICAL_KEYS, *by_default_name})
            raise DataValidationError(
                source,
                f"unknown column key {spelled!r} in the mapping; expected one of {accepted}",
            )
        if key in given:
            raise DataValidationError(
                source,
                f"column keys {given[key]!r} and {spelled!r} both map the {key} column: keep one",
            )
        given[key] = spelled
        names[key] = file_column
    return names


def most_common(df: pl.DataFrame, key: str, column: str) -> pl.DataFrame:
    """Per ``key``, the most frequent non-null ``column`` value; ties: the smallest value.

    A plain ``mode()`` returns tied values in hash order, which differs between processes.
    """
    return (
        df.filter(pl.col(column).is_not_null())
        .group_by(key, column)
        .len()
        .sort([key, "len", column], descending=[False, True, False])
        .group_by(key, maintain_order=True)
        .first()
        .select(key, column)
    )


def _merge(derived: pl.DataFrame, table: pl.DataFrame, key: str) -> pl.DataFrame:
    """Rows of both tables by ``key``; ``table``'s non-null values win over ``derived``'s."""
    if derived.schema[key] != table.schema[key]:  # 7 and "7" are one id
        derived = derived.with_columns(pl.col(key).cast(pl.String))
        table = table.with_columns(pl.col(key).cast(pl.String))
    common = [c for c in derived.columns if c != key and c in table.columns]
    joined = derived.join(table, on=key, how="full", coalesce=True, suffix="_file")
    return (
        joined.with_columns(pl.coalesce(f"{c}_file", c).alias(c) for c in common)
        .drop(f"{c}_file" for c in common)
        .sort(key)
    )


def load_shop_transactions(
    spec: FileSpec,
    allow_anonymous: bool = True,
    items: FileSpec | None = None,
    users: FileSpec | None = None,
) -> RawData:
    """Read a shop export and derive interactions, items (text, median price) and users (country).

    Parameters
    ----------
    spec : FileSpec
        The export (``data.interactions``).
    allow_anonymous : bool
        Whether lines without a customer are kept (``data.cleaning.anonymous: drop``).
    items, users : FileSpec, optional
        A product file (canonical item columns) and a customer file; their values win over
        the derived ones.
    """
    names = resolve_columns(dict(spec.columns), spec.path)
    raw = read_raw(spec, "data.interactions")
    missing = [
        f"'{names[k]}' ({k})" for k in names if k not in _OPTIONAL and names[k] not in raw.columns
    ]
    if "value" in names and names["value"] not in raw.columns:
        missing.append(f"'{names['value']}' (value)")
    if missing:
        raise DataValidationError(
            spec.path,
            f"missing required column(s) {', '.join(missing)}; found columns: {', '.join(raw.columns)}",
        )
    present = {c: names.get(c) in raw.columns for c in _OPTIONAL}
    df = raw.select(
        pl.col(names["customer_id"]).alias("user_id"),
        pl.col(names["stock_code"]).alias("item_id"),
        pl.col(names["invoice_date"]).alias("timestamp"),
        pl.col(names["invoice"]).alias("basket_id"),
        pl.col(names["quantity"]).alias("quantity"),
        *(
            pl.col(names[c]).alias(c) if present[c] else pl.lit(None, pl.String).alias(c)
            for c in _OPTIONAL
        ),
    )
    canon = {
        "user_id": names["customer_id"],
        "item_id": names["stock_code"],
        "timestamp": names["invoice_date"],
        "basket_id": names["invoice"],
        "quantity": names["quantity"],
        "unit_price": names["unit_price"],
        "value": names.get("value", "value"),
    }
    df = schema.coerce_float(df, "unit_price", spec.path, canon)
    df = schema.coerce_float(df, "quantity", spec.path, canon)
    df = schema.coerce_float(df, "value", spec.path, canon)
    cancelled = pl.col("basket_id").cast(pl.String).str.strip_chars().str.starts_with("C")
    if not present["value"]:
        value = pl.col("quantity") * pl.col("unit_price")
    else:  # a line total: cancellations count negative, like their quantity
        value = pl.when(cancelled).then(-pl.col("value").abs()).otherwise(pl.col("value"))
    if not present["unit_price"] and present["value"]:
        unit = pl.when(pl.col("quantity") != 0).then(
            pl.col("value").abs() / pl.col("quantity").abs()
        )
        df = df.with_columns(unit.alias("unit_price"))
    df = df.with_columns(
        pl.when(cancelled)
        .then(-pl.col("quantity").abs())
        .otherwise(pl.col("quantity"))
        .alias("quantity"),
    ).with_columns(value.alias("value"))

    interactions = schema.validate_interactions(
        df.select("user_id", "item_id", "timestamp", "basket_id", "quantity", "value"),
        spec.path,
        canon,
        allow_anonymous=allow_anonymous,
        timestamp_format=spec.timestamp_format,
        timestamp_unit=spec.timestamp_unit,
    )
    lines = df.select(
        "item_id",
        pl.col("description").cast(pl.String).str.strip_chars().replace("", None),
        "unit_price",
        "quantity",
        "user_id",
        pl.col("country").cast(pl.String).str.strip_chars().replace("", None),
    )
    lines = schema.coerce_id(lines, "item_id", spec.path, canon)
    price = (
        lines.filter((pl.col("quantity") > 0) & (pl.col("unit_price") > 0))
        .group_by("item_id")
        .agg(pl.col("unit_price").median().alias("price"))
    )
    derived_items = (
        lines.select("item_id")
        .unique()
        .join(most_common(lines, "item_id", "description"), on="item_id", how="left")
        .join(price, on="item_id", how="left")
        .rename({"description": "text"})
        .sort("item_id")
    )
    item_table = schema.validate_items(derived_items, spec.path, canon)
    catalog = None
    if items is not None:
        given = read_items(items, key="data.items")
        catalog = given["item_id"]
        item_table = _merge(item_table, given, "item_id")

    user_table = None
    known = schema.coerce_id(lines, "user_id", spec.path, canon, allow_null=True).filter(
        pl.col("user_id").is_not_null()
    )
    if known.height:
        derived_users = (
            known.select("user_id")
            .unique()
            .join(most_common(known, "user_id", "country"), on="user_id", how="left")
            .sort("user_id")
        )
        user_table = schema.validate_users(derived_users, spec.path, canon)
    if users is not None:
        given = read_users(users, key="data.users")
        user_table = given if user_table is None else _merge(user_table, given, "user_id")
    return RawData(
        f"shop transactions ({spec.path})",
        interactions,
        item_table,
        user_table,
        exclude_items=NON_MERCHANDISE,
        catalog=catalog,
    )
