"""Export a fitted model as a versioned artifact directory: the only contract with serving.

Layout (format ``addons.artifact/1``)::

    model.onnx       scoring graph: user lookup (or the mean user for unknown / anonymous
                     shoppers), cart term, history term, biases, exclusion mask, TopK
    manifest.json    format, model kind, created_at, MLflow run id, data fingerprint,
                     evaluation metrics, ONNX opset, graph inputs, sha256 of every file
    users.json       user id map (external ids, position = internal index)
    items.json       item id map
    item_table.json  per item: price, margin, in_stock, department, category, subcategory
    user_state.npz   per-user purchase history as CSR arrays (``history.data``, ``.indices``,
                     ``.indptr``): the re-buy signal and the owned-item filter

Graph inputs (each present only if the kind needs it; the manifest lists them):

- ``user``     int64 [B]: internal user index, -1 = unknown / anonymous;
- ``cart``     int64 [B, C]: internal item indices of the cart, padded with -1;
- ``history``  float32 [B, n_items]: the user's re-buy score per item (from ``user_state``
  or fresher history sent with the request);
- ``history_items`` int64 [B, H]: the items of that history, padded with -1 (item-KNN, EASE);
- ``exclude``  bool [B, n_items]: items that must not be returned (cart, owned, rules);
- ``k``        int64 [1].

Outputs: ``scores`` float32 [B, k] and ``items`` int64 [B, k], best first; an excluded slot
has score -inf. Item x item models (co-occurrence, item-KNN, EASE) ship their rows as padded
neighbour lists; a kind that cannot be expressed as a graph raises :class:`ExportError`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from features.dataset import Dataset
from features.io import atomic_directory, atomic_write_text
from training.models.base import RecommenderBase
from training.models.baselines import TIE_BREAK

FORMAT = "addons.artifact/1"
OPSET = 18
EXPORTABLE = (
    "popularity",
    "personal_popularity",
    "cooccurrence",
    "item_knn",
    "ease",
    "als",
    "bpr",
    "lmf",
    "lightfm",
    "addon",
)
#: Widest neighbour list an artifact holds (n_items x width indices and weights).
MAX_NEIGHBOURS = 1000


class ExportError(ValueError):
    """The model kind cannot be exported (or the export failed its parity check)."""


@dataclass
class _Graph:
    """Collects nodes and constants while a scoring graph is built."""

    nodes: list[Any] = field(default_factory=list)
    inits: list[Any] = field(default_factory=list)
    inputs: set[str] = field(default_factory=set)
    counter: int = 0

    def name(self, base: str) -> str:
        self.counter += 1
        return f"{base}_{self.counter}"

    def const(self, base: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self.name(base)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], base: str | None = None, **attrs: Any) -> str:
        from onnx import helper

        out = self.name(base or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], **attrs))
        return out

    def use(self, name: str) -> str:
        self.inputs.add(name)
        return name

    # -- building blocks ----------------------------------------------------------------
    def full_rows(self, vector: np.ndarray) -> str:
        """``vector`` (n_items,) broadcast to [B, n_items] (B taken from ``exclude``)."""
        shape = self.op("Shape", [self.use("exclude")])
        return self.op("Expand", [self.const("row", vector.astype(np.float32)), shape])

    def cart_valid(self) -> tuple[str, str]:
        """(clamped cart indices, validity as float [B, C])."""
        return self.indices_valid("cart")

    def indices_valid(self, name: str) -> tuple[str, str]:
        """(clamped indices, validity as float) of an index input padded with -1."""
        given = self.use(name)
        zero = self.const("zero", np.array(0, dtype=np.int64))
        valid = self.op("GreaterOrEqual", [given, zero])
        return self.op("Max", [given, zero]), self.op("Cast", [valid], to=1)  # 1 = FLOAT

    def factor_scores(self, users: np.ndarray, unknown: np.ndarray, items: np.ndarray,
                      bias: np.ndarray, cart_weight: float) -> str:  # fmt: skip
        """``(x_u + w * mean cart vectors) . y_j + bias_j``; user -1 takes ``unknown``."""
        table = np.vstack([unknown[None, :], users]).astype(np.float32)
        shifted = self.op("Add", [self.use("user"), self.const("one", np.array(1, dtype=np.int64))])
        q = self.op("Gather", [self.const("users", table), shifted], axis=0)
        if cart_weight:
            idx, valid = self.cart_valid()
            vecs = self.op("Gather", [self.const("items", items.astype(np.float32)), idx], axis=0)
            mask = self.op("Unsqueeze", [valid, self.const("ax2", np.array([2], dtype=np.int64))])
            total = self.op("ReduceSum", [self.op("Mul", [vecs, mask]),
                                          self.const("ax1", np.array([1], dtype=np.int64))], keepdims=0)  # fmt: skip
            count = self.op(
                "ReduceSum", [valid, self.const("ax1", np.array([1], dtype=np.int64))], keepdims=1
            )
            count = self.op("Max", [count, self.const("onef", np.array(1.0, dtype=np.float32))])
            mean = self.op("Div", [total, count])
            weighted = self.op(
                "Mul", [mean, self.const("w", np.array(cart_weight, dtype=np.float32))]
            )
            q = self.op("Add", [q, weighted])
        scores = self.op(
            "MatMul", [q, self.const("items_t", np.ascontiguousarray(items.T.astype(np.float32)))]
        )
        return self.op("Add", [scores, self.const("bias", bias.astype(np.float32))])

    def neighbour_scores(
        self,
        matrix: sp.csr_matrix,
        base: np.ndarray,
        sources: tuple[tuple[str, float], ...] = (("cart", 1.0),),
    ) -> str:
        """``base_j + sum over sources (input, w) of w * sum_{i in input} matrix[i, j]``, the
        rows of ``matrix`` stored as padded neighbour lists and added with ScatterElements."""
        m = sp.csr_matrix(matrix)
        lengths = np.diff(m.indptr)
        width = max(int(lengths.max()) if lengths.size else 0, 1)
        if width > MAX_NEIGHBOURS:
            raise ExportError(
                f"rows with {width} neighbours are too wide for an artifact (max {MAX_NEIGHBOURS}): "
                "fit with fewer neighbours"
            )
        idx = np.zeros((m.shape[0], width), dtype=np.int32)
        wts = np.zeros((m.shape[0], width), dtype=np.float32)
        rows = np.repeat(np.arange(m.shape[0]), lengths)
        pos = np.arange(m.nnz) - np.repeat(m.indptr[:-1], lengths)
        idx[rows, pos], wts[rows, pos] = m.indices, m.data
        nbr_idx, nbr_w = self.const("nbr_idx", idx), self.const("nbr_w", wts)
        flat = self.const("flat", np.array([0, -1], dtype=np.int64))
        ax2 = self.const("ax2", np.array([2], dtype=np.int64))
        targets, updates = [], []
        for name, weight in sources:
            if not weight:
                continue
            given, valid = self.indices_valid(name)
            w = self.op(
                "Mul",
                [self.op("Gather", [nbr_w, given], axis=0), self.op("Unsqueeze", [valid, ax2])],
            )
            if weight != 1.0:
                w = self.op("Mul", [w, self.const("w", np.array(weight, dtype=np.float32))])
            targets.append(self.op("Reshape", [self.op("Gather", [nbr_idx, given], axis=0), flat]))
            updates.append(self.op("Reshape", [w, flat]))
        scores = self.full_rows(base)
        if targets:
            index = targets[0] if len(targets) == 1 else self.op("Concat", targets, axis=1)
            update = updates[0] if len(updates) == 1 else self.op("Concat", updates, axis=1)
            scores = self.op("ScatterElements", [scores, index, update], axis=1, reduction="add")
        return scores

    def minmax(self, scores: str) -> str:
        """Each row scaled to [0, 1]; constant rows become 0 (as ``training.models.addon``)."""
        axis = self.const("ax1", np.array([1], dtype=np.int64))
        lo = self.op("ReduceMin", [scores, axis], keepdims=1)
        span = self.op("Sub", [self.op("ReduceMax", [scores, axis], keepdims=1), lo])
        tiny = self.const("tiny", np.array(1e-30, dtype=np.float32))
        scaled = self.op("Div", [self.op("Sub", [scores, lo]), self.op("Max", [span, tiny])])
        positive = self.op("Greater", [span, self.const("zerof", np.array(0.0, dtype=np.float32))])
        return self.op(
            "Where", [positive, scaled, self.const("zerof", np.array(0.0, dtype=np.float32))]
        )


def _scores(g: _Graph, model: RecommenderBase) -> str:
    """Add the model's scoring subgraph; return the [B, n_items] score tensor name."""
    kind = model.kind
    tie = TIE_BREAK * getattr(model, "popularity_", np.zeros(model.n_items_, np.float32))
    if kind == "popularity":
        return g.full_rows(model.popularity_)
    if kind == "personal_popularity":
        return g.op("Add", [g.use("history"), g.const("tie", tie.astype(np.float32))])
    if kind == "cooccurrence":
        return g.neighbour_scores(model.confidence_, tie)
    if kind in ("item_knn", "ease"):
        matrix = model.similarity_ if kind == "item_knn" else model.weights_
        sources = (("history_items", model.history_weight), ("cart", model.cart_weight))
        return g.neighbour_scores(matrix, tie, sources)
    if kind in ("als", "bpr", "lmf"):
        return g.factor_scores(
            model.user_factors_, model.unknown_user_, model.item_factors_, tie, model.cart_weight
        )
    if kind == "lightfm":
        return g.factor_scores(model.user_vectors_, model.unknown_user_, model.item_vectors_,
                               model.item_biases_ + tie, model.cart_weight)  # fmt: skip
    if kind == "addon":
        total = None
        for weight, component in zip(model.weights_, model.components_, strict=True):
            if component is None or weight == 0:
                continue
            part = g.op(
                "Mul",
                [g.minmax(_scores(g, component)), g.const("wt", np.array(weight, np.float32))],
            )
            total = part if total is None else g.op("Add", [total, part])
        if total is None:
            raise ExportError("the add-on scorer has no component with a positive weight")
        return total
    raise ExportError(
        f"model kind {kind!r} cannot be exported as a scoring graph; exportable kinds: {', '.join(EXPORTABLE)}"
    )


def build_graph(model: RecommenderBase) -> Any:
    """The ONNX model scoring, masking and ranking for ``model``."""
    from onnx import TensorProto, checker, helper

    g = _Graph()
    scores = _scores(g, model)
    neg_inf = g.const("neg_inf", np.array(-np.inf, dtype=np.float32))
    masked = g.op("Where", [g.use("exclude"), neg_inf, scores])
    values, items = "scores", "items"
    g.nodes.append(
        helper.make_node("TopK", [masked, g.use("k")], [values, items], axis=1, largest=1, sorted=1)
    )
    n = model.n_items_
    specs = {
        "user": (TensorProto.INT64, ["batch"]),
        "cart": (TensorProto.INT64, ["batch", "cart"]),
        "history": (TensorProto.FLOAT, ["batch", n]),
        "history_items": (TensorProto.INT64, ["batch", "history"]),
        "exclude": (TensorProto.BOOL, ["batch", n]),
        "k": (TensorProto.INT64, [1]),
    }
    inputs = [
        helper.make_tensor_value_info(name, *specs[name]) for name in specs if name in g.inputs
    ]
    outputs = [
        helper.make_tensor_value_info(values, TensorProto.FLOAT, ["batch", "k"]),
        helper.make_tensor_value_info(items, TensorProto.INT64, ["batch", "k"]),
    ]
    graph = helper.make_graph(g.nodes, f"addons_{model.kind}", inputs, outputs, g.inits)
    onnx_model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="addons"
    )
    onnx_model.ir_version = 9  # readable by onnxruntime >= 1.17
    checker.check_model(onnx_model, full_check=True)
    return onnx_model


def history_matrix(model: RecommenderBase, train: Dataset) -> sp.csr_matrix:
    """Per-user re-buy scores shipped as the user-state snapshot."""
    source = model
    if model.kind == "addon":
        source = next(
            (c for c in model.components_ if c is not None and c.kind == "personal_popularity"),
            None,
        )
    if source is not None and hasattr(source, "user_scores_"):
        return sp.csr_matrix(source.user_scores_, dtype=np.float32)
    return sp.csr_matrix(model.owned_, dtype=np.float32)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def export_model(
    model: RecommenderBase,
    train: Dataset,
    out: str | Path,
    run_id: str | None = None,
    metrics: dict[str, float] | None = None,
    fingerprint: str | None = None,
) -> Path:
    """Write the artifact directory ``out`` atomically (temp dir, then rename)."""
    import onnx

    model._check_fitted()
    onnx_model = build_graph(model)
    target = Path(out)
    try:
        with atomic_directory(target, "manifest.json") as tmp:
            onnx.save_model(onnx_model, str(tmp / "model.onnx"))
            (tmp / "users.json").write_text(json.dumps(train.user_map.to_json()))
            (tmp / "items.json").write_text(json.dumps(train.item_map.to_json()))
            items = train.items
            table = {
                col: items[col].to_list()
                for col in ("price", "margin", "in_stock", "department", "category", "subcategory")
            }
            (tmp / "item_table.json").write_text(json.dumps(table))
            history = history_matrix(model, train)
            np.savez(tmp / "user_state.npz", **{
                "history.data": history.data, "history.indices": history.indices,
                "history.indptr": history.indptr, "history.shape": np.asarray(history.shape),
            })  # fmt: skip
            files = sorted(p.name for p in tmp.iterdir())
            manifest = {
                "format": FORMAT,
                "model_kind": model.kind,
                "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "mlflow_run_id": run_id,
                "data_fingerprint": fingerprint,
                "metrics": metrics or {},
                "onnx_opset": OPSET,
                "inputs": [i.name for i in onnx_model.graph.input],
                "n_users": train.n_users,
                "n_items": train.n_items,
                "params": model.get_params(),
                "files": {name: _sha256(tmp / name) for name in files},
            }
            atomic_write_text(tmp / "manifest.json", json.dumps(manifest, indent=2, default=str))
    except FileExistsError as exc:
        raise ExportError(f"refusing to overwrite: {exc}") from None
    return target


def export_run(
    run_id: str,
    out: str | Path,
    tracking_uri: str | None = None,
    register: str | None = None,
) -> Path:
    """Export the model of an MLflow run (``addons export --run-id``).

    The run's config rebuilds the training data; its fingerprint must equal the run's
    ``data_fingerprint`` tag (the artifact's id maps and user state must be the ones the
    model was fitted on). The artifact is logged to the run under ``artifact/`` and, with
    ``register``, registered as a model version with the alias ``champion``.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    from features.errors import ConfigError
    from features.loading import load_dataset
    from training.config import config_from_dict
    from training.experiment import make_split
    from training.persistence import load_model
    from training.tracking import resolve_tracking_uri

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = resolve_tracking_uri(tracking_uri)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise ConfigError("--run-id", f"no MLflow run {run_id!r} at {uri}: {exc.message}") from None
    config = config_from_dict(
        mlflow.artifacts.load_dict(f"runs:/{run_id}/config.json"), f"run {run_id}"
    )
    data = load_dataset(config.data)
    expected = run.data.tags.get("data_fingerprint")
    if expected != data.fingerprint:
        raise ExportError(
            f"the data changed since run {run_id}: fingerprint {data.fingerprint[:12]} != {str(expected)[:12]}"
        )
    train = make_split(config, data).train
    model = load_model(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="model"))
    metrics = {k: v for k, v in run.data.metrics.items() if not k.startswith(("train/", "time/"))}
    path = export_model(model, train, out, run_id, metrics, data.fingerprint)
    client.log_artifacts(run_id, str(path), "artifact")
    if register:
        # The artifact is a plain directory, not an MLflow "logged model": register its URI.
        try:
            client.get_registered_model(register)
        except MlflowException:
            client.create_registered_model(register)
        version = client.create_model_version(
            register, f"{run.info.artifact_uri}/artifact", run_id=run_id
        )
        client.set_registered_model_alias(register, "champion", version.version)
    return path
