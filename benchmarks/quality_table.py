"""Quality of every shipped Complete Journey config on the same protocol, as one table.

Runs ``addons evaluate`` in-process for each ``configs/cj_*.yaml`` (no MLflow) and writes
``docs/quality.md``. Usage::

    python benchmarks/quality_table.py [--only cj_als cj_addon ...] [--out docs/quality.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from features.io import atomic_write_text  # noqa: E402
from training.config import load_config  # noqa: E402
from training.experiment import run_evaluation  # noqa: E402

BASELINES = ("cj_popularity", "cj_personal_popularity", "cj_cooccurrence")
COLUMNS = ("recall@10", "ndcg@10", "hit_rate@10", "precision@10", "coverage@10")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="config names (without .yaml)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "quality.md"))
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = parser.parse_args()
    names = args.only or sorted(p.stem for p in (ROOT / "configs").glob("cj_*.yaml"))
    results = {}
    for name in names:
        started = time.perf_counter()
        result = run_evaluation(load_config(ROOT / "configs" / f"{name}.yaml"))
        results[name] = {
            "evaluations": {e.task: e.metrics for e in result.evaluations},
            "queries": {e.task: e.n_queries for e in result.evaluations},
            "seconds": round(time.perf_counter() - started, 1),
            "fit_seconds": result.timings["fit"],
        }
        print(f"{name}: {results[name]['seconds']} s", file=sys.stderr, flush=True)
    tasks = ("basket_completion", "basket_completion_new", "next_period")
    lines = [
        "# Model quality on Complete Journey",
        "",
        f"Measured {date.today()} on {platform.machine()} ({os.cpu_count()} cores) with",
        "`python benchmarks/quality_table.py` (each `configs/cj_*.yaml` through `addons evaluate`).",
        "Protocol: README, *Results*. Bold: best in the column; a model beats the baselines only",
        "if it is above all three baseline rows.",
        "",
    ]
    for task in tasks:
        rows = [(n, r) for n, r in results.items() if task in r["evaluations"]]
        if not rows:
            continue
        n_q = rows[0][1]["queries"][task]
        lines += [f"## {task} ({n_q:,} queries)", "",
                  "| config | " + " | ".join(COLUMNS) + " | fit s |",
                  "|---|" + "---|" * (len(COLUMNS) + 1)]  # fmt: skip
        best = {c: max(r["evaluations"][task][c] for _, r in rows) for c in COLUMNS}
        for n, r in rows:
            m = r["evaluations"][task]
            cells = [f"**{m[c]:.4f}**" if m[c] == best[c] else f"{m[c]:.4f}" for c in COLUMNS]
            label = f"{n} (baseline)" if n in BASELINES else n
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {r['fit_seconds']:.1f} |")
        lines.append("")
        base = [r["evaluations"][task] for n, r in rows if n in BASELINES]
        if base:
            winners = [
                n for n, r in rows if n not in BASELINES
                and all(r["evaluations"][task][c] > max(b[c] for b in base) for c in ("recall@10", "ndcg@10"))
            ]  # fmt: skip
            lines.append(
                "Beats every baseline on Recall@10 and NDCG@10: "
                + (", ".join(winners) if winners else "**none**")
            )
            lines.append("")
    atomic_write_text(args.out, "\n".join(lines))
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
