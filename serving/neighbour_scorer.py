"""Candidate-wise scoring of item x item artifacts (co-occurrence, item-KNN, ...): the work of
a request is proportional to its candidates, not to the catalog.

The scoring graph of such a kind (``training.onnx_graph.Graph.neighbour_scores``) computes,
for every item ``j``, ``base_j + sum over sources (input, w) of w * sum_{i in input} M[i, j]``
(``base``: the popularity tie-break; the sources: the cart term and, for some kinds, the
history's items), then the top ``fetch`` items the rules allow. An item that no source row
reaches scores ``base_j``. So the same answer comes from:

1. the candidates the sources reach: the rows of ``M`` of the cart / anchor (and history)
   items, summed in the graph's order (float32, one addition at a time, as ScatterElements
   adds), kept where the request's rules allow (:meth:`serving.rules.Offerable.allowed`);
2. the best other items by ``base`` alone: a head of the catalog in ``base`` order (ties:
   the lower index, as TopK), walked until ``fetch`` allowed items are found
   (:func:`serving.scorers.best_allowed`);
3. the top ``fetch`` of the union (ties: the lower index).

When the rules leave fewer than ``fetch`` items in a head of :data:`HEAD_LIMIT` x the catalog
(an up-sell window with a handful of items, say), the row runs through the dense ONNX graph
instead: the answer is the same in every case. ``M`` ships as CSR ``.npy`` files (int64
``indptr``, int32 ``indices``, float32 ``data``; float32 ``base``), listed and hashed in the
manifest's ``neighbours`` field and memory-mapped (only the rows a request touches are read).
An artifact without them (written before this scorer) runs on :class:`GraphScorer`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from serving.artifact import NEIGHBOUR_ARRAYS, ArtifactError
from serving.scorers import Batch, GraphScorer, Scored, best_allowed
from serving.sorted_arrays import csr_entries

if TYPE_CHECKING:
    from serving.artifact import Artifact

#: A row whose rules refuse everything in this share of the catalog (in base order) goes
#: through the dense graph.
HEAD_LIMIT = 0.125
#: The first head a row looks at: this many times ``fetch``, at least ``MIN_HEAD`` items.
FIRST_HEAD = 4
MIN_HEAD = 64


def _load_array(artifact: Artifact, key: str, dtype: str) -> np.ndarray:
    """The manifest's ``neighbours[key]`` array, memory-mapped when the artifact loaded (from
    the file it hashed, :func:`serving.artifact.map_npy_file`), checked: a 1-d array of the
    ``dtype`` kind, else an :class:`ArtifactError` naming the file."""
    name = artifact.manifest["neighbours"][key]
    file, array = artifact.path / name, artifact.mapped[name]
    if array.ndim != 1 or array.dtype.kind != dtype:
        raise ArtifactError(
            f"{file}: expected a 1-d array of {'integers' if dtype == 'i' else 'floats'}, "
            f"got {array.dtype} with shape {array.shape}"
        )
    return array


class NeighbourScorer(GraphScorer):
    """Scores an item x item artifact on its candidates only (module docstring); the ONNX
    graph stays loaded for the rows the rules leave short."""

    def __init__(self, session: object, path: object, artifact: Artifact) -> None:
        super().__init__(session, path)
        if not artifact.manifest.get("neighbours"):
            raise ArtifactError(
                f"{artifact.path / 'manifest.json'}: field 'neighbours' is missing: this scorer "
                "needs the neighbour rows"
            )
        n = int(artifact.manifest["n_items"])
        arrays = {key: _load_array(artifact, key, kind) for key, kind in
                  zip(NEIGHBOUR_ARRAYS, ("i", "i", "f", "f"), strict=True)}  # fmt: skip
        indptr, indices, data, base = (arrays[key] for key in NEIGHBOUR_ARRAYS)
        files = {key: artifact.path / artifact.manifest["neighbours"][key] for key in arrays}
        if base.shape != (n,) or indptr.shape != (n + 1,):
            raise ArtifactError(
                f"{files['indptr']}: {indptr.size} pointers and {base.size} base scores, "
                f"expected n_items + 1 = {n + 1} and n_items = {n} (manifest n_items)"
            )
        if indptr[0] != 0 or np.any(np.diff(indptr) < 0) or indptr[-1] != indices.size \
                or data.size != indices.size:  # fmt: skip
            raise ArtifactError(
                f"{files['indptr']}: must start at 0, never decrease and end at the "
                f"{indices.size} indices ({data.size} data values)"
            )
        if indices.size and (int(indices.min()) < 0 or int(indices.max()) >= n):
            raise ArtifactError(f"{files['indices']}: must lie in [0, {n}) (manifest n_items)")
        if not (np.isfinite(data).all() and np.isfinite(base).all()):
            raise ArtifactError(f"{files['data']}: holds NaN or infinite values")
        self.indptr, self.indices = indptr, indices
        self.data = np.asarray(data, dtype=np.float32)
        self.base = np.asarray(base, dtype=np.float32)
        self.sources = [(str(name), np.float32(w)) for name, w in
                        artifact.manifest["neighbours"]["sources"] if w]  # fmt: skip
        missing = {name for name, _ in self.sources} - self.inputs
        if missing:
            raise ArtifactError(
                f"{artifact.path / 'manifest.json'}: field 'neighbours': sources {sorted(missing)} "
                "are not inputs of model.onnx"
            )
        # the catalog in the graph's TopK order of base scores: higher first, ties lower index
        self.order = np.lexsort((np.arange(n), -self.base))
        self.limit = max(int(n * HEAD_LIMIT), 1)
        self.dense_rows = 0  # rows sent to the dense graph (tests, benchmarks)

    @classmethod
    def load(cls, artifact: Artifact, threads: int = 1) -> NeighbourScorer:
        from serving.scorers import onnx_session

        return cls(onnx_session(artifact, threads), artifact.path / "model.onnx", artifact)

    def _reached(self, batch: Batch, row: int) -> tuple[np.ndarray, np.ndarray]:
        """(candidates, ascending; their scores) of the items the row's sources reach."""
        targets, updates = [], []
        for name, weight in self.sources:
            if name == "cart":
                given = batch.cart[row]
                given = given[given >= 0]
            else:
                given = batch.history_set(row)
            _, pos = csr_entries(self.indptr, given)  # the given rows' entries, row after row
            if not pos.size:
                continue
            w = self.data[pos]
            targets.append(np.asarray(self.indices[pos], dtype=np.int64))
            updates.append(w if weight == 1 else w * weight)
        if not targets:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        target = np.concatenate(targets)
        cand, where = np.unique(target, return_inverse=True)
        values = self.base[cand].copy()
        np.add.at(values, where, np.concatenate(updates))  # in order, as the graph adds
        return cand, values

    def score(self, batch: Batch) -> Scored:
        fetch = batch.fetch
        scores = np.full((len(batch), fetch), -np.inf, dtype=np.float32)
        items = np.zeros((len(batch), fetch), dtype=np.int64)
        dense: list[int] = []
        for row in range(len(batch)):
            rules = batch.rules[row]
            cand, values = self._reached(batch, row)
            ok = rules.allowed(cand)
            head = best_allowed(self.order, rules.allowed, cand, fetch,
                                max(FIRST_HEAD * fetch, MIN_HEAD), self.limit)  # fmt: skip
            if head is None:
                dense.append(row)
                continue
            pool = np.concatenate([cand[ok], head])
            key = np.concatenate([values[ok], self.base[head]])
            best = np.lexsort((pool, -key))[:fetch]
            items[row, : best.size], scores[row, : best.size] = pool[best], key[best]
        if dense:
            self.dense_rows += len(dense)
            answer = super().score(batch.rows(dense))
            scores[dense], items[dense] = answer.scores, answer.items
        return Scored(scores, items)
