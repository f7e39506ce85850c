"""``addons rank-batch`` reads a Parquet of requests as well as CSV (issue 12: the Spark
engine's input, ranked in-process too): same offers as the CSV, bad files exit 2."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from features.cleaning import CleaningConfig
from features.dataset import build_dataset
from tests.conftest import make_raw
from tests.test_http import ITEMS, ROWS
from training.cli import main
from training.config import ModelConfig, build_model
from training.export import export_model


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    data = build_dataset(make_raw(ROWS, ITEMS), CleaningConfig())
    model = build_model(ModelConfig("cooccurrence", {})).fit(data)
    return export_model(model, data, tmp_path_factory.mktemp("b") / "art")


def test_parquet_requests_give_the_csv_offers(artifact, tmp_path) -> None:
    users = [str(u) for u in sorted({r[0] for r in ROWS})] + ["nobody"]
    carts = [[str(ROWS[0][1])] if n % 2 else [] for n in range(len(users))]
    (tmp_path / "u.csv").write_text("user_id,cart\n" + "".join(
        f"{u},{'|'.join(c)}\n" for u, c in zip(users, carts, strict=True)))  # fmt: skip
    pq.write_table(pa.table({"user_id": users, "cart": carts}), tmp_path / "u_list.parquet")
    pq.write_table(pa.table({"user_id": users, "cart": ["|".join(c) for c in carts]}),
                   tmp_path / "u_text.parquet")  # fmt: skip
    outs = []
    for name in ("u.csv", "u_list.parquet", "u_text.parquet"):
        out = tmp_path / f"{name}.out.parquet"
        assert main(["rank-batch", "--model", str(artifact), "--users", str(tmp_path / name),
                     "--out", str(out), "--quiet"]) == 0  # fmt: skip
        outs.append(pq.read_table(out).to_pylist())
    assert outs[0] and outs[0] == outs[1] == outs[2]


def test_bad_parquet_exits_2_naming_file_and_column(artifact, tmp_path, capsys) -> None:
    pq.write_table(pa.table({"customer": ["1"]}), tmp_path / "no_user.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    for name, expected in (("no_user.parquet", "'user_id'"), ("junk.parquet", "Parquet")):
        code = main(["rank-batch", "--model", str(artifact), "--users", str(tmp_path / name),
                     "--out", str(tmp_path / "o.csv"), "--quiet"])  # fmt: skip
        err = capsys.readouterr().err
        assert code == 2 and name in err and expected in err, err
        assert "Traceback" not in err
