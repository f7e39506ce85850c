"""Every command line that README.md and docs/*.md show runs, as written, on small data.

The docs are parsed when the tests are collected, so the docs and this test cannot drift:

- every line of a fenced code block that starts with ``addons``, ``python benchmarks/``,
  ``make`` or ``optuna-dashboard`` is a command (an indented line after it without a
  program continues it, as in the README's usage synopsis; ``# ...`` comments are dropped);
- an inline code span that starts with ``addons`` and has a ``--flag`` is a command too,
  unless argparse says it lacks a required argument (then it is a fragment of a sentence,
  e.g. "`addons export --register NAME`", and is not run);
- ``[...]`` in a synopsis is optional: the command runs once without any optional part and
  once more with each optional part (each ``a | b`` alternative on its own), so that every
  documented flag is exercised and incompatible options are not combined.

Each command runs as a real subprocess of the installed ``addons`` script, in a work
directory laid out like the project (``configs/``, ``artifacts/best``, ``users.csv``,
``./mlflow.db``) but holding tiny data, so relative paths in the docs resolve as written.
A module-scoped fixture trains and exports one run there first (``addons train ... --export
artifacts/best --register docs-model``) and every command reuses it. Only placeholders and
the port are substituted, through ``SUBSTITUTIONS`` below; every flag stays as written.

A command fails the test when it exits non-zero, when an output it names is not written,
or when the test does not know it: an unknown sub-command or flag (``KNOWN_FLAGS``), a
placeholder without a substitution, an input file the work directory cannot provide
(``_provide``), or a ``make`` / ``python benchmarks/`` command that is neither run nor listed
in ``NOT_RUN`` with the reason. The message says what to add.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PROGRAMS = ("addons ", "python benchmarks/", "make ", "optuna-dashboard ")

#: Commands the docs show that this test does not run, with the reason. A command listed
#: here must still be in the docs (``test_not_run_list_is_current``).
NOT_RUN = {
    "addons rollback --model-name NAME [--tracking-uri URI] [--json]": "needs a model with a "
    "promoted and a previous version; tests/test_retrain.py rolls back after two promotions",
    "addons rollback --model-name NAME": "as the rollback synopsis above (tests/test_retrain.py)",
    "python benchmarks/retrain_replay.py": "weekly retraining replayed on the full Complete "
    "Journey data with a server running (tens of minutes)",
    "make demo": "installs the virtualenv and trains five models on the full Complete Journey "
    "data (minutes); test_make_demo_steps_run runs its steps on the tiny data",
    "make test": "installs the virtualenvs and runs this whole suite (recursion)",
    "make bench": "creates its own virtualenv with RecTools and runs minute-long benchmarks",
    "make test-serving": "creates a serving-only virtualenv (pip install, minutes)",
    "python benchmarks/quality_table.py": "evaluates every configs/cj_*.yaml on the full "
    "Complete Journey data (tens of minutes)",
    "python benchmarks/bench_serving.py": "speed benchmark on the full catalog (minutes)",
    "python benchmarks/bench_scale.py --sizes 1,4,16,32": "synthetic shops up to 48M rows, "
    "every stage in its own process (hours on 2 cores)",
    "python benchmarks/bench_scale.py --report": "reads the results file the runs above write",
    "python benchmarks/bench_scale.py --sizes 16 --stages load --memory-gb 18": "loads a 24M-row "
    "synthetic shop (minutes, 5 GB)",
    "python benchmarks/bench_scale.py --sizes 32 --memory-gb 19 --stages load,fit_cooccurrence,"
    "evaluate_candidates,export,rank_batch": "the 48M-row shop end to end (an hour, 16 GB)",
    "python benchmarks/bench_scale.py --sizes 32 --memory-gb 19 --stages evaluate_dense,fit_als,"
    "fit_addon": "the 48M-row shop's dense evaluation and ALS / default fits (hours, 16 GB)",
    "python benchmarks/bench_scale.py --sizes 1,4,16,32 --stages fit_cooccurrence,fit_addon "
    "--memory-gb 18": "fits on shops up to 48M rows (about an hour, 17 GB)",
    "python benchmarks/bench_scale.py --sizes 1,4,16,32 --stages export,rank_batch --rank-users "
    "20000 --memory-gb 18": "exports and ranks on shops up to 48M rows (minutes, 11 GB)",
    "python benchmarks/bench_scale.py --sizes 32 --stages export,rank_batch --rank-users 1000000 "
    "--memory-gb 18": "ranks 1M households of the 48M-row shop (minutes, 11 GB)",
    "python benchmarks/bench_scale.py --sizes 16 --stages fit_cooccurrence --pair-budget "
    "1000000000000000": "the 24M-row co-occurrence fit in one block (minutes, 9 GB)",
    "python benchmarks/bench_scale.py --sizes 1,4,16,32 --stages fit_ranker,evaluate_ranker,"
    "export_ranker,rank_batch_ranker --memory-gb 21.5": "the learned ranker on shops up to 48M "
    "rows (about an hour, 19 GB)",
    "python benchmarks/bench_scale.py --sizes 32 --stages rank_batch_ranker --rank-users 1000000 "
    "--memory-gb 21 --results /tmp/scale_1m.json": "ranks 1M households with the 48M-row "
    "shop's ranker artifact (minutes, 10 GB)",
    "python benchmarks/bench_scale.py --sizes 16 --stages export_ranker,rank_batch_ranker "
    "--memory-gb 21 --results /tmp/scale_load.json": "re-exports and loads the 24M-row shop's "
    "ranker artifact (minutes, 5 GB)",
    "python benchmarks/bench_scale.py --sizes 32 --stages export_ranker,rank_batch_ranker "
    "--memory-gb 21 --results /tmp/scale_load.json": "re-exports and loads the 48M-row shop's "
    "ranker artifact (minutes, 9 GB)",
    "python benchmarks/profile_artifact_load.py /tmp/bench_scale/32x/artifact_ranker": "needs "
    "bench_scale's 48M-row ranker artifact (loads gigabytes; tests/test_ranker_artifact_files.py "
    "loads both state forms)",
    "python benchmarks/bench_scale.py --sizes 4 --stages fit_ranker,evaluate_ranker "
    "--ranker-train-queries 20000": "the ranker's fit on a 6M-row shop (minutes, 5 GB)",
    "python benchmarks/bench_spark_batch.py --artifact /tmp/bench_scale/1x/artifact --users 1000000": "needs bench_scale's artifact and a JVM; minutes (tests/test_spark.py checks the same parity)",
    "addons rank-batch --model DIR --users requests.parquet --out offers --engine spark --master local[2]": "starts a JVM (Spark local mode); tests/test_spark.py runs this command and checks its "
    "output equals the in-process rank-batch",
    "python benchmarks/bench_http_load.py": "wrk load benchmark against two servers on the "
    "full catalog (minutes; installs wrk with apt-get)",
    "python benchmarks/bench_http_load.py --stock-ceiling --baseline DIR": "the same benchmark "
    "with four servers, one from another checkout (minutes)",
    "python benchmarks/bench_http_load.py --summary benchmarks/results/http_load_1.json "
    "benchmarks/results/http_load_2.json benchmarks/results/http_load_3.json": "prints the "
    "table in docs/serving.md from the three runs' results (this machine's numbers)",
    "python benchmarks/bench_graph_ops.py": "speed benchmark of graph ops (minutes)",
    "python benchmarks/bench_serving.py --artifacts cooccurrence=DIR ranker=DIR": "in-process "
    "speed of exported full-catalog artifacts (minutes)",
    "python benchmarks/bench_scale.py --sizes 1,16 --stages export,rank_batch --work DIR "
    "--rank-users 20000": "exports and ranks the 1x and 24M-row synthetic shops (minutes, 6 GB)",
    "python benchmarks/bench_http_load.py --model DIR --baseline DIR --json "
    "benchmarks/results/http_load_sparse_1.json": "wrk load benchmark against three servers "
    "on the full catalog (minutes)",
    "python benchmarks/bench_http_load.py --model DIR --rounds 2 --json "
    "benchmarks/results/http_load_ranker.json": "wrk load benchmark of the learned ranker's "
    "artifact against the ceiling (minutes)",
    "python benchmarks/bench_http_load.py --summary benchmarks/results/http_load_sparse_1.json": "prints the table in docs/serving.md from that run's results (this machine's numbers)",
    "python benchmarks/bench_batch_memory.py --artifact DIR --mode both": "memory benchmark: "
    "8 concurrent 1,000-request batches against two servers, the current and the old batch path (minutes)",
    "addons tune --config configs/cj_als.yaml --storage postgresql://tuner:PASSWORD@db.example/optuna": "needs a PostgreSQL server; tests/test_tune.py runs two workers on a real one",
    "optuna-dashboard sqlite:///optuna.db": "a web server that runs until stopped; "
    "tests/test_tune.py serves a tune study through the dashboard's own WSGI app and reads "
    "the study and its trials back",
    **{
        f"python benchmarks/bench_tuning.py {args}": "a docs/quality.md or docs/tuning.md "
        "measurement on Complete Journey (tens of minutes on the shared machine)"
        for args in (
            "--trials 5 --only cj_als cj_ease cj_item_knn_bm25 cj_lmf cj_addon --pruning-trials 12 "
            "--out /tmp/tune9/a.json --work /tmp/tune9/work-a",
            "--trials 5 --only cj_ease cj_item_knn_bm25 cj_lmf --out /tmp/tune9/c.json "
            "--work /tmp/tune9/work-c",
            "--trials 5 --only cj_item_knn_bm25 cj_lmf --out /tmp/tune9/d.json "
            "--work /tmp/tune9/work-d",
            "--only --pruning-trials 10 --pruning-households 600 --pruning-only pruned "
            "--out /tmp/tune9/p-pruned.json --work /tmp/tune9/work-q-pruned",
            "--only --pruning-trials 10 --pruning-households 600 --pruning-only unpruned "
            "--out /tmp/tune9/p-unpruned.json --work /tmp/tune9/work-q-unpruned",
            "--only --addon-grid 600 --addon-grid-trials 30 --addon-grid-queries 300 "
            "--out /tmp/tune9/grid2.json --work /tmp/tune9/work-g2",
            "--trials 5 --only cj_lightfm cj_bpr cj_lmf cj_lightfm_hybrid cj_addon "
            "--out benchmarks/results/bench_tuning_rest.json",
        )
    },
    "addons data synth --rows 5000000 --users 200000 --items 100000 --seed 1 --out data/synth-5m --force": "the 5M-row measurement of docs/data_synth.md (36 MB written); the 1M-row one runs here",
    "addons data synth --rows 50000000 --users 2000000 --items 300000 --seed 1 --out data/synth-50m --force": "the 50M-row measurement of docs/data_synth.md (a minute, 363 MB written)",
}

#: Flags the test knows per sub-command. A documented flag outside this table fails the
#: test: add it here (and to ``SUBSTITUTIONS`` / ``_provide`` if it takes a placeholder or
#: an input file).
KNOWN_FLAGS = {
    "data report": {"--config", "--json", "--set"},
    "data synth": {"--rows", "--users", "--items", "--seed", "--out", "--force", "--quiet",
                   "--json"},
    "evaluate": {"--config", "--json", "--set"},
    "train": {"--config", "--tracking-uri", "--experiment", "--model-out", "--export",
              "--export-best", "--best-metric", "--register", "--quiet", "--json", "--set",
              "--sign-key"},
    "export": {"--run-id", "--out", "--register", "--tracking-uri", "--json", "--sign-key"},
    "rank": {"--model", "--user", "--cart", "--anchor", "--offer", "--placement", "--k",
             "--exclude", "--json", "--tracking-uri", "--cache", "--rules", "--exclude-owned",
             "--max-per-category", "--trust-key", "--no-exclude-owned"},
    "rank-batch": {"--model", "--users", "--out", "--k", "--offer", "--placement",
                   "--chunk-size", "--threads", "--quiet", "--json", "--tracking-uri",
                   "--cache", "--rules", "--exclude-owned", "--max-per-category",
                   "--trust-key", "--engine", "--master", "--partitions"},
    "keygen": {"--private", "--public", "--json"},
    "retrain": {"--config", "--model-name", "--set", "--as-of", "--min-improvement", "--metric",
                "--tune-trials", "--tracking-uri", "--experiment", "--wait", "--json"},
    "rollback": {"--model-name", "--tracking-uri", "--wait", "--json"},
    "tune": {"--config", "--set", "--trials", "--timeout", "--storage", "--study", "--jobs",
             "--refit", "--out", "--json", "--tracking-uri", "--experiment"},
    "serve": {"--model", "--host", "--k", "--no-exclude-owned", "--port", "--reload-interval", "--tracking-uri", "--cache",
              "--rules", "--exclude-owned", "--max-per-category", "--trust-key", "--workers"},
}  # fmt: skip

#: Placeholders in the docs and what they become, by (flag, value as written). ``{run_id}``
#: is the fixture's MLflow run, ``{work}`` the work directory, ``{port}`` a free port.
#: Nothing else in a command is changed, except that ``serve`` without ``--port`` gets
#: ``--port {port}`` appended (its default, 8000, may be taken on a shared machine).
SUBSTITUTIONS = {
    ("--model", "DIR"): "artifacts/best",  # the fixture's exported artifact
    ("--model", "models:/NAME@champion"): "models:/docs-model@champion",  # fixture's alias
    ("--run-id", "RUN"): "{run_id}",
    ("--out", "DIR"): "artifacts/exported",  # export's output
    ("--export", "DIR"): "artifacts/from-train",
    ("--export-best", "DIR"): "artifacts/best-of-train",
    ("--model-out", "DIR"): "model-out",
    ("--register", "NAME"): "docs-model",
    ("--experiment", "NAME"): "docs",
    ("--tracking-uri", "URI"): "sqlite:///{work}/mlflow.db",  # the default store, spelled out
    ("--config", "..."): "configs/cj_cooccurrence.yaml",  # "[--config ...]": a second config
    ("--config", "configs/cj_<model>.yaml"): "configs/cj_cooccurrence.yaml",
    ("--user", "U"): "1",
    # addons retrain (docs/retraining.md): a fresh registered model per command, so each
    # documented variant starts without a champion and its result does not depend on order
    ("--model-name", "NAME"): "docs-retrain-{port}",
    # addons tune (docs/tuning.md): a few trials, the default store spelled out
    ("--trials", "N"): "2",
    ("--timeout", "S"): "600",
    ("--storage", "URL"): "sqlite:///{work}/optuna.db",
    ("--study", "NAME"): "docs-study",
    ("--jobs", "J"): "2",
    ("--workers", "N"): "2",
    ("--cart", "A,B"): "826249,981760",
    ("--anchor", "A"): "981760",
    ("--sign-key", "KEY"): "keys/signing.pem",
    ("--trust-key", "PUB"): "keys/signing.pub.pem",
    # keygen never overwrites a key: a fresh pair per command
    ("--private", "KEY"): "keys/new-{port}.pem",
    ("--public", "PUB"): "keys/new-{port}.pub.pem",
}
#: Flags whose value is a file or folder the command writes: checked to exist afterwards.
OUTPUT_FLAGS = ("--out", "--model-out", "--export", "--export-best", "--private", "--public")
#: Flags whose value is an input the work directory must hold (see ``_provide``).
INPUT_FLAGS = ("--config", "--users", "--rules", "--sign-key", "--trust-key", "--model")
#: An unsubstituted placeholder: an upper-case word (``DIR``, ``A,B``), ``<...>`` or ``...``.
PLACEHOLDER = re.compile(r"^[A-Z][A-Z_]*(,[A-Z][A-Z_]*)*$|<[^>]*>|^\.\.\.$")


# -- reading the docs ------------------------------------------------------------------------


@dataclass(frozen=True)
class DocCommand:
    """One command line shown in the docs: where, and its text (comments stripped)."""

    where: str
    text: str
    inline: bool


def _strip_comment(line: str) -> str:
    return re.sub(r"(^|\s)#.*$", "", line).rstrip()


def extract_commands(path: Path) -> list[DocCommand]:
    """Command lines of ``path``: fenced code blocks, then inline code spans."""
    name = path.relative_to(ROOT).as_posix()
    lines = path.read_text(encoding="utf-8").splitlines()
    found: list[DocCommand] = []
    prose: list[str] = []  # the text outside code blocks, line numbers kept
    in_block, current, start = False, None, 0
    for number, line in enumerate(lines, 1):
        if line.lstrip().startswith("```"):
            if current:
                found.append(DocCommand(f"{name}:{start}", current, False))
            in_block, current = not in_block, None
            prose.append("")
            continue
        if not in_block:
            prose.append(line)
            continue
        prose.append("")
        body = _strip_comment(line).strip().removeprefix("$ ")
        if current and current.endswith("\\"):
            current = current[:-1].rstrip() + " " + body
        elif body.startswith(PROGRAMS):
            if current:
                found.append(DocCommand(f"{name}:{start}", current, False))
            current, start = body, number
        elif current and line[:1].isspace() and body:
            current += " " + body  # a synopsis continued on an indented line
        elif current:
            found.append(DocCommand(f"{name}:{start}", current, False))
            current = None
    text = "\n".join(prose)
    for m in re.finditer(r"`([^`]+)`", text):
        span = m.group(1)
        if "\n\n" in span:
            continue
        span = " ".join(span.split())
        if not span.startswith(PROGRAMS):
            continue
        if span.startswith("addons ") and "--" not in span:
            continue  # names a command in a sentence ("`addons train` fits ..."), runs nothing
        line_no = text.count("\n", 0, m.start()) + 1
        found.append(DocCommand(f"{name}:{line_no}", span, True))
    return found


def _groups(text: str) -> list[str | list[list[str]]]:
    """Tokens of a synopsis: plain tokens, and optional ``[...]`` groups as their
    alternatives (``[a | b]`` -> ``[[a...], [b...]]``)."""
    out: list[str | list[list[str]]] = []
    group: list[list[str]] | None = None
    for raw in shlex.split(text):
        token = raw
        opens = token.startswith("[")
        if opens:
            if group is not None:
                raise ValueError(f"nested [...] in {text!r}")
            group, token = [[]], token[1:]
        closes = group is not None and token.endswith("]")
        if closes:
            token = token[:-1]
        if group is None:
            out.append(token)
        elif token == "|":
            group.append([])
        elif token:
            group[-1].append(token)
        if closes:
            out.append(group)
            group = None
    if group is not None:
        raise ValueError(f"unclosed [ in {text!r}")
    return out


def variants(text: str) -> list[tuple[str, list[str]]]:
    """The command without its optional parts, then with each optional part alone."""
    parts = _groups(text)
    base = [p for p in parts if isinstance(p, str)]
    out = [("as written" if len(base) == len(parts) else "required only", base)]
    for i, part in enumerate(parts):
        if isinstance(part, str):
            continue
        for alternative in part:
            argv = list(itertools.chain.from_iterable(
                [p] if isinstance(p, str) else (alternative if j == i else [])
                for j, p in enumerate(parts)
            ))  # fmt: skip
            out.append(("with " + " ".join(alternative), argv))
    return out


def _is_fragment(argv: list[str]) -> bool:
    """An inline ``addons ...`` span that lacks a required argument: part of a sentence."""
    from training.cli import build_parser

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            build_parser().parse_args(argv[1:])
        except SystemExit:
            pass
    text = stderr.getvalue()
    return "arguments are required" in text or "expected one argument" in text


def _collect() -> tuple[list, list[DocCommand]]:
    runnable, all_commands = [], []
    for path in DOCS:
        for cmd in extract_commands(path):
            all_commands.append(cmd)
            if cmd.text in NOT_RUN:
                continue
            for label, argv in variants(cmd.text):
                if cmd.inline and argv[0] == "addons" and _is_fragment(argv):
                    break
                runnable.append(
                    pytest.param(cmd, argv, id=f"{cmd.where} {shlex.join(argv[:2])} {label}")
                )
    return runnable, all_commands


RUNNABLE, ALL_COMMANDS = _collect()


# -- the small data and the work directory -----------------------------------------------------


def write_tiny_data(folder: Path) -> tuple[Path, Path]:
    """40 shoppers, 30 products in 5 categories, weekly baskets over weeks 1-60 (the shipped
    configs split at week 49/50, validation from 46). Shopper 1 and products 826249, 981760,
    1082185 exist, as in the docs' examples."""
    # fixed seed: the same data in every run, so a failure is about the command
    rng = np.random.default_rng(8)
    items = [826249, 981760, 1082185, *range(2001, 2028)]
    category = {item: f"cat{n % 5}" for n, item in enumerate(items)}
    price = {item: round(1.0 + 0.7 * n, 2) for n, item in enumerate(items)}
    # the docs' examples get offers: cheaper add-ons in other categories than the cart's
    # (cross-sell), and a dearer item of 981760's category within +25 % (up-sell)
    price.update({826249: 20.0, 981760: 8.0, 2004: 9.0})
    t0 = datetime(2024, 1, 1)
    rows, basket = [], 0
    for user in range(1, 41):
        favourites = rng.choice(items, size=8, replace=False)
        for week in range(1, 61):
            if rng.random() < 0.6:
                continue
            basket += 1
            when = t0 + timedelta(days=7 * (week - 1) + int(rng.integers(0, 7)), hours=10)
            pool = favourites if rng.random() < 0.7 else np.asarray(items)
            for item in rng.choice(pool, size=int(rng.integers(2, 6)), replace=False):
                qty = int(rng.integers(1, 3))
                rows.append(f"{user},{item},{when:%Y-%m-%dT%H:%M:%S},{basket},{qty},"
                            f"{qty * price[int(item)]:.2f},{week}")  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    tx, products = folder / "tx.csv", folder / "products.csv"
    tx.write_text("user_id,item_id,timestamp,basket_id,quantity,value,week\n"
                  + "\n".join(rows) + "\n")  # fmt: skip
    products.write_text("item_id,category,price\n"
                        + "".join(f"{i},{category[i]},{price[i]}\n" for i in items))  # fmt: skip
    return tx, products


@dataclass
class Work:
    """The work directory and what the fixture trained there."""

    root: Path
    tx: Path
    products: Path
    run_id: str
    env: dict[str, str]


def addons() -> list[str]:
    """The installed console script beside this interpreter (``python -m training.cli``
    when the package is not installed as a script)."""
    script = Path(sys.executable).with_name("addons")
    return [str(script)] if script.exists() else [sys.executable, "-m", "training.cli"]


def _provide(work: Work, flag: str, value: str) -> str | None:
    """Make sure the input ``value`` of ``flag`` exists in the work directory; None (with
    the reason) when the test cannot provide it."""
    if value.startswith("models:/"):
        return None
    path = work.root / value
    if path.exists():
        return None
    if flag == "--config" and value.startswith("configs/") and (ROOT / value).is_file():
        # the shipped config with its data section pointed at the tiny files
        config = yaml.safe_load((ROOT / value).read_text())
        cleaning = (config.get("data") or {}).get("cleaning")
        config["data"] = {"source": "files", "interactions": {"path": str(work.tx)},
                          "items": {"path": str(work.products)},
                          **({"cleaning": cleaning} if cleaning else {})}  # fmt: skip
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return None
    if flag == "--users":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("user_id,cart\n1,826249|981760\n2,1082185\n999,\n")
        return None
    if flag == "--rules":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("max_per_category: 1\nexclude_owned: false\n")
        return None
    if flag == "--model" and value == "artifacts/signed":  # the fixture's artifact, signed
        import shutil

        from serving.signing import sign_artifact

        _write_keys(work.root / "keys")
        shutil.copytree(work.root / "artifacts" / "best", path)
        sign_artifact(path, work.root / "keys" / "signing.pem")
        return None
    if flag in ("--sign-key", "--trust-key"):
        _write_keys(work.root / "keys")
        return None if path.exists() else f"no key file {value} (see _write_keys)"
    return f"{flag} {value}: no such file in the work directory and no recipe in _provide()"


def _write_keys(folder: Path) -> None:
    """An Ed25519 key pair as PEM: signing.pem (private) and signing.pub.pem (public)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if (folder / "signing.pem").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    (folder / "signing.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))  # fmt: skip
    (folder / "signing.pub.pem").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo,
    ))  # fmt: skip


def _run(work: Work, argv: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=work.root, env=work.env, capture_output=True, text=True,
                          timeout=timeout, check=False)  # fmt: skip


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Work:
    """The work directory with one trained, exported and registered run."""
    root = tmp_path_factory.mktemp("docs-work")
    tx, products = write_tiny_data(root / "data")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["OPENBLAS_NUM_THREADS"] = "1"
    # the code of this checkout, even where the installed script points at another one
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    w = Work(root, tx, products, "", env)
    assert _provide(w, "--config", "configs/cj_cooccurrence.yaml") is None
    proc = _run(w, [*addons(), "train", "--config", "configs/cj_cooccurrence.yaml",
                    "--export", "artifacts/best", "--register", "docs-model", "--quiet"])  # fmt: skip
    assert proc.returncode == 0, f"fixture training failed:\n{proc.stdout}\n{proc.stderr}"
    w.run_id = re.search(r"mlflow run id: (\w+)", proc.stdout).group(1)
    assert (root / "artifacts" / "best" / "manifest.json").is_file()
    return w


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def substitute(work: Work, argv: list[str], port: int) -> tuple[list[str], list[str]]:
    """``argv`` with the placeholders replaced; and the problems that stop it from running."""
    problems: list[str] = []
    if argv[0] != "addons":
        return argv, [f"{' '.join(argv)!r} is neither run nor in NOT_RUN: add it to one"]
    sub = " ".join(argv[1:3]) if argv[1] == "data" else argv[1]  # data report | data synth
    rest = argv[3:] if sub.startswith("data ") else argv[2:]
    if sub not in KNOWN_FLAGS:
        return argv, [f"unknown sub-command {sub!r}: add it to KNOWN_FLAGS"]
    out = argv[: len(argv) - len(rest)]
    flag = None
    for token in rest:
        if token.startswith("--"):
            name = token.split("=", 1)[0]
            if name not in KNOWN_FLAGS[sub]:
                problems.append(f"unknown flag {name} of {sub!r}: add it to KNOWN_FLAGS")
            flag = name
            out.append(token)
            continue
        value = SUBSTITUTIONS.get((flag, token), token)
        if flag == "--port":
            value = str(port)
        value = value.format(run_id=work.run_id, work=work.root, port=port)
        if PLACEHOLDER.search(value):
            problems.append(f"placeholder {token!r} after {flag}: add it to SUBSTITUTIONS")
        if flag in INPUT_FLAGS and not problems:
            reason = _provide(work, flag, value)
            if reason:
                problems.append(reason)
        out.append(value)
    if sub == "serve" and "--port" not in out:
        out += ["--port", str(port)]
    return out, problems


def _serve(work: Work, argv: list[str], port: int) -> None:
    """Start ``addons serve``, wait for /readyz, rank once, stop it."""
    proc = subprocess.Popen(argv, cwd=work.root, env=work.env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline, ready = time.monotonic() + 120, False
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"{base}/readyz", timeout=2) as r:
                    ready = r.status == 200
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if ready:
                break
            time.sleep(0.3)
        if not ready:
            proc.kill()
            out, err = proc.communicate(timeout=30)
            pytest.fail(f"never ready on /readyz (exit {proc.returncode}):\n{out}\n{err[-3000:]}")
        body = json.dumps({"user_id": 1, "cart": [826249], "k": 2}).encode()
        request = urllib.request.Request(f"{base}/v1/rank", body,
                                         {"content-type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=30) as r:
            assert r.status == 200
            assert json.loads(r.read())["items"]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()


# -- the tests -------------------------------------------------------------------------------------


def test_the_docs_show_commands() -> None:
    """The extraction finds the documented sub-commands (a parser that finds nothing would
    make every other test here pass vacuously)."""
    shown = {c.text.split()[1] for c in ALL_COMMANDS if c.text.startswith("addons ")}
    assert {"data", "evaluate", "train", "export", "rank", "rank-batch", "serve"} <= shown
    assert len(RUNNABLE) >= len(shown)


def test_not_run_list_is_current() -> None:
    """Every command skipped on purpose is still in the docs (no stale excuses)."""
    shown = {c.text for c in ALL_COMMANDS}
    assert not set(NOT_RUN) - shown, sorted(set(NOT_RUN) - shown)


@pytest.mark.parametrize(("doc", "argv"), RUNNABLE)
def test_documented_command_runs(work: Work, doc: DocCommand, argv: list[str]) -> None:
    port = _free_port()
    command, problems = substitute(work, argv, port)
    assert not problems, f"{doc.where}: {doc.text!r}: " + "; ".join(problems)
    command = [*addons(), *command[1:]]
    if argv[1] == "serve":
        _serve(work, command, port)
        return
    proc = _run(work, command)
    assert proc.returncode == 0, (
        f"{doc.where}: {doc.text!r} exited {proc.returncode}\n"
        f"ran: {shlex.join(command)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    )
    for flag, value in itertools.pairwise(command):
        if flag in OUTPUT_FLAGS:
            assert (work.root / value).exists(), f"{doc.where}: {flag} {value} not written"


def demo_steps() -> list[list[str]]:
    """The ``addons`` commands of ``make demo`` as make expands them (``make -n``: printed,
    not run), with the program as ``addons``."""
    # not the flags of a make that runs this suite (make test): jobserver, directory lines
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    proc = subprocess.run(["make", "-n", "demo"], cwd=ROOT, env=env, capture_output=True,
                          text=True, check=False)  # fmt: skip
    assert proc.returncode == 0, f"make -n demo failed:\n{proc.stderr}"
    lines = re.sub(r"\\\n\s*", " ", proc.stdout).splitlines()  # recipe lines continued with \\
    steps = [shlex.split(line) for line in lines if "/addons " in line]
    return [["addons", *s[1:]] for s in steps if s[0].endswith("/addons")]


def test_make_demo_steps_run(tmp_path: Path) -> None:
    """``make demo`` (NOT_RUN: it installs and trains on the full data) runs, step by step, on
    the tiny data in a work directory of its own: the data report, the training of every demo
    config with the learned ranker among them and the export of the best, and the rank call on
    that artifact. A demo config that is missing, a flag the CLI does not know or a step
    that fails makes this fail."""
    steps = demo_steps()
    assert [s[1] for s in steps] == ["data", "train", "rank"], steps
    train = steps[1]
    assert "configs/cj_ranker.yaml" in train, "the demo must train the learned ranker"
    assert train[train.index("--export-best") + 1] == steps[2][steps[2].index("--model") + 1]
    tx, products = write_tiny_data(tmp_path / "data")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["OPENBLAS_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    demo = Work(tmp_path, tx, products, "", env)
    outputs = []
    for step in steps:
        command, problems = substitute(demo, step, _free_port())
        assert not problems, f"make demo: {shlex.join(step)}: " + "; ".join(problems)
        proc = _run(demo, [*addons(), *command[1:]])
        assert proc.returncode == 0, (
            f"make demo step {shlex.join(step)} exited {proc.returncode}\n"
            f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        )
        outputs.append(proc.stdout)
    assert "comparison (same data, split and protocol):" in outputs[1]
    assert re.search(r"best by \S+: \w+ \(", outputs[1]), outputs[1][-1000:]
    assert (tmp_path / "artifacts" / "best" / "manifest.json").is_file()
