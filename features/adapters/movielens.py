"""MovieLens-100K files (``u.data``, ``u.item``, ``u.user``) from a local folder.

Nothing is downloaded: point ``path`` at the unpacked ``ml-100k`` folder. A rating is an
interaction (``value`` = rating); there are no baskets, so a basket is a user's ratings on one
calendar day (UTC).
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from features import schema
from features.adapters.base import RawData
from features.errors import DataValidationError
from features.readers import FileSpec, read_raw

GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)


def _read(path: Path, separator: str, names: list[str], encoding: str = "latin-1") -> pl.DataFrame:
    spec = FileSpec(str(path), separator=separator, encoding=encoding, has_header=False)
    raw = read_raw(spec, key="data.path")
    if raw.width != len(names):
        raise DataValidationError(
            str(path),
            f"expected {len(names)} '{separator}'-separated fields per line, found {raw.width}",
        )
    return raw.rename(dict(zip(raw.columns, names, strict=True)))


def load_movielens_100k(path: str) -> RawData:
    """Load a MovieLens-100K folder as canonical tables."""
    folder = Path(path)
    if not folder.is_dir():
        raise DataValidationError(
            str(folder), "MovieLens-100K folder not found (expected u.data, u.item, u.user)"
        )
    data_file = folder / "u.data"
    ratings = _read(data_file, "\t", ["user_id", "item_id", "value", "timestamp"])
    ratings = ratings.with_columns(pl.col("timestamp").cast(pl.Int64, strict=False).alias("_ts"))
    bad = ratings["_ts"].is_null()
    if bad.any():
        raise DataValidationError(
            str(data_file),
            f"expected unix seconds, {bad.sum()} value(s) are not",
            "timestamp (field 4)",
        )
    ratings = ratings.with_columns(pl.col("_ts").alias("timestamp")).drop("_ts")
    ratings = ratings.with_columns(
        pl.col("user_id").cast(pl.Int64, strict=False),
        pl.col("item_id").cast(pl.Int64, strict=False),
    )
    for col, field in (("user_id", "field 1"), ("item_id", "field 2")):
        if ratings[col].null_count():
            raise DataValidationError(str(data_file), "expected integer ids", f"{col} ({field})")
    interactions = schema.validate_interactions(ratings, str(data_file))
    interactions = interactions.with_columns(
        pl.struct(pl.col("user_id"), pl.col("timestamp").dt.date())
        .rank("dense")
        .cast(pl.Int64)
        .alias("basket_id")
    )

    items = None
    item_file = folder / "u.item"
    if item_file.is_file():
        cols = ["item_id", "text", "release_date", "video_release_date", "url", *GENRES]
        raw = _read(item_file, "|", cols)
        flags = [pl.when(pl.col(g) == "1").then(pl.lit(g)) for g in GENRES]
        raw = raw.with_columns(
            pl.concat_str(flags, separator="|", ignore_nulls=True).alias("tags"),
            pl.col("item_id").cast(pl.Int64, strict=False),
        )
        items = schema.validate_items(raw.select("item_id", "text", "tags"), str(item_file))
        # The first listed genre serves as the item's category (e.g. for diversity).
        items = items.with_columns(pl.col("tags").str.split("|").list.first().alias("category"))

    users = None
    user_file = folder / "u.user"
    if user_file.is_file():
        raw = _read(user_file, "|", ["user_id", "age", "gender", "occupation", "zip"])
        age = raw["age"].str.strip_chars().cast(pl.Int64, strict=False)
        if age.null_count():
            raise DataValidationError(
                str(user_file),
                f"expected whole-number ages, {age.null_count()} value(s) are not",
                "age (field 2)",
            )
        band = (
            pl.when(age < 25)
            .then(pl.lit("<25"))
            .when(age < 35)
            .then(pl.lit("25-34"))
            .when(age < 50)
            .then(pl.lit("35-49"))
            .otherwise(pl.lit("50+"))
        )
        raw = raw.with_columns(pl.col("user_id").cast(pl.Int64, strict=False), band.alias("age"))
        users = schema.validate_users(
            raw.select("user_id", "age", "gender", "occupation"), str(user_file)
        )
    return RawData(f"MovieLens-100K ({folder})", interactions, items, users)
