"""Batch ranking for e-mail and call-centre lists: users from a file, offers to CSV or Parquet.

Input: a CSV with a ``user_id`` column (optional ``cart`` column, ``|``-separated item ids),
or a Parquet file with the same columns (``cart`` a ``|``-separated string or a list of ids).
It is read and written in chunks, so memory stays constant whatever the number of users;
the output appears only when complete (written to a temp file, then renamed).
Output rows: ``user_id, rank, item_id, score, reason, category, price``.

The temp file is named ``.<name>.<host>.<pid>.<random>.tmp`` beside the output, the scheme of
``features.io.atomic_write``: it is removed when ranking fails or is interrupted (Ctrl-C;
``addons rank-batch`` turns SIGTERM into an exception too), and what a ``kill -9`` leaves is
removed by the next ``addons rank-batch`` to the same output (``features.io.recover``, which
knows the writer's pid is dead on this host). Serving does not import ``features``, hence
the naming is repeated here, not shared.
"""

from __future__ import annotations

import csv
import hashlib
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from serving.ranker import Ranker, RequestError

COLUMNS = ("user_id", "rank", "item_id", "score", "reason", "category", "price")
#: This host in temp names, as ``features.io.HOST_TAG``: a pid means something on its host only.
HOST_TAG = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


class BatchInputError(ValueError):
    """The input file is missing or malformed (names the file, line and column)."""


def parse_cart(value: Any) -> list[str]:
    """A request's cart: a ``|``-separated string or a list of ids (None: empty)."""
    if value is None:
        return []
    if isinstance(value, str):
        parts = value.split("|")
    elif isinstance(value, list | tuple):
        parts = [str(v) for v in value if v is not None]
    else:  # one id (a Parquet cart column of integers)
        parts = [str(value)]
    return [c.strip() for c in parts if c.strip()]


def _read_parquet_chunks(path: Path, chunk_size: int) -> Iterator[list[dict[str, Any]]]:
    """Row chunks of a Parquet file of requests (pyarrow batches: constant memory)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:  # serving hosts may not have it
        raise BatchInputError(f"{path}: Parquet input needs pyarrow: pip install pyarrow") from None
    try:
        fh = pq.ParquetFile(path)
    except (OSError, ValueError) as exc:
        raise BatchInputError(f"{path}: cannot read as Parquet ({exc})") from None
    names = fh.schema_arrow.names
    if "user_id" not in names:
        raise BatchInputError(f"{path}: expected a 'user_id' column, got {names}")
    columns = ["user_id"] + (["cart"] if "cart" in names else [])
    row = 0
    for batch in fh.iter_batches(batch_size=chunk_size, columns=columns):
        data = batch.to_pydict()
        carts = data.get("cart", [None] * batch.num_rows)
        chunk = []
        for user, cart in zip(data["user_id"], carts, strict=True):
            row += 1
            if user is None or not str(user).strip():
                raise BatchInputError(f"{path}: row {row}: column 'user_id' is empty")
            chunk.append({"user_id": str(user).strip(), "cart": parse_cart(cart)})
        yield chunk


def read_requests(path: Path, chunk_size: int) -> Iterator[list[dict[str, Any]]]:
    """Chunks of ``{"user_id", "cart"}`` from a CSV or (``.parquet``) Parquet file."""
    if path.suffix.lower() == ".parquet":
        return _read_parquet_chunks(path, chunk_size)
    return _read_chunks(path, chunk_size)


def offer_rows(requests: list[dict[str, Any]], results: list[Any]) -> list[tuple]:
    """Output rows (:data:`COLUMNS`) of ranked requests, in request then rank order."""
    return [
        (req["user_id"], rank, item.item_id, item.score, item.reason, item.category, item.price)
        for req, res in zip(requests, results, strict=True)
        for rank, item in enumerate(res.items, start=1)
    ]


def _read_chunks(path: Path, chunk_size: int) -> Iterator[list[dict[str, Any]]]:
    try:
        fh = path.open(newline="", encoding="utf-8-sig")  # a BOM, as the data readers accept
    except OSError as exc:
        raise BatchInputError(f"{path}: cannot read ({exc.strerror})") from None
    reader = csv.DictReader(fh)
    try:
        with fh:
            yield from _csv_chunks(path, reader, chunk_size)
    except UnicodeDecodeError as exc:
        raise BatchInputError(
            f"{path}: line {reader.line_num + 1}: not UTF-8 text ({exc.reason} at byte "
            f"{exc.start}); save the file as UTF-8"
        ) from None
    except csv.Error as exc:
        raise BatchInputError(f"{path}: line {reader.line_num}: {exc}") from None


def _csv_chunks(
    path: Path, reader: csv.DictReader, chunk_size: int
) -> Iterator[list[dict[str, Any]]]:
    """Row chunks of an open CSV of requests; the line numbers are the file's."""
    if not reader.fieldnames or "user_id" not in reader.fieldnames:
        raise BatchInputError(
            f"{path}: expected a header with a 'user_id' column, got {reader.fieldnames}"
        )
    chunk: list[dict[str, Any]] = []
    for line, row in enumerate(reader, start=2):
        user = (row.get("user_id") or "").strip()
        if not user:
            raise BatchInputError(f"{path}: line {line}: column 'user_id' is empty")
        chunk.append({"user_id": user, "cart": parse_cart(row.get("cart"))})
        if len(chunk) == chunk_size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def rank_file(
    ranker: Ranker,
    source: str | Path,
    target: str | Path,
    k: int | None = None,
    offer: str = "cross_sell",
    placement: str = "email",
    chunk_size: int = 1000,
    on_chunk: Callable[[int], None] | None = None,
) -> int:
    """Rank every user of ``source`` into ``target`` (``.csv`` or ``.parquet``); returns rows
    written. ``k`` None: the ranker's ``settings.default_k``."""
    source, target = Path(source), Path(target)
    if target.suffix.lower() not in (".csv", ".parquet"):
        raise BatchInputError(f"{target}: output must end in .csv or .parquet")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{target.name}.{HOST_TAG}.{os.getpid()}.", suffix=".tmp", dir=target.parent
    )
    os.close(fd)
    written = 0
    try:
        writer = _Writer(Path(tmp), target.suffix.lower())
        try:
            for chunk in read_requests(source, chunk_size):
                requests = [{**r, "k": k, "offer": offer, "placement": placement} for r in chunk]
                try:
                    results = ranker.rank_many(requests)
                except RequestError as exc:
                    raise BatchInputError(f"{source}: {exc}") from None
                rows = offer_rows(requests, results)
                writer.write(rows)
                written += len(rows)
                if on_chunk:
                    on_chunk(len(chunk))
        finally:
            writer.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return written


class _Writer:
    """Streams rows to CSV (csv module) or Parquet (pyarrow, one row group per chunk)."""

    def __init__(self, path: Path, kind: str) -> None:
        self.kind = kind
        if kind == ".csv":
            self.fh = path.open("w", newline="", encoding="utf-8")
            self.csv = csv.writer(self.fh)
            self.csv.writerow(COLUMNS)
        else:
            try:
                import pyarrow as pa
                import pyarrow.parquet as pq
            except ImportError:  # serving hosts may not have it
                raise BatchInputError(
                    "Parquet output needs pyarrow: pip install pyarrow, or write .csv"
                ) from None
            self.pa = pa
            self.schema = pa.schema([("user_id", pa.string()), ("rank", pa.int32()), ("item_id", pa.string()),
                                     ("score", pa.float32()), ("reason", pa.string()), ("category", pa.string()),
                                     ("price", pa.float64())])  # fmt: skip
            self.pq = pq.ParquetWriter(str(path), self.schema)

    def write(self, rows: list[tuple]) -> None:
        if self.kind == ".csv":
            self.csv.writerows(rows)
            return
        cols = list(zip(*rows, strict=True)) if rows else [[] for _ in COLUMNS]
        data = {
            "user_id": [str(v) for v in cols[0]], "rank": list(cols[1]), "item_id": [str(v) for v in cols[2]],
            "score": list(cols[3]), "reason": list(cols[4]), "category": list(cols[5]), "price": list(cols[6]),
        }  # fmt: skip
        self.pq.write_table(self.pa.table(data, schema=self.schema))

    def close(self) -> None:
        if self.kind == ".csv":
            self.fh.close()
        else:
            self.pq.close()
