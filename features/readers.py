"""Read CSV and Parquet files (compressed too) into canonical column names.

A shop's own export fits without new code: the config maps each canonical column to the
file's column name (``columns: {user_id: CustomerID, item_id: StockCode, ...}``).
"""

from __future__ import annotations

import bz2
import codecs
import csv
import gzip
import io
import lzma
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, ClassVar, Literal

import numpy as np
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


# Bounds that keep memory proportional to real content: one line (a record, so also any one
# field) may hold at most MAX_LINE_BYTES, and a file at most MAX_BLANK_LINES blank lines (a
# gzip of nothing but newlines is tiny on disk and huge once read). Module constants so a test
# or an unusual export can change them.
MAX_LINE_BYTES = 1 << 20
MAX_BLANK_LINES = 10_000
_CHUNK_BYTES = 1 << 20
_LOSSY = "utf8-lossy"


@contextmanager
def _open_binary(path: Path) -> Iterator[BinaryIO]:
    """The file's (decompressed) bytes as a stream; a ``.zip`` must hold exactly one file."""
    suffix = path.suffix.lower()
    if suffix == ".zip":
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if not n.endswith("/")]
            if len(names) != 1:
                raise DataValidationError(
                    str(path), f"zip must hold exactly one file, found {len(names)}"
                )
            with zf.open(names[0]) as fh:
                yield fh
        return
    opener = _COMPRESSIONS.get(suffix)
    with opener(path, "rb") if opener is not None else path.open("rb") as fh:
        yield fh


def codec_name(encoding: str) -> str:
    """Python's name for a text encoding (``utf8-lossy`` as is); LookupError if unknown."""
    if encoding.lower().replace("-", "").replace("_", "") == _LOSSY.replace("-", ""):
        return _LOSSY
    return codecs.lookup(encoding).name


def _codec(encoding: str, path: Path, key: str) -> str:
    try:
        return codec_name(encoding)
    except LookupError:
        raise DataValidationError(
            str(path), f"unknown text encoding {encoding!r} (set {key}.encoding, e.g. latin-1)"
        ) from None


def _decode_error(key: str, codec: str, line: int, exc: UnicodeDecodeError) -> str:
    bad = exc.object[exc.start : exc.start + 1].hex()
    hint = "latin-1" if codec == "utf-8" else "the file's real encoding"
    return (
        f"line {line}: byte 0x{bad} is not valid {codec}; the file is in another encoding: "
        f"set it in the data config, e.g. '{key}.encoding: {hint}' (or 'utf8-lossy' to replace "
        "undecodable bytes, merging ids that differ only there)"
    )


def read_text_bytes(path: Path, encoding: str = "utf8", key: str = "data.interactions") -> bytes:
    """The text of a CSV file as UTF-8 bytes, read in chunks and checked on the way.

    Decoding is strict: a byte sequence that is not valid in ``encoding`` is an error naming
    the line and the ``encoding`` setting (``utf8-lossy`` replaces such bytes instead). A UTF-8
    byte-order mark is dropped. A line longer than :data:`MAX_LINE_BYTES` or more than
    :data:`MAX_BLANK_LINES` blank lines are errors, found while streaming, so a hostile file
    never has to fit in memory; a truncated or corrupt compressed file is an error too.

    Parameters
    ----------
    path : pathlib.Path
        The file (``.gz``, ``.bz2``, ``.xz`` and one-file ``.zip`` are decompressed).
    encoding : str
        Any Python codec name, or ``utf8-lossy``.
    key : str
        Dotted config key of the file (``data.interactions``...), for messages.
    """
    codec = _codec(encoding, path, key)
    out = io.BytesIO()
    lines_done = blank = 0
    lossy = codec == _LOSSY

    def emit(block: bytes) -> None:
        """Check, decode and keep whole lines (``block`` is UTF-8-compatible: newline = 0x0a)."""
        nonlocal lines_done, blank
        if not block:
            return
        # Byte masks only (1 byte per input byte): positions (8 bytes per line) are taken
        # once the blank-line bound is known to hold, so a block of newlines stays cheap.
        arr = np.frombuffer(block, dtype=np.uint8)
        nl = arr == 10
        cr = arr == 13
        # A block starts at a line start: a blank line is a newline at the start or right
        # after a newline, or "\r\n" there.
        blank += int(nl[0]) + int(np.count_nonzero(nl[1:] & nl[:-1]))
        blank += int(len(arr) > 1 and cr[0] and nl[1])
        blank += int(np.count_nonzero(nl[2:] & cr[1:-1] & nl[:-2]))
        if blank > MAX_BLANK_LINES:
            raise DataValidationError(
                str(path),
                f"more than {MAX_BLANK_LINES:,} blank lines (readers.MAX_BLANK_LINES; by line "
                f"{lines_done + int(np.count_nonzero(nl)):,}): not a data export",
            )
        ends = np.flatnonzero(nl)
        del nl, cr
        if block[-1:] != b"\n":  # the file's last line, without a newline
            ends = np.append(ends, len(block))
        lengths = np.diff(ends, prepend=-1) - 1
        long = np.flatnonzero(lengths > MAX_LINE_BYTES)
        if len(long):
            raise DataValidationError(
                str(path),
                f"line {lines_done + int(long[0]) + 1} is longer than the bound of "
                f"{MAX_LINE_BYTES:,} bytes per line (readers.MAX_LINE_BYTES; no field of a data "
                "export is that long: is this the right file?)",
            )
        if codec == "utf-8":
            try:
                block.decode("utf-8")  # validate only; the bytes are kept as they are
            except UnicodeDecodeError as exc:
                line = lines_done + block.count(b"\n", 0, exc.start) + 1
                raise DataValidationError(str(path), _decode_error(key, codec, line, exc)) from None
            if lines_done == 0 and block.startswith(codecs.BOM_UTF8):
                block = block[len(codecs.BOM_UTF8) :]  # not part of the first column's name
        elif lossy:
            block = block.decode("utf-8", "replace").encode()
        else:
            try:
                block = block.decode(codec).encode()
            except UnicodeDecodeError as exc:
                line = lines_done + block.count(b"\n", 0, exc.start) + 1
                raise DataValidationError(str(path), _decode_error(key, codec, line, exc)) from None
        out.write(block)
        lines_done += len(ends)

    with _open_binary(path) as fh:
        if not lossy and "\n".encode(codec) != b"\n":
            # UTF-16/32: a 0x0a byte may be half a character, so decode the whole file first.
            raw = fh.read()
            try:
                text = raw.decode(codec)
            except UnicodeDecodeError as exc:
                line = raw[: exc.start].decode(codec, "replace").count("\n") + 1
                raise DataValidationError(str(path), _decode_error(key, codec, line, exc)) from None
            codec = "utf-8"
            emit(text.encode())
            return out.getvalue()
        carry = b""
        while chunk := fh.read(_CHUNK_BYTES):
            buf = carry + chunk
            cut = buf.rfind(b"\n") + 1
            emit(buf[:cut])
            carry = buf[cut:]
            if len(carry) > MAX_LINE_BYTES:  # a line with no end in sight: stop reading it
                emit(carry)
        emit(carry)
    return out.getvalue()


def _is_parquet(path: Path) -> bool:
    return path.suffix.lower() in (".parquet", ".pq")


def _check_header(data: bytes, spec: FileSpec, path: Path) -> None:
    """Refuse a header naming one column twice (polars would silently rename the second)."""
    first = data[: data.find(b"\n")] if b"\n" in data else data
    text = first.decode("utf-8", "replace").rstrip("\r")
    names = next(csv.reader([text], delimiter=spec.separator), [])
    seen: set[str] = set()
    for name in names:
        if name and name in seen:  # empty names (a trailing separator) are polars' to number
            raise DataValidationError(
                str(path),
                f"the header names column {name!r} twice; every column needs its own name",
                name,
            )
        seen.add(name)


def read_raw(spec: FileSpec, key: str = "data.interactions") -> pl.DataFrame:
    """Read a file as-is. CSV columns are read as text so type errors can be reported per value.

    ``key`` is the file's dotted config key (``data.items``...), named in messages.
    """
    path = Path(spec.path)
    if not path.is_file():
        raise DataValidationError(str(path), f"file not found (the file of {key})")
    try:
        if _is_parquet(path):
            return pl.read_parquet(path)
        data = read_text_bytes(path, spec.encoding, key)
        if not data.strip():
            raise DataValidationError(
                str(path), "is empty: expected a header and at least one data row"
            )
        if spec.has_header:
            _check_header(data, spec, path)
        return pl.read_csv(
            data,
            separator=spec.separator,
            has_header=spec.has_header,
            infer_schema=False,
            encoding="utf8",
            truncate_ragged_lines=False,
        )
    except DataValidationError:
        raise
    except (EOFError, zlib.error, lzma.LZMAError) as exc:  # a cut or damaged .gz/.bz2/.xz
        raise DataValidationError(
            str(path), f"compressed file is truncated or corrupt ({exc})"
        ) from None
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


def read_interactions(
    spec: FileSpec, allow_anonymous: bool = False, key: str = "data.interactions"
) -> pl.DataFrame:
    """Read and validate an interactions file (see :mod:`features.schema`)."""
    allowed = (*schema.INTERACTION_REQUIRED, *schema.INTERACTION_OPTIONAL)
    df = to_canonical(read_raw(spec, key), spec.columns, spec.path, allowed)
    return schema.validate_interactions(
        df, spec.path, spec.columns, allow_anonymous, spec.timestamp_format, spec.timestamp_unit
    )


def read_items(spec: FileSpec, key: str = "data.items") -> pl.DataFrame:
    """Read and validate an items file."""
    allowed = (*schema.ITEM_REQUIRED, *schema.ITEM_OPTIONAL)
    df = to_canonical(read_raw(spec, key), spec.columns, spec.path, allowed)
    return schema.validate_items(df, spec.path, spec.columns)


def read_users(spec: FileSpec, key: str = "data.users") -> pl.DataFrame:
    """Read and validate a users file."""
    df = to_canonical(read_raw(spec, key), spec.columns, spec.path)
    return schema.validate_users(df, spec.path, spec.columns)
