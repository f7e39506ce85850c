"""LightFM (Kula 2015): factor model with optional item and user features (a hybrid).

Every item and user has its own identity feature; with ``item_features`` / ``user_features``
on, the metadata one-hots (department, category, type, brand, price band / demographics) are
added, rows normalised to sum 1 (LightFM's own ``Dataset`` convention). An item's vector is the
sum of its features' embeddings, so new items with metadata get scores and so do unknown users
with attributes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.sparse as sp

from features.dataset import Dataset
from training.models.base import ParamError, RecommenderBase
from training.models.baselines import TIE_BREAK, _popularity_share
from training.models.factors import query_vectors, sampled_auc
from training.onnx_graph import tie_break
from training.progress import bar

LOSSES = ("warp", "bpr", "logistic", "warp-kos")


def _with_identity(features: sp.csr_matrix | None, n: int) -> sp.csr_matrix:
    """[identity | features], rows normalised to sum 1."""
    eye = sp.identity(n, dtype=np.float32, format="csr")
    m = eye if features is None or features.shape[1] == 0 else sp.hstack([eye, features]).tocsr()
    sums = np.asarray(m.sum(axis=1)).ravel()
    return sp.diags(1.0 / np.maximum(sums, 1e-12)).astype(np.float32) @ m


@dataclass
class LightFMRecommender(RecommenderBase):
    """LightFM as a pure CF model or a hybrid.

    ``score(u, j) = (p_u + cart_weight * mean(q_i, i in cart)) . q_j + b_j`` with ``p_u``,
    ``q_j`` the user / item representations (sums of feature embeddings) and ``b_j`` the
    item bias.

    Parameters
    ----------
    loss : {"warp", "bpr", "logistic", "warp-kos"}
    no_components, learning_rate, item_alpha, user_alpha, max_sampled, epochs :
        LightFM's own hyper-parameters (``max_sampled`` for warp).
    item_features, user_features : bool
        Hybrid: add metadata features (item: category levels, brand, price band; user:
        demographics).
    price_bands : int
        Number of quantile price bands among the item features.
    cart_weight : float
        Weight of the cart's mean item representation folded into the user's.
    """

    loss: Literal["warp", "bpr", "logistic", "warp-kos"] = "warp"
    no_components: int = 64
    learning_rate: float = 0.05
    item_alpha: float = 0.0
    user_alpha: float = 0.0
    max_sampled: int = 10
    epochs: int = 20
    item_features: bool = False
    user_features: bool = False
    price_bands: int = 5
    cart_weight: float = 1.0
    random_state: int = 42
    num_threads: int = 1
    kind = "lightfm"
    exportable = True
    epoch_param = "epochs"

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ParamError("loss", f"expected one of {', '.join(LOSSES)}, got {self.loss!r}")
        for name in ("no_components", "epochs", "num_threads"):
            if getattr(self, name) < 1:
                raise ParamError(name, f"must be >= 1, got {getattr(self, name)}")

    def _fit(self, data: Dataset) -> None:
        from lightfm import LightFM

        item_meta = data.item_features(price_bands=self.price_bands) if self.item_features else None
        user_meta = data.user_features() if self.user_features else None
        self.item_feature_names_ = item_meta.names if item_meta else []
        self.user_feature_names_ = user_meta.names if user_meta else []
        self.item_feature_matrix_ = _with_identity(
            item_meta.matrix if item_meta else None, data.n_items
        )
        self.user_feature_matrix_ = _with_identity(
            user_meta.matrix if user_meta else None, data.n_users
        )
        binary = data.user_item_counts().copy()
        binary.data[:] = 1.0
        interactions = binary.tocoo()
        model = LightFM(
            no_components=self.no_components, loss=self.loss, learning_rate=self.learning_rate,
            item_alpha=self.item_alpha, user_alpha=self.user_alpha,
            max_sampled=self.max_sampled, random_state=self.random_state,
        )  # fmt: skip
        self.history_: list[dict[str, float]] = []
        self.popularity_ = _popularity_share(data, "users")
        started = time.perf_counter()
        pbar = bar(total=self.epochs, desc="lightfm", unit="epoch")
        for epoch in range(self.epochs):
            model.fit_partial(
                interactions, user_features=self.user_feature_matrix_,
                item_features=self.item_feature_matrix_, epochs=1, num_threads=self.num_threads,
            )  # fmt: skip
            self._store(model)
            self.history_.append(
                {
                    "epoch": epoch + 1,
                    "seconds": time.perf_counter() - started,
                    "train_auc_sample": sampled_auc(
                        self.user_vectors_, self.item_vectors_, binary, seed=self.random_state
                    ),
                }
            )
            pbar.update(1)
            if self._wants_epochs():
                self.unknown_user_ = self.user_vectors_.mean(axis=0)
                self._end_epoch(epoch + 1)  # _store made copies: scoring is safe here
        pbar.close()
        # Embeddings of the attribute features alone (after the identity block): an unknown
        # user with known attributes is the normalised sum of these (user_vector_from_features).
        self.user_attribute_embeddings_ = np.asarray(
            model.user_embeddings[data.n_users :], dtype=np.float32
        )
        self.unknown_user_ = self.user_vectors_.mean(axis=0)

    def _store(self, model) -> None:
        item_bias, item_emb = model.get_item_representations(self.item_feature_matrix_)
        _user_bias, user_emb = model.get_user_representations(self.user_feature_matrix_)
        self.item_vectors_ = np.asarray(item_emb, dtype=np.float32)
        self.item_biases_ = np.asarray(item_bias, dtype=np.float32)
        # The user bias shifts all of a user's scores equally: it does not change a ranking.
        self.user_vectors_ = np.asarray(user_emb, dtype=np.float32)

    def user_vector_from_features(self, attributes: sp.csr_matrix) -> np.ndarray:
        """Vectors for unknown users from their attribute one-hots (columns as
        ``user_feature_names_``), shape (n, no_components); rows without attributes get the
        mean user vector."""
        attributes = sp.csr_matrix(attributes, dtype=np.float32)
        if attributes.shape[1] != len(self.user_feature_names_):
            raise ValueError(
                f"expected {len(self.user_feature_names_)} attribute columns, got {attributes.shape[1]}"
            )
        sums = np.asarray(attributes.sum(axis=1)).ravel()
        vec = (
            np.asarray(attributes @ self.user_attribute_embeddings_)
            / np.maximum(sums, 1e-12)[:, None]
        )
        return np.where((sums > 0)[:, None], vec, self.unknown_user_[None, :]).astype(np.float32)

    def score(self, users: np.ndarray, carts: sp.csr_matrix) -> np.ndarray:
        q = query_vectors(
            users,
            carts,
            self.user_vectors_,
            self.item_vectors_,
            self.unknown_user_,
            self.cart_weight,
        )
        return q @ self.item_vectors_.T + self.item_biases_ + TIE_BREAK * self.popularity_

    def factor_parts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        bias = self.item_biases_ + tie_break(self)
        return self.user_vectors_, self.unknown_user_, self.item_vectors_, bias
