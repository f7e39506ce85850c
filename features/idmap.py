"""External <-> internal id maps, stable and saved as plain JSON."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from features.errors import DataValidationError
from features.io import atomic_write_text


@dataclass(frozen=True, eq=False)
class IdMap:
    """Maps external ids (int or str) to dense internal indices ``0..n-1``.

    Internal index ``i`` is the position of the id in the *sorted* unique external ids, so the
    map depends only on the set of ids, not on row order: the same data always gives the same
    map.

    Attributes
    ----------
    external_ids : numpy.ndarray, shape (n,)
        Sorted unique external ids; ``int64`` or ``str``.
    """

    external_ids: np.ndarray

    @classmethod
    def from_ids(cls, *columns: pl.Series | Iterable) -> IdMap:
        """Build from one or more id columns (their union)."""
        series = [c if isinstance(c, pl.Series) else pl.Series(list(c)) for c in columns]
        series = [s.drop_nulls() for s in series if len(s)]
        if not series:
            return cls(np.array([], dtype=np.int64))
        kinds = {s.dtype == pl.String for s in series}
        if len(kinds) > 1:  # mixed int and str ids: compare as strings
            series = [s.cast(pl.String) for s in series]
        ids = pl.concat(series).unique().sort()
        if ids.dtype == pl.String:
            return cls(ids.to_numpy().astype(str))
        return cls(ids.cast(pl.Int64).to_numpy())

    def __len__(self) -> int:
        return int(self.external_ids.shape[0])

    @property
    def is_str(self) -> bool:
        return self.external_ids.dtype.kind in ("U", "O")

    def frame(self, id_column: str, index_column: str) -> pl.DataFrame:
        """Two-column frame (external id, internal index as int32) for joins."""
        return pl.DataFrame(
            {id_column: self.external_ids, index_column: np.arange(len(self), dtype=np.int32)}
        )

    def to_internal(self, ids: Iterable, unknown: str = "error", what: str = "id") -> np.ndarray:
        """Internal indices of ``ids`` (int64); unknown ids raise, or give -1 with ``unknown="ignore"``."""
        values = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids)
        if self.is_str:
            values = values.astype(str)
        elif values.dtype.kind in ("U", "O"):
            try:
                values = values.astype(np.int64)
            except ValueError:
                values = np.full(values.shape, np.iinfo(np.int64).min)
        if len(self) == 0:
            pos = np.full(values.shape, -1, dtype=np.int64)
        else:
            pos = np.searchsorted(self.external_ids, values)
            pos = np.minimum(pos, len(self) - 1)
            pos = np.where(self.external_ids[pos] == values, pos, -1).astype(np.int64)
        if unknown == "error" and (pos < 0).any():
            bad = values[pos < 0][:5].tolist()
            raise DataValidationError(what, f"unknown id(s): {bad}")
        return pos

    def to_external(self, idx: np.ndarray) -> np.ndarray:
        """External ids at internal indices ``idx``."""
        return self.external_ids[np.asarray(idx, dtype=np.int64)]

    def to_json(self) -> dict:
        kind = "str" if self.is_str else "int"
        return {"format": "addons.idmap/1", "dtype": kind, "ids": self.external_ids.tolist()}

    @classmethod
    def from_json(cls, payload: dict, source: str = "id map") -> IdMap:
        if payload.get("format") != "addons.idmap/1" or payload.get("dtype") not in ("int", "str"):
            raise DataValidationError(
                source, "not an addons id map (expected format 'addons.idmap/1')"
            )
        dtype = np.int64 if payload["dtype"] == "int" else str
        ids = np.asarray(payload["ids"], dtype=dtype)
        if len(ids) > 1 and not (ids[1:] > ids[:-1]).all():
            raise DataValidationError(source, "ids must be sorted and unique")
        return cls(ids)

    def save(self, path: str | Path) -> None:
        """Write as JSON (atomically)."""
        atomic_write_text(path, json.dumps(self.to_json()))

    @classmethod
    def load(cls, path: str | Path) -> IdMap:
        try:
            payload = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DataValidationError(str(path), f"could not read id map: {exc}") from None
        return cls.from_json(payload, str(path))
