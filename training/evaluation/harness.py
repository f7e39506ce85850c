"""Run a fitted model on a ranking task and compute metrics.

One recommendation list per query at the largest k; every metric at every k reads from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from features.dataset import Dataset
from features.splits import RankingTask
from training.evaluation.metrics import (
    METRICS,
    Metric,
    build_context,
    compute_metrics,
)
from training.models.base import CandidateFilter, RecommenderBase

DEFAULT_METRICS: tuple[str, ...] = (
    "precision",
    "recall",
    "ndcg",
    "map",
    "mrr",
    "hit_rate",
    "coverage",
    "novelty",
    "mean_popularity",
    "category_diversity",
    "addon_revenue",
)


@dataclass
class Evaluation:
    """Metrics of one model on one task.

    Attributes
    ----------
    task : str
        Task name.
    n_queries : int
        Number of queries scored.
    metrics : dict of str to float
        ``"<metric>@<k>"`` -> value.
    average : str
        ``query`` or ``user``.
    not_applicable : dict of str to str
        Metric name -> why it was not computed on this data (e.g. ``category_diversity``
        without item categories); such metrics have no entry in ``metrics``.
    exclude_owned : bool
        Whether items the user has in train were left out of the ranking and the truth.
    """

    task: str
    n_queries: int
    metrics: dict[str, float] = field(default_factory=dict)
    average: str = "query"
    not_applicable: dict[str, str] = field(default_factory=dict)
    exclude_owned: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "n_queries": self.n_queries,
            "average": self.average,
            "exclude_owned": self.exclude_owned,
            "metrics": self.metrics,
            **({"not_applicable": self.not_applicable} if self.not_applicable else {}),
        }


def make_metrics(names: Sequence[str], ks: Sequence[int]) -> list[Metric]:
    """Metric objects for every name at every k, in the given order."""
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}: expected some of {sorted(METRICS)}")
    return [METRICS[n](k) for n in names for k in sorted(ks)]


def evaluate(
    model: RecommenderBase,
    task: RankingTask,
    train: Dataset,
    ks: Sequence[int] = (3, 5, 10),
    metric_names: Sequence[str] = DEFAULT_METRICS,
    average: str = "query",
    category_level: str = "category",
    batch_size: int = 512,
) -> Evaluation:
    """Recommend for every query of ``task`` and compute the metrics.

    Cart items are never recommended; items owned in train are excluded when the task says
    so. Popularity-based metrics use ``train``.
    """
    if task.n_queries == 0:
        raise ValueError(f"task {task.name!r} has no queries: nothing to evaluate")
    k_max = max(ks)
    recommended, _ = model.recommend(
        task.users,
        task.carts,
        k=k_max,
        candidates=CandidateFilter(exclude_cart=True, exclude_owned=task.exclude_owned),
        batch_size=batch_size,
    )
    return score_recommendations(
        recommended, task, train, ks, metric_names, average, category_level
    )


def score_recommendations(
    recommended: np.ndarray,
    task: RankingTask,
    train: Dataset,
    ks: Sequence[int] = (3, 5, 10),
    metric_names: Sequence[str] = DEFAULT_METRICS,
    average: str = "query",
    category_level: str = "category",
) -> Evaluation:
    """Metrics for given recommendation lists (n_queries, >= max(ks)) on ``task``.

    Category diversity needs item categories: on data without any (at ``category_level``)
    it is not computed and is listed in ``Evaluation.not_applicable`` instead of scoring
    every list as fully diverse.
    """
    categories = train.item_categories(category_level)
    skipped = {}
    if "category_diversity" in metric_names and not (categories >= 0).any():
        skipped["category_diversity"] = f"the data has no item {category_level}"
    ctx = build_context(
        recommended,
        task.relevant,
        item_users=train.item_popularity(),
        n_train_users=int(train.interactions["user_idx"].n_unique()),
        item_category=categories,
        item_price=train.item_prices(),
    )
    names = [n for n in metric_names if n not in skipped]
    values = compute_metrics(make_metrics(names, ks), ctx, task.users, average)
    return Evaluation(task.name, task.n_queries, values, average, skipped, task.exclude_owned)
