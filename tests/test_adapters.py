"""Adapters: shop transactions (Online Retail layout), MovieLens-100K files, Complete Journey.

Shop and MovieLens inputs are small hand-made files in the real layouts, written to
``tmp_path``; every expected value below is worked out by hand from those rows.
"""

import calendar
from datetime import datetime
from pathlib import Path

import polars as pl
import pytest

from features.adapters import load_complete_journey, load_movielens_100k, load_shop_transactions
from features.adapters.movielens import GENRES
from features.cleaning import CleaningConfig
from features.errors import DataValidationError
from features.loading import DataConfig, load_dataset
from features.readers import FileSpec

# -- shop transactions ---------------------------------------------------------------------

SHOP_HEADER = "InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country"
# Day-first dates (not ISO): 01/12/2010 is 1 December 2010.
SHOP_ROWS = [
    "536365,A1,HEART,6,01/12/2010 08:26,2.50,17850,United Kingdom",  # 1
    "536365,B2,LANTERN,4,01/12/2010 08:26,3.00,17850,United Kingdom",  # 2
    "536366,A1,HEART,2,02/12/2010 09:00,3.50,13047,France",  # 3
    "C536367,A1,HEART,-6,03/12/2010 10:00,2.50,17850,United Kingdom",  # 4 cancels row 1
    "C536368,B2,LANTERN,1,03/12/2010 11:00,10.00,17850,United Kingdom",  # 5 cancelled, qty +1
    "536369,C3,CANDLE,3,04/12/2010 12:00,1.00,,United Kingdom",  # 6 anonymous
    "536370,C3,CANDLE,5,05/12/2010 13:00,1.20,13047,France",  # 7
    "536371,B2,LANTERN,-2,06/12/2010 14:00,3.00,13047,France",  # 8 return, no C
    "536372,B2,LANTERN,1,07/12/2010 15:00,4.00,13047,France",  # 9
    "536373,C3,CANDLE,1,08/12/2010 16:00,0.00,13047,France",  # 10 free: no price
]
SHOP_FORMAT = "%d/%m/%Y %H:%M"


def write_shop(tmp_path: Path, header: str = SHOP_HEADER, rows: list[str] = SHOP_ROWS) -> str:
    path = tmp_path / "online_retail.csv"
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return str(path)


def shop_spec(tmp_path: Path, **kw) -> FileSpec:
    return FileSpec(write_shop(tmp_path), timestamp_format=SHOP_FORMAT, **kw)


def by_basket(df: pl.DataFrame, column: str) -> dict:
    return dict(zip(df["basket_id"].cast(pl.String), df[column], strict=True))


def test_shop_cancellations_become_negative_quantities(tmp_path):
    raw = load_shop_transactions(shop_spec(tmp_path), allow_anonymous=True)
    df = raw.interactions
    assert df.height == 10
    q = dict(
        zip(
            zip(df["basket_id"].cast(pl.String), df["item_id"].cast(pl.String), strict=True),
            df["quantity"],
            strict=True,
        )
    )
    assert q[("C536367", "A1")] == -6.0  # already negative: stays
    assert q[("C536368", "B2")] == -1.0  # cancelled with +1: made negative
    assert q[("536371", "B2")] == -2.0  # a return without C: unchanged
    assert q[("536365", "A1")] == 6.0
    assert q[("536365", "B2")] == 4.0
    # value = quantity x unit price
    value = by_basket(df.filter(pl.col("item_id").cast(pl.String) == "B2"), "value")
    assert value["C536368"] == pytest.approx(-10.0)
    assert value["536365"] == pytest.approx(12.0)


def test_shop_timestamps_use_timestamp_format(tmp_path):
    df = load_shop_transactions(shop_spec(tmp_path), allow_anonymous=True).interactions
    ts = by_basket(df, "timestamp")
    assert ts["536365"] == datetime(2010, 12, 1, 8, 26)
    assert ts["536373"] == datetime(2010, 12, 8, 16, 0)


def test_shop_anonymous_rows_rejected_when_not_allowed(tmp_path):
    spec = shop_spec(tmp_path)
    with pytest.raises(DataValidationError) as exc:
        load_shop_transactions(spec, allow_anonymous=False)
    msg = str(exc.value)
    assert spec.path in msg
    assert "'CustomerID'" in msg


def test_shop_anonymous_error_setting_rejects_through_loading(tmp_path):
    spec = shop_spec(tmp_path)
    config = DataConfig(source="shop_transactions", interactions=spec)  # anonymous='error'
    with pytest.raises(DataValidationError) as exc:
        load_dataset(config)
    assert spec.path in str(exc.value)
    assert "'CustomerID'" in str(exc.value)


def _steps(tmp_path: Path, returns: str) -> tuple:
    config = DataConfig(
        source="shop_transactions",
        interactions=shop_spec(tmp_path),
        cleaning=CleaningConfig(anonymous="drop", returns=returns),
    )
    data = load_dataset(config)
    return data, {s.step: s for s in data.report.steps}


def test_shop_anonymous_drop_is_counted(tmp_path):
    _, steps = _steps(tmp_path, "drop")
    assert steps["input"].rows_after == 10
    assert steps["anonymous"].rows_before == 10
    assert steps["anonymous"].rows_after == 9
    assert steps["anonymous"].removed == 1
    assert steps["anonymous"].setting == "drop"
    assert steps["anonymous"].users == 2


def test_shop_returns_drop_removes_only_negative_rows(tmp_path):
    data, steps = _steps(tmp_path, "drop")
    # rows 4, 5 and 8 are negative
    assert (steps["returns"].rows_before, steps["returns"].rows_after) == (9, 6)
    assert steps["returns"].removed == 3
    assert steps["returns"].setting == "drop"
    # left: rows 1, 2 (536365), 3 (536366), 7, 9, 10
    assert steps["returns"].baskets == 5
    assert data.interactions.height == 6


def test_shop_returns_net_also_removes_cancelled_purchases(tmp_path):
    data, steps = _steps(tmp_path, "net")
    # (17850, A1): 6 - 6 = 0 -> rows 1 and 4 go; (17850, B2): 4 - 1 = 3 -> row 2 stays, 5 goes;
    # (13047, B2): -2 + 1 = -1 -> rows 8 and 9 go; (13047, A1) and (13047, C3) stay.
    assert (steps["returns"].rows_before, steps["returns"].rows_after) == (9, 4)
    assert steps["returns"].removed == 5
    assert steps["returns"].setting == "net"
    pairs = sorted(
        zip(
            data.interactions["user_id"].cast(pl.String),
            data.interactions["item_id"].cast(pl.String),
            strict=True,
        )
    )
    assert pairs == [("13047", "A1"), ("13047", "C3"), ("13047", "C3"), ("17850", "B2")]


def test_shop_report_does_not_count_anonymous_as_a_user(tmp_path):
    # The input has two customers (17850, 13047) plus one anonymous line.
    _, steps = _steps(tmp_path, "drop")
    assert steps["input"].users == 2


def test_shop_item_price_is_median_unit_price(tmp_path):
    raw = load_shop_transactions(shop_spec(tmp_path), allow_anonymous=True)
    items = raw.items
    price = dict(zip(items["item_id"].cast(pl.String), items["price"], strict=True))
    text = dict(zip(items["item_id"].cast(pl.String), items["text"], strict=True))
    assert set(price) == {"A1", "B2", "C3"}
    # A1: purchases at 2.50 and 3.50 (the cancellation is not a sale)
    assert price["A1"] == pytest.approx(3.0)
    # B2: 3.00 and 4.00; not the cancelled line at 10.00, not the return
    assert price["B2"] == pytest.approx(3.5)
    # C3: 1.00 (anonymous sale counts) and 1.20; the free line at 0.00 does not
    assert price["C3"] == pytest.approx(1.1)
    assert text == {"A1": "HEART", "B2": "LANTERN", "C3": "CANDLE"}


def test_shop_users_country(tmp_path):
    raw = load_shop_transactions(shop_spec(tmp_path), allow_anonymous=True)
    users = raw.users
    assert users is not None
    country = dict(zip(users["user_id"].cast(pl.String), users["country"], strict=True))
    assert country == {"17850": "United Kingdom", "13047": "France"}


def test_shop_own_column_names_through_mapping(tmp_path):
    # The "Online Retail II" export names some columns differently.
    header = "Invoice,StockCode,Description,Quantity,InvoiceDate,Price,Customer ID,Country"
    path = tmp_path / "retail_ii.csv"
    path.write_text("\n".join([header, *SHOP_ROWS]) + "\n", encoding="utf-8")
    columns = {"invoice": "Invoice", "unit_price": "Price", "customer_id": "Customer ID"}
    spec = FileSpec(str(path), columns=columns, timestamp_format=SHOP_FORMAT)
    renamed = load_shop_transactions(spec, allow_anonymous=True)
    default = load_shop_transactions(shop_spec(tmp_path), allow_anonymous=True)
    assert renamed.interactions.equals(default.interactions)
    assert renamed.items.equals(default.items)


def test_shop_missing_required_column(tmp_path):
    header = "InvoiceNo,StockCode,Description,Quantity,UnitPrice,CustomerID,Country"
    rows = ["536365,A1,HEART,6,2.50,17850,United Kingdom"]
    path = write_shop(tmp_path, header, rows)
    with pytest.raises(DataValidationError) as exc:
        load_shop_transactions(FileSpec(path))
    assert path in str(exc.value)
    assert "'InvoiceDate'" in str(exc.value)


def test_shop_unknown_mapping_key(tmp_path):
    spec = FileSpec(write_shop(tmp_path), columns={"customer": "CustomerID"})
    with pytest.raises(DataValidationError) as exc:
        load_shop_transactions(spec)
    assert spec.path in str(exc.value)
    assert "'customer'" in str(exc.value)


def test_shop_non_numeric_quantity(tmp_path):
    rows = [*SHOP_ROWS[:2], "536399,A1,HEART,six,09/12/2010 10:00,2.50,17850,United Kingdom"]
    path = write_shop(tmp_path, rows=rows)
    with pytest.raises(DataValidationError) as exc:
        load_shop_transactions(FileSpec(path, timestamp_format=SHOP_FORMAT))
    assert path in str(exc.value)
    assert "'Quantity'" in str(exc.value)


def test_shop_date_not_in_timestamp_format(tmp_path):
    rows = [*SHOP_ROWS[:2], "536399,A1,HEART,1,2010-12-09T10:00,2.50,17850,United Kingdom"]
    path = write_shop(tmp_path, rows=rows)
    with pytest.raises(DataValidationError) as exc:
        load_shop_transactions(FileSpec(path, timestamp_format=SHOP_FORMAT))
    assert path in str(exc.value)
    assert "'InvoiceDate'" in str(exc.value)


# -- MovieLens-100K ------------------------------------------------------------------------


def unix(*args: int) -> int:
    return calendar.timegm(datetime(*args).timetuple())


# user, item, rating, unix seconds (UTC)
ML_RATINGS = [
    (1, 10, 5, unix(1997, 9, 20, 0, 0, 5)),
    (1, 20, 3, unix(1997, 9, 20, 23, 59, 59)),  # same user, same day: same basket
    (1, 30, 4, unix(1997, 9, 21, 0, 0, 0)),  # next day: new basket
    (2, 10, 2, unix(1997, 9, 20, 12, 0, 0)),  # other user, same day: own basket
]


def genre_flags(*names: str) -> list[str]:
    return ["1" if g in names else "0" for g in GENRES]


ML_ITEMS = [
    [
        "10",
        "Toy Story (1995)",
        "01-Jan-1995",
        "",
        "http://us.imdb.com/M/title-exact?Toy%20Story%20(1995)",
        *genre_flags("Animation", "Children's", "Comedy"),
    ],
    [
        "20",
        "Misérables, Les (1995)",
        "01-Jan-1995",
        "",
        "http://us.imdb.com/Title?Mis%E9rables",
        *genre_flags("Drama", "War"),
    ],
    ["30", "unknown", "", "", "", *genre_flags("unknown")],
]
ML_USERS = ["1|24|M|technician|85711", "2|35|F|other|94043", "3|50|M|writer|32067"]


def write_movielens(
    tmp_path: Path,
    data_lines: list[str] | None = None,
    item_lines: list[str] | None = None,
    user_lines: list[str] | None = None,
) -> Path:
    folder = tmp_path / "ml-100k"
    folder.mkdir(exist_ok=True)
    if data_lines is None:
        data_lines = ["\t".join(str(v) for v in r) for r in ML_RATINGS]
    if item_lines is None:
        item_lines = ["|".join(r) for r in ML_ITEMS]
    if user_lines is None:
        user_lines = ML_USERS
    (folder / "u.data").write_text("\n".join(data_lines) + "\n", encoding="latin-1")
    (folder / "u.item").write_bytes(("\n".join(item_lines) + "\n").encode("latin-1"))
    (folder / "u.user").write_text("\n".join(user_lines) + "\n", encoding="latin-1")
    return folder


def test_movielens_ids_values_and_timestamps(tmp_path):
    raw = load_movielens_100k(str(write_movielens(tmp_path)))
    df = raw.interactions
    assert df["user_id"].to_list() == [r[0] for r in ML_RATINGS]
    assert df["item_id"].to_list() == [r[1] for r in ML_RATINGS]
    assert df["value"].to_list() == [float(r[2]) for r in ML_RATINGS]
    assert df["quantity"].to_list() == [1.0] * 4
    assert df["timestamp"].to_list() == [
        datetime(1997, 9, 20, 0, 0, 5),
        datetime(1997, 9, 20, 23, 59, 59),
        datetime(1997, 9, 21),
        datetime(1997, 9, 20, 12),
    ]


def test_movielens_basket_is_user_and_calendar_day(tmp_path):
    df = load_movielens_100k(str(write_movielens(tmp_path))).interactions
    b = df["basket_id"].to_list()
    assert None not in b
    assert b[0] == b[1]
    assert len({b[0], b[2], b[3]}) == 3


def test_movielens_items_text_and_tags_from_genres(tmp_path):
    items = load_movielens_100k(str(write_movielens(tmp_path))).items
    assert items is not None
    assert items["item_id"].to_list() == [10, 20, 30]
    assert items["text"].to_list() == ["Toy Story (1995)", "Misérables, Les (1995)", "unknown"]
    assert items["tags"].to_list() == ["Animation|Children's|Comedy", "Drama|War", "unknown"]
    assert items["category"].to_list() == ["Animation", "Drama", "unknown"]


def test_movielens_users(tmp_path):
    users = load_movielens_100k(str(write_movielens(tmp_path))).users
    assert users is not None
    assert users["user_id"].to_list() == [1, 2, 3]
    assert users["age"].to_list() == ["<25", "35-49", "50+"]
    assert users["gender"].to_list() == ["M", "F", "M"]
    assert users["occupation"].to_list() == ["technician", "other", "writer"]
    assert "zip" not in users.columns


def test_movielens_without_item_and_user_files(tmp_path):
    folder = write_movielens(tmp_path)
    (folder / "u.item").unlink()
    (folder / "u.user").unlink()
    raw = load_movielens_100k(str(folder))
    assert raw.items is None
    assert raw.users is None
    assert raw.interactions.height == 4


def _ml_error(tmp_path: Path, file: str, **files) -> str:
    folder = write_movielens(tmp_path, **files)
    with pytest.raises(DataValidationError) as exc:
        load_movielens_100k(str(folder))
    msg = str(exc.value)
    assert str(folder / file) in msg, msg
    return msg.replace(str(folder / file), "<file>")  # the rest, to look for numbers in


def test_movielens_u_data_wrong_field_count(tmp_path):
    lines = ["1\t10\t5", "2\t10\t2"]  # the timestamp field is missing
    msg = _ml_error(tmp_path, "u.data", data_lines=lines)
    assert "4" in msg


def test_movielens_u_data_ragged_line(tmp_path):
    lines = ["1\t10\t5\t874965758", "2\t10\t2\t874965758\t9"]
    _ml_error(tmp_path, "u.data", data_lines=lines)


def test_movielens_u_data_non_numeric_timestamp(tmp_path):
    lines = ["1\t10\t5\t874965758", "2\t10\t2\tyesterday"]
    msg = _ml_error(tmp_path, "u.data", data_lines=lines)
    assert "timestamp" in msg


def test_movielens_u_data_non_numeric_user(tmp_path):
    lines = ["1\t10\t5\t874965758", "bob\t10\t2\t874965758"]
    msg = _ml_error(tmp_path, "u.data", data_lines=lines)
    assert "user_id" in msg


def test_movielens_u_item_wrong_field_count(tmp_path):
    lines = ["|".join(r[:-1]) for r in ML_ITEMS]  # 23 fields
    msg = _ml_error(tmp_path, "u.item", item_lines=lines)
    assert "24" in msg


def test_movielens_u_user_wrong_field_count(tmp_path):
    lines = ["1|24|M|technician", "2|35|F|other"]
    msg = _ml_error(tmp_path, "u.user", user_lines=lines)
    assert "5" in msg


def test_movielens_u_user_non_numeric_age(tmp_path):
    lines = ["1|24|M|technician|85711", "2|unknown|F|other|94043"]
    msg = _ml_error(tmp_path, "u.user", user_lines=lines)
    assert "age" in msg


def test_movielens_missing_folder(tmp_path):
    folder = tmp_path / "no-such-folder"
    with pytest.raises(DataValidationError) as exc:
        load_movielens_100k(str(folder))
    assert str(folder) in str(exc.value)


def test_movielens_missing_u_data(tmp_path):
    folder = write_movielens(tmp_path)
    (folder / "u.data").unlink()
    with pytest.raises(DataValidationError) as exc:
        load_movielens_100k(str(folder))
    assert str(folder / "u.data") in str(exc.value)


# -- Complete Journey (the embedded real data) -----------------------------------------------


def test_complete_journey_loads():
    raw = load_complete_journey()
    df = raw.interactions
    assert df["user_id"].n_unique() == 2_469
    assert df["basket_id"].n_unique() == 155_848
    assert df["user_id"].null_count() == 0
    assert raw.items is not None
    assert raw.items.height == 92_331
    assert raw.items["item_id"].n_unique() == 92_331
    assert raw.users is not None
    assert raw.users.height == 801
