"""Tuned vs default on full Complete Journey, for every tunable model kind (issue 9).

For each config: ``addons tune`` in-process (``run_tune``, the command's own code) with the
same trial budget ``--trials N`` for every kind, trial 0 being the config's own values
(``TuneOptions.enqueue_config``), then ``--refit`` (the tuned config trained like ``addons
train``: fit on all of train, test evaluated once) and an ``addons train`` run of the default
config. Reported per kind:

- validation (the tuning objective's fold, weeks ``validation_start .. train_end``) and test
  NDCG@10 / Recall@10 for ``basket_completion`` and ``basket_completion_new``, default vs
  tuned; the validation numbers of trial 0 (default) and of the best trial are computed by
  the harness on the fold, right after the trial's fit (their time is not counted below);
- trials per hour: trials / wall time of the tune (without the refit);
- tuning overhead: wall time of the tune / sum of the trials' fit + evaluate time (the
  objective's calls), with and without the fixed setup (data load, folds, tasks, study);
- pruning (``--pruning-trials M``, ALS): the same study with the config's median pruner and
  with ``pruner: none``, same seed; wall time, pruned trials, epochs not run.

Usage::

    OPENBLAS_NUM_THREADS=1 nice -n 5 python benchmarks/bench_tuning.py --trials 5 \\
        [--only cj_als cj_ease ...] [--pruning-trials 12] [--out bench_tuning.json]

Results and the exact command: docs/quality.md, *Tuned vs default*.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import training.tuning as tuning  # noqa: E402
from training.config import load_config  # noqa: E402

#: One config per tunable kind (issue 9's list).
CONFIGS = ("cj_als", "cj_bpr", "cj_lmf", "cj_item_knn_bm25", "cj_ease", "cj_lightfm",
           "cj_lightfm_hybrid", "cj_addon")  # fmt: skip
TASKS = ("basket_completion", "basket_completion_new")
METRICS = ("ndcg", "recall")
K = 10


class Probe:
    """Instruments the tuning objective of this process: the time of each objective call
    (fit + evaluate), and the validation metrics of every fully fitted trial model."""

    def __init__(self) -> None:
        self.reset()
        real_init, real_call = tuning.Objective.__init__, tuning.Objective.__call__
        real_build = tuning.build_model
        probe = self

        def init(obj: Any, config: Any, folds: list[Any]) -> None:
            real_init(obj, config, folds)
            probe.objective = obj
            probe.tasks = {}

        def call(obj: Any, trial: Any) -> float:
            probe.trial = trial.number
            started = time.perf_counter()
            probe.first_call = probe.first_call or started
            try:
                return real_call(obj, trial)
            finally:
                probe.last_call = time.perf_counter()
                probe.objective_seconds += probe.last_call - started

        def build(model_config: Any) -> Any:
            model = real_build(model_config)
            real_fit = model.fit

            def fit(data: Any, epoch_callback: Any = None) -> Any:
                out = real_fit(data, epoch_callback=epoch_callback)
                probe.extra(model, data)  # reached only when the trial was not pruned
                return out

            model.fit = fit
            return model

        tuning.Objective.__init__ = init  # type: ignore[method-assign]
        tuning.Objective.__call__ = call  # type: ignore[method-assign]
        tuning.build_model = build

    def reset(self) -> None:
        self.objective: Any = None
        self.tasks: dict[tuple[int, str], Any] = {}
        self.trial = -1
        self.objective_seconds = self.extra_seconds = 0.0
        self.first_call = self.last_call = 0.0
        self.validation: dict[int, dict[str, list[float]]] = {}

    def extra(self, model: Any, data: Any) -> None:
        """NDCG@10 / Recall@10 of both basket tasks on this fold's validation part."""
        from training.evaluation.harness import evaluate
        from training.experiment import make_task

        started = time.perf_counter()
        obj = self.objective
        fold = next(i for i, f in enumerate(obj.folds) if f.train is data)
        ev = obj.config.evaluation
        out = self.validation.setdefault(self.trial, {})
        for task in TASKS:
            if (fold, task) not in self.tasks:
                self.tasks[fold, task] = make_task(task, obj.folds[fold], obj.config)
            result = evaluate(model, self.tasks[fold, task], obj.folds[fold].train, [K],
                              list(METRICS), ev.average, ev.category_level)  # fmt: skip
            for metric in METRICS:
                out.setdefault(f"{task}/{metric}@{K}", []).append(
                    float(result.metrics[f"{metric}@{K}"])
                )
        self.extra_seconds += time.perf_counter() - started


def _test_metrics(evaluations: Any) -> dict[str, float]:
    return {f"{e.task}/{m}@{K}": float(e.metrics[f"{m}@{K}"])
            for e in evaluations if e.task in TASKS for m in METRICS}  # fmt: skip


def _mean(values: dict[str, list[float]]) -> dict[str, float]:
    return {k: sum(v) / len(v) for k, v in values.items()}


def bench_kind(name: str, trials: int, work: Path, probe: Probe) -> dict[str, Any]:
    """Default vs tuned for one config (see the module doc)."""
    import mlflow

    import training.train as train

    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    config = load_config(ROOT / "configs" / f"{name}.yaml")
    probe.reset()
    refit_seconds = [0.0]
    real_training = train.run_training

    def timed_training(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return real_training(*args, **kwargs)
        finally:
            refit_seconds[0] += time.perf_counter() - started

    train.run_training = timed_training
    try:
        tune_started = time.perf_counter()
        result = tuning.run_tune(config, tuning.TuneOptions(
            trials=trials, storage=f"sqlite:///{folder / 'optuna.db'}", study=name,
            refit=True, out=str(folder / f"{name}_tuned.yaml"), tracking_uri=uri,
            experiment="bench-tuning", enqueue_config=True,
        ))  # fmt: skip
        total = time.perf_counter() - tune_started
    finally:
        train.run_training = real_training
    tune_wall = total - refit_seconds[0] - probe.extra_seconds
    objective = probe.objective_seconds - probe.extra_seconds
    loop_wall = probe.last_call - probe.first_call - probe.extra_seconds
    started = time.perf_counter()
    default_run = real_training(config, uri, "bench-tuning")
    default_seconds = time.perf_counter() - started
    refit = mlflow.MlflowClient(uri).get_run(result.refit["run_id"]) if result.refit else None
    tuned_test = {
        f"{t}/{m}@{K}": refit.data.metrics[f"{t}/{m}_at_{K}"] for t in TASKS for m in METRICS
    } if refit else {}  # fmt: skip
    finished = result.counts["complete"] + result.counts["pruned"]
    return {
        "config": name,
        "kind": config.model.kind,
        "trials": finished,
        "pruned": result.counts["pruned"],
        "best_trial": result.best_trial,
        "best_params": result.best_params,
        "validation": {
            "default": _mean(probe.validation.get(0, {})),
            "tuned": _mean(probe.validation.get(result.best_trial, {})),
            "objective_default": _trial_value(folder, name, 0),
            "objective_tuned": result.best_value,
        },
        "test": {"default": _test_metrics(default_run.evaluations), "tuned": tuned_test},
        "seconds": {
            "tune_wall": round(tune_wall, 2),
            "trial_loop_wall": round(loop_wall, 2),
            "objective_sum": round(objective, 2),
            "setup": round(probe.first_call - tune_started, 2),
            "refit": round(refit_seconds[0], 2),
            "default_train": round(default_seconds, 2),
            "validation_extras_not_counted": round(probe.extra_seconds, 2),
        },
        "overhead": round(tune_wall / objective, 3) if objective else None,
        "loop_overhead": round(loop_wall / objective, 3) if objective else None,
        "trials_per_hour": round(finished / tune_wall * 3600, 1) if tune_wall else None,
    }


def _trial_value(folder: Path, name: str, number: int) -> float | None:
    import optuna

    study = optuna.load_study(study_name=name, storage=f"sqlite:///{folder / 'optuna.db'}")
    trial = next((t for t in study.trials if t.number == number), None)
    return None if trial is None else trial.value


def sliced(config: Any, households: int, folder: Path) -> Any:
    """``config`` on the first ``households`` Complete Journey households (all their
    baskets), written as files (as notebooks/tuning.ipynb does)."""
    import dataclasses

    import polars as pl

    from features.adapters import load_complete_journey
    from features.loading import DataConfig, FileSpec

    raw = load_complete_journey()
    keep = raw.interactions["user_id"].unique().sort().head(households)
    raw.interactions.filter(pl.col("user_id").is_in(keep.implode())).write_parquet(
        folder / "tx.parquet"
    )
    raw.items.write_parquet(folder / "items.parquet")
    data = DataConfig(source="files", interactions=FileSpec(path=str(folder / "tx.parquet")),
                      items=FileSpec(path=str(folder / "items.parquet")),
                      cleaning=config.data.cleaning)  # fmt: skip
    return dataclasses.replace(config, data=data)


def bench_pruning(
    name: str,
    trials: int,
    work: Path,
    probe: Probe,
    only: str | None = None,
    households: int = 0,
) -> dict[str, Any]:
    """The same study with the config's pruner and with ``pruner: none`` (same seed);
    ``only``: one of the two (run the other in a second process); ``households``: on that
    many households only (0: all)."""
    import optuna

    out: dict[str, Any] = {"config": name, "trials": trials, "households": households or None}
    for label, overrides in (("pruned", []), ("unpruned", ["tune.pruner.kind=none"])):
        if only not in (None, label):
            continue
        folder = work / f"pruning-{label}"
        folder.mkdir(parents=True, exist_ok=True)
        config = load_config(ROOT / "configs" / f"{name}.yaml", overrides)
        if households:
            config = sliced(config, households, folder)
        probe.reset()
        started = time.perf_counter()
        result = tuning.run_tune(config, tuning.TuneOptions(
            trials=trials, storage=f"sqlite:///{folder / 'optuna.db'}", study=name,
            out=str(folder / "tuned.yaml"), tracking_uri=f"sqlite:///{folder / 'mlflow.db'}",
            experiment="bench-tuning",
        ))  # fmt: skip
        wall = time.perf_counter() - started - probe.extra_seconds
        study = optuna.load_study(study_name=name, storage=f"sqlite:///{folder / 'optuna.db'}")
        epochs_run = epochs_full = 0
        for t in study.trials:
            full = t.params.get("iterations", config.model.params.get("iterations"))
            full = full or t.params.get("epochs", config.model.params.get("epochs"))
            epochs_full += int(full)
            epochs_run += int(t.last_step) if t.state.name == "PRUNED" else int(full)
        out[label] = {
            "wall": round(wall, 2),
            "objective_sum": round(probe.objective_seconds - probe.extra_seconds, 2),
            "pruned": result.counts["pruned"],
            "complete": result.counts["complete"],
            "best_value": result.best_value,
            "epochs_run": epochs_run,
            "epochs_full": epochs_full,
        }
    if only is None:
        p, u = out["pruned"], out["unpruned"]
        out["wall_saved_fraction"] = round(1 - p["wall"] / u["wall"], 3) if u["wall"] else None
    return out


def bench_addon_grid(
    households: int, cap: int, seed: int = 42, queries: int | None = None
) -> dict[str, Any]:
    """The add-on scorer's weight grid vs an Optuna study over the same weights and damping.

    Both score points with the model's own ``AddonScorer._tune`` (the components fitted once
    on the data before its validation window, then cached: the fit is common to both and not
    timed). The grid scores its 4 dampings x 15 simplex points; the study (TPE, seeded) draws
    three weights in [0, 1] (the blend's ranking ignores their scale) and a damping from the
    same list, one point per ``_tune`` call, until it reaches the grid's best value or
    ``cap`` trials.
    """
    import optuna
    import polars as pl

    from features.loading import load_dataset
    from training.experiment import make_split
    from training.models.addon import DAMPING_GRID, AddonScorer

    config = load_config(ROOT / "configs" / "cj_addon.yaml")
    data = load_dataset(config.data)
    keep = data.interactions["user_id"].unique().sort().head(households)
    train = make_split(config, data.restrict(pl.col("user_id").is_in(keep.implode()))).train
    params = dict(config.model.params)
    if queries:
        params["tuning_queries"] = queries
    cache: dict[str, Any] = {}
    real_fit = AddonScorer.fit

    def fit(self: Any, fit_data: Any, epoch_callback: Any = None) -> Any:
        inner = self.cooccurrence_damping is not None and self.rebuy_weight is not None
        if inner and cache.get("data") is fit_data:  # the components before the window
            self.__dict__.update(cache["state"])
            self.components_[1].confidence_ = cache["confidence"].copy()
            return self
        out = real_fit(self, fit_data, epoch_callback)
        if inner:
            cache.update(data=fit_data, state=dict(self.__dict__),
                         confidence=self.components_[1].confidence_.copy())  # fmt: skip
        return out

    AddonScorer.fit = fit  # type: ignore[method-assign]
    try:
        key = f"ndcg@{params.get('tuning_k', 10)}"
        started = time.perf_counter()
        AddonScorer(**params)._tune(train)  # fits and caches the components (not timed)
        fit_seconds = time.perf_counter() - started
        started = time.perf_counter()
        _, _, grid = AddonScorer(**params)._tune(train)
        grid_seconds = time.perf_counter() - started
        grid_best = max(r[key] for r in grid)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(direction="maximize",
                                    sampler=optuna.samplers.TPESampler(seed=seed))  # fmt: skip
        reached: dict[str, Any] = {}
        started = time.perf_counter()
        for number in range(cap):
            trial = study.ask()
            w = [trial.suggest_float(n, 0.0, 1.0) for n in ("rebuy", "cooccurrence", "cf")]
            damping = trial.suggest_categorical("damping", list(DAMPING_GRID))
            if sum(w) == 0:
                w = [1.0, 1.0, 1.0]
            point = AddonScorer(**{**params, "rebuy_weight": w[0], "cooccurrence_weight": w[1],
                                   "cf_weight": w[2], "cooccurrence_damping": damping})  # fmt: skip
            value = point._tune(train)[2][0][key]
            study.tell(trial, value)
            if value >= grid_best and not reached:
                reached = {"trials": number + 1, "seconds": time.perf_counter() - started}
            print(f"optuna trial {number}: {value:.4f} (grid best {grid_best:.4f}, grid "
                  f"{grid_seconds:.1f} s)", file=sys.stderr, flush=True)  # fmt: skip
        optuna_seconds = time.perf_counter() - started
    finally:
        AddonScorer.fit = real_fit  # type: ignore[method-assign]
    return {
        "households": households, "train_rows": train.interactions.height,
        "tuning_queries": params["tuning_queries"],
        "component_fit_seconds": round(fit_seconds, 2),
        "grid": {"points": len(grid), "seconds": round(grid_seconds, 2), "best": grid_best},
        "optuna": {"trials": cap, "seconds": round(optuna_seconds, 2),
                   "best": study.best_value, "reached_grid_best": reached or None,
                   "seconds_per_trial": round(optuna_seconds / cap, 3)},
        "grid_seconds_per_point": round(grid_seconds / len(grid), 3),
    }  # fmt: skip


def markdown(results: list[dict[str, Any]], pruning: dict[str, Any] | None, trials: int) -> str:
    """The docs/quality.md tables."""
    lines = ["| config | trials | task | val NDCG@10 default → tuned | val Recall@10 default → "
             "tuned | test NDCG@10 default → tuned | test Recall@10 default → tuned |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        for task in TASKS:
            cells = []
            for part in ("validation", "test"):
                for m in METRICS:
                    key = f"{task}/{m}@{K}"
                    d, t = r[part]["default"].get(key), r[part]["tuned"].get(key)
                    cells.append("n/a" if d is None or t is None else f"{d:.4f} → {t:.4f}"
                                 + (" ▲" if t > d else " ▼" if t < d else " ="))  # fmt: skip
            lines.append(f"| {r['config']} | {r['trials']} ({r['pruned']} pruned) | {task} | "
                         + " | ".join(cells) + " |")  # fmt: skip
    lines += ["", "| config | best trial | tune wall s | fit+evaluate s | overhead | "
              "trial loop overhead | trials / hour | refit s |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        s = r["seconds"]
        lines.append(f"| {r['config']} | {r['best_trial']} | {s['tune_wall']:.0f} | "
                     f"{s['objective_sum']:.0f} | {r['overhead']:.2f} | {r['loop_overhead']:.2f} "
                     f"| {r['trials_per_hour']:.0f} | {s['refit']:.0f} |")  # fmt: skip
    if pruning and "pruned" in pruning and "unpruned" in pruning:
        p, u = pruning["pruned"], pruning["unpruned"]
        lines += ["", "| pruner | trials | pruned | epochs run / full | best value | tune wall s |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for label, row in (("median", p), ("none", u)):
            lines.append(f"| {label} | {pruning['trials']} | {row['pruned']} | "
                         f"{row['epochs_run']} / {row['epochs_full']} | {row['best_value']:.4f} "
                         f"| {row['wall']:.0f} |")  # fmt: skip
    lines.append(f"\nBudget: {trials} trials per kind (trial 0 = the config's own values).")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5, help="trials per kind (same for all)")
    parser.add_argument("--only", nargs="*", help="config names (default: one per kind)")
    parser.add_argument("--pruning-trials", type=int, default=0,
                        help="trials of the ALS pruning comparison (0: skip)")  # fmt: skip
    parser.add_argument("--pruning-config", default="cj_als")
    parser.add_argument(
        "--pruning-households",
        type=int,
        default=0,
        help="the pruning comparison on the first N households (0: all)",
    )
    parser.add_argument("--pruning-only", choices=("pruned", "unpruned"),
                        help="run one side of the pruning comparison")  # fmt: skip
    parser.add_argument("--addon-grid", type=int, default=0, metavar="HOUSEHOLDS",
                        help="compare the add-on weight grid with an Optuna study on the "
                        "first HOUSEHOLDS households (0: skip)")  # fmt: skip
    parser.add_argument("--addon-grid-trials", type=int, default=60)
    parser.add_argument("--addon-grid-queries", type=int, help="tuning_queries (default: config)")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--work", help="folder for the studies and MLflow stores (default tmp)")
    args = parser.parse_args()
    probe = Probe()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-tuning-"))
    results = []
    out: dict[str, Any] = {"machine": f"{platform.machine()} ({os.cpu_count()} cores)",
                           "trials": args.trials, "results": results, "pruning": None}  # fmt: skip
    for name in CONFIGS if args.only is None else args.only:
        started = time.perf_counter()
        results.append(bench_kind(name, args.trials, work, probe))
        print(f"{name}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        _save(args.out, out)
    if args.pruning_trials:
        out["pruning"] = bench_pruning(args.pruning_config, args.pruning_trials, work, probe,
                                       args.pruning_only, args.pruning_households)  # fmt: skip
        _save(args.out, out)
    if args.addon_grid:
        out["addon_grid"] = bench_addon_grid(args.addon_grid, args.addon_grid_trials,
                                             queries=args.addon_grid_queries)  # fmt: skip
        _save(args.out, out)
        print(json.dumps(out["addon_grid"], indent=1))
    print(markdown(results, out["pruning"], args.trials))
    return 0


def _save(path: str | None, out: dict[str, Any]) -> None:
    if path:
        from features.io import atomic_write_text

        atomic_write_text(path, json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    sys.exit(main())
