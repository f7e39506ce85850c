"""``addons retrain``: unattended retraining, champion / challenger through the MLflow registry.

One job (docs/retraining.md has the user's view):

1. **Lock** the model name (:class:`RetrainLock`): one retrain at a time per name.
2. **Data**: the config's data, restricted to rows at or before ``--as-of`` (a week number
   or a date), cleaned and indexed. The **holdout** is the newest ``retrain.holdout`` weeks
   (``split.time_column: week``) or days (timestamps) of that visible data; unset, the
   length of the config's validation window (``train_end - validation_start + 1``). The
   challenger is fitted on every visible row before the holdout and judged on it.
3. **Data gates** (:func:`data_gates`): enough holdout queries, null and duplicate shares,
   row / user / item counts of the fitting part against the champion's, and the newest row
   newer than the champion's. A failed gate stops the job before training: exit 3.
4. **Train** the challenger and **export** it as an artifact (an MLflow run, tagged
   ``addons.command=retrain``, holds the model, its export inputs and the artifact).
5. **Evaluate what is served**: the champion's registered artifact, the challenger's
   artifact and the baselines' artifacts, each through the serving :class:`~serving.Ranker`
   on the same holdout queries (:func:`evaluate_artifact`, business rules off).
6. **Decide**: promote when the challenger is at least as good as every baseline (the floor)
   and beats the champion by more than nothing and at least ``min_improvement``; without a
   champion, the first challenger above the floor is promoted.
7. The run ends FINISHED with the report (``report.json``, tag ``addons.retrain.decision``);
   **then** the version is registered and the aliases move, ``champion`` last: a ``kill
   -9`` at any point leaves ``champion`` on the old version or on a fully evaluated new one.

Test hook: ``ADDONS_TEST_PAUSE_AT=retrain-<step>`` (``features.io``) stops the process at
that step so a test can kill it; the steps are :data:`PAUSE_POINTS`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import socket
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timedelta
from datetime import time as dtime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from features.dataset import Dataset, build_dataset
from features.errors import ConfigError
from features.io import _pause, pid_alive
from training.config import ExperimentConfig, ModelConfig, RetrainConfig, build_model

#: Exit codes for schedulers (the CLI returns them).
EXIT_DONE, EXIT_GATE, EXIT_BUSY = 0, 3, 4
CHAMPION, PREVIOUS, CHALLENGER = "champion", "previous", "challenger"
TASKS = ("basket_completion", "basket_completion_new", "next_period")
#: Where ``ADDONS_TEST_PAUSE_AT`` can stop a retrain (in this order).
PAUSE_POINTS = ("retrain-locked", "retrain-trained", "retrain-evaluated", "retrain-finished",
                "retrain-registered", "retrain-previous-set", "retrain-promoted")  # fmt: skip
TAG_LOCK = "addons.retrain.lock"
TAG_DECISION = "addons.retrain.decision"
TAG_STATE = "addons.retrain.state"
#: Version tags with the data a version was trained on (the next retrain's gate baseline).
STAT_TAGS = ("fit_rows", "fit_users", "fit_items", "newest", "holdout_start")


class RetrainBusy(RuntimeError):
    """Another retrain of the same model name holds the lock (exit 4, nothing done)."""

    exit_code = EXIT_BUSY


@dataclass
class RetrainOptions:
    """The ``addons retrain`` flags (None: the config's ``retrain:`` value or its default)."""

    model_name: str
    as_of: str | None = None
    min_improvement: float | None = None
    metric: str | None = None
    tune_trials: int | None = None
    tracking_uri: str | None = None
    experiment: str = "addons-retrain"
    wait: float = 0.0


@dataclass
class Gate:
    """One check: its value, the limit, and whether it passed (None: not applicable)."""

    name: str
    passed: bool | None
    value: Any
    limit: Any
    detail: str = ""


@dataclass
class RetrainReport:
    """What a retrain did: the JSON of ``--json`` (:meth:`to_dict`) and the table."""

    model_name: str
    metric: str
    as_of: str | None
    holdout: dict[str, Any]
    data: dict[str, Any]
    gates: list[Gate]
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    decision: str = ""
    reason: str = ""
    versions: dict[str, str | None] = field(default_factory=dict)
    run_id: str | None = None
    exit_code: int = EXIT_DONE
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["gates"] = [asdict(g) for g in self.gates]
        return out

    def format_table(self) -> str:
        h = self.holdout
        lines = [
            f"retrain {self.model_name}" + (f" as of {self.as_of}" if self.as_of else "")
            + f": holdout {h.get('column')} {h.get('start')}..{h.get('end')} "
            f"({h.get('queries', 0):,} {h.get('task')} queries), fitted on rows before it",
            "",
            f"{'gate':<22}{'value':>16}{'limit':>18}  result",
        ]  # fmt: skip
        for g in self.gates:
            result = {True: "ok", False: "FAILED", None: "n/a"}[g.passed]
            lines.append(f"{g.name:<22}{_cell(g.value):>16}{_cell(g.limit):>18}  {result}"
                         + (f"  ({g.detail})" if g.detail else ""))  # fmt: skip
        if self.metrics:
            lines += ["", f"{'model':<30}{self.metric:>28}"]
            for name, values in self.metrics.items():
                lines.append(f"{name:<30}{_cell(values.get(self.metric)):>28}")
        lines += ["", f"decision: {self.decision} ({self.reason})"]
        v = self.versions
        lines.append(
            f"versions: challenger {v.get('challenger') or '-'}, champion before "
            f"{v.get('champion_before') or '-'}, after {v.get('champion_after') or '-'}"
        )
        lines += [f"note: {n}" for n in self.notes]
        if self.run_id:
            lines.append(f"mlflow run id: {self.run_id}")
        return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


# -- settings ---------------------------------------------------------------------------------


def parse_metric(text: str, key: str = "--metric") -> tuple[str, str, int]:
    """``basket_completion/ndcg@10`` -> (task, metric, k); a bad one names ``key``."""
    from training.evaluation.metrics import METRICS

    task, _, rest = text.partition("/")
    name, _, k = rest.partition("@")
    if task not in TASKS or name not in METRICS or not k.isdigit() or int(k) < 1:
        raise ConfigError(
            key, f"expected task/metric@k with task one of {', '.join(TASKS)} and metric one "
            f"of {', '.join(sorted(METRICS))}, e.g. basket_completion/ndcg@10, got {text!r}",
        )  # fmt: skip
    return task, name, int(k)


def check_settings(settings: RetrainConfig, source: str | None = None) -> None:
    """Range checks of the ``retrain:`` section (its types are checked when the config
    loads); a bad value names its dotted key."""
    from training.export import EXPORTABLE
    from training.models import MODELS

    def bad(key: str, problem: str) -> ConfigError:
        return ConfigError(f"retrain.{key}", problem, source)

    if settings.holdout is not None and settings.holdout < 1:
        raise bad("holdout", f"must be >= 1 (weeks or days), got {settings.holdout}")
    try:
        parse_metric(settings.metric, "retrain.metric")
    except ConfigError as exc:
        raise bad("metric", exc.problem) from None
    if not math.isfinite(settings.min_improvement) or settings.min_improvement < 0:
        raise bad("min_improvement", f"must be a number >= 0, got {settings.min_improvement}")
    for i, kind in enumerate(settings.baselines):
        if kind not in MODELS or kind not in EXPORTABLE:
            raise bad(f"baselines[{i}]", f"unknown or not exportable model kind {kind!r}")
    for key in ("max_row_drop", "max_user_drop", "max_item_drop", "max_null_share",
                "max_duplicate_share"):  # fmt: skip
        value = getattr(settings, key)
        if not 0.0 <= value <= 1.0:
            raise bad(key, f"must be a share from 0 to 1, got {value}")
    if settings.min_holdout_queries < 1:
        raise bad("min_holdout_queries", f"must be >= 1, got {settings.min_holdout_queries}")


def parse_as_of(text: str | None) -> int | datetime | None:
    """``--as-of``: a week number (``49``) or an ISO date / date-time (``2024-05-31``: the
    whole day; ``2024-05-31T12:00``: up to that instant)."""
    if text is None:
        return None
    text = text.strip()
    if text.isdigit():
        return int(text)
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(
            "--as-of", f"expected a week number (49) or an ISO date (2024-05-31), got {text!r}"
        ) from None
    if len(text) <= 10:  # a date alone: every row of that day
        return datetime.combine(parsed.date(), dtime.max)
    return parsed.replace(tzinfo=None)


# -- data -------------------------------------------------------------------------------------


def load_visible(config: ExperimentConfig, as_of: int | datetime | None) -> tuple[Dataset, dict]:
    """The config's data as of ``as_of`` (rows at or before it, cleaned and indexed as
    ``addons train`` would), and the raw rows' null and duplicate shares."""
    from features.loading import load_raw

    raw = load_raw(config.data)
    rows = raw.interactions
    if as_of is not None:
        if isinstance(as_of, int):
            if "week" not in rows.columns or rows["week"].null_count() == rows.height:
                raise ConfigError("--as-of", "this data has no week column: give a date")
            rows = rows.filter(pl.col("week") <= as_of)
        else:
            rows = rows.filter(pl.col("timestamp") <= as_of)
        if rows.height == 0:
            raise ConfigError("--as-of", f"no row of the data is at or before {as_of}")
    keys = [c for c in ("user_id", "item_id", "timestamp", "basket_id") if c in rows.columns]
    n = max(rows.height, 1)
    shares = {
        "raw_rows": rows.height,
        "null_share": rows.select(pl.any_horizontal(pl.col(keys).is_null()).sum()).item() / n,
        "duplicate_share": (rows.height - rows.unique().height) / n,
    }
    extra = {"as_of": str(as_of)} if as_of is not None else {}
    data = build_dataset(
        replace(raw, interactions=rows),
        config.data.cleaning,
        {"data": asdict(config.data), **extra},
    )
    return data, shares


def holdout_length(config: ExperimentConfig) -> int:
    """``retrain.holdout``, else the validation window's length in the split's unit."""
    from features.splits import _bound

    settings = config.retrain or RetrainConfig()
    if settings.holdout is not None:
        return settings.holdout
    s = config.split
    if s.kind != "time" or s.validation_start is None:
        raise ConfigError(
            "retrain.holdout", "required: the config has no validation window (split.kind time "
            "with split.validation_start) to take the holdout length from",
        )  # fmt: skip
    if s.column == "week":
        return int(s.train_end) - int(s.validation_start) + 1  # type: ignore[arg-type]
    start = _bound(s.validation_start, "timestamp", "validation_start")
    end = _bound(s.train_end, "timestamp", "train_end")
    return max(1, math.ceil((end - start).total_seconds() / 86400))


def holdout_split(config: ExperimentConfig, data: Dataset) -> tuple[Dataset, Dataset, dict]:
    """(fitting part, holdout, description): the holdout is the newest ``holdout_length``
    weeks (inclusive, by the ``week`` column) or calendar days (by ``timestamp``) of
    ``data``; the fitting part is every row before it."""
    length = holdout_length(config)
    column = config.split.column if config.split.kind == "time" else "timestamp"
    values = data.interactions[column]
    if values.null_count() == len(values):
        raise ConfigError("split.time_column", f"this data has no {column!r} column")
    newest = values.max()
    if column == "week":
        start: Any = int(newest) - length + 1
        shown_start, shown_end = start, int(newest)
    else:
        start = datetime.combine(newest.date() - timedelta(days=length - 1), dtime.min)
        shown_start, shown_end = start.date().isoformat(), newest.isoformat(sep=" ")
    c = pl.col(column)
    fit, holdout = data.restrict(c < start), data.restrict(c >= start)
    if fit.interactions.height == 0:
        raise ConfigError(
            "retrain.holdout", f"the {length}-{'week' if column == 'week' else 'day'} holdout "
            f"from {shown_start} leaves no row before it to fit on",
        )  # fmt: skip
    info = {"column": column, "length": length, "start": shown_start, "end": shown_end,
            "newest": str(newest)}  # fmt: skip
    return fit, holdout, info


def data_stats(fit: Dataset, info: dict, shares: dict) -> dict[str, Any]:
    """What the gates compare (and the version records for the next retrain)."""
    df = fit.interactions
    return {
        "fit_rows": df.height,
        "fit_users": int(df["user_idx"].n_unique()),
        "fit_items": int(df["item_idx"].n_unique()),
        "newest": info["newest"],
        "holdout_start": str(info["start"]),
        "null_share": shares["null_share"],
        "duplicate_share": shares["duplicate_share"],
        "raw_rows": shares["raw_rows"],
        "fingerprint": fit.fingerprint,
    }


def _newer(a: str, b: str) -> bool | None:
    """Whether ``a`` is after ``b`` (week numbers or ISO date-times); None when they are not
    comparable (a week and a date: the champion was trained with another time column)."""
    weeks = [x.lstrip("-").isdigit() for x in (a, b)]
    if all(weeks):
        return int(a) > int(b)
    if any(weeks):
        return None
    try:
        return datetime.fromisoformat(a) > datetime.fromisoformat(b)
    except ValueError:
        return None


def data_gates(
    stats: dict[str, Any], champion: dict[str, Any] | None, settings: RetrainConfig, queries: int
) -> list[Gate]:
    """The data gates (each a ``retrain:`` setting); champion comparisons are n/a without a
    champion or without its recorded statistics."""
    gates = [
        Gate("holdout_queries", queries >= settings.min_holdout_queries, queries,
             settings.min_holdout_queries, "queries the holdout gives the metric's task"),
        Gate("null_share", stats["null_share"] <= settings.max_null_share,
             round(stats["null_share"], 6), settings.max_null_share, "rows with a null id or time"),
        Gate("duplicate_share", stats["duplicate_share"] <= settings.max_duplicate_share,
             round(stats["duplicate_share"], 6), settings.max_duplicate_share,
             "exact duplicate rows"),
    ]  # fmt: skip
    for what, key in (("rows", "max_row_drop"), ("users", "max_user_drop"),
                      ("items", "max_item_drop")):  # fmt: skip
        value, drop = stats[f"fit_{what}"], getattr(settings, key)
        before = (champion or {}).get(f"fit_{what}")
        if before is None:
            gates.append(Gate(f"{what}_vs_champion", None, value, None, "no champion statistics"))
            continue
        limit = math.ceil((1 - drop) * int(before))
        gates.append(Gate(f"{what}_vs_champion", value >= limit, value, limit,
                          f"champion fitted on {int(before):,}; {key} {drop}"))  # fmt: skip
    before = (champion or {}).get("newest")
    if not settings.require_newer:
        gates.append(
            Gate("newer_than_champion", None, stats["newest"], before, "require_newer off")
        )
    elif before is None:
        gates.append(Gate("newer_than_champion", None, stats["newest"], None,
                          "no champion statistics"))  # fmt: skip
    else:
        gates.append(Gate("newer_than_champion", _newer(str(stats["newest"]), str(before)),
                          stats["newest"], before, "newest row after the champion's"))  # fmt: skip
    return gates


# -- evaluation through the serving Ranker ----------------------------------------------------


def evaluate_artifact(path: str | Path, task: Any, fit: Dataset, ks: list[int],
                      metric_names: list[str], average: str = "query",
                      category_level: str = "category") -> dict[str, float]:  # fmt: skip
    """Metrics of the artifact at ``path`` on ``task`` (built on ``fit``), ranked by the
    serving :class:`~serving.Ranker` exactly as served, business rules off (in-stock,
    price windows, category caps and margin do not apply: the model is judged). Items the
    artifact does not know cannot be ranked; users it does not know are ranked as
    anonymous shoppers; the cart (and, when the task says so, what the user bought in
    ``fit``) is excluded for every artifact alike."""
    from serving import Ranker, RuleSettings
    from training.evaluation.harness import score_recommendations

    k_max = max(ks)
    n = fit.n_items
    settings = RuleSettings(default_k=k_max, max_k=k_max, max_cart_items=n, max_exclude_items=n,
                            in_stock_only=False, impulse_max_price=math.inf,
                            max_per_category=k_max, margin_weight=0.0)  # fmt: skip
    ranker = Ranker.load(path, settings)
    users = fit.user_map.to_external(task.users).tolist()
    owned = fit.user_item_counts() if task.exclude_owned else None
    to_ids = fit.item_map.external_ids
    requests = []
    for q in range(task.n_queries):
        cart = task.carts.indices[task.carts.indptr[q] : task.carts.indptr[q + 1]]
        exclude: list[Any] = []
        if owned is not None:
            u = int(task.users[q])
            exclude = to_ids[owned.indices[owned.indptr[u] : owned.indptr[u + 1]]].tolist()
        requests.append({"user_id": users[q], "cart": to_ids[cart].tolist(), "k": k_max,
                         "offer": "impulse", "exclude": exclude})  # fmt: skip
    recommended = np.full((task.n_queries, k_max), -1, dtype=np.int64)
    for q, result in enumerate(ranker.rank_many(requests)):
        ids = [item.item_id for item in result.items]
        if ids:
            recommended[q, : len(ids)] = fit.item_map.to_internal(ids, unknown="ignore")
    ev = score_recommendations(recommended, task, fit, ks, metric_names, average, category_level)
    return ev.metrics


# -- the lock ---------------------------------------------------------------------------------


def _owner() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "since": round(time.time(), 3)}


def _describe(owner: dict[str, Any] | None) -> str:
    if not owner:
        return "another retrain"
    since = datetime.fromtimestamp(float(owner.get("since", 0))).isoformat(timespec="seconds")
    return f"pid {owner.get('pid')} on {owner.get('host')} (since {since})"


class RetrainLock:
    """One retrain at a time per model name.

    - SQLite store: an exclusive ``flock`` on ``<db>.retrain-<name>.lock`` beside the
      database (released by the kernel when the process dies, ``kill -9`` included).
    - PostgreSQL store: ``pg_try_advisory_lock`` on a session of its own (released by the
      server when the session's connection closes, whatever killed the process).
    - Any other store (an MLflow server): a registered-model tag ``addons.retrain.lock``
      with the owner and an expiry refreshed by a heartbeat; an expired tag, or one of a
      dead process on this host, is taken over. (The registry has no compare-and-set: the
      tag is written, then read back after a pause, and the later writer wins; prefer a
      SQLite or PostgreSQL store for strict exclusion.)

    ``wait``: seconds to keep trying before :class:`RetrainBusy`.
    """

    def __init__(self, client: Any, uri: str, name: str, wait: float = 0.0,
                 kind: str | None = None) -> None:  # fmt: skip
        from training.tracking import sqlite_path

        self.client, self.uri, self.name, self.wait = client, uri, name, wait
        self.kind = kind or ("sqlite" if sqlite_path(uri) is not None
                             else "postgresql" if uri.startswith("postgresql") else "tag")  # fmt: skip
        self.owner = _owner()
        self._fh: Any = None
        self._conn: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # each try_* returns (acquired, who holds it)
    def _try_sqlite(self) -> tuple[bool, dict | None]:
        from training.tracking import sqlite_path

        db = sqlite_path(self.uri)
        assert db is not None
        digest = hashlib.sha256(self.name.encode()).hexdigest()[:16]
        path = db.with_name(f"{db.name}.retrain-{digest}.lock")
        db.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path, "a+")  # held open for the lock's lifetime
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            text = fh.read()
            fh.close()
            try:
                return False, json.loads(text)
            except ValueError:
                return False, None
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({**self.owner, "model": self.name}))
        fh.flush()
        self._fh = fh
        return True, None

    def _try_postgresql(self) -> tuple[bool, dict | None]:
        import psycopg

        if self._conn is None:
            rest = self.uri.partition("://")[2]
            self._conn = psycopg.connect(f"postgresql://{rest}", autocommit=True)
        key = int.from_bytes(hashlib.sha256(f"addons.retrain:{self.name}".encode()).digest()[:8],
                             "big", signed=True)  # fmt: skip
        row = self._conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
        if row and row[0]:
            return True, None
        return False, self._tag_owner()

    def _tag_owner(self) -> dict | None:
        try:
            model = self.client.get_registered_model(self.name)
        except Exception:  # no such model yet: nobody left a tag
            return None
        try:
            return json.loads(model.tags.get(TAG_LOCK, ""))
        except ValueError:
            return None

    def _write_tag(self) -> None:
        from training.tracking import heartbeat_seconds

        expires = time.time() + 4 * heartbeat_seconds()
        self.client.set_registered_model_tag(
            self.name, TAG_LOCK, json.dumps({**self.owner, "expires": round(expires, 3)})
        )

    def _try_tag(self) -> tuple[bool, dict | None]:
        _ensure_registered(self.client, self.name)
        held = self._tag_owner()
        if held and held.get("pid") != self.owner["pid"]:
            gone = held.get("host") == socket.gethostname() and not pid_alive(int(held["pid"]))
            if not gone and float(held.get("expires", 0)) > time.time():
                return False, held
        self._write_tag()
        time.sleep(0.5)  # a concurrent writer's tag lands meanwhile: the later one wins
        held = self._tag_owner() or {}
        mine = held.get("pid") == self.owner["pid"] and held.get("host") == self.owner["host"]
        return mine, None if mine else held

    def __enter__(self) -> RetrainLock:
        attempt = {"sqlite": self._try_sqlite, "postgresql": self._try_postgresql,
                   "tag": self._try_tag}[self.kind]  # fmt: skip
        deadline = time.monotonic() + max(self.wait, 0.0)
        while True:
            acquired, holder = attempt()
            if acquired:
                break
            if time.monotonic() >= deadline:
                self._release()
                raise RetrainBusy(
                    f"another retrain of model {self.name!r} is running ({_describe(holder)}; "
                    f"{self.kind} lock): nothing done. Run again later or pass --wait SECONDS"
                )
            time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))
        if self.kind == "tag":
            from training.tracking import heartbeat_seconds

            interval = heartbeat_seconds()

            def refresh() -> None:
                while not self._stop.wait(interval):
                    try:
                        self._write_tag()
                    except Exception:  # a briefly unreachable server: the next beat may pass
                        continue

            self._thread = threading.Thread(target=refresh, name="retrain-lock", daemon=True)
            self._thread.start()
        return self

    def _release(self) -> None:
        if self._fh is not None:
            self._fh.close()  # closing the file releases the flock
            self._fh = None
        if self._conn is not None:
            self._conn.close()  # ends the session: the advisory lock goes with it
            self._conn = None

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            try:
                self.client.delete_registered_model_tag(self.name, TAG_LOCK)
            except Exception:  # expired and taken over meanwhile, or the server is gone
                pass
        self._release()


# -- the registry -----------------------------------------------------------------------------


def _ensure_registered(client: Any, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name)
        except MlflowException:  # created concurrently
            client.get_registered_model(name)


def alias_version(client: Any, name: str, alias: str) -> Any | None:
    """The model version behind ``name@alias``, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def champion_stats(client: Any, version: Any) -> dict[str, Any] | None:
    """The champion's training-data statistics: the version's ``addons.data.*`` tags (set by
    a retrain), else the fitting part of its run's ``split.json`` (an ``addons train`` run:
    rows, users, items; no newest row)."""
    tags = version.tags or {}
    if "addons.data.fit_rows" in tags:
        out: dict[str, Any] = {k: tags.get(f"addons.data.{k}") for k in STAT_TAGS}
        for k in ("fit_rows", "fit_users", "fit_items"):
            out[k] = int(out[k]) if out[k] is not None else None
        return out
    if not version.run_id:
        return None
    try:
        import mlflow

        split = mlflow.artifacts.load_dict(f"runs:/{version.run_id}/split.json")
        train = split["train"]
        return {"fit_rows": int(train["rows"]), "fit_users": int(train["users"]),
                "fit_items": int(train["items"])}  # fmt: skip
    except Exception:  # a run without split.json (registered by other tools)
        return None


def _download(client: Any, version: Any, uri: str, folder: Path) -> Path:
    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=version.source, dst_path=str(folder), tracking_uri=uri
        )
    )


# -- the job ----------------------------------------------------------------------------------


def _settings(config: ExperimentConfig, options: RetrainOptions) -> RetrainConfig:
    settings = config.retrain or RetrainConfig()
    if options.metric is not None:
        parse_metric(options.metric)
        settings = replace(settings, metric=options.metric)
    if options.min_improvement is not None:
        if not math.isfinite(options.min_improvement) or options.min_improvement < 0:
            raise ConfigError("--min-improvement", f"must be >= 0, got {options.min_improvement}")
        settings = replace(settings, min_improvement=options.min_improvement)
    return settings


def _task(config: ExperimentConfig, name: str, fit: Dataset, holdout: Dataset) -> Any:
    from features.splits import TimeSplit
    from training.experiment import make_task

    return make_task(name, TimeSplit(fit, holdout, None, None, {}), config)


def _tuned(config: ExperimentConfig, fit: Dataset, trials: int, length: int, column: str) -> Any:
    """``--tune-trials``: ``addons tune``'s objective over the last ``length`` units of the
    fitting part (never the holdout); the config with the best parameters."""
    import optuna

    from features.splits import rolling_time_folds
    from training.tuning import Objective, make_pruner, make_sampler

    if config.tune is None:
        raise ConfigError("--tune-trials", "the config has no tune: section (docs/tuning.md)")
    values = fit.interactions[column]
    newest = values.max()
    if column == "week":
        start: Any = int(newest) - length + 1
        end: Any = int(newest)
    else:
        end = newest
        start = datetime.combine(newest.date() - timedelta(days=length - 1), dtime.min)
    folds = rolling_time_folds(fit, start, end, 1, column)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction=config.tune.direction, sampler=make_sampler(config),
                                pruner=make_pruner(config))  # fmt: skip
    study.optimize(Objective(config, folds), n_trials=trials)
    params = {**config.model.params, **study.best_trial.params}
    return replace(config, model=ModelConfig(config.model.kind, params))


def _log_model(model: Any, fit: Dataset, folder: Path) -> None:
    """The run's ``model/`` and ``export_inputs/`` as ``addons train`` logs them, so the
    retrain run also exports with ``addons export --run-id``."""
    import mlflow

    from training.export import ExportInputs
    from training.persistence import save_model

    save_model(model, folder / "model")
    fit.user_map.save(folder / "model" / "users.json")
    fit.item_map.save(folder / "model" / "items.json")
    mlflow.log_artifacts(str(folder / "model"), "model")
    mlflow.log_artifacts(str(ExportInputs.from_dataset(fit).save(folder / "inputs")),
                         "export_inputs")  # fmt: skip


def run_retrain(config: ExperimentConfig, options: RetrainOptions,
                source: str | None = None) -> RetrainReport:  # fmt: skip
    """One retrain of ``options.model_name`` (see the module doc); the report's
    ``exit_code`` is 0 (promoted or kept) or 3 (a gate failed)."""
    from training.tracking import connect, resolve_tracking_uri

    settings = _settings(config, options)
    check_settings(settings, source)
    task_name, metric_name, k = parse_metric(settings.metric)
    if options.tune_trials is not None and options.tune_trials < 1:
        raise ConfigError("--tune-trials", f"must be >= 1, got {options.tune_trials}")
    if options.tune_trials and config.tune is None:
        raise ConfigError("--tune-trials", "the config has no tune: section (docs/tuning.md)",
                          source)  # fmt: skip
    as_of = parse_as_of(options.as_of)
    holdout_length(config)  # a config without a holdout length fails before the lock
    uri = resolve_tracking_uri(options.tracking_uri)
    client = connect(uri)
    with RetrainLock(client, uri, options.model_name, options.wait):
        _pause("retrain-locked")
        report, promote = _evaluate_and_decide(config, options, settings, as_of, uri, client,
                                               (task_name, metric_name, k))  # fmt: skip
        if report.run_id is not None and report.decision != "data_gate_failed":
            _publish(client, options.model_name, report, promote)
    return report


def _evaluate_and_decide(config: ExperimentConfig, options: RetrainOptions,
                         settings: RetrainConfig, as_of: Any, uri: str, client: Any,
                         metric: tuple[str, str, int]) -> tuple[RetrainReport, bool]:  # fmt: skip
    """Steps 2-6 inside one MLflow run, which ends FINISHED with the report before anything
    is registered."""
    import mlflow

    from training.export import ExportInputs, export_model
    from training.tracking import flatten, git_commit, metric_key, mlflow_run

    task_name, metric_name, k = metric
    key = settings.metric
    name = options.model_name
    data, shares = load_visible(config, as_of)
    fit, holdout, info = holdout_split(config, data)
    task = _task(config, task_name, fit, holdout)
    info.update(task=task_name, queries=task.n_queries)
    stats = data_stats(fit, info, shares)
    old = alias_version(client, name, CHAMPION)
    before = champion_stats(client, old) if old is not None else None
    gates = data_gates(stats, before, settings, task.n_queries)
    report = RetrainReport(name, key, options.as_of, info, stats, gates)
    report.versions["champion_before"] = old.version if old is not None else None
    seen = (before or {}).get("holdout_start")  # the champion was fitted on rows before it
    if seen is not None and _newer(str(seen), str(info["start"])) is True:
        report.notes.append(
            f"the champion was fitted on rows before {seen}, which overlaps this holdout "
            f"(from {info['start']}): the comparison favours the champion"
        )
    promote = False
    with mlflow_run(options.experiment, f"retrain {name}", uri) as run:
        report.run_id = run.info.run_id
        mlflow.set_tags({"addons.command": "retrain", "addons.retrain.model": name,
                         "addons.retrain.as_of": str(options.as_of), "model_kind":
                         config.model.kind, "git_commit": git_commit() or "unknown",
                         "data_fingerprint": data.fingerprint})  # fmt: skip
        mlflow.log_params({k2: v[:6000] for k2, v in flatten(config.to_dict()).items()})
        mlflow.log_dict(config.to_dict(), "config.json")
        mlflow.log_dict(data.report.to_dict(), "data_report.json")
        failed = [g.name for g in gates if g.passed is False]
        if failed:
            report.decision, report.exit_code = "data_gate_failed", EXIT_GATE
            report.reason = f"data gate(s) failed: {', '.join(failed)}; nothing trained or moved"
            report.versions["champion_after"] = report.versions["champion_before"]
            _close_run(report)
            return report, False
        if options.tune_trials:
            config = _tuned(config, fit, options.tune_trials, info["length"], info["column"])
            mlflow.log_dict(config.to_dict(), "tuned_config.json")
            report.notes.append(f"tuned for {options.tune_trials} trials: {config.model.params}")
        model = build_model(config.model).fit(fit)
        ks = sorted({*config.evaluation.k, k})
        metric_names = list(dict.fromkeys([*config.evaluation.metrics, metric_name]))
        ev_args = (ks, metric_names, config.evaluation.average, config.evaluation.category_level)
        with tempfile.TemporaryDirectory(prefix="addons-retrain-") as tmp:
            folder = Path(tmp)
            _log_model(model, fit, folder)
            art = export_model(model, ExportInputs.from_dataset(fit), folder / "challenger",
                               run.info.run_id, fingerprint=fit.fingerprint)  # fmt: skip
            mlflow.log_artifacts(str(art), "artifact")
            _pause("retrain-trained")
            artifacts = {"challenger": art}
            if old is not None:
                artifacts[f"champion (v{old.version})"] = _download(client, old, uri,
                                                                    folder / "champion")  # fmt: skip
            for kind in settings.baselines:
                base = build_model(ModelConfig(kind, {})).fit(fit)
                artifacts[f"baseline {kind}"] = export_model(base, fit, folder / f"base-{kind}")
            for label, path in artifacts.items():
                values = evaluate_artifact(path, task, fit, *ev_args)
                report.metrics[label] = {f"{task_name}/{m}": v for m, v in values.items()}
                prefix = label.split(" (")[0].replace(" ", "_")
                mlflow.log_metrics(
                    {f"{prefix}/{task_name}/{metric_key(m)}": v for m, v in values.items()}
                )
        _pause("retrain-evaluated")
        promote = _decide(report, settings, old)
        _close_run(report)
    _pause("retrain-finished")
    return report, promote


def _decide(report: RetrainReport, settings: RetrainConfig, old: Any) -> bool:
    """Fill the decision; True to promote."""
    values = {label: m[settings.metric] for label, m in report.metrics.items()}
    mine = values["challenger"]
    floor = max((v for label, v in values.items() if label.startswith("baseline")), default=None)
    floor_ok = floor is None or mine >= floor
    report.gates.append(Gate("baseline_floor", floor_ok if floor is not None else None, mine,
                             floor, "challenger >= the best baseline"))  # fmt: skip
    if not floor_ok:
        report.decision, report.exit_code = "floor_failed", EXIT_GATE
        report.reason = (f"challenger {mine:.4f} is below the best baseline {floor:.4f}: it is "
                         "registered as @challenger, the champion stays")  # fmt: skip
        return False
    if old is None:
        report.decision, report.reason = (
            "promoted",
            "no champion yet; the challenger passes the floor",
        )
        return True
    theirs = values[f"champion (v{old.version})"]
    gain = mine - theirs
    if gain > 0 and gain >= settings.min_improvement:
        report.decision = "promoted"
        report.reason = (f"challenger {mine:.4f} beats champion v{old.version} {theirs:.4f} by "
                         f"{gain:.4f} >= {settings.min_improvement}")  # fmt: skip
        return True
    report.decision = "kept"
    report.reason = (f"challenger {mine:.4f} vs champion v{old.version} {theirs:.4f}: gain "
                     f"{gain:+.4f}; promotion needs a gain > 0 and >= {settings.min_improvement}")  # fmt: skip
    return False


def _close_run(report: RetrainReport) -> None:
    import mlflow

    mlflow.set_tags({TAG_DECISION: report.decision, TAG_STATE: "decided",
                     "addons.retrain.exit_code": str(report.exit_code)})  # fmt: skip
    mlflow.log_text(json.dumps(report.to_dict(), indent=2, default=str), "report.json")


def _publish(client: Any, name: str, report: RetrainReport, promote: bool) -> None:
    """Register the challenger, then move the aliases; ``champion`` moves last, in one
    registry write. The champion is re-read first: if someone moved it meanwhile (a manual
    ``addons export --register``), nothing is promoted."""
    assert report.run_id is not None
    run = client.get_run(report.run_id)
    _ensure_registered(client, name)
    version = client.create_model_version(name, f"{run.info.artifact_uri}/artifact",
                                          run_id=report.run_id)  # fmt: skip
    tags = {f"addons.data.{k}": str(report.data[k]) for k in STAT_TAGS}
    tags.update({TAG_DECISION: report.decision, "addons.retrain.run_id": report.run_id,
                 "addons.retrain.metric": report.metric,
                 "addons.retrain.value": str(report.metrics["challenger"][report.metric])})  # fmt: skip
    for key, value in tags.items():
        client.set_model_version_tag(name, version.version, key, value)
    report.versions["challenger"] = version.version
    _pause("retrain-registered")
    before = report.versions.get("champion_before")
    now = alias_version(client, name, CHAMPION)
    if promote and (now.version if now is not None else None) != before:
        promote = False
        report.decision = "kept"
        report.reason = (f"the champion moved during the retrain (v{before} -> "
                         f"v{now.version if now else None}); run the retrain again")  # fmt: skip
    if promote:
        if before is not None:
            client.set_registered_model_alias(name, PREVIOUS, before)
            report.versions["previous"] = before
        _pause("retrain-previous-set")
        client.set_registered_model_alias(name, CHAMPION, version.version)  # the commit point
        report.versions["champion_after"] = version.version
        _pause("retrain-promoted")
    else:
        client.set_registered_model_alias(name, CHALLENGER, version.version)
        report.versions["champion_after"] = before
    client.set_tag(report.run_id, TAG_STATE, "published")
    client.set_tag(report.run_id, "addons.retrain.version", version.version)
    client.set_tag(report.run_id, TAG_DECISION, report.decision)


def rollback(name: str, tracking_uri: str | None = None, wait: float = 0.0) -> dict[str, Any]:
    """``addons rollback``: ``champion`` back to ``previous``, and ``previous`` to the
    version that was champion (so a second rollback undoes the first). Under the retrain
    lock, so it never interleaves with a promotion."""
    from training.tracking import connect, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    client = connect(uri)
    with RetrainLock(client, uri, name, wait):
        prev = alias_version(client, name, PREVIOUS)
        if prev is None:
            raise ConfigError(
                "--model-name", f"model {name!r} has no version with the alias {PREVIOUS!r} at "
                f"{uri}: nothing to roll back to",
            )  # fmt: skip
        cur = alias_version(client, name, CHAMPION)
        client.set_registered_model_alias(name, CHAMPION, prev.version)
        if cur is not None and cur.version != prev.version:
            client.set_registered_model_alias(name, PREVIOUS, cur.version)
            client.set_model_version_tag(name, cur.version, "addons.rolled_back",
                                         datetime.now().isoformat(timespec="seconds"))  # fmt: skip
    return {"model_name": name, "champion": prev.version,
            "previous": cur.version if cur is not None else None}  # fmt: skip
