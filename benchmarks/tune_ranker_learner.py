"""Does tuning the learned ranker's LightGBM settings pay? On VALIDATION (never test).

The ranker's fit builds its training and validation rows once (candidates and features of
the training window's baskets, the expensive part) and then trains the trees. This script
fits the config's ranker once, keeps the rows the learner received, and searches LightGBM's
settings on those same rows with Optuna (TPE, seeded): each trial trains the trees and scores
the fit's own validation NDCG@10 against the whole held-out part
(``RankerRecommender._full_validation``, the numbers ``validation_`` reports). The objective
is ``basket_completion + 2 x basket_completion_new`` (the new-to-user number is about a third
of the other; both count). Then the best trial and the config's own settings are re-trained
with ``--seeds`` LightGBM seeds: a search over a flat landscape picks a lucky seed (the
winner's curse), so only the difference of the seed means says whether tuning pays.

Usage::

    python benchmarks/tune_ranker_learner.py --config configs/cj_ranker.yaml --trials 60

Prints JSON (and writes it with ``--out``). One thread; about 20-45 CPU seconds a trial on
Complete Journey after a 70 s fit.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from features.io import atomic_write_text  # noqa: E402
from features.loading import load_dataset  # noqa: E402
from training.config import build_model, load_config  # noqa: E402
from training.experiment import make_split  # noqa: E402
from training.models.ranker import RankerRecommender  # noqa: E402

TASKS = ("basket_completion", "basket_completion_new")


def learner_inputs(model: RankerRecommender, train: Any) -> tuple[list[dict], Any]:
    """Fit ``model`` on ``train`` and return what its learner received (rows, validation
    baskets), untouched by the learner (it pops the row chunks)."""
    captured: list[Any] = []
    learner = model._train_learner

    def keep(parts: list[dict], valid_baskets: Any) -> Any:
        captured.append(copy.deepcopy((parts, valid_baskets)))
        return learner(parts, valid_baskets)

    model._train_learner = keep  # type: ignore[method-assign]
    model.fit(train)
    del model._train_learner
    return captured[0]


def score(model: RankerRecommender, rows: tuple[list[dict], Any], **params: Any) -> dict:
    """Validation NDCG@10 per task, trees and learner CPU seconds of ``model`` with
    ``params`` set, trained on a copy of ``rows``."""
    trial = copy.copy(model)
    for key, value in params.items():
        setattr(trial, key, value)
    parts, valid_baskets = copy.deepcopy(rows)
    cpu = time.process_time()
    _, valid = trial._train_learner(parts, valid_baskets)
    out = {task: round(valid[f"{task}_ndcg_at_10"], 4) for task in TASKS}
    out.update(trees=valid["best_iteration"], cpu_seconds=round(time.process_time() - cpu, 1))
    return out


def objective_value(result: dict) -> float:
    return result["basket_completion"] + 2 * result["basket_completion_new"]


def main(argv: list[str] | None = None) -> int:
    import optuna

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], help="config override, key=value")
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the final comparison")
    parser.add_argument("--sampler-seed", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    config = load_config(args.config, args.set)
    split = make_split(config, load_dataset(config.data))
    model = build_model(config.model)
    started = time.perf_counter()
    rows = learner_inputs(model, split.train)
    fit_seconds = time.perf_counter() - started

    def trial_params(trial: optuna.Trial) -> dict[str, Any]:
        return {
            "learning_rate": trial.suggest_float("learning_rate", 0.03, 0.15, log=True),
            "num_leaves": trial.suggest_int("num_leaves", 15, 255, log=True),
            "min_data_in_leaf": trial.suggest_int("min_data_in_leaf", 10, 400, log=True),
            "feature_fraction": trial.suggest_float("feature_fraction", 0.4, 1.0),
            "bagging_fraction": trial.suggest_float("bagging_fraction", 0.5, 1.0),
            "lambda_l2": trial.suggest_float("lambda_l2", 1e-3, 100, log=True),
            "min_sum_hessian_in_leaf": trial.suggest_float(
                "min_sum_hessian_in_leaf", 1e-3, 10, log=True
            ),
            "truncation_level": trial.suggest_int("truncation_level", 10, 60),
            "n_estimators": 600,
        }

    def objective(trial: optuna.Trial) -> float:
        result = score(model, rows, **trial_params(trial))
        trial.set_user_attr("result", result)
        print(trial.number, json.dumps(result), flush=True)
        return objective_value(result)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize",
                                sampler=optuna.samplers.TPESampler(seed=args.sampler_seed))  # fmt: skip
    study.optimize(objective, n_trials=args.trials)
    best = dict(study.best_params, n_estimators=600)
    repeats = {"config": [], "best_trial": []}
    for seed in range(model.seed, model.seed + args.seeds):
        repeats["config"].append(score(model, rows, seed=seed))
        repeats["best_trial"].append(score(model, rows, seed=seed, **best))
    means = {
        name: {task: round(sum(r[task] for r in runs) / len(runs), 4) for task in TASKS}
        for name, runs in repeats.items()
    }
    report = {
        "config": args.config, "overrides": args.set, "fit_seconds": round(fit_seconds, 1),
        "trials": args.trials, "best_trial": {"params": best,
                                              "result": study.best_trial.user_attrs["result"]},
        "seed_repeats": repeats, "seed_means": means,
        "all_trials": [{"params": t.params, "result": t.user_attrs.get("result")}
                       for t in study.trials],
    }  # fmt: skip
    text = json.dumps(report, indent=2)
    print(json.dumps({k: report[k] for k in ("best_trial", "seed_repeats", "seed_means")}))
    if args.out:
        atomic_write_text(args.out, text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
