"""EASE (Steck 2019): a closed-form item-item model, a strong linear reference.

``B = I - P / diag(P)`` with ``P = (X^T X + lambda I)^-1`` over the ``max_items`` most popular
items (a dense inverse: memory and time grow with the square and cube of that number), then
each row cut to its ``neighbours`` largest-magnitude weights (sparse EASE).
``score(u, cart, j) = (history_weight * h_u + cart_weight * c) . B[:, j]``; items outside the
modelled set get only the popularity tie-breaker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from features.dataset import Dataset
from training.models.base import ParamError, RecommenderBase, history_and_cart
from training.models.baselines import TIE_BREAK, _popularity_share
from training.onnx_graph import tie_break

if TYPE_CHECKING:
    from training.onnx_graph import Graph


@dataclass
class EASERecommender(RecommenderBase):
    """EASE over the most popular items.

    Parameters
    ----------
    l2 : float
        lambda, the L2 weight on the diagonal.
    max_items : int
        Items modelled (most bought first).
    neighbours : int
        Largest-magnitude weights kept per item row (sparse EASE: what an export ships);
        0 keeps all.
    history_weight, cart_weight : float
        Weights of the user's (binary) history and of the cart in the query row.
    """

    l2: float = 200.0
    max_items: int = 5000
    neighbours: int = 200
    history_weight: float = 1.0
    cart_weight: float = 1.0
    kind = "ease"
    exportable = True

    def __post_init__(self) -> None:
        if self.l2 <= 0:
            raise ParamError("l2", f"must be > 0, got {self.l2}")
        if self.max_items < 2:
            raise ParamError("max_items", f"must be >= 2, got {self.max_items}")
        if self.neighbours < 0:
            raise ParamError("neighbours", f"must be >= 0 (0 keeps all), got {self.neighbours}")

    def _fit(self, data: Dataset) -> None:
        pop = data.item_popularity()
        n = min(self.max_items, int((pop > 0).sum()))
        items = np.sort(np.argsort(-pop, kind="stable")[:n])
        X = self.owned_[:, items].astype(np.float64)
        gram = (X.T @ X).toarray()
        gram[np.diag_indices(n)] += self.l2
        with threadpool_limits(limits=None):
            P = np.linalg.inv(gram)
        B = -P / np.diag(P)[None, :]
        B[np.diag_indices(n)] = 0.0
        if self.neighbours and self.neighbours < n:
            # keep each row's largest |weights|; the rest are near zero
            cut = np.argpartition(-np.abs(B), self.neighbours - 1, axis=1)[:, self.neighbours :]
            np.put_along_axis(B, cut, 0.0, axis=1)
        local = sp.csr_matrix(B.astype(np.float32))
        # Full-catalog item x item matrix (rows / columns of unmodelled items are empty).
        full = sp.csr_matrix(
            (local.data, (items[local.tocoo().row], items[local.tocoo().col])),
            shape=(data.n_items, data.n_items),
        )
        full.sort_indices()
        self.weights_ = full
        self.popularity_ = _popularity_share(data, "users")

    def score(self, users: np.ndarray, carts: sp.csr_matrix) -> np.ndarray:
        query = history_and_cart(self.owned_, users, carts, self.history_weight, self.cart_weight)
        out = np.broadcast_to(TIE_BREAK * self.popularity_, (len(users), self.n_items_)).copy()
        out += (query @ self.weights_).toarray()
        return out

    def graph_scores(self, g: Graph) -> str:
        return g.item_item_scores(self.weights_, tie_break(self), self.history_weight,
                                  self.cart_weight)  # fmt: skip
