"""Honest baselines: a model earns its place by beating these on the same protocol.

- :class:`PopularityRecommender`: the same best-sellers for everyone.
- :class:`PersonalPopularityRecommender`: "re-buy what you bought before", optionally with
  recency decay.
- :class:`CooccurrenceRecommender`: "bought together" with the cart items (association-rule
  confidence).

Each breaks its own ties (and fills what it cannot score) with a tiny multiple of global
popularity, so every list is full and deterministic.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import polars as pl
import scipy.sparse as sp

from features.dataset import Dataset
from training.models.base import ParamError, RecommenderBase
from training.onnx_graph import tie_break

if TYPE_CHECKING:
    from training.onnx_graph import Graph

#: Weight of the popularity tie-breaker; small enough never to reorder real scores
#: (personal and co-occurrence scores are multiples of 1 / counts, far above 1e-6).
TIE_BREAK = 1e-6

PopularityMeasure = Literal["users", "baskets", "quantity"]
_MEASURES = ("users", "baskets", "quantity")


def _check_measure(param: str, value: str) -> None:
    if value not in _MEASURES:
        raise ParamError(param, f"expected one of {', '.join(_MEASURES)}, got {value!r}")


def _popularity_share(data: Dataset, measure: str) -> np.ndarray:
    """Popularity of each item scaled to [0, 1]."""
    if measure == "users":
        pop = data.item_popularity().astype(np.float64)
    elif measure == "baskets":
        pop = np.asarray(data.basket_item_matrix().matrix.sum(axis=0)).ravel().astype(np.float64)
    elif measure == "quantity":
        df = data.interactions.group_by("item_idx").agg(pl.col("quantity").sum())
        pop = np.zeros(data.n_items)
        pop[df["item_idx"].to_numpy()] = df["quantity"].to_numpy()
    else:
        raise ValueError(
            f"unknown popularity measure {measure!r}: expected users, baskets or quantity"
        )
    top = pop.max() if pop.size else 0.0
    return (pop / top if top > 0 else pop).astype(np.float32)


@dataclass
class PopularityRecommender(RecommenderBase):
    """Global popularity.

    Parameters
    ----------
    measure : {"users", "baskets", "quantity"}
        Distinct buyers, baskets holding the item, or units sold, in train.
    """

    measure: PopularityMeasure = "users"
    kind = "popularity"
    exportable = True

    def __post_init__(self) -> None:
        _check_measure("measure", self.measure)

    def _fit(self, data: Dataset) -> None:
        self.popularity_ = _popularity_share(data, self.measure)

    def score(self, users: np.ndarray, carts: sp.csr_matrix) -> np.ndarray:
        return np.broadcast_to(self.popularity_, (len(users), self.n_items_)).copy()

    def graph_scores(self, g: Graph) -> str:
        return g.full_rows(self.popularity_)


@dataclass
class PersonalPopularityRecommender(RecommenderBase):
    """Repeat purchase: how often the user bought the item (basket lines holding it).

    ``score(u, i) = sum over u's train lines of item i of 0.5 ** (age / half_life_days)``
    where ``age_b`` is the time from basket ``b`` to the end of train, in days. Without a
    half-life every basket counts 1 (plain counts). Unknown or anonymous users get global
    popularity (the tie-breaker) only.

    Parameters
    ----------
    half_life_days : float, optional
        Recency decay; ``None`` = no decay.
    fallback : {"users", "baskets", "quantity"}
        Popularity measure used to break ties and to fill lists.
    """

    half_life_days: float | None = None
    fallback: PopularityMeasure = "users"
    kind = "personal_popularity"
    exportable = True

    def __post_init__(self) -> None:
        _check_measure("fallback", self.fallback)
        if self.half_life_days is not None and not self.half_life_days > 0:
            raise ParamError("half_life_days", f"must be > 0 or null, got {self.half_life_days}")

    def _fit(self, data: Dataset) -> None:
        df = data.interactions.select("user_idx", "item_idx", "timestamp")
        weights = np.ones(df.height, dtype=np.float64)
        if self.half_life_days is not None:
            ts = df["timestamp"].to_numpy().astype("datetime64[us]").astype(np.int64)
            age_days = (ts.max() - ts) / 86_400e6
            weights = 0.5 ** (age_days / self.half_life_days)
        m = sp.csr_matrix(
            (weights, (df["user_idx"].to_numpy(), df["item_idx"].to_numpy())),
            shape=(data.n_users, data.n_items),
        )
        m.sum_duplicates()
        self.user_scores_ = m.astype(np.float32)
        self.popularity_ = _popularity_share(data, self.fallback)

    def score(self, users: np.ndarray, carts: sp.csr_matrix) -> np.ndarray:
        out = np.broadcast_to(self.popularity_ * TIE_BREAK, (len(users), self.n_items_)).copy()
        known = np.flatnonzero(users >= 0)
        if known.size:
            out[known] += self.user_scores_[users[known]].toarray()
        return out

    def graph_scores(self, g: Graph) -> str:
        """The request's history row (the snapshot's ``user_scores_`` or fresher history)
        plus the tie-break."""
        return g.op("Add", [g.use("history"), g.const("tie", tie_break(self).astype(np.float32))])


@dataclass
class CooccurrenceRecommender(RecommenderBase):
    """Bought together: association-rule confidence from the cart items.

    ``conf(i -> j) = baskets holding i and j / baskets holding i`` over train baskets, and
    ``score(cart, j) = sum_{i in cart} conf(i -> j) / n_j ** damping`` with ``n_j`` the
    baskets holding ``j``: ``damping = 0`` is plain confidence (the baseline), ``damping = 1``
    is lift; in between discounts items that go with everything because everyone buys them.
    Only the ``neighbours`` strongest rules per item ``i`` are kept (memory; also what ships in
    an export). With an empty cart the score is global popularity (the tie-breaker) only.

    Parameters
    ----------
    neighbours : int
        Rules kept per antecedent item (largest score first); 0 keeps all.
    min_support : int
        Pairs seen in fewer baskets are ignored (noise).
    damping : float
        Popularity discount of the consequent item, in [0, 1].
    """

    neighbours: int = 200
    min_support: int = 1
    damping: float = 0.0
    kind = "cooccurrence"
    exportable = True

    def __post_init__(self) -> None:
        if self.neighbours < 0:
            raise ParamError("neighbours", f"must be >= 0 (0 keeps all), got {self.neighbours}")
        if self.min_support < 1:
            raise ParamError("min_support", f"must be >= 1, got {self.min_support}")
        if not 0 <= self.damping <= 1:
            raise ParamError("damping", f"must be in [0, 1], got {self.damping}")

    def _fit(self, data: Dataset) -> None:
        baskets = data.basket_item_matrix().matrix
        counts = np.asarray(baskets.sum(axis=0)).ravel()
        self.item_baskets_ = counts.astype(np.float32)
        blocks = []
        for lo, co in cooccurrence_blocks(baskets, PAIR_BUDGET):
            if self.min_support > 1:
                co.data[co.data < self.min_support] = 0
                co.eliminate_zeros()
            rows = np.repeat(np.arange(lo, lo + co.shape[0]), np.diff(co.indptr))
            co.data = (co.data / counts[rows]).astype(np.float32)
            if self.damping:
                co.data = (co.data / np.maximum(counts[co.indices], 1.0) ** self.damping).astype(
                    np.float32
                )
            blocks.append(keep_top_per_row(co, self.neighbours) if self.neighbours > 0 else co)
        self.confidence_ = sp.csr_matrix(sp.vstack(blocks, format="csr"), dtype=np.float32)
        self.popularity_ = _popularity_share(data, "users")

    def score(self, users: np.ndarray, carts: sp.csr_matrix) -> np.ndarray:
        out = np.broadcast_to(self.popularity_ * TIE_BREAK, (carts.shape[0], self.n_items_)).copy()
        if carts.nnz:
            out += (sp.csr_matrix(carts, dtype=np.float32) @ self.confidence_).toarray()
        return out

    def graph_scores(self, g: Graph) -> str:
        """The cart's rows of ``confidence_`` summed (as padded neighbour lists)."""
        return g.neighbour_scores(self.confidence_, tie_break(self))


#: Basket x item products one block of the co-occurrence computation may take (about 30
#: bytes each at its peak): memory stays bounded whatever the shop's size.
PAIR_BUDGET = 30_000_000


def cooccurrence_blocks(
    baskets: sp.csr_matrix, budget: int = PAIR_BUDGET
) -> Iterator[tuple[int, sp.csr_matrix]]:
    """``baskets.T @ baskets`` (baskets holding both items; diagonal dropped) in row blocks.

    Yields ``(first_row, block)``, ``block`` CSR float32 of shape (rows, n_items), for
    contiguous item ranges whose product touches at most about ``budget`` basket x item pairs
    (an item alone over it is one block), so a caller that prunes each block (e.g. to its
    top neighbours) never holds the full item x item matrix: on a 50M-line shop that is many
    GB. Counts are whole numbers below 2**24, exact in float32 whatever the summation order.
    """
    n_items = baskets.shape[1]
    sizes = np.diff(baskets.indptr).astype(np.float64)
    work = np.cumsum(baskets.T @ sizes)  # pair products needed by items 0..i
    total = float(work[-1]) if n_items else 0.0
    n_blocks = max(1, int(np.ceil(total / budget)))
    cuts = np.searchsorted(work, total * np.arange(1, n_blocks) / n_blocks, side="right")
    edges = np.unique(np.r_[0, cuts, n_items])
    by_item = baskets.T.tocsr()  # items x baskets: a block's rows are a cheap slice
    for lo, hi in zip(edges[:-1].tolist(), edges[1:].tolist(), strict=True):
        co = sp.csr_matrix(by_item[lo:hi] @ baskets, dtype=np.float32)
        rows = np.repeat(np.arange(lo, hi), np.diff(co.indptr))
        co.data[co.indices == rows] = 0  # an item with itself
        co.eliminate_zeros()
        yield lo, co


def keep_top_per_row(m: sp.csr_matrix, n: int) -> sp.csr_matrix:
    """Keep the ``n`` largest entries of each row (ties: lower column index), vectorised."""
    m = sp.csr_matrix(m)
    m.sort_indices()
    lengths = np.diff(m.indptr)
    rows = np.repeat(np.arange(m.shape[0]), lengths)
    # Sort entries by (row, -value, column); then rank within each row.
    order = np.lexsort((m.indices, -m.data, rows))
    rank = np.arange(order.size) - np.repeat(m.indptr[:-1], lengths)
    keep = order[rank < n]
    keep.sort()
    out = sp.csr_matrix((m.data[keep], (rows[keep], m.indices[keep])), shape=m.shape, dtype=m.dtype)
    out.sort_indices()
    return out
