"""ONNX scoring graphs: the shared builder every exportable model kind uses.

Each kind owns its graph: a model implements :meth:`RecommenderBase.graph_scores` (add its
scoring subgraph to a :class:`Graph`, return the ``[B, n_items]`` score tensor) or, for factor
models, :meth:`RecommenderBase.factor_parts` (then :func:`build_graph` can score a head of long
item vectors first). :func:`build_graph` adds what every graph shares: the exclusion mask, TopK,
-inf for excluded slots, the graph's inputs and outputs, the checker.

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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

if TYPE_CHECKING:
    from training.models.base import RecommenderBase

OPSET = 18

#: Widest neighbour list an artifact holds (n_items x width indices and weights).
MAX_NEIGHBOURS = 1000
#: Subtracted from an excluded item's score inside the graph (see ``Graph.masked_top_k``).
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


@dataclass
class Graph:
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

    def item_item_scores(self, matrix: sp.csr_matrix, base: np.ndarray, history_weight: float,
                         cart_weight: float) -> str:  # fmt: skip
        """``base + (history_weight * h_u + cart_weight * cart) . matrix`` (the graph twin of
        :func:`training.models.base.history_and_cart`), over the history's items."""
        sources = (("history_items", history_weight), ("cart", cart_weight))
        return self.neighbour_scores(matrix, base, sources)

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


@dataclass
class _Recorder(Graph):
    """A :class:`Graph` that keeps no constants and builds no padded lists: it only records
    what :meth:`Graph.neighbour_scores` was given (:func:`neighbour_arrays`)."""

    recorded: tuple[str, sp.csr_matrix, np.ndarray, tuple] | None = None

    def const(self, base: str, value: np.ndarray) -> str:
        return self.name(base)

    def neighbour_scores(self, matrix: sp.csr_matrix, base: np.ndarray,
                         sources: tuple[tuple[str, float], ...] = (("cart", 1.0),)) -> str:  # fmt: skip
        out = self.name("neighbour_scores")
        self.recorded = (out, matrix, base, sources)
        return out


def neighbour_arrays(model: RecommenderBase) -> tuple[dict[str, np.ndarray], list] | None:
    """The rows of an item x item kind whose whole score is :meth:`Graph.neighbour_scores`
    (co-occurrence, item-KNN, EASE), as CSR arrays for candidate-wise serving
    (``serving.neighbour_scorer``): ``indptr`` int64, ``indices`` int32, ``data`` float32,
    ``base`` float32, and the ``[input, weight]`` sources; None for every other kind (a blend
    that rescales the scores, factor models)."""
    if model.factor_parts() is not None:
        return None
    g = _Recorder()
    try:
        scores = model.graph_scores(g)
    except ExportError:
        return None
    if g.recorded is None or g.recorded[0] != scores:
        return None
    _, matrix, base, sources = g.recorded
    m = sp.csr_matrix(matrix, dtype=np.float32)
    arrays = {
        "indptr": m.indptr.astype(np.int64),
        "indices": m.indices.astype(np.int32),
        "data": m.data.astype(np.float32),
        "base": np.asarray(base, dtype=np.float32),
    }
    return arrays, [[name, float(w)] for name, w in sources]


def tie_break(model: RecommenderBase) -> np.ndarray:
    """The per-item term the training side adds to break ties (``TIE_BREAK`` x popularity)."""
    from training.models.baselines import TIE_BREAK

    return TIE_BREAK * getattr(model, "popularity_", np.zeros(model.n_items_, np.float32))


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
    parts = model.factor_parts()
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
    parts = model.factor_parts()
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
    :meth:`Graph.pruned_factor_top_k` (default :func:`choose_head`; ``n_items`` scores every
    item). The answer does not depend on it, only the work does.
    """
    from onnx import TensorProto, checker, helper

    g = Graph()
    n = model.n_items_
    parts = model.factor_parts()
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
        values, indices = g.masked_top_k(model.graph_scores(g), g.use("exclude"), g.use("k"))
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
    from training.artifact_writer import EXTERNAL_DATA_BYTES, initializer_bytes

    if initializer_bytes(onnx_model) <= EXTERNAL_DATA_BYTES:  # else checked once saved
        checker.check_model(onnx_model, full_check=True)
    return ScoringGraph(onnx_model, order, head)
