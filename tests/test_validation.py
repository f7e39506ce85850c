"""Schema and reader validation: every bad input file gets a clear error.

Each error test checks the exception type and that the message names the file and the column
(as the file calls it, through the config mapping). Each table is written by hand to
``tmp_path`` in plain CSV, gzip-compressed CSV and Parquet; expected values are worked out by
hand from those few rows.
"""

import bz2
import gzip
import lzma
import zipfile
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pytest

from features.errors import DataValidationError
from features.readers import FileSpec, read_interactions, read_items, read_users

FORMATS = ("csv", "csv.gz", "parquet")
READERS = {"interactions": read_interactions, "items": read_items, "users": read_users}


def write_table(
    tmp_path: Path,
    stem: str,
    header: list[str],
    rows: list[list],
    fmt: str,
    dtypes: dict | None = None,
) -> str:
    """Write ``rows`` under ``header`` as ``<stem>.<fmt>``.

    CSV: values joined by commas, ``None`` written as an empty field. Parquet: one column per
    header entry, String unless ``dtypes`` says otherwise, ``None`` stored as null.
    """
    path = tmp_path / f"{stem}.{fmt}"
    if fmt == "parquet":
        dtypes = dtypes or {}
        data = {h: [r[i] for r in rows] for i, h in enumerate(header)}
        schema = {h: dtypes.get(h, pl.String) for h in header}
        pl.DataFrame(data, schema=schema).write_parquet(path)
        return str(path)
    lines = [",".join(header)]
    lines += [",".join("" if v is None else str(v) for v in r) for r in rows]
    text = "\n".join(lines) + "\n"
    if fmt == "csv.gz":
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return str(path)


def assert_names(exc: pytest.ExceptionInfo, path: str, column: str) -> str:
    """The message names the file and the column (quoted, as in the file)."""
    msg = str(exc.value)
    assert path in msg, msg
    assert f"'{column}'" in msg, msg
    return msg


# -- the same interactions in every format ---------------------------------------------------

HEADER = ["user_id", "item_id", "timestamp", "basket_id", "quantity", "value"]
ROWS = [
    ["u1", "A", "2020-01-01 10:00:00", "b1", "2", "3.0"],
    ["u1", "B", "2020-01-01 10:00:00", "b1", "1", "1.5"],
    ["u2", "A", "2020-01-02 09:30:00", "b2", "-1", "-1.5"],
]


@pytest.mark.parametrize("fmt", FORMATS)
def test_interactions_values(tmp_path, fmt):
    df = read_interactions(FileSpec(write_table(tmp_path, "tx", HEADER, ROWS, fmt)))
    assert df.columns == [
        "user_id",
        "item_id",
        "timestamp",
        "basket_id",
        "quantity",
        "value",
        "week",
    ]
    assert df["user_id"].to_list() == ["u1", "u1", "u2"]
    assert df["item_id"].to_list() == ["A", "B", "A"]
    assert df["basket_id"].to_list() == ["b1", "b1", "b2"]
    assert df["timestamp"].to_list() == [
        datetime(2020, 1, 1, 10),
        datetime(2020, 1, 1, 10),
        datetime(2020, 1, 2, 9, 30),
    ]
    assert df["quantity"].to_list() == [2.0, 1.0, -1.0]
    assert df["value"].to_list() == [3.0, 1.5, -1.5]
    assert df["week"].null_count() == 3


def test_compressed_and_parquet_read_identically_to_csv(tmp_path):
    frames = {
        fmt: read_interactions(FileSpec(write_table(tmp_path, "tx", HEADER, ROWS, fmt)))
        for fmt in FORMATS
    }
    assert frames["csv.gz"].equals(frames["csv"])
    assert frames["parquet"].equals(frames["csv"])
    # other CSV compressions and a zip holding the one file
    text = (tmp_path / "tx.csv").read_bytes()
    (tmp_path / "tx.csv.bz2").write_bytes(bz2.compress(text))
    (tmp_path / "tx.csv.xz").write_bytes(lzma.compress(text))
    with zipfile.ZipFile(tmp_path / "tx.zip", "w") as zf:
        zf.writestr("tx.csv", text)
    for name in ("tx.csv.bz2", "tx.csv.xz", "tx.zip"):
        assert read_interactions(FileSpec(str(tmp_path / name))).equals(frames["csv"]), name


def test_parquet_with_native_types_matches_csv(tmp_path):
    csv = write_table(
        tmp_path,
        "tx",
        ["user_id", "item_id", "timestamp", "quantity"],
        [["7", "100", "2020-01-01 10:00:00", "2"], ["8", "101", "2020-01-02 09:30:00", "1.5"]],
        "csv",
    )
    pq = tmp_path / "tx.parquet"
    pl.DataFrame(
        {
            "user_id": [7, 8],
            "item_id": [100, 101],
            "timestamp": [datetime(2020, 1, 1, 10), datetime(2020, 1, 2, 9, 30)],
            "quantity": [2.0, 1.5],
        }
    ).write_parquet(pq)
    a = read_interactions(FileSpec(csv))
    b = read_interactions(FileSpec(str(pq)))
    for col in ("user_id", "item_id"):
        assert a[col].cast(pl.String).to_list() == b[col].cast(pl.String).to_list()
    for col in ("timestamp", "quantity", "value", "week"):
        assert a[col].to_list() == b[col].to_list()
    assert a["basket_id"].to_list() == b["basket_id"].to_list()


@pytest.mark.parametrize("fmt", FORMATS)
def test_column_mapping_renames_a_shops_own_export(tmp_path, fmt):
    header = ["Customer", "Sku", "When", "Order", "Qty", "Paid", "Country"]
    rows = [
        ["c9", "X1", "2021-03-04 12:00:00", "o1", "3", "9.0", "NL"],
        ["c9", "X2", "2021-03-04 12:00:00", "o1", "1", "2.5", "NL"],
    ]
    columns = {
        "user_id": "Customer",
        "item_id": "Sku",
        "timestamp": "When",
        "basket_id": "Order",
        "quantity": "Qty",
        "value": "Paid",
    }
    spec = FileSpec(write_table(tmp_path, "export", header, rows, fmt), columns=columns)
    df = read_interactions(spec)
    assert df["user_id"].to_list() == ["c9", "c9"]
    assert df["item_id"].to_list() == ["X1", "X2"]
    assert df["basket_id"].to_list() == ["o1", "o1"]
    assert df["timestamp"].to_list() == [datetime(2021, 3, 4, 12)] * 2
    assert df["quantity"].to_list() == [3.0, 1.0]
    assert df["value"].to_list() == [9.0, 2.5]
    assert "Country" not in df.columns


def test_missing_basket_id_gives_one_basket_per_user_and_timestamp(tmp_path):
    rows = [
        ["u1", "A", "2020-01-01 10:00:00"],  # u1 at t1
        ["u1", "B", "2020-01-01 10:00:00"],  # u1 at t1 again: same basket
        ["u1", "A", "2020-01-01 11:00:00"],  # u1 at t2: new basket
        ["u2", "C", "2020-01-01 10:00:00"],  # u2 at t1: not u1's basket
        ["u2", "A", "2020-01-01 10:00:00"],  # u2 at t1 again
    ]
    path = write_table(tmp_path, "tx", ["user_id", "item_id", "timestamp"], rows, "csv")
    b = read_interactions(FileSpec(path))["basket_id"].to_list()
    assert None not in b
    assert b[0] == b[1]
    assert b[3] == b[4]
    assert len({b[0], b[2], b[3]}) == 3


@pytest.mark.parametrize("unit, scale", [("s", 1), ("ms", 1000)])
@pytest.mark.parametrize("fmt", FORMATS)
def test_numeric_unix_timestamps(tmp_path, fmt, unit, scale):
    seconds = [1_300_000_000, 1_300_086_461]
    rows = [["u1", "A", seconds[0] * scale], ["u2", "B", seconds[1] * scale]]
    if fmt == "parquet":
        path = write_table(
            tmp_path, "tx", ["user_id", "item_id", "timestamp"], rows, fmt, {"timestamp": pl.Int64}
        )
    else:
        path = write_table(tmp_path, "tx", ["user_id", "item_id", "timestamp"], rows, fmt)
    df = read_interactions(FileSpec(path, timestamp_unit=unit))
    expected = [datetime.fromtimestamp(s, UTC).replace(tzinfo=None) for s in seconds]
    assert df["timestamp"].to_list() == expected


def test_timestamp_format_parses_day_first_dates(tmp_path):
    rows = [["u1", "A", "01/02/2020 10:05"], ["u1", "B", "13/02/2020 23:59"]]
    path = write_table(tmp_path, "tx", ["user_id", "item_id", "timestamp"], rows, "csv")
    df = read_interactions(FileSpec(path, timestamp_format="%d/%m/%Y %H:%M"))
    assert df["timestamp"].to_list() == [datetime(2020, 2, 1, 10, 5), datetime(2020, 2, 13, 23, 59)]


def test_anonymous_rows_allowed_only_when_asked(tmp_path):
    rows = [["u1", "A", "2020-01-01"], [None, "B", "2020-01-02"]]
    path = write_table(tmp_path, "tx", ["user_id", "item_id", "timestamp"], rows, "csv")
    df = read_interactions(FileSpec(path), allow_anonymous=True)
    assert df["user_id"].to_list() == ["u1", None]
    with pytest.raises(DataValidationError) as exc:
        read_interactions(FileSpec(path))
    assert_names(exc, path, "user_id")


# -- missing, empty and unreadable files -------------------------------------------------------

MINIMAL = {
    "interactions": (["user_id", "item_id", "timestamp"], [["u1", "A", "2020-01-01"]]),
    "items": (["item_id", "price"], [["A", "1.0"]]),
    "users": (["user_id", "country"], [["u1", "NL"]]),
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", READERS)
def test_file_not_found(tmp_path, kind, fmt):
    path = str(tmp_path / f"nowhere.{fmt}")
    with pytest.raises(DataValidationError) as exc:
        READERS[kind](FileSpec(path))
    assert path in str(exc.value)
    assert "not found" in str(exc.value)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", READERS)
def test_empty_file(tmp_path, kind, fmt):
    path = tmp_path / f"{kind}.{fmt}"
    if fmt == "csv.gz":
        with gzip.open(path, "wb"):
            pass
    else:
        path.write_bytes(b"")
    with pytest.raises(DataValidationError) as exc:
        READERS[kind](FileSpec(str(path)))
    assert str(path) in str(exc.value)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", READERS)
def test_header_only_file(tmp_path, kind, fmt):
    header, _ = MINIMAL[kind]
    path = write_table(tmp_path, kind, header, [], fmt)
    with pytest.raises(DataValidationError) as exc:
        READERS[kind](FileSpec(path))
    msg = str(exc.value)
    assert path in msg
    assert "empty" in msg


def test_ragged_csv_line(tmp_path):
    path = tmp_path / "tx.csv"
    path.write_text("user_id,item_id,timestamp\nu1,A,2020-01-01\nu1,B,2020-01-01,extra\n")
    with pytest.raises(DataValidationError) as exc:
        read_interactions(FileSpec(str(path)))
    assert str(path) in str(exc.value)


# -- missing columns -----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    "kind, header, columns, named",
    [
        # required column absent and not mapped: named canonically
        ("interactions", ["user_id", "timestamp"], {}, "item_id"),
        ("items", ["sku", "price"], {}, "item_id"),
        ("users", ["customer", "country"], {}, "user_id"),
        # mapped to a column the file does not have: named as the config says the file calls it
        (
            "interactions",
            ["user_id", "item_id", "Date"],
            {"timestamp": "InvoiceDate"},
            "InvoiceDate",
        ),
        ("items", ["sku", "price"], {"item_id": "SKU"}, "SKU"),
        ("users", ["customer", "country"], {"user_id": "CustomerID"}, "CustomerID"),
    ],
)
def test_missing_required_column(tmp_path, fmt, kind, header, columns, named):
    rows = [["x"] * len(header)]
    path = write_table(tmp_path, kind, header, rows, fmt)
    with pytest.raises(DataValidationError) as exc:
        READERS[kind](FileSpec(path, columns=columns))
    msg = assert_names(exc, path, named)
    # and it says what the file does have
    for h in header:
        assert h in msg


@pytest.mark.parametrize("fmt", FORMATS)
def test_mapping_names_an_optional_column_not_in_the_file(tmp_path, fmt):
    path = write_table(tmp_path, "tx", HEADER, ROWS, fmt)
    with pytest.raises(DataValidationError) as exc:
        read_interactions(FileSpec(path, columns={"quantity": "Qty"}))
    assert_names(exc, path, "Qty")


# -- wrong types ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_non_numeric_quantity(tmp_path, fmt):
    header = ["user_id", "item_id", "timestamp", "Qty"]
    rows = [["u1", "A", "2020-01-01", "1"], ["u1", "B", "2020-01-01", "two"]]
    path = write_table(tmp_path, "tx", header, rows, fmt)
    with pytest.raises(DataValidationError) as exc:
        read_interactions(FileSpec(path, columns={"quantity": "Qty"}))
    msg = assert_names(exc, path, "Qty")
    assert "number" in msg
    assert "'two'" in msg
    assert exc.value.column == "Qty"


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_quantity_must_be_a_finite_number(tmp_path, bad):
    header = ["user_id", "item_id", "timestamp", "quantity"]
    rows = [["u1", "A", "2020-01-01", "1"], ["u1", "B", "2020-01-01", bad]]
    path = write_table(tmp_path, "tx", header, rows, "csv")
    with pytest.raises(DataValidationError) as exc:
        read_interactions(FileSpec(path))
    assert_names(exc, path, "quantity")


@pytest.mark.parametrize("fmt", FORMATS)
def test_missing_quantity_value(tmp_path, fmt):
    header = ["user_id", "item_id", "timestamp", "quantity"]
    rows = [["u1", "A", "2020-01-01", "1"], ["u1", "B", "2020-01-01", None]]
    path = write_table(tmp_path, "tx", header, rows, fmt)
    with pytest.raises(DataValidationError) as exc:
        read_interactions(FileSpec(path))
    assert_names(exc, path, "quantity")


@pytest.mark.parametrize("fmt", FORMATS)
def test_non_integral_week(tmp_path, fmt):
    header = ["user_id", "item_id", "timestamp", "wk"]
    rows = [["u1", "A", "2020-01-01", "3"], ["u1", "B", "2020-01-01", "3.5"]]
    path = write_table(tmp_path, "tx", header, rows, fmt)
    with pytest.raises(DataValidationError) as exc:
        read_interactions(FileSpec(path, columns={"week": "wk"}))
    assert_names(exc, path, "wk")


@pytest.mark.parametrize("fmt", FORMATS)
def test_non_integral_float_ids(tmp_path, fmt):
    header = ["CustomerID", "item_id", "timestamp"]
    if fmt == "parquet":
        rows = [[17850.0, "A", "2020-01-01"], [1.5, "B", "2020-01-01"]]
        path = write_table(tmp_path, "tx", header, rows, fmt, {"CustomerID": pl.Float64})
    else:  # what a spreadsheet writes for a float column
        rows = [["17850.0", "A", "2020-01-01"], ["1.5", "B", "2020-01-01"]]
        path = write_table(tmp_path, "tx", header, rows, fmt)
    with pytest.raises(DataValidationError) as exc:
        read_interactions(FileSpec(path, columns={"user_id": "CustomerID"}))
    assert_names(exc, path, "CustomerID")


def test_integral_float_ids_are_the_same_in_csv_and_parquet(tmp_path):
    # A spreadsheet export writes customer ids as 17850.0; coerce_id documents that they
    # become the integer 17850, so the CSV and the Parquet export must give the same ids.
    header = ["user_id", "item_id", "timestamp"]
    pq_rows = [[17850.0, "A", "2020-01-01"], [13047.0, "B", "2020-01-01"]]
    pq = write_table(tmp_path, "tx", header, pq_rows, "parquet", {"user_id": pl.Float64})
    csv = write_table(
        tmp_path,
        "tx",
        header,
        [["17850.0", "A", "2020-01-01"], ["13047.0", "B", "2020-01-01"]],
        "csv",
    )
    assert read_interactions(FileSpec(pq))["user_id"].to_list() == [17850, 13047]
    assert read_interactions(FileSpec(csv))["user_id"].to_list() == [17850, 13047]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("column", ["user_id", "item_id"])
@pytest.mark.parametrize("blank", [None, "   "])
def test_null_or_empty_ids_in_interactions(tmp_path, fmt, column, blank):
    header = ["user_id", "item_id", "timestamp"]
    rows = [["u1", "A", "2020-01-01"], ["u2", "B", "2020-01-02"]]
    rows[1][header.index(column)] = blank
    path = write_table(tmp_path, "tx", header, rows, fmt)
    with pytest.raises(DataValidationError) as exc:
        read_interactions(FileSpec(path))
    msg = assert_names(exc, path, column)
    assert "row 2" in msg


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", ["items", "users"])
def test_null_or_empty_ids_in_items_and_users(tmp_path, fmt, kind):
    header, _ = MINIMAL[kind]
    rows = [["k1", "x"], ["", "y"], ["k3", "z"]]
    path = write_table(tmp_path, kind, ["ID", header[1]], rows, fmt)
    with pytest.raises(DataValidationError) as exc:
        READERS[kind](FileSpec(path, columns={header[0]: "ID"}))
    assert_names(exc, path, "ID")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("values", [["2020-01-01 10:00:00", "yesterday"], ["soon", "later"]])
def test_unparseable_timestamps_without_format(tmp_path, fmt, values):
    header = ["user_id", "item_id", "When"]
    rows = [["u1", "A", values[0]], ["u1", "B", values[1]]]
    path = write_table(tmp_path, "tx", header, rows, fmt)
    with pytest.raises(DataValidationError) as exc:
        read_interactions(FileSpec(path, columns={"timestamp": "When"}))
    msg = assert_names(exc, path, "When")
    assert "timestamp_format" in msg or "ISO-8601" in msg


@pytest.mark.parametrize("fmt", FORMATS)
def test_unparseable_timestamps_with_format(tmp_path, fmt):
    header = ["user_id", "item_id", "InvoiceDate"]
    rows = [["u1", "A", "24/12/2020 10:00"], ["u1", "B", "2020-12-25 10:00"]]
    path = write_table(tmp_path, "tx", header, rows, fmt)
    spec = FileSpec(path, columns={"timestamp": "InvoiceDate"}, timestamp_format="%d/%m/%Y %H:%M")
    with pytest.raises(DataValidationError) as exc:
        read_interactions(spec)
    msg = assert_names(exc, path, "InvoiceDate")
    assert "%d/%m/%Y %H:%M" in msg
    assert "2020-12-25 10:00" in msg


@pytest.mark.parametrize("fmt", FORMATS)
def test_missing_timestamp_value(tmp_path, fmt):
    rows = [["u1", "A", "2020-01-01"], ["u1", "B", None]]
    path = write_table(tmp_path, "tx", ["user_id", "item_id", "timestamp"], rows, fmt)
    with pytest.raises(DataValidationError) as exc:
        read_interactions(FileSpec(path))
    assert_names(exc, path, "timestamp")


# -- items ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_items_mapping_and_values(tmp_path, fmt):
    header = ["sku", "Price", "Stock", "Dept"]
    rows = [
        ["A", "1.25", "yes", "food"],
        ["B", "0", "no", "toys"],
        ["C", None, "1", None],
        ["D", "10", "FALSE", "food"],
    ]
    columns = {"item_id": "sku", "price": "Price", "in_stock": "Stock", "department": "Dept"}
    df = read_items(FileSpec(write_table(tmp_path, "items", header, rows, fmt), columns=columns))
    assert df["item_id"].to_list() == ["A", "B", "C", "D"]
    assert df["price"].to_list() == [1.25, 0.0, None, 10.0]
    assert df["in_stock"].to_list() == [True, False, True, False]
    assert df["department"].to_list() == ["food", "toys", None, "food"]
    # absent optional columns are filled
    assert df["margin"].null_count() == 4
    assert df["brand"].null_count() == 4


def test_items_without_in_stock_are_in_stock(tmp_path):
    path = write_table(tmp_path, "items", ["item_id"], [["A"], ["B"]], "csv")
    assert read_items(FileSpec(path))["in_stock"].to_list() == [True, True]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bad", ["maybe", "2"])
def test_items_bad_in_stock(tmp_path, fmt, bad):
    rows = [["A", "yes"], ["B", bad]]
    path = write_table(tmp_path, "items", ["item_id", "Stock"], rows, fmt)
    with pytest.raises(DataValidationError) as exc:
        read_items(FileSpec(path, columns={"in_stock": "Stock"}))
    msg = assert_names(exc, path, "Stock")
    assert "true/false" in msg


def test_items_in_stock_parquet_integer_not_0_or_1(tmp_path):
    path = write_table(
        tmp_path,
        "items",
        ["item_id", "in_stock"],
        [["A", 1], ["B", 2]],
        "parquet",
        {"in_stock": pl.Int64},
    )
    with pytest.raises(DataValidationError) as exc:
        read_items(FileSpec(path))
    assert_names(exc, path, "in_stock")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("column", ["price", "margin"])
def test_items_negative_price_or_margin(tmp_path, fmt, column):
    rows = [["A", "1.0"], ["B", "-0.5"]]
    path = write_table(tmp_path, "items", ["item_id", column], rows, fmt)
    with pytest.raises(DataValidationError) as exc:
        read_items(FileSpec(path))
    msg = assert_names(exc, path, column)
    assert ">= 0" in msg


@pytest.mark.parametrize("fmt", FORMATS)
def test_items_non_numeric_price(tmp_path, fmt):
    rows = [["A", "1.0"], ["B", "cheap"]]
    path = write_table(tmp_path, "items", ["item_id", "UnitPrice"], rows, fmt)
    with pytest.raises(DataValidationError) as exc:
        read_items(FileSpec(path, columns={"price": "UnitPrice"}))
    assert_names(exc, path, "UnitPrice")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("second", ["A", " A "])
def test_duplicate_item_ids(tmp_path, fmt, second):
    rows = [["A", "1.0"], ["B", "2.0"], [second, "3.0"]]
    path = write_table(tmp_path, "items", ["StockCode", "price"], rows, fmt)
    with pytest.raises(DataValidationError) as exc:
        read_items(FileSpec(path, columns={"item_id": "StockCode"}))
    msg = assert_names(exc, path, "StockCode")
    assert "unique" in msg


# -- users ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_users_mapping_and_attributes(tmp_path, fmt):
    rows = [["c1", "NL", "35"], ["c2", "FR", None]]
    path = write_table(tmp_path, "users", ["Customer", "Country", "Age"], rows, fmt)
    df = read_users(FileSpec(path, columns={"user_id": "Customer"}))
    assert df.columns == ["user_id", "Country", "Age"]
    assert df["user_id"].to_list() == ["c1", "c2"]
    assert df["Country"].to_list() == ["NL", "FR"]
    assert df["Age"].to_list() == ["35", None]
    assert df.schema["Age"] == pl.String


@pytest.mark.parametrize("fmt", FORMATS)
def test_duplicate_user_ids(tmp_path, fmt):
    rows = [["c1", "NL"], ["c2", "FR"], ["c1", "DE"]]
    path = write_table(tmp_path, "users", ["Customer", "Country"], rows, fmt)
    with pytest.raises(DataValidationError) as exc:
        read_users(FileSpec(path, columns={"user_id": "Customer"}))
    assert_names(exc, path, "Customer")


# -- values the 64-bit columns cannot hold, and ids numpy would merge ------------------------


@pytest.mark.parametrize("column", ["user_id", "item_id"])
def test_id_with_a_nul_character_is_refused(tmp_path, column):
    # numpy's fixed-width text drops trailing NULs: "6\x00" would become "6" (a segfault once)
    header = ["user_id", "item_id", "timestamp"]
    rows = [["u1", "6", "2020-01-01"], ["u1", "7", "2020-01-01"]]
    rows[1][header.index(column)] += "\x00"
    path = write_table(tmp_path, "tx", header, rows, "parquet")
    with pytest.raises(DataValidationError) as exc:
        read_interactions(FileSpec(path))
    assert "NUL" in assert_names(exc, path, column)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("column", ["user_id", "item_id", "basket_id"])
def test_integer_id_beyond_int64_is_refused(tmp_path, fmt, column):
    header = ["user_id", "item_id", "timestamp", "basket_id"]
    rows = [["1", "2", "2020-01-01", "3"], ["1", "5", "2020-01-01", "3"]]
    rows[1][header.index(column)] = str(2**64)
    path = write_table(tmp_path, "tx", header, rows, fmt)
    with pytest.raises(DataValidationError) as exc:
        read_interactions(FileSpec(path))
    msg = assert_names(exc, path, column)
    assert "64-bit" in msg and str(2**64) in msg


def test_uint64_parquet_id_beyond_int64_is_refused_and_small_ones_read(tmp_path):
    header = ["user_id", "item_id", "timestamp"]
    big = [[2**63 + 1, 2, "2020-01-01"], [1, 2, "2020-01-01"]]
    dtypes = {"user_id": pl.UInt64, "item_id": pl.UInt64}
    path = write_table(tmp_path, "big", header, big, "parquet", dtypes)
    with pytest.raises(DataValidationError) as exc:
        read_interactions(FileSpec(path))
    assert_names(exc, path, "user_id")
    small = write_table(tmp_path, "small", header, [[7, 2, "2020-01-01"]], "parquet", dtypes)
    assert read_interactions(FileSpec(small))["user_id"].to_list() == [7]


def test_week_beyond_int64_is_refused(tmp_path):
    header = ["user_id", "item_id", "timestamp", "week"]
    rows = [["u1", "A", "2020-01-01", "1"], ["u1", "B", "2020-01-01", str(2**70)]]
    path = write_table(tmp_path, "tx", header, rows, "csv")
    with pytest.raises(DataValidationError) as exc:
        read_interactions(FileSpec(path))
    assert_names(exc, path, "week")


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_unix_time_out_of_range_is_refused(tmp_path, fmt):
    header = ["user_id", "item_id", "timestamp"]
    rows = [["u1", "A", 1.6e9], ["u1", "B", 1e20]]
    if fmt == "csv":  # digit-only text is read as unix time
        rows = [[u, i, str(int(t))] for u, i, t in rows]
    path = write_table(tmp_path, "tx", header, rows, fmt, {"timestamp": pl.Float64})
    with pytest.raises(DataValidationError) as exc:
        read_interactions(FileSpec(path))
    assert "out of range" in assert_names(exc, path, "timestamp")
