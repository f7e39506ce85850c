"""Batch ranking on Spark: ``addons rank-batch --engine spark`` and a ``spark-submit`` job.

The same ranking as :func:`serving.batch.rank_file`, spread over Spark executors:

- the requests are a Parquet file (or folder) with a ``user_id`` column and an optional
  ``cart`` (``|``-separated string or a list of ids), read by Spark in partitions;
- the artifact directory is shipped to the executors ONCE (``SparkContext.addFile``,
  recursive): each executor downloads it to its local ``SparkFiles`` folder, and each Python
  worker loads it once (a :class:`~serving.ranker.Ranker` cached per worker process, reused
  across tasks as ``spark.python.worker.reuse`` is on by default);
- ``mapInPandas`` ranks each partition as a stream of Arrow batches of ``chunk_size``
  requests (``spark.sql.execution.arrow.maxRecordsPerBatch``), so a task's memory is the
  ranker plus one chunk, whatever the partition's size;
- the output is a partitioned Parquet folder with the columns of
  :data:`serving.batch.COLUMNS`; read in part-file order it holds the in-process output's
  rows, same ids, same order (each input partition's output in its own ``part-NNNNN`` file,
  numbered as the input partitions). A local output folder is written under a temp name
  beside it and swapped in, so a reader never sees a half-written one; other file systems
  (``hdfs://``, ``s3a://``) get Spark's own ``_SUCCESS`` marker.

pyspark is imported lazily (the ``spark`` extra); serving never imports training or mlflow.
Cluster recipe: ``docs/serving.md`` (*Batch ranking on Spark*) or run this module with
``spark-submit`` (:func:`main`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from serving.batch import COLUMNS, HOST_TAG, BatchInputError, offer_rows, parse_cart
from serving.rules import RuleSettings

#: The output schema, as Spark DDL (the in-process Parquet writer's types).
SCHEMA = ("user_id string, rank int, item_id string, score float, reason string, "
          "category string, price double")  # fmt: skip
#: Rankers loaded in this Python worker, by (artifact path, settings, keys): loaded once.
_RANKERS: dict[tuple, Any] = {}


def _ranker(path: str, settings: RuleSettings, keys: tuple[str, ...]) -> Any:
    from serving.ranker import Ranker

    key = (path, repr(settings), keys)
    if key not in _RANKERS:
        _RANKERS.clear()  # one artifact per worker at a time: memory stays one ranker
        _RANKERS[key] = Ranker.load(path, settings, threads=1, trusted_keys=list(keys) or None)
    return _RANKERS[key]


def rank_partitions(batches: Iterator[Any], artifact: str, settings: RuleSettings,
                    keys: tuple[str, ...], k: int | None, offer: str,
                    placement: str) -> Iterator[Any]:  # fmt: skip
    """The ``mapInPandas`` function: pandas batches of requests in, offer rows out.

    ``artifact`` and ``keys`` are names given to ``SparkContext.addFile`` (resolved with
    ``SparkFiles.get`` on the executor), or local paths when not running under Spark.
    """
    import pandas as pd

    def local(name: str) -> str:
        try:
            from pyspark import SparkFiles

            path = SparkFiles.get(name)
            return path if os.path.exists(path) else name
        except Exception:  # not in a Spark task: a plain path
            return name

    ranker = _ranker(local(artifact), settings, tuple(local(k) for k in keys))
    for pdf in batches:
        carts = pdf["cart"] if "cart" in pdf.columns else [None] * len(pdf)
        requests = [
            {"user_id": str(u).strip(), "cart": parse_cart(_plain(c)), "k": k, "offer": offer,
             "placement": placement}
            for u, c in zip(pdf["user_id"], carts, strict=True)
        ]  # fmt: skip
        rows = offer_rows(requests, ranker.rank_many(requests))
        frame = pd.DataFrame(rows, columns=list(COLUMNS), dtype=object)
        for col in ("user_id", "item_id"):  # as the in-process writer: ids as text
            frame[col] = frame[col].map(str)
        yield frame.astype({"rank": "int32", "score": "float32", "price": "float64"})


def _plain(cart: Any) -> Any:
    """An Arrow list arrives as a numpy array: a list for :func:`parse_cart`."""
    if cart is None or isinstance(cart, str):
        return cart
    try:
        return list(cart)
    except TypeError:  # NaN of an all-null column
        return None


def _is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def rank_parquet(
    spark: Any,
    artifact: str | Path,
    source: str,
    target: str,
    settings: RuleSettings | None = None,
    k: int | None = None,
    offer: str = "cross_sell",
    placement: str = "email",
    chunk_size: int = 1000,
    trusted_keys: Sequence[str] | None = None,
    partitions: int | None = None,
) -> int:
    """Rank every request of the Parquet ``source`` into the Parquet folder ``target`` with
    the Spark session ``spark``; returns the rows written.

    ``partitions``: repartition the input first (None: Spark's split of the files, which
    keeps the input order; a repartition shuffles it).
    """
    settings = settings or RuleSettings()
    artifact = Path(artifact).resolve()
    # fail fast on the driver: a damaged or untrusted artifact before any task starts
    from serving.ranker import Ranker

    Ranker.load(artifact, settings, trusted_keys=list(trusted_keys) if trusted_keys else None)
    sc = spark.sparkContext
    sc.addFile(str(artifact), recursive=True)
    key_names = []
    for key in trusted_keys or []:
        sc.addFile(str(Path(key).resolve()))
        key_names.append(Path(key).name)
    conf = {"spark.sql.execution.arrow.maxRecordsPerBatch": str(chunk_size),
            **_split_conf(spark, sc.defaultParallelism)}  # fmt: skip
    before = {key: spark.conf.get(key, None) for key in conf}
    for key, value in conf.items():
        spark.conf.set(key, value)
    try:
        return _rank(spark, artifact.name, tuple(key_names), source, target, settings, k,
                     offer, placement, partitions)  # fmt: skip
    finally:  # the caller's session as it was (a pipeline may read other files with it)
        for key, value in before.items():
            spark.conf.unset(key) if value is None else spark.conf.set(key, value)


def _split_conf(spark: Any, slots: int) -> dict[str, str]:
    """File-split settings that cut the requests into about 2 x ``slots`` input partitions
    without a shuffle (so the input order is kept).

    Spark's default packs small files into one split per 4 MB "open cost" (a 1M-request
    Parquet is ~10 MB: 2-3 unequal tasks, a 60k one a single task on one core). With no open
    cost and ``minPartitionNum`` = 2 x slots, a split is total / (2 x slots) bytes, cut at
    row-group boundaries: every slot is busy and two rounds of tasks even out a slow one.
    Big inputs still get Spark's 128 MB splits. Settings the session already has are kept.
    """
    conf = {"spark.sql.files.openCostInBytes": "0"}
    if spark.conf.get("spark.sql.files.minPartitionNum", None) is None:
        conf["spark.sql.files.minPartitionNum"] = str(2 * max(int(slots), 1))
    return conf


def _rank(spark: Any, name: str, keys: tuple[str, ...], source: str, target: str,
          settings: RuleSettings, k: int | None, offer: str, placement: str,
          partitions: int | None) -> int:  # fmt: skip
    """The body of :func:`rank_parquet` once the session is configured."""
    from pyspark.sql.utils import AnalysisException

    try:
        requests = spark.read.parquet(source)
    except AnalysisException as exc:
        raise BatchInputError(f"{source}: cannot read as Parquet ({exc})") from None
    if "user_id" not in requests.columns:
        raise BatchInputError(f"{source}: expected a 'user_id' column, got {requests.columns}")
    requests = requests.select("user_id", *(["cart"] if "cart" in requests.columns else []))
    if partitions:
        requests = requests.repartition(partitions)

    def fn(batches: Iterator[Any]) -> Iterator[Any]:
        return rank_partitions(batches, name, settings, keys, k, offer, placement)

    offers = requests.mapInPandas(fn, schema=SCHEMA)
    if not _is_local(target):
        offers.write.mode("overwrite").parquet(target)
        return spark.read.parquet(target).count()
    final = Path(target.removeprefix("file://")).resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{HOST_TAG}.{os.getpid()}.",
                                suffix=".tmp", dir=final.parent))  # fmt: skip
    try:
        offers.write.mode("overwrite").parquet(str(tmp))
        rows = spark.read.parquet(str(tmp)).count()
        old = None
        if final.exists():
            if final.is_dir() and not (final / "_SUCCESS").exists() and any(final.iterdir()):
                raise BatchInputError(f"{final}: exists and is not a Spark output: not replaced")
            old = final.with_name(f".{final.name}.{HOST_TAG}.{os.getpid()}.old")
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return rows


def session(master: str | None = None, app: str = "addons rank-batch") -> Any:
    """A Spark session (``master`` None: the one ``spark-submit`` configured). The Python
    workers run this interpreter unless ``PYSPARK_PYTHON`` says otherwise."""
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise BatchInputError(
            "--engine spark needs pyspark: pip install 'addons-recsys[spark]'"
        ) from None
    if not os.environ.get("JAVA_HOME") and shutil.which("java") is None:
        # PySpark would fail later with a gateway traceback; say what is missing instead
        raise BatchInputError(
            "--engine spark needs Java 17 (a `java` on PATH or JAVA_HOME), e.g. Debian's "
            "openjdk-17-jre-headless (`make java` installs it)"
        )
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(app)
    if master:
        builder = builder.master(master)
    return builder.getOrCreate()


def main(argv: Sequence[str] | None = None) -> int:
    """``spark-submit serving/spark_batch.py --model DIR --users IN.parquet --out OUT``."""
    p = argparse.ArgumentParser(description="rank a Parquet of requests on Spark")
    p.add_argument("--model", required=True, help="artifact directory (on the driver)")
    p.add_argument("--users", required=True, help="Parquet of requests (user_id[, cart])")
    p.add_argument("--out", required=True, help="output folder (partitioned Parquet)")
    p.add_argument("--rules", default=None, help="business rules file")
    p.add_argument("--k", type=int, default=None)
    p.add_argument("--offer", default="cross_sell")
    p.add_argument("--placement", default="email")
    p.add_argument("--chunk-size", type=int, default=1000)
    p.add_argument("--partitions", type=int, default=None)
    p.add_argument("--trust-key", action="append", default=None)
    args = p.parse_args(argv)
    from serving.rules import load_rules

    settings = load_rules(args.rules) if args.rules else RuleSettings()
    if args.k is not None:
        settings = settings.replace(default_k=args.k)
    spark = session()
    try:
        rows = rank_parquet(spark, args.model, args.users, args.out, settings, None,
                            args.offer, args.placement, args.chunk_size, args.trust_key,
                            args.partitions)  # fmt: skip
    except BatchInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        spark.stop()
    print(f"wrote {rows:,} offers to {args.out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
