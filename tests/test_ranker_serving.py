"""The learned ranker served: ONNX trees against LightGBM, the served top-k against the
training-side top-k (small generated data and a Complete Journey slice), the shared
candidate/feature module (batch independence, state round trip and checks), reasons."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import scipy.sparse as sp

from features.splits import basket_completion_task, global_time_split
from serving import Ranker, RuleSettings
from serving.artifact import ArtifactError
from serving.ranker_features import (
    FEATURE_NAMES,
    FEATURES,
    RankerState,
    StateError,
    candidate_features,
    query_candidates,
    query_features,
    reasons,
)
from tests.test_ranker import SMALL, _shop
from training.export import export_model
from training.models.base import CandidateFilter
from training.models.ranker import RankerRecommender

#: Rules that let every candidate through (impulse with no price cap, no stock or category
#: rule, no per-category cap), so the served list is the model's list.
NEUTRAL = RuleSettings(in_stock_only=False, impulse_max_price=float("inf"), max_per_category=20,
                       default_k=10)  # fmt: skip


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    data = _shop()
    split = global_time_split(data, 10, 11, column="week")
    model = RankerRecommender(**SMALL).fit(split.train)
    path = export_model(model, split.train, tmp_path_factory.mktemp("ranker") / "artifact")
    return split, model, path


def _session(model: RankerRecommender):
    import onnxruntime as ort

    proto = model.tree_onnx().SerializeToString()
    return ort.InferenceSession(proto, providers=["CPUExecutionProvider"])


def _check_onnx_parity(model: RankerRecommender, users, carts) -> int:
    session = _session(model)
    n = 0
    for exclude_owned in (False, True):
        X = model.query_batch(users, carts, exclude_owned).features
        raw, prob = session.run(["raw", "probability"], {"features": X})
        np.testing.assert_allclose(raw.ravel(), model.predict_pairs(X), rtol=0, atol=1e-5)
        np.testing.assert_allclose(prob.ravel(), model.predict_proba(X), rtol=0, atol=1e-5)
        n += X.shape[0]
    return n


def _served_equals_training(model, train, path, users, carts, exclude_owned, k=10) -> float:
    """Served offers (Ranker, neutral rules) against ``model.recommend``: the same ids, where
    they differ the training-side raw scores tie; served probabilities within 1e-5 of
    ``predict_proba``. Returns the share of differing slots."""
    ranker = Ranker.load(path, NEUTRAL.replace(exclude_owned=exclude_owned))
    no_price = np.flatnonzero(~np.isfinite(train.item_prices()))  # impulse needs a price
    flt = CandidateFilter(exclude_owned=exclude_owned, block_items=no_price)
    ref_items, _ = model.recommend(users, carts, k=k, candidates=flt)
    batch = model.query_batch(users, carts, exclude_owned)
    raw = model.predict_pairs(batch.features).astype(np.float32)
    prob = model.predict_proba(batch.features)
    pair = {
        (int(q), int(j)): (r, p)
        for q, j, r, p in zip(batch.rows, batch.cols, raw, prob, strict=True)
    }
    differ = total = 0
    for q in range(len(users)):
        user = None if users[q] < 0 else train.user_map.to_external(np.array([users[q]]))[0]
        cart = train.item_map.to_external(carts[q].indices).tolist()
        result = ranker.rank(user_id=user, cart=cart, offer="impulse", k=k)
        served = train.item_map.to_internal([i.item_id for i in result.items]).tolist()
        expected = [int(j) for j in ref_items[q] if j >= 0]
        assert len(served) == len(expected)
        for slot, (s, e) in enumerate(zip(served, expected, strict=True)):
            total += 1
            if s != e:  # only a tie of the training-side scores may swap two items
                differ += 1
                assert (q, s) in pair and (q, e) in pair, (q, slot, s, e)
                assert pair[(q, s)][0] == pair[(q, e)][0], (q, slot, s, e)
            if (q, s) in pair:
                assert result.items[slot].score == pytest.approx(pair[(q, s)][1], abs=1e-5)
            assert result.items[slot].reason
    return differ / max(total, 1)


def test_onnx_trees_equal_lightgbm(small) -> None:
    split, model, _ = small
    task = basket_completion_task(split.train, split.test)
    assert _check_onnx_parity(model, task.users, task.carts) > 100
    from training.onnx_graph import OPSET

    opsets = {o.domain: o.version for o in model.tree_onnx().opset_import}
    assert opsets.get("", opsets.get("ai.onnx")) == OPSET  # what the manifest states


@pytest.mark.parametrize("exclude_owned", [False, True])
def test_served_top_k_equals_training_top_k(small, exclude_owned) -> None:
    split, model, path = small
    task = basket_completion_task(split.train, split.test, new_to_user=exclude_owned)
    users = task.users.astype(np.int64).copy()
    if not exclude_owned:  # (training's owned filter masks user 0's items for user -1: reported)
        users[:3] = -1  # anonymous shoppers with a cart
    assert _served_equals_training(model, split.train, path, users, task.carts,
                                   exclude_owned) < 0.05  # fmt: skip


def test_served_top_k_with_the_offer_rules_equals_training_with_those_items_blocked(small) -> None:
    """Cross-sell rules (other categories, price window, stock) drop items after the scorer;
    training with the same items blocked gives the same list."""
    from serving.rules import exclusion_mask

    split, model, path = small
    train = split.train
    settings = RuleSettings(max_per_category=20, default_k=5)
    ranker = Ranker.load(path, settings)
    task = basket_completion_task(train, split.test)
    for q in range(min(task.n_queries, 15)):
        cart = task.carts[q].indices
        user = int(task.users[q])
        mask = exclusion_mask(ranker.catalog, settings, "cross_sell", None, cart,
                              np.zeros(0, dtype=np.int64),
                              np.zeros(train.n_items, dtype=np.float32))  # fmt: skip
        ref, _ = model.recommend(np.array([user]), task.carts[q], k=5,
                                 candidates=CandidateFilter(block_items=np.flatnonzero(mask)))  # fmt: skip
        result = ranker.rank(
            user_id=train.user_map.to_external(np.array([user]))[0],
            cart=train.item_map.to_external(cart).tolist(),
            offer="cross_sell",
            k=5,
        )
        served = train.item_map.to_internal([i.item_id for i in result.items]).tolist()
        assert served == [int(j) for j in ref[0] if j >= 0]


def test_an_empty_cart_is_ranked_by_re_buy_as_in_training(small) -> None:
    split, model, path = small
    ranker = Ranker.load(path, NEUTRAL)
    users = np.arange(5, dtype=np.int64)
    ref, _ = model.recommend(users, sp.csr_matrix((5, model.n_items_)), k=5,
                             candidates=CandidateFilter(block_items=np.zeros(0, dtype=np.int64)))  # fmt: skip
    for q, u in enumerate(users):
        result = ranker.rank(user_id=split.train.user_map.to_external(np.array([u]))[0],
                             cart=[], offer="impulse", k=5)  # fmt: skip
        served = split.train.item_map.to_internal([i.item_id for i in result.items]).tolist()
        assert served == ref[q].tolist()
        assert {i.reason for i in result.items} <= {"bought before", "popular"}


@pytest.mark.parametrize("exclude_owned", [False, True])
def test_query_features_do_not_depend_on_the_other_queries_of_the_batch(
    small, monkeypatch, exclude_owned
) -> None:
    """Training computes features in batches of many queries (dense rows), serving one
    request at a time (its own path, ``_one_query``), a few queries take the sparse path: a
    query's candidates and features must be the same every way (bit for bit), for known and
    anonymous shoppers, with repeated and unsorted cart items, and with the rank features cut
    at a depth this small shop's lists pass."""
    import serving.ranker_features as rf

    monkeypatch.setattr(rf, "RANK_DEPTH", 12)
    split, model, _ = small
    task = basket_completion_task(split.train, split.test)
    st = model.state_
    carts = task.carts
    users = task.users.astype(np.int64).copy()
    users[::3] = -1
    whole = query_features(st, users, carts.indptr, carts.indices, exclude_owned)
    checked = 0
    for q in range(0, task.n_queries, 5):
        cart = carts[q].indices[::-1]
        cart = np.concatenate([cart, cart[:1]])  # unsorted, one item twice
        alone = query_features(st, users[q : q + 1], np.array([0, cart.size]), cart,
                               exclude_owned)  # fmt: skip
        few = query_features(st, users[q : q + 3], carts[q : q + 3].indptr,
                             carts[q : q + 3].indices, exclude_owned)  # fmt: skip
        lo, hi = whole.indptr[q], whole.indptr[q + 1]
        for part in (alone, few):
            n = np.diff(part.indptr)[0]
            assert np.array_equal(part.items[:n], whole.items[lo:hi])
            assert np.array_equal(part.sources[:n], whole.sources[lo:hi])
            assert np.array_equal(part.features[:n], whole.features[lo:hi], equal_nan=True)
        checked += hi - lo
    assert checked > 100


@pytest.mark.parametrize("batch", [1, 3, 40])
def test_features_of_a_subset_of_candidates_are_its_rows_of_the_whole(small, batch) -> None:
    """Serving computes features only for the candidates the rules allow: a subset's rows
    (any positions, any order) are the full matrix's rows, bit for bit."""
    split, model, _ = small
    task = basket_completion_task(split.train, split.test)
    st = model.state_
    users = task.users[:batch].astype(np.int64)
    carts = task.carts[:batch]
    whole = query_features(st, users, carts.indptr, carts.indices, True)
    cands = query_candidates(st, users, carts.indptr, carts.indices, True)
    assert np.array_equal(cands.items, whole.items) and np.array_equal(cands.indptr, whole.indptr)
    rng = np.random.default_rng(batch)
    select = rng.permutation(cands.items.size)[: max(cands.items.size // 3, 1)]
    assert np.array_equal(candidate_features(st, cands, select), whole.features[select],
                          equal_nan=True)  # fmt: skip
    assert candidate_features(st, cands, np.zeros(0, dtype=np.int64)).shape == (0, len(FEATURES))


@pytest.mark.parametrize(
    ("exclude_owned", "unique_sums"), [(False, 10**9), (True, 10**9), (True, 0)]
)
def test_the_sparse_and_dense_paths_agree_bit_for_bit(
    small, monkeypatch, exclude_owned, unique_sums
) -> None:
    """A request is computed over the touched items only, a training batch over dense rows:
    the same candidates, sources and features either way (also when a request's sums go
    through np.unique, as real requests on a large catalog do)."""
    import serving.ranker_features as rf

    monkeypatch.setattr(rf, "UNIQUE_SUM_RATIO", unique_sums)  # 0: always np.unique; huge: never
    split, model, _ = small
    task = basket_completion_task(split.train, split.test)
    users = task.users.astype(np.int64).copy()
    users[::5] = -1
    args = (model.state_, users, task.carts.indptr, task.carts.indices, exclude_owned)
    monkeypatch.setattr(rf, "SPARSE_MAX_QUERIES", 0)
    dense = query_features(*args)
    monkeypatch.setattr(rf, "SPARSE_MAX_QUERIES", rf.CHUNK)
    sparse = query_features(*args)
    assert dense.items.size > 100
    for name in ("indptr", "items", "sources"):
        assert np.array_equal(getattr(dense, name), getattr(sparse, name)), name
    assert np.array_equal(dense.features, sparse.features, equal_nan=True)


def test_state_round_trip_and_malformed_states_are_refused(small) -> None:
    _, model, _ = small
    buffer = io.BytesIO()
    np.savez(buffer, **model.state_.to_arrays())
    with np.load(io.BytesIO(buffer.getvalue()), allow_pickle=False) as npz:
        again = RankerState.from_arrays({k: npz[k] for k in npz.files})
    users, carts = np.array([0, 1, -1]), sp.csr_matrix(np.eye(3, model.n_items_, dtype=np.float32))
    a = query_features(model.state_, users, carts.indptr, carts.indices)
    b = query_features(again, users, carts.indptr, carts.indices)
    assert np.array_equal(a.features, b.features, equal_nan=True)
    arrays = model.state_.to_arrays()
    for change, field in (
        ({"co_items": arrays["co_items"].astype(np.int64)}, "co_items"),  # dtype
        ({"sim_items": np.full_like(arrays["sim_items"], model.n_items_)}, "sim_items"),  # range
        ({"price": arrays["price"][:-1]}, "price"),  # length
        ({"ui_indptr": arrays["ui_indptr"][::-1].copy()}, "ui_indptr"),  # not a row pointer
    ):
        with pytest.raises(StateError, match=field):
            RankerState.from_arrays({**arrays, **change})
    with pytest.raises(StateError, match="user_lines: missing"):
        RankerState.from_arrays({k: v for k, v in arrays.items() if k != "user_lines"})


def test_popular_source_and_a_state_from_before_it(small) -> None:
    """The ``popular`` source proposes the n_popular items with the most recent baskets,
    never an excluded one; a state written before the source existed (no ``n_popular``)
    still loads, with the source off."""
    from serving.ranker_features import SOURCES

    split, model, _ = small
    st = model.state_
    recent = np.nan_to_num(st.item_baskets * st.item_recent_share)
    expected = sorted(range(st.n_items), key=lambda j: (-recent[j], j))[: st.n_popular]
    assert st.n_popular > 0 and recent[expected].min() > 0
    task = basket_completion_task(split.train, split.test, new_to_user=True)
    users = task.users.astype(np.int64)
    for q in range(min(task.n_queries, 10)):
        cart = task.carts[q].indices
        got = query_features(st, users[q : q + 1], task.carts[q].indptr, cart, True)
        popular = set(got.items[(got.sources & SOURCES["popular"]) > 0].tolist())
        owned = set(st.ui_items[st.ui_indptr[users[q]] : st.ui_indptr[users[q] + 1]].tolist())
        assert popular == set(expected) - set(cart.tolist()) - owned
    arrays = {k: v for k, v in st.to_arrays().items() if k != "n_popular"}
    old = RankerState.from_arrays(arrays)
    assert old.n_popular == 0
    got = query_features(old, users[:5], task.carts[:5].indptr, task.carts[:5].indices, True)
    assert not (got.sources & SOURCES["popular"]).any()


def test_the_empty_cart_rule_is_the_one_that_won_on_the_training_window(small) -> None:
    """Training scores next-period queries of its window with decayed and with plain counts
    and keeps the better; the state carries the choice, so serving ranks an empty cart the
    same way; a state from before the choice existed means decayed counts."""
    _, model, _ = small
    choice = model.validation_["empty_cart"]
    assert choice["counts_wins"] == (choice["counts_ndcg_at_10"] > choice["decayed_ndcg_at_10"])
    st = model.state_
    assert st.empty_cart_counts == int(choice["counts_wins"])
    user = int(np.argmax(np.diff(st.ui_indptr)))
    lo, hi = st.ui_indptr[user], st.ui_indptr[user + 1]
    for flag, expected in ((0, st.ui_decayed), (1, st.ui_n)):
        flipped = RankerState.from_arrays({**st.to_arrays(), "empty_cart_counts": np.asarray(flag)})
        items, values = flipped.rebuy_scores(user)
        assert np.array_equal(items, st.ui_items[lo:hi])
        assert np.array_equal(values, expected[lo:hi])
    old = {k: v for k, v in st.to_arrays().items() if k != "empty_cart_counts"}
    assert RankerState.from_arrays(old).empty_cart_counts == 0


def test_an_artifact_of_another_feature_set_is_refused(small, tmp_path) -> None:
    import shutil

    _, _, path = small
    copy = tmp_path / "artifact"
    shutil.copytree(path, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["ranker"]["features"] = manifest["ranker"]["features"][:-1]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"ranker\.features"):
        Ranker.load(copy)


def test_reasons_name_the_signal_and_the_cart_item(small) -> None:
    _, model, _ = small
    st = model.state_
    col = {n: k for k, n in enumerate(FEATURE_NAMES)}
    x = np.full((5, len(FEATURE_NAMES)), np.nan, dtype=np.float32)
    x[:, col["rebuy_baskets"]] = 0
    x[:, col["user_baskets"]] = 10  # a known shopper
    x[:, col["cooc_max_conf"]] = x[:, col["cart_same_subcategory"]] = x[:, col["knn_score"]] = 0
    x[0, col["rebuy_baskets"]], x[0, col["mean_interval_days"]] = 5, 14.2
    x[1, col["rebuy_baskets"]], x[1, col["mean_interval_days"]] = 3, 3.0
    x[4, col["knn_score"]] = 0.3
    # the strongest rule's cart item is named, with its confidence
    i = int(np.argmax(np.diff(st.co_indptr)))
    j = int(st.co_items[st.co_indptr[i]])
    conf = st.co_count[st.co_indptr[i]] / st.item_baskets[i]
    same = np.flatnonzero(st.subcategory == st.subcategory[j])
    other = int(same[same != j][0])
    items = np.array([0, 0, j, j, j])
    got = reasons(st, x, items, np.array([i]))
    assert got[:2] == [("you buy this every 2 weeks", None), ("you buy this every 3 days", None)]
    assert got[2] == (f"bought with {{cart}} in {round(100 * conf)} % of baskets", i)
    x[3, col["rebuy_baskets"]] = 1
    assert reasons(st, x, items, np.array([i]))[3][0].startswith("bought with")
    assert reasons(st, x, items, np.zeros(0, dtype=np.int64))[3] == ("bought before", None)
    # without any rule: the same sub-category names the cart item, else similarity, else popular
    arrays = st.to_arrays()
    arrays.update(co_indptr=np.zeros_like(arrays["co_indptr"]), co_items=np.zeros(0, np.int32),
                  co_count=np.zeros(0, np.float32))  # fmt: skip
    no_rules = RankerState.from_arrays(arrays)
    got = reasons(no_rules, x, items, np.array([other]))
    assert got[2] == ("same aisle as {cart}", other)
    assert got[3] == ("bought before", None)
    assert got[4] == ("same aisle as {cart}", other)  # the aisle comes before similarity
    far = np.flatnonzero(st.subcategory != st.subcategory[j])[:1]
    assert reasons(no_rules, x, items, far)[4] == ("similar to what you buy", None)
    assert reasons(no_rules, x, items, far)[2] == ("popular", None)
    x[4, col["user_baskets"]] = np.nan  # an unknown shopper: only the cart is similar
    assert reasons(no_rules, x, items, far)[4] == ("similar to your cart", None)


_SERVE_BLOCKED = """
import json, sys

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked in this test")
        return None

BLOCKED = {"polars", "scipy", "training", "features", "implicit", "lightfm", "mlflow", "pandas",
           "lightgbm", "onnxmltools"}
sys.meta_path.insert(0, Blocker())
from serving import Ranker, RuleSettings
rules = RuleSettings(in_stock_only=False, impulse_max_price=float("inf"), max_per_category=20)
result = Ranker.load(sys.argv[1], rules).rank(user_id=int(sys.argv[2]), cart=[int(sys.argv[3])],
                                              offer="impulse", k=3)
print(json.dumps({"items": [[i.item_id, i.reason] for i in result.items],
                  "loaded": sorted(m for m in BLOCKED if m in sys.modules)}))
"""


def test_the_ranker_artifact_serves_without_the_training_stack(small) -> None:
    """LightGBM, onnxmltools, scipy, polars, training: none is needed (nor imported) to
    serve the learned ranker."""
    import subprocess
    import sys

    split, _, path = small
    user = split.train.user_map.to_external(np.array([0]))[0]
    item = split.train.item_map.to_external(np.array([0]))[0]
    proc = subprocess.run([sys.executable, "-c", _SERVE_BLOCKED, str(path), str(user), str(item)],
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["loaded"] == [] and len(out["items"]) == 3
    in_process = Ranker.load(path, NEUTRAL).rank(
        user_id=int(user), cart=[int(item)], offer="impulse", k=3
    )
    assert out["items"] == [[i.item_id, i.reason] for i in in_process.items]


def test_rank_many_equals_one_by_one(small) -> None:
    split, _, path = small
    r = Ranker.load(path, NEUTRAL)
    ids = split.train.item_map.to_external(np.arange(6)).tolist()
    users = split.train.user_map.to_external(np.arange(3)).tolist()
    requests = [{"user_id": users[0], "cart": ids[:2], "k": 4, "offer": "impulse"},
                {"user_id": users[1], "cart": [], "k": 3, "offer": "impulse"},
                {"user_id": None, "cart": ids[2:5], "k": 5, "offer": "impulse"},
                {"user_id": users[2], "cart": [ids[5]], "k": 2}]  # fmt: skip
    batched = r.rank_many(requests, batch_size=3)
    assert [b.to_dict() for b in batched] == [r.rank(**q).to_dict() for q in requests]


def test_margin_weighting_ranks_a_request_the_same_alone_or_batched(small, tmp_path) -> None:
    """With margins and ``margin_weight``, a cart request batched with an empty-cart one (no
    probability there) is still ranked by expected margin, as alone."""
    import hashlib
    import shutil

    split, _, path = small
    copy = tmp_path / "artifact"
    shutil.copytree(path, copy)
    table = json.loads((copy / "item_table.json").read_text())
    table["margin"] = [float((7 * i) % 11) for i in range(len(table["price"]))]
    raw = json.dumps(table).encode()
    (copy / "item_table.json").write_bytes(raw)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["item_table.json"] = hashlib.sha256(raw).hexdigest()
    (copy / "manifest.json").write_text(json.dumps(manifest))
    r = Ranker.load(copy, NEUTRAL.replace(margin_weight=3.0))
    ids = split.train.item_map.to_external(np.arange(4)).tolist()
    users = split.train.user_map.to_external(np.arange(4)).tolist()
    requests = [{"user_id": users[0], "cart": [], "k": 5, "offer": "impulse"},
                *({"user_id": u, "cart": [i], "k": 5, "offer": "impulse"}
                  for u, i in zip(users[1:], ids[1:], strict=True))]  # fmt: skip
    batched = r.rank_many(requests, batch_size=4)
    assert [b.to_dict() for b in batched] == [r.rank(**q).to_dict() for q in requests]
    plain = Ranker.load(copy, NEUTRAL).rank(**requests[1])
    assert [i.item_id for i in batched[1].items] != [i.item_id for i in plain.items], (
        "the margins must change the order, or this test checks nothing"
    )


@pytest.mark.slow
def test_parity_on_a_complete_journey_slice(cj_slice, tmp_path) -> None:
    """Real data: ONNX trees = LightGBM within 1e-5, and the served top-10 = the training
    top-10 (ids up to ties, probabilities within 1e-5) for both tasks."""
    train = cj_slice.train
    params = {**SMALL, "n_rebuy": 100, "n_cooccurrence": 100, "n_cf": 30, "n_category": 30,
              "neighbours": 200, "cf_neighbours": 100, "train_windows": 1, "window_days": 28,
              "train_queries": 1000, "n_estimators": 60, "num_leaves": 31, "min_data_in_leaf": 20}  # fmt: skip
    model = RankerRecommender(**params).fit(train)
    path = export_model(model, train, tmp_path / "artifact")
    for new in (False, True):
        task = basket_completion_task(train, cj_slice.test, new_to_user=new)
        users, carts = task.users[:40].astype(np.int64).copy(), task.carts[:40]
        if not new:  # (see test_served_top_k_equals_training_top_k)
            users[:3] = -1
        assert _check_onnx_parity(model, users, carts) > 1000
        assert _served_equals_training(model, train, path, users, carts, new) < 0.05
