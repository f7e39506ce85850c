"""Save and load fitted models in a safe format: arrays in ``.npz`` (no pickle) + JSON.

Layout of a saved model directory::

    model.json   {"format": "addons.model/1", "kind", "params", "json_state", "arrays"}
    arrays.npz   every learned array (zip-compressed); a sparse matrix ``m`` is stored as ``m.data``,
                 ``m.indices``, ``m.indptr``, ``m.shape``; nested models (the add-on
                 scorer's components) under ``components_.<i>.`` prefixes.

Loading never unpickles: ``numpy.load(..., allow_pickle=False)`` and ``json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from features.errors import DataValidationError
from features.io import atomic_directory
from training.models import MODELS
from training.models.base import RecommenderBase

FORMAT = "addons.model/1"


def _collect(model: RecommenderBase, prefix: str, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """Learned state of ``model``: arrays into ``arrays``, the rest returned as JSON."""
    json_state: dict[str, Any] = {}
    for name, value in vars(model).items():
        if not name.endswith("_") or name.startswith("_"):
            continue
        key = prefix + name
        if isinstance(value, np.ndarray):
            arrays[key] = value
        elif sp.issparse(value):
            m = sp.csr_matrix(value)
            arrays[f"{key}.data"], arrays[f"{key}.indices"] = m.data, m.indices
            arrays[f"{key}.indptr"], arrays[f"{key}.shape"] = m.indptr, np.asarray(m.shape)
            json_state[name] = {"__sparse__": key}
        elif isinstance(value, list) and any(isinstance(v, RecommenderBase) for v in value):
            json_state[name] = {
                "__models__": [
                    None if v is None else {
                        "kind": v.kind,
                        "params": v.get_params(),
                        "json_state": _collect(v, f"{key}.{i}.", arrays),
                    }
                    for i, v in enumerate(value)
                ]
            }  # fmt: skip
        else:
            json.dumps(value)  # raises TypeError for state that has no safe representation
            json_state[name] = value
    return json_state


def save_model(model: RecommenderBase, path: str | Path) -> Path:
    """Write ``model`` to the directory ``path`` atomically (temp dir, then rename)."""
    model._check_fitted()
    target = Path(path)
    try:
        with atomic_directory(target, "model.json") as tmp:
            arrays: dict[str, np.ndarray] = {}
            state = _collect(model, "", arrays)
            # Compressed: the sparse user state (owned items, re-buy scores) shrinks several
            # times, and the run's model/ is what an export downloads.
            np.savez_compressed(tmp / "arrays.npz", **arrays)
            meta = {"format": FORMAT, "kind": model.kind, "params": model.get_params(),
                    "json_state": state, "arrays": sorted(arrays)}  # fmt: skip
            (tmp / "model.json").write_text(json.dumps(meta, indent=1))
    except FileExistsError as exc:
        raise DataValidationError(str(target), f"refusing to overwrite: {exc}") from None
    return target


def _restore(
    kind: str, params: dict, state: dict, arrays: Any, prefix: str, source: str
) -> RecommenderBase:
    cls = MODELS.get(kind)
    if cls is None:
        raise DataValidationError(source, f"unknown model kind {kind!r}")
    model = cls(**params)
    names = {k for k in arrays.files if k.startswith(prefix) and "." not in k[len(prefix) :]}
    for key in names:
        setattr(model, key[len(prefix) :], arrays[key])
    for name, value in state.items():
        if isinstance(value, dict) and "__sparse__" in value:
            k = value["__sparse__"]
            shape = tuple(int(x) for x in arrays[f"{k}.shape"])
            value = sp.csr_matrix(
                (arrays[f"{k}.data"], arrays[f"{k}.indices"], arrays[f"{k}.indptr"]), shape=shape
            )
        elif isinstance(value, dict) and "__models__" in value:
            value = [
                None
                if sub is None
                else _restore(
                    sub["kind"],
                    sub["params"],
                    sub["json_state"],
                    arrays,
                    f"{prefix}{name}.{i}.",
                    source,
                )
                for i, sub in enumerate(value["__models__"])
            ]
        setattr(model, name, value)
    return model


def load_model(path: str | Path) -> RecommenderBase:
    """Load a model saved by :func:`save_model`."""
    folder = Path(path)
    meta_file = folder / "model.json"
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataValidationError(str(meta_file), f"not a saved model: {exc}") from None
    if meta.get("format") != FORMAT:
        raise DataValidationError(
            str(meta_file), f"expected format {FORMAT!r}, got {meta.get('format')!r}"
        )
    with np.load(folder / "arrays.npz", allow_pickle=False) as arrays:
        return _restore(meta["kind"], meta["params"], meta["json_state"], arrays, "", str(folder))
