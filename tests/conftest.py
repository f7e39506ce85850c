"""Shared fixtures: the real Complete Journey data (loaded once) and tiny hand-made datasets."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import polars as pl
import pytest

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from features.adapters.base import RawData
from features.cleaning import CleaningConfig
from features.dataset import Dataset, build_dataset


@pytest.fixture(scope="session")
def cj_raw() -> RawData:
    from features.adapters import load_complete_journey

    return load_complete_journey()


@pytest.fixture(scope="session")
def migrated_mlflow_store(tmp_path_factory) -> Callable[[Path], Path]:
    """Put an empty, fully migrated MLflow SQLite store at a path. Creating a store runs
    MLflow's schema migrations (seconds each, far more under load); tests that are not about
    a store's first use start from a copy of one made once per session. The first-use tests
    (tests/test_hardening_training.py) keep creating theirs."""
    import mlflow

    template = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    client = mlflow.MlflowClient(f"sqlite:///{template}")
    client.search_experiments()  # migrates and creates the Default experiment

    def put(path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template, path)
        return path

    return put


@pytest.fixture(scope="session")
def cj_data(cj_raw: RawData) -> Dataset:
    return build_dataset(cj_raw, CleaningConfig())


@pytest.fixture(scope="session")
def cj_split(cj_data: Dataset):
    from features.splits import global_time_split

    return global_time_split(cj_data, 49, 50, 46, column="week")


def make_raw(rows: list[tuple], items: list[dict] | None = None) -> RawData:
    """Tiny interactions table from (user, item, basket, day, quantity[, week]) tuples."""
    t0 = datetime(2024, 1, 1)
    df = pl.DataFrame(
        {
            "user_id": [r[0] for r in rows],
            "item_id": [r[1] for r in rows],
            "timestamp": [t0 + timedelta(days=r[3]) for r in rows],
            "basket_id": [r[2] for r in rows],
            "quantity": [float(r[4]) for r in rows],
            "value": [float(r[4]) * 2.0 for r in rows],
            "week": [r[5] if len(r) > 5 else r[3] // 7 + 1 for r in rows],
        },
        schema_overrides={"timestamp": pl.Datetime("us")},
    )
    items_df = None
    if items is not None:
        from features.schema import validate_items

        items_df = validate_items(pl.DataFrame(items), "items")
    return RawData("tiny", df, items_df, None)


@pytest.fixture
def tiny_data() -> Dataset:
    """3 users, 5 items; days 0-13 are train weeks 1-2, days 14-20 test week 3."""
    rows = [
        # user, item, basket, day, quantity
        (1, 10, 100, 0, 1), (1, 11, 100, 0, 2), (1, 12, 101, 3, 1),
        (2, 10, 200, 1, 1), (2, 13, 200, 1, 1), (2, 10, 201, 8, 3),
        (3, 14, 300, 2, 1),
        (1, 10, 102, 15, 1), (1, 13, 102, 15, 1), (1, 14, 102, 15, 1),
        (2, 11, 202, 16, 1), (2, 12, 202, 16, 1),
        (4, 10, 400, 17, 1), (4, 11, 400, 17, 1),
    ]  # fmt: skip
    items = [
        {"item_id": i, "category": c, "price": p}
        for i, c, p in [
            (10, "a", 1.0),
            (11, "a", 2.0),
            (12, "b", 3.0),
            (13, "b", 4.0),
            (14, "c", 5.0),
        ]
    ]
    return build_dataset(make_raw(rows, items), CleaningConfig())


@pytest.fixture(scope="session")
def cj_slice(cj_raw: RawData):
    """A real-data slice: 250 Complete Journey households, all their baskets; split at week 49."""
    from features.splits import global_time_split

    households = cj_raw.interactions["user_id"].unique().sort().head(250)
    raw = RawData(
        "Complete Journey slice",
        cj_raw.interactions.filter(pl.col("user_id").is_in(households.implode())),
        cj_raw.items,
        cj_raw.users,
    )
    data = build_dataset(raw, CleaningConfig(unknown_items="drop"))
    return global_time_split(data, 49, 50, 46, column="week")
