"""Reading an exported artifact safely: every file's sha256 is checked against the manifest,
nothing is unpickled, and only the files the manifest names are opened."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: Formats this reader understands (1: items.json sorted; 2: in the graph's item order).
FORMATS = ("addons.artifact/1", "addons.artifact/2")
REQUIRED = ("model.onnx", "users.json", "items.json", "item_table.json", "user_state.npz")


class ArtifactError(ValueError):
    """The artifact is missing, malformed or has been tampered with."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True, eq=False)
class IdIndex:
    """External ids <-> positions. ``ids[p]`` is the external id at position ``p``; the ids
    need not be sorted (``addons.idlist/1``), a sorted copy answers lookups."""

    ids: np.ndarray

    def __post_init__(self) -> None:
        by_id = np.argsort(self.ids, kind="stable")
        object.__setattr__(self, "_by_id", by_id)
        object.__setattr__(self, "_sorted", self.ids[by_id])

    @classmethod
    def from_json(cls, payload: dict, source: str) -> IdIndex:
        # addons.idmap/1: sorted ids (format 1 artifacts, users.json); addons.idlist/1: any order
        if payload.get("format") not in ("addons.idmap/1", "addons.idlist/1") or payload.get(
            "dtype"
        ) not in ("int", "str"):
            raise ArtifactError(f"{source}: not an addons id map")
        ids = np.asarray(payload["ids"], dtype=np.int64 if payload["dtype"] == "int" else str)
        if len(np.unique(ids)) != len(ids):
            raise ArtifactError(f"{source}: ids are not unique")
        return cls(ids)

    @property
    def is_str(self) -> bool:
        return self.ids.dtype.kind in ("U", "O")

    def lookup(self, values: list[Any]) -> tuple[np.ndarray, list[Any]]:
        """Positions (-1 for unknown) and the list of unknown values."""
        if not values:
            return np.zeros(0, dtype=np.int64), []
        if self.is_str:
            arr = np.asarray([str(v) for v in values])
        else:
            try:
                arr = np.asarray([int(v) for v in values], dtype=np.int64)
            except (TypeError, ValueError):
                arr = None
            if arr is None:
                parsed = []
                for v in values:
                    try:
                        parsed.append(int(v))
                    except (TypeError, ValueError):
                        parsed.append(np.iinfo(np.int64).min)
                arr = np.asarray(parsed, dtype=np.int64)
        if len(self.ids) == 0:
            pos = np.full(len(values), -1, dtype=np.int64)
        else:
            at = np.minimum(np.searchsorted(self._sorted, arr), len(self.ids) - 1)
            pos = np.where(self._sorted[at] == arr, self._by_id[at], -1).astype(np.int64)
        return pos, [v for v, p in zip(values, pos, strict=True) if p < 0]

    def external(self, idx: np.ndarray) -> list[Any]:
        return self.ids[idx].tolist()


@dataclass(eq=False)
class Artifact:
    """A verified artifact: manifest, id maps, item table and the user-state snapshot."""

    path: Path
    manifest: dict[str, Any]
    users: IdIndex
    items: IdIndex
    item_table: dict[str, np.ndarray]
    history_indptr: np.ndarray
    history_indices: np.ndarray
    history_data: np.ndarray

    @classmethod
    def load(cls, path: str | Path) -> Artifact:
        folder = Path(path)
        manifest_file = folder / "manifest.json"
        try:
            manifest = json.loads(manifest_file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ArtifactError(f"{manifest_file}: not a readable manifest ({exc})") from None
        if manifest.get("format") not in FORMATS:
            raise ArtifactError(
                f"{manifest_file}: expected format {' or '.join(map(repr, FORMATS))}, "
                f"got {manifest.get('format')!r}"
            )
        files = manifest.get("files") or {}
        missing = [f for f in REQUIRED if f not in files]
        if missing:
            raise ArtifactError(f"{manifest_file}: manifest does not list {missing}")
        for name, digest in files.items():
            file = folder / name
            if Path(name).name != name or not file.is_file():
                raise ArtifactError(f"{folder}: file {name!r} named in the manifest is missing")
            if _sha256(file) != digest:
                raise ArtifactError(
                    f"{file}: sha256 does not match the manifest: refusing a tampered artifact"
                )
        users = IdIndex.from_json(json.loads((folder / "users.json").read_text()), "users.json")
        items = IdIndex.from_json(json.loads((folder / "items.json").read_text()), "items.json")
        raw = json.loads((folder / "item_table.json").read_text())
        table = {
            "price": np.asarray(
                [np.nan if v is None else v for v in raw["price"]], dtype=np.float64
            ),
            "margin": np.asarray(
                [np.nan if v is None else v for v in raw["margin"]], dtype=np.float64
            ),
            "in_stock": np.asarray([True if v is None else bool(v) for v in raw["in_stock"]]),
        }
        for level in ("department", "category", "subcategory"):
            values = raw.get(level) or [None] * len(items.ids)
            _, codes = np.unique(
                np.asarray(["" if v is None else str(v) for v in values]), return_inverse=True
            )
            known = np.asarray([v is not None for v in values])
            table[level] = np.where(known, codes, -1)
            table[f"{level}_name"] = np.asarray(["" if v is None else str(v) for v in values])
        with np.load(folder / "user_state.npz", allow_pickle=False) as state:
            indptr = state["history.indptr"]
            indices = state["history.indices"]
            data = state["history.data"].astype(np.float32)
        if len(indptr) != len(users.ids) + 1 or len(table["price"]) != len(items.ids):
            raise ArtifactError(f"{folder}: user state or item table does not match the id maps")
        return cls(folder, manifest, users, items, table, indptr, indices, data)

    def history_rows(self, users: np.ndarray) -> np.ndarray:
        """Dense re-buy rows [len(users), n_items]; zero for unknown users (-1)."""
        out = np.zeros((len(users), len(self.items.ids)), dtype=np.float32)
        for r, u in enumerate(users):
            if u >= 0:
                lo, hi = self.history_indptr[u], self.history_indptr[u + 1]
                out[r, self.history_indices[lo:hi]] = self.history_data[lo:hi]
        return out
