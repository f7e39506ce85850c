"""The documented input schema and the checks that enforce it.

Every table is converted to canonical column names first (see :mod:`features.readers`), then
checked and coerced here. A problem raises :class:`~features.errors.DataValidationError` naming
the source, the column *as it is called in the file* and what was expected.

Interactions (one row per user x item x basket line)
    ============ ========== ======== =====================================================
    column       dtype      required meaning
    ============ ========== ======== =====================================================
    user_id      int or str yes      customer / household id; null = anonymous row
    item_id      int or str yes      product id
    timestamp    datetime   yes      when it happened (strings parsed, numbers = unix time)
    basket_id    int or str no       order / invoice / basket; default: one basket per
                                     user and timestamp
    quantity     float      no       units bought, negative for returns; default 1
    value        float      no       money paid for the line; default null
    week         int        no       shop's own week number (Complete Journey splits on it)
    ============ ========== ======== =====================================================

Items (one row per item)
    item_id (required); department, category, subcategory, brand (str, optional category
    levels and brand); price, margin (float >= 0, optional); in_stock (bool, default true);
    tags (str, ``|``-separated, optional); text (str, optional).

Users (one row per user)
    user_id (required) plus any attribute columns, read as categorical strings.
"""

from __future__ import annotations

from collections.abc import Mapping

import polars as pl

from features.errors import DataValidationError

INTERACTION_REQUIRED = ("user_id", "item_id", "timestamp")
INTERACTION_OPTIONAL = ("basket_id", "quantity", "value", "week")
ITEM_REQUIRED = ("item_id",)
ITEM_CATEGORY_LEVELS = ("department", "category", "subcategory")
ITEM_OPTIONAL = (*ITEM_CATEGORY_LEVELS, "brand", "price", "margin", "in_stock", "tags", "text")
USER_REQUIRED = ("user_id",)

# What to do about interaction rows without a user: the setting that accepts them.
ANONYMOUS_HINT = (
    "rows without a customer are anonymous sales: to drop them, set "
    "'data.cleaning.anonymous: drop' in the config (the cleaning report counts them)"
)
_INT_TYPES = (pl.Int8, pl.Int16, pl.Int32, pl.Int64, pl.UInt8, pl.UInt16, pl.UInt32, pl.UInt64)
_FLOAT_TYPES = (pl.Float32, pl.Float64)
_MAX_EXAMPLES = 3
_NUMBER = r"^-?\d+(\.\d+)?$"
_ISO = r"^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?)?(Z|[+-]\d{2}:?\d{2})?$"
_INTEGRAL = r"^(-?[1-9]\d*|0)(\.0+)?$"


def _file_name(column: str, names: Mapping[str, str] | None) -> str:
    return (names or {}).get(column, column)


def _examples(df: pl.DataFrame, mask: pl.Series, column: str) -> str:
    rows = df.with_row_index("_row").filter(mask).head(_MAX_EXAMPLES)
    parts = [f"row {r + 1}: {v!r}" for r, v in zip(rows["_row"], rows[column], strict=True)]
    return ", ".join(parts)


def require_columns(
    df: pl.DataFrame, required: tuple[str, ...], source: str, names: Mapping[str, str] | None
) -> None:
    """Raise if a required canonical column is missing; name it as the file should call it."""
    missing = [c for c in required if c not in df.columns]
    if missing:
        wanted = ", ".join(f"'{_file_name(c, names)}'" for c in missing)
        raise DataValidationError(
            source,
            f"missing required column(s) {wanted} (canonical: {', '.join(missing)}); "
            f"found columns: {', '.join(df.columns) or 'none'}",
        )
    if df.height == 0:
        raise DataValidationError(source, "is empty: expected at least one data row")


def coerce_id(
    df: pl.DataFrame,
    column: str,
    source: str,
    names: Mapping[str, str] | None = None,
    allow_null: bool = False,
    null_hint: str = "ids must be present",
) -> pl.DataFrame:
    """Make ``column`` an Int64 or String id column.

    Integral floats (``17850.0``, common in spreadsheet exports) become Int64; other floats are
    rejected. Text ids that are all plain integers (no leading zeros, optionally ``.0``) also
    become Int64, so a CSV and a Parquet copy of one export give the same ids; any other text
    (``"85123A"``, ``"007"``) stays text. Nulls (and empty strings) are rejected unless
    ``allow_null``; ``null_hint`` ends that message (what to do about them).
    """
    dtype = df.schema[column]
    s = df[column]
    if dtype in _INT_TYPES:
        s = _to_int64(df, s, column, source, names)
    elif dtype in _FLOAT_TYPES:
        bad = s.is_not_null() & (s != s.floor())
        if bad.any():
            raise DataValidationError(
                source,
                f"expected integer or string ids, found non-integral numbers ({_examples(df, bad, column)})",
                _file_name(column, names),
            )
        s = _to_int64(df, s, column, source, names)
    elif dtype in (pl.String, pl.Categorical) or isinstance(dtype, pl.Enum):
        s = s.cast(pl.String).str.strip_chars()
        nul = s.str.contains("\x00", literal=True).fill_null(False)
        if nul.any():  # numpy's fixed-width text drops trailing NULs: two ids would become one
            raise DataValidationError(
                source,
                f"ids must not contain NUL characters, {nul.sum()} do",
                _file_name(column, names),
            )
        s = s.set(s == "", None) if (s == "").any() else s
        present = s.drop_nulls()
        if len(present) and present.str.contains(_INTEGRAL).all():
            s = _to_int64(df, s.str.replace(r"\.0+$", ""), column, source, names)
        elif len(present) and present.str.contains(_NUMBER).all():
            fractional = s.str.contains(r"\.\d*[1-9]").fill_null(False)
            if fractional.any():  # 1.5 is a measurement, not an id
                raise DataValidationError(
                    source,
                    f"expected integer or string ids, found non-integral numbers ({_examples(df, fractional, column)})",
                    _file_name(column, names),
                )
            # otherwise ids with leading zeros ("007"): text, so "007" and "7" stay apart
    else:
        raise DataValidationError(
            source,
            f"expected integer or string ids, found dtype {dtype}",
            _file_name(column, names),
        )
    if not allow_null and s.null_count():
        mask = s.is_null()
        raise DataValidationError(
            source,
            f"{s.null_count()} null/empty id(s) ({_examples(df, mask, column)}); {null_hint}",
            _file_name(column, names),
        )
    return df.with_columns(s.alias(column))


def _to_int64(
    df: pl.DataFrame, s: pl.Series, column: str, source: str, names: Mapping[str, str] | None
) -> pl.Series:
    """``s`` as Int64; integral values outside the signed 64-bit range are an error."""
    out = s.cast(pl.Int64, strict=False)
    overflow = out.is_null() & s.is_not_null()
    if overflow.any():
        raise DataValidationError(
            source,
            f"expected integer ids within the signed 64-bit range, {overflow.sum()} are not "
            f"({_examples(df, overflow, column)}); write such ids as text with a non-digit "
            "character",
            _file_name(column, names),
        )
    return out


def coerce_float(
    df: pl.DataFrame, column: str, source: str, names: Mapping[str, str] | None = None
) -> pl.DataFrame:
    """Make ``column`` Float64; values that are present but not numbers are an error."""
    s = df[column]
    if s.dtype in (*_INT_TYPES, *_FLOAT_TYPES):
        parsed = s.cast(pl.Float64)
        _reject_non_finite(df, parsed, column, source, names)
        return df.with_columns(parsed.alias(column))
    if s.dtype == pl.Boolean:
        raise DataValidationError(
            source, "expected numbers, found booleans", _file_name(column, names)
        )
    text = s.cast(pl.String).str.strip_chars()
    parsed = text.cast(pl.Float64, strict=False)
    bad = parsed.is_null() & text.is_not_null() & (text != "")
    if bad.any():
        raise DataValidationError(
            source,
            f"expected numbers, {bad.sum()} value(s) are not ({_examples(df, bad, column)})",
            _file_name(column, names),
        )
    _reject_non_finite(df, parsed, column, source, names)
    return df.with_columns(parsed.alias(column))


def _reject_non_finite(
    df: pl.DataFrame, parsed: pl.Series, column: str, source: str, names: Mapping[str, str] | None
) -> None:
    bad = parsed.is_nan() | parsed.is_infinite()
    if bad.any():
        raise DataValidationError(
            source,
            f"expected finite numbers, {bad.sum()} value(s) are nan/inf ({_examples(df, bad.fill_null(False), column)})",
            _file_name(column, names),
        )


def coerce_int(
    df: pl.DataFrame, column: str, source: str, names: Mapping[str, str] | None = None
) -> pl.DataFrame:
    """Make ``column`` Int64 (no nulls)."""
    df = coerce_float(df, column, source, names) if df.schema[column] not in _INT_TYPES else df
    s = df[column]
    as_float = s.cast(pl.Float64)
    bad = s.is_null() | (as_float != as_float.floor()) | (as_float.abs() >= 2.0**63)
    if bad.any():
        raise DataValidationError(
            source,
            f"expected whole numbers (within the signed 64-bit range) without gaps, "
            f"{bad.sum()} value(s) are not "
            f"({_examples(df, bad, column)})",
            _file_name(column, names),
        )
    return df.with_columns(s.cast(pl.Int64).alias(column))


def _all_numbers(s: pl.Series) -> bool:
    present = s.drop_nulls().str.strip_chars()
    return bool(len(present)) and bool(present.str.contains(_NUMBER).all())


def coerce_timestamp(
    df: pl.DataFrame,
    column: str,
    source: str,
    names: Mapping[str, str] | None = None,
    fmt: str | None = None,
    unit: str = "s",
) -> pl.DataFrame:
    """Make ``column`` a naive ``Datetime[us]``.

    Strings are parsed with ``fmt`` (strftime syntax) or, without it, as ISO-8601 / common
    formats; integers and floats are unix time in ``unit`` (``s``, ``ms``, ``us``). Any value
    that is missing or does not parse is an error.
    """
    s = df[column]
    shown = _file_name(column, names)
    if isinstance(s.dtype, pl.Datetime):
        out = s.dt.replace_time_zone(None) if s.dtype.time_zone else s
        out = out.cast(pl.Datetime("us"))
    elif s.dtype == pl.Date:
        out = s.cast(pl.Datetime("us"))
    elif s.dtype in (*_INT_TYPES, *_FLOAT_TYPES):
        if unit not in ("s", "ms", "us"):
            raise DataValidationError(
                source, f"unknown unix time unit {unit!r}: expected s, ms or us", shown
            )
        scale = {"s": 1_000_000, "ms": 1_000, "us": 1}[unit]
        micros = (s.cast(pl.Float64) * scale).round()
        far = micros.abs() >= 2.0**63  # beyond datetime64[us]: nothing a shop recorded
        if far.any():
            raise DataValidationError(
                source,
                f"unix times in {unit} out of range, {far.sum()} value(s) "
                f"({_examples(df, far.fill_null(False), column)})",
                shown,
            )
        out = micros.cast(pl.Int64).cast(pl.Datetime("us"))
    elif s.dtype == pl.String and fmt is None and _all_numbers(s):
        # Text holding only numbers (a CSV of unix times): numbers, not dates. Eight digits
        # look like YYYYMMDD, which would silently land in 1970: make the user say which.
        text = s.drop_nulls().str.strip_chars()
        eight = text.filter(text.str.contains(r"^\d{8}$"))
        if len(eight):
            raise DataValidationError(
                source,
                f"digit-only timestamps such as {eight[0]!r} are ambiguous (unix time or "
                "YYYYMMDD): set timestamp_format, e.g. '%Y%m%d'",
                shown,
            )
        numbers = s.str.strip_chars().cast(pl.Float64)
        return coerce_timestamp(
            df.with_columns(numbers.alias(column)), column, source, names, fmt, unit
        )
    elif s.dtype == pl.String:
        text = s.str.strip_chars()
        if fmt is None:
            # Without a format only ISO-8601 is read: guessing 12/1/2010 as day- or month-first
            # would silently misdate data.
            not_iso = text.is_not_null() & ~text.str.contains(_ISO).fill_null(False)
            if not_iso.any():
                raise DataValidationError(
                    source,
                    f"{not_iso.sum()} timestamp(s) are not ISO-8601 ({_examples(df, not_iso, column)}); "
                    "set timestamp_format (strftime syntax, e.g. '%m/%d/%Y %H:%M')",
                    shown,
                )
        try:
            out = text.str.to_datetime(format=fmt, strict=False, time_unit="us")
        except pl.exceptions.PolarsError as exc:  # polars could not even infer a format
            raise DataValidationError(
                source,
                f"could not parse timestamps ({exc.__class__.__name__}); first values: "
                f"{text.head(_MAX_EXAMPLES).to_list()}; set timestamp_format (strftime syntax)",
                shown,
            ) from None
        if isinstance(out.dtype, pl.Datetime) and out.dtype.time_zone:
            out = out.dt.convert_time_zone("UTC").dt.replace_time_zone(None)
    else:
        raise DataValidationError(source, f"expected timestamps, found dtype {s.dtype}", shown)
    bad = out.is_null()
    if bad.any():
        expected = f"format {fmt!r}" if fmt else "an ISO-8601 date/time"
        raise DataValidationError(
            source,
            f"{bad.sum()} timestamp(s) missing or unparseable, expected {expected} "
            f"({_examples(df, bad, column)})",
            shown,
        )
    return df.with_columns(out.alias(column))


def coerce_bool(
    df: pl.DataFrame, column: str, source: str, names: Mapping[str, str] | None = None
) -> pl.DataFrame:
    """Make ``column`` Boolean from bools, 0/1 or true/false/yes/no strings."""
    s = df[column]
    if s.dtype == pl.Boolean:
        return df
    if s.dtype in _INT_TYPES:
        bad = ~s.is_in([0, 1]) | s.is_null()
        if bad.any():
            raise DataValidationError(
                source,
                f"expected 0/1 or true/false ({_examples(df, bad, column)})",
                _file_name(column, names),
            )
        return df.with_columns((s == 1).alias(column))
    text = s.cast(pl.String).str.strip_chars().str.to_lowercase()
    truthy, falsy = ["true", "1", "yes", "y", "t"], ["false", "0", "no", "n", "f"]
    bad = ~(text.is_in(truthy) | text.is_in(falsy))
    if bad.any():
        raise DataValidationError(
            source, f"expected true/false ({_examples(df, bad, column)})", _file_name(column, names)
        )
    return df.with_columns(text.is_in(truthy).alias(column))


def validate_interactions(
    df: pl.DataFrame,
    source: str,
    names: Mapping[str, str] | None = None,
    allow_anonymous: bool = False,
    timestamp_format: str | None = None,
    timestamp_unit: str = "s",
) -> pl.DataFrame:
    """Check and coerce an interactions table with canonical column names.

    Returns a frame with exactly the canonical columns: optional ones that were absent are
    filled (``quantity`` = 1, ``value`` = null, ``basket_id`` = one basket per user and
    timestamp, ``week`` = null).
    """
    require_columns(df, INTERACTION_REQUIRED, source, names)
    df = coerce_id(
        df, "user_id", source, names, allow_null=allow_anonymous, null_hint=ANONYMOUS_HINT
    )
    df = coerce_id(df, "item_id", source, names)
    df = coerce_timestamp(df, "timestamp", source, names, timestamp_format, timestamp_unit)
    if "quantity" in df.columns:
        df = coerce_float(df, "quantity", source, names)
        if df["quantity"].null_count():
            raise DataValidationError(
                source,
                f"{df['quantity'].null_count()} missing quantities "
                f"({_examples(df, df['quantity'].is_null(), 'quantity')})",
                _file_name("quantity", names),
            )
    else:
        df = df.with_columns(pl.lit(1.0).alias("quantity"))
    df = (
        coerce_float(df, "value", source, names)
        if "value" in df.columns
        else df.with_columns(pl.lit(None, pl.Float64).alias("value"))
    )
    df = (
        coerce_int(df, "week", source, names)
        if "week" in df.columns
        else df.with_columns(pl.lit(None, pl.Int64).alias("week"))
    )
    if "basket_id" in df.columns:
        df = coerce_id(df, "basket_id", source, names)
    else:
        # No basket column: everything a user did at one instant is one basket.
        df = df.with_columns(
            pl.struct("user_id", "timestamp").rank("dense").cast(pl.Int64).alias("basket_id")
        )
    return df.select(*INTERACTION_REQUIRED, *INTERACTION_OPTIONAL)


def _unique_ids(
    df: pl.DataFrame, column: str, source: str, names: Mapping[str, str] | None
) -> pl.DataFrame:
    dup = df[column].is_duplicated()
    if dup.any():
        kind = column.split("_")[0]
        raise DataValidationError(
            source,
            f"{kind} ids must be unique, {dup.sum()} rows repeat one ({_examples(df, dup, column)})",
            _file_name(column, names),
        )
    return df


def validate_items(
    df: pl.DataFrame, source: str, names: Mapping[str, str] | None = None
) -> pl.DataFrame:
    """Check and coerce an items table; missing optional columns are filled with nulls/defaults."""
    require_columns(df, ITEM_REQUIRED, source, names)
    df = _unique_ids(coerce_id(df, "item_id", source, names), "item_id", source, names)
    for col in (*ITEM_CATEGORY_LEVELS, "brand", "tags", "text"):
        if col in df.columns:
            df = df.with_columns(pl.col(col).cast(pl.String))
        else:
            df = df.with_columns(pl.lit(None, pl.String).alias(col))
    for col in ("price", "margin"):
        if col in df.columns:
            df = coerce_float(df, col, source, names)
            neg = df[col] < 0
            if neg.any():
                raise DataValidationError(
                    source,
                    f"expected values >= 0 ({_examples(df, neg.fill_null(False), col)})",
                    _file_name(col, names),
                )
        else:
            df = df.with_columns(pl.lit(None, pl.Float64).alias(col))
    if "in_stock" in df.columns:
        df = coerce_bool(df, "in_stock", source, names)
    else:
        df = df.with_columns(pl.lit(True).alias("in_stock"))
    return df.select(*ITEM_REQUIRED, *ITEM_OPTIONAL)


def validate_users(
    df: pl.DataFrame, source: str, names: Mapping[str, str] | None = None
) -> pl.DataFrame:
    """Check a users table; every other column becomes a categorical string attribute."""
    require_columns(df, USER_REQUIRED, source, names)
    df = _unique_ids(coerce_id(df, "user_id", source, names), "user_id", source, names)
    attrs = [c for c in df.columns if c != "user_id"]
    return df.with_columns([pl.col(c).cast(pl.String) for c in attrs])
