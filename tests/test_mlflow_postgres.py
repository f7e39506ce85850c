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
    assert float(runs[0].data.tags["addons.heartbeat"]) > 0  # heartbeats reach PostgreSQL too
    assert 0 < runs[0].data.metrics["next_period/recall_at_10"] < 1
    assert not (tmp_path / "mlflow.db").exists()  # nothing went to the embedded store


def test_stale_runs_are_failed_on_postgres(postgres_uri) -> None:
    """The heartbeat check (search for RUNNING runs, mark them FAILED) on a PostgreSQL store."""
    import socket
    import subprocess
    import sys
    import time

    from training.tracking import connect

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # a pid that is gone
    client = mlflow.MlflowClient(postgres_uri)
    exp = client.get_experiment_by_name("stale") or client.get_experiment(
        client.create_experiment("stale")
    )
    tags = {"addons.host": socket.gethostname(), "addons.pid": str(proc.pid),
            "addons.heartbeat": f"{time.time():.3f}", "addons.heartbeat_interval": "30"}  # fmt: skip
    run_id = client.create_run(exp.experiment_id, tags=tags).info.run_id
    connect(postgres_uri)
    assert client.get_run(run_id).info.status == "FAILED"
