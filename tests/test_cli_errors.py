"""The command line: bad input exits with code 2 and a message naming the key or file.

Most runs are in-process (``training.cli.main`` returns the exit code); a few go through a
real subprocess. Data is a handful of rows written to ``tmp_path``; the full Complete Journey
evaluation is never run here.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from training.cli import main

# user, item, timestamp, basket, quantity. Counts per cleaning step, by hand:
#   input 8 rows, users u1 u2 u3, items a b c, baskets b1 b2 b3 b4
#   returns (drop): row 6 (-1) goes -> 7 rows; basket b3 had only that row -> 3 baskets
#   zero_quantity (drop): row 4 (0) goes -> 6 rows; u2 still has row 5
#   duplicates (drop): row 3 repeats row 2 -> 5 rows
TX_CSV = """user_id,item_id,timestamp,basket_id,quantity
u1,a,2020-01-01 10:00,b1,1
u1,b,2020-01-01 10:00,b1,2
u1,b,2020-01-01 10:00,b1,2
u2,a,2020-01-02 10:00,b2,0
u2,c,2020-01-02 10:00,b2,1
u2,c,2020-01-03 10:00,b3,-1
u3,a,2020-01-05 10:00,b4,1
u3,c,2020-01-05 10:00,b4,3
"""
EXPECTED_STEPS = [
    # step, rows_before, rows_after, users, items, baskets
    ("input", 8, 8, 3, 3, 4),
    ("anonymous", 8, 8, 3, 3, 4),
    ("exclude_items", 8, 8, 3, 3, 4),
    ("returns", 8, 7, 3, 3, 3),
    ("zero_quantity", 7, 6, 3, 3, 3),
    ("duplicates", 6, 5, 3, 3, 3),
    ("min_item_interactions", 5, 5, 3, 3, 3),
    ("min_user_interactions", 5, 5, 3, 3, 3),
]

# For evaluate: train days 1-3 (u1, u2), test days 5-6 (both users warm, 2-item baskets).
EVAL_CSV = """user_id,item_id,timestamp,basket_id,week
u1,a,2020-01-01 10:00,b1,1
u1,b,2020-01-01 10:00,b1,1
u2,a,2020-01-02 10:00,b2,1
u2,c,2020-01-02 10:00,b2,1
u1,a,2020-01-05 10:00,b3,2
u1,c,2020-01-05 10:00,b3,2
u2,b,2020-01-06 10:00,b4,2
u2,a,2020-01-06 10:00,b4,2
"""


def base_config(data_path: str) -> dict:
    return {
        "name": "tiny",
        "data": {"source": "files", "interactions": {"path": data_path}},
        "split": {"train_end": "2020-01-03", "test_start": "2020-01-04"},
        "model": {"kind": "popularity"},
        "evaluation": {"k": [1, 2]},
    }


@pytest.fixture
def tx_path(tmp_path: Path) -> str:
    path = tmp_path / "tx.csv"
    path.write_text(TX_CSV, encoding="utf-8")
    return str(path)


@pytest.fixture
def eval_path(tmp_path: Path) -> str:
    path = tmp_path / "eval.csv"
    path.write_text(EVAL_CSV, encoding="utf-8")
    return str(path)


def write_config(tmp_path: Path, payload: dict | str, name: str = "config.yaml") -> str:
    path = tmp_path / name
    text = payload if isinstance(payload, str) else yaml.safe_dump(payload, sort_keys=False)
    path.write_text(text, encoding="utf-8")
    return str(path)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_subprocess(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "training.cli", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def set_key(payload: dict, dotted: str, value) -> dict:
    node = payload
    *parents, last = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    return payload


# -- config errors ------------------------------------------------------------------------------


def test_bad_yaml(tmp_path, capsys):
    path = write_config(tmp_path, "name: tiny\nsplit: [unclosed\n  model: {kind: popularity\n")
    code, _, err = run(capsys, "data", "report", "--config", path)
    assert code == 2
    assert path in err
    assert "YAML" in err
    assert "Traceback" not in err


def test_config_file_not_found(tmp_path, capsys):
    path = str(tmp_path / "missing.yaml")
    code, _, err = run(capsys, "evaluate", "--config", path)
    assert code == 2
    assert path in err


@pytest.mark.parametrize("payload", ["", "- a\n- b\n", "just a string\n"])
def test_config_not_a_mapping(tmp_path, capsys, payload):
    path = write_config(tmp_path, payload)
    code, _, err = run(capsys, "data", "report", "--config", path)
    assert code == 2
    assert path in err
    assert "mapping" in err


CONFIG_ERRORS = [
    # (dotted key to set, value, dotted path the message must name)
    ("bogus", 1, "'bogus'"),
    ("split.bogus", 1, "'split.bogus'"),
    ("data.cleaning.returnz", "drop", "'data.cleaning.returnz'"),
    ("data.cleaning.returns", "keep", "'data.cleaning.returns'"),
    ("data.interactions.bogus", 1, "'data.interactions.bogus'"),
    ("data.source", "csv", "'data.source'"),
    ("split.seed", "abc", "'split.seed'"),
    ("split.time_column", "day", "'split.time_column'"),
    ("evaluation.k", [0], "'evaluation.k[0]'"),
    ("evaluation.k", [5, "x"], "'evaluation.k[1]'"),
    ("evaluation.k", "5", "'evaluation.k'"),
    ("evaluation.k", [], "'evaluation.k'"),
    ("evaluation.k", [10, 10**9], "'evaluation.k[1]'"),  # once an 89 GiB allocation
    ("evaluation.tasks", [], "'evaluation.tasks'"),
    ("name", "../escaped", "'name'"),  # becomes configs/tuned/<name>.yaml
    ("name", "a/b", "'name'"),
    ("evaluation.metrics", ["ndcg", "bogus"], "'evaluation.metrics[1]'"),
    ("evaluation.tasks", ["bogus"], "'evaluation.tasks[0]'"),
    ("data.cleaning.min_item_interactions", "many", "'data.cleaning.min_item_interactions'"),
    ("model.kind", "bogus", "'model.kind'"),
    ("model.params", {"bogus": 1}, "'model.params.bogus'"),
    ("model.params", {"measure": 3}, "'model.params.measure'"),
]


@pytest.mark.parametrize("key, value, named", CONFIG_ERRORS)
@pytest.mark.parametrize("command", [("data", "report"), ("evaluate",)])
def test_config_errors_exit_2_naming_the_key(tmp_path, capsys, tx_path, command, key, value, named):
    path = write_config(tmp_path, set_key(base_config(tx_path), key, value))
    code, out, err = run(capsys, *command, "--config", path)
    assert code == 2
    assert named in err
    assert path in err
    assert out == ""


@pytest.mark.parametrize(
    "kind, params, named",
    [
        ("cooccurrence", {"neighbours": "many"}, "'model.params.neighbours'"),
        ("cooccurrence", {"neighbours": 2.5}, "'model.params.neighbours'"),
        ("cooccurrence", {"min_support": "1"}, "'model.params.min_support'"),
        ("personal_popularity", {"half_life_days": "a week"}, "'model.params.half_life_days'"),
        ("personal_popularity", {"fallback": ["users"]}, "'model.params.fallback'"),
    ],
)
def test_wrong_model_param_type(tmp_path, capsys, tx_path, kind, params, named):
    payload = base_config(tx_path)
    payload["model"] = {"kind": kind, "params": params}
    code, _, err = run(capsys, "evaluate", "--config", write_config(tmp_path, payload))
    assert code == 2
    assert named in err


def test_missing_required_key(tmp_path, capsys, tx_path):
    payload = base_config(tx_path)
    del payload["name"]
    code, _, err = run(capsys, "data", "report", "--config", write_config(tmp_path, payload))
    assert code == 2
    assert "'name'" in err


def test_json_error_output(tmp_path, capsys, tx_path):
    path = write_config(tmp_path, set_key(base_config(tx_path), "split.bogus", 1))
    code, out, err = run(capsys, "data", "report", "--config", path, "--json")
    assert code == 2
    payload = json.loads(out)
    assert "split.bogus" in payload["error"]
    assert path in payload["error"]
    assert payload["kind"] == "ConfigError"
    assert "split.bogus" in err


def test_bad_arguments_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["evaluate"])  # --config is required
    assert exc.value.code == 2
    assert "--config" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flag, value",
    [("--port", "99999"), ("--port", "-1"), ("--port", "http"), ("--reload-interval", "-1"),
     ("--reload-interval", "nan"), ("--reload-interval", "soon")],
)  # fmt: skip
def test_bad_serve_flags_exit_2_naming_the_flag(capsys, flag, value):
    # before: --port 99999 listened on 34463 (wrapped), --reload-interval nan spun a core
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--model", "artifacts/none", flag, value])
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err


# -- model parameters that are valid types but invalid values --------------------------------


@pytest.mark.parametrize(
    "kind, params, named",
    [
        ("popularity", {"measure": "bogus"}, "model.params.measure"),
        ("personal_popularity", {"fallback": "bogus"}, "model.params.fallback"),
        ("personal_popularity", {"half_life_days": -1.0}, "model.params.half_life_days"),
    ],
)
def test_invalid_model_param_value(tmp_path, capsys, eval_path, kind, params, named):
    payload = base_config(eval_path)
    payload["model"] = {"kind": kind, "params": params}
    code, _, err = run(capsys, "evaluate", "--config", write_config(tmp_path, payload))
    assert code == 2
    assert named in err


# -- split bounds ------------------------------------------------------------------------------


def test_unparseable_timestamp_split_bound(tmp_path, capsys, eval_path):
    payload = set_key(base_config(eval_path), "split.train_end", "not-a-date")
    path = write_config(tmp_path, payload)
    code, _, err = run(capsys, "evaluate", "--config", path)
    assert code == 2
    assert "not-a-date" in err
    assert "split.train_end" in err
    assert path in err


def test_text_bound_for_week_split(tmp_path, capsys, eval_path):
    payload = base_config(eval_path)
    payload["split"] = {"time_column": "week", "train_end": "abc", "test_start": 2}
    path = write_config(tmp_path, payload)
    code, _, err = run(capsys, "evaluate", "--config", path)
    assert code == 2
    assert "split.train_end" in err


def test_week_split_on_data_without_weeks(tmp_path, capsys, tx_path):
    payload = base_config(tx_path)
    payload["split"] = {"time_column": "week", "train_end": 1, "test_start": 2}
    code, _, err = run(capsys, "evaluate", "--config", write_config(tmp_path, payload))
    assert code == 2
    assert "split.time_column" in err


# -- data errors -------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [("data", "report"), ("evaluate",)])
def test_files_source_missing_file(tmp_path, capsys, command):
    missing = str(tmp_path / "nowhere" / "tx.csv")
    path = write_config(tmp_path, base_config(missing))
    code, _, err = run(capsys, *command, "--config", path)
    assert code == 2
    assert missing in err
    assert "not found" in err


def test_files_source_missing_file_json(tmp_path, capsys):
    missing = str(tmp_path / "tx.csv")
    path = write_config(tmp_path, base_config(missing))
    code, out, _ = run(capsys, "data", "report", "--config", path, "--json")
    assert code == 2
    payload = json.loads(out)
    assert missing in payload["error"]
    assert payload["kind"] == "DataValidationError"


@pytest.mark.parametrize(
    "columns, named",
    [({}, "'timestamp'"), ({"timestamp": "InvoiceDate"}, "'InvoiceDate'")],
)
def test_files_source_csv_lacking_required_column(tmp_path, capsys, columns, named):
    data = tmp_path / "tx.csv"
    data.write_text("user_id,item_id,basket_id\nu1,a,b1\n", encoding="utf-8")
    payload = base_config(str(data))
    payload["data"]["interactions"]["columns"] = columns
    code, _, err = run(capsys, "data", "report", "--config", write_config(tmp_path, payload))
    assert code == 2
    assert str(data) in err
    assert named in err


def test_files_source_bad_items_file(tmp_path, capsys, tx_path):
    items = tmp_path / "items.csv"
    items.write_text("item_id,price\na,1.0\nb,-2\n", encoding="utf-8")
    payload = base_config(tx_path)
    payload["data"]["items"] = {"path": str(items)}
    code, _, err = run(capsys, "data", "report", "--config", write_config(tmp_path, payload))
    assert code == 2
    assert str(items) in err
    assert "'price'" in err


def test_files_source_without_interactions(tmp_path, capsys, tx_path):
    payload = base_config(tx_path)
    del payload["data"]["interactions"]
    code, _, err = run(capsys, "data", "report", "--config", write_config(tmp_path, payload))
    assert code == 2
    assert "data.interactions" in err


def test_anonymous_rows_with_error_setting(tmp_path, capsys):
    data = tmp_path / "tx.csv"
    data.write_text("user_id,item_id,timestamp\nu1,a,2020-01-01\n,b,2020-01-02\n", encoding="utf-8")
    code, _, err = run(
        capsys, "data", "report", "--config", write_config(tmp_path, base_config(str(data)))
    )
    assert code == 2
    assert str(data) in err
    assert "'user_id'" in err


def test_shop_transactions_source_missing_file(tmp_path, capsys):
    missing = str(tmp_path / "retail.csv")
    payload = base_config(missing)
    payload["data"]["source"] = "shop_transactions"
    code, _, err = run(capsys, "data", "report", "--config", write_config(tmp_path, payload))
    assert code == 2
    assert missing in err


def test_movielens_source_without_path(tmp_path, capsys, tx_path):
    payload = base_config(tx_path)
    payload["data"] = {"source": "movielens100k"}
    code, _, err = run(capsys, "data", "report", "--config", write_config(tmp_path, payload))
    assert code == 2
    assert "data.path" in err


def test_movielens_source_missing_folder(tmp_path, capsys, tx_path):
    folder = str(tmp_path / "ml-100k")
    payload = base_config(tx_path)
    payload["data"] = {"source": "movielens100k", "path": folder}
    code, _, err = run(capsys, "data", "report", "--config", write_config(tmp_path, payload))
    assert code == 2
    assert folder in err


# -- a valid run ---------------------------------------------------------------------------------


def test_data_report_json(tmp_path, capsys, tx_path):
    path = write_config(tmp_path, base_config(tx_path))
    code, out, err = run(capsys, "data", "report", "--config", path, "--json")
    assert code == 0, err
    payload = json.loads(out)
    steps = payload["report"]["steps"]
    got = [
        (s["step"], s["rows_before"], s["rows_after"], s["users"], s["items"], s["baskets"])
        for s in steps
    ]
    assert got == EXPECTED_STEPS
    for s in steps:
        assert s["removed"] == s["rows_before"] - s["rows_after"]
    assert payload["users"] == 3
    assert payload["items"] == 3
    assert len(payload["fingerprint"]) == 64


def test_data_report_text(tmp_path, capsys, tx_path):
    code, out, _ = run(
        capsys, "data", "report", "--config", write_config(tmp_path, base_config(tx_path))
    )
    assert code == 0
    for step, *_ in EXPECTED_STEPS:
        assert step in out


def test_evaluate_tiny_files_config(tmp_path, capsys, eval_path):
    code, out, err = run(
        capsys, "evaluate", "--config", write_config(tmp_path, base_config(eval_path)), "--json"
    )
    assert code == 0, err
    payload = json.loads(out)
    assert payload["name"] == "tiny"
    assert [e["task"] for e in payload["evaluations"]] == [
        "basket_completion",
        "basket_completion_new",
    ]


# -- real subprocesses ---------------------------------------------------------------------------


def test_subprocess_config_error(tmp_path, tx_path):
    path = write_config(tmp_path, set_key(base_config(tx_path), "data.cleaning.returns", "keep"))
    proc = run_subprocess("data", "report", "--config", path, "--json")
    assert proc.returncode == 2, proc.stderr
    assert "data.cleaning.returns" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "data.cleaning.returns" in json.loads(proc.stdout)["error"]


def test_subprocess_data_error_and_success(tmp_path, tx_path):
    missing = str(tmp_path / "gone.csv")
    proc = run_subprocess(
        "data", "report", "--config", write_config(tmp_path, base_config(missing))
    )
    assert proc.returncode == 2
    assert missing in proc.stderr
    assert "Traceback" not in proc.stderr

    good = write_config(tmp_path, base_config(tx_path), "good.yaml")
    proc = run_subprocess("data", "report", "--config", good, "--json")
    assert proc.returncode == 0, proc.stderr
    steps = json.loads(proc.stdout)["report"]["steps"]
    assert [(s["step"], s["rows_after"]) for s in steps] == [(s[0], s[2]) for s in EXPECTED_STEPS]


# -- output paths that cannot be written: exit 2 naming the path, not a traceback --------------


def test_synth_out_under_a_file_exits_2_naming_it(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out = blocker / "shop"
    code, _, err = run(capsys, "data", "synth", "--rows", "50", "--users", "5", "--items", "5",
                       "--out", str(out))  # fmt: skip
    assert code == 2, err
    assert str(blocker) in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == [blocker]  # nothing half-written beside it


def test_train_export_onto_an_existing_file_exits_2(tmp_path, capsys, eval_path):
    config = write_config(tmp_path, base_config(eval_path))
    target = tmp_path / "not_an_artifact.csv"
    target.write_text("keep me")
    code, _, err = run(capsys, "train", "--config", config, "--quiet", "--tracking-uri",
                       f"sqlite:///{tmp_path / 'mlflow.db'}", "--export", str(target))  # fmt: skip
    assert code == 2, err
    assert "refusing to overwrite" in err and str(target) in err
    assert target.read_text() == "keep me"


def test_rank_batch_out_under_a_file_exits_2(tmp_path, capsys, eval_path):
    config = write_config(tmp_path, base_config(eval_path))
    artifact = tmp_path / "artifact"
    assert main(["train", "--config", config, "--quiet", "--tracking-uri",
                 f"sqlite:///{tmp_path / 'mlflow.db'}", "--export", str(artifact)]) == 0  # fmt: skip
    users = tmp_path / "users.csv"
    users.write_text("user_id\nu1\nu2\n")
    capsys.readouterr()
    code, _, err = run(capsys, "rank-batch", "--model", str(artifact), "--users", str(users),
                       "--out", str(users / "offers.parquet"))  # fmt: skip
    assert code == 2, err
    assert str(users) in err and "Traceback" not in err
