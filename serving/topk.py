"""Exact top-k per row with a deterministic tie rule, shared by training (evaluation, the
models' ``recommend``) and serving (the learned ranker's candidate sources): one
implementation so that both sides order ties the same way."""

from __future__ import annotations

import numpy as np

__all__ = ["top_k"]


def top_k(scores: np.ndarray, k: int, block: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Indices and values of the ``k`` largest finite scores per row, best first.

    Exact tie rule: among equal scores the lower item index ranks first, also at the k-th
    place, so the result is a pure function of the scores. Slots with no finite score left
    get -1 / -inf.

    Why not ``argpartition`` over the whole row: it is ~10x slower on a 90k-item catalog. The
    k-th largest of the per-block maxima is a lower bound ``t`` of the k-th largest score (the
    k best blocks hold k distinct values >= t), so only scores >= ``t`` can be in the top k;
    those few candidates are then sorted exactly.
    """
    n, m = scores.shape
    k = min(k, m)
    if np.isnan(scores).any():
        scores = np.where(np.isnan(scores), -np.inf, scores)
    starts = np.arange(0, m, block)
    if starts.size > k:
        block_max = np.maximum.reduceat(scores, starts, axis=1)
        bound = -np.partition(-block_max, k - 1, axis=1)[:, k - 1]
    else:
        bound = np.full(n, -np.inf, dtype=scores.dtype)
    rows, cols = np.nonzero((scores >= bound[:, None]) & (scores > -np.inf))
    vals = scores[rows, cols]
    order = np.lexsort((cols, -vals, rows))
    rows, cols, vals = rows[order], cols[order], vals[order]
    first = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))[:-1]])
    rank = np.arange(rows.size) - first[rows]
    keep = rank < k
    idx = np.full((n, k), -1, dtype=np.int32)
    out = np.full((n, k), -np.inf, dtype=np.float32)
    idx[rows[keep], rank[keep]] = cols[keep]
    out[rows[keep], rank[keep]] = vals[keep]
    return idx, out
