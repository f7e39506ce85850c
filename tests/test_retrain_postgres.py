"""``addons retrain`` against a real PostgreSQL tracking store: the advisory lock (one
retrain per model name, released when its session dies), promotion and rollback."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import mlflow
import pytest

from tests.postgres import postgres_server
from tests.test_retrain import NAME, write_config, write_shop
from training.cli import main


@pytest.fixture(scope="module")
def postgres_uri():
    with postgres_server() as uri:
        yield uri


def _retrain(config: Path, uri: str, *extra: str) -> tuple[int, dict]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = main(["retrain", "--config", str(config), "--model-name", NAME,
                     "--tracking-uri", uri, "--json", *extra])  # fmt: skip
    return code, json.loads(out.getvalue())


def test_advisory_lock_promotion_and_rollback(postgres_uri, tmp_path, monkeypatch) -> None:
    from training.retrain import RetrainBusy, RetrainLock
    from training.tracking import connect

    monkeypatch.chdir(tmp_path)
    write_shop(tmp_path / "data")
    client = connect(postgres_uri)
    held = RetrainLock(client, postgres_uri, NAME)
    assert held.kind == "postgresql"
    with held:
        with pytest.raises(RetrainBusy, match="postgresql lock"):
            with RetrainLock(client, postgres_uri, NAME):
                pass
        with RetrainLock(client, postgres_uri, "another-model"):  # per model name
            pass
        # the CLI says so and exits 4
        code = main(["rollback", "--model-name", NAME, "--tracking-uri", postgres_uri])
        assert code == 4
    # released with its session: the jobs run
    assert _retrain(write_config(tmp_path, "popularity"), postgres_uri, "--as-of", "12")[0] == 0
    code, report = _retrain(write_config(tmp_path, "personal_popularity"), postgres_uri,
                            "--as-of", "16")  # fmt: skip
    assert code == 0 and report["decision"] == "promoted"
    pg = mlflow.MlflowClient(postgres_uri)
    assert {a: str(v) for a, v in pg.get_registered_model(NAME).aliases.items()} == {
        "champion": "2", "previous": "1"}  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["rollback", "--model-name", NAME, "--tracking-uri", postgres_uri]) == 0
    assert str(pg.get_model_version_by_alias(NAME, "champion").version) == "1"


def test_advisory_lock_dies_with_its_process(postgres_uri, tmp_path) -> None:
    """A retrain killed with -9 while holding the lock: the server ends its session and the
    next retrain gets the lock at once."""
    import subprocess
    import sys

    from tests.test_retrain import _env, wait_paused
    from training.retrain import RetrainLock
    from training.tracking import connect

    write_shop(tmp_path / "data")
    config = write_config(tmp_path, "popularity")
    proc = subprocess.Popen(
        [sys.executable, "-m", "training.cli", "retrain", "--config", str(config),
         "--model-name", "killed", "--tracking-uri", postgres_uri],
        cwd=tmp_path, env=_env(ADDONS_TEST_PAUSE_AT="retrain-locked"), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_paused(proc, "retrain-locked")
        client = connect(postgres_uri)
        from training.retrain import RetrainBusy

        with pytest.raises(RetrainBusy):
            with RetrainLock(client, postgres_uri, "killed"):
                pass
        proc.kill()
        proc.wait()
        with RetrainLock(client, postgres_uri, "killed", wait=30):
            pass
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("point", ["retrain-finished", "retrain-previous-set", "retrain-promoted"])
def test_kill_9_on_postgresql_never_leaves_champion_on_an_unevaluated_version(
    postgres_uri, tmp_path, point
) -> None:
    """Real ``kill -9`` of a retrain process at a step of the publication, on PostgreSQL:
    ``champion`` is the old version or a fully evaluated new one, and a rerun completes the
    work (or, after a finished promotion, fails the freshness gate with exit 3)."""
    import subprocess
    import sys

    from tests.test_retrain import _env, wait_paused
    from training.tracking import connect

    name = f"killed-{point}"
    write_shop(tmp_path / "data")

    def run(kind: str, *extra: str) -> tuple[int, dict]:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            code = main(["retrain", "--config", str(write_config(tmp_path, kind)), "--model-name",
                         name, "--tracking-uri", postgres_uri, "--json", *extra])  # fmt: skip
        return code, json.loads(out.getvalue())

    assert run("popularity", "--as-of", "12")[0] == 0
    proc = subprocess.Popen(
        [sys.executable, "-m", "training.cli", "retrain", "--config",
         str(write_config(tmp_path, "personal_popularity")), "--model-name", name,
         "--tracking-uri", postgres_uri, "--as-of", "16", "--json"],
        cwd=tmp_path, env=_env(ADDONS_TEST_PAUSE_AT=point), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_paused(proc, point)
    finally:
        proc.kill()
        proc.wait()
    client = connect(postgres_uri)  # marks a killed run FAILED if it was still open
    champion = client.get_model_version_by_alias(name, "champion")
    run_info = client.get_run(champion.run_id)
    assert run_info.info.status == "FINISHED"
    assert run_info.data.tags["addons.retrain.decision"] == "promoted"
    assert str(champion.version) == ("2" if point == "retrain-promoted" else "1")
    code, report = run("personal_popularity", "--as-of", "16")
    final = {a: str(v) for a, v in client.get_registered_model(name).aliases.items()}
    if point == "retrain-promoted":
        assert code == 3 and report["decision"] == "data_gate_failed"
        assert final["champion"] == "2"
    else:
        assert code == 0 and report["decision"] == "promoted"
        assert final == {"champion": str(report["versions"]["challenger"]), "previous": "1"}
