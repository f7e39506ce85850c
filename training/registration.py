"""MLflow side of export: a run's model as an artifact (``addons export --run-id``), logged
back to the run and registered as a model version with the alias ``champion``."""

from __future__ import annotations

import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from features.errors import InputError
from training.artifact_writer import ExportInputs, export_model
from training.onnx_graph import ExportError


class RunNotExportable(ExportError, InputError):
    """The run asked for is not FINISHED (still running, failed or killed): exit 2."""


def _check_finished(run: Any, uri: str) -> None:
    """Refuse a run that did not end FINISHED: its model and metrics may be missing or partial."""
    from training.tracking import TAG_HEARTBEAT, TAG_STALE

    status, run_id, tags = run.info.status, run.info.run_id, run.data.tags
    if status == "FINISHED":
        return
    if status == "RUNNING":
        beat = tags.get(TAG_HEARTBEAT)
        since = ""
        if beat is not None:
            try:
                since = f", last heartbeat {datetime.now(UTC).timestamp() - float(beat):.0f} s ago"
            except ValueError:
                pass
        raise RunNotExportable(
            f"run {run_id} at {uri} is still RUNNING{since}: export it once its training has "
            "finished"
        )
    reason = f" ({tags[TAG_STALE]})" if TAG_STALE in tags else ""
    raise RunNotExportable(
        f"run {run_id} at {uri} ended {status}{reason}: it has no complete model and metrics; "
        "train again and export the new run"
    )


def _inputs_from_data(run: Any, config: Any) -> ExportInputs:
    """Runs logged before ``export_inputs/`` existed: reload and re-split the run's data; its
    fingerprint must still equal the run's ``data_fingerprint`` tag."""
    from features.loading import load_dataset
    from training.experiment import make_split

    data = load_dataset(config.data)
    expected = run.data.tags.get("data_fingerprint")
    if expected != data.fingerprint:
        raise ExportError(
            f"the data changed since run {run.info.run_id}, which has no logged export inputs: "
            f"fingerprint {data.fingerprint[:12]} != {str(expected)[:12]}"
        )
    return ExportInputs.from_dataset(make_split(config, data).train)


def export_run(
    run_id: str,
    out: str | Path,
    tracking_uri: str | None = None,
    register: str | None = None,
    sign_key: str | Path | None = None,
    reload_data: bool = False,
) -> Path:
    """Export the model of an MLflow run (``addons export --run-id``).

    The run must be FINISHED (stale RUNNING runs of the store are first marked FAILED, see
    :mod:`training.tracking`). The model and its :class:`ExportInputs` come from the run's
    artifacts ``model/`` and ``export_inputs/``: the raw data is not read, so the run
    exports on another machine or after its data moved or changed; the manifest reports
    the run's data fingerprint. Runs logged without ``export_inputs/`` (or with
    ``reload_data``) rebuild the training data from the run's config instead, and its
    fingerprint must equal the run's. The artifact is logged to the run under ``artifact/``
    and, with ``register``, registered as a model version with the alias ``champion``.
    ``sign_key``: see :func:`export_model`.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    from features.errors import ConfigError
    from training.config import config_from_dict
    from training.persistence import load_model
    from training.tracking import connect, resolve_tracking_uri

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = resolve_tracking_uri(tracking_uri)
    client = connect(uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise ConfigError("--run-id", f"no MLflow run {run_id!r} at {uri}: {exc.message}") from None
    _check_finished(run, uri)
    logged = {a.path for a in client.list_artifacts(run_id)}
    with tempfile.TemporaryDirectory(prefix="addons-export-") as tmp:
        if "export_inputs" in logged and not reload_data:
            inputs = ExportInputs.load(
                mlflow.artifacts.download_artifacts(
                    run_id=run_id, artifact_path="export_inputs", dst_path=tmp, tracking_uri=uri
                )
            )
        else:
            config = config_from_dict(
                mlflow.artifacts.load_dict(f"runs:/{run_id}/config.json"), f"run {run_id}"
            )
            inputs = _inputs_from_data(run, config)
        model = load_model(
            mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path="model", dst_path=tmp, tracking_uri=uri
            )
        )
    metrics = {k: v for k, v in run.data.metrics.items() if not k.startswith(("train/", "time/"))}
    fingerprint = inputs.fingerprint or run.data.tags.get("data_fingerprint")
    path = export_model(model, inputs, out, run_id, metrics, fingerprint, sign_key=sign_key)
    client.log_artifacts(run_id, str(path), "artifact")
    if register:
        register_version(client, register, f"{run.info.artifact_uri}/artifact", run_id)
    return path


def register_version(client: Any, name: str, source: str, run_id: str,
                     alias: str | None = "champion") -> Any:  # fmt: skip
    """Register the artifact directory at ``source`` (an artifact URI) as a new version of the
    registered model ``name`` (created if missing) and point ``alias`` at it; returns the
    ``ModelVersion``. The artifact is a plain directory, not an MLflow "logged model": its
    URI is registered as is."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name)
    version = client.create_model_version(name, source, run_id=run_id)
    if alias is not None:
        client.set_registered_model_alias(name, alias, version.version)
    return version
