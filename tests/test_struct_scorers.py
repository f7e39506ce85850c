"""Issue 10 "structure first": each kind owns its export, serving dispatches on the manifest's
scorer, and every business rule is a function of serving.rules."""

from __future__ import annotations

import json

import numpy as np
import pytest

import serving.scorers as scorers
import training.export as export
from features.cleaning import CleaningConfig
from features.dataset import build_dataset
from serving import ArtifactError, Ranker, RuleSettings
from serving.artifact import Artifact
from serving.rules import Catalog, exclusion_mask, select
from serving.scorers import Batch, Scored
from tests.conftest import make_raw
from training.artifact_writer import ArtifactParts
from training.config import ModelConfig, build_model
from training.models import MODELS, PopularityRecommender, RecommenderBase

ROWS = [
    (u, i, u * 10 + d, d, 1)
    for u in range(1, 6)
    for d in range(3)
    for i in ((1, 2, 3) if (u + d) % 2 else (1, 4, 5))
]
ITEMS = [{"item_id": i, "category": c, "price": p, "margin": m} for i, c, p, m in
         [(1, "a", 10.0, 0.1), (2, "b", 2.0, 0.9), (3, "b", 3.0, 0.2), (4, "c", 1.0, 0.5),
          (5, "d", 4.0, 0.3)]]  # fmt: skip


@pytest.fixture(scope="module")
def data():
    return build_dataset(make_raw(ROWS, ITEMS), CleaningConfig())


class TableModel(PopularityRecommender):
    """A kind served by its own scorer: a fixed score per item, shipped as an extra array,
    in a reversed item order (so the positions the scorer sees are the artifact's)."""

    kind = "table_test"

    def export_parts(self, head: int | None = None) -> ArtifactParts:
        from training.onnx_graph import build_graph

        order = np.arange(self.n_items_)[::-1].copy()
        graph = build_graph(self, head)
        value = np.arange(self.n_items_, dtype=np.float32)  # model item i scores i
        return ArtifactParts(
            graph.onnx,  # any ONNX model: this scorer never runs it
            order,
            self.n_items_,
            scorer="table_test",
            arrays={"table_state.npz": {"score": value[order]}},
            manifest={"table_test": {"note": "scores per artifact position"}},
        )


class TableScorer:
    """Ranks by the shipped per-item score; excluded items never come back."""

    uses_cart = False

    def __init__(self, score: np.ndarray) -> None:
        self.table = score

    @classmethod
    def load(cls, artifact: Artifact, threads: int = 1) -> TableScorer:
        import io

        raw = artifact.extra["table_state.npz"]
        with np.load(io.BytesIO(raw), allow_pickle=False) as state:
            return cls(state["score"])

    def score(self, batch: Batch) -> Scored:
        s = np.where(batch.exclude, -np.inf, self.table[None, :]).astype(np.float32)
        items = np.argsort(-s, axis=1, kind="stable")[:, : batch.fetch]
        scores = np.take_along_axis(s, items, axis=1)
        reasons = [[f"table row {r}" for _ in range(items.shape[1])] for r in range(len(batch))]
        return Scored(scores, items.astype(np.int64), reasons)


@pytest.fixture
def table_scorer(monkeypatch):
    monkeypatch.setitem(scorers.SCORERS, "table_test", f"{__name__}:TableScorer")


def test_a_kind_with_its_own_scorer_is_served_through_the_rules(
    data, tmp_path, table_scorer
) -> None:
    model = TableModel().fit(data)
    path = export.export_model(model, data, tmp_path / "art")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["scorer"] == "table_test" and manifest["table_test"]["note"]
    assert "table_state.npz" in manifest["files"]
    ranker = Ranker.load(path, RuleSettings(max_per_category=1, cross_sell_max_price_ratio=10.0))
    assert isinstance(ranker.scorer, TableScorer)
    result = ranker.rank(user_id=1, cart=[1], k=3)
    ids = [i.item_id for i in result.items]
    # best first: the highest model index; item 1 is in the cart; items 2 and 3 share
    # category b (cap 1): only the better one stays
    best = data.item_map.to_external(np.arange(data.n_items)[::-1]).tolist()
    b = next(i for i in best if i in (2, 3))
    expected = [i for i in best if i in (b, 4, 5)]
    assert ids == expected and all(i.reason == "table row 0" for i in result.items)
    assert result.model_kind == "table_test"


def test_the_scorers_extra_file_is_verified(data, tmp_path, table_scorer) -> None:
    path = export.export_model(TableModel().fit(data), data, tmp_path / "art")
    with np.load(path / "table_state.npz") as state:
        score = state["score"] + 1
    np.savez(path / "table_state.npz", score=score)
    with pytest.raises(ArtifactError, match=r"table_state\.npz: sha256 does not match"):
        Ranker.load(path)


def test_an_unknown_scorer_is_refused_naming_it(data, tmp_path) -> None:
    path = export.export_model(PopularityRecommender().fit(data), data, tmp_path / "art")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["scorer"] == "graph"
    manifest["scorer"] = "quantum"
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"unknown scorer 'quantum'.*graph"):
        Ranker.load(path)
    del manifest["scorer"]  # artifacts written before scorers existed: the graph scorer
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert isinstance(Ranker.load(path).scorer, scorers.GraphScorer)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"arrays": {"users.json": {"a": np.zeros(2)}}}, "plain"),
        ({"arrays": {"../x.npz": {"a": np.zeros(2)}}}, "plain"),
        ({"arrays": {"x.npz": {"a": np.array([{}], dtype=object)}}}, "objects"),
        ({"manifest": {"files": {}}}, "replace the writer"),
        ({"order": np.array([0, 0, 1, 2, 3])}, "permutation"),
    ],
)
def test_artifact_parts_the_writer_cannot_write_faithfully_are_refused(
    data, tmp_path, change, problem
) -> None:
    model = PopularityRecommender().fit(data)
    parts = model.export_parts()
    for key, value in change.items():
        setattr(parts, key, value)
    model.export_parts = lambda head=None: parts
    with pytest.raises(export.ExportError, match=problem):
        export.export_model(model, data, tmp_path / "art")
    assert not (tmp_path / "art").exists()


def test_every_exportable_kind_owns_its_graph() -> None:
    """export.py does not switch on kinds: each exportable class overrides a graph hook."""
    hooks = ("graph_scores", "factor_parts", "export_parts")
    for kind in export.EXPORTABLE:
        cls = MODELS[kind]
        assert any(getattr(cls, h) is not getattr(RecommenderBase, h) for h in hooks), kind
    for name in ("export_model", "export_run", "ExportInputs", "build_graph", "history_matrix",
                 "choose_head", "scoring_order", "ExportError", "RunNotExportable"):  # fmt: skip
        assert hasattr(export, name), name


def _catalog() -> Catalog:
    table = {"price": np.array([10.0, 2.0, 3.0, 1.0, 4.0]),
             "margin": np.array([0.1, 1.0, 0.2, 0.5, np.nan]),
             "in_stock": np.array([True, True, True, True, False]),
             "category": np.array([0, 1, 1, 2, 3]),
             "category_name": np.array(["a", "b", "b", "c", "d"])}  # fmt: skip
    return Catalog.from_table(table, "category")


def test_exclusion_mask_holds_every_pre_scoring_rule() -> None:
    cat, history = _catalog(), np.array([0, 0, 0, 2.0, 0], np.float32)
    s = RuleSettings(cross_sell_max_price_ratio=10.0)
    none = np.zeros(0, np.int64)
    base = exclusion_mask(cat, s, "cross_sell", None, none, none, history)
    assert base.tolist() == [False, False, False, False, True]  # item 4 is out of stock
    mask = exclusion_mask(cat, s, "cross_sell", 0, np.array([1]), np.array([-1, 2]), history)
    # anchor 0 (category a), cart 1 (never offered back), caller excluded 2 (-1: unknown id)
    assert mask.tolist() == [True, True, True, False, True]
    owned = exclusion_mask(cat, s.replace(exclude_owned=True), "impulse", None, none, none, history)
    assert owned.tolist() == [True, False, False, True, True]  # impulse: price <= 5; 3 owned


def test_select_applies_margin_cap_and_k() -> None:
    cat = _catalog()
    items, scores = np.array([2, 1, 3, 0]), np.array([0.6, 0.5, 0.4, -np.inf], np.float32)
    plain = RuleSettings(max_per_category=1)
    # slot 1 shares category b with slot 0; the -inf slot is dropped
    assert select(cat, plain, scores, items, 3) == [0, 2]
    assert select(cat, plain, scores, items, 1) == [0]
    # calibrated probabilities: p * (1 + w * margin / max margin)
    weighted = plain.replace(margin_weight=1.0)
    assert select(cat, weighted, scores, items, 2, probabilities=True) == [1, 2]  # 0.5*2 > 0.6*1.2
    assert select(cat, plain, scores, items, 2, probabilities=True) == [0, 2]
    # raw model scores: min-max scaled, plus w * margin share
    assert select(cat, weighted, scores, items, 2) == [1, 2]  # 0.5 + 1.0 > 1.0 + 0.2


# -- graphs past protobuf's 2 GB (issue 12): ONNX external data -------------------------------


def test_large_graphs_are_saved_with_external_data_and_verified(
    data, tmp_path, monkeypatch
) -> None:
    import training.artifact_writer as writer

    model = build_model(ModelConfig("cooccurrence", {})).fit(data)
    inline = export.export_model(model, data, tmp_path / "inline")
    monkeypatch.setattr(writer, "EXTERNAL_DATA_BYTES", 0)  # every graph counts as large
    monkeypatch.setattr(writer, "EXTERNAL_TENSOR_BYTES", 64)  # and its neighbour lists go out
    path = export.export_model(model, data, tmp_path / "external")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["onnx_external_data"] == ["model.onnx.data"]
    assert "model.onnx.data" in manifest["files"]
    assert json.loads((inline / "manifest.json").read_text())["onnx_external_data"] == []
    assert (path / "model.onnx.data").stat().st_size > 0
    requests = [{"user_id": u, "cart": c} for u in (1, 2, 99) for c in ([], [1], [2, 4])]
    settings = RuleSettings(cross_sell_max_price_ratio=10.0)
    got = [r.to_dict() for r in Ranker.load(path, settings).rank_many(requests)]
    assert got == [r.to_dict() for r in Ranker.load(inline, settings).rank_many(requests)]
    assert "model.onnx.data" not in Artifact.load(path).extra  # hashed, never held in memory
    data_file = path / "model.onnx.data"
    blob = data_file.read_bytes()
    data_file.write_bytes(blob[:-4] + b"\0\0\0\1")
    with pytest.raises(ArtifactError, match=r"model\.onnx\.data: sha256 does not match"):
        Ranker.load(path)
    data_file.unlink()
    (tmp_path / "elsewhere.data").write_bytes(blob)
    data_file.symlink_to(tmp_path / "elsewhere.data")
    with pytest.raises(ArtifactError, match="symbolic link"):
        Ranker.load(path)


def test_a_manifest_cannot_declare_unlisted_external_data(data, tmp_path) -> None:
    path = export.export_model(PopularityRecommender().fit(data), data, tmp_path / "art")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["onnx_external_data"] = ["weights.bin"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="onnx_external_data"):
        Ranker.load(path)


class _HugeConstant(PopularityRecommender):
    """The popularity graph plus two unused constants of 1.1 GB of int8 zeros each: together
    past protobuf's 2 GB, as the neighbour lists of a large catalog are."""

    kind = "huge_test"

    def export_parts(self, head: int | None = None) -> ArtifactParts:
        from onnx import TensorProto

        parts = super().export_parts(head)
        size = 1_100_000_000
        for name in ("huge_a", "huge_b"):
            tensor = parts.onnx.graph.initializer.add()  # filled in place: no message copy
            tensor.name, tensor.data_type = name, TensorProto.INT8
            tensor.dims.append(size)
            tensor.raw_data = bytes(size)
        return parts


@pytest.mark.slow
def test_an_artifact_past_2_gb_exports_and_serves(data, tmp_path) -> None:
    """Without external data, serialising this model fails (protobuf's 2 GB limit)."""
    model = _HugeConstant().fit(data)
    path = export.export_model(model, data, tmp_path / "art")
    assert (path / "model.onnx.data").stat().st_size >= 2_200_000_000  # > 2 GiB
    assert (path / "model.onnx").stat().st_size < 1 << 20
    ranker = Ranker.load(path, RuleSettings(cross_sell_max_price_ratio=10.0))
    plain = Ranker.load(
        export.export_model(PopularityRecommender().fit(data), data, tmp_path / "plain"),
        RuleSettings(cross_sell_max_price_ratio=10.0),
    )
    assert ranker.rank(cart=[1]).to_dict()["items"] == plain.rank(cart=[1]).to_dict()["items"]
