"""The MLflow pyfunc flavour of an exported artifact, "models from code" (no pickle).

:func:`add_pyfunc_flavour` writes, into an artifact directory, an ``MLmodel`` file whose
``python_function`` flavour names THIS file as its model code (copied beside it as
``pyfunc_model.py``), plus MLflow's environment files. The artifact directory is then at the
same time a serving artifact (``serving.Ranker.load``) and an MLflow model:

- ``mlflow.pyfunc.load_model("models:/NAME@champion").predict(df)`` (``addons export
  --register`` and ``addons retrain`` register the artifact directory itself);
- ``mlflow models serve -m models:/NAME@champion --env-manager local``;
- ``mlflow.pyfunc.spark_udf(spark, uri, result_type=RESULT_TYPE)``.

Loading runs this file (MLflow imports it under a ``code_model_<hex>`` name, which calls
``mlflow.models.set_model``); the model (:func:`python_model`) then loads the artifact with
:class:`serving.Ranker`, which checks every file's sha256 against the manifest (signed
artifacts: the MLmodel and this code file are listed and signed too, as they are written
before the manifest). Nothing is unpickled: the flavour has no cloudpickle payload.
Writing the flavour does not import mlflow (an export stays as fast as before): the
``MLmodel`` and environment files are the few fields MLflow reads, written as YAML here.

Input, a pandas DataFrame, one request per row: ``user_id`` (required; null = anonymous),
optional ``cart`` (list of item ids or a ``|``-separated string), ``anchor``, ``k``,
``offer`` (default ``cross_sell``), ``placement`` (default ``email``). Output: one row per
request, ``user_id``, ``item_ids`` (best first), ``scores``, ``reasons``. Rules: the
defaults, or ``model_config={"rules": "rules.yaml"}`` at load time.
"""

from __future__ import annotations

import math
import shutil
import sys
import uuid
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

#: The names this module writes into an artifact directory.
FLAVOUR_FILES = ("MLmodel", "pyfunc_model.py", "requirements.txt", "python_env.yaml", "conda.yaml")
#: ``spark_udf``'s result type for the model's output.
RESULT_TYPE = "user_id string, item_ids array<string>, scores array<float>, reasons array<string>"
#: What the model code imports besides this project (``requirements.txt``).
REQUIREMENTS = ("onnxruntime", "numpy", "pandas", "pyyaml")


def _value(v: Any) -> Any:
    """A cell as a plain value: None for a missing one (pandas NaN / None)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return v


def _cart(v: Any) -> Any:
    """A cart cell: a string, None, or any sequence (an Arrow list arrives as an array)."""
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, float):  # NaN
        return None
    return list(v)


def rank_frame(ranker: Any, frame: Any) -> Any:
    """Rank a pandas DataFrame of requests (module docstring) with a
    :class:`serving.Ranker`; one output row per request."""
    import pandas as pd

    from serving.batch import parse_cart

    frame = pd.DataFrame(frame)
    if "user_id" not in frame.columns:
        raise ValueError(f"expected a 'user_id' column, got {list(frame.columns)}")
    requests = []
    for row in frame.to_dict("records"):
        user, anchor, k = (_value(row.get(c)) for c in ("user_id", "anchor", "k"))
        requests.append({
            "user_id": None if user is None else str(user),
            "cart": parse_cart(_cart(row.get("cart"))),
            "anchor": None if anchor is None else str(anchor),
            "k": None if k is None else int(k),
            "offer": _value(row.get("offer")) or "cross_sell",
            "placement": _value(row.get("placement")) or "email",
        })  # fmt: skip
    results = ranker.rank_many(requests)
    return pd.DataFrame({
        "user_id": [r["user_id"] for r in requests],
        "item_ids": [[str(i.item_id) for i in res.items] for res in results],
        "scores": [[float(i.score) for i in res.items] for res in results],
        "reasons": [[str(i.reason) for i in res.items] for res in results],
    })  # fmt: skip


def python_model() -> Any:
    """The ``mlflow.pyfunc.PythonModel`` instance MLflow serves (mlflow imported here)."""
    from mlflow.pyfunc import PythonModel

    class AddonsRanker(PythonModel):
        """Ranks a DataFrame of requests with the artifact's :class:`serving.Ranker`."""

        def load_context(self, context: Any) -> None:
            from serving.ranker import Ranker
            from serving.rules import load_rules

            config = context.model_config or {}
            settings = load_rules(config["rules"]) if config.get("rules") else None
            self.ranker = Ranker.load(context.artifacts["artifact"], settings)

        def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
            # no type hints: MLflow would try to derive a signature from them
            return rank_frame(self.ranker, model_input)

    return AddonsRanker()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def add_pyfunc_flavour(artifact_dir: str | Path) -> list[str]:
    """Make the artifact directory ``artifact_dir`` an MLflow pyfunc model too (see the
    module docstring); returns the names written (:data:`FLAVOUR_FILES`).

    Call it on the artifact's temp folder before the manifest is written, so the files are
    hashed (and signed) with the rest. The ``python_function`` flavour points its artifact
    ``artifact`` at the model directory itself (``path: .``): nothing is copied twice.
    """
    import yaml

    target = Path(artifact_dir)
    python = ".".join(map(str, sys.version_info[:3]))
    mlflow_version = _version("mlflow")
    pins = [f"mlflow=={mlflow_version}" if mlflow_version else "mlflow", *REQUIREMENTS]
    mlmodel = {
        "flavors": {"python_function": {
            "artifacts": {"artifact": {"path": "."}},
            "code": None,
            "env": {"conda": "conda.yaml", "virtualenv": "python_env.yaml"},
            "loader_module": "mlflow.pyfunc.loaders.code_model",
            "model_code_path": "pyfunc_model.py",  # relative: the directory moves
            "python_version": python,
            "streamable": False,
        }},
        "mlflow_version": mlflow_version,
        "model_uuid": uuid.uuid4().hex,
        "utc_time_created": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S.%f"),
    }  # fmt: skip
    files = {
        "MLmodel": mlmodel,
        "python_env.yaml": {"python": python, "build_dependencies": ["pip", "setuptools", "wheel"],
                            "dependencies": ["-r requirements.txt"]},
        "conda.yaml": {"channels": ["conda-forge"], "name": "mlflow-env",
                       "dependencies": [f"python={python}", "pip", {"pip": pins}]},
    }  # fmt: skip
    for name, payload in files.items():
        (target / name).write_text(yaml.safe_dump(payload, sort_keys=True))
    (target / "requirements.txt").write_text("\n".join(pins) + "\n")
    shutil.copyfile(Path(__file__).resolve(), target / "pyfunc_model.py")
    return list(FLAVOUR_FILES)


if __name__ != "training.pyfunc_model":  # loaded as model code by MLflow (code_model_<hex>)
    import mlflow

    mlflow.models.set_model(python_model())
