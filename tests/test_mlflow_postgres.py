"""The same `addons train` command against a real PostgreSQL tracking server."""

from __future__ import annotations

import mlflow
import pytest
import yaml

from tests.postgres import postgres_server
from training.cli import main


@pytest.fixture(scope="module")
def postgres_uri():
    with postgres_server() as uri:
        yield uri


def test_train_logs_to_postgres(postgres_uri, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", postgres_uri)  # the team-server way: env var
    config = {
        "name": "pg_popularity",
        "split": {"time_column": "week", "train_end": 49, "test_start": 50},
        "model": {"kind": "popularity"},
        "evaluation": {"tasks": ["next_period"], "k": [10], "metrics": ["recall", "ndcg"]},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", "--config", str(path), "--quiet", "--experiment", "team"]) == 0
    client = mlflow.MlflowClient(postgres_uri)
    exp = client.get_experiment_by_name("team")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert 0 < runs[0].data.metrics["next_period/recall_at_10"] < 1
    assert not (tmp_path / "mlflow.db").exists()  # nothing went to the embedded store
