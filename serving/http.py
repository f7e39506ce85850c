"""HTTP API over :class:`serving.Ranker` (FastAPI; the ``http`` extra).

Endpoints: ``POST /v1/rank``, ``POST /v1/rank/batch``, ``GET /v1/model`` (the manifest, the
effective rules and the hot-reload status), ``GET /healthz`` (process alive), ``GET /readyz``
(a model is loaded; says when reloading fails), and the OpenAPI schema at ``/openapi.json``.

Requests are validated strictly against the schema (422 naming the field; ``"k": "5"``,
``true`` or ``1.0`` as an id are refused, integer ids must fit in a signed 64-bit integer,
history weights are finite, >= 0 and at most :data:`MAX_HISTORY_WEIGHT`); the size limits
come from the :class:`~serving.rules.RuleSettings` given to :func:`create_app`. Bodies are
limited in size (413). Each request is logged as one JSON line; an unexpected error is
logged with its traceback and answered with a generic 500 body.

Hot reload: a watcher checks the artifact's ``manifest.json`` every ``reload_interval``
seconds; a changed artifact is loaded and verified *beside* the serving one (hashes,
internal consistency, and a probe request that must give finite scores and known item ids)
and swapped in with one reference assignment, so requests in flight finish on the old model
and none fails. A candidate that fails is logged, reported by ``/v1/model`` and ``/readyz``,
and retried with exponential backoff (the reload interval doubling up to
:data:`MAX_RELOAD_BACKOFF` seconds) while the old model keeps serving; the watcher never stops.

Operations: ``GET /metrics`` answers Prometheus' text format (see :mod:`serving.metrics`).
Every log line is one JSON object with ``ts``, ``level`` and ``logger`` (see
:class:`JsonLogFormatter`); the lines written while a request is served carry its
``request_id``, which every answer echoes in the ``X-Request-ID`` header: the caller's own
id when it is well-formed (:data:`REQUEST_ID`), else a new one.

A valid ``POST /v1/rank`` is answered by a plain ASGI fast path (:class:`_FastRank`: the
route's own model and function without FastAPI's routing); every other request, refusals
included, goes through FastAPI as before.

``/v1/rank/batch`` runs its requests through the graph in chunks of :data:`BATCH_CHUNK`
rows, at most :data:`BATCH_CONCURRENCY` chunks at once in the whole process, so that many
large batches in flight cost a bounded amount of memory.
"""

from __future__ import annotations

import contextvars
import ctypes
import json
import logging
import math
import os
import re
import sys
import threading
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    WithJsonSchema,
)

from serving.artifact import ArtifactError
from serving.metrics import ServerMetrics
from serving.ranker import Ranker, RequestError
from serving.rules import OFFERS, PLACEMENTS, RuleSettings

log = logging.getLogger("addons.serving")

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
#: Longest string id accepted (ids are product codes and customer numbers, not documents).
MAX_ID_CHARS = 256
#: Largest history weight accepted: a purchase count or a recency weight, never near this;
#: a bound keeps float32 arithmetic in the graph far from overflow.
MAX_HISTORY_WEIGHT = 1e6
#: Requests of a batch that go through the graph together (dense [rows x n_items] arrays).
BATCH_CHUNK = 32
#: Batch chunks that run at once in the whole process (a process-wide limiter).
BATCH_CONCURRENCY = 2
#: Longest wait, in seconds, before a failed reload candidate is tried again.
MAX_RELOAD_BACKOFF = 60.0
#: The interpreter's thread switch interval, in seconds, while a reload candidate loads.
RELOAD_SWITCH_INTERVAL = 0.0005

_BATCH_SLOTS = threading.BoundedSemaphore(BATCH_CONCURRENCY)
_batches_lock = threading.Lock()
_batches_in_flight = 0
_INTEGER_TEXT = re.compile(r"[+-]?[0-9]+")
#: A caller's ``X-Request-ID`` that is echoed and logged as it is: 1 to 128 characters of
#: letters, digits and ``._:-`` (UUIDs, trace ids); anything else is replaced by a new id, so
#: that a log line can never be forged or bloated through this header.
REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
REQUEST_ID_HEADER = "X-Request-ID"
_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


def request_id(header: str | None) -> str:
    """The id of a request: the caller's ``X-Request-ID`` if well-formed, else a new one."""
    if header is not None and REQUEST_ID.fullmatch(header):
        return header
    return uuid.uuid4().hex


class Fields:
    """A log message that is a JSON object, rendered as text only when a handler asks for it
    (``record.getMessage()``: plain handlers, pytest's ``caplog``); :class:`JsonLogFormatter`
    takes the fields as they are. The access line is written once per request: rendering it
    to text, parsing it back and rendering it again cost more than the metrics."""

    __slots__ = ("fields",)

    def __init__(self, fields: dict[str, Any]) -> None:
        self.fields = fields

    def __str__(self) -> str:
        return json.dumps(self.fields, default=str)


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: ``ts`` (UTC, milliseconds), ``level``, ``logger``, the
    ``request_id`` of the request being served (if any), then the message's own fields when
    it is a JSON object (this module logs so, as :class:`Fields`) or ``message`` otherwise
    (uvicorn, libraries). A traceback attached to the record goes into ``exc``."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        out: dict[str, Any] = {"ts": ts, "level": record.levelname, "logger": record.name}
        rid = _request_id.get()
        if rid is not None:
            out["request_id"] = rid
        fields, message = None, ""
        if isinstance(record.msg, Fields) and not record.args:
            fields = record.msg.fields  # no text to parse back
        else:
            message = record.getMessage()
            if message.startswith("{"):
                try:
                    fields = json.loads(message)
                except ValueError:
                    fields = None
        if isinstance(fields, dict):
            out.update({k: v for k, v in fields.items() if k not in out})
        else:
            out["message"] = message
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_json_logging(level: int = logging.INFO) -> None:
    """Send every logger's records (the API's, uvicorn's, libraries') to stderr as JSON
    lines; uvicorn's own access log is left off (the API logs each request itself)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLogFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)


# An integer id: a JSON integer in the signed 64-bit range (the schema states the bounds as
# exact integers: see _exact_bounds).
IntId = Annotated[
    int,
    Field(strict=True, ge=INT64_MIN, le=INT64_MAX),
    WithJsonSchema({"type": "integer", "minimum": INT64_MIN, "maximum": INT64_MAX}),
]
StrId = Annotated[str, StringConstraints(strict=True, min_length=1, max_length=MAX_ID_CHARS)]
Id = IntId | StrId


def _history_key(key: str) -> str:
    """JSON object keys are text: an integer written as text must fit in int64 too, so that
    ``{"9223372036854775808": 1}`` is refused like the same id in ``cart``."""
    if _INTEGER_TEXT.fullmatch(key) and not INT64_MIN <= int(key) <= INT64_MAX:
        raise ValueError("an integer item id must be in the signed 64-bit range")
    return key


HistoryKey = Annotated[StrId, AfterValidator(_history_key)]
Weight = Annotated[float, Field(strict=True, ge=0, le=MAX_HISTORY_WEIGHT, allow_inf_nan=False)]


class Message(BaseModel):
    """An error that is not about a field (body too large, no Content-Length)."""

    detail: str


class ItemOut(BaseModel):
    """One offer."""

    model_config = ConfigDict(extra="allow")

    item_id: Id
    score: float
    reason: str


class RankResponse(BaseModel):
    """The offers for one request and what the caller should know about it."""

    model_config = ConfigDict(extra="allow")

    items: list[ItemOut]
    unknown_user: bool
    unknown_items: list[Id]
    model_kind: str
    notes: list[str]
    why_empty: str | None


class BatchResponse(BaseModel):
    """One result per request, in order."""

    results: list[RankResponse]


def request_models(settings: RuleSettings) -> tuple[type[BaseModel], type[BaseModel]]:
    """The request bodies of ``/v1/rank`` and ``/v1/rank/batch``, with the limits of
    ``settings`` (so the schema states the limits this server applies)."""

    class RankRequest(BaseModel):
        """One shopper's request."""

        model_config = ConfigDict(extra="forbid", strict=True)

        user_id: Id | None = None
        cart: list[Id] = Field(default_factory=list, max_length=settings.max_cart_items)
        anchor: Id | None = None
        placement: Literal[PLACEMENTS] = "cart"  # type: ignore[valid-type]
        offer: Literal[OFFERS] = "cross_sell"  # type: ignore[valid-type]
        k: Annotated[int, Field(ge=1, le=settings.max_k)] | None = None
        exclude: list[Id] = Field(default_factory=list, max_length=settings.max_exclude_items)
        history: dict[HistoryKey, Weight] | None = Field(
            default=None, max_length=settings.max_history_items
        )

    class BatchRequest(BaseModel):
        """Many requests ranked with one model (a reload meanwhile does not split them)."""

        model_config = ConfigDict(extra="forbid", strict=True)

        requests: list[RankRequest] = Field(max_length=settings.max_batch_requests)

    return RankRequest, BatchRequest


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _log(level: int, event: str, **fields: Any) -> None:
    """One JSON line; a traceback is cut to its last 20,000 characters (a deep recursion
    would otherwise log megabytes)."""
    if len(fields.get("traceback", "")) > 20_000:
        fields["traceback"] = "..." + fields["traceback"][-20_000:]
    log.log(level, Fields({"event": event, **fields}))


def _probe(ranker: Ranker) -> None:
    """Rank a known user with the first item as the cart, and an anonymous shopper, with
    the candidate model; raise :class:`ArtifactError` unless both answer with finite scores
    and item ids the artifact knows. Catches what hashes cannot: files that match their
    hashes but not each other (a graph from another export, a shorter item list)."""
    a = ranker.artifact
    first_user = a.users.ids[0].item() if len(a.users.ids) else None
    first_item = [a.items.ids[0].item()] if len(a.items.ids) else []
    requests = [{"user_id": first_user, "cart": first_item}, {}]
    try:
        results = [*ranker.rank_many(requests), ranker.rank()]
    except Exception as exc:
        raise ArtifactError(
            f"{a.path}: the probe request failed ({type(exc).__name__}: {exc})"
        ) from exc
    for result in results:
        ids = [i.item_id for i in result.items]
        bad = [i.score for i in result.items if not math.isfinite(i.score)]
        unknown = a.items.lookup(ids)[1] if ids else []
        if bad or unknown:
            raise ArtifactError(
                f"{a.path}: the probe request gave "
                + (f"non-finite scores {bad[:3]}" if bad else f"unknown item ids {unknown[:3]}")
            )


_switch_lock = threading.Lock()
_switch_users = 0  # blocks inside _short_gil_slices (guarded by _switch_lock)
_switch_saved = 0.005


@contextmanager
def _short_gil_slices() -> Iterator[None]:
    """Run the block with the interpreter's thread switch interval cut to
    :data:`RELOAD_SWITCH_INTERVAL` (default 5 ms), then put it back.

    Loading a candidate in the watcher thread is pure-Python work for a second or more (id
    tables, checks): with the default interval, the event loop waits up to 5 ms for the GIL
    each time it takes it back (after every socket wait), several times per request, so every
    answer during a reload got tens of milliseconds slower. The interval is process-wide, so
    it is cut only while a candidate loads; with several watchers in one process (tests,
    several apps), the first to start saves the interval and the last to finish restores it."""
    global _switch_saved, _switch_users
    with _switch_lock:
        if _switch_users == 0:
            _switch_saved = sys.getswitchinterval()
            sys.setswitchinterval(min(_switch_saved, RELOAD_SWITCH_INTERVAL))
        _switch_users += 1
    try:
        yield
    finally:
        with _switch_lock:
            _switch_users -= 1
            if _switch_users == 0:
                sys.setswitchinterval(_switch_saved)


class ModelHolder:
    """The serving ranker and the watcher that swaps in a new artifact.

    ``check()`` loads a changed artifact (its ``manifest.json`` has another inode, mtime or
    size) beside the serving one, probes it, and swaps it in. A failed candidate is retried
    with backoff even if its manifest does not change again (a copy that wrote the manifest
    first and the other files later succeeds on a retry).
    """

    def __init__(
        self,
        path: str | Path,
        settings: RuleSettings,
        trusted_keys: Sequence[str | Path] | None = None,
        max_backoff: float = MAX_RELOAD_BACKOFF,
        metrics: ServerMetrics | None = None,
    ) -> None:
        self.path = Path(path)
        self.metrics = metrics
        self.settings = settings
        self.trusted_keys = trusted_keys
        self.max_backoff = max_backoff
        self.ranker: Ranker | None = None
        self.interval: float | None = None
        self._stamp: tuple[int, ...] | None = None
        self._served: dict[str, Any] | None = None
        self._error: dict[str, Any] | None = None
        self._failed_stamp: tuple[int, ...] | None = None
        self._retry_at = 0.0
        self._backoff = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def _manifest_stamp(self) -> tuple[int, ...] | None:
        try:
            st = (self.path / "manifest.json").stat()  # follows a `current` symlink
        except OSError:
            return None
        return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)

    def _candidate(self) -> Ranker:
        """Load and verify the artifact (hashes, consistency, signature) and probe it."""
        kwargs: dict[str, Any] = {}
        if self.trusted_keys is not None:  # only when set: works with any Ranker.load
            kwargs["trusted_keys"] = self.trusted_keys
        ranker = Ranker.load(self.path, self.settings, **kwargs)
        _probe(ranker)
        return ranker

    def load(self) -> None:
        """Load the artifact now (start-up); raises :class:`ArtifactError` if it is bad."""
        stamp = self._manifest_stamp()
        ranker = self._candidate()
        self._swap(ranker, stamp)

    def _swap(self, ranker: Ranker, stamp: tuple[int, ...] | None) -> None:
        mtime = None if stamp is None else datetime.fromtimestamp(stamp[2] / 1e9, UTC)
        self._served = {
            "path": str(self.path),
            "created_at": ranker.manifest.get("created_at"),
            "model_kind": ranker.manifest.get("model_kind"),
            "manifest_mtime": None if mtime is None else mtime.isoformat(),
            "loaded_at": _now(),
        }
        self._error, self._failed_stamp, self._backoff = None, None, 0.0
        # The swap (one reference assignment) comes after the status: whoever sees the new
        # model also sees its status, never the last failed candidate's error.
        self.ranker, self._stamp = ranker, stamp
        if self.metrics is not None:
            # the folder the path points at now (a registry cache's `current` -> `v3`)
            version = Path(os.path.realpath(self.path)).name
            self.metrics.served(version, ranker.manifest, time.time())

    def check(self) -> bool:
        """Reload if the manifest changed (or a failed candidate is due for a retry); True
        if a new model was swapped in. Never raises: a failure is logged and recorded."""
        with self._lock:
            stamp = self._manifest_stamp()
            if stamp is None:  # the folder is being replaced: look again next time
                return False
            if stamp == self._stamp:
                self._error = self._failed_stamp = None  # the served artifact came back
                return False
            now = time.monotonic()
            if stamp == self._failed_stamp and now < self._retry_at:
                return False
            try:
                with _short_gil_slices():
                    ranker = self._candidate()
            except Exception as exc:  # any error of any candidate: the old model keeps serving
                self._failed(stamp, exc, now)
                return False
            self._swap(ranker, stamp)
            if self.metrics is not None:
                self.metrics.reloads.labels(result="success").inc()
            _log(logging.INFO, "reloaded", **self._served)  # type: ignore[arg-type]
            return True

    def _failed(self, stamp: tuple[int, ...], exc: Exception, now: float) -> None:
        base = self.interval or 0.0
        if stamp != self._failed_stamp:  # a new candidate: start the backoff again
            self._backoff, attempts = base, 1
        else:
            self._backoff = min(max(self._backoff * 2, base), self.max_backoff)
            attempts = (self._error or {}).get("attempts", 0) + 1
        self._failed_stamp, self._retry_at = stamp, now + self._backoff
        if self.metrics is not None:
            self.metrics.reloads.labels(result="failure").inc()
        message = f"{type(exc).__name__}: {exc}"
        self._error = {
            "error": message if len(message) <= 1000 else message[:1000] + "...",
            "at": _now(),
            "attempts": attempts,
            "retry_in_s": round(self._backoff, 3),
        }
        _log(logging.ERROR, "reload_failed", path=str(self.path), attempts=attempts,
             error=message, traceback=traceback.format_exc())  # fmt: skip

    def status(self) -> dict[str, Any]:
        """The hot-reload state: what is served, and the last failed reload (or None)."""
        return {
            "pid": os.getpid(),  # which worker answered (addons serve --workers N)
            "interval_s": self.interval,
            "serving": self._served,
            "failing": self._error is not None,
            "last_error": self._error,
        }

    def watch(self, interval: float) -> None:
        """Check every ``interval`` seconds in a daemon thread until :meth:`stop`."""
        self.interval = interval

        def loop() -> None:
            while not self._stop.wait(interval):
                try:
                    self.check()
                except Exception as exc:  # the watcher must never die (check() should not raise)
                    _log(logging.ERROR, "watcher_error", error=repr(exc),
                         traceback=traceback.format_exc())  # fmt: skip

        threading.Thread(target=loop, name="artifact-watcher", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()


class _BatchItemError(Exception):
    """A :class:`RequestError` of request ``index`` of a batch."""

    def __init__(self, index: int, error: RequestError) -> None:
        super().__init__(str(error))
        self.index, self.error = index, error


def _malloc_trim() -> None:
    """Give freed heap memory back to the system (glibc only; elsewhere a no-op): a large
    batch's arrays are freed into malloc's arenas, which would otherwise keep them."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


@contextmanager
def _batch_running(large: bool) -> Iterator[None]:
    """Count batches in flight; the last one to finish trims the heap if it was ``large``
    (a trim costs a walk over the heap: not worth it after a few requests)."""
    global _batches_in_flight
    with _batches_lock:
        _batches_in_flight += 1
    try:
        yield
    finally:
        with _batches_lock:
            _batches_in_flight -= 1
            last = _batches_in_flight == 0
        if last and large and os.name == "posix":
            _malloc_trim()


def _exact_bounds(node: Any) -> None:
    """Write the schema's numeric bounds as exact integers, in place.

    FastAPI's OpenAPI model holds ``minimum`` / ``maximum`` as floats, and the float
    nearest to the int64 maximum 2**63 - 1 is 2**63: the published schema would then allow
    the first id that does not fit. Integral bounds are written as integers; the int64
    bounds (the only ones this large here) as their exact values."""
    if isinstance(node, dict):
        for key in ("minimum", "maximum"):
            value = node.get(key)
            if isinstance(value, float) and value.is_integer():
                node[key] = min(max(int(value), INT64_MIN), INT64_MAX)
        for child in node.values():
            _exact_bounds(child)
    elif isinstance(node, list):
        for child in node:
            _exact_bounds(child)


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class _Guard:
    """The ASGI middleware around every request: the body-size gate (411 / 413), the request
    id (``X-Request-ID`` in and out, and in every log line written meanwhile), a generic 500
    for an unexpected error (logged with its traceback), the metrics and the access log."""

    def __init__(self, app: Any, metrics: ServerMetrics, max_body_bytes: int,
                 routes: set[str]) -> None:  # fmt: skip
        self.app, self.metrics, self.routes = app, metrics, routes
        self.max_body_bytes = max_body_bytes
        self._series: dict[tuple[str, str, str], tuple[Any, Any]] = {}  # bounded: see _count

    def _count(self, method: str, path: str, status: int, seconds: float) -> None:
        """Count one answer. Label values are bounded (known routes and methods, else
        ``other``) so that no request can create series; each series' children are looked
        up once (prometheus_client's ``labels()`` takes a lock and builds a key each call)."""
        key = (method if method in _METHODS else "other",
               path if path in self.routes else "other", str(status))  # fmt: skip
        children = self._series.get(key)
        if children is None:
            children = (self.metrics.requests.labels(*key), self.metrics.latency.labels(*key))
            self._series[key] = children
        children[0].inc()
        children[1].observe(seconds)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        header = headers.get(b"x-request-id")
        rid = request_id(None if header is None else header.decode("latin-1"))
        method, path = scope["method"], scope["path"]
        answer = {"status": 500, "started": False}

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                answer["status"], answer["started"] = message["status"], True
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", rid.encode())]}  # fmt: skip
            await send(message)

        token = _request_id.set(rid)  # copied into the endpoint's task and thread
        try:
            raw = headers.get(b"content-length")
            length = None if raw is None else raw.decode("latin-1")
            if method == "POST" and length is None:
                # A chunked body has no length to check up front: refuse rather than read it.
                refusal = JSONResponse({"detail": "Content-Length required"}, status_code=411)
            elif length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
                refusal = JSONResponse(
                    {"detail": f"request body larger than {self.max_body_bytes} bytes"},
                    status_code=413,
                )
            else:
                refusal = None
            if refusal is not None:
                await refusal(scope, receive, send_with_id)
            else:
                try:
                    await self.app(scope, receive, send_with_id)
                except Exception as exc:  # a bug: log it in full, tell the caller nothing internal
                    _log(logging.ERROR, "server_error", method=method, path=path,
                         error=repr(exc)[:1000], traceback=traceback.format_exc())  # fmt: skip
                    if answer["started"]:  # too late for a 500: the connection just ends
                        answer["status"] = 500
                    else:
                        error = JSONResponse({"detail": "internal server error"}, status_code=500)
                        await error(scope, receive, send_with_id)
        finally:
            _request_id.reset(token)
        seconds = time.perf_counter() - started
        status = answer["status"]
        self._count(method, path, status, seconds)
        log.log(
            logging.ERROR if status >= 500 else logging.INFO,
            Fields({"method": method, "path": path, "status": status,
                    "ms": round(seconds * 1000, 3), "request_id": rid}),
        )  # fmt: skip


def _is_json(content_type: bytes | None) -> bool:
    """``Content-Type: application/json`` (parameters such as ``charset`` allowed)."""
    if content_type is None:
        return False
    return content_type.split(b";", 1)[0].strip().lower() == b"application/json"


class _FastRank:
    """``POST /v1/rank`` answered without FastAPI's routing, dependency solving and request
    wrappers (a third of the HTTP layer's time per request: see docs/serving.md, "HTTP under
    load"), for the requests that are fine. The body is parsed as Starlette does
    (``json.loads``), validated by the route's own request model and ranked by the route's
    own function; anything else (another content type, a body that is not JSON or fails the
    model, a :class:`RequestError` of the ranker) is handed to the FastAPI route with the
    body it sent, unchanged, so every refusal keeps the one code path, status and body it
    had. An unexpected error of the ranker propagates to :class:`_Guard` (a logged 500), as
    it does from the route.
    """

    def __init__(self, app: Any, path: str, model: type[BaseModel],
                 answer: Any) -> None:  # fmt: skip
        self.app, self.path, self.model, self.answer = app, path, model, answer

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if (scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != self.path
                or scope.get("root_path")):  # fmt: skip
            await self.app(scope, receive, send)
            return
        content_type = next((v for k, v in scope["headers"] if k.lower() == b"content-type"), None)
        if not _is_json(content_type):
            await self.app(scope, receive, send)
            return
        received = []
        while True:
            message = await receive()
            received.append(message)
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        answer = None
        if message["type"] == "http.request":  # else the client left: the route sees it
            body = b"".join(m.get("body", b"") for m in received)
            try:
                req = self.model.model_validate(json.loads(body))
            except Exception:  # not JSON, too deep, fails the model: the route says why
                req = None
            if req is not None:
                try:
                    answer = self.answer(req)
                except RequestError:  # the route's exception handler words the 422
                    answer = None
        if answer is None:
            await self.app(scope, _replay(received, receive), send)
            return
        await JSONResponse(answer)(scope, receive, send)


def _replay(messages: list[dict], receive: Any) -> Any:
    """A ``receive`` that gives ``messages`` again, then reads on from ``receive``."""
    pending = list(messages)

    async def replayed() -> dict:
        return pending.pop(0) if pending else await receive()

    return replayed


def _error_body(loc: Sequence[Any], msg: str, type_: str) -> dict[str, Any]:
    return {"loc": list(loc), "msg": msg, "type": type_}


def create_app(
    model: str | Path,
    settings: RuleSettings | None = None,
    reload_interval: float | None = 5.0,
    max_body_bytes: int = 1 << 20,
    trusted_keys: Sequence[str | Path] | None = None,
) -> FastAPI:
    """The FastAPI application serving the artifact at ``model``.

    Parameters
    ----------
    model : the artifact directory (may be a symlink such as a registry ``current`` link).
    settings : the business rules and request limits (default :class:`RuleSettings`).
    reload_interval : seconds between hot-reload checks; None or 0 disables the watcher.
    max_body_bytes : larger request bodies get 413.
    trusted_keys : Ed25519 public key files; given, every load and reload requires a valid
        signature (see :mod:`serving.signing`).

    Raises
    ------
    ArtifactError
        The artifact cannot be loaded or fails the probe request.
    """
    settings = settings or RuleSettings()
    RankRequest, BatchRequest = request_models(settings)
    metrics = ServerMetrics()
    routes: set[str] = set()  # filled once every route exists (read per request)
    holder = ModelHolder(model, settings, trusted_keys, metrics=metrics)
    holder.load()
    if reload_interval:
        holder.watch(reload_interval)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        holder.stop()

    app = FastAPI(title="addons ranking API", version="1", description=__doc__, lifespan=lifespan)
    app.state.holder = holder
    app.state.metrics = metrics

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            _exact_bounds(FastAPI.openapi(app))  # built once and cached by FastAPI
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]
    post_errors: dict[int | str, dict[str, Any]] = {
        400: {"model": Message, "description": "The body cannot be decoded (not UTF-8 JSON)"},
        411: {"model": Message, "description": "No Content-Length (chunked bodies are refused)"},
        413: {"model": Message, "description": f"Body larger than {max_body_bytes} bytes"},
    }

    def ranker() -> Ranker:
        current = holder.ranker
        if current is None:  # pragma: no cover - load() raised at start-up otherwise
            raise RuntimeError("no model loaded")
        return current

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # The published shape (loc, msg, type) without pydantic's `input` / `ctx`: they echo
        # the request (up to a whole batch) and may hold NaN, which JSON cannot encode.
        detail = [_error_body(e["loc"], str(e["msg"]), str(e["type"])) for e in exc.errors()]
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(RequestError)
    async def bad_request(request: Request, exc: RequestError) -> JSONResponse:
        field, _, problem = str(exc).partition(": ")
        body = _error_body(["body", field], problem or str(exc), "value_error")
        return JSONResponse({"detail": [body]}, status_code=422)

    @app.exception_handler(_BatchItemError)
    async def bad_batch_item(request: Request, exc: _BatchItemError) -> JSONResponse:
        field, _, problem = str(exc.error).partition(": ")
        loc = ["body", "requests", exc.index, field]
        return JSONResponse(
            {"detail": [_error_body(loc, problem or str(exc), "value_error")]}, status_code=422
        )

    rank_timer = metrics.rank.labels("rank")

    def rank_one(req: Any) -> dict[str, Any]:
        # Only a rank that answers is timed: a request the ranker refuses is tried by
        # _FastRank, then once more by the route, which words the 422 (not counted twice).
        started = time.perf_counter()
        result = ranker().rank(**req.model_dump())
        rank_timer.observe(time.perf_counter() - started)
        return result.to_dict()  # already the published shape (RankResponse)

    async def rank(req: Any) -> JSONResponse:
        # Ranked on the event loop, answered as JSON directly: a sync endpoint costs FastAPI
        # several thread-pool hops per request (the call, then validating and serializing
        # the answer), more than the rank itself. Requests that pass are answered by
        # _FastRank before they get here; this route answers the others (and the schema).
        return JSONResponse(rank_one(req))

    # Plain ASGI middlewares (Starlette's @app.middleware("http") runs every request through
    # an extra task and memory streams); the last added is the outermost: _Guard wraps all.
    app.add_middleware(_FastRank, path="/v1/rank", model=RankRequest, answer=rank_one)
    app.add_middleware(_Guard, metrics=metrics, max_body_bytes=max_body_bytes, routes=routes)

    def rank_batch(req: Any) -> dict[str, Any]:
        r = ranker()  # one model for the whole batch, even if a reload happens meanwhile
        requests = req.requests
        results: list[dict[str, Any]] = []
        with _batch_running(large=len(requests) > BATCH_CHUNK):
            for start in range(0, len(requests), BATCH_CHUNK):
                chunk = [one.model_dump() for one in requests[start : start + BATCH_CHUNK]]
                # Few rows at a time, few chunks at once: the dense [rows x n_items] arrays
                # of every batch in flight stay small.
                with _BATCH_SLOTS, metrics.rank.labels("rank_batch").time():
                    try:
                        done = r.rank_many(chunk, batch_size=BATCH_CHUNK)
                    except RequestError as exc:
                        raise _locate(r, chunk, start) or exc from None
                results += [x.to_dict() for x in done]
        return {"results": results}

    # The body types are made above, per settings: set them as objects, not as the string
    # annotations FastAPI would look up among this module's globals.
    rank.__annotations__["req"], rank_batch.__annotations__["req"] = RankRequest, BatchRequest
    app.post("/v1/rank", response_model=RankResponse, responses=post_errors)(rank)
    app.post("/v1/rank/batch", response_model=BatchResponse, responses=post_errors)(rank_batch)

    @app.get("/v1/model")
    def model_info() -> dict[str, Any]:
        """The served manifest, the effective rules and the hot-reload status."""
        return {**ranker().manifest, "rules": settings.to_dict(), "reload": holder.status()}

    @app.get("/metrics", response_class=Response)
    def prometheus_metrics() -> Response:
        """Prometheus text format: request counts and latencies per route and status, time
        inside the ranker, the served model's version and age, hot reloads by result."""
        return Response(metrics.exposition(), media_type=metrics.content_type)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        """200 while a model serves, even if reloading a newer one fails (then
        ``reload.failing`` is true and ``reload.last_error`` says why)."""
        ready = holder.ranker is not None
        status = holder.status()
        body = {"ready": ready, "reload": {"failing": status["failing"],
                                           "last_error": status["last_error"]}}  # fmt: skip
        return JSONResponse(body, status_code=200 if ready else 503)

    routes.update(r.path for r in app.routes if isinstance(getattr(r, "path", None), str))
    return app


def _locate(r: Ranker, chunk: list[dict[str, Any]], start: int) -> _BatchItemError | None:
    """Which request of a chunk the ranker refused (only on the error path: one at a time)."""
    for i, one in enumerate(chunk):
        try:
            r.rank(**one)
        except RequestError as exc:
            return _BatchItemError(start + i, exc)
    return None
