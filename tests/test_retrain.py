"""``addons retrain`` / ``addons rollback`` (issue 11): champion / challenger through a real
MLflow SQLite registry, on a small shop whose shoppers re-buy their favourites (so
``personal_popularity`` clearly beats ``popularity`` on any holdout).

Real processes where it matters: ``kill -9`` at each step of a retrain, two retrains at
once, and ``addons serve --model models:/NAME@champion`` following a promotion under load.
The PostgreSQL variant (advisory lock, promotion, rollback) is in
``tests/test_retrain_postgres.py``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pytest
import yaml

from tests.processes import free_port
from training.cli import main

ROOT = Path(__file__).resolve().parents[1]
NAME = "shop"


def write_shop(folder: Path, weeks: int = 20, users: int = 60, seed: int = 3) -> None:
    """``users`` shoppers over ``weeks`` weeks; each buys mostly from 6 favourite items (of
    40, in 4 categories), so re-buy wins. Deterministic."""
    rng = random.Random(seed)
    items = list(range(100, 140))
    lines = ["user_id,item_id,timestamp,basket_id,quantity,value,week"]
    basket = 0
    for user in range(1, users + 1):
        favourites = rng.sample(items, 6)
        for week in range(1, weeks + 1):
            if rng.random() < 0.4:
                continue
            basket += 1
            pool = favourites if rng.random() < 0.75 else items
            for item in rng.sample(pool, rng.randint(2, 5)):
                day = 7 * (week - 1) + rng.randint(0, 6)
                lines.append(f"{user},{item},2024-{1 + day // 28:02d}-{1 + day % 28:02d}T10:00:00,"
                             f"{basket},1,{item - 95},{week}")  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tx.csv").write_text("\n".join(lines) + "\n")
    (folder / "items.csv").write_text(
        "item_id,category,price\n" + "".join(f"{i},cat{i % 4},{(i - 95) * 0.5}\n" for i in items)
    )


def write_config(folder: Path, kind: str, **retrain) -> Path:
    config = {
        "name": f"shop_{kind}",
        "data": {"source": "files", "interactions": {"path": str(folder / "data" / "tx.csv")},
                 "items": {"path": str(folder / "data" / "items.csv")}},
        "split": {"time_column": "week", "train_end": 16, "test_start": 17, "validation_start": 14},
        "model": {"kind": kind},
        "evaluation": {"tasks": ["basket_completion"], "k": [5, 10], "metrics": ["recall", "ndcg"]},
        "retrain": {"baselines": ["popularity"], **retrain},
    }  # fmt: skip
    path = folder / f"{kind}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def shop(tmp_path: Path, monkeypatch, migrated_mlflow_store) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    write_shop(tmp_path / "data")
    migrated_mlflow_store(tmp_path / "store" / "mlflow.db")  # retrain, not a store's first use
    return tmp_path


def _uri(folder: Path) -> str:
    return f"sqlite:///{folder / 'store' / 'mlflow.db'}"


def retrain(folder: Path, kind: str, *extra: str, **retrain_settings) -> tuple[int, dict]:
    """``addons retrain --json`` in this process: (exit code, report)."""
    config = write_config(folder, kind, **retrain_settings)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = main(["retrain", "--config", str(config), "--model-name", NAME,
                     "--tracking-uri", _uri(folder), "--json", *extra])  # fmt: skip
    return code, json.loads(out.getvalue())


def aliases(folder: Path) -> dict[str, str]:
    client = mlflow.MlflowClient(_uri(folder))
    return {a: str(v) for a, v in client.get_registered_model(NAME).aliases.items()}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "ADDONS_TEST"))}
    env.update(OPENBLAS_NUM_THREADS="1", PYTHONPATH=str(ROOT), **extra)
    return env


def spawn_retrain(folder: Path, kind: str, *extra: str, **env: str) -> subprocess.Popen:
    config = write_config(folder, kind)
    return subprocess.Popen(
        [sys.executable, "-m", "training.cli", "retrain", "--config", str(config),
         "--model-name", NAME, "--tracking-uri", _uri(folder), "--json", *extra],
        cwd=folder, env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def wait_paused(proc: subprocess.Popen, point: str) -> None:
    """Read the child's stderr up to its ``paused at <point>`` line (MLflow logs come first)."""
    seen = []
    while True:
        line = proc.stderr.readline()
        if not line:
            pytest.fail(f"exited {proc.wait()} before pausing at {point}:\n{''.join(seen)}"
                        f"{proc.stdout.read()}")  # fmt: skip
        seen.append(line)
        if line.strip() == f"paused at {point}":
            return


# -- decisions --------------------------------------------------------------------------------


def test_first_promotes_better_promotes_worse_is_kept(shop: Path) -> None:
    code, first = retrain(shop, "popularity", "--as-of", "12")
    assert code == 0 and first["decision"] == "promoted"  # no champion: the floor is enough
    assert aliases(shop) == {"champion": "1"}
    assert [g["passed"] for g in first["gates"] if g["name"] == "rows_vs_champion"] == [None]

    code, better = retrain(shop, "personal_popularity", "--as-of", "16")
    assert code == 0 and better["decision"] == "promoted", better["reason"]
    key = "basket_completion/ndcg@10"
    assert better["metrics"]["challenger"][key] > better["metrics"]["champion (v1)"][key]
    assert aliases(shop) == {"champion": "2", "previous": "1"}
    # the gates compared with what the champion was fitted on (recorded on version 1)
    rows = next(g for g in better["gates"] if g["name"] == "rows_vs_champion")
    assert rows["passed"] is True and rows["limit"] == int(0.8 * first["data"]["fit_rows"]) + 1

    code, worse = retrain(shop, "popularity", "--as-of", "19")
    assert code == 0 and worse["decision"] == "kept"
    assert aliases(shop) == {"champion": "2", "previous": "1", "challenger": "3"}

    client = mlflow.MlflowClient(_uri(shop))
    run = client.get_run(worse["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["addons.retrain.decision"] == "kept"
    assert run.data.tags["addons.retrain.state"] == "published"
    assert json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=worse["run_id"], artifact_path="report.json", tracking_uri=_uri(shop)
    )).read_text())["decision"] == "kept"  # fmt: skip
    v2 = client.get_model_version(NAME, "2")
    assert v2.tags["addons.data.fit_rows"] == str(better["data"]["fit_rows"])
    assert v2.tags["addons.data.newest"] == "16"


def test_min_improvement_keeps_a_slightly_better_challenger(shop: Path) -> None:
    assert retrain(shop, "popularity", "--as-of", "12")[0] == 0
    code, report = retrain(shop, "personal_popularity", "--as-of", "16", "--min-improvement", "0.9")
    assert code == 0 and report["decision"] == "kept", report["reason"]
    assert aliases(shop) == {"champion": "1", "challenger": "2"}


def test_failed_data_gate_exits_3_and_moves_nothing(shop: Path) -> None:
    assert retrain(shop, "personal_popularity", "--as-of", "16")[0] == 0
    # older data than the champion's: fewer rows and nothing newer
    code, report = retrain(shop, "personal_popularity", "--as-of", "10")
    assert code == 3 and report["decision"] == "data_gate_failed"
    failed = {g["name"] for g in report["gates"] if g["passed"] is False}
    assert failed == {"rows_vs_champion", "newer_than_champion"}
    assert aliases(shop) == {"champion": "1"}
    client = mlflow.MlflowClient(_uri(shop))
    assert len(client.search_model_versions(f"name='{NAME}'")) == 1  # nothing registered
    # each gate is a setting: allowed, the same data passes
    code, report = retrain(shop, "personal_popularity", "--as-of", "10",
                           max_row_drop=0.9, require_newer=False)  # fmt: skip
    assert code == 0 and report["decision"] == "kept"


def test_duplicate_share_gate(shop: Path) -> None:
    tx = shop / "data" / "tx.csv"
    lines = tx.read_text().splitlines()
    tx.write_text("\n".join(lines + lines[1:200]) + "\n")  # ~5% exact duplicate rows
    code, report = retrain(shop, "personal_popularity")
    assert code == 3
    gate = next(g for g in report["gates"] if g["name"] == "duplicate_share")
    assert gate["passed"] is False and gate["value"] > 0.01
    assert retrain(shop, "personal_popularity", max_duplicate_share=0.1)[0] == 0


def test_challenger_below_the_baseline_floor_exits_3(shop: Path) -> None:
    assert retrain(shop, "personal_popularity", "--as-of", "12")[0] == 0
    code, report = retrain(shop, "popularity", "--as-of", "16",
                           baselines=["popularity", "personal_popularity"])  # fmt: skip
    assert code == 3 and report["decision"] == "floor_failed"
    assert aliases(shop) == {"champion": "1", "challenger": "2"}  # kept for inspection


def test_compared_is_what_is_served(shop: Path) -> None:
    """The challenger's score is the serving Ranker's on its exported artifact, and that
    equals the in-process model's own evaluation (rules off); the champion's is its
    registered artifact's."""
    from training.config import load_config
    from training.evaluation.harness import evaluate
    from training.export import export_model
    from training.retrain import _task, evaluate_artifact, holdout_split, load_visible

    config = load_config(write_config(shop, "personal_popularity"))
    data, _ = load_visible(config, 16)
    fit, holdout, info = holdout_split(config, data)
    assert (info["start"], info["end"]) == (14, 16)  # validation window length: 3 weeks
    assert fit.interactions["week"].max() == 13
    task = _task(config, "basket_completion", fit, holdout)
    from training.config import build_model

    model = build_model(config.model).fit(fit)
    art = export_model(model, fit, shop / "art")
    served = evaluate_artifact(art, task, fit, [5, 10], ["recall", "ndcg"])
    direct = evaluate(model, task, fit, [5, 10], ["recall", "ndcg"]).metrics
    assert served == pytest.approx(direct)

    code, report = retrain(shop, "personal_popularity", "--as-of", "16")
    assert code == 0
    assert report["metrics"]["challenger"]["basket_completion/ndcg@10"] == pytest.approx(
        direct["ndcg@10"]
    )


def test_rollback(shop: Path) -> None:
    uri = _uri(shop)
    assert retrain(shop, "popularity", "--as-of", "12")[0] == 0
    with contextlib.redirect_stderr(io.StringIO()) as err:
        assert main(["rollback", "--model-name", NAME, "--tracking-uri", uri]) == 2
    assert "no version with the alias 'previous'" in err.getvalue()
    assert retrain(shop, "personal_popularity", "--as-of", "16")[0] == 0
    assert aliases(shop) == {"champion": "2", "previous": "1"}
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["rollback", "--model-name", NAME, "--tracking-uri", uri]) == 0
    assert aliases(shop) == {"champion": "1", "previous": "2"}
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["rollback", "--model-name", NAME, "--tracking-uri", uri]) == 0
    assert aliases(shop) == {"champion": "2", "previous": "1"}  # a second rollback undoes it


@pytest.mark.parametrize(
    ("args", "settings", "message"),
    [
        (["--metric", "basket_completion/ndcg"], {}, "--metric"),
        (["--metric", "nope/ndcg@10"], {}, "--metric"),
        (["--as-of", "last tuesday"], {}, "--as-of"),
        (["--as-of", "1999-01-01"], {}, "no row of the data"),
        (["--min-improvement", "-1"], {}, "--min-improvement"),
        ([], {"max_row_drop": 2.0}, "retrain.max_row_drop"),
        ([], {"baselines": ["magic"]}, "retrain.baselines[0]"),
        ([], {"holdout": 20}, "retrain.holdout"),  # nothing left to fit on
        ([], {"colour": "red"}, "retrain.colour"),
    ],
)
def test_bad_input_exits_2(shop: Path, args, settings, message) -> None:
    config = write_config(shop, "popularity", **settings)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["retrain", "--config", str(config), "--model-name", NAME,
                     "--tracking-uri", _uri(shop), *args])  # fmt: skip
    assert code == 2 and message in err.getvalue(), err.getvalue()


def test_no_holdout_length_is_a_config_error(shop: Path) -> None:
    config = write_config(shop, "popularity")
    payload = yaml.safe_load(config.read_text())
    del payload["split"]["validation_start"]
    config.write_text(yaml.safe_dump(payload))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["retrain", "--config", str(config), "--model-name", NAME,
                     "--tracking-uri", _uri(shop)]) == 2  # fmt: skip
    assert "retrain.holdout" in err.getvalue()


def test_timestamp_holdout_in_days(shop: Path) -> None:
    from training.config import load_config
    from training.retrain import holdout_split, load_visible, parse_as_of

    config = load_config(write_config(shop, "popularity", holdout=10),
                         ["split.time_column=timestamp", "split.train_end=2024-04-10",
                          "split.test_start=2024-04-11", "split.validation_start=2024-04-01"])  # fmt: skip
    data, _ = load_visible(config, parse_as_of("2024-04-20"))
    fit, holdout, info = holdout_split(config, data)
    assert info["start"] == "2024-04-11"  # the newest 10 calendar days, 20 April included
    assert str(fit.interactions["timestamp"].max()) < "2024-04-11"
    assert str(holdout.interactions["timestamp"].max()) <= "2024-04-20 23:59:59"


# -- one retrain at a time --------------------------------------------------------------------


def test_second_retrain_exits_4_while_the_first_runs(shop: Path) -> None:
    first = spawn_retrain(shop, "popularity", ADDONS_TEST_PAUSE_AT="retrain-locked")
    try:
        wait_paused(first, "retrain-locked")
        err = io.StringIO()
        config = write_config(shop, "popularity")
        with contextlib.redirect_stderr(err):
            code = main(["retrain", "--config", str(config), "--model-name", NAME,
                         "--tracking-uri", _uri(shop)])  # fmt: skip
        assert code == 4
        assert f"another retrain of model '{NAME}' is running (pid {first.pid}" in err.getvalue()
        # rollback takes the same lock
        with contextlib.redirect_stderr(io.StringIO()):
            assert main(["rollback", "--model-name", NAME, "--tracking-uri", _uri(shop)]) == 4
        # --wait: waits for the first one (killed here: the kernel releases its lock)
        threading.Timer(1.0, first.kill).start()
        code, report = retrain(shop, "popularity", "--wait", "60")
        assert code == 0 and report["decision"] == "promoted"
    finally:
        first.kill()
        first.wait()


def test_registry_tag_lock(shop: Path) -> None:
    """The lock for stores without flock or advisory locks: a registered-model tag with
    owner and expiry; a dead owner's tag is taken over."""
    from training.retrain import TAG_LOCK, RetrainBusy, RetrainLock
    from training.tracking import connect

    uri = _uri(shop)
    client = connect(uri)
    with RetrainLock(client, uri, NAME, kind="tag"):
        owner = json.loads(client.get_registered_model(NAME).tags[TAG_LOCK])
        assert owner["pid"] == os.getpid() and owner["expires"] > time.time()
        other = RetrainLock(client, uri, NAME, kind="tag")
        other.owner = {**other.owner, "pid": os.getpid() + 1}  # another process, same host
        with pytest.raises(RetrainBusy, match="another retrain"):
            with other:
                pass
    assert TAG_LOCK not in client.get_registered_model(NAME).tags  # released
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    client.set_registered_model_tag(NAME, TAG_LOCK, json.dumps(
        {"host": socket.gethostname(), "pid": int(dead), "since": 0, "expires": time.time() + 999}
    ))  # fmt: skip
    with RetrainLock(client, uri, NAME, kind="tag"):  # the dead process's lock is taken over
        pass


# -- kill -9 at every step --------------------------------------------------------------------


@pytest.mark.parametrize(
    "point",
    ["retrain-trained", "retrain-finished", "retrain-registered", "retrain-previous-set",
     "retrain-promoted"],
)  # fmt: skip
def test_kill_9_never_leaves_champion_on_an_unevaluated_version(shop: Path, point: str) -> None:
    uri = _uri(shop)
    assert retrain(shop, "popularity", "--as-of", "12")[0] == 0
    proc = spawn_retrain(shop, "personal_popularity", "--as-of", "16",
                         ADDONS_TEST_PAUSE_AT=point)  # fmt: skip
    wait_paused(proc, point)
    proc.kill()
    proc.wait()
    from training.tracking import connect

    client = connect(uri)  # marks the killed run FAILED if it was still open
    champion = client.get_model_version_by_alias(NAME, "champion")
    run = client.get_run(champion.run_id)
    # the champion is the old version, or a new one whose run ended FINISHED with its
    # evaluation and decision logged before the alias moved
    assert run.info.status == "FINISHED"
    assert run.data.tags["addons.retrain.decision"] == "promoted"
    assert "challenger/basket_completion/ndcg_at_10" in run.data.metrics
    expected = "2" if point == "retrain-promoted" else "1"
    assert str(champion.version) == expected
    assert all(r.info.status != "RUNNING" for r in client.search_runs(
        [client.get_experiment_by_name("addons-retrain").experiment_id]))  # fmt: skip
    # the rerun redoes the work and ends with a consistent registry
    code, report = retrain(shop, "personal_popularity", "--as-of", "16")
    final = aliases(shop)
    if point == "retrain-promoted":
        # the killed job had promoted already: no data newer than the champion's, nothing to do
        assert code == 3 and report["decision"] == "data_gate_failed"
        assert {g["name"] for g in report["gates"] if g["passed"] is False} == {
            "newer_than_champion"
        }
        assert final["champion"] == "2"
    else:
        assert code == 0
        assert report["decision"] == "promoted"
        assert final["champion"] == str(report["versions"]["challenger"])
        assert final["previous"] == "1"


# -- serving follows the alias ----------------------------------------------------------------


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def test_serve_follows_a_promotion_and_a_rollback_without_failed_requests(shop: Path) -> None:
    uri = _uri(shop)
    assert retrain(shop, "popularity", "--as-of", "12")[0] == 0
    port = free_port()
    # the server's log goes to a file: a pipe nobody reads fills up and blocks its writes
    log_path = shop / "serve.log"
    with log_path.open("w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "training.cli", "serve", "--model", f"models:/{NAME}@champion",
             "--tracking-uri", uri, "--cache", str(shop / "cache"), "--port", str(port),
             "--reload-interval", "0.3"],
            cwd=shop, env=_env(), stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    stop, results = threading.Event(), {"ok": 0, "failed": []}

    def fire() -> None:
        body = json.dumps({"user_id": 1, "k": 3}).encode()
        while not stop.is_set():
            request = urllib.request.Request(f"{base}/v1/rank", body,
                                             {"content-type": "application/json"})  # fmt: skip
            try:
                with urllib.request.urlopen(request, timeout=10) as r:
                    assert r.status == 200 and json.loads(r.read())["items"]
                results["ok"] += 1
            except Exception as exc:  # counted, never raised: the test asserts on the list
                results["failed"].append(repr(exc))

    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if _get(f"{base}/readyz"):
                    break
            except (urllib.error.URLError, ConnectionError):
                assert server.poll() is None, log_path.read_text()[-3000:]
                assert time.monotonic() < deadline, "server never ready"
                time.sleep(0.3)
        assert _get(f"{base}/v1/model")["model_kind"] == "popularity"
        thread = threading.Thread(target=fire)
        thread.start()
        code, report = retrain(shop, "personal_popularity", "--as-of", "16")
        assert code == 0 and report["decision"] == "promoted"
        promoted = time.monotonic()
        while _get(f"{base}/v1/model")["model_kind"] != "personal_popularity":
            assert time.monotonic() - promoted < 60, "the server never picked the champion up"
            time.sleep(0.2)
        time.sleep(1.0)  # keep firing on the new model
        # `addons rollback` as its own process: the server follows the alias back
        rollback = subprocess.run(
            [sys.executable, "-m", "training.cli", "rollback", "--model-name", NAME,
             "--tracking-uri", uri, "--json"],
            cwd=shop, env=_env(), capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert rollback.returncode == 0, rollback.stderr[-3000:]
        assert aliases(shop) == {"champion": "1", "previous": "2"}
        rolled_back = time.monotonic()
        while _get(f"{base}/v1/model")["model_kind"] != "popularity":
            assert time.monotonic() - rolled_back < 60, "the server never followed the rollback"
            time.sleep(0.2)
        time.sleep(1.0)
        stop.set()
        thread.join()
        assert results["failed"] == [] and results["ok"] > 10
    finally:
        stop.set()
        server.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(timeout=30)
        if server.poll() is None:
            server.kill()
            server.wait()


def test_tune_trials_retunes_before_fitting(shop: Path) -> None:
    """``--tune-trials N`` runs ``addons tune``'s objective for N trials on the end of the
    fitting part and fits the challenger with the best parameters (logged with the run)."""
    config = write_config(shop, "cooccurrence")
    payload = yaml.safe_load(config.read_text())
    payload["tune"] = {"metric": "basket_completion/ndcg@10", "sampler": {"kind": "random"},
                       "params": {"neighbours": {"type": "int", "low": 1, "high": 30}}}  # fmt: skip
    config.write_text(yaml.safe_dump(payload))
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = main(["retrain", "--config", str(config), "--model-name", NAME, "--tracking-uri",
                     _uri(shop), "--json", "--as-of", "16", "--tune-trials", "3"])  # fmt: skip
    report = json.loads(out.getvalue())
    assert code in (0, 3), report
    tuned = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=report["run_id"], artifact_path="tuned_config.json", tracking_uri=_uri(shop)
    )).read_text())  # fmt: skip
    assert 1 <= tuned["model"]["params"]["neighbours"] <= 30
    assert any("tuned for 3 trials" in n for n in report["notes"])
    # without a tune: section the flag is a config error
    with contextlib.redirect_stderr(io.StringIO()) as err:
        assert main(["retrain", "--config", str(write_config(shop, "popularity")),
                     "--model-name", NAME, "--tracking-uri", _uri(shop),
                     "--tune-trials", "3"]) == 2  # fmt: skip
    assert "--tune-trials" in err.getvalue()
