"""``addons rank-batch --engine spark`` (issue 12): Spark local mode with a real JVM gives the
in-process ranking's rows, same ids, same order, in a partitioned Parquet folder."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from features import synth
from training.cli import main

pytestmark = pytest.mark.spark
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A co-occurrence artifact of a small synthetic shop and a Parquet of 3,000 requests
    (every third with a cart, some with unknown ids), in 6 row groups."""
    import numpy as np

    from features.loading import load_dataset
    from training.config import build_model, load_config
    from training.experiment import make_split
    from training.export import export_model

    root = tmp_path_factory.mktemp("spark")
    synth.synthesize(root / "shop", rows=40_000, users=3_000, items=800, seed=9)
    sets = [
        f"data.{t}.path={root / 'shop' / f'{t}.parquet'}"
        for t in ("interactions", "items", "users")
    ]
    config = load_config(ROOT / "configs" / "synth_cooccurrence.yaml", sets)
    split = make_split(config, load_dataset(config.data))
    model = build_model(config.model).fit(split.train)
    export_model(model, split.train, root / "artifact")
    rng = np.random.default_rng(0)
    users = [str(u) for u in range(1, 3001)]
    users[17] = "no-such-user"
    carts = [[str(i) for i in rng.integers(1, 801, 3)] if n % 3 == 0 else [] for n in range(3000)]
    carts[30] = ["no-such-item", "5"]
    table = pa.table({"user_id": users, "cart": carts})
    pq.write_table(table, root / "requests.parquet", row_group_size=500)
    return root


def _parts(folder: Path) -> pa.Table:
    files = sorted(folder.glob("part-*.parquet"))
    assert files, f"no part files in {folder}"
    return pa.concat_tables([pq.read_table(f) for f in files])


def test_spark_local_mode_equals_in_process(setup: Path) -> None:
    local, spark_out = setup / "offers.parquet", setup / "offers_spark"
    base = ["rank-batch", "--model", str(setup / "artifact"), "--users",
            str(setup / "requests.parquet"), "--k", "5", "--quiet"]  # fmt: skip
    assert main([*base, "--out", str(local)]) == 0
    assert main([*base, "--out", str(spark_out), "--engine", "spark", "--master", "local[2]"]) == 0
    expected, got = pq.read_table(local), _parts(spark_out)
    assert got.schema.names == expected.schema.names
    assert got.num_rows == expected.num_rows > 3000
    for name in expected.schema.names:
        assert got[name].to_pylist() == expected[name].to_pylist(), name
    assert (spark_out / "_SUCCESS").exists()
    assert not [p for p in setup.iterdir() if p.name.startswith(".offers_spark")]  # no temp left


def test_several_partitions_keep_the_order_and_rerun_replaces(setup: Path) -> None:
    """One small file (30 kB) is cut into about 2 x slots splits without a shuffle (Spark's
    default made it one task on one core): several tasks, each its own part file; the
    concatenation in part order is still the in-process output. A second run replaces the
    folder, and the session's own file settings are left as they were."""
    from pyspark.sql import SparkSession

    from serving.batch import rank_file
    from serving.ranker import Ranker
    from serving.spark_batch import rank_parquet

    ranker = Ranker.load(setup / "artifact")
    rank_file(ranker, setup / "requests.parquet", setup / "ref.parquet", k=4)
    spark = SparkSession.builder.master("local[2]").getOrCreate()
    open_cost = spark.conf.get("spark.sql.files.openCostInBytes")
    try:
        out = setup / "multi"
        for _ in range(2):
            rows = rank_parquet(spark, setup / "artifact", str(setup / "requests.parquet"),
                                str(out), ranker.settings, k=4, chunk_size=128)  # fmt: skip
        assert len(list(out.glob("part-*.parquet"))) >= 3  # 4 splits, cut at row groups
        assert spark.conf.get("spark.sql.files.openCostInBytes") == open_cost
        assert spark.conf.get("spark.sql.files.minPartitionNum", None) is None
        expected = pq.read_table(setup / "ref.parquet")
        assert rows == expected.num_rows
        assert _parts(out).to_pylist() == expected.to_pylist()
    finally:
        spark.stop()


def test_bad_input_exits_2(setup: Path, capsys) -> None:
    args = ["rank-batch", "--model", str(setup / "artifact"), "--engine", "spark", "--quiet"]
    assert main([*args, "--users", str(setup / "x.csv"), "--out", str(setup / "o")]) == 2
    assert "--users" in capsys.readouterr().err
    assert (
        main([*args, "--users", str(setup / "requests.parquet"), "--out", str(setup / "o.csv")])
        == 2
    )
    assert "--out" in capsys.readouterr().err


def test_no_java_exits_2_naming_what_is_missing(setup: Path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(setup / "empty-path"))  # no `java` on it
    args = ["rank-batch", "--model", str(setup / "artifact"), "--engine", "spark", "--quiet",
            "--users", str(setup / "requests.parquet"), "--out", str(setup / "no-java")]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--engine" in err and "Java 17" in err
    assert not (setup / "no-java").exists()
