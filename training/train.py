"""``addons train``: one experiment, tracked as an MLflow run.

What the run holds: the flattened config as params; tags for the data fingerprint, git commit
and package versions; metrics for every task and k (``basket_completion/recall_at_10``);
per-epoch curves (``train/loss``, ``train/train_auc_sample``, ``train/seconds``) where the model
has epochs; artifacts ``config.json``, ``data_report.json``, ``evaluation.json``, ``model/``
(npz + JSON, see :mod:`training.persistence`) and ``export_inputs/`` (the training id maps
and item table, see :class:`training.export.ExportInputs`: ``addons export`` needs nothing
else, never the raw data). While it runs, the run carries a heartbeat
(:mod:`training.tracking`).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from training.config import ExperimentConfig
from training.experiment import ExperimentResult, run_evaluation
from training.export import ExportInputs
from training.persistence import save_model
from training.tracking import (
    flatten,
    git_commit,
    metric_key,
    mlflow_run,
    package_versions,
)


def run_training(
    config: ExperimentConfig,
    tracking_uri: str | None = None,
    experiment: str = "addons",
    model_out: str | Path | None = None,
) -> ExperimentResult:
    """Fit, evaluate and log one experiment; returns the result with its MLflow run id."""
    import mlflow
    from mlflow.entities import Metric

    with mlflow_run(experiment, config.name, tracking_uri) as run:
        params = flatten(config.to_dict())
        mlflow.log_params({k: v[:6000] for k, v in params.items()})
        mlflow.set_tags(
            {"git_commit": git_commit() or "unknown", "model_kind": config.model.kind,
             **{f"version.{k}": v for k, v in package_versions().items()}}
        )  # fmt: skip
        mlflow.log_dict(config.to_dict(), "config.json")

        seen: dict[str, Any] = {}

        def on_split(data: Any, split: Any) -> None:
            # the id maps and train only: not the whole table through the fit
            seen["maps"], seen["train"] = (data.user_map, data.item_map), split.train
            mlflow.set_tag("data_fingerprint", data.fingerprint)
            mlflow.log_dict(data.report.to_dict(), "data_report.json")
            mlflow.log_dict({k: vars(v) for k, v in split.stats.items()}, "split.json")

        def on_fitted(model: Any) -> None:
            now = int(time.time() * 1000)
            curves = [
                Metric(f"train/{k}", float(v), now, int(row.get("epoch", 0)))
                for row in getattr(model, "history_", []) or []
                for k, v in row.items()
                if k != "epoch"
            ]
            if curves:  # one batch, not a round trip per epoch
                mlflow.MlflowClient().log_batch(run.info.run_id, metrics=curves)
            if getattr(model, "tuning_", None):
                mlflow.log_dict({"grid": model.tuning_}, "tuning.json")
            with tempfile.TemporaryDirectory() as tmp:
                folder = Path(tmp) / "model"
                save_model(model, folder)
                # The id maps turn internal indices back into the shop's own ids.
                seen["maps"][0].save(folder / "users.json")
                seen["maps"][1].save(folder / "items.json")
                mlflow.log_artifacts(str(folder), "model")
                inputs = ExportInputs.from_dataset(seen["train"]).save(Path(tmp) / "inputs")
                mlflow.log_artifacts(str(inputs), "export_inputs")
            if model_out is not None:
                save_model(model, model_out)

        result = run_evaluation(config, on_split=on_split, on_fitted=on_fitted)
        for ev in result.evaluations:
            mlflow.log_metrics({metric_key(f"{ev.task}/{k}"): v for k, v in ev.metrics.items()})
            mlflow.log_metric(f"{ev.task}/n_queries", ev.n_queries)
        mlflow.log_metrics({f"time/{k}": v for k, v in result.timings.items()})
        result.run_id = run.info.run_id
        mlflow.log_text(json.dumps(result.to_dict(), indent=2, default=str), "evaluation.json")
    return result
