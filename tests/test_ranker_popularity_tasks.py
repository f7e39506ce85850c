"""A task the ranker's fit hands to popularity (``popularity_tasks``): chosen on the fit's own
validation queries when popularity ranks them better than the trees (the cross-sell task on
MovieLens-shaped data), then ranked the same way in training and serving."""

from __future__ import annotations

import numpy as np
import pytest

from features.splits import basket_completion_task, global_time_split
from serving.ranker_features import POPULARITY_TASK_BITS, RankerState, StateError
from tests.test_ranker import SMALL, _shop
from tests.test_ranker_serving import _served_equals_training
from training.export import export_model
from training.models.base import CandidateFilter
from training.models.ranker import (
    FLOOR,
    FeatureState,
    RankerRecommender,
    _popularity_tasks,
)


@pytest.fixture(scope="module")
def handed_over(tmp_path_factory):
    """The small shop's ranker with the cross-sell task handed to popularity."""
    split = global_time_split(_shop(), 10, 11, column="week")
    model = RankerRecommender(**SMALL).fit(split.train)
    assert model.popularity_tasks_ == 0  # the trees win both tasks on this shop
    arrays = model.state_.to_arrays()
    arrays["popularity_tasks"] = np.asarray(POPULARITY_TASK_BITS[True])
    model._set_state(FeatureState.from_arrays(arrays))
    path = export_model(model, split.train, tmp_path_factory.mktemp("ranker") / "artifact")
    return split, model, path


def test_the_handed_over_task_is_the_popularity_order(handed_over) -> None:
    split, model, _ = handed_over
    task = basket_completion_task(split.train, split.test, new_to_user=True)
    st = model.state_
    order = np.lexsort((np.arange(st.n_items), -(FLOOR + st.popularity).astype(np.float32)))
    items, _ = model.recommend(task.users, task.carts, k=5,
                               candidates=CandidateFilter(exclude_owned=True))  # fmt: skip
    for q in range(task.n_queries):
        user = int(task.users[q])
        skip = np.concatenate([task.carts[q].indices,
                               st.ui_items[st.ui_indptr[user] : st.ui_indptr[user + 1]]])  # fmt: skip
        assert items[q].tolist() == order[~np.isin(order, skip)][:5].tolist()
    # the other task still runs the trees: its lists are not the popularity order
    items, _ = model.recommend(task.users, task.carts, k=5, candidates=CandidateFilter())
    differs = sum(items[q].tolist() != order[~np.isin(order, task.carts[q].indices)][:5].tolist()
                  for q in range(task.n_queries))  # fmt: skip
    assert differs > task.n_queries // 2


def test_the_handed_over_task_is_served_as_trained(handed_over) -> None:
    """Served (neutral rules): the popularity task's offers are training's list, score 0 (no
    model probability) and reason "popular"; the other task is the trees' list as before."""
    from serving import Ranker
    from tests.test_ranker_serving import NEUTRAL

    split, model, path = handed_over
    train = split.train
    task = basket_completion_task(train, split.test, new_to_user=True)
    ranker = Ranker.load(path, NEUTRAL.replace(exclude_owned=True))
    no_price = np.flatnonzero(~np.isfinite(train.item_prices()))  # impulse needs a price
    ref, _ = model.recommend(task.users, task.carts, k=10,
                             candidates=CandidateFilter(exclude_owned=True, block_items=no_price))  # fmt: skip
    for q in range(task.n_queries):
        result = ranker.rank(user_id=train.user_map.to_external(task.users[q : q + 1])[0],
                             cart=train.item_map.to_external(task.carts[q].indices).tolist(),
                             offer="impulse", k=10)  # fmt: skip
        served = train.item_map.to_internal([i.item_id for i in result.items]).tolist()
        assert served == [int(j) for j in ref[q] if j >= 0]
        assert {(i.score, i.reason) for i in result.items} == {(0.0, "popular")}
    other = basket_completion_task(train, split.test)
    assert _served_equals_training(model, train, path, other.users.astype(np.int64),
                                   other.carts, False) < 0.05  # fmt: skip


def test_popularity_takes_a_task_only_where_it_scored_higher() -> None:
    valid = {"basket_completion_ndcg_at_10": 0.2, "basket_completion_popularity_ndcg_at_10": 0.1,
             "basket_completion_new_ndcg_at_10": 0.05,
             "basket_completion_new_popularity_ndcg_at_10": 0.08}  # fmt: skip
    assert _popularity_tasks(valid) == POPULARITY_TASK_BITS[True]
    valid["basket_completion_popularity_ndcg_at_10"] = 0.3
    assert _popularity_tasks(valid) == POPULARITY_TASK_BITS[True] | POPULARITY_TASK_BITS[False]
    valid["basket_completion_new_popularity_ndcg_at_10"] = 0.05  # a tie keeps the trees
    assert _popularity_tasks(valid) == POPULARITY_TASK_BITS[False]
    assert _popularity_tasks({}) == 0  # no validation queries: the trees


def test_a_state_says_which_tasks_popularity_ranks(handed_over) -> None:
    _, model, _ = handed_over
    arrays = model.state_.to_arrays()
    state = RankerState.from_arrays(arrays)
    assert state.ranks_by_popularity(True) and not state.ranks_by_popularity(False)
    del arrays["popularity_tasks"]  # an artifact from before: the trees everywhere
    old = RankerState.from_arrays(arrays)
    assert not old.ranks_by_popularity(True) and not old.ranks_by_popularity(False)
    with pytest.raises(StateError, match="popularity_tasks"):
        RankerState.from_arrays({**arrays, "popularity_tasks": np.asarray(4)})


def test_on_movielens_shaped_data_the_cross_sell_task_never_loses_to_popularity(tmp_path) -> None:
    """The case that asked for it: on validation the trees lost new-to-user to popularity
    (docs/quality.md, "Robustness beyond Complete Journey"); now the fit sees it on its own
    validation queries and the task scores at least what popularity scores."""
    from benchmarks.bench_ranker_robust import write_movielens_like
    from features.loading import load_dataset
    from training.config import build_model, load_config
    from training.evaluation.harness import evaluate
    from training.experiment import make_task, validation_folds

    write_movielens_like(tmp_path / "ml")
    config = load_config("configs/ml100k_ranker.yaml", [f"data.path={tmp_path / 'ml'}"])
    fold = validation_folds(config, load_dataset(config.data))[-1]
    ranker = build_model(config.model).fit(fold.train)
    assert ranker.popularity_tasks_ & POPULARITY_TASK_BITS[True]
    popularity = build_model(load_config("configs/cj_popularity.yaml").model).fit(fold.train)
    task = make_task("basket_completion_new", fold, config)
    ev = config.evaluation
    ndcg = [evaluate(m, task, fold.train, [10], ["ndcg"], ev.average,
                     ev.category_level).metrics["ndcg@10"] for m in (ranker, popularity)]  # fmt: skip
    assert ndcg[0] >= ndcg[1] > 0
