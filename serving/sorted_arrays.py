"""Small vectorised helpers over sorted key arrays and CSR rows, shared by serving (rules,
scorers, the learned ranker's features) and training (candidate-path evaluation): one
implementation of each, so membership and row gathering behave the same everywhere."""

from __future__ import annotations

import numpy as np

__all__ = ["csr_entries", "in_sorted", "lookup_sorted", "segments"]


def lookup_sorted(keys: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Positions of the ``query`` keys in the sorted, duplicate-free ``keys`` (-1 where
    absent); binary search, no sort of ``query``."""
    if keys.size == 0:
        return np.full(np.shape(query), -1, dtype=np.int64)
    pos = np.minimum(np.searchsorted(keys, query), keys.size - 1)
    return np.where(keys[pos] == query, pos, -1)


def in_sorted(keys: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """``np.isin(keys, sorted_set)`` for a sorted, duplicate-free ``sorted_set``."""
    return lookup_sorted(sorted_set, keys) >= 0


def segments(sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For segments of the given sizes laid end to end: each element's segment and its offset
    inside it."""
    sizes = np.asarray(sizes, dtype=np.int64)
    seg = np.repeat(np.arange(sizes.size), sizes)
    starts = np.cumsum(sizes) - sizes
    return seg, np.arange(seg.size) - starts[seg]


def csr_entries(indptr: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The entries of the CSR rows ``rows``, in order: each entry's position in ``rows`` and
    its position in the CSR's column / value arrays."""
    starts = indptr[rows]
    seg, offset = segments(indptr[rows + 1] - starts)
    return seg, starts[seg] + offset
