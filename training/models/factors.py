"""Shared pieces of factor models: cart folding, unknown users, sampled training AUC."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def cart_mean(carts: sp.csr_matrix, item_vectors: np.ndarray) -> np.ndarray:
    """Mean item vector of each cart, shape (n, d); zero rows for empty carts."""
    carts = sp.csr_matrix(carts, dtype=np.float32)
    sizes = np.asarray(carts.sum(axis=1)).ravel()
    summed = np.asarray(carts @ item_vectors)
    return summed / np.maximum(sizes, 1.0)[:, None]


def query_vectors(
    users: np.ndarray,
    carts: sp.csr_matrix,
    user_vectors: np.ndarray,
    item_vectors: np.ndarray,
    unknown_user: np.ndarray,
    cart_weight: float,
) -> np.ndarray:
    """User vector with the cart folded in: ``x_u + cart_weight * mean(y_i, i in cart)``.

    Unknown or anonymous users (index -1) start from ``unknown_user`` (the mean user vector:
    a typical shopper), so a cart alone still personalises the list.
    """
    users = np.asarray(users, dtype=np.int64)
    base = np.where(
        (users >= 0)[:, None], user_vectors[np.maximum(users, 0)], unknown_user[None, :]
    )
    if cart_weight and carts.nnz:
        base = base + cart_weight * cart_mean(carts, item_vectors)
    return base.astype(np.float32)


def sampled_auc(
    user_vectors: np.ndarray,
    item_vectors: np.ndarray,
    user_items: sp.csr_matrix,
    n_samples: int = 2000,
    seed: int = 0,
) -> float:
    """Share of sampled (user, bought item, random item) triples ranked right: a cheap
    per-epoch training curve. Ties count half."""
    rng = np.random.default_rng(seed)
    coo = user_items.tocoo()
    if coo.nnz == 0:
        return float("nan")
    pick = rng.integers(0, coo.nnz, n_samples)
    u, pos = coo.row[pick], coo.col[pick]
    neg = rng.integers(0, user_items.shape[1], n_samples)
    s_pos = np.einsum("ij,ij->i", user_vectors[u], item_vectors[pos])
    s_neg = np.einsum("ij,ij->i", user_vectors[u], item_vectors[neg])
    return float(np.mean((s_pos > s_neg) + 0.5 * (s_pos == s_neg)))
