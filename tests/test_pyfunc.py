"""The MLflow pyfunc flavour of an artifact (issue 12), "models from code": a registered
artifact loads with ``mlflow.pyfunc.load_model("models:/NAME@champion")`` and ranks a
DataFrame like ``serving.Ranker``; ``mlflow models serve`` answers on loopback; and
``mlflow.pyfunc.spark_udf`` ranks a Spark DataFrame the same way."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from features import synth
from serving.ranker import Ranker
from tests.processes import free_port
from training.pyfunc_model import FLAVOUR_FILES, RESULT_TYPE, add_pyfunc_flavour
from training.registration import register_version

ROOT = Path(__file__).resolve().parents[1]
REQUESTS = pd.DataFrame({
    "user_id": ["1", "2", "3", "no-such-user", "7"],
    "cart": [["5", "9"], [], ["12"], ["3"], None],
    "k": [3, 5, 2, 4, None],
    "placement": ["cart", "email", "checkout", "cart", None],
})  # fmt: skip


@pytest.fixture(scope="module")
def registered(tmp_path_factory, migrated_mlflow_store):
    """A co-occurrence artifact of a small synthetic shop with the flavour, logged to a run
    and registered as ``shop`` with the alias ``champion`` (SQLite store)."""
    from features.loading import load_dataset
    from training.config import build_model, load_config
    from training.experiment import make_split
    from training.export import export_model

    root = tmp_path_factory.mktemp("pyfunc")
    synth.synthesize(root / "shop", rows=30_000, users=800, items=600, seed=2)
    sets = [
        f"data.{t}.path={root / 'shop' / f'{t}.parquet'}"
        for t in ("interactions", "items", "users")
    ]
    config = load_config(ROOT / "configs" / "synth_cooccurrence.yaml", sets)
    split = make_split(config, load_dataset(config.data))
    art = export_model(build_model(config.model).fit(split.train), split.train, root / "art")
    if not (art / "MLmodel").exists():  # export without the hook: add it here
        add_pyfunc_flavour(art)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    migrated_mlflow_store(root / "mlflow.db")
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("pyfunc", artifact_location=str(root / "mlartifacts"))
    run = client.create_run(exp)
    client.log_artifacts(run.info.run_id, str(art), "artifact")
    client.set_terminated(run.info.run_id)
    register_version(client, "shop", f"{run.info.artifact_uri}/artifact", run.info.run_id)
    return root, art, uri


def _expected(art: Path) -> list[list[str]]:
    ranker = Ranker.load(art)
    requests = [{"user_id": r.user_id, "cart": list(r.cart) if isinstance(r.cart, list) else [],
                 "k": None if pd.isna(r.k) else int(r.k),
                 "placement": r.placement if isinstance(r.placement, str) else "email"}
                for r in REQUESTS.itertuples()]  # fmt: skip
    return [[str(i.item_id) for i in res.items] for res in ranker.rank_many(requests)]


def test_flavour_files_are_in_the_artifact_and_no_pickle(registered) -> None:
    _, art, _ = registered
    for name in FLAVOUR_FILES:
        assert (art / name).is_file(), name
    text = (art / "MLmodel").read_text()
    assert "model_code_path: pyfunc_model.py" in text and "python_model.pkl" not in text
    assert not list(art.glob("*.pkl"))
    Ranker.load(art)  # still a serving artifact


@pytest.fixture
def store(registered, monkeypatch):
    """Point MLflow at the registered model's store: the environment variable for child
    processes, and MLflow's process-wide URI, which an earlier test's
    ``training.tracking.connect`` may have set to another store (it wins over the variable)."""
    uri = registered[2]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(before)


def test_load_model_from_registry_alias_and_predict(registered, store) -> None:
    _root, art, _uri = registered
    model = mlflow.pyfunc.load_model("models:/shop@champion")
    out = model.predict(REQUESTS)
    assert list(out.columns) == ["user_id", "item_ids", "scores", "reasons"]
    assert list(out["user_id"]) == list(REQUESTS["user_id"])
    assert [list(x) for x in out["item_ids"]] == _expected(art)
    assert sum(len(x) for x in out["item_ids"]) > 0
    assert all(list(s) == sorted(s, reverse=True) for s in out["scores"])


def test_mlflow_models_serve_answers_on_loopback(registered) -> None:
    import httpx

    root, art, uri = registered
    port = free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    # as in an activated virtualenv: mlflow execs the uvicorn beside it
    path = f"{mlflow_bin.parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": path}
    proc = subprocess.Popen(
        [str(mlflow_bin), "models", "serve", "-m", "models:/shop@champion", "--env-manager",
         "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        env=env, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "mlflow models serve did not start in 120 s"
            time.sleep(0.5)
        records = json.loads(REQUESTS.to_json(orient="records"))
        response = httpx.post(f"http://127.0.0.1:{port}/invocations",
                              json={"dataframe_records": records}, timeout=60)  # fmt: skip
        assert response.status_code == 200, response.text
        predictions = response.json()["predictions"]
        assert [p["item_ids"] for p in predictions] == _expected(art)
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.spark
def test_spark_udf(registered, store, monkeypatch) -> None:
    from pyspark.sql import SparkSession
    from pyspark.sql.functions import struct

    _root, art, _uri = registered
    monkeypatch.setenv("PYSPARK_PYTHON", sys.executable)
    spark = SparkSession.builder.master("local[1]").getOrCreate()
    try:
        udf = mlflow.pyfunc.spark_udf(spark, "models:/shop@champion", result_type=RESULT_TYPE,
                                      env_manager="local")  # fmt: skip
        frame = spark.createDataFrame(REQUESTS[["user_id", "cart", "placement"]].astype(object)
                                      .where(REQUESTS[["user_id", "cart", "placement"]].notna(), None))  # fmt: skip
        rows = frame.withColumn("offers", udf(struct("user_id", "cart", "placement"))).collect()
        got = [list(r["offers"]["item_ids"]) for r in rows]
        expected = _expected_without_k(art)
        assert got == expected
        assert sum(map(len, got)) > 0
    finally:
        spark.stop()


def _expected_without_k(art: Path) -> list[list[str]]:
    ranker = Ranker.load(art)
    requests = [{"user_id": r.user_id, "cart": list(r.cart) if isinstance(r.cart, list) else [],
                 "placement": r.placement if isinstance(r.placement, str) else "email"}
                for r in REQUESTS.itertuples()]  # fmt: skip
    return [[str(i.item_id) for i in res.items] for res in ranker.rank_many(requests)]
