"""``addons tune``: hyper-parameter search with Optuna over a config's ``tune:`` section.

The objective never sees test. It is the mean, over the validation folds of
:func:`training.experiment.validation_folds`, of ``tune.metric`` (``task/metric@k``) computed
by the evaluation harness on the fold's validation part for a model fitted on the fold's
train part. Data, folds and ranking tasks are built once per process, not per trial.

Pruning: a model with epochs (``epoch_param``) reports the metric on the last fold every
``tune.report_every`` epochs (``trial.report``); the pruner may then stop it. The last fold
is fitted first, so a pruned trial never fits the others.

Storage: an Optuna RDB study (default ``sqlite:///optuna.db`` beside the MLflow SQLite
database; ``postgresql://`` for several machines). Trials carry a heartbeat; a trial whose
worker died (heartbeat older than ``STALE_INTERVALS`` intervals, or at once when its process
on this host is gone) is marked FAIL and re-queued with the same parameters. The budget
``--trials N`` counts finished (complete + pruned) trials of the study, whoever ran them: a
worker only starts a trial while ``finished + running < N``, checked and claimed under a
lock (``flock`` beside a SQLite file, a PostgreSQL advisory lock), so workers together
finish exactly N.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import tempfile
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from features.errors import ConfigError, InputError
from features.io import atomic_write_text, pid_alive
from training.config import (
    ExperimentConfig,
    ModelConfig,
    ParamSpace,
    apply_overrides,
    build_model,
    config_from_dict,
    parse_yaml,
)
from training.tracking import (
    STALE_INTERVALS,
    heartbeat_seconds,
    metric_key,
    mlflow_run,
    resolve_tracking_uri,
    sqlite_path,
    store_lock,
)

#: Study user attributes that pin what a study optimises; a resume must match them.
ATTR_SPACE, ATTR_OBJECTIVE, ATTR_DATA = (
    "addons.search_space",
    "addons.objective",
    "addons.data_fingerprint",
)
#: Trial user attributes: who runs it (a dead process on this host fails it at once).
ATTR_PID, ATTR_HOST = "addons.pid", "addons.host"
#: Trial user attribute of the trial that ran the config's own values (``enqueue_config``).
ATTR_FROM_CONFIG = "addons.from_config"
#: A failed trial is re-queued at most this many times (a trial that kills its worker
#: every time must not loop forever).
MAX_RETRY = 3
#: A worker gives up after this many trials in a row failed with an error.
MAX_CONSECUTIVE_FAILURES = 3
STORAGE_SCHEMES = ("sqlite", "postgresql", "postgres", "postgresql+psycopg")


# -- storage ---------------------------------------------------------------------------


def resolve_storage(storage: str | None, tracking_uri: str | None = None) -> str:
    """The SQLAlchemy URL of the Optuna storage.

    Default: ``optuna.db`` in the folder of the MLflow SQLite database (the current folder
    when MLflow is on a server). ``postgresql://`` (and ``postgres://``) become
    ``postgresql+psycopg://``, the driver that is installed.
    """
    if storage is None:
        db = sqlite_path(resolve_tracking_uri(tracking_uri))
        folder = db.parent if db is not None else Path.cwd()
        return f"sqlite:///{folder / 'optuna.db'}"
    scheme, sep, rest = storage.partition("://")
    if not sep or scheme not in STORAGE_SCHEMES or not rest:
        raise ConfigError(
            "--storage",
            f"expected sqlite:///FILE or postgresql://USER:PASSWORD@HOST/DB, got "
            f"{mask_password(storage)!r}",
        )
    if scheme in ("postgresql", "postgres"):
        return f"postgresql+psycopg://{rest}"
    if scheme == "sqlite" and sqlite_path(storage) is None:
        raise ConfigError("--storage", "a SQLite storage must be a file: sqlite:///FILE")
    return storage


def mask_password(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for logs, tags and messages)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL at all: hide everything between :// and @
        head, sep, tail = url.partition("://")
        return f"{head}{sep}***@{tail.rpartition('@')[2]}" if "@" in tail else url


class StudyLock:
    """Serialises "count the study's trials, then claim one" between workers: ``flock`` on
    ``<file>.lock`` beside a SQLite storage (the first-use lock of
    :func:`training.tracking.store_lock`), a session advisory lock on PostgreSQL."""

    def __init__(self, url: str, study_name: str) -> None:
        self.url = url
        self.key = zlib.crc32(f"addons.tune:{study_name}".encode()) & 0x7FFFFFFF
        self._engine: Any = None
        if url.startswith("postgresql"):
            import sqlalchemy
            from sqlalchemy.pool import NullPool

            self._engine = sqlalchemy.create_engine(url, poolclass=NullPool)

    @contextmanager
    def hold(self) -> Iterator[None]:
        if self._engine is None:
            with store_lock(self.url):
                yield
            return
        import sqlalchemy

        with self._engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": self.key})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
                conn.commit()


def trial_heartbeat_seconds() -> int:
    """Seconds between trial heartbeats: ``ADDONS_HEARTBEAT_SECONDS`` (the MLflow runs'
    interval, default 30) rounded up to whole seconds, as Optuna wants."""
    return max(1, math.ceil(heartbeat_seconds()))


def open_storage(url: str, lock: StudyLock) -> Any:
    """An Optuna ``RDBStorage`` with trial heartbeats and retry of stale trials; a new
    SQLite file is created under the lock (its tables must not be created twice)."""
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    interval = trial_heartbeat_seconds()
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        # workers wait for each other's writes instead of failing on "database is locked"
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 120}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            with lock.hold():
                return optuna.storages.RDBStorage(
                    url,
                    heartbeat_interval=interval,
                    grace_period=STALE_INTERVALS * interval,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                        max_retry=MAX_RETRY
                    ),
                    **kwargs,
                )
        except (SQLAlchemyError, OSError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(
                "--storage", f"cannot open the study storage {mask_password(url)}: {first[:300]}"
            ) from None


# -- the study ----------------------------------------------------------------------------


def search_space(config: ExperimentConfig) -> dict[str, Any]:
    """The ``tune.params`` section as plain data (what a resumed study must match)."""
    assert config.tune is not None
    return {name: dataclasses.asdict(space) for name, space in sorted(config.tune.params.items())}


def objective_definition(config: ExperimentConfig) -> dict[str, Any]:
    """Everything besides the search space that decides a trial's value: the metric, its
    direction, the model kind and its fixed params, the split and the evaluation settings."""
    assert config.tune is not None
    ev = config.evaluation
    return json.loads(
        json.dumps(
            {
                "metric": config.tune.metric,
                "direction": config.tune.direction,
                "model": {"kind": config.model.kind, "params": config.model.params},
                "split": dataclasses.asdict(config.split),
                "evaluation": {
                    "average": ev.average,
                    "category_level": ev.category_level,
                    "exclude_owned": ev.exclude_owned,
                },
            },
            default=str,
            sort_keys=True,
        )
    )


class _PerTrialSeed:
    """A sampler seeded per trial number: ``seed`` gives the same draws for trial ``n``
    in any worker, and two workers (or ``--jobs`` threads) never repeat each other's draws,
    which one shared seed would do."""

    def __init__(self, kind: str, seed: int) -> None:
        self.kind, self.seed = kind, seed
        self._local = threading.local()

    def _make(self, number: int) -> Any:
        import optuna

        seed = zlib.crc32(f"{self.seed}:{number}".encode())
        if self.kind == "random":
            sampler = optuna.samplers.RandomSampler(seed=seed)
        else:
            sampler = optuna.samplers.TPESampler(seed=seed)
        self._local.inner = sampler
        return sampler

    @property
    def inner(self) -> Any:
        return getattr(self._local, "inner", None) or self._make(0)


def make_sampler(config: ExperimentConfig) -> Any:
    """The configured sampler (``tune.sampler``; seed default ``split.seed``)."""
    import optuna

    assert config.tune is not None
    spec = config.tune.sampler
    seeded = _PerTrialSeed(spec.kind, spec.seed if spec.seed is not None else config.split.seed)

    class PerTrialSeededSampler(optuna.samplers.BaseSampler):
        def before_trial(self, study: Any, trial: Any) -> None:
            seeded._make(trial.number).before_trial(study, trial)

        def infer_relative_search_space(self, study: Any, trial: Any) -> Any:
            return seeded.inner.infer_relative_search_space(study, trial)

        def sample_relative(self, study: Any, trial: Any, space: Any) -> Any:
            return seeded.inner.sample_relative(study, trial, space)

        def sample_independent(self, study: Any, trial: Any, name: str, dist: Any) -> Any:
            return seeded.inner.sample_independent(study, trial, name, dist)

        def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
            seeded.inner.after_trial(study, trial, state, values)

    return PerTrialSeededSampler()


def make_pruner(config: ExperimentConfig) -> Any:
    """The configured pruner (``tune.pruner``): median, hyperband or none."""
    import optuna

    assert config.tune is not None
    spec = config.tune.pruner
    if spec.kind == "median":
        return optuna.pruners.MedianPruner(n_warmup_steps=spec.warmup_steps or 0)
    if spec.kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, spec.warmup_steps or 1))
    return optuna.pruners.NopPruner()


def config_point(config: ExperimentConfig) -> dict[str, Any]:
    """The config's own values of the tuned parameters (``model.params``, else the model's
    default), those inside the search space: the hand-picked point a study can start from."""
    from training.models import MODELS

    assert config.tune is not None
    defaults = {f.name: f.default for f in dataclasses.fields(MODELS[config.model.kind])}
    point: dict[str, Any] = {}
    for name, space in config.tune.params.items():
        value = config.model.params.get(name, defaults.get(name))
        if space.type == "categorical":
            inside = value in (space.choices or [])
        else:
            inside = isinstance(value, int | float) and not isinstance(value, bool) and (
                float(space.low or 0) <= float(value) <= float(space.high or 0))  # fmt: skip
            inside = inside and (space.type == "float" or float(value) == int(value))
        if inside:
            point[name] = value
    return point


def open_study(
    config: ExperimentConfig,
    storage: Any,
    name: str,
    fingerprint: str,
    lock: StudyLock,
    enqueue: dict[str, Any] | None = None,
) -> Any:
    """Create the study or load it to resume; refuse one made for another search space,
    objective or data (exit 2). ``enqueue``: parameters of the first trial of a new study
    (see :attr:`TuneOptions.enqueue_config`)."""
    import optuna

    assert config.tune is not None
    wanted = {
        ATTR_SPACE: search_space(config),
        ATTR_OBJECTIVE: objective_definition(config),
        ATTR_DATA: fingerprint,
    }
    with lock.hold():
        study = optuna.create_study(
            storage=storage, study_name=name, direction=config.tune.direction,
            sampler=make_sampler(config), pruner=make_pruner(config), load_if_exists=True,
        )  # fmt: skip
        attrs = study.user_attrs
        if not any(key in attrs for key in wanted) and not study.get_trials(deepcopy=False):
            for key, value in wanted.items():
                study.set_user_attr(key, value)
            if enqueue:  # under the lock: two new workers must not both enqueue it
                study.enqueue_trial(enqueue, user_attrs={ATTR_FROM_CONFIG: True})
            return study
    what = {ATTR_SPACE: "search space (tune.params)", ATTR_OBJECTIVE: "objective (metric, "
            "direction, model, split or evaluation)", ATTR_DATA: "data (fingerprint)"}  # fmt: skip
    for key, value in wanted.items():
        if attrs.get(key) != value:
            raise ConfigError(
                "--study",
                f"study {name!r} in {mask_password(storage.url)} was made with another "
                f"{what[key]}: {_diff(attrs.get(key), value)}; resume it with the config it was "
                "made with, or start a new study with --study NEW_NAME",
            )
    if study.direction.name.lower() != config.tune.direction:
        raise ConfigError("--study", f"study {name!r} optimises in the other direction")
    return study


def _diff(old: Any, new: Any) -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted({*old, *new})
        changed = [k for k in keys if old.get(k) != new.get(k)]
        return "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:3])[:400]
    return f"{str(old)[:60]!r} -> {str(new)[:60]!r}"


# -- the objective ----------------------------------------------------------------------


def suggest(trial: Any, params: dict[str, ParamSpace]) -> dict[str, Any]:
    """Draw one value per tuned parameter from ``trial``."""
    out: dict[str, Any] = {}
    for name, space in params.items():
        if space.type == "int":
            assert space.low is not None and space.high is not None
            out[name] = trial.suggest_int(
                name, int(space.low), int(space.high), step=int(space.step or 1), log=space.log
            )
        elif space.type == "float":
            assert space.low is not None and space.high is not None
            out[name] = trial.suggest_float(
                name, float(space.low), float(space.high),
                step=None if space.step is None else float(space.step), log=space.log,
            )  # fmt: skip
        else:
            out[name] = trial.suggest_categorical(name, space.choices)
    return out


class Objective:
    """The tuning objective over prepared folds (see the module doc).

    Parameters
    ----------
    config : ExperimentConfig
        With a ``tune`` section.
    folds : list of TimeSplit
        :func:`training.experiment.validation_folds`: ``train`` is fitted, ``test`` (the
        validation part) scored.
    """

    def __init__(self, config: ExperimentConfig, folds: list[Any]) -> None:
        from training.experiment import make_task

        assert config.tune is not None
        self.config, self.folds = config, folds
        self.task_name, self.metric, self.k = config.tune.metric_parts()
        self.tasks = [make_task(self.task_name, fold, config) for fold in folds]
        for i, task in enumerate(self.tasks):
            if task.n_queries == 0:
                raise ConfigError(
                    "split",
                    f"validation fold {i + 1} of {len(folds)} gives task {self.task_name!r} no "
                    "queries: widen split.validation_start or use fewer split.validation_folds",
                )

    def score(self, model: Any, fold: int) -> float:
        """``tune.metric`` of a fitted model on fold ``fold``'s validation part."""
        from training.evaluation.harness import evaluate

        ev = self.config.evaluation
        result = evaluate(model, self.tasks[fold], self.folds[fold].train, [self.k],
                          [self.metric], ev.average, ev.category_level)  # fmt: skip
        key = f"{self.metric}@{self.k}"
        if key not in result.metrics:
            raise ConfigError(
                "tune.metric", f"{self.metric} cannot be computed on this data: "
                f"{result.not_applicable.get(self.metric, 'not applicable')}",
            )  # fmt: skip
        return float(result.metrics[key])

    def __call__(self, trial: Any) -> float:
        import optuna

        assert self.config.tune is not None
        tune = self.config.tune
        params = suggest(trial, tune.params)
        model_config = ModelConfig(self.config.model.kind, {**self.config.model.params, **params})
        last = len(self.folds) - 1
        values: dict[int, float] = {}
        # the last fold first: its epochs are the intermediate values, so a pruned trial
        # never fits the other folds
        for i in [last, *range(last)]:
            model = build_model(model_config)
            at_epoch: dict[int, float] = {}
            callback = None
            if i == last and model.epoch_param and tune.pruner.kind != "none":

                def callback(epoch: int, model: Any = model, at_epoch: dict = at_epoch) -> None:
                    if epoch % tune.report_every:
                        return
                    at_epoch[epoch] = value = self.score(model, last)
                    trial.report(value, epoch)
                    if trial.should_prune():
                        raise optuna.TrialPruned(f"epoch {epoch}: {value:.6g}")

            model.fit(self.folds[i].train, epoch_callback=callback)
            final = getattr(model, model.epoch_param) if model.epoch_param else None
            values[i] = at_epoch[final] if final in at_epoch else self.score(model, i)
        return float(np.mean([values[i] for i in range(len(self.folds))]))


# -- running ----------------------------------------------------------------------------


@dataclass
class TuneOptions:
    """The ``addons tune`` flags (see ``docs/tuning.md``)."""

    trials: int | None = None
    timeout: float | None = None
    storage: str | None = None
    study: str | None = None
    jobs: int = 1
    refit: bool = False
    out: str | None = None
    tracking_uri: str | None = None
    experiment: str = "addons"
    on_trial: Callable[[Any], None] | None = None
    #: A new study's trial 0 runs the config's own values of the tuned parameters
    #: (:func:`config_point`), so the best trial is never worse on validation than the
    #: hand-picked config; it counts in the trial budget. Also ``tune.start_from_config``.
    enqueue_config: bool = False


@dataclass
class TuneResult:
    """What ``addons tune`` did; :meth:`to_dict` is its ``--json`` output."""

    study: str
    storage: str
    counts: dict[str, int]
    ran: int
    best_value: float | None
    best_params: dict[str, Any]
    best_trial: int | None
    config_out: str | None
    run_id: str | None
    refit: dict[str, Any] | None = None
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def format_table(self) -> str:
        c = self.counts
        lines = [
            f"study {self.study} in {self.storage}",
            f"{'trials':<10}{'complete':>10}{'pruned':>10}{'failed':>10}{'running':>10}",
            f"{'':<10}{c['complete']:>10}{c['pruned']:>10}{c['fail']:>10}{c['running']:>10}"
            f"   ({self.ran} run by this command)",
        ]
        if self.best_value is None:
            lines.append("no finished trial yet")
        else:
            lines.append(f"best value {self.best_value:.6g} (trial {self.best_trial})")
            lines += [f"  {k} = {v!r}" for k, v in self.best_params.items()]
        if self.config_out:
            lines.append(f"tuned config: {self.config_out}")
        if self.run_id:
            lines.append(f"mlflow run id: {self.run_id}")
        if self.refit:
            lines.append(f"refit run id: {self.refit['run_id']}  test: {self.refit['test']}")
        lines += [f"error: {e}" for e in self.errors]
        return "\n".join(lines)


def counts(study: Any) -> dict[str, int]:
    """Trials of the study per state (``complete``, ``pruned``, ``fail``, ``running``,
    ``waiting``)."""
    out = {"complete": 0, "pruned": 0, "fail": 0, "running": 0, "waiting": 0}
    for t in study.get_trials(deepcopy=False):
        name = t.state.name.lower()
        out[name] = out.get(name, 0) + 1
    return out


def fail_dead_trials(study: Any) -> list[int]:
    """Mark FAIL (and re-queue, like a stale heartbeat) the RUNNING trials started on this
    host by a process that is gone: a worker killed a moment ago is seen at once, without
    waiting for its heartbeat to go stale. Returns their numbers."""
    import optuna
    from optuna.trial import TrialState

    storage, host, failed = study._storage, socket.gethostname(), []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = t.user_attrs.get(ATTR_PID)
        if t.user_attrs.get(ATTR_HOST) != host or not isinstance(pid, int):
            continue
        if pid == os.getpid() or pid_alive(pid):
            continue
        try:
            if not storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker got there first
        retry = storage.get_heartbeat_stale_trial_callback()
        if retry is not None:
            retry(study, storage.get_trial(t._trial_id))
        failed.append(t.number)
    return failed


class _Workers:
    """The trial loop of one ``addons tune`` process (``--jobs`` threads)."""

    def __init__(self, study: Any, objective: Objective, n_trials: int, lock: StudyLock,
                 timeout: float | None, on_done: Callable[[Any], None]) -> None:  # fmt: skip
        self.study, self.objective, self.n_trials, self.lock = study, objective, n_trials, lock
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.on_done = on_done
        self.errors: list[BaseException] = []
        self.ran = 0
        self._mutex = threading.Lock()
        self._stop = threading.Event()

    def _claim(self) -> Any:
        """A new (or re-queued) trial if the budget allows; None if it is used up by
        finished and running trials; raises StopIteration once N trials are finished."""
        import optuna

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            fail_dead_trials(self.study)
            optuna.storages.fail_stale_trials(self.study)
        with self.lock.hold():
            c = counts(self.study)
            finished = c["complete"] + c["pruned"]
            if finished >= self.n_trials:
                raise StopIteration
            if finished + c["running"] >= self.n_trials:
                return None
            with warnings.catch_warnings():
                # "heartbeat is supposed to be used with Study.optimize": _run is its loop body
                warnings.filterwarnings("ignore", message="Heartbeat of storage")
                trial = self.study.ask()
            trial.set_user_attr(ATTR_PID, os.getpid())
            trial.set_user_attr(ATTR_HOST, socket.gethostname())
            return trial

    def _run(self, trial: Any) -> Any:
        import optuna
        from optuna.storages._heartbeat import get_heartbeat_thread
        from optuna.trial import TrialState

        # Optuna's own loop (study.optimize) cannot claim a trial under our lock, so this
        # is its body: a heartbeat thread while the objective runs, then tell.
        with get_heartbeat_thread(trial._trial_id, self.study._storage):
            try:
                value = self.objective(trial)
            except optuna.TrialPruned:
                return self.study.tell(trial, state=TrialState.PRUNED)
            except BaseException as exc:
                trial.set_user_attr("addons.error", f"{type(exc).__name__}: {exc}"[:500])
                self.study.tell(trial, state=TrialState.FAIL)
                raise
        return self.study.tell(trial, value)

    def loop(self) -> None:
        failures = 0
        poll = min(5.0, float(trial_heartbeat_seconds()))
        while not self._stop.is_set():
            if self.deadline is not None and time.monotonic() >= self.deadline:
                return
            try:
                trial = self._claim()
            except StopIteration:
                return
            if trial is None:
                # the budget is taken by running trials: wait, so that one whose worker
                # dies is re-queued and run here
                self._stop.wait(poll)
                continue
            try:
                frozen = self._run(trial)
                failures = 0
            except (InputError, KeyboardInterrupt) as exc:
                self._fail(exc)
                return
            except Exception as exc:  # a model that crashed on these params: next trial
                failures += 1
                frozen = self.study._storage.get_trial(trial._trial_id)
                if failures >= MAX_CONSECUTIVE_FAILURES:
                    self.on_done(frozen)
                    self._fail(exc)
                    return
            with self._mutex:
                self.ran += 1
            self.on_done(frozen)

    def _fail(self, exc: BaseException) -> None:
        with self._mutex:
            self.errors.append(exc)
        self._stop.set()

    def run(self, jobs: int) -> None:
        threads = [threading.Thread(target=self._guarded, name=f"tune-{i}", daemon=True)
                   for i in range(max(1, jobs) - 1)]  # fmt: skip
        for t in threads:
            t.start()
        try:
            self.loop()  # the main thread works too (Ctrl-C / SIGTERM land here)
        except BaseException:
            self._stop.set()
            raise
        finally:
            for t in threads:
                t.join()

    def _guarded(self) -> None:
        try:
            self.loop()
        except BaseException as exc:
            self._fail(exc)


def _child_run(client: Any, experiment_id: str, parent: str, study_name: str, trial: Any,
               key: str) -> None:  # fmt: skip
    """A nested MLflow run for one finished trial (logged when it ends: never left RUNNING)."""
    from mlflow.entities import Metric, Param, RunTag

    start = int(trial.datetime_start.timestamp() * 1000) if trial.datetime_start else None
    end = int(trial.datetime_complete.timestamp() * 1000) if trial.datetime_complete else None
    state = trial.state.name
    run = client.create_run(
        experiment_id, start_time=start, run_name=f"{study_name} trial {trial.number}",
        tags={"mlflow.parentRunId": parent, "addons.tune.study": study_name,
              "addons.tune.trial": str(trial.number), "addons.tune.state": state,
              "addons.tune.pruned": str(state == "PRUNED").lower()},
    )  # fmt: skip
    now = end or int(time.time() * 1000)
    metrics = [Metric(f"validation/{key}", float(v), now, int(step))
               for step, v in sorted(trial.intermediate_values.items())]  # fmt: skip
    if trial.value is not None:
        metrics.append(Metric(f"validation/{key}", float(trial.value), now, 0 if not metrics
                              else max(trial.intermediate_values) + 1))  # fmt: skip
        metrics.append(Metric("value", float(trial.value), now, 0))
    if trial.duration is not None:
        metrics.append(Metric("duration_seconds", trial.duration.total_seconds(), now, 0))
    metrics.append(Metric("pruned", float(state == "PRUNED"), now, 0))
    error = trial.user_attrs.get("addons.error")
    client.log_batch(
        run.info.run_id, metrics=metrics,
        params=[Param(k, str(v)[:6000]) for k, v in trial.params.items()],
        tags=[RunTag("addons.tune.error", error)] if error else [],
    )  # fmt: skip
    client.set_terminated(run.info.run_id, "FAILED" if state == "FAIL" else "FINISHED", now)


def _log_plots(study: Any, n_params: int, folder: Path) -> list[str]:
    """PNG plots of the study (optimization history; parameter importances with >= 2
    parameters and >= 2 complete trials) into ``folder``; returns what could not be drawn."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as plots

    skipped = []
    complete = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    wanted = {"optimization_history": plots.plot_optimization_history}
    if n_params >= 2 and complete >= 2:
        wanted["param_importances"] = plots.plot_param_importances
    else:
        skipped.append("param_importances: needs >= 2 tuned parameters and >= 2 complete trials")
    for name, plot in wanted.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
            try:
                ax = plot(study)
            except Exception as exc:  # e.g. importances when every value is equal
                skipped.append(f"{name}: {exc}")
                continue
        fig = ax.figure
        fig.set_size_inches(8, 5)
        fig.tight_layout()
        fig.savefig(folder / f"{name}.png", dpi=100)
        plt.close(fig)
    return skipped


def tuned_payload(
    payload: dict[str, Any], config: ExperimentConfig, best: dict[str, Any]
) -> dict[str, Any]:
    """The config file's content with the best params merged into ``model.params`` and the
    name suffixed ``_tuned``; validated like any config (``addons train`` accepts it)."""
    out = dict(payload)
    out["name"] = f"{config.name}_tuned"
    model = dict(out.get("model") or {})
    model["params"] = {**(model.get("params") or {}), **best}
    out["model"] = model
    config_from_dict(out)
    return out


def write_tuned_config(path: str | Path, payload: dict[str, Any], header: str) -> Path:
    """Write the tuned config atomically as YAML, ``header`` as comment lines on top."""
    import yaml

    comment = "".join(f"# {line}\n" for line in header.splitlines())
    return atomic_write_text(path, comment + yaml.safe_dump(payload, sort_keys=False))


def read_payload(path: str | Path, overrides: list[str]) -> dict[str, Any]:
    """The config file as parsed YAML with ``--set`` overrides (already validated by
    :func:`training.config.load_config`)."""
    return apply_overrides(parse_yaml(Path(path).read_text(encoding="utf-8")), overrides)


def run_tune(
    config: ExperimentConfig, options: TuneOptions, payload: dict[str, Any] | None = None
) -> TuneResult:
    """Tune ``config`` (it needs a ``tune`` section) as ``addons tune`` does.

    Parameters
    ----------
    config : ExperimentConfig
        The validated config.
    options : TuneOptions
        The command's flags.
    payload : dict, optional
        The config file as parsed (its layout is kept in the tuned config); default the
        config itself.
    """
    import mlflow
    import optuna

    from features.loading import load_dataset
    from training.experiment import validation_folds

    if config.tune is None:
        raise ConfigError("tune", "the config has no tune: section (see docs/tuning.md)")
    tune = config.tune
    n_trials = options.trials if options.trials is not None else tune.trials
    if n_trials < 1:
        raise ConfigError("--trials", f"must be >= 1, got {n_trials}")
    if options.jobs < 1:
        raise ConfigError("--jobs", f"must be >= 1, got {options.jobs}")
    if options.timeout is not None and not options.timeout > 0:
        raise ConfigError("--timeout", f"must be > 0 seconds, got {options.timeout}")
    url = resolve_storage(options.storage, options.tracking_uri)
    name = options.study or config.name
    out = options.out or f"configs/tuned/{config.name}.yaml"
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    # once per process: the data, its folds and their tasks
    data = load_dataset(config.data)
    folds = validation_folds(config, data)
    objective = Objective(config, folds)

    lock = StudyLock(url, name)
    storage = open_storage(url, lock)
    study = open_study(config, storage, name, data.fingerprint, lock,
                       config_point(config) if options.enqueue_config or tune.start_from_config
                       else None)  # fmt: skip
    key = metric_key(tune.metric)
    shown = mask_password(url)

    with mlflow_run(options.experiment, f"tune {name}", options.tracking_uri) as run:
        client = mlflow.MlflowClient(resolve_tracking_uri(options.tracking_uri))
        parent, experiment_id = run.info.run_id, run.info.experiment_id
        mlflow.set_tags({"addons.command": "tune", "addons.tune.study": name,
                         "addons.tune.storage": shown, "data_fingerprint": data.fingerprint,
                         "model_kind": config.model.kind})  # fmt: skip
        mlflow.log_params({"tune.trials": n_trials, "tune.metric": tune.metric,
                           "tune.direction": tune.direction, "tune.folds": len(folds),
                           "tune.jobs": options.jobs})  # fmt: skip
        mlflow.log_dict(config.to_dict(), "config.json")
        child_lock = threading.Lock()

        def on_done(trial: Any) -> None:
            with child_lock:  # one writer to the MLflow store at a time
                _child_run(client, experiment_id, parent, name, trial, key)
            if options.on_trial is not None:
                options.on_trial(trial)

        workers = _Workers(study, objective, n_trials, lock, options.timeout, on_done)
        workers.run(options.jobs)
        for exc in workers.errors:
            if isinstance(exc, BaseException) and not isinstance(exc, Exception):
                raise exc  # Ctrl-C / SIGTERM: the parent run ends FAILED
        input_errors = [e for e in workers.errors if isinstance(e, InputError)]
        if input_errors:
            raise input_errors[0]

        c = counts(study)
        best_value, best_params, best_trial = None, {}, None
        try:
            best = study.best_trial
            best_value, best_params, best_trial = best.value, dict(best.params), best.number
        except ValueError:
            pass  # no complete trial
        config_out = None
        if best_trial is not None:
            payload = payload if payload is not None else config.to_dict()
            tuned = tuned_payload(payload, config, best_params)
            header = (f"tuned by addons tune: study {name} in {shown}, best trial {best_trial}"
                      f"\nvalidation {tune.metric} = {best_value:.6g} ({tune.direction})")  # fmt: skip
            config_out = str(write_tuned_config(out, tuned, header))
            mlflow.log_metric(f"best/validation/{key}", best_value)
            mlflow.log_params({f"best.{k}": str(v) for k, v in best_params.items()})
            mlflow.set_tag("addons.tune.best_trial", str(best_trial))
            mlflow.log_text(Path(config_out).read_text(encoding="utf-8"), "tuned_config.yaml")
        mlflow.log_metrics({f"trials/{k}": v for k, v in c.items()})
        with tempfile.TemporaryDirectory() as tmp:
            skipped = _log_plots(study, len(tune.params), Path(tmp))
            mlflow.log_artifacts(tmp, "plots")
        if skipped:
            mlflow.set_tag("addons.tune.plots_skipped", "; ".join(skipped)[:5000])

    result = TuneResult(
        name, shown, c, workers.ran, best_value, best_params, best_trial, config_out,
        parent, errors=[f"{type(e).__name__}: {e}" for e in workers.errors],
    )  # fmt: skip
    if options.refit and config_out is not None:
        from training.config import load_config
        from training.train import run_training

        refit = run_training(load_config(config_out), options.tracking_uri, options.experiment)
        _task, metric, k = tune.metric_parts()
        test = {e.task: e.metrics.get(f"{metric}@{k}") for e in refit.evaluations}
        result.refit = {"run_id": refit.run_id, "test": {f"{t}/{metric}@{k}": v
                                                         for t, v in test.items()}}  # fmt: skip
        client.set_tag(parent, "addons.tune.refit_run", refit.run_id)
    return result
