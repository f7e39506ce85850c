"""Run a fitted model on a ranking task and compute metrics.

One recommendation list per query at the largest k; every metric at every k reads from it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

from features.dataset import Dataset
from features.splits import RankingTask
from serving.sorted_arrays import in_sorted
from training.evaluation.metrics import (
    METRICS,
    Metric,
    build_context,
    compute_metrics,
)
from training.models.base import CandidateFilter, RecommenderBase, owned_rows
from training.models.baselines import (
    TIE_BREAK,
    CooccurrenceRecommender,
    PersonalPopularityRecommender,
    PopularityRecommender,
)

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
    scoring: str = "auto",
) -> Evaluation:
    """Recommend for every query of ``task`` and compute the metrics.

    Cart items are never recommended; items owned in train are excluded when the task says
    so. Popularity-based metrics use ``train``.

    ``scoring``: ``dense`` scores every item of the catalog per query
    (:meth:`RecommenderBase.recommend`); ``candidates`` scores only what a query can reach
    (:func:`recommend_candidates`, models with :func:`sparse_score_parts` only); ``auto``
    (default) takes ``candidates`` where the model allows it. Both give identical lists.
    """
    if task.n_queries == 0:
        raise ValueError(f"task {task.name!r} has no queries: nothing to evaluate")
    if scoring not in ("auto", "dense", "candidates"):
        raise ValueError(f"scoring must be auto, dense or candidates, got {scoring!r}")
    k_max = max(ks)
    cand = CandidateFilter(exclude_cart=True, exclude_owned=task.exclude_owned)
    parts = sparse_score_parts(model) if scoring != "dense" else None
    if scoring == "candidates" and parts is None:
        raise ValueError(f"{model.kind}: no candidate scoring, its scores are dense")
    if parts is not None:
        recommended, _ = recommend_candidates(model, task.users, task.carts, k_max, cand)
    else:
        recommended, _ = model.recommend(
            task.users, task.carts, k=k_max, candidates=cand, batch_size=batch_size
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


#: Query rows of a sparse score part: ``(users, carts) -> csr (n_queries, n_items)``.
SparseRows = Callable[[np.ndarray, sp.csr_matrix], sp.csr_matrix]


def sparse_score_parts(model: RecommenderBase) -> tuple[np.ndarray, SparseRows] | None:
    """``(base, rows)`` for a model whose scores are ``base[j] + rows(users, carts)[q, j]``
    with every stored value of ``rows`` >= 0; None for models whose rows are dense.

    Exactly the float32 arithmetic of the model's own ``score`` (the same expressions), so
    :func:`recommend_candidates` returns what ``recommend`` returns, bit for bit:

    - popularity: ``base`` = the popularity share, no rows;
    - re-buy (personal popularity): ``base`` = the popularity tie-breaker, rows = the
      user's re-buy scores (its history);
    - co-occurrence: ``base`` = the tie-breaker, rows = ``cart @ confidence`` (the cart
      items' kept neighbours).

    The add-on blend is not here: it min-max scales each component over the whole row, so
    its scores are not "a shared base plus a few non-negative entries".
    """
    n_items = getattr(model, "n_items_", 0)

    def no_rows(users: np.ndarray, carts: sp.csr_matrix) -> sp.csr_matrix:
        return sp.csr_matrix((len(users), n_items), dtype=np.float32)

    # exact classes: a subclass may score differently
    if type(model) is PopularityRecommender:
        return model.popularity_, no_rows
    if type(model) is PersonalPopularityRecommender:

        def rebuy(users: np.ndarray, carts: sp.csr_matrix) -> sp.csr_matrix:
            users = np.asarray(users, dtype=np.int64)
            known = users >= 0
            rows = model.user_scores_[np.maximum(users, 0)]
            return sp.csr_matrix(rows.multiply(known[:, None]), dtype=np.float32)

        return model.popularity_ * TIE_BREAK, rebuy
    if type(model) is CooccurrenceRecommender:

        def together(users: np.ndarray, carts: sp.csr_matrix) -> sp.csr_matrix:
            if not carts.nnz:
                return no_rows(users, carts)
            return sp.csr_matrix(sp.csr_matrix(carts, dtype=np.float32) @ model.confidence_)

        return model.popularity_ * TIE_BREAK, together
    return None


def _keys(m: sp.csr_matrix, n_items: int) -> np.ndarray:
    """``row * n_items + column`` of every stored entry of ``m`` (row-major order)."""
    m = sp.csr_matrix(m)
    rows = np.repeat(np.arange(m.shape[0], dtype=np.int64), np.diff(m.indptr))
    return rows * n_items + m.indices.astype(np.int64)


def _kth_largest(values: np.ndarray, indptr: np.ndarray, k: int) -> np.ndarray:
    """Per CSR row, the ``k``-th largest of its ``values`` (-inf for a row with fewer):
    rows padded to the longest one with -inf, then one ``np.partition``."""
    n = indptr.size - 1
    lengths = np.diff(indptr)
    width = int(lengths.max(initial=0))
    if width < k:
        return np.full(n, -np.inf, dtype=np.float32)
    padded = np.full((n, width), -np.inf, dtype=np.float32)
    rows = np.repeat(np.arange(n), lengths)
    padded[rows, np.arange(values.size) - indptr[rows]] = values
    return -np.partition(-padded, k - 1, axis=1)[:, k - 1]


def recommend_candidates(
    model: RecommenderBase,
    users: np.ndarray,
    carts: sp.csr_matrix,
    k: int,
    candidates: CandidateFilter | None = None,
    batch_size: int = 1024,
) -> tuple[np.ndarray, np.ndarray]:
    """The result of ``model.recommend(users, carts, k, candidates)``, computed from each
    query's candidates only (the model must have :func:`sparse_score_parts`).

    Why it is exact: outside the stored entries of its row, a query's score is ``base[j]``,
    and stored values are >= 0. Let ``H`` be the first ``k`` items of the base order
    (``base`` descending, lower index first) that the query does not exclude. Any other
    unexcluded item without a stored entry is beaten by all ``k`` items of ``H``, under the
    same tie rule as :func:`training.models.base.top_k` (a higher or equal score and, when
    equal, a lower index). So the top ``k`` lies in "stored entries + ``H``": those are
    scored exactly (``base + stored``, float32, as in ``score``) and sorted. Work per query
    is proportional to its stored entries, ``k`` and its excluded items, not to the catalog.
    """
    parts = sparse_score_parts(model)
    if parts is None:
        raise ValueError(f"{model.kind}: no candidate scoring, its scores are dense")
    cand = candidates or CandidateFilter()
    if cand.allow_items is not None or cand.block_items is not None:
        raise ValueError("recommend_candidates: allow/block lists need the dense path")
    base, sparse_rows = parts
    base = np.asarray(base, dtype=np.float32)
    model._check_fitted()
    n_items = model.n_items_
    users = np.asarray(users, dtype=np.int64)
    n = users.shape[0]
    carts = sp.csr_matrix(carts) if carts is not None else sp.csr_matrix((n, n_items))
    if carts.shape != (n, n_items):
        raise ValueError(f"carts must have shape ({n}, {n_items}), got {carts.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    order = np.lexsort((np.arange(n_items), -base))  # the base order, ties: lower index
    out_items = np.full((n, k), -1, dtype=np.int32)
    out_scores = np.full((n, k), -np.inf, dtype=np.float32)
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        u, c = users[start:stop], carts[start:stop]
        m = stop - start
        # excluded items: the same stored patterns as RecommenderBase.mask_per_query
        masks = []
        if cand.exclude_cart:
            masks.append(_keys(c, n_items))
        if cand.exclude_owned:
            masks.append(_keys(owned_rows(model.owned_, u), n_items))
        masked = np.unique(np.concatenate(masks)) if masks else np.zeros(0, np.int64)
        per_row = np.bincount(masked // n_items, minlength=m)
        # H: the first k unexcluded items of the base order
        width = min(n_items, k + int(per_row.max(initial=0)))
        head = order[:width]
        head_keys = np.arange(m, dtype=np.int64)[:, None] * n_items + head[None, :]
        free = ~in_sorted(head_keys, masked)
        free &= np.cumsum(free, axis=1) <= k
        h_keys = head_keys[free]  # row-major: sorted
        # stored entries, minus the excluded ones, scored as the model does
        s = sp.csr_matrix(sparse_rows(u, c), dtype=np.float32)
        s.sum_duplicates()  # canonical: sorted columns, one entry per item (as toarray sums)
        s_keys = _keys(s, n_items)  # sorted: rows in order, columns sorted within rows
        s_scores = base[s.indices] + s.data
        s_scores[in_sorted(s_keys, masked)] = -np.inf
        # only the k best stored entries of a row (ties at the k-th kept) can be in its top k
        s_keep = s_scores >= _kth_largest(s_scores, s.indptr, k)[s_keys // n_items]
        s_keep &= s_scores > -np.inf
        # an H item with a stored entry has its score there (kept above, or beaten k times)
        h_keys = h_keys[~in_sorted(h_keys, s_keys)]
        keys = np.concatenate([s_keys[s_keep], h_keys])
        scores = np.concatenate([s_scores[s_keep], base[h_keys % n_items]])
        rows, items = keys // n_items, keys % n_items
        sort = np.lexsort((items, -scores, rows))
        rows, items, scores = rows[sort], items[sort], scores[sort]
        first = np.searchsorted(rows, np.arange(m))
        rank = np.arange(rows.size) - first[rows]
        top = rank < k
        out_items[start + rows[top], rank[top]] = items[top]
        out_scores[start + rows[top], rank[top]] = scores[top]
    return out_items, out_scores
