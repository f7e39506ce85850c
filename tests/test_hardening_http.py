"""Issue 8, the HTTP service: strict request types and int64 ids (422, never 500), limits read
from the rules, the published 422 shape, logged 5xx, a schema fuzzer (schemathesis) finding
no server error, a hot reload that survives every broken artifact and retries, a bounded
batch path, and ``addons serve`` as a real process."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, assume, given, settings
from schemathesis import GenerationMode

import serving.http as http
from features.cleaning import CleaningConfig
from features.dataset import build_dataset
from serving.ranker import Ranker, RequestError
from serving.rules import OFFERS, PLACEMENTS, RuleSettings
from tests.conftest import make_raw
from tests.processes import free_port
from training.config import ModelConfig, build_model
from training.export import export_model

ROOT = Path(__file__).resolve().parents[1]
N_ITEMS = 15
# 8 users, 15 items in 5 categories: enough items to cut items.json by 10.
ROWS = [
    (u, i, u * 100 + d, d, 1)
    for u in range(1, 9)
    for d in range(4)
    for i in range(1 + (u + d) % N_ITEMS, 1 + (u + d) % N_ITEMS + 4)
    if i <= N_ITEMS
]
ITEMS = [
    {"item_id": i, "category": "abcde"[i % 5], "price": float(i)} for i in range(1, N_ITEMS + 1)
]
BIG = 2**63


def export(kind: str, path: Path, n_items: int = N_ITEMS) -> Path:
    rows = [r for r in ROWS if r[1] <= n_items] + [(9, n_items, 999, 1, 1)]
    items = [x for x in ITEMS if x["item_id"] <= n_items] + [
        {"item_id": i, "category": "z", "price": 1.0} for i in range(N_ITEMS + 1, n_items + 1)
    ]
    data = build_dataset(make_raw(rows, items), CleaningConfig())
    return export_model(build_model(ModelConfig(kind, {})).fit(data), data, path)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    """Good artifacts to copy from: two kinds on the same data, one with more items."""
    root = tmp_path_factory.mktemp("artifacts")
    return {
        "cooccurrence": export("cooccurrence", root / "cooc"),
        "popularity": export("popularity", root / "pop"),
        "bigger": export("cooccurrence", root / "bigger", n_items=N_ITEMS + 6),
    }


@pytest.fixture
def client(artifacts, tmp_path):
    shutil.copytree(artifacts["cooccurrence"], tmp_path / "art")
    app = http.create_app(tmp_path / "art", RuleSettings(cross_sell_max_price_ratio=1.0),
                          reload_interval=None)  # fmt: skip
    with TestClient(app) as c:
        yield c


def assert_published_422(client: TestClient, response: httpx.Response) -> list[dict]:
    """The body is a 422 that validates against the schema's HTTPValidationError."""
    assert response.status_code == 422, response.text
    spec = client.get("/openapi.json").json()
    schema = {"$ref": "#/components/schemas/HTTPValidationError", "components": spec["components"]}
    jsonschema.validate(response.json(), schema)
    return response.json()["detail"]


# --- 1. strict types, int64 ids, history weights ---------------------------------------------

BAD = [
    ('{"k": "5"}', "k"), ('{"k": true}', "k"), ('{"k": 5.0}', "k"),
    ('{"user_id": true}', "user_id"), ('{"user_id": 1.5}', "user_id"),
    ('{"user_id": 1.0}', "user_id"), ('{"user_id": ""}', "user_id"),
    ('{"user_id": "%s"}' % ("x" * 257), "user_id"), ('{"cart": [1.0]}', "cart"),
    ('{"cart": [false]}', "cart"), ('{"cart": "1,2"}', "cart"),
    (f'{{"user_id": {BIG}}}', "user_id"), (f'{{"user_id": {-BIG - 1}}}', "user_id"),
    (f'{{"cart": [1, {BIG}]}}', "cart"), (f'{{"anchor": {BIG}}}', "anchor"),
    (f'{{"exclude": [{BIG * 4}]}}', "exclude"), (f'{{"history": {{"{BIG}": 1}}}}', "history"),
    ('{"history": {"1": NaN}}', "history"), ('{"history": {"1": Infinity}}', "history"),
    ('{"history": {"1": -Infinity}}', "history"), ('{"history": {"1": -1}}', "history"),
    ('{"history": {"1": 1e300}}', "history"), ('{"history": {"1": 1000001}}', "history"),
    ('{"history": {"1": true}}', "history"), ('{"history": {"1": "2"}}', "history"),
    ('{"offer": "free"}', "offer"), ('{"placement": "moon"}', "placement"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "field"), BAD)
def test_bad_types_and_out_of_range_ids_get_422_single_and_batch(client, body, field) -> None:
    headers = {"content-type": "application/json"}
    detail = assert_published_422(client, client.post("/v1/rank", content=body, headers=headers))
    assert all(d["loc"][:2] == ["body", field] for d in detail), detail
    batch = '{"requests": [{}, ' + body + "]}"
    r = client.post("/v1/rank/batch", content=batch, headers=headers)
    detail = assert_published_422(client, r)
    assert all(d["loc"][:4] == ["body", "requests", 1, field] for d in detail), detail


@pytest.mark.parametrize(
    "body",
    [{"user_id": BIG - 1}, {"user_id": -BIG}, {"cart": [BIG - 1, "x" * 256]},
     {"history": {"1": 1e6, "2": 0, "3": 2}}, {"exclude": [-BIG]}, {"k": 20}],
)  # fmt: skip
def test_values_at_the_bounds_are_accepted(client, body) -> None:
    r = client.post("/v1/rank", json=body)
    assert r.status_code == 200, r.text
    r = client.post("/v1/rank/batch", json={"requests": [body, body]})
    assert r.status_code == 200 and len(r.json()["results"]) == 2


def test_limits_come_from_the_rule_settings(artifacts, tmp_path) -> None:
    rules = RuleSettings(default_k=2, max_k=4, max_cart_items=3, max_exclude_items=2,
                         max_history_items=2, max_batch_requests=2)  # fmt: skip
    app = http.create_app(artifacts["cooccurrence"], rules, reload_interval=None)
    ok = [{"k": 4}, {"cart": [1, 2, 3]}, {"exclude": [1, 2]}, {"history": {"1": 1, "2": 1}}]
    bad = [({"k": 5}, "k"), ({"cart": [1, 2, 3, 4]}, "cart"), ({"exclude": [1, 2, 3]}, "exclude"),
           ({"history": {"1": 1, "2": 1, "3": 1}}, "history")]  # fmt: skip
    with TestClient(app) as c:
        for body in ok:
            assert c.post("/v1/rank", json=body).status_code == 200, body
        for body, field in bad:
            assert assert_published_422(c, c.post("/v1/rank", json=body))[0]["loc"] == [
                "body",
                field,
            ]
        assert c.post("/v1/rank/batch", json={"requests": [{}, {}]}).status_code == 200
        r = c.post("/v1/rank/batch", json={"requests": [{}, {}, {}]})
        assert assert_published_422(c, r)[0]["loc"] == ["body", "requests"]
        schema = c.get("/openapi.json").json()["components"]["schemas"]
    props = schema["RankRequest"]["properties"]
    assert props["cart"]["maxItems"] == 3 and props["exclude"]["maxItems"] == 2
    assert props["history"]["anyOf"][0]["maxProperties"] == 2
    assert props["k"]["anyOf"][0]["maximum"] == 4
    assert schema["BatchRequest"]["properties"]["requests"]["maxItems"] == 2


def test_schema_lists_offers_placements_exact_int64_bounds_and_422(client) -> None:
    spec = client.get("/openapi.json").json()
    props = spec["components"]["schemas"]["RankRequest"]["properties"]
    assert props["offer"]["enum"] == list(OFFERS)
    assert props["placement"]["enum"] == list(PLACEMENTS)
    ints = [s for s in props["user_id"]["anyOf"] if s.get("type") == "integer"]
    # exact integers: a float 9.223372036854776e18 would be 2**63 and allow it
    assert ints == [{"type": "integer", "minimum": -BIG, "maximum": BIG - 1}]
    assert json.dumps(BIG - 1) in client.get("/openapi.json").text
    for path in ("/v1/rank", "/v1/rank/batch"):
        responses = spec["paths"][path]["post"]["responses"]
        ref = responses["422"]["content"]["application/json"]["schema"]["$ref"]
        assert ref.endswith("/HTTPValidationError")
        assert {"200", "413", "411"} <= set(responses)


def test_request_error_from_the_ranker_has_the_published_shape(client, monkeypatch) -> None:
    ranker = client.app.state.holder.ranker
    real_many = ranker.rank_many

    def refuse_many(requests: list[dict], batch_size: int = 256):
        if any(r.get("cart") == [3] for r in requests):
            raise RequestError("cart: item 3 is refused here")
        return real_many(requests, batch_size=batch_size)

    def refuse(**request: Any):
        return refuse_many([request])[0]

    monkeypatch.setattr(ranker, "rank", refuse)
    monkeypatch.setattr(ranker, "rank_many", refuse_many)
    detail = assert_published_422(client, client.post("/v1/rank", json={"cart": [3]}))
    assert detail == [
        {"loc": ["body", "cart"], "msg": "item 3 is refused here", "type": "value_error"}
    ]
    body = {"requests": [{"cart": [1]}] * 40 + [{"cart": [3]}]}  # the bad one in the 2nd chunk
    detail = assert_published_422(client, client.post("/v1/rank/batch", json=body))
    assert detail[0]["loc"] == ["body", "requests", 40, "cart"]


# --- 2. every 5xx is logged, with a generic body ---------------------------------------------


def test_an_unexpected_error_is_logged_as_json_with_a_generic_500(
    client, monkeypatch, caplog
) -> None:
    def boom(**_: Any):
        raise ZeroDivisionError("secret internal detail")

    monkeypatch.setattr(client.app.state.holder.ranker, "rank", boom)
    with caplog.at_level(logging.INFO, logger="addons.serving"):
        r = client.post("/v1/rank", json={"cart": [1]})
    assert r.status_code == 500 and r.json() == {"detail": "internal server error"}
    assert "secret" not in r.text
    lines = [
        json.loads(rec.getMessage()) for rec in caplog.records if rec.name == "addons.serving"
    ]  # httpx logs too
    error = next(x for x in lines if x.get("event") == "server_error")
    assert error["path"] == "/v1/rank" and "ZeroDivisionError" in error["traceback"]
    assert any(x.get("path") == "/v1/rank" and x.get("status") == 500 for x in lines)


# --- 3. the schema fuzzer ---------------------------------------------------------------------


def _exact_ints(value: Any) -> Any:
    """A positive case as the schema means it: JSON Schema counts 5.0 as an integer (this API
    refuses floats as ids, by design), and the generator compares bounds as floats, so it
    may produce 2**63 for ``maximum: 2**63 - 1``; such a case is discarded, not sent."""
    if (isinstance(value, float) and value.is_integer()) or type(value) is int:
        assume(-BIG <= int(value) < BIG)
        return int(value)
    if isinstance(value, list):
        return [_exact_ints(v) for v in value]
    if isinstance(value, dict):
        return {k: _exact_ints(v) for k, v in value.items()}
    return value


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_schema_fuzzer_finds_no_server_error(artifacts, tmp_path, mode) -> None:
    """schemathesis against the ASGI app: every operation, schema-valid and schema-invalid
    bodies; every check (no 5xx, documented status codes and content types, responses that
    match the response schema, valid data accepted, invalid data refused)."""
    app = http.create_app(artifacts["cooccurrence"], reload_interval=None)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    cases = [0]

    @given(case=schema.as_strategy(mode))
    @settings(max_examples=150, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    def fuzz(case) -> None:
        if mode == GenerationMode.POSITIVE and case.body is not None:
            case.body = _exact_ints(case.body)
        cases[0] += 1
        case.call_and_validate()

    fuzz()
    assert cases[0] >= 150


# --- 4. /v1/model and /readyz show the rules and the reload status --------------------------


def test_model_info_shows_manifest_effective_rules_and_reload_status(artifacts) -> None:
    rules = RuleSettings(max_per_category=1, exclude_owned=True, max_k=7)
    app = http.create_app(artifacts["cooccurrence"], rules, reload_interval=3.0)
    with TestClient(app) as c:
        info = c.get("/v1/model").json()
        ready = c.get("/readyz").json()
    manifest = json.loads((artifacts["cooccurrence"] / "manifest.json").read_text())
    assert {k: info[k] for k in manifest} == manifest
    assert info["rules"] == rules.to_dict() and info["rules"]["max_k"] == 7
    reload = info["reload"]
    assert reload["interval_s"] == 3.0 and reload["failing"] is False
    assert reload["last_error"] is None
    assert reload["serving"]["created_at"] == manifest["created_at"]
    assert reload["serving"]["manifest_mtime"] and reload["serving"]["loaded_at"]
    assert ready == {"ready": True, "reload": {"failing": False, "last_error": None}}


def test_trusted_keys_are_required_at_start_and_on_every_reload(artifacts, tmp_path) -> None:
    from serving.artifact import ArtifactError
    from serving.signing import generate_keypair, sign_artifact

    generate_keypair(tmp_path / "key", tmp_path / "key.pub")
    with pytest.raises(ArtifactError):  # unsigned: refused at start-up
        http.create_app(artifacts["cooccurrence"], trusted_keys=[tmp_path / "key.pub"])
    art, signed = tmp_path / "art", tmp_path / "signed"
    shutil.copytree(artifacts["cooccurrence"], art)
    sign_artifact(art, tmp_path / "key")
    shutil.copytree(artifacts["popularity"], signed)
    sign_artifact(signed, tmp_path / "key")
    app = http.create_app(art, trusted_keys=[tmp_path / "key.pub"], reload_interval=0.05)
    with TestClient(app) as c:
        swap_in(artifacts["popularity"], art, None, artifacts)  # unsigned: not swapped in
        wait_for(lambda: c.get("/readyz").json()["reload"]["failing"], "the refusal")
        assert c.get("/v1/model").json()["model_kind"] == "cooccurrence"
        swap_in(signed, art, None, artifacts)
        wait_for(lambda: c.get("/v1/model").json()["model_kind"] == "popularity", "the signed one")


# --- 5. hot reload never stops ----------------------------------------------------------------


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def rehash(art: Path, *names: str) -> None:
    """Make the manifest's hashes match edited files (a consistent-looking artifact)."""
    manifest = json.loads((art / "manifest.json").read_text())
    for name in names:
        manifest["files"][name] = sha256(art / name)
    (art / "manifest.json").write_text(json.dumps(manifest))


def empty_onnx(art: Path, artifacts: dict) -> None:
    (art / "model.onnx").write_bytes(b"")
    rehash(art, "model.onnx")


def manifest_list(art: Path, artifacts: dict) -> None:
    (art / "manifest.json").write_text("[1, 2, 3]")


def items_10_short(art: Path, artifacts: dict) -> None:
    items = json.loads((art / "items.json").read_text())
    items["ids"] = items["ids"][:-10]
    (art / "items.json").write_text(json.dumps(items))
    rehash(art, "items.json")


def onnx_of_another_export(art: Path, artifacts: dict) -> None:
    """Every file matches its hash, but the graph scores 21 items and the artifact has 15:
    only a probe request shows it (before, it was swapped in and every request was a 500)."""
    shutil.copyfile(artifacts["bigger"] / "model.onnx", art / "model.onnx")
    rehash(art, "model.onnx")


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class Hammer:
    """Requests in a loop while the artifact changes: every status and model kind seen."""

    def __init__(self, client: TestClient) -> None:
        self.client, self.statuses, self.kinds = client, [], set()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run)

    def run(self) -> None:
        while not self.stop.is_set():
            r = self.client.post("/v1/rank", json={"user_id": 1, "cart": [1], "k": 2})
            self.statuses.append(r.status_code)
            if r.status_code == 200:
                self.kinds.add(r.json()["model_kind"])
            time.sleep(0.005)

    def __enter__(self) -> Hammer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def swap_in(source: Path, art: Path, breakage: Callable | None, artifacts: dict) -> None:
    """Replace ``art`` by a copy of ``source`` (broken by ``breakage``), renamed into place."""
    tmp = art.with_name(f"candidate-{time.monotonic_ns()}")
    shutil.copytree(source, tmp)
    if breakage:
        breakage(tmp, artifacts)
    shutil.rmtree(art)
    tmp.rename(art)


@pytest.mark.parametrize(
    "breakage", [empty_onnx, manifest_list, items_10_short, onnx_of_another_export]
)
def test_watcher_survives_a_broken_artifact_and_picks_up_the_next_good_one(
    artifacts, tmp_path, breakage
) -> None:
    art = tmp_path / "art"
    shutil.copytree(artifacts["cooccurrence"], art)
    app = http.create_app(art, reload_interval=0.05)
    with TestClient(app) as c, Hammer(c) as hammer:
        assert c.get("/v1/model").json()["reload"]["last_error"] is None
        swap_in(artifacts["popularity"], art, breakage, artifacts)
        ready = wait_for(lambda: (b := c.get("/readyz")).json()["reload"]["failing"] and b,
                         "the reload error in /readyz")  # fmt: skip
        assert ready.status_code == 200 and ready.json()["ready"] is True
        info = c.get("/v1/model").json()
        assert info["model_kind"] == "cooccurrence"  # the old model keeps serving
        error = info["reload"]["last_error"]
        assert error["attempts"] >= 1 and error["at"] and error["error"]
        if breakage is onnx_of_another_export:
            assert "probe" in error["error"]
        served = info["reload"]["serving"]
        assert served["model_kind"] == "cooccurrence" and served["created_at"]
        wait_for(lambda: c.get("/v1/model").json()["reload"]["last_error"]["attempts"] >= 2,
                 "a retry of the same broken candidate")  # fmt: skip
        swap_in(artifacts["popularity"], art, None, artifacts)
        wait_for(lambda: c.get("/v1/model").json()["model_kind"] == "popularity", "the good one")
        assert c.get("/readyz").json()["reload"] == {"failing": False, "last_error": None}
        assert c.get("/v1/model").json()["reload"]["serving"]["model_kind"] == "popularity"
        wait_for(lambda: "popularity" in hammer.kinds, "a hammer request on the new model")
    assert hammer.statuses and set(hammer.statuses) == {200}
    assert hammer.kinds == {"cooccurrence", "popularity"}


def test_a_swapped_in_model_is_never_seen_with_the_last_failed_candidates_error(
    artifacts, tmp_path, monkeypatch
) -> None:
    """Whoever sees the new model sees a clean reload status: the swap is published last
    (before, a /readyz right after the new model showed could still report the old error)."""
    art = tmp_path / "art"
    shutil.copytree(artifacts["cooccurrence"], art)
    holder = http.ModelHolder(art, RuleSettings(), metrics=http.ServerMetrics())
    holder.load()
    swap_in(artifacts["popularity"], art, items_10_short, artifacts)
    assert holder.check() is False and holder.status()["failing"]
    seen, served = [], holder.metrics.served

    def spy(*args: Any) -> None:  # runs inside the swap, right after the model is published
        seen.append((holder.ranker.manifest["model_kind"], holder.status()["failing"]))
        served(*args)

    monkeypatch.setattr(holder.metrics, "served", spy)
    swap_in(artifacts["popularity"], art, None, artifacts)
    assert holder.check() is True
    assert seen == [("popularity", False)]


def test_a_manifest_first_in_place_copy_is_retried_until_it_loads(artifacts, tmp_path) -> None:
    """cp of the manifest first and the other files later: the first attempt fails (hashes),
    and a later retry, with no further change to the manifest, succeeds."""
    art = tmp_path / "art"
    shutil.copytree(artifacts["cooccurrence"], art)
    app = http.create_app(art, reload_interval=0.05)
    with TestClient(app) as c, Hammer(c) as hammer:
        shutil.copyfile(artifacts["popularity"] / "manifest.json", art / "manifest.json")
        wait_for(lambda: c.get("/readyz").json()["reload"]["failing"], "the first failure")
        stamp = (art / "manifest.json").stat().st_mtime_ns
        for f in sorted(artifacts["popularity"].iterdir()):
            if f.name != "manifest.json":
                shutil.copyfile(f, art / f.name)
        wait_for(lambda: c.get("/v1/model").json()["model_kind"] == "popularity", "the retry")
        assert (art / "manifest.json").stat().st_mtime_ns == stamp  # no manifest change needed
        assert c.get("/readyz").json()["reload"]["failing"] is False
        wait_for(lambda: "popularity" in hammer.kinds, "a hammer request on the new model")
    assert set(hammer.statuses) == {200} and hammer.kinds == {"cooccurrence", "popularity"}


def test_watcher_survives_any_exception_and_backs_off(
    artifacts, tmp_path, monkeypatch, caplog
) -> None:
    art = tmp_path / "art"
    shutil.copytree(artifacts["cooccurrence"], art)
    app = http.create_app(art, reload_interval=0.02)
    holder = app.state.holder
    holder.max_backoff = 0.16
    real_load = Ranker.load
    monkeypatch.setattr(http.Ranker, "load", classmethod(
        lambda cls, *a, **k: (_ for _ in ()).throw(KeyError("not an ArtifactError"))))  # fmt: skip
    real_stamp = holder._manifest_stamp
    calls = [0]

    def flaky_stamp():  # check() itself raising must not end the loop either
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("stat exploded")
        return real_stamp()

    monkeypatch.setattr(holder, "_manifest_stamp", flaky_stamp)
    with caplog.at_level(logging.INFO, logger="addons.serving"), TestClient(app) as c:
        swap_in(artifacts["popularity"], art, None, artifacts)
        status = wait_for(lambda: (s := c.get("/v1/model").json()["reload"])["last_error"]
                          and s["last_error"]["attempts"] >= 4 and s, "retries")  # fmt: skip
        assert "KeyError" in status["last_error"]["error"]
        assert status["last_error"]["retry_in_s"] == 0.16  # doubled from 0.02, capped
        assert c.get("/v1/model").json()["model_kind"] == "cooccurrence"
        monkeypatch.setattr(http.Ranker, "load", real_load)
        wait_for(lambda: c.get("/v1/model").json()["model_kind"] == "popularity", "recovery")
    events = [
        json.loads(r.getMessage()).get("event")
        for r in caplog.records
        if r.name == "addons.serving"
    ]
    assert "watcher_error" in events and "reload_failed" in events and "reloaded" in events
    assert calls[0] > 3


# --- 6. the batch path is bounded -------------------------------------------------------------


def test_batches_run_in_small_chunks_with_few_at_once(artifacts, monkeypatch) -> None:
    app = http.create_app(artifacts["cooccurrence"], reload_interval=None)
    ranker = app.state.holder.ranker
    seen: list[tuple[int, int]] = []
    running, peak = [0], [0]
    lock = threading.Lock()
    real = ranker.rank_many

    def spy(requests: list[dict], batch_size: int = 256):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
            seen.append((len(requests), batch_size))
        time.sleep(0.01)  # long enough for the other batches to pile up
        try:
            return real(requests, batch_size=batch_size)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(ranker, "rank_many", spy)
    body = {"requests": [{"user_id": u % 9, "cart": [1 + u % N_ITEMS]} for u in range(200)]}
    with TestClient(app) as c:
        results: list[int] = []
        threads = [threading.Thread(target=lambda: results.append(
            len(c.post("/v1/rank/batch", json=body).json()["results"]))) for _ in range(6)]  # fmt: skip
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert results == [200] * 6
    assert (
        max(n for n, _ in seen) <= http.BATCH_CHUNK and max(b for _, b in seen) <= http.BATCH_CHUNK
    )
    assert sum(n for n, _ in seen) == 6 * 200
    assert peak[0] <= http.BATCH_CONCURRENCY


# --- 7. `addons serve` as a real process ------------------------------------------------------


def addons() -> list[str]:
    script = Path(sys.executable).with_name("addons")
    return [str(script)] if script.exists() else [sys.executable, "-m", "training.cli"]


def test_addons_serve_answers_and_follows_a_replaced_artifact(artifacts, tmp_path) -> None:
    art = tmp_path / "art"
    shutil.copytree(artifacts["cooccurrence"], art)
    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [*addons(), "serve", "--model", str(art), "--port", str(port), "--reload-interval", "0.2"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            if server.poll() is not None:
                raise AssertionError((tmp_path / "serve.log").read_text())
            try:
                return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, "addons serve to be ready", timeout=60)
        # default rules: cross-sell items at most 40 % of the cart's price (item 15: 15.0)
        r = httpx.post(f"{url}/v1/rank", json={"user_id": 1, "cart": [15], "k": 2}, timeout=5)
        assert r.status_code == 200 and r.json()["model_kind"] == "cooccurrence"
        assert len(r.json()["items"]) == 2
        r = httpx.post(f"{url}/v1/rank", json={"user_id": BIG}, timeout=5)
        assert r.status_code == 422
        swap_in(artifacts["popularity"], art, None, artifacts)
        wait_for(lambda: httpx.get(f"{url}/v1/model", timeout=5).json()["model_kind"] == "popularity",
                 "the server to follow the new artifact")  # fmt: skip
        r = httpx.post(f"{url}/v1/rank", json={"cart": [1]}, timeout=5)
        assert r.status_code == 200 and r.json()["model_kind"] == "popularity"
    finally:
        server.kill()
        server.wait(timeout=10)
        log.close()
    lines = (tmp_path / "serve.log").read_text().splitlines()
    assert any(json.loads(x).get("event") == "reloaded" for x in lines if x.startswith("{"))
