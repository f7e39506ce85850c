"""Serving scorer of the learned add-on ranker (``kind: ranker``, manifest ``"scorer": "ranker"``).

Per request: candidates from :func:`serving.ranker_features.query_candidates` and, for those
the rules allow, features from :func:`~serving.ranker_features.candidate_features` (the code
training ran, over the ``ranker_state.npz`` the artifact ships), the trees in
``model.onnx`` (onnxruntime; ``ai.onnx.ml`` TreeEnsemble + Platt calibration) give each
candidate a raw score and a calibrated add probability, the rules' exclusions drop what may
not be offered, and the rest is ordered by raw score (ties: the lower item index, as
training's ``top_k``). The returned score is the **probability** that the shopper adds the
item, so ``margin_weight`` ranks by expected margin (:func:`serving.rules.select`).

Short pools are filled after the candidates by the most popular allowed items (score 0: the
model gives them no probability), in the order training gives them (``FLOOR + popularity
share`` in float32, ties the lower index). A task whose carts the fit chose to rank by
popularity (the state's ``popularity_tasks``: popularity beat the trees on the fit's own
validation queries, e.g. cross-sell on MovieLens-like data) gets that fill alone. A request with an empty cart (no basket to
complete: the model never trained on one) is ranked as training ranks it, by the re-buy
signal (decayed purchase count + 1e-6 x popularity share); its scores are then not
probabilities, but they are >= 0, so margin weighting (score x (1 + w x margin share)) still
ranks them consistently.

Reasons per offer come from the features that drove it (:func:`serving.ranker_features.reasons`):
"you buy this every 2 weeks", "bought with 826249 in 31 % of baskets", "same aisle as 826249".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from serving.artifact import ArtifactError
from serving.ranker_features import (
    FEATURE_NAMES,
    RankerState,
    StateError,
    candidate_features,
    popularity_fill,
    query_candidates,
    reasons,
    rebuy_ranking,
)
from serving.scorers import Batch, Scored, best_allowed, onnx_session

if TYPE_CHECKING:
    from serving.artifact import Artifact

#: The extra artifact file holding the state.
STATE_FILE = "ranker_state.npz"
#: Training's re-buy tie-breaker (``training.models.baselines.TIE_BREAK``): the empty-cart
#: order depends on it.
TIE_BREAK = np.float32(1e-6)
#: Reasons are computed for this many consecutive slots at a time, on first access.
REASON_BLOCK = 8


class LearnedScorer:
    """Candidates + features (numpy) + trees (onnxruntime) for the learned ranker."""

    uses_cart = True

    def __init__(self, state: RankerState, session: Any, artifact: Artifact) -> None:
        self.state = state
        state._derived  # noqa: B018 -- its lookups built at load, not by the first request
        self.session = session
        self.items = artifact.items
        # training's float32 score of a non-candidate, and the catalog in that order
        self.fill_key, self.fill_order = popularity_fill(state.popularity)
        index = np.arange(state.n_items)
        # the catalog in empty-cart (tie-break) order, ties the lower index
        self.rebuy_key = TIE_BREAK * state.popularity
        self.rebuy_order = np.lexsort((index, -self.rebuy_key))

    @classmethod
    def load(cls, artifact: Artifact, threads: int = 1) -> LearnedScorer:
        """Read and check ``ranker_state.npz`` (or its ``.npy`` files, mapped) and
        ``model.onnx`` (any problem is an :class:`~serving.artifact.ArtifactError` naming the
        file)."""
        file = artifact.path / STATE_FILE
        # the .npz, or at a large shop its .npy files, memory-mapped (Artifact.arrays)
        arrays, files = artifact.arrays(STATE_FILE)
        try:
            state = RankerState.from_arrays(arrays)
        except (StateError, ValueError) as exc:
            # a StateError starts with the array's name: name the file it came from
            where = files.get(str(exc).split(":", 1)[0], file)
            raise ArtifactError(f"{where}: not a ranker state: {exc}") from None
        n_users, n_items = artifact.manifest["n_users"], artifact.manifest["n_items"]
        if (state.n_users, state.n_items) != (n_users, n_items):
            raise ArtifactError(
                f"{file}: {state.n_users} users x {state.n_items} items, the manifest says "
                f"{n_users} x {n_items}"
            )
        declared = (artifact.manifest.get("ranker") or {}).get("features")
        if declared != list(FEATURE_NAMES):
            raise ArtifactError(
                f"{artifact.path / 'manifest.json'}: field 'ranker.features' does not list the "
                f"{len(FEATURE_NAMES)} features this server computes (an artifact from another "
                "version of the ranker)"
            )
        session = onnx_session(artifact, threads)
        inputs = [(i.name, i.shape) for i in session.get_inputs()]
        outputs = {o.name for o in session.get_outputs()}
        if len(inputs) != 1 or inputs[0][0] != "features" or inputs[0][1][-1] != len(FEATURE_NAMES) \
                or not {"raw", "probability"} <= outputs:  # fmt: skip
            raise ArtifactError(
                f"{artifact.path / 'model.onnx'}: not a ranker tree ensemble (inputs {inputs}, "
                f"outputs {sorted(outputs)}; expected features [N, {len(FEATURE_NAMES)}] -> raw, "
                "probability)"
            )
        return cls(state, session, artifact)

    def predict(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw score and calibrated probability (float32) of each feature row."""
        if features.shape[0] == 0:
            empty = np.zeros(0, dtype=np.float32)
            return empty, empty
        raw, prob = self.session.run(["raw", "probability"], {"features": features})
        return raw.ravel(), prob.ravel()

    def score(self, batch: Batch) -> Scored:
        """Up to ``batch.fetch`` offers per row, best first (module docstring)."""
        st, n = self.state, len(batch)
        carts = [row[row >= 0] for row in np.asarray(batch.cart, dtype=np.int64)]
        filled = np.array([c.size > 0 for c in carts], dtype=bool)
        rows = np.flatnonzero(filled)
        popular_rows = np.zeros(0, dtype=np.int64)
        if st.ranks_by_popularity(batch.exclude_owned):  # the fit's choice for this task
            popular_rows, rows = rows, rows[:0]
        sizes = np.array([carts[r].size for r in rows], dtype=np.int64)
        q = query_candidates(
            st, np.asarray(batch.user, dtype=np.int64)[rows], np.r_[0, np.cumsum(sizes)],
            np.concatenate([carts[r] for r in rows]) if rows.size else np.zeros(0, np.int64),
            batch.exclude_owned,
        )  # fmt: skip
        # Only the candidates every rule allows get features and reach the trees (with the
        # default cross-sell rules a large share of the pool, e.g. the cart's own
        # sub-categories, is excluded): a row's features and score depend on its (query,
        # candidate) alone, so this changes no kept value.
        offerable = np.zeros(q.items.size, dtype=bool)
        for j, r in enumerate(rows.tolist()):  # the rules per candidate: O(pool), not O(catalog)
            lo, hi = int(q.indptr[j]), int(q.indptr[j + 1])
            offerable[lo:hi] = batch.rules[r].allowed(q.items[lo:hi])
        kept = np.flatnonzero(offerable)
        raw = np.full(q.items.size, -np.inf, dtype=np.float32)
        prob = np.zeros(q.items.size, dtype=np.float32)
        features = candidate_features(st, q, kept)
        raw[kept], prob[kept] = self.predict(features)
        feature_row = np.full(q.items.size, -1, dtype=np.int64)
        feature_row[kept] = np.arange(kept.size)
        fetch = batch.fetch
        scores = np.full((n, fetch), -np.inf, dtype=np.float32)
        items = np.full((n, fetch), -1, dtype=np.int64)
        why: list[Any] = [[None] * fetch for _ in range(n)]
        for j, r in enumerate(rows.tolist()):
            lo, hi = int(q.indptr[j]), int(q.indptr[j + 1])
            cand = q.items[lo:hi]
            ok = offerable[lo:hi]
            cand, pos = cand[ok], np.arange(lo, hi)[ok]
            order = np.lexsort((cand, -raw[pos]))[:fetch]
            m = order.size
            items[r, :m], scores[r, :m] = cand[order], prob[pos[order]]
            why[r] = _LazyReasons(self, features[feature_row[pos[order]]], cand[order], carts[r],
                                  fetch)  # fmt: skip
            if m < fetch:  # a short pool: the most popular allowed items, as training fills
                extra = best_allowed(self.fill_order, batch.rules[r].allowed,
                                     np.unique(q.items[lo:hi]), fetch - m, 4 * fetch)  # fmt: skip
                items[r, m : m + extra.size], scores[r, m : m + extra.size] = extra, 0.0
                for s in range(m, m + extra.size):
                    why[r][s] = "popular"
        for r in popular_rows.tolist():  # the most popular allowed items, as training ranks them
            best = best_allowed(self.fill_order, batch.rules[r].allowed, np.zeros(0, np.int64),
                                fetch, 4 * fetch)  # fmt: skip
            items[r, : best.size], scores[r, : best.size] = best, 0.0
            why[r][: best.size] = ["popular"] * best.size
        for r in np.flatnonzero(~filled).tolist():
            # the re-buy items (their key: tie-break + decayed count) and the best others by
            # the tie-break alone, walked in its order until the rules leave enough
            best, key, rebought = rebuy_ranking(st, int(batch.user[r]), batch.rules[r].allowed,
                                                fetch, self.rebuy_key, self.rebuy_order)  # fmt: skip
            items[r, : best.size], scores[r, : best.size] = best, key
            why[r][: best.size] = ["bought before" if b else "popular" for b in rebought.tolist()]
        # Always "probabilities": margin weighting ranks by score x (1 + w x margin share),
        # which only needs scores >= 0 on one scale per row (re-buy rows qualify), and so
        # a row ranks the same alone or batched with rows of the other kind.
        return Scored(scores, items, why, probabilities=True)

    def reasons(self, features: np.ndarray, items: np.ndarray, cart: np.ndarray) -> list[str]:
        """The reason texts of these candidates (feature rows, item indices) for ``cart``."""
        return self._reasons(features, items, cart)

    def _reasons(self, features: np.ndarray, items: np.ndarray, cart: np.ndarray) -> list[str]:
        out = []
        for text, cart_item in reasons(self.state, features, items, cart):
            if cart_item is not None:
                text = text.replace("{cart}", str(self.items.external(np.array([cart_item]))[0]))
            out.append(text)
        return out


class _LazyReasons(Sequence):
    """One row's reasons, computed on first access in blocks of :data:`REASON_BLOCK` slots.

    A row holds ``k x OVERFETCH`` candidates so that the rules' selection still fills k, but
    the selection reads the reasons of the slots it offers only (about k, mostly the first
    ones): computing all of them cost more than the ordering of the pool
    (benchmarks/bench_serving.py, ``breakdown``). Slots past the model's candidates hold what
    :meth:`__setitem__` put there (the popular fill).
    """

    def __init__(self, scorer: LearnedScorer, features: np.ndarray, items: np.ndarray,
                 cart: np.ndarray, fetch: int) -> None:  # fmt: skip
        self._scorer, self._features, self._items, self._cart = scorer, features, items, cart
        self._texts: list[str | None] = [None] * fetch
        self._done = np.zeros(items.size, dtype=bool)

    def __len__(self) -> int:
        return len(self._texts)

    def __setitem__(self, slot: int, text: str) -> None:
        self._texts[slot] = text

    def __getitem__(self, slot: Any) -> Any:
        if isinstance(slot, slice):
            return [self[i] for i in range(*slot.indices(len(self)))]
        slot = range(len(self))[slot]  # negative slots, and IndexError past the end
        if slot < self._items.size and not self._done[slot]:
            block = slot - slot % REASON_BLOCK
            self.prefetch(range(block, min(block + REASON_BLOCK, self._items.size)))
        return self._texts[slot]

    def prefetch(self, slots: Sequence[int]) -> None:
        """Compute the reasons of these slots (those not computed yet) in one call: what the
        rules selected, so exactly the offers' reasons are built."""
        todo = [s for s in slots if s < self._items.size and not self._done[s]]
        if todo:
            texts = self._scorer.reasons(self._features[todo], self._items[todo], self._cart)
            for s, text in zip(todo, texts, strict=True):
                self._texts[s] = text
            self._done[todo] = True
