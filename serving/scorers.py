"""Scorers: the code that turns a prepared request batch into ranked candidates.

An artifact names its scorer in the manifest (``"scorer"``; absent means ``graph``).
:class:`serving.ranker.Ranker` validates requests, looks ids up, builds each request's rules
(:class:`serving.rules.Offerable`), hands a :class:`Batch` to the scorer and applies
the rules to what comes back (:func:`serving.rules.select`). A scorer implements
:class:`Scorer`: ``load(artifact, threads)`` and ``score(batch)``.

``SCORERS`` maps each name to ``"module:Class"``, imported on first use, one line per scorer:
adding one is its module plus one line here. A scorer may import numpy and onnxruntime,
never training, implicit, lightfm or mlflow.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from serving.artifact import ArtifactError
from serving.sorted_arrays import in_sorted

if TYPE_CHECKING:
    from serving.artifact import Artifact
    from serving.rules import Offerable

#: Scorer name (manifest ``"scorer"``) -> ``"module:Class"``.
SCORERS: dict[str, str] = {
    "graph": "serving.scorers:GraphScorer",
    "ranker": "serving.ranker_scorer:LearnedScorer",
    # not a manifest name: a "graph" artifact with the manifest field "neighbours"
    "neighbours": "serving.neighbour_scorer:NeighbourScorer",
}


@dataclass
class Batch:
    """One prepared batch of B requests (item positions as in the artifact).

    ``user``: int64 [B], -1 for an unknown or anonymous shopper. ``cart``: int64 [B, C], the
    cart and the anchor (the model's cart term), padded with -1. ``basket``: per row, the cart
    alone; ``anchor``: per row, the anchor or None. ``history_items`` / ``history_weights``:
    per row, the re-buy history as item positions (ascending, unique) and float32 weights
    (the snapshot or the request's fresher history). ``rules``: per row, the rules of the
    request (:class:`serving.rules.Offerable`): ``rules[r].allowed(items)`` says which
    candidates may be offered, in O(candidates); the scorer must not return a refused item,
    or return it with score -inf. ``fetch``: how many candidates per row to return (k x
    overfetch, so the rules applied afterwards still fill k). ``exclude_owned``: the rules'
    setting (a task feature for the learned ranker).

    Dense forms for scorers that work over the whole catalog, built on first use only:
    ``history_rows`` / ``history`` (float32 [B, n_items]) and ``exclude`` (bool
    [B, n_items], True where a rule says no).
    """

    user: np.ndarray
    cart: np.ndarray
    basket: list[np.ndarray]
    anchor: list[int | None]
    history_items: list[np.ndarray]
    history_weights: list[np.ndarray]
    rules: list[Offerable]
    fetch: int
    n_items: int
    exclude_owned: bool = False

    def __len__(self) -> int:
        return len(self.user)

    def rows(self, rows: list[int]) -> Batch:
        """The sub-batch of these rows (same ``fetch``)."""
        return Batch(self.user[rows], self.cart[rows], [self.basket[r] for r in rows],
                     [self.anchor[r] for r in rows], [self.history_items[r] for r in rows],
                     [self.history_weights[r] for r in rows], [self.rules[r] for r in rows],
                     self.fetch, self.n_items, self.exclude_owned)  # fmt: skip

    def history_set(self, row: int) -> np.ndarray:
        """The items of row ``row``'s history with a nonzero weight (a graph's
        ``history_items``), ascending."""
        return self.history_items[row][self.history_weights[row] != 0]

    @cached_property
    def history_rows(self) -> list[np.ndarray]:
        """Per row, the dense float32 [n_items] re-buy row."""
        out = []
        for items, weights in zip(self.history_items, self.history_weights, strict=True):
            row = np.zeros(self.n_items, dtype=np.float32)
            row[items] = weights
            out.append(row)
        return out

    @cached_property
    def history(self) -> np.ndarray:
        """float32 [B, n_items]: ``history_rows`` stacked."""
        return np.stack(self.history_rows)

    @cached_property
    def exclude(self) -> np.ndarray:
        """bool [B, n_items]: True where a rule says no (the dense form of ``rules``)."""
        return np.stack([rules.mask() for rules in self.rules])


def best_allowed(
    order: np.ndarray,
    allowed: Any,
    skip: np.ndarray,
    need: int,
    step: int,
    limit: int | None = None,
) -> np.ndarray | None:
    """The first ``need`` items of ``order`` (a ranking of the catalog) that are not in
    ``skip`` (sorted positions) and that ``allowed(items)`` accepts, in that order; fewer if
    ``order`` runs out. Looks at a head of ``step`` items, then twice as many, and so on: the
    work is proportional to how deep the rules push the answer, not to the catalog. With
    ``limit``: None once more than ``limit`` items were looked at (the caller then falls
    back to a dense pass)."""
    found: list[np.ndarray] = []
    have, start = 0, 0
    while have < need and start < order.size:
        if limit is not None and start >= limit:
            return None
        chunk = np.asarray(order[start : start + step], dtype=np.int64)
        start += chunk.size
        step *= 2
        chunk = chunk[~in_sorted(chunk, skip)]
        chunk = chunk[allowed(chunk)]
        found.append(chunk[: need - have])
        have += found[-1].size
    return np.concatenate(found) if found else np.zeros(0, np.int64)


@dataclass
class Scored:
    """A scorer's answer: per row, candidates best first.

    ``scores``: float32 [B, m] (-inf: an empty or excluded slot); ``items``: int64 [B, m]
    item positions. ``reasons``: optional per slot (None: the Ranker's default reason).
    ``probabilities``: the scores are calibrated add probabilities (margin weighting then
    ranks by expected margin, see :func:`serving.rules.select`).
    """

    scores: np.ndarray
    items: np.ndarray
    reasons: list[list[str | None]] | None = None
    probabilities: bool = False


class Scorer(Protocol):
    """What a scorer implements. ``uses_cart``: whether its scores depend on the cart term
    (the default reason says "goes with the cart" only then)."""

    uses_cart: bool

    @classmethod
    def load(cls, artifact: Artifact, threads: int = 1) -> Scorer:
        """Prepare to score ``artifact`` (its verified files: ``artifact.extra``); raise
        :class:`ArtifactError` for any problem."""
        ...

    def score(self, batch: Batch) -> Scored:
        """Candidates for every row of ``batch``."""
        ...


def load_scorer(artifact: Artifact, threads: int = 1) -> Scorer:
    """The scorer the artifact's manifest names, loaded (:class:`ArtifactError` if unknown).
    A ``graph`` artifact of an item x item kind that ships its neighbour rows (manifest
    ``neighbours``) runs on :class:`serving.neighbour_scorer.NeighbourScorer`: the same
    answers, at a cost proportional to the request's candidates."""
    name = artifact.scorer
    if name == "graph" and artifact.manifest.get("neighbours"):
        name = "neighbours"  # an item x item graph that also ships its rows: candidate-wise
    if name not in SCORERS:
        raise ArtifactError(
            f"{artifact.path / 'manifest.json'}: field 'scorer': unknown scorer {name!r}; "
            f"this server knows {', '.join(sorted(SCORERS))}"
        )
    module, _, attr = SCORERS[name].partition(":")
    cls = getattr(importlib.import_module(module), attr)
    return cls.load(artifact, threads)


def onnx_session(artifact: Artifact, threads: int = 1, name: str = "model.onnx") -> object:
    """An onnxruntime session over the artifact's ONNX file ``name`` (its bytes were verified
    when the artifact loaded); any onnxruntime failure is an :class:`ArtifactError`."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    # 1 thread per request keeps latency flat when many requests run at once; a single
    # caller (a batch job, one user at a time) can give the graph more.
    options.intra_op_num_threads = threads
    graph = artifact.path / name
    try:
        return ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own types (InvalidProtobuf, Fail, ...)
        raise ArtifactError(f"{graph}: onnxruntime cannot load the graph: {exc}") from None


class GraphScorer:
    """One ONNX graph over the catalog (every kind of :mod:`training.onnx_graph`): inputs
    ``user``, ``cart``, ``history``, ``history_items``, ``exclude``, ``k`` (each only if the
    graph has it), outputs scores and items, best first."""

    def __init__(self, session: object, path: object) -> None:
        self.session = session
        self.inputs = {i.name for i in session.get_inputs()}
        missing = {"exclude", "k"} - self.inputs
        if missing or len(session.get_outputs()) != 2:
            raise ArtifactError(
                f"{path}: not an addons scoring graph (inputs {sorted(self.inputs)}, "
                f"{len(session.get_outputs())} outputs)"
            )
        self.uses_cart = "cart" in self.inputs

    @classmethod
    def load(cls, artifact: Artifact, threads: int = 1) -> GraphScorer:
        return cls(onnx_session(artifact, threads), artifact.path / "model.onnx")

    def score(self, batch: Batch) -> Scored:
        feeds: dict[str, np.ndarray] = {
            "user": batch.user,
            "cart": batch.cart,
            "exclude": batch.exclude,
            "k": np.array([batch.fetch], dtype=np.int64),
        }
        if "history" in self.inputs:
            feeds["history"] = batch.history
        if "history_items" in self.inputs:  # only item x item graphs need the indices
            owned = [batch.history_set(row) for row in range(len(batch))]
            feeds["history_items"] = np.full(
                (len(batch), max(max(o.size for o in owned), 1)), -1, np.int64
            )
            for row, o in enumerate(owned):
                feeds["history_items"][row, : o.size] = o
        # onnxruntime's run is thread-safe: concurrent requests share one session.
        scores, items = self.session.run(None, {n: v for n, v in feeds.items() if n in self.inputs})
        return Scored(scores, items)
