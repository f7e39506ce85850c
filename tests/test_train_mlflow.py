"""`addons train` against a real MLflow SQLite store: params, metrics, curves, artifacts,
the saved model, and runs that fail or are terminated end FAILED."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import polars as pl
import pytest
import yaml

from training.cli import main
from training.config import config_from_dict
from training.persistence import load_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def slice_config(tmp_path, cj_raw, monkeypatch) -> dict:
    """A 'files' config over a real Complete Journey slice written as CSV."""
    monkeypatch.chdir(tmp_path)
    households = cj_raw.interactions["user_id"].unique().sort().head(120)
    rows = cj_raw.interactions.filter(pl.col("user_id").is_in(households.implode()))
    rows.with_columns(pl.col("timestamp").dt.strftime("%Y-%m-%dT%H:%M:%S")).write_csv(
        tmp_path / "tx.csv"
    )
    return {
        "name": "slice_lightfm",
        "data": {"source": "files", "interactions": {"path": str(tmp_path / "tx.csv")}},
        "split": {"time_column": "week", "train_end": 49, "test_start": 50, "seed": 42},
        "model": {"kind": "lightfm", "params": {"no_components": 8, "epochs": 3}},
        "evaluation": {"tasks": ["basket_completion", "next_period"], "k": [3, 5, 10]},
    }


def _write(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _runs(uri: str):
    client = mlflow.MlflowClient(uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    return client, client.search_runs(exps)


def test_train_logs_a_complete_run(tmp_path, slice_config, capsys, migrated_mlflow_store) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    migrated_mlflow_store(tmp_path / "mlflow.db")  # not a test of a first use
    path = _write(tmp_path, slice_config)
    assert main(["train", "--config", str(path), "--tracking-uri", uri, "--quiet",
                 "--model-out", str(tmp_path / "model")]) == 0  # fmt: skip
    out = capsys.readouterr().out
    client, runs = _runs(uri)
    assert len(runs) == 1
    run = runs[0]
    assert f"mlflow run id: {run.info.run_id}" in out
    assert run.info.status == "FINISHED"
    assert run.data.params["model.kind"] == "lightfm"
    assert run.data.params["model.params.epochs"] == "3"
    assert len(run.data.tags["data_fingerprint"]) == 64
    assert "git_commit" in run.data.tags and "version.numpy" in run.data.tags
    for task in ("basket_completion", "next_period"):
        for k in (3, 5, 10):
            assert f"{task}/recall_at_{k}" in run.data.metrics
    curve = client.get_metric_history(run.info.run_id, "train/train_auc_sample")
    assert [m.step for m in curve] == [1, 2, 3]
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.json", "data_report.json", "evaluation.json", "model", "split.json",
            "export_inputs"} <= names  # fmt: skip
    assert run.data.tags["addons.pid"] == str(os.getpid())  # the heartbeat's owner
    model_files = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert {
        "model/model.json",
        "model/arrays.npz",
        "model/users.json",
        "model/items.json",
    } <= model_files
    local = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="model", tracking_uri=uri
    )
    logged, saved = load_model(local), load_model(tmp_path / "model")
    np.testing.assert_array_equal(logged.item_vectors_, saved.item_vectors_)
    assert (tmp_path / "mlartifacts").is_dir()  # embedded store keeps artifacts in the project


def test_same_config_gives_same_metrics(tmp_path, slice_config, migrated_mlflow_store) -> None:
    from training.train import run_training

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    migrated_mlflow_store(tmp_path / "mlflow.db")  # not a test of a first use
    config = config_from_dict(slice_config)
    a = run_training(config, uri)
    b = run_training(config, uri)
    assert [e.metrics for e in a.evaluations] == [e.metrics for e in b.evaluations]


def test_a_crashing_run_ends_failed(
    tmp_path, slice_config, monkeypatch, migrated_mlflow_store
) -> None:
    import training.train as train

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(train, "run_evaluation", boom)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    migrated_mlflow_store(tmp_path / "mlflow.db")  # not a test of a first use
    with pytest.raises(RuntimeError, match="disk full"):
        train.run_training(config_from_dict(slice_config), uri)
    _, runs = _runs(uri)
    assert [r.info.status for r in runs] == ["FAILED"]


def test_sigterm_ends_the_run_failed(tmp_path, slice_config) -> None:
    slice_config["model"] = {"kind": "lightfm", "params": {"no_components": 8, "epochs": 100000}}
    path = _write(tmp_path, slice_config)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # Create the store first: two processes migrating one new SQLite file at once collide.
    _runs(uri)
    proc = subprocess.Popen(
        [sys.executable, "-m", "training.cli", "train", "--config", str(path), "--tracking-uri", uri, "--quiet"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if (tmp_path / "mlflow.db").exists():
                _, runs = _runs(uri)
                if runs and runs[0].data.tags.get(
                    "data_fingerprint"
                ):  # data logged: fitting starts
                    break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.5)
        else:
            pytest.fail("training never started")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    _, runs = _runs(uri)
    assert [r.info.status for r in runs] == ["FAILED"]


def test_train_export_register_and_rank(
    tmp_path, slice_config, capsys, migrated_mlflow_store
) -> None:
    """train --export --register, then export again from the run id, then addons rank."""
    slice_config["model"] = {"kind": "cooccurrence", "params": {"neighbours": 20}}
    path = _write(tmp_path, slice_config)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    migrated_mlflow_store(tmp_path / "mlflow.db")  # not a test of a first use
    assert main(["train", "--config", str(path), "--tracking-uri", uri, "--quiet",
                 "--export", str(tmp_path / "art"), "--register", "cj-addons"]) == 0  # fmt: skip
    client, runs = _runs(uri)
    run_id = runs[0].info.run_id
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["mlflow_run_id"] == run_id
    assert manifest["data_fingerprint"] == runs[0].data.tags["data_fingerprint"]
    assert "basket_completion/recall_at_10" in manifest["metrics"]
    champion = client.get_model_version_by_alias("cj-addons", "champion")
    assert champion.run_id == run_id
    assert {a.path for a in client.list_artifacts(run_id, "artifact")} >= {
        "artifact/model.onnx",
        "artifact/manifest.json",
    }
    assert (
        main(
            ["export", "--run-id", run_id, "--out", str(tmp_path / "again"), "--tracking-uri", uri]
        )
        == 0
    )
    again = json.loads((tmp_path / "again" / "manifest.json").read_text())
    assert again["files"]["model.onnx"] == manifest["files"]["model.onnx"]  # same model, same graph
    capsys.readouterr()
    assert (
        main(["rank", "--model", str(tmp_path / "art"), "--cart", "1082185", "--k", "4", "--json"])
        == 0
    )
    ranked = json.loads(capsys.readouterr().out)
    assert len(ranked["items"]) <= 4 and all(i["item_id"] != 1082185 for i in ranked["items"])
    assert (
        main(["export", "--run-id", "nope", "--out", str(tmp_path / "x"), "--tracking-uri", uri])
        == 2
    )
    assert main(["rank", "--model", str(tmp_path / "missing"), "--k", "3"]) == 2
