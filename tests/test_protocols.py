"""Evaluation protocols reachable from the config (issue 9, "Protocols"): the per-user
stratified split, leave-last-basket-out, ``exclude_owned`` on next-period and rolling time
folds for tuning; their exact definitions on hand-built data, config validation naming the
dotted key, and one ``addons evaluate --config`` run per protocol on tiny files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml

from features.cleaning import CleaningConfig
from features.dataset import Dataset, build_dataset
from features.errors import ConfigError
from features.splits import (
    leave_last_basket_split,
    next_period_task,
    rolling_time_folds,
    stratified_split,
)
from tests.conftest import make_raw
from training.cli import main
from training.config import config_from_dict
from training.evaluation.harness import evaluate
from training.experiment import make_split, make_task, validation_folds
from training.models.base import CandidateFilter
from training.models.baselines import PopularityRecommender

ROOT = Path(__file__).resolve().parents[1]
T0 = datetime(2024, 1, 1)


def rows_by_user(counts: dict[int, int]) -> list[tuple]:
    """User ``u`` with ``n`` rows: one per day, item ``100 + day``, its own basket per day."""
    return [(u, 100 + d, u * 1000 + d, d, 1) for u, n in counts.items() for d in range(n)]


def dataset(rows: list[tuple]) -> Dataset:
    return build_dataset(make_raw(rows), CleaningConfig())


def keys(data: Dataset) -> set[tuple]:
    """Rows as (user, item, basket): unique in every dataset built here."""
    df = data.interactions
    return set(
        zip(
            df["user_id"].to_list(), df["item_id"].to_list(), df["basket_id"].to_list(), strict=True
        )
    )


def per_user(data: Dataset) -> dict[int, int]:
    return dict(data.interactions.group_by("user_id").len().iter_rows())


def user_rows(data: Dataset, user: int) -> set[tuple]:
    return {k for k in keys(data) if k[0] == user}


# -- stratified ---------------------------------------------------------------------------


def test_stratified_takes_floor_ratio_n_rows_per_user() -> None:
    data = dataset(rows_by_user({1: 1, 2: 2, 3: 3, 4: 4, 5: 8, 6: 10}))
    split = stratified_split(data, 0.75, seed=42)
    # r / n <= 0.75 for ranks r = 1..n: 8 rows -> 6, 10 -> 7, 1 -> 0 (the user is all test)
    assert per_user(split.train) == {2: 1, 3: 2, 4: 3, 5: 6, 6: 7}
    assert per_user(split.test) == {1: 1, 2: 1, 3: 1, 4: 1, 5: 2, 6: 3}
    assert keys(split.train) | keys(split.test) == keys(data)
    assert not keys(split.train) & keys(split.test)
    # 7 / 10 == 0.7 exactly in float64, so ratio 0.7 keeps 7 of 10 (not 6)
    assert per_user(stratified_split(data, 0.7, seed=1).train)[6] == 7


def test_stratified_seed_changes_rows_and_users_are_independent() -> None:
    counts = {1: 12, 2: 12, 3: 9}
    data = dataset(rows_by_user(counts))
    a = stratified_split(data, 0.75, seed=42)
    assert keys(a.train) == keys(stratified_split(data, 0.75, seed=42).train)
    assert keys(a.train) != keys(stratified_split(data, 0.75, seed=7).train)
    # User 2's split depends only on its own rows: the same with users 1 and 3 gone, and
    # with other users (before and after it) added.
    alone = stratified_split(dataset(rows_by_user({2: 12})), 0.75, seed=42)
    other = stratified_split(dataset(rows_by_user({0: 3, 2: 12, 4: 30})), 0.75, seed=42)
    assert user_rows(alone.train, 2) == user_rows(a.train, 2) == user_rows(other.train, 2)
    # and the order rows arrive in does not matter
    shuffled = rows_by_user(counts)
    np.random.default_rng(0).shuffle(shuffled)
    assert keys(stratified_split(dataset(shuffled), 0.75, seed=42).train) == keys(a.train)


def test_stratified_same_split_in_another_process() -> None:
    counts = {1: 12, 2: 9, 3: 20}
    here = sorted(keys(stratified_split(dataset(rows_by_user(counts)), 0.75, seed=42).train))
    code = (
        "from features.splits import stratified_split\n"
        "from tests.test_protocols import dataset, keys, rows_by_user\n"
        f"print(sorted(keys(stratified_split(dataset(rows_by_user({counts!r})), 0.75, 42).train)))"
    )
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "PYTHONHASHSEED": "123"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=120, check=True,
    )  # fmt: skip
    assert out.stdout.strip() == str(here)


def test_stratified_validation_is_carved_from_train() -> None:
    data = dataset(rows_by_user({1: 8, 2: 12}))
    split = stratified_split(data, 0.75, seed=3)
    assert split.validation is not None and split.train_before_validation is not None
    # the same rule on train: 6 -> 4 + 2, 9 -> 6 + 3
    assert per_user(split.train_before_validation) == {1: 4, 2: 6}
    assert keys(split.validation) | keys(split.train_before_validation) == keys(split.train)
    assert not keys(split.validation) & keys(split.test)


def test_stratified_rejects_bad_ratio() -> None:
    data = dataset(rows_by_user({1: 4}))
    for ratio in (0.0, 1.0):
        with pytest.raises(ConfigError, match=r"split\.ratio"):
            stratified_split(data, ratio)


# -- leave last basket --------------------------------------------------------------------


def test_leave_last_basket_latest_time_then_largest_id() -> None:
    rows = [
        # user, item, basket, day, quantity
        (1, 10, 5, 0, 1), (1, 11, 9, 1, 1), (1, 12, 3, 2, 1),  # latest day wins: basket 3
        (2, 10, 7, 0, 1), (2, 11, 8, 4, 1), (2, 12, 6, 4, 1),  # tie on day 4: larger id 8
        (3, 10, 1, 0, 1), (3, 11, 1, 0, 1),  # one basket: all train
    ]  # fmt: skip
    split = leave_last_basket_split(dataset(rows))
    test = split.test.interactions
    assert dict(zip(test["user_id"], test["basket_id"], strict=True)) == {1: 3, 2: 8}
    assert 3 in per_user(split.train) and 3 not in per_user(split.test)
    # validation is the second-to-last basket: user 1 basket 9 (day 1), user 2 basket 6
    assert split.validation is not None
    val = split.validation.interactions
    assert dict(zip(val["user_id"], val["basket_id"], strict=True)) == {1: 9, 2: 6}


# -- exclude_owned ------------------------------------------------------------------------


def owned_data() -> Dataset:
    """Item 10 is the most popular; user 1 has it in train (day 0) and again in test."""
    rows = [
        (1, 10, 1, 0, 1), (2, 10, 2, 0, 1), (3, 10, 3, 0, 1), (3, 11, 3, 0, 1),
        (2, 12, 4, 1, 1), (1, 13, 5, 1, 1),
        (1, 10, 6, 10, 1), (1, 11, 6, 10, 1), (2, 11, 7, 10, 1),
    ]  # fmt: skip
    return dataset(rows)


def test_exclude_owned_removes_owned_items_from_truth_and_ranking() -> None:
    data = owned_data()
    split = make_split(config_for("time", owned=None), data)
    model = PopularityRecommender().fit(split.train)
    item = {i: int(data.item_map.to_internal([i])[0]) for i in (10, 11, 12, 13)}
    plain = next_period_task(split.train, split.test, exclude_owned=False)
    owned = next_period_task(split.train, split.test, exclude_owned=True)
    q = int(np.flatnonzero(plain.query_ids == 1)[0])
    assert set(plain.relevant[q].indices) == {item[10], item[11]}
    assert set(owned.relevant[int(np.flatnonzero(owned.query_ids == 1)[0])].indices) == {item[11]}
    # ranking: item 10 (3 buyers) first when allowed; never for user 1 once excluded
    top = {}
    for task in (plain, owned):
        ev = evaluate(model, task, split.train, ks=(1,), metric_names=("hit_rate",))
        assert ev.exclude_owned is task.exclude_owned
        ranked, _ = model.recommend(
            task.users,
            task.carts,
            k=2,
            candidates=CandidateFilter(exclude_owned=task.exclude_owned),
        )
        top[task.exclude_owned] = ranked[np.flatnonzero(task.query_ids == 1)[0]].tolist()
    assert top[False][0] == item[10]
    assert not {item[10], item[13]} & set(top[True])  # user 1's train items
    assert top[True][0] == item[11]


def config_for(kind: str, owned: bool | None = None, **split: object):
    payload: dict = {
        "name": "t",
        "split": {"kind": kind, **split},
        "model": {"kind": "popularity"},
        "evaluation": {"tasks": ["next_period"], "k": [1]},
    }
    if kind == "time":
        payload["split"].update(time_column="timestamp", train_end="2024-01-05")
        payload["split"].setdefault("test_start", "2024-01-06")
    if kind == "stratified":
        payload["split"].setdefault("ratio", 0.75)
    if owned is not None:
        payload["evaluation"]["exclude_owned"] = owned
    return config_from_dict(payload)


@pytest.mark.parametrize(
    ("kind", "owned", "expected"),
    [("time", None, False), ("stratified", None, True), ("leave_last_basket", None, False),
     ("time", True, True), ("stratified", False, False)],
)  # fmt: skip
def test_exclude_owned_default_follows_the_split_kind(kind, owned, expected) -> None:
    data = owned_data()
    config = config_for(kind, owned)
    task = make_task("next_period", make_split(config, data), config)
    assert task.exclude_owned is expected


# -- rolling time folds -------------------------------------------------------------------


def weekly_data() -> Dataset:
    """Two users buying every week 1..12 (weeks 11-12 are test)."""
    rows = [(u, 10 + (w % 3), u * 100 + w, 7 * (w - 1), 1, w) for u in (1, 2) for w in range(1, 13)]
    return dataset(rows)


def test_rolling_folds_partition_the_validation_span_and_never_see_test() -> None:
    data = weekly_data()
    folds = rolling_time_folds(data, 7, 10, 2, column="week")
    assert len(folds) == 2
    windows = [sorted(f.test.interactions["week"].unique().to_list()) for f in folds]
    assert windows == [[7, 8], [9, 10]]
    for fold, window in zip(folds, windows, strict=True):
        fit = fold.train.interactions["week"]
        assert fit.max() == window[0] - 1  # everything before the window, nothing of it
        assert not keys(fold.train) & keys(fold.test)
        assert fold.test.interactions["week"].max() <= 10  # nothing of test (weeks 11-12)
    with pytest.raises(ConfigError, match=r"split\.validation_folds"):
        rolling_time_folds(data, 7, 10, 3, column="week")  # 4 weeks / 3


def test_rolling_folds_on_timestamps_have_equal_windows() -> None:
    data = weekly_data()
    start, end = datetime(2024, 1, 1) + timedelta(days=42), "2024-03-10"  # day 42 .. day 69
    folds = rolling_time_folds(data, start, end, 3)
    stop = datetime(2024, 3, 11)
    bounds = [start + i * (stop - start) / 3 for i in range(4)]
    for i, fold in enumerate(folds):
        ts = fold.test.interactions["timestamp"]
        assert ts.min() >= bounds[i] and ts.max() < bounds[i + 1]
        assert fold.train.interactions["timestamp"].max() < bounds[i]
    total = sum(f.test.interactions.height for f in folds)
    assert (
        total
        == data.interactions.filter(
            (pl.col("timestamp") >= start) & (pl.col("timestamp") < stop)
        ).height
    )


def test_validation_folds_from_the_config() -> None:
    data = weekly_data()
    base = {
        "name": "t",
        "split": {"time_column": "week", "train_end": 10, "test_start": 11,
                  "validation_start": 5, "validation_folds": 3},
        "model": {"kind": "popularity"},
    }  # fmt: skip
    folds = validation_folds(config_from_dict(base), data)
    assert [sorted(f.test.interactions["week"].unique()) for f in folds] == [
        [5, 6], [7, 8], [9, 10]
    ]  # fmt: skip
    # without validation_folds: one fold, the whole window
    del base["split"]["validation_folds"]
    (one,) = validation_folds(config_from_dict(base), data)
    assert sorted(one.test.interactions["week"].unique()) == [5, 6, 7, 8, 9, 10]
    # the other kinds: one fold carved from train, disjoint from test
    for kind in ("stratified", "leave_last_basket"):
        config = config_for(kind)
        split = make_split(config, data)
        (fold,) = validation_folds(config, data)
        assert keys(fold.train) | keys(fold.test) == keys(split.train)
        assert not (keys(fold.train) | keys(fold.test)) & keys(split.test)


# -- config -------------------------------------------------------------------------------


def payload_with(split: dict, evaluation: dict | None = None) -> dict:
    return {
        "name": "t",
        "split": split,
        "model": {"kind": "popularity"},
        **({"evaluation": evaluation} if evaluation is not None else {}),
    }


TIME = {"train_end": 10, "test_start": 11, "time_column": "week"}


@pytest.mark.parametrize(
    ("split", "evaluation", "key"),
    [
        ({"kind": "stratified", "ratio": 0.75, "train_end": 10}, None, "split.train_end"),
        ({"kind": "stratified", "ratio": 0.75, "time_column": "week"}, None, "split.time_column"),
        ({"kind": "leave_last_basket", "ratio": 0.5}, None, "split.ratio"),
        ({"kind": "leave_last_basket", "validation_folds": 2}, None, "split.validation_folds"),
        ({**TIME, "ratio": 0.5}, None, "split.ratio"),
        ({"kind": "stratified"}, None, "split.ratio"),
        ({"kind": "stratified", "ratio": 0}, None, "split.ratio"),
        ({"kind": "stratified", "ratio": 1.5}, None, "split.ratio"),
        ({"kind": "stratified", "ratio": "0.5"}, None, "split.ratio"),
        ({"kind": "stratified", "ratio": 0.5, "seed": -1}, None, "split.seed"),
        ({"kind": "stratified", "ratio": 0.5, "seed": 1.5}, None, "split.seed"),
        ({"kind": "random"}, None, "split.kind"),
        ({"kind": "time", "test_start": 11}, None, "split.train_end"),
        ({**TIME, "validation_folds": 2}, None, "split.validation_folds"),
        ({**TIME, "validation_start": 7, "validation_folds": 0}, None, "split.validation_folds"),
        ({**TIME, "validation_start": 7, "validation_folds": 3}, None, "split.validation_folds"),
        (TIME, {"tasks": ["basket_completion"], "exclude_owned": True},
         "evaluation.exclude_owned"),
        (TIME, {"exclude_owned": "yes"}, "evaluation.exclude_owned"),
    ],
)  # fmt: skip
def test_bad_protocol_keys_are_named(split, evaluation, key) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict(payload_with(split, evaluation))
    assert info.value.key == key


def test_existing_configs_keep_the_time_split() -> None:
    config = config_from_dict(payload_with(TIME))
    assert config.split.kind == "time" and config.split.column == "week"
    cj = yaml.safe_load((ROOT / "configs" / "cj_als.yaml").read_text())
    assert config_from_dict(cj).split.kind == "time"
    # a config written back from its parsed form (nulls for unset keys) is accepted unchanged
    strat = config_from_dict(payload_with({"kind": "stratified", "ratio": 0.75}))
    assert config_from_dict(strat.to_dict()) == strat


def test_shipped_movielens_configs_use_the_standard_protocol() -> None:
    for path in sorted((ROOT / "configs").glob("ml100k_*.yaml")):
        config = config_from_dict(yaml.safe_load(path.read_text()))
        assert config.split.kind == "stratified" and config.split.ratio == 0.75, path.name
        assert config.evaluation.exclude_owned is True and 10 in config.evaluation.k
        assert {"precision", "recall", "ndcg", "map"} <= set(config.evaluation.metrics)


# -- end to end ---------------------------------------------------------------------------

# Two users, five days; u1 and u2 each have two baskets before the last one.
E2E_CSV = """user_id,item_id,timestamp,basket_id
u1,a,2020-01-01 10:00,b1
u1,b,2020-01-01 10:00,b1
u1,c,2020-01-02 10:00,b2
u1,d,2020-01-02 10:00,b2
u2,a,2020-01-01 11:00,b3
u2,c,2020-01-01 11:00,b3
u2,b,2020-01-03 10:00,b4
u2,e,2020-01-03 10:00,b4
u1,a,2020-01-05 10:00,b5
u1,c,2020-01-05 10:00,b5
u1,e,2020-01-05 10:00,b5
u2,a,2020-01-06 10:00,b6
u2,d,2020-01-06 10:00,b6
u2,c,2020-01-06 10:00,b6
"""

SUMMARY = {
    "time": "global time split",
    "stratified": "stratified per-user random split",
    "leave_last_basket": "leave-last-basket-out per user",
}
PROTOCOLS = {
    "time": {"train_end": "2020-01-03", "test_start": "2020-01-04"},
    # seed 0 leaves a test basket with two items the user's train has (the draw is fixed)
    "stratified": {"kind": "stratified", "ratio": 0.5, "seed": 0},
    "leave_last_basket": {"kind": "leave_last_basket"},
}


@pytest.mark.parametrize("kind", sorted(PROTOCOLS))
def test_evaluate_runs_each_protocol(kind: str, tmp_path: Path, capsys) -> None:
    data = tmp_path / "tx.csv"
    data.write_text(E2E_CSV, encoding="utf-8")
    config = {
        "name": f"tiny_{kind}",
        "data": {"source": "files", "interactions": {"path": str(data)}},
        "split": PROTOCOLS[kind],
        "model": {"kind": "popularity"},
        "evaluation": {"tasks": ["next_period", "basket_completion"], "k": [1, 2]},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    code = main(["evaluate", "--config", str(path), "--json"])
    out = capsys.readouterr().out
    assert code == 0
    result = json.loads(out)
    assert result["protocol"]["split"]["kind"] == kind
    by_task = {e["task"]: e for e in result["evaluations"]}
    assert by_task["next_period"]["exclude_owned"] is (kind == "stratified")
    assert by_task["next_period"]["n_queries"] > 0
    assert main(["evaluate", "--config", str(path)]) == 0
    assert f"protocol: {SUMMARY[kind]}" in capsys.readouterr().out


def test_evaluate_rejects_a_key_of_another_kind_with_exit_2(tmp_path: Path, capsys) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(payload_with({"kind": "stratified", "ratio": 0.5,
                                                 "train_end": 3})), encoding="utf-8")  # fmt: skip
    assert main(["evaluate", "--config", str(path)]) == 2
    assert "split.train_end" in capsys.readouterr().err
