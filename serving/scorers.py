"""Scorers: the code that turns a prepared request batch into ranked candidates.

An artifact names its scorer in the manifest (``"scorer"``; absent means ``graph``).
:class:`serving.ranker.Ranker` validates requests, looks ids up, builds the rules' exclusion
mask (:func:`serving.rules.exclusion_mask`), hands a :class:`Batch` to the scorer and applies
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
from typing import TYPE_CHECKING, Protocol

import numpy as np

from serving.artifact import ArtifactError

if TYPE_CHECKING:
    from serving.artifact import Artifact

#: Scorer name (manifest ``"scorer"``) -> ``"module:Class"``.
SCORERS: dict[str, str] = {
    "graph": "serving.scorers:GraphScorer",
    "ranker": "serving.ranker_scorer:LearnedScorer",
}


@dataclass
class Batch:
    """One prepared batch of B requests (item positions as in the artifact).

    ``user``: int64 [B], -1 for an unknown or anonymous shopper. ``cart``: int64 [B, C], the
    cart and the anchor (the model's cart term), padded with -1. ``basket``: per row, the cart
    alone; ``anchor``: per row, the anchor or None. ``history_rows``: per row, the float32
    re-buy row (snapshot or the request's fresher history); ``history`` stacks them into
    [B, n_items] on first use (a graph without a history input never pays for the copy).
    ``exclude``: bool [B, n_items],
    True where every rule says no (the scorer must not return those items, or return them
    with score -inf). ``fetch``: how many candidates per row to return (k x overfetch, so the
    rules applied afterwards still fill k). ``exclude_owned``: the rules' setting (a task
    feature for the learned ranker).
    """

    user: np.ndarray
    cart: np.ndarray
    basket: list[np.ndarray]
    anchor: list[int | None]
    history_rows: list[np.ndarray]
    exclude: np.ndarray
    fetch: int
    exclude_owned: bool = False

    def __len__(self) -> int:
        return len(self.user)

    @cached_property
    def history(self) -> np.ndarray:
        """float32 [B, n_items]: ``history_rows`` stacked."""
        return np.stack(self.history_rows)


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
    """The scorer the artifact's manifest names, loaded (:class:`ArtifactError` if unknown)."""
    name = artifact.scorer
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
            owned = [np.flatnonzero(row) for row in batch.history_rows]
            feeds["history_items"] = np.full(
                (len(batch), max(max(o.size for o in owned), 1)), -1, np.int64
            )
            for row, o in enumerate(owned):
                feeds["history_items"][row, : o.size] = o
        # onnxruntime's run is thread-safe: concurrent requests share one session.
        scores, items = self.session.run(None, {n: v for n, v in feeds.items() if n in self.inputs})
        return Scored(scores, items)
