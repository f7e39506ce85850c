"""The ``addons`` command line.

Sub-commands import what they need when they run, so ``addons --help`` is instant. Exit codes:
0 success, 2 bad input (config, data, arguments), 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from features.errors import ConfigError, InputError

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2


def _emit_json(payload: Any) -> None:
    sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")


def cmd_data_report(args: argparse.Namespace) -> int:
    from features.loading import load_dataset
    from training.config import load_config

    config = load_config(args.config, args.set)
    started = time.perf_counter()
    data = load_dataset(config.data)
    seconds = time.perf_counter() - started
    if args.json:
        _emit_json(
            {
                "config": args.config,
                "report": data.report.to_dict(),
                "fingerprint": data.fingerprint,
                "users": data.n_users,
                "items": data.n_items,
                "seconds": round(seconds, 3),
            }
        )
    else:
        print(data.report.format_table())
        print(f"\nid maps: {data.n_users:,} users, {data.n_items:,} items (incl. items table)")
        print(f"fingerprint: {data.fingerprint}")
        print(f"loaded and cleaned in {seconds:.2f} s")
    return EXIT_OK


def cmd_data_synth(args: argparse.Namespace) -> int:
    """``addons data synth``: write a synthetic shop (docs/data_synth.md)."""
    from features.synth import synthesize
    from training.progress import bar, progress_bars

    started = time.perf_counter()
    with progress_bars(not args.quiet and not args.json):
        pbar = bar(total=args.rows, desc="order lines", unit="row")
        try:
            summary = synthesize(args.out, args.rows, args.users, args.items, args.seed,
                                 args.force, pbar.update)  # fmt: skip
        finally:
            pbar.close()
    seconds = time.perf_counter() - started
    if args.json:
        _emit_json({**summary.to_dict(), "seconds": round(seconds, 3)})
    else:
        print(f"wrote {summary.rows:,} order lines ({summary.baskets:,} baskets of "
              f"{summary.users:,} households, {summary.items:,} items) to {summary.out} in "
              f"{seconds:.1f} s ({summary.rows / max(seconds, 1e-9):,.0f} rows/s)")  # fmt: skip
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    from training.config import load_config
    from training.experiment import run_evaluation

    config = load_config(args.config, args.set)
    try:
        result = run_evaluation(config)
    except ConfigError as exc:  # raised deep inside (e.g. a split bound): name the file too
        if exc.source:
            raise
        raise ConfigError(exc.key, exc.problem, args.config) from None
    if args.json:
        _emit_json(result.to_dict())
    else:
        print(result.format_table())
    return EXIT_OK


def cmd_train(args: argparse.Namespace) -> int:
    from training.config import load_config
    from training.experiment import format_comparison
    from training.progress import progress_bars
    from training.train import run_training

    # all checked before any run; --set applies to each config
    configs = [(path, load_config(path, args.set)) for path in args.config]
    if (args.model_out or args.export) and len(configs) > 1:
        raise ConfigError(
            "--model-out/--export", "take one --config (use --export-best with several)"
        )
    if args.sign_key and not (args.export or args.export_best):
        raise ConfigError("--sign-key", "signs an exported artifact: add --export or --export-best")
    _check_sign_key(args.sign_key)  # before the training, not after it
    results = []
    with progress_bars(not args.quiet and not args.json):
        for path, config in configs:
            try:
                result = run_training(config, args.tracking_uri, args.experiment, args.model_out)
            except ConfigError as exc:
                if exc.source:
                    raise
                raise ConfigError(exc.key, exc.problem, path) from None
            results.append(result)
            if not args.json:
                print(result.format_table() + "\n", flush=True)
            if args.export:
                from training.export import export_run

                path = export_run(result.run_id, args.export, args.tracking_uri, args.register,
                                  args.sign_key)  # fmt: skip
                if not args.json:
                    print(
                        f"exported to {path}"
                        + (
                            f", registered as models:/{args.register}@champion"
                            if args.register
                            else ""
                        )
                    )
    if args.json:
        payload = [r.to_dict() for r in results]
        _emit_json(payload[0] if len(payload) == 1 else payload)
    elif len(results) > 1:
        print(format_comparison(results))
    if args.export_best:
        from training.export import ExportError, export_run

        task, _, metric = args.best_metric.partition("/")

        def value(result: Any) -> float:
            return next(
                (
                    e.metrics.get(metric, float("-inf"))
                    for e in result.evaluations
                    if e.task == task
                ),
                float("-inf"),
            )

        best = max(results, key=value)
        try:
            path = export_run(best.run_id, args.export_best, args.tracking_uri, args.register,
                              args.sign_key)  # fmt: skip
        except ExportError as exc:  # e.g. the best kind has no graph
            raise ConfigError("--export-best", f"{best.config.name}: {exc}") from None
        if not args.json:
            print(
                f"\nbest by {args.best_metric}: {best.config.name} ({value(best):.4f}), exported to {path}"
            )
    return EXIT_OK


def _check_sign_key(path: str | None) -> None:
    """``--sign-key`` must name a readable Ed25519 private key: checked before any training."""
    from pathlib import Path

    if path is None:
        return
    if not Path(path).is_file():
        raise ConfigError("--sign-key", f"{path}: no such key file (an Ed25519 private key)")
    from serving.signing import SigningError, load_private_key

    try:
        load_private_key(path)
    except SigningError as exc:
        raise ConfigError("--sign-key", str(exc)) from None


def cmd_export(args: argparse.Namespace) -> int:
    from training.export import ExportError, export_run

    _check_sign_key(args.sign_key)
    try:
        path = export_run(args.run_id, args.out, args.tracking_uri, args.register, args.sign_key)
    except ExportError as exc:
        raise ConfigError("--run-id", str(exc)) from None
    manifest = json.loads((path / "manifest.json").read_text())
    if args.json:
        _emit_json({"artifact": str(path), "manifest": manifest})
    else:
        print(f"exported {manifest['model_kind']} of run {args.run_id} to {path}")
        # Reported, not checked: the run's logged inputs are used, not the data files.
        print(f"trained on data fingerprint {manifest['data_fingerprint']}")
        if args.sign_key:
            print(f"signed with {args.sign_key}")
        if args.register:
            print(f"registered as models:/{args.register}@champion")
    return EXIT_OK


def cmd_tune(args: argparse.Namespace) -> int:
    """``addons tune``: Optuna search over the config's ``tune:`` section (docs/tuning.md)."""
    from training.config import load_config
    from training.progress import progress_bars
    from training.tuning import TuneOptions, read_payload, run_tune

    config = load_config(args.config, args.set)
    if config.tune is None:
        raise ConfigError("tune", "the config has no tune: section (see docs/tuning.md)",
                          args.config)  # fmt: skip

    def on_trial(trial: Any) -> None:
        if not args.json:
            value = "" if trial.value is None else f" {trial.value:.6g}"
            seconds = trial.duration.total_seconds() if trial.duration else 0.0
            print(f"trial {trial.number:>4} {trial.state.name:<8}{value}  {trial.params}  "
                  f"{seconds:.1f} s", flush=True)  # fmt: skip

    options = TuneOptions(
        trials=args.trials, timeout=args.timeout, storage=args.storage, study=args.study,
        jobs=args.jobs, refit=args.refit, out=args.out, tracking_uri=args.tracking_uri,
        experiment=args.experiment, on_trial=on_trial,
    )  # fmt: skip
    try:
        with progress_bars(False):  # one line per trial instead
            result = run_tune(config, options, read_payload(args.config, args.set))
    except ConfigError as exc:  # raised deep inside (e.g. a split bound): name the file too
        if exc.source or exc.key.startswith("--"):
            raise
        raise ConfigError(exc.key, exc.problem, args.config) from None
    if args.json:
        _emit_json(result.to_dict())
    else:
        print(result.format_table())
    return EXIT_FAILURE if result.errors else EXIT_OK


def cmd_retrain(args: argparse.Namespace) -> int:
    """``addons retrain``: champion / challenger through the registry (docs/retraining.md).
    Exit 0 promoted or kept, 3 a gate failed, 4 another retrain holds the lock."""
    from training.config import load_config
    from training.progress import progress_bars
    from training.retrain import RetrainBusy, RetrainOptions, run_retrain

    config = load_config(args.config, args.set)
    options = RetrainOptions(
        model_name=args.model_name, as_of=args.as_of, min_improvement=args.min_improvement,
        metric=args.metric, tune_trials=args.tune_trials, tracking_uri=args.tracking_uri,
        experiment=args.experiment, wait=args.wait,
    )  # fmt: skip
    try:
        with progress_bars(False):
            report = run_retrain(config, options, args.config)
    except RetrainBusy as exc:
        if args.json:
            _emit_json({"error": str(exc), "kind": "RetrainBusy"})
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except ConfigError as exc:  # raised deep inside (e.g. a split bound): name the file too
        if exc.source or exc.key.startswith("--"):
            raise
        raise ConfigError(exc.key, exc.problem, args.config) from None
    if args.json:
        _emit_json(report.to_dict())
    else:
        print(report.format_table())
    return report.exit_code


def cmd_rollback(args: argparse.Namespace) -> int:
    """``addons rollback``: move ``champion`` back to the ``previous`` version."""
    from training.retrain import RetrainBusy, rollback

    try:
        result = rollback(args.model_name, args.tracking_uri, args.wait)
    except RetrainBusy as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    if args.json:
        _emit_json(result)
    else:
        print(f"models:/{result['model_name']}@champion is version {result['champion']} again"
              + (f"; version {result['previous']} is now @previous" if result["previous"]
                 else ""))  # fmt: skip
    return EXIT_OK


def cmd_keygen(args: argparse.Namespace) -> int:
    """Write a new Ed25519 key pair for signing artifacts (``export --sign-key``)."""
    from serving.signing import SigningError, generate_keypair

    try:
        generate_keypair(args.private, args.public)
    except SigningError as exc:
        raise ConfigError("--private/--public", str(exc)) from None
    if args.json:
        _emit_json({"private": args.private, "public": args.public})
    else:
        print(f"wrote private key {args.private} (mode 0600: keep it off the serving hosts)")
        print(f"wrote public key {args.public} (give it to serve/rank as --trust-key)")
    return EXIT_OK


def _rule_settings(args: argparse.Namespace) -> Any:
    """The business rules of ``rank`` / ``rank-batch`` / ``serve``: the ``--rules`` file (or
    the defaults), then each rule flag given on the command line, which wins over the file."""
    from serving.rules import RulesError, RuleSettings, load_rules

    try:
        settings = load_rules(args.rules) if args.rules else RuleSettings()
    except RulesError as exc:
        raise ConfigError(exc.key, exc.problem, exc.source) from None
    flags = (("default_k", "--k", args.k), ("exclude_owned", "--exclude-owned", args.exclude_owned),
             ("max_per_category", "--max-per-category", args.max_per_category))  # fmt: skip
    for key, flag, value in flags:
        if value is not None:
            try:
                settings = settings.replace(**{key: value})
            except RulesError as exc:
                raise ConfigError(flag, exc.problem) from None
    return settings


def _trusted_keys(args: argparse.Namespace) -> list[str] | None:
    """``--trust-key`` files (None: signatures not required); each must exist."""
    from pathlib import Path

    for key in args.trust_key or []:
        if not Path(key).is_file():
            raise ConfigError("--trust-key", f"{key}: no such key file (an Ed25519 public key)")
    return args.trust_key or None


def _model_path(args: argparse.Namespace) -> str:
    """``--model``: an artifact directory, or a ``models:/`` URI resolved through the registry
    (downloaded once into ``--cache``)."""
    if not args.model.startswith("models:/"):
        return args.model
    from training.registry import resolve

    return str(resolve(args.model, args.cache, args.tracking_uri))


def cmd_rank(args: argparse.Namespace) -> int:
    from serving import ArtifactError, Ranker
    from serving.ranker import RequestError

    settings, trusted = _rule_settings(args), _trusted_keys(args)
    model = _model_path(args)
    try:
        ranker = Ranker.load(model, settings, trusted_keys=trusted)
        result = ranker.rank(
            user_id=args.user,
            # "a, b" is a list of two ids: spaces around the commas are layout, not id text
            cart=[c.strip() for c in (args.cart or "").split(",") if c.strip()],
            anchor=args.anchor,
            placement=args.placement,
            offer=args.offer,
            exclude=[c.strip() for c in (args.exclude or "").split(",") if c.strip()],
        )
    except (ArtifactError, RequestError) as exc:
        raise ConfigError(
            "--model" if isinstance(exc, ArtifactError) else "request", str(exc)
        ) from None
    if args.json:
        _emit_json(result.to_dict())
        return EXIT_OK
    for rank, item in enumerate(result.items, 1):
        price = f"{item.price:7.2f}" if item.price is not None else "      ?"
        category = str(item.category or "?")[:30]
        print(
            f"{rank:>2}. {item.item_id!s:<12} {category:<30} {price}  score {item.score:.4f}  {item.reason}"
        )
    for note in result.notes:  # unknown ids, with the known id each resembles
        print(note)
    if result.why_empty:
        print(f"no {args.offer} offer: {result.why_empty}")
    return EXIT_OK


def cmd_rank_batch(args: argparse.Namespace) -> int:
    import signal

    from features.io import recover
    from serving import ArtifactError, Ranker
    from serving.batch import BatchInputError, rank_file
    from training.progress import bar, progress_bars
    from training.tracking import Terminated

    settings, trusted = _rule_settings(args), _trusted_keys(args)
    model = _model_path(args)
    if args.engine == "spark":
        return _rank_batch_spark(args, model, settings, trusted)
    try:
        ranker = Ranker.load(model, settings, threads=args.threads, trusted_keys=trusted)
    except ArtifactError as exc:
        raise ConfigError("--model", str(exc)) from None
    recover(args.out)  # temp files of runs killed before they could remove them (kill -9)

    def on_term(signum: int, frame: Any) -> None:
        # an exception, so that rank_file removes its temp file on the way out (exit 143)
        raise Terminated(f"terminated by signal {signum}")

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        with progress_bars(not args.quiet):
            pbar = bar(desc="users", unit="user")
            try:
                rows = rank_file(ranker, args.users, args.out, None, args.offer, args.placement,
                                 args.chunk_size, pbar.update)  # fmt: skip
            except BatchInputError as exc:
                raise ConfigError("--users/--out", str(exc)) from None
            finally:
                pbar.close()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if args.json:
        _emit_json({"rows": rows, "out": args.out})
    else:
        print(f"wrote {rows:,} offers to {args.out}")
    return EXIT_OK


def _rank_batch_spark(args: argparse.Namespace, model: str, settings: Any,
                      trusted: list[str] | None) -> int:  # fmt: skip
    """``rank-batch --engine spark``: a Parquet of requests ranked with ``mapInPandas`` on
    ``--master`` (serving.spark_batch); the output is a folder of Parquet parts."""
    from pathlib import Path

    from serving import ArtifactError
    from serving.batch import BatchInputError
    from serving.spark_batch import rank_parquet, session

    if not args.users.endswith(".parquet") and not Path(args.users).is_dir():
        raise ConfigError("--users", f"{args.users}: --engine spark reads Parquet (a .parquet "
                          "file or folder); convert the CSV first")  # fmt: skip
    if Path(args.out).suffix.lower() == ".csv":
        raise ConfigError("--out", f"{args.out}: --engine spark writes a Parquet folder, not CSV")
    try:
        spark = session(args.master)
    except BatchInputError as exc:
        raise ConfigError("--engine", str(exc)) from None
    try:
        rows = rank_parquet(spark, model, args.users, args.out, settings, None, args.offer,
                            args.placement, args.chunk_size, trusted, args.partitions)  # fmt: skip
    except ArtifactError as exc:
        raise ConfigError("--model", str(exc)) from None
    except BatchInputError as exc:
        raise ConfigError("--users/--out", str(exc)) from None
    finally:
        spark.stop()
    if args.json:
        _emit_json({"rows": rows, "out": args.out, "engine": "spark"})
    else:
        print(f"wrote {rows:,} offers to {args.out} (Spark, {args.master})")
    return EXIT_OK


def _limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas for the server, as ``MALLOC_ARENA_MAX=2`` would.

    glibc gives each thread that allocates concurrently its own arena (up to 8 per core),
    and each arena keeps the memory freed in it: a threaded server's resident size then
    grows with its thread pool after large batch requests. The environment variable is read
    only when the process starts, so setting it here would be too late; ``mallopt
    (M_ARENA_MAX)`` sets the same limit in the running process, before the server's threads
    exist. Nothing is changed when ``MALLOC_ARENA_MAX`` is set (glibc applied it already) or
    when the C library has no ``mallopt`` (musl, macOS). True if the limit was set.
    """
    import ctypes
    import os

    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_arena_max = -8  # glibc's malloc.h
    if mallopt(m_arena_max, arenas) != 1:
        return False
    os.environ["MALLOC_ARENA_MAX"] = str(arenas)  # the same limit for child processes
    return True


#: How ``addons serve --workers N`` hands each worker its command line and resolved model.
_WORKER_ARGV, _WORKER_MODEL = "ADDONS_SERVE_ARGV", "ADDONS_SERVE_MODEL"


def _serve_app(args: argparse.Namespace, model: str) -> Any:
    """The FastAPI app of ``addons serve`` for the artifact at ``model`` (exit 2 if bad)."""
    from serving import ArtifactError
    from serving.http import create_app

    settings, trusted = _rule_settings(args), _trusted_keys(args)
    try:
        return create_app(model, settings, reload_interval=args.reload_interval or None,
                          trusted_keys=trusted)  # fmt: skip
    except ArtifactError as exc:
        raise ConfigError("--model", str(exc)) from None


def serve_worker_app() -> Any:
    """The app of one ``--workers`` process (a uvicorn factory, run in a spawned process):
    the supervisor's command line and resolved model path come in the environment."""
    from serving.http import configure_json_logging

    configure_json_logging()
    args = build_parser().parse_args(json.loads(os.environ[_WORKER_ARGV]))
    return _serve_app(args, os.environ[_WORKER_MODEL])


def cmd_serve(args: argparse.Namespace) -> int:
    _limit_malloc_arenas()
    import uvicorn

    from serving.http import configure_json_logging

    if args.workers < 1:
        raise ConfigError("--workers", f"must be >= 1, got {args.workers}")
    configure_json_logging()
    model = _model_path(args)
    if args.model.startswith("models:/") and args.reload_interval and "@" in args.model:
        # the alias is followed on this side (serving never imports mlflow): a moved alias
        # switches <cache>/NAME/current, which the server's own watcher (each worker's)
        # then hot-reloads. One watcher for all workers: one registry client, one download.
        from training.registry import AliasWatcher

        AliasWatcher(args.model, args.cache, args.tracking_uri).start(args.reload_interval)
    if args.workers == 1:
        app = _serve_app(args, model)
        uvicorn.run(app, host=args.host, port=args.port, log_config=None, log_level="warning")
        return EXIT_OK
    # fail here (exit 2), not in N workers, on a bad artifact or rules; no watcher thread, so
    # the checked app is freed at once (the supervisor serves nothing)
    _serve_app(argparse.Namespace(**{**vars(args), "reload_interval": 0}), model)
    import shutil
    import tempfile

    own = "PROMETHEUS_MULTIPROC_DIR" not in os.environ
    metrics_dir = tempfile.mkdtemp(prefix="addons-metrics-") if own else None
    # spawned workers inherit the environment: their metrics go to one folder, /metrics in
    # any worker reads them all (prometheus_client's multiprocess mode)
    env = {_WORKER_ARGV: json.dumps(sys.argv[1:]), _WORKER_MODEL: model}
    if metrics_dir is not None:
        env["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    os.environ.update(env)
    try:
        uvicorn.run("training.cli:serve_worker_app", factory=True, workers=args.workers,
                    host=args.host, port=args.port, log_config=None, log_level="warning")  # fmt: skip
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return EXIT_OK


def add_serving_arguments(parser: argparse.ArgumentParser, k_help: str) -> None:
    """The registry, trust and business-rule flags of ``rank``, ``rank-batch`` and ``serve``
    (read by :func:`_model_path`, :func:`_trusted_keys` and :func:`_rule_settings`)."""
    parser.add_argument(
        "--tracking-uri", default=None, help="for models:/ URIs (as for addons train)"
    )
    parser.add_argument(
        "--cache", default="artifacts/registry", help="where registry versions are downloaded"
    )
    parser.add_argument(
        "--trust-key", action="append", default=None, metavar="PUB",
        help="Ed25519 public key file; the artifact must be signed by one (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--rules", default=None, metavar="FILE",
        help="business rules file (YAML or JSON, see configs/rules/example.yaml); the flags "
        "below override it",
    )  # fmt: skip
    parser.add_argument("--k", type=int, default=None, help=k_help)
    parser.add_argument(
        "--exclude-owned", action=argparse.BooleanOptionalAction, default=None,
        help="never offer what the shopper bought before (durables; default: the rules file, "
        "else off: groceries are re-bought)",
    )  # fmt: skip
    parser.add_argument(
        "--max-per-category", type=int, default=None, metavar="N",
        help="at most N offers per category (default: the rules file, else 2)",
    )  # fmt: skip


def add_set_argument(parser: argparse.ArgumentParser) -> None:
    """``--set dotted.key=value`` (repeatable) for a command that reads ``--config``: pass
    ``args.set`` to :func:`training.config.load_config`."""
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set data.interactions.path=x.csv or "
        "--set evaluation.k=[5,10] (YAML value; repeatable; applies to every --config)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="addons",
        description="Train and evaluate recommenders for personalized add-ons (cross-sell, up-sell).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="inspect the input data")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    report = data_sub.add_parser(
        "report", help="load, validate and clean the configured data; print counts per step"
    )
    report.add_argument(
        "--config", required=True, help="experiment YAML (its data section is used)"
    )
    add_set_argument(report)
    report.add_argument("--json", action="store_true", help="machine-readable output")
    report.set_defaults(func=cmd_data_report)

    synth = data_sub.add_parser(
        "synth", help="write a synthetic shop (canonical Parquet files) for tests and "
        "benchmarks at any size; see docs/data_synth.md",
    )  # fmt: skip
    synth.add_argument("--rows", type=int, required=True, help="order lines (exactly)")
    synth.add_argument(
        "--users", type=int, required=True, help="households (each buys at least once)"
    )
    synth.add_argument("--items", type=int, required=True, help="products in the catalog")
    synth.add_argument("--seed", type=int, default=0, help="same seed: same bytes (default 0)")
    synth.add_argument("--out", required=True, help="folder to write (must not exist or be empty)")
    synth.add_argument(
        "--force", action="store_true", help="replace a folder written earlier by data synth"
    )
    synth.add_argument("--quiet", action="store_true", help="no progress bar")
    synth.add_argument("--json", action="store_true", help="machine-readable output")
    synth.set_defaults(func=cmd_data_synth)

    evaluate = sub.add_parser(
        "evaluate", help="fit the configured model on train and evaluate it on the test window"
    )
    evaluate.add_argument(
        "--config", required=True, help="experiment YAML, e.g. configs/cj_popularity.yaml"
    )
    add_set_argument(evaluate)
    evaluate.add_argument("--json", action="store_true", help="machine-readable output")
    evaluate.set_defaults(func=cmd_evaluate)

    train = sub.add_parser(
        "train", help="fit, evaluate (k = 3, 5, 10) and log everything to MLflow; prints the run id"
    )
    train.add_argument(
        "--config",
        required=True,
        action="append",
        help="experiment YAML, e.g. configs/cj_als.yaml; repeat to train several and compare them",
    )
    add_set_argument(train)
    train.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)",
    )
    train.add_argument("--experiment", default="addons", help="MLflow experiment name")
    train.add_argument(
        "--model-out", default=None, help="also save the fitted model to this folder"
    )
    train.add_argument(
        "--export", default=None, help="also export the model as an artifact directory"
    )
    train.add_argument(
        "--export-best", default=None, help="export the best of the trained models here"
    )
    train.add_argument(
        "--best-metric",
        default="basket_completion/ndcg@10",
        help="task/metric that picks the best (default %(default)s)",
    )
    train.add_argument(
        "--register", default=None, help="with --export: register under this name, alias champion"
    )
    train.add_argument(
        "--sign-key", default=None, help="with --export/--export-best: Ed25519 private key file "
        "that signs the artifact's manifest",
    )  # fmt: skip
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.add_argument("--json", action="store_true", help="machine-readable output")
    train.set_defaults(func=cmd_train)

    tune = sub.add_parser(
        "tune", help="search the config's tune: space with Optuna on validation folds; write "
        "the best as a config",
    )  # fmt: skip
    tune.add_argument("--config", required=True, help="experiment YAML with a tune: section")
    add_set_argument(tune)
    tune.add_argument(
        "--trials", type=int, default=None,
        help="finished trials the study should have (default: tune.trials of the config)",
    )  # fmt: skip
    tune.add_argument(
        "--timeout", type=float, default=None, help="start no new trial after this many seconds"
    )
    tune.add_argument(
        "--storage", default=None, metavar="URL",
        help="Optuna storage: sqlite:///FILE or postgresql://USER@HOST/DB (default: optuna.db "
        "beside the MLflow SQLite database)",
    )  # fmt: skip
    tune.add_argument("--study", default=None, help="study name (default: the config's name)")
    tune.add_argument("--jobs", type=int, default=1, help="trials run at once by this process")
    tune.add_argument(
        "--refit", action="store_true",
        help="then train the tuned config (all of train, test once) as an addons train run",
    )  # fmt: skip
    tune.add_argument(
        "--out", default=None, help="tuned config to write (default configs/tuned/<name>.yaml)"
    )
    tune.add_argument(
        "--tracking-uri", default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)",
    )  # fmt: skip
    tune.add_argument("--experiment", default="addons", help="MLflow experiment name")
    tune.add_argument("--json", action="store_true", help="machine-readable output")
    tune.set_defaults(func=cmd_tune)

    retrain = sub.add_parser(
        "retrain", help="train a challenger on the newest data, compare it with the registered "
        "champion on the newest holdout, promote it if better (docs/retraining.md)",
    )  # fmt: skip
    retrain.add_argument(
        "--config", required=True, help="experiment YAML (optional retrain: section)"
    )
    retrain.add_argument("--model-name", required=True, help="registered model name")
    add_set_argument(retrain)
    retrain.add_argument(
        "--as-of", default=None, metavar="DATE|WEEK",
        help="use only rows at or before this week number or ISO date (replays history)",
    )  # fmt: skip
    retrain.add_argument(
        "--min-improvement", type=float, default=None, metavar="X",
        help="promote only if the challenger beats the champion by at least X on the metric "
        "(absolute; default retrain.min_improvement, else 0)",
    )  # fmt: skip
    retrain.add_argument(
        "--metric", default=None, metavar="TASK/METRIC@K",
        help="decision metric (default retrain.metric, else basket_completion/ndcg@10)",
    )  # fmt: skip
    retrain.add_argument(
        "--tune-trials", type=int, default=None, metavar="N",
        help="re-tune the config's tune: space for N trials before fitting the challenger",
    )  # fmt: skip
    retrain.add_argument(
        "--tracking-uri", default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)",
    )  # fmt: skip
    retrain.add_argument("--experiment", default="addons-retrain", help="MLflow experiment name")
    retrain.add_argument(
        "--wait", type=float, default=0.0, metavar="SECONDS",
        help="wait this long for another retrain of the model to finish (default: exit 4 at once)",
    )  # fmt: skip
    retrain.add_argument("--json", action="store_true", help="machine-readable report")
    retrain.set_defaults(func=cmd_retrain)

    rollback = sub.add_parser(
        "rollback", help="move the champion alias back to the previous version"
    )
    rollback.add_argument("--model-name", required=True, help="registered model name")
    rollback.add_argument("--tracking-uri", default=None, help="as for addons retrain")
    rollback.add_argument(
        "--wait", type=float, default=0.0, metavar="SECONDS",
        help="wait this long for a running retrain of the model (default: exit 4 at once)",
    )  # fmt: skip
    rollback.add_argument("--json", action="store_true", help="machine-readable output")
    rollback.set_defaults(func=cmd_rollback)

    export = sub.add_parser(
        "export", help="export a run's model as a versioned ONNX artifact directory"
    )
    export.add_argument("--run-id", required=True, help="MLflow run id printed by addons train")
    export.add_argument("--out", required=True, help="artifact directory to write")
    export.add_argument("--tracking-uri", default=None, help="as for addons train")
    export.add_argument(
        "--register", default=None, help="register as this model name, alias champion"
    )
    export.add_argument(
        "--sign-key", default=None, help="Ed25519 private key file: sign the artifact's manifest"
    )
    export.add_argument("--json", action="store_true", help="machine-readable output")
    export.set_defaults(func=cmd_export)

    keygen = sub.add_parser("keygen", help="write an Ed25519 key pair to sign artifacts with")
    keygen.add_argument("--private", required=True, help="private key file to write (PEM, 0600)")
    keygen.add_argument("--public", required=True, help="public key file to write (PEM)")
    keygen.add_argument("--json", action="store_true", help="machine-readable output")
    keygen.set_defaults(func=cmd_keygen)

    rank = sub.add_parser("rank", help="rank add-ons for one shopper with an exported artifact")
    rank.add_argument("--model", required=True, help="artifact directory or models:/NAME@ALIAS")
    rank.add_argument("--user", default=None, help="user id (omit for an anonymous shopper)")
    rank.add_argument("--cart", default="", help="comma-separated item ids in the cart")
    rank.add_argument("--anchor", default=None, help="the item the offer is about")
    rank.add_argument(
        "--exclude", default="", help="comma-separated item ids not to offer (e.g. declined)"
    )
    rank.add_argument(
        "--offer", default="cross_sell", help="cross_sell, up_sell, bundle or impulse"
    )
    rank.add_argument(
        "--placement", default="cart", help="product, cart, checkout, category or email"
    )
    add_serving_arguments(rank, "number of offers (default: the rules file, else 3)")
    rank.add_argument("--json", action="store_true", help="machine-readable output")
    rank.set_defaults(func=cmd_rank)

    batch = sub.add_parser(
        "rank-batch", help="rank offers for a file of users (e-mail / call-centre lists)"
    )
    batch.add_argument("--model", required=True, help="artifact directory or models:/NAME@ALIAS")
    batch.add_argument(
        "--users", required=True,
        help="CSV or .parquet with a user_id column (optional cart: a|b|c)",
    )  # fmt: skip
    batch.add_argument(
        "--out", required=True, help="output .csv or .parquet (--engine spark: a Parquet folder)"
    )
    batch.add_argument(
        "--engine", choices=("local", "spark"), default="local",
        help="local: this process; spark: mapInPandas on --master (pip install '.[spark]')",
    )  # fmt: skip
    batch.add_argument("--master", default="local[2]", help="Spark master (--engine spark)")
    batch.add_argument(
        "--partitions", type=int, default=None,
        help="--engine spark: repartition the requests (shuffles: output order then differs)",
    )  # fmt: skip
    add_serving_arguments(batch, "offers per user (default: the rules file, else 3)")
    batch.add_argument("--offer", default="cross_sell")
    batch.add_argument("--placement", default="email")
    batch.add_argument(
        "--chunk-size", type=int, default=1000, help="users per chunk (memory stays constant)"
    )
    batch.add_argument(
        "--threads", type=int, default=2, help="onnxruntime threads (one caller: use the cores)"
    )
    batch.add_argument("--quiet", action="store_true")
    batch.add_argument("--json", action="store_true")
    batch.set_defaults(func=cmd_rank_batch)

    serve = sub.add_parser(
        "serve", help="HTTP API: POST /v1/rank, /v1/rank/batch; GET /v1/model, /healthz, /readyz"
    )
    serve.add_argument(
        "--model", required=True,
        help="artifact directory or models:/NAME@ALIAS (hot-reloaded when it changes)",
    )  # fmt: skip
    add_serving_arguments(serve, "default number of offers of a request without k (else 3)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=_port, default=8000)
    serve.add_argument(
        "--reload-interval",
        type=_seconds,
        default=5.0,
        help="seconds between artifact checks; 0 = off",
    )
    serve.add_argument(
        "--workers", type=int, default=1,
        help="server processes (each loads the artifact and hot-reloads it on its own; they "
        "share the port and the metrics folder)",
    )  # fmt: skip
    serve.set_defaults(func=cmd_serve)
    return parser


def _bounded(parse: type, what: str, low: float, high: float) -> Any:
    """An argparse type: ``parse(value)`` within ``low..high`` (nan is refused), else exit 2
    naming the flag."""

    def check(value: str) -> Any:
        try:
            number = parse(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}") from None
        if not low <= number <= high:  # also refuses nan
            raise argparse.ArgumentTypeError(f"expected {what} in {low}..{high}, got {value}")
        return number

    return check


#: --port: 0-65535 (uvicorn wrapped 99999 to 34463); --reload-interval: seconds >= 0 (a
#: negative or nan interval made the watcher spin).
_port = _bounded(int, "a port number", 0, 65535)
_seconds = _bounded(float, "seconds", 0, float("inf"))


def _os_error_message(exc: OSError) -> str:
    """``path: reason`` of a file-system error (both paths of a failed rename)."""
    paths = [str(p) for p in (exc.filename, exc.filename2) if p is not None]
    reason = exc.strerror or type(exc).__name__
    return f"{' -> '.join(paths)}: {reason}" if paths else f"{reason}: {exc}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 on bad arguments
    try:
        return int(args.func(args))
    except (InputError, OSError) as exc:
        # An OSError here is a path the user gave (an output folder that cannot be written, a
        # directory where a file is expected): bad input, named, not a traceback.
        message = _os_error_message(exc) if isinstance(exc, OSError) else str(exc)
        if getattr(args, "json", False):
            _emit_json({"error": message, "kind": type(exc).__name__})
        print(f"error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt as exc:  # Ctrl-C (130) or SIGTERM (143); MLflow runs end FAILED
        print(f"interrupted: {exc or 'keyboard interrupt'}", file=sys.stderr)
        return getattr(exc, "exit_code", 130)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
