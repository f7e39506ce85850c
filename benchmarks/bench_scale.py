"""How each stage's cost grows with the shop (issue 12): synthetic data at 1x, 4x, 16x, 32x.

1x is Complete Journey's row count (1.5M order lines) with 62,500 households and 9,375
items, so that 32x is the issue's mid-size shop: 48M lines, 2M households, 300k items. Users,
baskets and items grow together (``addons data synth``, ``features.synth``, seed 0).

Every stage runs in its OWN process (this script with ``--worker STAGE``), so each peak RSS
(``ru_maxrss`` of that process, from ``os.wait4``) is the stage's alone; the child reports
the seconds of its stage without the load it needs first:

- ``load``: read the Parquet files, clean, build ids, split, and build the basket x item and
  user x item matrices (the seconds are the whole job);
- ``fit_cooccurrence`` / ``fit_als`` / ``fit_addon`` (the product default): ``fit`` on train;
  the fitted model is saved for the next stages (not timed);
- ``evaluate_dense`` / ``evaluate_candidates``: the three tasks of ``configs/synth_
  cooccurrence.yaml`` with the co-occurrence model, at most ``--eval-queries`` queries per
  task (a seeded sample: the dense path would take hours at 32x), scored over the whole
  catalog vs over each query's candidates (``training.evaluation.harness``); per-query
  milliseconds;
- ``export``: the co-occurrence model as an ONNX artifact (``training.export.export_model``);
  artifact MB;
- ``rank_batch``: ``serving.batch.rank_file`` of the artifact's first ``--rank-users``
  households (no cart, e-mail placement) from that artifact, without loading the dataset (a
  batch job has the artifact only); users per second;
- ``fit_ranker``, ``evaluate_ranker``, ``export_ranker``, ``rank_batch_ranker``: the same for
  the learned ranker (``kind: ranker``, the model section of ``configs/synth_ranker.yaml``,
  which mirrors ``configs/cj_ranker.yaml``): the fit also reports its stages' seconds
  (``fit_stages_``) and training rows; the evaluation is the model's own ``recommend`` (pools
  for carts, re-buy rows for empty ones) on the same query sample (seconds per task too:
  an empty cart takes the dense path); its artifact is ``artifact_ranker``, next to the
  co-occurrence one.

The growth exponent of a stage is the least-squares slope of log(seconds) on log(rows).

Usage::

    python benchmarks/bench_scale.py [--sizes 1,4] [--stages load,fit_cooccurrence,...]
        [--work /tmp/bench_scale] [--results benchmarks/results/scale.json] [--timeout 3600]
    python benchmarks/bench_scale.py --report   # table + plot from the results file only

Results are merged into ``--results`` after every stage (a later run adds sizes/stages), and
``--report`` prints the markdown table and writes ``docs/bench_scale.png``. A child is killed when
its resident set passes ``--memory-gb`` (default 12; sampled every 0.2 s), so that a stage
that would exhaust the shared machine fails alone, recorded as ``failed``. (Not an address
space limit: polars reserves far more address space than it touches, and a 32x fit failed
under a 12 GB ``RLIMIT_AS`` at 7.9 GB resident.) Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BASE_ROWS, BASE_USERS, BASE_ITEMS = 1_500_000, 62_500, 9_375
STAGES = ("load", "fit_cooccurrence", "evaluate_candidates", "evaluate_dense", "export",
          "rank_batch", "fit_als", "fit_addon", "fit_ranker", "evaluate_ranker", "export_ranker",
          "rank_batch_ranker")  # fmt: skip
FIT_CONFIG = {"cooccurrence": "synth_cooccurrence.yaml", "als": "cj_als.yaml",
              "addon": "cj_addon.yaml", "ranker": "synth_ranker.yaml"}  # fmt: skip


def synth_args(size: float) -> dict[str, int]:
    return {"rows": int(BASE_ROWS * size), "users": int(BASE_USERS * size),
            "items": int(BASE_ITEMS * size), "seed": 0}  # fmt: skip


def _config(data_dir: Path, kind: str = "cooccurrence", train_queries: int | None = None):
    """The shipped synth config pointed at ``data_dir``, with ``kind``'s model block taken
    from its shipped CJ config (ALS, the add-on default), so every size runs the same model;
    ``train_queries`` overrides the ranker's training baskets (``--ranker-train-queries``)."""
    from training.config import config_from_dict, parse_yaml

    payload = parse_yaml((ROOT / "configs" / "synth_cooccurrence.yaml").read_text())
    for table in ("interactions", "items", "users"):
        payload["data"][table]["path"] = str(data_dir / f"{table}.parquet")
    if kind != "cooccurrence":  # the ranker's model section is also its shipped synth config's
        payload["model"] = parse_yaml((ROOT / "configs" / FIT_CONFIG[kind]).read_text())["model"]
    if kind == "ranker" and train_queries is not None:
        payload["model"]["params"]["train_queries"] = train_queries
    payload.pop("tune", None)
    return config_from_dict(payload, "bench_scale")


def _load(data_dir: Path):
    from features.loading import load_dataset
    from training.experiment import make_split

    config = _config(data_dir)
    data = load_dataset(config.data)
    return config, data, make_split(config, data)


def _sample(task, n: int, seed: int = 0):
    import numpy as np

    from features.splits import RankingTask

    if task.n_queries <= n:
        return task
    rows = np.sort(np.random.default_rng(seed).choice(task.n_queries, n, replace=False))
    return RankingTask(task.name, task.query_ids[rows], task.users[rows], task.carts[rows],
                       task.relevant[rows], task.exclude_owned)  # fmt: skip


def worker(stage: str, data_dir: Path, work: Path, args: argparse.Namespace) -> dict:
    """Run one stage in this process; returns what the parent records."""
    from training.persistence import load_model, save_model

    t0 = time.perf_counter()
    # the ranker's stages: its fitted model and its own artifact, the co-occurrence's kept
    kind = "ranker" if stage.endswith("_ranker") else "cooccurrence"
    artifact = work / ("artifact_ranker" if kind == "ranker" else "artifact")
    if stage == "load":
        config, data, split = _load(data_dir)
        split.train.basket_item_matrix()
        split.train.user_item_counts()
        return {"seconds": time.perf_counter() - t0, "train_rows": split.train.interactions.height,
                "users": data.n_users, "items": data.n_items}  # fmt: skip
    if stage.startswith("rank_batch"):  # a batch job has the artifact only: no dataset loaded
        from serving import Ranker
        from serving.batch import rank_file

        users = work / "users.csv"
        ids = json.loads((artifact / "users.json").read_text())["ids"][: args.rank_users]
        users.write_text("user_id\n" + "".join(f"{u}\n" for u in ids))
        t = time.perf_counter()
        ranker = Ranker.load(artifact, threads=2)
        load_artifact = time.perf_counter() - t
        t = time.perf_counter()
        done = [0]

        def progress(n: int) -> None:  # a stage killed at --timeout still tells its rate
            done[0] += n
            if done[0] % 50_000 < n:
                s = time.perf_counter() - t
                print(
                    f"progress: {done[0]} users in {s:.0f} s ({done[0] / s:.0f} users/s)",
                    flush=True,
                )

        rows = rank_file(ranker, users, work / "offers.parquet", k=10, on_chunk=progress)
        seconds = time.perf_counter() - t
        return {"seconds": seconds, "artifact_load_seconds": load_artifact,
                "users": len(ids), "rows": rows, "users_per_s": len(ids) / seconds}  # fmt: skip
    config, data, split = _load(data_dir)
    # what `addons train` keeps through the fit (training.experiment.run_evaluation): train
    # and test, not the whole table nor the validation parts
    del data
    split = replace(split, validation=None, train_before_validation=None)
    load_s = time.perf_counter() - t0
    models = work / "models"
    if stage.startswith("fit_"):
        import logging

        from training.config import build_model

        # the ranker logs each fit stage with the peak RSS so far (in the stage's .out file)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

        kind = stage.removeprefix("fit_")
        model_config = _config(data_dir, kind, args.ranker_train_queries).model
        if args.pair_budget:  # the co-occurrence product's block size (10**15: one block)
            from training.models import baselines

            baselines.PAIR_BUDGET = args.pair_budget
        t = time.perf_counter()
        model = build_model(model_config).fit(split.train)
        seconds = time.perf_counter() - t
        target = models / kind
        if target.exists():
            import shutil

            shutil.rmtree(target)
        save_model(model, target)
        out = {"seconds": seconds, "load_seconds": load_s}
        if kind == "ranker":  # where the fit's time goes, and how many rows the trees saw
            valid = model.validation_
            out.update(fit_stages=model.fit_stages_, train_rows=valid["train_rows"],
                       train_queries=valid["train_queries"],
                       valid_queries=valid.get("valid_queries", 0),
                       best_iteration=valid["best_iteration"])  # fmt: skip
        return out
    model = load_model(models / kind)
    if stage.startswith("evaluate_"):
        from training.evaluation.harness import evaluate
        from training.experiment import make_task

        scoring = "auto" if kind == "ranker" else stage.removeprefix("evaluate_")
        tasks = [_sample(make_task(n, split, config), args.eval_queries)
                 for n in config.evaluation.tasks]  # fmt: skip
        ev = config.evaluation
        results, task_seconds = [], {}
        for task in tasks:
            t = time.perf_counter()
            results.append(evaluate(model, task, split.train, ev.k, ev.metrics, ev.average,
                                    ev.category_level, scoring=scoring))  # fmt: skip
            task_seconds[task.name] = time.perf_counter() - t
        seconds = sum(task_seconds.values())
        queries = sum(task.n_queries for task in tasks)
        return {"seconds": seconds, "load_seconds": load_s, "queries": queries,
                "ms_per_query": 1000 * seconds / queries, "task_seconds": task_seconds,
                "ndcg@10": {r.task: r.metrics["ndcg@10"] for r in results}}  # fmt: skip
    if stage.startswith("export"):
        import shutil

        from training.export import export_model

        if artifact.exists():
            shutil.rmtree(artifact)
        t = time.perf_counter()
        export_model(model, split.train, artifact)
        seconds = time.perf_counter() - t
        size = sum(p.stat().st_size for p in artifact.rglob("*") if p.is_file())
        return {"seconds": seconds, "load_seconds": load_s, "artifact_mb": size / 2**20}
    raise SystemExit(f"unknown stage {stage!r}")


def run_stage(stage: str, data_dir: Path, work: Path, args: argparse.Namespace) -> dict:
    """``stage`` in a child process: wall seconds, peak RSS (MB) and the child's own report."""
    cmd = [sys.executable, __file__, "--worker", stage, "--data", str(data_dir), "--work",
           str(work), "--eval-queries", str(args.eval_queries), "--rank-users", str(args.rank_users),
           "--pair-budget", str(args.pair_budget)]  # fmt: skip
    if args.ranker_train_queries is not None:
        cmd += ["--ranker-train-queries", str(args.ranker_train_queries)]
    limit = int(args.memory_gb * 2**30)
    out = work / f"{stage}.out"
    t = time.perf_counter()
    over = 0
    with out.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT,
                                env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})  # fmt: skip
        deadline = time.monotonic() + args.timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            rss = _rss(proc.pid)
            if time.monotonic() > deadline or rss > limit:
                over = rss if rss > limit else 0
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.2)
    wall = time.perf_counter() - t
    record = {"wall_seconds": round(wall, 2), "peak_mb": round(usage.ru_maxrss / 1024)}
    lines = out.read_text().splitlines()
    report = next((ln for ln in reversed(lines) if ln.startswith("RESULT ")), None)
    if os.waitstatus_to_exitcode(status) == 0 and report:
        record.update(json.loads(report.removeprefix("RESULT ")))
        record["status"] = "ok"
    else:
        timed_out = wall >= args.timeout and not over
        record["status"] = "timeout" if timed_out else "failed"
        record["error"] = (f"killed after {args.timeout} s" if timed_out
                           else f"killed at {over / 2**30:.1f} GB resident (cap {args.memory_gb} GB)"
                           if over else (lines[-1] if lines else f"exit {status}"))  # fmt: skip
    return record


def _rss(pid: int) -> int:
    """Resident bytes of process ``pid`` now (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            return next(int(ln.split()[1]) * 1024 for ln in fh if ln.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0


def exponent(sizes: list[float], seconds: list[float]) -> float | None:
    import numpy as np

    if len(sizes) < 2:
        return None
    slope, _ = np.polyfit(np.log(sizes), np.log(seconds), 1)
    return float(slope)


def report(results: dict, plot: Path) -> str:
    """The markdown table (seconds / peak MB per stage and size, growth exponent) and the plot."""
    sizes = sorted(results["sizes"], key=float)
    lines = [
        "| stage | "
        + " | ".join(f"{float(s):g}x ({synth_args(float(s))['rows'] / 1e6:.1f}M)" for s in sizes)
        + " | exponent |",
        "|---|" + "---:|" * (len(sizes) + 1),
    ]
    series = {}
    for stage in STAGES:
        cells, xs, ys = [], [], []
        for s in sizes:
            r = results["sizes"][s].get(stage)
            if r is None:
                cells.append("")
            elif r["status"] != "ok":
                cells.append(f"{r['status']} ({r['wall_seconds']:.0f} s, {r['peak_mb']} MB)")
            else:
                extra = ""
                if "ms_per_query" in r:
                    extra = f", {r['ms_per_query']:.2f} ms/q"
                if "artifact_mb" in r:
                    extra = f", {r['artifact_mb']:.0f} MB artifact"
                if "users_per_s" in r:
                    extra = f", {r['users_per_s']:.0f} users/s"
                cells.append(f"{r['seconds']:.1f} s, {r['peak_mb']} MB{extra}")
                xs.append(synth_args(float(s))["rows"])
                ys.append(r["seconds"])
        slope = exponent(xs, ys)
        series[stage] = (xs, ys)
        lines.append(
            f"| {stage} | " + " | ".join(cells) + f" | {'' if slope is None else f'{slope:.2f}'} |"
        )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for stage, (xs, ys) in series.items():
            if len(xs) >= 2:
                ax.loglog(xs, ys, marker="o", label=stage)
        if any(len(xs) >= 2 for xs, _ in series.values()):
            x0 = min(x for xs, _ in series.values() for x in xs)
            ax.loglog([x0, 32 * x0], [1, 32], "k--", lw=0.8, label="linear (slope 1)")
        ax.set_xlabel("order lines (users, baskets and items grow together)")
        ax.set_ylabel("seconds (stage only)")
        ax.legend(fontsize=7)
        ax.grid(True, which="both", lw=0.3)
        fig.tight_layout()
        fig.savefig(plot, dpi=110)
    except ImportError:
        lines.append("(matplotlib missing: no plot)")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sizes", default="1,4")
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--work", default="/tmp/bench_scale")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "scale.json"))
    p.add_argument("--plot", default=str(ROOT / "docs" / "bench_scale.png"))
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--memory-gb", type=float, default=12)
    p.add_argument("--eval-queries", type=int, default=5000)
    p.add_argument("--rank-users", type=int, default=20000)
    p.add_argument(
        "--pair-budget",
        type=int,
        default=0,
        help="co-occurrence block size in basket x item pairs (0: the library default)",
    )
    p.add_argument("--ranker-train-queries", type=int, default=None,
                   help="the ranker's train_queries instead of its config's; its stages are "
                        "then recorded as STAGE@train_queries=N")  # fmt: skip
    p.add_argument("--report", action="store_true")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, Path(args.data), Path(args.work), args)))
        return 0
    results_file = Path(args.results)
    results = json.loads(results_file.read_text()) if results_file.exists() else {"sizes": {}}
    if not args.report:
        from machine import machine_load

        from features.synth import synthesize

        for size in [float(s) for s in args.sizes.split(",")]:
            key = f"{size:g}"
            work = Path(args.work) / f"{key}x"
            data_dir = work / "data"
            work.mkdir(parents=True, exist_ok=True)
            entry: dict = {}
            if not (data_dir / "synth.json").exists():
                t = time.perf_counter()
                synthesize(data_dir, **synth_args(size), force=True)
                entry["synth_seconds"] = round(time.perf_counter() - t, 1)
            entry["synth"] = synth_args(size)
            for stage in args.stages.split(","):
                busy = machine_load()
                record = run_stage(stage, data_dir, work, args)
                record["other_cpu_before"] = busy
                name = stage
                if args.ranker_train_queries is not None and stage.endswith("_ranker"):
                    name = f"{stage}@train_queries={args.ranker_train_queries}"
                entry[name] = record
                print(key, name, json.dumps(record), flush=True)
                # merged into the file as it is now: runs of other sizes may write it too
                results_file.parent.mkdir(parents=True, exist_ok=True)
                if results_file.exists():
                    results = json.loads(results_file.read_text())
                results["sizes"].setdefault(key, {}).update(entry)
                tmp = results_file.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(results, indent=1))
                tmp.replace(results_file)
    print(report(results, Path(args.plot)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
