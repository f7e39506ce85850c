"""The learned ranker beyond Complete Journey: the shipped ``configs/synth_ranker.yaml`` trains,
evaluates every task, exports and serves on a small synthetic shop (``addons data synth``),
and the robustness benchmark's MovieLens-shaped folder is read by the MovieLens adapter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from features.synth import synthesize
from serving import Ranker
from training.config import load_config
from training.experiment import run_evaluation, validation_folds
from training.export import export_model

ROOT = Path(__file__).resolve().parents[1]
#: A few trees and short lists: the pipeline, not the quality, is under test (seconds).
SMALL_PARAMS = ["model.params.n_estimators=15", "model.params.train_queries=300",
                "model.params.neighbours=30", "model.params.cf_neighbours=20",
                "model.params.min_data_in_leaf=5", "model.params.num_leaves=7"]  # fmt: skip


@pytest.fixture(scope="module")
def synth_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synth") / "shop"
    synthesize(folder, rows=6000, users=120, items=300, seed=5)
    overrides = [f"data.{name}.path={folder / name}.parquet"
                 for name in ("interactions", "items", "users")] + SMALL_PARAMS  # fmt: skip
    config = load_config(ROOT / "configs" / "synth_ranker.yaml", overrides)
    result = run_evaluation(config)
    return config, result


def test_synth_ranker_config_evaluates_every_task(synth_run) -> None:
    config, result = synth_run
    assert result.model.kind == "ranker"
    tasks = {e.task: e for e in result.evaluations}
    assert set(tasks) == set(config.evaluation.tasks)
    for task in tasks.values():
        assert task.n_queries > 0
        assert 0 <= task.metrics["ndcg@10"] <= 1
    # The shop has re-buys and complements: a learned model finds some of the held-out items.
    assert tasks["basket_completion"].metrics["recall@10"] > 0


def test_synth_ranker_exports_and_serves(synth_run, tmp_path) -> None:
    from features.loading import load_dataset
    from training.experiment import make_split

    config, result = synth_run
    split = make_split(config, load_dataset(config.data))
    path = export_model(result.model, split.train, tmp_path / "artifact")
    ranker = Ranker.load(path)
    assert ranker.manifest["model_kind"] == "ranker"
    user = int(split.train.user_map.to_external(np.array([0]))[0])
    cart = split.train.item_map.to_external(np.arange(3)).tolist()
    offered = ranker.rank(user_id=user, cart=cart, k=5, offer="impulse")
    assert offered.items, offered.to_dict()
    ids = [o.item_id for o in offered.items]
    assert not set(ids) & set(cart) and len(set(ids)) == len(ids)
    assert all(0 <= o.score <= 1 and o.reason for o in offered.items)  # add probabilities
    assert ranker.rank(user_id=user, cart=[], k=5).items  # no cart: the re-buy path


def test_synth_ranker_config_has_a_validation_window(synth_run) -> None:
    """The robustness benchmark scores on validation: the shipped config must give one."""
    from features.loading import load_dataset

    config, _ = synth_run
    (fold,) = validation_folds(config, load_dataset(config.data))
    assert fold.test.interactions.height > 0
    assert fold.train.interactions["timestamp"].max() < fold.test.interactions["timestamp"].min()


def test_movielens_like_folder_reads_as_movielens(tmp_path) -> None:
    """The benchmark's stand-in for ML-100K: the adapter reads it, one rating per user and
    movie (no re-buys), baskets = a user's ratings on one day."""
    from benchmarks.bench_ranker_robust import write_movielens_like
    from features.loading import load_dataset

    folder = write_movielens_like(tmp_path / "ml-100k")
    config = load_config(ROOT / "configs" / "ml100k_ranker.yaml", [f"data.path={folder}"])
    data = load_dataset(config.data)
    df = data.interactions
    assert data.n_users == 943 and df["item_idx"].n_unique() > 1000
    assert df.select(["user_idx", "item_idx"]).is_duplicated().sum() == 0
    assert df["basket_id"].n_unique() < df.height


def test_reasons_are_computed_for_the_slots_read_only(synth_run, tmp_path, monkeypatch) -> None:
    """The scorer returns k x OVERFETCH candidates per row but the rules offer about k: their
    reasons are computed on first access, a block of slots at a time, and every slot reads
    the text the eager computation gives."""
    from features.loading import load_dataset
    from serving import ranker_scorer
    from training.experiment import make_split

    config, result = synth_run
    split = make_split(config, load_dataset(config.data))
    ranker = Ranker.load(export_model(result.model, split.train, tmp_path / "artifact"))
    user = int(split.train.user_map.to_external(np.array([1]))[0])
    cart = split.train.item_map.to_external(np.arange(2, 6)).tolist()
    batch = ranker._batch([ranker._prepare(user_id=user, cart=cart, k=3, offer="impulse")])
    calls = []
    real = ranker.scorer.reasons
    monkeypatch.setattr(ranker.scorer, "reasons",
                        lambda f, i, c: calls.append(len(i)) or real(f, i, c))  # fmt: skip
    scored = ranker.scorer.score(batch)
    assert calls == []  # nothing computed before a slot is read
    first = scored.reasons[0][0]
    assert calls == [ranker_scorer.REASON_BLOCK]
    lazy = list(scored.reasons[0])
    monkeypatch.setattr(ranker_scorer, "REASON_BLOCK", 10**6)  # one block: the eager list
    eager = list(ranker.scorer.score(batch).reasons[0])
    assert lazy == eager and lazy[0] == first
    assert all(isinstance(t, str) and t for t in eager[: int((scored.items[0] >= 0).sum())])
    # the rules' selected slots are computed together, once, and read the same texts
    monkeypatch.setattr(ranker_scorer, "REASON_BLOCK", 8)
    calls.clear()
    scored = ranker.scorer.score(batch)
    scored.reasons[0].prefetch([0, 2, 5])
    scored.reasons[0].prefetch([2, 5])
    assert calls == [3]
    assert [scored.reasons[0][s] for s in (0, 2, 5)] == [eager[0], eager[2], eager[5]]
    assert list(scored.reasons[0]) == eager
    calls.clear()
    offers = ranker.rank(user_id=user, cart=cart, k=3, offer="impulse").items
    assert sum(calls) == len(offers) == 3 and [o.reason for o in offers]
