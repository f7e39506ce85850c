"""Export to ONNX and the serving module: parity with training on real data for every
exportable kind, tampered artifacts refused, business rules, and serving's import isolation."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp

from features.cleaning import CleaningConfig
from features.dataset import build_dataset
from features.splits import basket_completion_task
from serving import ArtifactError, Ranker, RuleSettings
from serving.ranker import RequestError
from tests.conftest import make_raw
from training.artifact_writer import NEIGHBOUR_FILES
from training.config import ModelConfig, build_model
from training.export import (
    EXPORTABLE,
    ExportError,
    build_graph,
    export_model,
    history_matrix,
)
from training.models import MODELS, PopularityRecommender, RecommenderBase
from training.pyfunc_model import FLAVOUR_FILES

ROOT = Path(__file__).resolve().parents[1]
KINDS = {
    "popularity": {},
    "personal_popularity": {"half_life_days": 30.0},
    "cooccurrence": {"neighbours": 50},
    "item_knn": {"similarity": "bm25", "neighbours": 20},
    "ease": {"max_items": 300, "neighbours": 50},
    "als": {"factors": 16, "iterations": 3},
    "bpr": {"factors": 16, "iterations": 5},
    "lmf": {"factors": 8, "iterations": 3},
    "lightfm": {"no_components": 8, "epochs": 2, "item_features": True, "user_features": True},
    "addon": {
        "cf_factors": 8,
        "cf_iterations": 2,
        "rebuy_weight": 0.5,
        "cooccurrence_weight": 0.3,
        "cf_weight": 0.2,
        "cooccurrence_damping": 0.1,
    },
}


def test_every_exportable_kind_is_tested() -> None:
    """Graph kinds here; a kind with its own scorer (``export_parts`` overridden) in its own
    tests/test_<kind>_serving.py."""
    own = {k for k in EXPORTABLE if MODELS[k].export_parts is not RecommenderBase.export_parts}
    assert set(KINDS) == set(EXPORTABLE) - own
    for kind in own:
        assert (ROOT / "tests" / f"test_{kind}_serving.py").is_file(), kind


@pytest.fixture(scope="module", params=sorted(KINDS))
def exported(request, cj_slice, tmp_path_factory):
    kind = request.param
    model = build_model(ModelConfig(kind, KINDS[kind])).fit(cj_slice.train)
    path = export_model(model, cj_slice.train, tmp_path_factory.mktemp(kind) / "artifact", run_id="r1",
                        metrics={"recall@10": 0.1}, fingerprint="f" * 64)  # fmt: skip
    return kind, model, path


def _graph_feeds(model, train, users, carts, order: np.ndarray, k: int = 10) -> dict:
    """Graph inputs for ``users`` (-1: anonymous) with ``carts`` (training indices, CSR),
    in the graph's item order: position p holds training item ``order[p]``."""
    position = np.empty_like(order)
    position[order] = np.arange(len(order))
    width = max(1, int(np.diff(carts.indptr).max()))
    cart = np.full((len(users), width), -1, dtype=np.int64)
    for r in range(len(users)):
        row = carts.indices[carts.indptr[r] : carts.indptr[r + 1]]
        cart[r, : len(row)] = position[row]
    hist = np.zeros((len(users), model.n_items_), np.float32)
    known = users >= 0
    hist[known] = history_matrix(model, train)[users[known]].toarray()
    hist = hist[:, order]
    owned = [np.flatnonzero(h) for h in hist]
    history_items = np.full((len(users), max(1, max(o.size for o in owned))), -1, dtype=np.int64)
    for r, o in enumerate(owned):
        history_items[r, : o.size] = o
    return {"user": users, "cart": cart, "history": hist, "history_items": history_items,
            "exclude": (carts.toarray() > 0)[:, order], "k": np.array([k], dtype=np.int64)}  # fmt: skip


def _run(onnx_model, feeds: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    source = str(onnx_model) if isinstance(onnx_model, Path) else onnx_model.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {n: v for n, v in feeds.items() if n in names})


def test_onnx_top_k_equals_training_top_k(exported, cj_slice) -> None:
    """Same ids, scores within 1e-5; where two items tie within 1e-5 either order is right."""
    kind, model, path = exported
    train = cj_slice.train
    task = basket_completion_task(train, cj_slice.test)
    users, carts = task.users[:80].astype(np.int64), task.carts[:80]
    users[:5] = -1  # anonymous shoppers with a cart
    ids = json.loads((path / "items.json").read_text())["ids"]
    order = train.item_map.to_internal(ids)  # the artifact's item order
    assert sorted(order) == list(range(model.n_items_))
    scores, items = _run(path / "model.onnx", _graph_feeds(model, train, users, carts, order))
    items = order[items]
    ref_items, ref_scores = model.recommend(users, carts, k=10)
    # within 1e-5, or 1e-6 relative for large scores (float32 sums in another order)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-6, atol=1e-5)
    full = model.score(users, carts)
    differ = items != ref_items
    # A different id is only acceptable as a tie: the training-side score of the ONNX pick
    # equals the training-side score at that rank.
    picked = np.take_along_axis(full, items, axis=1)
    assert np.all((np.abs(picked - ref_scores) <= 1e-5 + 1e-6 * np.abs(ref_scores))[differ]), kind
    assert differ.mean() < 0.05


@pytest.mark.parametrize("kind", ["als", "lightfm"])
def test_pruned_factor_graph_equals_scoring_every_item(kind, cj_slice) -> None:
    """The head + bound graph answers exactly as scoring all items, whether the head
    settles every row, some or none (k larger than the head), with and without exclusions."""
    import onnx

    train = cj_slice.train
    model = build_model(ModelConfig(kind, KINDS[kind])).fit(train)
    task = basket_completion_task(train, cj_slice.test)
    users, carts = task.users[:60].astype(np.int64), task.carts[:60]
    users[:4] = -1
    n = model.n_items_
    full = build_graph(model, head=n)
    assert full.head == n and (full.order == np.arange(n)).all()
    settled_counts = []
    for head in (n // 50, n // 4, n // 2):
        pruned = build_graph(model, head=head)
        assert pruned.head == head
        norms = np.linalg.norm(_factor_vectors(model)[pruned.order], axis=1)
        assert np.all(np.diff(norms) <= 1e-6)  # longest vectors first
        # expose which rows the head left unsettled (NonZero's output) to see both branches
        probe = onnx.ModelProto()
        probe.CopyFrom(pruned.onnx)
        nonzero = next(node for node in probe.graph.node if node.op_type == "NonZero")
        probe.graph.output.append(
            onnx.helper.make_tensor_value_info(nonzero.output[0], onnx.TensorProto.INT64, None)
        )
        for k in (10, head + 5):
            feeds = _graph_feeds(model, train, users, carts, pruned.order, k)
            feeds["exclude"][:, ::7] = True  # rules block some items
            scores, items, unsettled = _run(probe, feeds)
            ref_feeds = _graph_feeds(model, train, users, carts, full.order, k)
            ref_feeds["exclude"] = feeds["exclude"][:, np.argsort(pruned.order)]
            ref_scores, ref_items = _run(full.onnx, ref_feeds)
            np.testing.assert_allclose(scores, ref_scores, rtol=1e-6, atol=1e-6)
            same = pruned.order[items] == ref_items
            assert same.mean() > 0.98
            assert np.all(np.abs(scores - ref_scores)[~same] <= 1e-6)  # only ties swap
            assert (np.isneginf(scores) == np.isneginf(ref_scores)).all()
            settled_counts.append(len(users) - unsettled.shape[1])
            # too few items left: the excluded ones fill the tail of the answer as -inf
            few = _graph_feeds(model, train, users[:3], carts[:3], pruned.order, 6)
            few["exclude"][:] = True
            few["exclude"][:, [0, head // 2, n - 1]] = False
            few_scores, few_items = _run(pruned.onnx, few)
            assert np.isfinite(few_scores[:, :3]).all() and np.isneginf(few_scores[:, 3:]).all()
            assert set(few_items[:, :3].ravel()) == {0, head // 2, n - 1}
            if k > head:
                assert unsettled.shape[1] == len(users)  # the head cannot answer: all redo
    assert max(settled_counts) > 0 and min(settled_counts) < len(users)


def _factor_vectors(model) -> np.ndarray:
    return model.item_factors_ if hasattr(model, "item_factors_") else model.item_vectors_


def test_manifest_and_files(exported) -> None:
    kind, _, path = exported
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format"] == "addons.artifact/2" and manifest["model_kind"] == kind
    assert manifest["mlflow_run_id"] == "r1" and manifest["onnx_opset"] >= 17
    assert set(manifest["files"]) == {
        "model.onnx",
        "users.json",
        "items.json",
        "item_table.json",
        "user_state.npz",
        *FLAVOUR_FILES,  # the MLflow pyfunc flavour, hashed and signed like the rest
        # item x item kinds: their neighbour rows as CSR .npy (serving.neighbour_scorer)
        *(NEIGHBOUR_FILES.values() if kind in ("cooccurrence", "item_knn", "ease") else ()),
    }
    assert not list(path.glob("*.pkl")) and not list(path.glob("*.pickle"))
    # factor graphs over this catalog score a head of long vectors first; the rest score all
    pruned = kind in ("als", "bpr", "lmf", "lightfm")
    assert (manifest["scored_first"] < manifest["n_items"]) == pruned, manifest["scored_first"]


def test_ranker_matches_onnx_and_never_offers_the_cart(exported, cj_slice) -> None:
    """``Ranker.rank`` answers what the artifact's graph answers when fed by hand (the same
    user, cart and history; the only rule left on, impulse with no price ceiling, blocks items
    without a price): same scores, same ids up to ties; never a cart item."""
    _kind, model, path = exported
    ranker = Ranker.load(path, RuleSettings(in_stock_only=False, max_per_category=10**6,
                                            impulse_max_price=float("inf")))  # fmt: skip
    train = cj_slice.train
    user = int(train.interactions["user_id"][0])
    user_idx = train.user_map.to_internal([user]).astype(np.int64)
    cart_idx = train.user_item_counts()[user_idx[0]].indices[:3]
    cart = train.item_map.to_external(cart_idx).tolist()
    result = ranker.rank(user_id=user, cart=cart, offer="impulse", k=5)
    got = [i.item_id for i in result.items]
    assert len(got) == 5 and not set(got) & set(cart)
    assert not result.unknown_user and not result.unknown_items
    assert all(r.reason for r in result.items)
    ids = json.loads((path / "items.json").read_text())["ids"]
    order = train.item_map.to_internal(ids)
    carts = sp.csr_matrix(
        (np.ones(len(cart_idx), np.float32), (np.zeros(len(cart_idx), int), cart_idx)),
        shape=(1, model.n_items_),
    )
    feeds = _graph_feeds(model, train, user_idx, carts, order, k=6)  # one more: ties at 5
    price = json.loads((path / "item_table.json").read_text())["price"]
    feeds["exclude"] |= np.array([p is None for p in price])[None, :]
    scores, items = _run(path / "model.onnx", feeds)
    graph = scores[0]
    np.testing.assert_allclose([i.score for i in result.items], graph[:5], rtol=1e-6, atol=1e-6)
    want = [ids[p] for p in items[0][:5]]
    for r in np.flatnonzero(np.array(got) != np.array(want)):  # only tied items may swap
        tied = np.abs(graph[max(r - 1, 0) : r + 2] - graph[r]) <= 1e-6
        assert tied.sum() > 1, (r, got, want)


def test_ranker_answers_as_the_training_side(exported, cj_slice) -> None:
    """End to end through the artifact's own item order: external ids in, external ids out,
    equal to the training model's best items (rules off; ties within 1e-5 may swap)."""
    _kind, model, path = exported
    loose = RuleSettings(in_stock_only=False, max_per_category=10_000, max_k=20)
    ranker = Ranker.load(path, loose)
    train = cj_slice.train
    task = basket_completion_task(train, cj_slice.test)
    users = task.users[:12]
    empty = sp.csr_matrix((len(users), model.n_items_), dtype=np.float32)
    full = model.score(users, empty)
    for row, user in enumerate(users):
        ranked = np.argsort(-full[row], kind="stable")
        declined = train.item_map.to_external(ranked[:3]).tolist()  # the caller's exclusions
        got = ranker.rank(user_id=train.user_map.to_external([user])[0], k=8, exclude=declined)
        ids = train.item_map.to_internal([i.item_id for i in got.items])
        assert not set(ranked[:3]) & set(ids)
        best = full[row][ranked[3:11]]
        np.testing.assert_allclose(full[row][ids], best, rtol=1e-6, atol=1e-5)


class _Custom(PopularityRecommender):
    """A kind someone added without giving it a graph (its class does not say exportable)."""

    kind = "custom"
    exportable = False


class _Claims(PopularityRecommender):
    """A kind that says it is exportable but builds no graph (neither method overridden)."""

    kind = "claims"
    graph_scores = RecommenderBase.graph_scores


def test_a_kind_without_a_graph_says_so(cj_slice) -> None:
    for cls in (_Custom, _Claims):
        model = cls().fit(cj_slice.train)
        with pytest.raises(ExportError, match="cannot be exported"):
            export_model(model, cj_slice.train, Path("/nonexistent/never-written"))
    wide = build_model(ModelConfig("ease", {"max_items": 1200, "neighbours": 0})).fit(
        cj_slice.train
    )
    with pytest.raises(ExportError, match="too wide"):
        export_model(wide, cj_slice.train, Path("/nonexistent/never-written"))


SHOP_ITEMS = [
    {"item_id": 1, "category": "cam", "price": 100.0, "margin": 0.1, "in_stock": True},
    {"item_id": 2, "category": "card", "price": 10.0, "margin": 0.5, "in_stock": True},
    {"item_id": 3, "category": "card", "price": 20.0, "margin": 0.2, "in_stock": True},
    {"item_id": 4, "category": "bag", "price": 30.0, "margin": 0.3, "in_stock": False},
    {"item_id": 5, "category": "cam", "price": 120.0, "margin": 0.2, "in_stock": True},
    {"item_id": 6, "category": "cam", "price": 200.0, "margin": 0.2, "in_stock": True},
    {"item_id": 7, "category": "bat", "price": 5.0, "margin": 0.9, "in_stock": True},
    {"item_id": 8, "category": "bat", "price": 6.0, "margin": 0.1, "in_stock": True},
]


def _shop_baskets(days: Callable[[int], int]) -> list[tuple]:
    """Users 1-6 alternate two baskets, (1, 2, 3, 4, 5) and (1, 2, 6, 7, 8), over
    ``days(user)`` days."""
    rows, basket = [], 0
    for user in range(1, 7):
        for day in range(days(user)):
            basket += 1
            for item in (1, 2, 3, 4, 5) if (user + day) % 2 else (1, 2, 6, 7, 8):
                rows.append((user, item, basket, day, 1))
    return rows


@pytest.fixture(scope="module")
def shop_data():
    """A tiny shop with categories, prices and stock; every user bought every item."""
    return build_dataset(make_raw(_shop_baskets(lambda user: 4), SHOP_ITEMS), CleaningConfig())


@pytest.fixture(scope="module")
def shop(shop_data, tmp_path_factory):
    """The tiny shop exported with the co-occurrence model."""
    model = build_model(ModelConfig("cooccurrence", {})).fit(shop_data)
    return export_model(model, shop_data, tmp_path_factory.mktemp("shop") / "artifact")


def test_a_reordered_factor_artifact_answers_as_one_in_training_order(tmp_path) -> None:
    """A factor model (LightFM: vectors and biases) exported twice: with a head of 3
    (items.json, the item table and the user state in vector-length order) and without one
    (training order). With the rules on, every request (offers, anchors, unknown ids,
    exclusions, fresher history, owned items) answers the same: ids, reasons, categories,
    prices. (ALS would not do here: BM25 gives every item of this shop weight 0, so every
    score ties and ties go to the lower graph position.)"""
    # even users bought one basket only: the user state differs between users
    shop_data = build_dataset(
        make_raw(_shop_baskets(lambda user: 1 + user % 2), SHOP_ITEMS), CleaningConfig()
    )
    model = build_model(ModelConfig("lightfm", {"no_components": 4, "epochs": 10})).fit(shop_data)
    assert len(np.unique(model.item_vectors_ @ model.unknown_user_ + model.item_biases_)) == 8
    reordered = export_model(model, shop_data, tmp_path / "head", head=3)
    plain = export_model(model, shop_data, tmp_path / "all", head=model.n_items_)
    ids = json.loads((reordered / "items.json").read_text())["ids"]
    assert ids != sorted(ids) and json.loads((plain / "items.json").read_text())["ids"] == sorted(
        ids
    )
    requests = [
        {"user_id": user, "cart": cart, "anchor": anchor, "offer": offer, "k": 4, **extra}
        for user in (1, 4, None, 99)
        for cart, anchor in (([1], None), ([2, 7], None), ([], 1), ([3], 6))
        for offer in ("cross_sell", "up_sell", "bundle", "impulse")
        for extra in ({}, {"exclude": [2, 8]}, {"history": {7: 3.0, 5: 1.0}})
    ]
    for settings in (
        RuleSettings(),
        RuleSettings(exclude_owned=True, max_per_category=1, impulse_max_price=25.0),
        RuleSettings(margin_weight=1.0, cross_sell_max_price_ratio=1.0, in_stock_only=False),
    ):
        got = Ranker.load(reordered, settings).rank_many(requests, batch_size=7)
        want = Ranker.load(plain, settings).rank_many(requests, batch_size=7)
        assert sum(len(r.items) for r in got) > len(requests) // 2  # offers left to compare
        for a, b in zip(got, want, strict=True):
            assert [(i.item_id, i.reason, i.category, i.price) for i in a.items] == [
                (i.item_id, i.reason, i.category, i.price) for i in b.items
            ]
            np.testing.assert_allclose(
                [i.score for i in a.items], [i.score for i in b.items], rtol=1e-5
            )
            assert (a.unknown_user, a.unknown_items) == (b.unknown_user, b.unknown_items)


def test_non_finite_factors_are_refused(cj_slice) -> None:
    model = build_model(ModelConfig("als", KINDS["als"])).fit(cj_slice.train)
    model.item_factors_[5, 0] = np.nan
    with pytest.raises(ExportError, match="non-finite item"):
        build_graph(model)


def test_rules_cross_sell_up_sell_stock_and_category_cap(shop) -> None:
    r = Ranker.load(shop)
    cross = [i.item_id for i in r.rank(cart=[1], anchor=1, offer="cross_sell", k=5).items]
    assert cross and all(i in (2, 3, 7, 8) for i in cross)  # other category, <= 40% of 100
    assert 4 not in cross  # out of stock
    up = [i.item_id for i in r.rank(anchor=1, offer="up_sell", k=5).items]
    assert up == [5]  # same category, 100 < price <= 125
    loose = Ranker.load(shop, RuleSettings(up_sell_max_price_increase=1.5))
    assert set(i.item_id for i in loose.rank(anchor=1, offer="up_sell", k=5).items) == {5, 6}
    capped = Ranker.load(shop, RuleSettings(max_per_category=1, cross_sell_max_price_ratio=1.0))
    cats = {2: "card", 3: "card", 7: "bat", 8: "bat"}
    got = [i.item_id for i in capped.rank(cart=[1], offer="cross_sell", k=5).items]
    assert len({cats[i] for i in got}) == len(got)


def test_margin_weight_reorders(shop) -> None:
    plain = Ranker.load(shop, RuleSettings(cross_sell_max_price_ratio=1.0, max_per_category=5))
    greedy = Ranker.load(
        shop, RuleSettings(cross_sell_max_price_ratio=1.0, max_per_category=5, margin_weight=100.0)
    )
    a = [i.item_id for i in plain.rank(cart=[1], k=4).items]
    b = [i.item_id for i in greedy.rank(cart=[1], k=4).items]
    assert set(a) == set(b) and b[0] == 7  # highest margin first when margin dominates


def test_unknown_ids_are_named_and_requests_checked(shop) -> None:
    r = Ranker.load(shop)
    result = r.rank(user_id=999, cart=[1, 12345], k=2)
    assert result.unknown_user and result.unknown_items == [12345]
    for kwargs, field in (({"k": 0}, "k"), ({"k": 99}, "k"), ({"offer": "free"}, "offer"),
                          ({"placement": "moon"}, "placement"), ({"cart": list(range(500))}, "cart")):  # fmt: skip
        with pytest.raises(RequestError, match=field):
            r.rank(**kwargs)


def test_fresher_history_takes_precedence(cj_slice, tmp_path) -> None:
    model = build_model(ModelConfig("personal_popularity", {})).fit(cj_slice.train)
    path = export_model(model, cj_slice.train, tmp_path / "a")
    r = Ranker.load(path, RuleSettings(in_stock_only=False, max_per_category=100))
    user = int(cj_slice.train.interactions["user_id"][0])
    pick = int(cj_slice.train.item_map.external_ids[-1])  # an item this user never bought
    result = r.rank(user_id=user, history={pick: 50.0}, offer="cross_sell", k=3)
    assert result.items[0].item_id == pick and result.items[0].reason == "bought before"


def test_tampered_or_broken_artifacts_are_refused(shop, tmp_path) -> None:
    import shutil

    for target, change in (
        ("items.json", "append"),
        ("model.onnx", "append"),
        ("user_state.npz", "delete"),
    ):
        copy = tmp_path / f"a_{target}"
        shutil.copytree(shop, copy)
        if change == "append":
            with (copy / target).open("ab") as fh:
                fh.write(b" ")
        else:
            (copy / target).unlink()
        with pytest.raises(ArtifactError, match=target.replace(".", r"\.")):
            Ranker.load(copy)
    # hashes that match but an id list that cannot be an index: refused by name
    dup = tmp_path / "dup"
    shutil.copytree(shop, dup)
    ids = json.loads((dup / "items.json").read_text())
    ids["ids"][1] = ids["ids"][0]
    (dup / "items.json").write_text(json.dumps(ids))
    manifest = json.loads((dup / "manifest.json").read_text())
    manifest["files"]["items.json"] = hashlib.sha256((dup / "items.json").read_bytes()).hexdigest()
    (dup / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"items\.json: ids are not unique"):
        Ranker.load(dup)
    bad = tmp_path / "bad"
    shutil.copytree(shop, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["format"] = "pickle/1"
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="format"):
        Ranker.load(bad)
    with pytest.raises(ArtifactError, match="manifest"):
        Ranker.load(tmp_path / "nowhere")


def test_importing_serving_pulls_in_no_training_stack() -> None:
    code = (
        "import sys, serving; "
        "bad = [m for m in ('training', 'features', 'implicit', 'lightfm', 'scipy', 'mlflow', 'polars') "
        "if m in sys.modules]; print(','.join(bad))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert out.stdout.strip() == ""


def test_export_writes_nothing_on_failure(cj_slice, tmp_path) -> None:
    model = build_model(ModelConfig("ease", {"max_items": 1200, "neighbours": 0})).fit(
        cj_slice.train
    )
    with pytest.raises(ExportError):
        export_model(model, cj_slice.train, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


#: Run in a fresh interpreter where the training stack cannot be imported: a meta path
#: finder refuses these top-level names, so any import of them (direct or inside a library
#: serving uses) raises ImportError instead of silently loading an installed copy.
_BLOCKED = ("polars", "scipy", "training", "features", "implicit", "lightfm", "mlflow", "pandas")
_WITHOUT_TRAINING_STACK = """
import json, sys

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked in this test")
        return None

BLOCKED = set(json.loads(sys.argv[2]))
sys.meta_path.insert(0, Blocker())
try:
    import polars  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("the blocker does not work")
from serving import Ranker, RuleSettings
ranker = Ranker.load(sys.argv[1], RuleSettings(cross_sell_max_price_ratio=1.0, max_per_category=5))
result = ranker.rank(cart=[1], offer="cross_sell", k=4)
print(json.dumps({"items": [[i.item_id, i.category, i.price] for i in result.items],
                  "loaded": sorted(m for m in BLOCKED if m in sys.modules)}))
"""


def test_polars_is_not_needed_to_read_the_item_table(shop) -> None:
    """Serving loads the artifact (item table included) and ranks with polars and the rest
    of the training stack unimportable, and none of it ends up in ``sys.modules``."""
    proc = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TRAINING_STACK, str(shop), json.dumps(_BLOCKED)],
        capture_output=True, text=True, cwd=ROOT, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["loaded"] == []
    # the offers carry the item table's facts: category and price as the shop wrote them
    facts = {row["item_id"]: (row["category"], row["price"]) for row in SHOP_ITEMS}
    assert out["items"], "no offer to check the item table against"
    for item_id, category, price in out["items"]:
        assert (category, price) == facts[item_id], item_id


def test_rank_many_equals_one_by_one(shop) -> None:
    r = Ranker.load(shop, RuleSettings(cross_sell_max_price_ratio=1.0))
    requests = [{"user_id": u, "cart": c, "k": k} for u, c, k in
                [(1, [1], 2), (2, [], 3), (None, [2, 3], 1), (77, [1, 99], 4)]]  # fmt: skip
    batched = r.rank_many(requests, batch_size=3)
    single = [r.rank(**q) for q in requests]
    assert [b.to_dict() for b in batched] == [s.to_dict() for s in single]


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_rank_batch_streams_to_file(shop, tmp_path, suffix, monkeypatch) -> None:
    from training.cli import main

    users = tmp_path / "users.csv"
    users.write_text("user_id,cart\n" + "".join(f"{u},1|2\n" for u in [1, 2, 3, 4, 5, 6, 999] * 30))
    out = tmp_path / f"offers{suffix}"
    batches: list[int] = []  # requests per rank_many call: streamed means chunk by chunk
    real_rank_many = Ranker.rank_many

    def spy(self, requests, *args, **kwargs):
        batches.append(len(requests))
        return real_rank_many(self, requests, *args, **kwargs)

    monkeypatch.setattr(Ranker, "rank_many", spy)
    assert main(["rank-batch", "--model", str(shop), "--users", str(users), "--out", str(out),
                 "--k", "2", "--chunk-size", "16", "--quiet"]) == 0  # fmt: skip
    assert sum(batches) == 210 and max(batches) <= 16, batches
    if suffix == ".parquet":  # written as it goes: one row group per chunk
        import pyarrow.parquet as pq

        assert pq.ParquetFile(out).num_row_groups == len(batches)
    monkeypatch.undo()
    rows = pl.read_csv(out) if suffix == ".csv" else pl.read_parquet(out)
    assert rows["user_id"].cast(pl.String).n_unique() == 7
    assert rows["rank"].max() <= 2 and rows.height <= 2 * 7 * 30
    assert rows.height == sum(len(x.items) for x in Ranker.load(shop).rank_many(
        [{"user_id": str(u), "cart": ["1", "2"], "k": 2, "placement": "email"} for u in [1, 2, 3, 4, 5, 6, 999] * 30]
    ))  # fmt: skip
    assert not rows["item_id"].cast(pl.String).is_in(["1", "2"]).any()  # never the cart
    expected = Ranker.load(shop).rank(user_id=1, cart=[1, 2], k=2, placement="email")
    first = rows.filter(pl.col("user_id").cast(pl.String) == "1").head(2)
    assert first["item_id"].cast(pl.String).to_list() == [str(i.item_id) for i in expected.items]
    bad = tmp_path / "bad.csv"
    bad.write_text("customer\n1\n")
    assert (
        main(
            [
                "rank-batch",
                "--model",
                str(shop),
                "--users",
                str(bad),
                "--out",
                str(tmp_path / "x.csv"),
            ]
        )
        == 2
    )
    assert not (tmp_path / "x.csv").exists() and not list(tmp_path.glob(".x.csv*"))
