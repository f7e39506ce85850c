"""Experiment configs: YAML files validated into frozen dataclasses.

Unknown keys and wrong types are rejected with the key's dotted path and what was expected
(:class:`features.errors.ConfigError`, exit code 2 on the command line). ``--set
dotted.key=value`` overrides (:func:`load_config`) are validated the same way.

A config is plain YAML: anchors and aliases (``&a`` / ``*a``) and repeated keys are refused
(an alias bomb expands a few hundred bytes into gigabytes), the file must be UTF-8 and at
most :data:`MAX_CONFIG_BYTES`, and messages quote at most a short piece of any value.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import TypeAdapter, ValidationError

from features.errors import ConfigError
from features.loading import DataConfig
from features.readers import codec_name
from features.splits import week_fold_bounds
from serving.plain_yaml import load_plain_yaml
from training.evaluation.harness import DEFAULT_METRICS
from training.evaluation.metrics import METRICS
from training.models import MODELS
from training.models.base import RecommenderBase

TaskName = Literal["basket_completion", "basket_completion_new", "next_period"]

MAX_CONFIG_BYTES = 1 << 20  # experiment configs are a few hundred bytes
_MAX_SHOWN = 120  # characters of a value quoted in a message


def _short(value: Any) -> str:
    """``repr(value)`` cut to a readable length (a message must never echo a huge value)."""
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN else f"{text[:_MAX_SHOWN]}... ({len(text):,} chars)"


SplitKind = Literal["time", "stratified", "leave_last_basket"]

# Keys that only some split kinds read; any other kind rejects them (when not null).
SPLIT_KIND_KEYS: dict[str, tuple[str, ...]] = {
    "time": ("train_end", "test_start", "validation_start", "time_column", "validation_folds"),
    "stratified": ("ratio",),
    "leave_last_basket": (),
}
_SPLIT_REQUIRED: dict[str, tuple[str, ...]] = {
    "time": ("train_end", "test_start"),
    "stratified": ("ratio",),
    "leave_last_basket": (),
}


@dataclass(frozen=True)
class SplitConfig:
    """The evaluation protocol's split (``kind``), see ``features.splits`` for exact rules.

    - ``time`` (default): global time split. Bounds are inclusive; weeks are ints,
      timestamps ISO strings (``time_column``, default ``timestamp``). The validation window
      (``validation_start`` .. ``train_end``) is carved from the end of train, never from
      test; ``validation_folds`` cuts it into that many equal consecutive windows (tuning).
    - ``stratified``: each user's rows split at random, ``ratio`` of them to train.
    - ``leave_last_basket``: each user's last basket is test.

    ``seed`` (the stratified draw and the basket tasks' carts) and ``min_known_items`` apply
    to every kind; a key of another kind is rejected, naming it.
    """

    __pydantic_config__: ClassVar[dict[str, str]] = {"extra": "forbid"}

    kind: SplitKind = "time"
    train_end: int | datetime | date | str | None = None
    test_start: int | datetime | date | str | None = None
    validation_start: int | datetime | date | str | None = None
    time_column: Literal["timestamp", "week"] | None = None
    validation_folds: int | None = None
    ratio: float | None = None
    seed: int = 42
    min_known_items: int = 2

    @property
    def column(self) -> str:
        """The time split's column: ``time_column``, ``timestamp`` when unset."""
        return self.time_column or "timestamp"


@dataclass(frozen=True)
class ModelConfig:
    """Model kind (see ``training.models.MODELS``) and its constructor arguments."""

    __pydantic_config__: ClassVar[dict[str, str]] = {"extra": "forbid"}

    kind: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EvaluationConfig:
    """Which tasks, cut-offs and metrics; averaging over queries or users.

    ``exclude_owned`` applies to ``next_period``: items the user has in train are neither
    relevant nor recommended. Unset, it is on for ``split.kind: stratified`` and off
    otherwise (``basket_completion_new`` always excludes them, ``basket_completion`` never).
    """

    __pydantic_config__: ClassVar[dict[str, str]] = {"extra": "forbid"}

    tasks: list[TaskName] = field(
        default_factory=lambda: ["basket_completion", "basket_completion_new"]
    )
    k: list[int] = field(default_factory=lambda: [3, 5, 10])
    metrics: list[str] = field(default_factory=lambda: list(DEFAULT_METRICS))
    average: Literal["query", "user"] = "query"
    category_level: Literal["department", "category", "subcategory"] = "category"
    # next_period only; unset = on for split.kind stratified (the standard protocol), else off
    exclude_owned: bool | None = None


@dataclass(frozen=True)
class ParamSpace:
    """One tuned hyper-parameter (``tune.params.<name>``): ``int`` / ``float`` in ``[low,
    high]`` (``log`` scale, optional ``step``), or ``categorical`` among ``choices``."""

    __pydantic_config__: ClassVar[dict[str, str]] = {"extra": "forbid"}

    type: Literal["int", "float", "categorical"]
    low: int | float | None = None
    high: int | float | None = None
    step: int | float | None = None
    log: bool = False
    choices: list[str | bool | int | float | None] | None = None


@dataclass(frozen=True)
class SamplerConfig:
    """Optuna sampler: ``tpe`` or ``random``; ``seed`` unset = ``split.seed``."""

    __pydantic_config__: ClassVar[dict[str, str]] = {"extra": "forbid"}

    kind: Literal["tpe", "random"] = "tpe"
    seed: int | None = None


@dataclass(frozen=True)
class PrunerConfig:
    """Optuna pruner for models with epochs: ``median``, ``hyperband`` or ``none``;
    ``warmup_steps``: epochs before any trial may be pruned (median)."""

    __pydantic_config__: ClassVar[dict[str, str]] = {"extra": "forbid"}

    kind: Literal["median", "hyperband", "none"] = "median"
    warmup_steps: int | None = None


@dataclass(frozen=True)
class TuneConfig:
    """The ``tune:`` section read by ``addons tune`` (``addons train`` ignores it): the
    search space over ``model.params`` and the validation metric to optimise, see
    ``training.tuning`` and docs/tuning.md."""

    __pydantic_config__: ClassVar[dict[str, str]] = {"extra": "forbid"}

    metric: str = "basket_completion/ndcg@10"
    direction: Literal["maximize", "minimize"] = "maximize"
    trials: int = 20
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    pruner: PrunerConfig = field(default_factory=PrunerConfig)
    report_every: int = 5
    params: dict[str, ParamSpace] = field(default_factory=dict)
    # a new study's trial 0 runs model.params' own values (training.tuning.config_point)
    start_from_config: bool = False

    def metric_parts(self) -> tuple[str, str, int]:
        """``"basket_completion/ndcg@10"`` -> ``("basket_completion", "ndcg", 10)`` (the
        format is checked by the config validation)."""
        task, _, rest = self.metric.partition("/")
        name, _, k = rest.partition("@")
        return task, name, int(k)


@dataclass(frozen=True)
class RetrainConfig:
    """The ``retrain:`` section read by ``addons retrain`` (the other commands ignore it): the
    holdout, the metric and margin a challenger must win by, the baselines it must not lose
    to, and the data gates. Checked by ``training.retrain.check_settings``; defaults and
    meaning in docs/retraining.md."""

    __pydantic_config__: ClassVar[dict[str, str]] = {"extra": "forbid"}

    # weeks (split.time_column: week) or days; unset: the config's validation window length
    holdout: int | None = None
    metric: str = "basket_completion/ndcg@10"
    min_improvement: float = 0.0
    baselines: list[str] = field(default_factory=lambda: ["popularity", "personal_popularity"])
    max_row_drop: float = 0.2
    max_user_drop: float = 0.2
    max_item_drop: float = 0.2
    max_null_share: float = 0.01
    max_duplicate_share: float = 0.01
    require_newer: bool = True
    min_holdout_queries: int = 50


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole experiment: data, split, model, evaluation; ``tune`` only for ``addons tune``,
    ``retrain`` only for ``addons retrain``."""

    __pydantic_config__: ClassVar[dict[str, str]] = {"extra": "forbid"}

    name: str
    split: SplitConfig
    model: ModelConfig
    data: DataConfig = field(default_factory=DataConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    tune: TuneConfig | None = None
    retrain: RetrainConfig | None = None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for section in ("tune", "retrain"):
            if out.get(section) is None:
                out.pop(section, None)  # runs of configs without it log exactly what they did
        return out


def _loc(loc: tuple[Any, ...]) -> str:
    parts = []
    for p in loc:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        else:
            parts.append(("." if parts else "") + str(p))
    return "".join(parts)


def _expected(err: dict[str, Any]) -> str:
    if err["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        return "unknown key"
    got = err.get("input")
    shown = f" (got {_short(got)})" if not isinstance(got, dict) else ""
    return f"{err['msg']}{shown}"


def config_from_dict(payload: Any, source: str | None = None) -> ExperimentConfig:
    """Validate a parsed config; raise :class:`ConfigError` naming the first bad key."""
    if not isinstance(payload, dict):
        raise ConfigError("<root>", "expected a mapping of keys to values", source)
    try:
        config = TypeAdapter(ExperimentConfig).validate_python(payload)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ConfigError(_loc(err["loc"]) or "<root>", _expected(err), source) from None
    _reject_coercion(payload, config, "", source)
    _check_semantics(config, source)
    return config


def _reject_coercion(given: Any, parsed: Any, path: str, source: str | None) -> None:
    """Pydantic's lax mode turns ``"10"`` into 10 and ``true`` into 1; a config must say what
    it means, so any value whose type changed on the way in is rejected (int -> float is fine)."""
    if isinstance(given, dict):
        for key, value in given.items():
            inner = parsed.get(key) if isinstance(parsed, dict) else getattr(parsed, key, None)
            if key == "params" and path.endswith("model"):
                continue  # model params are checked strictly in build_model
            _reject_coercion(value, inner, f"{path}.{key}" if path else str(key), source)
    elif isinstance(given, list) and isinstance(parsed, list):
        for i, (a, b) in enumerate(zip(given, parsed, strict=False)):
            _reject_coercion(a, b, f"{path}[{i}]", source)
    elif (
        given is not None
        and not isinstance(parsed, (date, dict, list))
        and type(given) is not type(parsed)
    ):
        if isinstance(given, int) and not isinstance(given, bool) and isinstance(parsed, float):
            return
        raise ConfigError(
            path,
            f"expected {type(parsed).__name__}, got {_short(given)} ({type(given).__name__})",
            source,
        )


def parse_yaml(text: str) -> Any:
    """Parse config YAML (no anchors, aliases or repeated keys); ``yaml.YAMLError`` if bad."""
    return load_plain_yaml(text, "config")


def parse_override(text: str) -> tuple[str, Any]:
    """``"dotted.key=value"`` -> (key, value), the value read as a YAML scalar or flow value
    (``5``, ``true``, ``2024-05-31``, ``[3, 5, 10]``, ``{kind: als}``; ``'"007"'`` for text
    that looks like a number; nothing after ``=`` is null). Text that is not YAML at all
    (``%d/%m/%Y %H:%M``) is taken as the string it is; validation then checks its type."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part.strip() for part in key.split(".")):
        raise ConfigError("--set", f"expected dotted.key=value, got {_short(text)}")
    try:
        return key, parse_yaml(raw) if raw.strip() else None
    except yaml.YAMLError:
        return key, raw


def apply_overrides(payload: Any, overrides: Sequence[str]) -> Any:
    """A copy of a parsed config with each ``dotted.key=value`` set (sections are created)."""
    if not overrides:
        return payload
    if not isinstance(payload, dict):
        raise ConfigError("<root>", "expected a mapping of keys to values")
    payload = copy.deepcopy(payload)
    for text in overrides:
        key, value = parse_override(text)
        parts = [p.strip() for p in key.split(".")]
        node = payload
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(
                    ".".join(parts[: i + 1]),
                    f"holds {_short(child)}, not a section: --set {key} cannot go inside it",
                )
            node = child
        node[parts[-1]] = value
    return payload


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read and validate a YAML experiment config, with ``--set`` overrides applied first.

    Parameters
    ----------
    path : str or Path
        The YAML file.
    overrides : sequence of str
        ``dotted.key=value`` strings (see :func:`parse_override`), applied in order; the
        result is validated like the file, so an unknown or mistyped key is named.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError("<file>", "config file not found", str(p))
    with p.open("rb") as fh:
        data = fh.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(
            "<file>", f"larger than {MAX_CONFIG_BYTES:,} bytes: not an experiment config", str(p)
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            "<file>",
            f"line {line}: byte 0x{data[exc.start : exc.start + 1].hex()} is not UTF-8; "
            "save the config as UTF-8",
            str(p),
        ) from None
    try:
        payload = parse_yaml(text)
    except yaml.YAMLError as exc:
        problem = str(exc)
        problem = problem if len(problem) <= 500 else problem[:500] + "..."
        raise ConfigError("<file>", f"not valid YAML: {problem}", str(p)) from None
    keys = [parse_override(o)[0] for o in overrides]
    try:
        return config_from_dict(apply_overrides(payload, overrides), str(p))
    except ConfigError as exc:
        by = next((k for k in keys if exc.key == k or exc.key.startswith(k + ".")), None)
        by = by or next((k for k in keys if k.startswith(exc.key + ".")), None)
        if by is None:
            raise
        raise ConfigError(exc.key, f"{exc.problem} (set by --set {by})", str(p)) from None


#: The largest ``evaluation.k``: a cut-off deeper than any offer list, which still bounds
#: the (queries x k) top-k arrays the evaluation builds.
MAX_EVALUATION_K = 10_000


def _check_semantics(config: ExperimentConfig, source: str | None) -> None:
    # The name becomes a file name (configs/tuned/<name>.yaml) and an MLflow run name.
    if not re.fullmatch(r"\w[\w.-]*", config.name):
        raise ConfigError(
            "name",
            f"expected letters, digits, '_', '.' or '-' (starting with a letter or digit; no "
            f"path separators), got {config.name!r}",
            source,
        )
    ev = config.evaluation
    for i, k in enumerate(ev.k):
        if not 1 <= k <= MAX_EVALUATION_K:  # each query's top-k is materialised
            raise ConfigError(
                f"evaluation.k[{i}]", f"must be in 1..{MAX_EVALUATION_K:,}, got {k}", source
            )
    if not ev.k:
        raise ConfigError("evaluation.k", "must list at least one cut-off", source)
    if not ev.tasks:
        raise ConfigError("evaluation.tasks", "must list at least one task", source)
    for i, name in enumerate(ev.metrics):
        if name not in METRICS:
            raise ConfigError(
                f"evaluation.metrics[{i}]",
                f"unknown metric {name!r}; expected one of {sorted(METRICS)}",
                source,
            )
    cleaning = config.data.cleaning
    if cleaning.exclude_items is not None:
        cleaning.exclude_items.check("data.cleaning.exclude_items", source)
    for key in ("min_item_interactions", "min_user_interactions"):
        if getattr(cleaning, key) < 1:
            raise ConfigError(
                f"data.cleaning.{key}", f"must be >= 1, got {getattr(cleaning, key)}", source
            )
    for part in ("interactions", "items", "users"):
        spec = getattr(config.data, part)
        if spec is not None and len(spec.separator) != 1:
            raise ConfigError(
                f"data.{part}.separator", f"must be one character, got {spec.separator!r}", source
            )
        if spec is not None:
            try:
                codec_name(spec.encoding)
            except LookupError:
                raise ConfigError(
                    f"data.{part}.encoding",
                    f"unknown text encoding {_short(spec.encoding)}; e.g. utf8, latin-1, "
                    "cp1252, utf-16 (or utf8-lossy)",
                    source,
                ) from None
    if config.split.min_known_items < 2:
        raise ConfigError(
            "split.min_known_items", "must be >= 2 (a cart and a held-out item)", source
        )
    _check_protocol(config, source)
    build_model(config.model, source)
    if config.tune is not None:
        _check_tune(config, source)


def _check_protocol(config: ExperimentConfig, source: str | None) -> None:
    """Per-kind split keys (required / not applicable), their ranges, and exclude_owned."""
    s = config.split
    for kind, keys in SPLIT_KIND_KEYS.items():
        for key in keys:
            if key not in SPLIT_KIND_KEYS[s.kind] and getattr(s, key) is not None:
                raise ConfigError(
                    f"split.{key}",
                    f"does not apply to split.kind {s.kind!r} (only to {kind!r}); remove it",
                    source,
                )
    for key in _SPLIT_REQUIRED[s.kind]:
        if getattr(s, key) is None:
            raise ConfigError(f"split.{key}", f"required for split.kind {s.kind!r}", source)
    if s.seed < 0:
        raise ConfigError("split.seed", f"must be >= 0, got {s.seed}", source)
    if s.ratio is not None and not 0.0 < s.ratio < 1.0:
        raise ConfigError(
            "split.ratio", f"must be between 0 and 1 (exclusive), got {_short(s.ratio)}", source
        )
    if s.validation_folds is not None:
        if s.validation_folds < 1:
            raise ConfigError(
                "split.validation_folds", f"must be >= 1, got {s.validation_folds}", source
            )
        if s.validation_start is None:
            raise ConfigError(
                "split.validation_folds",
                "needs split.validation_start (where the first validation window starts)",
                source,
            )
        start, end = s.validation_start, s.train_end
        if s.column == "week" and isinstance(start, int) and isinstance(end, int) and start <= end:
            week_fold_bounds(start, end, s.validation_folds, source)  # early: before any data
    ev = config.evaluation
    if ev.exclude_owned is not None and "next_period" not in ev.tasks:
        raise ConfigError(
            "evaluation.exclude_owned",
            "applies to the next_period task, which evaluation.tasks does not list",
            source,
        )


def build_model(config: ModelConfig, source: str | None = None) -> RecommenderBase:
    """Instantiate the configured model, checking every parameter's name and type."""
    cls = MODELS.get(config.kind)
    if cls is None:
        raise ConfigError(
            "model.kind", f"unknown model {config.kind!r}; expected one of {sorted(MODELS)}", source
        )
    hints = typing.get_type_hints(cls)
    params = {f.name: hints[f.name] for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    checked = {}
    for key, value in config.params.items():
        if key not in params:
            raise ConfigError(
                f"model.params.{key}",
                f"unknown parameter for {config.kind}; expected some of {sorted(params)}",
                source,
            )
        try:
            checked[key] = TypeAdapter(params[key]).validate_python(value, strict=True)
        except ValidationError as exc:
            raise ConfigError(
                f"model.params.{key}",
                f"expected {params[key]}: {exc.errors()[0]['msg']} (got {value!r})",
                source,
            ) from None
    try:
        return cls(**checked)
    except ValueError as exc:  # a model's own range checks (see RecommenderBase.__post_init__)
        key = getattr(exc, "param", None)
        raise ConfigError(
            f"model.params.{key}" if key else "model.params", str(exc), source
        ) from None


def _check_tune(config: ExperimentConfig, source: str | None) -> None:
    """The ``tune:`` section: metric among the evaluated tasks and cut-offs, non-empty
    ranges, parameters of this model kind, and every value the search can draw (both ends of
    a range, each choice) accepted by the model itself (its types and range checks)."""
    tune = config.tune
    assert tune is not None
    task, sep, rest = tune.metric.partition("/")
    name, at, k = rest.partition("@")
    if not (sep and at and k.isdigit()):
        raise ConfigError(
            "tune.metric", f"expected task/metric@k, e.g. basket_completion/ndcg@10, got "
            f"{_short(tune.metric)}", source,
        )  # fmt: skip
    if task not in config.evaluation.tasks:
        raise ConfigError(
            "tune.metric", f"task {task!r} is not in evaluation.tasks {config.evaluation.tasks}",
            source,
        )  # fmt: skip
    if name not in METRICS:
        raise ConfigError(
            "tune.metric", f"unknown metric {name!r}; expected one of {sorted(METRICS)}", source
        )
    if int(k) not in config.evaluation.k:
        raise ConfigError(
            "tune.metric", f"k={k} is not in evaluation.k {config.evaluation.k}", source
        )
    for key in ("trials", "report_every"):
        if getattr(tune, key) < 1:
            raise ConfigError(f"tune.{key}", f"must be >= 1, got {getattr(tune, key)}", source)
    if tune.pruner.warmup_steps is not None and tune.pruner.warmup_steps < 0:
        raise ConfigError(
            "tune.pruner.warmup_steps", f"must be >= 0, got {tune.pruner.warmup_steps}", source
        )
    if tune.sampler.seed is not None and tune.sampler.seed < 0:
        raise ConfigError("tune.sampler.seed", f"must be >= 0, got {tune.sampler.seed}", source)
    if not tune.params:
        raise ConfigError("tune.params", "must list at least one model parameter to tune", source)
    cls = MODELS[config.model.kind]
    known = sorted(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]
    for pname, space in tune.params.items():
        where = f"tune.params.{pname}"
        if pname not in known:
            raise ConfigError(
                where, f"unknown parameter for {config.model.kind}; expected some of {known}",
                source,
            )  # fmt: skip
        for value_key, value in _space_values(space, where, source):
            try:
                build_model(ModelConfig(config.model.kind, {**config.model.params, pname: value}))
            except ConfigError as exc:
                raise ConfigError(
                    f"{where}.{value_key}", f"{_short(value)} is not a valid {pname}: "
                    f"{exc.problem}", source,
                ) from None  # fmt: skip


def _space_values(space: ParamSpace, where: str, source: str | None) -> list[tuple[str, Any]]:
    """Check one parameter's range; the values to try on the model (both ends, each choice)."""
    numeric = space.type in ("int", "float")
    unused = ("choices",) if numeric else ("low", "high", "step")
    for key in unused:
        if getattr(space, key) is not None:
            raise ConfigError(f"{where}.{key}", f"does not apply to type {space.type}", source)
    if not numeric:
        if space.log:
            raise ConfigError(f"{where}.log", "does not apply to type categorical", source)
        if not space.choices:
            raise ConfigError(f"{where}.choices", "must list at least one value", source)
        if len({repr(c) for c in space.choices}) != len(space.choices):
            raise ConfigError(f"{where}.choices", "lists a value twice", source)
        return [(f"choices[{i}]", c) for i, c in enumerate(space.choices)]
    for key in ("low", "high"):
        value = getattr(space, key)
        if value is None:
            raise ConfigError(f"{where}.{key}", f"required for type {space.type}", source)
        if space.type == "int" and not isinstance(value, int):
            raise ConfigError(f"{where}.{key}", f"expected a whole number, got {value!r}", source)
    low, high = space.low, space.high
    assert low is not None and high is not None
    if low >= high:
        raise ConfigError(
            f"{where}.high", f"empty range: high ({high}) must be > low ({low})", source
        )
    if space.log and low <= 0:
        raise ConfigError(f"{where}.low", f"must be > 0 on a log scale, got {low}", source)
    if space.step is not None:
        if space.log:
            raise ConfigError(f"{where}.step", "cannot be combined with log: true", source)
        if space.type == "int" and not isinstance(space.step, int):
            raise ConfigError(
                f"{where}.step", f"expected a whole number, got {space.step!r}", source
            )
        if space.step <= 0:
            raise ConfigError(f"{where}.step", f"must be > 0, got {space.step}", source)
    cast = int if space.type == "int" else float
    return [("low", cast(low)), ("high", cast(high))]
