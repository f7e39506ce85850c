"""Weighting schemes for a user x item count matrix.

All take a CSR matrix ``X`` of shape (n_users, n_items) holding counts and return a new
float32 CSR matrix with the same sparsity pattern. ``N`` is the number of rows (users) and
``df_j`` the number of rows with a non-zero in column ``j``.

- ``binary``: 1 for every stored entry.
- ``count``:  the count itself.
- ``log1p``:  ``log(1 + count)``.
- ``tfidf``:  ``sqrt(count) * idf_j`` with ``idf_j = log(N) - log(1 + df_j)``.
- ``bm25``:   ``count * (K1 + 1) / (K1 * L_u + count) * idf_j`` with the same ``idf_j`` and
  ``L_u = (1 - B) + B * rowsum_u / mean(rowsum)``; ``K1 = 100``, ``B = 0.8`` by default.

``tfidf`` and ``bm25`` are the definitions of ``implicit.nearest_neighbours`` (checked in tests).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import scipy.sparse as sp

Weighting = Literal["binary", "count", "log1p", "bm25", "tfidf"]
WEIGHTINGS: tuple[str, ...] = ("binary", "count", "log1p", "bm25", "tfidf")


def _idf(X: sp.csr_matrix) -> np.ndarray:
    df = np.bincount(X.indices, minlength=X.shape[1])
    return np.log(X.shape[0]) - np.log1p(df)


def apply_weighting(
    X: sp.csr_matrix, scheme: str, K1: float = 100.0, B: float = 0.8
) -> sp.csr_matrix:
    """Weight a count matrix; see the module docstring for the exact formulas."""
    X = sp.csr_matrix(X, dtype=np.float64, copy=True)
    X.sum_duplicates()
    if scheme == "binary":
        X.data[:] = 1.0
    elif scheme == "count":
        pass
    elif scheme == "log1p":
        X.data = np.log1p(X.data)
    elif scheme == "tfidf":
        X.data = np.sqrt(X.data) * _idf(X)[X.indices]
    elif scheme == "bm25":
        idf = _idf(X)
        row_sums = np.asarray(X.sum(axis=1)).ravel()
        length_norm = (1.0 - B) + B * row_sums / row_sums.mean()
        rows = np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))
        X.data = X.data * (K1 + 1.0) / (K1 * length_norm[rows] + X.data) * idf[X.indices]
    else:
        raise ValueError(f"unknown weighting {scheme!r}: expected one of {', '.join(WEIGHTINGS)}")
    return X.astype(np.float32)
