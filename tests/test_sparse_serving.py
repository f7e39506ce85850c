"""Issue 12 / 10 latency: serving work proportional to the candidates, not the catalog.

The candidate-wise rules (:class:`serving.rules.Offerable`) must equal the dense mask, and
the candidate-wise scorer of item x item artifacts (:mod:`serving.neighbour_scorer`) must
give the dense ONNX graph's answer: same ids up to ties, scores within 1e-5, for every offer,
anchor, exclude list, owned filter, unknown id, empty cart, anonymous user, large k and rules
that leave few items.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import training.export as export
from features.cleaning import CleaningConfig
from features.dataset import build_dataset
from serving import ArtifactError, Ranker, RuleSettings
from serving.neighbour_scorer import NeighbourScorer
from serving.rules import OFFERS, Offerable, exclusion_mask
from serving.scorers import GraphScorer
from tests.conftest import make_raw
from training.models import CooccurrenceRecommender, PopularityRecommender
from training.models.implicit_models import ItemKNNRecommender

N_ITEMS = 600


@pytest.fixture(scope="module")
def shop():
    """A small random shop: 200 households, 600 items in 12 categories, some out of stock,
    some without a price or a category, power-law popularity (so neighbour rows differ)."""
    rng = np.random.default_rng(7)
    popularity = 1.0 / np.arange(1, N_ITEMS + 1) ** 0.8
    popularity /= popularity.sum()
    rows, basket = [], 0
    for user in range(200):
        for day in range(int(rng.integers(2, 8))):
            basket += 1
            for item in rng.choice(N_ITEMS, size=int(rng.integers(2, 9)), replace=False,
                                   p=popularity):  # fmt: skip
                rows.append((user, 1000 + int(item), basket, day * 7 + user % 5, 1))
    items = [
        {"item_id": 1000 + i, "category": None if i % 97 == 5 else f"c{i % 12}",
         "price": None if i % 89 == 3 else float(np.round(rng.uniform(0.5, 30), 2)),
         "margin": float(rng.uniform(0, 1)), "in_stock": bool(i % 13 != 0)}
        for i in range(N_ITEMS)
    ]  # fmt: skip
    return build_dataset(make_raw(rows, items), CleaningConfig())


@pytest.fixture(scope="module")
def artifacts(shop, tmp_path_factory):
    """Co-occurrence (cart term) and item-KNN (history and cart terms) artifacts."""
    folder = tmp_path_factory.mktemp("sparse")
    cooc = export.export_model(CooccurrenceRecommender(neighbours=50).fit(shop), shop,
                               folder / "cooc")  # fmt: skip
    knn = export.export_model(
        ItemKNNRecommender(neighbours=40, history_weight=0.5, cart_weight=1.0).fit(shop),
        shop,
        folder / "knn",
    )
    return {"cooc": cooc, "knn": knn}


def _requests(shop, rng: np.random.Generator, n: int) -> list[dict]:
    """Random requests covering every option the rules and the scorer look at."""
    users = shop.user_map.to_external(np.arange(shop.n_users)).tolist()
    items = shop.item_map.to_external(np.arange(shop.n_items)).tolist()
    out = []
    for i in range(n):
        cart = [items[j] for j in rng.choice(len(items), size=int(rng.integers(0, 5)),
                                             replace=False)]  # fmt: skip
        if i % 7 == 0:
            cart.append(987654)  # unknown id
        request = {
            "user_id": None if i % 5 == 0 else users[int(rng.integers(len(users)))],
            "cart": cart,
            "offer": OFFERS[i % len(OFFERS)],
            "k": int(rng.choice([1, 3, 5, 20])),
        }
        if i % 3 == 0:
            request["anchor"] = items[int(rng.integers(len(items)))]
        if i % 4 == 0:
            request["exclude"] = [items[int(j)] for j in rng.integers(0, 60, size=10)] + [-5]
        if i % 9 == 0:
            request["history"] = {items[int(j)]: float(rng.uniform(0, 3))
                                  for j in rng.integers(0, len(items), size=6)}  # fmt: skip
        out.append(request)
    return out


def _same(sparse, dense) -> None:
    """Same offers (ids up to ties: equal scores may swap), scores within 1e-5."""
    assert len(sparse.items) == len(dense.items)
    for a, b in zip(sparse.items, dense.items, strict=True):
        assert a.score == pytest.approx(b.score, abs=1e-5)
        assert a.item_id == b.item_id or abs(a.score - b.score) <= 1e-5
    assert sparse.why_empty == dense.why_empty and sparse.notes == dense.notes


@pytest.mark.parametrize("kind", ["cooc", "knn"])
@pytest.mark.parametrize("owned", [False, True])
def test_candidate_wise_scorer_equals_the_dense_graph(shop, artifacts, kind, owned) -> None:
    settings = RuleSettings(exclude_owned=owned, max_k=20, cross_sell_max_price_ratio=2.0)
    sparse = Ranker.load(artifacts[kind], settings)
    assert isinstance(sparse.scorer, NeighbourScorer)
    dense = Ranker.load(artifacts[kind], settings)
    dense.scorer = GraphScorer.load(dense.artifact)
    requests = _requests(shop, np.random.default_rng(1 if owned else 2), 160)
    for a, b in zip(sparse.rank_many(requests, batch_size=32), dense.rank_many(requests),
                    strict=True):  # fmt: skip
        _same(a, b)
    # the raw scorer answer too: every finite slot, not only what the selection kept
    batch = sparse._batch([sparse._prepare(**r) for r in requests[:40]])
    got, want = sparse.scorer.score(batch), dense.scorer.score(batch)
    assert np.array_equal(np.isfinite(got.scores), np.isfinite(want.scores))
    finite = np.isfinite(want.scores)
    np.testing.assert_allclose(got.scores[finite], want.scores[finite], atol=1e-5)
    # the same float32 additions in the same order as the graph: the same scores bit for
    # bit, so the same ids except between exactly equal scores (there the lower index)
    assert np.array_equal(got.scores[finite], want.scores[finite])
    assert np.array_equal(got.items[finite], want.items[finite])


def test_rules_that_leave_few_items_fall_back_to_the_dense_graph(
    shop, artifacts, monkeypatch
) -> None:
    import serving.neighbour_scorer as module

    # up-sell: the anchor's category, priced above it and at most +5 %: a handful of items;
    # heads of 16, 32, 64 items, given up after 50 (the catalog is small)
    monkeypatch.setattr(module, "FIRST_HEAD", 0)
    monkeypatch.setattr(module, "MIN_HEAD", 16)
    settings = RuleSettings(up_sell_max_price_increase=0.05, max_k=20, in_stock_only=False)
    sparse = Ranker.load(artifacts["cooc"], settings)
    sparse.scorer.limit = 50
    dense = Ranker.load(artifacts["cooc"], settings)
    dense.scorer = GraphScorer.load(dense.artifact)
    items = shop.item_map.to_external(np.arange(shop.n_items)).tolist()
    requests = [{"anchor": items[i], "offer": "up_sell", "k": 20} for i in range(0, 600, 15)]
    for a, b in zip(sparse.rank_many(requests), dense.rank_many(requests), strict=True):
        _same(a, b)
    assert sparse.scorer.dense_rows > 0  # the head was exhausted: dense rows answered


def test_offerable_equals_the_dense_exclusion_mask(shop, artifacts) -> None:
    ranker = Ranker.load(artifacts["cooc"])
    cat, rng = ranker.catalog, np.random.default_rng(3)
    for i in range(40):
        settings = RuleSettings(exclude_owned=bool(i % 2), in_stock_only=bool(i % 3))
        cart = rng.choice(N_ITEMS, size=int(rng.integers(0, 4)), replace=False)
        anchor = None if i % 4 == 0 else int(rng.integers(N_ITEMS))
        excluded = np.r_[rng.integers(0, N_ITEMS, size=5), -1]
        history = np.where(rng.random(N_ITEMS) < 0.05, rng.random(N_ITEMS), 0).astype(np.float32)
        offer = OFFERS[i % len(OFFERS)]
        mask = exclusion_mask(cat, settings, offer, anchor, cart, excluded, history)
        rules = Offerable(cat, settings, offer, anchor, cart, excluded, np.flatnonzero(history > 0))
        candidates = rng.permutation(N_ITEMS)[:100]
        assert np.array_equal(rules.allowed(candidates), ~mask[candidates])
        assert mask[cart].all() and (anchor is None or mask[anchor])
        assert mask[excluded[excluded >= 0]].all()
        if settings.exclude_owned:
            assert mask[history > 0].all()


def test_an_artifact_without_neighbour_files_runs_on_the_dense_graph(shop, artifacts,
                                                                     tmp_path) -> None:  # fmt: skip
    old = tmp_path / "old"
    old.mkdir()
    manifest = json.loads((artifacts["cooc"] / "manifest.json").read_text())
    for name in manifest["files"]:
        if not name.startswith("neighbours."):
            (old / name).write_bytes((artifacts["cooc"] / name).read_bytes())
    manifest.pop("neighbours")
    manifest["files"] = {
        n: d for n, d in manifest["files"].items() if not n.startswith("neighbours.")
    }
    (old / "manifest.json").write_text(json.dumps(manifest))
    ranker = Ranker.load(old)
    assert type(ranker.scorer) is GraphScorer
    new = Ranker.load(artifacts["cooc"])
    requests = _requests(shop, np.random.default_rng(5), 30)
    for a, b in zip(new.rank_many(requests), ranker.rank_many(requests), strict=True):
        _same(a, b)


def test_kinds_that_are_not_item_item_ship_no_neighbour_files(shop, tmp_path) -> None:
    path = export.export_model(PopularityRecommender().fit(shop), shop, tmp_path / "pop")
    manifest = json.loads((path / "manifest.json").read_text())
    assert "neighbours" not in manifest and not list(path.glob("neighbours.*"))


@pytest.mark.parametrize("key", ["indptr", "indices", "data", "base"])
def test_a_tampered_or_missing_neighbour_file_is_refused(artifacts, tmp_path, key) -> None:
    import shutil

    copy = tmp_path / "art"
    shutil.copytree(artifacts["cooc"], copy)
    name = f"neighbours.{key}.npy"
    array = np.load(copy / name)
    np.save(copy / name, array[::-1].copy() if key != "base" else array + 1)
    with pytest.raises(ArtifactError, match=rf"{name}: sha256 does not match"):
        Ranker.load(copy)
    (copy / name).unlink()
    with pytest.raises(ArtifactError, match=rf"{name}: missing"):
        Ranker.load(copy)


@pytest.mark.parametrize("damage", ["truncated", "objects", "wrong_dtype"])
def test_a_damaged_neighbour_file_with_a_matching_hash_is_refused(artifacts, tmp_path,
                                                                  damage) -> None:  # fmt: skip
    """Past the hash: the file is parsed and checked where it is mapped, from the same open
    file that was hashed, and the scorer reads that mapping (not the file again by path)."""
    import hashlib
    import shutil

    ranker = Ranker.load(artifacts["cooc"])
    assert ranker.scorer.indices is ranker.artifact.mapped["neighbours.indices.npy"]
    copy = tmp_path / "art"
    shutil.copytree(artifacts["cooc"], copy)
    name = "neighbours.indices.npy"
    array = np.load(copy / name)
    if damage == "truncated":
        (copy / name).write_bytes((copy / name).read_bytes()[:-2])
    elif damage == "objects":
        np.save(copy / name, array.astype(object), allow_pickle=True)
    else:
        np.save(copy / name, array.astype(np.float32))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"][name] = hashlib.sha256((copy / name).read_bytes()).hexdigest()
    (copy / "manifest.json").write_text(json.dumps(manifest))
    expected = {"truncated": "truncated", "objects": "object array",
                "wrong_dtype": "expected a 1-d array of integers"}[damage]  # fmt: skip
    with pytest.raises(ArtifactError, match=rf"{name}: .*{expected}"):
        Ranker.load(copy)


def _copy_with_manifest(source, folder, edit):
    """A copy of the artifact ``source`` in ``folder`` with its manifest changed by ``edit``."""
    import shutil

    copy = folder / "art"
    shutil.copytree(source, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def test_a_manifest_naming_an_unlisted_neighbour_file_is_refused(artifacts, tmp_path) -> None:
    def edit(manifest):
        manifest["neighbours"]["data"] = "user_state.npz"

    with pytest.raises(ArtifactError, match=r"manifest\.json: field 'neighbours'"):
        Ranker.load(_copy_with_manifest(artifacts["cooc"], tmp_path, edit))


def test_the_neighbour_scorer_needs_its_manifest_field(artifacts, tmp_path) -> None:
    def edit(manifest):
        manifest["scorer"] = "neighbours"
        manifest.pop("neighbours")

    with pytest.raises(ArtifactError, match=r"field 'neighbours' is missing"):
        Ranker.load(_copy_with_manifest(artifacts["cooc"], tmp_path, edit))
