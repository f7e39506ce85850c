"""Robustness of the learned ranker beyond Complete Journey, on VALIDATION (never test).

For one dataset config (a ``configs/*_ranker.yaml``), every model below is fitted on the part
of train before the validation window and scored on the validation part, exactly as
``addons tune`` scores a trial (:func:`training.experiment.validation_folds`: a time split's
``split.validation_start`` .. ``train_end`` window; a stratified split's per-user rule applied
to train). The baselines reuse the data, split and evaluation sections of the ranker's config
and take their ``model`` section from the Complete Journey config of their kind
(``configs/cj_<kind>.yaml``, the product defaults), so the comparison changes the model only.

Per task the table gives the ranker, the best baseline and which one it was; the goal
(issue 10) is that the ranker never loses to the best baseline.

Usage::

    python benchmarks/bench_ranker_robust.py --config configs/synth_ranker.yaml
    python benchmarks/bench_ranker_robust.py --config configs/ml100k_ranker.yaml \
        --set data.path=/tmp/ml-like --movielens-like /tmp/ml-like

``--movielens-like DIR`` first writes a MovieLens-100K-shaped folder (``u.data``, ``u.item``,
``u.user`` in the real formats: 943 users, 1,682 movies, about 100,000 ratings, Zipf
popularity, genre tastes, at most one rating per user and movie, rating sessions by day)
because the real files are not on this machine. Prints JSON (and writes it with ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from features.io import atomic_write_text  # noqa: E402
from features.loading import load_dataset  # noqa: E402
from training.config import build_model, load_config  # noqa: E402
from training.evaluation.harness import evaluate  # noqa: E402
from training.experiment import make_task, validation_folds  # noqa: E402

#: The baselines, by kind; their params come from configs/cj_<kind>.yaml.
BASELINES = ("popularity", "personal_popularity", "cooccurrence", "item_knn", "als", "addon")


def write_movielens_like(folder: Path, seed: int = 0) -> Path:
    """A MovieLens-100K-shaped folder in the real file formats (module docstring)."""
    from features.adapters.movielens import GENRES

    rng = np.random.default_rng(seed)
    n_users, n_items, n_genres = 943, 1682, len(GENRES)
    folder.mkdir(parents=True, exist_ok=True)
    genre = rng.integers(0, n_genres, size=n_items)
    popularity = 1.0 / (rng.permutation(n_items) + 1.0) ** 0.9
    start = datetime(1997, 9, 20, tzinfo=UTC)
    lines = []
    for user in range(1, n_users + 1):
        # ratings per user: 20 .. ~700, heavy-tailed like ML-100K (mean about 106)
        n = int(min(n_items // 2, 20 + rng.lognormal(3.6, 1.0)))
        taste = rng.dirichlet(np.full(n_genres, 0.3))
        weight = popularity * (0.2 + taste[genre])
        movies = rng.choice(n_items, size=n, replace=False, p=weight / weight.sum()) + 1
        days = np.sort(rng.choice(210, size=max(1, n // 15), replace=False))
        for movie, day in zip(movies, rng.choice(days, size=n), strict=True):
            when = start + timedelta(days=int(day), seconds=int(rng.integers(0, 7200)))
            lines.append(f"{user}\t{movie}\t{int(rng.integers(1, 6))}\t{int(when.timestamp())}")
    atomic_write_text(folder / "u.data", "\n".join(lines) + "\n")
    items = []
    for item in range(1, n_items + 1):
        flags = ["0"] * n_genres
        flags[int(genre[item - 1])] = "1"
        items.append(f"{item}|Movie {item} (1995)|01-Jan-1995||http://example|" + "|".join(flags))
    (folder / "u.item").write_bytes(("\n".join(items) + "\n").encode("latin-1"))
    users = [f"{u}|{int(rng.integers(15, 70))}|{'MF'[u % 2]}|other|12345"
             for u in range(1, n_users + 1)]  # fmt: skip
    atomic_write_text(folder / "u.user", "\n".join(users) + "\n")
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the dataset's ranker config")
    parser.add_argument("--set", action="append", default=[], help="config override, key=value")
    parser.add_argument("--baselines", nargs="*", default=list(BASELINES))
    parser.add_argument("--movielens-like", help="first write a MovieLens-shaped folder here")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    if args.movielens_like:
        write_movielens_like(Path(args.movielens_like))
    config = load_config(args.config, args.set)
    data = load_dataset(config.data)
    folds = validation_folds(config, data)
    fold = folds[-1]  # the latest window (one fold unless split.validation_folds says more)
    ev = config.evaluation
    tasks = [make_task(name, fold, config) for name in ev.tasks]
    k = max(ev.k)
    models = {"ranker": config.model}
    for kind in args.baselines:
        models[kind] = load_config(ROOT / "configs" / f"cj_{kind}.yaml").model
    scores: dict[str, dict] = {}
    for name, model_config in models.items():
        started = time.perf_counter()
        model = build_model(model_config).fit(fold.train)
        fit = time.perf_counter() - started
        scores[name] = {"fit_seconds": round(fit, 1)}
        for task in tasks:
            if task.n_queries == 0:
                continue
            result = evaluate(model, task, fold.train, [k], ["ndcg", "recall"], ev.average,
                              ev.category_level)  # fmt: skip
            scores[name][task.name] = {m: round(float(v), 4) for m, v in result.metrics.items()}
        print(json.dumps({name: scores[name]}), file=sys.stderr, flush=True)
    table = {}
    for task in tasks:
        if task.n_queries == 0:
            continue
        key = f"ndcg@{k}"
        base = {n: s[task.name][key] for n, s in scores.items() if n != "ranker"}
        if not base:  # --baselines with none: the ranker's scores alone
            continue
        best = max(base, key=base.__getitem__)
        ours = scores["ranker"][task.name][key]
        table[task.name] = {"queries": int(task.n_queries), "ranker": ours,
                            "best_baseline": best, "baseline": base[best],
                            "ratio": round(ours / base[best], 3) if base[best] else None,
                            "wins": ours >= base[best]}  # fmt: skip
    payload = {
        "config": args.config,
        "overrides": args.set,
        "validation": {n: vars(s) for n, s in fold.stats.items()},
        "metric": f"ndcg@{k}",
        "table": table,
        "scores": scores,
    }
    text = json.dumps(payload, indent=2, default=str)
    print(text)
    if args.out:
        atomic_write_text(Path(args.out), text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
