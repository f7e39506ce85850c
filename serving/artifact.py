"""Reading an exported artifact safely.

Every file's sha256 is checked against the manifest on the very bytes that are then parsed;
nothing is unpickled; only the files the manifest names are opened, and none of them through a
symbolic link; every file is checked for shape, types and consistency with the manifest and
the other files. Any problem is an :class:`ArtifactError` naming the file and what was
expected. With ``trusted_keys``, the manifest's Ed25519 signature (``manifest.sig``, see
:mod:`serving.signing`) is verified before anything else is read.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import math
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: Formats this reader understands (1: items.json sorted; 2: in the graph's item order).
FORMATS = ("addons.artifact/1", "addons.artifact/2")
REQUIRED = ("model.onnx", "users.json", "items.json", "item_table.json", "user_state.npz")
#: A manifest is a few kB; a bigger one is not ours (and is read before its signature is checked).
MAX_MANIFEST_BYTES = 1 << 24
_INT64 = (-(1 << 63), (1 << 63) - 1)
#: The arrays of the manifest's ``neighbours`` field: an item x item model's rows as CSR
#: (``serving.neighbour_scorer``), each a plain ``.npy`` file, memory-mapped.
NEIGHBOUR_ARRAYS = ("indptr", "indices", "data", "base")
#: An ``array_files`` array smaller than this is read into memory, a larger one is mapped
#: (a page per tiny array would be wasted, and a mapping of 0 bytes is not allowed).
MAP_MIN_BYTES = 1 << 16


class ArtifactError(ValueError):
    """The artifact is missing, malformed or has been tampered with."""


def _open_regular(file: Path) -> io.BufferedReader:
    """``file`` opened for reading, refusing a symbolic link (at its last path component), a
    FIFO or anything else that is not a regular file (see :func:`read_regular_file`)."""
    if file.is_symlink():
        raise ArtifactError(f"{file}: is a symbolic link; artifact files must be regular files")
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(file, flags | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise ArtifactError(f"{file}: missing") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ArtifactError(
                f"{file}: is a symbolic link; artifact files must be regular files"
            ) from None
        raise ArtifactError(f"{file}: cannot be read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # before fdopen, which refuses a directory
        os.close(fd)
        raise ArtifactError(f"{file}: expected a regular file")
    return os.fdopen(fd, "rb")


def read_regular_file(
    file: Path, keep: int | None = None, limit: int | None = None
) -> tuple[bytes, str]:
    """The bytes (only the first ``keep`` if given) and the sha256 of ``file``; refuses
    anything but a regular file reached without following a symbolic link at its last path
    component, and files over ``limit`` bytes.

    The artifact folder itself may be a symlink (a registry cache's ``current`` link); the
    files in it may not: one pointing at ``/etc/passwd`` would otherwise be read and hashed.
    ``O_NOFOLLOW`` makes the check and the open one step (no window to swap in a link), and
    ``O_NONBLOCK`` keeps a FIFO planted under an artifact name from blocking the open.
    """
    with _open_regular(file) as fh:
        h = hashlib.sha256()
        chunks: list[bytes] = []
        size = kept = 0
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            size += len(chunk)
            if limit is not None and size > limit:
                raise ArtifactError(f"{file}: larger than {limit:,} bytes: not an artifact file")
            h.update(chunk)
            if keep is None or kept < keep:
                chunks.append(chunk if keep is None else chunk[: keep - kept])
                kept += len(chunks[-1])
    return b"".join(chunks), h.hexdigest()


def map_npy_file(file: Path, digest: str) -> np.ndarray:
    """The ``.npy`` array in ``file``, checked against its manifest ``digest`` and
    memory-mapped (read into memory below :data:`MAP_MIN_BYTES`).

    The file is opened once (no symbolic link, a regular file), hashed by streaming (its bytes
    are not kept) and mapped from that same open file, so what is mapped is what was hashed
    (an artifact is replaced by swapping its folder, never rewritten in place). The header is
    parsed with numpy's own reader (a literal, never pickle); an object dtype, a header that
    is not ``.npy`` 1.0 / 2.0 or a size other than the header's is an :class:`ArtifactError`
    naming the file.
    """
    from numpy.lib import format as npy

    with _open_regular(file) as fh:
        h = hashlib.sha256()
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
        if h.hexdigest() != digest:
            raise ArtifactError(
                f"{file}: sha256 does not match the manifest: refusing a tampered artifact"
            )
        fh.seek(0)
        try:
            version = npy.read_magic(fh)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f"unsupported .npy version {version}")
            read_header = npy.read_array_header_1_0 if version == (1, 0) \
                else npy.read_array_header_2_0  # fmt: skip
            shape, fortran, dtype = read_header(fh)
        except Exception as exc:  # numpy parsing untrusted bytes: any failure means a bad file
            raise ArtifactError(f"{file}: not a readable .npy array ({exc})") from None
        if dtype.hasobject:
            raise ArtifactError(f"{file}: holds an object array (pickled data is never loaded)")
        offset = fh.tell()
        nbytes = math.prod(shape) * dtype.itemsize
        size = os.fstat(fh.fileno()).st_size
        if size != offset + nbytes:
            raise ArtifactError(
                f"{file}: {size - offset:,} bytes of data, the header says {nbytes:,} "
                f"({dtype} with shape {shape}): a truncated or padded file"
            )
        order = "F" if fortran else "C"
        if nbytes < max(MAP_MIN_BYTES, 1):  # mmap refuses 0 bytes
            return np.frombuffer(fh.read(nbytes), dtype=dtype).reshape(shape, order=order)
        mapped = np.memmap(fh, dtype=dtype, mode="r", offset=offset, shape=shape, order=order)
        return np.asarray(mapped)  # a plain read-only ndarray over the mapping


def _json(data: bytes, file: Path) -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{file}: expected UTF-8 JSON ({exc})") from None
    except RecursionError:
        raise ArtifactError(f"{file}: expected JSON (nested too deeply)") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


#: Manifest fields whose type is checked: name -> (check, what is expected, required).
_MANIFEST_FIELDS: dict[str, tuple[Any, str, bool]] = {
    "format": (lambda v: isinstance(v, str), "a string", True),
    "model_kind": (lambda v: isinstance(v, str), "a string", True),
    "scorer": (lambda v: isinstance(v, str), "a string (a serving.scorers.SCORERS name)", False),
    "n_users": (lambda v: _is_int(v) and v >= 0, "an integer >= 0", True),
    "n_items": (lambda v: _is_int(v) and v >= 0, "an integer >= 0", True),
    "files": (
        lambda v: (
            isinstance(v, dict)
            and all(
                isinstance(d, str) and len(d) == 64 and set(d) <= set("0123456789abcdef")
                for d in v.values()
            )
        ),
        "an object mapping file names to sha256 hex digests",
        True,
    ),
    "created_at": (lambda v: isinstance(v, str), "a string", False),
    "mlflow_run_id": (lambda v: v is None or isinstance(v, str), "a string or null", False),
    "data_fingerprint": (lambda v: v is None or isinstance(v, str), "a string or null", False),
    "metrics": (lambda v: isinstance(v, dict), "an object", False),
    "params": (lambda v: isinstance(v, dict), "an object", False),
    "onnx_opset": (lambda v: _is_int(v), "an integer", False),
    "inputs": (
        lambda v: isinstance(v, list) and all(isinstance(i, str) for i in v),
        "a list of strings",
        False,
    ),
    "scored_first": (lambda v: v is None or (_is_int(v) and v >= 0), "an integer >= 0", False),
    "onnx_external_data": (
        lambda v: isinstance(v, list) and all(isinstance(i, str) for i in v),
        "a list of file names",
        False,
    ),
    "neighbours": (
        lambda v: (
            isinstance(v, dict)
            and all(isinstance(v.get(key), str) for key in NEIGHBOUR_ARRAYS)
            and isinstance(v.get("sources"), list)
            and all(
                isinstance(s, list)
                and len(s) == 2
                and s[0] in ("cart", "history_items")
                and _is_number(s[1])
                for s in v["sources"]
            )
        ),
        "an object naming the .npy files "
        + ", ".join(("indptr", "indices", "data", "base"))
        + " and a list 'sources' of [input, weight] pairs",
        False,
    ),
    "array_files": (
        lambda v: (
            isinstance(v, dict)
            and all(
                isinstance(arrays, dict)
                and arrays
                and all(isinstance(k, str) and k and isinstance(f, str) for k, f in arrays.items())
                for arrays in v.values()
            )
        ),
        "an object mapping an .npz name to an object of array name -> .npy file",
        False,
    ),
}


def _check_manifest(manifest: Any, file: Path) -> dict[str, Any]:
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{file}: expected a JSON object, got a {type(manifest).__name__}")
    if manifest.get("format") not in FORMATS:
        raise ArtifactError(
            f"{file}: expected format {' or '.join(map(repr, FORMATS))}, "
            f"got {manifest.get('format')!r}"
        )
    for key, (check, expected, required) in _MANIFEST_FIELDS.items():
        if key not in manifest:
            if required:
                raise ArtifactError(f"{file}: field {key!r} is missing")
        elif not check(manifest[key]):
            raise ArtifactError(f"{file}: field {key!r}: expected {expected}")
    missing = [f for f in REQUIRED if f not in manifest["files"]]
    if missing:
        raise ArtifactError(f"{file}: manifest does not list {missing}")
    for name in manifest["files"]:
        # A plain name in this folder: no path separators, no "..", no hidden paths elsewhere.
        if name in ("", ".", "..", "manifest.json") or Path(name).name != name or "/" in name:
            raise ArtifactError(f"{file}: file name {name!r} is not a plain file name")
    unlisted = [n for n in manifest.get("onnx_external_data", []) if n not in manifest["files"]]
    if unlisted or set(manifest.get("onnx_external_data", [])) & set(REQUIRED):
        raise ArtifactError(
            f"{file}: field 'onnx_external_data': {unlisted or 'a standard file'} must be files "
            "the manifest lists (and hashes), other than the standard five"
        )
    neighbours = manifest.get("neighbours")
    if neighbours is not None:
        names = [neighbours[key] for key in NEIGHBOUR_ARRAYS]
        bad = [n for n in names if n not in manifest["files"] or not n.endswith(".npy")
               or n in REQUIRED]  # fmt: skip
        if bad:
            raise ArtifactError(
                f"{file}: field 'neighbours': {bad} must be .npy files the manifest lists "
                "(and hashes), other than the standard five"
            )
    taken = set(REQUIRED) | set(manifest.get("onnx_external_data", [])) | mapped_files(manifest)
    for npz, arrays in manifest.get("array_files", {}).items():
        if not npz.endswith(".npz") or Path(npz).name != npz or npz in manifest["files"]:
            raise ArtifactError(
                f"{file}: field 'array_files': {npz!r} must be a plain *.npz name the artifact "
                "ships as separate .npy files instead (not also a listed file)"
            )
        bad = [f for f in arrays.values() if f not in manifest["files"]
               or not f.endswith(".npy") or f in taken]  # fmt: skip
        if bad:
            raise ArtifactError(
                f"{file}: field 'array_files': {npz}: {bad} must be .npy files the manifest "
                "lists (and hashes), each named once, other than the standard five, the ONNX "
                "external data and the neighbour arrays"
            )
        taken |= set(arrays.values())
    return manifest


def mapped_files(manifest: dict[str, Any]) -> set[str]:
    """The neighbour arrays' ``.npy`` files (gigabytes at a large catalog, read on demand),
    memory-mapped when the artifact loads."""
    neighbours = manifest.get("neighbours") or {}
    return {neighbours[key] for key in NEIGHBOUR_ARRAYS if key in neighbours}


def array_files(manifest: dict[str, Any]) -> set[str]:
    """The ``.npy`` files of the manifest's ``array_files`` (each an array of an ``.npz``
    shipped as separate files), memory-mapped when the artifact loads."""
    return {f for arrays in manifest.get("array_files", {}).values() for f in arrays.values()}


def _check_onnx(head: bytes, file: Path) -> None:
    """A cheap look at ``model.onnx`` without the ``onnx`` package (not a serving dependency):
    non-empty and starting like a serialised ONNX ModelProto (field 1, ``ir_version``, a
    varint: byte 0x08). onnxruntime parses the rest when the Ranker opens it."""
    if not head:
        raise ArtifactError(f"{file}: empty file, expected an ONNX model")
    if head != b"\x08":
        raise ArtifactError(f"{file}: not an ONNX model (expected a serialised ModelProto)")


def _id_index(data: bytes, file: Path, expected: int, field: str) -> IdIndex:
    index = IdIndex.from_json(_json(data, file), str(file))
    if len(index.ids) != expected:
        raise ArtifactError(
            f"{file}: {len(index.ids)} ids, but the manifest says {field} = {expected}"
        )
    return index


def _item_table(raw: Any, file: Path, n_items: int) -> dict[str, np.ndarray]:
    if not isinstance(raw, dict):
        raise ArtifactError(f"{file}: expected a JSON object of per-item lists")

    def column(name: str, ok: Any, expected: str, required: bool) -> list | None:
        values = raw.get(name)
        if values is None and not required:
            return None
        if not isinstance(values, list) or len(values) != n_items:
            raise ArtifactError(
                f"{file}: {name!r}: expected a list of {n_items} values (manifest n_items)"
            )
        bad = next((i for i, v in enumerate(values) if v is not None and not ok(v)), None)
        if bad is not None:
            raise ArtifactError(
                f"{file}: {name!r}[{bad}] = {values[bad]!r}: expected {expected} or null"
            )
        return values

    price = column("price", _is_number, "a finite number", True)
    margin = column("margin", _is_number, "a finite number", True)
    in_stock = column("in_stock", lambda v: isinstance(v, bool), "true/false", True)
    table = {
        "price": np.asarray([np.nan if v is None else v for v in price], dtype=np.float64),
        "margin": np.asarray([np.nan if v is None else v for v in margin], dtype=np.float64),
        "in_stock": np.asarray([True if v is None else v for v in in_stock], dtype=bool),
    }
    for level in ("department", "category", "subcategory"):
        values = column(level, lambda v: isinstance(v, str) or _is_number(v), "a string", False)
        values = values or [None] * n_items
        names = np.asarray(["" if v is None else str(v) for v in values])
        _, codes = np.unique(names, return_inverse=True)
        known = np.asarray([v is not None for v in values], dtype=bool)
        table[level] = np.where(known, codes.reshape(-1), -1)
        table[f"{level}_name"] = names
    return table


def read_npz(data: bytes, file: Path, keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """The arrays (those of ``keys`` present, or all) of the ``.npz`` archive ``data`` read
    from ``file``, without pickle; any problem is an :class:`ArtifactError` naming the file."""
    try:
        npz = np.load(io.BytesIO(data), allow_pickle=False)
        if not hasattr(npz, "files"):  # a bare .npy array
            raise ArtifactError(f"{file}: expected an .npz archive, got a single array")
        with npz:
            return {key: npz[key] for key in npz.files if keys is None or key in keys}
    except ArtifactError:
        raise
    except Exception as exc:  # numpy parsing untrusted bytes: any failure means a bad file
        problem = (
            "holds an object array (pickled data is never loaded)"
            if "Object arrays" in str(exc)
            else f"is not a readable .npz archive ({type(exc).__name__}: {exc})"
        )
        raise ArtifactError(f"{file}: {problem}") from None


def _user_state(
    data: bytes, file: Path, n_users: int, n_items: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The CSR history arrays, checked: integer pointers and indices in range, finite data."""
    keys = ("history.indptr", "history.indices", "history.data", "history.shape")
    arrays = read_npz(data, file, keys)
    for key in ("history.indptr", "history.indices", "history.data"):
        if key not in arrays:
            raise ArtifactError(f"{file}: array {key!r} is missing")
    for key, kinds, expected in (
        ("history.indptr", "iu", "integers"),
        ("history.indices", "iu", "integers"),
        ("history.data", "fiu", "numbers"),
        ("history.shape", "iu", "integers"),
    ):
        if key in arrays and (arrays[key].ndim != 1 or arrays[key].dtype.kind not in kinds):
            raise ArtifactError(
                f"{file}: {key!r}: expected a 1-d array of {expected}, got "
                f"{arrays[key].dtype} with shape {arrays[key].shape}"
            )
    indptr = arrays["history.indptr"].astype(np.int64)
    indices = arrays["history.indices"].astype(np.int64)
    with np.errstate(over="ignore"):  # a value beyond float32 becomes inf, refused below
        values = arrays["history.data"].astype(np.float32)
    if "history.shape" in arrays and arrays["history.shape"].tolist() != [n_users, n_items]:
        raise ArtifactError(
            f"{file}: 'history.shape' is {arrays['history.shape'].tolist()}, expected "
            f"[{n_users}, {n_items}] (manifest n_users, n_items)"
        )
    if len(indptr) != n_users + 1:
        raise ArtifactError(
            f"{file}: 'history.indptr' has {len(indptr)} entries, expected n_users + 1 = "
            f"{n_users + 1}"
        )
    if indptr[0] != 0 or np.any(np.diff(indptr) < 0) or indptr[-1] != len(indices):
        raise ArtifactError(
            f"{file}: 'history.indptr' must start at 0, never decrease and end at "
            f"len('history.indices') = {len(indices)}"
        )
    if len(values) != len(indices):
        raise ArtifactError(
            f"{file}: 'history.data' has {len(values)} values, 'history.indices' {len(indices)}"
        )
    if len(indices) and (indices.min() < 0 or indices.max() >= n_items):
        raise ArtifactError(
            f"{file}: 'history.indices' must lie in [0, {n_items}) (manifest n_items)"
        )
    if not np.all(np.isfinite(values)):
        raise ArtifactError(f"{file}: 'history.data' holds NaN or infinite scores (float32)")
    return indptr, indices, values


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
    def from_json(cls, payload: Any, source: str) -> IdIndex:
        """Validate an ``addons.idmap/1`` (sorted ids: format 1 artifacts, users.json) or
        ``addons.idlist/1`` (any order) payload: unique ints (int64) or unique strings."""
        if (
            not isinstance(payload, dict)
            or payload.get("format") not in ("addons.idmap/1", "addons.idlist/1")
            or payload.get("dtype") not in ("int", "str")
        ):
            raise ArtifactError(
                f"{source}: expected an addons id map (a JSON object with format "
                "'addons.idmap/1' or 'addons.idlist/1', dtype 'int' or 'str' and a list 'ids')"
            )
        ids = payload.get("ids")
        if not isinstance(ids, list):
            raise ArtifactError(f"{source}: 'ids': expected a list")
        is_int = payload["dtype"] == "int"
        bad = next(
            (
                i
                for i, v in enumerate(ids)
                if not (
                    _is_int(v) and _INT64[0] <= v <= _INT64[1] if is_int else isinstance(v, str)
                )
            ),
            None,
        )
        if bad is not None:
            expected = "an integer in the int64 range" if is_int else "a string"
            raise ArtifactError(f"{source}: ids[{bad}] = {ids[bad]!r}: expected {expected}")
        array = np.asarray(ids, dtype=np.int64 if is_int else str)
        if is_int and not ids:
            array = np.zeros(0, dtype=np.int64)
        if len(np.unique(array)) != len(array):
            raise ArtifactError(f"{source}: ids are not unique")
        return cls(array)

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
    """A verified artifact: manifest, id maps, item table and the user-state snapshot.

    ``extra``: the verified bytes of every other file the manifest lists (a scorer's own
    arrays, e.g. ``ranker_state.npz``): scorers read these, never the files again by path.
    ``mapped``: every ``.npy`` file the manifest maps (the neighbour arrays, the files of
    ``array_files``: an ``.npz`` shipped as one ``.npy`` per array), verified and
    memory-mapped from the same open file (:func:`map_npy_file`), by file name. A scorer
    reads an ``.npz`` in either form through :meth:`arrays`.
    """

    path: Path
    manifest: dict[str, Any]
    users: IdIndex
    items: IdIndex
    item_table: dict[str, np.ndarray]
    history_indptr: np.ndarray
    history_indices: np.ndarray
    history_data: np.ndarray
    extra: dict[str, bytes] = field(default_factory=dict)
    mapped: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path, trusted_keys: Sequence[str | Path] | None = None) -> Artifact:
        """Read and verify the artifact directory ``path``.

        Parameters
        ----------
        path : the artifact directory (it may itself be a symlink, e.g. a ``current`` link).
        trusted_keys : Ed25519 public key files (PEM). Given (even empty), ``manifest.sig``
            must be a valid signature of ``manifest.json`` by one of them, checked before any
            other file is read. ``None``: no signature is required and ``manifest.sig`` is not
            read.

        Raises
        ------
        ArtifactError
            For every problem, naming the file and what was expected.
        """
        folder = Path(path)
        if not folder.is_dir():
            raise ArtifactError(f"{folder}: not an artifact directory (one with a manifest.json)")
        manifest_file = folder / "manifest.json"
        raw_manifest, _ = read_regular_file(manifest_file, limit=MAX_MANIFEST_BYTES)
        if trusted_keys is not None:
            from serving.signing import verify_manifest

            verify_manifest(folder, raw_manifest, trusted_keys)
        manifest = _check_manifest(_json(raw_manifest, manifest_file), manifest_file)
        contents: dict[str, bytes] = {}
        external = set(manifest.get("onnx_external_data", []))
        to_map = mapped_files(manifest) | array_files(manifest)
        mapped: dict[str, np.ndarray] = {}
        for name, digest in manifest["files"].items():
            file = folder / name
            if name in to_map:  # hashed and mapped from one open file, bytes not kept
                mapped[name] = map_npy_file(file, digest)
                continue
            # model.onnx (megabytes) and its external data are only hashed here; onnxruntime
            # opens them.
            keep = 1 if name == "model.onnx" else 0 if name in external else None
            data, actual = read_regular_file(file, keep=keep)
            if actual != digest:
                raise ArtifactError(
                    f"{file}: sha256 does not match the manifest: refusing a tampered artifact"
                )
            contents[name] = data
        n_users, n_items = manifest["n_users"], manifest["n_items"]
        _check_onnx(contents["model.onnx"], folder / "model.onnx")
        users = _id_index(contents["users.json"], folder / "users.json", n_users, "n_users")
        items = _id_index(contents["items.json"], folder / "items.json", n_items, "n_items")
        table_file = folder / "item_table.json"
        table = _item_table(_json(contents["item_table.json"], table_file), table_file, n_items)
        indptr, indices, data = _user_state(
            contents["user_state.npz"], folder / "user_state.npz", n_users, n_items
        )
        extra = {n: raw for n, raw in contents.items() if n not in REQUIRED and n not in external}
        return cls(folder, manifest, users, items, table, indptr, indices, data, extra, mapped)

    def arrays(self, name: str) -> tuple[dict[str, np.ndarray], dict[str, Path]]:
        """The arrays of the extra file ``name`` (an ``.npz``), whichever form the artifact
        ships it in, and the file each array came from (for error messages).

        Either the ``.npz`` itself (verified bytes, parsed here without pickle: every array
        in memory) or, when the manifest's ``array_files`` lists ``name``, its ``.npy``
        files, memory-mapped when the artifact loaded.

        Raises
        ------
        ArtifactError
            ``name`` is in neither form, or its ``.npz`` is not a readable archive of plain
            arrays (naming the file).
        """
        file = self.path / name
        files = self.manifest.get("array_files", {}).get(name)
        if files is not None:
            return ({key: self.mapped[f] for key, f in files.items()},
                    {key: self.path / f for key, f in files.items()})  # fmt: skip
        raw = self.extra.get(name)
        if raw is None:
            raise ArtifactError(f"{file}: missing (the manifest does not list it)")
        arrays = read_npz(raw, file)
        return arrays, dict.fromkeys(arrays, file)

    @property
    def scorer(self) -> str:
        """The serving scorer that runs this artifact (``graph`` when the manifest, like
        every artifact written before scorers existed, does not say)."""
        return str(self.manifest.get("scorer", "graph"))

    def history_of(self, user: int) -> tuple[np.ndarray, np.ndarray]:
        """The snapshot's re-buy history of ``user``: (item positions, ascending; float32
        weights), views of the CSR arrays; empty for an unknown user (-1)."""
        if user < 0:
            return self.history_indices[:0], self.history_data[:0]
        lo, hi = self.history_indptr[user], self.history_indptr[user + 1]
        return self.history_indices[lo:hi], self.history_data[lo:hi]

    def history_rows(self, users: np.ndarray) -> np.ndarray:
        """Dense re-buy rows [len(users), n_items]; zero for unknown users (-1)."""
        out = np.zeros((len(users), len(self.items.ids)), dtype=np.float32)
        for r, u in enumerate(users):
            if u >= 0:
                lo, hi = self.history_indptr[u], self.history_indptr[u + 1]
                out[r, self.history_indices[lo:hi]] = self.history_data[lo:hi]
        return out
