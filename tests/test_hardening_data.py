"""Issue 8, a shop's own data: determinism, column keys, product files, non-merchandise rows,
date-only split bounds, encodings, hostile files and configs, ``--set``, and the text output.

Every input is a small messy file written here (ties, latin-1 bytes, odd codes, missing
values); command-line checks run ``addons`` in a subprocess, as a user would.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import polars as pl
import pytest
import yaml

from features.adapters import load_shop_transactions
from features.cleaning import CleaningConfig, ExcludeItems
from features.dataset import build_dataset
from features.errors import ConfigError, DataValidationError
from features.loading import DataConfig, load_dataset
from features.readers import FileSpec, read_interactions
from features.splits import global_time_split
from tests.conftest import make_raw
from training.cli import build_parser, main
from training.config import load_config

ROOT = Path(__file__).resolve().parents[1]
ADDONS = [sys.executable, "-m", "training.cli"]
FMT = "%d/%m/%Y %H:%M"
HEADER = "InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country"


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``addons ARGS`` in a fresh process, as a user runs it."""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [*ADDONS, *args], capture_output=True, text=True, cwd=cwd or ROOT, env=env, timeout=300
    )


def shop_rows() -> list[str]:
    """Invoice lines with ties: each of 12 items is sold under two descriptions equally often,
    each of 6 customers buys from two countries equally often; plus postage, a manual line, a
    gift voucher, a discount under an unlisted code, an anonymous sale and padded text."""
    rows = []
    for i in range(12):
        user = 17000 + i % 6
        for n, (desc, country) in enumerate(((f"ITEM {i} B", "France"), (f"ITEM {i} A", "Spain"))):
            day = 1 + (i + n) % 20
            rows.append(
                f"5{i:02d}{n},I{i:02d},{desc},2,{day:02d}/06/2024 10:00,1.{i:02d},{user},{country}"
            )
    rows += [
        "59000,POST,POSTAGE,1,03/06/2024 10:00,18.00,17000,France",
        "59001,M,Manual,1,04/06/2024 10:00,3.00,17001,France",
        "59002,gift_0001_20,Dotcomgiftshop Gift Voucher £20.00,1,05/06/2024 10:00,17.00,17002,Spain",
        "59003,X9, discount ,-1,06/06/2024 10:00,5.00,17003,Spain",
        "59004,I00,ITEM 0 A,1,07/06/2024 10:00,1.00,,Spain",
        "C59005,I01,ITEM 1 A,-2,08/06/2024 10:00,1.01,17001,Spain",
    ]
    return rows


def write_shop(folder: Path, rows: list[str] | None = None, name: str = "retail.csv") -> Path:
    path = folder / name
    path.write_text("\n".join([HEADER, *(rows or shop_rows())]) + "\n", encoding="utf-8")
    return path


def write_config(folder: Path, data: dict, **over) -> Path:
    config = {
        "name": "hardening",
        "data": data,
        "split": {"train_end": "2024-06-14", "test_start": "2024-06-15"},
        "model": {"kind": "popularity"},
        **over,
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def shop_data(folder: Path, **cleaning) -> dict:
    return {
        "source": "shop_transactions",
        "interactions": {"path": str(write_shop(folder)), "timestamp_format": FMT},
        "cleaning": {"anonymous": "drop", **cleaning},
    }


# -- 1. the same files give the same fingerprint, in any process ----------------------------

FINGERPRINTS = """
import json, sys
from pathlib import Path
import features.adapters.completejourney as cj
from features.loading import DataConfig, load_dataset
from features.cleaning import CleaningConfig
from features.readers import FileSpec

folder = Path(sys.argv[1])
cj.data_dir = lambda: folder / "cj"
out = {}
out["completejourney"] = load_dataset(DataConfig()).fingerprint
out["movielens100k"] = load_dataset(
    DataConfig(source="movielens100k", path=str(folder / "ml-100k"))).fingerprint
anonymous = CleaningConfig(anonymous="drop")
out["shop_transactions"] = load_dataset(DataConfig(
    source="shop_transactions", cleaning=anonymous,
    interactions=FileSpec(str(folder / "retail.csv"), timestamp_format="%d/%m/%Y %H:%M"),
    items=FileSpec(str(folder / "products.csv")), users=FileSpec(str(folder / "customers.csv"), encoding="latin-1"),
)).fingerprint
out["files"] = load_dataset(DataConfig(
    source="files", cleaning=CleaningConfig(duplicates="keep"),
    interactions=FileSpec(str(folder / "tx.csv")), items=FileSpec(str(folder / "products.csv")),
    users=FileSpec(str(folder / "customers.csv"), encoding="latin-1"),
)).fingerprint
print(json.dumps(out))
"""


def write_all_sources(folder: Path) -> None:
    """One messy input per adapter, each with tied choices."""
    write_shop(folder)
    (folder / "products.csv").write_text(
        "item_id,category,price\nI00,cups,2.5\nI01,,\nZ99,plates,1.0\nI02,cups,\n"
    )
    (folder / "customers.csv").write_bytes(
        "user_id,city\n17000,Zürich\n17001,Málaga\n".encode("latin-1")
    )
    # files: repeated lines (kept) that tie on every sort key but the quantity, in a
    # scrambled order, a missing value and text ids.
    lines = ["user_id,item_id,timestamp,basket_id,quantity,value"]
    for i in range(40):
        lines.append(
            f"17{i % 3:03d},I{i % 7:02d},2024-06-{1 + i % 9:02d} 10:00,b{i % 11},{(i * 7) % 5 + 1},"
        )
    lines += ["17000,I00,2024-06-01 10:00,b0,9,1.5", "17000,I00,2024-06-01 10:00,b0,3,"]
    (folder / "tx.csv").write_text("\n".join(lines) + "\n")
    ml = folder / "ml-100k"
    ml.mkdir()
    ratings = [
        f"{u}\t{10 + (u * 3 + k) % 5}\t{1 + k % 5}\t{874965758 + 3600 * (k % 4)}"
        for u in range(1, 7)
        for k in range(6)
    ]
    (ml / "u.data").write_text("\n".join(ratings) + "\n")
    genres = ["0"] * 19
    items = [
        f"{i}|Film {i} (1995)|01-Jan-1995||http://x|" + "|".join([*genres[:-1], "1"])
        for i in range(10, 15)
    ]
    (ml / "u.item").write_bytes(("\n".join(items) + "\n").encode("latin-1"))
    cj = folder / "cj"
    cj.mkdir()
    t0 = datetime(2024, 1, 1, 9)
    pl.DataFrame({
        "household_id": [1, 1, 2, 2, 2, 3, 3, 3],
        "store_id": [1] * 8,
        "basket_id": [10, 10, 20, 20, 21, 30, 30, 30],
        "product_id": [100, 101, 100, 102, 100, 101, 101, 103],
        "quantity": [1, 2, 1, 1, 0, 3, 3, -1],
        "sales_value": [1.0, 2.0, 1.5, 0.5, 0.0, 3.0, 3.0, -1.0],
        "retail_disc": [0.0] * 8, "coupon_disc": [0.0] * 8, "coupon_match_disc": [0.0] * 8,
        "week": [1, 1, 1, 1, 2, 2, 2, 2],
        "transaction_timestamp": [t0] * 8,
    }).write_parquet(cj / "transactions.parquet")  # fmt: skip
    pl.DataFrame({
        "product_id": [100, 101, 102, 103, 104],
        "manufacturer_id": [1, 1, 2, 2, 3],
        "department": ["A", "A", "B", None, "B"],
        "brand": ["National", "Private", None, "National", "Private"],
        "product_category": ["x", "y", "x", None, "z"],
        "product_type": ["t", "t", "u", "u", None],
        "package_size": ["1 LB", None, "2 OZ", "1 LB", ""],
    }).write_parquet(cj / "products.parquet")  # fmt: skip
    pl.DataFrame(
        {"household_id": [1, 3], "age": ["25-34", None], "income": ["50K", "75K"]}
    ).write_parquet(cj / "demographics.parquet")


def test_every_adapter_gives_one_fingerprint_across_processes(tmp_path: Path) -> None:
    """Three fresh processes (each with its own hash seed) load every adapter's messy input;
    before the fix the shop export's tied descriptions and countries flipped between them."""
    write_all_sources(tmp_path)
    script = tmp_path / "fingerprints.py"
    script.write_text(FINGERPRINTS)
    runs = []
    for seed in ("1", "2", "3"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)}
        done = subprocess.run(
            [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, env=env
        )
        assert done.returncode == 0, done.stderr
        runs.append(json.loads(done.stdout))
    assert set(runs[0]) == {"completejourney", "movielens100k", "shop_transactions", "files"}
    for other in runs[1:]:
        assert other == runs[0]


def test_tied_description_and_country_go_to_the_smallest(tmp_path: Path) -> None:
    raw = load_shop_transactions(FileSpec(str(write_shop(tmp_path)), timestamp_format=FMT))
    text = dict(zip(raw.items["item_id"], raw.items["text"], strict=True))
    assert text["I03"] == "ITEM 3 A"  # sold once as "ITEM 3 B", once as "ITEM 3 A"
    assert text["X9"] == "discount"  # trimmed
    country = dict(zip(raw.users["user_id"], raw.users["country"], strict=True))
    assert country[17004] == "France"  # two French lines, two Spanish: a tie
    assert country[17001] == "France"  # France 3 (one is the manual line), Spain 3


# -- 2. canonical column keys ----------------------------------------------------------------


@pytest.mark.parametrize(
    "keys",
    [
        {
            "user_id": "Customer ID",
            "basket_id": "Invoice",
            "price": "Price",
            "item_id": "StockCode",
        },
        {"CustomerID": "Customer ID", "InvoiceNo": "Invoice", "UnitPrice": "Price"},
        {"customer_id": "Customer ID", "invoice": "Invoice", "unit_price": "Price"},
    ],
)
def test_shop_accepts_canonical_and_source_keys(tmp_path: Path, keys: dict) -> None:
    ii_header = "Invoice,StockCode,Description,Quantity,InvoiceDate,Price,Customer ID,Country"
    path = tmp_path / "retail_ii.csv"
    path.write_text("\n".join([ii_header, *shop_rows()]) + "\n")
    renamed = load_shop_transactions(FileSpec(str(path), columns=keys, timestamp_format=FMT))
    default = load_shop_transactions(FileSpec(str(write_shop(tmp_path)), timestamp_format=FMT))
    assert renamed.interactions.equals(default.interactions)
    assert renamed.items.equals(default.items)


def test_shop_refuses_one_column_keyed_twice(tmp_path: Path) -> None:
    columns = {"user_id": "CustomerID", "customer_id": "CustomerID"}
    with pytest.raises(DataValidationError, match="'user_id' and 'customer_id'"):
        load_shop_transactions(FileSpec(str(write_shop(tmp_path)), columns=columns))


def test_shop_line_totals_instead_of_unit_prices(tmp_path: Path) -> None:
    path = tmp_path / "totals.csv"
    path.write_text(
        "order,sku,when,qty,total,customer\n"
        "o1,A,2024-06-01,2,5.00,7\no2,A,2024-06-02,1,3.00,8\nCo3,A,2024-06-03,1,3.00,8\n"
    )
    columns = {"basket_id": "order", "item_id": "sku", "timestamp": "when",
               "quantity": "qty", "value": "total", "user_id": "customer"}  # fmt: skip
    raw = load_shop_transactions(FileSpec(str(path), columns=columns))
    assert raw.interactions["value"].to_list() == [5.0, 3.0, -3.0]
    assert raw.items["price"].to_list() == [2.75]  # median of 2.50 and 3.00 paid per unit


# -- 3. a product file with the shop export ---------------------------------------------------


def test_shop_uses_the_product_file(tmp_path: Path) -> None:
    (tmp_path / "products.csv").write_text(
        "sku,cat,list_price\nI00,cups,9.99\nI01,,\nZ99,plates,1.00\n"
    )
    products = FileSpec(
        str(tmp_path / "products.csv"),
        columns={"item_id": "sku", "category": "cat", "price": "list_price"},
    )
    config = DataConfig(
        source="shop_transactions",
        interactions=FileSpec(str(write_shop(tmp_path)), timestamp_format=FMT),
        items=products,
        cleaning=CleaningConfig(anonymous="drop", unknown_items="drop"),
    )
    data = load_dataset(config)
    items = {r["item_id"]: r for r in data.items.to_dicts()}
    assert items["I00"]["price"] == 9.99  # the list price wins over the median paid
    assert items["I00"]["category"] == "cups"
    assert items["I01"]["price"] == pytest.approx(1.01)  # no list price: the median paid
    assert items["I01"]["text"] == "ITEM 1 A"
    assert items["Z99"]["category"] == "plates"  # never sold, still in the catalog
    steps = {s.step: s for s in data.report.steps}
    # unknown_items checks the lines against the product file: only I00, I01 are in it.
    assert set(data.interactions["item_id"].unique()) == {"I00", "I01"}
    assert steps["unknown_items"].removed > 0


def test_product_file_path_that_does_not_exist_exits_2(tmp_path: Path) -> None:
    data = {**shop_data(tmp_path), "items": {"path": str(tmp_path / "missing.csv")}}
    done = run_cli("data", "report", "--config", str(write_config(tmp_path, data)))
    assert done.returncode == 2, done.stderr
    assert "missing.csv" in done.stderr and "data.items" in done.stderr
    assert "Traceback" not in done.stderr


def test_file_keys_a_source_does_not_read_are_refused(tmp_path: Path) -> None:
    config = DataConfig(items=FileSpec(str(tmp_path / "products.csv")))  # completejourney
    with pytest.raises(ConfigError) as err:
        load_dataset(config)
    assert err.value.key == "data.items"


# -- 4. anonymous lines ------------------------------------------------------------------------


def test_null_customer_error_names_the_setting(tmp_path: Path) -> None:
    data = shop_data(tmp_path, anonymous="error")
    done = run_cli("data", "report", "--config", str(write_config(tmp_path, data)))
    assert done.returncode == 2
    assert "data.cleaning.anonymous: drop" in done.stderr
    assert "CustomerID" in done.stderr


# -- 5. non-merchandise lines ------------------------------------------------------------------


def test_shop_default_drops_non_merchandise_and_counts_it(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, shop_data(tmp_path)))
    data = load_dataset(config.data)
    steps = {s.step: s for s in data.report.steps}
    # POST, M, the voucher and X9 ("discount") go; the anonymous line went before.
    assert steps["exclude_items"].removed == 4
    assert steps["exclude_items"].rows_before == steps["anonymous"].rows_after
    ids = set(data.item_map.external_ids.tolist())
    assert not ids & {"POST", "M", "gift_0001_20", "X9"}  # not even in the catalog
    assert {f"I{i:02d}" for i in range(12)} <= ids


def test_exclude_items_is_configurable(tmp_path: Path) -> None:
    off = {"ids": [], "id_patterns": [], "description_patterns": []}
    data = load_dataset(
        load_config(write_config(tmp_path, shop_data(tmp_path, exclude_items=off))).data
    )
    assert {"POST", "M", "gift_0001_20", "X9"} <= set(data.item_map.external_ids.tolist())
    mine = {"ids": ["I00"], "id_patterns": ["I1[01]"], "description_patterns": ["item 2 .*"]}
    data = load_dataset(
        load_config(write_config(tmp_path, shop_data(tmp_path, exclude_items=mine))).data
    )
    assert not {"I00", "I10", "I11", "I02"} & set(data.item_map.external_ids.tolist())
    assert "POST" in data.item_map.external_ids.tolist()  # setting it replaces the default


def test_other_sources_exclude_nothing_by_default() -> None:
    rows = [(1, "POST", 1, 0, 1), (1, "A", 1, 0, 1)]
    data = build_dataset(make_raw(rows), CleaningConfig())
    assert data.item_map.external_ids.tolist() == ["A", "POST"]
    data = build_dataset(make_raw(rows), CleaningConfig(exclude_items=ExcludeItems(ids=["POST"])))
    assert data.item_map.external_ids.tolist() == ["A"]


def test_bad_exclusion_pattern_exits_2_naming_the_key(tmp_path: Path) -> None:
    data = shop_data(tmp_path, exclude_items={"id_patterns": ["POST", "(gift"]})
    done = run_cli("data", "report", "--config", str(write_config(tmp_path, data)))
    assert done.returncode == 2
    assert "data.cleaning.exclude_items.id_patterns[1]" in done.stderr


# -- 6. a date alone means the whole day -------------------------------------------------------


@pytest.mark.parametrize("train_end", ["2024-01-03", datetime(2024, 1, 3).date()])
def test_date_only_train_end_is_the_whole_day(train_end) -> None:
    # make_raw puts day d at 2024-01-01 + d days, 00:00; shift some rows into the day.
    rows = [(1, "a", 1, 0, 1), (1, "b", 2, 2, 1), (2, "a", 3, 3, 1), (2, "c", 4, 4, 1)]
    raw = make_raw(rows)
    hours = pl.Series([0, 14, 0, 0]).cast(pl.Duration("us")) * 3_600_000_000
    raw.interactions = raw.interactions.with_columns(pl.col("timestamp") + hours)
    data = build_dataset(raw, CleaningConfig())
    split = global_time_split(data, train_end, "2024-01-04")
    # 2024-01-03 14:00 is train; 2024-01-04 00:00 test; nothing falls between.
    assert split.train.interactions.height == 2
    assert split.test.interactions.height == 2
    assert split.train.interactions["timestamp"].max() == datetime(2024, 1, 3, 14)
    with pytest.raises(ConfigError, match="after train_end"):
        global_time_split(data, train_end, "2024-01-03")  # same day: an overlap
    explicit = global_time_split(data, "2024-01-03T00:00:00", "2024-01-04")
    assert explicit.train.interactions.height == 1  # a time given is taken as given


# -- 7. encodings and headers ------------------------------------------------------------------


def test_latin1_read_as_utf8_names_file_line_and_setting(tmp_path: Path) -> None:
    path = tmp_path / "tx.csv"
    path.write_bytes(
        "user_id,item_id,timestamp\n1,tea,2024-01-01\n1,café,2024-01-01\n".encode("latin-1")
    )
    with pytest.raises(DataValidationError) as err:
        read_interactions(FileSpec(str(path)))
    msg = str(err.value)
    assert str(path) in msg and "line 3" in msg and "encoding: latin-1" in msg


def test_two_ids_differing_in_one_latin1_byte_stay_two_items(tmp_path: Path) -> None:
    path = tmp_path / "tx.csv"
    path.write_bytes(
        "user_id,item_id,timestamp\n1,café,2024-01-01\n2,cafè,2024-01-01\n".encode("latin-1")
    )
    config = DataConfig(source="files", interactions=FileSpec(str(path), encoding="latin-1"))
    data = load_dataset(config)
    assert sorted(data.item_map.external_ids.tolist()) == ["cafè", "café"]


def test_unknown_encoding_is_a_config_error_and_utf16_reads(tmp_path: Path) -> None:
    path = tmp_path / "tx.tsv"  # Excel's "Unicode text": UTF-16 with a byte-order mark
    path.write_bytes("user_id\titem_id\ttimestamp\n1\tcafé\t2024-01-01\n".encode("utf-16"))
    df = read_interactions(FileSpec(str(path), separator="\t", encoding="utf-16"))
    assert df["item_id"].to_list() == ["café"]
    config = write_config(tmp_path, {"source": "files", "interactions": {"path": str(path)}})
    with pytest.raises(ConfigError) as err:
        load_config(config, ["data.interactions.encoding=klingon"])
    assert err.value.key == "data.interactions.encoding"


def test_duplicated_header_column_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "tx.csv"
    path.write_text("user_id,item_id,timestamp,item_id\n1,a,2024-01-01,b\n")
    with pytest.raises(DataValidationError) as err:
        read_interactions(FileSpec(str(path)))
    assert str(path) in str(err.value) and "'item_id' twice" in str(err.value)


# -- 8. hostile files and configs: exit 2 with a short message --------------------------------


def _files_config(folder: Path, data_file: Path) -> Path:
    return write_config(folder, {"source": "files", "interactions": {"path": str(data_file)}})


def _assert_refused(done: subprocess.CompletedProcess, *words: str) -> None:
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert len(done.stderr) < 2000  # a message, not a dump
    for word in words:
        assert word in done.stderr


def test_truncated_gzip_exits_2(tmp_path: Path) -> None:
    body = "user_id,item_id,timestamp\n" + "".join(
        f"{i},{i % 50},2024-01-01\n" for i in range(20000)
    )
    whole = gzip.compress(body.encode())
    path = tmp_path / "tx.csv.gz"
    path.write_bytes(whole[: len(whole) // 2])
    _assert_refused(
        run_cli("data", "report", "--config", str(_files_config(tmp_path, path))),
        "tx.csv.gz",
        "truncated",
    )


def test_config_with_a_non_utf8_byte_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(
        b"name: caf\xe9\nsplit: {train_end: 1, test_start: 2}\nmodel: {kind: popularity}\n"
    )
    _assert_refused(run_cli("evaluate", "--config", str(path)), "config.yaml", "line 1", "UTF-8")


def test_yaml_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")  # ~500 bytes, 9**9 strings once expanded
    _assert_refused(run_cli("data", "report", "--config", str(path)), "bomb.yaml", "aliases")


def test_one_huge_field_exits_2_naming_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "tx.csv"
    with path.open("w") as fh:
        fh.write("user_id,item_id,timestamp\n1,a,2024-01-01\n2,")
        fh.write("x" * (3 << 20))  # 3 MB in one field, over the 1 MB bound
        fh.write(",2024-01-01\n")
    _assert_refused(
        run_cli("data", "report", "--config", str(_files_config(tmp_path, path))),
        "tx.csv",
        "line 3",
    )


MEASURE = """
import resource, sys
from features.errors import DataValidationError
from features.readers import FileSpec, read_raw
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    read_raw(FileSpec(sys.argv[1]))
    print("read", end=" ")
except DataValidationError as exc:
    print("refused", end=" ")
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def test_gzip_of_newlines_keeps_memory_bounded(tmp_path: Path) -> None:
    """96 MB of newlines compress to ~100 KB; reading them must not cost their size."""
    path = tmp_path / "tx.csv.gz"
    with gzip.open(path, "wb") as fh:
        fh.write(b"user_id,item_id,timestamp\n1,a,2024-01-01\n")
        for _ in range(96):
            fh.write(b"\n" * (1 << 20))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(path)], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr
    outcome, grown_kib = done.stdout.split()
    assert outcome == "refused"
    assert int(grown_kib) < 32 * 1024  # far below the 96 MB the file expands to
    done = run_cli("data", "report", "--config", str(_files_config(tmp_path, path)))
    _assert_refused(done, "blank lines")


# -- 9. --set --------------------------------------------------------------------------------


def test_set_overrides_on_data_report_and_evaluate(tmp_path: Path) -> None:
    data = shop_data(tmp_path)
    config = write_config(tmp_path, {**data, "interactions": {"path": "nowhere.csv"}})
    real = data["interactions"]["path"]
    done = run_cli("data", "report", "--config", str(config), "--json",
                   "--set", f"data.interactions.path={real}",
                   "--set", f"data.interactions.timestamp_format={FMT}")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["report"]["steps"][0]["rows_after"] == len(shop_rows())
    done = run_cli("evaluate", "--config", str(config), "--set", "data.cleaning.anonymus=drop")
    _assert_refused(done, "data.cleaning.anonymus", "unknown key")
    done = run_cli("evaluate", "--config", str(config), "--set", "split.seed=seven")
    _assert_refused(done, "split.seed")


def test_set_values_are_yaml_and_validated(tmp_path: Path) -> None:
    path = write_config(tmp_path, shop_data(tmp_path))
    config = load_config(
        path, ["evaluation.k=[5, 10]", "split.train_end=2024-06-10", "model={kind: als}"]
    )
    assert config.evaluation.k == [5, 10]
    assert config.model.kind == "als"
    assert str(config.split.train_end) == "2024-06-10"
    with pytest.raises(ConfigError) as err:
        load_config(path, ["name.first=x"])
    assert err.value.key == "name"
    with pytest.raises(ConfigError, match=r"dotted\.key=value"):
        load_config(path, ["name"])


def test_train_applies_set_to_every_config(tmp_path: Path, monkeypatch, capsys) -> None:
    import training.train

    seen = []

    class Done:
        run_id = "r"

        def __init__(self, config) -> None:
            self.config = config

        def to_dict(self) -> dict:
            return {"name": self.config.name}

    def fake_run(config, *args, **kwargs):
        seen.append(config)
        return Done(config)

    monkeypatch.setattr(training.train, "run_training", fake_run)
    a = write_config(tmp_path, shop_data(tmp_path))
    b = tmp_path / "b.yaml"
    b.write_text(a.read_text().replace("hardening", "second"))
    args = ["train", "--config", str(a), "--config", str(b), "--json", "--set", "split.seed=7"]
    assert build_parser().parse_args(args).set == ["split.seed=7"]
    assert main(args) == 0, capsys.readouterr().err
    assert [c.split.seed for c in seen] == [7, 7]


# -- 10. text output ---------------------------------------------------------------------------


def test_evaluate_text_counts_cold_users_and_says_na_without_categories(tmp_path: Path) -> None:
    lines = ["user_id,item_id,timestamp,basket_id"]
    for u in range(1, 5):  # four users with train history
        lines += [
            f"{u},a,2024-01-0{u},t{u}",
            f"{u},b,2024-01-0{u},t{u}",
            f"{u},c,2024-01-0{u},t{u}",
        ]
    for u in range(1, 7):  # test window: users 5 and 6 are new
        lines += [
            f"{u},a,2024-02-0{u},s{u}",
            f"{u},b,2024-02-0{u},s{u}",
            f"{u},c,2024-02-0{u},s{u}",
        ]
    path = tmp_path / "tx.csv"
    path.write_text("\n".join(lines) + "\n")
    data = {"source": "files", "interactions": {"path": str(path)}}
    config = write_config(
        tmp_path,
        data,
        split={"train_end": "2024-01-31", "test_start": "2024-02-01"},
        evaluation={"tasks": ["basket_completion"]},
    )
    done = run_cli("evaluate", "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert (
        "test window: 6 baskets of 6 users; 2 cold users (no train history) dropped" in done.stdout
    )
    row = next(x for x in done.stdout.splitlines() if x.startswith("category_diversity"))
    assert row.split()[1:4] == ["n/a", "n/a", "n/a"]
    assert "nan" not in done.stdout
    done = run_cli("evaluate", "--config", str(config), "--json")
    payload = json.loads(done.stdout)
    ev = payload["evaluations"][0]
    assert "category_diversity@10" not in ev["metrics"]
    assert "category_diversity" in ev["not_applicable"]


def test_category_diversity_is_kept_when_there_are_categories(tiny_data) -> None:
    from features.splits import basket_completion_task
    from training.config import ModelConfig, build_model
    from training.evaluation.harness import evaluate

    split = global_time_split(tiny_data, 2, 3, column="week")
    task = basket_completion_task(split.train, split.test)
    model = build_model(ModelConfig("popularity", {})).fit(split.train)
    ev = evaluate(model, task, split.train, ks=[3])
    assert "category_diversity@3" in ev.metrics and not ev.not_applicable
