"""implicit's ALS, BPR and LMF matrix factorisation and item-item KNN, behind the common interface.

The library fits; scoring is ours (numpy), so it is the same code path for every model and
export can reproduce it. implicit is pinned to one BLAS thread while fitting (it warns and
runs slower otherwise); its own threads are the ``num_threads`` hyper-parameter.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from features.dataset import Dataset
from features.weighting import WEIGHTINGS
from training.models.base import ParamError, RecommenderBase, history_and_cart
from training.models.baselines import TIE_BREAK, _popularity_share
from training.models.factors import query_vectors, sampled_auc
from training.onnx_graph import tie_break
from training.progress import enabled as progress_enabled

if TYPE_CHECKING:
    from training.onnx_graph import Graph


def _import_implicit() -> None:
    import implicit.cpu.als
    import implicit.cpu.bpr
    import implicit.cpu.lmf
    import implicit.nearest_neighbours  # noqa: F401


def _check_common(model: Any) -> None:
    if model.weighting not in WEIGHTINGS:
        raise ParamError(
            "weighting", f"expected one of {', '.join(WEIGHTINGS)}, got {model.weighting!r}"
        )
    if model.num_threads < 0:
        raise ParamError("num_threads", f"must be >= 0 (0 = all cores), got {model.num_threads}")


@dataclass
class _ImplicitFactorModel(RecommenderBase):
    """Common fit / score for implicit's matrix-factorisation models.

    ``score(u, j) = q_u . y_j`` where ``q_u`` is the user's factor vector with the cart folded
    in (see :func:`training.models.factors.query_vectors`).
    """

    factors: int = 64
    regularization: float = 0.01
    iterations: int = 15
    weighting: str = "bm25"
    cart_weight: float = 1.0
    random_state: int = 42
    num_threads: int = 1
    epoch_param = "iterations"  # implicit calls back after each of them
    exportable = True

    def __post_init__(self) -> None:
        _check_common(self)
        if self.factors < 1:
            raise ParamError("factors", f"must be >= 1, got {self.factors}")
        if self.iterations < 1:
            raise ParamError("iterations", f"must be >= 1, got {self.iterations}")

    def _library_model(self) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def _fit(self, data: Dataset) -> None:
        user_items = data.user_item_matrix(self.weighting).tocsr()
        self.history_: list[dict[str, float]] = []
        binary = data.user_item_counts()
        started = time.perf_counter()

        model: Any = None
        self.popularity_ = _popularity_share(data, "users")

        def callback(iteration: int, elapsed: float, *extra: Any) -> None:
            row = {"epoch": iteration + 1, "seconds": time.perf_counter() - started}
            if self.kind == "als" and extra and extra[0]:
                row["loss"] = float(extra[0])
            if self.kind == "bpr" and len(extra) >= 2:
                row["correct"] = float(extra[0])  # share of sampled pairs ranked right
            # The factors are updated in place: a sampled AUC on them is the per-epoch curve.
            row["train_auc_sample"] = sampled_auc(
                np.asarray(model.user_factors),
                np.asarray(model.item_factors),
                binary,
                seed=self.random_state,
            )
            self.history_.append(row)
            if self._wants_epochs():
                # implicit keeps updating its arrays in place: score on copies, so what the
                # callback sees stays valid and the fit goes on untouched
                self._store(model)
                self._end_epoch(iteration + 1)

        _import_implicit()  # load its BLAS before limiting threads, or the limit misses it
        with threadpool_limits(limits=1, user_api="blas"):  # implicit checks BLAS on construction
            model = self._library_model()
            model.fit(user_items, show_progress=progress_enabled(), callback=callback)
        self._store(model)

    def _store(self, model: Any) -> None:
        """The scoring state from implicit's current factors (copies, float32)."""
        self.user_factors_ = np.array(model.user_factors, dtype=np.float32)
        self.item_factors_ = np.array(model.item_factors, dtype=np.float32)
        self.unknown_user_ = self.user_factors_.mean(axis=0)

    def score(self, users: np.ndarray, carts: sp.csr_matrix) -> np.ndarray:
        q = query_vectors(
            users,
            carts,
            self.user_factors_,
            self.item_factors_,
            self.unknown_user_,
            self.cart_weight,
        )
        return q @ self.item_factors_.T + TIE_BREAK * self.popularity_

    def factor_parts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return self.user_factors_, self.unknown_user_, self.item_factors_, tie_break(self)


@dataclass
class ALSRecommender(_ImplicitFactorModel):
    """Implicit ALS (Hu, Koren, Volinsky 2008) via ``implicit.als``.

    Parameters
    ----------
    factors, regularization, iterations : model size, L2 weight, sweeps.
    alpha : float
        Confidence scale: ``c_ui = 1 + alpha * w_ui`` with ``w`` the weighted matrix.
    track_loss : bool
        Compute the training loss every sweep (the ``train/loss`` curve); costs about 10% of
        the fit time.
    weighting : str
        ``binary | count | log1p | bm25 | tfidf`` applied to the user x item counts.
    cart_weight : float
        Weight of the cart's mean item vector folded into the user vector.
    """

    alpha: float = 1.0
    track_loss: bool = True
    kind = "als"

    def _library_model(self) -> Any:
        from implicit.cpu.als import AlternatingLeastSquares

        return AlternatingLeastSquares(
            factors=self.factors, regularization=self.regularization, alpha=self.alpha,
            iterations=self.iterations, calculate_training_loss=self.track_loss,
            num_threads=self.num_threads, random_state=self.random_state,
        )  # fmt: skip


@dataclass
class BPRRecommender(_ImplicitFactorModel):
    """Bayesian personalised ranking via ``implicit.bpr`` (item bias is the last factor)."""

    learning_rate: float = 0.01
    iterations: int = 100
    weighting: str = "binary"
    kind = "bpr"

    def _library_model(self) -> Any:
        from implicit.cpu.bpr import BayesianPersonalizedRanking

        return BayesianPersonalizedRanking(
            factors=self.factors, learning_rate=self.learning_rate,
            regularization=self.regularization, iterations=self.iterations,
            num_threads=self.num_threads, random_state=self.random_state,
        )  # fmt: skip


@dataclass
class LMFRecommender(_ImplicitFactorModel):
    """Logistic matrix factorisation via ``implicit.lmf``."""

    factors: int = 30
    learning_rate: float = 1.0
    regularization: float = 0.6
    iterations: int = 30
    neg_prop: int = 30
    weighting: str = "binary"
    kind = "lmf"

    def _library_model(self) -> Any:
        from implicit.cpu.lmf import LogisticMatrixFactorization

        return LogisticMatrixFactorization(
            factors=self.factors, learning_rate=self.learning_rate,
            regularization=self.regularization, iterations=self.iterations,
            neg_prop=self.neg_prop, num_threads=self.num_threads, random_state=self.random_state,
        )  # fmt: skip


@dataclass
class ItemKNNRecommender(RecommenderBase):
    """Item-item nearest neighbours via ``implicit.nearest_neighbours``.

    ``score(u, cart, j) = sum_i h_ui * s_ij + cart_weight * sum_{i in cart} s_ij`` where ``s``
    is the K-nearest-neighbour similarity and ``h_u`` the user's (binary) history.

    Parameters
    ----------
    similarity : {"cosine", "bm25", "tfidf"}
    neighbours : int
        K, neighbours kept per item.
    history_weight, cart_weight : float
        Weights of the history and cart terms.
    """

    similarity: Literal["cosine", "bm25", "tfidf"] = "cosine"
    neighbours: int = 100
    history_weight: float = 1.0
    cart_weight: float = 1.0
    bm25_k1: float = 1.2
    bm25_b: float = 0.75
    num_threads: int = 1
    kind = "item_knn"
    exportable = True

    def __post_init__(self) -> None:
        if self.similarity not in ("cosine", "bm25", "tfidf"):
            raise ParamError(
                "similarity", f"expected cosine, bm25 or tfidf, got {self.similarity!r}"
            )
        if self.neighbours < 1:
            raise ParamError("neighbours", f"must be >= 1, got {self.neighbours}")

    def _fit(self, data: Dataset) -> None:
        _import_implicit()
        with threadpool_limits(limits=1, user_api="blas"), warnings.catch_warnings():
            # implicit's cosine model converts its own normalised matrix and warns about it
            warnings.filterwarnings("ignore", message="Method expects CSR input")
            model = self._knn_model()
            model.fit(data.user_item_counts().tocsr(), show_progress=progress_enabled())
        sim = sp.csr_matrix(model.similarity, dtype=np.float32)
        sim.setdiag(0)  # an item is not its own add-on
        sim.eliminate_zeros()
        self.similarity_ = sim
        self.popularity_ = _popularity_share(data, "users")

    def _knn_model(self) -> Any:
        from implicit.nearest_neighbours import BM25Recommender, CosineRecommender, TFIDFRecommender

        if self.similarity == "bm25":
            return BM25Recommender(
                K=self.neighbours, K1=self.bm25_k1, B=self.bm25_b, num_threads=self.num_threads
            )
        elif self.similarity == "tfidf":
            return TFIDFRecommender(K=self.neighbours, num_threads=self.num_threads)
        return CosineRecommender(K=self.neighbours, num_threads=self.num_threads)

    def score(self, users: np.ndarray, carts: sp.csr_matrix) -> np.ndarray:
        query = history_and_cart(self.owned_, users, carts, self.history_weight, self.cart_weight)
        out = np.broadcast_to(TIE_BREAK * self.popularity_, (len(users), self.n_items_)).copy()
        out += (query @ self.similarity_).toarray()
        return out

    def graph_scores(self, g: Graph) -> str:
        return g.item_item_scores(self.similarity_, tie_break(self), self.history_weight,
                                  self.cart_weight)  # fmt: skip
