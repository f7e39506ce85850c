"""Runs in a virtualenv with only the serving install (numpy, onnxruntime, the http extra):
proves serving works without the training stack. The artifact beside this file was written
by ``training.export.export_model`` from the tiny shop of tests/test_http.py (cooccurrence),
in format ``addons.artifact/1``: it also shows that artifacts written before format 2 load."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

from serving import ArtifactError, Ranker

ARTIFACT = Path(__file__).parent / "artifact"


def test_training_stack_is_not_installed_here() -> None:
    for name in ("implicit", "lightfm", "scipy", "mlflow", "polars"):
        assert importlib.util.find_spec(name) is None, (
            f"{name} is installed: not a serving-only env"
        )


def test_rank_from_the_committed_artifact() -> None:
    ranker = Ranker.load(ARTIFACT)
    assert ranker.manifest["format"] == "addons.artifact/1"  # an older format still reads
    result = ranker.rank(cart=[1], k=3)
    assert 1 <= len(result.items) <= 3 and all(i.item_id != 1 for i in result.items)
    assert "scipy" not in sys.modules and "mlflow" not in sys.modules


def test_tampered_copy_is_refused(tmp_path) -> None:
    copy = tmp_path / "a"
    shutil.copytree(ARTIFACT, copy)
    (copy / "model.onnx").write_bytes((copy / "model.onnx").read_bytes() + b"\0")
    with pytest.raises(ArtifactError, match="sha256"):
        Ranker.load(copy)


def test_http_api() -> None:
    from fastapi.testclient import TestClient

    from serving.http import create_app

    with TestClient(create_app(ARTIFACT, reload_interval=None)) as client:
        r = client.post("/v1/rank", json={"cart": [1], "k": 2})
        assert r.status_code == 200 and len(r.json()["items"]) <= 2
        assert client.post("/v1/rank", json={"k": 0}).status_code == 422
