"""The sparse matrices of a dataset, built without COO copies (issue 12, loading 50M lines),
are the ones the COO construction gave: same shapes, values, index arrays and basket order.

The reference builders below are the previous implementation, kept here verbatim in
substance (scipy COO -> CSR, duplicates summed; a dense rank of (basket id, user)).
"""

from __future__ import annotations

import random
import tracemalloc

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp

from features.cleaning import CleaningConfig
from features.dataset import Dataset, _count_pairs, build_dataset
from tests.conftest import make_raw


def _old_counts(data: Dataset) -> sp.csr_matrix:
    df = data.interactions
    coo = sp.coo_matrix(
        (
            np.ones(df.height, dtype=np.float32),
            (df["user_idx"].to_numpy(), df["item_idx"].to_numpy()),
        ),
        shape=(data.n_users, data.n_items),
    )
    m = coo.tocsr()
    m.sum_duplicates()
    return m


def _old_baskets(data: Dataset) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray, np.ndarray]:
    df = data.interactions.select("basket_id", "user_idx", "item_idx", "timestamp")
    b = df.select(pl.struct("basket_id", "user_idx").rank("dense")).to_series()
    b = b.cast(pl.Int64).to_numpy() - 1
    n_b = int(b.max()) + 1 if len(b) else 0
    m = sp.csr_matrix(
        (np.ones(len(b), dtype=np.float32), (b, df["item_idx"].to_numpy())),
        shape=(n_b, data.n_items),
    )
    m.sum_duplicates()
    m.data[:] = 1.0
    meta = (
        df.group_by("basket_id", "user_idx")
        .agg(pl.col("timestamp").min())
        .sort("basket_id", "user_idx")
    )
    return (
        m,
        meta["basket_id"].to_numpy(),
        meta["user_idx"].to_numpy().astype(np.int32),
        meta["timestamp"].to_numpy(),
    )


def _same_csr(a: sp.csr_matrix, b: sp.csr_matrix) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype == np.float32
    assert a.indptr.dtype == b.indptr.dtype and a.indices.dtype == b.indices.dtype
    np.testing.assert_array_equal(a.indptr, b.indptr)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.data, b.data)
    assert a.has_canonical_format


def _check(data: Dataset) -> None:
    """Counts and baskets of ``data`` and of a split-like part of it equal the old build."""
    parts = [data, data.restrict(pl.col("timestamp") < pl.col("timestamp").median())]
    for part in parts:
        _same_csr(part.user_item_counts(), _old_counts(part))
        new, (m, ids, users, times) = part.basket_item_matrix(), _old_baskets(part)
        _same_csr(new.matrix, m)
        np.testing.assert_array_equal(new.basket_ids, ids)
        assert new.users.dtype == np.int32 and new.times.dtype == times.dtype
        np.testing.assert_array_equal(new.users, users)
        np.testing.assert_array_equal(new.times, times)


def _messy_rows(seed: int, string_baskets: bool) -> list[tuple]:
    """Shuffled lines with repeated items in a basket, basket ids shared by two customers,
    baskets spread over days (the earliest line is its time) and users with one line."""
    rng = random.Random(seed)
    rows = []
    for _ in range(400):
        user, basket = rng.randrange(60), rng.randrange(150)  # ids collide across users
        bid = f"inv-{basket:03d}" if string_baskets else basket * 7 - 300  # negative ids too
        for _ in range(rng.randrange(1, 6)):
            item = rng.choice([rng.randrange(40), 3, 3])  # the same item twice in a basket
            rows.append((user, item, bid, rng.randrange(30), rng.randrange(1, 4)))
    rng.shuffle(rows)
    return rows


@pytest.mark.parametrize("string_baskets", [False, True])
def test_messy_fixture_matrices_unchanged(string_baskets: bool) -> None:
    items = [{"item_id": i, "category": "c"} for i in range(50)]  # 10 items never bought
    data = build_dataset(
        make_raw(_messy_rows(1, string_baskets), items), CleaningConfig(duplicates="keep")
    )
    assert data.interactions["basket_id"].dtype == (pl.String if string_baskets else pl.Int64)
    _check(data)
    bm = data.basket_item_matrix()
    assert bm.matrix.data.max() == 1.0  # distinct items even where a line repeats
    assert len(bm.basket_ids) > len(set(bm.basket_ids.tolist()))  # shared ids stay apart


def test_tiny_and_empty(tiny_data: Dataset) -> None:
    _check(tiny_data)
    empty = tiny_data.restrict(pl.lit(False))
    counts, baskets = empty.user_item_counts(), empty.basket_item_matrix()
    _same_csr(counts, _old_counts(empty))
    assert baskets.matrix.shape == (0, tiny_data.n_items) and len(baskets.times) == 0


def test_counts_of_unsorted_lines() -> None:
    """Lines not grouped by user (the dataset keeps them sorted; the builder must not rely on it)."""
    rng = np.random.default_rng(0)
    users, items = (
        rng.integers(0, 30, 2000).astype(np.int32),
        rng.integers(0, 50, 2000).astype(np.int32),
    )
    new = _count_pairs(users, items, 35, 60)
    old = sp.coo_matrix((np.ones(2000, dtype=np.float32), (users, items)), shape=(35, 60)).tocsr()
    old.sum_duplicates()
    _same_csr(new, old)


def _traced_peak(build) -> tuple[int, object]:
    tracemalloc.start()
    try:
        result = build()
        return tracemalloc.get_traced_memory()[1], result
    finally:
        tracemalloc.stop()


def _nbytes(m: sp.csr_matrix) -> int:
    return m.data.nbytes + m.indices.nbytes + m.indptr.nbytes


def test_no_line_sized_copies(tmp_path) -> None:
    """numpy's allocations (traced) while building: at most the result plus one line-sized
    int32 array (the old COO route held row, column and data arrays per line, then a CSR copy)."""
    from features import synth
    from features.loading import DataConfig, load_dataset
    from features.readers import FileSpec

    synth.synthesize(tmp_path, rows=60_000, users=1_500, items=800, seed=2)
    data = load_dataset(
        DataConfig(source="files", interactions=FileSpec(path=str(tmp_path / synth.INTERACTIONS)))
    )
    line = 4 * data.interactions.height  # one int32 / float32 per order line
    peak, counts = _traced_peak(data.user_item_counts)
    assert peak <= _nbytes(counts) + 1.65 * line  # the old route: 1.8
    peak, baskets = _traced_peak(data.basket_item_matrix)
    kept = (
        _nbytes(baskets.matrix)
        + baskets.basket_ids.nbytes
        + baskets.users.nbytes
        + baskets.times.nbytes
    )
    assert peak <= kept + 1.2 * line  # the old route: 3.2


def test_synthetic_shop(tmp_path) -> None:
    from features import synth
    from features.loading import DataConfig, load_dataset
    from features.readers import FileSpec

    synth.synthesize(tmp_path, rows=30_000, users=800, items=500, seed=4)
    config = DataConfig(
        source="files", interactions=FileSpec(path=str(tmp_path / synth.INTERACTIONS))
    )
    data = load_dataset(config)
    _check(data)
