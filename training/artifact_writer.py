"""Writing an artifact directory: the only contract with serving.

Layout (format ``addons.artifact/2``)::

    model.onnx       the model's ONNX graph: for ``scorer: graph`` (every kind but the
                     learned ranker) the scoring graph of :mod:`training.onnx_graph` (user
                     lookup or the mean user, cart term, history term, biases, exclusion
                     mask, TopK)
    manifest.json    format, model kind, ``scorer`` (which serving scorer runs the artifact,
                     see ``serving.scorers``), created_at, MLflow run id, data fingerprint,
                     evaluation metrics, ONNX opset, graph inputs, ``scored_first`` (items
                     a factor graph scores before its bound check), sha256 of every file,
                     and any fields the kind adds (:class:`ArtifactParts`)
    users.json       user id map (sorted external ids, position = internal index)
    items.json       item ids in the artifact's item order (``addons.idlist/1``: position =
                     the item index every other file and the graph use; not sorted when a
                     factor model puts its longest item vectors first)
    item_table.json  per item, in that order: price, margin, in_stock, department,
                     category, subcategory
    user_state.npz   per-user purchase history as CSR arrays (``history.data``, ``.indices``,
                     ``.indptr``): the re-buy signal and the owned-item filter
    *.npz            extra arrays a kind ships (:attr:`ArtifactParts.arrays`), no pickle,
                     compressed; one whose arrays pass :data:`ARRAY_FILES_BYTES` is written
                     instead as one plain ``<stem>.<array>.npy`` per array, named in the
                     manifest's ``array_files`` field, which serving memory-maps (the learned
                     ranker's state at a large shop: gigabytes, see :func:`_write_arrays`)
    neighbours.*.npy item x item kinds (co-occurrence, item-KNN, EASE): the graph's neighbour
                     rows as CSR (``indptr`` int64, ``indices`` int32, ``data`` float32) and
                     its ``base`` scores, named in the manifest's ``neighbours`` field with
                     the graph's sources; serving memory-maps them and scores each request's
                     candidates only (``serving.neighbour_scorer``); older servers ignore them
    model.onnx.data  only for graphs whose constants pass :data:`EXTERNAL_DATA_BYTES`: the
                     constants as ONNX external data (protobuf cannot hold a model over 2 GB)

Format 1 differed only in ``items.json`` (a sorted ``addons.idmap/1``): serving reads both.
What goes into the graph is each model's business (:meth:`RecommenderBase.export_parts`);
this module writes files, the manifest, hashes and the signature, atomically.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import scipy.sparse as sp

from features.dataset import Dataset
from features.errors import DataValidationError, InputError
from features.idmap import IdMap
from features.io import atomic_directory, atomic_write_text
from training.models.base import RecommenderBase
from training.onnx_graph import OPSET, ExportError
from training.pyfunc_model import add_pyfunc_flavour

FORMAT = "addons.artifact/2"
#: Constants above this many bytes go to ``model.onnx.data`` (ONNX external data): a
#: serialised protobuf message cannot pass 2 GB, and the graph's nodes need some room.
EXTERNAL_DATA_BYTES = 1 << 30
EXTERNAL_DATA_FILE = "model.onnx.data"
#: In such a graph, constants of at least this many bytes go to the data file.
EXTERNAL_TENSOR_BYTES = 1024
#: An extra ``.npz`` whose arrays hold at least this many bytes (uncompressed) is written as
#: plain ``.npy`` files, memory-mapped by serving: decompressing and copying it cost most of
#: a large artifact's load (the learned ranker's state at 32x: 4.3 GB, 74 s), and each
#: worker held its own copy. Below it the compressed ``.npz`` stays: the Complete Journey
#: ranker's state is 116 MB raw, 43 MB compressed, and its artifact must stay <= 60 MB.
ARRAY_FILES_BYTES = 1 << 28


class ArtifactExists(ExportError, InputError):
    """The target exists and is not an artifact this writer may replace: exit 2."""


#: The per-item columns an artifact ships in ``item_table.json``.
ITEM_COLUMNS = ("price", "margin", "in_stock", "department", "category", "subcategory")
INPUTS_FORMAT = "addons.export_inputs/1"


@dataclass(frozen=True, eq=False)
class ExportInputs:
    """What :func:`export_model` needs besides the fitted model: the training id maps and the
    item table (the per-user state is part of the model: ``owned_`` / ``user_scores_``).

    ``addons train`` logs them with each run under ``export_inputs/`` (:meth:`save`:
    ``users.json``, ``items.json``, ``item_table.parquet``, ``inputs.json`` with the data
    fingerprint), so :func:`export_run` never reads the raw data again.
    """

    user_map: IdMap
    item_map: IdMap
    items: pl.DataFrame
    fingerprint: str | None = None

    @classmethod
    def from_dataset(cls, data: Dataset) -> ExportInputs:
        """The inputs of the training part ``data`` (id maps and item table are shared by
        every part of a split)."""
        return cls(data.user_map, data.item_map, data.items.select(ITEM_COLUMNS), data.fingerprint)

    def save(self, folder: str | Path) -> Path:
        """Write the four files into the new folder ``folder`` (parquet, JSON: no pickle)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.user_map.save(folder / "users.json")
        self.item_map.save(folder / "items.json")
        self.items.select(ITEM_COLUMNS).write_parquet(folder / "item_table.parquet")
        meta = {"format": INPUTS_FORMAT, "fingerprint": self.fingerprint,
                "n_users": len(self.user_map), "n_items": len(self.item_map)}  # fmt: skip
        atomic_write_text(folder / "inputs.json", json.dumps(meta, indent=1))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> ExportInputs:
        """Read a folder written by :meth:`save`; a damaged one raises
        :class:`~features.errors.DataValidationError` naming the file."""
        folder = Path(folder)
        meta_file = folder / "inputs.json"
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, ValueError) as exc:
            raise DataValidationError(str(meta_file), f"not export inputs: {exc}") from None
        if not isinstance(meta, dict) or meta.get("format") != INPUTS_FORMAT:
            raise DataValidationError(str(meta_file), f"expected format {INPUTS_FORMAT!r}")
        table = folder / "item_table.parquet"
        try:
            items = pl.read_parquet(table)
        except (OSError, pl.exceptions.PolarsError) as exc:
            raise DataValidationError(str(table), f"could not read the item table: {exc}") from None
        inputs = cls(
            IdMap.load(folder / "users.json"),
            IdMap.load(folder / "items.json"),
            items,
            meta.get("fingerprint"),
        )
        counts = (len(inputs.user_map), len(inputs.item_map))
        if counts != (meta.get("n_users"), meta.get("n_items")) or (
            items.height != counts[1] or tuple(items.columns) != ITEM_COLUMNS
        ):
            raise DataValidationError(
                str(folder), "id maps, item table and inputs.json do not agree on the counts"
            )
        return inputs


def exportable_kinds() -> tuple[str, ...]:
    """The model kinds an artifact can be written for (``exportable`` in their class)."""
    from training.models import MODELS

    return tuple(kind for kind, cls in MODELS.items() if cls.exportable)


#: The file names the writer itself produces (a kind's extra arrays may not reuse them).
NEIGHBOUR_FILES = {key: f"neighbours.{key}.npy" for key in ("indptr", "indices", "data", "base")}
STANDARD_FILES = ("model.onnx", "users.json", "items.json", "item_table.json", "user_state.npz",
                  EXTERNAL_DATA_FILE, *NEIGHBOUR_FILES.values())  # fmt: skip
#: Manifest fields the writer sets (a kind's extra manifest fields may not reuse them).
STANDARD_FIELDS = ("format", "model_kind", "scorer", "created_at", "mlflow_run_id",
                   "data_fingerprint", "metrics", "onnx_opset", "inputs", "scored_first",
                   "n_users", "n_items", "params", "files", "onnx_external_data",
                   "neighbours", "array_files")  # fmt: skip


@dataclass
class ArtifactParts:
    """What a model contributes to its artifact (:meth:`RecommenderBase.export_parts`).

    ``onnx``: the ONNX ModelProto written as ``model.onnx``. ``order[p]`` is the model's item
    index at artifact position ``p`` (items.json, item table, user state and every extra
    array's item indices use positions). ``head``: the manifest's ``scored_first``.
    ``scorer``: the serving scorer that runs the artifact (``serving.scorers.SCORERS``).
    ``arrays``: extra ``.npz`` files, name -> {array name: array} (no object arrays),
    written compressed, or as ``.npy`` files when large (:data:`ARRAY_FILES_BYTES`).
    ``manifest``: extra JSON-able manifest fields.
    """

    onnx: Any
    order: np.ndarray
    head: int
    scorer: str = "graph"
    arrays: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)

    def check(self, n_items: int) -> None:
        """Refuse parts the writer cannot write faithfully (names the problem)."""
        if sorted(np.asarray(self.order).tolist()) != list(range(n_items)):
            raise ExportError(f"the item order is not a permutation of the {n_items} items")
        for name, arrays in self.arrays.items():
            if name in STANDARD_FILES or name == "manifest.json" or Path(name).name != name \
                    or not name.endswith(".npz"):  # fmt: skip
                raise ExportError(f"extra artifact file {name!r}: expected a new plain *.npz name")
            for key, value in arrays.items():
                if np.asarray(value).dtype == object:
                    raise ExportError(f"{name}: array {key!r} holds objects (never pickled)")
                if not key or "/" in key or "\\" in key or key.startswith("."):
                    raise ExportError(f"{name}: array name {key!r} cannot name a file")
        clash = sorted(set(self.manifest) & set(STANDARD_FIELDS))
        if clash:
            raise ExportError(f"extra manifest fields {clash} would replace the writer's own")


def save_onnx(model: Any, path: Path) -> bool:
    """Write ``model`` to ``path``; constants over :data:`EXTERNAL_DATA_BYTES` in all go to
    ``EXTERNAL_DATA_FILE`` beside it (True), checked from the files, as the ONNX checker
    cannot hold such a model in memory."""
    import onnx

    if initializer_bytes(model) <= EXTERNAL_DATA_BYTES:
        onnx.save_model(model, str(path))
        return False
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=EXTERNAL_DATA_FILE, size_threshold=EXTERNAL_TENSOR_BYTES)  # fmt: skip
    onnx.checker.check_model(str(path))
    return (path.parent / EXTERNAL_DATA_FILE).exists()


def initializer_bytes(model: Any) -> int:
    """Bytes of the graph's constants (what decides inline vs external data)."""
    return sum(len(t.raw_data) for t in model.graph.initializer)


def history_matrix(model: RecommenderBase, train: Dataset | ExportInputs) -> sp.csr_matrix:
    """Per-user re-buy scores shipped as the user-state snapshot (the model's own state,
    :meth:`RecommenderBase.export_history`: ``train`` is not read)."""
    return model.export_history()


def _write_neighbours(model: RecommenderBase, parts: ArtifactParts, folder: Path) -> dict | None:
    """Write the neighbour rows of an item x item graph (:func:`training.onnx_graph.
    neighbour_arrays`) as plain ``.npy`` files (memory-mappable) and return the manifest's
    ``neighbours`` field; None (nothing written) for other kinds."""
    from training.onnx_graph import neighbour_arrays

    if parts.scorer != "graph" or not np.array_equal(parts.order, np.arange(len(parts.order))):
        return None  # the rows are in the model's item order: only an unpermuted graph
    found = neighbour_arrays(model)
    if found is None:
        return None
    arrays, sources = found
    for key, name in NEIGHBOUR_FILES.items():
        np.save(folder / name, arrays[key], allow_pickle=False)
    return {**NEIGHBOUR_FILES, "sources": sources}


def _write_arrays(name: str, arrays: dict[str, np.ndarray], folder: Path) -> dict | None:
    """Write the extra file ``name`` (:attr:`ArtifactParts.arrays`): a compressed ``.npz``
    (None), or, when its arrays pass :data:`ARRAY_FILES_BYTES`, one plain ``.npy`` file per
    array, ``<stem>.<array>.npy``, returning the manifest's ``array_files`` entry
    ``{array: file}``. All or nothing: a server from before that entry finds no ``name`` and
    refuses the artifact, instead of reading half of it."""
    if sum(np.asarray(a).nbytes for a in arrays.values()) < ARRAY_FILES_BYTES:
        # neighbour lists and counts compress 2-10x (the ranker's state: 116 -> 43 MB on CJ)
        np.savez_compressed(folder / name, **arrays)
        return None
    stem = name.removesuffix(".npz")
    files = {key: f"{stem}.{key}.npy" for key in arrays}
    clash = sorted(set(files.values()) & (set(STANDARD_FILES) | {p.name for p in folder.iterdir()}))
    if clash:
        raise ExportError(f"{name}: its array files {clash} would replace other artifact files")
    for key, value in arrays.items():
        np.save(folder / files[key], np.asarray(value), allow_pickle=False)
    return files


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def export_model(
    model: RecommenderBase,
    train: Dataset | ExportInputs,
    out: str | Path,
    run_id: str | None = None,
    metrics: dict[str, float] | None = None,
    fingerprint: str | None = None,
    head: int | None = None,
    sign_key: str | Path | None = None,
) -> Path:
    """Write the artifact directory ``out`` atomically (temp dir, then an atomic swap).

    ``train``: the training data, or just its :class:`ExportInputs` (id maps, item table).
    ``head``: see :func:`training.onnx_graph.build_graph` (default: chosen from the model's
    users). ``sign_key``: an Ed25519 private key file; the manifest is signed in the temp
    folder (``serving.signing.sign_artifact``), so the artifact never appears unsigned.
    """

    model._check_fitted()
    if not model.exportable:
        raise ExportError(
            f"model kind {model.kind!r} cannot be exported; exportable kinds: "
            f"{', '.join(exportable_kinds())}"
        )
    parts = model.export_parts(head)
    parts.check(model.n_items_)
    order = parts.order  # everything per item is written in the artifact's item order
    target = Path(out)
    try:
        with atomic_directory(target, "manifest.json") as tmp:
            external = save_onnx(parts.onnx, tmp / "model.onnx")
            (tmp / "users.json").write_text(json.dumps(train.user_map.to_json()))
            ids = train.item_map.to_json()
            ids.update(format="addons.idlist/1", ids=train.item_map.to_external(order).tolist())
            (tmp / "items.json").write_text(json.dumps(ids))
            items = train.items
            table = {col: items[col].gather(order).to_list() for col in ITEM_COLUMNS}
            (tmp / "item_table.json").write_text(json.dumps(table))
            history = sp.csr_matrix(history_matrix(model, train)[:, order])
            history.sort_indices()
            np.savez(tmp / "user_state.npz", **{
                "history.data": history.data, "history.indices": history.indices,
                "history.indptr": history.indptr, "history.shape": np.asarray(history.shape),
            })  # fmt: skip
            neighbours = _write_neighbours(model, parts, tmp)
            array_files = {}
            for name, arrays in parts.arrays.items():
                written = _write_arrays(name, arrays, tmp)
                if written:
                    array_files[name] = written
            # the MLflow pyfunc flavour ("models from code"), hashed and signed with the rest
            add_pyfunc_flavour(tmp)
            files = sorted(p.name for p in tmp.iterdir())
            manifest = {
                "format": FORMAT,
                "model_kind": model.kind,
                "scorer": parts.scorer,
                "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "mlflow_run_id": run_id,
                "data_fingerprint": fingerprint,
                "metrics": metrics or {},
                "onnx_opset": OPSET,
                "inputs": [i.name for i in parts.onnx.graph.input],
                "scored_first": parts.head,
                "onnx_external_data": [EXTERNAL_DATA_FILE] if external else [],
                **({"neighbours": neighbours} if neighbours else {}),
                **({"array_files": array_files} if array_files else {}),
                "n_users": len(train.user_map),
                "n_items": len(train.item_map),
                "params": model.get_params(),
                **parts.manifest,
                "files": {name: _sha256(tmp / name) for name in files},
            }
            atomic_write_text(tmp / "manifest.json", json.dumps(manifest, indent=2, default=str))
            if sign_key is not None:
                from serving.signing import sign_artifact

                sign_artifact(tmp, Path(sign_key))
    except FileExistsError as exc:
        raise ArtifactExists(f"refusing to overwrite: {exc}") from None
    return target
