"""Candidate-proportional evaluation (issue 12): scoring only what a query can reach gives
exactly the lists, scores and metrics of the dense path (a score row over the catalog)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from features import synth
from training.config import build_model, load_config
from training.evaluation.harness import evaluate, recommend_candidates, sparse_score_parts
from training.experiment import make_split, make_task
from training.models.base import CandidateFilter

ROOT = Path(__file__).resolve().parents[1]
KINDS = {
    "cooccurrence": {"neighbours": 30},
    "cooccurrence_all": {"neighbours": 0, "min_support": 2, "damping": 0.5},
    "personal_popularity": {"half_life_days": 30.0},
    "personal_popularity_plain": {},
    "popularity": {"measure": "baskets"},
}


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    """A small synthetic shop (many popularity ties: most items sell to a few households),
    split with the shipped synth config, and its three evaluation tasks."""
    out = tmp_path_factory.mktemp("shop") / "s"
    synth.synthesize(out, rows=30_000, users=600, items=1_200, seed=4)
    sets = [f"data.{t}.path={out / f'{t}.parquet'}" for t in ("interactions", "items", "users")]
    config = load_config(ROOT / "configs" / "synth_cooccurrence.yaml", sets)
    from features.loading import load_dataset

    split = make_split(config, load_dataset(config.data))
    tasks = [make_task(name, split, config) for name in config.evaluation.tasks]
    return split, tasks


def _model(name: str, train):
    from training.config import ModelConfig

    kind = name.removesuffix("_all").removesuffix("_plain")
    return build_model(ModelConfig(kind=kind, params=KINDS[name])).fit(train)


@pytest.mark.parametrize("name", sorted(KINDS))
@pytest.mark.parametrize("exclude_owned", [False, True])
def test_candidates_give_the_dense_lists_bit_for_bit(shop, name: str, exclude_owned) -> None:
    split, tasks = shop
    model = _model(name, split.train)
    for task in tasks:
        cand = CandidateFilter(exclude_cart=True, exclude_owned=exclude_owned)
        # k past what some queries can fill after the exclusions: -1 / -inf padding too
        for k in (1, 10, 57):
            dense = model.recommend(task.users, task.carts, k=k, candidates=cand)
            sparse = recommend_candidates(model, task.users, task.carts, k, cand, batch_size=97)
            np.testing.assert_array_equal(sparse[0], dense[0])
            np.testing.assert_array_equal(sparse[1], dense[1])


def test_the_data_has_ties_at_the_cut(shop) -> None:
    """The equality above is only worth something if equal scores meet at the k-th place."""
    split, tasks = shop
    model = _model("cooccurrence", split.train)
    task = tasks[0]
    _items, scores = model.recommend(task.users, task.carts, k=57)
    assert (scores[:, :-1] == scores[:, 1:]).sum() > 10


def test_unknown_users_and_empty_carts(shop) -> None:
    split, _ = shop
    for name in ("personal_popularity", "cooccurrence"):
        model = _model(name, split.train)
        users = np.array([-1, 0, 5, -1], dtype=np.int64)
        carts = sp.csr_matrix(([1.0, 1.0, 1.0], ([1, 1, 3], [3, 7, 7])),
                              shape=(4, model.n_items_), dtype=np.float32)  # fmt: skip
        cand = CandidateFilter(exclude_owned=True)
        dense = model.recommend(users, carts, k=20, candidates=cand)
        sparse = recommend_candidates(model, users, carts, 20, cand)
        np.testing.assert_array_equal(sparse[0], dense[0])
        np.testing.assert_array_equal(sparse[1], dense[1])


@pytest.mark.parametrize("name", ["cooccurrence", "personal_popularity"])
def test_evaluate_metrics_equal_on_both_paths(shop, name: str) -> None:
    split, tasks = shop
    model = _model(name, split.train)
    for task in tasks:
        dense = evaluate(model, task, split.train, scoring="dense")
        auto = evaluate(model, task, split.train)
        assert auto.metrics == dense.metrics
        assert dense.metrics


def test_dense_models_keep_the_dense_path(shop) -> None:
    split, tasks = shop
    from training.config import ModelConfig

    ease = build_model(ModelConfig(kind="ease", params={"l2": 50.0})).fit(split.train)
    assert sparse_score_parts(ease) is None
    with pytest.raises(ValueError, match="no candidate scoring"):
        evaluate(ease, tasks[0], split.train, scoring="candidates")
