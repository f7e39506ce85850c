"""One experiment end to end: data -> split -> fit -> evaluate. Used by the CLI and notebooks."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from features.dataset import Dataset
from features.errors import ConfigError
from features.loading import load_dataset
from features.splits import (
    RankingTask,
    TimeSplit,
    basket_completion_task,
    global_time_split,
    leave_last_basket_split,
    next_period_task,
    rolling_time_folds,
    stratified_split,
)
from training.config import ExperimentConfig, build_model
from training.evaluation.harness import Evaluation, evaluate
from training.models.base import RecommenderBase


@dataclass
class ExperimentResult:
    """Everything an evaluation run produced."""

    config: ExperimentConfig
    fingerprint: str
    data_report: dict[str, Any]
    split_stats: dict[str, Any]
    evaluations: list[Evaluation]
    timings: dict[str, float] = field(default_factory=dict)
    model: Any = None
    run_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.config.name,
            "model": {"kind": self.config.model.kind, "params": self.config.model.params},
            "fingerprint": self.fingerprint,
            "data_report": self.data_report,
            "protocol": describe_protocol(self.config),
            "split": self.split_stats,
            "evaluations": [e.to_dict() for e in self.evaluations],
            "timings_seconds": self.timings,
            **({"run_id": self.run_id} if self.run_id else {}),
        }

    def format_table(self) -> str:
        ks = sorted(self.config.evaluation.k)
        lines = [
            f"experiment: {self.config.name}   model: {self.config.model.kind} "
            f"{self.config.model.params or ''}",
            f"data fingerprint: {self.fingerprint[:16]}",
            f"protocol: {describe_protocol(self.config)['summary']}",
        ]
        test = self.split_stats.get("test")
        if test:
            cold = test["cold_users"]
            lines.append(
                f"{'test window' if self.config.split.kind == 'time' else 'test part'}: "
                f"{test['baskets']:,} baskets of {test['users']:,} users; {cold:,} "
                f"cold user{'' if cold == 1 else 's'} (no train history) dropped from every task"
            )
        for ev in self.evaluations:
            lines.append("")
            owned = ", train items excluded" if ev.exclude_owned else ""
            lines.append(
                f"task: {ev.task} ({ev.n_queries:,} queries, averaged by {ev.average}{owned})"
            )
            header = f"{'metric':<22}" + "".join(f"{'@' + str(k):>10}" for k in ks)
            lines.append(header)
            lines.append("-" * len(header))
            for name in self.config.evaluation.metrics:
                row = f"{name:<22}"
                for k in ks:
                    value = ev.metrics.get(f"{name}@{k}")
                    row += f"{'n/a':>10}" if value is None else f"{value:>10.4f}"
                if name in ev.not_applicable:
                    row += f"  ({ev.not_applicable[name]})"
                lines.append(row)
        lines.append("")
        lines.append("time: " + ", ".join(f"{k} {v:.2f} s" for k, v in self.timings.items()))
        if self.run_id:
            lines.append(f"mlflow run id: {self.run_id}")
        return "\n".join(lines)


def format_comparison(
    results: list[ExperimentResult],
    metrics: tuple[str, ...] = ("recall@10", "ndcg@10", "hit_rate@10"),
) -> str:
    """One table: a row per run, columns ``task metric``; the best value per column marked ``*``."""
    tasks = [e.task for e in results[0].evaluations]
    cols = [(t, m) for t in tasks for m in metrics]
    values = {
        r.config.name: {
            (e.task, m): e.metrics.get(m, float("nan")) for e in r.evaluations for m in metrics
        }
        for r in results
    }
    best = {c: max(v.get(c, float("-inf")) for v in values.values()) for c in cols}
    width = max(len(n) for n in values) + 2
    lines = ["comparison (same data, split and protocol):"]
    for task in tasks:
        header = f"{task:<{width}}" + "".join(f"{m:>14}" for m in metrics)
        lines += ["", header, "-" * len(header)]
        for name, v in values.items():
            cells = "".join(
                f"{v[(task, m)]:>13.4f}{'*' if v[(task, m)] == best[(task, m)] else ' '}"
                for m in metrics
            )
            lines.append(f"{name:<{width}}{cells}")
    return "\n".join(lines)


def make_split(config: ExperimentConfig, data: Dataset) -> TimeSplit:
    """The configured split of ``data`` (``split.kind``: time, stratified, leave_last_basket)."""
    s = config.split
    if s.kind == "stratified":
        assert s.ratio is not None  # required for this kind (checked in the config)
        return stratified_split(data, s.ratio, s.seed)
    if s.kind == "leave_last_basket":
        return leave_last_basket_split(data)
    return global_time_split(data, s.train_end, s.test_start, s.validation_start, s.column)


def validation_folds(config: ExperimentConfig, data: Dataset) -> list[TimeSplit]:
    """The splits a tuning objective scores, never touching test: in each, ``train`` is what a
    trial fits on and ``test`` the validation part it is scored on (the same tasks as
    :func:`make_task` builds for evaluation).

    - ``time``: ``split.validation_folds`` (default 1) consecutive windows of equal length
      covering ``split.validation_start`` .. ``train_end``, oldest first, each fitted on
      every row before its window (:func:`features.splits.rolling_time_folds`);
      ``split.validation_start`` is required.
    - ``stratified``: one fold, the same per-user rule applied to train.
    - ``leave_last_basket``: one fold, each user's second-to-last basket.
    """
    s = config.split
    if s.kind == "time":
        if s.validation_start is None:
            raise ConfigError(
                "split.validation_start", "tuning needs a validation window at the end of train"
            )
        make_split(config, data)  # the bounds' own checks (test after train, ...)
        return rolling_time_folds(
            data, s.validation_start, s.train_end, s.validation_folds or 1, s.column
        )
    split = make_split(config, data)
    if split.validation is None or split.train_before_validation is None:
        key = "split.ratio" if s.kind == "stratified" else "split.kind"
        raise ConfigError(key, "train leaves no validation part for tuning (too few rows)")
    fold = TimeSplit(
        split.train_before_validation,
        split.validation,
        None,
        None,
        {"train": split.stats["train_before_validation"], "test": split.stats["validation"]},
    )
    return [fold]


def next_period_excludes_owned(config: ExperimentConfig) -> bool:
    """``evaluation.exclude_owned``; unset, on for a stratified split (the standard protocol)."""
    ev = config.evaluation
    return ev.exclude_owned if ev.exclude_owned is not None else config.split.kind == "stratified"


def describe_protocol(config: ExperimentConfig) -> dict[str, Any]:
    """The protocol a run used, for its JSON and table: split kind and its keys, and per task
    whether train items are excluded from the ranking."""
    s = config.split
    split: dict[str, Any] = {"kind": s.kind}
    if s.kind == "time":
        split.update(
            time_column=s.column,
            train_end=str(s.train_end),
            test_start=str(s.test_start),
            validation_start=None if s.validation_start is None else str(s.validation_start),
            validation_folds=s.validation_folds or 1,
        )
        summary = (
            f"global time split on {s.column} (train <= {s.train_end}, test >= {s.test_start})"
        )
    elif s.kind == "stratified":
        split["ratio"] = s.ratio
        summary = f"stratified per-user random split ({s.ratio} of each user's rows to train)"
    else:
        summary = "leave-last-basket-out per user"
    split["seed"] = s.seed
    exclude = {
        "basket_completion": False,
        "basket_completion_new": True,
        "next_period": next_period_excludes_owned(config),
    }
    tasks = {t: {"exclude_owned": exclude[t]} for t in config.evaluation.tasks}
    if tasks.get("next_period", {}).get("exclude_owned"):
        summary += "; next_period ranks every item the user has not got in train"
    return {"split": split, "tasks": tasks, "summary": f"{summary}, seed {s.seed}"}


def make_task(name: str, split: TimeSplit, config: ExperimentConfig) -> RankingTask:
    """One evaluation task (``basket_completion``, ``basket_completion_new``, ``next_period``)."""
    s = config.split
    if name == "next_period":
        return next_period_task(split.train, split.test, next_period_excludes_owned(config))
    return basket_completion_task(
        split.train,
        split.test,
        seed=s.seed,
        min_known_items=s.min_known_items,
        new_to_user=name == "basket_completion_new",
    )


def run_evaluation(
    config: ExperimentConfig,
    on_split: Callable[[Dataset, TimeSplit], None] | None = None,
    on_fitted: Callable[[RecommenderBase], None] | None = None,
) -> ExperimentResult:
    """Load the data, split it, fit the model on train and evaluate every configured task.

    Hooks for the training command: ``on_split(data, split)`` before fitting (logs the data
    report), ``on_fitted(model)`` after (saves the model).
    """
    from training.progress import bar

    timings: dict[str, float] = {}
    stages = bar(total=3 + len(config.evaluation.tasks), desc="experiment", unit="stage")
    t = time.perf_counter()
    data = load_dataset(config.data)
    timings["load"] = time.perf_counter() - t
    stages.update(1)

    t = time.perf_counter()
    split = make_split(config, data)
    tasks = [make_task(name, split, config) for name in config.evaluation.tasks]
    for task in tasks:
        if task.n_queries == 0:
            raise ConfigError(
                "split",
                f"task {task.name!r} has no queries: no test basket/user of a warm user with "
                f">= {config.split.min_known_items} known items in the test part",
            )
    timings["split"] = time.perf_counter() - t
    stages.update(1)
    if on_split is not None:
        on_split(data, split)
    fingerprint, report = data.fingerprint, data.report.to_dict()
    # The fit and the evaluation read train and test only: the whole table and the validation
    # parts (copies of most of train, for tuning) are not held through the fit's memory peak.
    del data
    split = replace(split, validation=None, train_before_validation=None)

    t = time.perf_counter()
    model = build_model(config.model).fit(split.train)
    timings["fit"] = time.perf_counter() - t
    stages.update(1)
    if on_fitted is not None:
        on_fitted(model)

    t = time.perf_counter()
    ev = config.evaluation
    evaluations = []
    for task in tasks:
        evaluations.append(
            evaluate(model, task, split.train, ev.k, ev.metrics, ev.average, ev.category_level)
        )
        stages.update(1)
    stages.close()
    timings["evaluate"] = time.perf_counter() - t
    result = ExperimentResult(
        config,
        fingerprint,
        report,
        {name: vars(stats) for name, stats in split.stats.items()},
        evaluations,
        {k: round(v, 3) for k, v in timings.items()},
    )
    result.model = model
    return result
