"""The HTTP API: ranking, validation with clear 4xx bodies, limits, health, the schema, and a
hot reload under load with no failed request."""

from __future__ import annotations

import shutil
import threading

import pytest
from fastapi.testclient import TestClient

from features.cleaning import CleaningConfig
from features.dataset import build_dataset
from serving.http import create_app
from serving.rules import RuleSettings
from tests.conftest import make_raw
from training.config import ModelConfig, build_model
from training.export import export_model

ROWS = [
    (u, i, u * 10 + d, d, 1)
    for u in range(1, 6)
    for d in range(3)
    for i in ((1, 2, 3) if (u + d) % 2 else (1, 4, 5))
]
ITEMS = [{"item_id": i, "category": c, "price": p} for i, c, p in
         [(1, "a", 10.0), (2, "b", 2.0), (3, "c", 3.0), (4, "b", 1.0), (5, "d", 4.0)]]  # fmt: skip


def _export(kind: str, path):
    data = build_dataset(make_raw(ROWS, ITEMS), CleaningConfig())
    return export_model(build_model(ModelConfig(kind, {})).fit(data), data, path)


@pytest.fixture
def client(tmp_path):
    _export("cooccurrence", tmp_path / "art")
    app = create_app(tmp_path / "art", RuleSettings(cross_sell_max_price_ratio=1.0), reload_interval=None,
                     max_body_bytes=4096)  # fmt: skip
    with TestClient(app) as c:
        yield c


def test_rank_and_batch(client) -> None:
    r = client.post("/v1/rank", json={"user_id": 1, "cart": [1], "k": 2})
    assert r.status_code == 200
    body = r.json()
    assert len(body["items"]) == 2 and all(i["item_id"] != 1 for i in body["items"])
    assert body["unknown_user"] is False and body["model_kind"] == "cooccurrence"
    r = client.post("/v1/rank", json={"user_id": 999, "cart": [1, 77]})
    assert r.json()["unknown_user"] is True and r.json()["unknown_items"] == [77]
    r = client.post("/v1/rank/batch", json={"requests": [{"cart": [1]}, {"cart": [1], "k": 1}]})
    assert r.status_code == 200 and [len(x["items"]) for x in r.json()["results"]] == [3, 1]


@pytest.mark.parametrize(
    ("body", "field"),
    [({"k": 0}, "k"), ({"k": 50}, "k"), ({"cart": list(range(101))}, "cart"), ({"colour": "red"}, "colour"),
     ({"offer": "free"}, "offer"), ({"placement": "moon"}, "placement"), ({"cart": "1,2"}, "cart")],
)  # fmt: skip
def test_bad_requests_get_422_naming_the_field(client, body, field) -> None:
    r = client.post("/v1/rank", json=body)
    assert r.status_code == 422
    assert field in str(r.json()["detail"])


def test_limits_health_model_and_schema(client) -> None:
    r = client.post("/v1/rank", content=b'{"cart": [' + b"1," * 4000 + b"1]}",
                    headers={"content-type": "application/json"})  # fmt: skip
    assert r.status_code == 413

    def chunks():
        yield b'{"cart": [1]}'

    r = client.post("/v1/rank", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 411
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    assert client.get("/v1/model").json()["format"] == "addons.artifact/2"
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/rank", "/v1/rank/batch", "/v1/model", "/healthz", "/readyz"} <= set(paths)


def test_hot_reload_under_load_fails_no_request(tmp_path) -> None:
    _export("popularity", tmp_path / "art")
    app = create_app(tmp_path / "art", reload_interval=None)
    holder = app.state.holder
    statuses: list[int] = []
    kinds: set[str] = set()
    stop = threading.Event()
    with TestClient(app) as c:

        def hammer() -> None:
            while not stop.is_set():
                r = c.post("/v1/rank", json={"cart": [1], "k": 2})
                statuses.append(r.status_code)
                if r.status_code == 200:
                    kinds.add(r.json()["model_kind"])

        threads = [threading.Thread(target=hammer) for _ in range(3)]
        for t in threads:
            t.start()
        _export("cooccurrence", tmp_path / "new")
        shutil.rmtree(
            tmp_path / "art"
        )  # the folder is briefly missing: the old model keeps serving
        holder.check()
        shutil.move(tmp_path / "new", tmp_path / "art")
        assert holder.check()
        (tmp_path / "art" / "items.json").write_text("tampered")
        (tmp_path / "art" / "manifest.json").touch()
        assert not holder.check()  # a broken artifact is refused, the good one keeps serving
        r = c.post("/v1/rank", json={"cart": [1]})
        stop.set()
        for t in threads:
            t.join()
    assert statuses and set(statuses) == {200}
    assert kinds == {"popularity", "cooccurrence"}
    assert r.json()["model_kind"] == "cooccurrence"
