"""HTTP API over :class:`serving.Ranker` (FastAPI; the ``http`` extra).

Endpoints: ``POST /v1/rank``, ``POST /v1/rank/batch``, ``GET /v1/model`` (the manifest),
``GET /healthz`` (process alive), ``GET /readyz`` (a model is loaded), and the OpenAPI schema
at ``/openapi.json``. Requests are validated (422 with the field and the problem), bodies
are limited in size (413), and each request is logged as one JSON line.

Hot reload: a watcher checks the artifact's ``manifest.json`` every ``reload_interval``
seconds; a changed artifact is loaded and verified *beside* the serving one and swapped in
with one reference assignment, so requests in flight finish on the old model and none fails.
A broken new artifact is logged and the old model keeps serving.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from serving.artifact import ArtifactError
from serving.ranker import Ranker, RequestError
from serving.rules import RuleSettings

log = logging.getLogger("addons.serving")
Id = int | str


class RankRequest(BaseModel):
    """One shopper's request."""

    model_config = ConfigDict(extra="forbid")

    user_id: Id | None = None
    cart: list[Id] = Field(default_factory=list, max_length=100)
    anchor: Id | None = None
    placement: str = "cart"
    offer: str = "cross_sell"
    k: int | None = Field(default=None, ge=1, le=20)
    exclude: list[Id] = Field(default_factory=list, max_length=1000)
    history: dict[str, float] | None = Field(default=None, max_length=5000)


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    requests: list[RankRequest] = Field(max_length=1000)


class ModelHolder:
    """The serving ranker and the watcher that swaps in a new artifact."""

    def __init__(self, path: str | Path, settings: RuleSettings) -> None:
        self.path = Path(path)
        self.settings = settings
        self.ranker: Ranker | None = None
        self._stamp: float | None = None
        self._stop = threading.Event()

    def _manifest_stamp(self) -> float | None:
        try:
            return (self.path / "manifest.json").stat().st_mtime_ns
        except OSError:
            return None

    def load(self) -> None:
        stamp = self._manifest_stamp()
        ranker = Ranker.load(self.path, self.settings)  # verified before it can serve
        self.ranker, self._stamp = ranker, stamp  # the swap: one reference assignment

    def check(self) -> bool:
        """Reload if the manifest changed; True if a new model was swapped in."""
        stamp = self._manifest_stamp()
        if stamp is None or stamp == self._stamp:
            return False
        try:
            self.load()
        except (ArtifactError, OSError, ValueError) as exc:
            log.error(json.dumps({"event": "reload_failed", "error": str(exc)}))
            self._stamp = stamp  # do not retry a broken artifact until it changes again
            return False
        log.info(
            json.dumps({"event": "reloaded", "manifest": self.ranker.manifest.get("created_at")})
        )
        return True

    def watch(self, interval: float) -> None:
        def loop() -> None:
            while not self._stop.wait(interval):
                self.check()

        threading.Thread(target=loop, name="artifact-watcher", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()


def create_app(
    model: str | Path,
    settings: RuleSettings | None = None,
    reload_interval: float | None = 5.0,
    max_body_bytes: int = 1 << 20,
) -> FastAPI:
    """The FastAPI application serving the artifact at ``model``."""
    settings = settings or RuleSettings()
    holder = ModelHolder(model, settings)
    holder.load()
    if reload_interval:
        holder.watch(reload_interval)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        holder.stop()

    app = FastAPI(title="addons ranking API", version="1", description=__doc__, lifespan=lifespan)
    app.state.holder = holder

    @app.middleware("http")
    async def limit_and_log(request: Request, call_next: Any) -> Any:
        started = time.perf_counter()
        length = request.headers.get("content-length")
        if request.method == "POST" and length is None:
            # A chunked body has no length to check up front: refuse rather than read it all.
            response = JSONResponse({"detail": "Content-Length required"}, status_code=411)
        elif length is not None and (not length.isdigit() or int(length) > max_body_bytes):
            response = JSONResponse(
                {"detail": f"request body larger than {max_body_bytes} bytes"}, status_code=413
            )
        else:
            response = await call_next(request)
        log.info(json.dumps({
            "method": request.method, "path": request.url.path, "status": response.status_code,
            "ms": round((time.perf_counter() - started) * 1000, 3),
        }))  # fmt: skip
        return response

    def ranker() -> Ranker:
        current = holder.ranker
        if current is None:  # pragma: no cover - load() raised at start-up otherwise
            raise RuntimeError("no model loaded")
        return current

    def run(r: Ranker, req: RankRequest) -> dict[str, Any]:
        return r.rank(
            user_id=req.user_id, cart=req.cart, anchor=req.anchor, placement=req.placement,
            offer=req.offer, k=req.k, exclude=req.exclude, history=req.history,
        ).to_dict()  # fmt: skip

    @app.exception_handler(RequestError)
    async def bad_request(request: Request, exc: RequestError) -> JSONResponse:
        field, _, problem = str(exc).partition(": ")
        return JSONResponse({"detail": [{"loc": ["body", field], "msg": problem}]}, status_code=422)

    @app.post("/v1/rank")
    def rank(req: RankRequest) -> dict[str, Any]:
        return run(ranker(), req)

    @app.post("/v1/rank/batch")
    def rank_batch(req: BatchRequest) -> dict[str, Any]:
        r = ranker()  # one model for the whole batch, even if a reload happens meanwhile
        results = r.rank_many([one.model_dump() for one in req.requests])
        return {"results": [x.to_dict() for x in results]}

    @app.get("/v1/model")
    def model_info() -> dict[str, Any]:
        return ranker().manifest

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        ready = holder.ranker is not None
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    return app
