"""Issue 8, ranking: the anchor drives the cart term (real data, every exportable kind), rules
files and rule flags on rank / rank-batch / serve, request checks in the Python API (history
weights, ids that cannot be ids, size limits), "did you mean" for mistyped ids and why an
offer list is empty, ``serve`` of a ``models:/`` URI as a real process, and rank-batch's temp
file on SIGTERM and after ``kill -9``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest

from features.cleaning import CleaningConfig
from features.dataset import build_dataset
from serving import Ranker, RuleSettings
from serving.ranker import RequestError
from serving.rules import RulesError, load_rules
from tests.conftest import make_raw
from tests.processes import free_port
from tests.test_export_serving import KINDS, SHOP_ITEMS, _shop_baskets
from tests.test_registry import _register
from training.cli import build_parser, main
from training.config import ModelConfig, build_model
from training.export import export_model

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OPENBLAS_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}  # fmt: skip


@pytest.fixture(scope="module")
def shop(tmp_path_factory) -> Path:
    """tests/test_export_serving.py's tiny shop (categories, prices, stock), co-occurrence."""
    data = build_dataset(make_raw(_shop_baskets(lambda user: 4), SHOP_ITEMS), CleaningConfig())
    model = build_model(ModelConfig("cooccurrence", {})).fit(data)
    return export_model(model, data, tmp_path_factory.mktemp("shop") / "artifact")


@pytest.fixture(scope="module", params=sorted(KINDS))
def exported(request, cj_slice, tmp_path_factory) -> tuple[str, Path]:
    """Every exportable kind fitted on the real-data slice (the settings of
    tests/test_export_serving.py) and exported."""
    kind = request.param
    model = build_model(ModelConfig(kind, KINDS[kind])).fit(cj_slice.train)
    return kind, export_model(model, cj_slice.train, tmp_path_factory.mktemp(kind) / "artifact")


def _addons() -> list[str]:
    script = Path(sys.executable).with_name("addons")
    return [str(script)] if script.exists() else [sys.executable, "-m", "training.cli"]


# -- 1. the anchor reaches the cart term ------------------------------------------------------


def _anonymous_scores(ranker: Ranker) -> np.ndarray:
    """The graph's score of every item (graph order) for an anonymous shopper, empty cart."""
    n = ranker.n_items
    feeds = {"user": np.array([-1], np.int64), "cart": np.full((1, 1), -1, np.int64),
             "exclude": np.zeros((1, n), bool), "k": np.array([n], np.int64),
             "history": np.zeros((1, n), np.float32),
             "history_items": np.full((1, 1), -1, np.int64)}  # fmt: skip
    scores, items = ranker.session.run(None, {k: v for k, v in feeds.items() if k in ranker.inputs})
    out = np.full(n, np.nan)
    out[items[0]] = scores[0]
    return out


def test_anchor_drives_the_cart_term(exported) -> None:
    """``rank(anchor=X)`` offers what ``rank(cart=[X])`` offers (same rules, same scores), with
    reasons naming X; for a kind with a cart term the scores are not the anonymous ones (they
    were, scores ~1e-6 and reason "popular", before the fix)."""
    kind, path = exported
    settings = RuleSettings(in_stock_only=False, cross_sell_max_price_ratio=1.0, max_per_category=5)
    ranker = Ranker.load(path, settings)
    art, cat = ranker.artifact, ranker.catalog
    # the most-bought item with a price and a category: a product page worth ranking for
    bought = np.bincount(art.history_indices, minlength=ranker.n_items)
    bought[~(np.isfinite(cat.price) & (cat.category >= 0))] = -1
    anchor = art.items.external(np.array([int(bought.argmax())]))[0]
    by_anchor = ranker.rank(anchor=anchor, offer="cross_sell", placement="product", k=5)
    by_cart = ranker.rank(cart=[anchor], offer="cross_sell", placement="product", k=5)
    assert len(by_anchor.items) == 5
    assert [i.item_id for i in by_anchor.items] == [i.item_id for i in by_cart.items]
    np.testing.assert_allclose([i.score for i in by_anchor.items], [i.score for i in by_cart.items])
    assert anchor not in [i.item_id for i in by_anchor.items]  # never offered back
    if kind in ("popularity", "personal_popularity"):
        assert "cart" not in ranker.inputs  # no cart term: nothing the anchor could change
        assert {i.reason for i in by_anchor.items} == {"popular"}
        return
    assert "cart" in ranker.inputs, kind
    assert all(i.reason == f"goes with item {anchor}" for i in by_anchor.items), by_anchor.items
    anonymous = _anonymous_scores(ranker)
    positions, _ = art.items.lookup([i.item_id for i in by_anchor.items])
    got = np.array([i.score for i in by_anchor.items])
    assert not np.allclose(got, anonymous[positions], rtol=1e-4, atol=1e-6), kind


def test_anchor_and_cart_together(shop) -> None:
    """The anchor joins the cart (cart ∪ {anchor}); neither is offered; the reason says both."""
    r = Ranker.load(shop, RuleSettings(cross_sell_max_price_ratio=1.0, max_per_category=5))
    both = r.rank(cart=[2], anchor=1, k=5)
    assert both.items and not {1, 2} & {i.item_id for i in both.items}
    assert all(i.reason == "goes with item 1 and the cart" for i in both.items)
    # same cart term as cart=[1, 2] (scores), rules relative to the anchor
    union = {i.item_id: i.score for i in r.rank(cart=[1, 2], anchor=1, k=5).items}
    assert {i.item_id: i.score for i in both.items} == union
    unknown = r.rank(anchor=12345, k=2)
    assert unknown.unknown_items == [12345] and "anchor 12345 is unknown" in unknown.notes[0]


# -- 2. rules files and flags -----------------------------------------------------------------


def test_rules_file_yaml_and_json(tmp_path) -> None:
    yml = tmp_path / "rules.yaml"
    yml.write_text("max_per_category: 1\nexclude_owned: true\nmargin_weight: 2\n")
    got = load_rules(yml)
    assert (got.max_per_category, got.exclude_owned, got.margin_weight) == (1, True, 2)
    assert got.default_k == RuleSettings().default_k  # keys left out keep the default
    as_json = tmp_path / "rules.json"
    as_json.write_text(json.dumps(got.to_dict()))
    assert load_rules(as_json) == got  # to_dict is the complete, JSON-able settings
    assert RuleSettings(**got.to_dict()) == got
    no_cap = tmp_path / "no_cap.yaml"
    no_cap.write_text("impulse_max_price: .inf\n")  # a price limit may be lifted
    assert load_rules(no_cap).to_dict()["impulse_max_price"] == "inf"
    json.dumps(load_rules(no_cap).to_dict(), allow_nan=False)  # strict JSON for GET /v1/model
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing set\n")
    assert load_rules(empty) == RuleSettings()


def test_the_example_rules_file_lists_every_rule_with_its_default() -> None:
    example = ROOT / "configs" / "rules" / "example.yaml"
    assert load_rules(example) == RuleSettings()
    import yaml

    assert set(yaml.safe_load(example.read_text())) == set(RuleSettings().to_dict())


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ("max_per_categroy: 1\n", "max_per_categroy", "unknown rule"),
        ("max_k: '5'\n", "max_k", "expected int"),
        ("max_k: 5.0\n", "max_k", "expected int"),
        ("exclude_owned: 1\n", "exclude_owned", "expected bool"),
        ("margin_weight: true\n", "margin_weight", "expected float"),
        ("max_per_category: 0\n", "max_per_category", ">= 1"),
        ("cross_sell_max_price_ratio: -0.5\n", "cross_sell_max_price_ratio", "> 0"),
        ("impulse_max_price: .nan\n", "impulse_max_price", "no limit"),
        ("margin_weight: .inf\n", "margin_weight", "finite"),
        ("default_k: 30\n", "default_k", "at most max_k"),
        ("category_level: aisle\n", "category_level", "department"),
        ("max_k: 3\nmax_k: 4\n", "<file>", "repeated"),
        ("a: &x 1\nb: *x\n", "<file>", "aliases"),
        ("- max_k\n", "<root>", "mapping"),
        ("max_k: [\n", "<file>", "not valid YAML"),
    ],
)
def test_bad_rules_are_refused_naming_file_and_key(tmp_path, text, key, problem) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    with pytest.raises(RulesError, match=problem) as info:
        load_rules(path)
    assert info.value.key == key and str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_bad_json_rules_and_unreadable_files(tmp_path) -> None:
    path = tmp_path / "rules.json"
    path.write_text('{"margin_weight": NaN}')
    with pytest.raises(RulesError, match="margin_weight: expected a finite"):
        load_rules(path)
    path.write_text('{"max_k": 5, "max_k": 6}')
    with pytest.raises(RulesError, match="repeated"):
        load_rules(path)
    with pytest.raises(RulesError, match="cannot read"):
        load_rules(tmp_path / "missing.yaml")
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * 70_000 + "\n")
    with pytest.raises(RulesError, match="larger than"):
        load_rules(big)


@pytest.mark.parametrize("command", ["rank", "rank-batch", "serve"])
def test_rule_and_registry_flags_on_every_serving_command(command) -> None:
    """rank, rank-batch and serve take the same rule, registry and trust flags (serve lacked
    --cache / --tracking-uri, which it read: AttributeError on models:/ URIs)."""
    extra = ["--users", "u.csv", "--out", "o.csv"] if command == "rank-batch" else []
    args = build_parser().parse_args([command, "--model", "m", *extra, "--rules", "r.yaml",
        "--k", "4", "--exclude-owned", "--max-per-category", "1", "--trust-key", "a.pem",
        "--trust-key", "b.pem", "--cache", "c", "--tracking-uri", "sqlite:///x.db"])  # fmt: skip
    assert (args.rules, args.k, args.exclude_owned, args.max_per_category) == ("r.yaml", 4, True, 1)
    assert args.trust_key == ["a.pem", "b.pem"] and (args.cache, args.tracking_uri) == (
        "c", "sqlite:///x.db")  # fmt: skip


def _rank_json(capsys, *argv: str) -> dict:
    assert main(["rank", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_rank_flags_override_the_rules_file(shop, tmp_path, capsys) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("max_per_category: 1\ncross_sell_max_price_ratio: 1.0\ndefault_k: 4\n")
    base = ["--model", str(shop), "--cart", "1"]
    cats = {2: "card", 3: "card", 7: "bat", 8: "bat"}
    capped = _rank_json(capsys, *base, "--rules", str(rules))["items"]
    assert len(capped) == 2 and len({cats[i["item_id"]] for i in capped}) == 2  # 1 per category
    loose = _rank_json(capsys, *base, "--rules", str(rules), "--max-per-category", "2")["items"]
    assert len(loose) == 4  # default_k from the file, the flag beats the file's cap
    assert len(_rank_json(capsys, *base, "--rules", str(rules), "--k", "1")["items"]) == 1
    # user 1 bought every item: --exclude-owned leaves nothing, and says why
    owned = _rank_json(capsys, *base, "--user", "1", "--exclude-owned")
    assert owned["items"] == [] and "already owned" in owned["why_empty"]
    assert main(["rank", *base, "--rules", str(rules), "--k", "21"]) == 2
    assert "--k" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_k: many\n")
    assert main(["rank", *base, "--rules", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "max_k" in err and "Traceback" not in err
    assert main(["rank", *base, "--trust-key", str(tmp_path / "none.pem")]) == 2
    assert "--trust-key" in capsys.readouterr().err


def test_rank_batch_takes_rules_and_models_uris(shop, tmp_path, monkeypatch) -> None:
    """rank-batch: the rules file and flags apply; a models:/ URI is resolved like rank's;
    ids that cannot be ids are unknown, not a crash."""
    monkeypatch.chdir(tmp_path)
    users = tmp_path / "users.csv"
    users.write_text("user_id,cart\n1,1\n2,1| 2\n99999999999999999999,1\n")
    rules = tmp_path / "rules.yaml"
    rules.write_text("default_k: 4\nmax_per_category: 1\ncross_sell_max_price_ratio: 1.0\n")
    out = tmp_path / "offers.csv"
    assert main(["rank-batch", "--model", str(shop), "--users", str(users), "--out", str(out),
                 "--rules", str(rules), "--quiet"]) == 0  # fmt: skip
    rows = [line.split(",") for line in out.read_text().splitlines()[1:]]
    per_user = {u: [r for r in rows if r[0] == u] for u in ("1", "2", "99999999999999999999")}
    # one per category: card and bat; " 2" is cart item 2, so its category (card) is out too
    assert [len(v) for v in per_user.values()] == [2, 1, 2]
    assert per_user["2"][0][2] in ("7", "8")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    client.set_registered_model_alias(
        "shop", "champion", _register(client, uri, "cooccurrence", tmp_path)
    )
    out2 = tmp_path / "registry.csv"
    assert main(["rank-batch", "--model", "models:/shop@champion", "--tracking-uri", uri,
                 "--cache", str(tmp_path / "cache"), "--users", str(users), "--out", str(out2),
                 "--k", "2", "--quiet"]) == 0  # fmt: skip
    assert len(out2.read_text().splitlines()) > 1


# -- 3. the Python API checks requests ----------------------------------------------------------


@pytest.mark.parametrize(
    "weight", [float("nan"), float("inf"), -float("inf"), -1.0, 1e300, True, "2"]
)
def test_history_weights_must_be_finite_and_not_negative(shop, weight) -> None:
    with pytest.raises(RequestError, match=r"^history: "):
        Ranker.load(shop).rank(history={1: 1.0, 7: weight})


@pytest.mark.parametrize("big", [2**63, -(2**63) - 1, 10**30, "99999999999999999999999"])
def test_ids_int64_cannot_hold_are_unknown_not_an_overflow(shop, big) -> None:
    r = Ranker.load(shop)
    result = r.rank(user_id=big, cart=[big, 1], anchor=big, exclude=[big], history={big: 1.0})
    assert result.unknown_user and result.unknown_items == [big] * 4
    assert [i.item_id for i in result.items] == [i.item_id for i in r.rank(cart=[1]).items]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"user_id": True}, "user_id"), ({"user_id": 1.0}, "user_id"), ({"cart": [1.5]}, "cart"),
     ({"anchor": False}, "anchor"), ({"exclude": [None]}, "exclude"), ({"history": {2.0: 1}}, "history"),
     ({"cart": "12"}, "cart"), ({"history": [1, 2]}, "history"), ({"user_id": [1]}, "user_id")],
)  # fmt: skip
def test_ids_that_cannot_be_ids_are_refused(shop, kwargs, field) -> None:
    with pytest.raises(RequestError, match=rf"^{field}: "):
        Ranker.load(shop).rank(**kwargs)


def test_size_limits_apply_to_the_python_api(shop) -> None:
    r = Ranker.load(shop, RuleSettings(max_cart_items=2, max_exclude_items=2, max_history_items=2))
    r.rank(cart=[1, 2], exclude=[3, 4], history={5: 1.0, 6: 1.0})  # at the limits: fine
    for kwargs, field in (({"cart": [1, 2, 3]}, "cart"), ({"exclude": [1, 2, 3]}, "exclude"),
                          ({"history": {1: 1.0, 2: 1.0, 3: 1.0}}, "history")):  # fmt: skip
        with pytest.raises(RequestError, match=rf"^{field}: at most 2"):
            r.rank(**kwargs)


# -- 6. mistyped ids and empty lists say what is going on ---------------------------------------


def test_unknown_ids_suggest_the_known_id_they_resemble(shop, capsys) -> None:
    r = Ranker.load(shop)
    assert not r.rank(user_id="0001").unknown_user  # an integer id map reads integers
    for spelled in ("1.0", " 1", "1 ", "+1", "1.00"):
        result = r.rank(user_id=spelled, cart=[f"{spelled}"])
        assert result.unknown_user, spelled
        assert "did you mean 1?" in result.notes[0] and "did you mean 1?" in result.notes[1]
    assert not any("did you mean" in n for n in r.rank(user_id="4242", cart=["77"]).notes)
    assert main(["rank", "--model", str(shop), "--user", "1.0"]) == 0
    out = capsys.readouterr().out
    assert "user_id '1.0' is unknown (did you mean 1?)" in out


def test_suggestions_for_text_ids(tmp_path) -> None:
    rows = [(u, i, b, b, 1) for b, (u, i) in enumerate([("AB12", "Sku-7"), ("AB12", "7"),
                                                       ("cd", "Sku-7"), ("cd", "y")])]  # fmt: skip
    data = build_dataset(make_raw(rows), CleaningConfig())
    path = export_model(
        build_model(ModelConfig("cooccurrence", {})).fit(data), data, tmp_path / "a"
    )
    result = Ranker.load(path).rank(user_id="ab12 ", cart=["SKU-7", "007", "zz"])
    assert "did you mean 'AB12'?" in result.notes[0] and "did you mean 'Sku-7'?" in result.notes[1]
    assert "did you mean '7'?" in result.notes[2] and "did you mean" not in result.notes[3]


def test_an_empty_up_sell_list_says_why(shop, capsys) -> None:
    r = Ranker.load(shop)
    top = r.rank(anchor=6, offer="up_sell")  # the dearest camera: nothing above it
    assert top.items == [] and top.to_dict()["why_empty"] == top.why_empty
    assert (
        "category cam" in top.why_empty and "200.00" in top.why_empty and "250.00" in top.why_empty
    )
    assert r.rank(anchor=1, offer="up_sell").why_empty is None  # item 5 fits: not empty
    nothing = r.rank(offer="up_sell")
    assert nothing.items == [] and "needs an anchor" in nothing.why_empty
    assert main(["rank", "--model", str(shop), "--anchor", "6", "--offer", "up_sell"]) == 0
    assert "no up_sell offer: no item of category cam" in capsys.readouterr().out


# -- 4. serve, as a real process, of a models:/ URI ----------------------------------------------


def _get(url: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as r:
        return json.loads(r.read())


def test_serve_a_registry_alias_as_a_process(tmp_path, migrated_mlflow_store) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    migrated_mlflow_store(tmp_path / "mlflow.db")  # not a test of a first use
    client = mlflow.MlflowClient(uri)
    client.set_registered_model_alias(
        "shop", "champion", _register(client, uri, "cooccurrence", tmp_path)
    )
    rules = tmp_path / "rules.yaml"
    rules.write_text("max_per_category: 1\ncross_sell_max_price_ratio: 1.0\n")
    port = free_port()
    env = {k: v for k, v in ENV.items() if k != "MALLOC_ARENA_MAX"}
    proc = subprocess.Popen(
        [*_addons(), "serve", "--model", "models:/shop@champion", "--tracking-uri", uri,
         "--cache", str(tmp_path / "cache"), "--port", str(port), "--rules", str(rules),
         "--k", "2", "--reload-interval", "1"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "never ready"
            try:
                if _get(f"{base}/readyz")["ready"]:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.3)
        body = _get(f"{base}/v1/rank", {"cart": [1]})
        assert len(body["items"]) == 2 and 1 not in [i["item_id"] for i in body["items"]]
        rules = _get(f"{base}/v1/model")["rules"]  # the effective rules: file, then flags
        assert (rules["max_per_category"], rules["default_k"]) == (1, 2)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
    assert (tmp_path / "cache" / "shop" / "current" / "manifest.json").is_file()


_ARENAS = textwrap.dedent("""
    import ctypes, os, sys, tempfile, threading
    from training.cli import _limit_malloc_arenas
    if sys.argv[1] == "limit":
        assert _limit_malloc_arenas() and os.environ["MALLOC_ARENA_MAX"] == "2"
    barrier = threading.Barrier(8)
    def work():
        barrier.wait()  # all threads allocate at once
        blocks = [bytearray(4096) for _ in range(200)]
        barrier.wait()
    threads = [threading.Thread(target=work) for _ in range(8)]
    [t.start() for t in threads]; [t.join() for t in threads]
    libc = ctypes.CDLL(None)
    libc.fopen.restype = ctypes.c_void_p
    path = tempfile.mktemp()
    fh = libc.fopen(path.encode(), b"w")
    libc.malloc_info(0, ctypes.c_void_p(fh)); libc.fclose(ctypes.c_void_p(fh))
    print(open(path).read().count("<heap nr="))
""")


def test_serve_caps_arenas_first_and_passes_rules_and_keys(shop, tmp_path, monkeypatch) -> None:
    """cmd_serve sets the arena cap before anything else and hands the rules (file, then
    flags) and the trusted keys to the app."""
    import uvicorn

    import training.cli as cli

    calls: list[str] = []
    monkeypatch.setattr(cli, "_limit_malloc_arenas", lambda: calls.append("arenas"))
    seen = {}

    def create_app(model, settings=None, reload_interval=None, trusted_keys=None, **kw):
        calls.append("app")
        seen.update(settings=settings, trusted_keys=trusted_keys)
        return object()

    monkeypatch.setattr("serving.http.create_app", create_app)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append("run"))
    key = tmp_path / "k.pub"
    key.write_text("not checked by this fake app")
    assert main(["serve", "--model", str(shop), "--max-per-category", "3", "--trust-key",
                 str(key), "--reload-interval", "0"]) == 0  # fmt: skip
    assert calls == ["arenas", "app", "run"]
    assert seen["settings"].max_per_category == 3 and seen["trusted_keys"] == [str(key)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_serve_caps_malloc_arenas() -> None:
    """MALLOC_ARENA_MAX is read at process start only: cmd_serve sets the same cap with
    mallopt. Eight threads allocating at once get their own arenas without it, two with it."""
    env = {k: v for k, v in ENV.items() if k != "MALLOC_ARENA_MAX"}
    count = {mode: int(subprocess.run([sys.executable, "-c", _ARENAS, mode], env=env, cwd=ROOT,
                                      capture_output=True, text=True, check=True).stdout)
             for mode in ("free", "limit")}  # fmt: skip
    assert count["limit"] <= 2 < count["free"], count


# -- 5. rank-batch's temp file: SIGTERM, kill -9 -------------------------------------------------


def _start_batch(shop: Path, tmp_path: Path, out: Path) -> subprocess.Popen:
    users = tmp_path / "many.csv"
    if not users.exists():
        users.write_text("user_id,cart\n" + "".join(f"{u % 9},1|2\n" for u in range(300_000)))
    return subprocess.Popen([*_addons(), "rank-batch", "--model", str(shop), "--users", str(users),
                             "--out", str(out), "--chunk-size", "5", "--threads", "1", "--quiet"],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def _wait_for_temp(proc: subprocess.Popen, out: Path) -> Path:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        temps = list(out.parent.glob(f".{out.name}.*.tmp"))
        if temps and temps[0].stat().st_size > 1000:  # writing, well past the start
            return temps[0]
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("rank-batch never started writing")


def test_rank_batch_removes_its_temp_file_on_sigterm(shop, tmp_path) -> None:
    out = tmp_path / "out" / "offers.csv"
    proc = _start_batch(shop, tmp_path, out)
    try:
        _wait_for_temp(proc, out)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "terminated" in err
    assert list(out.parent.iterdir()) == []  # neither a temp file nor a partial output


def test_the_next_rank_batch_removes_what_kill_9_left(shop, tmp_path) -> None:
    out = tmp_path / "out" / "offers.csv"
    proc = _start_batch(shop, tmp_path, out)
    try:
        temp = _wait_for_temp(proc, out)
        proc.kill()
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert temp.exists() and not out.exists()  # what kill -9 leaves
    small = tmp_path / "small.csv"
    small.write_text("user_id\n1\n2\n")
    assert main(["rank-batch", "--model", str(shop), "--users", str(small), "--out", str(out),
                 "--quiet"]) == 0  # fmt: skip
    assert sorted(p.name for p in out.parent.iterdir()) == ["offers.csv"]


# -- rank-batch request files: encodings, odd cells, odd cart types ----------------------------


def _requests(path: Path) -> list[dict]:
    from serving.batch import read_requests

    return [r for chunk in read_requests(path, 2) for r in chunk]


def test_request_csv_with_a_bom_reads_like_without(tmp_path) -> None:
    plain, bom = tmp_path / "plain.csv", tmp_path / "bom.csv"
    plain.write_text("user_id,cart\nu1,a|b\nu2,\n", encoding="utf-8")
    bom.write_text("user_id,cart\nu1,a|b\nu2,\n", encoding="utf-8-sig")
    assert _requests(bom) == _requests(plain) == [
        {"user_id": "u1", "cart": ["a", "b"]}, {"user_id": "u2", "cart": []},
    ]  # fmt: skip


def test_request_csv_not_utf8_or_with_a_huge_field_is_refused_naming_the_line(tmp_path) -> None:
    from serving.batch import BatchInputError

    latin = tmp_path / "latin.csv"
    latin.write_bytes("user_id\nu1\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(BatchInputError, match=r"latin.csv: line \d+: not UTF-8"):
        _requests(latin)
    huge = tmp_path / "huge.csv"
    huge.write_text("user_id\nu1\n" + "x" * 200_000 + "\n")
    with pytest.raises(BatchInputError, match=r"huge.csv: line \d+: field larger"):
        _requests(huge)


def test_request_parquet_cart_of_integers_and_lists(tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    ints = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"user_id": ["u1", "u2"], "cart": [5, None]}), ints)
    assert _requests(ints) == [{"user_id": "u1", "cart": ["5"]}, {"user_id": "u2", "cart": []}]
    lists = tmp_path / "lists.parquet"
    pq.write_table(pa.table({"user_id": ["u1"], "cart": [[5, 6]]}), lists)
    assert _requests(lists) == [{"user_id": "u1", "cart": ["5", "6"]}]
