"""The learned ranker's state shipped as plain ``.npy`` files (the manifest's
``array_files``, written when the state passes ``ARRAY_FILES_BYTES``): memory-mapped at load,
the same offers as the compressed ``ranker_state.npz``, and every damaged file refused with
an ArtifactError naming it."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest

from features.splits import global_time_split
from serving import Ranker
from serving import artifact as artifact_module
from serving.artifact import Artifact, ArtifactError
from tests.test_ranker import SMALL, _shop
from tests.test_ranker_serving import NEUTRAL
from training import artifact_writer
from training.export import export_model
from training.models.ranker import RankerRecommender


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """The same fitted model exported twice: the compressed ``.npz`` (a small state's
    default) and, with the threshold at 0, one ``.npy`` file per state array."""
    split = global_time_split(_shop(), 10, 11, column="week")
    model = RankerRecommender(**SMALL).fit(split.train)
    root = tmp_path_factory.mktemp("ranker_files")
    npz = export_model(model, split.train, root / "npz")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(artifact_writer, "ARRAY_FILES_BYTES", 0)
        files = export_model(model, split.train, root / "files")
    return split, npz, files


def _requests(split) -> list[dict]:
    users = split.train.user_map.to_external(np.arange(12)).tolist()
    items = split.train.item_map.to_external(np.arange(split.train.n_items)).tolist()
    out = []
    for q, user in enumerate(users):
        cart = [items[(3 * q + j) % len(items)] for j in range(q % 4)]  # some empty carts
        out.append({"user_id": user if q % 5 else None, "cart": cart, "k": 6,
                    "offer": "impulse" if q % 2 else "cross_sell"})  # fmt: skip
    return out


def _rehash(folder, name: str) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][name] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_the_state_as_npy_files_ranks_exactly_as_the_npz(both, monkeypatch) -> None:
    split, npz, files = both
    manifest = json.loads((files / "manifest.json").read_text())
    names = manifest["array_files"]["ranker_state.npz"]
    assert not (files / "ranker_state.npz").exists() and (npz / "ranker_state.npz").exists()
    assert "array_files" not in json.loads((npz / "manifest.json").read_text())
    assert set(names.values()) <= set(manifest["files"]) and "uk_items" in names
    monkeypatch.setattr(artifact_module, "MAP_MIN_BYTES", 1)  # map even these tiny arrays
    art = Artifact.load(files)
    assert isinstance(art.mapped["ranker_state.ui_items.npy"].base, np.memmap)
    old, new = Ranker.load(npz, NEUTRAL), Ranker.load(files, NEUTRAL)
    requests = _requests(split)
    got = [r.to_dict() for r in new.rank_many(requests, batch_size=5)]
    assert got == [r.to_dict() for r in old.rank_many(requests, batch_size=5)]
    assert got == [new.rank(**q).to_dict() for q in requests]
    assert sum(len(r["items"]) for r in got) > 30  # offers were made


@pytest.mark.parametrize("damage", ["tampered", "truncated", "wrong_dtype", "objects",
                                    "out_of_range", "symlink"])  # fmt: skip
def test_a_damaged_state_file_is_refused_naming_it(both, tmp_path, damage) -> None:
    _, _, files = both
    copy = tmp_path / "artifact"
    shutil.copytree(files, copy)
    names = json.loads((copy / "manifest.json").read_text())["array_files"]["ranker_state.npz"]
    name = names["ui_items"]
    target = copy / name
    values = np.load(target)
    expected = {"tampered": "sha256 does not match", "truncated": "truncated",
                "wrong_dtype": "ui_items: expected a 1-d int32", "objects": "object array",
                "out_of_range": "ui_items: item indices out of range",
                "symlink": "symbolic link"}[damage]  # fmt: skip
    if damage == "tampered":
        raw = bytearray(target.read_bytes())
        raw[-1] ^= 1
        target.write_bytes(bytes(raw))
    elif damage == "truncated":
        target.write_bytes(target.read_bytes()[:-3])
    elif damage == "wrong_dtype":
        np.save(target, values.astype(np.int64))
    elif damage == "objects":
        np.save(target, values.astype(object), allow_pickle=True)
    elif damage == "out_of_range":
        np.save(target, np.full_like(values, 10_000))
    else:
        target.unlink()
        target.symlink_to(copy / names["ui_n"])
    if damage != "tampered":
        _rehash(copy, name)
    with pytest.raises(ArtifactError, match=expected) as err:
        Ranker.load(copy)
    assert name in str(err.value)


def test_a_manifest_naming_a_state_file_it_does_not_hash_is_refused(both, tmp_path) -> None:
    _, _, files = both
    copy = tmp_path / "artifact"
    shutil.copytree(files, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    unlisted = manifest["array_files"]["ranker_state.npz"]["ui_items"]
    del manifest["files"][unlisted]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"manifest\.json: field 'array_files'"):
        Ranker.load(copy)
    manifest["files"][unlisted] = manifest["files"]["users.json"]
    manifest["array_files"]["ranker_state.npz"]["ui_n"] = "users.json"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"'array_files'.*users\.json"):
        Ranker.load(copy)
