"""``addons tune`` (issue 9): the ``tune:`` schema, an objective that never sees test,
pruning through the per-epoch hook, MLflow parent/child runs with PNG plots, the tuned
config, ``--refit``, resuming, crash safety (``kill -9`` of a real worker) and several
workers on one study (SQLite, and a real PostgreSQL server), on tiny data (weeks 1-60)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pytest
import yaml
from optuna.trial import TrialState

from features.errors import ConfigError
from tests.test_docs_commands import write_tiny_data
from training.cli import main
from training.config import config_from_dict, load_config
from training.models import MODELS
from training.tuning import TuneOptions, config_point, resolve_storage, run_tune

ROOT = Path(__file__).resolve().parents[1]
TEST_START = 50
SPACE = {
    "factors": {"type": "int", "low": 2, "high": 16, "log": True},
    "regularization": {"type": "float", "low": 0.001, "high": 1.0, "log": True},
}


def config_dict(data: Path, **tune: object) -> dict:
    """ALS on the tiny data: train <= week 49, test >= 50, two validation folds 42..49."""
    return {
        "name": "tiny_als",
        "data": {"source": "files", "interactions": {"path": str(data / "tx.csv")},
                 "items": {"path": str(data / "products.csv")}},
        "split": {"time_column": "week", "train_end": 49, "test_start": TEST_START,
                  "validation_start": 42, "validation_folds": 2},
        "model": {"kind": "als", "params": {"iterations": 4, "factors": 8}},
        "evaluation": {"k": [5, 10], "metrics": ["recall", "ndcg"]},
        "tune": {"metric": "basket_completion/ndcg@10", "trials": 3, "report_every": 2,
                 "params": SPACE, **tune},
    }  # fmt: skip


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tune-data")
    write_tiny_data(folder)
    return folder


@pytest.fixture
def work(tmp_path, data_dir, monkeypatch, migrated_mlflow_store) -> Path:
    """A work folder (cwd) holding c.yaml; MLflow in ./mlflow.db (already migrated: these
    tests are about tuning, not a store's first use), Optuna's optuna.db beside it (the
    default storage)."""
    monkeypatch.chdir(tmp_path)
    migrated_mlflow_store(tmp_path / "mlflow.db")
    # absolute: MLflow caches a store per URI, so a relative one would stay in the first
    # test's folder within this process
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config_dict(data_dir), sort_keys=False))
    return tmp_path


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    out["OPENBLAS_NUM_THREADS"] = "1"
    out["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), out.get("PYTHONPATH")]))
    return out


def study_of(work: Path, name: str = "tiny_als", url: str | None = None) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=url or f"sqlite:///{work / 'optuna.db'}")


def states(study: optuna.Study) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


# -- the schema ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tune", "key"),
    [
        (
            {"params": {"factors": {"type": "int", "low": 16, "high": 8}}},
            "tune.params.factors.high",
        ),
        ({"params": {"factors": {"type": "int", "low": 8, "high": 8}}}, "tune.params.factors.high"),
        (
            {"params": {"regularization": {"type": "float", "low": 0.0, "high": 1.0, "log": True}}},
            "tune.params.regularization.low",
        ),
        ({"params": {"factorz": {"type": "int", "low": 2, "high": 8}}}, "tune.params.factorz"),
        (
            {"params": {"factors": {"type": "int", "low": 2, "high": 8, "lo": 1}}},
            "tune.params.factors.lo",
        ),
        (
            {"params": {"factors": {"type": "int", "low": 2.5, "high": 8}}},
            "tune.params.factors.low",
        ),
        ({"params": {"factors": {"type": "int", "low": 0, "high": 8}}}, "tune.params.factors.low"),
        (
            {"params": {"weighting": {"type": "categorical", "choices": []}}},
            "tune.params.weighting.choices",
        ),
        (
            {"params": {"weighting": {"type": "categorical", "choices": ["bm25", "none"]}}},
            "tune.params.weighting.choices[1]",
        ),
        (
            {"params": {"factors": {"type": "float", "low": 1, "high": 8}}},
            "tune.params.factors.low",
        ),
        (
            {"params": {"factors": {"type": "range", "low": 1, "high": 8}}},
            "tune.params.factors.type",
        ),
        ({"params": {}}, "tune.params"),
        ({"metric": "next_period/ndcg@10"}, "tune.metric"),
        ({"metric": "basket_completion/ndcg@7"}, "tune.metric"),
        ({"metric": "basket_completion/nope@10"}, "tune.metric"),
        ({"metric": "ndcg"}, "tune.metric"),
        ({"direction": "up"}, "tune.direction"),
        ({"trials": 0}, "tune.trials"),
        ({"trials": "5"}, "tune.trials"),
        ({"sampler": {"kind": "grid"}}, "tune.sampler.kind"),
        ({"pruner": {"kind": "median", "warmup": 1}}, "tune.pruner.warmup"),
        ({"report_every": 0}, "tune.report_every"),
        ({"start_from_config": "yes"}, "tune.start_from_config"),
        ({"extra": 1}, "tune.extra"),
    ],
)
def test_bad_tune_sections_name_the_dotted_key(tmp_path, tune, key) -> None:
    payload = config_dict(tmp_path)
    payload["tune"] = {**payload["tune"], **tune}
    with pytest.raises(ConfigError) as err:
        config_from_dict(payload)
    assert err.value.key == key, str(err.value)


def test_the_schema_example_validates_and_tune_is_optional(tmp_path) -> None:
    payload = config_dict(tmp_path, sampler={"kind": "tpe", "seed": 42},
                          pruner={"kind": "median", "warmup_steps": 1})  # fmt: skip
    payload["tune"]["params"] = {**SPACE, "weighting": {"type": "categorical",
                                                        "choices": ["bm25", "binary"]}}  # fmt: skip
    config = config_from_dict(payload)
    assert config.tune.params["weighting"].choices == ["bm25", "binary"]
    assert config.tune.metric_parts() == ("basket_completion", "ndcg", 10)
    del payload["tune"]
    assert config_from_dict(payload).tune is None
    assert "tune" not in config_from_dict(payload).to_dict()  # train runs log what they did


@pytest.mark.parametrize(
    "argv",
    [
        ["--storage", "mysql://x@y/z"],
        ["--storage", "postgresql://u:secret@127.0.0.1:1/nodb"],
        ["--trials", "0"],
        ["--jobs", "0"],
        ["--set", "tune.params.factors.low=0"],
        ["--set", "split.validation_start=null"],
    ],
)
def test_bad_flags_exit_2_without_traceback(work, capsys, argv) -> None:
    assert main(["tune", "--config", "c.yaml", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert "secret" not in err  # a password is never echoed


def test_config_without_tune_section_exits_2(work, capsys) -> None:
    payload = yaml.safe_load((work / "c.yaml").read_text())
    del payload["tune"]
    (work / "plain.yaml").write_text(yaml.safe_dump(payload))
    assert main(["tune", "--config", "plain.yaml"]) == 2
    assert "tune" in capsys.readouterr().err


def test_default_storage_is_beside_the_mlflow_database(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_storage(None, f"sqlite:///{tmp_path}/ml/mlflow.db") == (
        f"sqlite:///{tmp_path}/ml/optuna.db"
    )
    assert resolve_storage("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    assert resolve_storage("postgresql+psycopg://u@h/db") == "postgresql+psycopg://u@h/db"


# -- the per-epoch hook ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "params"),
    [("als", {"iterations": 3}), ("bpr", {"iterations": 3}), ("lmf", {"iterations": 3}),
     ("lightfm", {"epochs": 3})],
)  # fmt: skip
def test_epoch_callback_scores_mid_fit_and_its_exception_stops_the_fit(
    data_dir, kind, params
) -> None:
    from features.loading import load_dataset

    config = config_from_dict(config_dict(data_dir))
    data = load_dataset(config.data)
    users, carts = np.array([0, 1, -1]), None
    import scipy.sparse as sp

    class Stop(Exception):
        pass

    model, seen = MODELS[kind](**params), []

    def callback(epoch: int) -> None:
        carts_ = sp.csr_matrix((3, model.n_items_), dtype=np.float32)
        seen.append((epoch, model.score(users, carts_).copy()))
        if epoch == 2:
            raise Stop

    with pytest.raises(Stop):
        model.fit(data, epoch_callback=callback)
    assert [e for e, _ in seen] == [1, 2]
    assert not np.allclose(seen[0][1], seen[1][1])  # the scores follow the epochs
    # the hook changes nothing: with and without it the fitted model is the same
    plain = MODELS[kind](**params).fit(data)
    hooked = MODELS[kind](**params).fit(data, epoch_callback=lambda epoch: None)
    carts = sp.csr_matrix((3, plain.n_items_), dtype=np.float32)
    np.testing.assert_allclose(plain.score(users, carts), hooked.score(users, carts), rtol=1e-5)


# -- the objective ----------------------------------------------------------------------------


def test_objective_never_touches_test(work, monkeypatch) -> None:
    """Every row a trial fits on or is scored against is before the test window."""
    import training.experiment as experiment
    from training.models.base import RecommenderBase

    weeks: dict[str, list[int]] = {"fit": [], "scored": []}
    real_fit, real_task = RecommenderBase.fit, experiment.make_task

    def fit(self, data, epoch_callback=None):
        weeks["fit"].append(int(data.interactions["week"].max()))
        return real_fit(self, data, epoch_callback)

    def make_task(name, split, config):
        weeks["scored"].append(int(split.test.interactions["week"].max()))
        weeks["fit"].append(int(split.train.interactions["week"].max()))
        return real_task(name, split, config)

    monkeypatch.setattr(RecommenderBase, "fit", fit)
    monkeypatch.setattr(experiment, "make_task", make_task)
    result = run_tune(load_config("c.yaml"), TuneOptions(trials=2))
    assert result.counts["complete"] == 2
    assert len(weeks["fit"]) == 2 + 2 * 2  # two fold tasks, then 2 trials x 2 folds
    assert max(weeks["fit"] + weeks["scored"]) < TEST_START
    assert max(weeks["scored"]) == 49  # the last fold's window ends at train_end
    assert sorted(set(weeks["scored"])) == [45, 49]  # two folds: 42-45 and 46-49


def test_pruning_stops_an_epoch_model_after_warmup(work, monkeypatch) -> None:
    import training.tuning as tuning

    class PruneAfterWarmup(optuna.pruners.BasePruner):
        def prune(self, study, trial) -> bool:
            return (trial.last_step or 0) >= 2

    monkeypatch.setattr(tuning, "make_pruner", lambda config: PruneAfterWarmup())
    fitted_epochs: list[int] = []
    real = tuning.Objective.score

    def score(self, model, fold):
        fitted_epochs.append(len(model.history_))
        return real(self, model, fold)

    monkeypatch.setattr(tuning.Objective, "score", score)
    payload = yaml.safe_load((work / "c.yaml").read_text())
    payload["model"]["params"]["iterations"] = 8
    payload["tune"]["report_every"] = 2
    (work / "c.yaml").write_text(yaml.safe_dump(payload))
    result = run_tune(load_config("c.yaml"), TuneOptions(trials=2))
    study = study_of(work)
    assert states(study) == {"PRUNED": 2}
    for t in study.trials:
        assert sorted(t.intermediate_values) == [2]  # reported at epoch 2, stopped there
    assert fitted_epochs == [2, 2]  # never trained beyond the pruned epoch, nor other folds
    assert result.best_value is None and result.config_out is None


# -- outputs ----------------------------------------------------------------------------


def test_mlflow_parent_child_runs_and_png_plots(work) -> None:
    result = run_tune(load_config("c.yaml"), TuneOptions(trials=3))
    client = mlflow.MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    parent = client.get_run(result.run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["addons.tune.study"] == "tiny_als"
    assert parent.data.tags["addons.tune.storage"] == f"sqlite:///{work / 'optuna.db'}"
    best = parent.data.metrics["best/validation/basket_completion/ndcg_at_10"]
    assert best == pytest.approx(study_of(work).best_value)
    assert parent.data.params["best.factors"] == str(study_of(work).best_params["factors"])
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{result.run_id}'"
    )
    assert len(children) == 3
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["addons.tune.state"] == "COMPLETE"
        assert set(child.data.params) == {"factors", "regularization"}
        assert child.data.metrics["duration_seconds"] > 0
        assert 0 <= child.data.metrics["value"] <= 1
    plots = {a.path for a in client.list_artifacts(result.run_id, "plots")}
    assert plots == {"plots/optimization_history.png", "plots/param_importances.png"}
    local = client.download_artifacts(result.run_id, "plots/optimization_history.png", str(work))
    assert Path(local).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tuned_config_trains_unchanged_and_refit_logs_one_test_run(work, capsys) -> None:
    assert main(["tune", "--config", "c.yaml", "--trials", "2", "--refit", "--out",
                 "tuned.yaml", "--json"]) == 0  # fmt: skip
    summary = json.loads(capsys.readouterr().out)
    study = study_of(work)
    tuned = load_config("tuned.yaml")
    assert tuned.model.params == {"iterations": 4, **study.best_params}
    assert summary["best_params"] == study.best_params
    assert summary["counts"]["complete"] == 2 and summary["config_out"] == "tuned.yaml"
    client = mlflow.MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    refit = client.get_run(summary["refit"]["run_id"])
    assert refit.info.status == "FINISHED"
    assert refit.data.params["name"] == "tiny_als_tuned"
    test = refit.data.metrics["basket_completion/ndcg_at_10"]
    assert summary["refit"]["test"]["basket_completion/ndcg@10"] == pytest.approx(test)
    # the file as written trains with addons train (its tune: section is ignored there)
    assert main(["train", "--config", "tuned.yaml", "--quiet"]) == 0
    assert "mlflow run id" in capsys.readouterr().out


def test_rerun_resumes_and_a_changed_search_space_is_refused(work, capsys) -> None:
    assert main(["tune", "--config", "c.yaml", "--trials", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ran"] == 2
    assert main(["tune", "--config", "c.yaml", "--trials", "4", "--json"]) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["ran"] == 2
    assert states(study_of(work)) == {"COMPLETE": 4}
    assert main(["tune", "--config", "c.yaml", "--trials", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ran"] == 0  # budget already met
    assert main(["tune", "--config", "c.yaml", "--set", "tune.params.factors.high=32"]) == 2
    err = capsys.readouterr().err
    assert "search space" in err and "--study" in err
    assert main(["tune", "--config", "c.yaml", "--set", "split.validation_folds=4"]) == 2
    assert "objective" in capsys.readouterr().err
    # under another study name it is a new study
    assert main(["tune", "--config", "c.yaml", "--set", "tune.params.factors.high=32",
                 "--study", "wider", "--trials", "1"]) == 0  # fmt: skip
    assert states(study_of(work, "wider")) == {"COMPLETE": 1}


# -- crash safety and several workers (real processes) ------------------------------------------

#: A worker whose objective blocks in trial ``argv[1]`` once its parameters are drawn
#: (after writing ``started.<n>``).
SLOW_WORKER = """
import sys, time
from collections.abc import Iterator
from pathlib import Path
import training.tuning as tuning
real = tuning.suggest
def suggest(trial, params):
    out = real(trial, params)
    Path(f"started.{trial.number}").write_text(str(out))
    if trial.number == int(sys.argv[1]):
        time.sleep(600)
    return out
tuning.suggest = suggest
from training.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.2)


def _kill_in_trial(work: Path, hang: int, *argv: str) -> None:
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WORKER, str(hang), "tune", *argv],
                            cwd=work, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        _wait_for(work / f"started.{hang}", proc)
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()


def _cli(work: Path, *argv: str, extra_env: dict | None = None) -> dict:
    proc = subprocess.run([sys.executable, "-m", "training.cli", "tune", *argv, "--json"],
                          cwd=work, env={**env(), **(extra_env or {})}, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_kill_9_loses_one_trial_which_the_rerun_retries(work) -> None:
    _kill_in_trial(work, 1, "--config", "c.yaml", "--trials", "3")
    study = study_of(work)
    assert states(study) == {"COMPLETE": 1, "RUNNING": 1}
    killed = study.trials[1]
    summary = _cli(work, "--config", "c.yaml", "--trials", "3")
    study = study_of(work)
    assert states(study) == {"COMPLETE": 3, "FAIL": 1}
    assert study.trials[1].state == TrialState.FAIL
    retry = [t for t in study.trials if t.system_attrs.get("failed_trial") == 1]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE
    assert retry[0].params == killed.params  # the same trial again
    assert summary["ran"] == 2 and summary["counts"]["complete"] == 3


def test_a_trial_of_a_silent_worker_elsewhere_is_retried_after_its_heartbeat(work) -> None:
    """Another host's dead worker is only seen through its stopped heartbeat (here 1 s
    intervals, stale after 4): the rerun waits for it, fails it, and retries it."""
    fast = {"ADDONS_HEARTBEAT_SECONDS": "1"}
    proc_env = {**env(), **fast}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WORKER, "0", "tune", "--config",
                             "c.yaml", "--trials", "2"], cwd=work, env=proc_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        _wait_for(work / "started.0", proc)
        time.sleep(1.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    study = study_of(work)
    running = study.trials[0]
    assert running.state == TrialState.RUNNING
    study._storage.set_trial_user_attr(running._trial_id, "addons.host", "elsewhere")
    summary = _cli(work, "--config", "c.yaml", "--trials", "2", extra_env=fast)
    study = study_of(work)
    assert states(study) == {"COMPLETE": 2, "FAIL": 1}
    assert any(t.system_attrs.get("failed_trial") == 0 for t in study.trials)
    assert summary["ran"] == 2


#: A worker that starts its trials only once both workers are ready (so that both take
#: part however long each takes to start), and takes a little while per trial.
PACED_WORKER = """
import os, sys, time
from collections.abc import Iterator
from pathlib import Path
import training.tuning as tuning
real = tuning.suggest
def suggest(trial, params):
    Path(f"ready.{os.getpid()}").touch()
    deadline = time.monotonic() + 300
    while len(list(Path().glob("ready.*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.3)
    return real(trial, params)
tuning.suggest = suggest
from training.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _two_workers(work: Path, storage: list[str], n: int) -> list[dict]:
    base = [sys.executable, "-c", PACED_WORKER, "tune", "--config", "c.yaml", "--trials",
            str(n), "--json", *storage]  # fmt: skip
    procs = [subprocess.Popen([*base, "--jobs", str(jobs)], cwd=work, env=env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for jobs in (1, 2)]  # fmt: skip
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stderr[-3000:]
        out.append(json.loads(stdout))
    return out


def _check_exactly(study: optuna.Study, results: list[dict], n: int) -> None:
    found = states(study)
    # none lost, none failed or left running (the median pruner may stop some)
    assert found.get("COMPLETE", 0) + found.get("PRUNED", 0) == n == sum(found.values())
    assert sum(r["ran"] for r in results) == n  # each trial run by exactly one worker
    assert sorted(t.number for t in study.trials) == list(range(n))
    pids = {t.user_attrs["addons.pid"] for t in study.trials}
    assert len(pids) == 2  # both workers took part
    # per-trial seeds: the workers did not draw the same parameters
    assert len({json.dumps(t.params, sort_keys=True) for t in study.trials}) == n


def test_two_workers_share_a_new_sqlite_study(work) -> None:
    (work / "mlflow.db").unlink()  # both workers also meet a new MLflow store at once
    results = _two_workers(work, [], 8)
    _check_exactly(study_of(work), results, 8)


def test_two_workers_share_a_study_on_postgresql(work) -> None:
    from tests.postgres import postgres_server

    with postgres_server() as url:
        results = _two_workers(work, ["--storage", url], 8)
        assert results[0]["storage"].startswith("postgresql+psycopg://")
        _check_exactly(study_of(work, url=url.replace("postgresql://", "postgresql+psycopg://")),
                       results, 8)  # fmt: skip
    assert not (work / "optuna.db").exists()


def test_hostname_is_recorded(work) -> None:
    run_tune(load_config("c.yaml"), TuneOptions(trials=1))
    assert study_of(work).trials[0].user_attrs["addons.host"] == socket.gethostname()


# -- every shipped search space (SQLite and PostgreSQL) ------------------------------------

#: Every shipped config with a ``tune:`` section.
TUNABLE = sorted(
    p for p in (ROOT / "configs").glob("*.yaml") if "tune" in yaml.safe_load(p.read_text())
)


@pytest.fixture(scope="module")
def movielens_dir(tmp_path_factory) -> Path:
    from tests.test_configs import write_movielens_folder

    return write_movielens_folder(tmp_path_factory.mktemp("tune-ml") / "ml-100k")


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    from tests.postgres import postgres_server

    with postgres_server() as url:
        yield url


def shipped_on_small_data(path: Path, data: Path, movielens: Path) -> dict:
    """The shipped config as written, its data section pointed at small files in the same
    formats (MovieLens: a folder in the real file formats; Complete Journey and the synthetic
    shop: the tiny weekly baskets of weeks 1-60, which their splits cut the same way)."""
    payload = yaml.safe_load(path.read_text())
    source = payload["data"]["source"]
    if source == "movielens100k":
        payload["data"]["path"] = str(movielens)
    else:
        cleaning = payload["data"].get("cleaning")
        payload["data"] = {"source": "files", "interactions": {"path": str(data / "tx.csv")},
                           "items": {"path": str(data / "products.csv")},
                           **({"cleaning": cleaning} if cleaning else {})}  # fmt: skip
    return payload


def test_every_search_space_is_covered() -> None:
    # issue 9's list of kinds, each with a shipped search space on both datasets
    kinds = {load_config(p).model.kind for p in TUNABLE}
    assert {"als", "bpr", "lmf", "item_knn", "ease", "lightfm", "addon"} <= kinds
    names = {p.stem for p in TUNABLE}
    assert {"cj_lightfm_hybrid", "ml100k_lightfm_hybrid", "cj_addon", "ml100k_addon"} <= names


@pytest.mark.parametrize("storage", ["sqlite", "postgresql"])
@pytest.mark.parametrize("path", TUNABLE, ids=lambda p: p.stem)
def test_every_shipped_search_space_tunes(
    path, storage, work, data_dir, movielens_dir, request, capsys
) -> None:
    """``addons tune`` on the shipped config, unchanged but for its data: 2 trials (the
    first the config's own values, then one drawn from the whole space), the tuned config
    written and run by ``addons evaluate`` (the loader and fit of ``addons train``)."""
    payload = shipped_on_small_data(path, data_dir, movielens_dir)
    (work / "c.yaml").write_text(yaml.safe_dump(payload, sort_keys=False))
    if storage == "sqlite":
        url = f"sqlite:///{work / 'optuna.db'}"
    else:
        url = request.getfixturevalue("pg_url").replace("postgresql://", "postgresql+psycopg://")
    config = load_config("c.yaml")
    assert config.tune.start_from_config  # every shipped space starts from its config
    result = run_tune(config, TuneOptions(trials=2, storage=url, study=f"{path.stem}-{storage}",
                                          out="tuned.yaml"))  # fmt: skip
    assert result.errors == []
    study = study_of(work, f"{path.stem}-{storage}", url)
    found = states(study)
    assert found.get("COMPLETE", 0) + found.get("PRUNED", 0) == 2
    # a failed trial is only ever the model's own refusal of a drawn point (LightFM's
    # "your model may have diverged" on these 30 items); the search went on past it
    failed = [t.user_attrs.get("addons.error", "") for t in study.trials if t.state.name == "FAIL"]
    assert all("diverged" in e for e in failed), failed
    assert found.get("FAIL", 0) + 2 == sum(found.values())
    first, point = study.trials[0], config_point(config)
    # trial 0 ran the config's own values (where they lie in the search space)
    assert first.user_attrs.get("addons.from_config") is (True if point else None)
    assert {k: first.params[k] for k in point} == point
    for t in study.trials:
        assert set(t.params) == set(config.tune.params)
    if result.best_trial is not None:
        tuned = load_config("tuned.yaml")
        assert tuned.model.params == {**config.model.params, **result.best_params}
        assert main(["evaluate", "--config", "tuned.yaml"]) == 0
        capsys.readouterr()


def test_the_study_opens_in_optuna_dashboard(work) -> None:
    """docs/tuning.md's ``optuna-dashboard <storage>``: the dashboard's own WSGI app, on the
    storage ``addons tune`` wrote, lists the study and its trials with their values."""
    import io
    from wsgiref.util import setup_testing_defaults

    from optuna_dashboard import wsgi

    result = run_tune(load_config("c.yaml"), TuneOptions(trials=2))
    app = wsgi(f"sqlite:///{work / 'optuna.db'}")

    def get(path: str) -> dict:
        environ: dict = {"PATH_INFO": path, "REQUEST_METHOD": "GET", "wsgi.input": io.BytesIO()}
        setup_testing_defaults(environ)
        status: list[str] = []
        body = b"".join(app(environ, lambda s, headers, exc=None: status.append(s)))
        assert status[0].startswith("200"), (path, status, body[:300])
        return json.loads(body)

    studies = get("/api/studies")["study_summaries"]
    assert [s["study_name"] for s in studies] == ["tiny_als"]
    detail = get(f"/api/studies/{studies[0]['study_id']}")
    values = sorted(t["values"][0] for t in detail["trials"])
    assert values == sorted(t.value for t in study_of(work).trials)
    assert max(values) == pytest.approx(result.best_value)


def test_start_from_config_runs_the_configs_own_point_first(work) -> None:
    """``tune.start_from_config``: trial 0 of a new study runs ``model.params`` (a value
    outside its range is drawn instead); not on a resumed study."""
    payload = yaml.safe_load((work / "c.yaml").read_text())
    payload["model"]["params"].update(factors=64, regularization=0.05)  # 64 > high=16
    payload["tune"]["start_from_config"] = True
    (work / "c.yaml").write_text(yaml.safe_dump(payload))
    run_tune(load_config("c.yaml"), TuneOptions(trials=2))
    first, second = study_of(work).trials
    assert first.params["regularization"] == 0.05 and 2 <= first.params["factors"] <= 16
    assert first.user_attrs["addons.from_config"] is True
    assert "addons.from_config" not in second.user_attrs
    run_tune(load_config("c.yaml"), TuneOptions(trials=3))  # resumed: nothing re-enqueued
    assert [t.user_attrs.get("addons.from_config") for t in study_of(work).trials] == [
        True, None, None]  # fmt: skip
