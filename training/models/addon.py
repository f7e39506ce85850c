"""The add-on scorer: re-buy + bought-together + collaborative filtering, blended.

On grocery data "re-buy what you bought before" wins when owned items may be offered and
"bought together with the cart" wins for items new to the household; a CF model alone loses to
both. This model blends the three signals:

``score(u, cart, j) = w_r * R(u, j) + w_c * C(cart, j) + w_f * F(u, cart, j)``

- ``R``: recency-decayed repeat-purchase score (:class:`PersonalPopularityRecommender`);
- ``C``: cart co-occurrence confidence, popularity-damped (:class:`CooccurrenceRecommender`);
- ``F``: ALS with the cart folded in (:class:`ALSRecommender`);

each min-max scaled to [0, 1] within the query's row, so the weights are comparable.

Weights not given are tuned on a validation window carved from the *end of the training
data* (never the test window): components are fitted on the data before the window, every
weight combination on a grid over the simplex is scored by NDCG@k on the window's basket
completion tasks (owned items allowed and "new to user", averaged), together with the
co-occurrence damping (``DAMPING_GRID``); the best is kept, and the components are refitted
on all the training data.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import numpy as np
import polars as pl
import scipy.sparse as sp

from features.dataset import Dataset
from features.splits import basket_completion_task
from training.evaluation.metrics import NDCG, build_context
from training.models.base import CandidateFilter, ParamError, RecommenderBase, top_k
from training.models.baselines import CooccurrenceRecommender, PersonalPopularityRecommender
from training.models.implicit_models import ALSRecommender

if TYPE_CHECKING:
    from training.onnx_graph import Graph

#: Co-occurrence damping values tried when tuning.
DAMPING_GRID = (0.0, 0.1, 0.2, 0.3)


def _minmax_rows(s: np.ndarray) -> np.ndarray:
    """Scale each row to [0, 1]; constant rows become 0."""
    lo = s.min(axis=1, keepdims=True)
    span = s.max(axis=1, keepdims=True) - lo
    return np.divide(s - lo, span, out=np.zeros_like(s), where=span > 0)


@dataclass
class AddonScorer(RecommenderBase):
    """Blend of re-buy, bought-together and ALS scores (see the module docstring).

    Parameters
    ----------
    rebuy_weight, cooccurrence_weight, cf_weight : float, optional
        Fixed weights; if any is None, all three are tuned on the validation window.
    cooccurrence_damping : float, optional
        Popularity damping of the co-occurrence component (see
        :class:`CooccurrenceRecommender`); None = tuned on the validation window over
        ``DAMPING_GRID`` together with the weights.
    rebuy_half_life_days : float, optional
        Recency decay of the re-buy score.
    neighbours : int
        Co-occurrence rules kept per item.
    cf_factors, cf_iterations, cf_cart_weight : ALS size, sweeps, cart folding weight.
    validation_days : int
        Length of the tuning window at the end of the training data.
    grid_step : float
        Weight grid resolution on the simplex (0.25 gives 15 combinations).
    tuning_queries : int
        Validation baskets sampled per task for tuning.
    tuning_k : int
        NDCG cut-off optimised.
    seed : int
        Seed for the validation task and the sample.
    """

    rebuy_weight: float | None = None
    cooccurrence_weight: float | None = None
    cf_weight: float | None = None
    cooccurrence_damping: float | None = None
    rebuy_half_life_days: float | None = 90.0
    neighbours: int = 200
    cf_factors: int = 64
    cf_iterations: int = 15
    cf_cart_weight: float = 1.0
    validation_days: int = 28
    grid_step: float = 0.25
    tuning_queries: int = 2000
    tuning_k: int = 10
    seed: int = 42
    kind = "addon"
    exportable = True

    def __post_init__(self) -> None:
        for name in ("rebuy_weight", "cooccurrence_weight", "cf_weight"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ParamError(name, f"must be >= 0 or null (tuned), got {value}")
        if not 0 < self.grid_step <= 1:
            raise ParamError("grid_step", f"must be in (0, 1], got {self.grid_step}")
        if self.validation_days < 1:
            raise ParamError("validation_days", f"must be >= 1, got {self.validation_days}")

    def _components(self, damping: float = 0.0) -> list[RecommenderBase]:
        return [
            PersonalPopularityRecommender(half_life_days=self.rebuy_half_life_days),
            CooccurrenceRecommender(neighbours=self.neighbours, damping=damping),
            ALSRecommender(
                factors=self.cf_factors, iterations=self.cf_iterations,
                cart_weight=self.cf_cart_weight, random_state=self.seed,
            ),
        ]  # fmt: skip

    def _fit(self, data: Dataset) -> None:
        fixed = (self.rebuy_weight, self.cooccurrence_weight, self.cf_weight)
        if any(w is None for w in fixed) or self.cooccurrence_damping is None:
            self.weights_, self.damping_, self.tuning_ = self._tune(data)
        else:
            self.weights_ = np.asarray(fixed, dtype=np.float32)
            self.damping_ = float(self.cooccurrence_damping)
            self.tuning_ = []
        # A component with weight 0 is not fitted nor scored: it cannot change the ranking.
        self.components_ = [
            m.fit(data) if w > 0 else None
            for m, w in zip(self._components(self.damping_), self.weights_, strict=True)
        ]

    def _component_scores(self, users: np.ndarray, carts: sp.csr_matrix) -> list[np.ndarray]:
        return [
            _minmax_rows(m.score(users, carts))
            if m is not None
            else np.zeros((len(users), self.n_items_), np.float32)
            for m in self.components_
        ]

    def score(self, users: np.ndarray, carts: sp.csr_matrix) -> np.ndarray:
        out = np.zeros((len(users), self.n_items_), dtype=np.float32)
        for w, m in zip(self.weights_, self.components_, strict=True):
            if m is not None:
                out += w * _minmax_rows(m.score(users, carts))
        return out

    def graph_scores(self, g: Graph) -> str:
        """The weighted sum of the components' min-max scaled graphs."""
        from training.onnx_graph import ExportError

        total = None
        for weight, component in zip(self.weights_, self.components_, strict=True):
            if component is None or weight == 0:
                continue
            part = g.op("Mul", [g.minmax(component.graph_scores(g)),
                                g.const("wt", np.array(weight, np.float32))])  # fmt: skip
            total = part if total is None else g.op("Add", [total, part])
        if total is None:
            raise ExportError("the add-on scorer has no component with a positive weight")
        return total

    def export_history(self) -> sp.csr_matrix:
        """The re-buy component's scores (what the graph's ``history`` input is fed)."""
        rebuy = next((c for c in self.components_
                      if c is not None and c.kind == "personal_popularity"), None)  # fmt: skip
        return super().export_history() if rebuy is None else rebuy.export_history()

    # -- tuning ---------------------------------------------------------------------------
    def _tune(self, data: Dataset) -> tuple[np.ndarray, float, list[dict[str, float]]]:
        ts = data.interactions["timestamp"]
        cut = ts.max() - timedelta(days=self.validation_days)
        before = data.restrict(pl.col("timestamp") < cut)
        window = data.restrict(pl.col("timestamp") >= cut)
        if before.interactions.height == 0 or window.interactions.height == 0:
            raise ParamError("validation_days", "leaves an empty fitting part or validation window")
        fitted = AddonScorer(**{**self.get_params(), "rebuy_weight": 1.0, "cooccurrence_weight": 1.0,
                                "cf_weight": 1.0, "cooccurrence_damping": 0.0})  # fmt: skip
        fitted.fit(before)
        cooc = fitted.components_[1]
        plain = cooc.confidence_  # each damping shares its indices: one matrix, not three
        rng = np.random.default_rng(self.seed)
        tasks = []
        for new in (False, True):
            task = basket_completion_task(before, window, seed=self.seed, new_to_user=new)
            if task.n_queries:
                pick = np.sort(
                    rng.choice(
                        task.n_queries, min(task.n_queries, self.tuning_queries), replace=False
                    )
                )
                tasks.append((task.users[pick], task.carts[pick], task.relevant[pick], new))
        dampings = (
            DAMPING_GRID
            if self.cooccurrence_damping is None
            else (float(self.cooccurrence_damping),)
        )
        fixed = (self.rebuy_weight, self.cooccurrence_weight, self.cf_weight)
        grid = (
            _simplex_grid(self.grid_step)
            if any(w is None for w in fixed)
            else np.asarray([fixed], dtype=np.float64)
        )
        results = []
        for damping in dampings:
            # Tuning approximation: rescale the fitted rules instead of refitting per damping.
            damped = plain.data / np.maximum(cooc.item_baskets_[plain.indices], 1.0) ** damping
            cooc.confidence_ = sp.csr_matrix((damped, plain.indices, plain.indptr), plain.shape)
            pools = [fitted._candidate_pool(*t) for t in tasks]
            for w in grid:
                values = []
                for cand, comp, relevant in pools:
                    combined = np.einsum("qnc,c->qn", comp, w)
                    order, _ = top_k(np.where(cand >= 0, combined, -np.inf), self.tuning_k)
                    rec = np.where(
                        order >= 0, np.take_along_axis(cand, np.maximum(order, 0), axis=1), -1
                    )
                    values.append(
                        NDCG(self.tuning_k).per_query(build_context(rec, relevant)).mean()
                    )
                results.append({"rebuy": float(w[0]), "cooccurrence": float(w[1]), "cf": float(w[2]),
                                "damping": float(damping), f"ndcg@{self.tuning_k}": float(np.mean(values))})  # fmt: skip
        best = max(results, key=lambda r: r[f"ndcg@{self.tuning_k}"])
        weights = np.asarray([best["rebuy"], best["cooccurrence"], best["cf"]], dtype=np.float32)
        return weights, best["damping"], results

    def _candidate_pool(
        self,
        users: np.ndarray,
        carts: sp.csr_matrix,
        relevant: sp.csr_matrix,
        exclude_owned: bool,
        per_component: int = 100,
    ) -> tuple[np.ndarray, np.ndarray, sp.csr_matrix]:
        """Each component's top items (after filters) and all components' scores on them.

        Weight tuning ranks within this pool (an approximation: an item outside every
        component's top ``per_component`` is assumed not to reach the blend's top k).
        """
        flt = CandidateFilter(exclude_cart=True, exclude_owned=exclude_owned)
        cands, comps = [], []
        for start in range(0, len(users), 256):
            u, c = users[start : start + 256], carts[start : start + 256]
            parts = self._component_scores(u, c)
            tops = []
            for p in parts:
                masked = p.copy()
                self.mask_per_query(masked, u, c, flt)
                tops.append(top_k(masked, per_component)[0])
            pool = np.concatenate(tops, axis=1)
            pool = np.sort(pool, axis=1)
            dup = np.zeros_like(pool, dtype=bool)
            dup[:, 1:] = pool[:, 1:] == pool[:, :-1]
            pool[dup] = -1
            safe = np.maximum(pool, 0)
            comps.append(np.stack([np.take_along_axis(p, safe, axis=1) for p in parts], axis=2))
            cands.append(pool)
        return np.concatenate(cands), np.concatenate(comps), relevant


def _simplex_grid(step: float) -> np.ndarray:
    n = round(1 / step)
    points = [(a, b, n - a - b) for a, b in itertools.product(range(n + 1), repeat=2) if a + b <= n]
    return np.asarray(points, dtype=np.float64) / n
