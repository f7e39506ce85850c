"""``addons data synth``: a synthetic shop that loads unchanged, is deterministic, has the
documented shape (power-law popularity, re-buying households with a rhythm, learnable
complements) and refuses bad arguments with exit 2."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from features import synth
from features.loading import load_dataset
from training.cli import main
from training.config import load_config
from training.experiment import run_evaluation

ROOT = Path(__file__).resolve().parents[1]
FILES = (synth.INTERACTIONS, synth.ITEMS, synth.USERS, synth.MARKER)


def _paths(folder: Path) -> list[str]:
    """``--set`` overrides that point a shipped synth config at ``folder``."""
    return [f"data.{t}.path={folder / f'{t}.parquet'}" for t in ("interactions", "items", "users")]


@pytest.fixture(scope="module")
def medium(tmp_path_factory) -> Path:
    """200k lines, 3,000 households, 5,000 items: big enough for the distribution checks."""
    out = tmp_path_factory.mktemp("synth") / "medium"
    synth.synthesize(out, rows=200_000, users=3_000, items=5_000, seed=3)
    return out


@pytest.fixture(scope="module")
def lines(medium: Path) -> pl.DataFrame:
    return pl.read_parquet(medium / synth.INTERACTIONS)


def test_same_arguments_give_the_same_bytes(tmp_path: Path, monkeypatch) -> None:
    # small blocks, so that several blocks (each with its own generator) are written
    monkeypatch.setattr(synth, "CHUNK_ROWS", 4096)
    args = {"rows": 30_000, "users": 600, "items": 900}
    a = synth.synthesize(tmp_path / "a", seed=11, **args)
    b = synth.synthesize(tmp_path / "b", seed=11, **args)
    c = synth.synthesize(tmp_path / "c", seed=12, **args)
    for name in FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert a.files == b.files
    assert c.files[synth.INTERACTIONS] != a.files[synth.INTERACTIONS]  # the seed matters
    meta = json.loads((tmp_path / "a" / synth.MARKER).read_text())
    assert meta["arguments"] == {**args, "seed": 11}
    assert meta["counts"]["baskets"] == a.baskets


def test_exact_counts_and_a_valid_shape(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(synth, "CHUNK_ROWS", 2048)
    out = tmp_path / "s"
    summary = synth.synthesize(out, rows=25_000, users=700, items=400, seed=5)
    df = pl.read_parquet(out / synth.INTERACTIONS)
    assert df.height == 25_000
    assert df["user_id"].unique().sort().to_list() == list(range(1, 701))  # every household
    assert df["basket_id"].n_unique() == summary.baskets
    assert df.select(pl.struct("basket_id", "item_id").is_duplicated().any()).item() is False
    # a basket belongs to one household and has one time; per user, ids follow time
    per_basket = df.group_by("basket_id").agg(
        pl.col("user_id").n_unique().alias("u"), pl.col("timestamp").n_unique().alias("t"),
        pl.col("user_id").first(), pl.col("timestamp").first(),
    )  # fmt: skip
    assert (per_basket["u"] == 1).all() and (per_basket["t"] == 1).all()
    ordered = per_basket.sort("basket_id").with_columns(
        (pl.col("timestamp").diff().over("user_id") >= pl.duration(seconds=0)).alias("later")
    )
    assert ordered["later"].drop_nulls().all()
    start, end = np.datetime64("2024-01-01"), np.datetime64("2025-01-01")
    ts = df["timestamp"].to_numpy()
    assert (ts >= start).all() and (ts < end).all()
    assert (df["quantity"] >= 1).all() and (df["value"] > 0).all()
    items = pl.read_parquet(out / synth.ITEMS)
    assert items["item_id"].to_list() == list(range(1, 401))
    assert df["item_id"].is_in(items["item_id"].implode()).all()
    # the tree: every subcategory in one category, every category in one department
    for child, parent in (("subcategory", "category"), ("category", "department")):
        assert (items.group_by(child).agg(pl.col(parent).n_unique())[parent] == 1).all()
    assert (items["margin"] <= items["price"]).all() and (items["price"] > 0).all()
    assert 0.85 < items["in_stock"].mean() < 1.0


@pytest.mark.parametrize(
    ("rows", "users", "items"), [(1, 1, 1), (5, 5, 1), (10, 1, 1), (1000, 3, 2), (50, 1, 1000)]
)
def test_extreme_sizes_still_give_exact_counts(tmp_path: Path, rows: int, users: int,
                                              items: int) -> None:  # fmt: skip
    """One item (every basket is one line), one household, more items than lines."""
    synth.synthesize(tmp_path / "s", rows=rows, users=users, items=items, seed=0)
    df = pl.read_parquet(tmp_path / "s" / synth.INTERACTIONS)
    assert df.height == rows and df["user_id"].n_unique() == users
    assert df["item_id"].max() <= items
    assert not df.select(pl.struct("basket_id", "item_id").is_duplicated().any()).item()


def test_loads_through_the_normal_loader_with_nothing_cleaned(medium: Path) -> None:
    config = load_config(ROOT / "configs" / "synth_cooccurrence.yaml", _paths(medium))
    first, second = load_dataset(config.data), load_dataset(config.data)
    assert first.fingerprint == second.fingerprint
    steps = first.report.to_dict()["steps"]
    assert [s["removed"] for s in steps] == [0] * len(steps), first.report.format_table()
    assert steps[-1]["rows_after"] == 200_000 and first.n_users == 3_000
    assert first.n_items == 5_000  # unsold items come from the items table
    assert first.items["category"].null_count() == 0
    assert first.users is not None and "household_size" in first.users.columns


def test_item_popularity_is_a_power_law(lines: pl.DataFrame) -> None:
    """The top 1 % of the 5,000 items hold 25-55 % of the lines (measured 39 %): a flat
    catalog would give about 1 %, one that only sells its head close to 100 %."""
    counts = lines.group_by("item_id").len().sort("len", descending=True)["len"].to_numpy()
    share = counts[: 5_000 // 100].sum() / counts.sum()
    assert 0.25 <= share <= 0.55, share
    # and the log-log slope of lines against rank is steep over the head (Zipf-like)
    ranks = np.arange(1, 201)
    slope = np.polyfit(np.log(ranks), np.log(counts[:200]), 1)[0]
    assert -1.3 < slope < -0.4, slope


def test_households_rebuy_on_their_own_rhythm(lines: pl.DataFrame) -> None:
    """A line is a re-buy when the household bought the item in an earlier basket: the median
    household (5+ baskets) re-buys at least 25 % of its lines (measured 39 %). Gaps between a
    household's baskets are regular (Gamma shape 4: coefficient of variation 0.5), not
    memoryless (a Poisson shopper's CV is 1)."""
    rebuy = lines.with_columns(
        (pl.col("basket_id") > pl.col("basket_id").min().over("user_id", "item_id")).alias("re")
    )
    per_household = rebuy.group_by("user_id").agg(
        pl.col("re").mean(), pl.col("basket_id").n_unique().alias("baskets")
    ).filter(pl.col("baskets") >= 5)  # fmt: skip
    assert per_household.height > 500
    assert per_household["re"].median() >= 0.25, per_household["re"].describe()
    gaps = (
        lines.group_by("basket_id").agg(pl.col("user_id").first(), pl.col("timestamp").first())
        .sort("basket_id")
        .with_columns(pl.col("timestamp").diff().over("user_id").dt.total_seconds().alias("gap"))
        .drop_nulls("gap")
        .group_by("user_id")
        .agg(pl.col("gap").std().alias("sd"), pl.col("gap").mean().alias("mean"), pl.len())
        .filter(pl.col("len") >= 6)
    )  # fmt: skip
    cv = (gaps["sd"] / gaps["mean"]).median()
    assert cv < 0.8, cv


def _basket_ndcg(folder: Path) -> dict[tuple[str, str], float]:
    """NDCG@10 of co-occurrence and popularity on both basket-completion tasks."""
    out = {}
    for kind in ("cooccurrence", "popularity"):
        config = load_config(ROOT / "configs" / f"synth_{kind}.yaml", _paths(folder))
        for e in run_evaluation(config).evaluations:
            out[kind, e.task] = e.metrics["ndcg@10"]
    return out


def test_cooccurrence_beats_popularity_on_basket_completion(tmp_path: Path) -> None:
    """Complement groups make "bought together" learnable: on a small shop, item
    co-occurrence beats global popularity on basket-completion NDCG@10 by 20 % or more
    (measured 1.7x), and on items new to the shopper (where re-bought staples cannot help)
    by 2x or more (measured 3-4x). The same shop without missions, so without complements,
    loses that second lead (measured 0.7x): the groups are what co-occurrence learns."""
    synth.synthesize(tmp_path / "shop", rows=40_000, users=800, items=1_500, seed=21)
    ndcg = _basket_ndcg(tmp_path / "shop")
    co, pop = "cooccurrence", "popularity"
    assert ndcg[co, "basket_completion"] >= 1.2 * ndcg[pop, "basket_completion"], ndcg
    assert ndcg[co, "basket_completion_new"] >= 2 * ndcg[pop, "basket_completion_new"], ndcg
    no_groups = dataclasses.replace(synth.MODEL, missions_mean=0.0)
    synth.synthesize(tmp_path / "plain", rows=40_000, users=800, items=1_500, seed=21,
                     model=no_groups)  # fmt: skip
    plain = _basket_ndcg(tmp_path / "plain")
    assert plain[co, "basket_completion_new"] < 1.5 * plain[pop, "basket_completion_new"], plain


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--rows", "0", "--users", "1", "--items", "5"], "--rows"),
        (["--rows", "10", "--users", "-3", "--items", "5"], "--users"),
        (["--rows", "10", "--users", "2", "--items", "0"], "--items"),
        (["--rows", "10", "--users", "11", "--items", "5"], "--users"),
        (["--rows", "10", "--users", "2", "--items", "5", "--seed", "-1"], "--seed"),
    ],
    ids=["rows-zero", "users-negative", "items-zero", "users-over-rows", "seed-negative"],
)
def test_bad_sizes_exit_2(tmp_path: Path, capsys, argv: list[str], flag: str) -> None:
    out = tmp_path / "out"
    assert main(["data", "synth", *argv, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err, err
    assert not out.exists()


def test_existing_output_needs_force_and_only_ours_is_replaced(tmp_path: Path, capsys) -> None:
    sizes = ["--rows", "500", "--users", "20", "--items", "50", "--quiet"]
    out = tmp_path / "shop"
    assert main(["data", "synth", *sizes, "--out", str(out)]) == 0
    before = (out / synth.INTERACTIONS).read_bytes()
    assert main(["data", "synth", *sizes, "--seed", "9", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / synth.INTERACTIONS).read_bytes() == before  # untouched
    assert main(["data", "synth", *sizes, "--seed", "9", "--out", str(out), "--force"]) == 0
    assert (out / synth.INTERACTIONS).read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shop"]  # no temp folders left
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main(["data", "synth", *sizes, "--out", str(foreign), "--force"]) == 2
    assert "not a folder written by addons data synth" in capsys.readouterr().err
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["data", "synth", *sizes, "--out", str(empty)]) == 0  # an empty folder is fine
    assert (empty / synth.MARKER).is_file()


def test_unwritable_output_exits_2(tmp_path: Path, capsys) -> None:
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    sizes = ["--rows", "50", "--users", "5", "--items", "10", "--quiet"]
    assert main(["data", "synth", *sizes, "--out", str(a_file / "sub")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main(["data", "synth", *sizes, "--out", str(a_file)]) == 2
    assert "is not a folder" in capsys.readouterr().err
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert main(["data", "synth", *sizes, "--out", str(locked / "x")]) == 2
        assert "permission denied" in capsys.readouterr().err


def test_a_failure_midway_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(synth, "CHUNK_ROWS", 1024)
    real, calls = synth.make_block, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk gone")
        return real(*args, **kwargs)

    monkeypatch.setattr(synth, "make_block", failing)
    with pytest.raises(RuntimeError, match="disk gone"):
        synth.synthesize(tmp_path / "s", rows=10_000, users=200, items=100, seed=1)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a temp one


def test_shipped_config_runs_addons_evaluate(tmp_path: Path) -> None:
    """The documented recipe: write data/synth, then evaluate the shipped config on it."""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}  # fmt: skip
    cli = [sys.executable, "-m", "training.cli"]
    run = subprocess.run([*cli, "data", "synth", "--rows", "20000", "--users", "500", "--items",
                          "2000", "--seed", "7", "--out", "data/synth", "--json"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, check=False)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["rows"] == 20_000
    run = subprocess.run([*cli, "evaluate", "--config", str(ROOT / "configs/synth_cooccurrence.yaml"),
                          "--json"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         check=False)  # fmt: skip
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    tasks = {e["task"]: e for e in result["evaluations"]}
    assert tasks["basket_completion"]["n_queries"] > 0
