"""Export a fitted model as a versioned artifact directory: the only contract with serving.

Layout (format ``addons.artifact/2``)::

    model.onnx       scoring graph: user lookup (or the mean user for unknown / anonymous
                     shoppers), cart term, history term, biases, exclusion mask, TopK
    manifest.json    format, model kind, created_at, MLflow run id, data fingerprint,
                     evaluation metrics, ONNX opset, graph inputs, ``scored_first`` (items
                     a factor graph scores before its bound check), sha256 of every file
    users.json       user id map (sorted external ids, position = internal index)
    items.json       item ids in the graph's item order (``addons.idlist/1``: position =
                     the item index every other file and the graph use; not sorted when a
                     factor model puts its longest item vectors first)
    item_table.json  per item, in that order: price, margin, in_stock, department,
                     category, subcategory
    user_state.npz   per-user purchase history as CSR arrays (``history.data``, ``.indices``,
                     ``.indptr``): the re-buy signal and the owned-item filter

Format 1 differed only in ``items.json`` (a sorted ``addons.idmap/1``): serving reads both.

Graph inputs (each present only if the kind needs it; the manifest lists them):

- ``user``     int64 [B]: internal user index, -1 = unknown / anonymous;
- ``cart``     int64 [B, C]: item positions (``items.json``) of the cart, padded with -1;
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
import tempfile
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
from training.models.baselines import TIE_BREAK

FORMAT = "addons.artifact/2"
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
#: Subtracted from an excluded item's score inside the graph (see ``_Graph.masked_top_k``).
EXCLUDED = 3e38
#: Factor models over at least this many items score a head of long vectors first.
PRUNE_MIN_ITEMS = 4096
#: The k the head size is chosen for (serving asks k x 10 candidates; k = 5 gives 50).
PRUNE_K = 50


def _node(op_type: str, inputs: list[str], outputs: list[str], **attrs: Any) -> Any:
    from onnx import helper

    return helper.make_node(op_type, inputs, outputs, **attrs)


class ExportError(ValueError):
    """The model kind cannot be exported (or the export failed its parity check)."""


class RunNotExportable(ExportError, InputError):
    """The run asked for is not FINISHED (still running, failed or killed): exit 2."""


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


@dataclass
class _Graph:
    """Collects nodes and constants while a scoring graph is built."""

    nodes: list[Any] = field(default_factory=list)
    inits: list[Any] = field(default_factory=list)
    inputs: set[str] = field(default_factory=set)
    counter: int = 0
    #: constants by content, so a matrix used twice (cart lookup, scoring) is stored once
    consts: dict[tuple, str] = field(default_factory=dict)

    def name(self, base: str) -> str:
        self.counter += 1
        return f"{base}_{self.counter}"

    def const(self, base: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        value = np.ascontiguousarray(value)
        key = (value.dtype.str, value.shape, hashlib.sha256(value.tobytes()).digest())
        if key not in self.consts:
            self.consts[key] = self.name(base)
            self.inits.append(numpy_helper.from_array(value, self.consts[key]))
        return self.consts[key]

    def op(self, op_type: str, inputs: list[str], base: str | None = None, **attrs: Any) -> str:
        out = self.name(base or op_type.lower())
        self.nodes.append(_node(op_type, inputs, [out], **attrs))
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

    def query_vectors(self, users: np.ndarray, unknown: np.ndarray, items: np.ndarray,
                      cart_weight: float) -> str:  # fmt: skip
        """``x_u + w * mean of the cart's item vectors`` [B, f]; user -1 takes ``unknown``."""
        table = np.vstack([unknown[None, :], users]).astype(np.float32)
        shifted = self.op("Add", [self.use("user"), self.const("one", np.array(1, dtype=np.int64))])
        q = self.op("Gather", [self.const("users", table), shifted], axis=0)
        if not cart_weight:
            return q
        idx, valid = self.cart_valid()
        vecs = self.op("Gather", [self.const("items", items.astype(np.float32)), idx], axis=0)
        mask = self.op("Unsqueeze", [valid, self.const("ax2", np.array([2], dtype=np.int64))])
        total = self.op("ReduceSum", [self.op("Mul", [vecs, mask]),
                                      self.const("ax1", np.array([1], dtype=np.int64))], keepdims=0)  # fmt: skip
        count = self.op(
            "ReduceSum", [valid, self.const("ax1", np.array([1], dtype=np.int64))], keepdims=1
        )
        count = self.op("Max", [count, self.const("onef", np.array(1.0, dtype=np.float32))])
        weighted = self.op(
            "Mul",
            [self.op("Div", [total, count]), self.const("w", np.array(cart_weight, np.float32))],
        )
        return self.op("Add", [q, weighted])

    def dot_scores(self, q: str, items: str, bias: str) -> str:
        """``q . y_j + bias_j`` [B, n]: one Gemm over the item vectors [n, f] as stored rows
        (transB), bias included. As fast as MatMul by ``items.T`` (benchmarks/
        bench_graph_ops.py); rows let the head be a Slice of the same constant."""
        return self.op("Gemm", [q, items, bias], transB=1)

    def factor_scores(self, users: np.ndarray, unknown: np.ndarray, items: np.ndarray,
                      bias: np.ndarray, cart_weight: float) -> str:  # fmt: skip
        """``(x_u + w * mean cart vectors) . y_j + bias_j`` for every item [B, n_items]."""
        q = self.query_vectors(users, unknown, items, cart_weight)
        return self.dot_scores(q, self.const("items", items.astype(np.float32)),
                               self.const("bias", bias.astype(np.float32)))  # fmt: skip

    def masked_top_k(self, scores: str, exclude: str, k: str) -> tuple[str, str]:
        """(values, indices) of the ``k`` best non-excluded columns of ``scores``.

        An excluded item gets ``score - EXCLUDED`` (about -3e38) rather than going through
        Where: onnxruntime's Where with a broadcast -inf is 5x slower than Cast, Mul and Sub
        at batch 1 and slower still at batch 256. :func:`build_graph` turns those slots
        into -inf on the way out.
        """
        penalty = self.op("Mul", [self.op("Cast", [exclude], to=1),
                                  self.const("excluded", np.array(EXCLUDED, np.float32))])  # fmt: skip
        masked = self.op("Sub", [scores, penalty])
        values, indices = self.name("values"), self.name("indices")
        self.nodes.append(_node("TopK", [masked, k], [values, indices], axis=1))
        return values, indices

    def pruned_factor_top_k(self, q: str, items: np.ndarray, bias: np.ndarray,
                            head: int) -> tuple[str, str]:  # fmt: skip
        """Exact top-k of ``q . y_j + bias_j`` that usually scores only the first ``head`` items.

        ``items`` must be ordered by vector norm, longest first (:func:`scoring_order`). Any
        item after the head scores at most ``|q| * max_tail |y_j| + max_tail bias_j``
        (Cauchy-Schwarz). A row whose k-th best non-excluded head score reaches that bound
        has its answer; the other rows (few, on real data) are scored in full. The result is
        the same as :meth:`factor_scores` + :meth:`masked_top_k`, up to exact ties. The head
        is a prefix so that its part of ``exclude`` is a Slice: Gather of 23k columns costs
        as much as the whole head Gemm in onnxruntime.
        """
        norms = np.linalg.norm(items.astype(np.float64), axis=1)
        tail_norm, tail_bias = _tail_bound(norms[head:], bias[head:], items.shape[1])
        int64 = np.int64
        exclude, k = self.use("exclude"), self.use("k")
        ax1 = self.const("ax1", np.array([1], int64))
        flat = self.const("flat", np.array([-1], int64))
        all_items = self.const("items", items.astype(np.float32))
        all_bias = self.const("bias", bias.astype(np.float32))
        # 1. the head (Slices of constants: onnxruntime folds them once at load)
        zero1 = self.const("zero1", np.array([0], int64))
        ax0 = self.const("ax0", np.array([0], int64))
        head_end = self.const("head", np.array([head], int64))
        head_excl = self.op("Slice", [exclude, zero1, head_end, ax1])
        head_scores = self.dot_scores(
            q,
            self.op("Slice", [all_items, zero1, head_end, ax0]),
            self.op("Slice", [all_bias, zero1, head_end, ax0]),
        )
        # k may exceed the head: take min(k, head), pad to k with -inf (those rows redo).
        head_k = self.op("Min", [k, head_end])
        hv, hi = self.masked_top_k(head_scores, head_excl, head_k)
        pads = self.op(
            "Concat",
            [self.const("zeros3", np.zeros(3, int64)), self.op("Sub", [k, head_k])],
            axis=0,
        )
        hv = self.op("Pad", [hv, pads, self.const("ninf", np.array(-np.inf, np.float32))])
        hi = self.op("Pad", [hi, pads, self.const("zero", np.array(0, int64))])
        # 2. the rows the head settles: k-th value >= the bound for every later item
        kth = self.op(
            "Slice", [hv, self.op("Sub", [k, self.const("one", np.array([1], int64))]), k, ax1]
        )
        q_norm = self.op("ReduceL2", [q, ax1], keepdims=1)
        bound = self.op(
            "Add",
            [
                self.op("Mul", [q_norm, self.const("tail_norm", np.array(tail_norm, np.float32))]),
                self.const("tail_bias", np.array(tail_bias, np.float32)),
            ],
        )
        unsettled = self.op(
            "Not", [self.op("Reshape", [self.op("GreaterOrEqual", [kth, bound]), flat])]
        )
        rows = self.op("NonZero", [unsettled])  # [1, m]
        rows_flat = self.op("Reshape", [rows, flat])
        # 3. the unsettled rows over every item, written over their head answers
        full = self.dot_scores(self.op("Gather", [q, rows_flat], axis=0), all_items, all_bias)
        fv, fi = self.masked_top_k(full, self.op("Gather", [exclude, rows_flat], axis=0), k)
        at = self.op("Transpose", [rows], perm=[1, 0])  # [m, 1] row indices for ScatterND
        return self.op("ScatterND", [hv, at, fv]), self.op("ScatterND", [hi, at, fi])  # fmt: skip

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


def _tie_break(model: RecommenderBase) -> np.ndarray:
    """The per-item term the training side adds to break ties (``TIE_BREAK`` x popularity)."""
    return TIE_BREAK * getattr(model, "popularity_", np.zeros(model.n_items_, np.float32))


def _factor_parts(model: RecommenderBase) -> tuple[np.ndarray, ...] | None:
    """(user vectors, unknown-user vector, item vectors, item bias) of a factor model."""
    tie = _tie_break(model)
    if model.kind in ("als", "bpr", "lmf"):
        return model.user_factors_, model.unknown_user_, model.item_factors_, tie
    if model.kind == "lightfm":
        return (
            model.user_vectors_,
            model.unknown_user_,
            model.item_vectors_,
            model.item_biases_ + tie,
        )
    return None


def _scores(g: _Graph, model: RecommenderBase) -> str:
    """Add the model's scoring subgraph; return the [B, n_items] score tensor name."""
    kind = model.kind
    tie = _tie_break(model)
    factors = _factor_parts(model)
    if factors is not None:
        users, unknown, items, bias = factors
        return g.factor_scores(users, unknown, items, bias, model.cart_weight)
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


def _tail_bound(norms: np.ndarray, bias: np.ndarray, n_factors: int) -> tuple[float, float]:
    """(norm, bias) such that each of these items scores at most ``|q| * norm + bias``,
    widened for the float32 rounding of a length-``n_factors`` dot product."""
    slack = 1.0 + 1e-4 + n_factors * 1e-7
    tail_bias = float(bias.max())
    return float(norms.max()) * slack, tail_bias + 1e-6 * max(1.0, abs(tail_bias))


def scoring_order(model: RecommenderBase) -> np.ndarray:
    """The graph's item positions: position p holds the model's item ``order[p]``. Factor
    models put their longest item vectors first (the head of :func:`choose_head`); every
    other kind keeps the training order."""
    parts = _factor_parts(model)
    if parts is None:
        return np.arange(model.n_items_)
    norms = np.linalg.norm(parts[2].astype(np.float64), axis=1)
    return np.argsort(-norms, kind="stable")


def choose_head(model: RecommenderBase, k: int = PRUNE_K, sample: int = 256, seed: int = 0) -> int:
    """How many items a factor model's graph scores before its bound check (``n_items``:
    no pruning). Picks the head size with the least expected work, ``head + (share of rows
    the head does not settle) * n_items``, measured on a sample of the model's own users
    (no cart, nothing excluded, the ``k`` best); catalogs under ``PRUNE_MIN_ITEMS`` are
    scored in full."""
    parts = _factor_parts(model)
    n = model.n_items_
    if parts is None or n < PRUNE_MIN_ITEMS:
        return n
    users, unknown, items, bias = parts
    order = scoring_order(model)
    items, bias = items[order].astype(np.float32), bias[order].astype(np.float32)
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(users), size=min(sample, len(users)), replace=False)
    q = np.vstack([unknown[None, :], users[picked]]).astype(np.float32)
    scores = q @ items.T + bias
    q_norm = np.linalg.norm(q.astype(np.float64), axis=1)
    norms = np.linalg.norm(items.astype(np.float64), axis=1)
    best, best_cost = n, float(n)
    for share in (1 / 32, 1 / 16, 1 / 8, 3 / 16, 1 / 4, 3 / 8, 1 / 2):
        head = max(int(n * share), k)
        tail_norm, tail_bias = _tail_bound(norms[head:], bias[head:], items.shape[1])
        kth = -np.partition(-scores[:, :head], k - 1, axis=1)[:, k - 1]
        cost = head + float(np.mean(kth < q_norm * tail_norm + tail_bias)) * n
        if cost < best_cost:
            best, best_cost = head, cost
    return best


@dataclass(frozen=True)
class ScoringGraph:
    """A built graph and the item order it works in.

    ``order[p]`` is the model's item index at graph position ``p``: the artifact writes its
    item id list, item table and user state in this order, so serving never sees it.
    ``head``: items scored before the bound check (``n_items``: all of them).
    """

    onnx: Any
    order: np.ndarray
    head: int


def build_graph(model: RecommenderBase, head: int | None = None) -> ScoringGraph:
    """The ONNX model scoring, masking and ranking for ``model``.

    ``head``: for factor models, how many items to score before the bound check of
    :meth:`_Graph.pruned_factor_top_k` (default :func:`choose_head`; ``n_items`` scores every
    item). The answer does not depend on it, only the work does.
    """
    from onnx import TensorProto, checker, helper

    g = _Graph()
    n = model.n_items_
    parts = _factor_parts(model)
    if parts is not None:
        for name, array in zip(("user", "unknown-user", "item", "item bias"), parts, strict=True):
            if not np.isfinite(array).all():  # NaN scores rank arbitrarily and void the bound
                raise ExportError(f"the {model.kind} model has non-finite {name} values: refit it")
    head = min(n, choose_head(model) if head is None else head)
    order = np.arange(n)
    if parts is not None and 0 < head < n:
        order = scoring_order(model)
        users, unknown, items, bias = parts
        items, bias = items[order], bias[order]
        q = g.query_vectors(users, unknown, items, model.cart_weight)
        values, indices = g.pruned_factor_top_k(q, items, bias, head)
    else:
        head = n
        values, indices = g.masked_top_k(_scores(g, model), g.use("exclude"), g.use("k"))
    # Excluded slots leave the graph as -inf, as the format promises (a [B, k] lookup, not a
    # test on the value: an excluded item's score may be anything, NaN included).
    excluded = g.op("GatherElements", [g.use("exclude"), indices], axis=1)
    ninf = g.const("ninf", np.array(-np.inf, np.float32))
    g.nodes.append(_node("Where", [excluded, ninf, values], ["scores"]))
    g.nodes.append(_node("Identity", [indices], ["items"]))
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
        helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", "k"]),
        helper.make_tensor_value_info("items", TensorProto.INT64, ["batch", "k"]),
    ]
    graph = helper.make_graph(g.nodes, f"addons_{model.kind}", inputs, outputs, g.inits)
    onnx_model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="addons"
    )
    onnx_model.ir_version = 9  # readable by onnxruntime >= 1.17
    checker.check_model(onnx_model, full_check=True)
    return ScoringGraph(onnx_model, order, head)


def history_matrix(model: RecommenderBase, train: Dataset | ExportInputs) -> sp.csr_matrix:
    """Per-user re-buy scores shipped as the user-state snapshot (the model's own state:
    ``train`` is not read)."""
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
    ``head``: see :func:`build_graph` (default: chosen from the model's users).
    ``sign_key``: an Ed25519 private key file; the manifest is signed in the temp folder
    (``serving.signing.sign_artifact``), so the artifact never appears unsigned.
    """
    import onnx

    model._check_fitted()
    graph = build_graph(model, head)
    order = graph.order  # everything per item is written in the graph's item order
    target = Path(out)
    try:
        with atomic_directory(target, "manifest.json") as tmp:
            onnx.save_model(graph.onnx, str(tmp / "model.onnx"))
            (tmp / "users.json").write_text(json.dumps(train.user_map.to_json()))
            ids = train.item_map.to_json()
            ids.update(format="addons.idlist/1", ids=train.item_map.to_external(order).tolist())
            (tmp / "items.json").write_text(json.dumps(ids))
            items = train.items
            table = {
                col: items[col].gather(order).to_list()
                for col in ("price", "margin", "in_stock", "department", "category", "subcategory")
            }
            (tmp / "item_table.json").write_text(json.dumps(table))
            history = sp.csr_matrix(history_matrix(model, train)[:, order])
            history.sort_indices()
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
                "inputs": [i.name for i in graph.onnx.graph.input],
                "scored_first": graph.head,
                "n_users": len(train.user_map),
                "n_items": len(train.item_map),
                "params": model.get_params(),
                "files": {name: _sha256(tmp / name) for name in files},
            }
            atomic_write_text(tmp / "manifest.json", json.dumps(manifest, indent=2, default=str))
            if sign_key is not None:
                from serving.signing import sign_artifact

                sign_artifact(tmp, Path(sign_key))
    except FileExistsError as exc:
        raise ExportError(f"refusing to overwrite: {exc}") from None
    return target


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
