"""Edge cases of input handling: dates that could be misread, ids with leading zeros, shared
basket ids, lax config types, overwriting folders, and data-dependent errors."""

from __future__ import annotations

import polars as pl
import pytest
import yaml

from features.adapters.base import RawData
from features.cleaning import CleaningConfig
from features.dataset import build_dataset
from features.errors import DataValidationError
from features.readers import FileSpec, read_interactions
from tests.conftest import make_raw
from training.cli import main
from training.config import ModelConfig, build_model
from training.export import ExportError, export_model
from training.persistence import save_model


def _csv(tmp_path, text: str) -> str:
    path = tmp_path / "tx.csv"
    path.write_text(text)
    return str(path)


def test_non_iso_dates_need_a_format(tmp_path) -> None:
    path = _csv(tmp_path, "user_id,item_id,timestamp\n1,2,12/1/2010 8:26\n1,3,12/2/2010 9:00\n")
    with pytest.raises(DataValidationError, match="not ISO-8601") as err:
        read_interactions(FileSpec(path))
    assert path in str(err.value) and "timestamp_format" in str(err.value)
    df = read_interactions(FileSpec(path, timestamp_format="%m/%d/%Y %H:%M"))
    assert df["timestamp"].dt.month().to_list() == [12, 12]
    assert df["timestamp"].dt.day().to_list() == [1, 2]


def test_yyyymmdd_digits_are_not_taken_for_unix_time(tmp_path) -> None:
    path = _csv(tmp_path, "user_id,item_id,timestamp\n1,2,20240101\n")
    with pytest.raises(DataValidationError, match="YYYYMMDD"):
        read_interactions(FileSpec(path))
    df = read_interactions(FileSpec(path, timestamp_format="%Y%m%d"))
    assert df["timestamp"].dt.year().to_list() == [2024]


def test_ids_with_leading_zeros_stay_text(tmp_path) -> None:
    path = _csv(tmp_path, "user_id,item_id,timestamp\n1,007,2024-01-01\n1,7,2024-01-02\n")
    df = read_interactions(FileSpec(path))
    assert df["item_id"].to_list() == ["007", "7"]


def test_mapping_keys_must_be_canonical(tmp_path) -> None:
    path = _csv(tmp_path, "customer,item_id,timestamp\n1,2,2024-01-01\n")
    with pytest.raises(DataValidationError, match="unknown key") as err:
        read_interactions(FileSpec(path, columns={"user": "customer"}))
    assert "'user'" in str(err.value)


def test_baskets_of_two_users_sharing_an_id_stay_apart() -> None:
    rows = [("u1", "A", 1, 0, 1), ("u1", "B", 1, 0, 1), ("u2", "C", 1, 0, 1), ("u2", "A", 2, 1, 1)]
    data = build_dataset(make_raw(rows), CleaningConfig())
    baskets = data.basket_item_matrix()
    assert baskets.matrix.shape[0] == 3
    conf = build_model(ModelConfig("cooccurrence", {})).fit(data).confidence_.toarray()
    a, c = data.item_map.to_internal(["A", "C"])
    assert conf[a, c] == 0  # A and C were never in one basket


def test_fingerprint_tracks_the_items_table() -> None:
    rows = [(1, 10, 100, 0, 1), (1, 11, 100, 0, 1)]
    items = [{"item_id": 10, "price": 1.0}, {"item_id": 11, "price": 2.0}]
    cheaper = [{"item_id": 10, "price": 1.0}, {"item_id": 11, "price": 1.5}]
    a = build_dataset(make_raw(rows, items), CleaningConfig())
    b = build_dataset(make_raw(rows, cheaper), CleaningConfig())
    assert a.fingerprint != b.fingerprint


def test_saving_never_replaces_a_foreign_folder(tmp_path, tiny_data) -> None:
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    model = build_model(ModelConfig("popularity", {})).fit(tiny_data)
    with pytest.raises(DataValidationError, match="refusing"):
        save_model(model, folder)
    with pytest.raises(ExportError, match="refusing"):
        export_model(model, tiny_data, folder)
    assert (folder / "notes.txt").read_text() == "mine"
    save_model(model, tmp_path / "m")
    save_model(model, tmp_path / "m")  # replacing our own saved model is fine


def _config(tmp_path, **over) -> str:
    config = {
        "name": "edge",
        "split": {"time_column": "week", "train_end": 1, "test_start": 2},
        "model": {"kind": "popularity"},
        **over,
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.mark.parametrize(
    ("over", "key"),
    [({"split": {"time_column": "week", "train_end": 1, "test_start": 2, "seed": "7"}}, "split.seed"),
     ({"evaluation": {"k": ["10"]}}, "evaluation.k[0]"),
     ({"data": {"cleaning": {"min_item_interactions": "2"}}}, "data.cleaning.min_item_interactions")],
)  # fmt: skip
def test_config_values_are_not_coerced(tmp_path, capsys, over, key) -> None:
    assert main(["evaluate", "--config", _config(tmp_path, **over)]) == 2
    assert key in capsys.readouterr().err


def test_data_dependent_bad_input_exits_2(tmp_path, capsys, cj_raw, monkeypatch) -> None:
    # A test window without any warm user: the task is empty, say so.
    households = cj_raw.interactions["user_id"].unique().sort()
    first, later = households.head(30), households.tail(30)
    tx = pl.concat([
        cj_raw.interactions.filter(pl.col("user_id").is_in(first.implode()) & (pl.col("week") <= 49)),
        cj_raw.interactions.filter(pl.col("user_id").is_in(later.implode()) & (pl.col("week") >= 50)),
    ])  # fmt: skip
    path = tmp_path / "tx.parquet"
    tx.write_parquet(path)
    data = {"source": "files", "interactions": {"path": str(path)}}
    split = {"time_column": "week", "train_end": 49, "test_start": 50}
    assert main(["evaluate", "--config", _config(tmp_path, data=data, split=split)]) == 2
    assert "no queries" in capsys.readouterr().err
    # A tuning window longer than the training data leaves nothing to fit on.
    cj_raw.interactions.filter(pl.col("user_id").is_in(first.implode())).write_parquet(path)
    model = {"kind": "addon", "params": {"validation_days": 3650}}
    assert (
        main(["evaluate", "--config", _config(tmp_path, data=data, split=split, model=model)]) == 2
    )
    assert "validation_days" in capsys.readouterr().err
    assert RawData  # the files source builds the same RawData as adapters
