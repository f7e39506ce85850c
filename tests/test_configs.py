"""Every shipped config is valid, and every MovieLens-100K config runs end to end on a small
folder written in the real file formats (the real data is never downloaded)."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from features.adapters.movielens import GENRES
from training.config import load_config
from training.experiment import run_evaluation

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_config_is_valid(path: Path) -> None:
    config = load_config(path)
    assert config.name == path.stem
    assert set(config.evaluation.tasks) == {
        "basket_completion",
        "basket_completion_new",
        "next_period",
    }


def write_movielens_folder(folder: Path, seed: int = 0) -> Path:
    """60 users x 150 items, rating sessions between 1997-10-01 and 1998-04-20 (ML-100K's span)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    start = datetime(1997, 10, 1, tzinfo=UTC)
    lines = []
    for user in range(1, 61):
        taste = rng.choice(150, size=40, replace=False) + 1
        for day in sorted(rng.choice(200, size=8, replace=False)):
            when = start + timedelta(days=int(day), hours=int(rng.integers(0, 12)))
            for item in rng.choice(taste, size=int(rng.integers(2, 7)), replace=False):
                ts = int(when.timestamp()) + int(rng.integers(0, 3600))
                lines.append(f"{user}\t{item}\t{int(rng.integers(1, 6))}\t{ts}")
    (folder / "u.data").write_text("\n".join(lines) + "\n")
    items = []
    for item in range(1, 151):
        flags = ["0"] * len(GENRES)
        flags[int(rng.integers(0, len(GENRES)))] = "1"
        items.append(f"{item}|Movie {item} (1995)|01-Jan-1995||http://example|" + "|".join(flags))
    (folder / "u.item").write_bytes(("\n".join(items) + "\n").encode("latin-1"))
    users = [f"{u}|{int(rng.integers(15, 70))}|{'MF'[u % 2]}|student|12345" for u in range(1, 61)]
    (folder / "u.user").write_text("\n".join(users) + "\n")
    return folder


@pytest.mark.parametrize(
    "path", sorted((ROOT / "configs").glob("ml100k_*.yaml")), ids=lambda p: p.stem
)
def test_movielens_config_runs(path: Path, tmp_path: Path) -> None:
    folder = write_movielens_folder(tmp_path / "ml-100k")
    config = load_config(path)
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, path=str(folder)))
    result = run_evaluation(config)
    tasks = {e.task: e for e in result.evaluations}
    assert tasks["basket_completion"].n_queries > 0
    assert 0 <= tasks["basket_completion"].metrics["recall@10"] <= 1
