"""One entry point from a data config to a :class:`~features.dataset.Dataset`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import ClassVar, Literal

from features.adapters import (
    RawData,
    load_complete_journey,
    load_movielens_100k,
    load_shop_transactions,
)
from features.cleaning import CleaningConfig
from features.dataset import Dataset, build_dataset
from features.errors import ConfigError
from features.readers import FileSpec, read_interactions, read_items, read_users


@dataclass(frozen=True)
class DataConfig:
    """Where the data comes from and how it is cleaned.

    Attributes
    ----------
    source : {"completejourney", "movielens100k", "shop_transactions", "files"}
        ``completejourney`` (embedded default, no path needed); ``movielens100k`` (``path`` =
        the ``ml-100k`` folder); ``shop_transactions`` (``interactions`` = the export, its
        ``columns`` keyed as in :mod:`features.adapters.shop_transactions`; optional
        ``items`` / ``users`` files merged into what the export gives); ``files``
        (``interactions`` and optional ``items`` / ``users`` files with canonical mappings).
        A file key the source does not read is an error (:func:`load_raw`).
    """

    __pydantic_config__: ClassVar[dict[str, str]] = {"extra": "forbid"}

    source: Literal["completejourney", "movielens100k", "shop_transactions", "files"] = (
        "completejourney"
    )
    path: str | None = None
    interactions: FileSpec | None = None
    items: FileSpec | None = None
    users: FileSpec | None = None
    cleaning: CleaningConfig = field(default_factory=CleaningConfig)


# The keys each source reads; any other file key set in the config is an error, never ignored.
_READS = {
    "completejourney": (),
    "movielens100k": ("path",),
    "shop_transactions": ("interactions", "items", "users"),
    "files": ("interactions", "items", "users"),
}


def load_raw(config: DataConfig) -> RawData:
    """Read and validate the configured source (not yet cleaned)."""
    for key in ("path", "interactions", "items", "users"):
        if getattr(config, key) is not None and key not in _READS[config.source]:
            reads = ", ".join(f"data.{k}" for k in _READS[config.source]) or "no file keys"
            raise ConfigError(
                f"data.{key}",
                f"is not used by source {config.source!r} (it reads {reads}): remove it or "
                "change data.source",
            )
    anonymous = config.cleaning.anonymous == "drop"
    if config.source == "completejourney":
        return load_complete_journey(allow_anonymous=anonymous)
    if config.source == "movielens100k":
        if not config.path:
            raise ConfigError("data.path", "movielens100k needs the path of the ml-100k folder")
        return load_movielens_100k(config.path)
    if config.interactions is None:
        raise ConfigError(
            "data.interactions", f"source {config.source!r} needs an interactions file"
        )
    if config.source == "shop_transactions":
        return load_shop_transactions(
            config.interactions, anonymous, items=config.items, users=config.users
        )
    interactions = read_interactions(config.interactions, allow_anonymous=anonymous)
    items = read_items(config.items) if config.items else None
    users = read_users(config.users) if config.users else None
    return RawData(f"files ({config.interactions.path})", interactions, items, users)


def load_dataset(config: DataConfig) -> Dataset:
    """Read, validate, clean and index the configured data."""
    return build_dataset(load_raw(config), config.cleaning, {"data": asdict(config)})
