"""Crash safety and portability of the training side (issue 8, section 4 and export items).

Real processes and a real MLflow SQLite store: ``kill -9`` of ``addons train`` leaves no
stuck run, of ``addons export`` the old or the new artifact; three trainings may open a new
store at once; artifacts live beside the store; a run exports from its logged inputs without
the raw data.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml

from features.io import HOST_TAG, atomic_directory, atomic_write_text, recover
from training.cli import main
from training.tracking import store_lock

ROOT = Path(__file__).resolve().parents[1]
ARTIFACT_FILES = ("model.onnx", "items.json", "users.json", "item_table.json", "user_state.npz")


def _write_shop(folder: Path) -> None:
    """30 shoppers, 20 items in 3 categories with prices, 4 weeks of baskets (deterministic)."""
    rng = random.Random(7)
    lines = ["user_id,item_id,timestamp,basket_id,quantity,value"]
    basket = 0
    for day in range(28):
        for user in range(1, 31):
            if rng.random() < 0.3:
                basket += 1
                for item in rng.sample(range(100, 120), rng.randint(2, 5)):
                    lines.append(
                        f"u{user},{item},2024-01-{day + 1:02d}T10:00:00,b{basket},1,{item - 95}"
                    )
    (folder / "tx.csv").write_text("\n".join(lines) + "\n")
    items = ["item_id,category,price"]
    items += [f"{i},cat{i % 3},{(i - 95) * 0.5}" for i in range(100, 120)]
    (folder / "items.csv").write_text("\n".join(items) + "\n")


def _config(folder: Path, kind: str = "popularity", params: dict | None = None) -> Path:
    config = {
        "name": f"tiny_{kind}",
        "data": {
            "source": "files",
            "interactions": {"path": str(folder / "tx.csv")},
            "items": {"path": str(folder / "items.csv")},
        },
        "split": {
            "time_column": "timestamp",
            "train_end": "2024-01-21T23:59:59",
            "test_start": "2024-01-22T00:00:00",
        },
        "model": {"kind": kind, "params": params or {}},
        "evaluation": {"tasks": ["basket_completion"], "k": [3]},
    }
    path = folder / f"{kind}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def shop(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    _write_shop(folder)
    return folder


def _uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OPENBLAS_NUM_THREADS": "1", **extra}


def _addons(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "training.cli", *args], cwd=cwd, env=_env(**env),
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def _spawn(*args: str, cwd: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "training.cli", *args], cwd=cwd, env=_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def _train(config: Path, uri: str, *extra: str) -> str:
    """``addons train`` in this process; returns the run id (of the first config)."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert main(["train", "--config", str(config), "--tracking-uri", uri, "--quiet",
                     "--json", *extra]) == 0  # fmt: skip
    payload = json.loads(buffer.getvalue())
    return (payload[0] if isinstance(payload, list) else payload)["run_id"]


def _hashes(folder: Path) -> dict[str, str]:
    return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in ARTIFACT_FILES}


def _client(uri: str):
    """A client opened like the commands open one: under the store's first-use lock, so this
    process does not race a child process that is creating the same new store."""
    with store_lock(uri):
        return mlflow.MlflowClient(uri)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# -- export from the run's logged inputs ------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "params"),
    [("cooccurrence", {"neighbours": 5}), ("personal_popularity", {}), ("als", {"factors": 4})],
)
def test_export_from_logged_inputs_equals_export_from_data(shop, tmp_path, kind, params) -> None:
    """The artifact exported from the run's ``export_inputs/`` is byte for byte the one built
    by reloading and re-splitting the data (model.onnx, id lists, item table, user state)."""
    from training.export import export_run

    uri = _uri(tmp_path)
    run_id = _train(_config(shop, kind, params), uri)
    logged = export_run(run_id, tmp_path / "logged", uri)
    reloaded = export_run(run_id, tmp_path / "reloaded", uri, reload_data=True)
    assert _hashes(logged) == _hashes(reloaded)
    table = json.loads((logged / "item_table.json").read_text())
    assert set(table["category"]) == {"cat0", "cat1", "cat2"}  # the items file reached it


def test_export_works_after_the_data_is_gone_or_changed(shop, tmp_path, capsys) -> None:
    uri = _uri(tmp_path)
    run_id = _train(_config(shop, "cooccurrence", {"neighbours": 5}), uri)
    fingerprint = _client(uri).get_run(run_id).data.tags["data_fingerprint"]
    assert main(["export", "--run-id", run_id, "--out", str(tmp_path / "a"),
                 "--tracking-uri", uri]) == 0  # fmt: skip
    before = _hashes(tmp_path / "a")
    # The data changed: the run still exports, the same artifact, reporting its own fingerprint.
    with (shop / "tx.csv").open("a") as fh:
        fh.write("u1,100,2024-01-27T10:00:00,b9999,1,5\nu99,101,2024-01-27T10:00:00,b9998,1,6\n")
    assert main(["export", "--run-id", run_id, "--out", str(tmp_path / "b"),
                 "--tracking-uri", uri]) == 0  # fmt: skip
    # The data is gone (moved to another machine): still exports.
    (shop / "tx.csv").unlink()
    (shop / "items.csv").unlink()
    capsys.readouterr()
    assert main(["export", "--run-id", run_id, "--out", str(tmp_path / "c"),
                 "--tracking-uri", uri]) == 0  # fmt: skip
    assert fingerprint in capsys.readouterr().out
    for name in ("b", "c"):
        assert _hashes(tmp_path / name) == before
        manifest = json.loads((tmp_path / name / "manifest.json").read_text())
        assert manifest["data_fingerprint"] == fingerprint


def test_train_export_and_export_best_use_the_logged_inputs(shop, tmp_path, monkeypatch) -> None:
    import training.registration as registration

    def no_reload(*args, **kwargs):
        raise AssertionError("the raw data was loaded again for the export")

    # raising=True (the default) fails the test if export_run stops using this name
    monkeypatch.setattr(registration, "_inputs_from_data", no_reload)
    uri = _uri(tmp_path)
    pop, cooc = _config(shop, "popularity"), _config(shop, "cooccurrence", {"neighbours": 5})
    _train(cooc, uri, "--export", str(tmp_path / "one"))
    _train(pop, uri, "--config", str(cooc), "--export-best", str(tmp_path / "best"))
    for name in ("one", "best"):
        assert json.loads((tmp_path / name / "manifest.json").read_text())["mlflow_run_id"]


def test_runs_without_logged_inputs_still_export_from_the_data(shop, tmp_path) -> None:
    """Runs logged before ``export_inputs/`` existed reload the data (fingerprint checked)."""
    from training.export import ExportError, export_run

    uri = _uri(tmp_path)
    run_id = _train(_config(shop, "popularity"), uri)
    client = _client(uri)
    folder = Path(client.get_run(run_id).info.artifact_uri.removeprefix("file://"))
    for path in sorted((folder / "export_inputs").iterdir()):
        path.unlink()
    (folder / "export_inputs").rmdir()
    assert (export_run(run_id, tmp_path / "a", uri) / "manifest.json").is_file()
    with (shop / "tx.csv").open("a") as fh:
        fh.write("u1,100,2024-01-27T10:00:00,b9999,1,5\n")
    with pytest.raises(ExportError, match="no logged export inputs"):
        export_run(run_id, tmp_path / "b", uri)


# -- heartbeat: a killed training never stays RUNNING -----------------------------------------


def test_kill_9_of_train_leaves_no_stuck_run(shop, tmp_path) -> None:
    """A real ``addons train`` killed with SIGKILL: its run keeps a RUNNING status in the store
    until the next command (here ``addons export``) marks it FAILED and refuses to export it."""
    uri = _uri(tmp_path)
    config = _config(shop, "lightfm", {"no_components": 4, "epochs": 10**8})
    proc = _spawn("train", "--config", str(config), "--tracking-uri", uri, "--quiet",
                  cwd=tmp_path, ADDONS_HEARTBEAT_SECONDS="0.3")  # fmt: skip
    try:
        beats: list[float] = []
        deadline = time.monotonic() + 120
        while len(set(beats)) < 3 and time.monotonic() < deadline:  # the heartbeat moves
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.3)
            if not (tmp_path / "store" / "mlflow.db").exists():
                continue
            client = _client(uri)
            runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
            if runs and "data_fingerprint" in runs[0].data.tags:  # fitting has started
                beats.append(float(runs[0].data.tags["addons.heartbeat"]))
        assert len(set(beats)) >= 3, "the heartbeat never moved"
        run = runs[0]
        assert run.data.tags["addons.pid"] == str(proc.pid)
        assert run.data.tags["addons.host"] == socket.gethostname()
        proc.kill()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    run_id = run.info.run_id
    assert _client(uri).get_run(run_id).info.status == "RUNNING"  # nobody ended it
    done = _addons("export", "--run-id", run_id, "--out", str(tmp_path / "art"),
                   "--tracking-uri", uri, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "ended FAILED" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "art").exists()
    after = _client(uri).get_run(run_id)
    assert after.info.status == "FAILED"
    assert "gone" in after.data.tags["addons.failed_reason"]


def _fake_run(client, tags: dict[str, str]) -> str:
    exp = client.get_experiment_by_name("addons") or client.get_experiment(
        client.create_experiment("addons")
    )
    run = client.create_run(exp.experiment_id, tags=tags)
    return run.info.run_id


def test_the_next_train_marks_stale_runs_failed_and_spares_live_ones(shop, tmp_path) -> None:
    uri = _uri(tmp_path)
    _train(_config(shop, "popularity"), uri)  # creates the store
    client = _client(uri)
    now, here = time.time(), socket.gethostname()

    def tags(host: str, pid: int, beat: float) -> dict[str, str]:
        return {"addons.host": host, "addons.pid": str(pid), "addons.heartbeat": f"{beat:.3f}",
                "addons.heartbeat_interval": "30"}  # fmt: skip

    dead_here = _fake_run(client, tags(here, _dead_pid(), now))
    silent_elsewhere = _fake_run(client, tags("another-host", 1, now - 3600))
    live_elsewhere = _fake_run(client, tags("another-host", 1, now))
    live_here = _fake_run(client, tags(here, os.getppid(), now - 60))
    foreign = _fake_run(client, {})  # started by another tool: never judged
    _train(_config(shop, "popularity"), uri)
    status = {r: client.get_run(r).info.status for r in
              (dead_here, silent_elsewhere, live_elsewhere, live_here, foreign)}  # fmt: skip
    assert status == {dead_here: "FAILED", silent_elsewhere: "FAILED", live_elsewhere: "RUNNING",
                      live_here: "RUNNING", foreign: "RUNNING"}  # fmt: skip
    assert "no heartbeat" in client.get_run(silent_elsewhere).data.tags["addons.failed_reason"]
    # Export refuses a run that is still running, with a message, exit 2.
    out = _addons("export", "--run-id", live_elsewhere, "--out", str(tmp_path / "x"),
                  "--tracking-uri", uri, cwd=tmp_path)  # fmt: skip
    assert out.returncode == 2 and "still RUNNING" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_bad_heartbeat_setting_is_exit_2(shop, tmp_path) -> None:
    out = _addons("train", "--config", str(_config(shop)), "--tracking-uri", _uri(tmp_path),
                  "--quiet", cwd=tmp_path, ADDONS_HEARTBEAT_SECONDS="often")  # fmt: skip
    assert out.returncode == 2 and "ADDONS_HEARTBEAT_SECONDS" in out.stderr, out.stderr


# -- the store: first use, artifact location --------------------------------------------------


def test_three_concurrent_trainings_on_a_new_store(shop, tmp_path) -> None:
    uri = _uri(tmp_path)
    config = _config(shop, "popularity")
    procs = [_spawn("train", "--config", str(config), "--tracking-uri", uri, "--quiet",
                    cwd=tmp_path) for _ in range(3)]  # fmt: skip
    results = [(p.wait(timeout=300), p.communicate()[1]) for p in procs]
    assert [code for code, _ in results] == [0, 0, 0], [err[-2000:] for _, err in results]
    client = _client(uri)
    runs = client.search_runs([client.get_experiment_by_name("addons").experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED"] * 3


def test_artifacts_go_beside_the_sqlite_store(shop, tmp_path, monkeypatch) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    uri = _uri(tmp_path)
    run_id = _train(_config(shop, "popularity"), uri)
    store = tmp_path / "store" / "mlartifacts"
    uri_of_run = _client(uri).get_run(run_id).info.artifact_uri
    assert uri_of_run.startswith(store.as_uri())
    assert (store / run_id / "artifacts" / "model" / "model.json").is_file()
    assert list(elsewhere.iterdir()) == []  # nothing in the working directory


# -- atomic replace of an artifact directory --------------------------------------------------


def _paused_export(run_id: str, out: Path, uri: str, cwd: Path, point: str, **env: str):
    """An ``addons export`` stopped at ``point`` of its swap (still alive)."""
    proc = _spawn("export", "--run-id", run_id, "--out", str(out), "--tracking-uri", uri,
                  cwd=cwd, ADDONS_TEST_PAUSE_AT=point, **env)  # fmt: skip
    line = proc.stderr.readline()
    assert line.strip() == f"paused at {point}", line + proc.stderr.read()
    return proc


def _check(out: Path) -> str:
    """The run id of the complete artifact at ``out`` (every file matches its manifest hash)."""
    manifest = json.loads((out / "manifest.json").read_text())
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
    return manifest["mlflow_run_id"]


def _ours(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


@pytest.mark.parametrize(
    ("point", "env", "expect"),
    [
        ("before-swap", {}, "old"),
        ("after-swap", {}, "new"),
        ("after-swap", {"ADDONS_TEST_NO_EXCHANGE": "1"}, "new"),
        ("between-renames", {"ADDONS_TEST_NO_EXCHANGE": "1"}, "restored"),
    ],
)
def test_kill_9_of_export_leaves_the_old_or_the_new_artifact(shop, tmp_path, point, env,
                                                             expect) -> None:  # fmt: skip
    uri = _uri(tmp_path)
    old = _train(_config(shop, "popularity"), uri, "--export", str(tmp_path / "art"))
    new = _train(_config(shop, "cooccurrence", {"neighbours": 5}), uri)
    out = tmp_path / "art"
    proc = _paused_export(new, out, uri, tmp_path, point, **env)
    proc.kill()
    proc.wait()
    if expect == "restored":  # the fallback's one window: killed between its two renames
        assert not out.exists() and _ours(out)
    else:
        assert _check(out) == {"old": old, "new": new}[expect]
        assert _ours(out)  # the killed export's temp folder is left behind ...
    # ... and the next write to the same target repairs and removes it.
    recover(out)
    assert _check(out) == (new if expect == "new" else old) and _ours(out) == []
    # The next export itself does the same before writing.
    proc = _paused_export(new, out, uri, tmp_path, point, **env)
    proc.kill()
    proc.wait()
    done = _addons("export", "--run-id", new, "--out", str(out), "--tracking-uri", uri,
                   cwd=tmp_path, **env)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert _check(out) == new and _ours(out) == []


def test_cleanup_spares_a_concurrent_export(shop, tmp_path) -> None:
    uri = _uri(tmp_path)
    run_id = _train(_config(shop, "popularity"), uri, "--export", str(tmp_path / "art"))
    out = tmp_path / "art"
    alive = _paused_export(run_id, out, uri, tmp_path, "before-swap")
    try:
        pending = _ours(out)
        assert len(pending) == 1
        done = _addons("export", "--run-id", run_id, "--out", str(out), "--tracking-uri", uri,
                       cwd=tmp_path)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert _ours(out) == pending  # the live export's folder was not touched
    finally:
        alive.kill()
        alive.wait()
    recover(out)
    assert _ours(out) == [] and _check(out) == run_id


def test_leftover_temp_files_of_dead_writers_are_removed(tmp_path) -> None:
    target = tmp_path / "offers.json"
    dead, live = _dead_pid(), os.getppid()
    stale = tmp_path / f".offers.json.{HOST_TAG}.{dead}.abc123.tmp"
    running = tmp_path / f".offers.json.{HOST_TAG}.{live}.abc124.tmp"
    other_host = tmp_path / f".offers.json.0000ffff.{dead}.abc125.tmp"
    unrelated = tmp_path / ".offers.json.tmp"
    for path in (stale, running, other_host, unrelated):
        path.write_text("half")
    atomic_write_text(target, "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [target.name, running.name, other_host.name, unrelated.name]
    )
    folder = tmp_path / "model"
    with atomic_directory(folder, "model.json") as tmp:
        (tmp / "model.json").write_text("{}")
    killed = tmp_path / f".model.new.{HOST_TAG}.{dead}.xyz"
    killed.mkdir()
    (killed / "model.json").write_text("{}")
    with atomic_directory(folder, "model.json") as tmp:
        (tmp / "model.json").write_text('{"v": 2}')
    assert not killed.exists() and (folder / "model.json").read_text() == '{"v": 2}'


def test_sign_key_signs_the_temp_folder_before_the_swap(shop, tmp_path, monkeypatch) -> None:
    """``--sign-key`` signs the finished temp folder, so the artifact never appears unsigned
    (the real signer, watched: this tests the export side; serving's checks have their own
    tests)."""
    from serving import signing

    calls: list[tuple[Path, Path]] = []
    real = signing.sign_artifact

    def sign_artifact(directory: Path, private_key_path: Path) -> Path:
        calls.append((Path(directory), Path(private_key_path)))
        assert (Path(directory) / "manifest.json").is_file()
        return real(directory, private_key_path)

    monkeypatch.setattr(signing, "sign_artifact", sign_artifact)
    key, public = tmp_path / "key.pem", tmp_path / "key.pub.pem"
    signing.generate_keypair(key, public)
    uri = _uri(tmp_path)
    run_id = _train(_config(shop, "popularity"), uri, "--export", str(tmp_path / "a"),
                    "--sign-key", str(key))  # fmt: skip
    assert main(["export", "--run-id", run_id, "--out", str(tmp_path / "b"), "--tracking-uri", uri,
                 "--sign-key", str(key)]) == 0  # fmt: skip
    assert [k for _, k in calls] == [key, key]
    for (folder, _), name in zip(calls, ("a", "b"), strict=True):
        assert folder != tmp_path / name and folder.parent == tmp_path  # the temp folder
        signing.verify_artifact(tmp_path / name, [public])
    # A missing key file is refused before anything is trained or written.
    assert main(["export", "--run-id", run_id, "--out", str(tmp_path / "c"), "--tracking-uri", uri,
                 "--sign-key", str(tmp_path / "nokey")]) == 2  # fmt: skip
    # So is a file that is not an Ed25519 private key (the public one), before any training.
    runs = len(
        _client(uri).search_runs([_client(uri).get_experiment_by_name("addons").experiment_id])
    )
    assert main(["train", "--config", str(_config(shop)), "--tracking-uri", uri, "--quiet",
                 "--export", str(tmp_path / "d"), "--sign-key", str(public)]) == 2  # fmt: skip
    assert (
        len(_client(uri).search_runs([_client(uri).get_experiment_by_name("addons").experiment_id]))
        == runs
    )
    # no --export: nothing to sign
    assert main(["train", "--config", str(_config(shop)), "--tracking-uri", uri, "--quiet",
                 "--sign-key", str(key)]) == 2  # fmt: skip
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()
