"""Serving operations (issue 12, "Serving many requests"): ``GET /metrics`` (Prometheus),
JSON logs with a request id echoed in ``X-Request-ID``, and ``addons serve --workers N``
(real processes on loopback: every worker answers, the metrics of all workers are
aggregated, and each worker follows a reload on its own).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

import serving.http as http
from features.cleaning import CleaningConfig
from features.dataset import build_dataset
from serving.rules import RuleSettings
from tests.conftest import make_raw
from tests.processes import free_port, stop
from tests.test_hardening_http import wait_for
from tests.test_http import ITEMS, ROWS
from training.config import ModelConfig, build_model
from training.export import export_model

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$"
)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ops-artifacts")
    data = build_dataset(make_raw(ROWS, ITEMS), CleaningConfig())
    out = {}
    for kind in ("cooccurrence", "popularity"):
        out[kind] = export_model(build_model(ModelConfig(kind, {})).fit(data), data, root / kind)
    return out


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """The samples of a Prometheus text exposition: (name, labels, value)."""
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m["labels"] or ""))
        out.append((m["name"], labels, float(m["value"])))
    return out


def value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    found = [v for n, lab, v in samples(text) if n == name and labels.items() <= lab.items()]
    assert found, f"no sample {name}{labels}"
    return sum(found)


def point(link: Path, target: Path) -> None:
    """Point the symlink ``link`` at ``target`` atomically (as the registry cache does)."""
    tmp = link.with_name(f".{link.name}.{time.monotonic_ns()}")
    tmp.symlink_to(target)
    os.replace(tmp, link)


# -- /metrics in one process ------------------------------------------------------------------


def test_metrics_count_requests_per_route_and_status_and_time_the_ranker(artifacts) -> None:
    app = http.create_app(artifacts["cooccurrence"], RuleSettings(), reload_interval=None)
    with TestClient(app) as c:
        for _ in range(3):
            assert c.post("/v1/rank", json={"user_id": 1, "cart": [1]}).status_code == 200
        assert c.post("/v1/rank", json={"k": 0}).status_code == 422
        assert c.post("/v1/rank/batch", json={"requests": [{}, {"cart": [2]}]}).status_code == 200
        assert c.get("/no/such/path/123").status_code == 404
        assert c.request("BREWCOFFEE", "/healthz").status_code == 405
        r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    total = "addons_http_requests_total"
    assert value(text, total, method="POST", route="/v1/rank", status="200") == 3
    assert value(text, total, method="POST", route="/v1/rank", status="422") == 1
    assert value(text, total, route="/v1/rank/batch", status="200") == 1
    # an unknown path is counted under one label value, never under its own text
    assert value(text, total, route="other", status="404") == 1
    assert "/no/such/path" not in text
    assert value(text, total, method="other", route="/healthz", status="405") == 1
    assert "BREWCOFFEE" not in text
    duration = "addons_http_request_duration_seconds_count"
    assert value(text, duration, route="/v1/rank", status="200") == 3
    # the ranker ran 3 times for /v1/rank (the 422 never reached it) and once for the batch
    assert value(text, "addons_rank_seconds_count", endpoint="rank") == 3
    assert value(text, "addons_rank_seconds_count", endpoint="rank_batch") == 1
    assert value(text, "addons_rank_seconds_sum", endpoint="rank") > 0


def test_metrics_report_the_served_model_and_reloads(artifacts, tmp_path) -> None:
    for kind in ("cooccurrence", "popularity"):
        shutil.copytree(artifacts[kind], tmp_path / kind)
    link = tmp_path / "current"
    point(link, tmp_path / "cooccurrence")
    app = http.create_app(link, RuleSettings(), reload_interval=None)
    holder = app.state.holder
    with TestClient(app) as c:
        text = c.get("/metrics").text
        manifest = c.get("/v1/model").json()
        assert value(text, "addons_model_info", version="cooccurrence",
                     model_kind="cooccurrence", created_at=manifest["created_at"]) == 1  # fmt: skip
        created = value(text, "addons_model_created_timestamp_seconds")
        assert created == http.datetime.fromisoformat(manifest["created_at"]).timestamp()
        assert value(text, "addons_reloads_total", result="success") == 0
        # a good new version: one success, the old series drops to 0, the new one is 1
        point(link, tmp_path / "popularity")
        assert holder.check() is True
        text = c.get("/metrics").text
        assert value(text, "addons_reloads_total", result="success") == 1
        assert value(text, "addons_model_info", version="popularity", model_kind="popularity") == 1
        assert value(text, "addons_model_info", version="cooccurrence") == 0
        # a broken version: one failure, the served model stays
        broken = tmp_path / "broken"
        shutil.copytree(artifacts["cooccurrence"], broken)
        (broken / "model.onnx").write_bytes(b"not onnx")
        point(link, broken)
        assert holder.check() is False
        text = c.get("/metrics").text
        assert value(text, "addons_reloads_total", result="failure") == 1
        assert value(text, "addons_reloads_total", result="success") == 1
        assert value(text, "addons_model_info", version="popularity") == 1


# -- request ids and JSON logs ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("sent", "echoed"),
    [("req-42.a:b_c", True), ("0f8fad5b-d9cb-469f-a165-70867728950e", True),
     ("x" * 129, False), ("has space", False), ("<script>", False), ("", False)],
)  # fmt: skip
def test_request_id_is_echoed_when_well_formed_else_replaced(
    artifacts, caplog, sent, echoed
) -> None:
    app = http.create_app(artifacts["cooccurrence"], RuleSettings(), reload_interval=None)
    with caplog.at_level(logging.INFO, logger="addons.serving"), TestClient(app) as c:
        r = c.post("/v1/rank", json={"cart": [1]}, headers={"X-Request-ID": sent})
    rid = r.headers["X-Request-ID"]
    assert (rid == sent) is echoed
    if not echoed:
        assert re.fullmatch(r"[0-9a-f]{32}", rid)
    line = next(json.loads(x.getMessage()) for x in caplog.records
                if x.getMessage().startswith('{"method"'))  # fmt: skip
    assert line["request_id"] == rid and line["status"] == 200


def test_every_answer_gets_its_own_request_id_even_refusals(artifacts) -> None:
    app = http.create_app(artifacts["cooccurrence"], RuleSettings(), reload_interval=None,
                          max_body_bytes=100)  # fmt: skip
    with TestClient(app) as c:
        answers = [c.get("/healthz"), c.post("/v1/rank", json={"k": "5"}),
                   c.post("/v1/rank", content=b"{" + b" " * 200 + b"}",
                          headers={"content-type": "application/json"})]  # fmt: skip
    assert [a.status_code for a in answers] == [200, 422, 413]
    ids = [a.headers["X-Request-ID"] for a in answers]
    assert len(set(ids)) == 3


def test_json_log_formatter_has_time_level_and_the_request_id() -> None:
    formatter = http.JsonLogFormatter()
    record = logging.LogRecord("uvicorn.error", logging.WARNING, __file__, 1, "plain %s", ("text",),
                               None)  # fmt: skip
    out = json.loads(formatter.format(record))
    assert out["level"] == "WARNING" and out["logger"] == "uvicorn.error"
    assert out["message"] == "plain text" and "request_id" not in out
    assert http.datetime.fromisoformat(out["ts"]).tzinfo is not None
    token = http._request_id.set("abc")
    try:
        record = logging.LogRecord("addons.serving", logging.ERROR, __file__, 1,
                                   json.dumps({"event": "x", "level": "forged"}), (), None)  # fmt: skip
        out = json.loads(formatter.format(record))
    finally:
        http._request_id.reset(token)
    # the message's fields are merged, but cannot overwrite the record's own
    assert out["event"] == "x" and out["level"] == "ERROR" and out["request_id"] == "abc"


def test_json_log_formatter_takes_fields_as_they_are(monkeypatch) -> None:
    # the access line is a Fields message: rendered once by the formatter, never parsed back
    # from text (a plain handler or caplog still gets the JSON text from getMessage())
    fields = {"method": "POST", "path": "/v1/rank", "status": 200, "request_id": "r1"}
    record = logging.LogRecord("addons.serving", logging.INFO, __file__, 1, http.Fields(fields),
                               (), None)  # fmt: skip
    assert json.loads(record.getMessage()) == fields

    def no_parsing(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the formatter parsed a Fields message back from text")

    monkeypatch.setattr(http.json, "loads", no_parsing)
    out = json.JSONDecoder().decode(http.JsonLogFormatter().format(record))
    assert {k: out[k] for k in fields} == fields and out["level"] == "INFO"


def test_a_reload_candidate_loads_with_short_gil_slices_then_the_interval_is_restored(
    artifacts, tmp_path, monkeypatch
) -> None:
    # the watcher thread's pure-Python load must hand the GIL back to the event loop quickly
    for kind in ("cooccurrence", "popularity"):
        shutil.copytree(artifacts[kind], tmp_path / kind)
    link = tmp_path / "current"
    point(link, tmp_path / "cooccurrence")
    holder = http.ModelHolder(link, RuleSettings())
    holder.load()
    before, seen = sys.getswitchinterval(), []
    candidate = holder._candidate

    def recording() -> Any:
        seen.append(sys.getswitchinterval())
        return candidate()

    monkeypatch.setattr(holder, "_candidate", recording)
    point(link, tmp_path / "popularity")
    assert holder.check() is True
    shutil.copytree(artifacts["cooccurrence"], tmp_path / "broken")
    (tmp_path / "broken" / "model.onnx").write_bytes(b"not onnx")
    point(link, tmp_path / "broken")  # a failing candidate restores the interval too
    assert holder.check() is False
    assert seen == [http.RELOAD_SWITCH_INTERVAL] * 2
    assert sys.getswitchinterval() == before


# -- POST /v1/rank's fast path (serving.http._FastRank) ----------------------------------------


def _count_route_calls(app: Any, path: str) -> list[int]:
    """Wrap the FastAPI route of ``POST path`` so that the test sees each call reaching it."""
    route = next(r for r in app.routes if getattr(r, "path", None) == path
                 and "POST" in getattr(r, "methods", ()))  # fmt: skip
    calls, inner = [0], route.app

    async def counted(scope: Any, receive: Any, send: Any) -> None:
        calls[0] += 1
        await inner(scope, receive, send)

    route.app = counted
    return calls


# FastAPI reads a body as JSON for `application/json` and for any `application/...+json`; the
# fast path takes only the first: the same body under the second is the route's own answer.
VIA_ROUTE = {"content-type": "application/vnd.addons+json"}
JSON = {"content-type": "application/json"}


@pytest.mark.parametrize(
    "body",
    [{"user_id": 1, "cart": [1], "k": 2}, {"user_id": 999, "cart": [1, 77]}, {},
     {"user_id": "x", "cart": [1], "exclude": [3], "history": {"2": 1.5, "4": 0}, "k": 3},
     {"anchor": 1, "placement": "product", "offer": "up_sell"}],
)  # fmt: skip
def test_valid_rank_requests_skip_the_route_with_the_routes_answer(artifacts, body) -> None:
    app = http.create_app(artifacts["cooccurrence"], RuleSettings(), reload_interval=None)
    calls = _count_route_calls(app, "/v1/rank")
    content = json.dumps(body).encode()
    with TestClient(app) as c:
        fast = c.post("/v1/rank", content=content, headers=JSON)
        assert calls[0] == 0  # answered before FastAPI's routing
        routed = c.post("/v1/rank", content=content, headers=VIA_ROUTE)
        assert calls[0] == 1
        text = c.get("/metrics").text
    assert fast.status_code == routed.status_code == 200
    assert fast.content == routed.content  # the same bytes
    assert fast.headers["content-type"] == routed.headers["content-type"]
    assert fast.headers["X-Request-ID"] != routed.headers["X-Request-ID"]
    assert value(text, "addons_rank_seconds_count", endpoint="rank") == 2
    assert value(text, "addons_http_requests_total", route="/v1/rank", status="200") == 2


@pytest.mark.parametrize(
    "content",
    [b'{"k": 0}', b'{"k": "5"}', b'{"user_id": 9223372036854775808}', b'{"colour": 1}',
     b'{"history": {"1": NaN}}', b"[1]", b"null", b"not json", b'{"cart": [1]',
     b"\xff\xfe{}", b"[" * 100_000],
)  # fmt: skip
def test_refused_rank_requests_get_the_routes_answer(artifacts, content) -> None:
    app = http.create_app(artifacts["cooccurrence"], RuleSettings(), reload_interval=None)
    calls = _count_route_calls(app, "/v1/rank")
    with TestClient(app) as c:
        fast = c.post("/v1/rank", content=content, headers=JSON)
        routed = c.post("/v1/rank", content=content, headers=VIA_ROUTE)
        plain = c.post("/v1/rank", content=content, headers={"content-type": "text/plain"})
    assert calls[0] == 3  # every refusal is the route's
    assert fast.status_code == routed.status_code and fast.status_code in (400, 422)
    assert fast.json() == routed.json()
    assert plain.status_code == 422  # not read as JSON at all, as before


def test_a_ranker_refusal_on_the_fast_path_is_the_routes_422(artifacts, monkeypatch) -> None:
    app = http.create_app(artifacts["cooccurrence"], RuleSettings(), reload_interval=None)
    calls = _count_route_calls(app, "/v1/rank")

    def refuse(**kwargs: Any) -> None:
        raise http.RequestError("cart: a refusal only the ranker knows")

    monkeypatch.setattr(app.state.holder.ranker, "rank", refuse)
    with TestClient(app) as c:
        r = c.post("/v1/rank", json={"cart": [1]})
        text = c.get("/metrics").text
    assert calls[0] == 1 and r.status_code == 422
    assert r.json()["detail"] == [{"loc": ["body", "cart"], "type": "value_error",
                                   "msg": "a refusal only the ranker knows"}]  # fmt: skip
    # tried twice (fast path, then the route) but a refusal is not a timed rank
    assert value(text, "addons_rank_seconds_count", endpoint="rank") == 0
    assert value(text, "addons_http_requests_total", route="/v1/rank", status="422") == 1


def test_an_unexpected_error_on_the_fast_path_is_a_logged_500(artifacts, monkeypatch,
                                                              caplog) -> None:  # fmt: skip
    app = http.create_app(artifacts["cooccurrence"], RuleSettings(), reload_interval=None)
    calls = _count_route_calls(app, "/v1/rank")

    def bug(**kwargs: Any) -> None:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(app.state.holder.ranker, "rank", bug)
    with caplog.at_level(logging.INFO, logger="addons.serving"):
        with TestClient(app, raise_server_exceptions=False) as c:
            r = c.post("/v1/rank", json={"cart": [1]}, headers={"X-Request-ID": "bug-1"})
    assert calls[0] == 0  # not run twice through the route
    assert r.status_code == 500 and r.json() == {"detail": "internal server error"}
    assert r.headers["X-Request-ID"] == "bug-1"
    lines = [json.loads(x.getMessage()) for x in caplog.records if x.name == "addons.serving"]
    error = next(x for x in lines if x.get("event") == "server_error")
    assert "ZeroDivisionError" in error["traceback"]


# -- addons serve --workers N: real processes --------------------------------------------------


def test_workers_below_one_is_refused(artifacts) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "training.cli", "serve", "--model", str(artifacts["popularity"]),
         "--workers", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 2 and "--workers" in proc.stderr


def test_two_workers_both_answer_share_metrics_and_each_follows_a_reload(
    artifacts, tmp_path
) -> None:
    for kind in ("cooccurrence", "popularity"):
        shutil.copytree(artifacts[kind], tmp_path / kind)
    link = tmp_path / "current"
    point(link, tmp_path / "cooccurrence")
    port = free_port()
    log_path = tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update(OPENBLAS_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    with log_path.open("w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "training.cli", "serve", "--model", str(link),
             "--port", str(port), "--reload-interval", "0.2", "--workers", "2"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"

    def get(path: str, **kw: Any) -> httpx.Response | None:
        assert server.poll() is None, log_path.read_text()[-3000:]
        try:  # a new connection each time: the kernel hands it to either worker
            return httpx.get(f"{base}{path}", timeout=5, **kw)
        except httpx.HTTPError:
            return None

    def served(text: str, kind: str) -> set[str]:
        """The pids of the workers whose served model is ``kind``."""
        return {lab["pid"] for n, lab, v in samples(text)
                if n == "addons_model_info" and lab["model_kind"] == kind and v == 1}  # fmt: skip

    try:
        # both workers loaded the model: the aggregated metrics hold a series per worker pid
        wait_for(lambda: (r := get("/metrics")) and len(served(r.text, "cooccurrence")) == 2,
                 "two workers serving")  # fmt: skip
        pids: set[int] = set()
        wait_for(lambda: pids.add(get("/v1/model").json()["reload"]["pid"]) or len(pids) == 2,
                 "answers from both workers")  # fmt: skip
        assert server.pid not in pids  # the supervisor serves nothing itself
        for i in range(20):
            r = httpx.post(f"{base}/v1/rank", json={"user_id": 1, "cart": [1]}, timeout=5,
                           headers={"X-Request-ID": f"load-{i}"})  # fmt: skip
            assert r.status_code == 200 and r.headers["X-Request-ID"] == f"load-{i}"
        text = get("/metrics").text  # whichever worker answers, the counts are everyone's
        assert value(text, "addons_http_requests_total", route="/v1/rank", status="200") == 20
        # a new version: each worker's own watcher swaps it in
        point(link, tmp_path / "popularity")
        wait_for(lambda: (r := get("/metrics")) and served(r.text, "popularity") == {str(p) for p in pids},
                 "both workers to follow the reload")  # fmt: skip
        text = get("/metrics").text
        assert value(text, "addons_reloads_total", result="success") == 2
        assert served(text, "cooccurrence") == set()
        for _ in range(10):
            assert (
                httpx.post(f"{base}/v1/rank", json={}, timeout=5).json()["model_kind"]
                == "popularity"
            )
    finally:
        stop(server)
    lines = [json.loads(x) for x in log_path.read_text().splitlines() if x.startswith("{")]
    access = [x for x in lines if x.get("path") == "/v1/rank" and x.get("request_id") == "load-7"]
    assert len(access) == 1 and access[0]["level"] == "INFO" and "ts" in access[0]
    assert sum(x.get("event") == "reloaded" for x in lines) == 2


def test_two_workers_follow_a_registry_alias_moved_by_retrain(tmp_path, monkeypatch) -> None:
    """``--workers 2 --model models:/NAME@champion``: the supervisor follows the alias, both
    workers swap the promoted version in (their pids in the aggregated metrics)."""
    from tests.test_retrain import NAME, _env, _uri, retrain, write_shop

    monkeypatch.chdir(tmp_path)
    write_shop(tmp_path / "data")
    assert retrain(tmp_path, "popularity", "--as-of", "12")[0] == 0
    port = free_port()
    log_path = tmp_path / "serve.log"
    env = {k: v for k, v in _env().items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    with log_path.open("w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "training.cli", "serve", "--model", f"models:/{NAME}@champion",
             "--tracking-uri", _uri(tmp_path), "--cache", str(tmp_path / "cache"),
             "--port", str(port), "--reload-interval", "0.3", "--workers", "2"],
            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"

    def kinds() -> dict[str, str]:
        """pid -> the model kind that worker serves (from the aggregated metrics)."""
        assert server.poll() is None, log_path.read_text()[-3000:]
        try:
            text = httpx.get(f"{base}/metrics", timeout=5).text
        except httpx.HTTPError:
            return {}
        return {lab["pid"]: lab["model_kind"] for n, lab, v in samples(text)
                if n == "addons_model_info" and v == 1}  # fmt: skip

    try:
        wait_for(lambda: list(kinds().values()) == ["popularity"] * 2, "two workers", 120)
        code, report = retrain(tmp_path, "personal_popularity", "--as-of", "16")
        assert code == 0 and report["decision"] == "promoted"
        wait_for(lambda: list(kinds().values()) == ["personal_popularity"] * 2,
                 "both workers to serve the promoted version", 120)  # fmt: skip
        text = httpx.get(f"{base}/metrics", timeout=5).text
        assert value(text, "addons_model_info", version="v2") == 2  # one series per worker
    finally:
        stop(server)
