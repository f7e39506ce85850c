"""Read CSV and Parquet files (compressed too) into canonical column names.

A shop's own export fits without new code: the config maps each canonical column to the
file's column name (``columns: {user_id: CustomerID, item_id: StockCode, ...}``).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import polars as pl

from features import schema
from features.errors import DataValidationError

_COMPRESSIONS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


@dataclass(frozen=True)
class FileSpec:
    """Where a table is and how to read it.

    Parameters
    ----------
    path : str
        CSV (``.csv``, ``.tsv``, ``.txt``) or Parquet file; CSV may be compressed
        (``.gz``, ``.bz2``, ``.xz``, ``.zip`` holding one file).
    columns : mapping of str to str
        Canonical column name -> the file's column name. Canonical columns not listed are
        looked up under their own name.
    separator : str
        CSV field separator.
    encoding : str
        CSV text encoding (``utf8`` or ``latin-1``...).
    has_header : bool
        Whether the CSV's first row names the columns (if not, columns are ``column_1``...).
    timestamp_format : str, optional
        strftime format for string timestamps; default: ISO-8601 inference.
    timestamp_unit : str
        Unit of numeric timestamps (``s``, ``ms``, ``us``).
    """

    __pydantic_config__: ClassVar[dict[str, str]] = {
        "extra": "forbid"
    }  # config validation rejects unknown keys

    path: str
    columns: dict[str, str] = field(default_factory=dict)
    separator: str = ","
    encoding: str = "utf8"
    has_header: bool = True
    timestamp_format: str | None = None
    timestamp_unit: Literal["s", "ms", "us"] = "s"


def _read_bytes(path: Path) -> bytes:
    suffix = path.suffix.lower()
    if suffix == ".zip":
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if not n.endswith("/")]
            if len(names) != 1:
                raise DataValidationError(
                    str(path), f"zip must hold exactly one file, found {len(names)}"
                )
            return zf.read(names[0])
    opener = _COMPRESSIONS.get(suffix)
    if opener is not None:
        with opener(path, "rb") as fh:
            return fh.read()
    return path.read_bytes()


def _is_parquet(path: Path) -> bool:
    return path.suffix.lower() in (".parquet", ".pq")


def read_raw(spec: FileSpec) -> pl.DataFrame:
    """Read a file as-is. CSV columns are read as text so type errors can be reported per value."""
    path = Path(spec.path)
    if not path.is_file():
        raise DataValidationError(str(path), "file not found")
    try:
        if _is_parquet(path):
            return pl.read_parquet(path)
        data = _read_bytes(path)
        if not data.strip():
            raise DataValidationError(
                str(path), "is empty: expected a header and at least one data row"
            )
        encoding = "utf8-lossy" if spec.encoding.lower() in ("utf8", "utf-8") else spec.encoding
        if encoding not in ("utf8-lossy",):
            data = data.decode(encoding).encode("utf8")
            encoding = "utf8"
        return pl.read_csv(
            data,
            separator=spec.separator,
            has_header=spec.has_header,
            infer_schema=False,
            encoding=encoding,
            truncate_ragged_lines=False,
        )
    except DataValidationError:
        raise
    except (
        pl.exceptions.PolarsError,
        OSError,
        UnicodeDecodeError,
        LookupError,
        zipfile.BadZipFile,
    ) as exc:
        raise DataValidationError(str(path), f"could not be read: {exc}") from None


def to_canonical(
    df: pl.DataFrame,
    columns: Mapping[str, str],
    source: str,
    allowed: tuple[str, ...] | None = None,
) -> pl.DataFrame:
    """Rename mapped file columns to canonical names; check the keys are canonical names
    (``allowed``) and the mapped columns exist."""
    if allowed is not None:
        unknown = [k for k in columns if k not in allowed]
        if unknown:
            raise DataValidationError(
                source,
                f"column mapping has unknown key(s) {unknown}: keys are canonical names, one of {list(allowed)}",
            )
    missing = [
        f"'{file_col}' (for {canon})"
        for canon, file_col in columns.items()
        if file_col not in df.columns
    ]
    if missing:
        raise DataValidationError(
            source,
            f"column(s) named in the config are missing: {', '.join(missing)}; "
            f"found columns: {', '.join(df.columns)}",
        )
    taken = set(columns.values())
    keep_own = [c for c in df.columns if c not in taken and c not in columns]
    return df.select(*(pl.col(f).alias(c) for c, f in columns.items()), *keep_own)


def read_interactions(spec: FileSpec, allow_anonymous: bool = False) -> pl.DataFrame:
    """Read and validate an interactions file (see :mod:`features.schema`)."""
    allowed = (*schema.INTERACTION_REQUIRED, *schema.INTERACTION_OPTIONAL)
    df = to_canonical(read_raw(spec), spec.columns, spec.path, allowed)
    return schema.validate_interactions(
        df, spec.path, spec.columns, allow_anonymous, spec.timestamp_format, spec.timestamp_unit
    )


def read_items(spec: FileSpec) -> pl.DataFrame:
    """Read and validate an items file."""
    allowed = (*schema.ITEM_REQUIRED, *schema.ITEM_OPTIONAL)
    df = to_canonical(read_raw(spec), spec.columns, spec.path, allowed)
    return schema.validate_items(df, spec.path, spec.columns)


def read_users(spec: FileSpec) -> pl.DataFrame:
    """Read and validate a users file."""
    df = to_canonical(read_raw(spec), spec.columns, spec.path)
    return schema.validate_users(df, spec.path, spec.columns)
