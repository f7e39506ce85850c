"""Serving a registry alias: models:/NAME@champion resolves to a local artifact, and moving the
alias hot-swaps the served model (real MLflow SQLite store and registry)."""

from __future__ import annotations

import mlflow
import pytest
from fastapi.testclient import TestClient

from features.cleaning import CleaningConfig
from features.dataset import build_dataset
from features.errors import ConfigError
from serving.http import create_app
from tests.conftest import make_raw
from tests.test_http import ITEMS, ROWS
from training.cli import main
from training.config import ModelConfig, build_model
from training.export import export_model
from training.registry import AliasWatcher, parse, resolve


def _register(client, uri: str, kind: str, tmp_path) -> str:
    data = build_dataset(make_raw(ROWS, ITEMS), CleaningConfig())
    art = export_model(build_model(ModelConfig(kind, {})).fit(data), data, tmp_path / kind)
    exp = client.get_experiment_by_name("reg") or client.get_experiment(
        client.create_experiment("reg")
    )
    run = client.create_run(exp.experiment_id)
    client.log_artifacts(run.info.run_id, str(art), "artifact")
    client.set_terminated(run.info.run_id)
    try:
        client.get_registered_model("shop")
    except mlflow.exceptions.MlflowException:
        client.create_registered_model("shop")
    mv = client.create_model_version(
        "shop", f"{run.info.artifact_uri}/artifact", run_id=run.info.run_id
    )
    return mv.version


def test_alias_resolves_and_moves(tmp_path, monkeypatch, migrated_mlflow_store) -> None:
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    migrated_mlflow_store(tmp_path / "mlflow.db")  # not a test of a first use
    client = mlflow.MlflowClient(uri)
    v1 = _register(client, uri, "popularity", tmp_path)
    v2 = _register(client, uri, "cooccurrence", tmp_path)
    client.set_registered_model_alias("shop", "champion", v1)
    cache = tmp_path / "cache"
    path = resolve("models:/shop@champion", cache, uri)
    app = create_app(path, reload_interval=None)
    with TestClient(app) as c:
        assert c.get("/v1/model").json()["model_kind"] == "popularity"
        client.set_registered_model_alias("shop", "champion", v2)
        watcher = AliasWatcher("models:/shop@champion", cache, uri)
        assert watcher.check() == path  # same path, now behind it: version 2
        assert app.state.holder.check()
        assert c.get("/v1/model").json()["model_kind"] == "cooccurrence"
    assert resolve(f"models:/shop/{v1}", cache, uri).resolve().name == f"v{v1}"
    assert main(["rank", "--model", "models:/shop@champion", "--tracking-uri", uri, "--cache", str(cache),
                 "--cart", "1", "--k", "2"]) == 0  # fmt: skip


def test_bad_registry_uris(tmp_path, migrated_mlflow_store) -> None:
    with pytest.raises(ConfigError, match="models:/NAME@ALIAS"):
        parse("models:/")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    migrated_mlflow_store(tmp_path / "mlflow.db")  # not a test of a first use
    with pytest.raises(ConfigError, match="registry has no"):
        resolve("models:/nothing@champion", tmp_path / "cache", uri)
