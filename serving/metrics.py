"""Prometheus metrics of the HTTP API (``GET /metrics``; the ``http`` extra).

One :class:`ServerMetrics` per application, on its own registry (several apps in one test
process do not collide). With ``PROMETHEUS_MULTIPROC_DIR`` set in the environment before
``prometheus_client`` is first imported (``addons serve --workers N`` does it for its
workers), prometheus_client writes every value to memory-mapped files in that folder and
``/metrics`` answers, from whichever worker takes the scrape, the values of *all* workers:
counters and histograms summed; the model gauges kept per worker (a ``pid`` label, live
workers only), since each worker reloads on its own.

Metric names (all prefixed ``addons_``):

- ``http_requests_total{method,route,status}``, ``http_request_duration_seconds{...}``
  (histogram): every answer, including 411 / 413 / 422 / 500. ``route`` is the route
  template (``/v1/rank``), ``other`` for paths the API does not have (bounded cardinality).
- ``rank_seconds{endpoint}`` (histogram): time inside the ranker (``rank`` for one request
  that the ranker answered, ``rank_batch`` per batch chunk), without HTTP parsing and
  validation.
- ``model_info{version,created_at,model_kind} = 1``: the served artifact (the previous one's
  series drops to 0 on a swap); ``version`` is the artifact folder's name (``v3`` under a
  registry cache).
- ``model_created_timestamp_seconds`` / ``model_loaded_timestamp_seconds``: when the served
  artifact was exported / swapped in; its age is ``time() - addons_model_created_timestamp_seconds``.
- ``reloads_total{result="success|failure"}``: hot reloads (the start-up load is not one).
"""

from __future__ import annotations

import os
from datetime import datetime
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

#: Latency buckets in seconds: sub-millisecond ranks up to slow batches.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def multiprocess_dir() -> str | None:
    """The folder shared by the workers' metric files, or None in single-process mode."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir")


def _timestamp(text: Any) -> float | None:
    try:
        return datetime.fromisoformat(str(text)).timestamp()
    except ValueError:
        return None


class ServerMetrics:
    """The metrics of one application and their exposition."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("addons_http_requests", "HTTP answers",
                                ["method", "route", "status"], registry=r)  # fmt: skip
        self.latency = Histogram("addons_http_request_duration_seconds",
                                 "time from request to answer, in the process",
                                 ["method", "route", "status"], buckets=BUCKETS, registry=r)  # fmt: skip
        self.rank = Histogram("addons_rank_seconds", "time inside the ranker",
                              ["endpoint"], buckets=BUCKETS, registry=r)  # fmt: skip
        self.model_info = Gauge("addons_model_info", "the served artifact (1) and replaced ones (0)",
                                ["version", "created_at", "model_kind"], registry=r,
                                multiprocess_mode="liveall")  # fmt: skip
        self.created = Gauge("addons_model_created_timestamp_seconds",
                             "export time of the served artifact", registry=r,
                             multiprocess_mode="liveall")  # fmt: skip
        self.loaded = Gauge("addons_model_loaded_timestamp_seconds",
                            "when the served artifact was swapped in", registry=r,
                            multiprocess_mode="liveall")  # fmt: skip
        self.reloads = Counter("addons_reloads", "hot reloads by result", ["result"], registry=r)
        for result in ("success", "failure"):
            self.reloads.labels(result=result)  # both series exist from the start (at 0)
        self._info: tuple[str, str, str] | None = None

    def served(self, version: str, manifest: dict[str, Any], loaded_at: float) -> None:
        """Record that the artifact ``version`` (its manifest) now serves."""
        info = (version, str(manifest.get("created_at")), str(manifest.get("model_kind")))
        if self._info is not None and self._info != info:
            self.model_info.labels(*self._info).set(0)
        self.model_info.labels(*info).set(1)
        self._info = info
        created = _timestamp(manifest.get("created_at"))
        if created is not None:
            self.created.set(created)
        self.loaded.set(loaded_at)

    def exposition(self) -> bytes:
        """The text format: this process's registry, or every worker's files in
        multiprocess mode."""
        folder = multiprocess_dir()
        if folder is None:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=folder)
        return generate_latest(registry)
